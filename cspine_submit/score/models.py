"""The per-vertebra classifiers: architecture factory, loading every file format, batched compiled scoring.

Architectures (:data:`ARCHITECTURES`, one factory :func:`build_classifier`):

- ``seed``: ResNet50(include_top=False) -> Flatten -> Dense(256, relu) -> Dense(1, sigmoid), the seed notebook's
  network (157,799,681 parameters at 512x512x1);
- ``gap``: ResNet50 -> GlobalAveragePooling -> Dropout(0.3) -> Dense(1, sigmoid) (about 23.6M parameters);
- ``tiny``: a 4-block CNN with the same input/output contract, for tests and the synthetic demo.

Loading (:func:`load_classifiers`): the architecture named by ``model_config.json`` is rebuilt and the weights
are read into it from ``.keras``, Keras-3 ``.h5``, ``.weights.h5`` or Keras-2-era full-model ``.h5`` files (the
seed notebook's ``spine_C1.h5`` ... ``spine_C7.h5``, whose ``Sequential`` holds the whole ResNet50 as one nested
layer; Keras 3 cannot always deserialize their stored configs, nor pair a nested layer's weights, so
:func:`read_h5_layer_weights` reads them per layer and :func:`set_weights_by_layer` copies them bit-exactly into
the rebuilt network). A folder with only those seven files and no
config uses :data:`NOTEBOOK_CONFIG` and says so with a :class:`DefaultConfigWarning`.

Each distinct classifier file is loaded once, and vertebrae whose file lists are the same (a network trained with
``train --shared`` on every vertebra's crops: one image in, one probability out, no vertebra input) share one
model object (:func:`classifier_groups`).

Scoring (:func:`score`): one compiled ``tf.function`` per model, batches padded to a power-of-two size (so a
model is traced at most ``log2(batch_size) + 1`` times), float16 compute on GPUs that benefit when the config
asks. Vertebrae that share a model are scored in one pass over their crops laid end to end (a shared network's
study costs a few full batches, not seven small ones). With several GPUs the models are spread over them
round-robin, one group of vertebrae sharing a model at a time (:meth:`DevicePlan.place`), and the devices score
concurrently; each batch goes to one device only. Crops may arrive as uint16 fixed point (what worker processes
send) and are converted on the device.

TensorFlow / Keras are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cspine_submit.config import CROP_CODE_SCALE, VERTEBRAE, ModelConfig

NOTEBOOK_FILES: dict[str, str] = {v: f"spine_{v}.h5" for v in VERTEBRAE}
"""The seed notebook's classifier file names."""

NOTEBOOK_CONFIG = ModelConfig(
    head="seed",
    input_size=512,
    channels="single",
    windows=((400.0, 1800.0),),
    neighbour_offset=2,
    crop_margin=0.1,
    classifier_files=dict(NOTEBOOK_FILES),
    batch_size=16,
    mixed_precision=True,
    trained_on="competition",
    source=(
        "default config for the seed notebook's spine_C1.h5..spine_C7.h5 (no model_config.json was found): "
        "seed head, 512x512x1 input; the notebook's own intensity scaling is not stored in its files, "
        "a WL 400 / WW 1800 window is assumed - write a model_config.json to change it"
    ),
)
"""Config used for a weights folder that holds only the seed notebook's seven ``.h5`` files."""


class DefaultConfigWarning(UserWarning):
    """A weights folder had no ``model_config.json`` and a documented default was used."""


@dataclass(frozen=True)
class Architecture:
    """One known classifier head.

    Attributes
    ----------
    name : str
    description : str
    build : callable
        ``build(k, input_shape, backbone_weights) -> k.Model`` where ``k`` is the Keras namespace
        (``keras`` or ``tf_keras``).
    resnet50 : bool
        Whether it has a ResNet50 backbone (and so can take ImageNet weights).
    """

    name: str
    description: str
    build: Callable[..., Any]
    resnet50: bool


def _resnet50(k, input_shape, backbone_weights):
    return k.applications.ResNet50(
        include_top=False,
        weights=None if backbone_weights is None else str(backbone_weights),
        input_shape=tuple(input_shape),
    )


def _build_seed(k, input_shape, backbone_weights=None):
    L = k.layers
    base = _resnet50(k, input_shape, backbone_weights)
    x = L.Flatten(name="flatten")(base.output)
    x = L.Dense(256, activation="relu", name="fc256")(x)
    # float32 output keeps the sigmoid exact under a mixed_float16 policy.
    out = L.Dense(1, activation="sigmoid", dtype="float32", name="probability")(x)
    return k.Model(base.input, out, name="seed")


