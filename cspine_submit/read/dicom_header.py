"""A slice file's header read without pydicom: the few values the header scan needs, and where Pixel Data starts.

:func:`cspine_submit.read.slice_header.read_slice_header` runs for every file of a study (150 to 1000 of them), and
``pydicom.dcmread(..., stop_before_pixels=True, specific_tags=...)`` costs about 0.35-0.6 ms a file, several times what
walking the header's elements in a tight loop costs. :func:`scan_header` does that walk for the files the competition
has (a 128-byte preamble and ``DICM``, a File Meta group in Explicit VR Little Endian, then a dataset in Implicit or
Explicit VR Little Endian: uncompressed or encapsulated JPEG) and stops in front of Pixel Data, exactly where pydicom
stops, so that the caller checks Pixel Data with the same code as before.

It gives what pydicom's reader gives or nothing: it reproduces pydicom's element walk (top-level elements of
defined length skipped, sequences of undefined length walked item by item as pydicom parses them, the tags that stop
the read) and leaves every case it does not reproduce with certainty to pydicom by raising :class:`NotFast`: no
preamble, a transfer syntax other than the little-endian ones listed in :data:`FAST_SYNTAXES` (big endian, deflated,
retired or unknown), an unknown or switched VR, tags out of order, a delimiter where none belongs, an undefined-length
element that is not a sequence, a wanted tag with another VR than the standard's or an odd length, an element that
runs past the end of the file. The caller then reads the file through pydicom, so results and error messages on
unusual files do not change (the tests compare both routes on every test file).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

DISABLE_ENV = "CSPINE_SUBMIT_NO_FAST_HEADER"
"""Set (to anything but "" or "0") to read every header through pydicom (benchmarks, comparisons). An environment
variable, so that the worker processes of a run inherit it."""

WANTED: dict[str, tuple[int, str]] = {
    "StudyInstanceUID": (0x0020000D, "UI"), "SeriesInstanceUID": (0x0020000E, "UI"),
    "InstanceNumber": (0x00200013, "IS"), "ImagePositionPatient": (0x00200032, "DS"),
    "ImageOrientationPatient": (0x00200037, "DS"), "PixelSpacing": (0x00280030, "DS"),
    "SliceThickness": (0x00180050, "DS"), "SpacingBetweenSlices": (0x00180088, "DS"),
    "Rows": (0x00280010, "US"), "Columns": (0x00280011, "US"), "SamplesPerPixel": (0x00280002, "US"),
    "NumberOfFrames": (0x00280008, "IS"), "BitsAllocated": (0x00280100, "US"), "BitsStored": (0x00280101, "US"),
    "PixelRepresentation": (0x00280103, "US"), "PhotometricInterpretation": (0x00280004, "CS"),
    "RescaleSlope": (0x00281053, "DS"), "RescaleIntercept": (0x00281052, "DS"),
}
"""keyword -> (tag, VR) of every value the header scan reads (the standard's VR: implicit files carry none)."""

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

FAST_SYNTAXES: frozenset[str] = frozenset({
    IMPLICIT_LE, EXPLICIT_LE,
    # encapsulated syntaxes: pydicom reads their datasets as Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
})
"""Transfer syntaxes read here; any other goes to pydicom."""

_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})  # where stop_before_pixels stops (pydicom 3)
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_CHUNK = 8192  # bytes read at a time: a CT header is usually 1-4 KB

_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHI")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")


def fast_enabled() -> bool:
    """False when :data:`DISABLE_ENV` sends every header to pydicom."""
    return os.environ.get(DISABLE_ENV, "") in ("", "0")


class NotFast(Exception):
    """This file's header is not one :func:`scan_header` reads with certainty: read it through pydicom instead."""


@dataclass(frozen=True)
class HeaderScan:
    """What :func:`scan_header` found in one file.

    Attributes
    ----------
    transfer_syntax : str
        TransferSyntaxUID of the File Meta group, trailing NUL and space padding removed (as pydicom's ``UI``).
    pixel_tell : int
        Byte offset of the Pixel Data element's tag (where pydicom's ``stop_before_pixels`` leaves the file).
    raw : dict of {int: bytes or None}
        Tag -> value bytes of the wanted tags present (:data:`WANTED`); None for an empty value.
    """

    transfer_syntax: str
    pixel_tell: int
    raw: dict

    def value(self, keyword: str, default=None):
        """The value :func:`cspine_submit.read.slice_header._header_value` gives for ``keyword`` from pydicom's dataset.

        ``default`` when the tag is absent; None (DS, IS, US) or "" (UI, CS) for an empty value, as pydicom converts
        one; else :func:`decode_raw` (ValueError where pydicom cannot convert the value).
        """
        tag, vr = WANTED[keyword]
        if tag not in self.raw:
            return default
        raw = self.raw[tag]
        return empty_value(vr) if raw is None else decode_raw(raw, vr)


