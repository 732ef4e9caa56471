"""Measure the pipeline per stage against a naive baseline on synthetic studies, and project the Kaggle run.

Generates N synthetic studies at the competition's scale (512x512, about 314 slices, mostly JPEG Lossless .4.70)
into a temporary folder, or takes --studies-dir (e.g. the real necks: `write-study tests/data/real_neck OUT --size
512`, then `--studies-dir OUT/images`), scores them with random `tiny` classifiers (so the numbers measure the
pipeline, not the backbone) or --weights, and prints seconds per study for each stage, ours and naive, their ratio,
a study's marginal cost in real runs against the naive decode of the same studies (per worker count, --repeat
times), the decoder's distance from the fastest decoder called directly, the heads' CPU throughput, peak memory and
a projection for 1500 studies on Kaggle.
"""

from __future__ import annotations

import json
import sys

NAME = "bench"
HELP = "per-stage timings against a naive baseline, and the Kaggle projection"
ORDER = 90


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def add_arguments(parser) -> None:
    parser.add_argument("--studies", type=int, help="synthetic studies to generate (default 3), or how many of "
                        "--studies-dir to use (default all)")
    parser.add_argument("--studies-dir", help="measure these study folders (e.g. write-study's images/) instead of "
                        "generating synthetic ones")
    parser.add_argument("--weights", help="weights folder to score with (e.g. weights/demo; default: random tiny "
                        "classifiers at --input-size)")
    parser.add_argument("--workers", type=_ints, default=(1, 2),
                        help="worker counts for the end-to-end runs, comma-separated (default 1,2)")
    parser.add_argument("--few", type=int, help="studies in the short run the marginal cost is taken against "
                        "(default: a fifth)")
    parser.add_argument("--repeat", type=int, default=1, help="end-to-end measurements per worker count (default 1; "
                        "medians and spread are printed)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each slice (default 512)")
    parser.add_argument("--slices", type=int, default=314,
                        help="about this many slices per study (default 314, the real training studies' median)")
    parser.add_argument("--input-size", type=int, default=256, help="classifier input side, pixels (default 256)")
    parser.add_argument("--heads", default="tiny,gap",
                        help="heads whose CPU throughput to measure, comma-separated (default tiny,gap; seed is slow; "
                        "'' for none)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    parser.add_argument("--xla", action="store_true", help="project the Kaggle run with XLA-compiled scoring "
                        "(1100-1200 instead of 990 img/s per T4; the score stage does not compile it today)")
    parser.add_argument("--work-dir", help="keep the generated studies and outputs here instead of a temp folder")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def _table(results: dict) -> str:
    from cspine_submit.tools.bench import STAGES

    ours, naive, ratio = results["ours"], results["naive"] or {}, results["ratio"] or {}
    lines = [f"{'stage':<11} {'ours s/study':>13} {'naive s/study':>14} {'naive/ours':>11}"]
    for k in STAGES:
        n = f"{naive[k]:.4f}" if k in naive else "-"
        r = f"{ratio[k]:.1f}x" if ratio.get(k) else "-"
        lines.append(f"{k:<11} {ours[k]:>13.4f} {n:>14} {r:>11}")
    d = results["decode"]
    lines += [
        "",
        f"decode: {d['decoded_slices_per_study']:.0f} of {d['all_slices_per_study']:.0f} slices per study decoded "
        f"({d['planned_slices_per_study']:.0f} for the crops); reader {d['reader_slices_per_s']:.0f} slices/s, "
        f"fastest decoder called directly {d['direct_slices_per_s']:.0f} slices/s "
        f"(reader/direct = {d['reader_over_direct']:.2f}x)",
        "",
        "end to end: marginal s/study in real runs vs naive decode of the same studies (median [min, max]):",
    ]

    def spread(x: dict, fmt: str = ".3f") -> str:
        return f"{x['median']:{fmt}} [{x['min']:{fmt}}, {x['max']:{fmt}}]"

    for w, e in results["end_to_end"].items():
        lines.append(f"  {e['workers']} worker(s), {e['n']} - {e['n_few']} studies, {len(e['ratio']['runs'])} run(s): "
                     f"{spread(e['marginal_s'])} s/study; naive decode {spread(e['naive_decode_s'])} s/study; "
                     f"ratio {spread(e['ratio'], '.2f')}x; main process CPU {spread(e['main_cpu_s'])} s/study "
                     f"(scoring {e['score_s']:.3f} s)")
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
        f"GPU {p['gpu_seconds_per_study']:.4f} for {sum(p['gpu_passes_per_study'])} classifier passes), "
        f"{p['total_hours']:.2f} h of the {p['limit_hours']:g} h limit",
        "assumptions:",
        *[f"  - {a}" for a in p["assumptions"]],
        "",
        f"studies: {results['studies']['n']} ({results['studies']['source']}) of {results['studies']['size']}px, "
        f"slices {results['studies']['slices']}; scored with {results['weights']}",
        f"machine: {results['machine']['cpus']} CPUs, Python {results['machine']['python']}, load average "
        f"{results['machine']['load_average_1_5_15']} at the end (shared machine: timings are noisy)",
    ]
    return "\n".join(lines)


def run(args) -> int:
    from cspine_submit.tools.bench import BenchOptions, run_benchmark

    heads = tuple(h.strip() for h in args.heads.split(",") if h.strip())
    options = BenchOptions(
        n_studies=args.studies, size=args.size, slices=args.slices, input_size=args.input_size, heads=heads,
        work_dir=args.work_dir, naive=not args.no_naive, studies_dir=args.studies_dir, weights=args.weights,
        workers=args.workers, n_few=args.few, repeat=args.repeat, xla=args.xla,
    )
    results = run_benchmark(
        options,
        progress=None if args.json else (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)),
    )
    print(json.dumps(results, indent=2) if args.json else _table(results))
    return 0
