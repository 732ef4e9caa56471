"""The DICOM reader: decoding every transfer syntax to reference HU, slice ordering, broken input.

Real files in tests/data/dicom (licences beside them): ``transfer_syntaxes/`` one GE CT slice in 16 syntaxes
(cornerstone3D, MIT), ``series_j2k_ct/`` a 20-slice Siemens JPEG 2000 series (TotalSegmentator, Apache-2.0),
``odd/`` a fragmented .4.70 file (pylibjpeg-data, MIT) and a 12-bit signed MR slice (dcm_qa, BSD-2).
Small synthetic studies are written here with pydicom for the ordering cases.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cspine_submit.read.dicom import (
    DicomReadError,
    StudyHeader,
    available_plugins,
    decode_slice,
    decoder_table,
    missing_decoders,
    read_slice_header,
    read_slices,
    read_study,
    scan_study,
    to_hu,
)

from cspine_submit.datasets.jpeg_lossless import compress_jpeg_lossless

from _pipeline_helpers import write_ct_slice

DATA = Path(__file__).parent / "data" / "dicom"
TS_DIR = DATA / "transfer_syntaxes"
REF = TS_DIR / "CTImage_ref_implicitLE.dcm"
SERIES = DATA / "series_j2k_ct"

LOSSLESS = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.5",
]
LOSSY = ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91"]
UNSUPPORTED = ["1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55"]


def ts_file(uid: str) -> Path:
    (path,) = [p for p in TS_DIR.glob("CTImage_*.dcm") if p.stem.endswith("_" + uid)]
    return path


@pytest.fixture(scope="module")
def ref_hu() -> np.ndarray:
    # Reference: the uncompressed file, stored int16, RescaleIntercept -1024.
    ds = pydicom.dcmread(REF)
    assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, -1024)
    return ds.pixel_array.astype(np.float32) - 1024.0


# --------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uid", LOSSLESS)
def test_lossless_syntaxes_decode_to_reference_pixels(uid, ref_hu):
    assert read_slice_header(ts_file(uid)).transfer_syntax == uid
    hu = decode_slice(ts_file(uid))
    assert hu.dtype == np.float32 and hu.shape == (512, 512)
    np.testing.assert_array_equal(hu, ref_hu)
    assert hu.min() == -3024.0 and hu.max() == 1378.0


@pytest.mark.parametrize("uid", LOSSY)
def test_lossy_syntaxes_decode_close_to_reference(uid, ref_hu):
    hu = decode_slice(ts_file(uid))
    err = np.abs(hu - ref_hu)
    # .4.50 is 8-bit with RescaleSlope 32 (a quantisation step of 32 HU): two steps at worst.
    assert err.mean() < 25.0 and err.max() < 70.0, (err.mean(), err.max())


@pytest.mark.parametrize("plugin", available_plugins("1.2.840.10008.1.2.4.70"))
def test_jpeg_lossless_sv1_exact_with_every_plugin(plugin, ref_hu):
    np.testing.assert_array_equal(decode_slice(ts_file("1.2.840.10008.1.2.4.70"), plugin=plugin), ref_hu)


def test_gdcm_is_tried_first_for_jpeg_lossless_sv1():
    plugins = available_plugins("1.2.840.10008.1.2.4.70")
    assert plugins and (plugins[0] == "gdcm" or "gdcm" not in plugins)
    assert available_plugins("1.2.840.10008.1.2.1") == ("native",)


@pytest.mark.parametrize("uid", UNSUPPORTED)
def test_unsupported_syntaxes_fail_naming_syntax_and_remedy(uid):
    path = ts_file(uid)
    read_slice_header(path)  # the header is fine; only decoding is impossible
    with pytest.raises(DicomReadError) as info:
        decode_slice(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and uid in msg
    assert "no pydicom decoder" in msg and "dcmdjpeg" in msg


def test_fragmented_jpeg_lossless_and_12_bit_signed():
    hu = decode_slice(DATA / "odd" / "5001001.dcm")  # .4.70 with its frame split over fragments
    assert hu.shape == (128, 128) and hu.min() == 0.0 and hu.max() == 15.0
    # BitsStored 12, PixelRepresentation 1 inside 16-bit words: pydicom sign-extends bit 11.
    signed = decode_slice(DATA / "odd" / "12bitSigned_0x0F0F.dcm")
    assert signed.min() == -2048.0 and signed.max() == 2047.0


def test_to_hu():
    stored = np.array([[0, 1024, 4095]], dtype=np.uint16)
    np.testing.assert_array_equal(to_hu(stored, 1.0, -1024.0), [[-1024.0, 0.0, 3071.0]])
    np.testing.assert_array_equal(to_hu(np.array([-3, 5], np.int16), 2.5, 10.0), [2.5, 22.5])
    assert to_hu(stored).dtype == np.float32


def test_decoder_table_covers_competition_syntaxes():
    rows = {r["uid"]: r for r in decoder_table()}
    for uid in ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.57",
                "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"]:
        assert rows[uid]["ok"], rows[uid]
    assert "gdcm" in rows["1.2.840.10008.1.2.4.70"]["available"]
    (r53,) = decoder_table(["1.2.840.10008.1.2.4.53"])
    assert not r53["ok"] and r53["available"] == [] and r53["missing"]
    assert missing_decoders() == []  # this environment decodes everything the competition needs
    assert missing_decoders(["1.2.840.10008.1.2.4.53"]) == ["(none): pydicom has no decoder for this transfer syntax"]


def test_missing_plugins_are_named_by_the_package_pip_installs(monkeypatch):
    # Without GDCM and pylibjpeg, pydicom says "gdcm - requires gdcm>=3.0.10": the pip package is python-gdcm.
    import pydicom.pixels

    class NoPlugin:
        is_native = False
        available_plugins = ()
        missing_dependencies = ["gdcm - requires gdcm>=3.0.10",
                                "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"]

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: NoPlugin())
    uid = "1.2.840.10008.1.2.4.70"
    (row,) = decoder_table([uid])
    assert not row["ok"] and row["missing"] == {
        "gdcm": 'pip install "python-gdcm>=3.0.10"',
        "pylibjpeg": 'pip install "pylibjpeg>=2.0" "pylibjpeg-libjpeg>=2.1"',
    }
    assert missing_decoders([uid]) == ['gdcm: pip install "python-gdcm>=3.0.10"',
                                       'pylibjpeg: pip install "pylibjpeg>=2.0" "pylibjpeg-libjpeg>=2.1"']
    with pytest.raises(DicomReadError, match="python-gdcm") as info:
        decode_slice(ts_file(uid), uid)
    assert str(info.value).startswith(str(ts_file(uid)))


# --------------------------------------------------------------------------------------------------------------
# The real 20-slice series
# --------------------------------------------------------------------------------------------------------------


def test_real_series_order_spacing_and_hu():
    header, volume = read_study(SERIES)
    assert header.n_slices == 20 and header.shape == (20, 512, 512) and volume.shape == (20, 512, 512)
    assert header.skipped == (("LICENSE_TotalSegmentator_Apache2.txt", "not a DICOM file"),)
    # Head to feet: ImagePositionPatient z runs -766.5 .. -804.5 (LPS, +z = head) and InstanceNumber 267..286.
    tags = [pydicom.dcmread(f, stop_before_pixels=True) for f in header.files]
    assert [float(d.ImagePositionPatient[2]) for d in tags] == [-766.5 - 2 * i for i in range(20)]
    assert [int(d.InstanceNumber) for d in tags] == list(range(267, 287))
    np.testing.assert_allclose(header.z, 766.5 + 2.0 * np.arange(20))
    assert header.spacing == (2.0, 0.9765625, 0.9765625)
    assert header.slice_thickness == 3.0  # the header says 3 mm; the positions say 2 mm apart
    assert header.series_uid == "" and header.study_uid == "series_j2k_ct"  # both UIDs empty: the folder name
    assert set(header.transfer_syntaxes) == {"1.2.840.10008.1.2.4.90"}
    assert not header.reversed
    # Plausible HU: most voxels are air around the patient, the centre is soft tissue.
    assert -1024.0 <= np.median(volume) <= -950.0
    assert volume.min() == -1024.0
    centre = np.median(volume[:, 200:312, 200:312], axis=(1, 2))
    assert np.all((centre > 0) & (centre < 100)), centre


def test_read_slices_decodes_only_requested_in_requested_order(tmp_path):
    header = scan_study(SERIES)
    full = read_slices(header)
    sub = read_slices(header, [7, 2, 7, 19])
    np.testing.assert_array_equal(sub, full[[7, 2, 7, 19]])
    assert read_slices(header, []).shape == (0, 512, 512)
    with pytest.raises(IndexError, match="series_j2k_ct"):
        read_slices(header, [20])
    # Slices that are never requested are never opened: break one and read the others.
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom")
    files = list(header.files)
    files[0] = broken
    patched = dataclasses.replace(header, files=tuple(files))
    np.testing.assert_array_equal(read_slices(patched, [1, 2]), full[[1, 2]])
    with pytest.raises(DicomReadError, match=str(broken)):
        read_slices(patched, [0])


# --------------------------------------------------------------------------------------------------------------
# Synthetic studies: ordering does not depend on file names or numbering
# --------------------------------------------------------------------------------------------------------------

N, ROWS, COLS = 8, 16, 20
STUDY_UID = "1.2.826.0.1.3680043.99999"


def slice_pixels(k: int) -> np.ndarray:
    """Stored pixels of anatomical slice k (0 = head): unique per slice and per pixel."""
    return (np.arange(ROWS * COLS).reshape(ROWS, COLS) + 1000 * k).astype(np.int16)


def write_slice(path: Path, k: int, *, instance: int | None = None, position: bool = True, series: str = "1.2.3",
                rows: int = ROWS, cols: int = COLS, z_step: float = 1.25, study_uid: str = STUDY_UID) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series
    if instance is not None:
        ds.InstanceNumber = instance
    if position:
        ds.ImagePositionPatient = [-100.0, -120.0, 50.0 - z_step * k]  # LPS: +z is the head
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.25]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    pixels = slice_pixels(k) if (rows, cols) == (ROWS, COLS) else np.zeros((rows, cols), np.int16)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def make_study(folder: Path, names: list[str], **kwargs) -> Path:
    """Write slice k (0 = head) as ``names[k]``."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        write_slice(folder / name, k, **kwargs)
    return folder