def empty_value(vr: str):
    """pydicom's value for an empty element (``Dataset.get`` converts it: None for numbers, "" for text)."""
    return None if vr in ("DS", "IS", "US") else ""


def decode_raw(raw: bytes, vr: str):
    """A scanned value from its bytes (little endian), converted exactly as pydicom converts it.

    pydicom's own converters (``pydicom.values.converters``) parse the value, so that both header routes give
    pydicom's values: a single-valued DS ``'123'`` is 123.0, IS ``'7.0'`` is 7, a DS with a leading NUL is an
    error. Results are cached by value (a series repeats most of them from file to file).

    Returns
    -------
    int, float, str or tuple
        An int for ``US``, a float for ``DS``, an int for ``IS``, a str for ``UI`` / ``CS``; a tuple of them for
        several values (None for an empty one among several).

    Raises
    ------
    ValueError
        pydicom cannot convert the value (its message).
    """
    if vr == "US" and len(raw) == 2:
        return _U16.unpack(raw)[0]
    key = (vr, raw)
    got = _CONVERTED.get(key)
    if got is None:
        got = _convert(raw, vr)
        if len(_CONVERTED) > 20000:  # a long run's unique positions: keep the cache small
            _CONVERTED.clear()
        _CONVERTED[key] = got
    ok, value = got
    if not ok:
        raise ValueError(value)
    return value


_CONVERTED: dict = {}


def _convert(raw: bytes, vr: str) -> tuple[bool, object]:
    """``(True, value)`` with pydicom's value as plain Python types, or ``(False, message)``."""
    import warnings

    from pydicom import values

    converter = values.converters[vr]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about non-conformant values it still converts
            value = converter[0](raw, True, converter[1]) if isinstance(converter, tuple) else converter(raw, True)
    except Exception as exc:  # noqa: BLE001 - whatever pydicom raises, the value is unreadable for it too
        return False, f"{type(exc).__name__}: {exc}"
    return True, plain_value(value, vr)


def plain_value(value, vr: str):
    """pydicom's converted value as plain Python types (float, int, str; a tuple of them for several values)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return tuple(plain_value(v, vr) for v in value)
    if value is None or value == "" and vr in ("DS", "IS"):
        return None
    if vr == "DS":
        return float(value)
    if vr in ("IS", "US"):
        return int(value)
    return str(value)


_TABLES: dict = {}


def _tables() -> dict:
    """pydicom's own VR tables, so that what counts as a known VR and as a 4-byte length is pydicom's; NotFast when
    pydicom is configured to read otherwise than the walk reproduces (its defaults)."""
    from pydicom import config

    if not (config.settings.infer_sq_for_un_vr and config.assume_implicit_vr_switch
            and not config.use_none_as_empty_text_VR_value
            and config.settings.reading_validation_mode != config.RAISE):
        raise NotFast("pydicom is configured otherwise than the walk assumes")
    if not _TABLES:
        from pydicom.datadict import _dictionary_vr_fast
        from pydicom.filereader import ENCODED_VR
        from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

        _TABLES.update(
            known=frozenset(v for v in ENCODED_VR if len(v) == 2),
            long=frozenset(str(v).encode() for v in EXPLICIT_VR_LENGTH_32),
            wanted={tag: vr.encode() for tag, vr in WANTED.values()},
            dictionary_vr=_dictionary_vr_fast,
        )
    return _TABLES


class _Reader:
    """Bytes of an open file by absolute offset, read in chunks (a header walk reads a few KB, then jumps)."""

    __slots__ = ("fp", "size", "base", "buf")

    def __init__(self, fp, size: int):
        self.fp, self.size = fp, size
        self.base = 0
        self.buf = fp.read(_CHUNK)

    def window(self, pos: int, n: int) -> tuple[bytes, int]:
        """``(buffer, index)`` with ``buffer[index:index + n]`` the file's bytes at ``pos``; NotFast past the end."""
        i = pos - self.base
        if 0 <= i and i + n <= len(self.buf):
            return self.buf, i
        if pos + n > self.size:
            raise NotFast("the file ends inside the header")
        self.fp.seek(pos)
        self.buf = self.fp.read(max(n, _CHUNK))
        self.base = pos
        if len(self.buf) < n:
            raise NotFast("short read")
        return self.buf, 0


