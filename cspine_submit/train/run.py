"""Train the seven per-vertebra classifiers with patient-level cross-validation, and fit their probabilities to the
competition metric.

Recipe (``TrainOptions``): the seed notebook's network and optimiser (Adam, 5e-4 at a global batch of 16, binary
cross-entropy) on a **fixed schedule** (``epochs``, cosine decay, the last epoch kept) with augmentation; sample
weights as the metric weighs labels (a positive crop 2, a negative 1: ``pos_weight``), no class balancing; fracture
box slice labels (:mod:`cspine_submit.train.data`). Then, step by step (:func:`train_classifiers`):

1. **plan**: labels, K patient-level folds (stratified by the number of fractured vertebrae), the work folder;
2. **cache**: every study's crops, compressed, in the work folder (:func:`cspine_submit.train.data.build_cache`);
3. **fit**: per fold and vertebra (or one shared network per fold), train on the other folds, then predict the
   held-out fold's slices (out-of-fold);
4. **probabilities**: pooling (``top_k``, overall rule) and a per-label calibration fitted on the out-of-fold
   predictions by minimising the metric (:mod:`cspine_submit.train.calibration`); priors = the metric-minimising
   constants of the training labels;
5. **write**: the classifiers (the K fold models as an ensemble per vertebra, or one model refit on every study),
   ``model_config.json``, ``oof.csv``, ``validation.json``, ``slice_ranges.json``, ``MANIFEST.json``.

Honest validation: the schedule is fixed, so no epoch is chosen on held-out studies (``patience > 0`` instead
stops early on an inner split of the training folds, never on the held-out fold). ``oof.csv`` holds, for every
study, what inference would write with models that never trained on it and pooling/calibration fitted on the other
folds only (cross-fitting); ``validation.json``'s ``oof_score`` is the metric on exactly those rows.

Ensemble, not refit, by default: it costs no extra training (a refit is one more run over every study, 1.25 fold
runs at K = 5), averaging K models lowers the variance that a single model's log loss pays for, and the
calibration is fitted on the very models that ship. Measured on the demo (72 synthetic studies, tiny shared
network, 12 unseen test studies): ensemble 0.169, refit 0.167 weighted log loss, a tie at that size; the refit
cost 538 s more training. Its price is K forward passes per crop at inference: at
K = 5, 7 x 15 crops per study, 256 px on a T4 (about 760 img/s mixed precision), about 0.7 s per study,
17 min for 1500 studies. With the seed's 157.8 M-parameter head, 35 models do not fit a 16 GB GPU: use
``final="refit"`` (or the GAP head) there.

Multi-GPU: ``batch_size`` is per replica (16, the seed's, enough for BatchNorm statistics), the global batch is
``batch_size x replicas`` and the learning rate scales linearly with it (Goyal et al. 2017), so 2 x T4 take two
steps' worth of crops per step at the same per-crop learning rate.

Writes into ``out_dir`` only what inference needs, plus the two validation reports::

    <vertebra|all>.<fold>.keras  the classifiers (``final="refit"`` or ``folds=1``: <vertebra|all>.keras)
    model_config.json            classifier_files, top_k, overall_rule, calibration, priors, trained_on, source
    slice_ranges.json            a copy of the ranges the crops were planned with
    oof.csv                      StudyInstanceUID,patient_overall,C1..C7: out-of-fold, cross-fitted
    validation.json              oof_score, before/after calibration, baselines, per-label log loss and AUC
    MANIFEST.json                sha256 and size of the files above

and into ``work_dir`` (default ``<out_dir>.work``, beside it, tagged with a CACHEDIR.TAG) everything else:
``cache/``, ``checkpoints/``, ``models/``, ``oof/``, ``train_state.json``, ``history.csv``,
``training_curves.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cspine_submit.config import PREDICTION_TYPES, VERTEBRAE, ModelConfig
from cspine_submit.files import atomic_write_text
from cspine_submit.localize import load_ranges
from cspine_submit.manifest import tag_cache_dir, write_manifest
from cspine_submit.score import models as score_models
from cspine_submit.score.aggregate import effective_top_k, pool_slices
from cspine_submit.train import calibration as cal
from cspine_submit.train import data as td
from cspine_submit.train import fit
from cspine_submit.train.determinism import normalise_keras_file, pin_threads
from cspine_submit.train.history import draw_history_png, read_history
from cspine_submit.train.metric import competition_score, evaluate_arrays, roc_auc
from cspine_submit.train.options import (
    JIT_CHOICES, REFERENCE_BATCH, TrainOptions, TrainResult, WorkPaths, default_work_dir, learning_rate_at, resolve_jit_compile,
)

__all__ = ["OUTPUT_FILES", "REFERENCE_BATCH", "RunPlan", "TrainOptions", "TrainResult", "WorkPaths",
           "default_work_dir", "existing_outputs", "fit_models", "fit_probabilities", "learning_rate_at",
           "out_of_fold_slices", "plan_run", "label_counts", "check_trainable", "check_inference_memory", "train_classifiers", "write_outputs"]

OUTPUT_FILES = ("model_config.json", "oof.csv", "validation.json", "slice_ranges.json", "MANIFEST.json")


def existing_outputs(out_dir: str | Path) -> list[Path]:
    """The files a training run writes that already exist in ``out_dir`` (other files are left alone)."""
    out_dir = Path(out_dir)
    found = [out_dir / n for n in OUTPUT_FILES if (out_dir / n).exists()]
    found += sorted(p for p in out_dir.glob("*.keras") if p.name.split(".")[0] in VERTEBRAE + ("all",))
    return found


# --------------------------------------------------------------------------------------------------------------
# The run, step by step


@dataclass
class RunPlan:
    """Step 1's result: what will be trained on what."""

    labels: dict
    uids: list
    folds: dict            # {uid: fold index}; with folds=1 the training studies have -1 (never held out)
    fold_names: list       # "f0".."f{K-1}", or ["split"]
    units: list            # [(unit name, [vertebrae])]
    boxes: dict


