"""Fitting one unit (a vertebra's classifier, or the shared network) on one fold, epoch by epoch, with checkpoints.

:func:`train_unit` is the step :func:`cspine_submit.train.run.fit_models` calls for every (fold, unit): it builds
the classifier behind the on-device augmentation layer (or reopens the interrupted run's checkpoint), trains it on
the fixed schedule (or with early stopping on the inner split), writes ``checkpoints/<fold>_<unit>.last.keras``
and a ``history.csv`` row after every epoch, and returns the model to keep. :func:`predict_samples` streams a set
of cached crops through a model. TensorFlow/Keras are imported inside the functions that use them.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from cspine_submit.config import VERTEBRAE, ModelConfig
from cspine_submit.train.history import append_history, read_history
from cspine_submit.train.options import TrainOptions, WorkPaths, learning_rate_at, sample_weights

PREDICT_CHUNK = 256
"""Crops decoded from the cache per prediction call (bounds the host memory of a held-out fold's prediction)."""


class TrainingDeviceError(RuntimeError):
    """The device could not run a training step (out of memory, XLA could not compile, a driver/library error); the
    message names the cause and what to change."""


_XLA_WORDS = ("XLA", "jit", "OpKernel", "compil")


def device_error(exc: BaseException, *, tag: str, config: ModelConfig, options: TrainOptions, jit_compile: bool,
                 replicas: int) -> TrainingDeviceError | None:
    """``exc`` as a :class:`TrainingDeviceError` with the cause and the options to change, or None when it is not
    a device error (TensorFlow's ``OpError`` family: out of memory, XLA compilation, internal/driver errors)."""
    import tensorflow as tf

    if not isinstance(exc, tf.errors.OpError):
        return None
    first = (str(getattr(exc, "message", "") or exc).strip().splitlines() or [""])[0][:300]
    where = (f"training {tag} ({config.head} head, input {tuple(config.input_shape)}, batch {options.batch_size} "
             f"per replica x {replicas}, XLA {'on' if jit_compile else 'off'})")
    if isinstance(exc, tf.errors.ResourceExhaustedError):
        return TrainingDeviceError(
            f"out of device memory {where}: {first}. Lower --batch-size, use a smaller --input-size or the gap head "
            "(--head gap: no 134M-parameter Dense kernel)" + ("" if jit_compile else ", or try --jit-compile on"))
    if jit_compile and any(w in str(exc) for w in _XLA_WORDS):
        return TrainingDeviceError(f"XLA could not compile the training step {where}: {first}. "
                                   "Rerun with --jit-compile off")
    return TrainingDeviceError(f"the device failed {where}: {type(exc).__name__}: {first}. "
                               + ("Try --jit-compile off; " if jit_compile else "")
                               + "check the GPU driver/CUDA libraries (cspine-submit env), or train on the CPU "
                                 "with CUDA_VISIBLE_DEVICES=-1 for a smoke run")


def devices_line(strategy, precision: str, jit_compile: bool) -> str:
    """One console line: where training runs, in which precision, replicas and XLA."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    names = []
    for gpu in gpus:
        try:
            names.append(tf.config.experimental.get_device_details(gpu).get("device_name") or gpu.name)
        except Exception:  # noqa: BLE001 - a name for the console only
            names.append(gpu.name)
    where = f"GPU ({', '.join(names)})" if gpus else "CPU (no GPU visible to TensorFlow)"
    replicas = int(getattr(strategy, "num_replicas_in_sync", 1))
    return (f"training on {where}, precision {precision}, {replicas} replica(s)"
            f"{' (MirroredStrategy)' if replicas > 1 else ''}, XLA {'on' if jit_compile else 'off'}")


def _set_seeds(seed: int) -> None:
    import keras

    keras.utils.set_random_seed(seed)


def _make_model(config: ModelConfig, options: TrainOptions, strategy, seed: int, *, jit_compile: bool = False):
    """The classifier to train, behind the on-device augmentation layer when ``options.augment``, compiled (with XLA
    when ``jit_compile``)."""
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
            jit_compile=bool(jit_compile),
        )
    return model


def classifier_of(model):
    """The classifier inside a training model (the model itself, or the one behind the augmentation layer)."""
    return model.layers[-1] if model.name == "augmenting" else model


def predict_samples(model, samples, config: ModelConfig) -> np.ndarray:
    """Slice probabilities ``(n,)`` float32 of every crop in ``samples`` (streamed from the cache in chunks)."""
    from cspine_submit.score.models import predict
    from cspine_submit.train.data import load_batch

    out = [predict(model, load_batch(samples, np.arange(start, min(start + PREDICT_CHUNK, len(samples))), config),
                   config.batch_size)
           for start in range(0, len(samples), PREDICT_CHUNK)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


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


def _save_atomically(save, path: Path, suffix: str) -> None:
    """``save(tmp)`` then rename over ``path``: a checkpoint is whole or absent (Keras wants the suffix last)."""
    tmp = path.with_name(path.name[: -len(suffix)] + ".tmp" + suffix)
    save(tmp)
    tmp.replace(path)


def unit_seed_offset(fold: str, unit: str) -> int:
    """A distinct small integer per (fold, unit): seeds of different models never coincide.

    ``f2``/``C5`` -> 4 + 20; the shared unit ``all`` counts as an eighth vertebra; ``refit``/``split`` as fold 9.
    """
    v = VERTEBRAE.index(unit) if unit in VERTEBRAE else len(VERTEBRAE)
    return v + 10 * (int(fold[1:]) if fold[1:].isdigit() else 9)


def _open_model(past: list, last_path: Path, config: ModelConfig, options: TrainOptions, strategy, *, seed: int,
                jit_compile: bool):
    """``(model, past)``: the interrupted run's checkpoint with its logged epochs, or a new model and ``[]``."""
    import keras

    if past and last_path.is_file():
        from cspine_submit.train.data import _train_augment_class

        _train_augment_class()  # registers the augmentation layer, so the checkpoint deserializes
        with strategy.scope():
            model = keras.models.load_model(last_path)
        model.jit_compile = bool(jit_compile)  # this run's choice, not the interrupted one's
        return model, past
    return _make_model(config, options, strategy, seed, jit_compile=jit_compile), []


EPOCH_STRIDE = 1_000_003
"""Counter values of a random stream per epoch (steps per epoch stay far below it, so epochs never overlap)."""


def reseed_generators(model, seed: int, epoch: int) -> int:
    """Set every Keras ``SeedGenerator`` in ``model`` (the augmentation's, each Dropout's) to a state that is a
    function of ``seed``, its position and the 1-based ``epoch`` only; returns how many were set.

    A ``.keras`` file does not store these states: a run reopened from its checkpoint would otherwise draw other
    augmentations and dropout masks than the run that never stopped. Reseeded at the start of every epoch, a resumed
    epoch draws exactly what the uninterrupted one drew.
    """
    import keras

    found = []
    for layer in model._flatten_layers():  # a fixed order: the model's layers, depth first
        found += [g for g in vars(layer).values() if isinstance(g, keras.random.SeedGenerator) and g not in found]
    for i, g in enumerate(found):
        dtype = keras.backend.standardize_dtype(g.state.dtype)
        g.state.assign(np.array([(seed * 1009 + i) % 2**31, (epoch * EPOCH_STRIDE) % 2**31], dtype=dtype))
    return len(found)


class EtaClock:
    """The whole run's remaining training time from the epochs timed so far (their mean times those left)."""

    def __init__(self, epochs_left: int, say: Callable[[str], None], first: int = 2):
        self.left, self.say, self.first = int(epochs_left), say, int(first)
        self.seconds: list[float] = []

    def epoch_done(self, row: dict) -> None:
        self.seconds.append(float(row.get("seconds", 0.0)))
        self.left = max(self.left - 1, 0)
        if len(self.seconds) <= self.first:
            self.report()

    def report(self) -> None:
        if not self.seconds or not self.left:
            return
        mean = float(np.mean(self.seconds))
        self.say(f"ETA: about {_duration(mean * self.left)} for the {self.left} training epoch(s) left "
                 f"({mean:.0f} s per epoch so far; held-out predictions and calibration come on top)")


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else \
        f"{seconds:.0f} s"


def _best_so_far(past: list, options: TrainOptions, use_val: bool) -> tuple[float, int]:
    """``(best signed score, its epoch)`` among the logged epochs (lower is better; ``inf, 0`` when none)."""
    sign = -1.0 if options.monitor.endswith("auc") else 1.0
    scores = [sign * r[options.monitor] for r in past if np.isfinite(r.get(options.monitor, np.nan))] if use_val else []
    best = min(scores + [np.inf])
    return best, next((r["epoch"] for r in past if sign * r.get(options.monitor, np.nan) == best), 0)


def _fit_epoch(model, ds_train, ds_val, epoch: int, *, tag: str, steps: int, lr: float, options: TrainOptions,
               progress: bool) -> dict:
    """Train one epoch; the history row of it (loss, AUC, inner-split scores, learning rate, seconds)."""
    from tqdm import tqdm

    fold, unit = tag.split("/")
    model.optimizer.learning_rate.assign(lr)
    t0 = time.perf_counter()
    # The bar's callback reads the loss after every batch, a device-to-host sync: only when a bar is shown.
    bar = tqdm(total=steps, desc=f"{tag} epoch {epoch}/{options.epochs}", unit="batch", leave=False) if progress else None
    fit = model.fit(ds_train, validation_data=ds_val, epochs=epoch, initial_epoch=epoch - 1, verbose=0,
                    shuffle=False, callbacks=[_tqdm_callback_class()(bar)] if bar is not None else [])
    if bar is not None:
        bar.close()
    logs = {k: v[-1] for k, v in fit.history.items()}
    return {"fold": fold, "vertebra": unit, "epoch": epoch, "loss": float(logs.get("loss", np.nan)),
            "auc": float(logs.get("auc", np.nan)), "lr": lr,
            "val_loss": float(logs.get("val_loss", np.nan)), "val_auc": float(logs.get("val_auc", np.nan)),
            "seconds": round(time.perf_counter() - t0, 2)}


def train_unit(tag: str, train_s, val_s, config: ModelConfig, options: TrainOptions, *, work: WorkPaths, strategy,
               jit_compile: bool = False, progress: bool = True, log: Callable[[str], None] | None = None,
               on_epoch: Callable[[dict], None] | None = None):
    """Train one classifier (resuming from its checkpoint when one exists); returns the model to keep.

    Parameters
    ----------
    tag : str
        ``<fold>/<unit>``, e.g. ``f2/C5``: names checkpoints and history rows.
    train_s, val_s : Samples
        Training crops; ``val_s`` (the inner split, with ``patience``) may be empty.
    config, options : ModelConfig, TrainOptions
    work : WorkPaths
        Checkpoints and ``history.csv`` go here.
    strategy : tf.distribute.Strategy
        The model is built (or reopened) in its scope; the global batch is ``batch_size`` per replica.
    jit_compile : bool
        Compile the training step with XLA (:func:`cspine_submit.train.options.resolve_jit_compile`).
    progress : bool
        A tqdm bar per epoch.
    log : callable, optional
        Receives one line per epoch.
    on_epoch : callable, optional
        Receives each epoch's history row once it is on disk (the run's ETA clock).
    """
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

    offset = unit_seed_offset(fold, unit)
    _set_seeds(options.seed + offset)
    model, past = _open_model(past, last_path, config, options, strategy, seed=options.seed * 100 + offset,
                              jit_compile=jit_compile)
    replicas = int(getattr(strategy, "num_replicas_in_sync", 1))
    global_batch = options.batch_size * replicas
    use_val = options.patience > 0 and len(val_s) > 0
    key, sign = options.monitor, (-1.0 if options.monitor.endswith("auc") else 1.0)
    best, best_epoch = _best_so_far(past, options, use_val)

    ds_train = make_dataset(train_s, config, global_batch, shuffle=True, augment_data=False,
                            seed=options.seed * 100 + offset, sample_weight=w, workers=options.workers,
                            first_epoch=len(past))  # a resumed run continues the shuffle where it stopped
    ds_val = (make_dataset(val_s, config, global_batch, shuffle=False, augment_data=False, workers=options.workers)
              if use_val else None)
    steps = int(np.ceil(len(train_s) / global_batch))
    for epoch in range(len(past) + 1, options.epochs + 1):
        if use_val and epoch - best_epoch > options.patience and np.isfinite(best):
            break
        lr = learning_rate_at(options, epoch, replicas)
        reseed_generators(model, options.seed * 100 + offset, epoch)
        row = _fit_epoch(model, ds_train, ds_val, epoch, tag=tag, steps=steps, lr=lr, options=options,
                         progress=progress)
        if use_val and np.isfinite(row.get(key, np.nan)) and sign * row[key] < best:
            best, best_epoch = sign * row[key], epoch
            _save_atomically(model.save_weights, best_path, ".weights.h5")
        _save_atomically(model.save, last_path, ".keras")
        append_history(work.history, row)  # after the checkpoint: a resumed run never repeats a logged epoch
        if log:
            log(f"{tag} epoch {epoch}: loss {row['loss']:.4f} auc {row['auc']:.3f} lr {lr:.2e}"
                + (f" inner val_loss {row['val_loss']:.4f} val_auc {row['val_auc']:.3f}" if use_val else "")
                + f" ({row['seconds']:.0f} s)")
        if on_epoch:
            on_epoch(row)
    if use_val and best_path.is_file():
        model.load_weights(best_path)
    return model
