"""HU slices + crop plan -> model input. The ONE preprocessing path, used by training and inference alike.

Every constant comes from :class:`~cspine_submit.config.ModelConfig`; nothing here has its own.

For each centre slice of a :class:`~cspine_submit.localize.CropPlan`:

1. **Box.** The plan's in-plane box ``(y0, x0, y1, x1)`` (half-open pixels) is grown into a *square* centred
   on the box centre, side ``round(max(h, w) * (1 + 2 * crop_margin))`` (at least 1). Square, so that the
   resize below keeps the anatomy's aspect ratio. Parts of the square outside the image are filled with
   :data:`PAD_HU` (air).
2. **Clip** HU to the span the windows can tell apart (:func:`hu_span`: from the lowest window's bottom to the
   highest window's top); values beyond it would window to 0 or 1 anyway. Then **resize** the HU crop to
   ``input_size x input_size`` with OpenCV: ``cv2.INTER_AREA`` when shrinking (it averages, so no aliasing of
   thin cortical bone), ``cv2.INTER_LINEAR`` when enlarging or keeping the size. Resizing happens in HU, before
   windowing, so that every window sees the same interpolated values.
3. **Window**: ``(hu - (level - width / 2)) / width``, clipped to [0, 1].
4. **Channels** (``config.channels``):

   - ``single``: ``windows[0]``, 1 channel;
   - ``replicate``: ``windows[0]`` copied into 3 channels (input for ImageNet backbones);
   - ``windows``: one channel per window, in ``windows`` order;
   - ``neighbours``: 2.5D, slices ``i - neighbour_offset, i, i + neighbour_offset`` (head to feet) in
     ``windows[0]``. At the ends of the study the missing neighbour is replaced by the end slice (the
     index is clipped into ``[0, n_slices - 1]``), which is what :func:`slices_needed` asks the reader for.

Output: ``(k, S, S, C)`` float32 in [0, 1], channels last, crop ``j`` for ``plan.slice_indices[j]``.

The steps are two pure functions, so training can store what lies between them (:mod:`cspine_submit.train.data`):
:func:`hu_squares` (box, clip, shrink: HU at ``min(side, input_size)`` pixels, the smallest exact form of the
crop) and :func:`squares_to_input` (enlarge, window, channels). :func:`prepare_crops` is the two in a row.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from cspine_submit.config import CROP_CODE_SCALE, ModelConfig
from cspine_submit.localize import CropPlan

PAD_HU: float = -1024.0
"""HU written where the crop square leaves the image (air)."""


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map HU linearly to [0, 1] through one window, clipping outside it.

    Parameters
    ----------
    hu : ndarray
        Hounsfield units, any shape.
    level, width : float
        Window centre and width, HU; ``level - width / 2`` maps to 0 and ``level + width / 2`` to 1.

    Returns
    -------
    ndarray of float32, same shape as ``hu``.
    """
    low = level - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def crop_square(box: tuple[int, int, int, int], margin: float) -> tuple[int, int, int]:
    """The square crop a plan box becomes.

    Parameters
    ----------
    box : (y0, x0, y1, x1)
        Half-open pixel box.
    margin : float
        Margin on each side as a fraction of the box's longer side.

    Returns
    -------
    (top, left, side) : tuple of int
        The square ``[top, top + side) x [left, left + side)``; it may extend beyond the image.
    """
    y0, x0, y1, x1 = (int(v) for v in box)
    h, w = y1 - y0, x1 - x0
    if h <= 0 or w <= 0:
        raise ValueError(f"crop box {box}: empty (need y1 > y0 and x1 > x0)")
    side = max(1, int(round(max(h, w) * (1.0 + 2.0 * margin))))
    # Centre in pixel coordinates (box centre is at (y0 + y1) / 2 in half-open convention).
    top = int(np.floor((y0 + y1 - side) / 2.0 + 0.5))
    left = int(np.floor((x0 + x1 - side) / 2.0 + 0.5))
    return top, left, side