EXPECTED = np.stack([slice_pixels(k) for k in range(N)]).astype(np.float32) - 1024.0


@pytest.mark.parametrize(
    "case",
    ["head_first", "reversed_numbering", "shuffled_names", "uid_names", "stray_files"],
)
def test_same_volume_whatever_the_file_names(tmp_path, case):
    rng = np.random.default_rng(7)
    if case == "head_first":
        names = [f"{k + 1}.dcm" for k in range(N)]
    elif case == "reversed_numbering":
        names = [f"{N - k}.dcm" for k in range(N)]  # 1.dcm is the feet end
    elif case == "shuffled_names":
        names = [f"{n}.dcm" for n in rng.permutation(np.arange(1, N + 1))]
    elif case == "uid_names":
        names = [f"CT.1.3.12.2.{n}" for n in rng.permutation(np.arange(16573, 16573 + N))]
    else:
        names = [f"{k + 1}.dcm" for k in range(N)]
    folder = make_study(tmp_path / STUDY_UID, names, instance=None)
    if case == "stray_files":
        (folder / "notes.txt").write_text("not an image\n")
        (folder / "0.dcm").write_bytes(b"\x00" * 200)
        (folder / ".hidden").write_text("ignored")
        (folder / "sub").mkdir()
    header, volume = read_study(folder)
    np.testing.assert_array_equal(volume, EXPECTED)
    assert [p.name for p in header.files] == names
    np.testing.assert_allclose(header.z, -50.0 + 1.25 * np.arange(N))
    assert header.spacing == (1.25, 0.5, 0.25) and header.shape == (N, ROWS, COLS)
    assert header.study_uid == STUDY_UID and header.warnings == ()
    assert header.reversed == (case == "reversed_numbering")
    if case == "stray_files":
        assert dict(header.skipped) == {"0.dcm": "not a DICOM file", "notes.txt": "not a DICOM file"}
    else:
        assert header.skipped == ()


