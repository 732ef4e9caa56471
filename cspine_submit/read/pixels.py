"""A scanned slice's stored pixels, read straight from where the header scan found them (no second header parse).

The header scan (:func:`cspine_submit.read.slice_header.read_slice_header`) already walks to the Pixel Data element to
check that it is complete; it records what it saw as a :class:`PixelSpec`: the byte ranges of the value (uncompressed
data) or of the frame's fragments (encapsulated data), and the few attributes that say how stored values read. From
that, :func:`read_stored` decodes the competition's two storage forms without pydicom:

- uncompressed little-endian data (Implicit / Explicit VR Little Endian): the bytes at the recorded offset, viewed
  with numpy (about 10x cheaper than ``pydicom.pixels.pixel_array``, which parses the header again);
- JPEG Lossless (Process 14, .4.57, and its Selection Value 1 form, .4.70): the frame through the decoders
  installed, tried in :data:`JPEG_DECODERS` order, each checked (:func:`check_frame`: the codestream's SOF
  against Rows, Columns, BitsStored and SamplesPerPixel before anything is written; a decode that does not write
  every sample is refused), a refusal passing the slice to the next one and finally to pydicom: dicomsdl (its
  header reading and frame checked, and any libjpeg-turbo warning it logs, such as a premature end of data, taken
  as a refusal), then GDCM on the frame bytes, then libjpeg on the frame bytes (GDCM and libjpeg decode into
  buffers of their own, copied; measured on this project's 512 x 512 CT slices, one core: about 3, 7.5 and 10 ms
  a slice, against 8.7 and 11.4 ms for pydicom's gdcm and pylibjpeg plugins; ``benchmarks/bench_reader.py``).

The result is exactly what pydicom gives (the tests compare every DICOM file in ``tests/data``): the stored values
are read with pydicom's dtype (``BitsAllocated``, ``PixelRepresentation``) and its unused-bits correction (a left
then right shift by ``BitsAllocated - BitsStored``, which sign-extends signed data and masks unsigned data).
Everything else (big endian, deflated, JPEG 2000, JPEG-LS, RLE, lossy JPEG, float data, colour) raises
:class:`NotDirect`, and the caller decodes through pydicom's plugins instead.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NATIVE_SYNTAXES: frozenset[str] = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
"""Implicit and Explicit VR Little Endian: read with numpy at the recorded offset."""

JPEG_LOSSLESS_SYNTAXES: frozenset[str] = frozenset({"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"})
"""JPEG Lossless Process 14 (any predictor, and Selection Value 1): decoded by :data:`JPEG_DECODERS`."""

JPEG_DECODERS: tuple[str, ...] = ("dicomsdl", "gdcm", "libjpeg")
"""Direct JPEG Lossless decoders, fastest first (see the module docstring for the measurements)."""

_DECODER_MODULES: dict[str, str] = {"dicomsdl": "dicomsdl", "gdcm": "gdcm", "libjpeg": "libjpeg"}

DISABLE_ENV = "CSPINE_SUBMIT_NO_DIRECT_DECODE"
"""Set (to anything but "" or "0") to send every slice through pydicom's plugins. An environment variable, so that
the worker processes a run spawns inherit it: the start-up check (:mod:`cspine_submit.read.preflight`) sets it when a
direct decoder gives other values than pydicom's."""


def direct_enabled() -> bool:
    """False when :data:`DISABLE_ENV` turns the direct route off."""
    return os.environ.get(DISABLE_ENV, "") in ("", "0")


def disable_direct() -> None:
    """Turn the direct route off for this process and the processes it starts from now on."""
    os.environ[DISABLE_ENV] = "1"


class NotDirect(Exception):
    """This slice cannot be decoded directly (syntax, layout or decoder): decode it through pydicom instead."""


