"""A study's headers and its planned slices decoded to HU: the read stage's main module.

Axis convention everywhere: ``volume : (z, y, x) ndarray``, z from head to feet, y rows (anterior to
posterior for a standard axial CT), x columns.

- :func:`scan_study` reads headers only (:func:`~cspine_submit.read.slice_header.read_slice_header`: the scanned
  tags, and a check that every file's Pixel Data is complete), and orders slices by ImagePositionPatient projected
  on the slice normal (:func:`~cspine_submit.read.slice_order.order_slices`). Bad, truncated, stray, duplicate or
  other-series/other-size files are listed in ``header.skipped``; the study fails only when nothing readable is left.
- :func:`read_slices` / :func:`decode_into` decode just the requested slices: straight from where the scan found
  their Pixel Data when a checked direct route applies (:mod:`cspine_submit.read.pixels`), else with
  :func:`pydicom.pixels.pixel_array` (no decoder of our own), preferring the measured-faster plugin
  (:mod:`cspine_submit.read.plugins`), then apply RescaleSlope/Intercept (:func:`to_hu`). A slice that decodes to
  another size than the study is rejected with :class:`DicomReadError`, never resized: resizing would silently
  change the pixel spacing.

The names of the split-off modules (plugin tables, slice headers, slice order) are re-exported here, so that
``cspine_submit.read.dicom`` keeps serving the code written against it. pydicom is imported inside the functions
that need it (0.2-0.4 s that the CLI's argument checks should not pay).
"""

from __future__ import annotations

import math
import os
import warnings as _warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from cspine_submit.read.pixels import NotDirect, PixelSpec, direct_route, read_stored
from cspine_submit.read.plugins import (  # noqa: F401 - re-exported: the module's names before the split
    COMPETITION_TRANSFER_SYNTAXES,
    DEFLATED,
    PLUGIN_PACKAGES,
    PREFERRED_PLUGINS,
    REQUIRED_TRANSFER_SYNTAXES,
    available_plugins,
    decoder_table,
    install_hint,
    missing_decoders,
    uid_name,
)
from cspine_submit.read.slice_header import (  # noqa: F401 - re-exported
    DicomReadError,
    SliceInfo,
    finite_float,
    read_slice_header,
)
from cspine_submit.read.slice_order import SliceOrder, natural_key, order_slices  # noqa: F401 - re-exported


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
        f"{path}: cannot decode transfer syntax {tsyntax} ({uid_name(tsyntax)}): no pydicom decoder exists for it "
        "(not gdcm, pylibjpeg, pillow or pyjpegls); convert the file first to an uncompressed or lossless syntax "
        "with a tool that reads it (e.g. dcmtk's `dcmdjpeg`)"
    )


def decode_slice(path: str | Path, tsyntax: str | None = None, *, plugin: str | None = None,
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
                    f"{path}: cannot decode transfer syntax {tsyntax} ({uid_name(tsyntax)}): no decoding plugin is "
                    f"installed; install one of: {missing}"
                )
            if tsyntax == DEFLATED:
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
            f"{path}: cannot decode pixel data ({tsyntax} {uid_name(tsyntax or '')}): {type(exc).__name__}: {exc}"
        ) from exc
    if arr.ndim != 2:
        raise DicomReadError(f"{path}: decoded pixel data has shape {arr.shape}, expected one grayscale slice")
    return to_hu(arr, _rescale(ds, path, "RescaleSlope", 1.0), _rescale(ds, path, "RescaleIntercept", 0.0))


def _rescale(ds, path: Path, keyword: str, default: float) -> float:
    """pydicom's RescaleSlope / RescaleIntercept: ``default`` when absent or empty; DicomReadError when pydicom cannot
    convert it, or it is several values or not finite (HU from it would be no numbers at all, or guessed)."""
    try:
        value = ds.get(keyword, None)
        value = default if value is None or value == "" else float(value)
    except Exception as exc:  # noqa: BLE001 - pydicom's conversion error or a multi-value: unreadable either way
        raise DicomReadError(f"{path}: cannot read {keyword} ({type(exc).__name__}: {exc})") from None
    if not math.isfinite(value):
        raise DicomReadError(f"{path}: {keyword} is {value}, not a finite number")
    return value


def read_slices(
    header: StudyHeader, indices: Iterable[int] | None = None, *, plugin: str | None = None, progress: bool = False,
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


def decode_into(header: StudyHeader, index: int, out: np.ndarray, *, plugin: str | None = None,
                direct: bool = True) -> np.ndarray:
    """Decode slice ``index`` of a scanned study to HU, written into ``out`` (no temporary float slice).

    The checked direct routes (:func:`cspine_submit.read.pixels.read_stored`) go first; a slice they refuse goes to
    pydicom's plugins, whose values or error stand.

    Parameters
    ----------
    header : StudyHeader
    index : int
        Into ``header.files``.
    out : (rows, cols) ndarray of float32, or of int16 when :func:`hu_dtype` of the study is int16
        E.g. one row of a preallocated stack; returned, every element written (or an error raised: after an
        error its contents are undefined).
    plugin, direct
        See :func:`decode_slice`.

    Raises
    ------
    DicomReadError
        The slice cannot be decoded, or is not ``(header.rows, header.cols)`` (rejected, never resized: resizing
        would silently change the pixel spacing); any other exception on the way is turned into one naming the
        file, so that a bad slice costs only that slice.
    """
    path = header.files[index]
    try:
        return _decode_into(header, index, out, plugin, direct)
    except DicomReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - one file's failure, whatever its kind, is reported as that file's
        raise DicomReadError(f"{path}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc


def _decode_into(header: StudyHeader, index: int, out: np.ndarray, plugin: str | None, direct: bool) -> np.ndarray:
    path = header.files[index]
    tsyntax = header.transfer_syntaxes[index] if index < len(header.transfer_syntaxes) else None
    spec = header.pixels[index] if index < len(header.pixels) else None
    # The route check comes before anything is built from the spec (a scratch buffer's dtype needs 8 or 16 bits).
    if direct and plugin is None and tsyntax is not None and direct_route(tsyntax, spec) is not None and \
            (spec.rows, spec.cols) == (header.rows, header.cols):
        try:
            if out.dtype == np.int16:
                return _decode_whole_hu(path, tsyntax, spec, out)
            stored = read_stored(path, tsyntax, spec, out=_scratch(spec))
        except NotDirect:
            pass  # pydicom's plugins below
        else:
            return to_hu(stored, spec.slope, spec.intercept, out=out)
    hu = decode_slice(path, tsyntax, plugin=plugin, direct=False)
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
