"""Real CT volumes (NIfTI, any orientation) -> competition-style DICOM studies with their masks.

For tests and benchmarks on real anatomy (e.g. ``tests/data/real_neck``, OpenKBP head-and-neck CTs with C1-C7
labels): :func:`load_ct_axial` / :func:`load_labels_axial` bring a NIfTI file into the package's axial frame,
:mod:`cspine_submit.datasets.volume_cut` cuts and resamples it the way competition scans are cut, and
:func:`write_volume_study` writes it with the synthetic studies' writers (:mod:`cspine_submit.datasets.dicom_writer`):
``<n>.dcm`` files numbered by position (head to feet, or feet to head), optionally JPEG Lossless .4.70, and the
competition's sagittal ``segmentations/<uid>.nii`` mask. :func:`write_studies` does a whole folder of
``<name>_ct.nii.gz`` (+ ``<name>_vert.nii.gz``) pairs into the competition layout::

    out/images/<uid>/<n>.dcm
    out/segmentations/<uid>.nii
    out/studies.csv, out/studies.json      source, cut spec, reversed flag, transfer syntax, C1-C7 slices per study
    out/test.csv                           row_id, StudyInstanceUID, prediction_type (8 rows per study)

so that ``learn-ranges --segmentations out/segmentations --images out/images`` and ``eval-ranges`` read them as
they read competition data.

Axis convention: ``volume : (z, y, x) ndarray``, z from head to feet, y toward the patient's back, x toward the
patient's left (DICOM rows and columns of a standard axial study).
"""

from __future__ import annotations

import csv
import io
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cspine_submit.config import PREDICTION_TYPES, VERTEBRAE
from cspine_submit.datasets.folder import clear_outputs, exact_flags
from cspine_submit.datasets.dicom_writer import EXPLICIT_VR_LITTLE_ENDIAN, JPEG_LOSSLESS_SV1, write_dicom_series, write_mask
from cspine_submit.datasets import real_geometry
from cspine_submit.datasets.volume_cut import AIR_HU, REAL, CutSpec, competition_cut, resample_volume
from cspine_submit.files import atomic_write_text

CT_SUFFIX = "_ct.nii.gz"
LABEL_SUFFIX = "_vert.nii.gz"
UID_ROOT = "1.2.826.0.1.3680043.99."
"""StudyInstanceUID of a written real study: this root plus the number in its source name (``pt_100`` -> ``...99.100``)."""

_OBLIQUE_TOL = 1e-3  # direction cosines further than this from an axis: the volume would need resampling


@dataclass(frozen=True)
class AxialVolume:
    """A volume in the package's axial frame.

    Attributes
    ----------
    volume : (z, y, x) ndarray
        z from head to feet, y toward posterior, x toward the patient's left. float32 HU for a CT, the file's
        integer labels for a label volume.
    spacing : (dz, dy, dx) tuple of float
        mm.
    origin_lps : (3,) ndarray
        DICOM patient LPS position (mm) of voxel ``(0, 0, 0)``: the most cranial slice's first row and column.
    path : Path
        The file read.
    """

    volume: np.ndarray
    spacing: tuple[float, float, float]
    origin_lps: np.ndarray
    path: Path


