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
K = 5, 7 x 15 crops per study, 256 px on a T4 (about 760 img/s mixed precision, FACTS.md), about 0.7 s per study,
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

import csv
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cspine_submit.config import PREDICTION_TYPES, VERTEBRAE, ModelConfig

HISTORY_COLUMNS = ("fold", "vertebra", "epoch", "loss", "auc", "val_loss", "val_auc", "lr", "seconds")
OUTPUT_FILES = ("model_config.json", "oof.csv", "validation.json", "slice_ranges.json", "MANIFEST.json")
REFERENCE_BATCH = 16
"""The global batch at which ``learning_rate`` applies (the seed's); other global batches scale it linearly."""


@dataclass(frozen=True)
class TrainOptions:
    """How to train (the config says what the model sees; these say how it learns).

    Attributes
    ----------
    vertebrae : tuple of str
        Which classifiers to train.
    folds : int
        K of the patient-level cross-validation (5); 1 keeps a single split (``val_fraction`` held out) for quick
        runs: then only the held-out studies get out-of-fold predictions.
    final : str
        What ships: ``ensemble`` (the K fold models, averaged) or ``refit`` (one more model on every study, same
        schedule).
    epochs : int
        Length of the fixed schedule (or the upper bound with ``patience``).
    batch_size : int
        Crops per step on each GPU replica (the seed's 16).
    learning_rate : float
        Adam's peak rate at a global batch of :data:`REFERENCE_BATCH`; scaled linearly with the global batch.
    lr_schedule : str
        ``cosine`` (decay to 0 over ``epochs``) or ``constant``.
    patience : int
        0: the fixed schedule, last epoch kept. > 0: early stopping on an inner split (``val_fraction`` of each
        fold's training studies), never on the held-out fold; the best epoch's weights are kept.
    monitor : str
        ``val_loss`` or ``val_auc`` on that inner split (with ``patience`` only).
    val_fraction : float
        Held-out share for ``folds=1``, and the inner split's share with ``patience``.
    seed : int
        Folds, shuffling, augmentation and weight initialisation.
    augment : bool
    pos_weight : float
        Sample weight of a positive crop (negatives 1): 2, as the metric weighs a positive label.
    balance : bool
        Give positives and negatives the same total weight instead (the calibration then has odds of 10-30x to undo).
    shared : bool
        Train ONE network per fold on the crops of all selected vertebrae, used as each vertebra's classifier.
    box_policy : str
        One of :data:`cspine_submit.train.data.BOX_POLICIES`.
    other_weight : float
        Weight of a fractured vertebra's crops without a box under ``box_policy="downweight"``.
    calibrate : bool
        Fit pooling and calibration on the out-of-fold predictions (else the config's pooling, no calibration).
    backbone_weights : str or None
        Local ImageNet weights file for ResNet50 heads (3-channel inputs only).
    workers : int
        Processes that read and crop studies for the cache, and parallel loaders of the input pipeline.
    limit : int or None
        Use only the first ``limit`` studies of train.csv (smoke runs).
    work_dir : str or None
        Cache, checkpoints, models, state and logs; default ``<out_dir>.work``.
    cache_dir : str or None
        Crop cache; default ``<work_dir>/cache``.
    trained_on, source : str
        Written into model_config.json.
    """

    vertebrae: tuple[str, ...] = VERTEBRAE
    folds: int = 5
    final: str = "ensemble"
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 5e-4
    lr_schedule: str = "cosine"
    patience: int = 0
    monitor: str = "val_loss"
    val_fraction: float = 1.0 / 3.0
    seed: int = 0
    augment: bool = True
    pos_weight: float = 2.0
    balance: bool = False
    shared: bool = False
    box_policy: str = "exclude"
    other_weight: float = 0.2
    calibrate: bool = True
    backbone_weights: str | None = None
    workers: int = 2
    limit: int | None = None
    work_dir: str | None = None
    cache_dir: str | None = None
    trained_on: str = "competition"
    source: str = ""


@dataclass
class TrainResult:
    """What a training run produced."""

    out_dir: Path
    work_dir: Path
    config: ModelConfig
    files: dict[str, Path]
    validation: dict
    seconds: float
    failed_studies: list = field(default_factory=list)


