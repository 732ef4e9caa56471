"""The Kaggle dataset folder (package, weights, offline wheels, metadata), its manifest, and metadata validation.

A Kaggle code competition runs the kernel without internet. The kernel (``kernel-metadata.json`` + its code file
``make_submission.py``, pushed from the repo root) attaches the competition and one dataset: the folder
:func:`build_bundle` writes. ``make_submission.py`` finds that dataset under ``/kaggle/input``, installs the
decoder wheels from its ``wheels/`` with ``pip install --no-index --find-links`` when the decoders are not
importable, and runs ``cspine-submit submit``.

:func:`validate_kernel_metadata` applies the checks of Kaggle's own CLI (``kaggle kernels push``: id
``owner/slug`` with a slug of at least 5 characters, title of at least 5 characters, code file present, language
and kernel type from Kaggle's lists, ``owner/slug`` dataset and kernel sources) plus this project's own (GPU on,
internet off, the competition and the package dataset attached).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

COMPETITION = "rsna-2022-cervical-spine-fracture-detection"
CODE_FILE = "make_submission.py"
KAGGLE_LANGUAGES = ("python", "r", "rmarkdown")
KAGGLE_KERNEL_TYPES = ("script", "notebook")

WHEEL_PACKAGES: tuple[str, ...] = ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "python-gdcm", "dicomsdl")
"""What Kaggle's image lacks for decoding the competition's JPEG Lossless (.4.70) slices: pydicom 3 (the image
may carry an older one), its pylibjpeg plugin with the libjpeg backend, GDCM, and dicomsdl (the fastest direct
.4.70 decoder, :mod:`cspine_submit.read.pixels`; without it GDCM decodes directly, about 2.5x slower). TensorFlow, numpy, pandas,
OpenCV, nibabel and tqdm come with Kaggle's image."""

DEFAULT_PLATFORMS: tuple[str, ...] = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
"""Linux x86-64 tags Kaggle's image accepts (glibc >= 2.28)."""


# ---------------------------------------------------------------------------------------------------------------
# Manifest: one format, one writer (cspine_submit.manifest); re-exported here for callers of the bundle API.

from cspine_submit.manifest import (  # noqa: E402
    MANIFEST_NAME, manifest_entries, sha256_file, training_artefacts, verify_manifest, write_manifest)
from cspine_submit.manifest import is_training_artefact as _is_training_artefact  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# Kaggle metadata


