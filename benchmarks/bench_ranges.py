"""Slice-range methods compared, leave-one-out, on synthetic studies with varying scan extents and on VerSe.

    python benchmarks/bench_ranges.py [--studies 24] [--size 128] [--data DIR] [--head 5 60] [--chest 5 80]
    python benchmarks/bench_ranges.py --real-only

Prints, per method and z margin, the mean coverage / purity / box coverage over C1-C7, the column-centre error of
the profile method, and the cost of the profile method's image cue (slices decoded, seconds per study) next to the
cost of scanning headers and of reading the planned slices; last, the header-only fallback on the 58 competition
masks' geometry (tests/data/real_competition), leave-one-out and the shipped file's (``--real-only``: that table
alone, in seconds).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from cspine_submit.config import ModelConfig
from cspine_submit.read.dicom import read_slices, scan_study
from cspine_submit.localize import (
    METHODS,
    evaluate_ranges,
    load_extents,
    load_ranges,
    load_truths,
    measure_cue,
    plan_crops,
    ranges_from_truths,
    truths_from_extents,
)

ROOT = Path(__file__).resolve().parents[1]


def table(truths, methods, margins, k):
    print(f"{'method':<10}{'z margin':>9}{'coverage':>10}{'purity':>9}{'box_cov':>9}{'centre err med/max mm':>24}")
    for m in methods:
        for zm in margins:
            r = evaluate_ranges(truths, method=m, k=k, z_margin_mm=zm)
            errs = [abs(e) for e in r.get("anchor_error_mm", []) if e is not None]
            err = f"{np.median(errs):.1f} / {max(errs):.1f}" if errs else "-"
            mean = r["mean"]
            print(f"{m:<10}{zm:>9.1f}{mean['coverage']:>10.3f}{mean['purity']:>9.3f}{mean['box_coverage']:>9.3f}"
                  f"{err:>24}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--studies", type=int, default=24)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--head", type=float, nargs=2, default=None, help="mm range of scan above C1")
    ap.add_argument("--chest", type=float, nargs=2, default=None, help="mm range of scan below C7")
    ap.add_argument("--compressed", type=float, default=0.0,
                    help="share of .4.70 studies (irrelevant to localization; 0 keeps generation fast)")
    ap.add_argument("--data", type=Path, default=None, help="existing dataset (skip generation)")
    ap.add_argument("--margins", type=float, nargs="+", default=[0.0, 2.0, 4.0])
    ap.add_argument("--real-only", action="store_true",
                    help="only the header-only fallback on the 58 real masks' geometry (seconds; no synthetic set)")
    args = ap.parse_args()
    if args.real_only:
        header_only_on_real_masks(ModelConfig().slices_per_vertebra)
        return

    tmp = None
    if args.data is None:
        from cspine_submit.datasets.synthetic import generate_dataset

        tmp = tempfile.TemporaryDirectory()
        args.data = Path(tmp.name) / "data"
        params = {"size": args.size, "compressed_fraction": args.compressed}
        if args.head:
            params["head"] = tuple(args.head)
        if args.chest:
            params["chest"] = tuple(args.chest)
        t0 = time.perf_counter()
        ds = generate_dataset(args.data, n_train=args.studies, n_test=0, seed=args.seed, progress=True, **params)
        print(f"generated {args.studies} studies in {time.perf_counter() - t0:.1f} s: {ds.params}")

    t0 = time.perf_counter()
    truths, skipped = load_truths(args.data / "segmentations", args.data / "train_images", layout="competition",
                                  progress=True)
    print(f"loaded {len(truths)} masks with profiles in {time.perf_counter() - t0:.1f} s; skipped {len(skipped)}")
    ext = [(t.z_mm[t.z_ranges["C1"][0]] - t.z_mm[0], t.z_mm[-1] - t.z_mm[t.z_ranges["C7"][1]], t.n_slices)
           for t in truths]
    ext = np.array(ext)
    print(f"scan above C1: {ext[:, 0].min():.0f}-{ext[:, 0].max():.0f} mm, below C7: {ext[:, 1].min():.0f}-"
          f"{ext[:, 1].max():.0f} mm, slices {ext[:, 2].min():.0f}-{ext[:, 2].max():.0f}")
    k = ModelConfig().slices_per_vertebra
    print(f"\n## synthetic, leave-one-out over {len(truths)} studies, K={k}")
    table(truths, METHODS, args.margins, k)

    print("\n## in-plane box placement (profile z-ranges, z margin 2 mm), leave-one-out")
    print(f"{'box mode':<12}{'quantiles':>12}{'box_cov':>9}{'box area (share of image)':>27}")
    for mode in ("fraction", "mm_centre", "mm_bone"):
        for q in (("q10", "q90"), ("q05", "q95")):
            r = evaluate_ranges(truths, method="profile", k=k, box_mode=mode, box_quantiles=q)
            print(f"{mode:<12}{'/'.join(q):>12}{r['mean']['box_coverage']:>9.3f}{r['mean_box_area']:>27.3f}")

    # Cost of the image cue against the rest of the per-study work (warm file cache; one process).
    ranges = ranges_from_truths(truths, method="profile")
    config = ModelConfig()
    scan_s, cue_s, plan_read_s, n_cue, n_planned = [], [], [], [], []
    for folder in sorted((args.data / "train_images").iterdir()):
        t0 = time.perf_counter()
        header = scan_study(folder)
        t1 = time.perf_counter()
        cue = measure_cue(header, ranges)
        t2 = time.perf_counter()
        plans = plan_crops(header, ranges, config, cue=cue)
        idx = np.unique(np.concatenate([p.slice_indices for p in plans.values()]))
        read_slices(header, idx)
        t3 = time.perf_counter()
        scan_s.append(t1 - t0)
        cue_s.append(t2 - t1)
        plan_read_s.append(t3 - t2)
        n_cue.append(len(cue.indices))
        n_planned.append(len(idx))
    print(f"\n## per-study cost ({args.size}x{args.size} px, mean over {len(scan_s)} studies)")
    print(f"{'stage':<34}{'slices':>8}{'seconds':>9}")
    print(f"{'scan headers':<34}{'all':>8}{np.mean(scan_s):>9.3f}")
    print(f"{'profile cue (read+features+match)':<34}{np.mean(n_cue):>8.1f}{np.mean(cue_s):>9.3f}")
    print(f"{'read planned slices (K=15 x 7)':<34}{np.mean(n_planned):>8.1f}{np.mean(plan_read_s):>9.3f}")

    verse = ROOT / "tests" / "data" / "nifti" / "verse"
    vt, _ = load_truths(verse, None, layout="affine")
    print(f"\n## VerSe masks (mask only, affine layout), leave-one-out over {len(vt)}")
    table(vt, ("fraction", "mm_top"), args.margins, k)
    header_only_on_real_masks(k)
    if tmp is not None:
        tmp.cleanup()


def _per_edge_fraction_loo(truths, k: int, zm: float) -> dict:
    """Leave-one-out with the per-edge fractions of the extent only (no column model): what a file learned
    before the column model plans with."""
    import cspine_submit.localize.learn as learn

    fit = learn.fit_header_column
    learn.fit_header_column = lambda *a, **kw: None
    try:
        return evaluate_ranges(truths, method="fraction", k=k, z_margin_mm=zm)
    finally:
        learn.fit_header_column = fit


def header_only_on_real_masks(k: int, margins=(0.0, 3.0, 5.0)) -> None:
    """The header-only fallback on the 58 competition masks' geometry (tests/data/real_competition): learned
    leave-one-out (with the column model: C1 top / C7 bottom from extent and spacing; and with the per-edge
    fractions alone, as files learned before it plan), and the shipped file's; mean over studies with the
    min / p5 / p95 over studies, and per vertebra."""
    truths = truths_from_extents(load_extents(ROOT / "tests" / "data" / "real_competition" / "vertebra_extents.csv"))
    shipped = load_ranges(ROOT / "weights" / "slice_ranges.json")
    print(f"\n## header-only fallback on the {len(truths)} real masks' geometry (K={k}; mean (min / p5 / p95) "
          "over studies)")
    print(f"{'method':<34}{'margin':>7}  {'coverage':<28}{'purity':<28}{'C1-top / C7-bottom |err| med/p95 mm':<36}")
    for zm in margins:
        runs = {"fraction, leave-one-out": evaluate_ranges(truths, method="fraction", k=k, z_margin_mm=zm),
                "fraction per edge, leave-one-out": _per_edge_fraction_loo(truths, k, zm),
                "mm_top, leave-one-out": evaluate_ranges(truths, method="mm_top", k=k, z_margin_mm=zm),
                "shipped fraction": evaluate_ranges(truths, ranges=shipped, method="fraction", k=k, z_margin_mm=zm)}
        for name, r in runs.items():
            cells = []
            for key in ("coverage", "purity"):
                a = np.array([d[key] for d in r["study_summary"].values()])
                cells.append(f"{a.mean():.3f} ({a.min():.2f} / {np.percentile(a, 5):.2f} / {np.percentile(a, 95):.2f})")
            err = np.abs([(d["c1_top_error_mm"], d["c7_bottom_error_mm"]) for d in r["study_summary"].values()])
            med, p95 = np.median(err, axis=0), np.percentile(err, 95, axis=0)
            cells.append(f"{med[0]:.1f} / {p95[0]:.1f}, {med[1]:.1f} / {p95[1]:.1f}")
            print(f"{name:<34}{zm:>7.0f}  {cells[0]:<28}{cells[1]:<28}{cells[2]:<36}")
        for name in ("fraction, leave-one-out", "shipped fraction"):
            pv = runs[name]["per_vertebra"]
            print(f"{'  ' + name.split(',')[0] + ' per vertebra cov/pur':<34}{'':>7}  "
                  + " ".join(f"{v} {pv[v]['coverage']:.2f}/{pv[v]['purity']:.2f}" for v in pv))


if __name__ == "__main__":
    main()