def default_work_dir(out_dir: str | Path) -> Path:
    """``<out_dir>.work``: beside the weights folder, never inside it."""
    out_dir = Path(out_dir).absolute()
    return out_dir.with_name(out_dir.name + ".work")


# --------------------------------------------------------------------------------------------------------------
# Small pure helpers


def existing_outputs(out_dir: str | Path) -> list[Path]:
    """The files a training run writes that already exist in ``out_dir`` (other files are left alone)."""
    out_dir = Path(out_dir)
    found = [out_dir / n for n in OUTPUT_FILES if (out_dir / n).exists()]
    found += sorted(p for p in out_dir.glob("*.keras") if p.name.split(".")[0] in VERTEBRAE + ("all",))
    return found


def learning_rate_at(options: TrainOptions, epoch: int, replicas: int = 1) -> float:
    """Adam's rate for 1-based ``epoch``: scaled to the global batch, cosine-decayed over the schedule.

    The cosine takes the value at the epoch's start, so epoch 1 runs at the peak and the last above 0.
    """
    peak = options.learning_rate * options.batch_size * max(int(replicas), 1) / REFERENCE_BATCH
    if options.lr_schedule == "constant":
        return float(peak)
    frac = (epoch - 1) / max(options.epochs, 1)
    return float(peak * 0.5 * (1.0 + np.cos(np.pi * frac)))


def sample_weights(y: np.ndarray, w: np.ndarray, options: TrainOptions) -> np.ndarray:
    """Per-crop loss weights: the crop's label weight times ``pos_weight`` for positives (or class balancing)."""
    from cspine_submit.train.data import class_weights

    y = np.asarray(y) > 0.5
    w = np.asarray(w, np.float32)
    if options.balance:
        wn, wp = class_weights(y, w)
        return (w * np.where(y, wp, wn)).astype(np.float32)
    return (w * np.where(y, options.pos_weight, 1.0)).astype(np.float32)