def _load_axial(path: str | Path, what: str):
    """nibabel image -> (array in the axial frame, spacing, LPS origin); orientation checked from the affine."""
    import nibabel as nib
    from nibabel import orientations as ornts

    from cspine_submit.read.orientation import axial_axcodes

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for a bad file
        raise ValueError(f"{path}: cannot read the {what} ({type(exc).__name__}: {exc})") from exc
    shape = img.shape[:3] if len(img.shape) == 4 and img.shape[3] == 1 else img.shape
    if len(shape) != 3:
        raise ValueError(f"{path}: expected a 3-D {what}, got shape {img.shape}")
    affine = np.asarray(img.affine, dtype=float)
    rotation = affine[:3, :3]
    sizes = np.linalg.norm(rotation, axis=0)
    if not np.all(sizes > 0):
        raise ValueError(f"{path}: degenerate affine (a zero voxel size): {affine.tolist()}")
    cosines = np.abs(rotation / sizes)
    if np.any((cosines > _OBLIQUE_TOL) & (cosines < 1 - _OBLIQUE_TOL)):
        raise ValueError(f"{path}: oblique affine (voxel axes not along the patient's axes); this writer "
                         f"permutes and flips axes only, it does not resample: {np.round(affine, 4).tolist()}")
    transform = ornts.ornt_transform(ornts.io_orientation(affine), ornts.axcodes2ornt(axial_axcodes()))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    volume = np.ascontiguousarray(ornts.apply_orientation(data, transform))
    # Voxel (0, 0, 0) of the axial array is voxel inv_ornt_aff(...) @ (0, 0, 0) of the file.
    axial_affine = affine @ ornts.inv_ornt_aff(transform, shape)
    spacing = tuple(float(s) for s in np.linalg.norm(axial_affine[:3, :3], axis=0))
    ras = axial_affine[:3, 3]
    origin_lps = np.array([-ras[0], -ras[1], ras[2]])
    return volume, spacing, origin_lps, path


def load_ct_axial(path: str | Path) -> AxialVolume:
    """Read a CT NIfTI file of any axis-aligned orientation into the axial frame, in HU.

    Uses nibabel's ``io_orientation`` / ``ornt_transform`` / ``apply_orientation`` (axis permutations and flips
    only, no interpolation); the file's scaling (scl_slope/inter) is applied.

    Returns
    -------
    AxialVolume
        ``volume : (z, y, x) float32`` HU, z from head to feet, y toward posterior, x toward the patient's left;
        ``spacing`` (dz, dy, dx) mm; ``origin_lps``.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Unreadable, not 3-D, or an oblique affine (the message names the file).
    """
    volume, spacing, origin, path = _load_axial(path, "CT")
    return AxialVolume(volume.astype(np.float32, copy=False), spacing, origin, path)


def load_labels_axial(path: str | Path) -> AxialVolume:
    """Read a label NIfTI file (any axis-aligned orientation) into the axial frame, as integers (no interpolation).

    Returns
    -------
    AxialVolume
        ``volume : (z, y, x)`` integer labels (uint8 when they fit), z from head to feet.

    Raises
    ------
    ValueError
        As :func:`load_ct_axial`, or labels that are not whole numbers.
    """
    volume, spacing, origin, path = _load_axial(path, "label volume")
    if not np.issubdtype(volume.dtype, np.integer):
        rounded = np.rint(volume)
        if not np.array_equal(rounded, volume):
            raise ValueError(f"{path}: label values are not whole numbers")
        volume = rounded
    if volume.min() >= 0 and volume.max() <= 255:
        volume = volume.astype(np.uint8)
    elif not np.issubdtype(volume.dtype, np.integer):
        volume = volume.astype(np.int32)
    return AxialVolume(volume, spacing, origin, path)


def load_pair(ct_path: str | Path, labels_path: str | Path | None) -> tuple[AxialVolume, AxialVolume | None]:
    """A CT and its label volume, checked to share the grid (same axial shape, spacing and origin)."""
    ct = load_ct_axial(ct_path)
    if labels_path is None:
        return ct, None
    labels = load_labels_axial(labels_path)
    if (labels.volume.shape != ct.volume.shape or not np.allclose(labels.spacing, ct.spacing, atol=1e-3)
            or not np.allclose(labels.origin_lps, ct.origin_lps, atol=1e-2)):
        raise ValueError(
            f"{labels.path}: label grid {labels.volume.shape} spacing {labels.spacing} origin "
            f"{labels.origin_lps.tolist()} does not match the CT {ct.path}: {ct.volume.shape} spacing {ct.spacing} "
            f"origin {ct.origin_lps.tolist()}"
        )
    return ct, labels


