"""The Kaggle dataset folder (package, weights, offline wheels, metadata), its manifest, and metadata validation.

A Kaggle code competition runs the kernel without internet. :func:`build_bundle` writes one folder that is both the
dataset (the package, the weights folder shipped, decoder wheels, ``dataset-metadata.json``) and the kernel
(``kernel-metadata.json`` + its code file, the notebook :data:`NOTEBOOK_FILE`), with ids written for the user's
Kaggle name. The kernel attaches the competition and that dataset; its notebook runs the dataset's
``make_submission.py``, which installs the decoder wheels from ``wheels/`` with ``pip install --no-index`` when the
decoders are not importable, and runs ``cspine-submit submit``. The repository's ``kernel-metadata.json`` is the
template (owner :data:`PLACEHOLDER_OWNER`, code file ``make_submission.py``).

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

from cspine_submit.config import VERTEBRAE

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

NOTEBOOK_TEMPLATE = "kaggle_submission.ipynb"
"""The submission kernel's notebook, package data (``cspine_submit/data/``); the bundle ships it as
:data:`NOTEBOOK_FILE` beside its ``kernel-metadata.json``."""

NOTEBOOK_FILE = "cspine-submit-kernel.ipynb"
"""The notebook's name in the bundle folder: the kernel's ``code_file``."""

DATASET_SLUG = "cspine-submit-package"
KERNEL_SLUG = "cspine-submit-rsna-2022"
LICENSE_NAME = "other"
"""The dataset's licence entry. The package is MIT (setup.cfg ``license = MIT``), which is not among the names
Kaggle's ``datasets create`` accepts (:data:`KAGGLE_LICENSES`), so: ``other``, "specified in description", and the
description says MIT for the package and names each bundled wheel's own licence."""

KAGGLE_LICENSES: tuple[str, ...] = (
    "CC0-1.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0", "CC-BY-NC-SA-4.0", "GPL-2.0", "ODbL-1.0", "DbCL-1.0",
    "copyright-authors", "other", "unknown", "CC-BY-4.0", "CC-BY-NC-4.0", "PDDL", "CC-BY-3.0", "CC-BY-3.0-IGO",
    "US-Government-Works", "CC-BY-NC-SA-3.0-IGO", "CDLA-Permissive-1.0", "CDLA-Sharing-1.0", "CC-BY-ND-4.0",
    "CC-BY-NC-ND-4.0", "ODC-BY-1.0", "LGPL-3.0", "AGPL-3.0", "FDL-1.3", "EU-ODP-Legal-Notice", "apache-2.0",
    "GPL-3.0")
"""Licence names ``kaggle datasets create`` accepts (Kaggle CLI, docs/datasets_metadata.md)."""

PLACEHOLDER_OWNER = "YOUR-KAGGLE-USERNAME"
"""Owner in the repository's template ``kernel-metadata.json``; :func:`build_bundle` writes the real one."""

OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,49}$")


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
    elif code not in (CODE_FILE, NOTEBOOK_FILE):
        warns.append(f"code_file {code!r}: this project's kernel runs {NOTEBOOK_FILE} or {CODE_FILE}")
    slug, id_no = meta.get("id"), meta.get("id_no")
    if not slug and not id_no:
        errors.append("id: an 'owner/slug' id (or id_no) must be specified")
    if slug:
        problem = _check_owner_slug(slug, "id", min_slug=5)
        if problem:
            errors.append(problem)
        else:
            if slug.split("/")[0] == PLACEHOLDER_OWNER:
                warns.append(f"id {slug!r}: the template's placeholder owner; `cspine-submit bundle --owner NAME` "
                             "writes the kernel folder with your Kaggle user name")
            if isinstance(title, str) and slugify(title) != slug.split("/")[1].lower():
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
    if not isinstance(lic, list) or len(lic) != 1 or not all(isinstance(x, dict) and "name" in x for x in lic):
        errors.append("licenses: must be a list of exactly one {\"name\": ...}")
    elif lic[0]["name"] not in KAGGLE_LICENSES:
        errors.append(f"licenses: {lic[0]['name']!r} is not a licence name Kaggle accepts (one of "
                      f"{', '.join(KAGGLE_LICENSES)}; 'other' = specified in the description)")
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
    kernel_id: str = ""
    manifest_problems: list = field(default_factory=list)
    left_out: list = field(default_factory=list)
    """Training artefacts found in the weights folder and not copied (cache, checkpoints, train state, logs)."""
    weights: object = None
    """:class:`cspine_submit.manifest.WeightsSummary` of the shipped weights."""
    notes: list = field(default_factory=list)
    """Things the user should know about what ships (partly trained, synthetic classifiers, a manifest written)."""
    sizes: dict = field(default_factory=dict)
    """Bytes by part: ``package``, ``weights``, ``wheels``, ``other`` and ``total`` (the upload, before zipping)."""