def read_history(path: str | Path) -> list[dict]:
    """Rows of history.csv as dicts of floats (fold and vertebra kept as str); [] when absent."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        d = {"fold": r.get("fold", ""), "vertebra": r["vertebra"]}
        for k in HISTORY_COLUMNS[2:]:
            try:
                d[k] = float(r[k])
            except (TypeError, ValueError, KeyError):
                d[k] = float("nan")
        d["epoch"] = int(d["epoch"])
        out.append(d)
    return out


def append_history(path: str | Path, row: dict) -> None:
    """Add one row to history.csv, rewriting the file atomically (a kill never leaves half a row)."""
    import io

    from cspine_submit.files import atomic_write_text

    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    if not text:
        w.writeheader()
    w.writerow({k: row.get(k, "") for k in HISTORY_COLUMNS})
    atomic_write_text(path, text + buf.getvalue())


def _save_atomically(save, path: Path, suffix: str) -> None:
    """``save(tmp)`` then rename over ``path``: a checkpoint is whole or absent (Keras wants the suffix last)."""
    tmp = path.with_name(path.name[: -len(suffix)] + ".tmp" + suffix)
    save(tmp)
    tmp.replace(path)


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194)]


def draw_history_png(history: Sequence[dict], path: str | Path, width: int = 900, height: int = 380) -> Path:
    """Loss and AUC per epoch, one colour per vertebra (train dashed, validation solid), drawn with cv2."""
    import cv2

    img = np.full((height, width, 3), 255, np.uint8)
    panels = [("loss", "val_loss", "loss"), ("auc", "val_auc", "AUC")]
    pw = width // 2
    by_v: dict[str, list[dict]] = {}
    for r in history:
        by_v.setdefault(r["vertebra"], []).append(r)
    max_epoch = max([r["epoch"] for r in history] + [1])
    for p, (tk, vk, title) in enumerate(panels):
        x0, y0, x1, y1 = p * pw + 50, 30, p * pw + pw - 15, height - 60
        vals = [r[k] for r in history for k in (tk, vk) if np.isfinite(r.get(k, np.nan))]
        lo, hi = (0.0, 1.0) if title == "AUC" else (0.0, max(vals + [1e-3]) * 1.05)
        cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
        cv2.putText(img, title, (x0 + 5, y0 - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        for t in range(5):
            v = lo + (hi - lo) * t / 4
            y = int(y1 - (y1 - y0) * t / 4)
            cv2.putText(img, f"{v:.2f}", (x0 - 45, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (80, 80, 80), 1, cv2.LINE_AA)
            cv2.line(img, (x0, y), (x0 + 4, y), (0, 0, 0), 1)
        cv2.putText(img, f"epoch 1..{max_epoch}", (x0 + (x1 - x0) // 2 - 40, y1 + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (80, 80, 80), 1, cv2.LINE_AA)

        def pt(e, v):
            fx = (e - 1) / max(max_epoch - 1, 1)
            fy = (v - lo) / (hi - lo) if hi > lo else 0.0
            return int(x0 + fx * (x1 - x0)), int(y1 - min(max(fy, 0.0), 1.0) * (y1 - y0))

        for i, v in enumerate(by_v):
            rows = by_v[v]
            bgr = _COLOURS[i % len(_COLOURS)][::-1]
            for key, dashed in ((tk, True), (vk, False)):
                pts = [pt(r["epoch"], r[key]) for r in rows if np.isfinite(r.get(key, np.nan))]
                for a, b in zip(pts, pts[1:]):
                    if dashed:
                        n = max(int(np.hypot(b[0] - a[0], b[1] - a[1]) // 6), 1)
                        for s in range(0, n, 2):
                            pa = (int(a[0] + (b[0] - a[0]) * s / n), int(a[1] + (b[1] - a[1]) * s / n))
                            pb = (int(a[0] + (b[0] - a[0]) * (s + 1) / n), int(a[1] + (b[1] - a[1]) * (s + 1) / n))
                            cv2.line(img, pa, pb, bgr, 1, cv2.LINE_AA)
                    else:
                        cv2.line(img, a, b, bgr, 2, cv2.LINE_AA)
                for q in pts:
                    cv2.circle(img, q, 2, bgr, -1)
    for i, v in enumerate(by_v):
        x = 50 + i * 80
        cv2.line(img, (x, height - 22), (x + 20, height - 22), _COLOURS[i % len(_COLOURS)][::-1], 2)
        cv2.putText(img, v, (x + 24, height - 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "dashed: train  solid: validation", (50 + len(by_v) * 80, height - 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                (80, 80, 80), 1, cv2.LINE_AA)
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    if not cv2.imwrite(str(tmp), img):
        raise OSError(f"{path}: could not write PNG")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------------------
# Training one unit (a vertebra, or the shared network) on one fold


def _set_seeds(seed: int) -> None:
    import keras

    keras.utils.set_random_seed(seed)


def _make_model(config: ModelConfig, options: TrainOptions, strategy, seed: int):
    """The classifier to train, behind the on-device augmentation layer when ``options.augment``, compiled."""
    import keras

    from cspine_submit.score.models import build_classifier, dtype_policy, precision_policy
    from cspine_submit.train.data import augmenting_model

    with dtype_policy(precision_policy(config)), strategy.scope():
        model = build_classifier(config.head, config.input_shape, options.backbone_weights)
        if options.augment:
            model = augmenting_model(model, config.input_shape, seed)
        model.compile(
            optimizer=keras.optimizers.Adam(options.learning_rate),
            loss=keras.losses.BinaryCrossentropy(),
            weighted_metrics=[keras.metrics.AUC(name="auc")],
        )
    return model


def classifier_of(model):
    """The classifier inside a training model (the model itself, or the one behind the augmentation layer)."""
    return model.layers[-1] if model.name == "augmenting" else model


def predict_samples(model, samples, config: ModelConfig) -> np.ndarray:
    """Slice probabilities of every crop in ``samples`` (streamed from the cache in chunks of 256)."""
    from cspine_submit.score.models import predict
    from cspine_submit.train.data import load_crops

    out, buf = [], []
    for x in load_crops(samples, config):
        buf.append(x)
        if len(buf) == 256:
            out.append(predict(model, np.stack(buf), config.batch_size))
            buf = []
    if buf:
        out.append(predict(model, np.stack(buf), config.batch_size))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def vertebra_level(study: np.ndarray, probs: np.ndarray, labels: dict, vertebra: str, config: ModelConfig):
    """Pool slice probabilities per study with the config's rule: ``(uids, y, p)`` for a vertebra-level AUC."""
    from cspine_submit.score.aggregate import effective_top_k, pool_slices

    uids = sorted(set(study))
    p = []
    for u in uids:
        s = probs[study == u]
        p.append(pool_slices(s, config.aggregation, effective_top_k(config.top_k, s.size, config.slices_per_vertebra)))
    y = np.array([labels[u][vertebra] for u in uids])
    return uids, y, np.array(p)


