"""Per-slice image features of the ``profile`` method's cue: which slices to decode, and what to measure on them.

Axis convention as in :mod:`cspine_submit.localize`: slices ``(m, rows, cols)`` in HU, positions ``z_mm`` in mm
growing toward the feet.

Two feature sets (``FEATURE_SETS``); a learned template records which one it was learned with, and the planner
measures the same one:

``column_cells`` (the default)
    Mean HU, clipped to ``CELL_CLIP_HU``, in an 8 x 8 grid of 15 mm cells centred on the cervical column
    (:func:`column_centre`), divided by ``CELL_HU_SCALE``. Measured in mm around the column, so it does not depend on
    the field of view or the pixel size, and a mean of HU is what a coarse voxel holds too, so it means the same at
    0.4 mm and at 5 mm pixels. The grid sees what pins the levels: the skull base and mastoids above C1, the
    mandible and hyoid in front of C2-C4, the airway, the first ribs, clavicles and lung apices around T1.
``areas`` (the earlier planner's; ranges files learned with it still plan)
    ``log1p`` of the bone area (HU >= ``BONE_HU``) and body area (HU >= ``BODY_HU``) of the whole slice, cm^2.
    Measured on real necks (issue 12) it cannot tell the levels apart: the whole-slice areas depend on the field of
    view and on how much of the shoulders is in it.
"""

from __future__ import annotations

from typing import Mapping

import cv2
import numpy as np

FEATURES: tuple[str, ...] = ("bone_area", "body_area")
"""The ``areas`` feature set: log1p of the area in cm^2 of HU >= ``BONE_HU`` and of HU >= ``BODY_HU``."""

BONE_HU: float = 250.0
BODY_HU: float = -300.0
FEATURE_STRIDE: int = 2
"""In-plane pixel stride when measuring features (areas are scaled back): 4x fewer pixels, same profile."""

FEATURE_SETS: tuple[str, ...] = ("column_cells", "areas")
DEFAULT_FEATURE_SET: str = "column_cells"

CELL_HALF_MM: float = 60.0
"""Half the side of the column-centred window (mm): wide enough for the mastoids and the first ribs, narrow enough
to stay inside a neck-sized field of view (160-240 mm) centred near the spine."""
CELL_MM: float = 15.0
CELL_CLIP_HU: tuple[float, float] = (-500.0, 1500.0)
"""HU clipped before averaging: dental metal and its streaks (3000 HU) would otherwise dominate a cell's mean."""
CELL_HU_SCALE: float = 500.0
AIR_HU: float = -1024.0

DEFAULT_CUE = {"max_slices": 40, "min_slices": 12, "step_mm": 5.0}
"""How many slices the ``profile`` method decodes at inference: about one every ``step_mm``, clipped."""


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
        bone = s >= BONE_HU
        # The median row and column of the bone pixels, from the counts per row and per column: the same numbers as
        # np.median over np.nonzero's coordinates, without listing the coordinates.
        rows = bone.sum(axis=1)
        if rows.sum() >= 4:
            out[i] = (_median_position(rows) * FEATURE_STRIDE, _median_position(bone.sum(axis=0)) * FEATURE_STRIDE)
    return out


