"""Cutting and resampling an axial CT volume the way competition scans are cut (pure functions on arrays).

Axis convention: ``volume : (z, y, x) ndarray``, z from head to feet, y toward the patient's back, x toward the
patient's left; positions in mm are measured from the centre of voxel ``(0, 0, 0)`` along those axes
(``z_mm = k * dz``, ``y_mm = j * dy``, ``x_mm = i * dx``).

A :class:`CutSpec` says which box of the source to keep and on what grid: slices from ``z_start_mm`` to
``z_end_mm`` every ``slice_mm``, and a square in-plane field of view of ``fov_mm`` centred at ``centre_yx_mm``
sampled on a ``size x size`` matrix (pixel centres at ``centre - fov/2 + (j + 0.5) * fov / size``).
:func:`resample_volume` applies it (HU by trilinear interpolation, labels by nearest neighbour; outside the source
is air / label 0); :func:`competition_cut` draws a spec the way competition scans are cut (skull base to upper
thorax, a neck-sized field of view), from the vertebra labels and a seeded generator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from cspine_submit.datasets import real_geometry

REAL = "real"
"""A cut parameter given as this string is drawn from the competition's own distributions
(:mod:`cspine_submit.datasets.real_geometry`)."""

AIR_HU = -1024.0
"""HU given to output voxels outside the source volume."""

_SNAP = 1e-6  # source positions this close to a voxel centre are taken as that centre, so native grids copy exactly


@dataclass(frozen=True)
class CutSpec:
    """Which part of a source axial volume to keep, and the output grid.

    Attributes
    ----------
    z_start_mm, z_end_mm : float
        Position of the first and (at most) last output slice, mm from the source's first slice toward the feet.
    slice_mm : float
        Output slice spacing, mm.
    fov_mm : float
        Side of the square in-plane field of view, mm.
    centre_yx_mm : (float, float)
        Centre of the field of view in source mm (y toward posterior, x toward the patient's left).
    size : int
        Output rows = columns; the output pixel spacing is ``fov_mm / size``.
    thickness_mm : float or None
        SliceThickness to write, mm (None: the slice spacing).
    """

    z_start_mm: float
    z_end_mm: float
    slice_mm: float
    fov_mm: float
    centre_yx_mm: tuple[float, float]
    size: int
    thickness_mm: float | None = None

    def __post_init__(self):
        if not self.slice_mm > 0 or not self.fov_mm > 0 or int(self.size) < 1:
            raise ValueError(f"cut spec needs slice_mm > 0, fov_mm > 0, size >= 1; got {self}")
        if self.z_end_mm < self.z_start_mm:
            raise ValueError(f"cut spec z_end_mm {self.z_end_mm} is above z_start_mm {self.z_start_mm}")

    @property
    def pixel_mm(self) -> float:
        """Output in-plane pixel spacing, mm."""
        return self.fov_mm / self.size

    @property
    def n_slices(self) -> int:
        """Number of output slices."""
        return int(np.floor((self.z_end_mm - self.z_start_mm) / self.slice_mm + _SNAP)) + 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """Output volume shape (z, y, x)."""
        return (self.n_slices, int(self.size), int(self.size))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Output spacing (dz, dy, dx), mm."""
        return (float(self.slice_mm), self.pixel_mm, self.pixel_mm)

    def first_pixel_mm(self) -> tuple[float, float]:
        """Source mm (y, x) of the centre of output pixel (0, 0)."""
        half = self.fov_mm / 2 - self.pixel_mm / 2
        return (self.centre_yx_mm[0] - half, self.centre_yx_mm[1] - half)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["centre_yx_mm"] = [float(v) for v in self.centre_yx_mm]
        if d["thickness_mm"] is None:
            del d["thickness_mm"]  # the spacing: the record reads as it did before the field existed
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CutSpec":
        d = dict(d)
        d["centre_yx_mm"] = tuple(float(v) for v in d["centre_yx_mm"])
        return cls(**d)


def source_positions(spec: CutSpec, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fractional source voxel index of every output slice, row and column.

    Parameters
    ----------
    spec : CutSpec
    spacing : (dz, dy, dx)
        Source spacing, mm.

    Returns
    -------
    tz : (n_slices,) ndarray, ty : (size,) ndarray, tx : (size,) ndarray
        Index positions along the source's z, y and x axes (``1.5`` is midway between voxels 1 and 2).
    """
    dz, dy, dx = (float(s) for s in spacing)
    y0, x0 = spec.first_pixel_mm()
    steps = np.arange(spec.size, dtype=np.float64) * spec.pixel_mm
    tz = (spec.z_start_mm + np.arange(spec.n_slices, dtype=np.float64) * spec.slice_mm) / dz
    out = []
    for t in (tz, (y0 + steps) / dy, (x0 + steps) / dx):
        near = np.rint(t)
        out.append(np.where(np.abs(t - near) < _SNAP, near, t))
    return out[0], out[1], out[2]


def linear_weights(t: np.ndarray, n: int) -> np.ndarray:
    """Linear interpolation along one axis as a matrix: ``out = W @ a`` samples ``a`` at fractional indices ``t``.

    Parameters
    ----------
    t : (m,) ndarray
        Source index positions.
    n : int
        Source length.

    Returns
    -------
    (m, n) float32 ndarray
        At most two non-zero weights per row; a row loses the weight of a neighbour beyond the source's ends, so
        that applied to ``a - fill`` (then ``+ fill``) positions outside blend into ``fill``.
    """
    t = np.asarray(t, dtype=np.float64)
    i0 = np.floor(t).astype(np.int64)
    w1 = t - i0
    weights = np.zeros((len(t), n), dtype=np.float64)
    rows = np.arange(len(t))
    for i, w in ((i0, 1.0 - w1), (i0 + 1, w1)):
        ok = (i >= 0) & (i < n) & (w > 0)
        np.add.at(weights, (rows[ok], i[ok]), w[ok])
    return weights.astype(np.float32)


def _nearest_index(t: np.ndarray, n: int) -> np.ndarray:
    """Nearest source index of each position (halves round up), into the source padded by one voxel each side:
    ``i + 1`` inside ``[0, n)``, 0 (the padding) outside."""
    i = np.floor(t + 0.5).astype(np.int64)
    return np.where((i >= 0) & (i < n), i + 1, 0)


def resample_volume(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    spec: CutSpec,
    labels: np.ndarray | None = None,
    chunk: int = 32,
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """Cut and resample an axial volume (and its labels) onto a spec's grid.

    Parameters
    ----------
    volume : (z, y, x) ndarray
        HU, z from head to feet, y toward posterior, x toward the patient's left.
    spacing : (dz, dy, dx)
        Source spacing, mm.
    spec : CutSpec
    labels : (z, y, x) integer ndarray, optional
        Label volume on the same grid as ``volume``.
    chunk : int
        Output slices resampled at a time (bounds the temporaries to a few chunks of output).

    Returns
    -------
    hu : (n_slices, size, size) float32 ndarray
        Trilinear interpolation of ``volume``; voxels outside the source are -1024 HU (within one source voxel of
        its edge they blend into it). Where the grid falls on source voxels the values are copied exactly.
    labels : (n_slices, size, size) ndarray of ``labels.dtype``, or None
        Nearest neighbour; 0 outside the source.
    spacing : (dz, dy, dx)
        Output spacing, mm.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D (z, y, x) volume, got shape {volume.shape}")
    if labels is not None and labels.shape != volume.shape:
        raise ValueError(f"labels {labels.shape} and volume {volume.shape} differ in shape")
    tz, ty, tx = source_positions(spec, spacing)
    wz, wy, wx = (linear_weights(t, n) for t, n in zip((tz, ty, tx), volume.shape))
    # Trilinear = three 1-D linear maps, applied as matrix products (BLAS) to the volume minus the fill value, so
    # that what falls outside the source blends into air; an exact grid point has one weight of 1.0 (a copy).
    fill = np.float32(AIR_HU)
    used = np.flatnonzero(wz.any(axis=0))
    src = volume[used[0] : used[-1] + 1].astype(np.float32) - fill if used.size else None
    hu = np.full(spec.shape, fill, dtype=np.float32)
    for s in range(0, spec.n_slices, chunk):
        if src is None:
            break
        # tensordot reshapes to one 2-D product (a single BLAS call); batched matmul is about 10x slower here.
        slab = np.tensordot(wz[s : s + chunk, used[0] : used[-1] + 1], src, axes=(1, 0))
        slab = np.tensordot(slab, wx, axes=(2, 1))
        hu[s : s + chunk] += np.tensordot(wy, slab, axes=(1, 1)).transpose(1, 0, 2)
    out_labels = None
    if labels is not None:
        # One gather from the labels padded with a ring of 0: positions outside the source pick the ring.
        padded = np.pad(labels, 1)
        index = [_nearest_index(t, n) for t, n in zip((tz, ty, tx), labels.shape)]
        out_labels = padded[np.ix_(*index)]
    return hu, out_labels, spec.spacing


def cut_index_range(first: int, last: int, t: np.ndarray) -> tuple[int, int] | None:
    """Output indices whose nearest source index lies in ``[first, last]`` (the labels' mapping, one axis).

    Parameters
    ----------
    first, last : int
        Inclusive source index range (e.g. a vertebra's slices).
    t : (n,) ndarray
        Source positions of the output grid along that axis (from :func:`source_positions`).

    Returns
    -------
    (int, int) or None
        Inclusive output range, or None when no output index maps into it.
    """
    i = np.floor(np.asarray(t) + 0.5)
    hit = np.flatnonzero((i >= first) & (i <= last))
    return (int(hit[0]), int(hit[-1])) if hit.size else None


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = (float(v) for v in lo_hi)
    return lo if hi <= lo else float(rng.uniform(lo, hi))


def competition_cut(
    labels: np.ndarray,
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    *,
    size: int = 512,
    slice_mm: float | str | None = REAL,
    head_mm: tuple[float, float] | str = REAL,
    chest_mm: tuple[float, float] | str = REAL,
    fov_mm: tuple[float, float] | str = REAL,
    jitter_mm: float = 5.0,
) -> CutSpec:
    """Draw a cut the way competition scans are cut: skull base to upper thorax, a neck-sized field of view.

    The first slice lies ``head_mm`` above the top of C1 and the last ``chest_mm`` below the bottom of C7 (both
    clipped to the volume); the square field of view (``fov_mm`` wide) is centred on the in-plane centre of the
    C1-C7 labels' bounding box, moved by up to ``jitter_mm`` along each axis. Each of ``slice_mm``, ``head_mm`` /
    ``chest_mm`` and ``fov_mm`` is :data:`REAL` (the default: drawn like the competition's studies, see
    :mod:`~cspine_submit.datasets.real_geometry`: the spacing with its SliceThickness, the scan above C1 and below C7
    together from one real masked study, the field of view as a real pixel spacing times 512) or fixed: a range
    to draw uniformly from (the margins, the field of view), a spacing in mm, or None to keep the source slices.

    Parameters
    ----------
    labels : (z, y, x) integer ndarray
        Vertebra labels, z from head to feet, 1-7 = C1-C7.
    spacing : (dz, dy, dx)
        Source spacing, mm.
    rng : numpy.random.Generator
        The draws, always in the same order (head, chest, field of view, y jitter, x jitter, then the real draws:
        margins, pixel spacing, spacing): same seed, same cut; ranges draw what they drew before real draws existed.
    size : int
        Output matrix (rows = columns).
    slice_mm : float, "real" or None
        Output slice spacing, mm; None keeps the source slices (the cut's ends snap outward onto them).

    Raises
    ------
    ValueError
        C1 or C7 missing, or C1 not above C7 (labels not head to feet).
    """
    dz, dy, dx = (float(s) for s in spacing)
    c1_top, c7_bottom = _column_mm(labels, dz)
    head = None if head_mm == REAL else _uniform(rng, head_mm)
    chest = None if chest_mm == REAL else _uniform(rng, chest_mm)
    fov = None if fov_mm == REAL else _uniform(rng, fov_mm)
    jy, jx = (float(rng.uniform(-jitter_mm, jitter_mm)) if jitter_mm > 0 else 0.0 for _ in range(2))
    if head is None or chest is None:
        real_head, real_chest = real_geometry.draw_margins(rng)
        head = real_head if head is None else head
        chest = real_chest if chest is None else chest
    if fov is None:
        fov = real_geometry.draw_pixel_spacing(rng) * real_geometry.REAL_MATRIX
    thickness = None
    if slice_mm == REAL:
        slice_mm, thickness = real_geometry.draw_spacing(rng)
    last_mm = (labels.shape[0] - 1) * dz
    z_start, z_end = max(0.0, c1_top - head), min(last_mm, c7_bottom + chest)
    if slice_mm is None:
        slice_mm = dz
        z_start, z_end = np.floor(z_start / dz) * dz, min(last_mm, np.ceil(z_end / dz) * dz)
    cervical = (labels >= 1) & (labels <= 7)
    ys = np.flatnonzero(cervical.any(axis=(0, 2)))
    xs = np.flatnonzero(cervical.any(axis=(0, 1)))
    centre = (0.5 * (ys[0] + ys[-1]) * dy + jy, 0.5 * (xs[0] + xs[-1]) * dx + jx)
    return CutSpec(
        z_start_mm=round(float(z_start), 4),
        z_end_mm=round(float(z_end), 4),
        slice_mm=float(slice_mm),
        fov_mm=round(float(fov), 4),
        centre_yx_mm=(round(float(centre[0]), 4), round(float(centre[1]), 4)),
        size=int(size),
        thickness_mm=None if thickness is None else float(thickness),
    )


def _column_mm(labels: np.ndarray, dz: float) -> tuple[float, float]:
    """(top of C1, bottom of C7), mm from the first slice; ValueError when either is missing or C1 is not above."""
    per_slice = {k: np.flatnonzero((labels == k).any(axis=(1, 2))) for k in (1, 7)}
    if per_slice[1].size == 0 or per_slice[7].size == 0:
        raise ValueError("a competition cut needs C1 (label 1) and C7 (label 7) in the label volume")
    c1_top, c7_bottom = per_slice[1][0] * dz, per_slice[7][-1] * dz
    if not c1_top < c7_bottom:
        raise ValueError(f"C1 (top {c1_top:.1f} mm) is not above C7 (bottom {c7_bottom:.1f} mm): labels are not "
                         "head to feet")
    return float(c1_top), float(c7_bottom)