def _tqdm_callback_class():
    import keras

    class TqdmBatches(keras.callbacks.Callback):
        """Advance a tqdm bar per training batch and show the running loss."""

        def __init__(self, bar):
            super().__init__()
            self.bar = bar

        def on_train_batch_end(self, batch, logs=None):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}")
            self.bar.update(1)

    return TqdmBatches


def train_unit(tag: str, train_s, val_s, config: ModelConfig, options: TrainOptions, work: "WorkPaths", strategy,
               progress: bool = True, log: Callable[[str], None] | None = None):
    """Train one classifier (resuming from its checkpoint when one exists); returns the model to keep.

    Parameters
    ----------
    tag : str
        ``<fold>/<unit>``, e.g. ``f2/C5``: names checkpoints and history rows.
    train_s, val_s : Samples
        Training crops; ``val_s`` (the inner split, with ``patience``) may be empty.
    """
    import warnings

    import keras
    from tqdm import tqdm

    from cspine_submit.train.data import make_dataset

    # tf.data generators have no known length; Keras warns at every epoch end that the input "ran out".
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    fold, unit = tag.split("/")
    work.checkpoints.mkdir(parents=True, exist_ok=True)
    stem = tag.replace("/", "_")
    last_path, best_path = work.checkpoints / f"{stem}.last.keras", work.checkpoints / f"{stem}.best.weights.h5"
    past = [r for r in read_history(work.history) if r["fold"] == fold and r["vertebra"] == unit]

    train_s, val_s = train_s.kept(), val_s.kept()
    if len(train_s) == 0 or train_s.y.min() == train_s.y.max():
        raise ValueError(f"{tag}: the training crops need both positives and negatives "
                         f"(have {int(train_s.y.sum())} positive of {len(train_s)})")
    w = sample_weights(train_s.y, train_s.w, options)

    offset = (VERTEBRAE.index(unit) if unit in VERTEBRAE else len(VERTEBRAE)) + 10 * (int(fold[1:]) if fold[1:].isdigit() else 9)
    _set_seeds(options.seed + offset)
    if past and last_path.is_file():
        from cspine_submit.train.data import _train_augment_class

        _train_augment_class()  # registers the augmentation layer, so the checkpoint deserializes
        with strategy.scope():
            model = keras.models.load_model(last_path)
    else:
        past = []
        model = _make_model(config, options, strategy, options.seed * 100 + offset)
    replicas = int(getattr(strategy, "num_replicas_in_sync", 1))
    global_batch = options.batch_size * replicas
    use_val = options.patience > 0 and len(val_s) > 0
    key = options.monitor
    sign = -1.0 if key.endswith("auc") else 1.0
    scores = [sign * r[key] for r in past if np.isfinite(r.get(key, np.nan))] if use_val else []
    best = min(scores + [np.inf])
    best_epoch = next((r["epoch"] for r in past if sign * r.get(key, np.nan) == best), 0)

    ds_train = make_dataset(train_s, config, global_batch, shuffle=True, augment_data=False,
                            seed=options.seed * 100 + offset, sample_weight=w, workers=options.workers)
    ds_val = (make_dataset(val_s, config, global_batch, shuffle=False, augment_data=False, workers=options.workers)
              if use_val else None)
    steps = int(np.ceil(len(train_s) / global_batch))
    for epoch in range(len(past) + 1, options.epochs + 1):
        if use_val and epoch - best_epoch > options.patience and np.isfinite(best):
            break
        lr = learning_rate_at(options, epoch, replicas)
        model.optimizer.learning_rate.assign(lr)
        t0 = time.perf_counter()
        bar = tqdm(total=steps, desc=f"{tag} epoch {epoch}/{options.epochs}", unit="batch", disable=not progress,
                   leave=False)
        fit = model.fit(ds_train, validation_data=ds_val, epochs=epoch, initial_epoch=epoch - 1, verbose=0,
                        shuffle=False, callbacks=[_tqdm_callback_class()(bar)])
        bar.close()
        logs = {k: v[-1] for k, v in fit.history.items()}
        row = {"fold": fold, "vertebra": unit, "epoch": epoch, "loss": float(logs.get("loss", np.nan)),
               "auc": float(logs.get("auc", np.nan)), "lr": lr,
               "val_loss": float(logs.get("val_loss", np.nan)), "val_auc": float(logs.get("val_auc", np.nan)),
               "seconds": round(time.perf_counter() - t0, 2)}
        if use_val and np.isfinite(row.get(key, np.nan)) and sign * row[key] < best:
            best, best_epoch = sign * row[key], epoch
            _save_atomically(model.save_weights, best_path, ".weights.h5")
        _save_atomically(model.save, last_path, ".keras")
        append_history(work.history, row)  # after the checkpoint: a resumed run never repeats a logged epoch
        if log:
            log(f"{tag} epoch {epoch}: loss {row['loss']:.4f} auc {row['auc']:.3f} lr {lr:.2e}"
                + (f" inner val_loss {row['val_loss']:.4f} val_auc {row['val_auc']:.3f}" if use_val else "")
                + f" ({row['seconds']:.0f} s)")
    if use_val and best_path.is_file():
        model.load_weights(best_path)
    return model