def scan_header(fp, file_size: int) -> HeaderScan:
    """Walk one file's header up to Pixel Data, as ``pydicom.dcmread(fp, stop_before_pixels=True)`` would.

    Parameters
    ----------
    fp : binary file object
        At the start of the file; left anywhere.
    file_size : int
        Bytes in the file.

    Returns
    -------
    HeaderScan

    Raises
    ------
    NotFast
        The file is not one this walk reads exactly like pydicom (see the module docstring): read it with pydicom.
    """
    t = _tables()
    reader = _Reader(fp, file_size)
    buf = reader.buf
    if len(buf) < 132 + 12 or buf[128:132] != b"DICM":
        raise NotFast("no preamble")
    tsyntax, pos = _file_meta(reader, t)
    implicit = tsyntax == IMPLICIT_LE
    raw: dict = {}
    pixel_tell = (_walk_implicit if implicit else _walk_explicit)(reader, pos, raw, t)
    return HeaderScan(transfer_syntax=tsyntax, pixel_tell=pixel_tell, raw=raw)


def _file_meta(reader: _Reader, t: dict) -> tuple[str, int]:
    """The File Meta group (Explicit VR Little Endian): its transfer syntax and the offset after it."""
    known, long_vrs = t["known"], t["long"]
    pos, tsyntax, last = 132, None, -1
    while True:
        buf, i = reader.window(pos, 12)
        group, elem, vr, length = _EXPLICIT.unpack_from(buf, i)
        if group != 2:
            break
        tag = group << 16 | elem
        if tag <= last or vr not in known:
            raise NotFast("unusual File Meta group")
        if tag == 0x00020000 and (vr != b"UL" or length != 4):
            raise NotFast("File Meta group length of another VR or size than UL, 4 bytes")  # pydicom refuses it
        last = tag
        if vr in long_vrs:
            length = _U32.unpack_from(buf, i + 8)[0]
            pos += 12
        else:
            pos += 8
        if length == _UNDEFINED:
            raise NotFast("undefined length in the File Meta group")
        if tag == 0x00020010:
            if vr != b"UI":
                raise NotFast("TransferSyntaxUID is not UI")
            buf, i = reader.window(pos, length)
            tsyntax = buf[i:i + length].decode("latin-1").rstrip("\0 ")
        pos += length
    if tsyntax not in FAST_SYNTAXES:
        raise NotFast(f"transfer syntax {tsyntax!r}")
    return tsyntax, pos


def _take(reader: _Reader, raw: dict, tag: int, pos: int, length: int) -> None:
    """Keep a wanted tag's value bytes (None for an empty value, as pydicom's raw element holds for DS/IS/US)."""
    if length == 0:
        raw[tag] = None
        return
    if length != 2 and tag in _US_TAGS:
        raise NotFast("US value of another length than 2")  # pydicom's conversion decides what that gives
    if pos + length > reader.size:
        raise NotFast("value past the end of the file")
    buf, i = reader.window(pos, length)
    raw[tag] = buf[i:i + length]


_US_TAGS = frozenset(tag for tag, vr in WANTED.values() if vr == "US")


def _walk_explicit(reader: _Reader, pos: int, raw: dict, t: dict) -> int:
    """Top-level Explicit VR Little Endian dataset from ``pos``: collect wanted values; return Pixel Data's offset."""
    known, long_vrs, wanted, us_tags = t["known"], t["long"], t["wanted"], _US_TAGS
    size = reader.size
    unpack, unpack_u32 = _EXPLICIT.unpack_from, _U32.unpack_from
    buf, base = reader.buf, reader.base
    last = 0x0002FFFF
    buf_, i = reader.window(pos, 12)
    vr = buf_[i + 4:i + 6]
    # pydicom checks the first element's VR bytes and switches to implicit VR when they are not capital letters
    if not (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B):
        raise NotFast("dataset does not look explicit")
    while True:
        i = pos - base
        if i < 0 or i + 12 > len(buf):  # (the common case, a header in the first chunk, skips this)
            buf, i = reader.window(pos, 12)
            base = pos - i
        group, elem, vr, length = unpack(buf, i)
        tag = group << 16 | elem
        if tag >= 0x7FE00008:
            if tag in _PIXEL_TAGS:
                return pos
            raise NotFast("tag past Pixel Data, or Pixel Data out of order")
        if tag <= last or vr not in known or (tag == 0x00080005 and vr != b"CS"):
            raise NotFast("tags out of order or unknown VR")  # (pydicom converts SpecificCharacterSet as CS)
        last = tag
        if vr in long_vrs:
            length = unpack_u32(buf, i + 8)[0]
            pos += 12
            i += 12
        else:
            pos += 8
            i += 8
        if length == _UNDEFINED:
            if vr != b"SQ" or tag in wanted:
                raise NotFast("undefined length outside a sequence")
            pos = _sequence(reader, pos, False, t)
            buf, base = reader.buf, reader.base
            continue
        if tag in wanted:
            if vr != wanted[tag]:
                raise NotFast("wanted tag with another VR")
            if 0 < length and i + length <= len(buf) and (length == 2 or tag not in us_tags):
                raw[tag] = buf[i:i + length]  # (the common case of _take, inline)
            else:
                _take(reader, raw, tag, pos, length)
                buf, base = reader.buf, reader.base
        pos += length
        if pos > size:
            raise NotFast("value past the end of the file")


