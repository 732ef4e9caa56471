"""Frozen configuration dataclasses saved as JSON beside the weights.

Two files are contracts (see DESIGN.md):

- ``model_config.json`` -> :class:`ModelConfig`: everything that turns HU slices into model input and model
  output into probabilities. Training writes it, inference only reads it; no preprocessing constant lives
  anywhere else.
- ``slice_ranges.json`` -> :class:`SliceRanges`: what the range learner learned from segmentation masks.

Loading a missing file raises :class:`FileNotFoundError` naming the path; a malformed file or an unknown
key raises :class:`ValueError` naming the path and the key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cspine_submit import __version__

VERTEBRAE: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
"""The seven cervical vertebrae, head to feet."""

PREDICTION_TYPES: tuple[str, ...] = ("patient_overall",) + VERTEBRAE
"""The eight labels per study, in the competition's order (row_id = ``<StudyInstanceUID>_<type>``)."""

TRAIN_PREVALENCE: dict[str, float] = {
    "patient_overall": 0.476,
    "C1": 0.072,
    "C2": 0.141,
    "C3": 0.036,
    "C4": 0.053,
    "C5": 0.080,
    "C6": 0.137,
    "C7": 0.195,
}
"""Share of positive labels in the competition's train.csv (2019 studies). The synthetic generator's default
prevalence; not the default priors (:data:`METRIC_PRIORS` score better)."""

METRIC_PRIORS: dict[str, float] = {
    "patient_overall": 0.531,
    "C1": 0.103,
    "C2": 0.193,
    "C3": 0.051,
    "C4": 0.075,
    "C5": 0.110,
    "C6": 0.184,
    "C7": 0.256,
}
"""The default priors: the constant per label that minimises the competition metric on the real train.csv labels
(2019 studies), as :func:`cspine_submit.train.calibration.fit_priors` computes it; they score 0.5573 on those labels
where the prevalences score 0.5638 (and 0.557 fitted on 4 folds, scored on the fifth). Positives weigh twice
negatives, so each sits above its prevalence."""

METRIC_PRIORS_SOURCE: str = ("calibration.fit_priors on the competition's train.csv labels (2019 studies): "
                             "metric 0.5573 there, against 0.5638 for the prevalences")
"""Where :data:`METRIC_PRIORS` come from, for the configs that ship them."""

CROP_CODE_SCALE: int = 65535
"""Model inputs (in [0, 1]) cross process boundaries as uint16 ``round(x * CROP_CODE_SCALE)``: half the bytes of
float32, at most 7.7e-6 off (:func:`cspine_submit.score.crop.encode_crops`; the scoring side converts back). float16 has
the same size but is 30 times coarser near 1 (2.4e-4), as much as the int16 HU rounding of the training cache."""

CHANNEL_MODES: tuple[str, ...] = ("single", "replicate", "windows", "neighbours")
"""How an HU slice becomes model channels: one window (1 channel); one window replicated to 3 channels
(for ImageNet backbones); one channel per window in ``windows``; or 2.5D, the slice and its neighbours at
``+-neighbour_offset`` slices, each in the first window."""


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    return value


def config_dict(obj: Any) -> dict:
    """A config dataclass (and the dataclasses in it) as a JSON-safe dict: values JSON cannot hold become ``str``.

    For fingerprints and reports. (:func:`cspine_submit.train.data`'s cache key keeps its own shallow field dict:
    the two differ for nested values, and the cache key must not change.)
    """
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def _read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def _check_keys(cls, data: dict, path: Path | str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(known)}")


def _write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_to_jsonable(obj), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


class _JsonFile:
    """``to_json`` / ``from_json`` for the frozen config dataclasses below."""

    def to_json(self, path: str | Path) -> Path:
        """Write as JSON (atomically: temporary file + rename) and return the path."""
        return _write_json(self, path)

    @classmethod
    def from_json(cls, path: str | Path):
        """Read a file written by :meth:`to_json`; keys it lacks take their defaults.

        Raises
        ------
        FileNotFoundError
            ``path`` does not exist (the message names it).
        ValueError
            Not JSON, an unknown key, or a value the dataclass rejects (the message names the file).
        """
        data = _read_json(path)
        _check_keys(cls, data, path)
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc


@dataclass(frozen=True)
class ModelConfig(_JsonFile):
    """How HU slices become model input and model outputs become the eight probabilities.

    Attributes
    ----------
    head : str
        Classifier architecture name in :data:`cspine_submit.score.architectures.ARCHITECTURES` (``seed``, ``gap``, ``tiny``).
    input_size : int
        Side of the square model input, pixels.
    channels : str
        One of :data:`CHANNEL_MODES`.
    windows : tuple of (level, width)
        HU windows, each mapped linearly to [0, 1] and clipped; ``windows[0]`` is used by the one-window modes.
    neighbour_offset : int
        For ``channels="neighbours"``: distance in slices of the two neighbours.
    crop_margin : float
        Extra margin around the planned in-plane box, as a fraction of the box side.
    z_margin_mm : float
        Added above and below each vertebra's expected z-range before sampling its slices, mm. 3 mm: on the real
        necks (leave-one-out, competition-style cuts, ``profile``) 2 mm gave coverage 0.83 / purity 0.78, 3 mm
        0.87 / 0.75, 4 mm 0.91 / 0.71; a slice of the vertebra missed costs a fracture missed, a neighbour's slice
        only dilutes the top-k pooling.
    slices_per_vertebra : int
        K, slices sampled evenly across each vertebra's planned z-range.
    aggregation : str
        Slice -> vertebra rule: ``topk_mean`` (mean of the ``top_k`` highest slice probabilities), ``mean`` or ``max``.
    top_k : int
        k for ``topk_mean``, out of ``slices_per_vertebra`` slices. A vertebra scored on fewer (or more) slices (the
        time budget lowered K) pools the same share of them: ``round(top_k * n / slices_per_vertebra)``, at least 1.
    overall_rule : str
        Vertebrae -> patient_overall: ``noisy_or`` (1 - prod(1 - p_k)) or ``max``, applied to the pooled vertebra
        probabilities before their calibration.
    calibration : dict
        ``{label: [a, b]}`` per prediction type: the pooled probability ``p`` becomes
        ``sigmoid(a * logit(p) + b)``. Fitted by ``train`` on out-of-fold predictions by minimising the
        competition metric (:mod:`cspine_submit.train.calibration`); a label that is absent is left as pooled.
    clip : (float, float)
        Every written probability is clipped into this open interval, so no single row costs an infinite loss.
    priors : dict
        Probability per prediction type used when a study or a vertebra cannot be scored.
    classifier_files : dict
        File name (relative to the weights folder) of each vertebra's classifier, or a list of names: an
        ensemble (e.g. the K fold models of a cross-validated run) whose probabilities are averaged.
    batch_size : int
        Crops per forward pass.
    mixed_precision : bool
        Use float16 compute on GPUs with fast float16 (compute capability >= 7.0, e.g. T4); ignored on CPU.
    trained_on : str
        What the classifiers were trained on: ``competition``, ``synthetic`` (demo only) or ``untrained``.
    source : str
        Free text: how this config was made (command, data set, date).
    package_version : str
        cspine_submit version that wrote the file.
    """

    head: str = "gap"
    input_size: int = 256
    channels: str = "windows"
    windows: tuple[tuple[float, float], ...] = ((400.0, 1800.0), (400.0, 2500.0), (40.0, 400.0))
    neighbour_offset: int = 2
    crop_margin: float = 0.1
    z_margin_mm: float = 3.0
    slices_per_vertebra: int = 15
    aggregation: str = "topk_mean"
    top_k: int = 5
    overall_rule: str = "noisy_or"
    calibration: dict[str, tuple[float, float]] = field(default_factory=dict)
    clip: tuple[float, float] = (0.001, 0.999)
    priors: dict[str, float] = field(default_factory=lambda: dict(METRIC_PRIORS))
    classifier_files: dict[str, str | tuple[str, ...]] = field(default_factory=lambda: {v: f"{v}.keras" for v in VERTEBRAE})
    batch_size: int = 32
    mixed_precision: bool = True
    trained_on: str = "untrained"
    source: str = ""
    package_version: str = __version__

    def __post_init__(self) -> None:
        if self.channels not in CHANNEL_MODES:
            raise ValueError(f"channels={self.channels!r}: expected one of {list(CHANNEL_MODES)}")
        if not self.windows:
            raise ValueError("windows: at least one (level, width) window is needed")
        if any(w <= 0 for _, w in self.windows):
            raise ValueError(f"windows={self.windows}: every width must be > 0")
        if self.input_size < 8 or self.slices_per_vertebra < 1 or self.top_k < 1 or self.batch_size < 1:
            raise ValueError("input_size >= 8, slices_per_vertebra >= 1, top_k >= 1 and batch_size >= 1 are required")
        lo, hi = self.clip
        if not 0.0 < lo < hi < 1.0:
            raise ValueError(f"clip={self.clip}: need 0 < low < high < 1")
        # Normalise JSON lists back to tuples so that equal configs compare (and hash) equal.
        object.__setattr__(self, "windows", tuple((float(l), float(w)) for l, w in self.windows))
        object.__setattr__(self, "clip", (float(lo), float(hi)))
        bad = [k for k, ab in self.calibration.items() if k not in PREDICTION_TYPES or len(ab) != 2]
        if bad:
            raise ValueError(f"calibration: {bad}: expected {{label: [a, b]}} with labels in {list(PREDICTION_TYPES)}")
        object.__setattr__(self, "calibration", {k: (float(a), float(b)) for k, (a, b) in self.calibration.items()})
        object.__setattr__(self, "classifier_files", {
            v: (f if isinstance(f, str) else tuple(str(x) for x in f)) for v, f in self.classifier_files.items()})

    @property
    def n_channels(self) -> int:
        """Number of model input channels this config produces."""
        return {"single": 1, "replicate": 3, "windows": len(self.windows), "neighbours": 3}[self.channels]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Model input shape (height, width, channels)."""
        return (self.input_size, self.input_size, self.n_channels)

    def classifier_paths(self, vertebra: str) -> tuple[str, ...]:
        """The file name(s) of a vertebra's classifier, relative to the weights folder (several: an ensemble)."""
        files = self.classifier_files[vertebra]
        return (files,) if isinstance(files, str) else tuple(files)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)