# ------------------------------------------------------------------------------------------------------------------
# One study
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrittenStudy:
    """What :func:`write_volume_study` wrote.

    Attributes
    ----------
    uid : str
        StudyInstanceUID (the folder's name).
    folder : Path
    mask : Path or None
        The competition-style mask, when labels were given.
    hu : (z, y, x) int16 ndarray
        HU exactly as written, z from head to feet.
    labels : (z, y, x) uint8 ndarray or None
        The label volume as written into the mask, z from head to feet.
    spacing : (dz, dy, dx)
        mm of the written study.
    z_head : float
        ImagePositionPatient z of the most cranial slice, mm.
    origin_xy : (float, float)
        ImagePositionPatient x, y, mm.
    reversed : bool
        Files numbered feet to head.
    transfer_syntax : str
        Transfer syntax UID of every file.
    signed : bool
        PixelRepresentation 1 (intercept 0) or 0 (12 bits, intercept -1024).
    cut : CutSpec or None
        The cut applied (None: the volume as it is).
    source : str
        The CT file written.
    """

    uid: str
    folder: Path
    mask: Path | None
    hu: np.ndarray = field(repr=False)
    labels: np.ndarray | None = field(repr=False)
    spacing: tuple[float, float, float]
    z_head: float
    origin_xy: tuple[float, float]
    reversed: bool
    transfer_syntax: str
    signed: bool
    cut: CutSpec | None
    source: str

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])

    def z_ranges(self) -> dict[str, tuple[int, int]]:
        """``{vertebra: (first, last)}`` inclusive slice indices (head to feet) of each of C1-C7 in the labels."""
        if self.labels is None:
            return {}
        per_slice = {}
        for k, v in enumerate(VERTEBRAE, start=1):
            zs = np.flatnonzero((self.labels == k).any(axis=(1, 2)))
            if zs.size:
                per_slice[v] = (int(zs[0]), int(zs[-1]))
        return per_slice

    def record(self) -> dict:
        """JSON-ready summary (no arrays)."""
        return {
            "uid": self.uid,
            "source": self.source,
            "n_slices": self.n_slices,
            "rows": int(self.hu.shape[1]),
            "cols": int(self.hu.shape[2]),
            "spacing_mm": [round(float(s), 6) for s in self.spacing],
            "z_head": self.z_head,
            "origin_xy": list(self.origin_xy),
            "reversed": self.reversed,
            "transfer_syntax": self.transfer_syntax,
            "signed": self.signed,
            "cut": None if self.cut is None else self.cut.to_dict(),
            "z_ranges": {v: list(r) for v, r in self.z_ranges().items()},
        }


def stored_hu(hu: np.ndarray, signed: bool) -> np.ndarray:
    """HU -> int16 values the writer can store: rounded, clipped to [-1024, 3071] for 12-bit unsigned files."""
    lo, hi = (-32768, 32767) if signed else (-1024, 3071)
    return np.clip(np.rint(hu), lo, hi).astype(np.int16)