def _walk_implicit(reader: _Reader, pos: int, raw: dict, t: dict) -> int:
    """Top-level Implicit VR Little Endian dataset from ``pos``: collect wanted values; return Pixel Data's offset."""
    wanted = t["wanted"]
    size = reader.size
    unpack = _IMPLICIT.unpack_from
    buf, base = reader.buf, reader.base
    last = 0x0002FFFF
    buf_, i = reader.window(pos, 8)
    # pydicom switches to explicit VR when the first element's bytes 4-5 are capital letters
    if 0x40 < buf_[i + 4] < 0x5B and 0x40 < buf_[i + 5] < 0x5B:
        raise NotFast("dataset looks explicit")
    while True:
        i = pos - base
        if i < 0 or i + 8 > len(buf):
            buf, i = reader.window(pos, 8)
            base = pos - i
        group, elem, length = unpack(buf, i)
        tag = group << 16 | elem
        if tag >= 0x7FE00008:
            if tag in _PIXEL_TAGS:
                return pos
            raise NotFast("tag past Pixel Data, or Pixel Data out of order")
        if tag <= last:
            raise NotFast("tags out of order")
        last = tag
        pos += 8
        if length == _UNDEFINED:
            if tag in wanted or not _implicit_is_sequence(reader, tag, pos, t):
                raise NotFast("undefined length outside a sequence")
            pos = _sequence(reader, pos, True, t)
            buf, base = reader.buf, reader.base
            continue
        if tag in wanted:
            _take(reader, raw, tag, pos, length)
            buf, base = reader.buf, reader.base
        pos += length
        if pos > size:
            raise NotFast("value past the end of the file")


def _implicit_is_sequence(reader: _Reader, tag: int, pos: int, t: dict) -> bool:
    """pydicom's rule for an undefined-length element in implicit VR: its dictionary VR is SQ, or, for a tag the
    dictionary lacks, its value starts with an item tag."""
    try:
        return t["dictionary_vr"](tag) == "SQ"
    except KeyError:
        buf, i = reader.window(pos, 4)
        return _U32.unpack_from(buf, i)[0] == 0xE000FFFE  # (FFFE,E000) as little-endian group, element


def _sequence(reader: _Reader, pos: int, implicit: bool, t: dict) -> int:
    """An undefined-length sequence's items from ``pos`` to its delimiter, as pydicom's ``read_sequence`` walks them;
    returns the offset after the delimiter."""
    size = reader.size
    while True:
        buf, i = reader.window(pos, 8)
        group, elem, length = _IMPLICIT.unpack_from(buf, i)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise NotFast("not an item inside a sequence")
        if length == _UNDEFINED:
            pos = _item(reader, pos, None, implicit, t)
        else:
            end = pos + length
            if end > size:
                raise NotFast("item past the end of the file")
            if _item(reader, pos, end, implicit, t) != end:
                raise NotFast("item elements do not fill the item")
            pos = end


def _item(reader: _Reader, pos: int, end: int | None, implicit: bool, t: dict) -> int:
    """One item's dataset from ``pos``: to ``end`` (defined length) or to its delimiter (``end`` None); returns the
    offset after it. pydicom reads every element of an item (no tag is skipped there): only their extent matters."""
    known, long_vrs = t["known"], t["long"]
    size = reader.size
    first = True
    while end is None or pos < end:
        buf, i = reader.window(pos, 8)
        group, elem, length = _IMPLICIT.unpack_from(buf, i)
        tag = group << 16 | elem
        if tag == _ITEM_END:
            if end is not None:
                raise NotFast("item delimiter inside an item of defined length")
            return pos + 8
        if group == 0xFFFE:
            raise NotFast("item or sequence delimiter where an element belongs")
        if implicit:
            pos += 8
        else:
            vr = buf[i + 4:i + 6]
            if first and not (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B):
                raise NotFast("implicit VR inside an explicit sequence")  # pydicom switches; not reproduced
            if vr not in known:
                raise NotFast("unknown VR")
            if vr in long_vrs:
                buf, i = reader.window(pos, 12)
                length = _U32.unpack_from(buf, i + 8)[0]
                pos += 12
            else:
                length = _U16.unpack_from(buf, i + 6)[0]
                pos += 8
        first = False
        if length != _UNDEFINED:
            pos += length
            if pos > size:
                raise NotFast("value past the end of the file")
        elif (vr == b"SQ") if not implicit else _implicit_is_sequence(reader, tag, pos, t):
            pos = _sequence(reader, pos, implicit, t)
        else:
            raise NotFast("undefined length outside a sequence")
    return pos
