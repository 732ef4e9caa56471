"""Scoring plans against truth: coverage, purity and box coverage per vertebra, and leave-one-out evaluation.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from cspine_submit.config import VERTEBRAE, SliceRanges
from cspine_submit.localize.align import alignment_check
from cspine_submit.localize.extents import StudyExtents, with_real_extents
from cspine_submit.localize.features import cue_indices
from cspine_submit.localize.learn import ranges_from_truths
from cspine_submit.localize.masks import StudyTruth
from cspine_submit.localize.plan import (
    DEFAULT_Z_MARGIN_MM,
    CropPlan,
    Cue,
    cue_from_measurements,
    plans_from_positions,
)

def score_plans(truth: StudyTruth, plans: Mapping[str, CropPlan]) -> dict[str, dict[str, float]]:
    """Coverage, purity and box coverage of one study's plans against its truth (pure).

    coverage
        Share of the vertebra's true slices inside the planned range (first to last planned slice).
    purity
        Share of the planned slices that contain the vertebra.
    box_coverage
        Share of the vertebra's mask voxels whose (y, x) lies inside the planned box.
    offset_mm
        Centre of the planned slices minus centre of the vertebra's true slices, mm (positive: planned too far
        toward the feet).
    start_error_mm, end_error_mm
        The planner's expected start (end) of the vertebra (``CropPlan.z_range_mm``, before the z margin) minus
        the position of its true first (last) slice, mm (positive: toward the feet); NaN when the plan has no
        ``z_range_mm``.
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
        z = truth.z_mm
        offset = 0.5 * (z[p_lo] + z[p_hi]) - 0.5 * (z[first] + z[last])
        start_err = end_err = float("nan")
        if plan.z_range_mm is not None:
            start_err, end_err = plan.z_range_mm[0] - z[first], plan.z_range_mm[1] - z[last]
        out[v] = {"coverage": float(coverage), "purity": purity, "box_coverage": float(inside / foot.sum()),
                  "offset_mm": float(offset), "start_error_mm": float(start_err), "end_error_mm": float(end_err)}
    return out


