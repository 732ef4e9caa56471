"""The synthetic generator's anatomy side by side with the 11 real necks: numbers and a figure.

Usage::

    python benchmarks/compare_synthetic_real.py [--synthetic 24] [--seed 7] [--size 256]
                                                [--figure docs/synthetic_vs_real.png] [--json out.json]
                                                [--geometry-only]

First, geometry and labels against the competition's own tables (tests/data/real_competition): slice spacing,
thickness above spacing, pixel spacing, the scan above C1 and below C7, numbering direction and headers of ``synth``
(both schemes) and of ``write-study``'s default cut, then the labels' joint statistics (overall, neighbour
co-occurrence, boxed share, fractured vertebrae per study).

Real: the 11 OpenKBP necks of ``tests/data/real_neck`` cut as ``cspine-submit write-study`` cuts them (same seed,
same field of view and centre), but kept from 60 mm above C1 to 100 mm below C7 so that what lies around the column
shows; 1.25 mm slices, ``--size`` px. Synthetic: ``--synthetic`` studies of ``cspine-submit synth`` (the demo's
1-2 mm slices, default field of view, ``--size`` px) drawn with 60 mm above C1 and 100 mm below C7 for the same
reason. The column point of each study is found as the localizer finds it, on the slices the study would have had
(real: the write-study cut; synthetic: the generator's default head / chest ranges).

Per study, as profiles along the column coordinate ``u = (z - C1 top) / column length`` (0 = top of C1, 1 = bottom
of C7, C7/T1 disc):

- bone area (HU >= 250) and body area (HU >= -300) per slice, cm^2 (the profile method's features);
- mean HU, clipped to [-500, 1500], in an 8 x 8 grid of 15 mm cells centred on the column (the ``profile`` method's
  ``column_cells`` features, :mod:`cspine_submit.localize.features`, centred by ``column_centre`` on the cue slices
  of the study's own extent), per slice.

Extents, mm: level heights (disc to disc, as the real labels are drawn; the dens tip for C2's top), the column
length, mask heights and overlaps (synthetic masks against the two VerSe masks: real segmentations, whose posterior
elements overlap the next body), and where the surroundings start: skull bone near the column in bands above C1,
the lowest bone in front of the column (mandible), bone beside the column below C5 (clavicles, first ribs), lung
apices, the shoulders (body wider than the neck by 25 mm on either side, on the uncut volume), the neck's width and
depth and the column's place in it.

The real voxels are 4-5 mm in-plane and 2.5-3 mm apart (resampled here): thin bone is blurred, so the real bone
area is measured on a softer image than the synthetic one. Real labels were drawn by eye (see their README).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np

from cspine_submit.localize.features import (
    CELL_CLIP_HU,
    CELL_HU_SCALE,
    bone_centroids,
    column_cells,
    column_centre,
    cue_indices,
)
from cspine_submit.datasets.synthetic import plan_specs, render_study, study_geometry
from cspine_submit.datasets.body import draw_background
from cspine_submit.datasets.volume_cut import competition_cut, resample_volume
from cspine_submit.datasets.volume_study import find_volumes, load_labels_axial, load_pair

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "real_neck"
TABLES = ROOT / "tests" / "data" / "real_competition"
VERSE = sorted((ROOT / "tests" / "data" / "nifti" / "verse").glob("*msk*.nii.gz"))
VERTEBRAE = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")

U = np.round(np.arange(-0.55, 1.85 + 1e-9, 0.01), 4)
"""Column coordinate grid of the profiles: 0 = top of C1, 1 = bottom of C7."""
GRID_N, GRID_CLIP = 8, CELL_CLIP_HU
BONE_HU, BODY_HU, AIR_HU = 250.0, -300.0, -400.0
ABOVE_MM, BELOW_MM = 60.0, 100.0
NEAR_MM = 75.0
"""Half-width of the smallest competition field of view around the column (160 mm): what every study sees."""


# ------------------------------------------------------------------------------------------------------------------
# One study's measurements
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Study:
    """A study on the measuring grid: ``hu`` (z, y, x) HU and ``labels``, z from head to feet, ``spacing``
    (dz, dy, dx) mm, ``levels`` the mm of each level boundary (C1 top, C2 top = dens tip, C3-C7 tops, C7 bottom)
    from the first slice, ``study_mm`` the (first, last) mm the study would have had when cut as usual."""

    name: str
    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    levels: dict
    study_mm: tuple[float, float]
    wide: dict
    """Measurements on the uncut (real) or wide-canvas (synthetic) body: neck width, shoulders."""


def body_masks(hu: np.ndarray) -> np.ndarray:
    """Per slice: the largest connected region of HU >= -300 with its holes filled (the patient, not the air)."""
    out = np.zeros(hu.shape, bool)
    for i, sl in enumerate(hu):
        b = (sl >= BODY_HU).astype(np.uint8)
        n, lab, stats, _ = cv2.connectedComponentsWithStats(b, connectivity=8)
        if n <= 1:
            continue
        keep = (lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
        contours, _ = cv2.findContours(keep, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        filled = np.zeros_like(keep)
        cv2.drawContours(filled, contours, -1, 1, thickness=-1)
        out[i] = filled > 0
    return out


def first_from(z_mm: np.ndarray, values: np.ndarray, threshold: float, lo: float, hi: float, last: bool = False):
    """The first (or last) position in [lo, hi] where ``values >= threshold`` (NaN when none)."""
    ok = (z_mm >= lo) & (z_mm <= hi) & (values >= threshold)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return float("nan")
    return float(z_mm[idx[-1] if last else idx[0]])


def measure(study: Study) -> dict:
    """Profiles on the ``U`` grid and extents (mm) of one study."""
    hu, lab = study.hu, study.labels
    dz, dy, dx = study.spacing
    nz = hu.shape[0]
    z = np.arange(nz) * dz
    lv = study.levels
    top, bottom = lv["C1"], lv["bottom"]
    length = bottom - top
    u = (z - top) / length
    px_cm2 = dy * dx / 100.0

    bone = (hu >= BONE_HU).sum(axis=(1, 2)) * px_cm2
    body = (hu >= BODY_HU).sum(axis=(1, 2)) * px_cm2
    # Column centre as the localizer finds it: from the cue slices of the study's own extent.
    lo, hi = study.study_mm
    inside = np.flatnonzero((z >= lo) & (z <= hi))
    cue = inside[cue_indices(len(inside), z[inside])]
    point = column_centre(bone_centroids(hu[cue]))
    grid = (column_cells(hu, (dy, dx), point) * CELL_HU_SCALE).reshape(nz, GRID_N, GRID_N)

    # Non-vertebral bone around the column, per slice, in boxes relative to the column point (mm, y posterior).
    yy = (np.arange(hu.shape[1]) - point[0]) * dy
    xx = (np.arange(hu.shape[2]) - point[1]) * dx
    ay, ax = np.meshgrid(yy, xx, indexing="ij")
    loose = (hu >= BONE_HU) & (lab == 0)
    near_box = (np.abs(ax) <= 30) & (ay >= -25) & (ay <= 35)
    front_box = (np.abs(ax) <= 55) & (ay < -35) & (ay >= -NEAR_MM - 25)
    side_box = (np.abs(ax) >= 25) & (np.abs(ax) <= NEAR_MM) & (np.abs(ay) <= NEAR_MM)
    near_bone = (loose & near_box).sum(axis=(1, 2)) * px_cm2
    front_bone = (loose & front_box).sum(axis=(1, 2)) * px_cm2
    side_bone = (loose & side_box).sum(axis=(1, 2)) * px_cm2
    bodies = body_masks(hu)
    lung = ((hu < AIR_HU) & bodies & (np.abs(ax) >= 20) & (np.abs(ax) <= NEAR_MM)).sum(axis=(1, 2)) * px_cm2
    airway = ((hu < AIR_HU) & bodies & (np.abs(ax) < 20) & (ay < 0) & (ay > -60)).sum(axis=(1, 2)) * px_cm2

    def rel(v):
        return v - top

    c4 = 0.5 * (lv["C4"] + lv["C5"])
    i4 = int(np.clip(round(c4 / dz), 0, nz - 1))
    ys_body = np.flatnonzero(bodies[i4].any(axis=1))
    ext = {
        "column length": length,
        "dens tip below C1 top": lv["C2"] - top,
        **{f"level {v}": lv[VERTEBRAE[k + 1]] - lv[v] for k, v in enumerate(VERTEBRAE[1:-1], start=1)},
        "level C7": bottom - lv["C7"],
        **{f"skull bone near column {a}-{b} mm above C1, cm2": float(np.mean(near_bone[(z >= top - b) & (z < top - a)]))
           if ((z >= top - b) & (z < top - a)).any() else float("nan") for a, b in ((0, 10), (10, 25), (25, 45))},
        "front bone lowest (mandible), below C1 top": rel(first_from(z, front_bone, 1.0, top - 40, top + 0.8 * length,
                                                                     last=True)),
        "side bone (clavicle/rib) first, below C7 bottom":
            first_from(z, side_bone, 1.0, lv["C5"], bottom + BELOW_MM) - bottom,
        "lung apex, below C7 bottom": first_from(z, lung, 2.0, lv["C5"], bottom + BELOW_MM) - bottom,
        "airway area at C4, cm2": float(airway[i4]),
        "neck depth at C4 (in FOV)": float(ys_body[-1] - ys_body[0]) * dy if ys_body.size else float("nan"),
        "column to front skin at C4": float(point[0] - ys_body[0]) * dy if ys_body.size else float("nan"),
        "column to back skin at C4": float(ys_body[-1] - point[0]) * dy if ys_body.size else float("nan"),
        "body area at C4 (in FOV), cm2": float(body[i4]),
        **study.wide,
    }
    for k, v in enumerate(VERTEBRAE):
        zz = np.flatnonzero((lab == k + 1).any(axis=(1, 2)))
        ext[f"mask {v}"] = (zz[-1] - zz[0] + 1) * dz if zz.size else float("nan")
        if k < 6:
            z2 = np.flatnonzero((lab == k + 2).any(axis=(1, 2)))
            ext[f"overlap {v}/{VERTEBRAE[k + 1]}"] = (zz[-1] - z2[0] + 1) * dz if zz.size and z2.size else float("nan")

    def on_u(values):
        return np.interp(U, u, values, left=np.nan, right=np.nan)

    near_bone = np.where(u <= 0.3, near_bone, np.nan)  # below that the box holds the vertebrae's own bone
    prof = {"bone": on_u(bone), "body": on_u(body), "near_bone": on_u(near_bone), "front_bone": on_u(front_bone),
            "side_bone": on_u(side_bone), "lung": on_u(lung)}
    g = grid.reshape(nz, -1)
    prof["grid"] = np.stack([on_u(g[:, j]) for j in range(g.shape[1])], axis=1).reshape(len(U), GRID_N, GRID_N)
    return {"name": study.name, "extents": ext, "profiles": prof}


def widths(body_hu: np.ndarray, spacing, point_x_px: float, z_levels: dict, top_index_mm: float) -> dict:
    """Neck width at C4 and where the shoulders start, on an uncut body (``body_hu`` (z, y, x), z from the head)."""
    dz, _, dx = spacing
    bodies = body_masks(body_hu)
    z = np.arange(body_hu.shape[0]) * dz + top_index_mm
    half = np.full(len(z), np.nan)
    for i in range(len(z)):
        xs = np.flatnonzero(bodies[i].any(axis=0))
        if xs.size:
            half[i] = max(point_x_px - xs[0], xs[-1] - point_x_px) * dx
    c4 = 0.5 * (z_levels["C4"] + z_levels["C5"])
    i4 = int(np.argmin(np.abs(z - c4)))
    neck = half[i4]
    start = first_from(z, half, neck + 25.0, z_levels["C4"], z_levels["bottom"] + BELOW_MM)
    return {"neck half-width at C4 (uncut)": float(neck),
            "shoulders start, below C7 bottom": start - z_levels["bottom"]}


# ------------------------------------------------------------------------------------------------------------------
# The two sets
# ------------------------------------------------------------------------------------------------------------------


def real_studies(size: int, seed: int = 0):
    """The real necks, cut as write-study cuts them but kept wider in z (module docstring)."""
    labels_json = json.loads((REAL / "labels.json").read_text())
    for name, ct_path, lab_path in find_volumes(REAL):
        ct, labels = load_pair(ct_path, lab_path)
        rng = np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])
        spec = competition_cut(labels.volume, labels.spacing, rng, size=size, slice_mm=1.25)
        info = labels_json[name]
        ndz = labels.spacing[0]
        lv = {v: info[v][0] * ndz for v in VERTEBRAE}
        lv["bottom"] = info["C7"][1] * ndz
        last = (labels.volume.shape[0] - 1) * ndz
        wide = dataclasses.replace(spec, z_start_mm=round(max(0.0, lv["C1"] - ABOVE_MM), 4),
                                   z_end_mm=round(min(last, lv["bottom"] + BELOW_MM), 4))
        hu, lab, spacing = resample_volume(ct.volume, ct.spacing, wide, labels.volume)
        shift = wide.z_start_mm
        levels = {k: v - shift for k, v in lv.items()}
        # Uncut body for widths: the native volume, column x from the cervical labels.
        xs = np.flatnonzero(((labels.volume >= 1) & (labels.volume <= 7)).any(axis=(0, 1)))
        w = widths(ct.volume, ct.spacing, 0.5 * (xs[0] + xs[-1]), lv, 0.0)
        yield Study(name, hu, lab, spacing, levels, (spec.z_start_mm - shift, spec.z_end_mm - shift), w)


def synthetic_levels(anatomy, labels, dz) -> dict:
    """Level boundaries of a synthetic study drawn as the real labels are: C1's mask top, the dens tip, the middle
    of each disc, and the middle of the C7/T1 disc."""
    v = {x.name: x for x in anatomy.vertebrae}
    body = {n: [s for s in x.solids if s.part == "body"][0] for n, x in v.items() if n != "C1"}
    lv = {"C1": float(np.flatnonzero((labels == 1).any(axis=(1, 2)))[0] * dz)}
    dens = [s for s in v["C2"].solids if s.part == "dens"][0]
    lv["C2"] = v["C2"].z0 + dens.z0
    names = [x.name for x in anatomy.vertebrae]
    for k in range(2, 7):
        up, here = names[k - 1], names[k]
        lv[here] = 0.5 * (v[up].z0 + body[up].z1 + v[here].z0)
    lv["bottom"] = 0.5 * (v["C7"].z0 + body["C7"].z1 + v["T1"].z0) if "T1" in v else v["C7"].z0 + body["C7"].z1
    return lv


def degrade(hu: np.ndarray, spacing, like=(2.75, 4.6)) -> np.ndarray:
    """Blur a volume to the real necks' resolution (``like`` = (slice, pixel) mm; box averages, back to the grid):
    separates what the anatomy differs in from what the real voxels' size does to thin bone."""
    dz, dy, _ = spacing
    out = hu.astype(np.float32)
    k = max(1, int(round(like[1] / dy)))
    for i in range(len(out)):
        out[i] = cv2.blur(out[i], (k, k))
    kz = max(1, int(round(like[0] / dz)))
    if kz > 1:
        c = np.cumsum(np.pad(out, ((kz // 2 + 1, kz - kz // 2 - 1), (0, 0), (0, 0)), mode="edge"), axis=0)
        out = (c[kz:] - c[:-kz]) / kz
    return out


def synthetic_studies(n: int, seed: int, size: int, blur: bool = False):
    """``n`` synthetic studies (demo slices, default field of view) with 60 mm above C1 and 100 mm below C7
    (``blur``: at the real necks' resolution, :func:`degrade`)."""
    specs = plan_specs(n, seed, size=size, spacing=(1.0, 2.0), head=(ABOVE_MM - 0.01, ABOVE_MM),
                       chest=(BELOW_MM - 0.01, BELOW_MM), thoracic_label_fraction=1.0)
    for spec in specs:
        st = render_study(spec)
        dz = st.spacing[0]
        lv = synthetic_levels(st.anatomy, st.labels, dz)
        # The slices this study would have had with the generator's default head / chest ranges.
        r = np.random.default_rng([spec.seed, 99])
        head, chest = r.uniform(5.0, 60.0), r.uniform(5.0, 80.0)
        study_mm = (st.anatomy.z_c1 - head, st.anatomy.z_c7 + chest)
        labels = st.labels
        # Widths on the same anatomy drawn on a 500 mm canvas (the background holds the body outline).
        a = st.anatomy
        off = 250.0 - a.cx0
        wide_a = dataclasses.replace(a, cx0=a.cx0 + off, cy0=a.cy0 + 250.0 - a.cy0)
        px = 2.0
        bg = draw_background(wide_a, (st.shape[0], 250, 250), dz, px)
        w = widths(bg, (dz, px, px), wide_a.cx0 / px, lv, 0.0)
        hu = degrade(st.hu, st.spacing) if blur else st.hu
        yield Study(spec.uid.rsplit(".", 1)[-1], hu, labels, st.spacing, lv, study_mm, w)


def verse_masks() -> list[dict]:
    """Mask heights and overlaps of the VerSe segmentations (real masks with posterior elements), mm."""
    out = []
    for path in VERSE:
        a = load_labels_axial(path)
        dz = a.spacing[0]
        ext = {}
        for k, v in enumerate(VERTEBRAE):
            zz = np.flatnonzero((a.volume == k + 1).any(axis=(1, 2)))
            ext[f"mask {v}"] = (zz[-1] - zz[0] + 1) * dz
            if k < 6:
                z2 = np.flatnonzero((a.volume == k + 2).any(axis=(1, 2)))
                ext[f"overlap {v}/{VERTEBRAE[k + 1]}"] = (zz[-1] - z2[0] + 1) * dz
        out.append(ext)
    return out


# ------------------------------------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------------------------------------


def _stats(values) -> tuple[float, float, float, int]:
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if v.size == 0:
        return (float("nan"),) * 3 + (0,)
    return float(np.median(v)), float(v.min()), float(v.max()), int(v.size)


REGIONS = (("above C1", -0.55, 0.0), ("C1-C2", 0.0, 0.3), ("C3-C5", 0.3, 0.75), ("C6-C7", 0.75, 1.0),
           ("below C7", 1.0, 1.5))


def grid_gap(real: list[dict], synth: list[dict]) -> list[dict]:
    """Per region of the column: mean |real median - synthetic median| over the 64 cells (HU), and as a yardstick
    the typical distance of one real neck from the real median (median over necks of their mean |.|)."""
    rg = np.stack([r["profiles"]["grid"] for r in real])
    sg = np.stack([s["profiles"]["grid"] for s in synth])
    with np.errstate(all="ignore"):
        rmed, smed = np.nanmedian(rg, axis=0), np.nanmedian(sg, axis=0)
    rows = []
    for name, lo, hi in REGIONS:
        sel = (U >= lo) & (U < hi)
        with np.errstate(all="ignore"):
            gap = float(np.nanmean(np.abs(rmed[sel] - smed[sel])))
            spread = float(np.nanmedian([np.nanmean(np.abs(x[sel] - rmed[sel])) for x in rg]))
            synth_to_real = float(np.nanmedian([np.nanmean(np.abs(x[sel] - rmed[sel])) for x in sg]))
        rows.append({"region": name, "u": (lo, hi), "median gap HU": gap, "real spread HU": spread,
                     "synthetic study to real median HU": synth_to_real})
    return rows


def profile_gap(real: list[dict], synth: list[dict], key: str) -> list[dict]:
    """As :func:`grid_gap` for a 1-D profile (cm^2)."""
    rp = np.stack([r["profiles"][key] for r in real])
    sp = np.stack([s["profiles"][key] for s in synth])
    with np.errstate(all="ignore"):
        rmed, smed = np.nanmedian(rp, axis=0), np.nanmedian(sp, axis=0)
    rows = []
    for name, lo, hi in REGIONS:
        sel = (U >= lo) & (U < hi)
        with np.errstate(all="ignore"):
            rows.append({"region": name, "real": float(np.nanmean(rmed[sel])), "synthetic": float(np.nanmean(smed[sel]))})
    return rows


def print_tables(real: list[dict], synth: list[dict], verse: list[dict]) -> None:
    keys = list(real[0]["extents"])
    print(f"\n{'extent (mm unless stated)':<48}{'real: median [min, max] n':>30}{'synthetic: median [min, max] n':>34}"
          f"{'VerSe masks':>16}")
    for k in keys:
        r = _stats([x["extents"][k] for x in real])
        s = _stats([x["extents"][k] for x in synth])
        ver = ""
        if verse and k in verse[0]:
            ver = ", ".join(f"{v[k]:.0f}" for v in verse)
        fmt = lambda t: f"{t[0]:7.1f} [{t[1]:6.1f}, {t[2]:6.1f}] {t[3]:2d}" if t[3] else f"{'-':>24}"  # noqa: E731
        note = " (real: tiling labels)" if k.startswith(("mask", "overlap")) else ""
        print(f"{k + note:<48}{fmt(r):>30}{fmt(s):>34}{ver:>16}")
    for key, label in (("bone", "bone area cm2"), ("body", "body area cm2")):
        print(f"\nmean {label} per region of the column (median profile)")
        for row in profile_gap(real, synth, key):
            print(f"  {row['region']:<10} real {row['real']:7.1f}   synthetic {row['synthetic']:7.1f}")
    print("\ncolumn-centred 8x8 grid (mean HU clipped to [-500, 1500], 15 mm cells): mean |difference| over cells")
    print(f"  {'region':<10}{'real vs synth medians':>24}{'real neck vs real median':>27}{'synth study vs real median':>29}")
    for row in grid_gap(real, synth):
        print(f"  {row['region']:<10}{row['median gap HU']:>24.0f}{row['real spread HU']:>27.0f}"
              f"{row['synthetic study to real median HU']:>29.0f}")


# ------------------------------------------------------------------------------------------------------------------
# Figure (OpenCV)
# ------------------------------------------------------------------------------------------------------------------

REAL_BGR, SYN_BGR = (40, 40, 200), (200, 120, 30)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _text(img, s, xy, scale=0.45, color=(0, 0, 0), thick=1):
    cv2.putText(img, s, (int(xy[0]), int(xy[1])), FONT, scale, color, thick, cv2.LINE_AA)


def _panel_profiles(real, synth, key, title, h=420, w=330, log=False):
    """Profile vs u (u downward, like a sagittal view): median line and 25-75% band, real and synthetic."""
    img = np.full((h, w, 3), 255, np.uint8)
    top, bot, left, right = 30, h - 30, 45, w - 10
    rp = np.stack([r["profiles"][key] for r in real])
    sp = np.stack([s["profiles"][key] for s in synth])
    tr = (lambda v: np.log1p(np.maximum(v, 0))) if log else (lambda v: v)
    with np.errstate(all="ignore"):
        vmax = np.nanmax([np.nanpercentile(tr(rp), 95), np.nanpercentile(tr(sp), 95)]) * 1.1 or 1.0
    ypix = lambda uu: top + (uu - U[0]) / (U[-1] - U[0]) * (bot - top)  # noqa: E731
    xpix = lambda v: left + np.clip(v / vmax, 0, 1) * (right - left)  # noqa: E731
    for uu, lab in ((0.0, "C1 top"), (1.0, "C7 bottom")):
        cv2.line(img, (left, int(ypix(uu))), (right, int(ypix(uu))), (150, 150, 150), 1)
        _text(img, lab, (right - 70, ypix(uu) - 3), 0.35, (120, 120, 120))
    for uu in np.arange(-0.5, 1.81, 0.25):
        _text(img, f"{uu:.2f}", (2, ypix(uu) + 4), 0.33, (90, 90, 90))
    for data, color in ((rp, REAL_BGR), (sp, SYN_BGR)):
        with np.errstate(all="ignore"):
            q25, q50, q75 = (np.nanpercentile(tr(data), q, axis=0) for q in (25, 50, 75))
        n = np.isfinite(data).sum(axis=0)
        ok = n >= max(2, len(data) // 4)
        overlay = img.copy()
        poly = [(xpix(a), ypix(uu)) for a, uu, o in zip(q25, U, ok) if o] + \
               [(xpix(b), ypix(uu)) for b, uu, o in zip(q75[::-1], U[::-1], ok[::-1]) if o]
        if poly:
            cv2.fillPoly(overlay, [np.int32(poly)], color)
            cv2.addWeighted(overlay, 0.18, img, 0.82, 0, img)
        pts = np.int32([(xpix(m), ypix(uu)) for m, uu, o in zip(q50, U, ok) if o])
        if len(pts) > 1:
            cv2.polylines(img, [pts], False, color, 2, cv2.LINE_AA)
    _text(img, title + (" (log1p)" if log else ""), (left, 18), 0.45)
    _text(img, f"0 .. {np.expm1(vmax) if log else vmax:.0f}", (left, h - 10), 0.35, (90, 90, 90))
    cv2.rectangle(img, (left, top), (right, bot), (0, 0, 0), 1)
    return img


def _heat(arr, h, w, lo=GRID_CLIP[0], hi=GRID_CLIP[1]):
    a = np.nan_to_num(arr, nan=lo)
    g = np.clip((a - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)
    col = cv2.applyColorMap(cv2.resize(g, (w, h), interpolation=cv2.INTER_NEAREST), cv2.COLORMAP_VIRIDIS)
    miss = cv2.resize(np.isnan(arr).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    col[miss] = (235, 235, 235)
    return col


def _panel_grid(real, synth, h=420):
    """Median grid features along u: a pseudo-sagittal (8 AP cells, averaged over the 2 middle columns) and a
    pseudo-coronal (8 left-right cells, over the 2 middle rows), real | synthetic | difference."""
    rg = np.stack([r["profiles"]["grid"] for r in real])
    sg = np.stack([s["profiles"]["grid"] for s in synth])
    with np.errstate(all="ignore"):
        rmed, smed = np.nanmedian(rg, axis=0), np.nanmedian(sg, axis=0)
    top, bot = 30, h - 30
    cw = 80
    blocks = []
    for name, view in (("sagittal (AP ->)", lambda g: np.nanmean(g[:, :, 3:5], axis=2)),
                       ("coronal (R -> L)", lambda g: np.nanmean(g[:, 3:5, :], axis=1))):
        with np.errstate(all="ignore"):
            r, s = view(rmed), view(smed)
        d = s - r
        diff = _heat(d, bot - top, cw, -800, 800)
        tiles = [_heat(r, bot - top, cw), _heat(s, bot - top, cw), diff]
        img = np.full((h, 3 * (cw + 8) + 8, 3), 255, np.uint8)
        for k, (t, lab) in enumerate(zip(tiles, ("real", "synth", "synth-real"))):
            x0 = 8 + k * (cw + 8)
            img[top:bot, x0:x0 + cw] = t
            _text(img, lab, (x0 + 2, top - 4), 0.38)
            for uu in (0.0, 1.0):
                y = int(top + (uu - U[0]) / (U[-1] - U[0]) * (bot - top))
                cv2.line(img, (x0, y), (x0 + cw, y), (255, 255, 255), 1)
        _text(img, "grid " + name, (8, 14), 0.42)
        blocks.append(img)
    return np.hstack(blocks)


def _panel_ladder(real, synth, h=420, w=560):
    """Extents per study along mm from C1 top: levels (alternating shades), and markers where the surroundings
    start (lowest front bone, side bone, lung apex, shoulders)."""
    img = np.full((h, w, 3), 255, np.uint8)
    top, bot = 30, h - 30
    lo_mm, hi_mm = -70.0, 260.0
    ypix = lambda mm: int(top + (mm - lo_mm) / (hi_mm - lo_mm) * (bot - top))  # noqa: E731
    studies = [("r", r) for r in real] + [("s", s) for s in synth]
    colw = (w - 60) / len(studies)
    for mm in range(-50, 251, 50):
        cv2.line(img, (40, ypix(mm)), (w - 5, ypix(mm)), (225, 225, 225), 1)
        _text(img, f"{mm}", (4, ypix(mm) + 4), 0.33, (90, 90, 90))
    marks = (("front bone lowest (mandible), below C1 top", 1, "top", (0, 140, 255), "m"),
             ("side bone (clavicle/rib) first, below C7 bottom", 1, "bottom", (0, 160, 0), "c"),
             ("lung apex, below C7 bottom", 1, "bottom", (200, 0, 200), "l"),
             ("shoulders start, below C7 bottom", 1, "bottom", (0, 0, 0), "h"))
    for k, (kind, st) in enumerate(studies):
        x0 = int(45 + k * colw + (8 if kind == "s" else 0))
        x1 = int(x0 + max(2, colw - 2))
        e = st["extents"]
        base = REAL_BGR if kind == "r" else SYN_BGR
        z = 0.0
        z_levels = [0.0, e["dens tip below C1 top"]]
        for v in VERTEBRAE[1:]:
            z_levels.append(z_levels[-1] + e[f"level {v}"])
        for i in range(len(z_levels) - 1):
            shade = 1.0 if i % 2 == 0 else 0.55
            color = tuple(int(255 - (255 - c) * shade) for c in base)
            cv2.rectangle(img, (x0, ypix(z_levels[i])), (x1, ypix(z_levels[i + 1])), color, -1)
        bottom = z_levels[-1]
        for key, sign, ref, color, _ in marks:
            v = e[key]
            if not np.isfinite(v):
                continue
            mm = (0.0 + sign * v) if ref == "top" else bottom + v
            y = ypix(np.clip(mm, lo_mm, hi_mm))
            cv2.line(img, (x0 - 1, y), (x1 + 1, y), color, 2)
        del z
    _text(img, "extents, mm below C1 top (levels C1..C7; red real, blue synthetic)", (40, 16), 0.42)
    legend = "orange: lowest front bone (mandible)  green: clavicle/rib  magenta: lung apex  black: shoulders"
    _text(img, legend, (6, h - 10), 0.33)
    return img


def draw_figure(real, synth, path: Path, title: str) -> Path:
    panels = [_panel_profiles(real, synth, "bone", "bone area cm2 vs u", log=True),
              _panel_profiles(real, synth, "body", "body area cm2 vs u"),
              _panel_grid(real, synth)]
    row1 = np.hstack([p for p in panels])
    row2 = np.hstack([_panel_profiles(real, synth, "near_bone", "skull/near bone cm2"),
                      _panel_profiles(real, synth, "side_bone", "side bone cm2"),
                      _panel_profiles(real, synth, "lung", "lung cm2 (<=75mm)"),
                      _panel_ladder(real, synth)])
    w = max(row1.shape[1], row2.shape[1])
    pad = lambda im: np.hstack([im, np.full((im.shape[0], w - im.shape[1], 3), 255, np.uint8)])  # noqa: E731
    head = np.full((34, w, 3), 255, np.uint8)
    _text(head, title, (10, 22), 0.55)
    _text(head, "real", (w - 200, 22), 0.55, REAL_BGR, 2)
    _text(head, "synthetic", (w - 140, 22), 0.55, SYN_BGR, 2)
    fig = np.vstack([head, pad(row1), pad(row2)])
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), fig, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return path


def _csv_rows(name: str) -> list[dict]:
    import csv

    with open(TABLES / name, newline="") as fh:
        return list(csv.DictReader(fh))


def _q(values) -> str:
    a = np.asarray(values, dtype=float)
    return f"{np.percentile(a, 5):7.3f} {np.median(a):7.3f} {np.percentile(a, 95):7.3f}"


def _geometry_rows(geo: list[dict], reversed_share: float, no_modality: float) -> dict[str, str]:
    return {
        "slice spacing, mm": _q([g["slice_mm"] for g in geo]),
        "thickness > spacing, share": f"{np.mean([g['thickness_mm'] > 1.01 * g['slice_mm'] for g in geo]):23.3f}",
        "pixel spacing, mm": _q([g["pixel_mm"] for g in geo]),
        "scan above C1, mm": _q([g["head_mm"] for g in geo]),
        "scan below C7, mm": _q([g["chest_mm"] for g in geo]),
        "numbered feet to head, share": f"{reversed_share:23.3f}",
        "no Modality tag, share": f"{no_modality:23.3f}",
    }


def geometry_and_labels(n: int = 2000, seed: int = 7) -> None:
    """Print geometry and label statistics (p5 / median / p95, shares) of the real tables, of ``synth`` (the
    default ``real`` scheme and the first ``uniform`` one, ``n`` specs each, no rendering) and of ``write-study``'s
    cut (the default cut drawn 20 times for each real neck)."""
    rows = _csv_rows("study_geometry.csv")
    ext = _csv_rows("vertebra_extents.csv")
    real = {
        "slice spacing, mm": _q([float(r["dz_median"]) for r in rows]),
        "thickness > spacing, share":
            f"{np.mean([float(r['thk']) > 1.01 * float(r['dz_median']) for r in rows]):23.3f}",
        "pixel spacing, mm": "p25 0.272, med 0.312, p75 0.355",  # only a public summary (FACTS.md)
        "scan above C1, mm": _q([float(r["C1_top_mm"]) for r in ext]),
        "scan below C7, mm": _q([float(r["zextent"]) - float(r["C7_bot_mm"]) for r in ext]),
        "numbered feet to head, share": f"{np.mean([r['head_first'] == 'False' for r in rows]):23.3f}",
        "no Modality tag, share": f"{1.0:23.3f}",
    }
    columns = {"real tables": real}
    for scheme in ("real", "uniform"):
        specs = plan_specs(n, seed, scheme=scheme)
        geo = [study_geometry(sp) for sp in specs]
        ranged = any(g["thickness_mm"] is None for g in geo)
        for g in geo:
            if g["thickness_mm"] is None:  # a range: render_study draws it later (30 % overlapping, 1.2-2x)
                g["thickness_mm"] = g["slice_mm"]
        columns[f"synth {scheme}"] = _geometry_rows(geo, np.mean([sp.reversed for sp in specs]),
                                                    np.mean([not sp.modality for sp in specs]))
        if ranged:
            columns[f"synth {scheme}"]["thickness > spacing, share"] = f"{'0.300 (at render)':>23}"
        columns[f"synth {scheme}"]["_specs"] = specs
    cut_geo = []
    for name, _, lab_path in find_volumes(REAL):
        labels = load_labels_axial(lab_path)
        lab_dz = labels.spacing[0]
        c1 = np.flatnonzero((labels.volume == 1).any(axis=(1, 2)))[0] * lab_dz
        c7 = np.flatnonzero((labels.volume == 7).any(axis=(1, 2)))[-1] * lab_dz
        for k in range(20):
            spec = competition_cut(labels.volume, labels.spacing, np.random.default_rng([k, zlib.crc32(name.encode())]))
            cut_geo.append({"slice_mm": spec.slice_mm, "thickness_mm": spec.thickness_mm or spec.slice_mm,
                            "pixel_mm": spec.pixel_mm, "head_mm": c1 - spec.z_start_mm,
                            "chest_mm": spec.z_end_mm - c7})
    columns["write-study cut"] = _geometry_rows(cut_geo, 0.098, 1.0)
    print(f"\n## geometry: p5 / median / p95 (or share); synth: {n} specs per scheme; write-study: 20 default cuts "
          "of each real neck (its margins are clipped by the neck volume's own ends)")
    names = list(columns)
    print(f"{'':<30}" + "".join(f"{c:<26}" for c in names))
    for key in real:
        print(f"{key:<30}" + "".join(f"{str(columns[c][key]):<26}" for c in names))
    print("\n## labels (real: train.csv's counts, FACTS.md)")
    real_counts = np.array([1058, 623, 239, 64, 26, 7, 2]) / 2019
    print(f"{'':<30}{'overall':>8}{'P(C7|C6)':>10}{'P(C6|C5)':>10}{'boxed':>7}   fractured vertebrae 0..6, share")
    print(f"{'real':<30}{0.476:>8.3f}{0.47:>10.2f}{0.56:>10.2f}{0.245:>7.3f}   "
          + " ".join(f"{x:.3f}" for x in real_counts))
    for scheme in ("real", "uniform"):
        specs = columns[f"synth {scheme}"]["_specs"]
        lab = [sp.labels for sp in specs]
        counts = np.bincount([len(sp.fractures) for sp in specs], minlength=7)[:7] / len(specs)

        def cond(a, b):
            have = [x for x in lab if x[a]]
            return np.mean([x[b] for x in have]) if have else float("nan")

        fractured = [sp for sp in specs if sp.fractures]
        print(f"{'synth ' + scheme:<30}{np.mean([x['patient_overall'] for x in lab]):>8.3f}{cond('C6', 'C7'):>10.2f}"
              f"{cond('C5', 'C6'):>10.2f}{np.mean([sp.boxed for sp in fractured]):>7.3f}   "
              + " ".join(f"{x:.3f}" for x in counts))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=24, help="synthetic studies (default 24)")
    parser.add_argument("--seed", type=int, default=7, help="synthetic set's seed")
    parser.add_argument("--size", type=int, default=256, help="matrix of both sets (px)")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "synthetic_vs_real.png")
    parser.add_argument("--real-resolution", action="store_true",
                        help="blur the synthetic studies to the real necks' voxel size (4.6 mm, 2.75 mm) first")
    parser.add_argument("--json", type=Path, default=None, help="write the per-study extents here")
    parser.add_argument("--geometry-only", action="store_true",
                        help="only the geometry and label tables (seconds; no rendering, no figure)")
    args = parser.parse_args(argv)
    geometry_and_labels(seed=args.seed)
    if args.geometry_only:
        return 0
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # NaN medians where a set has no slice at that u

    t0 = time.perf_counter()
    real = [measure(s) for s in real_studies(args.size)]
    t1 = time.perf_counter()
    synth = [measure(s) for s in synthetic_studies(args.synthetic, args.seed, args.size,
                                                      args.real_resolution)]
    t2 = time.perf_counter()
    verse = verse_masks()
    print(f"measured {len(real)} real necks in {t1 - t0:.0f} s, {len(synth)} synthetic studies in {t2 - t1:.0f} s")
    print_tables(real, synth, verse)
    fig = draw_figure(real, synth, args.figure,
                      f"synthetic ({len(synth)}, seed {args.seed}{', blurred to 4.6 mm' if args.real_resolution else ''}) vs real necks ({len(real)}): u = 0 top of C1, "
                      "1 bottom of C7")
    print(f"\nfigure: {fig}")
    if args.json:
        args.json.write_text(json.dumps({"real": [{"name": r["name"], **r["extents"]} for r in real],
                                         "synthetic": [{"name": s["name"], **s["extents"]} for s in synth],
                                         "verse": verse}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
