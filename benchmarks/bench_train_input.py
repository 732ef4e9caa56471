"""Training cache and input pipeline: bytes per study and crops per second, on real CT, on this machine.

Crops come from the real 512x512 Siemens CT series in tests/data (JPEG 2000, 20 slices): 7 "vertebrae" x 15 crops
with boxes of 150-250 px around the spine (a cervical vertebra's box with margin at 0.3-0.5 mm pixels), made by
``crop.hu_squares`` and stored by ``train_data.encode_square``, exactly as ``train`` caches them. Then the training
input pipeline (``train_data.make_dataset``: read, decompress, enlarge, window, augment, batch) streams them.

For each config (the default 256x256x3 windows, the seed's 512x512x1) it prints: stored bytes per crop and per
study (7 x 15 crops), the projection for 2019 studies, the old cache (float16 windowed crops, 7 x 15 x S x S x C x 2
bytes) for comparison, crops/s of the pipeline with 1 and 2 parallel loaders (with augmentation) and of loading
alone (also with one core kept busy, and with the per-crop pipeline of before), and the training rate of one and of two T4s it has to feed (ResNet-50 training figures, scaled by pixels:
cspine_submit.train.plan.GPU_TRAIN_224).

    python benchmarks/bench_train_input.py            # both configs
    python benchmarks/bench_train_input.py --quick    # fewer crops per timing
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

SERIES = Path(__file__).resolve().parents[1] / "tests" / "data" / "dicom" / "series_j2k_ct"
STUDIES = 2019


def make_store(folder: Path, slices: np.ndarray, config, seed: int = 0):
    """One study's crops (7 x 15) cached as train does; returns the Samples over them."""
    from cspine_submit.train import data as td
    from cspine_submit.score.crop import hu_squares, n_planes
    from cspine_submit.localize import CropPlan

    rng = np.random.default_rng(seed)
    bone = (slices > 200).mean(axis=0) > 0.5
    ys, xs = np.nonzero(bone)
    cy, cx = int(np.median(ys)), int(np.median(xs))
    path = folder / "crops.bin"
    offsets, nbytes, sides = [], [], []
    with open(path, "wb") as fh:
        for v in range(7):
            side = int(rng.integers(130, 210))  # box; with the 0.1 margin the square is 156-252 px
            y0 = cy - side // 2 + int(rng.integers(-15, 16))
            x0 = cx - side // 2 + int(rng.integers(-15, 16))
            plan = CropPlan(f"C{v + 1}", tuple(int(i) for i in rng.choice(len(slices), 15)), (y0, x0, y0 + side, x0 + side))
            sq = hu_squares(slices, np.arange(len(slices)), plan, config)
            for s in sq:
                buf = td.encode_square(s)
                offsets.append(fh.tell())
                fh.write(buf)
                nbytes.append(len(buf))
                sides.append(sq.shape[-1])
    n = len(offsets)
    assert n_planes(config) >= 1
    return td.Samples(np.array([str(path)] * n, dtype=object), np.array(offsets), np.array(nbytes), np.array(sides),
                      np.zeros(n, np.float32), np.ones(n, np.float32), np.array(["s"] * n, dtype=object))


def pipeline_rate(samples, config, workers: int, augment: bool, n_crops: int, batch: int = 16) -> float:
    from cspine_submit.train.data import Samples, make_dataset

    many = Samples.concat([samples] * int(np.ceil(n_crops / len(samples))))
    ds = make_dataset(many, config, batch, shuffle=True, augment_data=augment, seed=1, workers=workers)
    it = iter(ds)
    next(it)
    t0 = time.perf_counter()
    n = 0
    for x, _, _ in it:
        n += int(x.shape[0])
    return n / (time.perf_counter() - t0)