def _installed_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def installed_platform_tags(dist: str) -> list[str]:
    """Platform tags of the wheel ``dist`` was installed from (its ``.dist-info/WHEEL``), e.g.
    ``["manylinux_2_34_x86_64", "manylinux_2_31_x86_64"]``; empty when unknown."""
    from importlib import metadata

    try:
        text = metadata.distribution(dist).read_text("WHEEL") or ""
    except metadata.PackageNotFoundError:
        return []
    tags = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")]
    return sorted({t.split("-")[-1] for t in tags if t.count("-") == 2}, reverse=True)


def _why_no_pinned_wheel(pkg: str, spec: str, python_version: str, platforms) -> str:
    """The likely cause when the pinned version has no wheel: its platform tags beyond the platform cap (known from
    the installed copy's WHEEL file), else the Python version."""
    tags = installed_platform_tags(pkg)
    linux = [t for t in tags if "linux" in t]
    if linux and not set(linux) & set(platforms):
        return (f"no wheel of {spec} for {list(platforms)}: its wheels (as installed here) are {linux}, beyond the "
                f"platform cap {max(platforms)} (a newer glibc); add `--platform {linux[-1]}` if the Kaggle image's "
                "glibc is that new")
    return f"no wheel of {spec} for Python {python_version} on {list(platforms)}"


