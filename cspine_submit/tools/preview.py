"""A picture of a crop plan: sagittal and coronal reformats with each vertebra's planned range and box.

Drawn with OpenCV only. Layout, left to right: a z ruler (mm below the first slice; head at the top, feet at the
bottom), the sagittal panel (vertical = z from head to feet, horizontal = rows y: anterior/posterior, labelled
from the study's orientation), the coronal panel (horizontal = columns x: the patient's right/left), each followed
by a lane strip where every vertebra's planned range is a coloured band with its name. In the panels, each
vertebra's crop box is a rectangle in its colour spanning its planned z-range (in the sagittal panel the box's
y-extent, in the coronal panel its x-extent), and the planned slices are ticks on the panel's left edge. With a
mask, the outline of every labelled vertebra on the reformat plane is drawn in the same colour. Under the panels:
a scale bar and a key saying what the marks are.

The reformats are built from a subset of the slices (at most ``max_slices``, evenly spaced), so a preview costs a
few dozen decoded slices; each panel is a thin maximum-intensity slab (``slab_mm`` thick), so the column shows even
when it curves slightly out of the plane: the sagittal one through the centre column of the planned boxes, the
coronal one through the row with the most bone inside the boxes (the boxes' centre row often misses the column).
Slice numbers (the console's, :func:`preview_study`'s plans) are 0-based indices into the study's slices sorted
head to feet; ``info["file_names"]`` maps them to the DICOM files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from cspine_submit.config import VERTEBRAE
from cspine_submit.read import axial_axcodes

COLOURS_BGR: dict[str, tuple[int, int, int]] = {
    "C1": (60, 60, 255),
    "C2": (0, 165, 255),
    "C3": (0, 230, 230),
    "C4": (60, 220, 60),
    "C5": (255, 200, 0),
    "C6": (255, 80, 80),
    "C7": (230, 60, 230),
}
"""Vertebra colours (OpenCV BGR order), distinct from each other and from grey."""

BONE_WINDOW = (400.0, 1800.0)
LANE_W = 34
N_LANES = 3  # neighbours overlap in z, so a vertebra and its neighbours never share a lane
TARGET_PX = 512
GAP = 6
"""Pixels between the sagittal lane strip and the coronal panel."""
TITLE_H = 22
"""Height of the title line (when there is a title)."""
LABEL_H = 16
"""Height of the strip above the panels naming each panel and the patient direction at its two ends."""
RULER_W = 40
"""Width of the z ruler left of the sagittal panel."""
KEY_TEXT = ("key: ticks at a panel's left edge = the planned slices (K per vertebra); rectangle = the crop box "
            "over the planned range; band with its name = the planned range; outline (with a mask) = the labelled "
            "vertebra; ruler = mm below the first slice.")
"""What the marks mean, wrapped to the image's width under the scale bar."""
KEY_LINE_H = 14
OPPOSITE = {"A": "P", "P": "A", "R": "L", "L": "R", "S": "I", "I": "S"}
DIRECTION_WORDS = {"A": "anterior", "P": "posterior", "R": "right", "L": "left", "S": "head", "I": "feet"}
_FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX, without importing cv2 at module import


@dataclass(frozen=True)
class PreviewGeometry:
    """Where things are in the preview image (pixels), so tests and callers can find them.

    Attributes
    ----------
    z_top_mm : float
        z (mm, toward the feet) at the top edge of the panels.
    scale : float
        Pixels per mm, the same along every axis.
    height : int
        Panel height in pixels.
    sagittal_x0, coronal_x0 : int
        Left edge of each panel (image columns); the panel is ``sag_w`` / ``cor_w`` wide.
    sag_w, cor_w : int
    lanes_x0 : (int, int)
        Left edge of the lane strip after each panel (``N_LANES`` lanes of ``LANE_W`` px).
    width : int
        Total image width.
    top : int
        Image row of the panels' first row (under the title and the direction labels).
    image_h : int
        Total image height (the key strip under the panels included).
    """

    z_top_mm: float
    scale: float
    height: int
    sagittal_x0: int
    sag_w: int
    coronal_x0: int
    cor_w: int
    lanes_x0: tuple[int, int]
    width: int
    top: int = 0
    image_h: int = 0

    def panel_row(self, z_mm: float) -> int:
        """Row of a z position (mm) within the panels (0 = their top edge)."""
        return int(round((z_mm - self.z_top_mm) * self.scale))

    def row_of(self, z_mm: float) -> int:
        """Image row of a z position (mm)."""
        return self.top + self.panel_row(z_mm)

    def lane_x(self, vertebra: str, strip: int = 0) -> tuple[int, int]:
        """Horizontal pixel span [x0, x1) of a vertebra's lane in lane strip 0 (sagittal) or 1 (coronal)."""
        lane = VERTEBRAE.index(vertebra) % N_LANES
        x0 = self.lanes_x0[strip] + lane * LANE_W
        return x0 + 2, x0 + LANE_W - 2


