"""DICOM study headers, slice ordering, decoding through pydicom's pixel plugins, HU conversion.

Axis convention everywhere: ``volume : (z, y, x) ndarray``, z from head to feet, y rows (anterior to
posterior for a standard axial CT), x columns.

- :func:`scan_study` reads headers only (``stop_before_pixels`` with a short tag list), checks every
  file's Pixel Data is complete (declared length vs file size, or the fragment items of encapsulated data),
  and orders slices by ImagePositionPatient projected on the slice normal. Bad, truncated, stray,
  duplicate or other-series/other-size files are listed in ``header.skipped``; the study fails only when
  nothing readable is left.
- :func:`read_slices` decodes just the requested slices with :func:`pydicom.pixels.pixel_array` (no
  decoder of our own), preferring the measured-faster plugin (GDCM for .4.70), then applies
  RescaleSlope/Intercept. A slice that decodes to another size than the study is rejected with
  :class:`DicomReadError`, never resized: resizing would silently change the pixel spacing.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import struct
import warnings as _warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cspine_submit.read import dicom_header
from cspine_submit.read.pixels import NotDirect, PixelSpec, read_stored


@dataclass(frozen=True)
class StudyHeader:
    """Everything known about a study from its DICOM headers alone (no pixel data decoded).

    Attributes
    ----------
    folder : Path
        The study folder.
    study_uid : str
        StudyInstanceUID (from the headers; the folder name when the headers lack it).
    files : tuple of Path
        Kept slice files, ordered head to feet.
    z : (n,) ndarray of float64
        Slice position in mm along the head-to-feet axis, one per file, strictly increasing
        (position projected on the slice normal, sign chosen so that z grows toward the feet).
    spacing : (dz, dy, dx) tuple of float
        mm; dz is the median difference of ``z``, dy/dx from PixelSpacing.
    rows, cols : int
        In-plane shape of every kept slice.
    transfer_syntaxes : tuple of str
        Transfer syntax UID of each kept file, in ``files`` order.
    reversed : bool
        True when file-name (slice number) order ran feet to head.
    skipped : tuple of (str, str)
        ``(file name, reason)`` for every file left out (not DICOM, truncated, other series/shape, duplicate).
    warnings : tuple of str
        Fallbacks used (e.g. ordering by InstanceNumber because positions were missing).
    positions : (n, 3) ndarray of float64
        ImagePositionPatient of each kept file (mm, patient LPS), NaN when missing.
    orientation : (6,) ndarray of float64
        ImageOrientationPatient shared by the series (row direction cosines, then column direction cosines).
    series_uid : str
        SeriesInstanceUID of the kept slices ("" when the headers leave it empty).
    slice_thickness : float or None
        SliceThickness as the headers state it (mm); informative only, ``spacing[0]`` comes from positions.
    pixels : tuple of (PixelSpec or None)
        Per kept file, in ``files`` order: where its Pixel Data lies and how it reads, so that decoding starts
        from the scan (:func:`cspine_submit.read.pixels.read_stored`); empty for headers built without a scan.
    """

    folder: Path
    study_uid: str
    files: tuple[Path, ...]
    z: np.ndarray
    spacing: tuple[float, float, float]
    rows: int
    cols: int
    transfer_syntaxes: tuple[str, ...]
    reversed: bool = False
    skipped: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = ()
    positions: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    orientation: np.ndarray = field(default_factory=lambda: np.array([1.0, 0, 0, 0, 1.0, 0]))
    series_uid: str = ""
    slice_thickness: float | None = None
    pixels: tuple = ()

    @property
    def n_slices(self) -> int:
        """Number of kept slices."""
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape (z, y, x)."""
        return (self.n_slices, self.rows, self.cols)


class DicomReadError(ValueError):
    """A study folder or a slice file cannot be read; the message starts with the offending path."""


# ----------------------------------------------------------------------------------------------------------------
# Transfer syntaxes and decoding plugins
# ----------------------------------------------------------------------------------------------------------------

COMPETITION_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1: the competition's compressed slices
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
"""Transfer syntaxes the reader is expected to meet, listed by ``cspine-submit env``."""

