"""Aligning a study's measured cue features to the learned ``profile`` template: the column centre, the column
length scale and the cost of the best alignment (:func:`match_profile`).

Its own module so that learning (the leave-one-out cost reference stored with the template,
:mod:`~cspine_submit.localize.learn`) and planning (:mod:`~cspine_submit.localize.plan`) align the same way.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from cspine_submit.config import SliceRanges

SPREAD_FLOOR: float = 0.1
"""Added to a template spread before weighting (in feature units: 50 HU for ``column_cells``), so that a cell that
happened to agree across the training studies cannot dominate the match."""

OFF_TEMPLATE_COST: float = 1.5
"""Cost of a measured slice that falls outside the learned template (``column_cells``), in the units of a slice's
weighted mean squared difference (about 0.5-1 for a slice at its right level)."""

MIN_TEMPLATE_STUDIES: int = 3
"""Template positions learned from fewer studies than this (or than all of them, when fewer) are not matched."""


def _grid_cells(r: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid cell ``i`` (``grid[i] <= r <= grid[i + 1]``, clipped to the grid) and the fraction ``t`` in [0, 1] of
    each position ``r`` (any shape) along it: linear interpolation at ``r`` is ``(1 - t) * row[i] + t * row[i + 1]``."""
    i = np.clip(np.searchsorted(grid, r) - 1, 0, len(grid) - 2)
    t = np.clip((r - grid[i]) / (grid[i + 1] - grid[i]), 0.0, 1.0)
    return i, t