@dataclass(frozen=True)
class PixelSpec:
    """Where one slice's Pixel Data lies in its file and how its stored values read, as the header scan found them.

    Attributes
    ----------
    fragments : tuple of (int, int)
        ``(byte offset, length)`` in the file: of the element's value for uncompressed data (one range), of each
        fragment of the frame for encapsulated data (the Basic Offset Table item left out).
    encapsulated : bool
        True for compressed (encapsulated) Pixel Data.
    rows, cols : int
    bits_allocated, bits_stored : int
    signed : bool
        PixelRepresentation 1 (two's complement).
    samples : int
        SamplesPerPixel.
    photometric : str
        PhotometricInterpretation ("" when absent).
    slope, intercept : float
        RescaleSlope and RescaleIntercept (1 and 0 when absent or unreadable).
    """

    fragments: tuple[tuple[int, int], ...]
    encapsulated: bool
    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    samples: int = 1
    photometric: str = "MONOCHROME2"
    slope: float = 1.0
    intercept: float = 0.0

    @property
    def dtype(self) -> np.dtype:
        """pydicom's dtype for the stored values (little endian)."""
        return np.dtype(f"<{'i' if self.signed else 'u'}{self.bits_allocated // 8}")

    @property
    def n_bytes(self) -> int:
        """Bytes of one decoded frame."""
        return self.rows * self.cols * (self.bits_allocated // 8)


def available_jpeg_decoders() -> tuple[str, ...]:
    """The direct JPEG Lossless decoders importable here, in the order :func:`read_stored` tries them."""
    out = []
    for name in JPEG_DECODERS:
        try:
            importlib.import_module(_DECODER_MODULES[name])
        except Exception:  # noqa: BLE001 - an installed module that fails to import is as good as absent
            continue
        out.append(name)
    return tuple(out)


_AVAILABLE: tuple[str, ...] | None = None


def _decoders() -> tuple[str, ...]:
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = available_jpeg_decoders()
    return _AVAILABLE


def direct_route(tsyntax: str, spec: PixelSpec | None) -> str | None:
    """How :func:`read_stored` would decode this slice: ``"native"``, a JPEG decoder's name, or None (pydicom)."""
    if spec is None or spec.samples != 1 or spec.bits_allocated not in (8, 16) or not direct_enabled():
        return None
    if not 0 < spec.bits_stored <= spec.bits_allocated or spec.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    if tsyntax in NATIVE_SYNTAXES and not spec.encapsulated:
        return "native"
    if tsyntax in JPEG_LOSSLESS_SYNTAXES and spec.encapsulated and spec.bits_allocated == 16:
        decoders = _decoders()
        return decoders[0] if decoders else None
    return None


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: markers without a length


@dataclass(frozen=True)
class FrameHeader:
    """A JPEG codestream's frame header (its SOF segment), as ISO/IEC 10918-1 B.2.2 lays it out.

    Attributes
    ----------
    marker : int
        The SOF marker's second byte (0xC3: lossless, Huffman; the JPEG Lossless syntaxes' only one).
    precision : int
        Sample precision P, bits.
    rows, cols : int
        Number of lines Y and samples per line X (Y 0: lines defined later by a DNL marker).
    components : int
    """

    marker: int
    precision: int
    rows: int
    cols: int
    components: int


def frame_header(frame: bytes) -> FrameHeader:
    """Parse the SOF segment of a JPEG codestream: SOI, then marker segments up to the first SOFn.

    Only the segment headers are read (a few bytes each), never the entropy-coded data.

    Raises
    ------
    NotDirect
        No SOI at the start, a segment that runs past the end, or no SOF before the first scan.
    """
    if frame[:2] != b"\xff\xd8":
        raise NotDirect("the JPEG frame does not start with SOI")
    pos, end = 2, len(frame)
    while pos + 4 <= end:
        if frame[pos] != 0xFF:
            raise NotDirect(f"no JPEG marker at byte {pos} of the frame")
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        length = frame[pos + 2] << 8 | frame[pos + 3]
        if marker in _SOF_MARKERS:
            if length < 8 or pos + 2 + length > end:
                raise NotDirect("the JPEG frame header is cut off")
            seg = frame[pos + 4:pos + 10]
            return FrameHeader(marker=marker, precision=seg[0], rows=seg[1] << 8 | seg[2], cols=seg[3] << 8 | seg[4],
                               components=seg[5])
        if marker in (0xDA, 0xD9) or length < 2:  # a scan or the end before any frame header
            break
        pos += 2 + length
    raise NotDirect("no JPEG frame header (SOF) in the frame")


def check_frame(frame: bytes, spec: PixelSpec) -> FrameHeader:
    """The frame's SOF against the DICOM header, before any decoder writes a byte.

    A direct decoder writes ``rows x cols`` samples of ``precision`` bits for each of ``components``: that must be
    exactly the output the header describes (a lossless SOF3 frame, Rows x Columns, one component, a precision
    from BitsStored to BitsAllocated that decodes to BitsAllocated-wide samples), else the decoder may write past
    its output, fill only part of it, or give samples of another width.

    Raises
    ------
    NotDirect
        Any mismatch: pydicom decodes the slice (or reports it).
    """
    head = frame_header(frame)
    if head.marker != 0xC3:
        raise NotDirect(f"JPEG frame is SOF{head.marker - 0xC0}, not lossless SOF3")
    if (head.rows, head.cols, head.components) != (spec.rows, spec.cols, spec.samples):
        raise NotDirect(f"JPEG frame is {head.rows}x{head.cols}x{head.components}, the header says "
                        f"{spec.rows}x{spec.cols}x{spec.samples}")
    low = max(spec.bits_stored, 9 if spec.bits_allocated == 16 else 2)
    if not low <= head.precision <= spec.bits_allocated:
        raise NotDirect(f"JPEG precision {head.precision} under BitsStored {spec.bits_stored} / BitsAllocated "
                        f"{spec.bits_allocated}")
    return head


def correct_unused_bits(arr: np.ndarray, bits_allocated: int, bits_stored: int) -> np.ndarray:
    """pydicom's unused-bits correction, in place: shift left then right by ``bits_allocated - bits_stored``.

    On a signed dtype the right shift is arithmetic and sign-extends bit ``bits_stored - 1``; on an unsigned one it
    clears the unused high bits.
    """
    shift = bits_allocated - bits_stored
    if shift > 0 and arr.dtype.kind == "u":
        np.bitwise_and(arr, arr.dtype.type((1 << bits_stored) - 1), out=arr)  # the same as both shifts, one pass
    elif shift > 0:
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    return arr


def _read_ranges(path: Path, ranges: tuple[tuple[int, int], ...]) -> bytes:
    with open(path, "rb", buffering=0) as fp:
        parts = []
        for offset, length in ranges:
            fp.seek(offset)
            data = fp.read(length)
            if len(data) != length:
                raise NotDirect(f"{path}: the file ends inside its Pixel Data")
            parts.append(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _frame_gdcm(frame: bytes, spec: PixelSpec, tsyntax: str) -> bytes:
    """pydicom's GDCM plugin, without pydicom: the frame as a one-fragment GDCM image."""
    import gdcm

    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(frame)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetValue(fragments.__ref__())
    img = gdcm.Image()
    img.SetNumberOfDimensions(2)
    img.SetDimensions((spec.cols, spec.rows, 1))
    img.SetDataElement(elem)
    pi = gdcm.PhotometricInterpretation.GetPIType(spec.photometric or "MONOCHROME2")
    img.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi))
    img.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(tsyntax)))
    img.SetPixelFormat(gdcm.PixelFormat(1, spec.bits_allocated, spec.bits_stored, spec.bits_stored - 1,
                                        int(spec.signed)))
    # GDCM hands the buffer over as a str; surrogateescape gives the bytes back unchanged.
    return img.GetBuffer().encode("utf-8", "surrogateescape")


