"""Coarse cervical-spine anatomy rendered into an axial CT volume (pure functions on arrays, no IO).

Everything is drawn in millimetres in the image's own frame: ``X`` = column index * pixel size (patient left is
+X, as in DICOM LPS), ``Y`` = row index * pixel size (posterior is +Y), ``Z`` = slice index * slice spacing from the
first (most cranial) slice, growing toward the feet. ``volume : (z, y, x) ndarray``, z from head to feet.

A vertebra is a rigid union of simple solids (elliptic cylinders, elliptic rings, bars) in a local frame that is
sheared by the column's curvature (lordosis), so that vertebrae tilt in the sagittal plane and, as in real masks,
the posterior elements of one vertebra share axial slices with the body of the next (neighbours overlap ~10-15 mm).
Each solid is evaluated twice, as is and shrunk by the cortical thickness, which gives a cortical shell (dense)
around cancellous bone (less dense) in all three directions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

CERVICAL = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
THORACIC = ("T1", "T2", "T3", "T4", "T5")
LABEL_OF = {name: i + 1 for i, name in enumerate(CERVICAL + THORACIC)}
"""Mask label of each vertebra: 1-7 = C1-C7, 8-12 = T1-T5 (the competition's convention: 8-19 = T1-T12)."""

AIR_HU = -1000.0
FAT_HU = -100.0
MUSCLE_HU = 45.0
LUNG_HU = -850.0
GAP_HU = 55.0
"""Fracture gap: blood/soft tissue between the fragments."""


@dataclass(frozen=True)
class Solid:
    """One simple solid in a vertebra's local frame (mm).

    ``kind`` is ``cyl`` (elliptic cylinder: centre ``(ex, ey)``, semi-axes ``(ax, ay)``, ``z0 <= zl <= z1``),
    ``ring`` (the same with an elliptic hole of semi-axes ``(ax - t, ay - t)``; ``ymin`` keeps only ``yl >= ymin``)
    or ``bar`` (``|xl - ex| <= ax``, ``ey - ay <= yl <= ey + ay``, and ``z0 <= zl - slope * (yl - (ey - ay)) <= z1``,
    so a bar with a slope runs down toward the feet as it goes back, like a spinous process).
    """

    kind: str
    ex: float
    ey: float
    ax: float
    ay: float
    z0: float
    z1: float
    t: float = 0.0
    slope: float = 0.0
    ymin: float = -1e9
    part: str = "body"

    def local_bounds(self) -> tuple[float, float, float, float, float, float]:
        """(xmin, xmax, ymin, ymax, zmin, zmax) of the solid in the local frame."""
        y0, y1 = self.ey - self.ay, self.ey + self.ay
        z0, z1 = self.z0, self.z1
        if self.kind == "bar" and self.slope:
            z1 = z1 + abs(self.slope) * 2 * self.ay
            z0 = z0 - max(0.0, -self.slope) * 2 * self.ay
        return (self.ex - self.ax, self.ex + self.ax, max(y0, self.ymin), y1, z0, z1)

    def inside(self, xl: np.ndarray, yl: np.ndarray, zl: np.ndarray, shrink: float = 0.0) -> np.ndarray:
        """Boolean membership of points (broadcast arrays, mm), with the solid eroded by ``shrink`` mm."""
        s = shrink
        if self.kind in ("cyl", "ring"):
            ax, ay = self.ax - s, self.ay - s
            if ax <= 0 or ay <= 0:
                return np.zeros(np.broadcast_shapes(xl.shape, yl.shape, zl.shape), bool)
            r2 = ((xl - self.ex) / ax) ** 2 + ((yl - self.ey) / ay) ** 2
            out = (r2 <= 1.0) & (zl >= self.z0 + s) & (zl <= self.z1 - s)
            if self.kind == "ring":
                hx, hy = self.ax - self.t + s, self.ay - self.t + s
                out &= ((xl - self.ex) / hx) ** 2 + ((yl - self.ey) / hy) ** 2 > 1.0
                out &= yl >= self.ymin + s
            return out
        if self.kind == "bar":
            y0 = self.ey - self.ay
            zz = zl - self.slope * (yl - y0)
            return (
                (np.abs(xl - self.ex) <= self.ax - s)
                & (yl >= y0 + s)
                & (yl <= self.ey + self.ay - s)
                & (zz >= self.z0 + s)
                & (zz <= self.z1 - s)
            )
        raise ValueError(f"unknown solid kind {self.kind!r}")


@dataclass(frozen=True)
class Fracture:
    """A fracture of one vertebra.

    ``kind`` is ``line`` (a planar low-density gap of width ``width`` mm through the solids of ``part``, the
    fragment on the positive side of the plane displaced by ``shift`` mm) or ``wedge`` (the body's upper endplate
    compressed anteriorly by ``compression`` of its height, with a dense band of impacted bone under it).
    ``point`` and ``normal`` are in the vertebra's local frame (mm). ``z_window`` (local z, mm), when set, keeps a
    line's gap and displacement to those heights: an incomplete fracture, seen on fewer axial slices.
    """

    kind: str
    part: str
    point: tuple[float, float, float] = (0.0, 0.0, 0.0)
    normal: tuple[float, float, float] = (1.0, 0.0, 0.0)
    width: float = 1.5
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    compression: float = 0.0
    z_window: tuple[float, float] | None = None


@dataclass(frozen=True)
class Vertebra:
    """A vertebra placed in the image frame: ``(cx, cy)`` in-plane centre of its body (mm), ``z0`` the local origin
    (top of the body; top of the ring for C1), ``tilt`` the sagittal shear (dY/dZ of the column), ``yaw`` its axial
    rotation (radians, the patient's head turned), and its solids."""

    name: str
    cx: float
    cy: float
    z0: float
    tilt: float
    solids: tuple[Solid, ...]
    cancellous_hu: float
    cortical_hu: float
    cortex_mm: float
    fracture: Fracture | None = None
    yaw: float = 0.0

    @property
    def label(self) -> int:
        return LABEL_OF[self.name]

    def world_bounds(self, margin: float = 2.0) -> tuple[float, float, float, float, float, float]:
        """Conservative (Xmin, Xmax, Ymin, Ymax, Zmin, Zmax) in the image frame, mm."""
        b = np.array([s.local_bounds() for s in self.solids])
        xmin, xmax = b[:, 0].min(), b[:, 1].max()
        ymin, ymax = b[:, 2].min(), b[:, 3].max()
        if self.yaw:
            # Bounds of the rotated local box (local = R(yaw) image, so image = R(-yaw) local).
            c, s_ = np.cos(self.yaw), np.sin(self.yaw)
            corners = np.array([[x, y] for x in (xmin, xmax) for y in (ymin, ymax)])
            xs = c * corners[:, 0] - s_ * corners[:, 1]
            ys = s_ * corners[:, 0] + c * corners[:, 1]
            xmin, xmax, ymin, ymax = xs.min(), xs.max(), ys.min(), ys.max()
        zmin, zmax = b[:, 4].min(), b[:, 5].max()
        t = abs(self.tilt)
        ya = max(abs(ymin), abs(ymax))
        za = max(abs(zmin), abs(zmax))
        extra = 0.0
        if self.fracture is not None:
            extra = float(np.abs(self.fracture.shift).max())
        m = margin + extra
        return (
            self.cx + xmin - m,
            self.cx + xmax + m,
            self.cy + ymin - t * za - m,
            self.cy + ymax + t * za + m,
            self.z0 + zmin - t * ya - m - t * t * za,
            self.z0 + zmax + t * ya + m + t * t * za,
        )


@dataclass(frozen=True)
class Rendered:
    """Output of :func:`render_volume` (arrays share the (z, y, x) grid, z from head to feet)."""

    hu: np.ndarray
    labels: np.ndarray
    fracture: np.ndarray


def _local(v: Vertebra, Z: np.ndarray, Y: np.ndarray, X: np.ndarray):
    """Image-frame coordinates (broadcast (nz,1,1), (1,ny,1), (1,1,nx) arrays, mm) -> the vertebra's local frame."""
    dz = Z - v.z0
    yl = Y - v.cy - v.tilt * dz
    xl = X - v.cx
    if v.yaw:
        c, s = np.float32(np.cos(v.yaw)), np.float32(np.sin(v.yaw))
        xl, yl = c * xl + s * yl, -s * xl + c * yl
    zl = dz + v.tilt * yl
    return xl, yl, zl


def _part_masks(v: Vertebra, xl, yl, zl, part: str | None, shrink: float, exclude: bool = False):
    """Union of the solids of one part (or of all parts but it when ``exclude``; all when part is None)."""
    shape = np.broadcast_shapes(xl.shape, yl.shape, zl.shape)
    out = np.zeros(shape, bool)
    for s in v.solids:
        if part is not None and ((s.part == part) == exclude):
            continue
        out |= s.inside(xl, yl, zl, shrink)
    return out


def render_vertebra(v: Vertebra, Z, Y, X):
    """Bone of one vertebra on a grid (broadcast coordinate arrays, mm).

    Returns
    -------
    outer, inner, gap, dense : (nz, ny, nx) bool ndarrays
        ``outer`` the bone (mask of the vertebra, fracture gap included), ``inner`` the cancellous part (outer minus
        the cortical shell), ``gap`` the fracture voxels (low-density line, or the dense band of a wedge), ``dense``
        the voxels of a wedge's impacted band.
    """
    xl, yl, zl = _local(v, Z, Y, X)
    c = v.cortex_mm
    f = v.fracture
    if f is None:
        outer = _part_masks(v, xl, yl, zl, None, 0.0)
        inner = _part_masks(v, xl, yl, zl, None, c)
        empty = np.zeros_like(outer)
        return outer, inner, empty, empty
    rest_outer = _part_masks(v, xl, yl, zl, f.part, 0.0, exclude=True)
    rest_inner = _part_masks(v, xl, yl, zl, f.part, c, exclude=True)
    if f.kind == "line":
        n = np.asarray(f.normal, float)
        n /= np.linalg.norm(n)
        p = np.asarray(f.point, float)
        dist = (xl - p[0]) * n[0] + (yl - p[1]) * n[1] + (zl - p[2]) * n[2]
        pos = dist > 0
        sx, sy, sz = f.shift
        o0 = _part_masks(v, xl, yl, zl, f.part, 0.0)
        i0 = _part_masks(v, xl, yl, zl, f.part, c)
        o1 = _part_masks(v, xl - sx, yl - sy, zl - sz, f.part, 0.0)
        i1 = _part_masks(v, xl - sx, yl - sy, zl - sz, f.part, c)
        # The fragment on the positive side moved by `shift`; the broken surfaces get a thin cortex of their own.
        dist1 = dist - (sx * n[0] + sy * n[1] + sz * n[2])
        half = f.width / 2.0
        frag_outer = np.where(pos, o1 & (dist1 > half), o0 & (dist < -half))
        frag_inner = np.where(pos, i1 & (dist1 > half + c * 0.5), i0 & (dist < -half - c * 0.5))
        gap = o0 & (np.abs(dist) <= half) & ~frag_outer
        if f.z_window is not None:
            # Outside the window the bone is whole: no gap, no displaced fragment.
            inside = (zl >= f.z_window[0]) & (zl <= f.z_window[1])
            frag_outer = np.where(inside, frag_outer, o0)
            frag_inner = np.where(inside, frag_inner, i0)
            gap &= inside
        outer = rest_outer | frag_outer | gap
        inner = (rest_inner | frag_inner) & ~gap
        return outer, inner, gap & ~rest_outer, np.zeros_like(gap)
    if f.kind == "wedge":
        # The upper endplate sinks anteriorly: local z of the new endplate falls from `compression * height` at the
        # front of the body to 0 at its back; under it a band of impacted (denser) trabeculae.
        body = [s for s in v.solids if s.part == f.part]
        b = body[0]
        height = b.z1 - b.z0
        front = np.clip((b.ey + b.ay - yl) / (2 * b.ay), 0.0, 1.0)
        top = b.z0 + f.compression * height * front
        keep = zl >= top
        o = _part_masks(v, xl, yl, zl, f.part, 0.0) & keep
        i = _part_masks(v, xl, yl, zl, f.part, c) & (zl >= top + c)
        band = o & (zl <= top + 2.5 + c) & (front > 0.15)
        outer = rest_outer | o
        inner = rest_inner | i
        return outer, inner, band & ~rest_outer, band & ~rest_outer
    raise ValueError(f"unknown fracture kind {f.kind!r}")


def render_volume(
    shape: tuple[int, int, int],
    dz: float,
    px: float,
    background: np.ndarray,
    vertebrae: list[Vertebra],
) -> Rendered:
    """Paste the vertebrae into a soft-tissue background.

    Parameters
    ----------
    shape : (nz, ny, nx)
        Volume shape, z from head to feet.
    dz, px : float
        Slice spacing and pixel size, mm.
    background : (nz, ny, nx) int16 ndarray
        Soft tissue, air and non-vertebral bone in HU; modified in place and returned as ``hu``.
    vertebrae : list of Vertebra
        Drawn in order (a later one wins where two touch).

    Returns
    -------
    Rendered
        ``hu`` (int16 HU), ``labels`` (uint8 vertebra labels), ``fracture`` (uint8: the label of the fractured
        vertebra on its fracture voxels, 0 elsewhere).
    """
    nz, ny, nx = shape
    hu = background
    labels = np.zeros(shape, np.uint8)
    fracture = np.zeros(shape, np.uint8)
    for v in vertebrae:
        X0, X1, Y0, Y1, Z0, Z1 = v.world_bounds()
        xs = slice(max(0, int(np.floor(X0 / px))), min(nx, int(np.ceil(X1 / px)) + 1))
        ys = slice(max(0, int(np.floor(Y0 / px))), min(ny, int(np.ceil(Y1 / px)) + 1))
        zs = slice(max(0, int(np.floor(Z0 / dz))), min(nz, int(np.ceil(Z1 / dz)) + 1))
        if xs.start >= xs.stop or ys.start >= ys.stop or zs.start >= zs.stop:
            continue
        Z = (np.arange(zs.start, zs.stop, dtype=np.float32) * dz)[:, None, None]
        Y = (np.arange(ys.start, ys.stop, dtype=np.float32) * px)[None, :, None]
        X = (np.arange(xs.start, xs.stop, dtype=np.float32) * px)[None, None, :]
        outer, inner, gap, dense = render_vertebra(v, Z, Y, X)
        box = (zs, ys, xs)
        sub = hu[box]
        sub[outer] = int(round(v.cortical_hu))
        sub[inner] = int(round(v.cancellous_hu))
        sub[dense] = int(round(v.cancellous_hu + 350.0))
        sub[gap & ~dense] = int(GAP_HU)
        labels[box][outer] = v.label
        fsub = fracture[box]
        fsub[gap] = v.label
    # A later vertebra may have covered a few fracture voxels of an earlier one: fracture voxels must lie in the
    # fractured vertebra's mask.
    fracture[labels != fracture] = 0
    return Rendered(hu=hu, labels=labels, fracture=fracture)


# ---------------------------------------------------------------------------------------------------------------
# Anatomy: where the vertebrae are, what they look like, what surrounds them.


@dataclass(frozen=True)
class Anatomy:
    """One study's anatomy in the image frame (mm, z from the first slice toward the feet).

    Attributes
    ----------
    vertebrae : tuple of Vertebra
        C1-C7 then T1-T5, head to feet.
    cx0, cy0, lordosis, drift, lean : float
        Column centreline: ``cx(z) = cx0 + drift * u``, ``cy(z) = cy0 - lordosis * sin(pi * u) + lean * (z - z_c1)``,
        plus :meth:`back_shift`, with ``u`` the fraction of the way from the top of C1 to the bottom of C7.
    z_c1, z_c7 : float
        Top of C1's ring and bottom of C7's body, mm.
    neck : (float, float)
        Semi-axes (left-right, antero-posterior) of the neck outline, mm.
    fat : float
        Subcutaneous fat thickness, mm.
    mandible : bool
        Whether the mandible is in the field (the head was not flexed out of it).
    shoulder_mm : float
        How far above the bottom of C7 the shoulders start to widen the body, mm.
    jaw_mm : float
        Lower border of the mandible (and end of the face) below the top of C1, mm.
    airway : float
        Radius of the airway, mm.
    back : float
        How far the column turns back (posterior) at the cervico-thoracic junction, mm (:meth:`back_shift`).
    """

    vertebrae: tuple[Vertebra, ...]
    cx0: float
    cy0: float
    lordosis: float
    drift: float
    lean: float
    z_c1: float
    z_c7: float
    neck: tuple[float, float]
    fat: float
    mandible: bool
    shoulder_mm: float = 40.0
    jaw_mm: float = 55.0
    airway: float = 9.0
    back: float = 0.0

    def centre(self, z: float) -> tuple[float, float]:
        """Column centre (X, Y) in mm at height ``z`` mm."""
        u = float(np.clip((z - self.z_c1) / (self.z_c7 - self.z_c1), 0.0, 1.0))
        return (
            self.cx0 + self.drift * u,
            self.cy0 - self.lordosis * np.sin(np.pi * u) + self.lean * (z - self.z_c1) + self.back_shift(z),
        )

    def back_shift(self, z: float) -> float:
        """How far (mm, toward posterior) the column has turned back at the cervico-thoracic junction by ``z``: a
        smooth step of ``back`` mm from 50 mm above the bottom of C7 to 40 mm below it (real necks: C7 ~17 mm,
        T1 ~27 mm and the spine 20-60 mm below T1's top ~30 mm behind C4, label centroids)."""
        t = float(np.clip((z - (self.z_c7 - 50.0)) / 90.0, 0.0, 1.0))
        return self.back * t * t * (3.0 - 2.0 * t)

    def slope(self, z: float) -> float:
        """dY/dZ of the centreline at ``z`` (the sagittal tilt of a vertebra centred there)."""
        h = 0.5
        return (self.centre(z + h)[1] - self.centre(z - h)[1]) / (2 * h)


def _typical(name: str, k: int, s: float, thoracic: bool) -> tuple[tuple[Solid, ...], float]:
    """Solids of C3-C7 (k = 3..7) or T1-T5 (k = 8..12) at scale ``s``; returns (solids, body height)."""
    if thoracic:
        bx, by, hb = (11.5 + 0.8 * (k - 8)) * s, (9.5 + 0.5 * (k - 8)) * s, (15.5 + 0.6 * (k - 8)) * s
        cxr, cyr, t, L, slope = 8.5 * s, 7.5 * s, 5.5 * s, (30.0 + 2 * (k - 8)) * s, 0.85
    else:
        bx, by, hb = (8.0 + 0.6 * (k - 3)) * s, (7.0 + 0.35 * (k - 3)) * s, (12.5 + 0.3 * (k - 3)) * s
        cxr, cyr, t, L, slope = 11.5 * s, 7.0 * s, 4.5 * s, (13.0 + 2.8 * (k - 3)) * s, 0.75
        if k >= 6:
            # The long spinous processes of C6 and C7 (vertebra prominens) hang over the next vertebra: real masks
            # (VerSe) overlap 16-22 mm at C6/C7 and C7 spans 34-41 mm.
            L, slope = L + 4.0 * (k - 5) * s, 0.85
    ey = by + cyr - 1.0 * s
    y_back = ey + cyr + t - 0.8 * t
    # Articular pillars ~20 mm either side of the midline in the cervical spine (real necks' bone reaches 15-30 mm
    # out at every level).
    px_ = cxr + 0.6 * t + (0.0 if thoracic else 3.0 * s)
    solids = (
        Solid("cyl", 0.0, 0.0, bx, by, 0.0, hb, part="body"),
        Solid("ring", 0.0, ey, cxr + t, cyr + t, 1.5 * s, hb + 4.0 * s, t=t, ymin=0.0, part="ring"),
        # Articular pillars: the superior process rises above the body (in front), the inferior one hangs below it
        # (behind), which is what makes neighbouring vertebrae share ~10-15 mm of axial slices.
        Solid("cyl", px_, ey - 3.0 * s, 4.5 * s, 4.5 * s, -7.0 * s, 0.5 * hb, part="ring"),
        Solid("cyl", -px_, ey - 3.0 * s, 4.5 * s, 4.5 * s, -7.0 * s, 0.5 * hb, part="ring"),
        Solid("cyl", px_, ey + 3.0 * s, 4.5 * s, 4.5 * s, 0.5 * hb, hb + 9.0 * s, part="ring"),
        Solid("cyl", -px_, ey + 3.0 * s, 4.5 * s, 4.5 * s, 0.5 * hb, hb + 9.0 * s, part="ring"),
        Solid("bar", bx + 7.0 * s, 1.0 * s, 7.0 * s, 3.5 * s, 0.25 * hb, 0.7 * hb, part="transverse"),
        Solid("bar", -(bx + 7.0 * s), 1.0 * s, 7.0 * s, 3.5 * s, 0.25 * hb, 0.7 * hb, part="transverse"),
        Solid("bar", 0.0, y_back + L / 2, 2.8 * s, L / 2, 2.0 * s, 10.0 * s, slope=slope, part="spinous"),
    )
    return solids, hb


def _axis(s: float) -> tuple[tuple[Solid, ...], float]:
    """Solids of C2: a tall body, the dens rising 15 mm above it, a broad ring and a long bifid spinous process."""
    bx, by, hb = 8.5 * s, 7.5 * s, 16.0 * s
    cxr, cyr, t, L = 12.0 * s, 7.5 * s, 5.0 * s, 22.0 * s
    ey = by + cyr - 1.0 * s
    y_back = ey + cyr + t - 0.8 * t
    solids = (
        Solid("cyl", 0.0, 0.0, bx, by, 0.0, hb, part="body"),
        Solid("cyl", 0.0, 0.5 * s, 5.0 * s, 5.0 * s, -16.0 * s, 2.0 * s, part="dens"),
        Solid("ring", 0.0, ey, cxr + t, cyr + t, 2.0 * s, hb + 4.0 * s, t=t, ymin=0.0, part="ring"),
        Solid("cyl", 12.5 * s, 2.0 * s, 5.5 * s, 7.0 * s, -4.0 * s, 0.5 * hb, part="ring"),
        Solid("cyl", -12.5 * s, 2.0 * s, 5.5 * s, 7.0 * s, -4.0 * s, 0.5 * hb, part="ring"),
        Solid("cyl", 12.5 * s, ey + 3.0 * s, 4.5 * s, 4.5 * s, 0.5 * hb, hb + 9.0 * s, part="ring"),
        Solid("cyl", -12.5 * s, ey + 3.0 * s, 4.5 * s, 4.5 * s, 0.5 * hb, hb + 9.0 * s, part="ring"),
        Solid("bar", bx + 5.0 * s, 1.0 * s, 5.0 * s, 3.5 * s, 0.2 * hb, 0.6 * hb, part="transverse"),
        Solid("bar", -(bx + 5.0 * s), 1.0 * s, 5.0 * s, 3.5 * s, 0.2 * hb, 0.6 * hb, part="transverse"),
        Solid("bar", 0.0, y_back + L / 2, 4.0 * s, L / 2, 4.0 * s, 14.0 * s, slope=0.65, part="spinous"),
    )
    return solids, hb


def _atlas(s: float) -> tuple[tuple[Solid, ...], float]:
    """Solids of C1 in a frame centred on the dens: anterior arch in front of it, lateral masses, posterior arch."""
    solids = (
        Solid("bar", 0.0, -9.5 * s, 7.0 * s, 3.0 * s, 4.0 * s, 14.0 * s, part="ring"),
        Solid("cyl", 13.0 * s, 0.0, 6.5 * s, 8.5 * s, 0.0, 19.0 * s, part="ring"),
        Solid("cyl", -13.0 * s, 0.0, 6.5 * s, 8.5 * s, 0.0, 19.0 * s, part="ring"),
        Solid("ring", 0.0, 6.0 * s, 22.0 * s, 23.0 * s, 4.0 * s, 13.0 * s, t=5.0 * s, ymin=6.0 * s, part="ring"),
        Solid("bar", 22.0 * s, 0.0, 6.0 * s, 4.0 * s, 6.0 * s, 13.0 * s, part="transverse"),
        Solid("bar", -22.0 * s, 0.0, 6.0 * s, 4.0 * s, 6.0 * s, 13.0 * s, part="transverse"),
    )
    return solids, 19.0 * s


def _fracture(rng: np.random.Generator, name: str, solids: tuple[Solid, ...], kind: str, px: float) -> Fracture:
    """A fracture of the given kind placed inside one part of the vertebra (line: body, dens or ring; wedge: body)."""
    width = max(1.3, 1.6 * px)
    if kind == "wedge":
        return Fracture("wedge", "body", compression=float(rng.uniform(0.25, 0.45)), width=width)
    if name == "C1":
        parts = ["ring"]
    elif name == "C2":
        parts = ["dens", "body", "ring"]
    else:
        parts = ["body", "body", "ring"]
    part = parts[int(rng.integers(len(parts)))]
    candidates = [s for s in solids if s.part == part]
    s = candidates[int(rng.integers(len(candidates)))]
    zmid = 0.5 * (s.z0 + s.z1)
    if s.kind == "ring":
        # Through the posterior arch (lamina), away from the hole.
        ang = rng.uniform(0.25 * np.pi, 0.75 * np.pi)
        r = 1.0 - 0.5 * s.t / max(s.ax, s.ay)
        point = (s.ex + r * s.ax * np.cos(ang), s.ey + r * s.ay * np.sin(ang), zmid)
        normal_xy = (np.cos(ang + np.pi / 2), np.sin(ang + np.pi / 2))
    else:
        point = (
            s.ex + rng.uniform(-0.3, 0.3) * s.ax,
            s.ey + rng.uniform(-0.3, 0.3) * s.ay,
            zmid + rng.uniform(-0.15, 0.15) * (s.z1 - s.z0),
        )
        ang = rng.uniform(0, np.pi)
        normal_xy = (np.cos(ang), np.sin(ang))
    # Mostly vertical planes (a line on every axial slice they cross), some oblique.
    nz = float(rng.uniform(-0.6, 0.6))
    normal = (float(normal_xy[0]), float(normal_xy[1]), nz)
    n = np.asarray(normal) / np.linalg.norm(normal)
    mag = rng.uniform(1.0, 2.5)
    shear = np.cross(n, [0.0, 0.0, 1.0])
    shear = shear / (np.linalg.norm(shear) + 1e-9)
    shift = mag * (0.7 * n + rng.uniform(-0.7, 0.7) * shear)
    return Fracture(
        "line",
        part,
        point=tuple(float(v) for v in point),
        normal=tuple(float(v) for v in n),
        width=float(width),
        shift=tuple(float(v) for v in shift),
    )


def build_anatomy(
    rng: np.random.Generator,
    fov: float,
    px: float,
    head_mm: float,
    fractures: dict[str, str],
) -> Anatomy:
    """Draw one study's anatomy.

    The steps, in the order they draw from ``rng`` (the order fixes every study a seed gives): the column's
    posture (:func:`_draw_posture`), the vertebrae stacked along z (:func:`_stack_vertebrae`, no draws), placed
    in-plane on the centreline with their bone densities and fractures (:func:`_place_vertebrae`), then the soft
    tissue around them (:func:`_draw_soft_tissue`).

    Parameters
    ----------
    rng : numpy Generator
        Source of every random choice (the study's own seed).
    fov : float
        Field of view (image side), mm.
    px : float
        Pixel size, mm (sets the minimum fracture gap so that a gap is at least ~1.5 pixels wide).
    head_mm : float
        Distance from the first slice to the top of C1, mm.
    fractures : dict
        ``{vertebra: "line" | "wedge"}`` for the fractured vertebrae.
    """
    posture = _draw_posture(rng, fov)
    parts = _stack_vertebrae(posture["s"], posture["disc"], head_mm)
    z_c1, z_c7 = head_mm, parts[6][2] + parts[6][3]
    proto = Anatomy((), posture["cx0"], posture["cy0"], posture["lordosis"], posture["drift"], posture["lean"],
                    z_c1, z_c7, (0.0, 0.0), 0.0, False, back=posture["back"])
    vertebrae = _place_vertebrae(rng, parts, proto, s=posture["s"], yaw=posture["yaw"], fractures=fractures, px=px)
    return Anatomy(tuple(vertebrae), proto.cx0, proto.cy0, proto.lordosis, proto.drift, proto.lean, z_c1, z_c7,
                   back=proto.back, **_draw_soft_tissue(rng))


def _draw_posture(rng: np.random.Generator, fov: float) -> dict[str, Any]:
    """Size, centreline and disc heights of one column: ``{"s", "cx0", "cy0", "lordosis", "drift", "lean",
    "back", "yaw" (radians), "disc" (list of 12 heights, mm)}``."""
    s = float(rng.uniform(0.88, 1.12))
    out: dict[str, Any] = {"s": s}
    out["cx0"] = fov / 2 + float(rng.uniform(-0.08, 0.08)) * fov
    out["cy0"] = fov / 2 + float(rng.uniform(-0.06, 0.1)) * fov
    out["lordosis"] = float(rng.uniform(0.0, 12.0))
    out["drift"] = float(rng.uniform(-6.0, 6.0))
    out["lean"] = float(rng.uniform(-0.08, 0.08))
    out["back"] = float(rng.uniform(20.0, 40.0))
    out["yaw"] = float(np.deg2rad(rng.uniform(-7.0, 7.0)))
    out["disc"] = [float(rng.uniform(4.0, 5.5)) * s for _ in range(len(CERVICAL) + len(THORACIC))]
    return out


def _stack_vertebrae(s: float, disc: Sequence[float], head_mm: float
                     ) -> list[tuple[str, tuple[Solid, ...], float, float]]:
    """The vertebrae stacked along z, head to feet: ``[(name, solids, z0 (mm), body height (mm)), ...]``."""
    parts: list[tuple[str, tuple[Solid, ...], float, float]] = []
    atlas, h1 = _atlas(s)
    parts.append(("C1", atlas, head_mm, h1))
    axis, h2 = _axis(s)
    z2 = head_mm + 1.0 * s + 16.0 * s  # dens tip just below the top of C1's ring
    parts.append(("C2", axis, z2, h2))
    z = z2 + h2 + disc[1]
    for k in range(3, 3 + 5 + len(THORACIC)):
        name = (CERVICAL + THORACIC)[k - 1]
        solids, hb = _typical(name, k, s, thoracic=k >= 8)
        parts.append((name, solids, z, hb))
        z += hb + disc[k - 1]
    return parts


def _place_vertebrae(
    rng: np.random.Generator,
    parts: Sequence[tuple[str, tuple[Solid, ...], float, float]],
    proto: Anatomy,
    *,
    s: float,
    yaw: float,
    fractures: dict[str, str],
    px: float,
) -> list[Vertebra]:
    """Each stacked vertebra on the centreline of ``proto``, with its tilt, bone densities and fracture."""
    vertebrae = []
    for name, solids, z0, hb in parts:
        zmid = z0 + 0.5 * hb
        cx, cy = proto.centre(zmid)
        tilt = proto.slope(zmid)
        if name == "C1":
            # C1 is centred on the dens of C2 (axis frame offset (0, 0.5 s) at this height).
            c2 = parts[1]
            cx, cy2 = proto.centre(c2[2] + 0.5 * c2[3])
            t2 = proto.slope(c2[2] + 0.5 * c2[3])
            cy = cy2 + 0.5 * s + t2 * (zmid - c2[2])
            # The atlas ring is inclined, anterior arch up (its axial slices span ~30 mm in real masks).
            tilt = t2 - 0.3
        fracture = None
        if name in fractures:
            fracture = _fracture(rng, name, solids, fractures[name], px)
        vertebrae.append(
            Vertebra(
                name,
                float(cx),
                float(cy),
                float(z0),
                float(tilt),
                solids,
                cancellous_hu=float(rng.uniform(170.0, 380.0)),
                cortical_hu=float(rng.uniform(750.0, 1150.0)),
                cortex_mm=float(max(1.0, 1.2 * px)),
                fracture=fracture,
                yaw=yaw + float(np.deg2rad(rng.uniform(-2.0, 2.0))),
            )
        )
    return vertebrae


def _draw_soft_tissue(rng: np.random.Generator) -> dict[str, Any]:
    """The neck around the column: the :class:`Anatomy` fields ``neck, fat, mandible, shoulder_mm, jaw_mm,
    airway``, drawn in this order."""
    # Real necks (tests/data/real_neck): 120-170 mm wide and deep at C4, the column a little behind the middle.
    neck = (float(rng.uniform(56.0, 80.0)), float(rng.uniform(48.0, 68.0)))
    return {
        "neck": neck,
        "fat": float(rng.uniform(3.0, 10.0)),
        "mandible": bool(rng.random() < 0.85),
        # Real necks: shoulders widen the body from 20-55 mm above the bottom of C7, the mandible's lower border
        # lies 25-80 mm below the top of C1 (head flexion), airways of 1-4 cm^2 at C4.
        "shoulder_mm": float(rng.uniform(25.0, 60.0)),
        "jaw_mm": float(rng.uniform(35.0, 80.0)),
        "airway": float(rng.uniform(7.5, 11.0)),
    }
