"""A run's set-up, everything decided before the first study: the rows, the classifiers and their config, the slice
ranges, the warnings to announce, and the fingerprint that ``--resume`` checks.

:func:`prepare_run` is the one entry point; :func:`initial_priors` reads only JSON, for the priors file the CLI
writes before TensorFlow loads. TensorFlow is imported by the score stage's loader, only when classifiers load.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings as _warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cspine_submit import score
from cspine_submit.config import VERTEBRAE, ModelConfig, SliceRanges, config_dict
from cspine_submit.files import default_weights_dir
from cspine_submit.localize import load_ranges
from cspine_submit.submit.submission import plan_rows


@dataclass
class RunSetup:
    """Everything decided before the first study: rows, weights, ranges, warnings to announce."""

    plan: Any  # submission.RowPlan
    weights_dir: Path
    config: ModelConfig
    models: dict
    ranges: SliceRanges
    ranges_path: Path
    warnings: list
    notes: list
    fingerprint: str
    demo: bool = False
    load_seconds: float = 0.0
    devices: Any = None  # models.DevicePlan: where the classifiers run, in which precision, and why


def weights_fingerprint(weights_dir: Path, config: ModelConfig, ranges: SliceRanges, plan) -> str:
    """A hex digest of what makes a journaled study's rows valid for this run: config, ranges, the classifier files
    (name, size, mtime), the rows and the study folders. ``--resume`` reuses only studies journaled under it."""
    h = hashlib.sha256()
    h.update(json.dumps(config_dict(config), sort_keys=True).encode())
    h.update(json.dumps(config_dict(ranges), sort_keys=True, default=str).encode())
    for name in sorted(f for v in config.classifier_files for f in config.classifier_paths(v)):
        p = weights_dir / name
        # Size and mtime, not content: hashing 7 ResNet50 files would cost seconds at every start.
        h.update(f"{name}:{p.stat().st_size if p.exists() else -1}:{p.stat().st_mtime_ns if p.exists() else -1}".encode())
    h.update("\n".join(plan.row_ids).encode())
    h.update("\n".join(str(plan.folders[u]) for u in plan.studies).encode())
    return h.hexdigest()


def load_ranges_for(weights_dir: Path) -> tuple[SliceRanges, Path, list[str]]:
    """slice_ranges.json from the weights folder, else the package default ``weights/slice_ranges.json``."""
    notes = []
    path = Path(weights_dir) / "slice_ranges.json"
    if not path.is_file():
        fallback = default_weights_dir() / "slice_ranges.json"
        notes.append(f"{path} not found; using the default slice ranges {fallback}")
        path = fallback
    return load_ranges(path), path, notes


def load_models(weights_dir: Path) -> tuple[ModelConfig, dict, list[str]]:
    """Config and every classifier that loads; a vertebra whose classifier file is missing or unreadable is left
    out (it will take its prior, loudly) instead of failing the run.

    Returns ``(config, {vertebra: model}, warnings)``. Raises FileNotFoundError / ValueError only when the folder
    or its model_config.json is missing or malformed (and the folder is not a seed-notebook folder).
    """
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise FileNotFoundError(f"{weights_dir}: weights folder not found")
    config_path = weights_dir / "model_config.json"
    messages: list[str] = []
    config = ModelConfig.from_json(config_path) if config_path.is_file() else None
    wanted = [v for v in VERTEBRAE
              if config is None or (v in config.classifier_files
                                    and all((weights_dir / f).is_file() for f in config.classifier_paths(v)))]
    # The rest are reported by prepare_run as "no classifier". One call, so that a file several vertebrae list
    # (a shared network) is loaded once and they share one model.
    failures: dict = {}
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        try:
            loaded_config, models = score.load_classifiers(weights_dir, wanted, failures=failures)
        except FileNotFoundError:
            if config is None:
                raise  # neither model_config.json nor the seed notebook's files: nothing to run
            loaded_config, models = config, {}
        except MemoryError as exc:
            # The host ran out of memory (a device's out-of-memory error is the score stage's
            # DeviceOutOfMemoryError, a ValueError, costing only the vertebrae whose files it hit): no classifier.
            raise ValueError(f"{weights_dir}: out of host memory while loading the classifiers ({exc or 'MemoryError'})"
                             "; use a machine with more memory, or lighter weights (the gap head, fewer folds, "
                             "--final refit)") from None
    for w in caught:
        if "DefaultConfig" in type(w.message).__name__ and str(w.message) not in messages:
            messages.append(str(w.message))
    messages += [f"classifier for {v} could not be loaded ({exc}); {v} gets its prior"
                 for v, exc in failures.items() if not isinstance(exc, FileNotFoundError)]
    return loaded_config, models, messages


def _config_or_defaults(weights_dir: Path) -> ModelConfig:
    """The folder's model_config.json when it reads (its priors are those of the file written first), else the
    defaults, marked untrained: the config of a run whose classifiers could not be loaded."""
    try:
        config = ModelConfig.from_json(weights_dir / "model_config.json")
        return config.replace(source=f"{weights_dir / 'model_config.json'} (its classifiers could not be loaded)")
    except (FileNotFoundError, ValueError):
        return ModelConfig(trained_on="untrained", source="defaults: the weights could not be loaded")


def initial_priors(weights_dir: str | Path) -> dict[str, float]:
    """The 8 prior probabilities for the file written before anything is loaded: those of the weights folder's
    model_config.json when it reads, else the defaults (``config.METRIC_PRIORS``, the metric-minimising constants
    of the real labels). Reads JSON only: no TensorFlow."""
    try:
        config = ModelConfig.from_json(Path(weights_dir) / "model_config.json")
    except (FileNotFoundError, ValueError):
        config = ModelConfig()
    return score.prior_probabilities(config)


def _placeholder_ranges() -> SliceRanges:
    """Ranges that are never planned with (no classifier is loaded when they are used)."""
    return SliceRanges(method="fraction", layout="competition", per_vertebra={v: {} for v in VERTEBRAE}, n_masks=0,
                       source="placeholder: no slice ranges could be loaded")


def prepare_run(test_dir, test_csv, weights_dir, *, demo: bool = False, batch_size: int | None = None,
                weights_error: str = "raise", plan=None) -> RunSetup:
    """Plan the rows, load classifiers, config and ranges, and collect the warnings to announce.

    Parameters
    ----------
    weights_error : "raise" or "priors"
        What to do when the weights folder or its config cannot be loaded at all: raise (the default: a local
        misconfiguration should stop the run), or carry on with no classifier so that every study gets the
        default priors (the CLI: it writes the complete file, then exits non-zero naming the cause).
    plan : submission.RowPlan, optional
        The rows, if already planned (the CLI plans them first, to write the priors file before loading).

    Raises FileNotFoundError / ValueError for problems that concern the whole run (missing weights, a malformed
    test.csv); per-study problems never raise.
    """
    t0 = time.perf_counter()
    weights_dir = Path(weights_dir)
    plan = plan_rows(test_dir, test_csv) if plan is None else plan
    try:
        config, models, warnings = load_models(weights_dir)
    except (FileNotFoundError, ValueError) as exc:
        if weights_error != "priors":
            raise
        config, models = _config_or_defaults(weights_dir), {}
        warnings = [f"the weights could not be loaded ({exc}); EVERY study gets the priors of {config.source}"]
    if batch_size:
        config = config.replace(batch_size=int(batch_size))
    missing = [v for v in VERTEBRAE if v not in models]
    if missing:
        warnings.append(
            f"NO CLASSIFIER for {', '.join(missing)} in {weights_dir}: these vertebrae get their priors "
            f"({', '.join(f'{v}={config.priors.get(v)}' for v in missing)}) for EVERY study"
        )
    if config.trained_on == "synthetic" and not demo:
        warnings.append(
            f"the classifiers in {weights_dir} were trained on SYNTHETIC data (demo weights); their predictions on "
            "real CT are meaningless. Use weights trained on the competition data."
        )
    elif config.trained_on == "untrained":
        warnings.append(f"the classifiers in {weights_dir} are marked trained_on='untrained'")
    try:
        ranges, ranges_path, notes = load_ranges_for(weights_dir)
    except (FileNotFoundError, ValueError) as exc:
        if weights_error != "priors":
            raise
        ranges, ranges_path, notes = _placeholder_ranges(), Path("-"), []
        warnings.append(f"no usable slice ranges ({exc}); EVERY study gets the priors")
        models = {}
    if ranges.method == "profile" and "loo_cost" not in ranges.extra.get("profile_template", {}):
        notes.append(f"the slice ranges {ranges_path} carry no alignment-cost reference (learned before it existed): "
                     "an implausible profile alignment cannot be flagged (re-learn them with learn-ranges to get one)")
    return RunSetup(
        plan=plan, weights_dir=weights_dir, config=config, models=models, ranges=ranges, ranges_path=ranges_path,
        warnings=warnings, notes=list(plan.notes) + notes,
        fingerprint=weights_fingerprint(weights_dir, config, ranges, plan), demo=demo,
        load_seconds=time.perf_counter() - t0, devices=score.plan_devices(config).with_placement(models),
    )
