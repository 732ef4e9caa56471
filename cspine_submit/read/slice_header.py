"""One slice file's header: the values ordering and decoding need, read by the fast walk or by pydicom.

:func:`read_slice_header` reads a file's header (never its pixel data) through
:func:`cspine_submit.read.dicom_header.scan_header` when it can and through ``pydicom.dcmread`` otherwise, with the
same result on both routes, checks that the Pixel Data element is complete (declared length or fragment items
against the file size), and returns a :class:`SliceInfo`, with a :class:`~cspine_submit.read.pixels.PixelSpec`
that lets decoding start where the scan stopped. A file it cannot read raises :class:`DicomReadError` naming the file.

pydicom is imported inside the functions that need it: importing it costs about 0.2-0.4 s, which the CLI's argument
checks should not pay.
"""

from __future__ import annotations

import math
import os
import struct
import warnings as _warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cspine_submit.read import dicom_header
from cspine_submit.read.pixels import PixelSpec
from cspine_submit.read.plugins import DEFLATED


class DicomReadError(ValueError):
    """A study folder or a slice file cannot be read; the message starts with the offending path."""


# The scanned tags (keywords) for pydicom's ``specific_tags``: the same ones the fast scan reads.
_HEADER_TAGS = list(dicom_header.WANTED)

_EXPLICIT_LONG_VRS = {b"OB", b"OW", b"OD", b"OF", b"OL", b"OV", b"UN"}


def _header_value(ds, keyword: str, default=None):
    """``ds.get(keyword, default)`` for the scanned tags, read from pydicom's raw element bytes when it can.

    pydicom converts a value on first access through its full machinery (hooks, VR lookup, charset, validation),
    which took half of the header scan's time; these tags need only bytes -> text, or two bytes -> int. Returns
    text (``"a\\b"`` split into a list for several values) for strings and numbers-as-text (DS, IS, UI, CS), an
    int for US; anything unusual (another VR in the file, an odd length, a converted element) goes to pydicom.
    """
    from pydicom.dataelem import RawDataElement

    tag, vr = dicom_header.WANTED[keyword]
    elem = ds.get_item(tag)
    if elem is None:
        return default
    if not isinstance(elem, RawDataElement) or elem.VR not in (None, vr) or elem.value is None:
        return ds.get(keyword, default)
    raw = elem.value
    if not raw:
        return default if vr == "US" else ""
    if vr == "US":
        if len(raw) != 2:
            return ds.get(keyword, default)
        return struct.unpack("<H" if elem.is_little_endian else ">H", raw)[0]
    return dicom_header.decode_raw(raw, vr)  # the fast scan's decoding, so that both routes agree


@dataclass(frozen=True)
class SliceInfo:
    """The header of one slice file, as far as ordering and grouping need it.

    Attributes
    ----------
    path : Path
    study_uid, series_uid : str
        "" when absent.
    position : (3,) ndarray or None
        ImagePositionPatient, mm (patient LPS).
    orientation : (6,) ndarray or None
        ImageOrientationPatient.
    instance_number : int or None
    rows, cols : int
    pixel_spacing : (dy, dx) tuple of float or None
        mm, from PixelSpacing (row spacing, column spacing).
    transfer_syntax : str
    slice_thickness, spacing_between : float or None
        mm, as stated (informative, or the last resort for dz when positions are missing).
    pixels : PixelSpec or None
        Where the Pixel Data lies and how its values read, for decoding without a second header parse (None when
        the header lacks what that needs: such a file is decoded through pydicom).
    """

    path: Path
    study_uid: str
    series_uid: str
    position: np.ndarray | None
    orientation: np.ndarray | None
    instance_number: int | None
    rows: int
    cols: int
    pixel_spacing: tuple[float, float] | None
    transfer_syntax: str
    slice_thickness: float | None = None
    spacing_between: float | None = None
    pixels: PixelSpec | None = None


def _floats(value, n: int) -> np.ndarray | None:
    """``n`` finite floats from a multi-valued header value, else None (checked on Python floats: numpy's checks
    cost more than the rest of a header's fast scan)."""
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(values) != n or not all(map(math.isfinite, values)):
        return None
    return np.array(values, dtype=np.float64)