# --------------------------------------------------------------------------------------------------------------
# The run, step by step


@dataclass(frozen=True)
class WorkPaths:
    """Where a run keeps what inference does not need (all under one CACHEDIR.TAG-marked folder)."""

    root: Path
    cache_root: Path

    @property
    def state(self) -> Path:
        return self.root / "train_state.json"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def curves(self) -> Path:
        return self.root / "training_curves.png"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def oof(self) -> Path:
        return self.root / "oof"


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
    from cspine_submit.score import models as models_mod

    if options.monitor not in ("val_loss", "val_auc"):
        raise ValueError(f"monitor {options.monitor!r}: expected 'val_loss' or 'val_auc'")
    if options.final not in ("ensemble", "refit"):
        raise ValueError(f"final {options.final!r}: expected 'ensemble' or 'refit'")
    if options.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule {options.lr_schedule!r}: expected 'cosine' or 'constant'")
    if options.folds < 1:
        raise ValueError(f"folds={options.folds}: need 1 (one split) or more")
    if options.final == "refit" and options.patience > 0:
        raise ValueError("final='refit' needs the fixed schedule (patience 0): a refit has no studies left to stop on")
    unknown = [v for v in options.vertebrae if v not in VERTEBRAE]
    if unknown:
        raise ValueError(f"unknown vertebrae {unknown}; expected a subset of {list(VERTEBRAE)}")
    if config.head not in models_mod.ARCHITECTURES:
        raise ValueError(f"unknown classifier head {config.head!r}; valid heads: {sorted(models_mod.ARCHITECTURES)}")
    existing = [p for p in existing_outputs(out_dir) if p.resolve() != ranges_path.resolve()]
    if existing and not resume:
        raise FileExistsError(f"{out_dir}: already holds training outputs ({', '.join(p.name for p in existing[:4])}"
                              f"{' ...' if len(existing) > 4 else ''}); resume the run, remove them, or choose another folder")
    from cspine_submit.localize import load_ranges

    load_ranges(ranges_path)  # fail early on a bad ranges file


def plan_run(data_dir: Path, options: TrainOptions) -> RunPlan:
    """Step 1: labels, boxes, folds and the units of training."""
    from cspine_submit.train import data as td

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


