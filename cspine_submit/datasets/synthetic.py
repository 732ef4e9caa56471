"""Synthetic cervical-spine CT studies in the competition's layout (for tests, the demo and benchmarks).

``generate_dataset(out_dir, n_train, n_test, seed, ...)`` writes::

    out_dir/train_images/<uid>/<n>.dcm     axial slices, n = 1..N (head to feet, or feet to head when reversed)
    out_dir/test_images/<uid>/<n>.dcm
    out_dir/segmentations/<uid>.nii        for n_segmented training studies, stored sagittally like the competition
    out_dir/train.csv                      StudyInstanceUID, patient_overall, C1..C7
    out_dir/train_bounding_boxes.csv       StudyInstanceUID, x, y, width, height, slice_number (fracture boxes)
    out_dir/test.csv                       row_id, StudyInstanceUID, prediction_type (8 rows per test study)
    out_dir/sample_submission.csv          row_id, fractured (0.5)
    out_dir/test_labels.csv                the truth for the test studies, in train.csv's columns

Every study is a pure function of its :class:`StudySpec` (which holds its own seed): :func:`render_study` gives the
volume in HU exactly as written, the axial label volume and the fracture voxels, so tests can compare what the
package reads against the truth. Same seed, same bytes.

Entry points: :func:`generate_dataset` (a whole set), :func:`plan_specs` (the specs a set would have, no IO),
:func:`generate_study` (one spec into one folder, optionally with its mask), :func:`render_study` (arrays only).
The anatomy lives in :mod:`cspine_submit.datasets.anatomy`, the DICOM/NIfTI writing in
:mod:`cspine_submit.datasets.dicom_writer`.

Axis convention: ``volume : (z, y, x) ndarray``, z from head to feet, y rows, x columns.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cspine_submit.config import PREDICTION_TYPES, TRAIN_PREVALENCE, VERTEBRAE
from cspine_submit.datasets import real_geometry
from cspine_submit.datasets.folder import clear_outputs, exact_flags
from cspine_submit.datasets.anatomy import Anatomy, build_anatomy, render_volume
from cspine_submit.datasets.body import draw_background, draw_table
from cspine_submit.datasets.dicom_writer import file_numbers, write_dicom_series, write_mask

UID_PREFIX = "1.2.826.0.1.3680043."
"""The competition's StudyInstanceUID prefix; a study's UID is this plus a number."""

UNIFORM_DEFAULTS: dict = {
    "scheme": "uniform",
    "size": 256,
    "spacing": (0.5, 1.0),
    "fov": (150.0, 250.0),
    "head": (5.0, 60.0),
    "chest": (5.0, 80.0),
    "noise": (5.0, 30.0),
    "compressed_fraction": 0.7,
    "reversed_fraction": 0.2,
    "signed_fraction": 0.5,
    "no_modality_fraction": 0.3,
    "wedge_fraction": 0.3,
    "thoracic_label_fraction": 0.5,
    "table_fraction": 0.0,
    "boxed_fraction": 1.0,
    "prevalence": {v: TRAIN_PREVALENCE[v] for v in VERTEBRAE},
}
"""The generator's first scheme (``scheme="uniform"``): every geometry drawn uniformly from a range, vertebrae
fractured independently, one box per fractured vertebra and slice. The demo's classifiers were trained on it
(``weights/demo/synthetic_params.json`` names it), so it stays, byte for byte."""

REAL = "real"
"""A geometry parameter (``size``, ``spacing``, ``fov``, ``head``, ``chest``) or ``prevalence`` given as this string
is drawn per study from the competition's own distributions (:mod:`cspine_submit.datasets.real_geometry`)."""

DEFAULTS: dict = {
    **UNIFORM_DEFAULTS,
    "scheme": "real",
    "size": REAL,
    "spacing": REAL,
    "fov": REAL,
    "head": REAL,
    "chest": REAL,
    "reversed_fraction": round(real_geometry.REVERSED_SHARE, 4),
    "no_modality_fraction": 1.0,
    "boxed_fraction": round(real_geometry.BOXED_SHARE, 4),
    "prevalence": REAL,
}
"""Default generator parameters (the keyword arguments of :func:`generate_dataset`): ``scheme="real"``, studies
drawn like the competition's (512 px, the real slice spacing and thickness pairs, pixel spacing, scan above C1 and
below C7, 9.8 % numbered feet to head, no Modality and no Manufacturer, the real labels' joint distribution,
boxes for about a quarter of the fractured studies, one box per slice). ``scheme="uniform"`` starts from
:data:`UNIFORM_DEFAULTS` instead; any key given explicitly wins in both."""