PREFERRED_PLUGINS: dict[str, tuple[str, ...]] = {
    # Measured on one core (benchmarks/bench_reader.py, 512x512 CT slices): GDCM decodes .4.70 in about
    # 8 ms a slice, pylibjpeg in about 11.5 ms, so GDCM goes first when both are installed.
    "1.2.840.10008.1.2.4.70": ("gdcm", "pylibjpeg"),
    "1.2.840.10008.1.2.4.57": ("gdcm", "pylibjpeg"),
}
"""Plugin preference per transfer syntax; syntaxes not listed use pydicom's own order."""

_DEFLATED = "1.2.840.10008.1.2.1.99"

# What each pydicom decoding plugin needs, by pip package name (for messages about missing plugins).
PLUGIN_PACKAGES: dict[str, str] = {
    "gdcm": "python-gdcm",
    "pylibjpeg": "pylibjpeg + pylibjpeg-libjpeg (JPEG, JPEG-LS), pylibjpeg-openjpeg (JPEG 2000), pylibjpeg-rle (RLE)",
    "pillow": "pillow",
    "pyjpegls": "pyjpegls",
    "pydicom": "pydicom",
}


# pydicom names a plugin's dependencies by import name; pip wants the distribution name.
_PIP_NAMES: dict[str, str] = {"gdcm": "python-gdcm"}


def install_hint(missing: str) -> str:
    """pydicom's ``"<plugin> - requires <dep> and <dep>"`` -> ``'pip install "<dist>" "<dist>"'`` (pip names, quoted).

    pydicom spells GDCM's dependency ``gdcm>=3.0.10``, but ``pip install gdcm`` does not give GDCM: the package
    is ``python-gdcm``. A text without ``requires`` (a plugin unavailable for another reason) is returned as is.
    """
    _, sep, deps = missing.partition(" - requires ")
    if not sep:
        return missing.partition(" - ")[2] or missing
    parts = [d.strip() for d in re.split(r",\s*|\s+and\s+", deps) if d.strip()]
    out = []
    for dep in parts:
        name = re.match(r"[A-Za-z0-9_.\-]+", dep).group(0)
        out.append(_PIP_NAMES.get(name.lower(), name) + dep[len(name):])
    return "pip install " + " ".join(f'"{d}"' if re.search(r"[<>=!~ ]", d) else d for d in out)


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name != uid else "unknown transfer syntax"


def available_plugins(tsyntax: str) -> tuple[str, ...]:
    """Decoding plugins that can decode ``tsyntax`` here, in the order :func:`read_slices` tries them.

    Native (uncompressed) syntaxes need no plugin and return ``("native",)``; syntaxes pydicom cannot decode
    at all return ``()``.
    """
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        return ()
    if decoder.is_native:
        return ("native",)
    have = tuple(decoder.available_plugins)
    first = tuple(p for p in PREFERRED_PLUGINS.get(str(tsyntax), ()) if p in have)
    return first + tuple(p for p in have if p not in first)


def decoder_table(tsyntaxes: Iterable[str] = COMPETITION_TRANSFER_SYNTAXES) -> list[dict]:
    """Which pydicom decoding plugins serve each transfer syntax in this environment.

    Returns
    -------
    list of dict
        One per syntax: ``uid``, ``name``, ``direct`` (the route tried before pydicom's plugins, see
        :mod:`cspine_submit.read.pixels`: ``["numpy"]`` for uncompressed little-endian data, the direct JPEG decoders in
        the order tried for JPEG Lossless, else empty), ``available`` (pydicom plugin names, in the order the reader
        tries them; ``["native"]`` for uncompressed data), ``missing`` (``{plugin: what to install}``) and ``ok``.
    """
    from pydicom.pixels import get_decoder

    from cspine_submit.read import pixels

    rows = []
    for uid in tsyntaxes:
        direct = (["numpy"] if str(uid) in pixels.NATIVE_SYNTAXES else list(pixels.available_jpeg_decoders())
                  if str(uid) in pixels.JPEG_LOSSLESS_SYNTAXES else [])
        row = {"uid": str(uid), "name": _uid_name(uid), "direct": direct, "available": [], "missing": {}, "ok": False}
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            row["missing"] = {"(none)": "pydicom has no decoder for this transfer syntax"}
            rows.append(row)
            continue
        row["available"] = list(available_plugins(uid))
        if not decoder.is_native:
            for text in decoder.missing_dependencies:
                plugin = text.partition(" - ")[0]
                row["missing"][plugin] = install_hint(text).strip() or PLUGIN_PACKAGES.get(plugin, plugin)
        row["ok"] = bool(row["available"])
        rows.append(row)
    return rows