def _check_inputs(out_dir: Path, ranges_path: Path, config: ModelConfig, options: TrainOptions, resume: bool) -> None:
    if options.monitor not in ("val_loss", "val_auc"):
        raise ValueError(f"monitor {options.monitor!r}: expected 'val_loss' or 'val_auc'")
    if options.final not in ("ensemble", "refit"):
        raise ValueError(f"final {options.final!r}: expected 'ensemble' or 'refit'")
    if options.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule {options.lr_schedule!r}: expected 'cosine' or 'constant'")
    if options.folds < 1:
        raise ValueError(f"folds={options.folds}: need 1 (one split) or more")
    if options.threads < 0:
        raise ValueError(f"threads={options.threads}: need 0 (TensorFlow's default) or more")
    if options.jit_compile not in JIT_CHOICES:
        raise ValueError(f"jit_compile {options.jit_compile!r}: expected one of {list(JIT_CHOICES)}")
    if options.final == "refit" and options.patience > 0:
        raise ValueError("final='refit' needs the fixed schedule (patience 0): a refit has no studies left to stop on")
    unknown = [v for v in options.vertebrae if v not in VERTEBRAE]
    if unknown:
        raise ValueError(f"unknown vertebrae {unknown}; expected a subset of {list(VERTEBRAE)}")
    if config.head not in score_models.ARCHITECTURES:
        raise ValueError(f"unknown classifier head {config.head!r}; valid heads: {sorted(score_models.ARCHITECTURES)}")
    existing = [p for p in existing_outputs(out_dir) if p.resolve() != ranges_path.resolve()]
    if existing and not resume:
        raise FileExistsError(f"{out_dir}: already holds training outputs ({', '.join(p.name for p in existing[:4])}"
                              f"{' ...' if len(existing) > 4 else ''}); resume the run, remove them, or choose another folder")
    load_ranges(ranges_path)  # fail early on a bad ranges file


def plan_run(data_dir: Path, options: TrainOptions) -> RunPlan:
    """Step 1: labels, boxes, folds and the units of training."""
    labels = td.read_train_labels(data_dir)
    uids = sorted(labels)
    if options.limit:
        uids = uids[: options.limit]
        labels = {u: labels[u] for u in uids}
    if options.folds >= 2:
        folds = td.assign_folds(labels, options.folds, options.seed)
        names = [f"f{i}" for i in range(options.folds)]
    else:
        train_uids, val_uids = td.split_studies(labels, options.val_fraction, options.seed)
        folds = {**{u: -1 for u in train_uids}, **{u: 0 for u in val_uids}}
        names = ["split"]
    units = [("all", list(options.vertebrae))] if options.shared else [(v, [v]) for v in options.vertebrae]
    return RunPlan(labels, uids, folds, names, units, td.read_box_slices(data_dir))