def slugify(text: str) -> str:
    """Kaggle's title -> slug rule (python-slugify): lower case, runs of other characters -> one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _as_bool(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


def _check_owner_slug(value, what: str, min_slug: int = 0) -> str | None:
    if not isinstance(value, str) or value.count("/") != 1:
        return f"{what} {value!r} must be of the form 'owner/slug'"
    owner, slug = value.split("/")
    if not owner or not slug:
        return f"{what} {value!r} must be of the form 'owner/slug' (both parts non-empty)"
    if min_slug and len(slug) < min_slug:
        return f"{what} {value!r}: the slug must be at least {min_slug} characters (Kaggle's rule)"
    return None


@dataclass(frozen=True)
class Validation:
    """Result of a metadata validation: ``errors`` make Kaggle (or the submission) fail, ``warnings`` do not."""

    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


def validate_kernel_metadata(path: str | Path, dataset_id: str | None = None) -> Validation:
    """Validate ``kernel-metadata.json`` as ``kaggle kernels push`` does, plus this project's requirements.

    Parameters
    ----------
    path : the kernel-metadata.json file (its folder is the kernel folder; ``code_file`` is relative to it)
    dataset_id : the package dataset's ``owner/slug``; when given it must be among ``dataset_sources``
    """
    path = Path(path)
    errors: list[str] = []
    warns: list[str] = []
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Validation((f"{path}: no such file",))
    except json.JSONDecodeError as exc:
        return Validation((f"{path}: not valid JSON ({exc})",))
    if not isinstance(meta, dict):
        return Validation((f"{path}: expected a JSON object",))

    title = meta.get("title")
    if title is not None and (not isinstance(title, str) or len(title) < 5):
        errors.append(f"title {title!r}: must be at least five characters")
    code = meta.get("code_file") or ""
    if not code:
        errors.append("code_file: a source file must be specified")
    elif not (path.parent / code).is_file():
        errors.append(f"code_file {code!r}: not found in {path.parent}")
    elif code != CODE_FILE:
        warns.append(f"code_file {code!r}: this project's kernel runs {CODE_FILE}")
    slug, id_no = meta.get("id"), meta.get("id_no")
    if not slug and not id_no:
        errors.append("id: an 'owner/slug' id (or id_no) must be specified")
    if slug:
        problem = _check_owner_slug(slug, "id", min_slug=5)
        if problem:
            errors.append(problem)
        elif isinstance(title, str) and slugify(title) != slug.split("/")[1].lower():
            warns.append(f"title {title!r} resolves to slug {slugify(title)!r}, not the id's "
                         f"{slug.split('/')[1]!r} (Kaggle warns: surprising behaviour)")
    language = meta.get("language", "")
    if language not in KAGGLE_LANGUAGES:
        errors.append(f"language {language!r}: must be one of {list(KAGGLE_LANGUAGES)}")
    kernel_type = meta.get("kernel_type", "")
    if kernel_type not in KAGGLE_KERNEL_TYPES:
        errors.append(f"kernel_type {kernel_type!r}: must be one of {list(KAGGLE_KERNEL_TYPES)}")
    elif kernel_type == "notebook" and code.endswith(".py"):
        errors.append(f"kernel_type 'notebook' with code_file {code!r}: a notebook needs an .ipynb; use 'script'")
    elif kernel_type == "script" and code.endswith(".ipynb"):
        errors.append(f"kernel_type 'script' with code_file {code!r}: use 'notebook' for .ipynb files")
    for key in ("dataset_sources", "kernel_sources", "competition_sources", "model_sources"):
        value = meta.get(key, [])
        if not isinstance(value, list):
            errors.append(f"{key}: must be a list")
            meta[key] = []
    for source in meta.get("dataset_sources", []):
        problem = _check_owner_slug(source, "dataset_sources entry")
        if problem:
            errors.append(problem)
    for source in meta.get("kernel_sources", []):
        problem = _check_owner_slug(source, "kernel_sources entry", min_slug=5)
        if problem:
            errors.append(problem)
    for key in ("is_private", "enable_gpu", "enable_internet", "enable_tpu"):
        if key in meta and _as_bool(meta[key]) is None:
            errors.append(f"{key} {meta[key]!r}: must be true or false")

    # This project's requirements for a code-competition submission kernel.
    if _as_bool(meta.get("enable_internet", True)) is not False:
        errors.append("enable_internet: must be false (code competitions run without internet; Kaggle's default is true)")
    if _as_bool(meta.get("enable_gpu", False)) is not True:
        errors.append("enable_gpu: must be true (9 hours for ~1500 studies needs the GPU)")
    if COMPETITION not in meta.get("competition_sources", []):
        errors.append(f"competition_sources: must include {COMPETITION!r} (the hidden test set is mounted from it)")
    if dataset_id is not None and dataset_id not in meta.get("dataset_sources", []):
        errors.append(f"dataset_sources: must include the package dataset {dataset_id!r} (the bundle's "
                      "dataset-metadata.json id), or the kernel cannot import the package")
    elif not meta.get("dataset_sources"):
        errors.append("dataset_sources: empty; attach the package dataset built by `cspine-submit bundle`")
    return Validation(tuple(errors), tuple(warns))


def validate_dataset_metadata(meta: dict) -> Validation:
    """Checks of Kaggle's ``datasets create``: title 6-50 characters, id ``owner/slug`` with a 6-50 character slug,
    licenses a list of ``{"name": ...}``."""
    errors = []
    title = meta.get("title", "")
    if not isinstance(title, str) or not 6 <= len(title) <= 50:
        errors.append(f"title {title!r}: must be 6 to 50 characters")
    problem = _check_owner_slug(meta.get("id"), "id")
    if problem:
        errors.append(problem)
    else:
        slug = meta["id"].split("/")[1]
        if not 6 <= len(slug) <= 50 or slugify(slug) != slug:
            errors.append(f"id {meta['id']!r}: the slug must be 6-50 characters of a-z, 0-9 and '-'")
    lic = meta.get("licenses", [])
    if not isinstance(lic, list) or not all(isinstance(x, dict) and "name" in x for x in lic):
        errors.append("licenses: must be a list of {\"name\": ...}")
    return Validation(tuple(errors))


# ---------------------------------------------------------------------------------------------------------------
# Bundle


@dataclass
class BundleResult:
    """What :func:`build_bundle` wrote."""

    out: Path
    wheels: list = field(default_factory=list)
    wheel_errors: list = field(default_factory=list)
    kernel: Validation = field(default_factory=Validation)
    dataset_id: str = ""
    manifest_problems: list = field(default_factory=list)
    left_out: list = field(default_factory=list)
    """Training artefacts found under weights/ and not copied (cache, checkpoints, train state, logs)."""


def _installed_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def download_wheels(dest: Path, python_version: str, platforms=DEFAULT_PLATFORMS, packages=WHEEL_PACKAGES,
                    pin: bool = True) -> tuple[list[Path], list[str]]:
    """``pip download --only-binary=:all: --no-deps`` the decoder wheels for a target interpreter.

    Each package is pinned to the version installed here (the one the tests ran with) when ``pin``; when that
    version has no wheel for the target, the newest wheel is taken and a note says so.

    Returns
    -------
    wheels : list of Path
    notes : list of str
        Problems, one per package that could not be fetched (with pip's last line).
    """
    dest.mkdir(parents=True, exist_ok=True)
    notes = []
    base = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps", "--disable-pip-version-check",
            "--python-version", python_version, "-d", str(dest)]
    for p in platforms:
        base += ["--platform", p]
    for pkg in packages:
        version = _installed_version(pkg) if pin else None
        specs = [f"{pkg}=={version}", pkg] if version else [pkg]
        last = ""
        for i, spec in enumerate(specs):
            proc = subprocess.run(base + [spec], capture_output=True, text=True)
            if proc.returncode == 0:
                if i:
                    notes.append(f"{pkg}: no wheel of {specs[0]} for Python {python_version}; took {last_taken(proc)}")
                break
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        else:
            notes.append(f"{pkg}: no wheel for Python {python_version} on {list(platforms)}: {last}")
    return sorted(dest.glob("*.whl")), notes


def last_taken(proc) -> str:
    """The wheel name pip reports as saved, for notes."""
    for line in reversed(proc.stdout.splitlines()):
        if "Saved" in line or "already" in line.lower():
            return line.strip().split("/")[-1]
    return "the newest"


def _copy_package(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))


def build_bundle(out: str | Path, *, python_version: str | None = None, platforms=DEFAULT_PLATFORMS,
                 owner: str | None = None, wheels: bool = True, force: bool = False,
                 repo: Path | None = None) -> BundleResult:
    """Write the Kaggle dataset folder.

    Layout of ``out``::

        cspine_submit/          the package (sources only)
        make_submission.py      the kernel's entry point (also usable from this folder)
        weights/                everything under the repo's weights/ (MANIFEST.json verified first)
        wheels/                 decoder wheels for the target Python (see WHEEL_PACKAGES)
        setup.cfg, pyproject.toml, README.md   so the folder is also pip-installable
        dataset-metadata.json   Kaggle dataset metadata (id from kernel-metadata.json's dataset_sources)
        kernel-metadata.json    copy (ids rewritten for ``owner``): ``kaggle kernels push -p OUT`` pushes the kernel

    Parameters
    ----------
    out : target folder (must not exist unless ``force``)
    python_version : target interpreter, e.g. "3.11" (default: this one)
    platforms : wheel platform tags
    owner : Kaggle user name to put in the dataset id (default: the owner in kernel-metadata.json)
    wheels : download the decoder wheels (False for quick tests)
    force : replace an existing ``out``
    repo : the repo root (default: the folder holding the package)

    Raises
    ------
    FileExistsError, ValueError
        ``out`` exists without ``force``; ``kernel-metadata.json`` or the weights manifest is invalid.
    """
    from cspine_submit.files import repo_root

    repo = Path(repo) if repo else repo_root()
    out = Path(out)
    python_version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    kernel_path = repo / "kernel-metadata.json"
    kernel_meta = json.loads(kernel_path.read_text(encoding="utf-8")) if kernel_path.is_file() else {}
    sources = kernel_meta.get("dataset_sources") or []
    dataset_id = sources[0] if sources else "cspine-submit/cspine-submit-package"
    if owner:
        dataset_id = f"{owner}/{dataset_id.split('/')[-1]}"
    dataset_meta = {
        "title": "cspine-submit package",
        "id": dataset_id,
        "licenses": [{"name": "other"}],
        "description": "cspine_submit package, weights and offline wheels for the RSNA 2022 cervical-spine "
                       "fracture detection submission kernel (make_submission.py).",
    }
    dv = validate_dataset_metadata(dataset_meta)
    if not dv.ok:
        raise ValueError("dataset-metadata.json would be invalid: " + "; ".join(dv.errors))
    kv = validate_kernel_metadata(kernel_path, dataset_id=None if owner else dataset_id)
    if not kv.ok:
        raise ValueError(f"{kernel_path}: " + "; ".join(kv.errors))
    problems = verify_manifest(repo / "weights") if (repo / "weights" / MANIFEST_NAME).is_file() else []
    if problems:
        raise ValueError("weights/MANIFEST.json does not match the weights: " + "; ".join(problems[:5]))

    if out.exists():
        if not force:
            raise FileExistsError(f"{out} exists; use --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _copy_package(repo / "cspine_submit", out / "cspine_submit")
    shutil.copy2(repo / CODE_FILE, out / CODE_FILE)
    left_out: list[str] = []
    if (repo / "weights").is_dir():
        weights = repo / "weights"
        left_out = training_artefacts(weights)

        def ignore(directory, names):
            rel = Path(directory).relative_to(weights)
            return [n for n in names if n.startswith(".") or n == "__pycache__"
                    or _is_training_artefact(weights, rel / n)]

        shutil.copytree(weights, out / "weights", ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        if (repo / name).is_file():
            shutil.copy2(repo / name, out / name)
    kernel_copy = dict(kernel_meta)
    if owner:
        kernel_copy["id"] = f"{owner}/{str(kernel_meta.get('id', '/cspine-submit')).split('/')[-1]}"
        kernel_copy["dataset_sources"] = [dataset_id]
    (out / "kernel-metadata.json").write_text(json.dumps(kernel_copy, indent=2) + "\n", encoding="utf-8")
    (out / "dataset-metadata.json").write_text(json.dumps(dataset_meta, indent=2) + "\n", encoding="utf-8")
    # The copy is a complete kernel folder too (code file beside it): `kaggle kernels push -p OUT` works.
    kv = validate_kernel_metadata(out / "kernel-metadata.json", dataset_id=dataset_id)
    if not kv.ok:
        raise ValueError(f"{out / 'kernel-metadata.json'}: " + "; ".join(kv.errors))
    result = BundleResult(out=out, kernel=kv, dataset_id=dataset_id, left_out=left_out)
    if wheels:
        result.wheels, result.wheel_errors = download_wheels(out / "wheels", python_version, platforms)
    return result
