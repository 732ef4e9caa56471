"""What a training run is told (:class:`TrainOptions`), where it keeps its work (:class:`WorkPaths`), what it
returns (:class:`TrainResult`), and the two rules every fitted model follows: the learning rate at an epoch and the
per-crop loss weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cspine_submit.config import VERTEBRAE, ModelConfig
from cspine_submit.train.data import class_weights

JIT_CHOICES: tuple[str, ...] = ("auto", "on", "off")
"""Values of :attr:`TrainOptions.jit_compile`."""

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
    jit_compile : str
        XLA for the training step: ``auto`` (default) compiles on exactly one GPU (a P100, one T4: Keras's own
        choice there, and XLA's fusions speed up ResNet-50 training), and not under ``MirroredStrategy`` (2 x T4:
        Keras leaves XLA off with ``tf.distribute``) nor on a CPU (the compile costs more than it saves in a smoke
        run); ``on`` / ``off`` force it. The augmentation is written in ops XLA compiles, so every choice runs.
    threads : int
        TensorFlow's intra-op threads while training (2, the Kaggle notebook's cores), fixed whatever the machine:
        CPU kernels split their sums by the size of that pool, so the weights would otherwise depend on the core
        count (at 1 thread every tensor differed from 2). 0 keeps TensorFlow's default (the machine's cores).
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
    jit_compile: str = "auto"
    threads: int = 2
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


def learning_rate_at(options: TrainOptions, epoch: int, replicas: int = 1) -> float:
    """Adam's rate for 1-based ``epoch``: scaled to the global batch, cosine-decayed over the schedule.

    The cosine takes the value at the epoch's start, so epoch 1 runs at the peak and the last above 0.
    """
    peak = options.learning_rate * options.batch_size * max(int(replicas), 1) / REFERENCE_BATCH
    if options.lr_schedule == "constant":
        return float(peak)
    frac = (epoch - 1) / max(options.epochs, 1)
    return float(peak * 0.5 * (1.0 + np.cos(np.pi * frac)))


def resolve_jit_compile(choice: str, *, gpus: int, replicas: int) -> bool:
    """Whether the training step is compiled with XLA (see :attr:`TrainOptions.jit_compile`).

    Parameters
    ----------
    choice : {"auto", "on", "off"}
    gpus : int
        GPUs TensorFlow sees.
    replicas : int
        Replicas of the distribution strategy (2 on 2 x T4).
    """
    if choice not in JIT_CHOICES:
        raise ValueError(f"jit_compile {choice!r}: expected one of {list(JIT_CHOICES)}")
    if choice != "auto":
        return choice == "on"
    return gpus == 1 and replicas == 1


def sample_weights(y: np.ndarray, w: np.ndarray, options: TrainOptions) -> np.ndarray:
    """Per-crop loss weights: the crop's label weight times ``pos_weight`` for positives (or class balancing)."""
    y = np.asarray(y) > 0.5
    w = np.asarray(w, np.float32)
    if options.balance:
        wn, wp = class_weights(y, w)
        return (w * np.where(y, wp, wn)).astype(np.float32)
    return (w * np.where(y, options.pos_weight, 1.0)).astype(np.float32)


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