def label_counts(plan: RunPlan) -> dict:
    """Studies with and without a fracture of each vertebra, per fold: ``{vertebra: {fold: {"train_positive",
    "train_negative", "held_positive", "held_negative"}}}`` ("train": the studies the fold's models train on)."""
    out: dict = {}
    for _, members in plan.units:
        for v in members:
            per = out.setdefault(v, {})
            for i, fold in enumerate(plan.fold_names):
                counts = {"train_positive": 0, "train_negative": 0, "held_positive": 0, "held_negative": 0}
                for u in plan.uids:
                    side = "held" if plan.folds[u] == i else "train"
                    counts[f"{side}_{'positive' if plan.labels[u][v] else 'negative'}"] += 1
                per[fold] = counts
    return out


def check_trainable(plan: RunPlan, options: TrainOptions) -> None:
    """Raise ValueError, naming the options that help, when a model to train would see no fractured or no intact
    study (its crops could not have both classes); at the label level, from train.csv alone (before TensorFlow)."""
    held = sum(1 for u in plan.uids if plan.folds[u] == 0)
    if options.folds == 1 and held < 2:  # the calibration is cross-fitted over parts of the held-out studies
        raise ValueError(f"--folds 1 holds out {held} of {len(plan.uids)} studies (--val-fraction "
                         f"{options.val_fraction:.2f}); the out-of-fold calibration needs at least 2: use more "
                         "studies, a larger --val-fraction, or --folds 2")
    for fold, unit, members, train_uids, _ in _fit_jobs(plan, options):
        pos = sum(any(plan.labels[u][v] for v in members) for u in train_uids)
        neg = sum(any(not plan.labels[u][v] for v in members) for u in train_uids)
        if pos and neg:
            continue
        what = "a fractured" if not pos else "an intact"
        others = [v for v in options.vertebrae if v not in members]
        hints = ([] if options.shared else ["--shared (one network per fold on every selected vertebra's crops)"])
        if unit != "all":
            hints.append(f"--vertebrae {','.join(others)} (leave {unit} out)" if others else
                         f"--vertebrae naming vertebrae with fractures (leave {unit} out)")
        hints += ["fewer --folds, or more studies (--limit)"]
        raise ValueError(f"cannot train {unit} in {fold}: none of its {len(train_uids)} training studies has "
                         f"{what} {'vertebra among ' + ','.join(members) if unit == 'all' else unit} "
                         f"({pos} fractured, {neg} intact); use " + "; or ".join(hints))


def _load_state(work: WorkPaths) -> dict:
    return json.loads(work.state.read_text()) if work.state.is_file() else {}


def _save_state(work: WorkPaths, state: dict) -> None:
    atomic_write_text(work.state, json.dumps(state, indent=2) + "\n")


def _fit_jobs(plan: RunPlan, options: TrainOptions) -> list[tuple[str, str, list, list, list]]:
    """``(fold name, unit, member vertebrae, training uids, held-out uids)`` for every model to train."""
    jobs = []
    for i, name in enumerate(plan.fold_names):
        train = [u for u in plan.uids if plan.folds[u] != i]
        held = [u for u in plan.uids if plan.folds[u] == i]
        jobs += [(name, unit, members, train, held) for unit, members in plan.units]
    if options.final == "refit" and options.folds >= 2:
        jobs += [("refit", unit, members, list(plan.uids), []) for unit, members in plan.units]
    return jobs


def _inner_split(uids: list, labels: dict, options: TrainOptions) -> tuple[list, list]:
    if options.patience <= 0:
        return uids, []
    return td.split_studies({u: labels[u] for u in uids}, options.val_fraction, options.seed + 1)