def _frame_libjpeg(frame: bytes) -> bytes:
    from libjpeg.utils import decode_pixel_data

    return decode_pixel_data(frame, version=2)


_DICOMSDL_LOG: list = []


def _dicomsdl_logger(level, message: str) -> None:
    _DICOMSDL_LOG.append(message)


def _stored_dicomsdl(path: Path, spec: PixelSpec, out: np.ndarray) -> np.ndarray:
    """dicomsdl's decode into ``out``, checked first: dicomsdl's own reading of the header must be ours, the frame it
    decodes must pass :func:`check_frame` (dicomsdl writes as many samples as the frame holds, whatever ``out``'s
    size), and the decode must log nothing: dicomsdl reports a truncated or corrupt codestream (libjpeg-turbo's
    "Premature end of JPEG file", "Corrupt JPEG data") only as a log message, with zeros or stale values in
    ``out`` and success."""
    import dicomsdl

    df = dicomsdl.open(str(path))
    info = df.getPixelDataInfo()
    if (info["Rows"], info["Cols"], info["NumberOfFrames"], info["SamplesPerPixel"], info["BitsAllocated"],
            info["BitsStored"], bool(info["PixelRepresentation"])) != (
            spec.rows, spec.cols, 1, 1, spec.bits_allocated, spec.bits_stored, spec.signed):
        raise NotDirect(f"{path}: dicomsdl reads the header otherwise ({info})")
    check_frame(df.getDataElement("PixelData").toPixelSequence().encodedFrameData(0), spec)
    _DICOMSDL_LOG.clear()
    # Our logger only for the decode: a Python callable left in dicomsdl's static logger deadlocks the process at
    # exit (its destructor waits for the GIL after Python has finalized).
    dicomsdl.set_logger_function(_dicomsdl_logger)
    try:
        df.copyFrameData(0, out)
    finally:
        dicomsdl.set_default_logger_function()
    if _DICOMSDL_LOG:
        message = _DICOMSDL_LOG[0]
        _DICOMSDL_LOG.clear()
        raise NotDirect(f"{path}: dicomsdl: {message}")
    return out


