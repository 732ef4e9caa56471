"""Train the seven per-vertebra classifiers from competition-layout data (or the synthetic demo set).

The seed notebook's recipe is the baseline (binary cross-entropy, Adam 5e-4, batch 16, early stopping on the
validation loss, 2/3 - 1/3 split by study), plus: augmentation (flip, small rotation/scaling, intensity jitter),
class balancing (both classes get the same total weight), a seeded split stratified by ``patient_overall``,
fracture-box slice labels (:mod:`cspine_submit.train_data`), tqdm bars, a history file, a validation plot, a
vertebra-level validation AUC, and ``resume`` after an interruption.

Writes into ``out_dir``::

    C1.keras ... C7.keras     the classifiers (no optimizer state)
    model_config.json         the config inference reads (classifier_files, trained_on, source, and priors =
                              the label prevalence of the training studies)
    history.csv               vertebra, epoch, loss, auc, val_loss, val_auc, lr, seconds
    validation.json           per-vertebra and pooled vertebra-level AUC on the held-out studies, the split
    training_curves.png       loss and AUC per epoch (train dashed, validation solid), one colour per vertebra
    MANIFEST.json             sha256 and size of every file above
    train_state.json          progress, for ``resume``
    checkpoints/              last and best model per vertebra while training (removed when a vertebra is done)
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

HISTORY_COLUMNS = ("vertebra", "epoch", "loss", "auc", "val_loss", "val_auc", "lr", "seconds")
OUTPUT_FILES = ("model_config.json", "history.csv", "validation.json", "training_curves.png")


@dataclass(frozen=True)
class TrainOptions:
    """How to train (the config says what the model sees; these say how it learns).

    Attributes
    ----------
    vertebrae : tuple of str
        Which classifiers to train.
    epochs : int
        Upper bound; early stopping usually ends sooner.
    batch_size : int
        The seed's 16.
    learning_rate : float
        Adam, the seed's 5e-4.
    patience : int
        Epochs without a better ``monitor`` value before stopping (the weights of the best epoch are kept).
    monitor : str
        ``val_loss`` (the seed's early stopping) or ``val_auc`` (slice-level AUC on the held-out studies; steadier
        than the loss when the loss spikes on a few over-confident crops, as it does on small synthetic sets).
    val_fraction : float
        Share of studies held out, stratified by patient_overall (the seed's 1/3).
    seed : int
        Split, shuffling, augmentation and weight initialisation.
    augment : bool
    balance : bool
        Give positives and negatives the same total weight.
    shared : bool
        Train ONE network on the crops of all selected vertebrae and save it as each vertebra's classifier
        (7x the data per network; for small data sets such as the synthetic demo). Default: one network each.
    box_policy : str
        One of :data:`cspine_submit.train_data.BOX_POLICIES`.
    other_weight : float
        Weight of a fractured vertebra's crops without a box under ``box_policy="downweight"``.
    backbone_weights : str or None
        Local ImageNet weights file for ResNet50 heads (3-channel inputs only).
    workers : int
        Processes that read and crop studies for the cache.
    limit : int or None
        Use only the first ``limit`` studies of train.csv (smoke runs).
    cache_dir : str or None
        Crop cache; default ``<out_dir>/cache``.
    trained_on : str
        Written into model_config.json: ``competition`` or ``synthetic``.
    source : str
        Written into model_config.json (the command line).
    """

    vertebrae: tuple[str, ...] = VERTEBRAE
    epochs: int = 30
    batch_size: int = 16
    learning_rate: float = 5e-4
    patience: int = 4
    monitor: str = "val_loss"
    val_fraction: float = 1.0 / 3.0
    seed: int = 0
    augment: bool = True
    balance: bool = True
    shared: bool = False
    box_policy: str = "exclude"
    other_weight: float = 0.2
    backbone_weights: str | None = None
    workers: int = 2
    limit: int | None = None
    cache_dir: str | None = None
    trained_on: str = "competition"
    source: str = ""


@dataclass
class TrainResult:
    """What a training run produced."""

    out_dir: Path
    config: ModelConfig
    files: dict[str, Path]
    validation: dict
    seconds: float
    failed_studies: list = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# Small pure helpers


def existing_outputs(out_dir: str | Path) -> list[Path]:
    """The files and folders a training run writes that already exist in ``out_dir`` (other files are left alone)."""
    out_dir = Path(out_dir)
    names = [f"{v}.keras" for v in VERTEBRAE] + list(OUTPUT_FILES) + [
        "slice_ranges.json", "MANIFEST.json", "train_state.json", "checkpoints", "cache"]
    return [out_dir / n for n in names if (out_dir / n).exists()]


def read_history(path: str | Path) -> list[dict]:
    """Rows of history.csv as dicts of floats (vertebra kept as str); [] when absent."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        d = {"vertebra": r["vertebra"]}
        for k in HISTORY_COLUMNS[1:]:
            try:
                d[k] = float(r[k])
            except (TypeError, ValueError):
                d[k] = float("nan")
        d["epoch"] = int(d["epoch"])
        out.append(d)
    return out


def append_history(path: str | Path, row: dict) -> None:
    path = Path(path)
    new = not path.is_file()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in HISTORY_COLUMNS})


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
    if not cv2.imwrite(str(path), img):
        raise OSError(f"{path}: could not write PNG")
    return path


