"""The fast header scan (cspine_submit.read.dicom_header) against pydicom's reader: the same SliceInfo, field by field.

Every DICOM file in tests/data (real files as their producers wrote them, broken and odd ones included), the
session's real-neck and synthetic studies (as the project's writers write them), and files written here with pydicom
for the structures the walk must follow (sequences of defined and undefined length, nested, private) or leave to
pydicom (no preamble, big endian, truncated, an implicit item in an explicit sequence, another VR, an odd length).
Each case also checks which route read it, so that a comparison cannot pass by both sides being pydicom.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from cspine_submit.read import dicom_header, slice_header
from cspine_submit.read.dicom import scan_study
from cspine_submit.read.slice_header import DicomReadError, read_slice_header

DATA = Path(__file__).parent / "data"


def both_routes(path: Path):
    """``(fast result, pydicom result)``: a SliceInfo, or the DicomReadError's message."""
    out = []
    for fast in (True, False):
        try:
            out.append(read_slice_header(path, fast=fast))
        except DicomReadError as exc:
            out.append(f"DicomReadError: {exc}")
    return tuple(out)


def assert_same(a, b) -> None:
    """Equal SliceInfo in every field (arrays exactly), or the same error message. pydicom's route gives no
    PixelSpec (its files decode through pydicom): the fast route's is checked against pydicom's decode elsewhere."""
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
        return
    assert b.pixels is None
    for f in dataclasses.fields(a):
        if f.name == "pixels":
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert x is not None and y is not None and x.dtype == y.dtype, f.name
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        else:
            assert x == y and type(x) is type(y), (f.name, x, y)


def fast_route(path: Path) -> bool:
    """True when the fast scan reads ``path`` itself (False: it hands the file to pydicom)."""
    with open(path, "rb") as fp:
        try:
            dicom_header.scan_header(fp, os.fstat(fp.fileno()).st_size)
        except dicom_header.NotFast:
            return False
    return True


def dicom_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in (".txt", ".md", ".json", ".gz",
                                                                                   ".csv", ".nii"))


def test_every_test_data_file_reads_the_same_through_both_routes():
    files = dicom_files(DATA / "dicom")
    assert len(files) >= 38
    fast = set()
    for path in files:
        assert_same(*both_routes(path))
        if fast_route(path):
            fast.add(path.name)
    # what the fast scan leaves to pydicom here: big endian, deflated, two retired JPEG syntaxes
    assert sorted(set(p.name for p in files) - fast) == sorted(
        f"CTImage_{n}.dcm" for n in (
            "BigEndianExplicitTransferSyntax_1.2.840.10008.1.2.2",
            "DeflatedExplicitVRLittleEndianTransferSyntax_1.2.840.10008.1.2.1.99",
            "JPEGProcess10_12TransferSyntax_1.2.840.10008.1.2.4.55",
            "JPEGProcess6_8TransferSyntax_1.2.840.10008.1.2.4.53",
        ))


def test_real_neck_studies_read_the_same_through_both_routes(real_neck_dataset):
    root, records = real_neck_dataset
    syntaxes = set()
    for path in dicom_files(root / "images"):
        assert fast_route(path), path
        a, b = both_routes(path)
        assert_same(a, b)
        syntaxes.add((a.transfer_syntax, a.pixels.signed))
    # JPEG Lossless and uncompressed, signed and unsigned
    assert {s for s, _ in syntaxes} == {"1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.1"}
    assert {signed for _, signed in syntaxes} == {True, False}


def test_synthetic_studies_read_the_same_through_both_routes(synthetic_dataset):
    files = dicom_files(synthetic_dataset / "test_images") + dicom_files(synthetic_dataset / "train_images")[::7]
    assert files
    for path in files:
        assert fast_route(path), path
        assert_same(*both_routes(path))


def test_truncated_and_broken_copies_of_real_files_fail_alike(tmp_path):
    # Cut the real files everywhere that matters: in the preamble, the File Meta group, the dataset, Pixel Data.
    sources = [DATA / "dicom" / "transfer_syntaxes" / "CTImage_ref_implicitLE.dcm",
               DATA / "dicom" / "transfer_syntaxes" /
               "CTImage_JPEGProcess14SV1TransferSyntax_1.2.840.10008.1.2.4.70.dcm",
               DATA / "dicom" / "odd" / "5001001.dcm",
               sorted((DATA / "dicom" / "series_j2k_ct").glob("CT.*"))[0]]
    for src in sources:
        data = src.read_bytes()
        for cut in (100, 140, 200, 400, 700, 1500, len(data) - 1000, len(data) - 1):
            path = tmp_path / f"{src.stem}_{cut}"
            path.write_bytes(data[:cut])
            a, b = both_routes(path)
            assert isinstance(b, str)  # every cut breaks the file
            assert_same(a, b)


