"""The body around the synthetic spine: soft-tissue outline, airway, lungs, skull base, mandible, clavicles and the
scanner table, drawn slice by slice into an axial volume (pure functions on arrays, no IO).

Frame and units as in :mod:`cspine_submit.datasets.anatomy`: millimetres in the image's own frame, ``volume : (z, y,
x) ndarray``, z from head to feet. The spine itself is rendered there; this module draws what surrounds it.
"""

from __future__ import annotations

import numpy as np

from cspine_submit.datasets.anatomy import AIR_HU, FAT_HU, LUNG_HU, MUSCLE_HU, Anatomy


def _ellipse(img, centre, axes, px, value, angle0=0.0, angle1=360.0, thickness=-1):
    """cv2.ellipse in mm (sub-pixel via cv2's fixed-point ``shift``)."""
    import cv2

    sh = 4
    f = (1 << sh) / px
    c = (int(round(centre[0] * f)), int(round(centre[1] * f)))
    a = (max(0, int(round(axes[0] * f))), max(0, int(round(axes[1] * f))))
    th = thickness if thickness < 0 else max(1, int(round(thickness / px)))
    cv2.ellipse(img, c, a, 0.0, angle0, angle1, float(value), th, cv2.LINE_8, sh)


def body_outline(a: Anatomy, z: float) -> tuple[float, float, float]:
    """The body's outline at height ``z`` mm: centre row ``Y`` and semi-axes ``(ax, ay)`` of its ellipse, mm.

    The neck, widening into the head above C1 and into the shoulders from ``shoulder_mm`` above the bottom of C7;
    its front recedes toward the thoracic inlet (the suprasternal notch ~50 mm in front of the column, ~75 mm at
    mid-neck), then the chest comes forward again. It follows the column only part of the way as the column turns
    back into the chest.
    """
    cy = a.centre(z)[1] - 0.7 * a.back_shift(z)
    head = float(np.clip((a.z_c1 + 5.0 - z) / 30.0, 0.0, 1.0))
    chest = float(np.clip((z - a.z_c7) / 45.0, 0.0, 1.0))
    shoulder = float(np.clip((z - (a.z_c7 - a.shoulder_mm)) / 50.0, 0.0, 1.0))
    notch = float(np.clip(1.0 - abs(z - a.z_c7 - 5.0) / 35.0, 0.0, 1.0))
    ax = a.neck[0] + 15.0 * head + 115.0 * shoulder
    ay = a.neck[1] + 30.0 * head + 25.0 * chest - 9.0 * notch
    return cy + 6.0 - 18.0 * head + 5.0 * chest + 9.0 * notch, ax, ay