@dataclass(frozen=True)
class SliceRanges(_JsonFile):
    """Per-vertebra slice ranges and in-plane boxes learned from segmentation masks.

    Attributes
    ----------
    method : str
        Normalisation the planner uses along z (:data:`cspine_submit.localize.METHODS`): ``fraction`` of the study's
        z-extent, ``mm_top`` (mm below the first slice) or ``profile`` (mm from the column centre found by aligning
        a learned image profile; needs ``extra["profile_template"]``).
    layout : str
        How masks were brought into the axial head-to-feet frame: ``competition`` or ``affine``.
    per_vertebra : dict
        ``{vertebra: {method: {"start": Q, "end": Q}, ..., "box": {"y0": Q, "x0": Q, "y1": Q, "x1": Q},
        "box_mm_centre": {...}, "box_mm_bone": {...}, "length_mm": Q}}`` where ``Q`` is ``{"q05", "q10", "q25",
        "q50", "q75", "q90", "q95", "mean", "std"}``. start/end are the vertebra's first/last slice in the method's
        coordinate (growing toward the feet); ``box`` in fractions of rows/columns, ``box_mm_centre`` in mm from the
        image centre, ``box_mm_bone`` in mm from the column's bone centroid (learned with images only).
    n_masks : int
        Number of masks learned from.
    study_uids : tuple of str
        The studies (or mask file stems) learned from.
    extra : dict
        Method-specific learned data: ``methods`` (those learned), ``cue`` (how many slices the profile cue
        decodes), ``column_length_mm`` (quantiles), ``scales`` (tried by the profile alignment) and, when learned
        with images, ``profile_template`` and ``n_with_images``.
    source : str
        Free text: which data and command produced the file.
    package_version : str
        cspine_submit version that wrote the file.
    """

    method: str
    layout: str
    per_vertebra: dict[str, dict[str, Any]]
    n_masks: int
    study_uids: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    package_version: str = __version__

    def __post_init__(self) -> None:
        missing = [v for v in VERTEBRAE if v not in self.per_vertebra]
        if missing:
            raise ValueError(f"per_vertebra lacks {missing}")
        object.__setattr__(self, "study_uids", tuple(self.study_uids))