REQUIRED_TRANSFER_SYNTAXES: tuple[str, ...] = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70")
"""Without a decoder for these the competition's studies cannot be read (uncompressed and JPEG Lossless SV1)."""


def missing_decoders(
    required: Iterable[str] = REQUIRED_TRANSFER_SYNTAXES, table: list[dict] | None = None
) -> list[str]:
    """What to install so that every ``required`` syntax can be decoded: ``["<plugin>: <pip install ...>", ...]``.

    Empty when all can be decoded. For a syntax with no plugin, any one of its listed packages suffices.
    Meant for a start-up check that fails with one message listing every missing package.
    """
    required = set(required)
    rows = decoder_table(sorted(required)) if table is None else table
    return list(dict.fromkeys(
        f"{plugin}: {need}" for row in rows if row["uid"] in required and not row["ok"]
        for plugin, need in row["missing"].items()
    ))


# ----------------------------------------------------------------------------------------------------------------
# Header scan
# ----------------------------------------------------------------------------------------------------------------

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


def _float_or_none(value) -> float | None:
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
        Try :func:`cspine_submit.read.dicom_header.scan_header` first (several times cheaper than pydicom's reader; files
        it does not read with certainty go to pydicom, with the same result). False: pydicom only. None (default):
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
            if tsyntax != _DEFLATED:
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
        slice_thickness=_float_or_none(value("SliceThickness", None)),
        spacing_between=_float_or_none(value("SpacingBetweenSlices", None)),
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
    slope = _float_or_none(value("RescaleSlope", None))
    intercept = _float_or_none(value("RescaleIntercept", None))
    return PixelSpec(
        fragments=tuple(ranges), encapsulated=encapsulated, rows=rows, cols=cols,
        bits_allocated=bits_allocated, bits_stored=bits_stored, signed=signed, samples=1,
        photometric=str(value("PhotometricInterpretation", "") or ""),
        slope=1.0 if slope is None else slope, intercept=0.0 if intercept is None else intercept,
    )