def _fit_one(plan: RunPlan, job: tuple, samples: Callable, config: ModelConfig, options: TrainOptions, *,
             work: WorkPaths, strategy, jit_compile: bool, progress: bool, say: Callable[[str], None],
             clock: "fit.EtaClock | None" = None) -> None:
    """Train one (fold, unit) model; write ``models/<fold>_<unit>.keras`` and its held-out slice probabilities."""
    fold, unit, members, train_uids, held_uids = job
    tag = f"{fold}/{unit}"
    fit_uids, inner_uids = _inner_split(train_uids, plan.labels, options)
    tr = td.Samples.concat([samples(v, fit_uids) for v in members])
    inner = td.Samples.concat([samples(v, inner_uids) for v in members])
    say(f"{tag}: {len(tr.kept())} training crops ({int(tr.kept().y.sum())} positive) from {len(fit_uids)} "
        f"studies; {len(held_uids)} held-out studies")
    model = fit.train_unit(tag, tr, inner, config, options, work=work, strategy=strategy, jit_compile=jit_compile,
                           progress=progress, log=say, on_epoch=clock.epoch_done if clock else None)
    # A clean copy (no optimizer state, no augmentation layer) built by the same factory inference uses.
    clean = score_models.build_classifier(config.head, config.input_shape)
    clean.set_weights(fit.classifier_of(model).get_weights())
    normalise_keras_file(score_models.save_classifier(clean, work.models / f"{fold}_{unit}.keras"))
    for v in members:
        held = samples(v, held_uids)
        probs = fit.predict_samples(clean, held, config) if len(held) else np.zeros(0, np.float32)
        by_study = {u: probs[held.study == u].astype(float).round(6).tolist() for u in sorted(set(held.study))}
        atomic_write_text(work.oof / f"{fold}_{v}.json", json.dumps(by_study) + "\n")


def fit_models(plan: RunPlan, metas: dict, cache_dir: Path, config: ModelConfig, options: TrainOptions, *,
               work: WorkPaths, state: dict, progress: bool, say: Callable[[str], None]) -> None:
    """Step 3: train every (fold, unit) model not done yet; save it and its held-out slice probabilities."""
    import keras

    strategy = score_models.distribution_strategy()
    replicas = int(getattr(strategy, "num_replicas_in_sync", 1))
    jit_compile = resolve_jit_compile(options.jit_compile, gpus=len(score_models.gpu_devices()), replicas=replicas)
    say(fit.devices_line(strategy, score_models.precision_policy(config), jit_compile))
    if replicas > 1:
        say(f"{replicas} GPU replicas: global batch {options.batch_size * replicas}, peak learning rate "
            f"{learning_rate_at(options, 1, replicas):.2e}")

    def samples(v, uids):
        return td.collect_samples(metas, uids, v, cache_dir, plan.labels, plan.boxes, options.box_policy,
                                  options.other_weight)

    work.models.mkdir(parents=True, exist_ok=True)
    work.oof.mkdir(parents=True, exist_ok=True)
    jobs = _fit_jobs(plan, options)
    logged = read_history(work.history)
    todo = [j for j in jobs if not (f"{j[0]}/{j[1]}" in state["done"] and (work.models / f"{j[0]}_{j[1]}.keras").is_file())]
    clock = fit.EtaClock(sum(options.epochs - sum(r["fold"] == j[0] and r["vertebra"] == j[1] for r in logged)
                             for j in todo), say)
    for job in jobs:
        fold, unit = job[0], job[1]
        tag = f"{fold}/{unit}"
        if tag in state["done"] and (work.models / f"{fold}_{unit}.keras").is_file():
            say(f"{tag}: already trained, skipped")
            continue
        try:
            _fit_one(plan, job, samples, config, options, work=work, strategy=strategy, jit_compile=jit_compile,
                     progress=progress, say=say, clock=clock)
        except Exception as exc:  # noqa: BLE001 - device errors get a message; everything else is re-raised
            error = fit.device_error(exc, tag=tag, config=config, options=options, jit_compile=jit_compile,
                                     replicas=replicas)
            if error is None:
                raise
            raise error from exc
        state["done"] = sorted(set(state["done"]) | {tag})  # after the model and its predictions are on disk
        _save_state(work, state)
        for p in work.checkpoints.glob(f"{fold}_{unit}.*"):
            p.unlink()
        keras.backend.clear_session()
        if len(clock.seconds) > clock.first:
            clock.report()


