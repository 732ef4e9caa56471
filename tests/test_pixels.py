"""Direct decoding from the header scan (cspine_submit.read.pixels): exactly pydicom's values, pydicom as the fallback.

Every DICOM file in tests/data is decoded both ways: each direct decoder installed here against pydicom's plugins.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cspine_submit.datasets.jpeg_lossless import compress_jpeg_lossless
from cspine_submit.read import dicom, pixels

from _pipeline_helpers import write_ct_slice

DATA = Path(__file__).parent / "data"
JPEG_SV1 = "1.2.840.10008.1.2.4.70"


def _dicom_files() -> list[Path]:
    files = []
    for path in sorted(DATA.rglob("*")):
        if path.is_file() and path.suffix not in (".txt", ".gz", ".nii", ".json", ".csv", ".md", ".npz", ".npy"):
            try:
                dicom.read_slice_header(path)
            except dicom.DicomReadError:
                continue
            files.append(path)
    return files


FILES = _dicom_files()


def _routes(tsyntax: str, spec) -> list[str]:
    route = pixels.direct_route(tsyntax, spec)
    if route is None:
        return []
    return ["native"] if route == "native" else list(pixels.available_jpeg_decoders())


def test_every_test_file_decodes_directly_to_pydicoms_values_or_goes_to_pydicom():
    direct, via_pydicom = set(), set()
    for path in FILES:
        info = dicom.read_slice_header(path)
        routes = _routes(info.transfer_syntax, info.pixels)
        if not routes:
            with pytest.raises(pixels.NotDirect):
                pixels.read_stored(path, info.transfer_syntax, info.pixels)
            via_pydicom.add(info.transfer_syntax)
            continue
        try:
            expected = dicom.decode_slice(path, info.transfer_syntax, direct=False)
        except dicom.DicomReadError:
            continue  # (no pydicom plugin here for it: nothing to compare with)
        for route in routes:
            stored = pixels.read_stored(path, info.transfer_syntax, info.pixels,
                                        decoder=None if route == "native" else route)
            assert stored.dtype == info.pixels.dtype and stored.flags.writeable
            hu = dicom.to_hu(stored, info.pixels.slope, info.pixels.intercept)
            np.testing.assert_array_equal(hu, expected, err_msg=f"{path.name} via {route}")
        np.testing.assert_array_equal(dicom.decode_slice(path), expected)  # the default path, header read again
        direct.add((info.transfer_syntax, path.name))
    syntaxes = {ts for ts, _ in direct}
    # The competition's two forms, the fragmented .4.70 file and the 12-bit signed native file all went direct ...
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", JPEG_SV1, "1.2.840.10008.1.2.4.57"} <= syntaxes
    assert {"5001001.dcm", "12bitSigned_0x0F0F.dcm"} <= {name for _, name in direct}
    # ... and every other syntax went to pydicom.
    assert {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.80"} <= via_pydicom


def test_scan_records_where_the_pixel_bytes_are():
    path = DATA / "dicom" / "transfer_syntaxes" / "CTImage_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm"
    spec = dicom.read_slice_header(path).pixels
    ((offset, length),) = spec.fragments
    assert not spec.encapsulated and length == len(pydicom.dcmread(path).PixelData)
    assert path.read_bytes()[offset:offset + length] == pydicom.dcmread(path).PixelData
    # Encapsulated: the frame's fragments, Basic Offset Table left out (5001001.dcm splits its frame over several).
    frag_path = DATA / "dicom" / "odd" / "5001001.dcm"
    spec = dicom.read_slice_header(frag_path).pixels
    raw = frag_path.read_bytes()
    frame = b"".join(raw[o:o + n] for o, n in spec.fragments)
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(frag_path)
    (expected,) = list(generate_frames(ds.PixelData, number_of_frames=1))
    assert spec.encapsulated and len(spec.fragments) > 1 and frame == expected


def test_read_slices_takes_the_direct_route_and_needs_no_second_header_read(monkeypatch):
    header = dicom.scan_study(DATA / "dicom" / "series_j2k_ct")  # JPEG 2000: pydicom's route, unchanged
    assert all(p is not None for p in header.pixels) and len(header.pixels) == header.n_slices
    folder = DATA / "dicom" / "transfer_syntaxes"
    path = folder / "CTImage_JPEGProcess14SV1TransferSyntax_1.2.840.10008.1.2.4.70.dcm"
    info = dicom.read_slice_header(path)
    calls = []
    monkeypatch.setattr(dicom, "read_slice_header", lambda p: calls.append(p))
    monkeypatch.setattr(pydicom.pixels, "pixel_array", lambda *a, **k: calls.append(a))
    hu = dicom.decode_slice(path, info.transfer_syntax, spec=info.pixels)
    assert calls == [] and hu.shape == (512, 512)


def test_a_failing_direct_decoder_falls_back_to_pydicom(monkeypatch):
    path = DATA / "dicom" / "transfer_syntaxes" / "CTImage_JPEGProcess14SV1TransferSyntax_1.2.840.10008.1.2.4.70.dcm"
    info = dicom.read_slice_header(path)
    expected = dicom.decode_slice(path, info.transfer_syntax, direct=False)

    def broken(*args, **kwargs):
        raise RuntimeError("decoder crashed on this frame")

    for name in ("_stored_dicomsdl", "_frame_gdcm", "_frame_libjpeg"):
        monkeypatch.setattr(pixels, name, broken)
    with pytest.raises(pixels.NotDirect, match="failed"):
        pixels.read_stored(path, info.transfer_syntax, info.pixels)
    np.testing.assert_array_equal(dicom.decode_slice(path, info.transfer_syntax, spec=info.pixels), expected)


def test_direct_route_only_for_what_it_reads_exactly():
    spec = pixels.PixelSpec(fragments=((100, 8),), encapsulated=False, rows=2, cols=2, bits_allocated=16,
                            bits_stored=12, signed=True)
    assert pixels.direct_route("1.2.840.10008.1.2.1", spec) == "native"
    assert pixels.direct_route("1.2.840.10008.1.2.2", spec) is None  # big endian
    assert pixels.direct_route("1.2.840.10008.1.2.1", None) is None
    assert pixels.direct_route("1.2.840.10008.1.2.1", pixels.PixelSpec(((0, 12),), False, 2, 2, 16, 16, True,
                                                                        samples=3)) is None
    assert pixels.direct_route("1.2.840.10008.1.2.4.90", pixels.PixelSpec(((0, 8),), True, 2, 2, 16, 16, True)) is None


def test_unused_bits_correction_is_pydicoms():
    # 12 bits stored in 16: bit 11 is the sign of a signed value, the four high bits are ignored.
    signed = np.array([0x0800, 0x07FF, 0xF0F0, 0x0FFF], dtype=np.uint16).view(np.int16).copy()
    np.testing.assert_array_equal(pixels.correct_unused_bits(signed, 16, 12), [-2048, 2047, 240, -1])
    unsigned = np.array([0xF800, 0x0FFF], dtype=np.uint16)
    np.testing.assert_array_equal(pixels.correct_unused_bits(unsigned, 16, 12), [0x0800, 0x0FFF])


def _write(tmp_path: Path, stored: np.ndarray, bits_stored: int, signed: bool, syntax) -> Path:
    return write_ct_slice(tmp_path / f"native_{bits_stored}_{int(signed)}_{syntax}.dcm", stored, bits_stored, signed,
                          syntax)


@pytest.mark.parametrize("bits_stored, signed", [(12, True), (16, True), (12, False), (16, False)])
def test_competition_forms_signed_and_unsigned_every_decoder(tmp_path, bits_stored, signed):
    # The competition's headers: PixelRepresentation 1 with intercept 0, or 0 with BitsStored 12 and intercept -1024;
    # uncompressed (implicit and explicit VR) and JPEG Lossless SV1 as GDCM writes it.
    rng = np.random.default_rng(bits_stored + 2 * signed)
    lo, hi = (-2048, 2047 if bits_stored == 12 else 3071) if signed else (0, 4095)
    stored = rng.integers(lo, hi + 1, (64, 48))
    stored[0, :2] = lo, hi
    expected = stored.astype(np.float32) + (0.0 if signed else -1024.0)
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        native = _write(tmp_path, stored, bits_stored, signed, syntax)
        info = dicom.read_slice_header(native)
        assert pixels.direct_route(info.transfer_syntax, info.pixels) == "native"
        np.testing.assert_array_equal(dicom.decode_slice(native), expected)
    jpeg = compress_jpeg_lossless(native, tmp_path / "jpeg.dcm")
    info = dicom.read_slice_header(jpeg)
    assert info.transfer_syntax == JPEG_SV1
    decoders = pixels.available_jpeg_decoders()
    assert decoders, "no direct JPEG Lossless decoder (GDCM is a dependency)"
    for decoder in decoders:
        stored_out = pixels.read_stored(jpeg, info.transfer_syntax, info.pixels, decoder=decoder)
        np.testing.assert_array_equal(dicom.to_hu(stored_out, info.pixels.slope, info.pixels.intercept), expected,
                                      err_msg=decoder)
    np.testing.assert_array_equal(dicom.decode_slice(jpeg, direct=False), expected)


def test_start_up_check_turns_a_wrong_direct_decoder_off(monkeypatch, tmp_path):
    from cspine_submit.read import preflight

    monkeypatch.setenv(pixels.DISABLE_ENV, "0")  # direct route on; restored after the test
    check = preflight.check_selftest()
    assert check.ok and "(direct)" in check.notes[0] and pixels.direct_enabled()
    # A direct decoder that is off by one: the self-test notices, turns the route off, pydicom decodes right.
    real = pixels._stored_dicomsdl if pixels.direct_route(JPEG_SV1, dicom.read_slice_header(
        preflight.SELFTEST_FILE).pixels) == "dicomsdl" else None
    for name in ("_frame_gdcm", "_frame_libjpeg"):
        orig = getattr(pixels, name)
        monkeypatch.setattr(pixels, name, lambda *a, _orig=orig, **k: bytes(
            (np.frombuffer(_orig(*a, **k), np.int16) + 1).astype(np.int16).tobytes()))
    if real is not None:
        monkeypatch.setattr(pixels, "_stored_dicomsdl", lambda *a, **k: real(*a, **k) + 1)
    check = preflight.check_selftest()
    assert check.ok and "direct decoding is OFF" in check.notes[0] and not pixels.direct_enabled()
    assert pixels.direct_route(JPEG_SV1, dicom.read_slice_header(preflight.SELFTEST_FILE).pixels) is None


def test_first_study_check_accepts_the_direct_route_alone(monkeypatch, tmp_path):
    # Without any pydicom JPEG plugin, a .4.70 study still decodes through a direct decoder: not a problem of the run.
    from cspine_submit.read import preflight

    monkeypatch.setenv(pixels.DISABLE_ENV, "0")
    study = tmp_path / "study"
    study.mkdir()
    stored = np.random.default_rng(0).integers(-1000, 2000, (32, 32))
    native = _write(tmp_path, stored, 16, True, ExplicitVRLittleEndian)
    compress_jpeg_lossless(native, study / "1.dcm")
    monkeypatch.setattr(dicom, "available_plugins", lambda ts: ())
    check = preflight.check_study_syntaxes(study)
    assert check.ok and "(direct)" in check.notes[0], check.notes


def _one_slice_study(tmp_path: Path, path: Path) -> dicom.StudyHeader:
    folder = tmp_path / f"study_{len(list(tmp_path.glob('study_*')))}"
    folder.mkdir()
    (folder / path.name).symlink_to(path.resolve())
    return dicom.scan_study(folder)


def test_int16_hu_stacks_hold_exactly_the_float_hu_of_every_test_file(tmp_path):
    # A study whose headers promise whole HU inside int16 decodes straight into an int16 stack; the values must be
    # pydicom's HU, whatever the route (native, a JPEG decoder, or pydicom's plugins as the fallback).
    as_int16 = set()
    for path in FILES:
        header = _one_slice_study(tmp_path, path)
        try:
            expected = dicom.decode_slice(path, header.transfer_syntaxes[0], direct=False)
        except dicom.DicomReadError:
            continue
        if dicom.hu_dtype(header) != np.int16:
            continue  # (which headers qualify: the next test)
        for direct in (True, False):
            out = np.full((header.rows, header.cols), 12345, dtype=np.int16)
            dicom.decode_into(header, 0, out, direct=direct)
            np.testing.assert_array_equal(out, expected, err_msg=f"{path.name} direct={direct}")
        strided = np.zeros((header.cols, header.rows), dtype=np.int16).T  # not C-contiguous: decoded via scratch
        np.testing.assert_array_equal(dicom.decode_into(header, 0, strided), expected)
        np.testing.assert_array_equal(dicom.read_slices(header, dtype=np.int16)[0], expected)
        as_int16.add(path.name)
    assert {"5001001.dcm", "12bitSigned_0x0F0F.dcm"} <= as_int16


@pytest.mark.parametrize("bits_stored, signed, slope, intercept, expected", [
    (12, False, 1, -1024, np.int16),  # the competition's unsigned form: HU -1024 .. 3071
    (16, True, 1, 0, np.int16),  # its signed form
    (12, True, 1, -1024, np.int16),  # -3072 .. 1023
    (16, False, 1, -1024, np.float32),  # up to 64511 HU: beyond int16
    (16, True, 1, -1024, np.float32),  # down to -33792 HU
    (12, False, 0.5, -1024, np.float32),  # half HU
    (12, False, 1, -1024.5, np.float32),
])
def test_hu_dtype_is_int16_only_when_every_hu_is_whole_and_inside_int16(tmp_path, bits_stored, signed, slope,
                                                                         intercept, expected):
    stored = np.arange(64 * 48).reshape(64, 48) % (2 ** (bits_stored - 1))
    path = _write(tmp_path, stored, bits_stored, signed, ExplicitVRLittleEndian)
    ds = pydicom.dcmread(path)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.save_as(path)
    header = _one_slice_study(tmp_path, path)
    assert dicom.hu_dtype(header) == expected
    hu = np.empty((64, 48), dtype=dicom.hu_dtype(header))
    dicom.decode_into(header, 0, hu)
    np.testing.assert_array_equal(hu, stored * np.float64(slope) + intercept)


def test_a_study_with_one_slice_pydicom_must_decode_stays_float32(tmp_path):
    header = _one_slice_study(tmp_path, _write(tmp_path, np.zeros((8, 8)), 12, False, ExplicitVRLittleEndian))
    assert dicom.hu_dtype(header) == np.int16
    via_pydicom = dataclasses.replace(header, pixels=(None,))
    assert dicom.hu_dtype(via_pydicom) == np.float32
    with pytest.raises(ValueError, match="int16 cannot hold"):
        dicom.read_slices(via_pydicom, dtype=np.int16)
