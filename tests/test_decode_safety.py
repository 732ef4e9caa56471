"""Never silently wrong on a broken file (issue 18): crafted slices through every read route, each in a subprocess.

A JPEG frame larger, smaller or transposed against Rows/Columns, a truncated codestream, an 8-bit codestream under
a 16-bit header, and the header cases pydicom refuses or reads otherwise than a lenient parser would: on every
route the slice gives pydicom's values exactly (every element written over a sentinel: no stale or partial
values) or an error; never a crash (the checks run in a subprocess: a crash is a non-zero exit, a test failure).
The JPEG frames are encoded here by GDCM (the only Python encoder of JPEG Lossless).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cspine_submit.read import dicom
from cspine_submit.read.slice_header import DicomReadError, read_slice_header

import _decode_routes

HERE = Path(__file__).parent
JPEG_SV1 = "1.2.840.10008.1.2.4.70"


def run_routes(paths: list[Path]) -> list[dict]:
    """:mod:`_decode_routes` on ``paths`` in a fresh interpreter; a crash there fails the test here."""
    proc = subprocess.run([sys.executable, str(HERE / "_decode_routes.py"), *map(str, paths)], capture_output=True,
                          text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, f"the route check died (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines()]


def encode(pixels: np.ndarray, bits_allocated: int, bits_stored: int) -> bytes:
    """A JPEG Lossless SV1 frame of ``pixels`` by GDCM, with the precision GDCM gives (16 for 16-bit pixels)."""
    gdcm = pytest.importorskip("gdcm")
    if bits_allocated == 16:
        from cspine_submit.datasets.dicom_writer import encode_jpeg_lossless

        return encode_jpeg_lossless(pixels, bits_stored)
    rows, cols = pixels.shape
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimension(0, cols)
    image.SetDimension(1, rows)
    image.SetPixelFormat(gdcm.PixelFormat(1, 8, 8, 7, 0))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.MONOCHROME2))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ExplicitVRLittleEndian))
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetByteStringValue(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    image.SetDataElement(element)
    image.thisown = False  # the filter's SmartPointer owns it (see dicom_writer.encode_jpeg_lossless)
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(image)
    assert change.Change()
    value = change.GetOutput().GetDataElement().GetSequenceOfFragments().GetFragment(0).GetByteValue()
    return value.GetBuffer().encode("utf-8", "surrogateescape")[:int(str(value.GetLength()))]


def write_slice(path: Path, rows: int, cols: int, *, frame: bytes | None = None, stored: np.ndarray | None = None,
                bits_stored: int = 16, signed: bool = True, bits_allocated: int = 16) -> Path:
    """One CT slice with a competition header: ``frame`` encapsulated as .4.70, else ``stored`` uncompressed."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEG_SV1 if frame is not None else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [-10.5, -20.25, 9.87654]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.RescaleSlope, ds.RescaleIntercept = "1.0", "-1024.0"
    if frame is not None:
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = stored.astype(f"<{'i' if signed else 'u'}{bits_allocated // 8}").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def patch(path: Path, old: bytes, new: bytes, resize: bool = False) -> Path:
    """Replace the one occurrence of ``old`` in the file (header bytes pydicom would not write as they are); of the
    same length unless ``resize``."""
    data = path.read_bytes()
    assert data.count(old) == 1 and (resize or len(old) == len(new)), (path, old)
    path.write_bytes(data.replace(old, new))
    return path


RNG = np.random.default_rng(18)
IMAGE = RNG.integers(-1000, 1500, (64, 64)).astype(np.int16)


