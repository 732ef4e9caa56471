"""Devices and precision for the classifiers: which GPUs (or logical CPUs) TensorFlow sees, float16 or float32,
why no GPU, and where each group of vertebrae sharing a model runs (:class:`DevicePlan`).

TensorFlow / Keras are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from cspine_submit.config import VERTEBRAE, ModelConfig

DEVICE_ATTR = "_cspine_device"
"""Attribute under which a loaded model keeps the device it was placed on (None: TensorFlow's default; a network
spread over several devices: their names joined by ``+``)."""

MEMORY_PLAN_ATTR = "_cspine_memory_plan"
"""Attribute under which a loaded model keeps the memory plan (:class:`cspine_submit.score.memory.MemoryPlan`) that
placed it, so that :meth:`DevicePlan.with_placement` can put it in the run report."""


def gpu_devices() -> list:
    """Visible physical GPUs."""
    import tensorflow as tf

    return list(tf.config.list_physical_devices("GPU"))


def fast_float16_available() -> bool:
    """True when every visible GPU has fast float16 (compute capability >= 7.0: V100, T4, A100...).

    A P100 (6.0) gains nothing from float16, and a CPU loses, so both keep float32.
    """
    import tensorflow as tf

    gpus = gpu_devices()
    if not gpus:
        return False
    for gpu in gpus:
        cc = tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0)
        if tuple(cc) < (7, 0):
            return False
    return True


def precision_policy(config: ModelConfig) -> str:
    """``mixed_float16`` when ``config.mixed_precision`` and the GPUs benefit, else ``float32``."""
    return "mixed_float16" if config.mixed_precision and fast_float16_available() else "float32"


@contextmanager
def dtype_policy(name: str):
    """Temporarily set Keras' global dtype policy (models keep the policy they were built with)."""
    import keras

    old = keras.config.dtype_policy().name
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(old)


def distribution_strategy():
    """``MirroredStrategy`` over every visible GPU when there are several, else the default strategy."""
    import tensorflow as tf

    gpus = gpu_devices()
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(len(gpus))])
    return tf.distribute.get_strategy()


@dataclass(frozen=True)
class DevicePlan:
    """Where the classifiers run, in which precision, and why.

    Attributes
    ----------
    kind : "GPU" or "CPU"
    devices : tuple of str
        TensorFlow logical device names the classifiers are placed on (``/device:GPU:0`` ...).
    names : tuple of str
        What each device is (GPU model and compute capability).
    precision : str
        Keras dtype policy of the classifiers: ``mixed_float16`` or ``float32``.
    strategy : str
        How the seven classifiers share the devices.
    why : tuple of str
        Why this device kind and precision (e.g. no GPU visible to TensorFlow, and why not).
    placement : {vertebra: device}
        Where the loaded classifiers were placed (:meth:`with_placement`); empty: :meth:`device_for` of each.
    memory : MemoryPlan or None
        The memory plan that placed them (:mod:`cspine_submit.score.memory`), when known.
    backend : BackendChoice or None
        The Keras backend scoring them and why (:mod:`cspine_submit.score.backends`).
    """

    kind: str
    devices: tuple[str, ...]
    names: tuple[str, ...]
    precision: str
    strategy: str
    why: tuple[str, ...] = ()
    placement: Mapping[str, str] = field(default_factory=dict)
    memory: Any = None
    backend: Any = None

    def device_for(self, vertebra: str) -> str:
        """The device of one vertebra's classifier: round-robin in C1..C7 order (C1, C3, C5, C7 on the first of two)."""
        i = VERTEBRAE.index(vertebra) if vertebra in VERTEBRAE else 0
        return self.devices[i % len(self.devices)]

    def place(self, groups: Sequence[Sequence[str]]) -> dict[str, str]:
        """The device of each vertebra when the vertebrae of a group share one model (:func:`classifier_groups`).

        A group lives on one device (its weights once, its crops scored in one pass); the groups go round-robin over
        the devices in the order given. Seven groups of one vertebra each (one classifier per vertebra) are placed
        as :meth:`device_for` places them; C1-C2 sharing one network and C3-C7 another put one on each. This is the
        fallback for heads the memory plan cannot count; the memory plan itself (:mod:`cspine_submit.score.memory`)
        also splits one shared network (replicas) or an ensemble's members over the devices.
        """
        return {v: self.devices[i % len(self.devices)] for i, group in enumerate(groups) for v in group}

    def with_placement(self, models: Mapping[str, Any]) -> "DevicePlan":
        """This plan, recording where the loaded ``models`` (from :func:`load_classifiers`) were placed."""
        memory = next((getattr(m, MEMORY_PLAN_ATTR) for m in models.values() if getattr(m, MEMORY_PLAN_ATTR, None)),
                      self.memory)
        return dataclasses.replace(self, placement={v: getattr(m, DEVICE_ATTR, None) for v, m in models.items()},
                                   memory=memory)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "devices": list(self.devices), "names": list(self.names),
                "precision": self.precision, "strategy": self.strategy, "why": list(self.why),
                "placement": dict(self.placement) if self.placement else {v: self.device_for(v) for v in VERTEBRAE},
                "memory": self.memory.to_dict() if self.memory is not None else None,
                "backend": self.backend.to_dict() if self.backend is not None else None}

    def summary(self) -> str:
        """One line for the console."""
        on = "" if self.backend is None or self.backend.name == "tensorflow" else f" with Keras's {self.backend.name} backend"
        return (f"{self.kind} ({', '.join(self.names)}){on}, precision {self.precision}, {self.strategy}"
                + (f"; {'; '.join(self.why)}" if self.why else ""))