def _median_position(counts: np.ndarray) -> float:
    """Median of the positions ``0 .. len(counts) - 1`` each repeated ``counts[j]`` times (np.median's convention:
    the mean of the two middle values when the total is even)."""
    cum = np.cumsum(counts)
    n = int(cum[-1])
    upper = int(np.searchsorted(cum, n // 2, side="right"))  # position of the value at sorted index n // 2
    if n % 2:
        return float(upper)
    lower = int(np.searchsorted(cum, n // 2 - 1, side="right"))
    return (lower + upper) / 2.0


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


def column_centre(centroids: np.ndarray) -> tuple[float, float] | None:
    """In-plane position of the cervical column from the bone centroids of evenly spaced slices of a whole study.

    The median, over the middle half of the slices (the neck, in a scan cut from the skull base to the upper
    thorax), of each slice's median bone position. Only the given slices count, so the learner and the planner,
    given the same cue slices, find the same centre.

    Parameters
    ----------
    centroids : (m, 2) ndarray
        :func:`bone_centroids` of the slices, ordered head to feet (NaN rows allowed).

    Returns
    -------
    (y, x) in pixels, or None when no slice of the middle half has bone.
    """
    c = np.asarray(centroids, dtype=float).reshape(-1, 2)
    m = len(c)
    if m == 0:
        return None
    middle = c[m // 4 : max(m // 4 + 1, m - m // 4)]
    ok = np.isfinite(middle).all(axis=1)
    if not ok.any():
        return None
    y, x = np.median(middle[ok], axis=0)
    return float(y), float(x)


def column_cells(
    slices: np.ndarray,
    pixel_spacing: tuple[float, float],
    centre: tuple[float, float],
    half_mm: float = CELL_HALF_MM,
    cell_mm: float = CELL_MM,
) -> np.ndarray:
    """The ``column_cells`` features: mean clipped HU in a grid of cells around the column, per slice.

    Parameters
    ----------
    slices : (m, rows, cols) ndarray
        HU.
    pixel_spacing : (dy, dx)
        mm.
    centre : (y, x)
        Column centre in pixels (:func:`column_centre`).
    half_mm, cell_mm : float
        The window is ``2 * half_mm`` mm square, cut in cells of ``cell_mm`` mm.

    Returns
    -------
    (m, n * n) ndarray of float64
        ``n = round(2 * half_mm / cell_mm)``; cell (i, j) (i toward posterior, j toward the patient's left) at
        column ``i * n + j``; mean HU / ``CELL_HU_SCALE``. Outside the image counts as air.
    """
    slices = np.asarray(slices)
    n = int(round(2 * half_mm / cell_mm))
    dy, dx = (float(pixel_spacing[0]), float(pixel_spacing[1]))
    cy, cx = centre
    rows, cols = slices.shape[1:]
    y0, y1 = int(round(cy - half_mm / dy)), int(round(cy + half_mm / dy))
    x0, x1 = int(round(cx - half_mm / dx)), int(round(cx + half_mm / dx))
    # Pad instead of clipping the window, so a cell keeps its size in mm at the image edge.
    pad = ((max(0, -y0), max(0, y1 - rows)), (max(0, -x0), max(0, x1 - cols)))
    needs_pad = any(pad[0]) or any(pad[1])
    lo, hi = CELL_CLIP_HU
    out = np.empty((len(slices), n * n))
    for i, s in enumerate(slices):
        window = np.clip(s[max(y0, 0):min(y1, rows), max(x0, 0):min(x1, cols)], lo, hi).astype(np.float32)
        if needs_pad:
            window = np.pad(window, pad, constant_values=max(AIR_HU, lo))
        # INTER_AREA averages every source pixel into its cell, for any (non-integer) ratio.
        out[i] = cv2.resize(window, (n, n), interpolation=cv2.INTER_AREA).ravel()
    return out / CELL_HU_SCALE


def measure_features(
    slices: np.ndarray,
    pixel_spacing: tuple[float, float],
    feature_set: str = DEFAULT_FEATURE_SET,
    *,
    centre: tuple[float, float] | None = None,
    half_mm: float = CELL_HALF_MM,
    cell_mm: float = CELL_MM,
) -> np.ndarray:
    """Per-slice cue features of ``feature_set`` (one of :data:`FEATURE_SETS`).

    Parameters
    ----------
    slices : (m, rows, cols) ndarray
        HU.
    pixel_spacing : (dy, dx)
        mm.
    centre : (y, x), optional
        Column centre for ``column_cells``; default :func:`column_centre` of the slices' :func:`bone_centroids`
        (the image centre when they hold no bone).
    half_mm, cell_mm : float
        The ``column_cells`` grid (:func:`column_cells`).

    Returns
    -------
    (m, F) ndarray of float64
    """
    if feature_set == "areas":
        return slice_features(slices, pixel_spacing)
    if feature_set == "column_cells":
        if centre is None:
            centre = column_centre(bone_centroids(slices))
        if centre is None:
            centre = (np.shape(slices)[1] / 2, np.shape(slices)[2] / 2)
        return column_cells(slices, pixel_spacing, centre, half_mm, cell_mm)
    raise ValueError(f"feature set {feature_set!r}: expected one of {list(FEATURE_SETS)}")