SCHEMES: dict[str, dict] = {"real": DEFAULTS, "uniform": UNIFORM_DEFAULTS}

TRAIN_COLUMNS = ("StudyInstanceUID",) + PREDICTION_TYPES
BOX_COLUMNS = ("StudyInstanceUID", "x", "y", "width", "height", "slice_number")


@dataclass(frozen=True)
class StudySpec:
    """Everything that defines one synthetic study; :func:`render_study` is a pure function of it.

    Attributes
    ----------
    uid : str
        StudyInstanceUID (also the folder name).
    seed : int
        The study's own random seed (anatomy, geometry, noise).
    fractures : tuple of (vertebra, kind)
        Fractured vertebrae and the kind of fracture, ``line`` or ``wedge``.
    size : int
        Rows = columns, pixels.
    spacing, fov, head, chest, noise : (float, float)
        Ranges (mm, mm, mm, mm, HU standard deviation) the study draws its slice spacing, field of view, scan extent
        above the top of C1 and below the bottom of C7, and noise from.
    compressed, reversed, signed, modality, thoracic_labels : bool
        JPEG Lossless .4.70 or uncompressed; files numbered feet to head; PixelRepresentation 1 (intercept 0) or 0
        (12 bits, intercept -1024); Modality tag present; T1-T3 labelled in the mask.
    table : bool
        A patient table / head rest (a curved dense shell behind the neck) in the field of view.
    boxed : bool
        For a fractured training study: its fracture boxes go into train_bounding_boxes.csv (the competition has
        boxes for only a quarter of its fractured studies).
    manufacturer : bool
        Write a Manufacturer tag (the real training files have none).
    box_per_slice : bool
        One fracture box per slice (the union over its fractured vertebrae), as the real boxes are; else one per
        fractured vertebra and slice.
    partial_fractures : bool
        Line fractures reach over only part of their bone's height (:func:`_partial_fractures`), so that a
        fracture is seen on about as few of its vertebra's slices as the real boxes are; else over all of it.

    ``spacing``, ``fov``, ``head`` and ``chest`` may each be :data:`REAL` instead of a range: drawn per study from
    the real distributions (the spacing with its SliceThickness, the field of view as the real pixel spacing
    times 512, the scan above C1 and below C7 together).
    """

    uid: str
    seed: int
    fractures: tuple[tuple[str, str], ...] = ()
    size: int = 256
    spacing: tuple[float, float] = (0.5, 1.0)
    fov: tuple[float, float] = (150.0, 250.0)
    head: tuple[float, float] = (5.0, 60.0)
    chest: tuple[float, float] = (5.0, 80.0)
    noise: tuple[float, float] = (5.0, 30.0)
    compressed: bool = True
    reversed: bool = False
    signed: bool = True
    modality: bool = True
    thoracic_labels: bool = True
    table: bool = False
    boxed: bool = True
    manufacturer: bool = True
    box_per_slice: bool = False
    partial_fractures: bool = False

    @property
    def labels(self) -> dict[str, int]:
        """The study's eight labels (train.csv columns); patient_overall is the OR of C1-C7."""
        fractured = {v for v, _ in self.fractures}
        out = {v: int(v in fractured) for v in VERTEBRAE}
        return {"patient_overall": int(any(out.values())), **out}