def per_crop_rate(samples, config, workers: int, n_crops: int, batch: int = 16) -> float:
    """The pipeline of before (the baseline, measured in the same run), as ``make_dataset`` was until it loaded
    whole batches: a generator yielding one index and seed per crop, one ``tf.numpy_function`` per crop."""
    import tensorflow as tf
    from cspine_submit.train.data import Samples, load_crop

    many = Samples.concat([samples] * int(np.ceil(n_crops / len(samples))))
    y_all, w_all, shape = many.y.astype(np.float32), many.w, tuple(config.input_shape)

    def gen():
        order = np.random.default_rng([1, 0]).permutation(len(many))
        for j, i in enumerate(order):
            yield np.int64(i), np.array([1, j], np.int64)

    def load(i):
        i = int(i)
        return load_crop(many, i, config), y_all[i:i + 1], w_all[i]

    def load_tf(i, s):
        x, y, w = tf.numpy_function(load, [i], (tf.float32, tf.float32, tf.float32), stateful=False)
        x.set_shape(shape)
        y.set_shape((1,))
        w.set_shape(())
        return x, y, w, s

    sig = (tf.TensorSpec((), tf.int64), tf.TensorSpec((2,), tf.int64))
    ds = tf.data.Dataset.from_generator(gen, output_signature=sig)
    ds = ds.map(load_tf, num_parallel_calls=workers, deterministic=True).batch(batch)
    it = iter(ds.map(lambda x, y, w, s: (x, y, w)).prefetch(tf.data.AUTOTUNE))
    next(it)
    t0 = time.perf_counter()
    n = 0
    for x, _, _ in it:
        n += int(x.shape[0])
    return n / (time.perf_counter() - t0)


def _spin(stop):
    """Keep one core busy, as the training loop's host thread does while the GPUs train."""
    while not stop.is_set():
        sum(range(10_000))


def with_one_core_busy(fn, *args):
    """``fn(*args)`` while another process keeps one of the cores busy."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=_spin, args=(stop,), daemon=True)
    proc.start()
    try:
        time.sleep(0.5)
        return fn(*args)
    finally:
        stop.set()
        proc.join(5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)

    from cspine_submit.read import dicom
    from cspine_submit.config import ModelConfig
    from cspine_submit.train.plan import GPU_TRAIN_224

    header = dicom.scan_study(SERIES)
    slices = dicom.read_slices(header, np.arange(header.n_slices))
    configs = {
        "default 256x256x3 windows": ModelConfig(),
        "seed 512x512x1": ModelConfig(head="seed", input_size=512, channels="single"),
    }
    n = 320 if args.quick else 1200
    print(f"real CT: {SERIES.name}, {slices.shape}; {os.cpu_count()} CPUs (shared: timings are noisy)")
    print(f"{'config':<28}{'kB/crop':>8}{'MB/study':>9}{'GB/2019':>8}{'old GB':>8}"
          f"{'w=1 aug':>9}{'w=2 aug':>9}{'before':>8}{'w=2 load':>9}{'busy':>7}{'1 T4':>7}{'2 T4':>7}")
    for name, cfg in configs.items():
        with tempfile.TemporaryDirectory() as tmp:
            s = make_store(Path(tmp), slices, cfg)
            per_crop = float(np.mean(s.nbytes))
            per_study = float(np.sum(s.nbytes))
            old = 7 * 15 * cfg.input_size ** 2 * cfg.n_channels * 2
            r1 = pipeline_rate(s, cfg, 1, True, n)
            r2 = pipeline_rate(s, cfg, 2, True, n)
            r2_load = pipeline_rate(s, cfg, 2, False, n)
            r_before = per_crop_rate(s, cfg, 2, n)
            r_busy = with_one_core_busy(pipeline_rate, s, cfg, 2, False, n)
        t4 = GPU_TRAIN_224["T4"]["img_s"] * (224 / cfg.input_size) ** 2
        print(f"{name:<28}{per_crop / 1e3:>8.1f}{per_study / 1e6:>9.2f}{per_study * STUDIES / 1e9:>8.1f}"
              f"{old * STUDIES / 1e9:>8.1f}{r1:>9.0f}{r2:>9.0f}{r_before:>8.0f}{r2_load:>9.0f}{r_busy:>7.0f}"
              f"{t4:>7.0f}{2 * t4:>7.0f}")
    print("crops/s: the training input pipeline (read, decompress, enlarge, window: 'load') with 1 or 2 parallel "
          "loaders, one call per batch; 'before': the per-crop pipeline it replaced (one call per crop, 2 loaders); "
          "'busy': 'w=2 load' while another process keeps one core busy (the training loop's own host thread); "
          "'aug' adds the augmentation on the CPU, which training does not do (it augments on the GPU, "
          "inside the model: train.data.augmenting_model); '1 T4' / '2 T4': ResNet-50 training img/s of one and two "
          "T4s at that input (mixed precision, scaled by pixels; two T4s at most twice one)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
