"""Training data: labels, the study split, the per-study crop cache and the streaming tf.data pipeline.

Crops are made by exactly the inference path: ``dicom.scan_study`` -> ``localize.plan_crops`` ->
``crop.slices_needed`` -> ``dicom.read_slices`` -> ``crop.prepare_crops``. Each study's crops are cached once
on disk (``<cache>/<uid>/<vertebra>.npy``, float16, plus ``meta.json``); training streams them back through
memory maps, so the data set is never held in memory.

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
    """Short hash of what determines the crops: the crop fields of the config and the ranges file's bytes."""
    h = hashlib.sha256()
    fields = {f: getattr(config, f) for f in CACHE_FIELDS if hasattr(config, f)}
    h.update(json.dumps(fields, sort_keys=True, default=list).encode())
    h.update(Path(ranges_path).read_bytes())
    return h.hexdigest()[:12]


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
    """Scan, plan, read and crop one study exactly as inference does; write its crops and meta.json.

    Returns the meta dict: ``uid``, ``n_slices``, ``vertebrae`` -> ``{slice_indices, slice_numbers, box, file}``.
    Already cached studies are returned from their meta.json without work.
    """
    from cspine_submit import crop, dicom, localize

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
    meta = {"uid": job.uid, "n_slices": header.n_slices, "vertebrae": {}}
    for v, plan in plans.items():
        crops = crop.prepare_crops(slices, needed, plan, config)
        np.save(tmp / f"{v}.npy", crops.astype(np.float16))
        meta["vertebrae"][v] = {
            "slice_indices": [int(i) for i in plan.slice_indices],
            "slice_numbers": [_file_number(header.files[i]) for i in plan.slice_indices],
            "box": [int(b) for b in plan.box],
            "file": f"{v}.npy",
        }
    (tmp / "meta.json").write_text(json.dumps(meta))
    if out.exists():  # another worker finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(out)
    return meta


def build_cache(data_dir: str | Path, uids: Iterable[str], cache_dir: str | Path, ranges_path: str | Path,
                config: ModelConfig, workers: int = 2, progress: bool = True) -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """Cache the crops of every study; returns ``({uid: meta}, [(uid, error), ...])``."""
    from cspine_submit.reader import iter_studies

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


def _config_dict(config: ModelConfig) -> dict:
    import dataclasses

    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


# --------------------------------------------------------------------------------------------------------------
# Samples and tf.data


@dataclass(frozen=True)
class Samples:
    """The crops of one vertebra for one split: where they are and their targets.

    Attributes
    ----------
    files : (n,) array of str
        ``.npy`` file of each crop.
    rows : (n,) int array
        Row of the crop in its file.
    y, w : (n,) float32 arrays
        Target and weight (0 = left out).
    study : (n,) array of str
        Study of each crop (for vertebra-level evaluation).
    """

    files: np.ndarray
    rows: np.ndarray
    y: np.ndarray
    w: np.ndarray
    study: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def concat(parts: Sequence["Samples"]) -> "Samples":
        """One Samples holding all of ``parts``, in order."""
        parts = list(parts)
        if not parts:
            return Samples(np.zeros(0, object), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32),
                           np.zeros(0, object))
        return Samples(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("files", "rows", "y", "w", "study")))

    def select(self, mask: np.ndarray) -> "Samples":
        """The samples where ``mask`` is True."""
        return Samples(self.files[mask], self.rows[mask], self.y[mask], self.w[mask], self.study[mask])

    def kept(self) -> "Samples":
        """Only the crops with a weight > 0."""
        return self.select(self.w > 0)


def collect_samples(metas: Mapping[str, dict], uids: Iterable[str], vertebra: str, cache_dir: str | Path,
                    labels: Mapping[str, Mapping[str, int]], box_slices: Mapping[str, set[int]],
                    policy: str = "exclude", other_weight: float = 0.2) -> Samples:
    """The crops of ``vertebra`` in ``uids`` with their targets (see :func:`vertebra_targets`)."""
    files, rows, ys, ws, studies = [], [], [], [], []
    for uid in sorted(uids):
        meta = metas.get(uid)
        if meta is None or vertebra not in meta["vertebrae"]:
            continue
        entry = meta["vertebrae"][vertebra]
        numbers = entry["slice_numbers"]
        y, w = vertebra_targets(bool(labels[uid][vertebra]), numbers, box_slices.get(uid), policy, other_weight)
        path = str(Path(cache_dir) / uid / entry["file"])
        files += [path] * len(numbers)
        rows += list(range(len(numbers)))
        ys.append(y)
        ws.append(w)
        studies += [uid] * len(numbers)
    cat = (lambda a: np.concatenate(a).astype(np.float32)) if ys else (lambda a: np.zeros(0, np.float32))
    return Samples(np.array(files, dtype=object), np.array(rows, dtype=np.int64), cat(ys), cat(ws),
                   np.array(studies, dtype=object))


