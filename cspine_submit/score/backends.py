"""Which Keras backend scores the classifiers: TensorFlow (the default, and the training backend), PyTorch or JAX.

Kaggle images have shipped TensorFlow builds that cannot use the GPU while PyTorch can (CUDA/cuDNN mismatches); the
classifiers are Keras 3 models, so any backend can run them. Keras picks its backend once, when ``keras`` is first
imported (the ``KERAS_BACKEND`` environment variable), so :func:`choose_backend` must run before anything imports
Keras; it sets the variable, and says what it chose and why (:class:`BackendChoice`, which also goes in the run
report's ``devices``). ``auto`` keeps TensorFlow when TensorFlow sees a GPU, else takes a backend that does, else
TensorFlow on the CPU (or whichever backend is installed).

Every backend places the classifiers on all the devices it sees, as the memory plan says (``tf.device`` on
TensorFlow, ``keras.device`` on torch and jax: the weights are created on the device and each call runs there,
devices concurrently from one thread each). TensorFlow compiles the uint16 conversion into its graph; torch and
jax score through Keras's own compiled ``predict_on_batch`` (jax: XLA-jitted; torch: eager under ``no_grad``),
the conversion done on the host. Only TensorFlow can keep weights in host memory and copy them to the device per
call (the memory plan's "in turn").
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("tensorflow", "torch", "jax")
"""Keras backends that can score the classifiers."""

_MODULES = {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}


@dataclass(frozen=True)
class BackendChoice:
    """The Keras backend of this process and why.

    Attributes
    ----------
    name : one of :data:`BACKENDS`
    requested : str
        What was asked (``auto`` or a name).
    why : str
        One sentence for the log and the report.
    gpu : bool or None
        Whether the chosen backend sees a GPU (None: not probed).
    """

    name: str
    requested: str
    why: str
    gpu: bool | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "requested": self.requested, "why": self.why, "gpu": self.gpu}

    def line(self) -> str:
        return f"Keras backend: {self.name} ({self.why})"


_CHOSEN: BackendChoice | None = None


def installed(name: str) -> bool:
    """Whether the backend's package can be imported (without importing it)."""
    return importlib.util.find_spec(_MODULES[name]) is not None


def sees_gpu(name: str) -> bool:
    """Whether backend ``name`` (installed) sees a GPU; imports it."""
    if name == "tensorflow":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if name == "torch":
        import torch

        return bool(torch.cuda.is_available())
    import jax

    return jax.default_backend() == "gpu"


def _keras_backend_loaded() -> str | None:
    if "keras" not in sys.modules:
        return None
    import keras

    return keras.backend.backend()


def choose_backend(requested: str = "auto") -> BackendChoice:
    """Choose the Keras backend and set ``KERAS_BACKEND`` for this process (and its children), before Keras loads.

    Parameters
    ----------
    requested : "auto" or one of :data:`BACKENDS`
        ``auto``: ``KERAS_BACKEND`` when the environment sets it; else TensorFlow when it sees a GPU; else the first
        of torch, jax that sees one; else TensorFlow on the CPU (or the first backend installed).

    Raises
    ------
    ValueError
        An unknown name, or a backend that is not installed (the message says which are).
    RuntimeError
        Keras is already imported with another backend (it cannot switch; start a new process).
    """
    global _CHOSEN
    if requested not in ("auto", *BACKENDS):
        raise ValueError(f"--backend {requested!r}: expected auto or one of {list(BACKENDS)}")
    have = [b for b in BACKENDS if installed(b)]
    loaded = _keras_backend_loaded()
    if loaded is not None:
        if requested not in ("auto", loaded):
            raise RuntimeError(f"--backend {requested}: Keras is already imported with the {loaded} backend in this "
                               "process and cannot switch (choose the backend before Keras loads)")
        choice = BackendChoice(loaded, requested, "Keras was already imported with this backend")
    elif requested != "auto":
        if requested not in have:
            raise ValueError(f"--backend {requested}: {_MODULES[requested]} is not installed (installed: {have or 'none'})")
        choice = BackendChoice(requested, requested, "asked for with --backend")
    else:
        choice = _auto(have)
    os.environ["KERAS_BACKEND"] = choice.name
    _CHOSEN = choice
    return choice