def frame_cases(tmp: Path) -> dict[str, Path]:
    full, half = encode(IMAGE, 16, 16), encode(IMAGE[:32], 16, 16)
    cut = full[: len(full) // 2 & ~1]
    u12 = (IMAGE.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16)
    byte = (IMAGE.astype(np.int32) % 256).astype(np.uint8)
    frame8 = encode(byte, 8, 8)
    return {
        "frame wider than Columns": write_slice(tmp / "wide.dcm", 64, 32, frame=full),
        "frame taller than Rows": write_slice(tmp / "tall.dcm", 32, 64, frame=full),
        "frame smaller than the header": write_slice(tmp / "small.dcm", 64, 64, frame=half),
        "frame transposed": write_slice(tmp / "transposed.dcm", 64, 32, frame=half),
        "codestream truncated, no EOI": write_slice(tmp / "cut.dcm", 64, 64, frame=cut),
        "codestream truncated, EOI kept": write_slice(tmp / "cut_eoi.dcm", 64, 64, frame=cut + b"\xff\xd9"),
        "8-bit codestream, BitsAllocated 16": write_slice(tmp / "p8_16.dcm", 64, 64, frame=frame8, bits_stored=16,
                                                          signed=False),
        "8-bit codestream, BitsStored 8 of 16": write_slice(tmp / "p8_8.dcm", 64, 64, frame=frame8, bits_stored=8,
                                                            signed=False),
        "12-bit unsigned, the good case": write_slice(tmp / "u12.dcm", 64, 64, frame=encode(u12, 16, 12),
                                                      bits_stored=12, signed=False),
        "16-bit signed, the good case": write_slice(tmp / "s16.dcm", 64, 64, frame=full),
    }


def test_crafted_frames_decode_as_pydicom_or_are_refused(tmp_path):
    cases = frame_cases(tmp_path)
    results = dict(zip(cases, run_routes(list(cases.values()))))
    for name, result in results.items():
        assert _decode_routes.bad(result) == [], (name, result)
        assert result["routes"], (name, result)  # the reader ran
    # The good cases decode directly; the broken frames never do (a direct decoder that did would have to match).
    for name in ("12-bit unsigned, the good case", "16-bit signed, the good case"):
        assert set(results[name]["routes"].values()) == {"same"}, results[name]
    for name in ("frame wider than Columns", "frame taller than Rows", "frame smaller than the header",
                 "frame transposed"):
        routes = results[name]["routes"]
        assert all(routes[d] == "refused" for d in routes if not d.startswith("reader")), (name, routes)
    # pydicom fits a transposed frame's samples into Rows x Columns (the same count): those values stand.
    for name in ("frame wider than Columns", "frame taller than Rows", "frame smaller than the header"):
        assert results[name]["ref"] == "error" and results[name]["routes"]["reader"] == "refused", results[name]


def test_truncated_frame_leaves_nothing_stale_in_a_reused_stack(tmp_path):
    """A refused direct decode followed by pydicom: the study stack's row holds pydicom's values, not the last
    slice's (dicomsdl filled part of the buffer and reported success)."""
    good = write_slice(tmp_path / "1.dcm", 64, 64, frame=encode(IMAGE, 16, 16))
    cut = encode(np.flipud(IMAGE), 16, 16)
    bad = write_slice(tmp_path / "2.dcm", 64, 64, frame=cut[: len(cut) // 2 & ~1] + b"\xff\xd9")
    infos = [read_slice_header(p) for p in (good, bad)]
    header = dicom.StudyHeader(folder=tmp_path, study_uid="", files=(good, bad), z=np.arange(2.0),
                               spacing=(1.0, 0.5, 0.5), rows=64, cols=64, transfer_syntaxes=(JPEG_SV1,) * 2,
                               pixels=tuple(i.pixels for i in infos))
    stack = np.empty((1, 64, 64), dtype=dicom.hu_dtype(header))
    dicom.decode_into(header, 0, stack[0])
    try:
        dicom.decode_into(header, 1, stack[0])
    except DicomReadError:
        return  # refused: fine
    np.testing.assert_array_equal(stack[0], dicom.decode_slice(bad, JPEG_SV1, direct=False))


def header_cases(tmp: Path) -> dict[str, Path]:
    stored = RNG.integers(0, 3000, (16, 16))

    def native(name: str, **kw) -> Path:
        return write_slice(tmp / f"{name}.dcm", 16, 16, stored=stored, signed=False, bits_stored=12, **kw)

    def without(name: str, keyword: str) -> Path:
        path = native(name)
        ds = pydicom.dcmread(path)
        del ds[keyword]
        ds.save_as(path)
        return path

    return {
        "BitsStored missing": without("no_bits_stored", "BitsStored"),
        "BitsStored 0": patch(native("bits_stored_0"), b"\x28\x00\x01\x01US\x02\x00\x0c\x00",
                              b"\x28\x00\x01\x01US\x02\x00\x00\x00"),
        "PhotometricInterpretation missing": without("no_pi", "PhotometricInterpretation"),
        "PhotometricInterpretation unknown": patch(native("pi_unknown"), b"MONOCHROME2 ", b"MONOCHROME9 "),
        "PixelRepresentation 2": patch(native("pixrep_2"), b"\x28\x00\x03\x01US\x02\x00\x00\x00",
                                       b"\x28\x00\x03\x01US\x02\x00\x02\x00"),
        "SamplesPerPixel missing": without("no_samples", "SamplesPerPixel"),
        "RescaleSlope unparsable": patch(native("slope_abc"), b"1.0 ", b"abc "),
        "RescaleIntercept unparsable": patch(native("intercept_x"), b"-1024.0 ", b"-10x4.0 "),
        "RescaleSlope infinite": patch(native("slope_inf"), b"1.0 ", b"inf "),
        "RescaleIntercept NaN": patch(native("intercept_nan"), b"-1024.0 ", b"nan     "),
        "BitsAllocated 12": patch(native("bits_alloc_12"), b"\x28\x00\x00\x01US\x02\x00\x10\x00",
                                  b"\x28\x00\x00\x01US\x02\x00\x0c\x00"),
        "ImagePositionPatient single-valued": patch(native("ipp_single"), b"-10.5\\-20.25\\9.87654",
                                                    b"123" + b" " * 17),
        "ImagePositionPatient leading NUL": patch(native("ipp_nul"), b"-10.5\\", b"\x00-10.5"),
        "PixelSpacing single-valued": patch(native("spacing_12"), b"0.5\\0.5 ", b"12      "),
        "InstanceNumber 7.0": patch(native("inst_7_0"), b"\x20\x00\x13\x00IS\x02\x001 ",
                                    b"\x20\x00\x13\x00IS\x04\x007.0 ", resize=True),
        "InstanceNumber 1e2": patch(native("inst_1e2"), b"\x20\x00\x13\x00IS\x02\x001 ",
                                    b"\x20\x00\x13\x00IS\x04\x001e2 ", resize=True),
        "unknown VR on a wanted tag": patch(native("unknown_vr"), b"\x28\x00\x53\x10DS", b"\x28\x00\x53\x10QQ"),
        "Rows of 3 bytes": patch(native("rows_3"), b"\x28\x00\x10\x00US\x02\x00\x10\x00",
                                 b"\x28\x00\x10\x00US\x03\x00\x10\x00\x00", resize=True),
        "File Meta group length of 2 bytes": _short_group_length(native("meta_len_2")),
    }


def _short_group_length(path: Path) -> Path:
    data = path.read_bytes()
    at = data.index(b"\x02\x00\x00\x00UL\x04\x00", 132)
    value = int.from_bytes(data[at + 8:at + 12], "little")
    path.write_bytes(data[:at] + b"\x02\x00\x00\x00UL\x02\x00" + value.to_bytes(4, "little")[:2] + data[at + 12:])
    return path


def test_header_cases_give_pydicoms_value_or_a_read_error(tmp_path):
    cases = header_cases(tmp_path)
    results = dict(zip(cases, run_routes(list(cases.values()))))
    for name, result in results.items():
        assert _decode_routes.bad(result) == [], (name, result)
    refused_by_pydicom = ["BitsStored missing", "BitsStored 0", "PhotometricInterpretation missing",
                          "PhotometricInterpretation unknown", "PixelRepresentation 2", "SamplesPerPixel missing",
                          "RescaleSlope unparsable", "RescaleIntercept unparsable", "RescaleSlope infinite",
                          "RescaleIntercept NaN", "BitsAllocated 12"]
    for name in refused_by_pydicom:  # the header reads; no route decodes it
        assert results[name]["ref"] == "error" and set(results[name]["routes"].values()) <= {"refused"}, \
            (name, results[name])
    for name in ("ImagePositionPatient leading NUL", "unknown VR on a wanted tag", "Rows of 3 bytes",
                 "File Meta group length of 2 bytes"):
        assert results[name]["header"] == "both refuse", (name, results[name])
        with pytest.raises(DicomReadError, match=str(cases[name].name)):
            read_slice_header(cases[name])


def test_header_values_are_pydicoms(tmp_path):
    cases = header_cases(tmp_path)
    assert read_slice_header(cases["ImagePositionPatient single-valued"]).position is None  # pydicom: one 123.0
    assert pydicom.dcmread(cases["ImagePositionPatient single-valued"]).ImagePositionPatient == 123.0
    assert read_slice_header(cases["PixelSpacing single-valued"]).pixel_spacing is None  # not (1.0, 2.0)
    assert read_slice_header(cases["InstanceNumber 7.0"]).instance_number == 7
    assert pydicom.dcmread(cases["InstanceNumber 7.0"]).InstanceNumber == 7
    for fast in (True, False):
        assert read_slice_header(cases["InstanceNumber 7.0"], fast=fast).instance_number == 7
        assert read_slice_header(cases["InstanceNumber 1e2"], fast=fast).instance_number == 100


def test_a_bad_slice_costs_that_slice_and_is_listed(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    for k in range(4):
        path = write_slice(study / f"{k + 1}.dcm", 16, 16, stored=RNG.integers(0, 3000, (16, 16)), signed=False,
                           bits_stored=12)
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [0.0, 0.0, -2.0 * k]
        ds.save_as(path)
    patch(study / "3.dcm", b"\x28\x00\x10\x00US\x02\x00\x10\x00", b"\x28\x00\x10\x00US\x03\x00\x10\x00\x00",
          resize=True)
    header = dicom.scan_study(study)
    assert [p.name for p in header.files] == ["1.dcm", "2.dcm", "4.dcm"]
    (name, reason), = header.skipped
    assert name == "3.dcm" and "Rows" in reason


@pytest.mark.parametrize("workers", [0, 2])
def test_runs_over_studies_with_broken_slices_finish_and_name_them(tmp_path, workers):
    """A study with one unreadable header and one with a frame larger than its header: a complete submission, and
    a report that names both files (the header one skipped, the study scored; the pixel one as the reason)."""
    import json

    from cspine_submit import submit as stage
    from cspine_submit.config import PREDICTION_TYPES
    from cspine_submit.submit.submission import companion_paths

    from _pipeline_helpers import UID_ROOT, write_study, write_weights

    images = tmp_path / "test_images"
    uids = [f"{UID_ROOT}.81", f"{UID_ROOT}.82", f"{UID_ROOT}.83"]
    for i, uid in enumerate(uids):
        write_study(images / uid, uid, seed=i)
    patch(images / uids[1] / "7.dcm", b"\x28\x00\x10\x00US\x02\x00\x30\x00", b"\x28\x00\x10\x00US\x03\x00\x30\x00\x00",
          resize=True)  # a 3-byte Rows: pydicom cannot convert it
    ds = pydicom.dcmread(images / uids[2] / "9.dcm")
    ds.file_meta.TransferSyntaxUID = JPEG_SV1
    ds.PixelData = encapsulate([encode(np.zeros((48, 96), np.int16), 16, 16)])  # a 48 x 96 frame under 48 x 48
    ds["PixelData"].VR = "OB"
    ds.save_as(images / uids[2] / "9.dcm", enforce_file_format=True)
    lines = ["row_id,StudyInstanceUID,prediction_type"] + [f"{u}_{t},{u},{t}" for u in uids for t in PREDICTION_TYPES]
    (tmp_path / "test.csv").write_text("\n".join(lines) + "\n")
    setup = stage.prepare_run(images, tmp_path / "test.csv", write_weights(tmp_path / "weights"))
    out = tmp_path / "submission.csv"
    stage.run_submission(setup, out, workers=workers, progress=False)
    rows = out.read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [f"{u}_{t}" for u in uids for t in PREDICTION_TYPES]
    studies = json.loads(companion_paths(out)[1].read_text())["studies"]
    assert studies[uids[0]]["status"] == "ok"
    assert studies[uids[1]]["status"] == "ok" and any("7.dcm" in w and "Rows" in w
                                                       for w in studies[uids[1]]["warnings"]), studies[uids[1]]
    assert studies[uids[1]]["files_skipped"] == 1
    totals = json.loads(companion_paths(out)[1].read_text())["totals"]
    assert totals["files_skipped"] == 1 and uids[1] in totals["studies_with_bad_files"], totals
    said = json.dumps(studies[uids[2]])
    assert "9.dcm" in said, studies[uids[2]]  # decoded by pydicom (refused there too) or reported: named either way