def natural_key(name: str) -> tuple:
    """Sort key for file names that orders embedded numbers by value (``2.dcm`` before ``10.dcm``)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


def _numeric_stem(path: Path) -> float | None:
    try:
        return float(path.name.split(".")[0]) if path.name.split(".")[0] else None
    except ValueError:
        return None


@dataclass(frozen=True)
class SliceOrder:
    """Result of :func:`order_slices`: which slices to keep, in which order, and why others were dropped."""

    kept: tuple[SliceInfo, ...]
    z: np.ndarray
    dz: float
    orientation: np.ndarray
    reversed: bool
    skipped: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...]


_AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def order_slices(infos: Sequence[SliceInfo]) -> SliceOrder:
    """Choose the study's slices and order them head to feet, from headers alone.

    The largest group of files sharing (SeriesInstanceUID, Rows, Columns) is the study; other files are
    skipped. Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of
    the ImageOrientationPatient cosines), so file names, InstanceNumber and reversed numbering do not
    matter. Slices at the same position are duplicates: the first in file-name order is kept. Without
    positions the order falls back to InstanceNumber, then to the numeric file name, with a warning.

    Parameters
    ----------
    infos : sequence of SliceInfo
        At least one.

    Returns
    -------
    SliceOrder
        ``z`` (n,) mm increasing toward the feet; ``dz`` the median z step (mm).
    """
    if not infos:
        raise ValueError("order_slices needs at least one slice")
    infos = sorted(infos, key=lambda s: natural_key(s.path.name))
    skipped: list[tuple[str, str]] = []
    warns: list[str] = []

    groups = Counter((s.series_uid, s.rows, s.cols) for s in infos)
    (series, rows, cols), _ = max(groups.items(), key=lambda kv: kv[1])  # ties: the first in name order
    group = []
    for s in infos:
        if s.series_uid != series:
            other, main = s.series_uid or "(empty)", series or "(empty)"
            skipped.append((s.path.name, f"other series {other} (study series is {main})"))
        elif (s.rows, s.cols) != (rows, cols):
            skipped.append((s.path.name, f"slice size {s.rows}x{s.cols} differs from the study's {rows}x{cols}"))
        else:
            group.append(s)

    rounded: dict[bytes, tuple] = {}  # np.round once per distinct orientation (a series has one)
    orients = []
    for s in group:
        if s.orientation is not None:
            key = s.orientation.tobytes()
            if key not in rounded:
                rounded[key] = tuple(np.round(s.orientation, 4))
            orients.append(rounded[key])
    if orients:
        orientation = np.asarray(Counter(orients).most_common(1)[0][0], dtype=np.float64)
    else:
        orientation = _AXIAL.copy()
        warns.append("no ImageOrientationPatient: assuming axial slices (1,0,0,0,1,0)")
    normal = np.cross(orientation[:3], orientation[3:])
    normal = normal / (np.linalg.norm(normal) or 1.0)
    keep = []
    alignment: dict[bytes, float] = {}  # per distinct orientation (a series has one): np.cross costs ~15 us a call
    for s in group:
        if s.orientation is not None:
            key = s.orientation.tobytes()
            cos = alignment.get(key)
            if cos is None:
                n = np.cross(s.orientation[:3], s.orientation[3:])
                cos = alignment[key] = abs(float(n @ normal)) / (np.linalg.norm(n) or 1.0)
            if cos < 0.9998:  # > ~1 degree off the series plane
                skipped.append((s.path.name, "ImageOrientationPatient differs from the series (e.g. a localizer)"))
                continue
        keep.append(s)
    group = keep
    if abs(normal[2]) < 0.5:
        warns.append(f"slice normal {np.round(normal, 3).tolist()} is not head-feet: not an axial series")
    # Sign so that z grows toward the feet: patient +z (LPS) points to the head.
    sign = -1.0 if normal[2] >= 0 else 1.0

    with_pos = [s for s in group if s.position is not None]
    stated = [s.spacing_between or s.slice_thickness for s in group]
    thick = next((t for t in stated if t), None)
    if len(with_pos) >= 3:
        # Positions that do not separate the slices (a broken header copied to every file) would keep one slice
        # of the study and drop the rest as "duplicates": order as if positions were missing instead.
        z_pos = np.round(np.array([s.position @ normal for s in with_pos]), 3)
        if 2 * len(np.unique(z_pos)) <= len(with_pos):
            warns.append(f"ImagePositionPatient gives only {len(np.unique(z_pos))} distinct position(s) for "
                         f"{len(with_pos)} slices: ignored")
            with_pos = []
            group = [dataclasses.replace(s, position=None) for s in group]
    if with_pos:
        for s in group:
            if s.position is None:
                skipped.append((s.path.name, "no ImagePositionPatient while the other slices have one"))
        group = with_pos
        z_all = sign * np.array([s.position @ normal for s in group])
        method = "position"
    else:
        dz_guess = thick or 1.0
        numbers = [s.instance_number for s in group]
        if None not in numbers and len(set(numbers)) == len(numbers):
            rank = np.array(numbers, dtype=np.float64)
            warns.append("no ImagePositionPatient: ordered by InstanceNumber (assumed to grow head to feet), "
                         f"dz {dz_guess} mm from SliceThickness/SpacingBetweenSlices")
            method = "instance"
        else:
            stems = [_numeric_stem(s.path) for s in group]
            if all(v is not None for v in stems) and len(set(stems)) == len(stems):
                rank = np.array(stems, dtype=np.float64)
                warns.append("no ImagePositionPatient or InstanceNumber: ordered by the numeric file name "
                             f"(assumed to grow head to feet), dz {dz_guess} mm")
            else:
                rank = np.arange(len(group), dtype=np.float64)
                warns.append("no ImagePositionPatient, InstanceNumber or numeric file names: kept file-name "
                             f"order, dz {dz_guess} mm")
            method = "name"
        order = np.argsort(rank, kind="stable")
        z_all = np.empty(len(group))
        z_all[order] = np.arange(len(group)) * dz_guess
        if thick is None:
            warns.append("no slice spacing in the headers: dz = 1.0 mm assumed")

    # Sort head to feet; ties (same position) are duplicates and keep the first file in name order.
    order = np.argsort(z_all, kind="stable")
    kept_idx: list[int] = []
    for i in order:
        if kept_idx and abs(z_all[i] - z_all[kept_idx[-1]]) < 1e-3:
            skipped.append((group[i].path.name, f"duplicate position of {group[kept_idx[-1]].path.name}"))
            continue
        kept_idx.append(int(i))
    kept = tuple(group[i] for i in kept_idx)
    z = np.asarray(z_all[kept_idx], dtype=np.float64)

    if len(z) > 1:
        steps = np.diff(z)
        dz = round(float(np.median(steps)), 6)  # positions are decimal strings: drop float noise
        uneven = np.abs(steps - dz) > 0.1 * dz + 0.01
        if uneven.any():
            warns.append(f"uneven slice spacing: {int(uneven.sum())} step(s) differ from the median {dz:.3f} mm "
                         f"(min {steps.min():.3f}, max {steps.max():.3f} mm)")
    else:
        dz = float(thick or 1.0)
    # File-name order ran feet to head when z decreases along it (at least 90% of the steps, so that a
    # shuffled or UID-named study is not called reversed). ``group`` is in file-name order.
    z_by_name = z[np.argsort(kept_idx)]
    is_reversed = bool(method != "name" and len(z) > 1 and np.mean(np.diff(z_by_name) < 0) >= 0.9)
    return SliceOrder(kept=kept, z=z, dz=dz, orientation=orientation, reversed=is_reversed,
                      skipped=tuple(skipped), warnings=tuple(warns))


def scan_study(folder: str | Path) -> StudyHeader:
    """Read the headers of every file in a study folder (no pixel data) and order the slices head to feet.

    Parameters
    ----------
    folder : str or Path
        One study: axial slice files (any names; sub-folders and hidden files are ignored).

    Returns
    -------
    StudyHeader

    Raises
    ------
    DicomReadError
        When the folder is missing, empty, or holds no readable slice; the message starts with the folder.
        A single bad file only lands in ``header.skipped``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomReadError(f"{folder}: no such study folder" if not folder.exists() else f"{folder}: not a folder")
    try:
        paths = sorted((Path(e.path) for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")),
                       key=lambda p: natural_key(p.name))
    except OSError as exc:
        raise DicomReadError(f"{folder}: cannot list the folder ({exc})") from exc
    if not paths:
        raise DicomReadError(f"{folder}: empty study folder (no files)")
    infos, skipped = [], []
    for path in paths:
        try:
            infos.append(read_slice_header(path))
        except DicomReadError as exc:
            skipped.append((path.name, str(exc).removeprefix(f"{path}: ")))
    if not infos:
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        raise DicomReadError(f"{folder}: no readable DICOM slice among {len(paths)} file(s) ({reasons})")
    order = order_slices(infos)
    kept = order.kept
    spacing_yx = next((s.pixel_spacing for s in kept if s.pixel_spacing is not None), None)
    warns = list(order.warnings)
    if spacing_yx is None:
        spacing_yx = (1.0, 1.0)
        warns.append("no PixelSpacing: 1.0 mm assumed")
    uids = Counter(s.study_uid for s in kept if s.study_uid)
    study_uid = uids.most_common(1)[0][0] if uids else folder.name
    if not uids:
        warns.append("no StudyInstanceUID: using the folder name")
    positions = np.array([s.position if s.position is not None else np.full(3, np.nan) for s in kept])
    return StudyHeader(
        folder=folder,
        study_uid=study_uid,
        files=tuple(s.path for s in kept),
        z=order.z,
        spacing=(float(order.dz), float(spacing_yx[0]), float(spacing_yx[1])),
        rows=kept[0].rows,
        cols=kept[0].cols,
        transfer_syntaxes=tuple(s.transfer_syntax for s in kept),
        reversed=order.reversed,
        skipped=tuple(skipped) + order.skipped,
        warnings=tuple(warns),
        positions=positions.reshape(-1, 3),
        orientation=order.orientation,
        series_uid=kept[0].series_uid,
        slice_thickness=kept[0].slice_thickness,
        pixels=tuple(s.pixels for s in kept),
    )


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------


def to_hu(stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0, out: np.ndarray | None = None) -> np.ndarray:
    """Stored pixel values to Hounsfield units: ``stored * slope + intercept``, as float32.

    Parameters
    ----------
    stored : ndarray of int
        Pixel values as pydicom decodes them (already sign-corrected for PixelRepresentation/BitsStored).
    out : ndarray of float32, optional
        Written in place and returned (e.g. one row of a study's slice stack: no temporary slice).
    """
    if out is None:
        out = stored.astype(np.float32)
    elif slope == 1.0:
        # One pass instead of a cast then an add (same float32 arithmetic, same values).
        return np.add(stored, np.float32(intercept), out=out, dtype=np.float32)
    else:
        np.multiply(stored, np.float32(slope), out=out, dtype=np.float32)
        slope = 1.0
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def _unsupported_message(path: Path, tsyntax: str) -> str:
    return (
        f"{path}: cannot decode transfer syntax {tsyntax} ({_uid_name(tsyntax)}): no pydicom decoder exists for it "
        "(not gdcm, pylibjpeg, pillow or pyjpegls); convert the file first to an uncompressed or lossless syntax "
        "with a tool that reads it (e.g. dcmtk's `dcmdjpeg`)"
    )


def decode_slice(path: str | Path, tsyntax: str | None = None, plugin: str | None = None,
                 spec: PixelSpec | None = None, direct: bool = True) -> np.ndarray:
    """Decode one slice file to HU: straight from the scanned header when it can, else through pydicom's plugins.

    Parameters
    ----------
    path : str or Path
    tsyntax : str, optional
        The file's transfer syntax if already known (from the scan); when None the header is read again to find it
        (and its :class:`~cspine_submit.read.pixels.PixelSpec` with it).
    plugin : str, optional
        Force one pydicom decoding plugin (e.g. ``"gdcm"``, ``"pylibjpeg"``; implies ``direct=False``); by default
        the preferred available one (see :data:`PREFERRED_PLUGINS`), then every other plugin if that one fails.
    spec : PixelSpec, optional
        Where the scan found the file's Pixel Data. With it, uncompressed and JPEG Lossless slices are decoded
        without pydicom (:func:`cspine_submit.read.pixels.read_stored`, same values); without it, or when that route
        does not apply or fails, pydicom's plugins decode the file.
    direct : bool
        False: always decode through pydicom's plugins (benchmarks, checks).

    Returns
    -------
    (rows, cols) ndarray of float32
        HU (RescaleSlope/RescaleIntercept applied; 1 and 0 when absent).
    """
    path = Path(path)
    if tsyntax is None:
        info = read_slice_header(path)  # raises DicomReadError naming the file
        tsyntax, spec = info.transfer_syntax, spec or info.pixels
    if direct and plugin is None and spec is not None:
        try:
            stored = read_stored(path, tsyntax, spec)
        except NotDirect:
            pass  # pydicom's plugins below decode it, or say clearly why nothing can
        else:
            return to_hu(stored, spec.slope, spec.intercept)

    import pydicom
    from pydicom import Dataset
    from pydicom.pixels import get_decoder, pixel_array

    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")
            try:
                decoder = get_decoder(tsyntax)
            except NotImplementedError:
                raise DicomReadError(_unsupported_message(path, tsyntax)) from None
            if not decoder.is_native and not decoder.available_plugins:
                missing = "; ".join(f"{t.partition(' - ')[0]}: {install_hint(t)}"
                                    for t in decoder.missing_dependencies) or "a decoding plugin"
                raise DicomReadError(
                    f"{path}: cannot decode transfer syntax {tsyntax} ({_uid_name(tsyntax)}): no decoding plugin is "
                    f"installed; install one of: {missing}"
                )
            if tsyntax == _DEFLATED:
                # pixel_array(path) reads the raw (still deflated) stream; a full dcmread inflates it.
                ds = pydicom.dcmread(path)
                arr = ds.pixel_array
            else:
                choices = [plugin] if plugin else [p for p in available_plugins(tsyntax) if p != "native"][:1]
                ds = Dataset()
                # The syntax is passed on because files without a DICOM preamble/file meta, which the header scan
                # accepts, carry none that pixel_array could find (it would refuse them).
                try:
                    arr = pixel_array(path, ds_out=ds, decoding_plugin=choices[0] if choices else "",
                                      transfer_syntax_uid=tsyntax)
                except Exception:
                    if plugin or decoder.is_native:
                        raise
                    # The preferred plugin failed on this file: let pydicom try every available plugin.
                    ds = Dataset()
                    arr = pixel_array(path, ds_out=ds, transfer_syntax_uid=tsyntax)
    except DicomReadError:
        raise
    except Exception as exc:
        raise DicomReadError(
            f"{path}: cannot decode pixel data ({tsyntax} {_uid_name(tsyntax or '')}): {type(exc).__name__}: {exc}"
        ) from exc
    if arr.ndim != 2:
        raise DicomReadError(f"{path}: decoded pixel data has shape {arr.shape}, expected one grayscale slice")
    slope = _float_or_none(ds.get("RescaleSlope", None))
    intercept = _float_or_none(ds.get("RescaleIntercept", None))
    return to_hu(arr, 1.0 if slope is None else slope, 0.0 if intercept is None else intercept)


def read_slices(
    header: StudyHeader, indices: Iterable[int] | None = None, plugin: str | None = None, progress: bool = False,
    direct: bool = True, dtype=np.float32,
) -> np.ndarray:
    """Decode only the requested slices of a scanned study, to HU.

    Each file is opened once: decoding starts from where the scan found its Pixel Data (``header.pixels``).

    Parameters
    ----------
    header : StudyHeader
        From :func:`scan_study`.
    indices : iterable of int, optional
        Indices into ``header.files`` (head to feet); any order, repeats allowed (each file is decoded once).
        All slices when None.
    plugin : str, optional
        Force one pydicom decoding plugin (benchmarks); see :func:`decode_slice`.
    progress : bool
        Show a tqdm bar.
    direct : bool
        False: decode every slice through pydicom's plugins (benchmarks, checks); see :func:`decode_slice`.
    dtype : float32 or int16
        int16 (what a submission run's workers use) only where :func:`hu_dtype` says it holds the study's HU.

    Returns
    -------
    (n, rows, cols) ndarray of ``dtype``
        HU, in the order of ``indices``.

    Raises
    ------
    IndexError
        An index outside ``[0, header.n_slices)``.
    DicomReadError
        A slice cannot be decoded, or decodes to a size other than ``(header.rows, header.cols)``: such a
        slice is rejected, not resized, because resizing would silently change the pixel spacing.
    """
    idx = np.arange(header.n_slices) if indices is None else np.asarray(list(indices), dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= header.n_slices):
        raise IndexError(f"{header.folder}: slice indices must be in [0, {header.n_slices}), got "
                         f"{idx.min()}..{idx.max()}")
    if np.dtype(dtype) == np.int16 and hu_dtype(header) != np.int16:
        raise ValueError(f"{header.folder}: int16 cannot hold this study's HU (see dicom.hu_dtype)")
    unique, inverse = np.unique(idx, return_inverse=True)
    out = np.empty((len(unique), header.rows, header.cols), dtype=dtype)
    it = unique
    if progress:
        from tqdm import tqdm

        it = tqdm(unique, desc=f"decode {header.folder.name}", unit="slice")
    for k, i in enumerate(it):
        decode_into(header, int(i), out[k], plugin=plugin, direct=direct)
    if len(unique) == len(idx) and np.array_equal(unique, idx):
        return out
    return out[inverse.reshape(-1)]


_SCRATCH: dict = {}


def _scratch(spec: PixelSpec) -> np.ndarray:
    """This process's reusable buffer for one slice's stored values (a fresh one per slice costs page faults)."""
    key = (spec.rows, spec.cols, spec.dtype.str)
    buf = _SCRATCH.get(key)
    if buf is None:
        _SCRATCH.clear()  # one size at a time: a study's slices share it
        buf = _SCRATCH[key] = np.empty((spec.rows, spec.cols), dtype=spec.dtype)
    return buf


def _whole_hu_range(spec: PixelSpec | None) -> tuple[int, int] | None:
    """The HU range a slice's header allows when every HU is a whole number (slope 1, whole intercept), else None."""
    if spec is None or spec.slope != 1.0 or not float(spec.intercept).is_integer() or not 0 < spec.bits_stored <= 16:
        return None
    if spec.signed:
        low, high = -(2 ** (spec.bits_stored - 1)), 2 ** (spec.bits_stored - 1) - 1
    else:
        low, high = 0, 2**spec.bits_stored - 1
    return low + int(spec.intercept), high + int(spec.intercept)


def hu_dtype(header: StudyHeader) -> np.dtype:
    """The dtype that holds a study's HU exactly: int16 when every slice's header guarantees whole HU inside
    int16's range (CT as scanners write it: slope 1, intercept -1024 or 0, 12 to 16 stored bits), else float32.

    An int16 stack is half the memory of a float32 one and its slices decode straight into it (no scratch slice, no
    float conversion); the crops and the localization features read the same values from either.
    """
    info = np.iinfo(np.int16)
    for spec in header.pixels:
        span = _whole_hu_range(spec)
        if span is None or span[0] < info.min or span[1] > info.max:
            return np.dtype(np.float32)
    return np.dtype(np.int16) if header.pixels else np.dtype(np.float32)


def _decode_whole_hu(path: Path, tsyntax: str, spec: PixelSpec, out: np.ndarray) -> np.ndarray:
    """Direct decode into an int16 HU row (:func:`hu_dtype` said int16 holds it); raises NotDirect like read_stored."""
    if spec.dtype.itemsize == 2 and (spec.signed or spec.bits_stored <= 15) and out.flags.c_contiguous:
        # 16-bit stored values that int16 holds as they are: decode in place and add the intercept there.
        read_stored(path, tsyntax, spec, out=out.view(spec.dtype))
        if spec.intercept:
            np.add(out, np.int16(spec.intercept), out=out)  # inside int16 by hu_dtype: no wrap-around
        return out
    stored = read_stored(path, tsyntax, spec, out=_scratch(spec))
    return np.add(stored, int(spec.intercept), out=out, dtype=np.int32, casting="unsafe")


def decode_into(header: StudyHeader, index: int, out: np.ndarray, plugin: str | None = None,
                direct: bool = True) -> np.ndarray:
    """Decode slice ``index`` of a scanned study to HU, written into ``out`` (no temporary float slice).

    Parameters
    ----------
    header : StudyHeader
    index : int
        Into ``header.files``.
    out : (rows, cols) ndarray of float32, or of int16 when :func:`hu_dtype` of the study is int16
        E.g. one row of a preallocated stack; returned.
    plugin, direct
        See :func:`decode_slice`.

    Raises
    ------
    DicomReadError
        The slice cannot be decoded, or is not ``(header.rows, header.cols)`` (rejected, never resized: resizing
        would silently change the pixel spacing).
    """
    path = header.files[index]
    tsyntax = header.transfer_syntaxes[index] if index < len(header.transfer_syntaxes) else None
    spec = header.pixels[index] if index < len(header.pixels) else None
    if direct and plugin is None and tsyntax is not None and spec is not None and \
            (spec.rows, spec.cols) == (header.rows, header.cols):
        try:
            if out.dtype == np.int16:
                return _decode_whole_hu(path, tsyntax, spec, out)
            stored = read_stored(path, tsyntax, spec, out=_scratch(spec))
        except NotDirect:
            pass  # pydicom's plugins below
        else:
            return to_hu(stored, spec.slope, spec.intercept, out=out)
    hu = decode_slice(path, tsyntax, plugin, direct=False)
    if hu.shape != (header.rows, header.cols):
        raise DicomReadError(
            f"{path}: decoded slice is {hu.shape[0]}x{hu.shape[1]}, the study's slices are "
            f"{header.rows}x{header.cols} (slices of another size are rejected, not resized)"
        )
    if out.dtype == np.int16:
        np.rint(hu, out=hu)  # whole numbers already when hu_dtype chose int16; rint keeps a stray 0.9999 right
        np.clip(hu, -32768, 32767, out=hu)
    out[...] = hu
    return out


def read_study(folder: str | Path, progress: bool = False) -> tuple[StudyHeader, np.ndarray]:
    """Scan a study and decode all its slices.

    Returns
    -------
    header : StudyHeader
    volume : (z, y, x) ndarray of float32
        HU, z from head to feet.
    """
    header = scan_study(folder)
    return header, read_slices(header, None, progress=progress)


def compress_jpeg_lossless(src: str | Path, dst: str | Path) -> Path:
    """Re-encode one DICOM file as JPEG Lossless Process 14 SV1 (.4.70), the competition's compressed syntax.

    Only GDCM can write .4.70 among the Python DICOM libraries (pydicom's encoders cannot); used to build
    test and benchmark studies that look like the competition's files.

    Raises
    ------
    DicomReadError
        GDCM cannot read ``src`` or write ``dst``; the message names the file.
    """
    import gdcm

    src, dst = Path(src), Path(dst)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        raise DicomReadError(f"{src}: GDCM cannot read this file")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise DicomReadError(f"{src}: GDCM cannot re-encode this file as JPEG Lossless SV1")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise DicomReadError(f"{dst}: GDCM cannot write this file")
    return dst
