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
                 stack: str | None = None, dtype=np.float32) -> np.ndarray:
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

    Returns
    -------
    (m, rows, cols) ndarray of ``dtype``
        HU in the order of ``indices``.
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
        else:
            # Straight into the stack: no temporary slice, each file opened once. Looked up on the module at each
            # call, so that a test counting decodes can wrap it.
            dicom.decode_into(header, i, out[k])
            first[i] = k
    return out
