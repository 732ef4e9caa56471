"""Scoring: one compiled ``tf.function`` per model, batches padded to a power-of-two size, devices concurrently.

A model is traced at most ``log2(batch_size) + 1`` times (:func:`_bucket`); float16 compute where the device plan
says. Vertebrae that share a model are scored in one pass over their crops laid end to end (a shared network's
study costs a few full batches, not seven small ones). With several devices the models are spread over them
(:meth:`cspine_submit.score.devices.DevicePlan.place`) and the devices score concurrently; each batch goes to one
device only. Crops may arrive as uint16 fixed point (what worker processes send) and are converted on the device.

TensorFlow is imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from cspine_submit.config import CROP_CODE_SCALE
from cspine_submit.score.devices import DEVICE_ATTR

_PREDICT_FN_ATTR = "_cspine_predict_fn"
"""Attribute under which a model keeps its compiled inference function. On the model itself, not in a
module-level cache: the function refers to the model, so a cache keyed by the model would keep every model ever
scored alive; as an attribute, model and function form a cycle that the garbage collector frees together."""


def _bucket(n: int, batch_size: int) -> int:
    """Smallest power of two >= n, capped at batch_size (fixed shapes -> few traces, < 2x padding)."""
    b = 1
    while b < n:
        b *= 2
    return min(b, batch_size)


class _OwnTracesFilter:
    """Drop TensorFlow's "N out of the last N calls ... triggered tf.function retracing" for our functions: there is
    one compiled function per classifier (seven models -> seven traces), which TF's heuristic mistakes for retracing."""

    def filter(self, record) -> bool:
        msg = record.getMessage()
        return not ("_predict_fn.<locals>" in msg and "retracing" in msg)


_FILTER_INSTALLED = False


def _predict_fn(model):
    """A compiled inference function for ``model``, cached on it; runs on the model's device.

    It takes float32 crops, or uint16 ones in the fixed-point code of :func:`cspine_submit.score.crop.encode_crops`
    (what worker processes send): those are converted on the device, so half the bytes also cross to the GPU.
    """
    global _FILTER_INSTALLED
    fn = getattr(model, _PREDICT_FN_ATTR, None)
    if fn is not None:
        return fn
    import keras

    if keras.backend.backend() != "tensorflow":
        fn = _other_backend_fn(model)
        object.__setattr__(model, _PREDICT_FN_ATTR, fn)
        return fn
    import tensorflow as tf

    if not _FILTER_INSTALLED:
        logging.getLogger("tensorflow").addFilter(_OwnTracesFilter())
        _FILTER_INSTALLED = True
    device = getattr(model, DEVICE_ATTR, None)
    scale = 1.0 / CROP_CODE_SCALE  # the same float32 product as crop.decode_crops

    @tf.function
    def fn(x):
        with tf.device(device):
            if x.dtype == tf.uint16:
                x = tf.cast(x, tf.float32) * scale
            return model(x, training=False)

    # object.__setattr__: Keras layers track attributes they are given; a plain function must stay untracked.
    object.__setattr__(model, _PREDICT_FN_ATTR, fn)
    return fn


def _other_backend_fn(model):
    """Inference on Keras's torch or jax backend: Keras's own compiled ``predict_on_batch`` (jax: XLA-jitted per
    input shape, which :func:`_bucket` keeps few), inside ``keras.device`` of the model's device (its weights are
    there; Keras's device scope is per thread, so devices run concurrently from their threads); uint16 codes are
    decoded on the host, the same float32 product as on TensorFlow (``cast(x, float32) * float32(1 /
    CROP_CODE_SCALE)``)."""
    from contextlib import nullcontext

    import keras

    from cspine_submit.score.backends import keras_device

    scale = np.float32(1.0 / CROP_CODE_SCALE)
    device = getattr(model, DEVICE_ATTR, None)

    def fn(x):
        if x.dtype == np.uint16:
            x = x.astype(np.float32) * scale
        with keras.device(keras_device(device)) if device else nullcontext():
            return model.predict_on_batch(x)

    return fn


def _batches(arrays: Sequence[np.ndarray], batch_size: int):
    """Batches of ``batch_size`` rows over ``arrays`` laid end to end, the last one zero-padded to :func:`_bucket`.

    Yields ``(batch, n)`` with ``n`` the real rows. A batch inside one array is a view; only one that spans two
    arrays or needs padding is copied (laying the arrays end to end first would copy every crop once more).
    """
    total = sum(a.shape[0] for a in arrays)
    i, offset = 0, 0  # current array, row within it
    for start in range(0, total, batch_size):
        n = min(batch_size, total - start)
        size = _bucket(n, batch_size)
        while arrays[i].shape[0] == offset:
            i, offset = i + 1, 0
        if size == n and arrays[i].shape[0] - offset >= n:
            yield arrays[i][offset : offset + n], n
            offset += n
            continue
        batch = np.zeros((size,) + arrays[i].shape[1:], arrays[i].dtype)
        filled = 0
        while filled < n:
            while arrays[i].shape[0] == offset:
                i, offset = i + 1, 0
            take = min(n - filled, arrays[i].shape[0] - offset)
            batch[filled : filled + take] = arrays[i][offset : offset + take]
            filled, offset = filled + take, offset + take
        yield batch, n