def out_of_fold_slices(plan: RunPlan, work: WorkPaths) -> tuple[dict, dict]:
    """``({uid: {vertebra: slice probs}}, {uid: fold})`` of every held-out study (a study that could not be cached
    has no slice probabilities: it gets the priors, as at inference)."""
    slice_probs: dict = {}
    groups: dict = {}
    for i, fold in enumerate(plan.fold_names):
        for u in plan.uids:
            if plan.folds[u] == i:
                groups[u] = i
                slice_probs.setdefault(u, {})
        for _, members in plan.units:
            for v in members:
                path = work.oof / f"{fold}_{v}.json"
                if path.is_file():
                    for u, p in json.loads(path.read_text()).items():
                        slice_probs.setdefault(u, {})[v] = np.asarray(p, np.float64)
    return slice_probs, groups


def fit_probabilities(plan: RunPlan, slice_probs: dict, groups: dict, config: ModelConfig,
                      options: TrainOptions) -> tuple[ModelConfig, dict, np.ndarray]:
    """Step 4: the final config (pooling, calibration, priors) and the honest out-of-fold predictions.

    Returns
    -------
    config : ModelConfig
        Pooling and calibration fitted on every out-of-fold study; priors fitted on every training label.
    report : dict
        The numbers for validation.json.
    oof : (n, 8) ndarray
        Cross-fitted predictions for ``sorted(groups)``: each row from models that never trained on the study and
        pooling/calibration/priors fitted without its fold.
    """
    labels = plan.labels
    y_all = np.array([[labels[u][t] for t in PREDICTION_TYPES] for u in plan.uids], float)
    priors = cal.fit_priors(y_all, config.clip)
    uids = sorted(groups)
    y = np.array([[labels[u][t] for t in PREDICTION_TYPES] for u in uids], float).reshape(-1, 8)
    if len(set(groups.values())) < 2:  # one split: cross-fit the calibration over parts of the held-out studies
        groups = td.assign_folds({u: labels[u] for u in uids}, min(5, len(uids)), options.seed + 2)

    def prior_of(train_uids):
        return cal.fit_priors(np.array([[labels[u][t] for t in PREDICTION_TYPES] for u in train_uids], float),
                              config.clip)

    def fit(train_uids):
        p = prior_of(train_uids)
        if not options.calibrate:
            return config.replace(priors=p, calibration={})
        return cal.fit_pooling(slice_probs, labels, train_uids, config, priors=p)[0]

    def predict(held, cfg):
        return cal.predict_table(slice_probs, held, cfg)

    _, oof = cal.cross_fitted(groups, fit, predict)
    raw = predict(uids, config.replace(calibration={}, priors=priors))
    if options.calibrate:
        final, candidates = cal.fit_pooling(slice_probs, labels, uids, config, priors=priors)
    else:
        final, candidates = config.replace(priors=priors, calibration={}), []
    in_sample = predict(uids, final)
    _, prior_only = cal.cross_fitted(groups, lambda tr: config.replace(priors=prior_of(tr)),
                                     lambda held, cfg: np.tile([cfg.priors[t] for t in PREDICTION_TYPES], (len(held), 1)))
    ev = evaluate_arrays(y, oof, uids).to_dict()
    report = {
        "oof_score": ev["score"],
        "per_label": ev["per_label"],
        "n_studies": len(uids),
        "oof_score_uncalibrated": competition_score(y, raw),
        "oof_score_in_sample_calibration": competition_score(y, in_sample),
        "baselines": {"prior_only": competition_score(y, prior_only), "constant_0.5": competition_score(y, np.full_like(y, 0.5))},
        "pooling": {"top_k": final.top_k, "of": final.slices_per_vertebra, "overall_rule": final.overall_rule,
                    "candidates": candidates[:8]},
        "calibration": {k: list(v) for k, v in final.calibration.items()},
        "priors": priors,
        "note": ("oof_score: the competition metric on oof.csv, every study predicted by models that never trained "
                 "on it, with pooling, calibration and priors fitted on the other folds (cross-fitted); "
                 "oof_score_uncalibrated: the same models, the starting config's pooling, no calibration; "
                 "oof_score_in_sample_calibration: the shipped calibration applied to the studies it was fitted on "
                 "(optimistic, for reference only); baselines.prior_only: the metric-fitted priors of the other "
                 "folds for every row"),
    }
    return final, report, oof