def evaluate_ranges(
    truths: Sequence[StudyTruth],
    method: str | None = None,
    *,
    k: int = 15,
    z_margin_mm: float = DEFAULT_Z_MARGIN_MM,
    layout: str = "competition",
    box_mode: str = "auto",
    box_quantiles: tuple[str, str] = ("q10", "q90"),
    ranges: SliceRanges | None = None,
    learn_from: Sequence[StudyTruth] | None = None,
    extents: Sequence[StudyExtents] | None = None,
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
    learn_from : list of StudyTruth, optional
        Learn from these instead of from ``truths``, leaving out every study with the held-out study's UID: the
        same patients written another way (e.g. whole volumes to learn from, competition-style cuts to test on)
        without the test patient ever teaching its own plan.
    extents : list of StudyExtents, optional
        With leave-one-out learning: each fold's ranges get their z-extents from this table of real masks'
        extents (:func:`~cspine_submit.localize.extents.with_real_extents`; needs ``profile``), as
        ``learn-ranges --extents`` learns them.

    Returns
    -------
    dict
        ``{"method", "n_studies", "per_vertebra": {v: {"coverage", "purity", "box_coverage", "abs_offset_mm"}},
        "mean": {...}, "mean_box_area" (planned box area as a share of the image, mean over vertebrae and studies),
        "per_study": {uid: {v: {"coverage", "purity", "box_coverage", "offset_mm", "start_error_mm",
        "end_error_mm"}}}, "study_summary": {uid: {"coverage", "purity", "box_coverage", "worst", "worst_offset_mm",
        "anchor_error_mm", "c1_top_error_mm", "c7_bottom_error_mm", "alignment_cost", "alignment_plausible"}}, "anchor_error_mm": [...] and "alignment_reference": {"cost_reference",
        "threshold"} (profile only; None for leave-one-out, whose folds carry no reference)}``. ``alignment_cost``
        is the cue's best alignment cost (``Cue.cost``); ``alignment_plausible`` compares it with the fixed
        ranges' leave-one-out reference (:func:`~cspine_submit.localize.align.alignment_check`; None without one).
    """
    method = _check_evaluation(truths, method, ranges=ranges, learn_from=learn_from)
    per_study: dict[str, dict[str, dict[str, float]]] = {}
    anchor_errors: list[float | None] = []
    alignments: list[dict | None] = []
    box_areas: list[float] = []
    for i, held in enumerate(truths):
        learned = _fold_ranges(truths, i, method, ranges=ranges, learn_from=learn_from, layout=layout)
        if extents is not None and ranges is None:
            learned = with_real_extents(learned, extents, table="evaluation")
        plans, cue = _plan_held(held, learned, method, k=k, z_margin_mm=z_margin_mm, box_mode=box_mode,
                                box_quantiles=box_quantiles)
        if cue is not None:
            anchor_errors.append(None if cue.anchor_mm is None else float(cue.anchor_mm - held.anchor_mm))
            # Judged against the reference only with fixed ranges (leave-one-out folds learn none).
            alignments.append(alignment_check(cue.cost, learned))
        key = held.uid or f"study{i}"
        per_study[key] = score_plans(held, plans)
        box_areas.extend((p.box[2] - p.box[0]) * (p.box[3] - p.box[1]) / (held.rows * held.cols) for p in plans.values())
    per_vertebra, mean = _summarise_vertebrae(per_study)
    result: dict[str, Any] = {
        "method": method,
        "leave_one_out": ranges is None,
        "learned_from": "fixed ranges" if ranges is not None else (
            "the other studies" if learn_from is None else f"{len(learn_from)} studies of another set, minus the "
                                                           "held-out study's UID"),
        "n_studies": len(truths),
        "k": k,
        "z_margin_mm": z_margin_mm,
        "box_mode": box_mode,
        "per_vertebra": per_vertebra,
        "mean": mean,
        "mean_box_area": float(np.mean(box_areas)),
        "per_study": per_study,
        "study_summary": _summarise_studies(per_study, anchor_errors, alignments),
    }
    if method == "profile":
        result["anchor_error_mm"] = anchor_errors
        result["alignment_reference"] = (
            None if ranges is None else {k: alignments[0][k] for k in ("cost_reference", "threshold")})
    return result


def _check_evaluation(truths: Sequence[StudyTruth], method: str | None, *, ranges: SliceRanges | None,
                      learn_from: Sequence[StudyTruth] | None) -> str:
    """The method :func:`evaluate_ranges` evaluates (its default resolved); ValueError when the inputs cannot
    give it."""
    if ranges is None and learn_from is None and len(truths) < 2:
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
    if ranges is not None and method == "profile":
        wanted = ranges.extra["profile_template"].get("feature_set", "areas")
        if any(t.feature_set != wanted for t in truths):
            raise ValueError(f"the given ranges' template uses {wanted!r} features but the studies were measured "
                             f"with {sorted({t.feature_set for t in truths})}: measure them with {wanted!r}")
    return method


def _fold_ranges(truths: Sequence[StudyTruth], i: int, method: str, *, ranges: SliceRanges | None,
                 learn_from: Sequence[StudyTruth] | None, layout: str) -> SliceRanges:
    """The ranges study ``i`` is planned with: ``ranges`` when fixed, else learned without it (leave-one-out)."""
    if ranges is not None:
        return ranges
    held = truths[i]
    if learn_from is not None:
        others = [t for t in learn_from if t.uid != held.uid]
        if not others:
            raise ValueError(f"nothing to learn from for {held.uid!r}: learn_from holds only that study")
    else:
        others = [t for j, t in enumerate(truths) if j != i]
    # No cost reference: it would learn once more per training study, and nothing here judges by it.
    return ranges_from_truths(others, method=method, layout=layout, with_cost_reference=False)


def _plan_held(held: StudyTruth, learned: SliceRanges, method: str, *, k: int, z_margin_mm: float, box_mode: str,
               box_quantiles: tuple[str, str]) -> tuple[dict[str, CropPlan], Cue | None]:
    """Plan one held-out study as the planner would (its cue measured from its own profile at the cue slices);
    returns the plans and the cue (None unless ``profile``)."""
    cue = None
    if method == "profile":
        idx = cue_indices(held.n_slices, held.z_mm, learned.extra.get("cue"))
        cue = cue_from_measurements(held.z_mm[idx], held.profile[idx],
                                    None if held.centroids is None else held.centroids[idx], learned,
                                    (held.z_mm[0], held.z_mm[-1]), indices=idx)
    plans = plans_from_positions(
        held.z_mm, held.rows, held.cols, learned, k, z_margin_mm=z_margin_mm, method=method,
        anchor_mm=None if cue is None else cue.anchor_mm, pixel_spacing=held.spacing[1:],
        point=None if cue is None else cue.point, box_mode=box_mode, box_quantiles=box_quantiles,
        scale=1.0 if cue is None else cue.scale, decoded=() if cue is None else cue.indices)
    return plans, cue


_SCORE_KEYS = ("coverage", "purity", "box_coverage")


def _summarise_vertebrae(per_study: Mapping[str, Mapping[str, Mapping[str, float]]]
                         ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per vertebra the mean scores over studies and the median absolute offset; and the mean over vertebrae."""
    per_vertebra = {
        v: {**{key: float(np.mean([s[v][key] for s in per_study.values()])) for key in _SCORE_KEYS},
            "abs_offset_mm": float(np.median([abs(s[v]["offset_mm"]) for s in per_study.values()]))}
        for v in VERTEBRAE
    }
    mean = {key: float(np.mean([per_vertebra[v][key] for v in VERTEBRAE])) for key in _SCORE_KEYS}
    return per_vertebra, mean


def _summarise_studies(per_study: Mapping[str, Mapping[str, Mapping[str, float]]],
                       anchor_errors: Sequence[float | None], alignments: Sequence[dict | None]) -> dict[str, dict]:
    """Per study the mean scores over vertebrae, the vertebra planned furthest off, the anchor error and the
    alignment check (``evaluate_ranges``'s ``study_summary``)."""
    study_summary = {}
    for (uid, scores), error, alignment in zip(per_study.items(), anchor_errors or [None] * len(per_study),
                                               alignments or [None] * len(per_study)):
        worst = max(VERTEBRAE, key=lambda v: abs(scores[v]["offset_mm"]))
        study_summary[uid] = {**{key: float(np.mean([scores[v][key] for v in VERTEBRAE])) for key in _SCORE_KEYS},
                              "worst": worst, "worst_offset_mm": scores[worst]["offset_mm"],
                              "anchor_error_mm": error, "c1_top_error_mm": scores["C1"]["start_error_mm"],
                              "c7_bottom_error_mm": scores["C7"]["end_error_mm"]}
        if alignment is not None:
            study_summary[uid].update(alignment_cost=alignment["cost"], alignment_plausible=alignment["plausible"])
    return study_summary