def _extract(slices: np.ndarray, top: int, left: int, side: int, which: np.ndarray | None = None) -> np.ndarray:
    """``slices[which, top:top+side, left:left+side]`` padded with PAD_HU where it leaves the image.

    ``which`` (row indices, default all) is applied together with the in-plane window, so only the square is
    copied, never whole slices.
    """
    _, rows, cols = slices.shape
    which = np.arange(slices.shape[0]) if which is None else np.asarray(which, dtype=np.int64)
    sy0, sx0 = max(top, 0), max(left, 0)
    sy1, sx1 = min(top + side, rows), min(left + side, cols)
    inside = (sy0, sx0, sy1, sx1) == (top, left, top + side, left + side)
    # Padding is written only when the square leaves the image, and each slice's window is copied (and converted
    # from int16 stacks) straight into place: fancy indexing would copy it twice.
    out = np.empty((which.size, side, side), dtype=np.float32) if inside else \
        np.full((which.size, side, side), PAD_HU, dtype=np.float32)
    if sy1 > sy0 and sx1 > sx0:
        dst = out[:, sy0 - top : sy1 - top, sx0 - left : sx1 - left]
        for k, j in enumerate(which.tolist()):
            dst[k] = slices[j, sy0:sy1, sx0:sx1]
    return out