def _auto(have: list[str]) -> BackendChoice:
    env = os.environ.get("KERAS_BACKEND")
    if env:
        if env not in have:
            raise ValueError(f"KERAS_BACKEND={env!r} in the environment, but it is not an installed backend ({have})")
        return BackendChoice(env, "auto", f"KERAS_BACKEND={env} in the environment")
    if not have:
        raise ValueError(f"no Keras backend installed: install one of {list(BACKENDS)}")
    if "tensorflow" in have and sees_gpu("tensorflow"):
        return BackendChoice("tensorflow", "auto", "TensorFlow sees a GPU", True)
    # Without an NVIDIA device node no backend can see a GPU: skip importing torch and jax just to hear "no".
    nvidia = Path("/proc/driver/nvidia").exists() or Path("/dev/nvidia0").exists()
    for other in ("torch", "jax") if nvidia else ():
        if other in have and sees_gpu(other):
            why = (f"TensorFlow sees no GPU, {other} does" if "tensorflow" in have
                   else f"TensorFlow is not installed, {other} sees a GPU")
            return BackendChoice(other, "auto", why, True)
    name = "tensorflow" if "tensorflow" in have else have[0]
    return BackendChoice(name, "auto", f"no installed backend ({', '.join(have)}) sees a GPU: {name} on the CPU", False)


def current() -> BackendChoice:
    """The backend this process scores with: the one :func:`choose_backend` chose, else Keras's (importing it)."""
    if _CHOSEN is not None:
        return _CHOSEN
    import keras

    return BackendChoice(keras.backend.backend(), "default", "Keras's backend (KERAS_BACKEND or its default)")


def other_backend_devices(name: str) -> tuple[str, list[str], list[str], bool]:
    """``(kind, device labels, names, fast float16)`` for a torch or jax backend: every GPU it sees, else its CPU.

    Labels: torch ``cuda:0``, ``cuda:1`` ... or ``cpu``; jax ``jax:gpu:0`` ... or ``jax:cpu:0`` (several CPU
    devices only where ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` splits the host, as tests do).
    :func:`keras_device` turns a label into the name ``keras.device`` takes. Fast float16: every GPU has compute
    capability >= 7.0.
    """
    if name == "torch":
        import torch

        if torch.cuda.is_available():
            labels, names, fast16 = [], [], True
            for i in range(torch.cuda.device_count()):
                cc = torch.cuda.get_device_capability(i)
                labels.append(f"cuda:{i}")
                names.append(f"{torch.cuda.get_device_name(i)} (compute capability {cc[0]}.{cc[1]})")
                fast16 = fast16 and tuple(cc) >= (7, 0)
            return "GPU", labels, names, fast16
        return "CPU", ["cpu"], [f"torch CPU on {os.cpu_count()} cores"], False
    import jax

    devices = jax.devices()
    if devices[0].platform == "gpu":
        labels, names, fast16 = [], [], True
        for dev in devices:
            cc = str(getattr(dev, "compute_capability", "0.0"))
            labels.append(f"jax:gpu:{dev.id}")
            names.append(f"{dev.device_kind} (compute capability {cc})")
            fast16 = fast16 and tuple(int(p) for p in cc.split(".")[:2]) >= (7, 0)
        return "GPU", labels, names, fast16
    return ("CPU", [f"jax:{d.platform}:{d.id}" for d in devices],
            [f"jax CPU on {os.cpu_count()} cores" + (f" ({len(devices)} devices)" if len(devices) > 1 else "")], False)


def keras_device(label: str) -> str:
    """The ``keras.device`` name of a device label of :func:`other_backend_devices` (``jax:gpu:1`` -> ``gpu:1``,
    ``cuda:1`` and ``cpu`` unchanged)."""
    return label[len("jax:"):] if label.startswith("jax:") else label


def other_backend_gpu_memory(name: str, index: int = 0) -> tuple[int | None, str]:
    """Bytes the torch or jax backend may use on its GPU number ``index``, and where that comes from (None:
    unknown)."""
    try:
        if name == "torch":
            import torch

            total = int(torch.cuda.get_device_properties(index).total_memory)
            return total - 1024**3, "torch: the GPU's total memory less 1 GiB for the CUDA context"
        import jax

        stats = jax.devices()[index].memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]), "jax: XLA's allocator limit (XLA_PYTHON_CLIENT_MEM_FRACTION)"
    except Exception:  # noqa: BLE001 - the documented defaults then
        pass
    return None, ""