def vertebra_level(study: np.ndarray, probs: np.ndarray, labels: dict, vertebra: str, config: ModelConfig):
    """Pool slice probabilities per study with the config's rule: ``(uids, y, p)`` for a vertebra-level AUC."""
    uids = sorted(set(study))
    p = []
    for u in uids:
        s = probs[study == u]
        p.append(pool_slices(s, config.aggregation, effective_top_k(config.top_k, s.size, config.slices_per_vertebra)))
    y = np.array([labels[u][vertebra] for u in uids])
    return uids, y, np.array(p)


def _per_vertebra_report(plan: RunPlan, slice_probs: dict, config: ModelConfig) -> dict:
    out = {}
    for v in VERTEBRAE:
        uids = [u for u in sorted(slice_probs) if v in slice_probs[u]]
        if not uids:
            continue
        study = np.concatenate([[u] * len(slice_probs[u][v]) for u in uids]).astype(object)
        probs = np.concatenate([slice_probs[u][v] for u in uids])
        vu, vy, vp = vertebra_level(study, probs, plan.labels, v, config)
        out[v] = {"n_studies": len(vu), "n_positive": int(vy.sum()), "auc": roc_auc(vy, vp)}
    return out


def shipped_models(plan: RunPlan, options: TrainOptions) -> dict[str, list[tuple[str, str]]]:
    """``{unit: [(fold, file name in the weights folder), ...]}``: the K fold models of an ensemble, or one model."""
    if options.final == "refit" and options.folds >= 2:
        return {unit: [("refit", f"{unit}.keras")] for unit, _ in plan.units}
    if options.folds == 1:
        return {unit: [("split", f"{unit}.keras")] for unit, _ in plan.units}
    return {unit: [(f, f"{unit}.{f}.keras") for f in plan.fold_names] for unit, _ in plan.units}


def shipped_config(config: ModelConfig, plan: RunPlan, options: TrainOptions) -> ModelConfig:
    """``config`` with the ``classifier_files`` the run will write (vertebrae not trained share the first unit's
    files: they add no network to a memory plan)."""
    ship = shipped_models(plan, options)
    files = {v: [name for _, name in ship[unit]] for unit, members in plan.units for v in members}
    first = next(iter(files.values()))
    files = {v: files.get(v, first) for v in VERTEBRAE}
    return config.replace(classifier_files={v: (f[0] if len(f) == 1 else f) for v, f in files.items()})


def check_inference_memory(config: ModelConfig, plan: RunPlan, options: TrainOptions) -> dict:
    """The memory plans (:func:`cspine_submit.score.memory.kaggle_plans`) of the classifiers this run will ship, on
    each Kaggle GPU machine; raises :class:`~cspine_submit.score.memory.MemoryPlanError` (a ValueError, with the
    numbers and the options) when they fit on none of them. Needs no TensorFlow."""
    from cspine_submit.score.memory import MemoryPlanError, kaggle_plans

    plans = kaggle_plans(shipped_config(config, plan, options))
    if not any(p.fits for p in plans.values()):
        raise MemoryPlanError(next(iter(plans.values())))
    return plans