def no_gpu_reasons() -> list[str]:
    """Why TensorFlow sees no GPU, as far as this machine tells (empty when it sees one)."""
    import tensorflow as tf

    if gpu_devices():
        return []
    reasons = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        reasons.append(f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU")
    if not tf.test.is_built_with_cuda():
        reasons.append(f"this TensorFlow {tf.__version__} build has no CUDA support")
    if Path("/proc/driver/nvidia").exists() or Path("/dev/nvidia0").exists():
        reasons.append("an NVIDIA GPU is present but TensorFlow cannot use it (CUDA/cuDNN libraries missing or not "
                       "matching this TensorFlow; run with --verbose to see TensorFlow's own messages)")
    elif not reasons:
        reasons.append("no NVIDIA GPU in this machine (on Kaggle: notebook Settings > Accelerator > GPU)")
    return reasons


def plan_devices(config: ModelConfig | None = None) -> DevicePlan:
    """Decide where the classifiers run: every visible GPU, else every logical CPU device, one classifier per device
    in turn (no MirroredStrategy: each batch goes to one device only, each model's weights live once).

    Several CPU devices appear only when a program splits the CPU into logical devices (tests do, to stand in for
    two GPUs). On Keras's torch or jax backend (:func:`cspine_submit.score.backends.choose_backend`): every GPU
    that backend sees, else its CPU device(s).
    """
    from cspine_submit.score import backends

    choice = backends.current()
    if choice.name != "tensorflow":
        return _plan_other_backend(config, choice)
    return dataclasses.replace(_plan_tensorflow(config), backend=choice)


def _plan_other_backend(config: ModelConfig | None, choice) -> DevicePlan:
    from cspine_submit.score import backends

    kind, devices, names, fast16 = backends.other_backend_devices(choice.name)
    why = [choice.why]
    policy = "mixed_float16" if config is not None and config.mixed_precision and fast16 else "float32"
    if config is not None and config.mixed_precision and policy == "float32":
        why.append("float32: float16 is slow on a CPU" if kind == "CPU" else
                   "float32: a GPU below compute capability 7.0 (e.g. P100) gains nothing from float16")
    return DevicePlan(kind=kind, devices=tuple(devices), names=tuple(names), precision=policy,
                      strategy=_strategy_text(kind, len(devices)), why=tuple(why), backend=choice)


def _plan_tensorflow(config: ModelConfig | None) -> DevicePlan:
    import tensorflow as tf

    gpus = gpu_devices()
    why: list[str] = []
    if gpus:
        kind = "GPU"
        names = []
        for gpu in gpus:
            details = tf.config.experimental.get_device_details(gpu)
            cc = details.get("compute_capability")
            names.append(f"{details.get('device_name', gpu.name)}" + (f" (compute capability {cc[0]}.{cc[1]})" if cc else ""))
    else:
        kind = "CPU"
        why += [f"no GPU visible to TensorFlow: {r}" for r in no_gpu_reasons()]
    devices = tuple(d.name for d in tf.config.list_logical_devices(kind))
    if kind == "CPU":
        names = [f"{len(devices)} logical CPU device(s) on {os.cpu_count()} cores"]
    policy = "float32" if config is None else precision_policy(config)
    if config is not None:
        if not config.mixed_precision:
            why.append("float32: model_config.json sets mixed_precision false")
        elif policy == "float32":
            why.append("float32: float16 is slow on a CPU" if kind == "CPU" else
                       "float32: a GPU below compute capability 7.0 (e.g. P100) gains nothing from float16")
    return DevicePlan(kind=kind, devices=devices, names=tuple(names), precision=policy,
                      strategy=_strategy_text(kind, len(devices)), why=tuple(why))


def _strategy_text(kind: str, n_devices: int) -> str:
    return ("one device" if n_devices == 1 else
            f"classifiers spread over {n_devices} {kind} devices as the memory plan places them (round-robin by "
            "vertebra, an ensemble's members or a shared network's replicas split), scored concurrently")
