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

import dataclasses
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
    """``ds.get(keyword, default)`` for the scanned tags as plain values, from pydicom's raw element bytes when it can.

    pydicom converts a value on first access through its full machinery (hooks, VR lookup, charset, validation),
    which took half of the header scan's time; these tags are converted by pydicom's own value converters straight
    from the raw bytes (:func:`cspine_submit.read.dicom_header.decode_raw`, as the fast scan does), anything unusual
    (another VR in the file, an odd length, a converted element) by ``ds.get``. Either way the value is pydicom's,
    as plain Python types (:func:`cspine_submit.read.dicom_header.plain_value`); ValueError (or whatever pydicom
    raises) when pydicom cannot convert it.
    """
    from pydicom.dataelem import RawDataElement

    tag, vr = dicom_header.WANTED[keyword]
    elem = ds.get_item(tag)
    if elem is None:
        return default
    if not isinstance(elem, RawDataElement) or elem.VR not in (None, vr) or elem.value is None:
        return dicom_header.plain_value(ds.get(keyword, default), vr)
    raw = elem.value
    if not raw:
        return dicom_header.empty_value(vr)
    if vr == "US":
        if len(raw) != 2:
            return dicom_header.plain_value(ds.get(keyword, default), vr)
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
        the header lacks what that needs, or was read by pydicom's route: such a file is decoded through pydicom).
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
        truncated, is multi-frame or not grayscale, or holds a scanned value pydicom cannot convert; any other
        exception on the way is turned into one too.
    """
    path = path if isinstance(path, Path) else Path(path)
    try:
        if fast or (fast is None and dicom_header.fast_enabled()):
            info = _read_slice_header_fast(path)
            if info is not None:
                return info
        return _read_slice_header_pydicom(path)
    except DicomReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad file costs that file: the caller skips it with this reason
        raise DicomReadError(f"{path}: unreadable header ({type(exc).__name__}: {exc})") from exc


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

    # No PixelSpec from this route (the pixels go to pydicom): pydicom's own pixel reader (pixel_array) walks a file
    # the fast scan refused otherwise than dcmread in places (an unusual File Meta group), so where dcmread found
    # Pixel Data is no proof of where pydicom's decode reads it.
    return dataclasses.replace(_slice_info(path, tsyntax, ranges, encapsulated, value), pixels=None)


def _slice_info(path: Path, tsyntax: str, ranges: tuple[tuple[int, int], ...], encapsulated: bool,
                value) -> SliceInfo:
    """The checks and the :class:`SliceInfo` of :func:`read_slice_header`, from the scanned header's values
    (``value(keyword, default)``, pydicom's values as plain types) and what :func:`_locate_pixel_data` found,
    whichever route read them. A value pydicom cannot convert raises :class:`DicomReadError` naming it."""
    def get(keyword, default=None):
        try:
            return value(keyword, default)
        except Exception as exc:  # noqa: BLE001 - pydicom's conversion error, whichever kind: the file is unreadable
            raise DicomReadError(f"{path}: cannot read {keyword} ({type(exc).__name__}: {exc})") from None

    rows, cols = get("Rows"), get("Columns")
    if not isinstance(rows, int) or not isinstance(cols, int):
        raise DicomReadError(f"{path}: no image (Rows/Columns missing)")
    samples = get("SamplesPerPixel", 1)
    if (1 if samples is None else samples) != 1:
        raise DicomReadError(f"{path}: not a grayscale slice (SamplesPerPixel={samples})")
    frames = get("NumberOfFrames", 1)
    if frames not in (None, 0, 1):  # pydicom reads None and 0 as one frame
        raise DicomReadError(f"{path}: multi-frame file ({frames} frames); expected one slice per file")
    inst = get("InstanceNumber", None)
    spacing = _floats(get("PixelSpacing", None) or (), 2)
    return SliceInfo(
        path=path,
        study_uid=_text(get("StudyInstanceUID", "")),
        series_uid=_text(get("SeriesInstanceUID", "")),
        position=_floats(get("ImagePositionPatient", None) or (), 3),
        orientation=_floats(get("ImageOrientationPatient", None) or (), 6),
        instance_number=inst if isinstance(inst, int) else None,
        rows=rows,
        cols=cols,
        pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        transfer_syntax=tsyntax,
        slice_thickness=finite_float(get("SliceThickness", None)),
        spacing_between=finite_float(get("SpacingBetweenSlices", None)),
        pixels=_pixel_spec(get, rows, cols, ranges, encapsulated),
    )


def _text(value) -> str:
    """A UI value as text: "" when absent or empty, the values joined by backslashes when several (as stored)."""
    if isinstance(value, tuple):
        return "\\".join("" if v is None else str(v) for v in value)
    return str(value or "")


DIRECT_PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2"})
"""PhotometricInterpretation values the direct pixel route decodes (grayscale: pydicom applies no colour step)."""


def _pixel_spec(value, rows: int, cols: int, ranges: tuple[tuple[int, int], ...],
                encapsulated: bool) -> PixelSpec | None:
    """What :func:`cspine_submit.read.pixels.read_stored` needs, from the scanned header (``value(keyword, default)``);
    None unless every value is one pydicom decodes without complaint, so that the slice goes to pydicom, whose
    values or error then stand: BitsAllocated 8 or 16, BitsStored in 1..BitsAllocated, PixelRepresentation 0 or 1,
    SamplesPerPixel 1 (present), PhotometricInterpretation MONOCHROME1/2, RescaleSlope and RescaleIntercept absent,
    empty or finite."""
    if not ranges:
        return None
    bits_allocated, bits_stored = value("BitsAllocated", None), value("BitsStored", None)
    representation, samples = value("PixelRepresentation", None), value("SamplesPerPixel", None)
    photometric = value("PhotometricInterpretation", None)
    if bits_allocated not in (8, 16) or not isinstance(bits_stored, int) or not 1 <= bits_stored <= bits_allocated \
            or representation not in (0, 1) or samples != 1 or photometric not in DIRECT_PHOTOMETRIC:
        return None
    slope, intercept = value("RescaleSlope", None), value("RescaleIntercept", None)
    if slope is not None and finite_float(slope) is None or intercept is not None and finite_float(intercept) is None:
        return None  # non-finite or several values: pydicom's route reports it
    return PixelSpec(
        fragments=tuple(ranges), encapsulated=encapsulated, rows=rows, cols=cols,
        bits_allocated=bits_allocated, bits_stored=bits_stored, signed=representation == 1, samples=1,
        photometric=photometric,
        slope=1.0 if slope is None else float(slope), intercept=0.0 if intercept is None else float(intercept),
    )
