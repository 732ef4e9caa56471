"""What issue 11 changed on the scoring path, before vs after, measured in one run.

1. Bytes per study crossing from a worker process to the scoring process: a ``PreparedStudy`` of the default
   config (gap head, 256 x 256 x 3 windows, K = 15: 7 x 15 crops) pickled with float32 crops (before) and with
   uint16 crops (after), and the seconds to send it through a real ``multiprocessing`` pipe.
2. Scoring throughput (crops/s) with two logical CPU devices standing in for Kaggle's two T4s, in a fresh process:
   before = one ``MirroredStrategy`` per classifier, each batch handed whole to both replicas (the code this issue
   replaced, reproduced here), float32 crops; after = ``models.load_classifiers`` placing the classifiers
   round-robin by vertebra and scoring the devices concurrently, uint16 crops; and after on one device.
3. The cost of keeping submission.csv complete: one atomic write of a 1500-study file (12,000 rows), and that as a
   share of a run refreshing every 30 s.

    python benchmarks/bench_kaggle_run.py                  # ResNet50 (gap) at 128 x 128 x 3, 4 studies per mode
    python benchmarks/bench_kaggle_run.py --size 64 --studies 2

Logical CPU devices share the same cores: the throughput comparison measures the overheads (copies, replica
synchronisation), not a doubling. On a 2-core machine shared with other work, repeat and compare ratios.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def _echo(conn) -> None:
    while True:
        obj = conn.recv()
        if obj is None:
            return
        conn.send(len(obj.crops))


def transport(repeats: int = 5) -> dict:
    """Pickled bytes and pipe seconds of one default-config study, float32 vs uint16 crops."""
    import multiprocessing as mp

    from cspine_submit.config import VERTEBRAE, ModelConfig
    from cspine_submit.score.crop import encode_crops
    from cspine_submit.submit import PreparedStudy

    config = ModelConfig()
    rng = np.random.default_rng(0)
    f32 = {v: rng.uniform(0, 1, (config.slices_per_vertebra,) + config.input_shape).astype(np.float32)
           for v in VERTEBRAE}
    studies = {"float32 (before)": f32, "uint16 (after)": {v: encode_crops(x) for v, x in f32.items()}}
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_echo, args=(child,))
    proc.start()
    out = {}
    try:
        for name, crops in studies.items():
            study = PreparedStudy("uid", crops, 105, 300, {}, [], {})
            size = len(pickle.dumps(study, protocol=pickle.HIGHEST_PROTOCOL))
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                parent.send(study)
                parent.recv()
                times.append(time.perf_counter() - t)
            out[name] = {"bytes": size, "seconds_median": float(np.median(times)), "seconds_min": float(min(times))}
    finally:
        parent.send(None)
        proc.join()
    return out


_SCORING = r"""
import json, sys, time, numpy as np, tensorflow as tf
weights, mode, n_studies, k = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode != "after-1-device":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from cspine_submit.score import crop
from cspine_submit.score import models as M
from cspine_submit.config import VERTEBRAE, ModelConfig
config = ModelConfig.from_json(weights + "/model_config.json")
rng = np.random.default_rng(0)
x = rng.uniform(0, 1, (k,) + config.input_shape).astype(np.float32)