def write_volume_study(
    folder: str | Path,
    ct: AxialVolume,
    labels: AxialVolume | None = None,
    *,
    uid: str,
    cut: CutSpec | None = None,
    mask_path: str | Path | None = None,
    reversed_: bool = False,
    compressed: bool = False,
    signed: bool = True,
    minimal_headers: bool = True,
) -> WrittenStudy:
    """Write a CT volume (cut and resampled by ``cut``, or as it is) as a DICOM study, and its mask.

    Parameters
    ----------
    folder : path
        Study folder (created), normally ``<images>/<uid>``.
    ct, labels : AxialVolume
        From :func:`load_pair`; labels are needed for the mask.
    uid : str
        StudyInstanceUID.
    cut : CutSpec, optional
        From :func:`cspine_submit.datasets.volume_cut.competition_cut` (or any spec); None writes the volume as it is.
    mask_path : path, optional
        Where to write the competition-style mask (``segmentations/<uid>.nii``); needs ``labels``.
    reversed_ : bool
        Number the files feet to head.
    compressed : bool
        JPEG Lossless .4.70 (lossless: the files decode to the same values).
    signed : bool
        PixelRepresentation 1, intercept 0; else 12-bit unsigned with intercept -1024 (HU clipped to [-1024, 3071]).
    minimal_headers : bool
        No Modality and no Manufacturer tag, as in every real training file; False writes both.

    Returns
    -------
    WrittenStudy
        Including the HU and labels exactly as written.
    """
    if mask_path is not None and labels is None:
        raise ValueError(f"{ct.path}: a mask was asked for ({mask_path}) but no label volume was given")
    label_volume = None if labels is None else labels.volume
    if cut is None:
        hu, out_labels, spacing = ct.volume, label_volume, ct.spacing
        first_mm = (0.0, 0.0, 0.0)
    else:
        hu, out_labels, spacing = resample_volume(ct.volume, ct.spacing, cut, label_volume)
        first_mm = (cut.z_start_mm, *cut.first_pixel_mm())
    hu = stored_hu(hu, signed)
    # LPS: x grows toward the left and y toward the back like the axial x and y; z grows toward the head.
    z_head = round(float(ct.origin_lps[2] - first_mm[0]), 4)
    origin_xy = (round(float(ct.origin_lps[0] + first_mm[2]), 4), round(float(ct.origin_lps[1] + first_mm[1]), 4))
    write_dicom_series(
        Path(folder), hu, study_uid=uid, series_uid=f"{uid}.1", spacing=spacing, z_head=z_head, origin_xy=origin_xy,
        reversed_=reversed_, compressed=compressed, signed=signed, modality=not minimal_headers,
        thickness=None if cut is None else cut.thickness_mm,
        manufacturer=None if minimal_headers else "cspine_submit synthetic",
    )
    if out_labels is not None:
        out_labels = out_labels.astype(np.uint8, copy=False)
    if mask_path is not None:
        write_mask(Path(mask_path), out_labels, spacing, z_head, origin_xy)
    return WrittenStudy(
        uid=uid, folder=Path(folder), mask=None if mask_path is None else Path(mask_path), hu=hu, labels=out_labels,
        spacing=tuple(float(s) for s in spacing), z_head=z_head, origin_xy=origin_xy, reversed=bool(reversed_),
        transfer_syntax=JPEG_LOSSLESS_SV1 if compressed else EXPLICIT_VR_LITTLE_ENDIAN, signed=bool(signed),
        cut=cut, source=str(ct.path),
    )


# ------------------------------------------------------------------------------------------------------------------
# A folder of volumes
# ------------------------------------------------------------------------------------------------------------------


def find_volumes(src: str | Path) -> list[tuple[str, Path, Path | None]]:
    """``(name, CT path, label path or None)`` for every ``<name>_ct.nii.gz`` in ``src`` (sorted by name).

    ``src`` may also be one ``<name>_ct.nii.gz`` file. The labels are ``<name>_vert.nii.gz`` beside it.
    """
    src = Path(src)
    if src.is_file():
        cts = [src]
    elif src.is_dir():
        cts = sorted(src.glob(f"*{CT_SUFFIX}"))
    else:
        raise FileNotFoundError(f"{src}: no such file or folder")
    if not cts or not all(p.name.endswith(CT_SUFFIX) for p in cts):
        raise FileNotFoundError(f"{src}: no <name>{CT_SUFFIX} CT volumes")
    out = []
    for ct in cts:
        name = ct.name[: -len(CT_SUFFIX)]
        lab = ct.with_name(name + LABEL_SUFFIX)
        out.append((name, ct, lab if lab.is_file() else None))
    return out


def study_uids(names: list[str]) -> dict[str, str]:
    """StudyInstanceUID per source name: :data:`UID_ROOT` + the name's trailing number, or its 1-based position
    among ``names`` when the names do not each end in a distinct number."""
    import re

    numbers = [re.search(r"(\d+)$", n) for n in names]
    values = [int(m.group(1)) for m in numbers if m]
    if len(values) == len(names) and len(set(values)) == len(values):
        return {n: f"{UID_ROOT}{v}" for n, v in zip(names, values)}
    return {n: f"{UID_ROOT}{i}" for i, n in enumerate(names, start=1)}


OUTPUTS = ("images", "segmentations", "studies.csv", "studies.json", "test.csv")
"""What :func:`write_studies` writes into its output folder (and what ``force`` replaces)."""

CSV_COLUMNS = ("uid", "source", "n_slices", "rows", "slice_mm", "pixel_mm", "reversed", "transfer_syntax", "signed",
               "z_start_mm", "z_end_mm", "fov_mm", "centre_y_mm", "centre_x_mm", "c1_first", "c7_last")