def _load_state(work: WorkPaths) -> dict:
    return json.loads(work.state.read_text()) if work.state.is_file() else {}


def _save_state(work: WorkPaths, state: dict) -> None:
    from cspine_submit.files import atomic_write_text

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
    from cspine_submit.train import data as td

    if options.patience <= 0:
        return uids, []
    return td.split_studies({u: labels[u] for u in uids}, options.val_fraction, options.seed + 1)


def fit_models(plan: RunPlan, metas: dict, cache_dir: Path, config: ModelConfig, options: TrainOptions,
               work: WorkPaths, state: dict, progress: bool, say: Callable[[str], None]) -> None:
    """Step 3: train every (fold, unit) model not done yet; save it and its held-out slice probabilities."""
    import keras

    from cspine_submit.score import models as models_mod
    from cspine_submit.train import data as td
    from cspine_submit.files import atomic_write_text

    strategy = models_mod.distribution_strategy()
    replicas = int(getattr(strategy, "num_replicas_in_sync", 1))
    if replicas > 1:
        say(f"{replicas} GPU replicas: global batch {options.batch_size * replicas}, peak learning rate "
            f"{learning_rate_at(options, 1, replicas):.2e}")

    def samples(v, uids):
        return td.collect_samples(metas, uids, v, cache_dir, plan.labels, plan.boxes, options.box_policy,
                                  options.other_weight)

    work.models.mkdir(parents=True, exist_ok=True)
    work.oof.mkdir(parents=True, exist_ok=True)
    for fold, unit, members, train_uids, held_uids in _fit_jobs(plan, options):
        tag = f"{fold}/{unit}"
        if tag in state["done"] and (work.models / f"{fold}_{unit}.keras").is_file():
            say(f"{tag}: already trained, skipped")
            continue
        fit_uids, inner_uids = _inner_split(train_uids, plan.labels, options)
        tr = td.Samples.concat([samples(v, fit_uids) for v in members])
        inner = td.Samples.concat([samples(v, inner_uids) for v in members])
        say(f"{tag}: {len(tr.kept())} training crops ({int(tr.kept().y.sum())} positive) from {len(fit_uids)} "
            f"studies; {len(held_uids)} held-out studies")
        model = train_unit(tag, tr, inner, config, options, work, strategy, progress, say)
        # A clean copy (no optimizer state, no augmentation layer) built by the same factory inference uses.
        clean = models_mod.build_classifier(config.head, config.input_shape)
        clean.set_weights(classifier_of(model).get_weights())
        models_mod.save_classifier(clean, work.models / f"{fold}_{unit}.keras")
        for v in members:
            held = samples(v, held_uids)
            probs = predict_samples(clean, held, config) if len(held) else np.zeros(0, np.float32)
            by_study = {u: probs[held.study == u].astype(float).round(6).tolist() for u in sorted(set(held.study))}
            atomic_write_text(work.oof / f"{fold}_{v}.json", json.dumps(by_study) + "\n")
        state["done"] = sorted(set(state["done"]) | {tag})  # after the model and its predictions are on disk
        _save_state(work, state)
        for p in work.checkpoints.glob(f"{fold}_{unit}.*"):
            p.unlink()
        keras.backend.clear_session()


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
    from cspine_submit.train import calibration as cal
    from cspine_submit.train import data as td
    from cspine_submit.train.metric import competition_score, evaluate_arrays

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


def _per_vertebra_report(plan: RunPlan, slice_probs: dict, config: ModelConfig) -> dict:
    from cspine_submit.train.metric import roc_auc

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