if mode == "before":
    # The replaced code: a MirroredStrategy per classifier; the whole batch goes to every replica, which slices it.
    def old_fn(model, strategy):
        def replica_fn(x):
            ctx = tf.distribute.get_replica_context()
            per = tf.shape(x)[0] // ctx.num_replicas_in_sync
            start = ctx.replica_id_in_sync_group * per
            return model(x[start:start + per], training=False)
        @tf.function
        def fn(x):
            out = strategy.run(replica_fn, args=(x,))
            return tf.concat(strategy.experimental_local_results(out), axis=0)
        return fn
    fns = {}
    for v in VERTEBRAE:
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = M.build_classifier(config.head, config.input_shape)
        model.load_weights(weights + "/" + config.classifier_files[v])
        fns[v] = old_fn(model, strategy)
    def score_study(crops):
        out = {}
        for v, c in crops.items():
            size = M._bucket(len(c), config.batch_size)
            size = -(-size // 2) * 2
            c = np.concatenate([c, np.zeros((size - len(c),) + c.shape[1:], np.float32)])
            out[v] = np.asarray(fns[v](c)).reshape(-1)[:k]
        return out
    crops = {v: x for v in VERTEBRAE}
else:
    _, models = M.load_classifiers(weights)
    score_study = lambda crops: M.score(models, crops, config.batch_size)
    crops = {v: crop.encode_crops(x) for v in VERTEBRAE}
score_study(crops)  # trace
t = time.perf_counter()
for _ in range(n_studies):
    score_study(crops)
dt = time.perf_counter() - t
print(json.dumps({"mode": mode, "crops_per_s": n_studies * 7 * k / dt, "seconds_per_study": dt / n_studies}))
"""


def scoring(size: int, n_studies: int, k: int = 15) -> list[dict]:
    from cspine_submit.config import VERTEBRAE, ModelConfig
    from cspine_submit.score.models import build_classifier, save_classifier

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config = ModelConfig(head="gap", input_size=size, channels="windows", batch_size=16, mixed_precision=False,
                             classifier_files={v: f"{v}.weights.h5" for v in VERTEBRAE})
        config.to_json(Path(tmp) / "model_config.json")
        model = build_classifier("gap", config.input_shape)
        for v in VERTEBRAE:
            model.save_weights(Path(tmp) / f"{v}.weights.h5")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        for mode in ("before", "after", "after-1-device", "before", "after"):
            proc = subprocess.run([sys.executable, "-c", _SCORING, tmp, mode, str(n_studies), str(k)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            import json

            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def refresh_cost(n_studies: int = 1500, repeats: int = 10) -> dict:
    from cspine_submit.config import PREDICTION_TYPES
    from cspine_submit.submit.submission import LiveSubmission

    rows = [f"1.2.826.0.1.3680043.{10000 + i}_{t}" for i in range(n_studies) for t in PREDICTION_TYPES]
    with tempfile.TemporaryDirectory() as tmp:
        live = LiveSubmission(Path(tmp) / "submission.csv", rows, {t: 0.1 for t in PREDICTION_TYPES}, every_s=0)
        for i in range(repeats):
            live.set_study(f"1.2.826.0.1.3680043.{10000 + i}", {t: 0.5 for t in PREDICTION_TYPES})
            live.write()
        per = live.seconds / live.writes
    return {"rows": len(rows), "seconds_per_write": per, "max_write_s": live.max_seconds,
            "overhead_pct_at_30s": 100.0 * per / 30.0}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="input side for the ResNet50 (gap) classifiers")
    parser.add_argument("--studies", type=int, default=4, help="studies scored per mode")
    args = parser.parse_args(argv)

    print("1. bytes per study crossing processes (default config: 7 x 15 crops of 256 x 256 x 3)")
    for name, r in transport().items():
        print(f"   {name:18s} {r['bytes'] / 1e6:8.1f} MB   pipe send+ack median {r['seconds_median'] * 1e3:7.1f} ms "
              f"(min {r['seconds_min'] * 1e3:.1f})")
    print(f"2. scoring on two logical CPU devices, ResNet50 gap at {args.size}x{args.size}x3, "
          f"{args.studies} studies of 7 x 15 crops per mode (modes alternate; repeated)")
    for r in scoring(args.size, args.studies):
        print(f"   {r['mode']:16s} {r['crops_per_s']:8.1f} crops/s   {r['seconds_per_study']:.2f} s/study")
    r = refresh_cost()
    print(f"3. submission.csv refresh: {r['rows']} rows, {r['seconds_per_write'] * 1e3:.1f} ms per atomic write "
          f"(max {r['max_write_s'] * 1e3:.1f}); every 30 s that is {r['overhead_pct_at_30s']:.3f} % of the run")


if __name__ == "__main__":
    main()
