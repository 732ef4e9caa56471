"""Learning slice ranges: several studies' truths -> :class:`~cspine_submit.config.SliceRanges` (JSON in and out).

Every method of :data:`METHODS` is learned at once (start/end quantiles per vertebra), with the in-plane box
quantiles and, when the studies' images were read, the ``profile`` template.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cspine_submit.config import VERTEBRAE, SliceRanges
from cspine_submit.localize.features import (
    BODY_HU,
    BONE_HU,
    CELL_CLIP_HU,
    CELL_HALF_MM,
    CELL_HU_SCALE,
    CELL_MM,
    DEFAULT_CUE,
    FEATURES,
    column_point,
    cue_indices,
)
from cspine_submit.localize.align import cost_reference, match_profile
from cspine_submit.localize.header_column import fit_header_column
from cspine_submit.localize.masks import StudyTruth, load_truths

METHODS: tuple[str, ...] = ("fraction", "mm_top", "profile")
"""Normalisations along z the learner records and the planner can use."""

QUANTILES: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
"""Quantiles stored for every learned quantity."""

TEMPLATE_STEP_MM: float = 2.0
DEFAULT_SCALES: tuple[float, ...] = tuple(round(0.8 + 0.02 * i, 3) for i in range(21))
"""Column-length scales (study / reference) the profile alignment tries, 0.80-1.20: the 11 real necks' columns
(C1 top to C7 bottom) measure 118-152 mm around a median of 137 mm (0.86-1.11), and a wider search costs little."""


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
    head-neck and neck-shoulder transitions of short and long necks line up. Beside the median, the spread
    (standard deviation over studies) of every feature at every position: the matcher weighs each feature by how
    consistently it marks a level (a cell over the mastoids is the same in every skull; one over the shoulders is
    not).

    Returns
    -------
    dict or None
        ``{"grid_mm": [...], "template": [[f0, f1, ...], ...], "spread": [[...], ...], "count": [...],
        "step_mm": ..., "feature_set": ...}``, None when no study has image features.

    Raises
    ------
    ValueError
        The studies' profiles were measured with different feature sets.
    """
    with_profile = [t for t in truths if t.profile is not None]
    if not with_profile:
        return None
    feature_sets = sorted({t.feature_set for t in with_profile})
    if len(feature_sets) > 1:
        raise ValueError(f"the studies' image profiles use different feature sets {feature_sets}: learn from one")
    feature_set = feature_sets[0]
    n_features = with_profile[0].profile.shape[1]
    rel = [study_coordinates(t, "profile", ref_length_mm=ref_length_mm) for t in with_profile]
    lo = math.floor(min(r.min() for r in rel) / step_mm) * step_mm
    hi = math.ceil(max(r.max() for r in rel) / step_mm) * step_mm
    grid = np.arange(lo, hi + step_mm / 2, step_mm)
    stack = np.full((len(with_profile), len(grid), n_features), np.nan)
    for i, (t, r) in enumerate(zip(with_profile, rel)):
        ok = np.isfinite(t.profile).all(axis=1)
        if ok.sum() < 2:
            continue
        for f in range(n_features):
            stack[i, :, f] = np.interp(grid, r[ok], t.profile[ok, f], left=np.nan, right=np.nan)
    count = np.isfinite(stack[:, :, 0]).sum(axis=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN grid columns; dropped just below
        template = np.nanmedian(stack, axis=0)
        spread = np.nanstd(stack, axis=0)
    keep = count > 0
    out = {
        "grid_mm": [round(float(g), 3) for g in grid[keep]],
        "template": [[round(float(v), 5) for v in row] for row in template[keep]],
        "spread": [[round(float(v), 5) for v in row] for row in spread[keep]],
        "count": [int(c) for c in count[keep]],
        "step_mm": step_mm,
        "feature_set": feature_set,
    }
    if feature_set == "areas":
        out.update(features=list(FEATURES), bone_hu=BONE_HU, body_hu=BODY_HU)
    else:
        out.update(cell_half_mm=CELL_HALF_MM, cell_mm=CELL_MM, clip_hu=list(CELL_CLIP_HU), hu_scale=CELL_HU_SCALE)
    return out


def ranges_from_truths(
    truths: Sequence[StudyTruth],
    method: str = "fraction",
    *,
    layout: str = "competition",
    source: str = "",
    cue: Mapping[str, float] | None = None,
    with_cost_reference: bool = True,
) -> SliceRanges:
    """Learn a :class:`SliceRanges` from the truths of several studies (pure; :func:`learn_ranges` wraps IO).

    ``per_vertebra[v]`` holds, for every method in :data:`METHODS` that can be learned here, the quantiles of the
    vertebra's start (first slice) and end (last slice) coordinate (``{"fraction": {"start": {...}, "end":
    {...}}, ...}``), the in-plane box quantiles as fractions of rows/columns (``"box": {"y0": {...}, ...}``) and
    its length in mm. ``extra`` holds the profile template (when images were read), the cue settings and, from
    :data:`~cspine_submit.localize.header_column.MIN_STUDIES` studies on, the header-only column model the
    ``fraction`` fallback plans with (``"header_column"``: :func:`~cspine_submit.localize.header_column.fit_header_column`).

    With ``method="profile"`` and ``with_cost_reference`` the template also gets ``"loo_cost"``: the alignment
    costs of the training studies, each aligned to the template learned without it (:func:`loo_alignment_costs`,
    summarised by :func:`~cspine_submit.localize.align.cost_reference`), what a normal new study costs. That
    learns ``n`` more sets of ranges; leave-one-out evaluation, which learns one per study itself, turns it off.
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
    header_column = fit_header_column([t.z_mm for t in truths], [t.z_ranges for t in truths])
    if header_column is not None:
        extra["header_column"] = header_column
    if template is not None:
        extra["profile_template"] = template
        extra["n_with_images"] = sum(t.profile is not None for t in truths)
        if method == "profile" and with_cost_reference:
            costs = [c for _, c in loo_alignment_costs(truths, cue=cue, layout=layout)]
            if costs:
                template["loo_cost"] = cost_reference(costs)
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


def loo_alignment_costs(truths: Sequence[StudyTruth], cue: Mapping[str, float] | None = None,
                        layout: str = "competition") -> list[tuple[str, float]]:
    """Alignment cost of every training study with images against the template learned without it.

    For each study with a profile: the ranges are learned from all the other studies exactly as
    :func:`ranges_from_truths` learns them (the same reference length, template and extents), its own cue
    features (the :func:`cue_indices` slices of its profile: what the planner would decode) are aligned to them by
    :func:`~cspine_submit.localize.align.match_profile`, and the best alignment's cost is kept. These are the
    costs of studies the template has never seen but that are normal: the reference a new study's cost is judged
    against.

    Returns
    -------
    list of (uid, cost)
        In the order of ``truths``; studies without a profile, or that could not be aligned at all, are left
        out; empty when fewer than two studies have images.
    """
    if sum(t.profile is not None for t in truths) < 2:
        return []
    out = []
    for i, held in enumerate(truths):
        if held.profile is None:
            continue
        others = [t for j, t in enumerate(truths) if j != i]
        learned = ranges_from_truths(others, method="profile", layout=layout, cue=cue, with_cost_reference=False)
        idx = cue_indices(held.n_slices, held.z_mm, learned.extra.get("cue"))
        anchor, _, cost = match_profile(held.z_mm[idx], held.profile[idx], learned,
                                        (float(held.z_mm[0]), float(held.z_mm[-1])))
        if anchor is not None and math.isfinite(cost):
            out.append((held.uid, float(cost)))
    return out


def learn_ranges(
    segmentations: str | Path,
    images: str | Path | None = None,
    *,
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