def _read_native(path: Path, offset: int, out: np.ndarray) -> np.ndarray:
    with open(path, "rb", buffering=0) as fp:
        fp.seek(offset)
        got = fp.readinto(memoryview(out).cast("B"))
    if got != out.nbytes:
        raise NotDirect(f"{path}: the file ends inside its Pixel Data")
    return out


def read_stored(path: str | Path, tsyntax: str, spec: PixelSpec | None, decoder: str | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """Decode one slice's stored values directly, as pydicom would give them.

    Parameters
    ----------
    path : str or Path
    tsyntax : str
        The file's transfer syntax (from the scan).
    spec : PixelSpec
        From the scan.
    decoder : str, optional
        Force one JPEG decoder of :data:`JPEG_DECODERS` (tests, benchmarks); by default the fastest available.
    out : (rows, cols) ndarray of ``spec.dtype``, optional
        Decode into this array (e.g. a scratch buffer kept by the caller: fresh memory for every slice costs page
        faults, measured here as a large share of a fast decode); a new array by default.

    Returns
    -------
    (rows, cols) ndarray of int8/uint8/int16/uint16
        Stored values (``spec.dtype``), unused bits corrected; not yet rescaled to HU (``out`` when given).

    Raises
    ------
    NotDirect
        The slice needs pydicom (another syntax or layout, no direct decoder, or the direct decoder failed).
    """
    path = Path(path)
    route = direct_route(tsyntax, spec)
    if route is None:
        raise NotDirect(f"{path}: no direct route for {tsyntax}")
    if out is None:
        out = np.empty((spec.rows, spec.cols), dtype=spec.dtype)
    elif out.shape != (spec.rows, spec.cols) or out.dtype != spec.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous ({spec.rows}, {spec.cols}) {spec.dtype} array, got "
                         f"{out.shape} {out.dtype}")
    if route == "native":
        routes = ("native",)
    elif decoder is not None:
        if decoder not in JPEG_DECODERS:
            raise ValueError(f"unknown direct decoder {decoder!r}; known: {', '.join(JPEG_DECODERS)}")
        routes = (decoder,)
    else:
        routes = _decoders()  # each checked; a refusal passes the slice to the next one
    reasons = []
    for name in routes:
        try:
            arr = _decode_route(name, path, tsyntax, spec, out)
        except Exception as exc:  # noqa: BLE001 - whatever a direct decoder raises, the next (or pydicom) has a go
            reasons.append(str(exc) if isinstance(exc, NotDirect) else f"{name} failed ({type(exc).__name__}: {exc})")
            continue
        return correct_unused_bits(arr, spec.bits_allocated, spec.bits_stored)
    raise NotDirect(f"{path}: " + "; ".join(reasons))


def _decode_route(route: str, path: Path, tsyntax: str, spec: PixelSpec, out: np.ndarray) -> np.ndarray:
    """One direct route's decode into ``out`` (every sample written, or an exception)."""
    if route == "native":
        (offset, length), = spec.fragments
        if length < spec.n_bytes:
            raise NotDirect(f"{path}: Pixel Data holds {length} bytes, {spec.n_bytes} expected")
        return _read_native(path, offset, out)  # straight from the file into the array: one copy
    if route == "dicomsdl":
        return _stored_dicomsdl(path, spec, out)
    frame = _read_ranges(path, spec.fragments)
    check_frame(frame, spec)
    # Both decode into a buffer of their own, sized from the checked frame header, then copied: no write outside it.
    data = _frame_gdcm(frame, spec, tsyntax) if route == "gdcm" else _frame_libjpeg(frame)
    if len(data) != spec.n_bytes:
        raise NotDirect(f"{path}: {route} decoded {len(data)} bytes, {spec.n_bytes} expected")
    out[...] = np.frombuffer(data, dtype=spec.dtype).reshape(spec.rows, spec.cols)
    return out
