"""Truth from segmentation masks: where C1-C7 are in one study (mask file + study headers -> :class:`StudyTruth`).

Both mask layouts (``competition`` and ``affine``, see :mod:`cspine_submit.read.orientation`) are brought into the
axial head-to-feet frame ``(z, y, x)``; a mask that cannot be learned from raises :class:`MaskError` naming the
file (:func:`load_truths` collects those as ``(file, reason)`` instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from cspine_submit.config import VERTEBRAE
from cspine_submit.localize.features import (
    DEFAULT_FEATURE_SET,
    bone_centroids,
    column_centre,
    cue_indices,
    measure_features,
)

class MaskError(ValueError):
    """A mask that cannot be learned from (wrong shape, no C1-C7, C1 below C7); the message names the file."""


@dataclass(frozen=True)
class StudyTruth:
    """Where C1-C7 are in one study, from its mask in the axial head-to-feet frame.

    Attributes
    ----------
    uid : str
        Study UID (or mask file stem).
    z_mm : (n,) ndarray
        Slice positions, mm, increasing toward the feet.
    rows, cols : int
    spacing : (dz, dy, dx) tuple of float, mm
    z_ranges : dict
        ``{vertebra: (first, last)}`` inclusive slice indices holding the label.
    boxes : dict
        ``{vertebra: (y0, x0, y1, x1)}`` half-open pixel box of the label over all its slices.
    footprints : dict
        ``{vertebra: (n_voxels_per_pixel (h, w) int array over boxes[v])}``: how many of the vertebra's voxels
        project onto each pixel of its box; used for in-plane box coverage.
    profile : (n, F) ndarray or None
        Image features per slice of ``feature_set`` (NaN for slices not measured), when the study's images were
        read.
    centroids : (n, 2) ndarray or None
        Median (y, x) pixel position of the bone pixels of each measured slice (NaN when not measured or no
        bone), when the study's images were read.
    feature_set : str
        Which features ``profile`` holds (:data:`~cspine_submit.localize.features.FEATURE_SETS`).
    """

    uid: str
    z_mm: np.ndarray
    rows: int
    cols: int
    spacing: tuple[float, float, float]
    z_ranges: dict[str, tuple[int, int]]
    boxes: dict[str, tuple[int, int, int, int]]
    footprints: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    profile: np.ndarray | None = field(default=None, repr=False)
    centroids: np.ndarray | None = field(default=None, repr=False)
    feature_set: str = DEFAULT_FEATURE_SET

    @property
    def n_slices(self) -> int:
        return len(self.z_mm)

    @property
    def column_length_mm(self) -> float:
        """Top of C1 to bottom of C7 (mm)."""
        return float(self.z_mm[self.z_ranges["C7"][1]] - self.z_mm[self.z_ranges["C1"][0]])

    @property
    def anchor_mm(self) -> float:
        """Centre of the cervical column: midway between the top of C1 and the bottom of C7 (mm)."""
        return 0.5 * (self.z_mm[self.z_ranges["C1"][0]] + self.z_mm[self.z_ranges["C7"][1]])


def extract_truth(
    volume: np.ndarray,
    z_mm: np.ndarray,
    spacing: tuple[float, float, float],
    uid: str = "",
    name: str = "mask",
) -> StudyTruth:
    """Find each cervical vertebra's slices and in-plane box in an axial label volume.

    Parameters
    ----------
    volume : (z, y, x) ndarray
        Labels, z from head to feet; 1-7 = C1-C7 (others ignored).
    z_mm : (z,) ndarray
        Slice positions in mm, increasing toward the feet.
    spacing : (dz, dy, dx)
        mm.
    uid, name : str
        Study id recorded, and the name used in error messages (the mask path).

    Raises
    ------
    MaskError
        No C1-C7 label at all, some of C1-C7 missing, or C1 not above C7.
    """
    if volume.ndim != 3:
        raise MaskError(f"{name}: expected a 3-D mask, got shape {volume.shape}")
    z_mm = np.asarray(z_mm, dtype=float)
    if len(z_mm) != volume.shape[0]:
        raise MaskError(f"{name}: {volume.shape[0]} mask slices but {len(z_mm)} slice positions")
    labels = np.asarray(volume)
    if not np.issubdtype(labels.dtype, np.integer):
        labels = np.rint(labels).astype(np.int16)
    cervical = (labels >= 1) & (labels <= 7)
    zs = np.flatnonzero(cervical.any(axis=(1, 2)))
    if zs.size == 0:
        found = np.unique(labels)
        raise MaskError(f"{name}: no C1-C7 labels (1-7) in the mask; labels present: {found[:20].tolist()}")
    # Work inside the bounding block of the cervical labels only: 7 label passes over the whole volume are slow.
    ys = np.flatnonzero(cervical[zs[0] : zs[-1] + 1].any(axis=(0, 2)))
    xs = np.flatnonzero(cervical[zs[0] : zs[-1] + 1].any(axis=(0, 1)))
    z0, y0, x0 = zs[0], ys[0], xs[0]
    block = labels[z0 : zs[-1] + 1, y0 : ys[-1] + 1, x0 : xs[-1] + 1]
    z_ranges, boxes, footprints, missing = {}, {}, {}, []
    for label, vertebra in enumerate(VERTEBRAE, start=1):
        m = block == label
        per_slice = m.any(axis=(1, 2))
        if not per_slice.any():
            missing.append(vertebra)
            continue
        kz = np.flatnonzero(per_slice)
        foot = m.sum(axis=0)
        ky = np.flatnonzero(foot.any(axis=1))
        kx = np.flatnonzero(foot.any(axis=0))
        z_ranges[vertebra] = (int(z0 + kz[0]), int(z0 + kz[-1]))
        box = (int(y0 + ky[0]), int(x0 + kx[0]), int(y0 + ky[-1] + 1), int(x0 + kx[-1] + 1))
        boxes[vertebra] = box
        footprints[vertebra] = foot[ky[0] : ky[-1] + 1, kx[0] : kx[-1] + 1].astype(np.int32)
    if missing:
        raise MaskError(f"{name}: labels for {missing} missing (every competition mask has C1-C7)")
    c1 = np.mean(z_ranges["C1"])
    c7 = np.mean(z_ranges["C7"])
    if not c1 < c7:
        raise MaskError(
            f"{name}: C1 (slices {z_ranges['C1']}) is not above C7 (slices {z_ranges['C7']}) in the head-to-feet "
            "frame: wrong layout or slice order for this mask"
        )
    return StudyTruth(
        uid=uid,
        z_mm=z_mm,
        rows=int(volume.shape[1]),
        cols=int(volume.shape[2]),
        spacing=tuple(float(s) for s in spacing),
        z_ranges=z_ranges,
        boxes=boxes,
        footprints=footprints,
    )


def _uid_from_mask_path(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def truth_from_files(
    mask_path: str | Path,
    study_dir: str | Path | None = None,
    *,
    layout: str = "competition",
    with_profile: bool = True,
    profile_step_mm: float = 2.0,
    feature_set: str = DEFAULT_FEATURE_SET,
) -> StudyTruth:
    """Read one mask (and its study's headers, when given) and return its :class:`StudyTruth`.

    With a study folder: the mask is brought into the study's head-to-feet frame (``layout``), checked against
    the study's shape, and the slice positions come from the headers; with ``with_profile`` the image features are
    measured (``feature_set``) on about one slice every ``profile_step_mm`` mm (decoded via ``read_slices``), and
    the mask must lie on the study's bone (:func:`check_mask_on_bone`). Without a study folder (mask-only, e.g.
    VerSe), the mask's own grid is used: positions from its voxel size along z.

    Raises
    ------
    MaskError
        Unreadable mask, shape mismatch with the study, no C1-C7, C1 not above C7, labels not on bone.
    """
    import nibabel as nib

    from cspine_submit.read.orientation import affine_to_axial, mask_to_axial

    mask_path = Path(mask_path)
    uid = _uid_from_mask_path(mask_path)
    try:
        img = nib.load(str(mask_path))
        array = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for a bad file
        raise MaskError(f"{mask_path}: cannot read the mask ({type(exc).__name__}: {exc})") from exc
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise MaskError(f"{mask_path}: expected a 3-D mask, got shape {array.shape}")
    # Labels are small integers; float64 files (VerSe gl017) are 8x larger than needed.
    array = np.rint(array).astype(np.uint8) if not np.issubdtype(array.dtype, np.integer) else array
    if study_dir is None:
        volume, spacing = affine_to_axial(array, img.affine) if layout == "affine" else (None, None)
        if volume is None:
            volume = mask_to_axial(array, img.affine, layout)
            zooms = img.header.get_zooms()[:3]
            spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
        z_mm = np.arange(volume.shape[0]) * spacing[0]
        return extract_truth(volume, z_mm, spacing, uid=uid, name=str(mask_path))

    from cspine_submit.read.dicom import read_slices, scan_study

    header = scan_study(study_dir)
    volume = mask_to_axial(array, img.affine, layout, orientation=header.orientation)
    if tuple(volume.shape) != tuple(header.shape):
        raise MaskError(
            f"{mask_path}: mask is {tuple(volume.shape)} (z, y, x) after the {layout!r} layout but study "
            f"{study_dir} is {tuple(header.shape)}: wrong layout, or the mask belongs to another study"
        )
    truth = extract_truth(volume, header.z, header.spacing, uid=header.study_uid or uid, name=str(mask_path))
    if not with_profile:
        return truth
    step = max(1, int(round(profile_step_mm / max(header.spacing[0], 1e-3))))
    # The cue slices too, so that leave-one-out evaluation sees exactly what the planner would measure.
    cue = cue_indices(header.n_slices, header.z)
    idx = np.union1d(np.arange(0, header.n_slices, step), cue)
    hu = read_slices(header, idx)
    check_mask_on_bone(volume[idx], hu, str(mask_path), str(study_dir))
    measured_centroids = bone_centroids(hu)
    # The column centre from the cue slices alone, exactly as the planner finds it.
    centre = column_centre(measured_centroids[np.searchsorted(idx, cue)])
    feats = measure_features(hu, header.spacing[1:], feature_set, centre=centre)
    profile = np.full((header.n_slices, feats.shape[1]), np.nan)
    centroids = np.full((header.n_slices, 2), np.nan)
    profile[idx] = feats
    centroids[idx] = measured_centroids
    return _replace_truth(truth, profile=profile, centroids=centroids, feature_set=feature_set)


MIN_MASK_BONE_HU: float = 100.0
"""Median HU under a mask's C1-C7 voxels below which the mask is taken not to lie on its study's spine. Vertebrae
(cortex and marrow) measure 200-700 HU on real CT at any voxel size; neck soft tissue 0-80, air -1000."""


def check_mask_on_bone(labels: np.ndarray, hu: np.ndarray, mask_name: str, study_name: str) -> float:
    """Check that a mask's C1-C7 labels lie on the bone of its study (pure); return their median HU.

    A mask flipped front to back, or belonging to another study of the same shape, passes every shape check but
    puts its vertebrae on soft tissue or air; learning from it would teach the planner wrong boxes and ranges.

    Parameters
    ----------
    labels : (m, rows, cols) ndarray
        Mask slices in the study's axial frame.
    hu : (m, rows, cols) ndarray
        The same slices of the study, HU.

    Raises
    ------
    MaskError
        The labelled voxels' median HU is below :data:`MIN_MASK_BONE_HU`; says whether the mask flipped front to
        back would fit.
    """
    cervical = (labels >= 1) & (labels <= 7)
    if not cervical.any():
        return float("nan")
    median = float(np.median(hu[cervical]))
    if median >= MIN_MASK_BONE_HU:
        return median
    flipped = float(np.median(hu[cervical[:, ::-1, :]]))
    hint = (f"; flipped front to back it would lie on bone (median {flipped:.0f} HU): wrong orientation"
            if flipped >= MIN_MASK_BONE_HU else ": wrong orientation, or the mask belongs to another study")
    raise MaskError(f"{mask_name}: its C1-C7 labels do not lie on the bone of study {study_name} (median "
                    f"{median:.0f} HU under the labels, expected >= {MIN_MASK_BONE_HU:.0f}){hint}")


def _replace_truth(truth: StudyTruth, **changes: Any) -> StudyTruth:
    import dataclasses

    return dataclasses.replace(truth, **changes)


def pair_masks(segmentations: str | Path, images: str | Path | None) -> list[tuple[Path, Path | None]]:
    """``(mask path, study folder or None)`` for every ``*.nii``/``*.nii.gz`` in ``segmentations``, sorted.

    The study folder is ``images/<mask stem>`` when ``images`` is given (None when that folder is missing, so the
    caller can report it).
    """
    seg = Path(segmentations)
    if not seg.is_dir():
        raise FileNotFoundError(f"{seg}: no such folder")
    masks = sorted(p for p in seg.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    pairs = []
    for m in masks:
        study = None
        if images is not None:
            candidate = Path(images) / _uid_from_mask_path(m)
            study = candidate if candidate.is_dir() else None
        pairs.append((m, study))
    return pairs


def load_truths(
    segmentations: str | Path,
    images: str | Path | None = None,
    *,
    layout: str = "competition",
    with_profile: bool = True,
    progress: bool = False,
    feature_set: str = DEFAULT_FEATURE_SET,
) -> tuple[list[StudyTruth], list[tuple[str, str]]]:
    """Truths of every mask in a folder; masks that fail are returned as ``(file, reason)`` instead of raising.

    A mask whose study folder is missing under ``images`` is skipped (reason given); with ``images=None`` every
    mask is learned from its own grid.
    """
    pairs = pair_masks(segmentations, images)
    truths: list[StudyTruth] = []
    skipped: list[tuple[str, str]] = []
    iterator: Iterable = pairs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(pairs, desc="masks", unit="mask")
    for mask, study in iterator:
        if images is not None and study is None:
            skipped.append((str(mask), f"no study folder {Path(images) / _uid_from_mask_path(mask)}"))
            continue
        try:
            truths.append(truth_from_files(mask, study, layout=layout, with_profile=with_profile,
                                           feature_set=feature_set))
        except (MaskError, ValueError, OSError) as exc:
            skipped.append((str(mask), str(exc)))
    return truths, skipped