def _as_model_input(crops) -> np.ndarray:
    crops = np.asarray(crops)
    return crops if crops.dtype == np.uint16 else crops.astype(np.float32, copy=False)


def _predict_arrays(model, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """Probabilities of the crops of ``arrays`` (all uint16, or all float32) laid end to end, shape ``(sum k,)``."""
    arrays = [a for a in arrays if a.shape[0]]
    k = sum(a.shape[0] for a in arrays)
    if k == 0:
        return np.zeros((0,), dtype=np.float32)
    fn = _predict_fn(model)
    out = np.empty((k,), dtype=np.float32)
    start, pending = 0, None
    for batch, n in _batches(arrays, max(int(batch_size), 1)):
        # Dispatch this batch before reading the previous one back: on a GPU the call returns once its work is
        # queued, so this batch's copy to the device overlaps the previous batch's compute and copy back.
        result = fn(batch)
        if pending is not None:
            _store(out, *pending)
        pending, start = (result, start, n), start + n
    _store(out, *pending)
    return out


def _store(out: np.ndarray, result, start: int, n: int) -> None:
    out[start : start + n] = np.asarray(result, dtype=np.float32).reshape(-1)[:n]


def predict(model, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Fracture probability of each crop with one compiled model.

    Parameters
    ----------
    crops : (k, S, S, C) ndarray of float32 in [0, 1], or of uint16 (:func:`cspine_submit.score.crop.encode_crops`)
    batch_size : int
        Crops per forward pass; the last batch is zero-padded to a power of two so that the compiled function
        sees few distinct shapes.

    Returns
    -------
    (k,) ndarray of float32
    """
    if isinstance(model, Spread):
        return score({"crops": model}, {"crops": crops}, batch_size)["crops"]
    return _predict_arrays(model, [_as_model_input(crops)], batch_size)


class Spread:
    """A group's network on several devices (:func:`cspine_submit.score.loading.load_classifiers` makes it when the
    memory plan spreads it; a network on one device stays a plain Keras model).

    Attributes
    ----------
    parts : list of keras.Model
        Each with the device it computes on (``DEVICE_ATTR``).
    mode : {"replicas", "members", "in turn"}
        ``replicas``: copies of one network, each study's crops split between them; ``members``: an ensemble's
        members, every crop through each, probabilities averaged here (member order, float32: the same sum and
        division as ``keras.layers.Average``); ``in turn``: members whose weights stay in host memory.
    """

    def __init__(self, parts, mode: str):
        if mode not in ("replicas", "members", "in turn") or not parts:
            raise ValueError(f"Spread: mode {mode!r} with {len(parts)} part(s)")
        self.parts, self.mode = list(parts), mode
        setattr(self, DEVICE_ATTR, "+".join(str(getattr(p, DEVICE_ATTR, None)) for p in self.parts))

    @property
    def devices(self) -> list:
        return [getattr(p, DEVICE_ATTR, None) for p in self.parts]

    def count_params(self) -> int:
        """Parameters of one copy (replicas) or of every member."""
        n = [p.count_params() for p in self.parts]
        return n[0] if self.mode == "replicas" else sum(n)


def _row_slices(arrays: Sequence[np.ndarray], start: int, stop: int) -> list[np.ndarray]:
    """Rows ``start:stop`` of ``arrays`` laid end to end, as views of them."""
    out, offset = [], 0
    for a in arrays:
        lo, hi = max(start - offset, 0), min(stop - offset, a.shape[0])
        if lo < hi:
            out.append(a[lo:hi])
        offset += a.shape[0]
    return out


def _jobs(model, arrays: Sequence[np.ndarray], batch_size: int):
    """The per-device work of one pass: ``[(device, model, arrays, (row start, stop), member index)]``.

    Replicas split the rows into contiguous shares in whole batches (the last share takes the remainder), so each
    device runs full batches; members each take every row.
    """
    k = sum(a.shape[0] for a in arrays)
    if not isinstance(model, Spread):
        return [(getattr(model, DEVICE_ATTR, None), model, arrays, (0, k), 0)]
    if model.mode != "replicas":
        return [(getattr(p, DEVICE_ATTR, None), p, arrays, (0, k), i) for i, p in enumerate(model.parts)]
    n = len(model.parts)
    share = -(-k // n)  # ceil
    share = -(-share // batch_size) * batch_size if share > batch_size else share
    jobs = []
    for i, p in enumerate(model.parts):
        lo, hi = min(i * share, k), min((i + 1) * share, k)
        if lo < hi:
            jobs.append((getattr(p, DEVICE_ATTR, None), p, _row_slices(arrays, lo, hi), (lo, hi), 0))
    return jobs


def _run_by_device(jobs, batch_size: int) -> list[np.ndarray]:
    """Run ``jobs`` (from :func:`_jobs`), one thread per device when there are several; results in job order.

    A call blocks until its device is done, so devices overlap only from separate threads. Daemon threads: one stuck
    on a wedged device must not keep the process from exiting (pool workers are joined at exit).
    """
    results: list = [None] * len(jobs)
    by_device: dict[Any, list[int]] = {}
    for i, job in enumerate(jobs):
        by_device.setdefault(job[0], []).append(i)

    def run(indices) -> None:
        for i in indices:
            _device, model, arrays, _rows, _member = jobs[i]
            results[i] = _predict_arrays(model, arrays, batch_size)

    if len(by_device) <= 1:
        run(range(len(jobs)))
        return results
    errors: list[BaseException] = []

    def work(indices) -> None:
        try:
            run(indices)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(ix,), name="score", daemon=True) for ix in by_device.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _combine(model, jobs, results, k: int) -> np.ndarray:
    """One pass's ``(k,)`` probabilities from its jobs' results: replicas' shares in place, members averaged."""
    if not isinstance(model, Spread) or model.mode == "replicas":
        out = np.empty((k,), dtype=np.float32)
        for (_d, _m, _a, (lo, hi), _i), r in zip(jobs, results):
            out[lo:hi] = r
        return out
    by_member = sorted(zip((j[4] for j in jobs), results))
    total = by_member[0][1].copy()
    for _i, r in by_member[1:]:
        total += r
    return total / np.float32(len(by_member))


def score(models: Mapping[str, Any], crops_by_vertebra: Mapping[str, np.ndarray], batch_size: int = 32) -> dict[str, np.ndarray]:
    """Score each vertebra's crops with that vertebra's classifier.

    Vertebrae that share one model (:func:`load_classifiers` gives vertebrae with the same files the same object)
    are scored in one pass over their crops laid end to end, in batches of ``batch_size``, and the probabilities
    split back per vertebra: the same numbers as scoring each vertebra alone (up to float rounding of the batch
    size), in a few full batches instead of one small batch per vertebra. Each crop's probability depends on that
    crop only (inference: BatchNormalization uses its stored statistics), so mixing vertebrae in a batch is exact.
    A model spread over several devices (:class:`Spread`) gives each device its share of the pass, and every
    device works concurrently with the others.

    Parameters
    ----------
    models : {vertebra: keras.Model or Spread}
        From :func:`load_classifiers`.
    crops_by_vertebra : {vertebra: (k, S, S, C) ndarray}
        From :func:`cspine_submit.score.crop.prepare_crops`, float32 or uint16 (:func:`cspine_submit.score.crop.encode_crops`);
        ``k`` may be 0.
    batch_size : int
        Crops per forward pass (``ModelConfig.batch_size`` or the CLI's).

    Returns
    -------
    {vertebra: (k,) ndarray of float32}
        Probabilities in the order of the crops, in the order of ``crops_by_vertebra``.
    """
    missing = [v for v in crops_by_vertebra if v not in models]
    if missing:
        raise ValueError(f"no classifier loaded for {missing}; loaded: {sorted(models)}")
    batch_size = max(int(batch_size), 1)
    crops = {v: _as_model_input(c) for v, c in crops_by_vertebra.items()}
    # One pass per (model, crop encoding): uint16 codes and float32 values cannot share a batch.
    passes: dict[tuple[int, bool], list[str]] = {}
    for v, c in crops.items():
        if c.shape[0]:
            passes.setdefault((id(models[v]), c.dtype == np.uint16), []).append(v)
    plans = []
    for vs in passes.values():
        arrays = [crops[v] for v in vs]
        plans.append((vs, _jobs(models[vs[0]], arrays, batch_size)))
    results = _run_by_device([job for _vs, jobs in plans for job in jobs], batch_size)
    out: dict[str, np.ndarray] = {}
    at = 0
    for vs, jobs in plans:
        k = sum(crops[v].shape[0] for v in vs)
        probs = _combine(models[vs[0]], jobs, results[at : at + len(jobs)], k)
        at += len(jobs)
        ends = np.cumsum([crops[v].shape[0] for v in vs])
        out.update(zip(vs, np.split(probs, ends[:-1])))
    empty = np.zeros((0,), dtype=np.float32)
    return {v: out[v] if v in out else empty.copy() for v in crops_by_vertebra}
