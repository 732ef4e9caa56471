"""The files every stage writes and finds: one atomic writer, one place for the repository's paths."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A crash at any moment leaves either the old file or the complete new one, never a partial file. The file gets
    the permissions of the file it replaces, or the usual ones for a new file (0666 minus the umask), not
    mkstemp's owner-only 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.chmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def repo_root() -> Path:
    """The folder holding the package directory (the repo, or the Kaggle dataset folder)."""
    return Path(__file__).resolve().parent.parent


def default_weights_dir() -> Path:
    """``weights/`` beside the package (works for editable installs and for the Kaggle dataset folder)."""
    return repo_root() / "weights"