def draw_background(anatomy: Anatomy, shape: tuple[int, int, int], dz: float, px: float) -> np.ndarray:
    """Soft tissue, airway, lungs, skull base, mandible, clavicles and first ribs, slice by slice.

    Sizes and levels follow the real necks (``benchmarks/compare_synthetic_real.py``, docs/synthetic_vs_real.png):
    a neck about 150 mm wide and 140 mm deep with the column behind its middle, the face and jaw in front of C1-C3
    down to the mandible, skull bone around the foramen magnum up to ~45 mm above C1, shoulders widening from
    ``shoulder_mm`` above the bottom of C7, lung apices ~15 mm below it.

    Returns
    -------
    (nz, ny, nx) int16 ndarray
        HU, z from head to feet; air (-1000) outside the body.
    """
    nz, ny, nx = shape
    out = np.empty(shape, np.int16)
    a = anatomy
    by_c7 = 8.0
    z_jaw = a.z_c1 + a.jaw_mm
    for i in range(nz):
        z = i * dz
        cx, cy = a.centre(z)
        fy = cy - 0.7 * a.back_shift(z)  # bones in front stay with the body outline (:func:`body_outline`)
        img = np.full((ny, nx), AIR_HU, np.float32)
        head = float(np.clip((a.z_c1 + 5.0 - z) / 30.0, 0.0, 1.0))
        ncy, ax, ay = body_outline(a, z)
        # Face and jaw in front of the upper column, down to the mandible's lower border (then the chin's soft
        # tissue tapers into the neck over 20 mm). Both outlines get their fat first, then their muscle, so that
        # where they overlap there is no fat inside the body.
        face = float(np.clip((z_jaw + 10.0 - z) / 20.0, 0.0, 1.0))
        fc = (cx, cy - 45.0)
        fa = ((0.85 * ax + 12.0) * (0.5 + 0.5 * face), 62.0 * np.sqrt(face))
        _ellipse(img, (cx, ncy), (ax, ay), px, FAT_HU)
        if face > 0:
            _ellipse(img, fc, fa, px, FAT_HU)
            _ellipse(img, fc, (fa[0] - a.fat, fa[1] - a.fat), px, MUSCLE_HU)
        _ellipse(img, (cx, ncy), (ax - a.fat, ay - a.fat), px, MUSCLE_HU)
        # Lung apices rise beside the vertebral bodies, a little in front of them.
        lung = float(np.clip((z - a.z_c7 - 10.0) / 45.0, 0.0, 1.0)) ** 0.65
        if lung > 0:
            for side in (-1, 1):
                _ellipse(img, (cx + side * (30.0 + 22.0 * lung), cy - 16.0), (36.0 * lung, 44.0 * lung),
                         px, LUNG_HU)
        if z > a.z_c7 + 38.0:
            _ellipse(img, (cx, fy - 60.0), (22.0, 7.0), px, 450.0)  # manubrium
        r_air = a.airway + 5.0 * head
        _ellipse(img, (cx, cy - by_c7 - 14.0 - 6.0 * head), (r_air, r_air * 0.8), px, AIR_HU)
        if z < a.z_c1 - 1.0:
            o = float(np.clip((a.z_c1 - 1.0 - z) / 35.0, 0.0, 1.0))
            _ellipse(img, (cx, cy + 12.0), (24.0 + 40.0 * o, 20.0 + 45.0 * o), px, 1000.0, 15, 165, thickness=8.0)
        if a.mandible:
            _draw_mandible(img, a, z, cx, fc[1], (fa[0] - a.fat, fa[1] - a.fat), px)
        if a.vertebrae[2].z0 + 2.0 < z < a.vertebrae[2].z0 + 8.0:
            # Hyoid: a thin U in front of C3, well in front of the airway.
            _ellipse(img, (cx, cy - 38.0), (19.0, 13.0), px, 450.0, 180, 360, thickness=3.0)
        # Skull base just above C1: occipital condyles over its lateral masses, the rim of the foramen magnum
        # around the canal, the clivus rising in front, the petrous bones and mastoids on the sides. Bone that is not
        # a vertebra, right where C1 starts.
        if a.z_c1 - 14.0 < z < a.z_c1 + 1.0:
            for side in (-1, 1):
                _ellipse(img, (cx + side * 12.0, cy + 1.0), (5.5, 8.0), px, 850.0)
        if a.z_c1 - 26.0 < z < a.z_c1 - 7.0:
            _ellipse(img, (cx, cy + 14.0), (21.0, 23.0), px, 800.0, -10, 190, thickness=4.0)
        if a.z_c1 - 50.0 < z < a.z_c1 - 6.0:
            up = a.z_c1 - 6.0 - z
            _ellipse(img, (cx, cy - 6.0 - 0.45 * up), (12.0, 6.5), px, 800.0)
        if a.z_c1 - 48.0 < z < a.z_c1 - 24.0:
            for side in (-1, 1):
                _ellipse(img, (cx + side * 36.0, cy - 10.0), (17.0, 6.0), px, 1200.0)  # petrous bones
        if a.z_c1 - 60.0 < z < a.z_c1 - 15.0:
            for side in (-1, 1):
                _ellipse(img, (cx + side * 30.0, cy - 52.0), (7.0, 9.0), px, 700.0)  # pterygoid plates, maxilla
        if a.z_c1 - 40.0 < z < a.z_c1 - 4.0:
            for side in (-1, 1):
                _ellipse(img, (cx + side * 47.0, cy + 4.0), (11.0, 14.0), px, 650.0)  # mastoids
        # First ribs and clavicles at T1-T2: curved bone beside the lowest cervical levels.
        for k, v in enumerate(a.vertebrae[7:10], start=1):
            zt = v.z0 + 8.0 * k - 6.0
            if abs(z - zt) < 4.0:
                rx, ry = 42.0 + 12.0 * k, 36.0 + 6.0 * k
                _ellipse(img, (cx, cy + 6.0), (rx, ry), px, 750.0, -55, 15, thickness=6.0)
                _ellipse(img, (cx, cy + 6.0), (rx, ry), px, 750.0, 165, 235, thickness=6.0)
        if len(a.vertebrae) > 7:
            zt = a.z_c7 + 26.0  # clavicles: from the shoulders to the manubrium, 25-45 mm below C7
            if 0.0 < z - zt < 16.0:
                for side in (-1, 1):
                    _ellipse(img, (cx + side * 40.0, fy - 55.0), (38.0, 12.0), px, 700.0,
                             200 if side < 0 else 270, 270 if side < 0 else 340, thickness=9.0)
        out[i] = np.clip(np.round(img), -32768, 32767).astype(np.int16)
    return out


