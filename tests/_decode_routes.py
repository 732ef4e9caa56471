"""Every read route on one file, compared with pydicom's: run as a script in a subprocess, so that a decoder that
crashes the process fails the test instead of killing the test session.

``python tests/_decode_routes.py FILE...`` prints one JSON line per file::

    {"file": ..., "header": "same" | "both refuse" | "DIFF <field>" | "fast refuses" | "pydicom refuses",
     "ref": "ok" | "error",
     "routes": {"reader": ..., "reader int16": ..., "<direct decoder>": ...}}

where each route is "same" (pydicom's HU exactly (for the GDCM and libjpeg direct decoders: the HU of pydicom's
plugin on the same library), every element written over a sentinel fill), "refused" (an error:
NotDirect for a direct decoder, DicomReadError for the reader), or "DIFF ..." (other values: the failure the tests
look for). The reference is pydicom's route, ``decode_slice(path, direct=False)``; a file whose header pydicom's route
refuses has no reference, and every route must then refuse it too.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from cspine_submit.read import dicom, pixels
from cspine_submit.read.slice_header import DicomReadError, read_slice_header

SENTINEL = 12345


def _header(path: Path) -> tuple[str, object]:
    """Both header routes: ``(verdict, SliceInfo of the default route, or None when a route refuses)``."""
    results = []
    for fast in (True, False):
        try:
            results.append(read_slice_header(path, fast=fast))
        except DicomReadError as exc:
            results.append(exc)
    fast, slow = results
    if isinstance(fast, Exception) or isinstance(slow, Exception):
        verdict = ("both refuse" if isinstance(fast, Exception) and isinstance(slow, Exception)
                   else "fast refuses" if isinstance(fast, Exception) else "pydicom refuses")
        return verdict, None
    for f in dataclasses.fields(fast):
        if f.name == "pixels":
            continue  # pydicom's route leaves the pixels to pydicom; the fast route's spec is checked by decoding
        x, y = getattr(fast, f.name), getattr(slow, f.name)
        same = (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y)) \
            if isinstance(x, np.ndarray) or isinstance(y, np.ndarray) else x == y
        if not same:
            return f"DIFF {f.name}: {x!r} vs {y!r}", fast
    return "same", fast


def _verdict(got: np.ndarray, ref: np.ndarray | None) -> str:
    if ref is None:
        return "DIFF: decoded what pydicom refuses"
    if got.shape != ref.shape:
        return f"DIFF shape {got.shape} vs {ref.shape}"
    bad = int(np.count_nonzero(got.astype(np.float64) != ref.astype(np.float64)))
    return "same" if bad == 0 else f"DIFF {bad} values"


PLUGIN_OF = {"gdcm": "gdcm", "libjpeg": "pylibjpeg"}


def _plugin_hu(path: Path, tsyntax: str, plugin: str) -> np.ndarray | None:
    try:
        return dicom.decode_slice(path, tsyntax, plugin=plugin, direct=False)
    except DicomReadError:
        return None


def check(path: Path) -> dict:
    """Every route on ``path`` against pydicom's (see the module docstring)."""
    verdict, info = _header(path)
    out = {"file": str(path), "header": verdict, "ref": "error", "routes": {}}
    if info is None:
        return out
    try:
        ref = dicom.decode_slice(path, info.transfer_syntax, direct=False)
        out["ref"] = "ok"
    except DicomReadError:
        ref = None
    header = dicom.StudyHeader(folder=path.parent, study_uid="", files=(path,), z=np.zeros(1), spacing=(1.0, 1.0, 1.0),
                               rows=info.rows, cols=info.cols, transfer_syntaxes=(info.transfer_syntax,),
                               pixels=(info.pixels,))
    dtypes = [np.float32] + ([np.int16] if dicom.hu_dtype(header) == np.int16 else [])
    for dtype in dtypes:
        name = "reader" if dtype == np.float32 else "reader int16"
        buf = np.full((info.rows, info.cols), SENTINEL, dtype=dtype)  # stale values would show as the sentinel
        try:
            dicom.decode_into(header, 0, buf)
        except DicomReadError:
            out["routes"][name] = "refused" if ref is None else "DIFF: refused what pydicom decodes"
            continue
        out["routes"][name] = _verdict(buf, ref)
    spec = info.pixels
    if spec is not None and pixels.direct_route(info.transfer_syntax, spec) not in (None, "native"):
        for decoder in pixels.available_jpeg_decoders():
            # GDCM and libjpeg stand for pydicom's gdcm and pylibjpeg plugins: each must give its plugin's values
            # (the two plugins disagree on some broken codestreams; the reader tries them in pydicom's order).
            plugin = PLUGIN_OF.get(decoder)
            want = ref if plugin is None else _plugin_hu(path, info.transfer_syntax, plugin)
            buf = np.full((spec.rows, spec.cols), 77, dtype=spec.dtype)
            try:
                stored = pixels.read_stored(path, info.transfer_syntax, spec, decoder=decoder, out=buf)
            except pixels.NotDirect:
                out["routes"][decoder] = "refused"
                continue
            out["routes"][decoder] = _verdict(dicom.to_hu(stored, spec.slope, spec.intercept), want)
    return out


def bad(result: dict) -> list[str]:
    """What is wrong in one :func:`check` result: header disagreements and routes with other values than pydicom's."""
    problems = [f"header {result['header']}"] if result["header"] not in ("same", "both refuse") else []
    problems += [f"{name}: {v}" for name, v in result["routes"].items() if v.startswith("DIFF")]
    return problems


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(json.dumps(check(Path(arg))), flush=True)
