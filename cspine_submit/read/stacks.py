"""A worker's reusable study stacks: HU slices decoded into buffers that the next study writes over.

Fresh memory for every study's slice stack costs a page fault per 4 kB page on first write; measured on this
project's VM that was about as much as decoding the slice with dicomsdl. A study's stacks live only while it is
prepared (the crops made from them are copies), so each worker process keeps one buffer per stack name and the
next study reuses it.
"""

from __future__ import annotations

import numpy as np

from cspine_submit.read import dicom

_STACKS: dict[str, np.ndarray] = {}
"""This process's buffers, raw bytes by stack name, viewed as whichever dtype and shape a study needs."""


def reusable_stack(name: str, shape: tuple[int, int, int], dtype=np.float32) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` kept by this (worker) process under ``name`` and reused by the next study.

    Parameters
    ----------
    name : str
        The stack's name (e.g. ``"cue"``, ``"crops"``): stacks of different names never share memory.
    shape : (n, rows, cols)
    dtype : numpy dtype

    Returns
    -------
    ndarray of ``shape`` and ``dtype``
        Uninitialised; valid until the next call with the same ``name``. The buffer grows by at least 25% when
        it must grow, so that slowly growing studies do not reallocate each time.
    """
    dtype = np.dtype(dtype)
    n_bytes = int(np.prod(shape)) * dtype.itemsize
    buf = _STACKS.get(name)
    if buf is None or buf.size < n_bytes:
        buf = _STACKS[name] = np.empty(max(n_bytes, int(1.25 * (0 if buf is None else buf.size))), dtype=np.uint8)
    return buf[:n_bytes].view(dtype).reshape(shape)


def read_reusing(header, indices: np.ndarray, known_indices: np.ndarray, known_slices: np.ndarray, *,
                 stack: str | None = None, dtype=np.float32, failed: dict | None = None) -> np.ndarray:
    """HU slices ``indices`` of a study, decoding only those not already in ``known_slices``.

    Parameters
    ----------
    header : StudyHeader
    indices : (m,) ndarray of int
        Slices wanted, head to feet indices.
    known_indices : (j,) ndarray of int
        Slices already decoded (e.g. the planner's cue slices), unique.
    known_slices : (j, rows, cols) ndarray
        Their HU, in ``known_indices`` order.
    stack : str, optional
        Write into this process's reusable stack of that name (:func:`reusable_stack`; valid until the next study
        asks for it) instead of a new array.
    dtype : float32 or int16
        Of the result; int16 only when :func:`cspine_submit.read.dicom.hu_dtype` of the study says so.
    failed : dict, optional
        Without it, a slice that cannot be decoded raises :class:`~cspine_submit.read.dicom.DicomReadError`. With
        it, such a slice costs only itself: its row holds the nearest readable slice of the study (at most
        :data:`MAX_SUBSTITUTE_DISTANCE` slices away, the nearer one first, the one towards the head on a tie), and
        ``failed[index] = (reason, substitute_index)`` records it (the reason without the file's path). Pass the
        same dict to every call of one study: a slice already known to fail is not decoded again.

    Returns
    -------
    (m, rows, cols) ndarray of ``dtype``
        HU in the order of ``indices``; a failed slice's row never keeps what the buffer held before.

    Raises
    ------
    DicomReadError
        A slice cannot be decoded and ``failed`` is None, or no readable slice lies near enough to stand in for it.
    """
    indices = np.asarray(indices, dtype=np.int64)
    have = {int(i): r for r, i in enumerate(known_indices)}
    shape = (indices.size, header.rows, header.cols)
    out = reusable_stack(stack, shape, dtype) if stack else np.empty(shape, dtype=dtype)
    first: dict[int, int] = {}
    for k, i in enumerate(indices.tolist()):
        if i in have:
            out[k] = known_slices[have[i]]
        elif i in first:
            out[k] = out[first[i]]
        elif failed is not None and i in failed:
            _substitute(header, i, k, have, known_slices, out, first, failed)
        else:
            try:
                # Straight into the stack: no temporary slice, each file opened once. Looked up on the module at
                # each call, so that a test counting decodes can wrap it.
                dicom.decode_into(header, i, out[k])
            except dicom.DicomReadError as exc:
                if failed is None:
                    raise
                failed[i] = (_reason(header, i, exc), None)
                _substitute(header, i, k, have, known_slices, out, first, failed)
            first[i] = k
    return out


MAX_SUBSTITUTE_DISTANCE = 3
"""How far (in slices) the stand-in for an unreadable slice may lie: a few slices of 0.5-1 mm, about what a
crop's neighbour channels already span; farther than that, the slice's own place in the series would be lost."""


def _reason(header, index: int, exc: Exception) -> str:
    """The decode error's message without the file's path (the report names the file beside it), on one line
    (pydicom lists each plugin's error on a line of its own)."""
    return " ".join(str(exc).removeprefix(f"{header.files[index]}: ").split())


def _substitute(header, index: int, k: int, have: dict, known_slices: np.ndarray, out: np.ndarray,
                first: dict, failed: dict) -> None:
    """Fill row ``k`` of ``out`` (slice ``index``'s, which failed) with the nearest readable slice and record which
    one in ``failed``: a slice already decoded is copied, else the stand-in is decoded into the row (and may then
    be copied from there). A slice that failed never stands in, so no row keeps another study's pixels."""
    reason, known = failed[index]
    candidates = [known] if known is not None else [
        j for d in range(1, MAX_SUBSTITUTE_DISTANCE + 1) for j in (index - d, index + d) if 0 <= j < header.n_slices]
    for j in candidates:
        if j in failed:
            continue
        if j in have:
            out[k] = known_slices[have[j]]
        elif j in first:
            out[k] = out[first[j]]
        else:
            try:
                dicom.decode_into(header, j, out[k])
            except dicom.DicomReadError as exc:
                failed[j] = (_reason(header, j, exc), None)
                continue
            first[j] = k
        failed[index] = (reason, j)
        return
    raise dicom.DicomReadError(f"{header.files[index]}: {reason}; no readable slice within "
                               f"{MAX_SUBSTITUTE_DISTANCE} slices can stand in for it")
