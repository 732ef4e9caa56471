"""Planning the crops of one study: headers + learned :class:`~cspine_submit.config.SliceRanges` (+ the image cue)
-> ``{vertebra: CropPlan}``.

:func:`plans_from_positions` is the pure core; :func:`measure_cue` decodes and aligns the ``profile`` cue and
:func:`plan_crops` puts the two together for a :class:`~cspine_submit.read.dicom.StudyHeader`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from cspine_submit.config import VERTEBRAE, SliceRanges
from cspine_submit.localize.align import alignment_check, match_profile
from cspine_submit.localize.features import bone_centroids, column_centre, column_point, cue_indices, measure_features
from cspine_submit.localize.header_column import column_mm, vertebra_range_mm

DEFAULT_Z_MARGIN_MM: float = 3.0
"""The default of ``ModelConfig.z_margin_mm`` (see there why 3 mm)."""


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
    z_range_mm : (start, end) tuple of float, or None
        Where the planner expects the vertebra, mm toward the feet (``StudyHeader.z`` frame), before the z margin;
        None when the planner does not say. The run report shows it, and a range outside the scan gives the prior.
    """

    vertebra: str
    slice_indices: tuple[int, ...]
    box: tuple[int, int, int, int]
    z_range_mm: tuple[float, float] | None = None