# ----------------------------------------------------------------------------------------------------------------
# Files written with pydicom: structures the walk follows, and those it leaves to pydicom
# ----------------------------------------------------------------------------------------------------------------

def slice_dataset(implicit: bool) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.5"
    ds.InstanceNumber = 7
    ds.ImagePositionPatient = [-100.5, -120.25, 50.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.25]
    ds.SliceThickness = 1.25
    ds.Rows, ds.Columns = 4, 6
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.arange(24, dtype=np.uint16).tobytes()
    return ds


def code_item(value: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", f"meaning {value}"
    return item


def with_sequences(ds: Dataset, undefined: bool, private: bool = False) -> Dataset:
    """Add sequences before Pixel Data: two items, one nesting another sequence; all of undefined length or not."""
    outer = code_item("A")
    outer.PurposeOfReferenceCodeSequence = Sequence([code_item("B"), code_item("C")])
    ds.ProcedureCodeSequence = Sequence([outer, code_item("D")])
    ds.AnatomicRegionSequence = Sequence([])  # empty
    elements = [ds["ProcedureCodeSequence"], outer["PurposeOfReferenceCodeSequence"], ds["AnatomicRegionSequence"]]
    if private:
        block = ds.private_block(0x0019, "CSPINE TEST", create=True)
        block.add_new(0x10, "SQ", Sequence([code_item("P")]))
        elements.append(block[0x10])
    for elem in elements:
        elem.is_undefined_length = undefined
        for item in elem.value:
            item.is_undefined_length_sequence_item = undefined
    return ds


def save(ds: Dataset, path: Path, implicit: bool) -> Path:
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    return path


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("undefined", [True, False])
@pytest.mark.parametrize("private", [True, False])
def test_sequences_before_pixel_data_are_walked(tmp_path, implicit, undefined, private):
    path = save(with_sequences(slice_dataset(implicit), undefined, private), tmp_path / "seq.dcm", implicit)
    raw = path.read_bytes()
    if undefined:
        assert raw.count(b"\xfe\xff\xdd\xe0") >= 3 and raw.count(b"\xfe\xff\x0d\xe0") >= 4  # delimiters written
    assert fast_route(path)
    a, b = both_routes(path)
    assert_same(a, b)
    assert a.instance_number == 7 and a.rows == 4 and a.pixel_spacing == (0.5, 0.25)
    np.testing.assert_array_equal(a.position, [-100.5, -120.25, 50.0])
    assert a.pixels.fragments == ((len(raw) - 48, 48),)


@pytest.mark.parametrize("implicit", [True, False])
def test_text_padding_empty_values_and_multi_values_read_alike(tmp_path, implicit):
    ds = slice_dataset(implicit)
    ds.add_new(0x00200032, "DS", None)
    ds[0x00200032].value = ["  -100.50", "-120.25 ", "+5E1"]
    ds.SliceThickness = None  # empty value
    ds.SpacingBetweenSlices = ""
    ds.InstanceNumber = None
    ds.PhotometricInterpretation = "MONOCHROME2 "
    ds.RescaleIntercept = "-1024.0"
    path = save(ds, tmp_path / "pad.dcm", implicit)
    assert fast_route(path)
    a, b = both_routes(path)
    assert_same(a, b)
    assert a.slice_thickness is None and a.instance_number is None
    np.testing.assert_array_equal(a.position, [-100.5, -120.25, 50.0])

    # Empty Rows: the same error from both routes.
    ds.Rows = None
    path = save(ds, tmp_path / "norows.dcm", implicit)
    assert fast_route(path)
    a, b = both_routes(path)
    assert_same(a, b)
    assert a == f"DicomReadError: {path}: no image (Rows/Columns missing)"


@pytest.mark.parametrize("implicit", [True, False])
def test_multi_frame_and_colour_files_fail_alike(tmp_path, implicit):
    ds = slice_dataset(implicit)
    ds.NumberOfFrames = "2"
    a, b = both_routes(save(ds, tmp_path / "frames.dcm", implicit))
    assert_same(a, b)
    assert "multi-frame file (2 frames)" in a
    ds = slice_dataset(implicit)
    ds.SamplesPerPixel = 3
    a, b = both_routes(save(ds, tmp_path / "rgb.dcm", implicit))
    assert_same(a, b)
    assert "not a grayscale slice (SamplesPerPixel=3)" in a


def test_unusual_files_go_to_pydicom_with_the_same_result(tmp_path):
    cases = {}
    # no preamble or File Meta group (some writers omit them)
    for implicit in (True, False):
        ds = slice_dataset(implicit)
        del ds.file_meta
        ds.preamble = None
        path = tmp_path / f"nopreamble_{implicit}.dcm"
        ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
        cases[path] = "read"
    # big endian (a real file)
    cases[DATA / "dicom" / "transfer_syntaxes" / "CTImage_BigEndianExplicitTransferSyntax_1.2.840.10008.1.2.2.dcm"] \
        = "read"
    # Rows stated as UL: another VR in an explicit file (pydicom reads it as UL); 4 bytes in an implicit one (pydicom
    # reads two US values, which the scan rejects)
    for implicit in (True, False):
        ds = slice_dataset(implicit)
        del ds.Rows
        ds.add_new(0x00280010, "UL", 4)
        cases[save(ds, tmp_path / f"rows_ul_{implicit}.dcm", implicit)] = "error" if implicit else "read"
    # InstanceNumber stated as LO in an explicit file
    ds = slice_dataset(False)
    del ds.InstanceNumber
    ds.add_new(0x00200013, "LO", "12")
    cases[save(ds, tmp_path / "instance_lo.dcm", False)] = "read"
    # an undefined-length UN element holding a sequence, in an explicit file
    ds = with_sequences(slice_dataset(False), undefined=True)
    path = save(ds, tmp_path / "un.dcm", False)
    raw = path.read_bytes()
    tag = b"\x08\x00\x32\x10SQ"  # ProcedureCodeSequence (0008,1032)
    assert raw.count(tag) == 1
    path.write_bytes(raw.replace(tag, b"\x08\x00\x32\x10UN"))
    cases[path] = "read"
    # no Pixel Data at all
    ds = slice_dataset(True)
    del ds.PixelData
    cases[save(ds, tmp_path / "nopixels.dcm", True)] = "error"
    # not DICOM
    path = tmp_path / "text.dcm"
    path.write_text("not a DICOM file\n" * 20)
    cases[path] = "error"
    for path, outcome in cases.items():
        assert not fast_route(path), path
        a, b = both_routes(path)
        assert_same(a, b)
        assert isinstance(a, str) == (outcome == "error"), (path, a)


def test_switch_forces_pydicom(tmp_path, monkeypatch):
    path = save(slice_dataset(False), tmp_path / "a.dcm", False)
    calls = []
    real_scan = dicom_header.scan_header

    def counted(*args, **kwargs):
        calls.append(1)
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(dicom_header, "scan_header", counted)
    read_slice_header(path, fast=False)
    monkeypatch.setenv(dicom_header.DISABLE_ENV, "1")
    scan_study(tmp_path)
    assert calls == []
    monkeypatch.setenv(dicom_header.DISABLE_ENV, "0")
    read_slice_header(path)
    assert calls == [1]


def test_whole_study_scan_is_identical(real_neck_dataset, monkeypatch):
    root, records = real_neck_dataset
    pydicom_reads = []
    real_read = slice_header._read_slice_header_pydicom
    monkeypatch.setattr(slice_header, "_read_slice_header_pydicom", lambda path: pydicom_reads.append(path) or
                        real_read(path))
    for rec in records[:3]:
        folder = root / "images" / rec["uid"]
        fast = scan_study(folder)
        assert pydicom_reads == []  # no file of a competition-style study falls back, silently or not
        monkeypatch.setenv(dicom_header.DISABLE_ENV, "1")
        slow = scan_study(folder)
        monkeypatch.delenv(dicom_header.DISABLE_ENV)
        assert len(pydicom_reads) == len(list(folder.iterdir()))
        pydicom_reads.clear()
        assert all(p is not None for p in fast.pixels) and all(p is None for p in slow.pixels)
        for f in dataclasses.fields(fast):
            if f.name == "pixels":
                continue  # pydicom's route leaves pixels to pydicom (see assert_same)
            x, y = getattr(fast, f.name), getattr(slow, f.name)
            if isinstance(x, np.ndarray):
                np.testing.assert_array_equal(x, y)
            else:
                assert x == y, f.name


def test_pydicom_reads_the_sequence_files_as_the_walk_assumes(tmp_path):
    # The sequence files above hold what the walk skipped: pydicom's full read finds the items.
    path = save(with_sequences(slice_dataset(True), True, True), tmp_path / "s.dcm", True)
    ds = pydicom.dcmread(path)
    assert [i.CodeValue for i in ds.ProcedureCodeSequence] == ["A", "D"]
    assert [i.CodeValue for i in ds.ProcedureCodeSequence[0].PurposeOfReferenceCodeSequence] == ["B", "C"]
    assert slice_header._header_value(ds, "Rows") == 4