def _place_once(src: Path, dst: Path) -> None:
    """Put the fold model ``src`` at ``dst`` without a second copy on disk: a hard link (both names, one file; a
    resumed run still finds its models), or a move where the two folders lie on different file systems."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.move(str(src), str(tmp))
    tmp.replace(dst)


def write_outputs(out_dir: Path, ranges_path: Path, plan: RunPlan, final: ModelConfig, report: dict, *,
                  oof_uids: list, oof: np.ndarray, options: TrainOptions, work: WorkPaths,
                  data_dir: Path) -> list[str]:
    """Step 5: classifiers, model_config.json, slice_ranges.json, oof.csv, validation.json, MANIFEST.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ship = shipped_models(plan, options)
    files: dict[str, list[str]] = {}
    for unit, members in plan.units:
        for fold, name in ship[unit]:
            _place_once(work.models / f"{fold}_{unit}.keras", out_dir / name)
        for v in members:
            files[v] = [name for _, name in ship[unit]]
    classifier_files = {v: (f[0] if len(f) == 1 else f) for v, f in files.items()}
    final = final.replace(
        classifier_files={**{v: f"{v}.keras" for v in VERTEBRAE}, **classifier_files},
        trained_on=options.trained_on,
        source=options.source or f"cspine-submit train on {data_dir} ({len(plan.uids)} studies)",
    )
    final.to_json(out_dir / "model_config.json")
    if ranges_path.resolve() != (out_dir / "slice_ranges.json").resolve():
        atomic_write_text(out_dir / "slice_ranges.json", ranges_path.read_text())  # inference must plan as training did
    lines = ["StudyInstanceUID," + ",".join(PREDICTION_TYPES)]
    lines += [u + "," + ",".join(f"{x:.8f}" for x in row) for u, row in zip(oof_uids, oof)]
    atomic_write_text(out_dir / "oof.csv", "\n".join(lines) + "\n")
    atomic_write_text(out_dir / "validation.json", json.dumps(report, indent=2, default=float) + "\n")
    write_manifest(out_dir, created_by=final.source)
    return sorted({n for f in files.values() for n in f}) + list(OUTPUT_FILES)


def _open_work(out_dir: Path, plan: RunPlan, config: ModelConfig, options: TrainOptions, *, resume: bool,
               say: Callable[[str], None]) -> tuple[WorkPaths, dict]:
    """The tagged work folder and the run's state (a fresh one unless ``resume``; a resumed config must match)."""
    root = Path(options.work_dir) if options.work_dir else default_work_dir(out_dir)
    if root.resolve() == out_dir.resolve() or out_dir.resolve() in root.resolve().parents:
        say(f"warning: the work folder {root} lies inside {out_dir}; it is tagged, so manifests and bundles skip it")
    tag_cache_dir(root, "the work folder of cspine-submit train (cache, checkpoints, state, logs)")
    work = WorkPaths(root, Path(options.cache_dir) if options.cache_dir else root / "cache")
    state = _load_state(work) if resume else {}
    config_json = json.loads(json.dumps(td._config_dict(config)))
    if resume and state.get("config") and state["config"] != config_json:
        raise ValueError(f"{root}: resume with a different config than the interrupted run; start a new work folder")
    if not resume:
        for p in (work.state, work.history, work.curves):
            p.unlink(missing_ok=True)
        for d in (work.checkpoints, work.models, work.oof):
            shutil.rmtree(d, ignore_errors=True)
    state.update(config=config_json, options=asdict(options), folds=plan.folds, done=state.get("done", []))
    _save_state(work, state)
    say(f"{len(plan.uids)} studies, {options.folds} fold(s) ({', '.join(plan.fold_names)}), work folder {root}")
    return work, state


def _cache_crops(data_dir: Path, plan: RunPlan, cache_dir: Path, ranges_path: Path, config: ModelConfig, *,
                 options: TrainOptions, progress: bool, say: Callable[[str], None]) -> tuple[dict, list]:
    """Step 2: every study's crops in the cache; ``({uid: meta}, [(uid, error), ...])``."""
    t0 = time.perf_counter()
    metas, failed = td.build_cache(data_dir, plan.uids, cache_dir, ranges_path, config, options.workers, progress)
    for uid, err in failed:
        say(f"skipped study {uid}: {err}")
    say(f"crops cached for {len(metas)} studies in {time.perf_counter() - t0:.1f} s: "
        f"{td.cache_bytes(metas) / 1e6:.1f} MB ({cache_dir})")
    return metas, failed


def _training_report(plan: RunPlan, options: TrainOptions, metas: dict, failed: list) -> dict:
    """validation.json's ``training`` entry: the recipe as run, the folds, the cache."""
    replicas = 1
    try:
        replicas = max(len(score_models.gpu_devices()), 1)
    except Exception:  # noqa: BLE001 - reporting only
        pass
    return {
        "folds": options.folds, "fold_of_study": {u: int(f) for u, f in plan.folds.items()}, "final": options.final,
        "epochs": options.epochs, "schedule": options.lr_schedule, "patience": options.patience,
        "batch_per_replica": options.batch_size, "replicas": replicas,
        "peak_learning_rate": learning_rate_at(options, 1, replicas), "pos_weight": options.pos_weight,
        "balance": options.balance, "box_policy": options.box_policy, "shared": options.shared,
        "jit_compile": options.jit_compile,
        "failed_studies": [{"uid": u, "error": e} for u, e in failed],
        "cache_bytes": td.cache_bytes(metas), "cache_studies": len(metas),
    }