def _build_gap(k, input_shape, backbone_weights=None):
    L = k.layers
    base = _resnet50(k, input_shape, backbone_weights)
    x = L.GlobalAveragePooling2D(name="gap")(base.output)
    x = L.Dropout(0.3, name="dropout")(x)
    out = L.Dense(1, activation="sigmoid", dtype="float32", name="probability")(x)
    return k.Model(base.input, out, name="gap")


def _build_tiny(k, input_shape, backbone_weights=None):
    L = k.layers
    inp = L.Input(shape=tuple(input_shape), name="image")
    x = inp
    for i, filters in enumerate((16, 32, 64, 96)):
        x = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = L.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)  # small data: track statistics quickly
        x = L.Activation("relu", name=f"relu{i}")(x)
        x = L.MaxPooling2D(2, name=f"pool{i}")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dropout(0.2, name="dropout")(x)
    out = L.Dense(1, activation="sigmoid", dtype="float32", name="probability")(x)
    return k.Model(inp, out, name="tiny")


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("seed", "ResNet50 -> Flatten -> Dense(256, relu) -> Dense(1, sigmoid) (the seed notebook)", _build_seed, True),
        Architecture("gap", "ResNet50 -> GlobalAveragePooling -> Dropout(0.3) -> Dense(1, sigmoid)", _build_gap, True),
        Architecture("tiny", "4 x (Conv3x3-BN-ReLU-MaxPool) -> GAP -> Dropout -> Dense(1, sigmoid); tests and demo", _build_tiny, False),
    )
}
"""Known classifier heads, by name."""