# --------------------------------------------------------------------------------------------------------------
# Training one vertebra


def _set_seeds(seed: int) -> None:
    import keras

    keras.utils.set_random_seed(seed)


def _make_model(config: ModelConfig, options: TrainOptions, strategy):
    import keras

    from cspine_submit.models import build_classifier, dtype_policy, precision_policy

    with dtype_policy(precision_policy(config)), strategy.scope():
        model = build_classifier(config.head, config.input_shape, options.backbone_weights)
        model.compile(
            optimizer=keras.optimizers.Adam(options.learning_rate),
            loss=keras.losses.BinaryCrossentropy(),
            weighted_metrics=[keras.metrics.AUC(name="auc")],
        )
    return model


def _predict_samples(model, samples, batch_size: int) -> np.ndarray:
    from cspine_submit.models import predict
    from cspine_submit.train_data import load_crops

    out = []
    buf = []
    for x in load_crops(samples):
        buf.append(x)
        if len(buf) == 256:
            out.append(predict(model, np.stack(buf), batch_size))
            buf = []
    if buf:
        out.append(predict(model, np.stack(buf), batch_size))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def vertebra_level(study: np.ndarray, probs: np.ndarray, labels: dict, vertebra: str, config: ModelConfig):
    """Pool slice probabilities per study with the config's rule: ``(uids, y, p)`` for a vertebra-level AUC."""
    from cspine_submit.aggregate import pool_slices

    uids = sorted(set(study))
    p = np.array([pool_slices(probs[study == u], config.aggregation, config.top_k) for u in uids])
    y = np.array([labels[u][vertebra] for u in uids])
    return uids, y, p


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


def _TqdmBatches(bar):
    return _tqdm_callback_class()(bar)


