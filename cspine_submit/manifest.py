"""``MANIFEST.json``: sha256 and size of every file a weights (or dataset) folder ships; the one writer and reader.

Format (the only one written; ``cspine-submit check``, ``bundle`` and ``train`` all use this module)::

    {"files": {"<relative posix path>": {"sha256": "<hex>", "size": <bytes>}, ...},
     "package_version": "...", "created_by": "...", "note": "..."}

Training artefacts are never listed, even when a user left them inside the folder: the crop cache, checkpoints,
train state and logs (:func:`is_training_artefact`). A folder marked with a ``CACHEDIR.TAG`` file (the Cache
Directory Tagging convention that tar ``--exclude-caches``, borg and restic honour) is an artefact as a whole;
``train`` tags its work folder and its cache that way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cspine_submit.config import VERTEBRAE, ModelConfig

MANIFEST_NAME = "MANIFEST.json"

CACHEDIR_TAG = "CACHEDIR.TAG"
CACHEDIR_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"
"""First line of a CACHEDIR.TAG file (https://bford.info/cachedir/)."""

ARTEFACT_DIRS: tuple[str, ...] = ("cache", "checkpoints")
"""Folder names training writes (older runs wrote them inside the weights folder)."""

ARTEFACT_FILES: tuple[str, ...] = ("train_state.json", "history.csv", "training_curves.png", "train.log")
"""File names of training state and logs."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tag_cache_dir(folder: str | Path, what: str = "cspine-submit training artefacts") -> Path:
    """Create ``folder`` and mark it with a CACHEDIR.TAG (so manifests, bundles and backup tools skip it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tag = folder / CACHEDIR_TAG
    if not tag.is_file():
        tag.write_text(f"{CACHEDIR_SIGNATURE}\n# This folder holds {what}; it is not needed for inference.\n")
    return tag


def _tagged(folder: Path) -> bool:
    tag = folder / CACHEDIR_TAG
    try:
        return tag.is_file() and tag.read_text(errors="replace").startswith(CACHEDIR_SIGNATURE)
    except OSError:
        return False


def is_training_artefact(root: str | Path, rel: str | Path) -> bool:
    """Whether ``root / rel`` is a training artefact: inside a tagged folder or an ``ARTEFACT_DIRS`` folder, named
    in ``ARTEFACT_FILES``, or a temporary file (``*.tmp*``)."""
    root, rel = Path(root), Path(rel)
    parts = rel.parts
    if not parts:
        return False
    if parts[-1] in ARTEFACT_FILES or ".tmp" in parts[-1]:
        return True
    for i, part in enumerate(parts[:-1] if (root / rel).is_file() else parts):
        if part in ARTEFACT_DIRS or _tagged(root.joinpath(*parts[: i + 1])):
            return True
    return False


def _walk(folder: Path):
    """(relative path, is artefact) of every file under ``folder``, sorted, hidden files and __pycache__ left out."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or rel.as_posix() == MANIFEST_NAME:
            continue
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        yield rel, is_training_artefact(folder, rel)


def training_artefacts(folder: str | Path) -> list[str]:
    """Relative paths of the training artefacts under ``folder`` (what a manifest or bundle leaves out)."""
    return [rel.as_posix() for rel, artefact in _walk(Path(folder)) if artefact]


def manifest_entries(folder: str | Path) -> dict[str, dict]:
    """``{relative posix path: {"sha256", "size"}}`` of every file under ``folder``, sorted by path, except
    MANIFEST.json itself, hidden files and training artefacts."""
    folder = Path(folder)
    return {rel.as_posix(): {"sha256": sha256_file(folder / rel), "size": (folder / rel).stat().st_size}
            for rel, artefact in _walk(folder) if not artefact}


def write_manifest(folder: str | Path, created_by: str = "") -> Path:
    """Write ``folder/MANIFEST.json`` (atomically) listing every file :func:`manifest_entries` lists."""
    from cspine_submit import __version__
    from cspine_submit.files import atomic_write_text

    folder = Path(folder)
    data = {"files": manifest_entries(folder), "package_version": __version__}
    if created_by:
        data["created_by"] = created_by
    data["note"] = "sha256 and size of every file under this folder; verify with `cspine-submit check`"
    return atomic_write_text(folder / MANIFEST_NAME, json.dumps(data, indent=2) + "\n")


def _manifest_files(data: dict) -> dict[str, dict]:
    """Accept ``{"files": {path: entry}}``, ``{"files": [{"path", "sha256", ...}]}`` or ``{path: entry}``."""
    files = data.get("files", data)
    if isinstance(files, list):
        return {f["path"]: f for f in files if isinstance(f, dict) and "path" in f}
    return {k: v for k, v in files.items() if isinstance(v, dict) and "sha256" in v}


def verify_manifest(folder: str | Path, extra_ok: bool = True) -> list[str]:
    """Check every file listed in ``folder/MANIFEST.json`` (sha256 and size).

    Returns
    -------
    list of str
        One line per problem, naming the file: missing, size differs, sha256 differs; also files present but not
        listed when ``extra_ok`` is False (training artefacts are never counted as such). Empty when all is well.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return [f"{path}: no manifest"]
    try:
        listed = _manifest_files(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, AttributeError) as exc:
        return [f"{path}: not a valid manifest ({exc})"]
    problems = []
    for rel, entry in sorted(listed.items()):
        f = folder / rel
        if not f.is_file():
            problems.append(f"{f}: listed in {path} but missing")
            continue
        size = f.stat().st_size
        if "size" in entry and int(entry["size"]) != size:
            problems.append(f"{f}: size {size} bytes, manifest says {entry['size']}")
        elif sha256_file(f) != entry["sha256"]:
            problems.append(f"{f}: sha256 differs from {path} (file modified or corrupt)")
    if not extra_ok:
        for rel, artefact in _walk(folder):
            if not artefact and rel.as_posix() not in listed:
                problems.append(f"{folder / rel}: present but not listed in {path}")
    return problems


@dataclass(frozen=True)
class WeightsSummary:
    """What a weights folder holds, read from its ``model_config.json`` and file sizes (no TensorFlow).

    Attributes
    ----------
    folder : Path
    trained_on : str
        ``model_config.json``'s ``trained_on`` (``untrained``, ``synthetic``, ``competition``, ...).
    vertebrae_with_classifiers : tuple of str
        Vertebrae whose every listed classifier file is present.
    classifier_files : int
        Distinct classifier files present (an ensemble shared by the vertebrae counts each file once).
    classifier_bytes, total_bytes : int
        Sizes of those files, and of every file a manifest would list (training artefacts left out).
    """

    folder: Path
    trained_on: str
    vertebrae_with_classifiers: tuple[str, ...]
    classifier_files: int
    classifier_bytes: int
    total_bytes: int

    @property
    def n_vertebrae(self) -> int:
        """How many of the seven vertebrae have their classifiers."""
        return len(self.vertebrae_with_classifiers)

    def describe(self) -> str:
        """One line for a user: ``7/7 vertebrae with classifiers (5 files, 2.1 MB), trained_on synthetic``."""
        return (f"{self.n_vertebrae}/7 vertebrae with classifiers ({self.classifier_files} file(s), "
                f"{format_bytes(self.classifier_bytes)}), trained_on {self.trained_on!r}; "
                f"{format_bytes(self.total_bytes)} in all")


def format_bytes(n: int) -> str:
    """``n`` bytes as a short decimal size (``"95.3 MB"``)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def summarize_weights(folder: str | Path) -> WeightsSummary:
    """Read what ``folder`` ships: classifiers per vertebra (from its ``model_config.json``), trained_on, sizes.

    Raises
    ------
    FileNotFoundError
        ``folder/model_config.json`` is missing (naming it).
    ValueError
        It does not parse as a model config (naming the file and the problem).
    """
    folder = Path(folder)
    config = ModelConfig.from_json(folder / "model_config.json")
    present, files = [], set()
    for v in VERTEBRAE:
        paths = config.classifier_paths(v) if v in config.classifier_files else ()
        if paths and all((folder / p).is_file() for p in paths):
            present.append(v)
            files.update(paths)
    sizes = {rel: (folder / rel).stat().st_size for rel, artefact in _walk(folder) if not artefact}
    return WeightsSummary(folder=folder, trained_on=str(config.trained_on), vertebrae_with_classifiers=tuple(present),
                          classifier_files=len(files), classifier_bytes=sum((folder / f).stat().st_size for f in files),
                          total_bytes=sum(sizes.values()))