def write_outputs(out_dir: Path, ranges_path: Path, plan: RunPlan, final: ModelConfig, report: dict,
                  oof_uids: list, oof: np.ndarray, options: TrainOptions, work: WorkPaths,
                  data_dir: Path) -> list[str]:
    """Step 5: classifiers, model_config.json, slice_ranges.json, oof.csv, validation.json, MANIFEST.json."""
    from cspine_submit.manifest import write_manifest
    from cspine_submit.files import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    if options.final == "refit" and options.folds >= 2:
        ship = {unit: [("refit", f"{unit}.keras")] for unit, _ in plan.units}
    elif options.folds == 1:
        ship = {unit: [("split", f"{unit}.keras")] for unit, _ in plan.units}
    else:
        ship = {unit: [(f, f"{unit}.{f}.keras") for f in plan.fold_names] for unit, _ in plan.units}
    files: dict[str, list[str]] = {}
    for unit, members in plan.units:
        for fold, name in ship[unit]:
            tmp = out_dir / f".{name}.tmp"
            shutil.copyfile(work.models / f"{fold}_{unit}.keras", tmp)
            tmp.replace(out_dir / name)
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
    from cspine_submit.train import data as td

    t_start = time.perf_counter()
    data_dir, out_dir, ranges_path = Path(data_dir), Path(out_dir), Path(ranges_path)
    say = log or (lambda s: None)
    _check_inputs(out_dir, ranges_path, config, options, resume)

    # 1. plan
    plan = plan_run(data_dir, options)
    root = Path(options.work_dir) if options.work_dir else default_work_dir(out_dir)
    if root.resolve() == out_dir.resolve() or out_dir.resolve() in root.resolve().parents:
        say(f"warning: the work folder {root} lies inside {out_dir}; it is tagged, so manifests and bundles skip it")
    from cspine_submit.manifest import tag_cache_dir

    tag_cache_dir(root, "the work folder of cspine-submit train (cache, checkpoints, state, logs)")
    cache_root = Path(options.cache_dir) if options.cache_dir else root / "cache"
    work = WorkPaths(root, cache_root)
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

    # 2. cache
    cache_dir = cache_root / td.cache_key(config, ranges_path)
    t0 = time.perf_counter()
    metas, failed = td.build_cache(data_dir, plan.uids, cache_dir, ranges_path, config, options.workers, progress)
    for uid, err in failed:
        say(f"skipped study {uid}: {err}")
    say(f"crops cached for {len(metas)} studies in {time.perf_counter() - t0:.1f} s: "
        f"{td.cache_bytes(metas) / 1e6:.1f} MB ({cache_dir})")

    # 3. fit
    fit_models(plan, metas, cache_dir, config, options, work, state, progress, say)

    # 4. probabilities
    slice_probs, groups = out_of_fold_slices(plan, work)
    final, report, oof = fit_probabilities(plan, slice_probs, groups, config, options)
    report["per_vertebra"] = _per_vertebra_report(plan, slice_probs, config)
    replicas = 1
    try:
        from cspine_submit.score.models import gpu_devices

        replicas = max(len(gpu_devices()), 1)
    except Exception:  # noqa: BLE001 - reporting only
        pass
    report["training"] = {
        "folds": options.folds, "fold_of_study": {u: int(f) for u, f in plan.folds.items()}, "final": options.final,
        "epochs": options.epochs, "schedule": options.lr_schedule, "patience": options.patience,
        "batch_per_replica": options.batch_size, "replicas": replicas,
        "peak_learning_rate": learning_rate_at(options, 1, replicas), "pos_weight": options.pos_weight,
        "balance": options.balance, "box_policy": options.box_policy, "shared": options.shared,
        "failed_studies": [{"uid": u, "error": e} for u, e in failed],
        "cache_bytes": td.cache_bytes(metas), "cache_studies": len(metas),
    }
    say(f"out-of-fold metric {report['oof_score']:.4f} (uncalibrated {report['oof_score_uncalibrated']:.4f}, "
        f"prior only {report['baselines']['prior_only']:.4f}, constant 0.5 {report['baselines']['constant_0.5']:.4f})")

    # 5. write
    written = write_outputs(out_dir, ranges_path, plan, final, report, sorted(groups), oof, options, work, data_dir)
    history = read_history(work.history)
    if history:
        draw_history_png([dict(r, vertebra=f"{r['fold']}/{r['vertebra']}") for r in history], work.curves)
    shutil.rmtree(work.checkpoints, ignore_errors=True)
    files = {n: out_dir / n for n in written}
    return TrainResult(out_dir, root, ModelConfig.from_json(out_dir / "model_config.json"), files, report,
                       time.perf_counter() - t_start, failed)
