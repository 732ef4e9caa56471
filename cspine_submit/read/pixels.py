"""A scanned slice's stored pixels, read straight from where the header scan found them (no second header parse).

The header scan (:func:`cspine_submit.read.slice_header.read_slice_header`) already walks to the Pixel Data element to
check that it is complete; it records what it saw as a :class:`PixelSpec`: the byte ranges of the value (uncompressed
data) or of the frame's fragments (encapsulated data), and the few attributes that say how stored values read. From
that, :func:`read_stored` decodes the competition's two storage forms without pydicom:

- uncompressed little-endian data (Implicit / Explicit VR Little Endian): the bytes at the recorded offset, viewed
  with numpy (about 10x cheaper than ``pydicom.pixels.pixel_array``, which parses the header again);
- JPEG Lossless (Process 14, .4.57, and its Selection Value 1 form, .4.70): the frame through the fastest decoder
  installed, tried in :data:`JPEG_DECODERS` order: dicomsdl, then GDCM on the frame bytes, then libjpeg on the
  frame bytes (measured on this project's 512 x 512 CT slices, one core: about 3, 7.5 and 10 ms a slice, against
  8.7 and 11.4 ms for pydicom's gdcm and pylibjpeg plugins; ``benchmarks/bench_reader.py``).

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
    if not 0 < spec.bits_stored <= spec.bits_allocated:
        return None
    if tsyntax in NATIVE_SYNTAXES and not spec.encapsulated:
        return "native"
    if tsyntax in JPEG_LOSSLESS_SYNTAXES and spec.encapsulated and spec.bits_allocated == 16:
        decoders = _decoders()
        return decoders[0] if decoders else None
    return None


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


def _stored_dicomsdl(path: Path, spec: PixelSpec, out: np.ndarray) -> np.ndarray:
    import dicomsdl

    dicomsdl.open(str(path)).copyFrameData(0, out)
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
    if decoder is not None and route != "native":
        if decoder not in JPEG_DECODERS:
            raise ValueError(f"unknown direct decoder {decoder!r}; known: {', '.join(JPEG_DECODERS)}")
        route = decoder
    if out is None:
        out = np.empty((spec.rows, spec.cols), dtype=spec.dtype)
    elif out.shape != (spec.rows, spec.cols) or out.dtype != spec.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous ({spec.rows}, {spec.cols}) {spec.dtype} array, got "
                         f"{out.shape} {out.dtype}")
    try:
        if route == "native":
            (offset, length), = spec.fragments
            if length < spec.n_bytes:
                raise NotDirect(f"{path}: Pixel Data holds {length} bytes, {spec.n_bytes} expected")
            arr = _read_native(path, offset, out)  # straight from the file into the array: one copy
        elif route == "dicomsdl":
            arr = _stored_dicomsdl(path, spec, out)
        else:
            frame = _read_ranges(path, spec.fragments)
            data = _frame_gdcm(frame, spec, tsyntax) if route == "gdcm" else _frame_libjpeg(frame)
            if len(data) != spec.n_bytes:
                raise NotDirect(f"{path}: {route} decoded {len(data)} bytes, {spec.n_bytes} expected")
            out[...] = np.frombuffer(data, dtype=spec.dtype).reshape(spec.rows, spec.cols)
            arr = out
    except NotDirect:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a direct decoder raises, pydicom gets its turn
        raise NotDirect(f"{path}: {route} failed ({type(exc).__name__}: {exc})") from exc
    return correct_unused_bits(arr, spec.bits_allocated, spec.bits_stored)