@pytest.mark.parametrize("implicit", [True, False])
def test_files_without_preamble_or_file_meta_scan_and_decode(tmp_path, implicit):
    # Some writers omit the preamble and file meta: the scan accepts such files, so decoding must too.
    folder = make_study(tmp_path / "s", [f"{k + 1}.dcm" for k in range(N)])
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
        assert path.read_bytes()[128:132] != b"DICM"
    header, volume = read_study(folder)
    assert set(header.transfer_syntaxes) == {"1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"}
    np.testing.assert_array_equal(volume, EXPECTED)


def test_feet_first_positions_with_instance_numbers_ignored(tmp_path):
    # InstanceNumber says the opposite of the positions: positions win.
    folder = tmp_path / "s"
    folder.mkdir()
    for k in range(N):
        write_slice(folder / f"{k + 1}.dcm", k, instance=N - k)
    header, volume = read_study(folder)
    np.testing.assert_array_equal(volume, EXPECTED)


def test_duplicates_other_series_and_other_size_are_skipped(tmp_path):
    folder = make_study(tmp_path / "s", [f"{k + 1}.dcm" for k in range(N)])
    write_slice(folder / "99.dcm", 3)  # same position as 4.dcm
    write_slice(folder / "scout.dcm", 0, series="9.9.9")
    write_slice(folder / "big.dcm", 0, rows=32, cols=32)
    header, volume = read_study(folder)
    np.testing.assert_array_equal(volume, EXPECTED)
    skipped = dict(header.skipped)
    assert skipped["99.dcm"] == "duplicate position of 4.dcm"
    assert skipped["scout.dcm"].startswith("other series 9.9.9")
    assert skipped["big.dcm"] == "slice size 32x32 differs from the study's 16x20"
    assert len(skipped) == 3


