"""The classifier architectures: one table of known heads and one factory (timm's ``models/_factory.py`` shape).

- ``seed``: ResNet50(include_top=False) -> Flatten -> Dense(256, relu) -> Dense(1, sigmoid), the seed notebook's
  network (157,799,681 parameters at 512x512x1);
- ``gap``: ResNet50 -> GlobalAveragePooling -> Dropout(0.3) -> Dense(1, sigmoid) (about 23.6M parameters);
- ``tiny``: a 4-block CNN with the same input/output contract, for tests and the synthetic demo.

An unknown name raises ``ValueError`` listing the valid ones. Keras is imported inside :func:`build_classifier`:
importing this module is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


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
