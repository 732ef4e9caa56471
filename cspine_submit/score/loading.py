"""Loading the per-vertebra classifiers from every file format, and saving them.

The architecture named by ``model_config.json`` is rebuilt (:mod:`cspine_submit.score.architectures`) and the
weights are read into it from ``.keras``, Keras-3 ``.h5``, ``.weights.h5`` or Keras-2-era full-model ``.h5`` files
(the seed notebook's ``spine_C1.h5`` ... ``spine_C7.h5``, whose ``Sequential`` holds the whole ResNet50 as one
nested layer; Keras 3 cannot always deserialize their stored configs, nor pair a nested layer's weights, so
:func:`read_h5_layer_weights` reads them per layer and :func:`set_weights_by_layer` copies them bit-exactly into the
rebuilt network). A folder with only those seven files and no config uses :data:`NOTEBOOK_CONFIG` and says so with
a :class:`DefaultConfigWarning`.

Each distinct classifier file is loaded once, and vertebrae whose file lists are the same (a network trained with
``train --shared`` on every vertebra's crops: one image in, one probability out, no vertebra input) share one model
object (:func:`classifier_groups`), placed on one device of :func:`cspine_submit.score.devices.plan_devices`.

TensorFlow / Keras / h5py are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import json
import sys
import warnings
import zipfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from cspine_submit.config import METRIC_PRIORS_SOURCE, VERTEBRAE, ModelConfig
from cspine_submit.score.architectures import ARCHITECTURES, build_classifier
from cspine_submit.score.devices import DEVICE_ATTR, MEMORY_PLAN_ATTR, dtype_policy, plan_devices
from cspine_submit.score.memory import DeviceOutOfMemoryError, GroupPlacement, plan_for_devices, require_fit
from cspine_submit.score.prediction import Spread

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
        "a WL 400 / WW 1800 window is assumed - write a model_config.json to change it; priors: the "
        "metric-minimising constants, " + METRIC_PRIORS_SOURCE
    ),
)
"""Config used for a weights folder that holds only the seed notebook's seven ``.h5`` files."""


class DefaultConfigWarning(UserWarning):
    """A weights folder had no ``model_config.json`` and a documented default was used."""


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
    config = read_weights_config(weights_dir, _stacklevel=3)
    vertebrae = list(vertebrae)
    missing = [v for v in vertebrae if v not in config.classifier_files]
    if missing:
        raise ValueError(f"{weights_dir / 'model_config.json'}: classifier_files lacks {missing}")
    device_plan = plan_devices(config)
    groups = classifier_groups(weights_dir, config, vertebrae)
    memory = _memory_plan(config, device_plan, groups)
    placements = _placements(memory, device_plan, groups)
    if memory is not None and memory.batch_size < config.batch_size:
        config = config.replace(batch_size=memory.batch_size)
    # (resolved path, device) -> model (or the exception it raised), within this call: a file is read once per
    # device it is placed on.
    loaded: dict[tuple[Path, Any], Any] = {}
    models = {}
    with dtype_policy(device_plan.precision):
        for (files, group), where in zip(groups, placements):
            try:
                model = _load_placed(files, group, config, where=where, loaded=loaded)
            except _LOAD_ERRORS as exc:
                if failures is None:
                    raise
                failures.update({v: exc for v in group})
                continue
            object.__setattr__(model, MEMORY_PLAN_ATTR, memory)
            models.update({v: model for v in group})
    return config, {v: models[v] for v in vertebrae if v in models}


def _memory_plan(config: ModelConfig, device_plan, groups):
    """Step 2 of :func:`load_classifiers`: the memory plan on ``device_plan``'s devices, refused
    (:class:`~cspine_submit.score.memory.MemoryPlanError`) before anything loads when nothing fits; None for a head
    the planner cannot count (loaded with Keras' own loader, placed whole round-robin)."""
    try:
        plan = plan_for_devices(config, device_plan, groups=[(tuple(map(str, f)), vs) for f, vs in groups])
    except ValueError:
        return None
    return require_fit(plan)


def _placements(memory, device_plan, groups) -> list[GroupPlacement]:
    if memory is not None:
        return list(memory.groups)
    device_of = device_plan.place([vs for _files, vs in groups])
    return [GroupPlacement(vs, tuple(map(str, files)), "whole", (device_of[vs[0]],)) for files, vs in groups]


