"""The built-in demo: a few synthetic test studies, scored with ``weights/demo``, checked against their truth.

The studies are generated with the same generator parameters the demo classifiers were trained on
(``weights/demo/synthetic_params.json``, written with the demo weights), but with their own seed, into a cache
folder keyed by those parameters, so a second run reuses them. The demo writes its submission into that cache
folder (not the current folder), so it can run any number of times without ``--force``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cspine_submit import __version__
from cspine_submit.files import default_weights_dir, repo_root

DEMO_N_STUDIES = 4
"""Test studies in the demo: enough to show the flow and a score, few enough to run in seconds."""

DEMO_SEED = 20221013
"""Seed of the demo test studies; differs from the training set's seed so the demo is scored on unseen studies."""

FALLBACK_PARAMS = {"scheme": "uniform", "size": 128}
"""Generator parameters used when ``weights/demo/synthetic_params.json`` is missing."""

# Keys of synthetic_params.json that describe the training set's composition, not how a study looks.
_SET_KEYS = {"n_train", "n_test", "n_segmented", "seed", "out_dir", "force", "progress"}


@dataclass(frozen=True)
class DemoData:
    """Paths of the generated demo set."""

    root: Path
    test_dir: Path
    test_csv: Path
    labels: Path
    weights: Path
    params: dict


def demo_weights_dir() -> Path:
    """``weights/demo`` beside the package."""
    return default_weights_dir() / "demo"


def cache_root() -> Path:
    """``.cache/`` beside the package when writable (the repo), else ``~/.cache/cspine_submit``."""
    env = os.environ.get("CSPINE_SUBMIT_CACHE")
    if env:
        return Path(env)
    local = repo_root() / ".cache"
    try:
        local.mkdir(parents=True, exist_ok=True)
        probe = local / ".write-probe"
        probe.write_text("")
        probe.unlink()
        return local
    except OSError:
        return Path.home() / ".cache" / "cspine_submit"


def generator_params(weights: Path | None = None) -> tuple[dict, str]:
    """Generator keyword arguments for the demo's test studies and where they came from."""
    weights = Path(weights) if weights else demo_weights_dir()
    path = weights / "synthetic_params.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        params = data.get("generate_dataset", data.get("params", data))
        return {k: v for k, v in params.items() if k not in _SET_KEYS}, str(path)
    return dict(FALLBACK_PARAMS), "built-in defaults (weights/demo/synthetic_params.json not found)"


def _accepted(fn, params: dict) -> dict:
    sig = inspect.signature(fn)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return dict(params)
    return {k: v for k, v in params.items() if k in sig.parameters}


def prepare_demo(cache: Path | None = None, n_studies: int = DEMO_N_STUDIES, seed: int = DEMO_SEED,
                 weights: Path | None = None, overrides: dict | None = None) -> DemoData:
    """Generate (or reuse) the demo test studies.

    ``overrides`` replaces generator parameters (benchmarks: e.g. ``{"size": 512}`` for full-size studies).

    Returns
    -------
    DemoData
        ``test_dir`` holds one folder per study, ``test_csv`` its rows, ``labels`` the truth (row_id,fractured).
    """
    from cspine_submit.datasets import synthetic

    weights = Path(weights) if weights else demo_weights_dir()
    params, _ = generator_params(weights)
    params.update(overrides or {})
    # The generator's own source is part of the key: a changed generator must not reuse studies made by the old one.
    sources = [Path(synthetic.__file__).with_name(name) for name in ("anatomy.py", "body.py", "dicom_writer.py", "real_geometry.py",
                                                                   "synthetic.py")]
    code = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
    key = hashlib.sha256(
        json.dumps({"params": params, "n": n_studies, "seed": seed, "v": __version__, "code": code},
                   sort_keys=True).encode()
    ).hexdigest()[:12]
    root = Path(cache or cache_root()) / "demo" / key
    done = root / "DONE"
    if not done.is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root.parent))
        try:
            kwargs = _accepted(synthetic.generate_dataset, params)
            synthetic.generate_dataset(tmp, n_train=0, n_test=n_studies, seed=seed, **kwargs)
            (tmp / "DONE").write_text(json.dumps({"params": params, "n": n_studies, "seed": seed}) + "\n")
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return DemoData(root=root, test_dir=root / "test_images", test_csv=root / "test.csv",
                    labels=root / "test_labels.csv", weights=weights, params=params)
