"""Training data: labels, folds, the per-study crop cache and the streaming tf.data pipeline.

Crops are made by exactly the inference path: ``dicom.scan_study`` -> ``localize.plan_crops`` ->
``crop.slices_needed`` -> ``dicom.read_slices`` -> ``crop.hu_squares`` (cached) -> ``crop.squares_to_input``
(on load). The cache holds what lies between the two halves of :func:`cspine_submit.score.crop.prepare_crops`: each
crop's HU square, clipped to the windows' span, at ``min(box side, input_size)`` pixels (a box smaller than the
input is stored at its own resolution and enlarged on load), as int16, its two bytes split into planes
(byte shuffle: the high bytes are nearly constant) and zlib-compressed (level 1), one record per crop in
``<cache>/<uid>/crops.bin`` with offsets in ``meta.json``. Windows and channels are applied on load, so one
cache serves every window choice with the same HU span and crop geometry, and a shuffled epoch reads one crop
at a time.

Measured (``benchmarks/bench_train_input.py``) on a real 512x512 CT series, 7 x 15 crops of 156-252 px boxes: the
default 256x256x3 config stores 30 kB per crop, 3.1 MB per study, 6.3 GB for 2019 studies (the float16 windowed
cache of before: 41 MB per study, 83 GB); the seed's 512x512x1, 2.9 MB per study, 5.9 GB (before: 111 GB).
``benchmarks/bench_train_input.py`` measures bytes and crops per second.

Slice labels (:func:`crop_targets`), for the crops of vertebra V in study s:

- V intact in train.csv: every crop is a negative, weight 1;
- V fractured and s has fracture boxes in train_bounding_boxes.csv (``policy``):
  ``exclude`` (default): crops on a slice with a box are positives, the other crops of V are left out
  (weight 0), because the fracture is not visible on them and calling them negatives would teach the
  model that a fractured vertebra looks intact; ``downweight``: those other crops are negatives with weight
  ``other_weight``; ``study``: every crop of V is a positive (the seed notebook's study-level labels);
- V fractured, s has no boxes: every crop of V is a positive (only the study label is known).

Measured (``benchmarks/bench_box_policy.py``: tiny shared model, the demo's 72 synthetic studies, 24 held out,
8 epochs, one seed): held-out vertebra-level AUC ``exclude`` 0.80, ``downweight`` 0.77, ``study`` 0.65; hence
``exclude`` is the default.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from cspine_submit.config import VERTEBRAE, ModelConfig

BOX_POLICIES: tuple[str, ...] = ("exclude", "downweight", "study")
"""How the crops of a fractured vertebra without a fracture box are labelled (see the module docstring)."""

CACHE_FIELDS: tuple[str, ...] = ("input_size", "channels", "windows", "neighbour_offset", "crop_margin",
                                 "slices_per_vertebra", "z_margin_mm")
"""The config fields that change the crops (and so the cache key); fields a config lacks are skipped."""

CACHE_FORMAT = 2
"""Version of the cache layout (1: float16 windowed crops in .npy files; 2: compressed HU squares)."""

ZLIB_LEVEL = 1
"""Level 1 compresses these crops within 2 % of level 6 at 3-4x the speed (measured on the real CT series)."""


# --------------------------------------------------------------------------------------------------------------
# Labels and split (pure)


def read_train_labels(data_dir: str | Path) -> dict[str, dict[str, int]]:
    """``{uid: {"patient_overall": 0/1, "C1": 0/1, ...}}`` from ``<data_dir>/train.csv``."""
    import pandas as pd

    path = Path(data_dir) / "train.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (train.csv of the competition data)")
    df = pd.read_csv(path, dtype={"StudyInstanceUID": str})
    missing = [c for c in ("StudyInstanceUID",) + VERTEBRAE if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    out = {}
    for row in df.itertuples(index=False):
        d = row._asdict()
        labels = {v: int(d[v]) for v in VERTEBRAE}
        labels["patient_overall"] = int(d.get("patient_overall", int(any(labels.values()))))
        out[str(d["StudyInstanceUID"])] = labels
    return out


def read_box_slices(data_dir: str | Path) -> dict[str, set[int]]:
    """``{uid: {slice_number, ...}}`` of the slices that carry a fracture box (empty when the file is absent)."""
    import pandas as pd

    path = Path(data_dir) / "train_bounding_boxes.csv"
    if not path.is_file():
        return {}
    df = pd.read_csv(path, dtype={"StudyInstanceUID": str})
    if not {"StudyInstanceUID", "slice_number"} <= set(df.columns):
        raise ValueError(f"{path}: needs columns StudyInstanceUID and slice_number")
    out: dict[str, set[int]] = {}
    for uid, n in zip(df["StudyInstanceUID"], df["slice_number"]):
        out.setdefault(str(uid), set()).add(int(n))
    return out


def split_studies(labels: Mapping[str, Mapping[str, int]], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split by study, stratified by ``patient_overall``.

    The same labels, fraction and seed always give the same split, whatever the order of ``labels``.

    Returns
    -------
    (train_uids, val_uids) : sorted lists
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: must be in (0, 1)")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in (0, 1):
        uids = sorted(u for u, lab in labels.items() if int(lab.get("patient_overall", 0)) == cls)
        uids = [uids[i] for i in rng.permutation(len(uids))]
        n_val = int(round(val_fraction * len(uids)))
        val += uids[:n_val]
        train += uids[n_val:]
    return sorted(train), sorted(val)


def assign_folds(labels: Mapping[str, Mapping[str, int]], n_folds: int, seed: int) -> dict[str, int]:
    """Patient-level K-fold assignment, stratified by the number of fractured vertebrae (0, 1, 2, 3+).

    Each stratum is shuffled with ``seed`` and dealt round-robin, so every fold gets its share of intact studies
    and of single and multiple fractures. The same labels, K and seed always give the same folds, whatever the
    order of ``labels``.

    Returns
    -------
    {uid: fold in 0 .. n_folds - 1}
    """
    if n_folds < 2:
        raise ValueError(f"n_folds={n_folds}: K-fold needs at least 2 folds (use split_studies for one split)")
    if n_folds > len(labels):
        raise ValueError(f"n_folds={n_folds}: more folds than the {len(labels)} studies")
    rng = np.random.default_rng(seed)
    strata: dict[int, list[str]] = {}
    for u, lab in labels.items():
        strata.setdefault(min(sum(int(lab.get(v, 0)) for v in VERTEBRAE), 3), []).append(u)
    folds: dict[str, int] = {}
    start = 0
    for key in sorted(strata):
        uids = sorted(strata[key])
        for j, i in enumerate(rng.permutation(len(uids))):
            folds[uids[i]] = (start + j) % n_folds
        start += len(uids)  # the next stratum continues where this one stopped: fold sizes differ by at most 1
    return folds


def crop_targets(fractured: bool, on_box: Sequence[bool], policy: str = "exclude",
                 other_weight: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Target and weight of each crop of one vertebra (see the module docstring).

    Parameters
    ----------
    fractured : bool
        The vertebra's study-level label.
    on_box : (k,) sequence of bool
        Whether each crop's slice carries a fracture box.
    policy : {"exclude", "downweight", "study"}
    other_weight : float
        Weight of a fractured vertebra's box-less crops under ``downweight``.

    Returns
    -------
    y, w : (k,) ndarrays of float32
    """
    if policy not in BOX_POLICIES:
        raise ValueError(f"box policy {policy!r}: expected one of {list(BOX_POLICIES)}")
    k = len(on_box)
    on = np.asarray(on_box, dtype=bool)
    if not fractured:
        return np.zeros(k, np.float32), np.ones(k, np.float32)
    if policy == "study":
        return np.ones(k, np.float32), np.ones(k, np.float32)
    y = on.astype(np.float32)
    w = np.where(on, 1.0, 0.0 if policy == "exclude" else other_weight).astype(np.float32)
    return y, w


