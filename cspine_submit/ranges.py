"""Slice ranges: learn them from segmentation masks, plan crops for a new study from its headers.

Axis convention: ``volume : (z, y, x)``, z from head to feet (index 0 = most cranial slice), positions ``z_mm``
in mm growing toward the feet (``StudyHeader.z``).

Three ways to put a learned vertebra range into a new study (``SliceRanges.method``), all learned at once:

``fraction``
    Start and end of each vertebra as a fraction of the study's z-extent (0 = first slice, 1 = last). Headers
    only. Breaks when a scan includes more or less head or chest than the training scans.
``mm_top``
    Start and end in mm below the first (most cranial) slice. Headers only. Right when every scan starts at the
    same anatomical level, wrong by exactly the difference otherwise.
``profile``
    Start and end in mm relative to the centre of the cervical column (midway between the top of C1 and the
    bottom of C7), with the centre found in the new study by aligning a learned z profile of two cheap image
    features (bone area and body area per slice) to the same features measured on a few evenly spaced slices
    (:func:`cue_indices`: at most ``cue.max_slices``, about one every ``cue.step_mm`` mm). Needs training studies
    with images; costs those few decoded slices per study at inference.

The in-plane box is learned as fractions of rows and columns and is the same for every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from cspine_submit.config import VERTEBRAE, SliceRanges

METHODS: tuple[str, ...] = ("fraction", "mm_top", "profile")
"""Normalisations along z the learner records and the planner can use."""

QUANTILES: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
"""Quantiles stored for every learned quantity."""

FEATURES: tuple[str, ...] = ("bone_area", "body_area")
"""Per-slice image features of the ``profile`` method: log1p of the area in cm^2 of HU >= ``BONE_HU`` and of
HU >= ``BODY_HU``."""

BONE_HU: float = 250.0
BODY_HU: float = -300.0
FEATURE_STRIDE: int = 2
"""In-plane pixel stride when measuring features (areas are scaled back): 4x fewer pixels, same profile."""

DEFAULT_CUE = {"max_slices": 40, "min_slices": 12, "step_mm": 5.0}
"""How many slices the ``profile`` method decodes at inference: about one every ``step_mm``, clipped."""

TEMPLATE_STEP_MM: float = 2.0
DEFAULT_SCALES: tuple[float, ...] = tuple(round(0.85 + 0.025 * i, 3) for i in range(13))
"""Column-length scales (study / reference) the profile alignment tries, 0.85-1.15."""
DEFAULT_Z_MARGIN_MM: float = 2.0


@dataclass(frozen=True)
class CropPlan:
    """What to read and crop for one vertebra of one study.

    Attributes
    ----------
    vertebra : str
        ``C1`` ... ``C7``.
    slice_indices : tuple of int
        Indices into ``StudyHeader.files`` (head to feet), increasing, the centre slices of the crops.
    box : (y0, x0, y1, x1) tuple of int
        In-plane box in pixels, half-open, inside (0, 0, rows, cols).
    """

    vertebra: str
    slice_indices: tuple[int, ...]
    box: tuple[int, int, int, int]


class MaskError(ValueError):
    """A mask that cannot be learned from (wrong shape, no C1-C7, C1 below C7); the message names the file."""


# --------------------------------------------------------------------------------------------------------------
# Truth from one mask
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyTruth:
    """Where C1-C7 are in one study, from its mask in the axial head-to-feet frame.

    Attributes
    ----------
    uid : str
        Study UID (or mask file stem).
    z_mm : (n,) ndarray
        Slice positions, mm, increasing toward the feet.
    rows, cols : int
    spacing : (dz, dy, dx) tuple of float, mm
    z_ranges : dict
        ``{vertebra: (first, last)}`` inclusive slice indices holding the label.
    boxes : dict
        ``{vertebra: (y0, x0, y1, x1)}`` half-open pixel box of the label over all its slices.
    footprints : dict
        ``{vertebra: (n_voxels_per_pixel (h, w) int array over boxes[v])}``: how many of the vertebra's voxels
        project onto each pixel of its box; used for in-plane box coverage.
    profile : (n, len(FEATURES)) ndarray or None
        Image features per slice (NaN for slices not measured), when the study's images were read.
    centroids : (n, 2) ndarray or None
        Median (y, x) pixel position of the bone pixels of each measured slice (NaN when not measured or no
        bone), when the study's images were read.
    """

    uid: str
    z_mm: np.ndarray
    rows: int
    cols: int
    spacing: tuple[float, float, float]
    z_ranges: dict[str, tuple[int, int]]
    boxes: dict[str, tuple[int, int, int, int]]
    footprints: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    profile: np.ndarray | None = field(default=None, repr=False)
    centroids: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_slices(self) -> int:
        return len(self.z_mm)

    @property
    def column_length_mm(self) -> float:
        """Top of C1 to bottom of C7 (mm)."""
        return float(self.z_mm[self.z_ranges["C7"][1]] - self.z_mm[self.z_ranges["C1"][0]])

    @property
    def anchor_mm(self) -> float:
        """Centre of the cervical column: midway between the top of C1 and the bottom of C7 (mm)."""
        return 0.5 * (self.z_mm[self.z_ranges["C1"][0]] + self.z_mm[self.z_ranges["C7"][1]])


def extract_truth(
    volume: np.ndarray,
    z_mm: np.ndarray,
    spacing: tuple[float, float, float],
    uid: str = "",
    name: str = "mask",
) -> StudyTruth:
    """Find each cervical vertebra's slices and in-plane box in an axial label volume.

    Parameters
    ----------
    volume : (z, y, x) ndarray
        Labels, z from head to feet; 1-7 = C1-C7 (others ignored).
    z_mm : (z,) ndarray
        Slice positions in mm, increasing toward the feet.
    spacing : (dz, dy, dx)
        mm.
    uid, name : str
        Study id recorded, and the name used in error messages (the mask path).

    Raises
    ------
    MaskError
        No C1-C7 label at all, some of C1-C7 missing, or C1 not above C7.
    """
    if volume.ndim != 3:
        raise MaskError(f"{name}: expected a 3-D mask, got shape {volume.shape}")
    z_mm = np.asarray(z_mm, dtype=float)
    if len(z_mm) != volume.shape[0]:
        raise MaskError(f"{name}: {volume.shape[0]} mask slices but {len(z_mm)} slice positions")
    labels = np.asarray(volume)
    if not np.issubdtype(labels.dtype, np.integer):
        labels = np.rint(labels).astype(np.int16)
    cervical = (labels >= 1) & (labels <= 7)
    zs = np.flatnonzero(cervical.any(axis=(1, 2)))
    if zs.size == 0:
        found = np.unique(labels)
        raise MaskError(f"{name}: no C1-C7 labels (1-7) in the mask; labels present: {found[:20].tolist()}")
    # Work inside the bounding block of the cervical labels only: 7 label passes over the whole volume are slow.
    ys = np.flatnonzero(cervical[zs[0] : zs[-1] + 1].any(axis=(0, 2)))
    xs = np.flatnonzero(cervical[zs[0] : zs[-1] + 1].any(axis=(0, 1)))
    z0, y0, x0 = zs[0], ys[0], xs[0]
    block = labels[z0 : zs[-1] + 1, y0 : ys[-1] + 1, x0 : xs[-1] + 1]
    z_ranges, boxes, footprints, missing = {}, {}, {}, []
    for label, vertebra in enumerate(VERTEBRAE, start=1):
        m = block == label
        per_slice = m.any(axis=(1, 2))
        if not per_slice.any():
            missing.append(vertebra)
            continue
        kz = np.flatnonzero(per_slice)
        foot = m.sum(axis=0)
        ky = np.flatnonzero(foot.any(axis=1))
        kx = np.flatnonzero(foot.any(axis=0))
        z_ranges[vertebra] = (int(z0 + kz[0]), int(z0 + kz[-1]))
        box = (int(y0 + ky[0]), int(x0 + kx[0]), int(y0 + ky[-1] + 1), int(x0 + kx[-1] + 1))
        boxes[vertebra] = box
        footprints[vertebra] = foot[ky[0] : ky[-1] + 1, kx[0] : kx[-1] + 1].astype(np.int32)
    if missing:
        raise MaskError(f"{name}: labels for {missing} missing (every competition mask has C1-C7)")
    c1 = np.mean(z_ranges["C1"])
    c7 = np.mean(z_ranges["C7"])
    if not c1 < c7:
        raise MaskError(
            f"{name}: C1 (slices {z_ranges['C1']}) is not above C7 (slices {z_ranges['C7']}) in the head-to-feet "
            "frame: wrong layout or slice order for this mask"
        )
    return StudyTruth(
        uid=uid,
        z_mm=z_mm,
        rows=int(volume.shape[1]),
        cols=int(volume.shape[2]),
        spacing=tuple(float(s) for s in spacing),
        z_ranges=z_ranges,
        boxes=boxes,
        footprints=footprints,
    )


# --------------------------------------------------------------------------------------------------------------
# Image features (the profile method's cue)
# --------------------------------------------------------------------------------------------------------------


def slice_features(slices: np.ndarray, pixel_spacing: tuple[float, float]) -> np.ndarray:
    """Per-slice features of the ``profile`` method.

    Parameters
    ----------
    slices : (m, rows, cols) ndarray
        HU.
    pixel_spacing : (dy, dx)
        mm.

    Returns
    -------
    (m, 2) ndarray of float64
        ``log1p`` of the bone area (HU >= 250) and of the body area (HU >= -300), areas in cm^2.
    """
    sub = np.asarray(slices)[:, ::FEATURE_STRIDE, ::FEATURE_STRIDE]
    pixel_cm2 = pixel_spacing[0] * pixel_spacing[1] * FEATURE_STRIDE**2 / 100.0
    bone = (sub >= BONE_HU).sum(axis=(1, 2)) * pixel_cm2
    body = (sub >= BODY_HU).sum(axis=(1, 2)) * pixel_cm2
    return np.log1p(np.stack([bone, body], axis=1).astype(np.float64))


def bone_centroids(slices: np.ndarray) -> np.ndarray:
    """Median (y, x) pixel position of the bone (HU >= ``BONE_HU``) of each slice.

    Parameters
    ----------
    slices : (m, rows, cols) ndarray
        HU.

    Returns
    -------
    (m, 2) ndarray of float64
        Full-resolution pixel coordinates; NaN for a slice with fewer than 4 bone pixels (counted at the feature
        stride).
    """
    sub = np.asarray(slices)[:, ::FEATURE_STRIDE, ::FEATURE_STRIDE]
    out = np.full((len(sub), 2), np.nan)
    for i, s in enumerate(sub):
        ys, xs = np.nonzero(s >= BONE_HU)
        if ys.size >= 4:
            out[i] = (np.median(ys) * FEATURE_STRIDE, np.median(xs) * FEATURE_STRIDE)
    return out


def cue_indices(n_slices: int, z_mm: np.ndarray, cue: Mapping[str, float] | None = None) -> np.ndarray:
    """Which slices the ``profile`` method decodes for its image cue.

    About one slice every ``cue["step_mm"]`` mm, evenly spaced over the study, at least ``min_slices`` and at
    most ``max_slices`` (never more than the study has).

    Returns
    -------
    (m,) ndarray of int, strictly increasing.
    """
    cue = {**DEFAULT_CUE, **(cue or {})}
    if n_slices <= 0:
        return np.zeros(0, dtype=int)
    extent = float(z_mm[-1] - z_mm[0]) if n_slices > 1 else 0.0
    m = int(np.clip(round(extent / cue["step_mm"]) + 1, cue["min_slices"], cue["max_slices"]))
    m = min(m, n_slices)
    return np.unique(np.rint(np.linspace(0, n_slices - 1, m)).astype(int))


# --------------------------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------------------------


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    out = {f"q{int(round(q * 100)):02d}": float(np.quantile(a, q)) for q in QUANTILES}
    out["mean"] = float(a.mean())
    out["std"] = float(a.std())
    return out


def study_coordinates(truth_or_z: StudyTruth | np.ndarray, method: str, anchor_mm: float | None = None,
                      scale: float | None = None, ref_length_mm: float | None = None) -> np.ndarray:
    """Normalised z coordinate of every slice of a study under ``method``.

    Parameters
    ----------
    truth_or_z : StudyTruth or (n,) ndarray of z in mm
    method : one of :data:`METHODS`
    anchor_mm : float
        Column centre in mm (``profile`` only; taken from the truth when a StudyTruth is given).
    scale : float
        ``profile`` only: the study's column length over the reference length (from the truth's column length and
        ``ref_length_mm`` when a StudyTruth is given; default 1).

    Returns
    -------
    (n,) ndarray: fraction of the extent (``fraction``), mm below the first slice (``mm_top``) or mm from the
    column centre divided by the scale (``profile``: "reference mm"), increasing toward the feet.
    """
    if isinstance(truth_or_z, StudyTruth):
        z = truth_or_z.z_mm
        if anchor_mm is None and method == "profile":
            anchor_mm = truth_or_z.anchor_mm
        if scale is None and ref_length_mm:
            scale = truth_or_z.column_length_mm / ref_length_mm
    else:
        z = np.asarray(truth_or_z, dtype=float)
    if method == "fraction":
        extent = z[-1] - z[0]
        return (z - z[0]) / extent if extent > 0 else np.zeros_like(z)
    if method == "mm_top":
        return z - z[0]
    if method == "profile":
        if anchor_mm is None:
            raise ValueError("method 'profile' needs the column centre (anchor_mm)")
        return (z - anchor_mm) / (scale or 1.0)
    raise ValueError(f"method={method!r}: expected one of {list(METHODS)}")


def column_point(z_mm: np.ndarray, centroids: np.ndarray, lo_mm: float, hi_mm: float) -> tuple[float, float] | None:
    """In-plane position of the cervical column: median bone centroid of the measured slices in [lo_mm, hi_mm].

    Parameters
    ----------
    z_mm : (m,) ndarray
        Positions of the measured slices, mm.
    centroids : (m, 2) ndarray
        :func:`bone_centroids` of those slices (pixels, NaN allowed).

    Returns
    -------
    (y, x) in pixels, or None when fewer than 2 slices in the range have bone.
    """
    z_mm = np.asarray(z_mm, dtype=float)
    c = np.asarray(centroids, dtype=float)
    ok = (z_mm >= lo_mm) & (z_mm <= hi_mm) & np.isfinite(c).all(axis=1)
    if ok.sum() < 2:
        return None
    y, x = np.median(c[ok], axis=0)
    return float(y), float(x)


def column_point_truth(t: StudyTruth) -> tuple[float, float] | None:
    """:func:`column_point` of a training study, from its cue slices inside its true C1-top..C7-bottom range."""
    if t.centroids is None:
        return None
    idx = cue_indices(t.n_slices, t.z_mm)
    lo, hi = t.z_mm[t.z_ranges["C1"][0]], t.z_mm[t.z_ranges["C7"][1]]
    return column_point(t.z_mm[idx], t.centroids[idx], lo, hi)


def _box_mm_quantiles(truths: Sequence[StudyTruth], v: str, points: Sequence[tuple[float, float]]) -> dict:
    """Quantiles of a vertebra's box edges in mm from a reference point (y, x) in pixels, per study."""
    keys = ("y0", "x0", "y1", "x1")
    vals: dict[str, list[float]] = {k: [] for k in keys}
    for t, (py, px) in zip(truths, points):
        y0, x0, y1, x1 = t.boxes[v]
        dy, dx = t.spacing[1], t.spacing[2]
        vals["y0"].append((y0 - py) * dy)
        vals["x0"].append((x0 - px) * dx)
        vals["y1"].append((y1 - py) * dy)
        vals["x1"].append((x1 - px) * dx)
    return {k: _quantiles(vals[k]) for k in keys}