def _csv_row(rec: dict) -> dict:
    cut = rec["cut"] or {}
    centre = cut.get("centre_yx_mm", ["", ""])
    z = rec["z_ranges"]
    return {
        "uid": rec["uid"], "source": Path(rec["source"]).name, "n_slices": rec["n_slices"], "rows": rec["rows"],
        "slice_mm": rec["spacing_mm"][0], "pixel_mm": rec["spacing_mm"][1], "reversed": int(rec["reversed"]),
        "transfer_syntax": rec["transfer_syntax"], "signed": int(rec["signed"]),
        "z_start_mm": cut.get("z_start_mm", ""), "z_end_mm": cut.get("z_end_mm", ""), "fov_mm": cut.get("fov_mm", ""),
        "centre_y_mm": centre[0], "centre_x_mm": centre[1],
        "c1_first": z["C1"][0] if "C1" in z else "", "c7_last": z["C7"][1] if "C7" in z else "",
    }


def write_studies(
    src: str | Path,
    out: str | Path,
    *,
    size: int = 512,
    slice_mm: float | str | None = REAL,
    seed: int = 0,
    cut: bool = True,
    fov_mm: tuple[float, float] | str = REAL,
    head_mm: tuple[float, float] | str = REAL,
    chest_mm: tuple[float, float] | str = REAL,
    reversed_fraction: float = round(real_geometry.REVERSED_SHARE, 4),
    compressed_fraction: float = 0.5,
    signed_fraction: float = 0.5,
    force: bool = False,
    progress: bool = False,
) -> list[dict]:
    """Write every CT volume of a folder as a competition-style study, with its mask.

    Parameters
    ----------
    src : path
        Folder of ``<name>_ct.nii.gz`` (+ ``<name>_vert.nii.gz``) pairs, or one CT file.
    out : path
        Receives ``images/<uid>/``, ``segmentations/<uid>.nii``, ``studies.csv``, ``studies.json`` and
        ``test.csv``; must be empty or absent unless ``force`` (then those are replaced).
    size : int
        Output matrix (rows = columns) of a cut study.
    slice_mm : float, "real" or None
        Output slice spacing of a cut study, mm; ``"real"`` (the default) draws it with its SliceThickness from
        the competition's studies; None keeps the source slices.
    seed : int
        Same seed, same studies: the set's flags (reversed, compressed, signed) come from ``seed``, each cut from
        ``(seed, crc32(name))`` so that one volume's cut does not depend on the others in the folder.
    cut : bool
        Cut and resample by :func:`~cspine_submit.datasets.volume_cut.competition_cut` (needs labels); False writes each
        volume whole, on its own grid.
    fov_mm, head_mm, chest_mm : (float, float) or "real"
        Ranges the cuts draw from, or ``"real"`` (the default): drawn like the competition's studies (see
        :func:`~cspine_submit.datasets.volume_cut.competition_cut`).
    reversed_fraction, compressed_fraction, signed_fraction : float
        Exact shares of studies numbered feet to head (default the real 9.8 %), written as JPEG Lossless .4.70,
        written signed. Every file has the real studies' minimal header (no Modality, no Manufacturer).
    force : bool
        Replace an earlier output in ``out``.
    progress : bool
        tqdm bar.

    Returns
    -------
    list of dict
        One :meth:`WrittenStudy.record` per study (also in ``studies.json``), plus its ``name``.

    Raises
    ------
    FileExistsError, FileNotFoundError, ValueError
        ``out`` not empty and not ``force``; no CT volumes in ``src``; a volume cannot be read, its labels do not
        match it, or a cut was asked for a volume without labels (the message names the file).
    """
    from tqdm import tqdm

    _check_write_args(size=size, slice_mm=slice_mm, fractions={
        "reversed_fraction": reversed_fraction, "compressed_fraction": compressed_fraction,
        "signed_fraction": signed_fraction})
    volumes = find_volumes(src)
    if cut:
        _check_labelled(volumes)
    root = Path(out)
    clear_outputs(root, OUTPUTS, force, "the studies")
    names = [n for n, _, _ in volumes]
    uids = study_uids(names)
    rng = np.random.default_rng(seed)
    reversed_flags, compressed_flags, signed_flags = (
        exact_flags(rng, len(names), f) for f in (reversed_fraction, compressed_fraction, signed_fraction))

    records = []
    for i, (name, ct_path, lab_path) in enumerate(tqdm(volumes, desc="real studies", unit="study",
                                                       disable=not progress)):
        ct, labels = load_pair(ct_path, lab_path)
        spec = None
        if cut:
            spec = _draw_cut(labels, name, seed=seed, size=size, slice_mm=slice_mm, fov_mm=fov_mm, head_mm=head_mm,
                             chest_mm=chest_mm)
        uid = uids[name]
        written = write_volume_study(
            root / "images" / uid, ct, labels, uid=uid, cut=spec,
            mask_path=None if labels is None else root / "segmentations" / f"{uid}.nii",
            reversed_=bool(reversed_flags[i]), compressed=bool(compressed_flags[i]), signed=bool(signed_flags[i]),
        )
        records.append({"name": name, **written.record()})
        del written

    write_study_tables(root, {
        "src": str(src), "size": int(size), "slice_mm": slice_mm, "seed": int(seed), "cut": bool(cut),
        "fov_mm": _listed(fov_mm), "head_mm": _listed(head_mm), "chest_mm": _listed(chest_mm),
        "reversed_fraction": reversed_fraction, "compressed_fraction": compressed_fraction,
        "signed_fraction": signed_fraction, "air_hu": AIR_HU}, records)
    return records