def load_crops(samples: Samples, order: np.ndarray | None = None) -> Iterable[np.ndarray]:
    """Yield the crops of ``samples`` (float32) in ``order``, reading each through a memory map."""
    cache: dict[str, np.ndarray] = {}
    for i in range(len(samples)) if order is None else order:
        path = samples.files[i]
        arr = cache.get(path)
        if arr is None:
            if len(cache) > 64:  # bound open maps
                cache.clear()
            arr = cache[path] = np.load(path, mmap_mode="r")
        yield np.asarray(arr[samples.rows[i]], dtype=np.float32)


def augment(x, seed, max_rotation_deg: float = 10.0, max_scale: float = 0.1, max_contrast: float = 0.1,
            max_shift: float = 0.05):
    """Random left-right flip, small rotation and scaling about the centre, intensity jitter (stateless, seeded).

    Parameters
    ----------
    x : (S, S, C) float32 tensor in [0, 1]
    seed : (2,) int tensor
        Per-sample seed: the same seed gives the same augmentation.

    Returns
    -------
    (S, S, C) float32 tensor in [0, 1]; pixels brought in from outside the crop are 0.
    """
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=4)
    x = tf.image.stateless_random_flip_left_right(x, seeds[0])
    u = tf.random.stateless_uniform([4], seeds[1], -1.0, 1.0)
    angle = u[0] * (max_rotation_deg * np.pi / 180.0)
    scale = 1.0 + u[1] * max_scale
    size = tf.cast(tf.shape(x)[0], tf.float32)
    c = (size - 1.0) / 2.0
    # Output pixel p samples input at A (p - c) + c, with A = R(angle) / scale.
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    a0, a1 = cos, -sin
    b0, b1 = sin, cos
    transform = tf.stack([a0, a1, c - a0 * c - a1 * c, b0, b1, c - b0 * c - b1 * c, 0.0, 0.0])
    x = tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None], transforms=transform[None], output_shape=tf.shape(x)[:2], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")[0]
    x = x * (1.0 + u[2] * max_contrast) + u[3] * max_shift
    return tf.clip_by_value(x, 0.0, 1.0)


def make_dataset(samples: Samples, batch_size: int, input_shape, *, shuffle: bool, augment_data: bool,
                 seed: int = 0, sample_weight: np.ndarray | None = None):
    """A ``tf.data.Dataset`` of ``(x, y, w)`` batches streamed from the cache (one epoch per iteration).

    Shuffling and augmentation are seeded from ``seed`` and the epoch number, so a run is reproducible.
    """
    import tensorflow as tf

    w_all = samples.w if sample_weight is None else np.asarray(sample_weight, np.float32)
    n = len(samples)
    epoch = {"n": 0}

    def gen():
        rng = np.random.default_rng([seed, epoch["n"]])
        order = rng.permutation(n) if shuffle else np.arange(n)
        for j, (i, x) in enumerate(zip(order, load_crops(samples, order))):
            yield x, np.float32(samples.y[i]), np.float32(w_all[i]), np.array([seed, epoch["n"] * 1_000_003 + j], np.int64)
        epoch["n"] += 1

    sig = (
        tf.TensorSpec(tuple(input_shape), tf.float32),
        tf.TensorSpec((), tf.float32),
        tf.TensorSpec((), tf.float32),
        tf.TensorSpec((2,), tf.int64),
    )
    ds = tf.data.Dataset.from_generator(gen, output_signature=sig)
    if augment_data:
        ds = ds.map(lambda x, y, w, s: (augment(x, s), y, w), num_parallel_calls=2, deterministic=True)
    else:
        ds = ds.map(lambda x, y, w, s: (x, y, w))
    ds = ds.map(lambda x, y, w: (x, tf.reshape(y, (1,)), w))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
