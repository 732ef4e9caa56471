"""What the two writers of competition-style dataset folders share: ``synthetic.generate_dataset`` (drawn studies)
and ``volume_study.write_studies`` (real CT volumes)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

import numpy as np


def exact_flags(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    """n booleans, exactly round(fraction * n) of them True, in random order (so small sets keep their mix)."""
    flags = np.zeros(n, bool)
    flags[: int(round(float(fraction) * n))] = True
    return rng.permutation(flags)


def clear_outputs(root: Path, outputs: Iterable[str], force: bool, what: str) -> None:
    """Make ``root`` ready for a writer that writes ``outputs`` (names directly under it).

    An empty or missing folder is left as it is. A non-empty one needs ``force``; then each of ``outputs`` that
    exists is removed (and nothing else, so a user's other files there survive).

    Raises
    ------
    FileExistsError
        ``root`` is not empty and ``force`` is false; the message names the folder and says what would be replaced.
    """
    if not (root.exists() and any(root.iterdir())):
        return
    if not force:
        raise FileExistsError(f"{root}: not empty; pass force=True (--force) to replace {what} there")
    for name in outputs:
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
