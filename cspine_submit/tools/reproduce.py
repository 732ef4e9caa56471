"""Reproducibility check: environment table, weights manifest, and the demo's golden output.

``weights/demo/golden.json`` stores the 8 probabilities of each demo study as computed when the demo weights were
committed. :func:`run_check` regenerates the demo studies (same generator, parameters and seed), scores them with
the demo classifiers, and compares every probability within :data:`GOLDEN_TOLERANCE`.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

GOLDEN_NAME = "golden.json"
GOLDEN_TOLERANCE = 1e-5

LIBRARIES = (
    ("numpy", "numpy"), ("pandas", "pandas"), ("pydicom", "pydicom"), ("pylibjpeg", "pylibjpeg"),
    ("pylibjpeg-libjpeg", "libjpeg"), ("python-gdcm", "gdcm"), ("dicomsdl", "dicomsdl"), ("tensorflow", "tensorflow"), ("keras", "keras"),
    ("opencv-python-headless", "cv2"), ("nibabel", "nibabel"), ("tqdm", "tqdm"),
)


def environment_table() -> list[tuple[str, str]]:
    """``(name, version or 'MISSING')`` for the interpreter and every library the submission uses (no import of
    TensorFlow: versions come from package metadata)."""
    from importlib import metadata

    from cspine_submit import __version__

    rows = [("cspine_submit", __version__), ("python", sys.version.split()[0]), ("platform", platform.platform())]
    for dist, _module in LIBRARIES:
        try:
            rows.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            rows.append((dist, "MISSING"))
    return rows


def decoder_route(row: dict) -> str:
    """The decoders that serve one row of :func:`cspine_submit.read.dicom.decoder_table`, in the order tried: the
    direct route from the header scan first (``direct dicomsdl; gdcm, pylibjpeg``), then pydicom's plugins;
    ``NONE`` when nothing does. ``env`` and ``check`` print this same text."""
    plugins = ", ".join(row["available"]) or "NONE"
    return f"direct {row['direct'][0]}; {plugins}" if row.get("direct") else plugins


def decoder_rows() -> list[tuple[str, str]]:
    """``(transfer syntax, decoders or what is missing)`` from :func:`cspine_submit.read.dicom.decoder_table`."""
    from cspine_submit.read.dicom import decoder_table

    rows = []
    for row in decoder_table():
        missing = "; ".join(f"{k}: {v}" for k, v in row["missing"].items())
        rows.append((f"{row['name']} ({row['uid']})", decoder_route(row) + (f"  [missing: {missing}]" if missing else "")))
    return rows


def golden_location(weights: Path) -> Path | None:
    """The golden file for a weights folder: ``weights/golden.json`` or ``weights/demo/golden.json``."""
    for p in (weights / GOLDEN_NAME, weights / "demo" / GOLDEN_NAME):
        if p.is_file():
            return p
    return None


def cpu_only() -> bool:
    """Hide GPUs from TensorFlow (if it has not touched them yet), so the golden output is computed and
    reproduced on the same float32 CPU path everywhere (a GPU's float16 / cuDNN results differ by more than 1e-5).
    Returns True when GPUs are hidden or there are none."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
        return True
    except RuntimeError:  # TensorFlow already initialised its devices
        return not tf.config.list_logical_devices("GPU")


def demo_predictions(weights: Path, cache: Path | None = None, workers: int = 0) -> tuple[dict, dict]:
    """Generate the demo studies and score them with ``weights`` (on the CPU, see :func:`cpu_only`).

    Returns
    -------
    studies : {uid: {type: probability}}
    info : dict
        Generator parameters, number of studies, seed.
    """
    from cspine_submit.tools import demo
    from cspine_submit.submit import run as pipeline
    from cspine_submit.config import PREDICTION_TYPES

    on_cpu = cpu_only()
    data = demo.prepare_demo(cache=cache, weights=weights)
    setup = pipeline.prepare_run(data.test_dir, data.test_csv, weights, demo=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = pipeline.run_submission(setup, Path(tmp) / "submission.csv", workers=workers, progress=False)
        text = (Path(tmp) / "submission.csv").read_text()
    studies = {uid: {t: result.probabilities[f"{uid}_{t}"] for t in PREDICTION_TYPES} for uid in setup.plan.studies}
    statuses = {uid: e["status"] for uid, e in result.studies.items()}
    return studies, {"params": data.params, "n_studies": demo.DEMO_N_STUDIES, "seed": demo.DEMO_SEED,
                     "statuses": statuses, "submission_csv": text, "cpu_only": on_cpu}


def write_golden(weights: Path, cache: Path | None = None) -> Path:
    """Compute the demo predictions with ``weights`` and store them as ``weights/golden.json``."""
    from cspine_submit import __version__
    from cspine_submit.files import atomic_write_text

    studies, info = demo_predictions(weights, cache)
    data = {"tolerance": GOLDEN_TOLERANCE, "studies": studies,
            "generator": {k: info[k] for k in ("params", "n_studies", "seed")}, "statuses": info["statuses"],
            "package_version": __version__, "environment": dict(environment_table()),
            "note": "demo studies' 8 probabilities; reproduced by `cspine-submit check`"}
    return atomic_write_text(weights / GOLDEN_NAME, json.dumps(data, indent=2) + "\n")


def compare_golden(actual: dict, golden: dict, tol: float = GOLDEN_TOLERANCE) -> list[str]:
    """One line per difference: a study missing on either side, or a probability off by more than ``tol``."""
    problems = []
    for uid in sorted(set(golden) | set(actual)):
        if uid not in actual:
            problems.append(f"study {uid}: in the golden output but not reproduced")
            continue
        if uid not in golden:
            problems.append(f"study {uid}: reproduced but not in the golden output")
            continue
        for t, g in golden[uid].items():
            a = actual[uid].get(t)
            if a is None or abs(float(a) - float(g)) > tol:
                problems.append(f"study {uid} {t}: got {a}, golden {g} (tolerance {tol})")
    return problems


@dataclass
class CheckResult:
    """What :func:`run_check` found; ``ok`` when nothing differs."""

    environment: list = field(default_factory=list)
    decoders: list = field(default_factory=list)
    manifest: Path | None = None
    manifest_problems: list = field(default_factory=list)
    golden: Path | None = None
    golden_problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    """Warnings that do not fail the check (a weights folder without classifiers, no golden output to reproduce)."""
    weights: object = None
    """:class:`cspine_submit.manifest.WeightsSummary` of the folder checked (None without a model_config.json)."""

    @property
    def ok(self) -> bool:
        return not self.manifest_problems and not self.golden_problems


def run_check(weights: Path, cache: Path | None = None, golden: bool = True) -> CheckResult:
    """Environment table, manifest verification of ``weights`` and golden reproduction.

    The manifest checked is ``weights/MANIFEST.json`` (a missing manifest is a problem). The golden output is
    ``weights/golden.json`` or ``weights/demo/golden.json``, reproduced with the weights folder that holds it.
    """
    from cspine_submit.manifest import MANIFEST_NAME, verify_manifest

    weights = Path(weights)
    result = CheckResult(environment=environment_table())
    try:
        result.decoders = decoder_rows()
    except Exception as exc:  # noqa: BLE001 - a broken decoder stack is reported, not raised
        result.decoders = [("decoders", f"ERROR: {exc}")]
    result.manifest = weights / MANIFEST_NAME
    result.manifest_problems = verify_manifest(weights)
    result.weights, result.notes = weights_notes(weights)
    if golden:
        path = golden_location(weights)
        if path is None:
            # Only the demo weights carry a golden output; a trained folder has none, which is not a difference.
            result.notes.append(f"no {GOLDEN_NAME} in {weights} or {weights / 'demo'}: golden outputs are stored "
                                "with the demo weights only; nothing to reproduce (the manifest was verified)")
        else:
            result.golden = path
            stored = json.loads(path.read_text(encoding="utf-8"))
            try:
                actual, _ = demo_predictions(path.parent, cache)
            except Exception as exc:  # noqa: BLE001 - report, do not crash the check
                result.golden_problems = [f"could not reproduce {path}: {type(exc).__name__}: {exc}"]
            else:
                result.golden_problems = compare_golden(actual, stored["studies"],
                                                        float(stored.get("tolerance", GOLDEN_TOLERANCE)))
    return result


def weights_notes(weights: Path) -> tuple[object, list[str]]:
    """The folder's :class:`~cspine_submit.manifest.WeightsSummary` (None when it cannot be read) and warnings:
    no classifiers (a run with it writes priors only), some vertebrae without one, an unreadable config."""
    from cspine_submit.config import VERTEBRAE
    from cspine_submit.manifest import summarize_weights

    try:
        summary = summarize_weights(weights)
    except (FileNotFoundError, ValueError) as exc:
        return None, [f"{exc}: a run cannot use this folder"]
    if summary.n_vertebrae == 0:
        return summary, [f"{weights} holds no classifiers (trained_on {summary.trained_on!r}): a run with it writes "
                         "prior probabilities only; train some (`cspine-submit train`) or use weights/demo"]
    missing = [v for v in VERTEBRAE if v not in summary.vertebrae_with_classifiers]
    if missing:
        return summary, [f"{', '.join(missing)} have no classifier in {weights}: a run gives them their priors"]
    return summary, []