@dataclass(frozen=True)
class SyntheticStudy:
    """A rendered study: the truth every test can compare against.

    Attributes
    ----------
    spec : StudySpec
    hu : (z, y, x) int16 ndarray
        HU exactly as written to the DICOM files, z from head to feet.
    labels : (z, y, x) uint8 ndarray
        Vertebra labels (1-7 = C1-C7, 8-10 = T1-T3 when ``spec.thoracic_labels``), z from head to feet.
    fracture : (z, y, x) uint8 ndarray
        On each fracture voxel the label of the fractured vertebra, 0 elsewhere.
    spacing : (dz, dy, dx)
        mm.
    z_head : float
        ImagePositionPatient z of the most cranial slice (z decreases toward the feet), mm.
    origin_xy : (float, float)
        ImagePositionPatient x, y, mm.
    file_numbers : (z,) int ndarray
        File number ``n`` of ``<n>.dcm`` for each slice, head to feet.
    anatomy : Anatomy
        Geometry the volume was drawn from (vertebra positions, mm).
    window : (level, width) or None
        WindowCenter/WindowWidth written, if any.
    thickness : float
        SliceThickness written, mm (the spacing, or more for overlapping reconstructions).
    """

    spec: StudySpec
    hu: np.ndarray
    labels: np.ndarray
    fracture: np.ndarray
    spacing: tuple[float, float, float]
    z_head: float
    origin_xy: tuple[float, float]
    file_numbers: np.ndarray
    anatomy: Anatomy
    window: tuple[float, float] | None = None
    thickness: float | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.hu.shape

    def boxes(self) -> list[dict]:
        """Fracture boxes per axial slice in train_bounding_boxes.csv's columns (one per fractured vertebra and
        slice it crosses, or one per slice with ``spec.box_per_slice``; x/y/width/height in pixels, slice_number =
        the file number)."""
        rows = []
        for i in np.flatnonzero(self.fracture.any(axis=(1, 2))):
            sl = self.fracture[i]
            for lab in ([None] if self.spec.box_per_slice else np.unique(sl[sl > 0])):
                ys, xs = np.nonzero(sl > 0 if lab is None else sl == lab)
                rows.append(
                    {
                        "StudyInstanceUID": self.spec.uid,
                        "x": float(xs.min()),
                        "y": float(ys.min()),
                        "width": float(xs.max() - xs.min() + 1),
                        "height": float(ys.max() - ys.min() + 1),
                        "slice_number": int(self.file_numbers[i]),
                    }
                )
        return rows


@dataclass(frozen=True)
class StudyRecord:
    """What :func:`generate_dataset` wrote for one study."""

    spec: StudySpec
    split: str
    folder: Path
    segmented: bool
    n_slices: int
    spacing: tuple[float, float, float]
    n_boxes: int

    @property
    def uid(self) -> str:
        return self.spec.uid

    @property
    def labels(self) -> dict[str, int]:
        return self.spec.labels


@dataclass(frozen=True)
class SyntheticDataset:
    """A dataset written by :func:`generate_dataset`: its root, its studies and the parameters used."""

    root: Path
    train: tuple[StudyRecord, ...]
    test: tuple[StudyRecord, ...]
    params: dict = field(default_factory=dict)

    @property
    def studies(self) -> tuple[StudyRecord, ...]:
        return self.train + self.test

    def record(self, uid: str) -> StudyRecord:
        for r in self.studies:
            if r.uid == uid:
                return r
        raise KeyError(f"study {uid} is not in {self.root}")


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return float(lo if hi <= lo else rng.uniform(lo, hi))


def _draw_geometry(spec: StudySpec, rng: np.random.Generator) -> dict[str, float | None]:
    """A study's field of view, pixel and slice spacing, thickness and the scan above C1 / below C7.

    Ranges draw from ``rng`` (the study's generator, in the order they always did: field of view, spacing, head,
    chest); :data:`REAL` parameters draw from their own generator seeded by the study, so they shift nothing.
    ``thickness_mm`` is None unless the spacing is real (then it comes with it).
    """
    real_rng = np.random.default_rng([spec.seed, 3])
    if spec.fov == REAL:
        # The real field of view (pixel spacing x 512, the real matrix), whatever this study's size: a smaller
        # matrix gets coarser pixels, not a smaller neck.
        fov = real_geometry.draw_pixel_spacing(real_rng) * real_geometry.REAL_MATRIX
    else:
        fov = _uniform(rng, spec.fov)
    thickness = None
    if spec.spacing == REAL:
        dz, thickness = real_geometry.draw_spacing(real_rng)
    else:
        dz = round(max(0.1, _uniform(rng, spec.spacing)), 3)
    real_head = real_chest = None
    if spec.head == REAL or spec.chest == REAL:
        real_head, real_chest = real_geometry.draw_margins(real_rng)
    head = real_head if spec.head == REAL else _uniform(rng, spec.head)
    chest = real_chest if spec.chest == REAL else _uniform(rng, spec.chest)
    return {"fov_mm": fov, "pixel_mm": round(fov / int(spec.size), 6), "slice_mm": dz, "thickness_mm": thickness,
            "head_mm": head, "chest_mm": chest}


