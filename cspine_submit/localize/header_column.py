"""The header-only column model: the top of C1 and the bottom of C7 predicted from header facts, each vertebra
placed along that column by its learned column fractions (what the ``fraction`` fallback plans with when the
ranges carry one).

A study's z extent says little by itself about where its neck sits: the scan above C1 (5-73 mm in the
competition's masks) and below C7 (0-108 mm) vary independently of it. A fixed fraction of the extent per vertebra
edge (the old ``fraction`` ranges) cannot follow that; a small least-squares fit of the C1 top and the C7 bottom
(mm below the first slice) on an intercept, the z extent and the slice spacing can: the spacing stands for the
scanning protocol, which goes with how much head and chest a site scans. Measured leave-one-out on the 58
competition masks' geometry (3 mm margin, K = 15): coverage 0.758 / purity 0.634 against 0.747 / 0.615 for the
per-edge fractions (``benchmarks/bench_ranges.py``).

The fit is stored in ``SliceRanges.extra["header_column"]``; a file without that key plans with the per-edge
fractions as before.

Axis convention: positions are mm toward the feet; 0 is the study's first (most cranial) slice.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from cspine_submit.config import VERTEBRAE

HEADER_FEATURES: tuple[str, ...] = ("intercept", "extent_mm", "spacing_mm")
"""Regressors of the fit, in the order of its coefficients."""

MIN_STUDIES: int = 10
"""Fewer studies than this learn no column model (three coefficients per edge need a spread of studies to fit);
their ``fraction`` ranges plan with the per-edge fractions."""


def header_facts(z_mm: np.ndarray) -> tuple[float, float]:
    """(z extent, slice spacing) of a study in mm: last minus first position, median step (pure).

    Parameters
    ----------
    z_mm : (n,) ndarray
        Slice positions, mm toward the feet, increasing.
    """
    z = np.asarray(z_mm, dtype=float)
    extent = float(z[-1] - z[0])
    spacing = float(np.median(np.diff(z))) if len(z) > 1 else 0.0
    return extent, spacing


def _design(extent: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(extent), extent, spacing], axis=1)


def fit_header_column(z_list: Sequence[np.ndarray], z_ranges: Sequence[Mapping[str, tuple[int, int]]]
                      ) -> dict[str, Any] | None:
    """Learn the column model from studies' slice positions and vertebra slice ranges (pure).

    Parameters
    ----------
    z_list : sequence of (n_i,) ndarray
        Each study's slice positions, mm toward the feet.
    z_ranges : sequence of dict
        Each study's ``{vertebra: (first, last)}`` inclusive slice indices.

    Returns
    -------
    dict or None
        ``{"features", "c1_top_mm", "c7_bottom_mm" (coefficients), "feature_range" ({feature: [min, max]} of the
        studies learned from; a study whose spacing lies outside is planned with the per-edge fractions), "fractions" ({vertebra: {"top", "bottom"}}:
        mean place of each edge along the column, 0 = top of C1, 1 = bottom of C7), "residual_sd_mm" ({"c1_top",
        "c7_bottom"}, in-sample), "n_studies"}``; None with fewer than :data:`MIN_STUDIES` studies.
    """
    if len(z_list) < MIN_STUDIES:
        return None
    facts = np.array([header_facts(z) for z in z_list])
    tops = np.array([z[r["C1"][0]] - z[0] for z, r in zip(z_list, z_ranges)])
    bottoms = np.array([z[r["C7"][1]] - z[0] for z, r in zip(z_list, z_ranges)])
    x = _design(facts[:, 0], facts[:, 1])
    c_top = np.linalg.lstsq(x, tops, rcond=None)[0]
    c_bottom = np.linalg.lstsq(x, bottoms, rcond=None)[0]
    fractions = {}
    for v in VERTEBRAE:
        top_f, bottom_f = [], []
        for z, r, t, b in zip(z_list, z_ranges, tops, bottoms):
            top_f.append((z[r[v][0]] - z[0] - t) / (b - t))
            bottom_f.append((z[r[v][1]] - z[0] - t) / (b - t))
        fractions[v] = {"top": float(np.mean(top_f)), "bottom": float(np.mean(bottom_f))}
    return {
        "features": list(HEADER_FEATURES),
        "c1_top_mm": [float(c) for c in c_top],
        "c7_bottom_mm": [float(c) for c in c_bottom],
        "feature_range": {"extent_mm": [float(facts[:, 0].min()), float(facts[:, 0].max())],
                          "spacing_mm": [float(facts[:, 1].min()), float(facts[:, 1].max())]},
        "fractions": fractions,
        "residual_sd_mm": {"c1_top": float(np.std(tops - x @ c_top)),
                           "c7_bottom": float(np.std(bottoms - x @ c_bottom))},
        "n_studies": len(z_list),
    }


SPACING_TOLERANCE_MM: float = 0.01
"""A study's slice spacing within this of the learned range counts as inside it (headers round 0.3125 to 0.312)."""


def column_mm(z_mm: np.ndarray, model: Mapping[str, Any]) -> tuple[float, float] | None:
    """Predicted (top of C1, bottom of C7) of a study, mm in its ``z_mm`` frame (pure).

    None, and the caller plans with the per-edge fractions of the extent, when the study's slice spacing lies
    outside the range the model was learned on (the spacing stands for a scanning protocol, and the fit knows
    nothing of one it has not seen: a 1.25 mm study planned as the 1 mm ones misses its neck by 20 mm), or when
    the prediction is not a column (bottom not below top). The extent is used as it is: the column grows with it,
    as the per-edge fractions of the extent assume.
    """
    extent, spacing = header_facts(z_mm)
    lo, hi = model["feature_range"]["spacing_mm"]
    if not lo - SPACING_TOLERANCE_MM <= spacing <= hi + SPACING_TOLERANCE_MM:
        return None
    x = _design(np.array([extent]), np.array([spacing]))[0]
    z0 = float(np.asarray(z_mm, dtype=float)[0])
    top, bottom = float(x @ np.asarray(model["c1_top_mm"])), float(x @ np.asarray(model["c7_bottom_mm"]))
    if not bottom > top:
        return None
    return z0 + top, z0 + bottom


def vertebra_range_mm(column: tuple[float, float], model: Mapping[str, Any], vertebra: str) -> tuple[float, float]:
    """A vertebra's expected (start, end), mm: its learned column fractions of the predicted column (pure)."""
    top, bottom = column
    f = model["fractions"][vertebra]
    return top + f["top"] * (bottom - top), top + f["bottom"] * (bottom - top)