def train_classifiers(data_dir: str | Path, ranges_path: str | Path, out_dir: str | Path, config: ModelConfig,
                      options: TrainOptions = TrainOptions(), *, resume: bool = False, progress: bool = True,
                      log: Callable[[str], None] | None = None) -> TrainResult:
    """Cross-validate, fit probabilities to the metric, write the weights folder (see the module docstring).

    Parameters
    ----------
    data_dir : path
        Competition layout: ``train.csv``, ``train_images/<uid>/``, optional ``train_bounding_boxes.csv``.
    ranges_path : path
        ``slice_ranges.json`` used to plan the crops (copied into ``out_dir``: inference must plan the same way).
    out_dir : path
        The weights folder to write; it must not hold training outputs unless ``resume``.
    config : ModelConfig
        What the models see (head, input size, channels, windows, crop margin, K ...).
    options : TrainOptions
    resume : bool
        Continue a run: cached crops are reused, finished (fold, unit) models are skipped, an interrupted one
        continues from its last completed epoch.
    log : callable, optional
        Receives one line per epoch / step (the CLI prints them).
    """
    t_start = time.perf_counter()
    data_dir, out_dir, ranges_path = Path(data_dir), Path(out_dir), Path(ranges_path)
    say = log or (lambda s: None)
    _check_inputs(out_dir, ranges_path, config, options, resume)
    plan = plan_run(data_dir, options)                                                  # 1. plan
    check_trainable(plan, options)
    check_inference_memory(config, plan, options)
    threads, warning = pin_threads(options.threads)  # before TensorFlow's runtime starts (reproducible weights)
    if warning:
        say(f"warning: {warning}")
    work, state = _open_work(out_dir, plan, config, options, resume=resume, say=say)
    cache_dir = work.cache_root / td.cache_key(config, ranges_path)                     # 2. cache
    metas, failed = _cache_crops(data_dir, plan, cache_dir, ranges_path, config, options=options,
                                 progress=progress, say=say)
    fit_models(plan, metas, cache_dir, config, options, work=work, state=state,       # 3. fit
               progress=progress, say=say)
    slice_probs, groups = out_of_fold_slices(plan, work)                                # 4. probabilities
    final, report, oof = fit_probabilities(plan, slice_probs, groups, config, options)
    report["per_vertebra"] = _per_vertebra_report(plan, slice_probs, config)
    report["training"] = dict(_training_report(plan, options, metas, failed), intra_op_threads=threads)
    say(f"out-of-fold metric {report['oof_score']:.4f} (uncalibrated {report['oof_score_uncalibrated']:.4f}, "
        f"prior only {report['baselines']['prior_only']:.4f}, constant 0.5 {report['baselines']['constant_0.5']:.4f})")
    if report["oof_score"] >= report["baselines"]["prior_only"]:
        report["warning"] = (f"the out-of-fold metric {report['oof_score']:.4f} is no better than predicting the "
                             f"priors for every study ({report['baselines']['prior_only']:.4f}): these classifiers "
                             "add nothing yet (more studies or epochs, --shared on small sets, another --box-policy)")
        say(f"warning: {report['warning']}")
    written = write_outputs(out_dir, ranges_path, plan, final, report, oof_uids=sorted(groups), oof=oof,  # 5. write
                            options=options, work=work, data_dir=data_dir)
    history = read_history(work.history)
    if history:
        draw_history_png([dict(r, vertebra=f"{r['fold']}/{r['vertebra']}") for r in history], work.curves)
        say(f"training curves: {work.curves}")
    shutil.rmtree(work.checkpoints, ignore_errors=True)
    files = {n: out_dir / n for n in written}
    return TrainResult(out_dir, work.root, ModelConfig.from_json(out_dir / "model_config.json"), files, report,
                       time.perf_counter() - t_start, failed)