def finite_float(value) -> float | None:
    """``float(value)`` when that is a finite number, else None (absent, empty, unparsable, inf or NaN)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _locate_pixel_data(fp, file_size: int) -> tuple[str | None, tuple[tuple[int, int], ...], bool]:
    """Check the Pixel Data element at the current position of ``fp`` and say where its bytes lie.

    A header-only read stops in front of Pixel Data and so cannot notice a file cut off inside it: compare
    the element's declared length with the file size (native data), or walk the fragment items up to the
    sequence delimiter (encapsulated data). Only the item headers are read, never the pixel bytes. What the walk
    finds is kept, so that decoding can go straight to the bytes (:class:`cspine_submit.read.pixels.PixelSpec`).

    Returns
    -------
    problem : str or None
        Why the element is incomplete, or None when it is whole.
    ranges : tuple of (offset, length)
        The value's byte range (native data), or the fragments after the Basic Offset Table (encapsulated data);
        empty when there is a problem.
    encapsulated : bool
    """
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return "truncated or no pixel data: the file ends before a Pixel Data element", (), False
    little = head[:4] in (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")
    endian = "<" if little else ">"
    if head[4:6] in _EXPLICIT_LONG_VRS and head[6:8] == b"\x00\x00":
        if len(head) < 12:
            return "truncated in the Pixel Data element header", (), False
        (length,) = struct.unpack(endian + "I", head[8:12])
        value_start = start + 12
    else:
        (length,) = struct.unpack(endian + "I", head[4:8])
        value_start = start + 8
    if length != 0xFFFFFFFF:
        if value_start + length > file_size:
            return (
                f"truncated: Pixel Data declares {length} bytes but the file holds only "
                f"{max(file_size - value_start, 0)}"
            ), (), False
        # Only the standard Pixel Data tag in little endian is located: float data and big endian go to pydicom.
        located = ((value_start, length),) if head[:4] == b"\xe0\x7f\x10\x00" else ()
        return None, located, False
    # Encapsulated: items (FFFE,E000) each with a length, ended by the sequence delimiter (FFFE,E0DD).
    pos = value_start
    fp.seek(pos)
    items: list[tuple[int, int]] = []
    while True:
        item = fp.read(8)
        if len(item) < 8:
            return "truncated: the encapsulated Pixel Data ends before its sequence delimiter", (), True
        group, elem, length = struct.unpack("<HHI", item)
        if (group, elem) == (0xFFFE, 0xE0DD):
            # The first item is the Basic Offset Table; one frame per file, so every other item is its fragment.
            return None, tuple(items[1:]), True
        if (group, elem) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            return f"corrupt encapsulated Pixel Data at byte {pos} (tag ({group:04X},{elem:04X}))", (), True
        items.append((pos + 8, length))
        pos += 8 + length
        if pos > file_size:
            return "truncated: an encapsulated Pixel Data fragment runs past the end of the file", (), True
        fp.seek(pos)


def read_slice_header(path: str | Path, fast: bool | None = None) -> SliceInfo:
    """Read one slice file's header (never its pixel data) and check that the pixel data is complete.

    Parameters
    ----------
    path : str or Path
    fast : bool, optional
        Try :func:`cspine_submit.read.dicom_header.scan_header` first (several times cheaper than pydicom's reader;
        files it does not read with certainty go to pydicom, with the same result). False: pydicom only. None (default):
        fast unless :data:`cspine_submit.read.dicom_header.DISABLE_ENV` is set.

    Raises
    ------
    DicomReadError
        Message ``"<path>: <reason>"`` when the file is not DICOM, unreadable, has no pixel data, is
        truncated, is multi-frame or not grayscale.
    """
    path = path if isinstance(path, Path) else Path(path)
    if fast or (fast is None and dicom_header.fast_enabled()):
        info = _read_slice_header_fast(path)
        if info is not None:
            return info
    return _read_slice_header_pydicom(path)


def _read_slice_header_fast(path: Path) -> SliceInfo | None:
    """:func:`read_slice_header` through :func:`cspine_submit.read.dicom_header.scan_header`; None when the file needs
    pydicom's reader (anything unusual, including a read error: pydicom's route then words the error)."""
    try:
        with open(path, "rb") as fp:
            file_size = os.fstat(fp.fileno()).st_size
            scan = dicom_header.scan_header(fp, file_size)
            # the same check of Pixel Data as pydicom's route, from the same place in the file
            fp.seek(scan.pixel_tell)
            problem, ranges, encapsulated = _locate_pixel_data(fp, file_size)
    except Exception:  # noqa: BLE001 - NotFast, OSError or a surprise: pydicom's route decides
        return None
    if problem:
        raise DicomReadError(f"{path}: {problem}")
    return _slice_info(path, scan.transfer_syntax, ranges, encapsulated, scan.value)


def _read_slice_header_pydicom(path: Path) -> SliceInfo:
    """:func:`read_slice_header` through ``pydicom.dcmread`` (headers only, the scanned tags only)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        file_size = path.stat().st_size
        with open(path, "rb") as fp, _warnings.catch_warnings():
            # pydicom warns about every small standard deviation; the reasons that matter are raised below.
            _warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            except InvalidDicomError:
                # No 'DICM' preamble: some writers omit it. Accept the file only if a forced read finds an image.
                fp.seek(0)
                try:
                    ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
                except Exception:
                    raise DicomReadError(f"{path}: not a DICOM file") from None
                if ds.get_item(0x00280010) is None or ds.get_item(0x00280011) is None:
                    raise DicomReadError(f"{path}: not a DICOM file") from None
            tsyntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
            if not tsyntax:
                implicit, little = ds.original_encoding
                tsyntax = ("1.2.840.10008.1.2" if implicit
                           else "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2")
            ranges, encapsulated = (), False
            if tsyntax != DEFLATED:
                # (the deflated syntax compresses the whole dataset; zlib notices truncation when decoding)
                problem, ranges, encapsulated = _locate_pixel_data(fp, file_size)
                if problem:
                    raise DicomReadError(f"{path}: {problem}")
    except DicomReadError:
        raise
    except (OSError, EOFError) as exc:
        raise DicomReadError(f"{path}: unreadable ({exc})") from exc
    except Exception as exc:  # pydicom raises many kinds on corrupt headers
        raise DicomReadError(f"{path}: corrupt DICOM header ({type(exc).__name__}: {exc})") from exc

    def value(keyword, default=None):
        return _header_value(ds, keyword, default)

    return _slice_info(path, tsyntax, ranges, encapsulated, value)