def study_geometry(spec: StudySpec) -> dict[str, float | None]:
    """What :func:`render_study` draws for a spec's geometry, without rendering (cheap: for statistics).

    Returns
    -------
    dict
        ``fov_mm``, ``pixel_mm``, ``slice_mm``, ``thickness_mm`` (the SliceThickness written when the spacing is
        :data:`REAL`; None for a range, whose thickness render_study draws later), ``head_mm`` (scan above the top
        of C1), ``chest_mm`` (below the bottom of C7).
    """
    return _draw_geometry(spec, np.random.default_rng(spec.seed))


PARTIAL_FRACTURE_SHARE: tuple[float, float] = (0.25, 1.0)
"""Range of the share of its part's height a partial line fracture reaches over (uniform). Real boxes cover 41 % of
their vertebra's slices at the median and 37 % of fractured vertebrae have fewer than 5 of 15 evenly spaced slices
boxed (FACTS.md); whole-part lines gave 54 % and 10 % here, these windows 38 % and 39 % (80 fractured vertebrae,
64 px)."""


def _partial_fractures(anatomy: Anatomy, rng: np.random.Generator) -> Anatomy:
    """The anatomy with each line fracture limited to a random window of its part's height (own generator)."""
    vertebrae = []
    for v in anatomy.vertebrae:
        f = v.fracture
        if f is not None and f.kind == "line":
            solids = [s for s in v.solids if s.part == f.part]
            lo, hi = min(s.z0 for s in solids), max(s.z1 for s in solids)
            length = (hi - lo) * float(rng.uniform(*PARTIAL_FRACTURE_SHARE))
            start = lo + float(rng.uniform(0.0, hi - lo - length))
            v = dataclasses.replace(v, fracture=dataclasses.replace(f, z_window=(start, start + length)))
        vertebrae.append(v)
    return dataclasses.replace(anatomy, vertebrae=tuple(vertebrae))


