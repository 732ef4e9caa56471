"""Throughput of ``models.score`` (compiled, padded batches) and of ``crop.prepare_crops``, on this machine.

Prints one table row per (head, input shape, batch size): crops per second after a warm-up batch, the time of one
study's worth of scoring (7 vertebrae x K crops), and parameters. Untrained weights: speed does not depend on them.

    python benchmarks/bench_score.py                 # tiny, gap at 256x256x3, seed at 512x512x1
    python benchmarks/bench_score.py --quick         # fewer batches
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

CASES = [
    ("tiny", (64, 64, 1), 32),
    ("gap", (256, 256, 3), 16),
    ("gap", (256, 256, 3), 32),
    ("seed", (512, 512, 1), 8),
    ("gap", (512, 512, 1), 8),
]


def bench_score(head, shape, batch_size, n_batches):
    from cspine_submit.models import build_classifier, predict

    model = build_classifier(head, shape)
    x = np.random.default_rng(0).uniform(0, 1, (batch_size * n_batches,) + shape).astype(np.float32)
    predict(model, x[:batch_size], batch_size)  # trace + warm-up
    t0 = time.perf_counter()
    predict(model, x, batch_size)
    dt = time.perf_counter() - t0
    return len(x) / dt, model.count_params()


def bench_crop(k=15, rows=512, input_size=256, channels="windows"):
    from cspine_submit.config import ModelConfig
    from cspine_submit.crop import prepare_crops, slices_needed
    from cspine_submit.localize import CropPlan

    cfg = ModelConfig(input_size=input_size, channels=channels)
    plan = CropPlan("C3", tuple(range(10, 10 + 2 * k, 2)), (150, 160, 330, 350))
    need = slices_needed([plan], cfg, 200)
    slices = np.random.default_rng(0).uniform(-1000, 2000, (len(need), rows, rows)).astype(np.float32)
    prepare_crops(slices, need, plan, cfg)
    t0 = time.perf_counter()
    n = 20
    for _ in range(n):
        prepare_crops(slices, need, plan, cfg)
    return n * k / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import tensorflow as tf

    devices = [d.device_type for d in tf.config.list_logical_devices()]
    print(f"devices: {devices}; CPU threads: {os.cpu_count()}")
    print(f"{'head':<6}{'input':>15}{'batch':>7}{'crops/s':>10}{'s per study (105 crops)':>26}{'params':>13}")
    for head, shape, bs in CASES:
        n_batches = 2 if args.quick or head != "tiny" else 10
        if shape[0] >= 512:
            n_batches = 2
        rate, params = bench_score(head, shape, bs, n_batches)
        print(f"{head:<6}{'x'.join(map(str, shape)):>15}{bs:>7}{rate:>10.1f}{105 / rate:>26.2f}{params:>13,}")
    for size, ch in ((256, "windows"), (64, "single"), (512, "single")):
        print(f"prepare_crops 512px slices -> {size} ({ch}): {bench_crop(input_size=size, channels=ch):.0f} crops/s")


if __name__ == "__main__":
    main()