def test_slices_off_the_series_plane_are_skipped(tmp_path):
    # A localizer in the series (coronal) is left out; a slice tilted by half a degree is kept.
    folder = make_study(tmp_path / "s", [f"{k + 1}.dcm" for k in range(N)])
    for name, k, orientation in (("loc.dcm", 20, [1, 0, 0, 0, 0, -1]),
                                 ("tilt.dcm", -1, [1, 0, 0, 0, np.cos(np.radians(0.5)), np.sin(np.radians(0.5))])):
        path = write_slice(folder / name, k)
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.save_as(path)
    header = scan_study(folder)
    assert dict(header.skipped) == {"loc.dcm": "ImageOrientationPatient differs from the series (e.g. a localizer)"}
    assert [p.name for p in header.files] == ["tilt.dcm"] + [f"{k + 1}.dcm" for k in range(N)]
    np.testing.assert_array_equal(header.orientation, [1, 0, 0, 0, 1, 0])


def test_missing_positions_fall_back_to_instance_number_then_file_name(tmp_path):
    # Shuffled names, no positions, InstanceNumber 1..N from head to feet.
    by_instance = tmp_path / "a"
    by_instance.mkdir()
    names = [f"x{n}.dcm" for n in np.random.default_rng(1).permutation(N)]
    for k, name in enumerate(names):
        write_slice(by_instance / name, k, position=False, instance=k + 1)
    header, volume = read_study(by_instance)
    np.testing.assert_array_equal(volume, EXPECTED)
    assert any("InstanceNumber" in w for w in header.warnings)
    assert header.spacing[0] == 1.0 and np.isnan(header.positions).all()

    by_name = make_study(tmp_path / "b", [f"{k + 1}.dcm" for k in range(N)], position=False, instance=None)
    header, volume = read_study(by_name)
    np.testing.assert_array_equal(volume, EXPECTED)
    assert any("numeric file name" in w for w in header.warnings)


def test_positions_that_do_not_separate_slices_are_ignored(tmp_path):
    # A broken header copied to every file: one position for all slices. Keeping one slice and calling the
    # rest duplicates would silently lose the study; the InstanceNumber fallback orders it, with a warning.
    folder = tmp_path / "s"
    folder.mkdir()
    names = [f"x{n}.dcm" for n in np.random.default_rng(3).permutation(N)]
    for k, name in enumerate(names):
        write_slice(folder / name, k, instance=k + 1, z_step=0.0)
    header, volume = read_study(folder)
    np.testing.assert_array_equal(volume, EXPECTED)
    assert header.skipped == () and header.spacing[0] == 1.0
    assert any("distinct position" in w for w in header.warnings)
    assert any("InstanceNumber" in w for w in header.warnings)
    # A genuine duplicate among distinct positions is still just a duplicate.
    dup = make_study(tmp_path / "d", [f"{k + 1}.dcm" for k in range(N)])
    write_slice(dup / "99.dcm", 3)
    header = scan_study(dup)
    assert header.n_slices == N and dict(header.skipped) == {"99.dcm": "duplicate position of 4.dcm"}
    assert header.warnings == ()