def render_study(spec: StudySpec) -> SyntheticStudy:
    """Render a study from its spec (deterministic).

    Returns
    -------
    SyntheticStudy
        HU volume (as it will be stored: noise added, clipped to the stored range), labels and fracture voxels.
    """
    import cv2

    rng = np.random.default_rng(spec.seed)
    size = int(spec.size)
    geometry = _draw_geometry(spec, rng)
    fov, px, dz = geometry["fov_mm"], geometry["pixel_mm"], geometry["slice_mm"]
    head_mm, chest_mm, real_thickness = geometry["head_mm"], geometry["chest_mm"], geometry["thickness_mm"]
    noise = _uniform(rng, spec.noise)
    z_head = round(float(rng.uniform(-250.0, 150.0)), 2)
    origin_xy = (round(-fov / 2 + float(rng.uniform(-20, 20)), 2), round(-fov / 2 + float(rng.uniform(-20, 20)), 2))
    window = (400.0, 1800.0) if rng.random() < 0.5 else None
    # Some series are reconstructed with overlap (thickness > spacing): readers must take spacing from positions.
    if real_thickness is None:
        thickness = dz if rng.random() < 0.7 else round(dz * float(rng.uniform(1.2, 2.0)), 3)
    else:
        thickness = real_thickness
    padded = spec.signed and rng.random() < 0.5
    anatomy = build_anatomy(rng, fov, px, head_mm, dict(spec.fractures))
    if spec.partial_fractures:
        anatomy = _partial_fractures(anatomy, np.random.default_rng([spec.seed, 4]))
    nz = int(np.floor((anatomy.z_c7 + chest_mm) / dz)) + 1
    shape = (nz, size, size)

    background = draw_background(anatomy, shape, dz, px)
    if spec.table:
        # Own generator: the table's draws must not shift those of a study without one.
        draw_table(np.random.default_rng([spec.seed, 2]), anatomy, background, dz, px)
    rendered = render_volume(shape, dz, px, background, list(anatomy.vertebrae))
    labels = rendered.labels
    if not spec.thoracic_labels:
        labels[labels > 7] = 0

    # Scanner-like finish, slice by slice (bounded memory): slight blur (partial volume), Gaussian noise, the
    # stored range, and for some signed studies -2048 padding outside the reconstruction circle as real CTs have.
    lo = -2048 if spec.signed else -1024
    hu = rendered.hu
    noise_rng = np.random.default_rng([spec.seed, 1])
    yy, xx = np.mgrid[0:size, 0:size]
    outside = ((yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2) > (size / 2) ** 2
    # Noise from a small bank of fields at random offsets: per-slice Gaussian draws would dominate the run time.
    pad = 32
    bank = noise_rng.standard_normal((8, size + pad, size + pad), dtype=np.float32) * np.float32(noise)
    picks = noise_rng.integers(0, [8, pad, pad], size=(nz, 3))
    for i in range(nz):
        k, oy, ox = picks[i]
        sl = cv2.GaussianBlur(hu[i].astype(np.float32), (0, 0), 0.6)
        sl += bank[k, oy : oy + size, ox : ox + size]
        np.rint(sl, out=sl)
        np.clip(sl, lo, 3071, out=sl)
        if padded:
            sl[outside] = -2048
        hu[i] = sl.astype(np.int16)

    return SyntheticStudy(
        spec=spec,
        hu=hu,
        labels=labels,
        fracture=rendered.fracture,
        spacing=(dz, px, px),
        z_head=z_head,
        origin_xy=origin_xy,
        file_numbers=file_numbers(nz, spec.reversed),
        anatomy=anatomy,
        window=window,
        thickness=thickness,
    )


def write_study(study: SyntheticStudy, folder: Path) -> list[Path]:
    """Write a rendered study's DICOM files into ``folder`` (``<n>.dcm``); returns them head to feet."""
    spec = study.spec
    return write_dicom_series(
        Path(folder),
        study.hu,
        study_uid=spec.uid,
        series_uid=f"{spec.uid}.1",
        spacing=study.spacing,
        z_head=study.z_head,
        origin_xy=study.origin_xy,
        reversed_=spec.reversed,
        compressed=spec.compressed,
        signed=spec.signed,
        modality=spec.modality,
        window=study.window,
        thickness=study.thickness,
        manufacturer="cspine_submit synthetic" if spec.manufacturer else None,
    )


def write_study_mask(study: SyntheticStudy, path: Path) -> Path:
    """Write the study's label volume as ``segmentations/<uid>.nii`` is stored in the competition."""
    return write_mask(Path(path), study.labels, study.spacing, study.z_head, study.origin_xy)


def _check_params(p: dict) -> None:
    """Raise ValueError naming the first parameter that is out of range."""
    if p["scheme"] not in SCHEMES:
        raise ValueError(f"scheme={p['scheme']!r}: expected one of {sorted(SCHEMES)}")
    if p["size"] != REAL and int(p["size"]) < 16:
        raise ValueError(f"size={p['size']}: at least 16 pixels (or {REAL!r})")
    for key, low in (("spacing", 0.1), ("fov", 40.0), ("head", 0.0), ("chest", 0.0), ("noise", 0.0)):
        value = p[key]
        if key != "noise" and value == REAL:
            continue
        if len(value) != 2 or float(value[0]) > float(value[1]) or float(value[0]) < low:
            raise ValueError(f"{key}={value}: expected a (low, high) range with {low} <= low <= high"
                             + ("" if key == "noise" else f", or {REAL!r}"))
    for key in ("compressed_fraction", "reversed_fraction", "signed_fraction", "no_modality_fraction",
                "wedge_fraction", "thoracic_label_fraction", "table_fraction", "boxed_fraction"):
        if not 0.0 <= float(p[key]) <= 1.0:
            raise ValueError(f"{key}={p[key]}: expected a fraction in [0, 1]")


def resolve_params(params: dict) -> dict:
    """The generator parameters a call uses: its scheme's defaults (:data:`SCHEMES`) with the given keys on top,
    checked (ValueError naming the first bad one)."""
    given = {k: v for k, v in params.items() if v is not None}
    scheme = given.get("scheme", DEFAULTS["scheme"])
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r}: expected one of {sorted(SCHEMES)}")
    p = {**SCHEMES[scheme], **given}
    unknown = sorted(set(p) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown generator parameter(s) {unknown}; known: {sorted(DEFAULTS)}")
    if p["prevalence"] != REAL:
        prevalence = {**UNIFORM_DEFAULTS["prevalence"], **dict(p["prevalence"])}
        bad = [v for v in prevalence if v not in VERTEBRAE or not 0.0 <= float(prevalence[v]) <= 1.0]
        if bad:
            raise ValueError(f"prevalence: expected probabilities for {list(VERTEBRAE)} or {REAL!r}, got bad "
                             f"entries {bad}")
        p["prevalence"] = prevalence
    _check_params(p)
    return p


def _range_or_real(value) -> tuple[float, float] | str:
    return REAL if value == REAL else tuple(float(x) for x in value)


def _fracture_kinds(rng: np.random.Generator, p: dict) -> tuple[tuple[str, str], ...]:
    """One study's fractured vertebrae (head to feet) and their kinds, ``line`` or ``wedge`` (C3-C7 only).

    With a prevalence per vertebra each vertebra is drawn on its own and its kind right after it (the order of
    draws of the ``uniform`` scheme); with ``prevalence="real"`` the set comes from the real labels' joint model
    (:func:`~cspine_submit.datasets.real_geometry.draw_fractured`), then each kind.
    """
    wedge_fraction = float(p["wedge_fraction"])
    fractures = []
    if p["prevalence"] == REAL:
        for v in real_geometry.draw_fractured(rng):
            wedge = v not in ("C1", "C2") and rng.random() < wedge_fraction
            fractures.append((v, "wedge" if wedge else "line"))
        return tuple(fractures)
    for v in VERTEBRAE:
        if rng.random() < float(p["prevalence"][v]):
            wedge = v not in ("C1", "C2") and rng.random() < wedge_fraction
            fractures.append((v, "wedge" if wedge else "line"))
    return tuple(fractures)


def plan_specs(n: int, seed: int, **params) -> list[StudySpec]:
    """The specs of ``n`` studies drawn with :func:`generate_dataset`'s parameters (no rendering, no IO)."""
    p = resolve_params(params)
    rng = np.random.default_rng(seed)
    numbers = rng.choice(np.arange(10000, 33000), size=n, replace=False)
    compressed = exact_flags(rng, n, p["compressed_fraction"])
    reversed_ = exact_flags(rng, n, p["reversed_fraction"])
    signed = exact_flags(rng, n, p["signed_fraction"])
    no_modality = exact_flags(rng, n, p["no_modality_fraction"])
    thoracic = exact_flags(rng, n, p["thoracic_label_fraction"])
    # Real sizes from their own generator: a fixed size draws nothing, as before.
    size_rng = np.random.default_rng([seed, 7])
    specs = []
    for i in range(n):
        fractures = _fracture_kinds(rng, p)
        specs.append(
            StudySpec(
                uid=f"{UID_PREFIX}{int(numbers[i])}",
                seed=int(rng.integers(0, 2**31 - 1)),
                fractures=fractures,
                size=real_geometry.draw_size(size_rng) if p["size"] == REAL else int(p["size"]),
                spacing=_range_or_real(p["spacing"]),
                fov=_range_or_real(p["fov"]),
                head=_range_or_real(p["head"]),
                chest=_range_or_real(p["chest"]),
                noise=tuple(float(x) for x in p["noise"]),
                compressed=bool(compressed[i]),
                reversed=bool(reversed_[i]),
                signed=bool(signed[i]),
                modality=not bool(no_modality[i]),
                thoracic_labels=bool(thoracic[i]),
                manufacturer=p["scheme"] != "real",
                box_per_slice=p["scheme"] == "real",
                partial_fractures=p["scheme"] == "real",
            )
        )
    # Drawn after everything else so that adding these options left the other draws of a seed unchanged.
    table = exact_flags(rng, n, p["table_fraction"])
    boxed = exact_flags(rng, n, p["boxed_fraction"])
    return [dataclasses.replace(sp, table=bool(t), boxed=bool(b)) for sp, t, b in zip(specs, table, boxed)]


def _write_csv(path: Path, columns, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row[c] for c in columns])