def download_wheels(dest: Path, python_version: str, platforms=DEFAULT_PLATFORMS, packages=WHEEL_PACKAGES,
                    pin: bool = True) -> tuple[list[Path], list[str]]:
    """``pip download --only-binary=:all: --no-deps`` the decoder wheels for a target interpreter.

    Each package is pinned to the version installed here (the one the tests ran with) when ``pin``; when that
    version has no wheel for the target, the newest wheel is taken and a note says so, and why.

    Returns
    -------
    wheels : list of Path
    notes : list of str
        Problems, one per package that could not be fetched (with pip's last line) or fetched at another version.
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
                    why = _why_no_pinned_wheel(pkg, specs[0], python_version, platforms)
                    notes.append(f"{pkg}: {why}; took {last_taken(proc)}")
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


def resolve_owner(owner: str | None) -> str:
    """The Kaggle user name the ids are written for: ``owner``, else ``$KAGGLE_USERNAME`` (the Kaggle CLI's own
    variable). Raises ValueError when neither is given or the name cannot be a Kaggle user name."""
    import os

    owner = owner or os.environ.get("KAGGLE_USERNAME", "")
    if not owner:
        raise ValueError("bundle needs your Kaggle user name for the dataset and kernel ids: --owner NAME (or set "
                         "KAGGLE_USERNAME)")
    if not OWNER_RE.match(owner) or owner == PLACEHOLDER_OWNER:
        raise ValueError(f"--owner {owner!r}: not a Kaggle user name (letters, digits, '-' and '_')")
    return owner


def check_weights(weights: Path, allow_untrained: bool = False):
    """Summarise the weights folder to ship and refuse one that would only give priors.

    Returns ``(WeightsSummary, notes)``. Raises FileNotFoundError (no folder / no model_config.json) or ValueError
    (no classifier, unless ``allow_untrained``; a MANIFEST.json that does not match).
    """
    from cspine_submit.manifest import summarize_weights

    if not weights.is_dir():
        raise FileNotFoundError(f"{weights}: no such weights folder")
    summary = summarize_weights(weights)
    notes = []
    if summary.n_vertebrae == 0:
        msg = (f"{weights} holds no classifiers ({summary.describe()}): the kernel would give every study its "
               "priors. Train some (`cspine-submit train ... --out DIR`, then `bundle --weights DIR`), ship the demo "
               "(`--weights weights/demo`, synthetic data only), or pass --allow-untrained")
        if not allow_untrained:
            raise ValueError(msg)
        notes.append(f"shipping untrained weights (--allow-untrained): {msg.split(': the kernel')[0]}")
    elif summary.n_vertebrae < len(VERTEBRAE):
        missing = [v for v in VERTEBRAE if v not in summary.vertebrae_with_classifiers]
        notes.append(f"{', '.join(missing)} have no classifier in {weights}: they get their priors")
    if summary.trained_on == "synthetic":
        notes.append(f"the classifiers in {weights} were trained on SYNTHETIC studies (the demo): they show the "
                     "pipeline works, their scores on the competition mean nothing")
    if (weights / MANIFEST_NAME).is_file():
        problems = verify_manifest(weights)
        if problems:
            raise ValueError(f"{weights / MANIFEST_NAME} does not match the weights: " + "; ".join(problems[:5]))
    return summary, notes


def wheel_licences(packages=WHEEL_PACKAGES) -> dict[str, str]:
    """``{package: licence}`` of the bundled wheels as installed here (License-Expression, License, or the
    classifier), ``"unknown"`` where none is recorded."""
    from importlib import metadata

    out = {}
    for pkg in packages:
        try:
            meta = metadata.metadata(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
            continue
        text = meta.get("License-Expression") or (meta.get("License") or "").strip()
        if not text or len(text) > 40 or "\n" in text:
            classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License")]
            text = "; ".join(classifiers) or "unknown"
        out[pkg] = text
    return out


def _dataset_metadata(dataset_id: str) -> dict:
    wheels = ", ".join(f"{k} ({v})" for k, v in wheel_licences().items())
    meta = {
        "title": "cspine-submit package",
        "id": dataset_id,
        "licenses": [{"name": LICENSE_NAME}],
        "description": "cspine_submit package, weights and offline wheels for the RSNA 2022 cervical-spine "
                       "fracture detection submission kernel (make_submission.py).\n\nLicence: the cspine_submit "
                       "package is MIT-licensed (Kaggle's list has no MIT, hence 'other'). The decoder "
                       f"wheels in wheels/ keep their own licences: {wheels}.",
    }
    dv = validate_dataset_metadata(meta)
    if not dv.ok:
        raise ValueError("dataset-metadata.json would be invalid: " + "; ".join(dv.errors))
    return meta


def _kernel_metadata(template: dict, owner: str, dataset_id: str) -> dict:
    """The bundle's kernel-metadata.json: the repository's template with the ids written for ``owner`` and the
    notebook as the code file."""
    slug = str(template.get("id", f"/{KERNEL_SLUG}")).split("/")[-1] or KERNEL_SLUG
    meta = dict(template, id=f"{owner}/{slug}", code_file=NOTEBOOK_FILE, kernel_type="notebook",
                dataset_sources=[dataset_id])
    meta["competition_sources"] = sorted(set(meta.get("competition_sources", [])) | {COMPETITION})
    return meta


def _copy_weights(weights: Path, dest: Path) -> list[str]:
    """Copy the weights folder minus training artefacts (returned); write a manifest if it had none."""
    left_out = training_artefacts(weights)

    def ignore(directory, names):
        rel = Path(directory).relative_to(weights)
        return [n for n in names if n.startswith(".") or n == "__pycache__"
                or _is_training_artefact(weights, rel / n)]

    shutil.copytree(weights, dest, ignore=ignore)
    if not (dest / MANIFEST_NAME).is_file():
        write_manifest(dest, created_by="cspine-submit bundle")
    return left_out


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def bundle_sizes(out: Path) -> dict:
    """Bytes of the bundle by part (``package``, ``weights``, ``wheels``, ``other``) and in all (``total``)."""
    parts = {"package": _tree_bytes(out / "cspine_submit"), "weights": _tree_bytes(out / "weights"),
             "wheels": _tree_bytes(out / "wheels")}
    total = _tree_bytes(out)
    return dict(parts, other=total - sum(parts.values()), total=total)


def build_bundle(out: str | Path, *, weights: str | Path | None = None, owner: str | None = None,
                 allow_untrained: bool = False, python_version: str | None = None, platforms=DEFAULT_PLATFORMS,
                 wheels: bool = True, force: bool = False, repo: Path | None = None) -> BundleResult:
    """Write the Kaggle dataset folder, which is also the submission kernel's folder.

    Layout of ``out``::

        cspine_submit/              the package (sources only)
        make_submission.py          the kernel's entry point (also usable from this folder)
        weights/                    the weights folder shipped (``weights``; its MANIFEST.json verified first)
        wheels/                     decoder wheels for the target Python (see WHEEL_PACKAGES)
        setup.cfg, pyproject.toml, README.md   so the folder is also pip-installable
        dataset-metadata.json       Kaggle dataset metadata, id ``owner/cspine-submit-package``, MIT licence
        kernel-metadata.json        the kernel, id ``owner/...``: ``kaggle kernels push -p OUT`` pushes the notebook
        cspine-submit-kernel.ipynb  the submission notebook (:data:`NOTEBOOK_TEMPLATE`)

    Parameters
    ----------
    out : target folder (must not exist unless ``force``)
    weights : the weights folder to ship (default: the repository's ``weights/``)
    owner : Kaggle user name for the dataset and kernel ids (default ``$KAGGLE_USERNAME``; required)
    allow_untrained : ship a weights folder without any classifier (the kernel then writes priors)
    python_version : target interpreter, e.g. "3.11" (default: this one)
    platforms : wheel platform tags
    wheels : download the decoder wheels (False for quick tests)
    force : replace an existing ``out``
    repo : the repo root (default: the folder holding the package)

    Raises
    ------
    FileExistsError, FileNotFoundError, ValueError
        ``out`` exists without ``force``; no owner; the weights folder is missing, has no classifiers (without
        ``allow_untrained``) or does not match its manifest; ``kernel-metadata.json`` is invalid.
    """
    from cspine_submit.files import repo_root

    repo = Path(repo) if repo else repo_root()
    out = Path(out)
    weights = Path(weights) if weights else repo / "weights"
    owner = resolve_owner(owner)
    python_version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    summary, notes = check_weights(weights, allow_untrained)
    kernel_path = repo / "kernel-metadata.json"
    template = json.loads(kernel_path.read_text(encoding="utf-8")) if kernel_path.is_file() else {}
    dataset_id = f"{owner}/{DATASET_SLUG}"
    dataset_meta = _dataset_metadata(dataset_id)
    kernel_meta = _kernel_metadata(template, owner, dataset_id)

    if out.exists():
        if not force:
            raise FileExistsError(f"{out} exists; use --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _copy_package(repo / "cspine_submit", out / "cspine_submit")
    shutil.copy2(repo / CODE_FILE, out / CODE_FILE)
    shutil.copy2(repo / "cspine_submit" / "data" / NOTEBOOK_TEMPLATE, out / NOTEBOOK_FILE)
    left_out = _copy_weights(weights, out / "weights")
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        if (repo / name).is_file():
            shutil.copy2(repo / name, out / name)
    (out / "kernel-metadata.json").write_text(json.dumps(kernel_meta, indent=2) + "\n", encoding="utf-8")
    (out / "dataset-metadata.json").write_text(json.dumps(dataset_meta, indent=2) + "\n", encoding="utf-8")
    kv = validate_kernel_metadata(out / "kernel-metadata.json", dataset_id=dataset_id)
    if not kv.ok:
        raise ValueError(f"{out / 'kernel-metadata.json'}: " + "; ".join(kv.errors))
    result = BundleResult(out=out, kernel=kv, dataset_id=dataset_id, kernel_id=kernel_meta["id"], left_out=left_out,
                          weights=summary, notes=notes)
    if wheels:
        result.wheels, result.wheel_errors = download_wheels(out / "wheels", python_version, platforms)
    result.sizes = bundle_sizes(out)
    return result