def learn_template(truths: Sequence[StudyTruth], step_mm: float = TEMPLATE_STEP_MM,
                   ref_length_mm: float | None = None) -> dict[str, Any] | None:
    """Median feature profile along z relative to the column centre, over the studies that have one.

    Each study's positions are divided by its column length over ``ref_length_mm`` (when given), so that the
    head-neck and neck-shoulder transitions of short and long necks line up.

    Returns
    -------
    dict or None
        ``{"grid_mm": [...], "template": [[f0, f1], ...], "count": [...], "step_mm": ...}``, None when no study
        has image features.
    """
    with_profile = [t for t in truths if t.profile is not None]
    if not with_profile:
        return None
    rel = [study_coordinates(t, "profile", ref_length_mm=ref_length_mm) for t in with_profile]
    lo = math.floor(min(r.min() for r in rel) / step_mm) * step_mm
    hi = math.ceil(max(r.max() for r in rel) / step_mm) * step_mm
    grid = np.arange(lo, hi + step_mm / 2, step_mm)
    stack = np.full((len(with_profile), len(grid), len(FEATURES)), np.nan)
    for i, (t, r) in enumerate(zip(with_profile, rel)):
        ok = np.isfinite(t.profile).all(axis=1)
        if ok.sum() < 2:
            continue
        for f in range(len(FEATURES)):
            vals = np.interp(grid, r[ok], t.profile[ok, f], left=np.nan, right=np.nan)
            stack[i, :, f] = vals
    count = np.isfinite(stack[:, :, 0]).sum(axis=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN grid columns; dropped just below
        template = np.nanmedian(stack, axis=0)
    keep = count > 0
    return {
        "grid_mm": [round(float(g), 3) for g in grid[keep]],
        "template": [[round(float(v), 5) for v in row] for row in template[keep]],
        "count": [int(c) for c in count[keep]],
        "step_mm": step_mm,
        "features": list(FEATURES),
        "bone_hu": BONE_HU,
        "body_hu": BODY_HU,
    }


def ranges_from_truths(
    truths: Sequence[StudyTruth],
    method: str = "fraction",
    layout: str = "competition",
    source: str = "",
    cue: Mapping[str, float] | None = None,
) -> SliceRanges:
    """Learn a :class:`SliceRanges` from the truths of several studies (pure; :func:`learn_ranges` wraps IO).

    ``per_vertebra[v]`` holds, for every method in :data:`METHODS` that can be learned here, the quantiles of the
    vertebra's start (first slice) and end (last slice) coordinate (``{"fraction": {"start": {...}, "end":
    {...}}, ...}``), the in-plane box quantiles as fractions of rows/columns (``"box": {"y0": {...}, ...}``) and
    its length in mm. ``extra`` holds the profile template (when images were read) and the cue settings.
    """
    if not truths:
        raise ValueError("no usable masks to learn from")
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {list(METHODS)}")
    ref_length = float(np.median([t.column_length_mm for t in truths]))
    template = learn_template(truths, ref_length_mm=ref_length)
    if method == "profile" and template is None:
        raise ValueError("method 'profile' needs studies with images (a learned feature profile); none had any")
    methods = [m for m in METHODS if m != "profile" or template is not None]
    per_vertebra: dict[str, dict[str, Any]] = {}
    for v in VERTEBRAE:
        entry: dict[str, Any] = {}
        for m in methods:
            starts, ends = [], []
            for t in truths:
                coords = study_coordinates(t, m, ref_length_mm=ref_length)
                first, last = t.z_ranges[v]
                starts.append(coords[first])
                ends.append(coords[last])
            entry[m] = {"start": _quantiles(starts), "end": _quantiles(ends)}
        entry["box"] = {
            "y0": _quantiles([t.boxes[v][0] / t.rows for t in truths]),
            "x0": _quantiles([t.boxes[v][1] / t.cols for t in truths]),
            "y1": _quantiles([t.boxes[v][2] / t.rows for t in truths]),
            "x1": _quantiles([t.boxes[v][3] / t.cols for t in truths]),
        }
        entry["box_mm_centre"] = _box_mm_quantiles(truths, v, [((t.rows / 2, t.cols / 2)) for t in truths])
        with_point = [(t, column_point_truth(t)) for t in truths]
        with_point = [(t, pt) for t, pt in with_point if pt is not None]
        if with_point:
            entry["box_mm_bone"] = _box_mm_quantiles([t for t, _ in with_point], v, [pt for _, pt in with_point])
        entry["length_mm"] = _quantiles([t.z_mm[t.z_ranges[v][1]] - t.z_mm[t.z_ranges[v][0]] for t in truths])
        per_vertebra[v] = entry
    extra: dict[str, Any] = {"methods": methods, "cue": {**DEFAULT_CUE, **(cue or {})},
                             "column_length_mm": _quantiles([t.column_length_mm for t in truths]),
                             "scales": list(DEFAULT_SCALES)}
    if template is not None:
        extra["profile_template"] = template
        extra["n_with_images"] = sum(t.profile is not None for t in truths)
    from cspine_submit import __version__

    return SliceRanges(
        method=method,
        layout=layout,
        per_vertebra=per_vertebra,
        n_masks=len(truths),
        study_uids=tuple(t.uid for t in truths),
        extra=extra,
        source=source,
        package_version=__version__,
    )


# --------------------------------------------------------------------------------------------------------------
# IO wrappers for learning
# --------------------------------------------------------------------------------------------------------------


def _uid_from_mask_path(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def truth_from_files(
    mask_path: str | Path,
    study_dir: str | Path | None = None,
    layout: str = "competition",
    with_profile: bool = True,
    profile_step_mm: float = 2.0,
) -> StudyTruth:
    """Read one mask (and its study's headers, when given) and return its :class:`StudyTruth`.

    With a study folder: the mask is brought into the study's head-to-feet frame (``layout``), checked against
    the study's shape, and the slice positions come from the headers; with ``with_profile`` the image features are
    measured on about one slice every ``profile_step_mm`` mm (decoded via ``read_slices``). Without a study folder
    (mask-only, e.g. VerSe), the mask's own grid is used: positions from its voxel size along z.

    Raises
    ------
    MaskError
        Unreadable mask, shape mismatch with the study, no C1-C7, C1 not above C7.
    """
    import nibabel as nib

    from cspine_submit.orientation import affine_to_axial, mask_to_axial

    mask_path = Path(mask_path)
    uid = _uid_from_mask_path(mask_path)
    try:
        img = nib.load(str(mask_path))
        array = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for a bad file
        raise MaskError(f"{mask_path}: cannot read the mask ({type(exc).__name__}: {exc})") from exc
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise MaskError(f"{mask_path}: expected a 3-D mask, got shape {array.shape}")
    # Labels are small integers; float64 files (VerSe gl017) are 8x larger than needed.
    array = np.rint(array).astype(np.uint8) if not np.issubdtype(array.dtype, np.integer) else array
    if study_dir is None:
        volume, spacing = affine_to_axial(array, img.affine) if layout == "affine" else (None, None)
        if volume is None:
            volume = mask_to_axial(array, img.affine, layout)
            zooms = img.header.get_zooms()[:3]
            spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
        z_mm = np.arange(volume.shape[0]) * spacing[0]
        return extract_truth(volume, z_mm, spacing, uid=uid, name=str(mask_path))

    from cspine_submit.dicom import read_slices, scan_study

    header = scan_study(study_dir)
    volume = mask_to_axial(array, img.affine, layout, orientation=header.orientation)
    if tuple(volume.shape) != tuple(header.shape):
        raise MaskError(
            f"{mask_path}: mask is {tuple(volume.shape)} (z, y, x) after the {layout!r} layout but study "
            f"{study_dir} is {tuple(header.shape)}: wrong layout, or the mask belongs to another study"
        )
    truth = extract_truth(volume, header.z, header.spacing, uid=header.study_uid or uid, name=str(mask_path))
    if not with_profile:
        return truth
    step = max(1, int(round(profile_step_mm / max(header.spacing[0], 1e-3))))
    # The cue slices too, so that leave-one-out evaluation sees exactly what the planner would measure.
    idx = np.union1d(np.arange(0, header.n_slices, step), cue_indices(header.n_slices, header.z))
    profile = np.full((header.n_slices, len(FEATURES)), np.nan)
    centroids = np.full((header.n_slices, 2), np.nan)
    hu = read_slices(header, idx)
    profile[idx] = slice_features(hu, header.spacing[1:])
    centroids[idx] = bone_centroids(hu)
    return _replace_truth(truth, profile=profile, centroids=centroids)


def _replace_truth(truth: StudyTruth, **changes: Any) -> StudyTruth:
    import dataclasses

    return dataclasses.replace(truth, **changes)


def pair_masks(segmentations: str | Path, images: str | Path | None) -> list[tuple[Path, Path | None]]:
    """``(mask path, study folder or None)`` for every ``*.nii``/``*.nii.gz`` in ``segmentations``, sorted.

    The study folder is ``images/<mask stem>`` when ``images`` is given (None when that folder is missing, so the
    caller can report it).
    """
    seg = Path(segmentations)
    if not seg.is_dir():
        raise FileNotFoundError(f"{seg}: no such folder")
    masks = sorted(p for p in seg.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    pairs = []
    for m in masks:
        study = None
        if images is not None:
            candidate = Path(images) / _uid_from_mask_path(m)
            study = candidate if candidate.is_dir() else None
        pairs.append((m, study))
    return pairs


def load_truths(
    segmentations: str | Path,
    images: str | Path | None = None,
    layout: str = "competition",
    with_profile: bool = True,
    progress: bool = False,
) -> tuple[list[StudyTruth], list[tuple[str, str]]]:
    """Truths of every mask in a folder; masks that fail are returned as ``(file, reason)`` instead of raising.

    A mask whose study folder is missing under ``images`` is skipped (reason given); with ``images=None`` every
    mask is learned from its own grid.
    """
    pairs = pair_masks(segmentations, images)
    truths: list[StudyTruth] = []
    skipped: list[tuple[str, str]] = []
    iterator: Iterable = pairs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(pairs, desc="masks", unit="mask")
    for mask, study in iterator:
        if images is not None and study is None:
            skipped.append((str(mask), f"no study folder {Path(images) / _uid_from_mask_path(mask)}"))
            continue
        try:
            truths.append(truth_from_files(mask, study, layout=layout, with_profile=with_profile))
        except (MaskError, ValueError, OSError) as exc:
            skipped.append((str(mask), str(exc)))
    return truths, skipped


def learn_ranges(
    segmentations: str | Path,
    images: str | Path | None = None,
    layout: str = "competition",
    method: str | None = None,
    source: str = "",
    progress: bool = False,
) -> tuple[SliceRanges, list[tuple[str, str]]]:
    """Learn slice ranges from a folder of masks (and their studies' images).

    Parameters
    ----------
    segmentations : path
        Folder of ``<uid>.nii[.gz]`` masks.
    images : path, optional
        Folder of ``<uid>/`` study folders; None to learn from the masks' own grids (no image profile).
    layout : {"competition", "affine"}
    method : str, optional
        Method the planner will use; default ``profile`` when images are given, else ``fraction``.
    source : str
        Free text recorded in the file.

    Returns
    -------
    (SliceRanges, skipped)
        ``skipped`` lists ``(mask file, reason)`` for the masks left out.
    """
    truths, skipped = load_truths(segmentations, images, layout=layout, with_profile=images is not None,
                                  progress=progress)
    if not truths:
        reasons = "; ".join(f"{Path(f).name}: {r}" for f, r in skipped) or "the folder has no masks"
        raise ValueError(f"{segmentations}: no usable mask ({reasons})")
    if method is None:
        method = "profile" if any(t.profile is not None for t in truths) else "fraction"
    return ranges_from_truths(truths, method=method, layout=layout, source=source), skipped


def load_ranges(path: str | Path) -> SliceRanges:
    """Read ``slice_ranges.json`` (FileNotFoundError naming the path when missing; ValueError when malformed)."""
    ranges = SliceRanges.from_json(path)
    if ranges.method not in METHODS:
        raise ValueError(f"{path}: method {ranges.method!r} unknown; expected one of {list(METHODS)}")
    for v in VERTEBRAE:
        entry = ranges.per_vertebra[v]
        if ranges.method not in entry or "box" not in entry:
            raise ValueError(f"{path}: per_vertebra[{v!r}] lacks {ranges.method!r} or 'box'")
    if ranges.method == "profile" and "profile_template" not in ranges.extra:
        raise ValueError(f"{path}: method 'profile' but no extra['profile_template']")
    return ranges


# --------------------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------------------


def match_profile(
    z_mm: np.ndarray,
    features: np.ndarray,
    ranges: SliceRanges,
    study_z: tuple[float, float],
    search_step_mm: float = 1.0,
) -> tuple[float | None, float, float]:
    """Find the column centre (and length scale) of a study by aligning its features to the learned template.

    Every candidate centre ``a`` (1 mm steps) and scale ``s`` (``extra["scales"]``) maps a measured slice at ``z``
    to the template position ``(z - a) / s``; the cost is the mean squared difference between the measured and
    the template features, with a free constant offset per feature (features are log areas: the offset is the
    patient's size). Candidates keep C1's expected top and C7's expected bottom inside the study, give or take
    10 mm (a cervical-spine CT contains its cervical spine) and need half the measured slices on the template.

    Parameters
    ----------
    z_mm : (m,) ndarray
        Positions (mm, toward the feet) of the measured slices.
    features : (m, F) ndarray
        :func:`slice_features` of those slices.
    ranges : SliceRanges
        With ``extra["profile_template"]``.
    study_z : (first, last)
        z of the study's first and last slice, mm.

    Returns
    -------
    (anchor_mm, scale, cost)
        Best centre (None when no candidate has enough overlap), its scale and cost.
    """
    tpl = ranges.extra["profile_template"]
    grid = np.asarray(tpl["grid_mm"], dtype=float)
    template = np.asarray(tpl["template"], dtype=float)
    scales = np.asarray(ranges.extra.get("scales", [1.0]), dtype=float)
    pv = ranges.per_vertebra
    c1_top = pv["C1"]["profile"]["start"]["q50"]
    c7_bottom = pv["C7"]["profile"]["end"]["q50"]
    ok = np.isfinite(features).all(axis=1)
    z, f = np.asarray(z_mm, float)[ok], np.asarray(features, float)[ok]
    min_points = max(4, int(0.5 * len(z)))
    slack = 10.0
    best: tuple[float | None, float, float] = (None, 1.0, np.inf)
    for s in scales:
        lo = study_z[0] - s * c1_top - slack
        hi = study_z[1] - s * c7_bottom + slack
        if hi < lo:  # the study is shorter than a cervical column: let the profile decide anywhere in it
            lo, hi = study_z[0] - s * grid[-1], study_z[1] - s * grid[0]
        anchors = np.arange(lo, hi + search_step_mm / 2, search_step_mm)
        if anchors.size == 0:
            continue
        r = (z[None, :] - anchors[:, None]) / s  # (A, m) template positions
        inside = (r >= grid[0]) & (r <= grid[-1])
        n_in = inside.sum(axis=1)
        expected = np.stack([np.interp(r, grid, template[:, j]) for j in range(template.shape[1])], axis=-1)
        resid = np.where(inside[..., None], f[None] - expected, 0.0)  # (A, m, F)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = resid.sum(axis=1) / n_in[:, None]
            sq = np.where(inside[..., None], (resid - mean[:, None, :]) ** 2, 0.0)
            cost = sq.sum(axis=(1, 2)) / (n_in * f.shape[1])
        cost = np.where(n_in >= min_points, cost, np.inf)
        i = int(np.argmin(cost))
        if cost[i] < best[2]:
            best = (float(anchors[i]), float(s), float(cost[i]))
    return best


def _range_mm(ranges: SliceRanges, vertebra: str, method: str, z: np.ndarray, anchor_mm: float | None,
              scale: float = 1.0, lo_q: str = "q50", hi_q: str = "q50") -> tuple[float, float]:
    entry = ranges.per_vertebra[vertebra][method]
    start, end = entry["start"][lo_q], entry["end"][hi_q]
    if method == "fraction":
        extent = z[-1] - z[0]
        return z[0] + start * extent, z[0] + end * extent
    if method == "mm_top":
        return z[0] + start, z[0] + end
    return anchor_mm + scale * start, anchor_mm + scale * end


def planned_ranges_mm(
    z_mm: np.ndarray,
    ranges: SliceRanges,
    method: str | None = None,
    anchor_mm: float | None = None,
    scale: float = 1.0,
) -> dict[str, tuple[float, float]]:
    """Expected (start, end) in mm of every vertebra in a study with slice positions ``z_mm`` (pure).

    ``anchor_mm`` (column centre) and ``scale`` (column length over the reference) are used by ``profile``; when
    the anchor is None the learned ``fraction`` ranges are used instead (the fallback).
    """
    method = method or ranges.method
    z = np.asarray(z_mm, dtype=float)
    if method == "profile" and anchor_mm is None:
        method = "fraction"
    return {v: _range_mm(ranges, v, method, z, anchor_mm, scale) for v in VERTEBRAE}


def indices_in_range(z_mm: np.ndarray, start_mm: float, end_mm: float, k: int) -> tuple[int, ...]:
    """K evenly spaced slice indices covering ``[start_mm, end_mm]`` (pure).

    Slices whose position lies inside the range are eligible; when none does (range between two slices or
    outside the study) the nearest slice to the range's centre is used. The result is strictly increasing and has
    ``min(k, eligible slices)`` entries, the first and last eligible slices always included.
    """
    z = np.asarray(z_mm, dtype=float)
    n = len(z)
    lo = int(np.searchsorted(z, start_mm, side="left"))
    hi = int(np.searchsorted(z, end_mm, side="right")) - 1
    lo, hi = max(lo, 0), min(hi, n - 1)
    if hi < lo:
        centre = 0.5 * (start_mm + end_mm)
        i = int(np.clip(np.argmin(np.abs(z - centre)), 0, n - 1))
        return (i,)
    idx = np.unique(np.rint(np.linspace(lo, hi, max(1, k))).astype(int))
    return tuple(int(i) for i in idx)


BOX_MODES: tuple[str, ...] = ("fraction", "mm_centre", "mm_bone")
"""How the in-plane box is placed: learned fractions of rows/columns; learned mm offsets from the image centre
(headers only; right when the pixel size varies); learned mm offsets from the column's bone centroid measured on
the ``profile`` cue slices."""


def planned_box(
    ranges: SliceRanges,
    vertebra: str,
    rows: int,
    cols: int,
    pixel_spacing: tuple[float, float] | None = None,
    point: tuple[float, float] | None = None,
    mode: str = "auto",
    quantiles: tuple[str, str] = ("q10", "q90"),
) -> tuple[int, int, int, int]:
    """In-plane box in pixels from the learned box quantiles: ``quantiles[0]`` of the starts, ``[1]`` of the ends.

    Parameters
    ----------
    pixel_spacing : (dy, dx), mm
        Needed by the mm modes.
    point : (y, x), pixels
        Column point (:func:`column_point`) for ``mm_bone``.
    mode : str
        One of :data:`BOX_MODES`, or ``auto``: ``mm_bone`` when a point is given and learned, else ``mm_centre``
        when learned and the spacing is known, else ``fraction``.
    """
    entry = ranges.per_vertebra[vertebra]
    if mode == "auto":
        # Measured (benchmarks/bench_ranges.py): around the bone centroid is best by far (coverage 0.997 with
        # half the box area). Without a cue, mm from the image centre beat fractions of the image on 24 synthetic
        # studies (0.988 vs 0.981 with a smaller box) and on VerSe (0.89 vs 0.82); fractions won on a 12-study
        # set. Real pixel sizes vary with the field of view, which mm offsets absorb.
        if pixel_spacing is not None and point is not None and "box_mm_bone" in entry:
            mode = "mm_bone"
        elif pixel_spacing is not None and "box_mm_centre" in entry:
            mode = "mm_centre"
        else:
            mode = "fraction"
    lo, hi = quantiles
    if mode == "fraction":
        b = entry["box"]
        fy0, fx0 = b["y0"][lo] * rows, b["x0"][lo] * cols
        fy1, fx1 = b["y1"][hi] * rows, b["x1"][hi] * cols
    else:
        if pixel_spacing is None:
            raise ValueError(f"box mode {mode!r} needs the pixel spacing")
        if mode == "mm_centre":
            b, (py, px) = entry["box_mm_centre"], (rows / 2, cols / 2)
        elif mode == "mm_bone":
            if point is None or "box_mm_bone" not in entry:
                raise ValueError("box mode 'mm_bone' needs a column point and learned 'box_mm_bone'")
            b, (py, px) = entry["box_mm_bone"], point
        else:
            raise ValueError(f"box mode {mode!r}: expected one of {list(BOX_MODES)} or 'auto'")
        dy, dx = pixel_spacing
        fy0, fx0 = py + b["y0"][lo] / dy, px + b["x0"][lo] / dx
        fy1, fx1 = py + b["y1"][hi] / dy, px + b["x1"][hi] / dx
    y0 = int(np.clip(math.floor(fy0), 0, rows - 1))
    x0 = int(np.clip(math.floor(fx0), 0, cols - 1))
    y1 = int(np.clip(math.ceil(fy1), y0 + 1, rows))
    x1 = int(np.clip(math.ceil(fx1), x0 + 1, cols))
    return (y0, x0, y1, x1)


def plans_from_positions(
    z_mm: np.ndarray,
    rows: int,
    cols: int,
    ranges: SliceRanges,
    k: int,
    z_margin_mm: float = DEFAULT_Z_MARGIN_MM,
    method: str | None = None,
    anchor_mm: float | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    point: tuple[float, float] | None = None,
    box_mode: str = "auto",
    box_quantiles: tuple[str, str] = ("q10", "q90"),
    scale: float = 1.0,
) -> dict[str, CropPlan]:
    """The pure core of :func:`plan_crops`: plans from slice positions, image geometry and an optional cue.

    Parameters
    ----------
    z_mm : (n,) ndarray
        Slice positions, mm toward the feet.
    rows, cols : int
    ranges : SliceRanges
    k : int
        Slices per vertebra.
    z_margin_mm : float
        Added above and below each expected range.
    method : str, optional
        Default ``ranges.method``.
    anchor_mm : float, optional
        Column centre found by the profile cue (``profile`` falls back to ``fraction`` without it).
    pixel_spacing : (dy, dx), optional
        mm; enables the mm box modes.
    point : (y, x), optional
        Column point from the cue (``mm_bone`` box).
    box_mode, box_quantiles
        See :func:`planned_box`.
    scale : float
        Column length scale found by the profile cue.
    """
    mm = planned_ranges_mm(z_mm, ranges, method, anchor_mm, scale)
    plans = {}
    for v in VERTEBRAE:
        start, end = mm[v]
        idx = indices_in_range(z_mm, start - z_margin_mm, end + z_margin_mm, k)
        box = planned_box(ranges, v, rows, cols, pixel_spacing, point, box_mode, box_quantiles)
        plans[v] = CropPlan(vertebra=v, slice_indices=idx, box=box)
    return plans


@dataclass(frozen=True)
class Cue:
    """The image cue of the ``profile`` method for one study.

    Attributes
    ----------
    indices : tuple of int
        Slices decoded for the cue (count them as slices read).
    anchor_mm : float or None
        Column centre (mm); None when the profile could not be aligned (the planner then uses ``fraction``).
    scale : float
        Column length over the learned reference length.
    point : (y, x) or None
        Column point in pixels (median bone centroid of the cue slices inside the expected C1-C7 range).
    cost : float or None
        Mean squared feature difference at the best alignment.
    fallback : str or None
        What the planner used instead when the profile could not be aligned (None when it was).
    """

    indices: tuple[int, ...] = ()
    anchor_mm: float | None = None
    scale: float = 1.0
    point: tuple[float, float] | None = None
    cost: float | None = None
    fallback: str | None = None


def cue_from_measurements(
    z_cue: np.ndarray,
    features: np.ndarray,
    centroids: np.ndarray | None,
    ranges: SliceRanges,
    study_z: tuple[float, float],
    indices: Sequence[int] = (),
) -> Cue:
    """Align measured cue features (pure): column centre, then column point from the centroids in its range."""
    anchor, scale, cost = match_profile(z_cue, features, ranges, study_z)
    point = None
    if anchor is not None and centroids is not None:
        pv = ranges.per_vertebra
        lo = anchor + scale * pv["C1"]["profile"]["start"]["q50"]
        hi = anchor + scale * pv["C7"]["profile"]["end"]["q50"]
        point = column_point(z_cue, centroids, lo, hi)
    return Cue(indices=tuple(int(i) for i in indices), anchor_mm=anchor, scale=scale, point=point,
               cost=None if anchor is None else cost,
               fallback=None if anchor is not None else "fraction ranges (the z profile could not be aligned)")


def study_cue_indices(header, ranges: SliceRanges) -> np.ndarray:
    """Slices :func:`plan_crops` decodes for the image cue of this study: empty unless the method is ``profile``."""
    if ranges.method != "profile":
        return np.zeros(0, dtype=int)
    return cue_indices(header.n_slices, header.z, ranges.extra.get("cue"))


def measure_cue(
    header,
    ranges: SliceRanges,
    read: Callable[[Any, np.ndarray], np.ndarray] | None = None,
    slices: np.ndarray | None = None,
) -> Cue:
    """Decode the cue slices of a study (or use ``slices`` already decoded for them) and align the profile.

    Parameters
    ----------
    header : StudyHeader
    ranges : SliceRanges
    read : callable, optional
        ``read(header, indices) -> (m, rows, cols) HU``; default :func:`cspine_submit.dicom.read_slices`.
    slices : (m, rows, cols) ndarray, optional
        HU of the slices ``cue_indices(header.n_slices, header.z, ranges.extra["cue"])``, if already decoded.
    """
    idx = cue_indices(header.n_slices, header.z, ranges.extra.get("cue"))
    if slices is None:
        if read is None:
            from cspine_submit.dicom import read_slices as read
        slices = read(header, idx)
    feats = slice_features(slices, header.spacing[1:])
    cents = bone_centroids(slices)
    return cue_from_measurements(header.z[idx], feats, cents, ranges, (float(header.z[0]), float(header.z[-1])),
                                 idx)


def plan_crops(
    header,
    ranges: SliceRanges,
    config,
    *,
    z_margin_mm: float | None = None,
    cue: Cue | None = None,
    read: Callable[[Any, np.ndarray], np.ndarray] | None = None,
) -> dict[str, CropPlan]:
    """Plan the crops of C1-C7 for one study.

    Headers only for the ``fraction`` and ``mm_top`` methods. For ``profile``, the study's cue slices
    (:func:`study_cue_indices`: 12-40 evenly spaced slices, about one per 5 mm) are decoded through ``read``
    (default ``read_slices``) unless a measured ``cue`` is passed (see :func:`measure_cue`); when the profile
    cannot be aligned the ``fraction`` ranges are used. The in-plane box is placed by :func:`planned_box` in
    ``auto`` mode (around the column's bone centroid with a cue, else in mm from the image centre).

    Parameters
    ----------
    header : StudyHeader
    ranges : SliceRanges
    config : ModelConfig
        ``slices_per_vertebra`` gives K and ``z_margin_mm`` the z margin. (The in-plane ``crop_margin`` is
        applied later, by ``crop.prepare_crops``.)
    z_margin_mm : float, optional
        Added above and below each expected range, mm; overrides ``config.z_margin_mm`` (evaluation sweeps).

    Returns
    -------
    dict
        ``{vertebra: CropPlan}`` for C1-C7; slice indices inside ``[0, n_slices)``, strictly increasing, at most K.
    """
    if z_margin_mm is None:
        z_margin_mm = config.z_margin_mm
    anchor = point = None
    scale = 1.0
    if ranges.method == "profile":
        if cue is None:
            cue = measure_cue(header, ranges, read=read)
        anchor, point, scale = cue.anchor_mm, cue.point, cue.scale
    return plans_from_positions(
        header.z, header.rows, header.cols, ranges, config.slices_per_vertebra, z_margin_mm, ranges.method, anchor,
        pixel_spacing=(float(header.spacing[1]), float(header.spacing[2])), point=point, scale=scale,
    )


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def score_plans(truth: StudyTruth, plans: Mapping[str, CropPlan]) -> dict[str, dict[str, float]]:
    """Coverage, purity and box coverage of one study's plans against its truth (pure).

    coverage
        Share of the vertebra's true slices inside the planned range (first to last planned slice).
    purity
        Share of the planned slices that contain the vertebra.
    box_coverage
        Share of the vertebra's mask voxels whose (y, x) lies inside the planned box.
    """
    out = {}
    for v in VERTEBRAE:
        first, last = truth.z_ranges[v]
        plan = plans[v]
        idx = np.asarray(plan.slice_indices)
        p_lo, p_hi = int(idx.min()), int(idx.max())
        true_n = last - first + 1
        overlap = max(0, min(last, p_hi) - max(first, p_lo) + 1)
        coverage = overlap / true_n
        purity = float(np.mean((idx >= first) & (idx <= last)))
        y0, x0, y1, x1 = truth.boxes[v]
        foot = truth.footprints[v]
        by0, bx0, by1, bx1 = plan.box
        iy0, ix0 = max(by0, y0) - y0, max(bx0, x0) - x0
        iy1, ix1 = min(by1, y1) - y0, min(bx1, x1) - x0
        inside = foot[iy0:iy1, ix0:ix1].sum() if iy1 > iy0 and ix1 > ix0 else 0
        out[v] = {"coverage": float(coverage), "purity": purity, "box_coverage": float(inside / foot.sum())}
    return out


def evaluate_ranges(
    truths: Sequence[StudyTruth],
    method: str | None = None,
    k: int = 15,
    z_margin_mm: float = DEFAULT_Z_MARGIN_MM,
    layout: str = "competition",
    box_mode: str = "auto",
    box_quantiles: tuple[str, str] = ("q10", "q90"),
    ranges: SliceRanges | None = None,
) -> dict[str, Any]:
    """Leave-one-out evaluation: learn from all studies but one, plan the one left out, score against its mask.

    With ``ranges`` given, no learning: every study is planned with those ranges (to check a shipped
    ``slice_ranges.json`` against new masks).

    Parameters
    ----------
    truths : list of StudyTruth
        At least two. For ``profile`` they need image profiles; the cue is measured from the left-out study's own
        profile at :func:`cue_indices` (the slices the planner would decode).
    method : str, optional
        Default: ``profile`` when every truth has a profile, else ``fraction``.
    k : int
        Slices per vertebra (``ModelConfig.slices_per_vertebra``).
    z_margin_mm, box_mode, box_quantiles
        As for :func:`plans_from_positions`.
    ranges : SliceRanges, optional
        Fixed ranges to evaluate instead of leave-one-out learning (``method`` defaults to ``ranges.method``).

    Returns
    -------
    dict
        ``{"method", "n_studies", "per_vertebra": {v: {"coverage", "purity", "box_coverage"}}, "mean": {...},
        "mean_box_area" (planned box area as a share of the image, mean over vertebrae and studies), "per_study": {uid: {v: {...}}}, "anchor_error_mm": [...] (profile only)}``.
    """
    if ranges is None and len(truths) < 2:
        raise ValueError(f"leave-one-out needs at least 2 masks, got {len(truths)}")
    if not truths:
        raise ValueError("no masks to evaluate")
    if method is None:
        if ranges is not None:
            method = ranges.method
        else:
            method = "profile" if all(t.profile is not None for t in truths) else "fraction"
    if method == "profile" and any(t.profile is None for t in truths):
        raise ValueError("method 'profile' needs the studies' images (--images) to measure the cue")
    if ranges is not None and method not in ranges.extra.get("methods", [ranges.method]):
        raise ValueError(f"the given ranges have no {method!r} data (learned: {ranges.extra.get('methods')})")
    per_study: dict[str, dict[str, dict[str, float]]] = {}
    anchor_errors: list[float | None] = []
    box_areas: list[float] = []
    for i, held in enumerate(truths):
        if ranges is not None:
            learned = ranges
        else:
            learned = ranges_from_truths([t for j, t in enumerate(truths) if j != i], method=method, layout=layout)
        anchor = point = None
        scale = 1.0
        if method == "profile":
            idx = cue_indices(held.n_slices, held.z_mm, learned.extra.get("cue"))
            cue = cue_from_measurements(held.z_mm[idx], held.profile[idx],
                                        None if held.centroids is None else held.centroids[idx], learned,
                                        (held.z_mm[0], held.z_mm[-1]), idx)
            anchor, point, scale = cue.anchor_mm, cue.point, cue.scale
            anchor_errors.append(None if anchor is None else float(anchor - held.anchor_mm))
        plans = plans_from_positions(held.z_mm, held.rows, held.cols, learned, k, z_margin_mm, method, anchor,
                                     pixel_spacing=held.spacing[1:], point=point, box_mode=box_mode,
                                     box_quantiles=box_quantiles, scale=scale)
        key = held.uid or f"study{i}"
        per_study[key] = score_plans(held, plans)
        box_areas.extend((p.box[2] - p.box[0]) * (p.box[3] - p.box[1]) / (held.rows * held.cols) for p in plans.values())
    keys = ("coverage", "purity", "box_coverage")
    per_vertebra = {
        v: {key: float(np.mean([s[v][key] for s in per_study.values()])) for key in keys} for v in VERTEBRAE
    }
    mean = {key: float(np.mean([per_vertebra[v][key] for v in VERTEBRAE])) for key in keys}
    result: dict[str, Any] = {
        "method": method,
        "leave_one_out": ranges is None,
        "n_studies": len(truths),
        "k": k,
        "z_margin_mm": z_margin_mm,
        "box_mode": box_mode,
        "per_vertebra": per_vertebra,
        "mean": mean,
        "mean_box_area": float(np.mean(box_areas)),
        "per_study": per_study,
    }
    if method == "profile":
        result["anchor_error_mm"] = anchor_errors
    return result