def _load_placed(files, group, config: ModelConfig, *, where: GroupPlacement, loaded: dict):
    """Step 3 of :func:`load_classifiers`: one group's network as ``where`` places it: a Keras model on one device
    (several files: one graph averaging them), or a :class:`~cspine_submit.score.prediction.Spread` of replicas or
    members over several."""
    if where.mode == "whole":
        return _load_group(files, group, config, device=where.devices[0], loaded=loaded)
    if where.mode == "replicas":
        parts = [_load_group(files, group, config, device=d, loaded=loaded) for d in where.devices]
    else:
        # in turn: the variables live in host memory, each call copies them to its device (TensorFlow inserts the
        # copy when a variable and the op reading it are on different devices).
        host = "/device:CPU:0" if where.mode == "in turn" else None
        parts = [_load_group((path,), group, config, device=d, loaded=loaded, weights_device=host)
                 for path, d in zip(files, where.devices)]
    return parts[0] if len(parts) == 1 and where.mode == "members" else Spread(parts, where.mode)


def _device_scope(device: str | None):
    """Where the variables are created: ``tf.device(device)`` on the TensorFlow backend, ``keras.device`` of the
    label (:func:`cspine_submit.score.backends.keras_device`) on torch and jax."""
    import keras

    if device is None:
        return nullcontext()
    if keras.backend.backend() != "tensorflow":
        from cspine_submit.score.backends import keras_device

        return keras.device(keras_device(device))
    import tensorflow as tf

    return tf.device(device)


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device running out of memory, on any backend (TensorFlow's ResourceExhaustedError,
    torch's OutOfMemoryError, XLA's RESOURCE_EXHAUSTED)."""
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        if isinstance(exc, tf.errors.ResourceExhaustedError):
            return True
    return type(exc).__name__ == "OutOfMemoryError" or "RESOURCE_EXHAUSTED" in str(exc)[:500]


_LOAD_ERRORS = (FileNotFoundError, ValueError, OSError)
"""What a bad classifier file raises (a missing, corrupt or mismatched file); anything else is a bug and propagates."""


def read_weights_config(weights_dir: str | Path, *, _stacklevel: int = 2) -> ModelConfig:
    """Step 1 of :func:`load_classifiers`: the folder's ``model_config.json``, or :func:`notebook_config` for a
    folder holding only the seed notebook's seven files (with a :class:`DefaultConfigWarning`).

    Raises
    ------
    FileNotFoundError
        The folder is missing, or holds neither a config nor the notebook's files (the message names them).
    """
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise FileNotFoundError(f"{weights_dir}: weights folder not found")
    config_path = weights_dir / "model_config.json"
    if config_path.is_file():
        return ModelConfig.from_json(config_path)
    if all((weights_dir / f).is_file() for f in NOTEBOOK_FILES.values()):
        config = notebook_config(weights_dir)
        warnings.warn(f"{weights_dir}: no model_config.json; using the seed notebook default: {config.source}",
                      DefaultConfigWarning, stacklevel=_stacklevel)
        return config
    raise FileNotFoundError(
        f"{config_path}: no such file (and the folder does not hold the seed notebook's "
        f"{', '.join(NOTEBOOK_FILES.values())} either)"
    )


def _load_member(path: Path, config: ModelConfig, loaded: dict, device: Any):
    """One classifier file, read at most once per device per :func:`load_classifiers` call (``loaded`` remembers
    the model or the error it raised, so a bad file shared by several groups fails each of them the same way)."""
    key = (path, device)
    if key not in loaded:
        try:
            loaded[key] = load_classifier(path, config)
        except _LOAD_ERRORS as exc:
            loaded[key] = exc
    if isinstance(loaded[key], BaseException):
        raise loaded[key]
    return loaded[key]


def _load_group(files, group, config: ModelConfig, *, device: str | None, loaded: dict,
                weights_device: str | None = None):
    """The model of one group of vertebrae, its weights created on ``weights_device`` (default ``device``) once,
    an ensemble of several files averaged in one graph, the device it computes on recorded on the model.

    Raises
    ------
    DeviceOutOfMemoryError
        The device ran out of memory while the weights were created (a ``ValueError`` naming the device and files).
    """
    try:
        with _device_scope(weights_device or device):
            members = [_load_member(path, config, loaded, device) for path in files]
            model = members[0] if len(members) == 1 else average_classifiers(members, config.input_shape, "_".join(group))
    except Exception as exc:  # noqa: BLE001 - only a device's out-of-memory error is turned into ours
        if not _out_of_memory(exc):
            raise
        raise DeviceOutOfMemoryError(
            f"{weights_device or device}: out of memory loading {', '.join(Path(f).name for f in files)} for "
            f"{', '.join(group)} ({str(exc).splitlines()[0][:200]}); the memory plan's estimate was too low: use a "
            "smaller batch_size, fewer folds, --final refit or the gap head") from exc
    object.__setattr__(model, DEVICE_ATTR, device)
    return model


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