def vertebra_targets(fractured: bool, slice_numbers: Sequence[int], box_slices: set[int] | None,
                     policy: str = "exclude", other_weight: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """:func:`crop_targets` from the crops' file numbers and the study's box slice numbers (None: no boxes).

    A fractured vertebra of a study with boxes but none on its crops falls back to the study label (every
    crop positive): its box may lie between the sampled slices, and leaving it out entirely would lose it.
    """
    k = len(slice_numbers)
    if not fractured or not box_slices:
        return crop_targets(fractured, [False] * k, "study")
    on = [int(n) in box_slices for n in slice_numbers]
    if not any(on):
        return crop_targets(True, on, "study")
    return crop_targets(True, on, policy, other_weight)


def class_weights(y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Weights (negative, positive) that give both classes the same total weight, mean weight 1."""
    y = np.asarray(y) > 0.5
    w = np.asarray(w, dtype=np.float64)
    pos, neg = float(w[y].sum()), float(w[~y].sum())
    total = pos + neg
    if pos == 0 or neg == 0:
        return 1.0, 1.0
    return total / (2 * neg), total / (2 * pos)


# --------------------------------------------------------------------------------------------------------------
# Crop cache


def cache_key(config: ModelConfig, ranges_path: str | Path) -> str:
    """Short hash of what determines the cached squares: the crop geometry of the config, the HU span its windows
    clip to, the cache format and the ranges file's bytes."""
    from cspine_submit.score.crop import hu_span, n_planes

    h = hashlib.sha256()
    fields = {f: getattr(config, f) for f in CACHE_FIELDS if hasattr(config, f) and f not in ("windows", "channels")}
    fields.update(format=CACHE_FORMAT, hu_span=hu_span(config), planes=n_planes(config))
    h.update(json.dumps(fields, sort_keys=True, default=list).encode())
    h.update(Path(ranges_path).read_bytes())
    return h.hexdigest()[:12]


def encode_square(square: np.ndarray) -> bytes:
    """One crop's HU square(s) -> bytes: rounded to int16 (little-endian), byte-shuffled, zlib level 1.

    Parameters
    ----------
    square : (P, s, s) ndarray, HU
    """
    import zlib

    q = np.clip(np.rint(square), -32768, 32767).astype("<i2")
    shuffled = np.ascontiguousarray(q.view(np.uint8).reshape(-1, 2).T)  # low bytes, then high bytes
    return zlib.compress(shuffled.tobytes(), ZLIB_LEVEL)


def decode_square(buf: bytes, planes: int, side: int) -> np.ndarray:
    """Inverse of :func:`encode_square`: ``(planes, side, side)`` int16 HU."""
    import zlib

    raw = np.frombuffer(zlib.decompress(buf), np.uint8)
    n = raw.size // 2
    # low | high << 8 in three contiguous passes: 0.008 ms for a 220-px square, against 0.116 ms for the strided
    # transpose copy of the interleaving (which held the GIL a tenth of a millisecond per crop)
    out = raw[n:].astype("<u2")
    out <<= 8
    out |= raw[:n]
    return out.view("<i2").reshape(planes, side, side)


@dataclass(frozen=True)
class CacheJob:
    """One study to cache (picklable, for worker processes)."""

    uid: str
    folder: str
    out_dir: str
    ranges_path: str
    config_json: str


def _file_number(path: Path) -> int:
    try:
        return int(float(Path(path).stem))
    except ValueError:
        return -1


def cache_study(job: CacheJob) -> dict:
    """Scan, plan, read and crop one study exactly as inference does; write its squares and meta.json.

    Returns the meta dict: ``uid``, ``n_slices``, ``bytes`` (crops.bin + meta.json), ``vertebrae`` ->
    ``{slice_indices, slice_numbers, box, side, crops: [[offset, nbytes], ...]}``. Already cached studies are
    returned from their meta.json without work.
    """
    from cspine_submit import localize
    from cspine_submit.score import crop
    from cspine_submit.read import dicom

    out = Path(job.out_dir) / job.uid
    meta_path = out / "meta.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    config = ModelConfig(**json.loads(job.config_json))
    slice_ranges = localize.load_ranges(job.ranges_path)
    header = dicom.scan_study(job.folder)
    plans = localize.plan_crops(header, slice_ranges, config)
    needed = crop.slices_needed(plans, config, header.n_slices)
    slices = dicom.read_slices(header, needed)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    meta = {"uid": job.uid, "n_slices": header.n_slices, "format": CACHE_FORMAT, "planes": crop.n_planes(config),
            "vertebrae": {}}
    offset = 0
    with open(tmp / "crops.bin", "wb") as fh:
        for v, plan in plans.items():
            squares = crop.hu_squares(slices, needed, plan, config)
            records = []
            for sq in squares:
                buf = encode_square(sq)
                fh.write(buf)
                records.append([offset, len(buf)])
                offset += len(buf)
            meta["vertebrae"][v] = {
                "slice_indices": [int(i) for i in plan.slice_indices],
                "slice_numbers": [_file_number(header.files[i]) for i in plan.slice_indices],
                "box": [int(b) for b in plan.box],
                "side": int(squares.shape[-1]),
                "crops": records,
            }
    text = json.dumps(meta)
    meta["bytes"] = offset + len(text) + 16  # + the "bytes" entry itself, about
    (tmp / "meta.json").write_text(json.dumps(meta))
    if out.exists():  # another worker finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(out)
    return meta


def build_cache(data_dir: str | Path, uids: Iterable[str], cache_dir: str | Path, ranges_path: str | Path,
                config: ModelConfig, workers: int = 2, progress: bool = True) -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """Cache the crops of every study; returns ``({uid: meta}, [(uid, error), ...])``.

    ``cache_dir`` is marked with a CACHEDIR.TAG, so manifests and bundles leave it out wherever it lies.
    """
    from cspine_submit.manifest import tag_cache_dir
    from cspine_submit.read.reader import iter_studies

    tag_cache_dir(cache_dir, "the crop cache of cspine-submit train")
    images = Path(data_dir) / "train_images"
    cfg_json = json.dumps(json.loads(json.dumps(_config_dict(config))))
    jobs = [CacheJob(u, str(images / u), str(cache_dir), str(ranges_path), cfg_json) for u in uids]
    metas, failed = {}, []
    for outcome in iter_studies(jobs, cache_study, workers=workers, prefetch=max(2 * workers, 1),
                                progress="caching crops" if progress else False):
        if outcome.ok:
            metas[outcome.item.uid] = outcome.value
        else:
            failed.append((outcome.item.uid, outcome.error))
    return metas, failed


def cache_bytes(metas: Mapping[str, dict]) -> int:
    """Bytes the cache of these studies takes on disk (crops.bin + meta.json of each)."""
    return int(sum(m.get("bytes", 0) for m in metas.values()))


def _config_dict(config: ModelConfig) -> dict:
    import dataclasses

    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


# --------------------------------------------------------------------------------------------------------------
# Samples and tf.data


@dataclass(frozen=True)
class Samples:
    """The crops of one vertebra (or several) for one set of studies: where they are and their targets.

    Attributes
    ----------
    files : (n,) array of str
        ``crops.bin`` of each crop's study.
    offsets, nbytes, sides : (n,) int arrays
        Where the crop's record lies in its file, and the side of its stored square.
    y, w : (n,) float32 arrays
        Target and weight (0 = left out).
    study : (n,) array of str
        Study of each crop (for vertebra-level evaluation).
    """

    files: np.ndarray
    offsets: np.ndarray
    nbytes: np.ndarray
    sides: np.ndarray
    y: np.ndarray
    w: np.ndarray
    study: np.ndarray

    _FIELDS = ("files", "offsets", "nbytes", "sides", "y", "w", "study")

    def __len__(self) -> int:
        return len(self.offsets)

    @staticmethod
    def concat(parts: Sequence["Samples"]) -> "Samples":
        """One Samples holding all of ``parts``, in order."""
        parts = list(parts)
        if not parts:
            i = np.zeros(0, np.int64)
            f = np.zeros(0, np.float32)
            return Samples(np.zeros(0, object), i, i, i, f, f, np.zeros(0, object))
        return Samples(*(np.concatenate([getattr(p, k) for p in parts]) for k in Samples._FIELDS))

    def select(self, mask: np.ndarray) -> "Samples":
        """The samples where ``mask`` is True."""
        return Samples(*(getattr(self, k)[mask] for k in Samples._FIELDS))

    def kept(self) -> "Samples":
        """Only the crops with a weight > 0."""
        return self.select(self.w > 0)


def collect_samples(metas: Mapping[str, dict], uids: Iterable[str], vertebra: str, cache_dir: str | Path,
                    labels: Mapping[str, Mapping[str, int]], box_slices: Mapping[str, set[int]],
                    policy: str = "exclude", other_weight: float = 0.2) -> Samples:
    """The crops of ``vertebra`` in ``uids`` with their targets (see :func:`vertebra_targets`)."""
    files, offsets, nbytes, sides, ys, ws, studies = [], [], [], [], [], [], []
    for uid in sorted(uids):
        meta = metas.get(uid)
        if meta is None or vertebra not in meta["vertebrae"]:
            continue
        entry = meta["vertebrae"][vertebra]
        numbers = entry["slice_numbers"]
        y, w = vertebra_targets(bool(labels[uid][vertebra]), numbers, box_slices.get(uid), policy, other_weight)
        files += [str(Path(cache_dir) / uid / "crops.bin")] * len(numbers)
        offsets += [int(r[0]) for r in entry["crops"]]
        nbytes += [int(r[1]) for r in entry["crops"]]
        sides += [int(entry["side"])] * len(numbers)
        ys.append(y)
        ws.append(w)
        studies += [uid] * len(numbers)
    cat = (lambda a: np.concatenate(a).astype(np.float32)) if ys else (lambda a: np.zeros(0, np.float32))
    ints = lambda a: np.array(a, dtype=np.int64)  # noqa: E731
    return Samples(np.array(files, dtype=object), ints(offsets), ints(nbytes), ints(sides), cat(ys), cat(ws),
                   np.array(studies, dtype=object))


def read_square(path: str, offset: int, nbytes: int, planes: int, side: int) -> np.ndarray:
    """One cached crop's ``(planes, side, side)`` int16 HU square."""
    with open(path, "rb") as fh:
        fh.seek(int(offset))
        buf = fh.read(int(nbytes))
    if len(buf) != int(nbytes):
        raise OSError(f"{path}: truncated crop cache (wanted {nbytes} bytes at {offset}); delete the study's folder")
    return decode_square(buf, planes, int(side))


def load_crop(samples: Samples, i: int, config: ModelConfig, out: np.ndarray | None = None) -> np.ndarray:
    """Model input ``(S, S, C)`` float32 of sample ``i``: the cached square, enlarged and windowed on load (into
    ``out``, of that shape and dtype, when given)."""
    from cspine_submit.score.crop import n_planes, squares_to_input

    sq = read_square(samples.files[i], samples.offsets[i], samples.nbytes[i], n_planes(config), samples.sides[i])
    return squares_to_input(sq[None], config, out=None if out is None else out[None])[0]


def load_batch(samples: Samples, indices: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Model input ``(len(indices), S, S, C)`` float32 of the samples at ``indices``, each written into place."""
    out = np.empty((len(indices),) + tuple(config.input_shape), np.float32)
    for k, i in enumerate(np.asarray(indices).tolist()):
        load_crop(samples, int(i), config, out=out[k])
    return out


def load_crops(samples: Samples, config: ModelConfig, order: np.ndarray | None = None) -> Iterable[np.ndarray]:
    """Yield the model input of ``samples`` (float32 ``(S, S, C)``) in ``order``."""
    for i in range(len(samples)) if order is None else order:
        yield load_crop(samples, int(i), config)


def affine_warp(x, transforms):
    """Bilinear affine resampling with zero fill, in plain tensor ops that XLA compiles (gathers and arithmetic).

    The same mapping and sampling as TensorFlow's ``ImageProjectiveTransformV3`` (``interpolation="BILINEAR"``,
    ``fill_mode="CONSTANT"``, ``fill_value=0``) for affine transforms, which has no XLA kernel: a training step
    with that op inside cannot be compiled (``jit_compile``, Keras's default on one GPU). Each of the four
    neighbours of a source point reads 0 when it lies outside the image. Measured on 2 CPU cores, a batch of 16:
    256x256x3 12 ms compiled, 33 ms uncompiled (the op: 21 ms); 512x512x1 12 ms compiled, 90 ms uncompiled (the
    op: 33 ms); equal to the op within 3e-7.

    Parameters
    ----------
    x : (B, H, W, C) float32 tensor
    transforms : (B, 8) float32 tensor
        ``[a0, a1, a2, b0, b1, b2, c0, c1]`` per image: output pixel (column u, row v) samples the input at column
        ``a0 u + a1 v + a2``, row ``b0 u + b1 v + b2`` (``c0, c1`` must be 0: affine only).

    Returns
    -------
    (B, H, W, C) float32 tensor
    """
    import tensorflow as tf

    shape = tf.shape(x)
    h, w = shape[1], shape[2]
    rows = tf.cast(tf.range(h), tf.float32)[None, :, None]
    cols = tf.cast(tf.range(w), tf.float32)[None, None, :]
    t = [transforms[:, i][:, None, None] for i in range(6)]
    src_x = t[0] * cols + t[1] * rows + t[2]  # (B, H, W): the input column and row each output pixel samples
    src_y = t[3] * cols + t[4] * rows + t[5]
    x0, y0 = tf.floor(src_x), tf.floor(src_y)
    fx, fy = src_x - x0, src_y - y0
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    index, weight = [], []
    for dy, wy in ((0.0, 1.0 - fy), (1.0, fy)):
        for dx, wx in ((0.0, 1.0 - fx), (1.0, fx)):
            yy, xx = y0 + dy, x0 + dx
            inside = tf.cast((yy >= 0) & (yy < hf) & (xx >= 0) & (xx < wf), tf.float32)
            yi = tf.clip_by_value(tf.cast(yy, tf.int32), 0, h - 1)
            xi = tf.clip_by_value(tf.cast(xx, tf.int32), 0, w - 1)
            index.append(yi * w + xi)
            weight.append(wy * wx * inside)  # a neighbour outside the image weighs 0: it reads the fill value
    # One gather of the four neighbours (a third of the CPU time of four gathers; XLA fuses either).
    flat = tf.reshape(x, tf.stack([shape[0], h * w, shape[3]]))
    index = tf.reshape(tf.stack(index, axis=1), tf.stack([shape[0], 4 * h * w]))
    values = tf.reshape(tf.gather(flat, index, batch_dims=1), tf.stack([shape[0], 4, h, w, shape[3]]))
    return tf.reduce_sum(values * tf.stack(weight, axis=1)[..., None], axis=1)


def augment_batch(x, seeds, max_rotation_deg: float = 10.0, max_scale: float = 0.1, max_contrast: float = 0.1,
                  max_shift: float = 0.05):
    """Random left-right flip, small rotation and scaling about the centre, intensity jitter, for a whole batch.

    One vectorised transform per batch (not per crop): on 2 CPU cores the per-crop version fed 256-pixel crops at
    about 200/s, below a T4's training rate.

    Parameters
    ----------
    x : (B, S, S, C) float32 tensor in [0, 1]
    seeds : (B, 2) int tensor
        Per-crop seeds; the batch's random numbers are drawn from its first crop's seed (unique per batch and
        epoch), so the same seeds give the same augmentation.

    Returns
    -------
    (B, S, S, C) float32 tensor in [0, 1]; pixels brought in from outside the crop are 0.
    """
    import tensorflow as tf

    x = tf.convert_to_tensor(x, tf.float32)
    b = tf.shape(x)[0]
    u = tf.random.stateless_uniform(tf.stack([b, 5]), tf.cast(seeds[0], tf.int64), -1.0, 1.0)
    x = tf.where((u[:, 4] < 0.0)[:, None, None, None], tf.reverse(x, axis=[2]), x)
    angle = u[:, 0] * (max_rotation_deg * np.pi / 180.0)
    scale = 1.0 + u[:, 1] * max_scale
    size = tf.cast(tf.shape(x)[1], tf.float32)
    c = (size - 1.0) / 2.0
    # Output pixel p samples input at A (p - c) + c, with A = R(angle) / scale.
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    a0, a1, b0, b1 = cos, -sin, sin, cos
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, c - a0 * c - a1 * c, b0, b1, c - b0 * c - b1 * c, zeros, zeros], axis=1)
    x = affine_warp(x, transforms)
    x = x * (1.0 + u[:, 2] * max_contrast)[:, None, None, None] + (u[:, 3] * max_shift)[:, None, None, None]
    return tf.clip_by_value(x, 0.0, 1.0)


def augment(x, seed, **kwargs):
    """:func:`augment_batch` of one crop ``(S, S, C)`` with its seed ``(2,)``."""
    import tensorflow as tf

    return augment_batch(x[None], tf.reshape(tf.cast(seed, tf.int64), (1, 2)), **kwargs)[0]


def augmenting_model(classifier, input_shape, seed: int):
    """``classifier`` behind a layer that applies :func:`augment_batch` while training (identity otherwise).

    The augmentation then runs where the model runs (the GPU), inside the compiled training step (its warp,
    :func:`affine_warp`, is made of ops XLA compiles, so ``jit_compile=True`` works): on 2 CPU
    cores the input pipeline alone feeds 256x256x3 crops at 1340-1390/s (950-1200/s with one core kept busy), with
    the augmentation on the CPU at about 430/s, below two T4s' training rate (about 650/s). The classifier inside
    is the one to save.
    """
    import keras

    x = keras.Input(shape=tuple(input_shape))
    return keras.Model(x, classifier(TrainAugment(seed=seed, dtype="float32")(x)), name="augmenting")


@functools.lru_cache(maxsize=None)
def _train_augment_class():
    import keras
    import tensorflow as tf

    @keras.saving.register_keras_serializable(package="cspine_submit")
    class TrainAugment(keras.layers.Layer):
        """:func:`augment_batch` while training, seeded from a Keras SeedGenerator (its state is checkpointed)."""

        def __init__(self, seed: int = 0, **kwargs):
            super().__init__(**kwargs)
            self.seed = int(seed)
            self.generator = keras.random.SeedGenerator(self.seed)

        def call(self, x, training=None):
            if not training:
                return x
            seed = tf.cast(self.generator.next(), tf.int64)
            # Under MirroredStrategy every replica holds the same generator state: fold the replica's index in,
            # so each replica draws its own augmentation (replica 0, and one device, keep the plain seed).
            replica = tf.distribute.get_replica_context()
            rid = tf.cast(replica.replica_id_in_sync_group, tf.int64) if replica is not None else tf.constant(0, tf.int64)
            seed = seed + tf.stack([tf.constant(0, tf.int64), rid * 1_000_003])
            return augment_batch(x, tf.tile(seed[None], [tf.shape(x)[0], 1]))

        def get_config(self):
            return {**super().get_config(), "seed": self.seed}

    return TrainAugment


def TrainAugment(seed: int = 0, **kwargs):  # noqa: N802 - a layer factory: the class needs keras at import
    """The training-only augmentation layer (see :func:`augmenting_model`)."""
    return _train_augment_class()(seed=seed, **kwargs)


def make_dataset(samples: Samples, config: ModelConfig, batch_size: int, *, shuffle: bool, augment_data: bool,
                 seed: int = 0, sample_weight: np.ndarray | None = None, workers: int = 2, first_epoch: int = 0):
    """A ``tf.data.Dataset`` of ``(x, y, w)`` batches streamed from the cache (one epoch per iteration).

    A Python generator yields each batch's indices and augmentation seeds; reading, decompressing, enlarging and
    windowing a whole batch (:func:`load_batch`) is one ``tf.numpy_function`` call, ``workers`` of them in parallel
    (zlib, OpenCV and numpy release the GIL). One call per batch, not per crop: measured with
    ``benchmarks/bench_train_input.py`` on 2 idle cores (3 runs), 256x256x3 crops at 1340-1390/s against 890-1090/s
    per crop, 512x512x1 at 910-1000/s against 680-740/s; with one core kept busy (the training loop's host thread),
    950-1200/s and 700-770/s. Two T4s need about 650 and 160/s. With ``augment_data`` each batch is
    then augmented on the CPU in one vectorised call (:func:`augment_batch`); training augments on the device.
    Shuffling and augmentation are seeded from ``seed`` and the epoch number, so a run is reproducible. Each
    iteration is one epoch, counted from ``first_epoch`` (0-based): a resumed run passes the epochs it already has,
    so its next epoch draws that epoch's order, not the first one's again. The batches hold the same crops in the
    same order, with the same seeds, as the per-crop pipeline of before.
    """
    import tensorflow as tf

    w_all = samples.w if sample_weight is None else np.asarray(sample_weight, np.float32)
    y_all = samples.y.astype(np.float32)
    n = len(samples)
    epoch = {"n": int(first_epoch)}
    shape = tuple(config.input_shape)

    def gen():
        rng = np.random.default_rng([seed, epoch["n"]])
        order = rng.permutation(n) if shuffle else np.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size].astype(np.int64)
            seeds = np.stack([np.full(idx.size, seed, np.int64),
                              epoch["n"] * 1_000_003 + np.arange(start, start + idx.size, dtype=np.int64)], axis=1)
            yield idx, seeds
        epoch["n"] += 1

    def load(idx):
        return load_batch(samples, idx, config), y_all[idx][:, None], w_all[idx]

    def load_tf(idx, s):
        x, y, w = tf.numpy_function(load, [idx], (tf.float32, tf.float32, tf.float32), stateful=False)
        x.set_shape((None,) + shape)
        y.set_shape((None, 1))
        w.set_shape((None,))
        return x, y, w, s

    sig = (tf.TensorSpec((None,), tf.int64), tf.TensorSpec((None, 2), tf.int64))
    ds = tf.data.Dataset.from_generator(gen, output_signature=sig)
    ds = ds.map(load_tf, num_parallel_calls=max(int(workers), 1), deterministic=True)
    if augment_data:  # on the CPU; training augments on the device instead (augmenting_model)
        ds = ds.map(lambda x, y, w, s: (augment_batch(x, s), y, w), num_parallel_calls=max(int(workers), 1),
                    deterministic=True)
    else:
        ds = ds.map(lambda x, y, w, s: (x, y, w))
    return ds.prefetch(tf.data.AUTOTUNE)