def _listed(value):
    return value if value == REAL else list(value)


def _check_write_args(*, size: int, slice_mm: float | str | None, fractions: dict[str, float]) -> None:
    """Raise ValueError naming the first argument of :func:`write_studies` out of its range."""
    for key, value in fractions.items():
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{key}={value}: expected a fraction in [0, 1]")
    if int(size) < 16:
        raise ValueError(f"size={size}: at least 16 pixels")
    if slice_mm is not None and slice_mm != REAL and not float(slice_mm) > 0:
        raise ValueError(f"slice_mm={slice_mm}: must be > 0")


def _check_labelled(volumes: list[tuple[str, Path, Path | None]]) -> None:
    """A competition cut is placed by the labels: ValueError naming every volume without them."""
    unlabelled = [str(ct) for _, ct, lab in volumes if lab is None]
    if unlabelled:
        raise ValueError(f"a competition cut needs each volume's <name>{LABEL_SUFFIX} labels; missing for "
                         f"{unlabelled} (write them whole with cut=False / --no-cut)")


def _draw_cut(labels: AxialVolume, name: str, *, seed: int, size: int, slice_mm: float | str | None,
              fov_mm: tuple[float, float] | str, head_mm: tuple[float, float] | str,
              chest_mm: tuple[float, float] | str) -> CutSpec:
    """One volume's cut, drawn from ``(seed, crc32(name))`` so that it does not depend on the other volumes."""
    study_rng = np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])
    return competition_cut(labels.volume, labels.spacing, study_rng, size=size, slice_mm=slice_mm,
                           head_mm=head_mm, chest_mm=chest_mm, fov_mm=fov_mm)


def write_study_tables(root: Path, params: dict, records: list[dict]) -> None:
    """``studies.json`` (params + records), ``studies.csv`` (:data:`CSV_COLUMNS`) and ``test.csv`` (8 rows per
    study) of a folder written by :func:`write_studies`, each written atomically."""
    atomic_write_text(root / "studies.json", json.dumps({"params": params, "studies": records}, indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=("name",) + CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({"name": rec["name"], **_csv_row(rec)})
    atomic_write_text(root / "studies.csv", buf.getvalue())
    lines = ["row_id,StudyInstanceUID,prediction_type"]
    lines += [f"{r['uid']}_{t},{r['uid']},{t}" for r in records for t in PREDICTION_TYPES]
    atomic_write_text(root / "test.csv", "\n".join(lines) + "\n")