def _interp_rows(r: np.ndarray, grid: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Linear interpolation of the rows of ``table`` (G, F) at positions ``r`` (any shape) on ``grid`` (G,)."""
    i, t = _grid_cells(r, grid)
    t = t[..., None]
    return table[i] * (1.0 - t) + table[i + 1] * t


class WeightedSquares:
    """``sum_F W(r) * (f_j - T(r))**2`` for every measured slice ``j`` at any template position ``r``, cheaply.

    ``T`` (template) and ``W`` (weights) are interpolated linearly between grid positions, so inside grid cell
    ``i`` at fraction ``t`` the sum is a cubic in ``t`` whose four coefficients depend only on ``(j, i)``. They
    are computed once per study with a few ``(m, F) @ (F, G)`` products; each of the many candidate alignments
    then costs a gather and a polynomial per slice instead of an ``(m, F)`` interpolation (about 10x faster on
    the real necks; same costs to about 1e-12 relative).

    Parameters
    ----------
    features : (m, F) ndarray
        The measured slices' features ``f``.
    template, weights : (G, F) ndarray
        At the template's grid positions.
    """

    def __init__(self, features: np.ndarray, template: np.ndarray, weights: np.ndarray):
        f = np.asarray(features, dtype=float)
        a, c = weights[:-1], template[:-1]  # the cell's start
        dw, dt = weights[1:] - a, template[1:] - c  # and its slope per unit t
        f2 = f * f
        # sum W f^2 - 2 sum W T f + sum W T^2, each term a polynomial in t.
        self._f_terms = (
            f2 @ a.T - 2.0 * (f @ (a * c).T),  # t^0, (m, G-1)
            f2 @ dw.T - 2.0 * (f @ (a * dt + dw * c).T),  # t^1
            -2.0 * (f @ (dw * dt).T),  # t^2
        )
        self._t_terms = (  # sum_F W T^2 = sum (a + t dw)(c + t dt)^2, (G-1,) each
            (a * c * c).sum(axis=1),
            (dw * c * c + 2.0 * a * c * dt).sum(axis=1),
            (a * dt * dt + 2.0 * dw * c * dt).sum(axis=1),
            (dw * dt * dt).sum(axis=1),
        )

    def at(self, cells: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The sums for slice ``j`` (last axis) at cells ``cells`` and fractions ``t``, both ``(..., m)``."""
        j = np.arange(cells.shape[-1])
        f0, f1, f2 = (term[j, cells] for term in self._f_terms)
        t0, t1, t2, t3 = (term[cells] for term in self._t_terms)
        return (f0 + t0) + t * ((f1 + t1) + t * ((f2 + t2) + t * t3))


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
    the template features. For ``column_cells`` templates each squared difference is divided by the feature's
    learned spread there (squared, plus :data:`SPREAD_FLOOR` squared), so that consistent landmarks count and
    variable ones barely, and a slice off the template costs :data:`OFF_TEMPLATE_COST`. For ``areas`` templates
    each feature gets a free constant offset instead (log areas: the offset is the patient's size). Candidates keep C1's expected top and C7's expected
    bottom inside the study, give or take 10 mm (a cervical-spine CT contains its cervical spine) and need half the
    measured slices on the template.

    Parameters
    ----------
    z_mm : (m,) ndarray
        Positions (mm, toward the feet) of the measured slices.
    features : (m, F) ndarray
        :func:`~cspine_submit.localize.features.measure_features` of those slices, in the template's feature set.
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
    weights = None
    if tpl.get("feature_set") == "column_cells":
        count = np.asarray(tpl["count"])
        enough = count >= min(MIN_TEMPLATE_STUDIES, int(count.max()))
        grid, template = grid[enough], template[enough]
        weights = 1.0 / (np.asarray(tpl["spread"], dtype=float)[enough] ** 2 + SPREAD_FLOOR**2)
    if features.shape[1] != template.shape[1]:
        raise ValueError(f"{features.shape[1]} features per slice, but the template has {template.shape[1]}")
    scales = np.asarray(ranges.extra.get("scales", [1.0]), dtype=float)
    pv = ranges.per_vertebra
    c1_top = pv["C1"]["profile"]["start"]["q50"]
    c7_bottom = pv["C7"]["profile"]["end"]["q50"]
    ok = np.isfinite(features).all(axis=1)
    z, f = np.asarray(z_mm, float)[ok], np.asarray(features, float)[ok]
    min_points = max(4, int(0.5 * len(z)))
    slack = 10.0
    best: tuple[float | None, float, float] = (None, 1.0, np.inf)
    if len(grid) < 2:
        return best
    squares = None if weights is None else WeightedSquares(f, template, weights)
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
        with np.errstate(invalid="ignore", divide="ignore"):
            if weights is None:
                resid = np.where(inside[..., None], f[None] - _interp_rows(r, grid, template), 0.0)  # (A, m, F)
                mean = resid.sum(axis=1) / n_in[:, None]
                sq = np.where(inside[..., None], (resid - mean[:, None, :]) ** 2, 0.0)
                cost = sq.sum(axis=(1, 2)) / (n_in * f.shape[1])
            else:
                sq = np.where(inside, squares.at(*_grid_cells(r, grid)), 0.0)  # (A, m)
                # Slices off the template pay a fixed price: otherwise shrinking the column until the awkward
                # slices (skull, shoulders) fall off the template's ends would be the cheapest fit.
                cost = (sq.sum(axis=1) / f.shape[1] + OFF_TEMPLATE_COST * (len(z) - n_in)) / len(z)
        cost = np.where(n_in >= min_points, cost, np.inf)
        i = int(np.argmin(cost))
        if cost[i] < best[2]:
            best = (float(anchors[i]), float(s), float(cost[i]))
    return best


def cost_reference(costs: Sequence[float]) -> dict[str, Any]:
    """Summary of normal studies' alignment costs (JSON-safe): ``{"n", "q50", "q90", "max", "values"}``.

    Parameters
    ----------
    costs : sequence of float
        :func:`match_profile` costs of studies the template did not learn from (the training studies'
        leave-one-out costs, :func:`~cspine_submit.localize.learn.loo_alignment_costs`), finite.
    """
    a = np.asarray(costs, dtype=float)
    if a.size == 0 or not np.isfinite(a).all():
        raise ValueError(f"a cost reference needs finite costs, got {list(costs)}")
    return {"n": int(a.size), "q50": round(float(np.quantile(a, 0.5)), 4), "q90": round(float(np.quantile(a, 0.9)), 4),
            "max": round(float(a.max()), 4), "values": [round(float(v), 4) for v in a]}


IMPLAUSIBLE_FACTOR: float = 3.0
"""A study whose alignment cost exceeds this many times the largest leave-one-out cost of the training studies
(``profile_template["loo_cost"]["max"]``) is flagged as implausibly aligned.

Measured with the shipped real-neck ranges (leave-one-out costs 0.74-2.83, median 1.00, max 2.83; threshold 8.5):

- 33 competition-style cuts of the same 11 necks (3 seeds, 512 px): 0.46-1.88, but for one cut at 10.5, whose
  cue cells were centred 38 mm off the spine (the field of view cuts the front of that neck). Its plan was right
  (coverage 0.96), its box the worst of the set (0.86). With each cut's own patient left out of the template:
  0.54-2.76, at most 1.45x that template's own reference max;
- 9 unlabelled whole OpenKBP volumes (head to chest): 1.1-6.4 (2.2x), and 13.7 (4.8x) for pt_6, blanked to air
  outside a box around the head, whose plan is far too low;
- the 11 cuts blanked to air below C6 / C4 / C2: 6.3-11.8 / 12.2-18.0 / 19.8-26.7, plans 39 mm off (median);
- synthetic studies with the demo ranges (leave-one-out 0.18-5.09, threshold 15.3): 12 test studies 0.21-5.85.

Three times sits above every normal study measured but that one cut, with a third of margin over the whole volumes,
and flags every study blanked below C4 or C2, 5 of the 11 blanked below C6, and pt_6. Slices blanked to water
(0 HU) instead of air slip through (1.5-6.4): they can fall off the template at its fixed price."""


def cost_threshold(reference: Mapping[str, Any] | None) -> float | None:
    """The cost above which an alignment is implausible, from a :func:`cost_reference`; None without one."""
    if not reference or not reference.get("max"):
        return None
    return round(IMPLAUSIBLE_FACTOR * float(reference["max"]), 4)


def alignment_check(cost: float | None, ranges: SliceRanges) -> dict[str, Any]:
    """How a study's alignment cost compares with what normal studies cost (the report's ``plan.alignment``).

    Parameters
    ----------
    cost : float or None
        :func:`match_profile` cost of the study's best alignment (``Cue.cost``); None when it could not be aligned.
    ranges : SliceRanges
        ``profile`` ranges; ``extra["profile_template"]["loo_cost"]`` is the reference when they carry one (files
        learned before it existed do not: then nothing can be judged).

    Returns
    -------
    dict
        ``{"cost", "cost_reference": {"n", "q50", "q90", "max"} or None, "threshold": float or None,
        "plausible": bool or None, "warning": str or None}``; ``plausible`` is None when there is no cost or no
        reference, ``warning`` says what is wrong when it is False.
    """
    reference = ranges.extra.get("profile_template", {}).get("loo_cost")
    threshold = cost_threshold(reference)
    out: dict[str, Any] = {
        "cost": None if cost is None else round(float(cost), 4),
        "cost_reference": None if not reference else {k: reference[k] for k in ("n", "q50", "q90", "max")},
        "threshold": threshold,
        "plausible": None,
        "warning": None,
    }
    if cost is None or threshold is None:
        return out
    out["plausible"] = bool(cost <= threshold)
    if not out["plausible"]:
        out["warning"] = (
            f"implausible profile alignment: cost {cost:.2f} > {threshold:.2f} ({IMPLAUSIBLE_FACTOR:g} x the largest "
            f"leave-one-out cost of the {reference['n']} training studies, {reference['max']:.2f}; their median "
            f"{reference['q50']:.2f}): the cue slices do not look like the learned neck, so the planned ranges may be "
            "far off (the study is still scored; look at it with `cspine-submit preview`)")
    return out