def test_uneven_spacing_is_warned(tmp_path):
    folder = make_study(tmp_path / "s", [f"{k + 1}.dcm" for k in range(N)])
    (folder / "5.dcm").unlink()  # a gap of two steps
    header = scan_study(folder)
    assert header.n_slices == N - 1 and header.spacing[0] == 1.25
    assert any("uneven slice spacing" in w for w in header.warnings)


def test_slice_of_another_size_is_rejected_not_resized(tmp_path):
    folder = make_study(tmp_path / "s", [f"{k + 1}.dcm" for k in range(3)])
    header = scan_study(folder)
    # The file changes after the scan (or its header lies): decoding must not silently resize it.
    write_slice(folder / "2.dcm", 1, rows=8, cols=8)
    np.testing.assert_array_equal(read_slices(header, [0, 2]), EXPECTED[[0, 2]])
    with pytest.raises(DicomReadError, match=r"2\.dcm: decoded slice is 8x8.*rejected, not resized"):
        read_slices(header, [1])


def test_competition_style_jpeg_lossless_study(tmp_path):
    # The competition stores some studies as .4.70 written by GDCM; the reader must give the same volume.
    raw = make_study(tmp_path / "raw", [f"{k + 1}.dcm" for k in range(4)])
    jpeg = tmp_path / "jpeg"
    jpeg.mkdir()
    for path in raw.iterdir():
        compress_jpeg_lossless(path, jpeg / path.name)
    header, volume = read_study(jpeg)
    assert set(header.transfer_syntaxes) == {"1.2.840.10008.1.2.4.70"}
    np.testing.assert_array_equal(volume, EXPECTED[:4])


# --------------------------------------------------------------------------------------------------------------
# Broken input
# --------------------------------------------------------------------------------------------------------------


def test_missing_and_empty_folders(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DicomReadError, match=f"^{missing}: no such study folder"):
        scan_study(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DicomReadError, match=f"^{empty}: empty study folder"):
        scan_study(empty)
    a_file = tmp_path / "f.dcm"
    a_file.write_bytes(b"x")
    with pytest.raises(DicomReadError, match=f"^{a_file}: not a folder"):
        scan_study(a_file)
    assert issubclass(DicomReadError, ValueError)