def subset_indices(n_slices: int, max_slices: int) -> np.ndarray:
    """At most ``max_slices`` evenly spaced slice indices, first and last included (strictly increasing)."""
    m = max(2, min(n_slices, max_slices)) if n_slices > 1 else 1
    return np.unique(np.rint(np.linspace(0, n_slices - 1, m)).astype(int))


def _to_grey(hu: np.ndarray, window=BONE_WINDOW) -> np.ndarray:
    level, width = window
    g = (hu - (level - width / 2)) / width
    return (np.clip(g, 0, 1) * 255).astype(np.uint8)


def _resample_z(planes: np.ndarray, z_sub: np.ndarray, z_rows: np.ndarray, nearest: bool) -> np.ndarray:
    """(m, w) planes at positions z_sub -> (len(z_rows), w) by linear (or nearest) interpolation along z."""
    m = len(z_sub)
    f = np.interp(z_rows, z_sub, np.arange(m, dtype=float)) if m > 1 else np.zeros_like(z_rows)
    if nearest:
        return planes[np.rint(f).astype(int)]
    i0 = np.floor(f).astype(int)
    i1 = np.minimum(i0 + 1, m - 1)
    t = (f - i0)[:, None]
    return planes[i0] * (1 - t) + planes[i1] * t


def _coronal_row(slices: np.ndarray, indices: np.ndarray, plans: Mapping, rows: int, half_slab: int = 0) -> int:
    """Row (y, pixels) of the coronal cut: the centre of the slab (``2 * half_slab + 1`` rows) with the most bone
    inside the crop boxes.

    The boxes are much deeper (front to back) than the vertebral bodies, so their centre row often passes in
    front of or behind the column and the coronal panel would show no spine. Counted on the subset slices inside
    the planned ranges (all subset slices when none is), over the union of the boxes; the box centre when no bone.
    """
    from cspine_submit.localize import BONE_HU

    boxes = [p.box for p in plans.values()]
    if not boxes:
        return rows // 2
    y0, x0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    y1, x1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    centre = int(np.clip(round(np.mean([(b[0] + b[2]) / 2 for b in boxes])), 0, rows - 1))
    planned = np.asarray([i for p in plans.values() for i in p.slice_indices], dtype=int)
    idx = np.asarray(indices)
    sel = (idx >= planned.min()) & (idx <= planned.max()) if planned.size else np.zeros(len(idx), dtype=bool)
    block = slices[sel] if sel.any() else slices
    counts = (block[:, y0:y1, x0:x1] >= BONE_HU).sum(axis=(0, 2)).astype(float)
    if counts.size == 0 or counts.max() == 0:
        return centre
    if half_slab > 0:
        counts = np.convolve(counts, np.ones(2 * half_slab + 1), mode="same")
    return int(y0 + np.argmax(counts))