def resize_stack(stack: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(m, h, w)`` images to ``(m, size, size)`` (INTER_AREA to shrink, INTER_LINEAR otherwise)."""
    import cv2

    m, h, w = stack.shape
    if (h, w) == (size, size):
        return stack.astype(np.float32, copy=True)
    interp = cv2.INTER_AREA if (h > size and w > size) else cv2.INTER_LINEAR
    out = np.empty((m, size, size), dtype=np.float32)
    stack = np.ascontiguousarray(stack, dtype=np.float32)
    # One image per call, written straight into the result: about 2x faster than stacking slices as channels
    # (which needs a transposed copy each way), and OpenCV resizes every channel alike, so the values are the same.
    for i in range(m):
        cv2.resize(stack[i], (size, size), dst=out[i], interpolation=interp)
    return out


def neighbour_indices(centres: Iterable[int], offset: int, n_slices: int) -> np.ndarray:
    """``(k, 3)`` study indices ``[i - offset, i, i + offset]`` per centre, clipped into ``[0, n_slices - 1]``."""
    c = np.asarray(list(centres), dtype=np.int64).reshape(-1, 1)
    return np.clip(c + np.array([-offset, 0, offset], dtype=np.int64), 0, max(n_slices - 1, 0))


def slices_needed(plans: Mapping[str, CropPlan] | Iterable[CropPlan], config: ModelConfig, n_slices: int) -> np.ndarray:
    """Study slice indices to decode so that :func:`prepare_crops` can build every plan's crops.

    Parameters
    ----------
    plans : {vertebra: CropPlan} or iterable of CropPlan
    config : ModelConfig
        ``channels == "neighbours"`` adds ``i +- neighbour_offset`` (clipped to the study).
    n_slices : int
        Slices in the study.

    Returns
    -------
    (m,) ndarray of int64, sorted, unique, inside ``[0, n_slices)``.
    """
    plan_list = list(plans.values()) if isinstance(plans, Mapping) else list(plans)
    centres = [int(i) for p in plan_list for i in p.slice_indices]
    if any(i < 0 or i >= n_slices for i in centres):
        raise ValueError(f"plan slice indices outside the study's [0, {n_slices}): {sorted(set(centres))}")
    if config.channels == "neighbours":
        idx = neighbour_indices(centres, config.neighbour_offset, n_slices).ravel()
    else:
        idx = np.asarray(centres, dtype=np.int64)
    return np.unique(idx).astype(np.int64)


def _channel_windows(config: ModelConfig) -> list[tuple[float, float]]:
    if config.channels == "windows":
        return list(config.windows)
    return [config.windows[0]]


def hu_span(config: ModelConfig) -> tuple[float, float]:
    """``(low, high)`` HU: the union of the windows the channels use (beyond it every channel is 0 or 1)."""
    wins = _channel_windows(config)
    return (min(level - width / 2.0 for level, width in wins), max(level + width / 2.0 for level, width in wins))


def n_planes(config: ModelConfig) -> int:
    """HU planes per crop before windowing: 3 slices for ``neighbours``, else 1 (the windows come from one plane)."""
    return 3 if config.channels == "neighbours" else 1


def hu_squares(slices: np.ndarray, slice_indices, plan: CropPlan, config: ModelConfig) -> np.ndarray:
    """The first half of :func:`prepare_crops`: each crop's HU square(s), clipped to :func:`hu_span`, shrunk to
    ``input_size`` when larger and otherwise left at the box's own resolution.

    Parameters
    ----------
    slices, slice_indices, plan, config
        As for :func:`prepare_crops`.

    Returns
    -------
    (k, P, s, s) ndarray of float32, HU
        ``P = n_planes(config)`` (the slice and its two neighbours for ``neighbours``, head to feet), ``s =
        min(side, input_size)`` with ``side`` from :func:`crop_square`.
    """
    slices = np.asarray(slices)
    idx = np.asarray(slice_indices, dtype=np.int64).ravel()
    if slices.ndim != 3 or slices.shape[0] != idx.size:
        raise ValueError(f"slices {slices.shape} and slice_indices ({idx.size},) disagree; need (m, rows, cols) and (m,)")
    S, P = config.input_size, n_planes(config)
    k = len(plan.slice_indices)
    top, left, side = crop_square(plan.box, config.crop_margin)
    s = min(side, S)
    if k == 0:
        return np.zeros((0, P, s, s), dtype=np.float32)
    row_of = {int(i): r for r, i in enumerate(idx)}
    centres = [int(i) for i in plan.slice_indices]
    if config.channels == "neighbours":
        lo, hi = int(idx.min()), int(idx.max())
        # Clip into the decoded range first (== clipping to the study, see docstring), then look up.
        wanted = np.clip(neighbour_indices(centres, config.neighbour_offset, hi + 1), lo, hi).ravel()
    else:
        wanted = np.asarray(centres, dtype=np.int64)
    missing = sorted({int(i) for i in wanted if int(i) not in row_of})
    if missing:
        raise ValueError(f"{plan.vertebra}: slices {missing} are needed but were not decoded (have {sorted(row_of)})")
    rows = np.array([row_of[int(i)] for i in wanted], dtype=np.int64)
    # Crop each distinct slice once (neighbour sets overlap), clip, shrink in HU.
    uniq, inverse = np.unique(rows, return_inverse=True)
    low, high = hu_span(config)
    hu = _extract(slices, top, left, side, uniq)
    np.clip(hu, low, high, out=hu)
    if side > S:
        hu = resize_stack(hu, S)
    if uniq.size == inverse.size and np.array_equal(inverse.ravel(), np.arange(inverse.size)):
        return hu.reshape(k, P, s, s)  # every crop plane a distinct slice, in order: no regrouping copy
    return np.ascontiguousarray(hu[inverse].reshape(k, P, s, s))


def _input_planes(squares: np.ndarray, config: ModelConfig) -> tuple[np.ndarray, list[tuple[int, float, float]]]:
    """HU squares at the input size and, per model input channel, which plane and window it shows.

    Returns
    -------
    hu : (k, P, S, S) ndarray of float32
        ``squares`` resized to ``S = config.input_size`` (enlarging: INTER_LINEAR).
    channels : list of (plane, level, width)
        One per channel of the model input, in order.
    """
    squares = np.asarray(squares, dtype=np.float32)
    k, P, s = squares.shape[0], squares.shape[1], squares.shape[-1]
    S = config.input_size
    hu = squares.reshape(k * P, s, s)
    if s != S and k:
        hu = resize_stack(hu, S)  # s < S: enlarging, INTER_LINEAR
    if config.channels == "neighbours":
        level, width = config.windows[0]
        channels = [(p, level, width) for p in range(3)]
    else:
        channels = [(0, level, width) for level, width in _channel_windows(config)]
        if config.channels == "replicate":
            channels = channels * 3
    return hu.reshape(k, P, S, S), channels


def _windowed_channels(squares: np.ndarray, config: ModelConfig, dtype, code: bool, out: np.ndarray | None = None):
    """Model input of ``squares`` as ``dtype``, channel by channel into one array (no per-channel stack); into
    ``out`` (``(k, S, S, C)`` of ``dtype``) when given."""
    hu, channels = _input_planes(squares, config)
    k, S = hu.shape[0], config.input_size
    shape = (k, S, S, len(channels))
    if out is None:
        out = np.empty(shape, dtype=dtype)
    elif out.shape != shape or out.dtype != np.dtype(dtype):
        raise ValueError(f"out: expected {shape} {np.dtype(dtype)}, got {out.shape} {out.dtype}")
    done: dict[tuple[int, float, float], int] = {}
    for c, key in enumerate(channels):
        if key in done:  # "replicate": the same window again
            out[..., c] = out[..., done[key]]
            continue
        plane, level, width = key
        x = window(hu[:, plane], level, width)
        if code:  # encode_crops's arithmetic (its clip is a no-op on a window's output)
            np.multiply(x, np.float32(CROP_CODE_SCALE), out=x)
            np.rint(x, out=x)
        out[..., c] = x
        done[key] = c
    return out


def squares_to_input(squares: np.ndarray, config: ModelConfig, out: np.ndarray | None = None) -> np.ndarray:
    """The second half of :func:`prepare_crops`: HU squares -> model input.

    Parameters
    ----------
    squares : (k, P, s, s) ndarray, HU
        From :func:`hu_squares` (or the training cache, which stores them).
    config : ModelConfig
    out : (k, S, S, C) ndarray of float32, optional
        Written in place and returned (the training pipeline fills its batch this way, without a copy).

    Returns
    -------
    (k, S, S, C) ndarray of float32 in [0, 1]
    """
    return _windowed_channels(squares, config, np.float32, code=False, out=out)


def squares_to_encoded_input(squares: np.ndarray, config: ModelConfig) -> np.ndarray:
    """``encode_crops(squares_to_input(squares, config))`` (the same values), written straight as uint16: what a
    worker sends, without the float32 model input in between.

    Returns
    -------
    (k, S, S, C) ndarray of uint16
    """
    return _windowed_channels(squares, config, np.uint16, code=True)


def prepare_crops(slices: np.ndarray, slice_indices, plan: CropPlan, config: ModelConfig) -> np.ndarray:
    """Model input for one vertebra's plan, from decoded HU slices.

    Parameters
    ----------
    slices : (m, rows, cols) ndarray
        Decoded slices in HU (any real dtype), e.g. from ``dicom.read_slices(header, slices_needed(...))``.
    slice_indices : (m,) array of int
        Study index (head to feet) of each row of ``slices``; must contain every index the plan needs.
        For ``neighbours``, a neighbour beyond the decoded range is clipped to the nearest decoded end slice,
        which equals clipping to the study when ``slice_indices`` came from :func:`slices_needed`.
    plan : CropPlan
    config : ModelConfig

    Returns
    -------
    (k, S, S, C) ndarray of float32 in [0, 1]
        ``k = len(plan.slice_indices)``, ``S = config.input_size``, ``C = config.n_channels``.
    """
    return squares_to_input(hu_squares(slices, slice_indices, plan, config), config)


def prepare_encoded_crops(slices: np.ndarray, slice_indices, plan: CropPlan, config: ModelConfig) -> np.ndarray:
    """``encode_crops(prepare_crops(...))`` (the same values) in one pass: the crops a worker sends, as uint16."""
    return squares_to_encoded_input(hu_squares(slices, slice_indices, plan, config), config)


def encode_crops(crops: np.ndarray) -> np.ndarray:
    """Model input in [0, 1] -> uint16 fixed point, the compact form crops take between processes.

    Parameters
    ----------
    crops : (k, S, S, C) ndarray of float32 in [0, 1]

    Returns
    -------
    (k, S, S, C) ndarray of uint16
        ``round(crops * CROP_CODE_SCALE)``: half the bytes of float32; :func:`decode_crops` (or the scoring
        function, on the device) maps it back within ``0.5 / CROP_CODE_SCALE`` (7.7e-6).
    """
    x = np.asarray(crops, dtype=np.float32)
    return np.rint(np.clip(x, 0.0, 1.0) * np.float32(CROP_CODE_SCALE)).astype(np.uint16)


def decode_crops(code: np.ndarray) -> np.ndarray:
    """uint16 fixed point (:func:`encode_crops`) -> float32 model input in [0, 1]."""
    return np.asarray(code, dtype=np.float32) * np.float32(1.0 / CROP_CODE_SCALE)