def build_classifier(head: str, input_shape, backbone_weights: str | Path | None = None, *, keras_module=None):
    """Build an untrained (or ImageNet-initialised) classifier.

    Parameters
    ----------
    head : str
        A key of :data:`ARCHITECTURES`.
    input_shape : (height, width, channels)
        Model input, channels last.
    backbone_weights : path, optional
        Local ImageNet weights file for the ResNet50 backbone (the ``..._notop.h5`` file); only for ResNet50
        heads and 3-channel inputs. Nothing is ever downloaded.
    keras_module : module, optional
        Keras namespace to build with; default ``keras`` (Keras 3). Passing ``tf_keras`` builds the same
        network as a Keras-2-era model (used to write legacy ``.h5`` files in tests).

    Returns
    -------
    keras.Model
        ``(batch, *input_shape) -> (batch, 1)`` fracture probability.
    """
    if head not in ARCHITECTURES:
        raise ValueError(f"unknown classifier head {head!r}; valid heads: {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[head]
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape {input_shape}: expected (height, width, channels)")
    if backbone_weights is not None:
        if not arch.resnet50:
            raise ValueError(f"head {head!r} has no ResNet50 backbone: backbone_weights cannot be used")
        if input_shape[-1] != 3:
            raise ValueError(
                f"ImageNet backbone weights need a 3-channel input, got {input_shape}; "
                "use channels 'replicate' or 'windows' with three windows"
            )
        path = Path(backbone_weights)
        if str(backbone_weights).lower() == "imagenet":
            raise ValueError("backbone_weights must be a local file path; downloading 'imagenet' is not supported offline")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ImageNet weights file not found")
        backbone_weights = path
    if keras_module is None:
        import keras as keras_module
    return arch.build(keras_module, input_shape, backbone_weights)


# --------------------------------------------------------------------------------------------------------------
# Devices and precision


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
    """

    kind: str
    devices: tuple[str, ...]
    names: tuple[str, ...]
    precision: str
    strategy: str
    why: tuple[str, ...] = ()
    placement: Mapping[str, str] = field(default_factory=dict)

    def device_for(self, vertebra: str) -> str:
        """The device of one vertebra's classifier: round-robin in C1..C7 order (C1, C3, C5, C7 on the first of two)."""
        i = VERTEBRAE.index(vertebra) if vertebra in VERTEBRAE else 0
        return self.devices[i % len(self.devices)]

    def place(self, groups: Sequence[Sequence[str]]) -> dict[str, str]:
        """The device of each vertebra when the vertebrae of a group share one model (:func:`classifier_groups`).

        A group lives on one device (its weights once, its crops scored in one pass); the groups go round-robin over
        the devices in the order given. Seven groups of one vertebra each (one classifier per vertebra) are placed
        as :meth:`device_for` places them; one shared network runs on the first device only, with two GPUs the
        second idles (replicating it would need a split of each study's batches, not done here); C1-C2 sharing one
        network and C3-C7 another put one on each.
        """
        return {v: self.devices[i % len(self.devices)] for i, group in enumerate(groups) for v in group}

    def with_placement(self, models: Mapping[str, Any]) -> "DevicePlan":
        """This plan, recording where the loaded ``models`` (from :func:`load_classifiers`) were placed."""
        import dataclasses

        return dataclasses.replace(self, placement={v: getattr(m, _DEVICE_ATTR, None) for v, m in models.items()})

    def to_dict(self) -> dict:
        return {"kind": self.kind, "devices": list(self.devices), "names": list(self.names),
                "precision": self.precision, "strategy": self.strategy, "why": list(self.why),
                "placement": dict(self.placement) if self.placement else {v: self.device_for(v) for v in VERTEBRAE}}

    def summary(self) -> str:
        """One line for the console."""
        return (f"{self.kind} ({', '.join(self.names)}), precision {self.precision}, {self.strategy}"
                + (f"; {'; '.join(self.why)}" if self.why else ""))


def no_gpu_reasons() -> list[str]:
    """Why TensorFlow sees no GPU, as far as this machine tells (empty when it sees one)."""
    import os

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
    two GPUs).
    """
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
        import os

        names = [f"{len(devices)} logical CPU device(s) on {os.cpu_count()} cores"]
    policy = "float32" if config is None else precision_policy(config)
    if config is not None:
        if not config.mixed_precision:
            why.append("float32: model_config.json sets mixed_precision false")
        elif policy == "float32":
            why.append("float32: float16 is slow on a CPU" if kind == "CPU" else
                       "float32: a GPU below compute capability 7.0 (e.g. P100) gains nothing from float16")
    strategy = ("one device" if len(devices) == 1 else
                f"classifiers round-robin over {len(devices)} {kind} devices by vertebra (vertebrae sharing one "
                "network on one device), scored concurrently")
    return DevicePlan(kind=kind, devices=devices, names=tuple(names), precision=policy, strategy=strategy, why=tuple(why))


# --------------------------------------------------------------------------------------------------------------
# Loading


def inspect_model_file(path: str | Path) -> dict:
    """What a classifier file says about itself, without building it.

    Returns
    -------
    dict
        ``format`` (``keras``, ``h5-keras2``, ``h5-keras3``, ``weights-h5``), ``keras_version`` (str or None),
        ``input_shape`` (tuple or None, without the batch axis), ``head`` (guessed from the stored layers:
        ``seed``, ``gap``, ``tiny`` or None).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a readable ``.keras`` (zip) or HDF5 file; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: classifier file not found")
    name = path.name.lower()
    info: dict[str, Any] = {"format": None, "keras_version": None, "input_shape": None, "head": None}
    model_config = None
    if name.endswith(".keras"):
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: not a valid .keras file (not a zip archive; truncated or corrupt?)")
        try:
            with zipfile.ZipFile(path) as zf:
                model_config = json.loads(zf.read("config.json"))
                meta = json.loads(zf.read("metadata.json")) if "metadata.json" in zf.namelist() else {}
        except (KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: corrupt .keras file ({exc})") from exc
        info.update(format="keras", keras_version=meta.get("keras_version"))
    elif name.endswith(".h5") or name.endswith(".hdf5"):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                attrs = {k: f.attrs[k] for k in f.attrs}
        except OSError as exc:
            raise ValueError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {exc}") from exc
        version = attrs.get("keras_version")
        version = version.decode() if isinstance(version, bytes) else version
        info["keras_version"] = version
        if "model_config" in attrs:
            raw = attrs["model_config"]
            model_config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            info["format"] = "h5-keras2" if str(version or "").startswith("2") else "h5-keras3"
        else:
            info["format"] = "weights-h5"
    else:
        raise ValueError(f"{path}: unknown classifier file type (expected .keras, .h5 or .weights.h5)")
    if model_config is not None:
        info["input_shape"], info["head"] = _describe_config(model_config)
    return info


def _config_layers(model_config: dict) -> list[dict]:
    """Every layer entry of a stored model config, nested models (a Functional inside a Sequential) included."""
    out = []
    for layer in (model_config.get("config") or {}).get("layers") or []:
        out.append(layer)
        if isinstance(layer.get("config"), dict) and "layers" in layer["config"]:
            out += _config_layers(layer)
    return out


def _stored_input_shape(model_config: dict, layers: list[dict]) -> tuple[int, ...] | None:
    """The input shape (without the batch axis) a stored config declares, wherever that Keras version put it."""
    candidates = [layer.get("config", {}) for layer in layers if layer.get("class_name") == "InputLayer"]
    top = (model_config.get("config") or {}).get("layers") or []
    if top:  # older Keras-2 Sequentials store the shape on their first layer instead of an InputLayer
        candidates.append(top[0].get("config", {}))
    candidates.append({"batch_input_shape": (model_config.get("config") or {}).get("build_input_shape")})
    for cfg in candidates:
        s = cfg.get("batch_input_shape") or cfg.get("batch_shape")
        if s and len(s) > 1 and all(v is not None for v in s[1:]):
            return tuple(int(v) for v in s[1:])
    return None


def _describe_config(model_config: dict) -> tuple[tuple[int, ...] | None, str | None]:
    layers = _config_layers(model_config)
    shape = _stored_input_shape(model_config, layers)
    classes = [layer.get("class_name") for layer in layers]
    names = {layer.get("name") or layer.get("config", {}).get("name") for layer in layers}
    resnet = "conv5_block3_out" in names
    head = None
    if resnet and "Flatten" in classes:
        head = "seed"
    elif resnet and "GlobalAveragePooling2D" in classes:
        head = "gap"
    elif {"conv0", "bn3", "probability"} <= names:
        head = "tiny"
    return shape, head


def notebook_config(weights_dir: str | Path) -> ModelConfig:
    """:data:`NOTEBOOK_CONFIG`, with the input size/channels read from ``spine_C1.h5`` when it stores them."""
    path = Path(weights_dir) / NOTEBOOK_FILES["C1"]
    info = inspect_model_file(path)
    config = NOTEBOOK_CONFIG
    shape = info["input_shape"]
    if shape and len(shape) == 3:
        if shape[0] != shape[1] or shape[2] not in (1, 3):
            raise ValueError(f"{path}: its model takes input {tuple(shape)}; without a model_config.json only square "
                             "inputs with 1 or 3 channels can be fed (write a model_config.json for this network)")
        config = config.replace(input_size=int(shape[0]), channels="single" if shape[2] == 1 else "replicate")
    if info["head"] in ("seed", "gap"):
        config = config.replace(head=info["head"])
    return config


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_h5_layer_weights(path: str | Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The weights a Keras-2-era ``.h5`` stores, per layer, nested models flattened.

    A Keras-2 full-model file keeps one HDF5 group per top-level layer. A nested model (the seed notebook's
    ``resnet50 (Functional)`` inside its ``Sequential``) is ONE such group holding all its sub-layers' weights, named
    ``<sub-layer>/<variable>:0``; a flat model has one group per layer, named the same way. Splitting every group
    by the sub-layer part of the weight names gives the same list for both layouts.

    Returns
    -------
    list of (layer name, {variable name: ndarray})
        Weight-bearing layers in the order their first weight is stored; variable names without ``:0``
        (``kernel``, ``bias``, ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``).
    """
    import h5py

    layers: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        for group_name in (_decode(n) for n in root.attrs.get("layer_names", [])):
            group = root[group_name]
            for weight_name in (_decode(n) for n in group.attrs.get("weight_names", [])):
                parts = weight_name.split("/")
                layer = parts[-2] if len(parts) > 1 else group_name
                layers.setdefault(layer, {})[parts[-1].split(":")[0]] = np.asarray(group[weight_name])
    return list(layers.items())


def _weighted_layers(model) -> list:
    """Layers that own weights, nested models flattened, in model order."""
    out = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            out += _weighted_layers(layer)
        elif layer.weights:
            out.append(layer)
    return out


def set_weights_by_layer(model, stored: list[tuple[str, dict[str, np.ndarray]]], source: str = "file") -> None:
    """Copy ``stored`` (from :func:`read_h5_layer_weights`) into ``model``, layer by layer, exactly.

    Layers are paired by name first (every ResNet50 layer keeps its Keras name), and the rest in order (the head:
    the seed notebook's ``dense``, ``dense_1`` are this package's ``fc256``, ``probability``). Within a layer,
    variables are paired by name.

    Raises
    ------
    ValueError
        The layer counts, variable names or shapes differ; the message names ``source`` and the first mismatch.
    """
    targets = _weighted_layers(model)
    if len(targets) != len(stored):
        raise ValueError(f"{source}: {len(stored)} layers with weights, the rebuilt network has {len(targets)}")
    by_name = dict(stored)
    target_names = {t.name for t in targets}
    rest = iter([(n, w) for n, w in stored if n not in target_names])
    for layer in targets:
        name, values = (layer.name, by_name[layer.name]) if layer.name in by_name else next(rest)
        wanted = [w.name.split("/")[-1].split(":")[0] for w in layer.weights]
        if sorted(wanted) != sorted(values):
            raise ValueError(f"{source}: layer {name!r} stores {sorted(values)}, {layer.name!r} needs {sorted(wanted)}")
        arrays = [values[w] for w in wanted]
        for var, arr, w in zip(layer.weights, arrays, wanted):
            if tuple(var.shape) != arr.shape:
                raise ValueError(f"{source}: layer {name!r} {w} has shape {arr.shape}, {layer.name!r} needs "
                                 f"{tuple(var.shape)}")
        layer.set_weights(arrays)


def load_classifier(path: str | Path, config: ModelConfig):
    """Load one classifier file as the architecture ``config`` names.

    The network is rebuilt from :data:`ARCHITECTURES` (under the config's precision policy) and the file's
    weights are read into it; this reads ``.keras``, Keras-3 ``.h5``, ``.weights.h5`` and Keras-2-era
    full-model ``.h5`` alike (the latter flat or with the ResNet50 nested as one layer, as the seed notebook saved
    it; its input size is the one stored in the file). A head outside the table falls back to ``keras.models.load_model``.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file is corrupt, or its network does not match the config; the message names the file.
    """
    import keras

    path = Path(path)
    info = inspect_model_file(path)  # FileNotFoundError / ValueError naming the file
    if config.head not in ARCHITECTURES:
        try:
            return keras.models.load_model(path, compile=False)
        except Exception as exc:  # noqa: BLE001 - any Keras failure becomes one clear message
            raise ValueError(f"{path}: cannot load head {config.head!r} (not in {sorted(ARCHITECTURES)}): {exc}") from exc
    stored = info["input_shape"]
    if stored is not None and tuple(stored) != tuple(config.input_shape):
        raise ValueError(
            f"{path}: the file's model takes input {tuple(stored)}, but model_config.json says {config.input_shape}"
        )
    if info["head"] is not None and info["head"] != config.head:
        raise ValueError(f"{path}: the file holds a {info['head']!r} classifier, but model_config.json says {config.head!r}")
    model = build_classifier(config.head, config.input_shape)
    try:
        if info["format"] == "h5-keras2":
            # Keras 3's load_weights pairs top-level layers only: the seed's nested resnet50 (one layer holding 106)
            # fails it. Read the stored layers, nested or flat, and copy them in by name.
            set_weights_by_layer(model, read_h5_layer_weights(path), str(path))
        else:
            with warnings.catch_warnings():
                # Keras warns about optimizer variables it skips; treat any real mismatch as the error below.
                warnings.simplefilter("ignore")
                model.load_weights(path)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(
            f"{path}: could not load its weights into a {config.head!r} classifier with input {config.input_shape}: {exc}"
        ) from exc
    return model


def classifier_groups(weights_dir: str | Path, config: ModelConfig, vertebrae=VERTEBRAE) -> list[tuple[tuple[Path, ...], tuple[str, ...]]]:
    """Vertebrae whose classifiers are the same files, so the same computation.

    A network trained with ``train --shared`` takes one crop and returns one probability, whatever the vertebra
    (there is no vertebra input and no per-vertebra output), so vertebrae listing the same files, in the same order,
    can share one loaded model. Files are compared by resolved path (a symlink is the file it points to).

    Returns
    -------
    list of (files, vertebrae)
        ``files``: the resolved paths of one classifier (several: an ensemble); ``vertebrae``: those using it, in
        the order of ``vertebrae``. Groups are in the order of their first vertebra.
    """
    weights_dir = Path(weights_dir)
    groups: dict[tuple[Path, ...], list[str]] = {}
    for v in vertebrae:
        key = tuple((weights_dir / name).resolve() for name in config.classifier_paths(v))
        groups.setdefault(key, []).append(v)
    return [(files, tuple(vs)) for files, vs in groups.items()]


def load_classifiers(weights_dir: str | Path, vertebrae=VERTEBRAE, *, failures: dict | None = None):
    """Load the config and the per-vertebra classifiers of a weights folder.

    Each distinct file is read once, and vertebrae with the same list of files share one model object
    (:func:`classifier_groups`): the demo's shared network, five fold files listed for all seven vertebrae, is five
    loads and one ensemble, not 35 loads and seven ensembles.

    Parameters
    ----------
    weights_dir : path
        Holds ``model_config.json`` and the files its ``classifier_files`` name, or only the seed notebook's
        ``spine_C1.h5`` ... ``spine_C7.h5`` (then :func:`notebook_config` is used and a
        :class:`DefaultConfigWarning` is issued; ``config.source`` says so too).
    vertebrae : iterable of str
        Which classifiers to load (default all seven).
    failures : dict, optional
        When given, a classifier file that is missing, corrupt or does not match the config does not raise: each
        vertebra using it is left out of ``models`` and recorded here as ``{vertebra: exception}`` (the
        exception names the file). A missing folder or config still raises.

    Returns
    -------
    config : ModelConfig
    models : {vertebra: keras.Model}
        Built under the config's precision policy; each group of vertebrae sharing a model on one device of
        :func:`plan_devices`, the groups round-robin over the devices (:meth:`DevicePlan.place`).

    Raises
    ------
    FileNotFoundError
        The folder, its config or a classifier file is missing (the message names it).
    ValueError
        A file is corrupt or does not match the config (the message names it).
    """
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise FileNotFoundError(f"{weights_dir}: weights folder not found")
    config_path = weights_dir / "model_config.json"
    if config_path.is_file():
        config = ModelConfig.from_json(config_path)
    elif all((weights_dir / f).is_file() for f in NOTEBOOK_FILES.values()):
        config = notebook_config(weights_dir)
        warnings.warn(f"{weights_dir}: no model_config.json; using the seed notebook default: {config.source}", DefaultConfigWarning, stacklevel=2)
    else:
        raise FileNotFoundError(
            f"{config_path}: no such file (and the folder does not hold the seed notebook's "
            f"{', '.join(NOTEBOOK_FILES.values())} either)"
        )
    vertebrae = list(vertebrae)
    missing = [v for v in vertebrae if v not in config.classifier_files]
    if missing:
        raise ValueError(f"{config_path}: classifier_files lacks {missing}")
    import tensorflow as tf

    placement = plan_devices(config)
    groups = classifier_groups(weights_dir, config, vertebrae)
    device_of = placement.place([vs for _files, vs in groups])
    # resolved path -> model (or the exception it raised), within this call. A file in two different lists keeps
    # its weights on the device of the first group that loaded it; TensorFlow copies them if the second's differs.
    loaded: dict[Path, Any] = {}
    models = {}
    with dtype_policy(placement.precision):
        for files, group in groups:
            device = device_of[group[0]]
            try:
                with tf.device(device):  # the weights are created there, once
                    members = []
                    for path in files:
                        if path not in loaded:
                            try:
                                loaded[path] = load_classifier(path, config)
                            except (FileNotFoundError, ValueError, OSError) as exc:
                                loaded[path] = exc
                        if isinstance(loaded[path], BaseException):
                            raise loaded[path]
                        members.append(loaded[path])
                    model = members[0] if len(members) == 1 else average_classifiers(members, config.input_shape,
                                                                                      "_".join(group))
            except (FileNotFoundError, ValueError, OSError) as exc:
                if failures is None:
                    raise
                failures.update({v: exc for v in group})
                continue
            object.__setattr__(model, _DEVICE_ATTR, device)
            models.update({v: model for v in group})
    return config, {v: models[v] for v in vertebrae if v in models}


def average_classifiers(members, input_shape, name: str = "ensemble"):
    """One model whose output is the mean probability of ``members`` (an ensemble, e.g. the fold models).

    One graph, so a batch of crops goes through every member in one call (no per-member Python loop).

    Parameters
    ----------
    members : list of keras.Model
        Each maps ``(n, *input_shape)`` to ``(n, 1)`` probabilities.
    input_shape : (S, S, C)
    """
    import keras

    x = keras.Input(shape=tuple(input_shape))
    for i, m in enumerate(members):  # each member is one nested layer: names must be unique in the graph
        m.name = f"{name}_member{i}"
    outs = [keras.layers.Activation("linear", dtype="float32")(m(x)) for m in members]
    return keras.Model(x, keras.layers.Average(dtype="float32")(outs), name=f"{name}_mean_of_{len(members)}")


def is_default_config(config: ModelConfig) -> bool:
    """True when ``config`` came from :data:`NOTEBOOK_CONFIG` (no model_config.json in the weights folder)."""
    return config.source == NOTEBOOK_CONFIG.source


def save_classifier(model, path: str | Path) -> Path:
    """Save a classifier as ``.keras`` or ``.h5`` (by suffix), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".keras" if path.name.endswith(".keras") else ".h5"
    tmp = path.with_name(path.name + ".tmp" + suffix)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras calls .h5 "legacy"; we write it only when asked
        model.save(tmp)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------------------
# Scoring

_DEVICE_ATTR = "_cspine_device"
"""Attribute under which a loaded model keeps the device it was placed on (None: TensorFlow's default)."""

_PREDICT_FN_ATTR = "_cspine_predict_fn"
"""Attribute under which a model keeps its compiled inference function. On the model itself, not in a
module-level cache: the function refers to the model, so a cache keyed by the model would keep every model ever
scored alive; as an attribute, model and function form a cycle that the garbage collector frees together."""


def _bucket(n: int, batch_size: int) -> int:
    """Smallest power of two >= n, capped at batch_size (fixed shapes -> few traces, < 2x padding)."""
    b = 1
    while b < n:
        b *= 2
    return min(b, batch_size)


class _OwnTracesFilter:
    """Drop TensorFlow's "N out of the last N calls ... triggered tf.function retracing" for our functions: there is
    one compiled function per classifier (seven models -> seven traces), which TF's heuristic mistakes for retracing."""

    def filter(self, record) -> bool:
        msg = record.getMessage()
        return not ("_predict_fn.<locals>" in msg and "retracing" in msg)


_FILTER_INSTALLED = False


def _predict_fn(model):
    """A compiled inference function for ``model``, cached on it; runs on the model's device.

    It takes float32 crops, or uint16 ones in the fixed-point code of :func:`cspine_submit.score.crop.encode_crops`
    (what worker processes send): those are converted on the device, so half the bytes also cross to the GPU.
    """
    global _FILTER_INSTALLED
    fn = getattr(model, _PREDICT_FN_ATTR, None)
    if fn is not None:
        return fn
    import logging

    import tensorflow as tf

    if not _FILTER_INSTALLED:
        logging.getLogger("tensorflow").addFilter(_OwnTracesFilter())
        _FILTER_INSTALLED = True
    device = getattr(model, _DEVICE_ATTR, None)
    scale = 1.0 / CROP_CODE_SCALE  # the same float32 product as crop.decode_crops

    @tf.function
    def fn(x):
        with tf.device(device):
            if x.dtype == tf.uint16:
                x = tf.cast(x, tf.float32) * scale
            return model(x, training=False)

    # object.__setattr__: Keras layers track attributes they are given; a plain function must stay untracked.
    object.__setattr__(model, _PREDICT_FN_ATTR, fn)
    return fn


def _batches(arrays: Sequence[np.ndarray], batch_size: int):
    """Batches of ``batch_size`` rows over ``arrays`` laid end to end, the last one zero-padded to :func:`_bucket`.

    Yields ``(batch, n)`` with ``n`` the real rows. A batch inside one array is a view; only one that spans two
    arrays or needs padding is copied (laying the arrays end to end first would copy every crop once more).
    """
    total = sum(a.shape[0] for a in arrays)
    i, offset = 0, 0  # current array, row within it
    for start in range(0, total, batch_size):
        n = min(batch_size, total - start)
        size = _bucket(n, batch_size)
        while arrays[i].shape[0] == offset:
            i, offset = i + 1, 0
        if size == n and arrays[i].shape[0] - offset >= n:
            yield arrays[i][offset : offset + n], n
            offset += n
            continue
        batch = np.zeros((size,) + arrays[i].shape[1:], arrays[i].dtype)
        filled = 0
        while filled < n:
            while arrays[i].shape[0] == offset:
                i, offset = i + 1, 0
            take = min(n - filled, arrays[i].shape[0] - offset)
            batch[filled : filled + take] = arrays[i][offset : offset + take]
            filled, offset = filled + take, offset + take
        yield batch, n


def _as_model_input(crops) -> np.ndarray:
    crops = np.asarray(crops)
    return crops if crops.dtype == np.uint16 else crops.astype(np.float32, copy=False)


def _predict_arrays(model, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """Probabilities of the crops of ``arrays`` (all uint16, or all float32) laid end to end, shape ``(sum k,)``."""
    arrays = [a for a in arrays if a.shape[0]]
    k = sum(a.shape[0] for a in arrays)
    if k == 0:
        return np.zeros((0,), dtype=np.float32)
    fn = _predict_fn(model)
    out = np.empty((k,), dtype=np.float32)
    start = 0
    for batch, n in _batches(arrays, max(int(batch_size), 1)):
        out[start : start + n] = np.asarray(fn(batch), dtype=np.float32).reshape(-1)[:n]
        start += n
    return out


def predict(model, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Fracture probability of each crop with one compiled model.

    Parameters
    ----------
    crops : (k, S, S, C) ndarray of float32 in [0, 1], or of uint16 (:func:`cspine_submit.score.crop.encode_crops`)
    batch_size : int
        Crops per forward pass; the last batch is zero-padded to a power of two so that the compiled function
        sees few distinct shapes.

    Returns
    -------
    (k,) ndarray of float32
    """
    return _predict_arrays(model, [_as_model_input(crops)], batch_size)


def score(models: Mapping[str, Any], crops_by_vertebra: Mapping[str, np.ndarray], batch_size: int = 32) -> dict[str, np.ndarray]:
    """Score each vertebra's crops with that vertebra's classifier.

    Vertebrae that share one model (:func:`load_classifiers` gives vertebrae with the same files the same object)
    are scored in one pass over their crops laid end to end, in batches of ``batch_size``, and the probabilities
    split back per vertebra: the same numbers as scoring each vertebra alone (up to float rounding of the batch
    size), in a few full batches instead of one small batch per vertebra. Each crop's probability depends on that
    crop only (inference: BatchNormalization uses its stored statistics), so mixing vertebrae in a batch is exact.

    Parameters
    ----------
    models : {vertebra: keras.Model}
        From :func:`load_classifiers`.
    crops_by_vertebra : {vertebra: (k, S, S, C) ndarray}
        From :func:`cspine_submit.score.crop.prepare_crops`, float32 or uint16 (:func:`cspine_submit.score.crop.encode_crops`);
        ``k`` may be 0.
    batch_size : int
        Crops per forward pass (``ModelConfig.batch_size`` or the CLI's).

    Returns
    -------
    {vertebra: (k,) ndarray of float32}
        Probabilities in the order of the crops, in the order of ``crops_by_vertebra``.
    """
    missing = [v for v in crops_by_vertebra if v not in models]
    if missing:
        raise ValueError(f"no classifier loaded for {missing}; loaded: {sorted(models)}")
    crops = {v: _as_model_input(c) for v, c in crops_by_vertebra.items()}
    # One pass per (model, crop encoding): uint16 codes and float32 values cannot share a batch.
    passes: dict[tuple[int, bool], list[str]] = {}
    for v, c in crops.items():
        if c.shape[0]:
            passes.setdefault((id(models[v]), c.dtype == np.uint16), []).append(v)
    by_device: dict[Any, list[list[str]]] = {}
    for vs in passes.values():
        by_device.setdefault(getattr(models[vs[0]], _DEVICE_ATTR, None), []).append(vs)

    def run(groups) -> dict[str, np.ndarray]:
        got = {}
        for vs in groups:
            probs = _predict_arrays(models[vs[0]], [crops[v] for v in vs], batch_size)
            ends = np.cumsum([crops[v].shape[0] for v in vs])
            got.update(zip(vs, np.split(probs, ends[:-1])))
        return got

    out: dict[str, np.ndarray] = {}
    if len(by_device) <= 1:
        out.update(run([vs for groups in by_device.values() for vs in groups]))
    else:
        # One thread per device: a call blocks until its device is done, so the devices only overlap this way.
        # Daemon threads: one stuck on a wedged device must not keep the process from exiting (pool workers are
        # joined at exit).
        import threading

        errors: list[BaseException] = []

        def work(groups) -> None:
            try:
                out.update(run(groups))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(gs,), name="score", daemon=True) for gs in by_device.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    empty = np.zeros((0,), dtype=np.float32)
    return {v: out[v] if v in out else empty.copy() for v in crops_by_vertebra}