def render_preview(
    slices: np.ndarray,
    indices: np.ndarray,
    z_mm: np.ndarray,
    spacing: tuple[float, float, float],
    plans: Mapping,
    *,
    mask: np.ndarray | None = None,
    slab_mm: float = 6.0,
    title: str = "",
    axcodes: tuple[str, str, str] = ("I", "P", "L"),
) -> tuple[np.ndarray, PreviewGeometry]:
    """Draw the preview from decoded slices (pure).

    Parameters
    ----------
    slices : (m, rows, cols) ndarray
        HU of the subset slices, head to feet.
    indices : (m,) ndarray of int
        Their study indices (0-based, head to feet).
    z_mm : (n,) ndarray
        Positions of all the study's slices, mm toward the feet.
    spacing : (dz, dy, dx)
        mm.
    plans : {vertebra: CropPlan}
    mask : (m, rows, cols) ndarray, optional
        Labels (1-7 = C1-C7) on the same subset slices.
    slab_mm : float
        Thickness of the maximum-intensity slab of each panel.
    title : str
        Text of a header line above the panels (none when empty).
    axcodes : (str, str, str)
        Patient direction each axis (z, y, x) grows toward, nibabel's letters
        (:func:`cspine_submit.read.axial_axcodes`; ``("I", "P", "L")`` for a standard axial study): the panels'
        direction labels.

    Returns
    -------
    image : (H, W, 3) uint8 BGR
    geometry : PreviewGeometry
    """
    slices = np.asarray(slices, dtype=np.float32)
    z_all = np.asarray(z_mm, dtype=float)
    geo, dz = _layout(slices.shape, z_all, spacing, bool(title))
    canvas = np.zeros((geo.image_h, geo.width, 3), dtype=np.uint8)
    body = canvas[geo.top : geo.top + geo.height]  # a view: drawing on it draws on the canvas
    reformat = _Reformat(geo, z_all[np.asarray(indices)])
    xc, yc = _cut_positions(slices, indices, plans, spacing, slab_mm)
    _draw_panels(body, slices, geo, reformat, spacing=spacing, cuts=(xc, yc), slab_mm=slab_mm)
    if mask is not None:
        _draw_mask_outlines(body, np.asarray(mask), geo, reformat, (xc, yc))
    _draw_plans(body, plans, geo, z_all=z_all, dz=dz, spacing=spacing)
    _draw_labels(canvas, geo, axcodes)
    _draw_ruler(canvas, geo, z_all[0])
    _draw_key(canvas, geo)
    if title:
        import cv2

        cv2.putText(canvas, title[:120], (4, 15), _FONT, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas, geo


def _layout(shape: tuple[int, int, int], z_all: np.ndarray, spacing, has_title: bool
            ) -> tuple[PreviewGeometry, float]:
    """Where the ruler, panels, lane strips and key go: one scale (px per mm) for every axis, the longer side
    ~TARGET_PX. Returns ``(geometry, dz)``, ``dz`` the median slice step (mm)."""
    _, rows, cols = shape
    _, dy, dx = spacing
    dz = float(np.median(np.diff(z_all))) if len(z_all) > 1 else spacing[0]
    z_top, z_bottom = z_all[0] - dz / 2, z_all[-1] + dz / 2
    extent = max(z_bottom - z_top, 1e-3)
    scale = min(TARGET_PX / extent, TARGET_PX / max(rows * dy, cols * dx))
    height = max(1, int(round(extent * scale)))
    sag_w = max(1, int(round(rows * dy * scale)))
    cor_w = max(1, int(round(cols * dx * scale)))
    lanes_w = N_LANES * LANE_W
    sx0 = RULER_W
    cx0 = sx0 + sag_w + lanes_w + GAP
    top = (TITLE_H if has_title else 0) + LABEL_H
    width = cx0 + cor_w + lanes_w
    key_h = 24 + KEY_LINE_H * len(key_lines(width))
    geo = PreviewGeometry(z_top_mm=float(z_top), scale=float(scale), height=height, sagittal_x0=sx0, sag_w=sag_w,
                          coronal_x0=cx0, cor_w=cor_w, lanes_x0=(sx0 + sag_w, cx0 + cor_w),
                          width=width, top=top, image_h=top + height + key_h)
    return geo, dz


def key_lines(width: int, text: str = KEY_TEXT) -> list[str]:
    """``text`` wrapped at spaces into lines that fit ``width`` pixels in the key's font."""
    import cv2

    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and cv2.getTextSize(candidate, _FONT, 0.33, 1)[0][0] > width - 8:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + ([line] if line else [])


def _draw_labels(canvas: np.ndarray, geo: PreviewGeometry, axcodes) -> None:
    """Above each panel: its name in the middle and the patient direction at each end (e.g. A ... P)."""
    import cv2

    _, y_code, x_code = axcodes
    y = geo.top - 4
    for name, x0, w, code in (("sagittal", geo.sagittal_x0, geo.sag_w, y_code),
                              ("coronal", geo.coronal_x0, geo.cor_w, x_code)):
        left, right = OPPOSITE.get(code, "?"), code
        cv2.putText(canvas, f"{left} ({DIRECTION_WORDS.get(left, '?')})", (x0 + 2, y), _FONT, 0.35,
                    (255, 255, 255), 1, cv2.LINE_AA)
        text = f"({DIRECTION_WORDS.get(right, '?')}) {right}"
        (tw, _), _ = cv2.getTextSize(text, _FONT, 0.35, 1)
        cv2.putText(canvas, text, (x0 + w - tw - 2, y), _FONT, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
        (nw, _), _ = cv2.getTextSize(name, _FONT, 0.35, 1)
        if nw + 140 < w:  # room between the two direction labels
            cv2.putText(canvas, name, (x0 + (w - nw) // 2, y), _FONT, 0.35, (180, 180, 180), 1, cv2.LINE_AA)
    for x0 in geo.lanes_x0:
        cv2.putText(canvas, "range", (x0 + 4, y), _FONT, 0.35, (180, 180, 180), 1, cv2.LINE_AA)


def ruler_step_mm(scale: float) -> tuple[int, int]:
    """(minor, labelled) tick spacing in mm for a ruler at ``scale`` px per mm: labels at least ~40 px apart."""
    for minor, major in ((5, 10), (5, 25), (10, 50), (25, 100), (50, 200)):
        if major * scale >= 40:
            return minor, major
    return 100, 500


def _draw_ruler(canvas: np.ndarray, geo: PreviewGeometry, z_first: float) -> None:
    """Left of the sagittal panel: mm below the first slice's centre, "head" at the top, "feet" at the bottom."""
    import cv2

    minor, major = ruler_step_mm(geo.scale)
    x1 = geo.sagittal_x0 - 2
    grey = (200, 200, 200)
    z_end = geo.z_top_mm + geo.height / geo.scale
    for mm in range(0, int(z_end - z_first) + 1, minor):
        r = geo.row_of(z_first + mm)
        if not geo.top <= r < geo.top + geo.height:
            continue
        labelled = mm % major == 0
        cv2.line(canvas, (x1 - (9 if labelled else 4), r), (x1, r), grey, 1)
        if labelled and geo.top + 20 <= r <= geo.top + geo.height - 20:
            cv2.putText(canvas, f"{mm}", (2, r + 4), _FONT, 0.3, grey, 1, cv2.LINE_AA)
    cv2.putText(canvas, "head", (2, geo.top + 10), _FONT, 0.33, (255, 255, 255), 1, cv2.LINE_AA)
    cv2.putText(canvas, "feet", (2, geo.top + geo.height - 4), _FONT, 0.33, (255, 255, 255), 1, cv2.LINE_AA)
    cv2.putText(canvas, "mm", (2, geo.top + 22), _FONT, 0.3, grey, 1, cv2.LINE_AA)


def _draw_key(canvas: np.ndarray, geo: PreviewGeometry) -> None:
    """Under the panels: a scale bar (the ruler's labelled step) and what the marks mean."""
    import cv2

    _, major = ruler_step_mm(geo.scale)
    y = geo.top + geo.height + 12
    x0, length = geo.sagittal_x0, int(round(major * geo.scale))
    white = (255, 255, 255)
    cv2.rectangle(canvas, (x0, y - 1), (x0 + length, y), white, -1)  # exactly `major` mm: pixels x0 .. x0+length
    for x in (x0, x0 + length):
        cv2.line(canvas, (x, y - 4), (x, y + 4), white, 1)
    cv2.putText(canvas, f"{major} mm (same scale on every axis)", (x0 + length + 8, y + 4), _FONT, 0.35, white, 1,
                cv2.LINE_AA)
    for k, line in enumerate(key_lines(geo.width)):
        cv2.putText(canvas, line, (4, y + 20 + KEY_LINE_H * k), _FONT, 0.33, (220, 220, 220), 1, cv2.LINE_AA)


@dataclass(frozen=True)
class _Reformat:
    """Resamples (m, w) planes at the subset's z positions onto the panel's pixel grid."""

    geo: PreviewGeometry
    z_sub: np.ndarray

    def __call__(self, planes: np.ndarray, width: int, nearest: bool = False) -> np.ndarray:
        """(m, w) planes -> (height, width) float32 panel."""
        import cv2

        z_rows = self.geo.z_top_mm + (np.arange(self.geo.height) + 0.5) / self.geo.scale
        img = _resample_z(planes.astype(np.float32), self.z_sub, z_rows, nearest)
        interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
        return cv2.resize(img.astype(np.float32), (width, self.geo.height), interpolation=interp)


def _cut_positions(slices: np.ndarray, indices: np.ndarray, plans: Mapping, spacing, slab_mm: float
                   ) -> tuple[int, int]:
    """Column ``xc`` of the sagittal cut (the boxes' centre column) and row ``yc`` of the coronal cut (pixels)."""
    _, rows, cols = slices.shape
    _, dy, _ = spacing
    boxes = [p.box for p in plans.values()]
    xc = int(np.clip(round(np.mean([(b[1] + b[3]) / 2 for b in boxes])), 0, cols - 1)) if boxes else cols // 2
    hy = max(0, int(round(slab_mm / 2 / dy)))
    return xc, _coronal_row(slices, indices, plans, rows, hy)


def _draw_panels(body: np.ndarray, slices: np.ndarray, geo: PreviewGeometry, reformat: _Reformat, *, spacing,
                 cuts: tuple[int, int], slab_mm: float) -> None:
    """The two grey maximum-intensity slabs, bone window, into ``body`` (in place)."""
    import cv2

    _, dy, dx = spacing
    xc, yc = cuts
    hx = max(0, int(round(slab_mm / 2 / dx)))
    hy = max(0, int(round(slab_mm / 2 / dy)))
    sag_planes = slices[:, :, max(0, xc - hx) : xc + hx + 1].max(axis=2)  # (m, rows)
    cor_planes = slices[:, max(0, yc - hy) : yc + hy + 1, :].max(axis=1)  # (m, cols)
    for planes, x0, w in ((sag_planes, geo.sagittal_x0, geo.sag_w), (cor_planes, geo.coronal_x0, geo.cor_w)):
        body[:, x0 : x0 + w] = cv2.cvtColor(_to_grey(reformat(planes, w)), cv2.COLOR_GRAY2BGR)


def _draw_mask_outlines(body: np.ndarray, mask: np.ndarray, geo: PreviewGeometry, reformat: _Reformat,
                        cuts: tuple[int, int]) -> None:
    """Each labelled vertebra's outline on the two cut planes, in its colour (in place)."""
    import cv2

    xc, yc = cuts
    # Most frequent label along the slab would be nicer; the label at the slab centre is what the eye expects.
    lab_sag = np.where((mask[:, :, xc] >= 1) & (mask[:, :, xc] <= 7), mask[:, :, xc], 0).astype(np.uint8)
    lab_cor = np.where((mask[:, yc, :] >= 1) & (mask[:, yc, :] <= 7), mask[:, yc, :], 0).astype(np.uint8)
    for lab, x0, w in ((lab_sag, geo.sagittal_x0, geo.sag_w), (lab_cor, geo.coronal_x0, geo.cor_w)):
        big = reformat(lab, w, nearest=True).astype(np.uint8)
        for label, v in enumerate(VERTEBRAE, start=1):
            binary = (big == label).astype(np.uint8)
            if not binary.any():
                continue
            contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(body[:, x0 : x0 + w], contours, -1, COLOURS_BGR[v], 1)


def _draw_plans(body: np.ndarray, plans: Mapping, geo: PreviewGeometry, *, z_all: np.ndarray, dz: float,
                spacing) -> None:
    """Each vertebra's box in both panels, its planned slices as ticks, its range as a named lane band."""
    import cv2

    _, dy, dx = spacing
    sx0, cx0, scale, height = geo.sagittal_x0, geo.coronal_x0, geo.scale, geo.height
    font = _FONT
    for v, plan in plans.items():
        colour = COLOURS_BGR.get(v, (255, 255, 255))
        idx = np.asarray(plan.slice_indices)
        top = geo.panel_row(z_all[idx.min()] - dz / 2)
        bottom = geo.panel_row(z_all[idx.max()] + dz / 2) - 1
        top, bottom = max(0, top), min(height - 1, max(top, bottom))
        y0, x0, y1, x1 = plan.box
        # Boxes in the panels: in-plane extent horizontally, planned range vertically.
        cv2.rectangle(body, (sx0 + int(y0 * dy * scale), top), (sx0 + int(y1 * dy * scale) - 1, bottom), colour, 1)
        cv2.rectangle(body, (cx0 + int(x0 * dx * scale), top), (cx0 + int(x1 * dx * scale) - 1, bottom), colour, 1)
        for i in idx:  # planned slices: ticks at the left edge of each panel
            r = geo.panel_row(z_all[i])
            if 0 <= r < height:
                cv2.line(body, (sx0, r), (sx0 + 5, r), colour, 1)
                cv2.line(body, (cx0, r), (cx0 + 5, r), colour, 1)
        for strip in (0, 1):
            lx0, lx1 = geo.lane_x(v, strip)
            cv2.rectangle(body, (lx0, top), (lx1 - 1, bottom), colour, -1)
            if bottom - top >= 12:
                text_y = (top + bottom) // 2 + 4
                cv2.putText(body, v, (lx0 + 2, text_y), font, 0.35, (0, 0, 0), 1, cv2.LINE_AA)


def preview_study(
    study_dir,
    ranges=None,
    config=None,
    *,
    mask_path=None,
    layout: str = "competition",
    max_slices: int = 96,
) -> tuple[np.ndarray, PreviewGeometry, dict, dict]:
    """Scan a study, plan its crops, read a subset of slices and draw the preview (IO wrapper).

    Returns
    -------
    image : (H, W, 3) uint8 BGR
    geometry : PreviewGeometry
    plans : {vertebra: CropPlan}
    info : dict
        ``slices_read`` (subset + any cue slices), ``n_slices``, ``method``, ``title_h`` (image row of the panels'
        top), ``file_names`` (the DICOM file name of each 0-based slice index, head to feet); ``alignment``
        (profile only: the cue's alignment cost against the training studies' reference,
        :func:`~cspine_submit.localize.align.alignment_check`).
    """
    from cspine_submit.config import ModelConfig
    from cspine_submit.read.dicom import read_slices, scan_study
    from cspine_submit.localize import measure_cue, plan_crops

    if ranges is None:
        from cspine_submit.files import default_weights_dir
        from cspine_submit.localize import load_ranges

        ranges = load_ranges(default_weights_dir() / "slice_ranges.json")
    header = scan_study(study_dir)
    config = config or ModelConfig()
    idx = subset_indices(header.n_slices, max_slices)
    slices = read_slices(header, idx)
    cue, cue_read = None, 0
    if ranges.method == "profile":
        cue = measure_cue(header, ranges)
        cue_read = len(set(cue.indices) - set(idx.tolist()))
    plans = plan_crops(header, ranges, config, cue=cue)
    mask = None
    if mask_path is not None:
        import nibabel as nib

        from cspine_submit.read.orientation import mask_to_axial

        try:
            img = nib.load(str(mask_path))
            array = np.asanyarray(img.dataobj)
        except FileNotFoundError:
            raise
        except Exception as exc:  # nibabel raises many types for a bad file
            raise ValueError(f"{mask_path}: cannot read the mask ({type(exc).__name__}: {exc})") from exc
        vol = mask_to_axial(array, img.affine, layout, orientation=header.orientation)
        if tuple(vol.shape) != tuple(header.shape):
            raise ValueError(f"{mask_path}: mask is {tuple(vol.shape)} (z, y, x) after the {layout!r} layout, "
                             f"study {study_dir} is {tuple(header.shape)}")
        mask = np.asarray(vol[idx])
    title = f"{header.study_uid}  {header.n_slices} slices  method {ranges.method}"
    image, geo = render_preview(slices, idx, header.z, header.spacing, plans, mask=mask, title=title,
                                axcodes=axial_axcodes(getattr(header, "orientation", None)))
    info = {"slices_read": int(len(idx) + cue_read), "n_slices": header.n_slices, "method": ranges.method,
            "title_h": geo.top, "file_names": [Path(f).name for f in header.files]}
    if cue is not None and "profile_template" in ranges.extra:
        from cspine_submit.localize.align import alignment_check

        info["alignment"] = alignment_check(cue.cost, ranges)
    return image, geo, plans, info