def _range_mm(ranges: SliceRanges, vertebra: str, method: str, z: np.ndarray, anchor_mm: float | None, *,
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
    the anchor is None the learned ``fraction`` ranges are used instead (the fallback). ``fraction`` plans with
    the ranges' header-only column model when they carry one (``extra["header_column"]``: C1 top and C7 bottom
    from the study's extent and spacing, each vertebra at its column fractions;
    :mod:`~cspine_submit.localize.header_column`), else with the per-edge fractions of the extent.
    """
    method = method or ranges.method
    z = np.asarray(z_mm, dtype=float)
    if method == "profile" and anchor_mm is None:
        method = "fraction"
    model = ranges.extra.get("header_column")
    if method == "fraction" and model is not None:
        # The header-only column model (localize.header_column); files learned before it have none and keep the
        # per-edge fractions, as does a study at a spacing the model was not learned on (column_mm says None).
        column = column_mm(z, model)
        if column is not None:
            return {v: vertebra_range_mm(column, model, v) for v in VERTEBRAE}
    return {v: _range_mm(ranges, v, method, z, anchor_mm, scale=scale) for v in VERTEBRAE}


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


SNAP_SLICES: int = 1
"""A planned crop slice moves to an already decoded (cue) slice at most this many slices away."""


def snap_to_decoded(indices: Sequence[int], decoded: Sequence[int], max_shift: int = SNAP_SLICES) -> tuple[int, ...]:
    """Move interior planned slices onto slices already decoded for the cue, when one lies within ``max_shift`` (pure).

    Each saved slice is one decode fewer. The first and last planned slices stay (they set the vertebra's
    coverage), the order stays strictly increasing, and no slice is used twice; a neighbouring slice of the same
    vertebra shows the same anatomy at 1 mm slices.

    Parameters
    ----------
    indices : sequence of int
        Planned slice indices, strictly increasing (:func:`indices_in_range`).
    decoded : sequence of int
        Slices already decoded (the cue's), any order.

    Returns
    -------
    tuple of int, strictly increasing, the same length as ``indices``.
    """
    out = [int(i) for i in indices]
    if len(out) < 3 or not len(decoded):
        return tuple(out)
    pool = np.unique(np.asarray(decoded, dtype=int))
    for j in range(1, len(out) - 1):
        i = out[j]
        k = int(np.clip(np.searchsorted(pool, i), 0, len(pool) - 1))
        near = min((pool[m] for m in (k - 1, k) if 0 <= m < len(pool)), key=lambda p: abs(int(p) - i))
        if abs(int(near) - i) <= max_shift and out[j - 1] < near < out[j + 1]:
            out[j] = int(near)
    return tuple(out)


BOX_MODES: tuple[str, ...] = ("fraction", "mm_centre", "mm_bone")
"""How the in-plane box is placed: learned fractions of rows/columns; learned mm offsets from the image centre
(headers only; right when the pixel size varies); learned mm offsets from the column's bone centroid measured on
the ``profile`` cue slices."""


def planned_box(
    ranges: SliceRanges,
    vertebra: str,
    rows: int,
    cols: int,
    *,
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
    *,
    z_margin_mm: float = DEFAULT_Z_MARGIN_MM,
    method: str | None = None,
    anchor_mm: float | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    point: tuple[float, float] | None = None,
    box_mode: str = "auto",
    box_quantiles: tuple[str, str] = ("q10", "q90"),
    scale: float = 1.0,
    decoded: Sequence[int] = (),
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
    decoded : sequence of int
        Slices already decoded (the cue's): interior crop slices snap onto them (:func:`snap_to_decoded`).
    """
    mm = planned_ranges_mm(z_mm, ranges, method, anchor_mm, scale)
    plans = {}
    for v in VERTEBRAE:
        start, end = mm[v]
        idx = snap_to_decoded(indices_in_range(z_mm, start - z_margin_mm, end + z_margin_mm, k), decoded)
        box = planned_box(ranges, v, rows, cols, pixel_spacing=pixel_spacing, point=point, mode=box_mode,
                          quantiles=box_quantiles)
        plans[v] = CropPlan(vertebra=v, slice_indices=idx, box=box, z_range_mm=(float(start), float(end)))
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
    *,
    indices: Sequence[int] = (),
) -> Cue:
    """Align measured cue features (pure): column centre, then column point from the centroids in its range.

    An alignment whose cost is implausible next to the training studies' (:func:`alignment_check`: above the
    threshold stored with the template) is not used: the plan falls back to the header-only ``fraction`` ranges
    (learned from real masks' geometry in the shipped file), and ``Cue.fallback`` says why; ``Cue.cost`` keeps
    the cost for the report.
    """
    anchor, scale, cost = match_profile(z_cue, features, ranges, study_z)
    if anchor is not None:
        judged = alignment_check(cost, ranges)
        if judged["plausible"] is False:
            return Cue(indices=tuple(int(i) for i in indices), anchor_mm=None, scale=1.0, point=None, cost=cost,
                       fallback=f"fraction ranges (the z profile aligned implausibly: cost {cost:.2f} above "
                                f"{judged['threshold']:.2f})")
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
        ``read(header, indices) -> (m, rows, cols) HU``; default :func:`cspine_submit.read.dicom.read_slices`.
    slices : (m, rows, cols) ndarray, optional
        HU of the slices ``cue_indices(header.n_slices, header.z, ranges.extra["cue"])``, if already decoded.
    """
    idx = cue_indices(header.n_slices, header.z, ranges.extra.get("cue"))
    if slices is None:
        if read is None:
            from cspine_submit.read.dicom import read_slices as read
        slices = read(header, idx)
    cents = bone_centroids(slices)
    feats = cue_features(slices, header.spacing[1:], ranges, centroids=cents)
    return cue_from_measurements(header.z[idx], feats, cents, ranges, (float(header.z[0]), float(header.z[-1])),
                                 indices=idx)


def cue_features(slices: np.ndarray, pixel_spacing: tuple[float, float], ranges: SliceRanges,
                 centroids: np.ndarray | None = None) -> np.ndarray:
    """The cue slices' features in the feature set (and cell grid) the ranges' template was learned with.

    Parameters
    ----------
    slices : (m, rows, cols) ndarray
        HU of the study's cue slices (:func:`study_cue_indices`), head to feet.
    pixel_spacing : (dy, dx)
        mm.
    centroids : (m, 2) ndarray, optional
        :func:`~cspine_submit.localize.features.bone_centroids` of ``slices``, when the caller has them already
        (they give the column centre).

    Returns
    -------
    (m, F) ndarray
    """
    tpl = ranges.extra["profile_template"]
    feature_set = tpl.get("feature_set", "areas")  # files learned before feature sets existed hold areas
    if feature_set != "column_cells":
        return measure_features(slices, pixel_spacing, feature_set)
    centre = column_centre(bone_centroids(slices) if centroids is None else centroids)
    return measure_features(slices, pixel_spacing, feature_set, centre=centre,
                            half_mm=float(tpl["cell_half_mm"]), cell_mm=float(tpl["cell_mm"]))


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
    cannot be aligned the ``fraction`` ranges are used. Interior crop slices within one slice of a cue slice move
    onto it (:func:`snap_to_decoded`: those need no decode of their own). The in-plane box is placed by
    :func:`planned_box` in ``auto`` mode (around the column's bone centroid with a cue, else in mm from the image
    centre).

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
        header.z, header.rows, header.cols, ranges, config.slices_per_vertebra, z_margin_mm=z_margin_mm,
        method=ranges.method, anchor_mm=anchor, pixel_spacing=(float(header.spacing[1]), float(header.spacing[2])), point=point, scale=scale,
        decoded=cue.indices if cue is not None else (),
    )
