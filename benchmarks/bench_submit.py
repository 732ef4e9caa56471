"""Benchmark the submission flow on synthetic studies and compare aggregation rules.

    python benchmarks/bench_submit.py [--n 4] [--workers 0 2] [--weights weights/demo] [--rules]

1. Generates (or reuses) ``--n`` demo test studies (same generator parameters as the demo weights).
2. Runs the full pipeline (`run_submission`) once per ``--workers`` value and prints wall time, studies/s and the
   per-stage split (worker stages scan/plan/read/crop summed over studies; main-process stages wait/score/aggregate).
3. With ``--rules``: scores the slices once and prints the competition score of each aggregation rule
   (topk_mean with several k, mean, max) and overall rule (noisy_or, max) against the synthetic truth.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def bench_pipeline(data, weights: Path, workers: int) -> dict:
    from cspine_submit.train import metric
    from cspine_submit import submit as pipeline

    t0 = time.perf_counter()
    setup = pipeline.prepare_run(data.test_dir, data.test_csv, weights, demo=True)
    t_setup = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        result = pipeline.run_submission(setup, Path(tmp) / "submission.csv", workers=workers, progress=False)
        score = metric.evaluate_files(result.out, data.labels).score
    t = result.totals
    return {"workers": workers, "load_s": t_setup, "wall_s": t["wall_seconds"], "studies": t["studies"],
            "studies_per_s": t["studies_per_s"], "stages": t["seconds_by_stage"], "slices_read": t["slices_read"],
            "ok": t["ok"], "score": score}


def compare_rules(data, weights: Path) -> list[tuple[str, float]]:
    from cspine_submit.score import aggregate
    from cspine_submit.train import metric
    from cspine_submit import submit as pipeline
    from cspine_submit.score.models import score

    setup = pipeline.prepare_run(data.test_dir, data.test_csv, weights, demo=True)
    slice_probs = {}
    for uid in setup.plan.studies:
        job = pipeline.StudyJob(uid, str(setup.plan.folders[uid]), setup.ranges, setup.config, tuple(setup.models))
        try:
            prepared = pipeline.prepare_study(job)
        except pipeline.StudyFailure:
            slice_probs[uid] = {}
            continue
        slice_probs[uid] = score(setup.models, prepared.crops, setup.config.batch_size)
    labels = metric.read_table(data.labels, "labels")
    rows = []
    k_max = setup.config.slices_per_vertebra
    variants = [("topk_mean", k) for k in sorted({1, 2, 3, 5, 8, k_max}) if k <= k_max] + [("mean", 1), ("max", 1)]
    for overall in ("noisy_or", "max"):
        for rule, k in variants:
            cfg = setup.config.replace(aggregation=rule, top_k=k, overall_rule=overall)
            preds = {u: aggregate.aggregate_study(sp, cfg)[0] for u, sp in slice_probs.items()}
            uids, y, p = metric.align(labels, preds)
            name = f"{rule}{'(k=%d)' % k if rule == 'topk_mean' else ''} / {overall}"
            rows.append((name, metric.competition_score(y, p)))
    return rows


def main(argv=None) -> int:
    from cspine_submit.tools import demo

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=demo.DEMO_N_STUDIES)
    parser.add_argument("--seed", type=int, default=demo.DEMO_SEED)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--weights", type=Path, default=demo.demo_weights_dir())
    parser.add_argument("--rules", action="store_true", help="compare aggregation rules")
    parser.add_argument("--size", type=int, help="override the generator's image size (e.g. 512, the competition's)")
    parser.add_argument("--spacing", type=float, nargs=2, help="override the slice spacing range, mm")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    overrides = {}
    if args.size:
        overrides["size"] = args.size
    if args.spacing:
        overrides["spacing"] = list(args.spacing)
    data = demo.prepare_demo(n_studies=args.n, seed=args.seed, weights=args.weights, overrides=overrides)
    print(f"{args.n} synthetic studies in {data.root} ({time.perf_counter() - t0:.1f} s to generate or reuse); "
          f"params {data.params}")
    stages = ("scan", "plan", "read", "crop", "wait", "score", "aggregate")
    print("| workers | load s | wall s | studies/s | slices read | ok | score | "
          + " | ".join(f"{s} s" for s in stages) + " |")
    print("|" + "---|" * (7 + len(stages)))
    for w in args.workers:
        r = bench_pipeline(data, args.weights, w)
        print(f"| {w} | {r['load_s']:.2f} | {r['wall_s']:.2f} | {r['studies_per_s']:.3f} | {r['slices_read']} | "
              f"{r['ok']}/{r['studies']} | {r['score']:.4f} | "
              + " | ".join(f"{r['stages'].get(s, 0.0):.2f}" for s in stages) + " |")
    if args.rules:
        print("\n| aggregation / overall | score |\n|---|---|")
        for name, s in compare_rules(data, args.weights):
            print(f"| {name} | {s:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