def _slice_info(path: Path, tsyntax: str, ranges: tuple[tuple[int, int], ...], encapsulated: bool,
                value) -> SliceInfo:
    """The checks and the :class:`SliceInfo` of :func:`read_slice_header`, from the scanned header's values
    (``value(keyword, default)``) and what :func:`_locate_pixel_data` found, whichever route read them."""
    try:
        rows, cols = value("Rows"), value("Columns")
        rows, cols = (None if v in (None, "") else int(v) for v in (rows, cols))
    except (TypeError, ValueError):
        rows = cols = None
    if rows is None or cols is None:
        raise DicomReadError(f"{path}: no image (Rows/Columns missing)")
    samples = value("SamplesPerPixel", 1)
    if _int_or(samples, 1) != 1:
        raise DicomReadError(f"{path}: not a grayscale slice (SamplesPerPixel={samples})")
    frames = _int_or(value("NumberOfFrames", 1), 1)
    if frames != 1:
        raise DicomReadError(f"{path}: multi-frame file ({frames} frames); expected one slice per file")
    inst = value("InstanceNumber", None)
    try:
        inst = int(inst) if inst not in (None, "") else None
    except (TypeError, ValueError):
        inst = None
    spacing = _floats(value("PixelSpacing", None) or (), 2)
    return SliceInfo(
        path=path,
        study_uid=str(value("StudyInstanceUID", "") or ""),
        series_uid=str(value("SeriesInstanceUID", "") or ""),
        position=_floats(value("ImagePositionPatient", None) or (), 3),
        orientation=_floats(value("ImageOrientationPatient", None) or (), 6),
        instance_number=inst,
        rows=rows,
        cols=cols,
        pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        transfer_syntax=tsyntax,
        slice_thickness=finite_float(value("SliceThickness", None)),
        spacing_between=finite_float(value("SpacingBetweenSlices", None)),
        pixels=_pixel_spec(value, rows, cols, ranges, encapsulated),
    )


def _int_or(value, default: int) -> int:
    """``int(value or default)``, for counts stated as text or numbers (SamplesPerPixel, NumberOfFrames)."""
    try:
        return int(value or default)
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return default


def _pixel_spec(value, rows: int, cols: int, ranges: tuple[tuple[int, int], ...],
                encapsulated: bool) -> PixelSpec | None:
    """What :func:`cspine_submit.read.pixels.read_stored` needs, from the scanned header (``value(keyword, default)``);
    None when it is incomplete (the slice is then decoded through pydicom)."""
    if not ranges:
        return None
    try:
        bits_allocated = int(value("BitsAllocated"))
        bits_stored = int(value("BitsStored", None) or bits_allocated)
        signed = int(value("PixelRepresentation")) == 1
    except (TypeError, ValueError):
        return None
    slope = finite_float(value("RescaleSlope", None))
    intercept = finite_float(value("RescaleIntercept", None))
    return PixelSpec(
        fragments=tuple(ranges), encapsulated=encapsulated, rows=rows, cols=cols,
        bits_allocated=bits_allocated, bits_stored=bits_stored, signed=signed, samples=1,
        photometric=str(value("PhotometricInterpretation", "") or ""),
        slope=1.0 if slope is None else slope, intercept=0.0 if intercept is None else intercept,
    )