def _draw_mandible(img: np.ndarray, a: Anatomy, z: float, cx: float, face_y: float, face_axes: tuple[float, float],
                   px: float) -> None:
    """The mandible on one slice at ``z`` mm, inside the face outline (centre row ``face_y``, inner semi-axes
    ``face_axes``, mm): its body (a U in front, lower border at ``z_c1 + jaw_mm``, 28 mm tall), the teeth above
    it, and the rami rising behind the angles to the skull base."""
    z_jaw = a.z_c1 + a.jaw_mm
    # The angles of the jaw lie ~45-60 mm in front of the column, as in real necks.
    centre = (cx, face_y - 3.0)
    axes = (min(50.0, face_axes[0] - 8.0), face_axes[1] - 10.0)
    if axes[0] < 10.0 or axes[1] < 10.0:
        return
    if z_jaw - 28.0 < z <= z_jaw:
        _ellipse(img, centre, axes, px, 1250.0, 180, 360, thickness=7.0)
    if z_jaw - 42.0 < z <= z_jaw - 28.0:
        _ellipse(img, centre, (axes[0] - 4.0, axes[1] - 4.0), px, 2200.0, 195, 345, thickness=6.0)
    if a.z_c1 - 45.0 < z <= z_jaw - 18.0:
        for side in (-1, 1):
            _ellipse(img, (cx + side * (axes[0] + 1.0), centre[1] + 5.0), (5.0, 13.0), px, 1150.0)


def draw_table(rng: np.random.Generator, anatomy: Anatomy, volume: np.ndarray, dz: float, px: float) -> np.ndarray:
    """Add a patient table / head rest: a curved dense shell (carbon fibre, 150-450 HU) behind the neck.

    Parameters
    ----------
    volume : (nz, ny, nx) int16 ndarray
        Background HU, z from head to feet; modified in place and returned.

    Notes
    -----
    The shell follows the back of the head and neck at a fixed height, so it is dense, long and off the column:
    a realistic trap for anything that takes "bone" to mean "HU above a threshold".
    """
    nz = volume.shape[0]
    gap = float(rng.uniform(8.0, 30.0))
    thick = float(rng.uniform(3.0, 6.0))
    hu = float(rng.uniform(150.0, 450.0))
    curve = float(rng.uniform(80.0, 200.0))
    # Height of the shell: behind the deepest point of the neck outline over the study.
    y_back = max(sum(body_outline(anatomy, z * dz)[::2]) for z in range(0, nz, max(1, nz // 32)))
    yc = y_back + gap
    cx = anatomy.cx0
    for i in range(nz):
        img = volume[i].astype(np.float32)
        # An arc of a wide ellipse whose lowest part sits under the neck: curved like a head rest.
        _ellipse(img, (cx, yc - curve), (curve * 1.6, curve), px, hu, 20, 160, thickness=thick)
        volume[i] = img.astype(np.int16)
    return volume
