"""Start-up checks that a run can be right, before any study is scored: the decoders really decode.

Importing a decoder module proves little (a plugin can import and still fail, or decode to wrong values), so
:func:`check_decoders` decodes a small JPEG Lossless (.4.70, the competition's compressed syntax) CT file shipped
with the package, ``data/selftest_jpeg_lossless.dcm`` (a 64 x 64 crop of an MIT-licensed CT slice, see
``data/LICENSE_cornerstone3D_MIT.txt``), and compares the HU with their known checksum; then it decodes one file
of every transfer syntax found in the first study. A syntax nothing here can decode is a problem of the run, not of
one study: every study using it would silently get the priors. Both decode the way the run does, through the direct
route (:mod:`cspine_submit.read.pixels`); when a direct decoder gives other values than pydicom's plugins, the direct
route is turned off for the run (and its worker processes) with a warning, and pydicom decodes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SELFTEST_FILE = Path(__file__).resolve().parents[1] / "data" / "selftest_jpeg_lossless.dcm"  # package data: cspine_submit/data
"""A 64 x 64 CT slice, JPEG Lossless Process 14 SV1 (1.2.840.10008.1.2.4.70), HU -3024..1261."""

SELFTEST_SHA256 = "0517e6ed5f1cda91191a9822ec98cdea5e04b364f9f5c59b4a4ee98e5f04a718"
"""sha256 of the self-test file's HU as float32 bytes (row-major): any correct lossless decoder gives these."""


@dataclass
class DecoderCheck:
    """What the start-up decoding check found.

    Attributes
    ----------
    problems : list of str
        Why studies would be unreadable (each names the file, the transfer syntax and what to install).
    notes : list of str
        What was decoded, with which plugin.
    """

    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _hu_digest(hu: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(hu, dtype=np.float32).tobytes()).hexdigest()


def check_selftest(path: str | Path = SELFTEST_FILE, expected_sha256: str = SELFTEST_SHA256) -> DecoderCheck:
    """Decode the shipped JPEG Lossless file the way the run decodes, and check its HU exactly."""
    from cspine_submit.read import dicom
    from cspine_submit.read import pixels

    path = Path(path)
    check = DecoderCheck()
    tsyntax = "1.2.840.10008.1.2.4.70"
    plugins = dicom.available_plugins(tsyntax)
    try:
        # As the run decodes: from the scanned header (the direct route, pydicom's plugins as its fallback).
        spec = dicom.read_slice_header(path).pixels
        route = pixels.direct_route(tsyntax, spec)
        hu = dicom.decode_slice(path, tsyntax, spec=spec)
        if route is not None and _hu_digest(hu) != expected_sha256:
            ref = dicom.decode_slice(path, tsyntax, direct=False)
            if _hu_digest(ref) == expected_sha256:
                pixels.disable_direct()
                check.notes.append(f"WARNING: the direct JPEG Lossless decoder {route} decoded the self-test file to "
                                   "wrong values; direct decoding is OFF for this run (pydicom's plugins decode every "
                                   "slice, correct but slower)")
                route, hu = None, ref
    except (dicom.DicomReadError, OSError) as exc:
        hint = "" if "pip install" in str(exc) else (
            "; install " + ("; ".join(dicom.missing_decoders([tsyntax])) or "python-gdcm or pylibjpeg-libjpeg"))
        check.problems.append(f"JPEG Lossless (.4.70) cannot be decoded here, so every compressed study would get "
                              f"the priors: the self-test file failed: {exc}{hint}")
        return check
    if _hu_digest(hu) != expected_sha256:
        check.problems.append(f"JPEG Lossless (.4.70) decodes to WRONG values here: the self-test file {path} gave "
                              f"HU {float(hu.min()):.0f}..{float(hu.max()):.0f} whose checksum differs from the known "
                              f"one (plugins tried first: {', '.join(plugins) or 'none'})")
    else:
        used = f"{route} (direct)" if route else (plugins[0] if plugins else "?")
        check.notes.append(f"JPEG Lossless (.4.70) self-test decoded exactly with {used}")
    return check


def check_study_syntaxes(folder: str | Path) -> DecoderCheck:
    """Decode one file of every transfer syntax found in one study (the first of the run).

    A syntax with no decoder here is a problem; a file that fails for another reason (a corrupt file) is only a
    note: that study falls back on its own, the run is not wrong.
    """
    from cspine_submit.read import dicom
    from cspine_submit.read import pixels

    check = DecoderCheck()
    try:
        header = dicom.scan_study(folder)
    except Exception as exc:  # noqa: BLE001 - an unreadable first study is that study's problem
        check.notes.append(f"first study {folder}: not scanned ({type(exc).__name__}: {exc})")
        return check
    first_of: dict[str, int] = {}
    for i, ts in enumerate(header.transfer_syntaxes):
        first_of.setdefault(str(ts), i)
    for ts, i in first_of.items():
        path = Path(header.files[i])
        spec = header.pixels[i] if i < len(header.pixels) else None
        plugins = dicom.available_plugins(ts)
        route = pixels.direct_route(ts, spec)
        try:
            hu = dicom.decode_slice(path, ts, spec=spec)
            if route is not None and plugins and not np.array_equal(hu, _pydicom_or_none(dicom, path, ts, hu)):
                # A real file of the run where the direct route and pydicom disagree: trust pydicom, say so loudly.
                pixels.disable_direct()
                check.notes.append(f"WARNING: first study: the direct decoder {route} and pydicom's plugins disagree "
                                   f"on {path.name} ({ts}); direct decoding is OFF for this run (correct but slower)")
                route = None
        except (dicom.DicomReadError, OSError) as exc:
            if plugins:
                check.notes.append(f"first study: {path} ({ts}) did not decode ({exc}); that study may fall back")
            else:
                check.problems.append(f"the first study's transfer syntax {ts} cannot be decoded here, so the studies "
                                      f"using it would get the priors: {exc}")
        else:
            used = f"{route} (direct)" if route else (plugins[0] if plugins else "?")
            check.notes.append(f"first study: {ts} decoded with {used} ({path.name})")
    return check


def _pydicom_or_none(dicom, path: Path, tsyntax: str, default: np.ndarray) -> np.ndarray:
    """pydicom's plugins' HU of one file, or ``default`` when they cannot decode it (nothing to compare with)."""
    try:
        return dicom.decode_slice(path, tsyntax, direct=False)
    except (dicom.DicomReadError, OSError):
        return default


def check_decoders(first_study: str | Path | None = None) -> DecoderCheck:
    """:func:`check_selftest`, then :func:`check_study_syntaxes` on ``first_study`` when given (and present)."""
    check = check_selftest()
    if first_study is not None and Path(first_study).is_dir():
        more = check_study_syntaxes(first_study)
        check.problems += more.problems
        check.notes += more.notes
    return check