def train_vertebra(vertebra: str, train_s, val_s, config: ModelConfig, options: TrainOptions, out_dir: Path,
                   strategy, progress: bool = True, log: Callable[[str], None] | None = None):
    """Train one classifier (resuming from its checkpoint when one exists); returns the best model."""
    import warnings

    import keras
    from tqdm import tqdm

    from cspine_submit.train_data import class_weights, make_dataset

    # tf.data generators have no known length; Keras warns at every epoch end that the input "ran out".
    warnings.filterwarnings("ignore", message="Your input ran out of data")

    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = ckpt_dir / f"{vertebra}.last.keras", ckpt_dir / f"{vertebra}.best.weights.h5"
    history_path = out_dir / "history.csv"
    past = [r for r in read_history(history_path) if r["vertebra"] == vertebra]

    train_s, val_s = train_s.kept(), val_s.kept()
    if len(train_s) == 0 or train_s.y.min() == train_s.y.max():
        raise ValueError(f"{vertebra}: the training split needs both positive and negative crops "
                         f"(have {int(train_s.y.sum())} positive of {len(train_s)})")
    w = train_s.w.copy()
    if options.balance:
        wn, wp = class_weights(train_s.y, train_s.w)
        w = w * np.where(train_s.y > 0.5, wp, wn).astype(np.float32)

    offset = VERTEBRAE.index(vertebra) if vertebra in VERTEBRAE else len(VERTEBRAE)
    _set_seeds(options.seed + offset)
    if past and last_path.is_file():
        with strategy.scope():
            model = keras.models.load_model(last_path)
    else:
        past = []
        model = _make_model(config, options, strategy)
    start_epoch = len(past)
    # Early stopping / best epoch on options.monitor; "better" is lower for a loss and higher for an AUC.
    key = options.monitor
    sign = -1.0 if key.endswith("auc") else 1.0
    scores = [sign * r[key] for r in past if np.isfinite(r.get(key, np.nan))]
    best = min(scores + [np.inf])
    best_epoch = next((r["epoch"] for r in past if sign * r.get(key, np.nan) == best), 0)

    ds_train = make_dataset(train_s, options.batch_size, config.input_shape, shuffle=True,
                            augment_data=options.augment, seed=options.seed * 100 + offset,
                            sample_weight=w)
    ds_val = make_dataset(val_s, options.batch_size, config.input_shape, shuffle=False, augment_data=False)
    steps = int(np.ceil(len(train_s) / options.batch_size))
    has_val = len(val_s) > 0

    for epoch in range(start_epoch + 1, options.epochs + 1):
        if epoch - best_epoch > options.patience and np.isfinite(best):
            break
        t0 = time.perf_counter()
        bar = tqdm(total=steps, desc=f"{vertebra} epoch {epoch}/{options.epochs}", unit="batch", disable=not progress,
                   leave=False)
        fit = model.fit(ds_train, validation_data=ds_val if has_val else None, epochs=epoch, initial_epoch=epoch - 1,
                        verbose=0, shuffle=False, callbacks=[_TqdmBatches(bar)])
        bar.close()
        logs = {k: v[-1] for k, v in fit.history.items()}
        row = {"vertebra": vertebra, "epoch": epoch, "loss": float(logs.get("loss", np.nan)),
               "auc": float(logs.get("auc", np.nan)), "lr": float(options.learning_rate),
               "val_loss": float(logs.get("val_loss", logs.get("loss", np.nan))),
               "val_auc": float(logs.get("val_auc", np.nan))}
        row["seconds"] = round(time.perf_counter() - t0, 2)
        if np.isfinite(row.get(key, np.nan)) and sign * row[key] < best:
            best, best_epoch = sign * row[key], epoch
            model.save_weights(best_path)
        model.save(last_path)
        append_history(history_path, row)  # after the checkpoint: a resumed run never repeats a logged epoch
        if log:
            log(f"{vertebra} epoch {epoch}: loss {row['loss']:.4f} auc {row['auc']:.3f} "
                f"val_loss {row['val_loss']:.4f} val_auc {row['val_auc']:.3f} ({row['seconds']:.0f} s)")
    if best_path.is_file():
        model.load_weights(best_path)
    return model


# --------------------------------------------------------------------------------------------------------------
# The whole run


def _state(out_dir: Path) -> dict:
    p = out_dir / "train_state.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _save_state(out_dir: Path, state: dict) -> None:
    p = out_dir / "train_state.json"
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(p)