def test_folder_without_readable_slice(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    (folder / "b.dcm").write_bytes(b"DICM" * 10)
    with pytest.raises(DicomReadError, match=f"^{folder}: no readable DICOM slice among 2 file"):
        scan_study(folder)


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.70"])
def test_truncated_files_are_detected_from_headers(tmp_path, uid):
    data = ts_file(uid).read_bytes()
    for cut in (1, 1000):
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(data[:-cut])
        with pytest.raises(DicomReadError, match=f"^{path}: truncated"):
            read_slice_header(path)
    # Fragment walk of a multi-fragment .4.70 file.
    frag = (DATA / "odd" / "5001001.dcm").read_bytes()
    path = tmp_path / "frag.dcm"
    path.write_bytes(frag[:-20])
    with pytest.raises(DicomReadError, match="truncated"):
        read_slice_header(path)
    path.write_bytes(frag)
    assert read_slice_header(path).rows == 128


def test_truncated_slice_inside_a_study_is_skipped(tmp_path):
    folder = make_study(tmp_path / "s", [f"{k + 1}.dcm" for k in range(N)])
    data = (folder / "3.dcm").read_bytes()
    (folder / "3.dcm").write_bytes(data[:-100])
    header, volume = read_study(folder)
    assert header.n_slices == N - 1
    assert dict(header.skipped)["3.dcm"].startswith("truncated: Pixel Data declares 640 bytes")
    np.testing.assert_array_equal(volume, EXPECTED[[0, 1, 3, 4, 5, 6, 7]])
    # A study whose only slice is truncated fails, naming the folder and the reason.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "1.dcm").write_bytes(data[:-100])
    with pytest.raises(DicomReadError, match=f"^{lone}: no readable DICOM slice.*1.dcm: truncated"):
        scan_study(lone)


def test_unreadable_file_is_skipped_with_reason(tmp_path):
    folder = make_study(tmp_path / "s", [f"{k + 1}.dcm" for k in range(3)])
    (folder / "4.dcm").mkdir()  # not a file: ignored
    bad = folder / "5.dcm"
    bad.write_bytes(b"")
    header = scan_study(folder)
    assert header.n_slices == 3 and dict(header.skipped) == {"5.dcm": "not a DICOM file"}


def test_header_is_picklable_for_workers():
    import pickle

    header = scan_study(SERIES)
    again = pickle.loads(pickle.dumps(header))
    assert isinstance(again, StudyHeader) and again.files == header.files
    np.testing.assert_array_equal(again.z, header.z)


@pytest.mark.parametrize("bits_stored, signed", [(12, True), (16, True), (12, False)])
def test_jpeg_lossless_sv1_sign_and_bit_depth_match_native(tmp_path, bits_stored, signed):
    # Competition headers vary: PixelRepresentation 1 (values -2048..2347, intercept 0) or 0 with BitsStored 12
    # and intercept -1024. Every plugin must give the uncompressed file's HU, sign extension included.
    rng = np.random.default_rng(bits_stored)
    lo, hi = (-2048, 2047 if bits_stored == 12 else 2347) if signed else (0, 4095)
    stored = rng.integers(lo, hi + 1, (ROWS, COLS))
    stored[0, :2] = lo, hi
    native = write_ct_slice(tmp_path / "native.dcm", stored, bits_stored, signed, ExplicitVRLittleEndian)
    jpeg = compress_jpeg_lossless(native, tmp_path / "jpeg.dcm")
    expected = stored.astype(np.float32) + (0.0 if signed else -1024.0)
    np.testing.assert_array_equal(decode_slice(native), expected)
    for plugin in available_plugins("1.2.840.10008.1.2.4.70"):
        np.testing.assert_array_equal(decode_slice(jpeg, plugin=plugin), expected)


def _info(name: str, z: float | None, *, series: str = "s", size: int = 4, inst: int | None = None,
          orientation=(1.0, 0, 0, 0, 1.0, 0)):
    from cspine_submit.read.slice_header import SliceInfo

    return SliceInfo(path=Path(name), study_uid="u", series_uid=series,
                     position=None if z is None else np.array([0.0, 0.0, z]),
                     orientation=None if orientation is None else np.array(orientation, dtype=np.float64),
                     instance_number=inst, rows=size, cols=size, pixel_spacing=(1.0, 1.0),
                     transfer_syntax="1.2.840.10008.1.2")


def test_slice_order_steps_one_by_one():
    from cspine_submit.read import slice_order as so

    infos = [_info("1.dcm", 10.0), _info("2.dcm", 8.0), _info("3.dcm", 6.0, series="x"), _info("4.dcm", 4.0, size=8)]
    group, skipped = so.main_group(infos)
    assert [s.path.name for s in group] == ["1.dcm", "2.dcm"]
    assert [n for n, _ in skipped] == ["3.dcm", "4.dcm"] and "other series" in skipped[0][1]
    orientation, normal, warns = so.series_normal(group)
    np.testing.assert_array_equal(normal, [0, 0, 1])
    assert not warns
    tilted = _info("5.dcm", 2.0, orientation=(1.0, 0, 0, 0, 0.9, 0.4359))
    kept, off = so.drop_off_plane(group + [tilted], normal)
    assert [s.path.name for s in kept] == ["1.dcm", "2.dcm"] and off[0][0] == "5.dcm"
    same = [_info(f"{k}.dcm", 5.0, inst=k) for k in (3, 1, 2)]
    cleared, z, _, warns = so.z_from_positions(same, normal, -1.0)
    assert z is None and all(s.position is None for s in cleared) and "distinct position" in warns[0]
    z, by_name, warns = so.z_from_names(cleared, 2.5)
    np.testing.assert_array_equal(z, [5.0, 0.0, 2.5])
    assert not by_name and "InstanceNumber" in warns[0]
    kept_idx, dups = so.drop_duplicates(group + [_info("9.dcm", 8.0)], np.array([-10.0, -8.0, -8.0]))
    assert kept_idx == [0, 1] and dups == [("9.dcm", "duplicate position of 2.dcm")]
    dz, warns = so.slice_spacing(np.array([0.0, 1.0, 2.0, 4.0]), None)
    assert dz == 1.0 and "uneven slice spacing: 1 step" in warns[0]
    assert so.name_order_reversed(np.array([0.0, 1.0, 2.0]), [2, 1, 0])
    assert not so.name_order_reversed(np.array([0.0, 1.0, 2.0]), [0, 1, 2])
