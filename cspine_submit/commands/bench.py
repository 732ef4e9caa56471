"""Measure the pipeline per stage against a naive baseline on synthetic studies, and project the Kaggle run.

Generates N synthetic studies at the competition's scale (512x512, about 300 slices, mostly JPEG Lossless .4.70)
into a temporary folder, scores them with random `tiny` classifiers (so the numbers measure the pipeline, not the
backbone), and prints seconds per study for each stage, ours and naive, their ratio, the decoder's distance from
its direct-plugin limit, the heads' CPU throughput, peak memory and a projection for 1500 studies on Kaggle.
"""

from __future__ import annotations

import json
import sys

NAME = "bench"
HELP = "per-stage timings against a naive baseline, and the Kaggle projection"
ORDER = 90


def add_arguments(parser) -> None:
    parser.add_argument("--studies", type=int, default=3, help="synthetic studies to generate (default 3)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each slice (default 512)")
    parser.add_argument("--slices", type=int, default=300, help="about this many slices per study (default 300)")
    parser.add_argument("--input-size", type=int, default=256, help="classifier input side, pixels (default 256)")
    parser.add_argument("--heads", default="tiny,gap",
                        help="heads whose CPU throughput to measure, comma-separated (default tiny,gap; seed is slow)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    parser.add_argument("--work-dir", help="keep the generated studies and outputs here instead of a temp folder")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def _table(results: dict) -> str:
    from cspine_submit.bench import STAGES

    ours, naive, ratio = results["ours"], results["naive"] or {}, results["ratio"] or {}
    lines = [f"{'stage':<11} {'ours s/study':>13} {'naive s/study':>14} {'naive/ours':>11}"]
    for k in STAGES:
        n = f"{naive[k]:.4f}" if k in naive else "-"
        r = f"{ratio[k]:.1f}x" if ratio.get(k) else "-"
        lines.append(f"{k:<11} {ours[k]:>13.4f} {n:>14} {r:>11}")
    d = results["decode"]
    lines += [
        "",
        f"decode: {d['planned_slices_per_study']:.0f} of {d['all_slices_per_study']:.0f} slices per study; "
        f"reader {d['reader_slices_per_s']:.0f} slices/s, direct plugin loop {d['direct_plugin_slices_per_s']:.0f} "
        f"slices/s (reader/direct = {d['reader_over_direct']:.2f}x)",
    ]
    for w, e in results["end_to_end"].items():
        lines.append(f"end to end, {w.replace('_', ' ')}: {e['seconds_per_study']:.3f} s/study once running "
                     f"({e['studies_per_s']:.2f} studies/s; start-up and first study {e['startup_s']:.2f} s)")
    for head, h in results["heads"].items():
        lines.append(f"head {head:<5} input {h['input']}: {h['crops_per_s']:.1f} crops/s on this CPU "
                     f"({h['params']:,} parameters)")
    m = results["memory"]
    lines.append(f"peak memory: main process {m['main_mb']:.0f} MB (TensorFlow and the classifiers), one worker "
                 f"{m['worker_mb']:.0f} MB")
    p = results["projection"]
    lines += [
        "",
        f"Kaggle projection: {p['seconds_per_study']:.3f} s/study (CPU {p['cpu_seconds_per_study']:.3f}, "
        f"GPU {p['gpu_seconds_per_study']:.4f}), {p['total_hours']:.2f} h of the {p['limit_hours']:g} h limit",
        "assumptions:",
        *[f"  - {a}" for a in p["assumptions"]],
        "",
        f"studies: {results['studies']['n']} of {results['studies']['size']}px, slices {results['studies']['slices']}; "
        f"machine: {results['machine']['cpus']} CPUs, Python {results['machine']['python']}",
    ]
    return "\n".join(lines)


def run(args) -> int:
    from cspine_submit.bench import run_benchmark

    heads = tuple(h.strip() for h in args.heads.split(",") if h.strip())
    results = run_benchmark(
        n_studies=args.studies, size=args.size, slices=args.slices, input_size=args.input_size, heads=heads,
        work_dir=args.work_dir, naive=not args.no_naive,
        progress=None if args.json else (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)),
    )
    print(json.dumps(results, indent=2) if args.json else _table(results))
    return 0
