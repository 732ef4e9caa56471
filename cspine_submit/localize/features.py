"""Per-slice image features of the ``profile`` method's cue: which slices to decode, and what to measure on them.

Axis convention as in :mod:`cspine_submit.localize`: slices ``(m, rows, cols)`` in HU, positions ``z_mm`` in mm
growing toward the feet.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

FEATURES: tuple[str, ...] = ("bone_area", "body_area")
"""Per-slice image features of the ``profile`` method: log1p of the area in cm^2 of HU >= ``BONE_HU`` and of
HU >= ``BODY_HU``."""

BONE_HU: float = 250.0
BODY_HU: float = -300.0
FEATURE_STRIDE: int = 2
"""In-plane pixel stride when measuring features (areas are scaled back): 4x fewer pixels, same profile."""

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
