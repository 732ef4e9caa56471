"""Throughput of ``score.prediction.score`` (compiled, padded batches) and of ``crop.prepare_crops``, on this machine.

Prints one table row per (head, input shape, batch size): crops per second after a warm-up batch, the time of one
study's worth of scoring (7 vertebrae x K crops), and parameters. Untrained weights: speed does not depend on them.

    python benchmarks/bench_score.py                 # tiny, gap at 256x256x3, seed at 512x512x1
    python benchmarks/bench_score.py --quick         # fewer batches

With ``--weights DIR --studies-dir FOLDERS`` it measures a real weights folder on real crops instead, old way
against new way in one process, interleaved study by study so that both see the same machine load:

- load: seven ``load_classifiers(DIR, [v])`` calls (how ``pipeline.load_models`` loaded until the classifiers
  were grouped: every file once per vertebra) against one ``load_classifiers(DIR)`` (each file once, vertebrae
  listing the same files share one model);
- scoring each study's crops (``pipeline.prepare_study``'s uint16 crops of the given folders, as workers send
  them): one pass per vertebra (seven models) against one pass per shared model; wall seconds and this process's
  CPU seconds (every thread: TensorFlow's too) per study, median and spread;
- the rest of the main process's work per study (``pipeline.score_study`` after scoring, and receiving the
  study): unpickling the worker's result, aggregation, the journal line (fsynced), the live submission.

    cspine-submit write-study tests/data/real_neck /tmp/necks --size 512
    python benchmarks/bench_score.py --weights weights/demo --studies-dir /tmp/necks/images --rounds 5

With ``--two-devices DIR`` the CPU is split into two logical devices (a stand-in for Kaggle's two T4s) and a
study's scoring (7 vertebrae x K synthetic uint16 crops) is timed with the networks placed whole, round-robin (how
they were placed before the memory plan: a shared network and all its members on the first device) against the
memory plan's placement (members spread, a shared network replicated), interleaved round by round:

    python benchmarks/bench_score.py --two-devices weights/demo --rounds 20
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
    from cspine_submit.score import build_classifier, predict

    model = build_classifier(head, shape)
    x = np.random.default_rng(0).uniform(0, 1, (batch_size * n_batches,) + shape).astype(np.float32)
    predict(model, x[:batch_size], batch_size)  # trace + warm-up
    t0 = time.perf_counter()
    predict(model, x, batch_size)
    dt = time.perf_counter() - t0
    return len(x) / dt, model.count_params()


def bench_crop(k=15, rows=512, input_size=256, channels="windows"):
    from cspine_submit.config import ModelConfig
    from cspine_submit.score.crop import prepare_crops, slices_needed
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


def _spread(values) -> str:
    v = np.asarray(values, dtype=float)
    return (f"median {np.median(v):.4f}  p10-p90 {np.percentile(v, 10):.4f}-{np.percentile(v, 90):.4f}  "
            f"min-max {v.min():.4f}-{v.max():.4f}  (n={v.size})")


def _cpu_wall(fn, *args):
    c, t = time.process_time(), time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t, time.process_time() - c


def bench_weights(weights: str, studies_dir: str, n_studies: int | None, rounds: int, load_repeat: int) -> None:
    """Old against new loading and scoring of a real weights folder on real crops (see the module docstring)."""
    import json
    import pickle
    import tempfile
    from pathlib import Path

    from cspine_submit.score import aggregate

    from cspine_submit.submit import submission
    from cspine_submit.config import VERTEBRAE, ModelConfig
    from cspine_submit.localize import load_ranges
    from cspine_submit.score import load_classifiers, score
    from cspine_submit.submit.run import StudyJob, prepare_study

    def load_per_vertebra():
        return {v: load_classifiers(weights, [v])[1][v] for v in VERTEBRAE}

    def load_grouped():
        return load_classifiers(weights)[1]

    loads = {"per vertebra (before)": [], "grouped (after)": []}
    models = {}
    for _ in range(load_repeat):
        for name, fn in (("per vertebra (before)", load_per_vertebra), ("grouped (after)", load_grouped)):
            models[name], wall, _cpu = _cpu_wall(fn)
            loads[name].append(wall)
    print(f"weights {weights}: {len({id(m) for m in models['grouped (after)'].values()})} distinct model(s) for "
          f"{len(VERTEBRAE)} vertebrae after grouping")
    for name, v in loads.items():
        print(f"load {name:<24} s: {_spread(v)}")

    config = ModelConfig.from_json(Path(weights) / "model_config.json")
    ranges = load_ranges(Path(weights) / "slice_ranges.json")
    folders = sorted(p for p in Path(studies_dir).iterdir() if p.is_dir())[: n_studies or None]
    prepared = [prepare_study(StudyJob(f.name, str(f), ranges, config, VERTEBRAE)) for f in folders]
    n_crops = [sum(len(c) for c in p.crops.values()) for p in prepared]
    shape = next(iter(prepared[0].crops.values())).shape[1:]
    print(f"{len(prepared)} studies from {studies_dir}: crops per study {min(n_crops)}-{max(n_crops)} of {shape} "
          f"{next(iter(prepared[0].crops.values())).dtype}, batch size {config.batch_size}")

    for m in models.values():  # trace every bucket size outside the clock
        for p in prepared:
            score(m, p.crops, config.batch_size)
    timing = {name: {"wall": [], "cpu": []} for name in models}
    max_diff = 0.0
    for _ in range(rounds):
        for p in prepared:
            got = {}
            for name, m in models.items():
                got[name], wall, cpu = _cpu_wall(score, m, p.crops, config.batch_size)
                timing[name]["wall"].append(wall)
                timing[name]["cpu"].append(cpu)
            a, b = got.values()
            max_diff = max([max_diff] + [float(np.abs(a[v] - b[v]).max()) for v in a if len(a[v])])
    for name, t in timing.items():
        print(f"score {name:<23} wall s/study: {_spread(t['wall'])}")
        print(f"score {name:<23} CPU  s/study: {_spread(t['cpu'])}")
    before, after = timing.values()
    ratio_w = np.asarray(before["wall"]) / np.asarray(after["wall"])
    ratio_c = np.asarray(before["cpu"]) / np.asarray(after["cpu"])
    print(f"before/after, same study same round: wall {_spread(ratio_w)}; CPU {_spread(ratio_c)}")
    print(f"largest probability difference before vs after: {max_diff:.2e}")
    # The fixed cost of a study (dispatch, not arithmetic): one crop per vertebra. On a GPU this, not the
    # arithmetic, is what scoring costs the main process's CPU.
    one = {v: c[:1] for v, c in prepared[0].crops.items()}
    fixed = {name: [] for name in models}
    for _ in range(rounds * 10):
        for name, m in models.items():
            fixed[name].append(_cpu_wall(score, m, one, config.batch_size)[2])
    for name, v in fixed.items():
        print(f"score {name:<23} CPU s/study at 1 crop per vertebra: {_spread(v)}")

    # The rest of the main process's work on one study, as pipeline.score_study / RunState.finish do it.
    rest = {k: [] for k in ("unpickle", "aggregate", "journal", "live set", "live write", "report json")}
    with tempfile.TemporaryDirectory() as tmp:
        row_ids = [f"{p.uid}_{t}" for p in prepared for t in ("patient_overall",) + tuple(VERTEBRAE)]
        # Kaggle's hidden test: about 1,500 studies, 12,000 rows; the file rewritten every REFRESH_SECONDS.
        row_ids += [f"filler{i}_{t}" for i in range(1500) for t in ("patient_overall",) + tuple(VERTEBRAE)]
        live = submission.LiveSubmission(Path(tmp) / "submission.csv", row_ids, aggregate.prior_probabilities(config))
        journal = submission.Journal(Path(tmp) / "journal.jsonl", "bench")
        journal.start(keep=False)
        grouped = models["grouped (after)"]
        for _ in range(rounds):
            for p in prepared:
                blob = pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL)
                q, wall, cpu = _cpu_wall(pickle.loads, blob)
                rest["unpickle"].append(cpu)
                slice_probs = score(grouped, q.crops, config.batch_size)
                (probs, _), _, cpu = _cpu_wall(aggregate.aggregate_study, slice_probs, config)
                rest["aggregate"].append(cpu)
                entry = {"status": "ok", "reason": None, "slices_read": q.slices_read, "seconds": dict(q.seconds),
                         "n_slices": q.n_slices, "plan": q.plan}
                _, _, cpu = _cpu_wall(journal.append, q.uid, probs, entry)
                rest["journal"].append(cpu)
                _, _, cpu = _cpu_wall(live.set_study, q.uid, probs)
                rest["live set"].append(cpu)
                _, _, cpu = _cpu_wall(live.write)
                rest["live write"].append(cpu)
                _, _, cpu = _cpu_wall(lambda: json.dumps({q.uid: entry}, indent=2, default=submission._json_default))
                rest["report json"].append(cpu)
        journal.close()
    print("main process, the rest of one study (CPU s; 'live write' is one full rewrite of a 12,000-row file, done "
          "at most every 30 s, not per study):")
    for k, v in rest.items():
        print(f"  {k:<12} {_spread(v)}")


def bench_two_devices(weights: str, rounds: int) -> None:
    """Seconds per study on two logical devices, placed whole round-robin (before) and by the memory plan (after)."""
    from unittest import mock

    from cspine_submit.config import VERTEBRAE
    from cspine_submit.score import loading, memory, score
    from cspine_submit.score.crop import encode_crops

    loaded = {}
    with mock.patch.object(memory, "_strategies", lambda groups, n: ["whole"]):
        loaded["whole round-robin (before)"] = loading.load_classifiers(weights)
    loaded["memory plan (after)"] = loading.load_classifiers(weights)
    config = loaded["memory plan (after)"][0]
    k = config.slices_per_vertebra
    rng = np.random.default_rng(0)
    crops = {v: encode_crops(rng.uniform(0, 1, (k, *config.input_shape))) for v in VERTEBRAE}
    for name, (_cfg, models) in loaded.items():
        where = sorted({getattr(m, "_cspine_device", None) for m in models.values()})
        print(f"{name}: {where}")
        score(models, crops, config.batch_size)  # trace every bucket size outside the clock
    times = {name: [] for name in loaded}
    for _ in range(rounds):
        for name, (_cfg, models) in loaded.items():
            t0 = time.perf_counter()
            score(models, crops, config.batch_size)
            times[name].append(time.perf_counter() - t0)
    print(f"one study, {len(VERTEBRAE)} x {k} crops {config.input_shape}, batch {config.batch_size}, {rounds} rounds "
          "interleaved (wall s):")
    for name, t in times.items():
        print(f"  {name:<28} {_spread(t)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--weights", help="a weights folder to measure old against new loading and scoring with")
    parser.add_argument("--studies-dir", help="study folders whose real crops are scored (with --weights)")
    parser.add_argument("--studies", type=int, help="use only the first N folders of --studies-dir")
    parser.add_argument("--rounds", type=int, default=5, help="times every study is scored each way (default 5)")
    parser.add_argument("--load-repeat", type=int, default=2, help="loads each way (default 2)")
    parser.add_argument("--two-devices", metavar="DIR", help="time a study's scoring with DIR's classifiers on two "
                        "logical CPU devices, placed whole round-robin against the memory plan's placement")
    args = parser.parse_args()
    import tensorflow as tf

    if args.two_devices:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        bench_two_devices(args.two_devices, args.rounds)
        return

    devices = [d.device_type for d in tf.config.list_logical_devices()]
    print(f"devices: {devices}; CPU threads: {os.cpu_count()}")
    if args.weights:
        if not args.studies_dir:
            parser.error("--weights needs --studies-dir")
        bench_weights(args.weights, args.studies_dir, args.studies, args.rounds, args.load_repeat)
        return
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
