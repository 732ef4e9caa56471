"""Real CT volumes (tests/data/real_neck, OpenKBP) written as competition-style DICOM studies and read back.

What must hold: the package's reader gets back exactly the HU that were written (uncompressed and JPEG Lossless,
numbered either way) with the right slice order and spacing; the written mask, read through the package's mask
path, puts each vertebra where the cut's mapping of the source labels says (and where labels.json says, within a
source slice); the axial frame does not depend on how the NIfTI file is oriented; cuts are reproducible and hold
C1-C7.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import REAL_NECK_PARAMS

from cspine_submit.config import VERTEBRAE
from cspine_submit.read.dicom import read_slices, scan_study
from cspine_submit.datasets.volume_cut import (
    AIR_HU,
    CutSpec,
    competition_cut,
    cut_index_range,
    resample_volume,
    source_positions,
)
from cspine_submit.datasets.volume_study import (
    load_ct_axial,
    load_labels_axial,
    load_pair,
    write_studies,
    write_volume_study,
)

REAL = Path(__file__).parent / "data" / "real_neck"
PATIENTS = sorted(p.name[: -len("_ct.nii.gz")] for p in REAL.glob("*_ct.nii.gz"))
LABELS_JSON = json.loads((REAL / "labels.json").read_text())


def _pair(name: str):
    return load_pair(REAL / f"{name}_ct.nii.gz", REAL / f"{name}_vert.nii.gz")


def _truth(mask: Path, study: Path):
    from cspine_submit.localize import truth_from_files

    return truth_from_files(mask, study, with_profile=False)


def _label_ranges(labels: np.ndarray) -> dict[str, tuple[int, int]]:
    out = {}
    for k, v in enumerate(VERTEBRAE, start=1):
        zs = np.flatnonzero((labels == k).any(axis=(1, 2)))
        out[v] = (int(zs[0]), int(zs[-1]))
    return out


def test_all_eleven_patients_are_there():
    assert len(PATIENTS) == 11
    assert set(PATIENTS) == set(LABELS_JSON)
    assert (REAL / "LICENSE_OpenKBP_MIT.txt").is_file()


def test_load_ct_axial_reads_the_lpi_files_head_to_feet():
    raw = nib.load(str(REAL / "pt_100_ct.nii.gz"))
    data = np.asanyarray(raw.dataobj)
    ct = load_ct_axial(REAL / "pt_100_ct.nii.gz")
    assert ct.volume.dtype == np.float32 and ct.volume.shape == (128, 128, 128)
    # L,P,I on disk: axis 2 is already head to feet, axis 1 posterior, axis 0 toward the left.
    np.testing.assert_array_equal(ct.volume, data.transpose(2, 1, 0))
    np.testing.assert_allclose(ct.spacing, (2.5, 5.078, 5.078), atol=1e-4)
    np.testing.assert_allclose(ct.origin_lps, 0.0, atol=1e-6)
    # Air at the corners, bone somewhere: these are HU, not stored values.
    assert ct.volume[0, 0, 0] == -1024 and ct.volume.max() > 1000


@pytest.mark.parametrize("name", PATIENTS)
def test_labels_put_c1_above_c7_and_agree_with_labels_json(name):
    labels = load_labels_axial(REAL / f"{name}_vert.nii.gz")
    assert labels.volume.dtype == np.uint8
    ranges = _label_ranges(labels.volume)
    assert ranges["C1"][0] < ranges["C7"][1]
    for v in VERTEBRAE:
        expected = LABELS_JSON[name][v]
        # The mask gives a shared disc slice to the lower vertebra: its ranges may end one slice early.
        assert ranges[v][0] == expected[0], (name, v, ranges[v], expected)
        assert expected[1] - 1 <= ranges[v][1] <= expected[1], (name, v, ranges[v], expected)


def _reoriented(tmp_path: Path, src: Path, ornt: np.ndarray, name: str) -> Path:
    img = nib.load(str(src))
    data = np.asanyarray(img.dataobj)
    out = nib.orientations.apply_orientation(data, ornt)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    path = tmp_path / name
    nib.save(nib.Nifti1Image(out, affine), str(path))
    return path


@pytest.mark.parametrize(
    "ornt",
    [
        np.array([[0, -1], [1, -1], [2, -1]]),  # every axis flipped: R,A,S
        np.array([[2, 1], [0, -1], [1, 1]]),  # axes permuted, one flipped
    ],
    ids=["RAS", "permuted"],
)
def test_any_orientation_gives_the_same_axial_volume(tmp_path, ornt):
    reference_ct, reference_labels = _pair("pt_34")
    ct_path = _reoriented(tmp_path, REAL / "pt_34_ct.nii.gz", ornt, "x_ct.nii.gz")
    lab_path = _reoriented(tmp_path, REAL / "pt_34_vert.nii.gz", ornt, "x_vert.nii.gz")
    assert nib.aff2axcodes(nib.load(str(ct_path)).affine) != ("L", "P", "I")
    ct, labels = load_pair(ct_path, lab_path)
    np.testing.assert_array_equal(ct.volume, reference_ct.volume)
    np.testing.assert_array_equal(labels.volume, reference_labels.volume)
    np.testing.assert_allclose(ct.spacing, reference_ct.spacing, atol=1e-5)
    np.testing.assert_allclose(ct.origin_lps, reference_ct.origin_lps, atol=1e-4)


def test_oblique_and_mismatched_files_are_refused_by_name(tmp_path):
    img = nib.load(str(REAL / "pt_34_ct.nii.gz"))
    angle = np.deg2rad(10)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    oblique = tmp_path / "oblique_ct.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), rot @ img.affine), str(oblique))
    with pytest.raises(ValueError, match="oblique_ct.nii.gz: oblique affine"):
        load_ct_axial(oblique)
    with pytest.raises(ValueError, match="pt_100_vert.nii.gz: label grid"):
        load_pair(REAL / "pt_34_ct.nii.gz", REAL / "pt_100_vert.nii.gz")  # other spacing
    with pytest.raises(FileNotFoundError, match="nothing_ct.nii.gz"):
        load_ct_axial(tmp_path / "nothing_ct.nii.gz")


# ---------------------------------------------------------------------------------------------------------------
# The pure cut / resample
# ---------------------------------------------------------------------------------------------------------------


def test_resample_is_exact_on_a_linear_ramp_and_air_outside():
    spacing = (3.0, 4.0, 5.0)
    nz, ny, nx = 20, 16, 12
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    # HU as a linear function of position (mm): trilinear interpolation must reproduce it exactly.
    ramp = lambda z, y, x: 100.0 + 2.0 * z - 1.5 * y + 0.5 * x  # noqa: E731
    volume = ramp(k * 3.0, j * 4.0, i * 5.0).astype(np.float32)
    labels = (k * 1000 + j * 10 + i % 10).astype(np.int32)
    spec = CutSpec(z_start_mm=4.0, z_end_mm=40.0, slice_mm=1.25, fov_mm=30.0, centre_yx_mm=(30.0, 27.5), size=24)
    hu, out_labels, out_spacing = resample_volume(volume, spacing, spec, labels)
    assert hu.shape == spec.shape == (29, 24, 24) and out_spacing == (1.25, 1.25, 1.25)
    zz = 4.0 + np.arange(29) * 1.25
    yy = 30.0 - 15.0 + (np.arange(24) + 0.5) * 1.25
    xx = 27.5 - 15.0 + (np.arange(24) + 0.5) * 1.25
    expected = ramp(zz[:, None, None], yy[None, :, None], xx[None, None, :])
    np.testing.assert_allclose(hu, expected, atol=1e-3)
    # Nearest neighbour: output (0, 0, 0) is at (4.0, 15.625, 13.125) mm -> source voxel (1, 4, 3).
    assert out_labels[0, 0, 0] == 1 * 1000 + 4 * 10 + 3
    assert out_labels.dtype == np.int32

    # A field of view hanging off the volume's edge: far outside is air and label 0.
    off = CutSpec(z_start_mm=0.0, z_end_mm=9.0, slice_mm=3.0, fov_mm=100.0, centre_yx_mm=(0.0, 0.0), size=10)
    hu, out_labels, _ = resample_volume(volume, spacing, off, labels)
    assert np.all(hu[:, :4, :] == AIR_HU) and np.all(out_labels[:, :4, :] == 0)
    assert np.all(hu[:, 6:, 6:] > 0)  # inside the source: the ramp (always > 0 here)


def test_a_native_grid_copies_the_source_exactly():
    ct, labels = _pair("pt_83")
    dz, dy, dx = ct.spacing
    n = ct.volume.shape[1]
    spec = CutSpec(z_start_mm=0.0, z_end_mm=(ct.volume.shape[0] - 1) * dz, slice_mm=dz, fov_mm=n * dy,
                   centre_yx_mm=((n - 1) / 2 * dy, (n - 1) / 2 * dx), size=n)
    hu, out_labels, spacing = resample_volume(ct.volume, ct.spacing, spec, labels.volume)
    np.testing.assert_array_equal(hu, ct.volume)
    np.testing.assert_array_equal(out_labels, labels.volume)


@pytest.mark.parametrize("name", PATIENTS)
def test_competition_cut_is_reproducible_and_holds_c1_to_c7(name):
    _, labels = _pair(name)
    dz = labels.spacing[0]
    ranged = dict(size=512, slice_mm=1.25, head_mm=(5.0, 35.0), chest_mm=(15.0, 60.0), fov_mm=(160.0, 240.0))
    spec = competition_cut(labels.volume, labels.spacing, np.random.default_rng(7), **ranged)
    assert spec == competition_cut(labels.volume, labels.spacing, np.random.default_rng(7), **ranged)
    assert spec != competition_cut(labels.volume, labels.spacing, np.random.default_rng(8), **ranged)
    ranges = _label_ranges(labels.volume)
    c1_top, c7_bottom = ranges["C1"][0] * dz, ranges["C7"][1] * dz
    last = (labels.volume.shape[0] - 1) * dz
    assert max(0.0, c1_top - 35) - 1e-3 <= spec.z_start_mm <= c1_top - 5 + 1e-3
    assert min(last, c7_bottom + 15) - 1e-3 <= spec.z_end_mm <= min(last, c7_bottom + 60) + 1e-3
    assert 160 <= spec.fov_mm <= 240 and spec.size == 512 and spec.slice_mm == 1.25
    ys = np.flatnonzero(((labels.volume >= 1) & (labels.volume <= 7)).any(axis=(0, 2)))
    assert abs(spec.centre_yx_mm[0] - 0.5 * (ys[0] + ys[-1]) * labels.spacing[1]) <= 5.0 + 1e-6
    # Round trip through the record.
    assert CutSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_default_cut_draws_like_the_real_studies():
    """The default cut: margins above C1 / below C7 from one real masked study, the field of view from a real
    pixel spacing x 512, the slice spacing with its thickness from a real study (real_geometry's tables)."""
    from cspine_submit.datasets import real_geometry as R

    _, labels = _pair("pt_34")
    dz = labels.spacing[0]
    ranges = _label_ranges(labels.volume)
    c1_top, c7_bottom = ranges["C1"][0] * dz, ranges["C7"][1] * dz
    last = (labels.volume.shape[0] - 1) * dz
    pairs = {(a, b) for a, b, _ in R.SPACING_THICKNESS}
    margins = set(R.MARGINS_MM)
    seen = set()
    for seed in range(12):
        spec = competition_cut(labels.volume, labels.spacing, np.random.default_rng(seed), size=512)
        assert (spec.slice_mm, spec.thickness_mm) in pairs
        assert R.PIXEL_SPACING_RANGE_MM[0] - 1e-6 <= spec.fov_mm / 512 <= R.PIXEL_SPACING_RANGE_MM[1] + 1e-6
        head, chest = c1_top - spec.z_start_mm, spec.z_end_mm - c7_bottom
        # Clipped only by the volume's own ends.
        assert any(abs(head - min(h, c1_top)) < 1e-3 and abs(chest - min(c, last - c7_bottom)) < 1e-3
                   for h, c in margins), (head, chest)
        seen.add((spec.slice_mm, round(spec.fov_mm)))
    assert len(seen) > 6  # the draws differ from seed to seed


def test_competition_cut_native_slices_and_bad_labels():
    _, labels = _pair("pt_122")
    spec = competition_cut(labels.volume, labels.spacing, np.random.default_rng(0), size=64, slice_mm=None)
    dz = labels.spacing[0]
    assert spec.slice_mm == dz
    assert spec.z_start_mm / dz == pytest.approx(round(spec.z_start_mm / dz))
    tz, _, _ = source_positions(spec, labels.spacing)
    np.testing.assert_array_equal(tz, np.round(tz))  # every output slice is a source slice
    with pytest.raises(ValueError, match="not above C7"):
        competition_cut(labels.volume[::-1], labels.spacing, np.random.default_rng(0))
    with pytest.raises(ValueError, match="C7"):
        competition_cut(np.where(labels.volume == 7, 0, labels.volume), labels.spacing, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------------------
# Written studies read back through the package's reader and mask path
# ---------------------------------------------------------------------------------------------------------------


def _check_files(written, header):
    """Header geometry as written: file numbering direction, orientation, spacing, thickness."""
    ds_first = pydicom.dcmread(header.files[0], stop_before_pixels=True)
    ds_last = pydicom.dcmread(header.files[-1], stop_before_pixels=True)
    n = written.n_slices
    assert (header.files[0].name, header.files[-1].name) == (
        (f"{n}.dcm", "1.dcm") if written.reversed else ("1.dcm", f"{n}.dcm")
    )
    assert header.reversed == written.reversed
    assert [float(v) for v in ds_first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(ds_first.ImagePositionPatient[2]) > float(ds_last.ImagePositionPatient[2])  # head has the larger z
    dz, dy, dx = written.spacing
    assert float(ds_first.ImagePositionPatient[2]) == pytest.approx(written.z_head, abs=1e-4)
    assert float(ds_first.ImagePositionPatient[2]) - float(ds_last.ImagePositionPatient[2]) == pytest.approx(
        (n - 1) * dz, abs=1e-3)
    assert [float(v) for v in ds_first.PixelSpacing] == pytest.approx([dy, dx], abs=1e-6)
    assert float(ds_first.SliceThickness) == pytest.approx(dz, abs=1e-6)
    assert ds_first.file_meta.TransferSyntaxUID == written.transfer_syntax
    assert header.transfer_syntaxes == (written.transfer_syntax,) * n
    np.testing.assert_allclose(header.spacing, written.spacing, atol=1e-4)
    assert header.shape == written.hu.shape


@pytest.mark.parametrize(
    "name, reversed_, compressed, signed",
    [("pt_100", False, False, True), ("pt_34", True, True, False), ("pt_248", True, False, True)],
)
def test_cut_study_reads_back_to_the_written_hu_and_labels(tmp_path, name, reversed_, compressed, signed):
    ct, labels = _pair(name)
    spec = competition_cut(labels.volume, labels.spacing, np.random.default_rng(3), size=128, slice_mm=1.25)
    uid = "1.2.826.0.1.3680043.99.1"
    written = write_volume_study(tmp_path / "images" / uid, ct, labels, uid=uid, cut=spec,
                                 mask_path=tmp_path / "segmentations" / f"{uid}.nii", reversed_=reversed_,
                                 compressed=compressed, signed=signed)
    header = scan_study(written.folder)
    _check_files(written, header)
    hu = read_slices(header)
    np.testing.assert_array_equal(hu, written.hu.astype(np.float32))
    # What was written is the cut of the real CT, not something else of the right shape.
    expected, _, _ = resample_volume(ct.volume, ct.spacing, spec)
    assert np.abs(hu - expected).max() <= 0.5 + 1e-3

    truth = _truth(written.mask, written.folder)
    assert truth.z_ranges["C1"][0] < truth.z_ranges["C7"][1]
    tz, ty, tx = source_positions(spec, ct.spacing)
    source = _label_ranges(labels.volume)
    per_step = int(np.ceil(ct.spacing[0] / spec.slice_mm))  # output slices per source slice
    for v in VERTEBRAE:
        # Exactly where the cut's nearest-neighbour mapping puts the source labels ...
        assert truth.z_ranges[v] == cut_index_range(*source[v], tz), v
        k = VERTEBRAE.index(v) + 1
        ys = np.flatnonzero((labels.volume == k).any(axis=(0, 2)))
        xs = np.flatnonzero((labels.volume == k).any(axis=(0, 1)))
        (y0, y1), (x0, x1) = cut_index_range(ys[0], ys[-1], ty), cut_index_range(xs[0], xs[-1], tx)
        assert truth.boxes[v] == (y0, x0, y1 + 1, x1 + 1), v
        # ... and where labels.json says, within one source slice.
        first, last = cut_index_range(*LABELS_JSON[name][v], tz)
        assert abs(truth.z_ranges[v][0] - first) <= per_step and abs(truth.z_ranges[v][1] - last) <= per_step, v
    # The head of the study is the skull base end: C1 lies in its upper part, some slices below the first.
    assert 0 < truth.z_ranges["C1"][0] < truth.z_ranges["C7"][1] < header.n_slices - 1


@pytest.mark.parametrize("reversed_, compressed", [(False, True), (True, False)])
def test_whole_volume_reads_back_to_the_source_hu(tmp_path, reversed_, compressed):
    ct, labels = _pair("pt_319")
    uid = "1.2.826.0.1.3680043.99.2"
    written = write_volume_study(tmp_path / uid, ct, labels, uid=uid, mask_path=tmp_path / f"{uid}.nii",
                                 reversed_=reversed_, compressed=compressed, signed=not compressed)
    header = scan_study(written.folder)
    _check_files(written, header)
    np.testing.assert_array_equal(read_slices(header), ct.volume)
    truth = _truth(written.mask, written.folder)
    assert truth.z_ranges == _label_ranges(labels.volume)
    np.testing.assert_allclose(np.diff(truth.z_mm), ct.spacing[0], atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# A folder of volumes, and the command
# ---------------------------------------------------------------------------------------------------------------


def test_write_studies_layout_records_and_reproducibility(real_neck_dataset, tmp_path):
    root, records = real_neck_dataset
    assert len(records) == 11
    uids = sorted(p.name for p in (root / "images").iterdir())
    assert uids == sorted(r["uid"] for r in records)
    assert sorted(p.name for p in (root / "segmentations").iterdir()) == sorted(f"{u}.nii" for u in uids)
    assert sum(r["reversed"] for r in records) == 6  # round(0.5 * 11)
    assert sum(r["transfer_syntax"].endswith(".4.70") for r in records) == 6
    names = {r["name"]: r for r in records}
    assert names["pt_100"]["uid"] == "1.2.826.0.1.3680043.99.100"
    csv_lines = (root / "studies.csv").read_text().splitlines()
    assert len(csv_lines) == 12 and csv_lines[0].startswith("name,uid,source,n_slices")
    assert len((root / "test.csv").read_text().splitlines()) == 1 + 8 * 11
    stored = json.loads((root / "studies.json").read_text())
    assert stored["studies"] == json.loads(json.dumps(records))
    # One volume alone gets the same cut as inside the whole folder (cuts are seeded per name).
    one = write_studies(REAL / "pt_83_ct.nii.gz", tmp_path / "one", **REAL_NECK_PARAMS)
    assert one[0]["cut"] == names["pt_83"]["cut"]
    with pytest.raises(FileExistsError, match="not empty"):
        write_studies(REAL / "pt_83_ct.nii.gz", tmp_path / "one", size=128)


def test_learn_and_eval_ranges_read_the_written_studies(real_neck_dataset, tmp_path, capsys):
    from cspine_submit.cli import main
    from cspine_submit.localize import load_truths

    root, records = real_neck_dataset
    truths, skipped = load_truths(root / "segmentations", root / "images", with_profile=False)
    assert skipped == [] and len(truths) == 11
    by_uid = {t.uid: t for t in truths}
    for r in records:
        assert {v: tuple(z) for v, z in r["z_ranges"].items()} == by_uid[r["uid"]].z_ranges
    # The commands, unchanged, with the competition layout's defaults.
    seg, img = str(root / "segmentations"), str(root / "images")
    assert main(["learn-ranges", "--segmentations", seg, "--images", img, "--out", str(tmp_path / "r.json")]) == 0
    assert "learned from 11 masks (skipped 0)" in capsys.readouterr().out
    assert main(["eval-ranges", "--segmentations", seg, "--images", img, "--method", "fraction", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_studies"] == 11 and 0.0 < result["mean"]["coverage"] <= 1.0


def test_write_study_command(tmp_path, capsys):
    from cspine_submit.cli import main

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pt_150", "pt_211"):
        for kind in ("ct", "vert"):
            (src / f"{name}_{kind}.nii.gz").symlink_to(REAL / f"{name}_{kind}.nii.gz")
    out = tmp_path / "out"
    argv = ["write-study", str(src), str(out), "--size", "64", "--slice-mm", "native", "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "wrote 2 studies" in text and "pt_150" in text
    assert main(argv) == 2 and "--force" in capsys.readouterr().out
    assert main(argv + ["--force", "--no-cut"]) == 0
    header = scan_study(out / "images" / "1.2.826.0.1.3680043.99.150")
    assert header.shape == (128, 128, 128)
    assert main(["write-study", str(src), str(tmp_path / "bad"), "--slice-mm", "thin"]) == 2
    assert "--slice-mm" in capsys.readouterr().out
    (src / "pt_211_vert.nii.gz").unlink()
    assert main(["write-study", str(src), str(tmp_path / "bad2"), "--quiet"]) == 2
    assert "pt_211_ct.nii.gz" in capsys.readouterr().out