def generate_study(folder: str | Path, spec: StudySpec, mask_path: str | Path | None = None) -> SyntheticStudy:
    """Render one study and write its DICOM files into ``folder`` (and its mask when ``mask_path`` is given).

    Returns the rendered :class:`SyntheticStudy` (the truth).
    """
    study = render_study(spec)
    write_study(study, Path(folder))
    if mask_path is not None:
        write_study_mask(study, Path(mask_path))
    return study


def generate_dataset(
    out_dir: str | Path,
    n_train: int = 6,
    n_test: int = 3,
    seed: int = 0,
    *,
    n_segmented: int | None = None,
    force: bool = False,
    progress: bool = False,
    **params,
) -> SyntheticDataset:
    """Write a synthetic dataset in the competition's layout.

    Parameters
    ----------
    out_dir : path
        Created; must be empty or absent unless ``force`` (then the dataset's own files are replaced).
    n_train, n_test : int
        Numbers of training and test studies.
    seed : int
        Everything follows from it: same seed and parameters, same bytes.
    n_segmented : int, optional
        Training studies that get a ``segmentations/<uid>.nii`` mask (the first ones drawn); default all of them.
    force : bool
        Replace an existing dataset in ``out_dir``.
    progress : bool
        Show a tqdm bar.
    **params
        Keys of :data:`DEFAULTS`: ``size`` (px), ``spacing`` (mm range), ``fov`` (mm range), ``head``/``chest``
        (mm range of the scan above the top of C1 / below the bottom of C7), ``noise`` (HU range),
        ``compressed_fraction``, ``reversed_fraction``, ``signed_fraction``, ``no_modality_fraction``,
        ``wedge_fraction``, ``thoracic_label_fraction``, ``table_fraction`` (studies with a patient table / head
        rest in view; default 0), ``boxed_fraction`` (share of studies, drawn over all of them, whose fracture
        boxes are written; only fractured training studies have boxes; default 1),
        ``prevalence`` (``{vertebra: probability}``).

    Returns
    -------
    SyntheticDataset
    """
    from tqdm import tqdm

    root = Path(out_dir)
    outputs = ["train_images", "test_images", "segmentations", "train.csv", "train_bounding_boxes.csv",
               "test.csv", "sample_submission.csv", "test_labels.csv"]
    clear_outputs(root, outputs, force, "a dataset")
    n_seg = n_train if n_segmented is None else int(n_segmented)
    if not 0 <= n_seg <= n_train:
        raise ValueError(f"n_segmented={n_segmented}: must be between 0 and n_train={n_train}")
    specs = plan_specs(n_train + n_test, seed, **params)
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    (root / "test_images").mkdir(parents=True, exist_ok=True)
    (root / "segmentations").mkdir(parents=True, exist_ok=True)

    train, test, boxes = [], [], []
    for i, spec in enumerate(tqdm(specs, desc="synthetic studies", unit="study", disable=not progress)):
        split = "train" if i < n_train else "test"
        folder = root / f"{split}_images" / spec.uid
        segmented = split == "train" and i < n_seg
        study = generate_study(folder, spec, root / "segmentations" / f"{spec.uid}.nii" if segmented else None)
        study_boxes = study.boxes() if split == "train" and spec.boxed else []
        boxes.extend(study_boxes)
        record = StudyRecord(spec, split, folder, segmented, study.shape[0], study.spacing, len(study_boxes))
        (train if split == "train" else test).append(record)
        del study

    _write_csv(root / "train.csv", TRAIN_COLUMNS, [{"StudyInstanceUID": r.uid, **r.labels} for r in train])
    boxes.sort(key=lambda b: (b["StudyInstanceUID"], b["slice_number"], b["x"], b["y"]))
    _write_csv(root / "train_bounding_boxes.csv", BOX_COLUMNS, boxes)
    test_rows = [
        {"row_id": f"{r.uid}_{t}", "StudyInstanceUID": r.uid, "prediction_type": t}
        for r in test
        for t in PREDICTION_TYPES
    ]
    _write_csv(root / "test.csv", ("row_id", "StudyInstanceUID", "prediction_type"), test_rows)
    _write_csv(root / "sample_submission.csv", ("row_id", "fractured"),
               [{"row_id": r["row_id"], "fractured": 0.5} for r in test_rows])
    _write_csv(root / "test_labels.csv", TRAIN_COLUMNS, [{"StudyInstanceUID": r.uid, **r.labels} for r in test])

    used = resolve_params(params)
    used = {k: (list(v) if isinstance(v, tuple) else v) for k, v in used.items()}
    used.update(n_train=n_train, n_test=n_test, seed=seed, n_segmented=n_seg)
    return SyntheticDataset(root, tuple(train), tuple(test), used)