def train_classifiers(data_dir: str | Path, ranges_path: str | Path, out_dir: str | Path, config: ModelConfig,
                      options: TrainOptions = TrainOptions(), *, resume: bool = False, progress: bool = True,
                      log: Callable[[str], None] | None = None) -> TrainResult:
    """Cache crops, train one classifier per vertebra, write the weights folder.

    Parameters
    ----------
    data_dir : path
        Competition layout: ``train.csv``, ``train_images/<uid>/``, optional ``train_bounding_boxes.csv``.
    ranges_path : path
        ``slice_ranges.json`` used to plan the crops (it is copied into ``out_dir``, since inference must plan
        the same way).
    out_dir : path
        The weights folder to write. Must be empty or absent unless ``resume``.
    config : ModelConfig
        What the models see (head, input size, channels, windows, crop margin, K ...).
    options : TrainOptions
    resume : bool
        Continue a run in ``out_dir``: cached crops are reused, finished vertebrae are skipped, an interrupted
        vertebra continues from its last completed epoch.
    log : callable, optional
        Receives one line per epoch / step (the CLI prints them).
    """
    import keras

    from cspine_submit import models as models_mod
    from cspine_submit import train_data as td
    from cspine_submit.metric import roc_auc

    t_start = time.perf_counter()
    data_dir, out_dir, ranges_path = Path(data_dir), Path(out_dir), Path(ranges_path)
    say = log or (lambda s: None)
    if options.monitor not in ("val_loss", "val_auc"):
        raise ValueError(f"monitor {options.monitor!r}: expected 'val_loss' or 'val_auc'")
    unknown = [v for v in options.vertebrae if v not in VERTEBRAE]
    if unknown:
        raise ValueError(f"unknown vertebrae {unknown}; expected a subset of {list(VERTEBRAE)}")
    if config.head not in models_mod.ARCHITECTURES:
        raise ValueError(f"unknown classifier head {config.head!r}; valid heads: {sorted(models_mod.ARCHITECTURES)}")
    existing = [p for p in existing_outputs(out_dir) if p.resolve() != ranges_path.resolve()]
    if existing and not resume:
        raise FileExistsError(f"{out_dir}: already holds training outputs ({', '.join(p.name for p in existing[:4])}"
                              f"{' ...' if len(existing) > 4 else ''}); resume the run, remove them, or choose another folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    from cspine_submit.localize import load_ranges

    load_ranges(ranges_path)  # fail early on a bad ranges file
    labels = td.read_train_labels(data_dir)
    uids = sorted(labels)
    if options.limit:
        uids = uids[: options.limit]
        labels = {u: labels[u] for u in uids}
    boxes = td.read_box_slices(data_dir)
    state = _state(out_dir)
    if resume and state.get("config") and state["config"] != json.loads(json.dumps(td._config_dict(config))):
        raise ValueError(f"{out_dir}: resume with a different config than the interrupted run; start a new folder")
    train_uids, val_uids = td.split_studies(labels, options.val_fraction, options.seed)
    state.update(config=json.loads(json.dumps(td._config_dict(config))), options=asdict(options),
                 train_uids=train_uids, val_uids=val_uids, done=state.get("done", []))
    _save_state(out_dir, state)
    say(f"{len(uids)} studies: {len(train_uids)} train, {len(val_uids)} validation (seed {options.seed})")

    cache_dir = Path(options.cache_dir) if options.cache_dir else out_dir / "cache"
    cache_dir = cache_dir / td.cache_key(config, ranges_path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    metas, failed = td.build_cache(data_dir, uids, cache_dir, ranges_path, config, options.workers, progress)
    for uid, err in failed:
        say(f"skipped study {uid}: {err}")
    say(f"crops cached for {len(metas)} studies in {time.perf_counter() - t0:.1f} s ({cache_dir})")

    strategy = models_mod.distribution_strategy()
    validation = json.loads((out_dir / "validation.json").read_text()) if (out_dir / "validation.json").is_file() else {}
    validation.setdefault("per_vertebra", {})
    pooled_y, pooled_p = [], []

    def samples(v, split_uids):
        return td.collect_samples(metas, split_uids, v, cache_dir, labels, boxes, options.box_policy,
                                  options.other_weight)

    # Units of training: each vertebra alone, or one shared network ("all") for every selected vertebra.
    units = [("all", list(options.vertebrae))] if options.shared else [(v, [v]) for v in options.vertebrae]
    for name, members in units:
        if all(v in state["done"] and (out_dir / f"{v}.keras").is_file() for v in members):
            say(f"{name}: already trained, skipped")
            continue
        tr = td.Samples.concat([samples(v, train_uids) for v in members])
        va_parts = {v: samples(v, val_uids) for v in members}
        va = td.Samples.concat(list(va_parts.values()))
        say(f"{name}: {len(tr.kept())} training crops ({int(tr.kept().y.sum())} positive), "
            f"{len(va.kept())} validation crops ({int(va.kept().y.sum())} positive)")
        best = train_vertebra(name, tr, va, config, options, out_dir, strategy, progress, log)
        # Save a clean copy (no optimizer state) built by the same factory inference uses.
        clean = models_mod.build_classifier(config.head, config.input_shape)
        clean.set_weights(best.get_weights())
        for v in members:
            final = out_dir / f"{v}.keras"
            models_mod.save_classifier(clean, final)
            # Vertebra-level validation: every validation crop of v (all weights), pooled as inference pools.
            vs = va_parts[v]
            info = {"trained_as": name, "n_train_crops": len(tr.kept()),
                    "n_train_pos": int(tr.kept().y.sum())}
            if len(vs):
                probs = _predict_samples(clean, vs, config.batch_size)
                vu, vy, vp = vertebra_level(vs.study, probs, labels, v, config)
                info.update(n_val_studies=len(vu), n_val_pos=int(vy.sum()), auc=roc_auc(vy, vp),
                            slice_auc=roc_auc(vs.y[vs.w > 0], probs[vs.w > 0]),
                            val_studies=vu, val_labels=[int(a) for a in vy], val_probs=[float(a) for a in vp])
            validation["per_vertebra"][v] = info
            say(f"{v}: saved {final.name}; validation vertebra AUC {info.get('auc', float('nan')):.3f}")
        # validation.json before the state: a resumed run skips this unit and finds its validation there.
        (out_dir / "validation.json").write_text(json.dumps(validation, indent=2, default=float) + "\n")
        state["done"] = sorted(set(state["done"]) | set(members))
        _save_state(out_dir, state)
        for p in (out_dir / "checkpoints").glob(f"{name}.*"):
            p.unlink()
        keras.backend.clear_session()

    for v, info in validation["per_vertebra"].items():
        if "val_labels" in info:
            pooled_y += info["val_labels"]
            pooled_p += info["val_probs"]
    validation["pooled_auc"] = roc_auc(np.array(pooled_y), np.array(pooled_p)) if pooled_y else float("nan")
    validation["box_policy"] = options.box_policy
    validation["val_uids"] = val_uids
    (out_dir / "validation.json").write_text(json.dumps(validation, indent=2, default=float) + "\n")

    if ranges_path.resolve() != (out_dir / "slice_ranges.json").resolve():
        shutil.copyfile(ranges_path, out_dir / "slice_ranges.json")  # inference must plan as training did
    # Priors (used for a study or vertebra that cannot be scored) = prevalence in the labels trained on.
    lo, hi = config.clip
    priors = {t: float(np.clip(np.mean([labels[u][t] for u in uids]), lo, hi)) for t in PREDICTION_TYPES}
    final_config = config.replace(
        priors=priors,
        classifier_files={v: f"{v}.keras" for v in VERTEBRAE},
        trained_on=options.trained_on,
        source=options.source or f"cspine-submit train on {data_dir} ({len(uids)} studies)",
    )
    final_config.to_json(out_dir / "model_config.json")
    history = read_history(out_dir / "history.csv")
    if history:
        draw_history_png(history, out_dir / "training_curves.png")
    if (out_dir / "checkpoints").is_dir() and not any((out_dir / "checkpoints").iterdir()):
        (out_dir / "checkpoints").rmdir()
    if set(state["done"]) >= set(VERTEBRAE):
        (out_dir / "train_state.json").unlink()  # complete: nothing left to resume
    written = [f"{v}.keras" for v in VERTEBRAE if (out_dir / f"{v}.keras").is_file()]
    written += [n for n in OUTPUT_FILES + ("slice_ranges.json",) if (out_dir / n).is_file()]
    from cspine_submit.manifest import write_manifest

    write_manifest(out_dir, created_by=options.source or "cspine-submit train")
    files = {n: out_dir / n for n in written + ["MANIFEST.json"]}
    return TrainResult(out_dir, final_config, files, validation, time.perf_counter() - t_start, failed)
