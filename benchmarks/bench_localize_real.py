"""Localization on the 11 real necks, cut the way competition scans are cut: every method, and what the cue costs.

    python benchmarks/bench_localize_real.py [--seeds 0 1 2] [--size 512] [--margins 2 3 4] [--keep DIR]

For each seed the real necks of tests/data/real_neck are written as competition-style studies (a random 5-35 mm
above C1 to 15-60 mm below C7, a 160-240 mm field of view, --size pixels, 1.25 mm slices; ``write-study``), and once
whole (native grid). Every study is then planned leave-one-patient-out and scored against its mask:

- ``fraction`` / ``mm_top``: learned from the other cut studies (headers only);
- ``profile areas``: the whole-slice bone/body areas of the earlier planner, learned from the other patients' whole
  volumes;
- ``profile cells``: the column-centred cells (the default), learned from the other patients' whole volumes (what
  weights/slice_ranges.json is learned from);
- ``shipped file``: weights/slice_ranges.json as it is (in-sample: learned from these patients; a consistency check,
  not a validation number).

Prints coverage / purity / box coverage per method and z margin (mean over studies and vertebrae, and the spread
over studies), per vertebra for the default, and the cue's cost per study: slices decoded, seconds to decode them,
to measure the features and to align the template; and the cue's alignment cost per study (``Cue.cost``; with the
shipped file, how many are above its implausibility threshold: normal cuts should not be).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cspine_submit.config import VERTEBRAE
from cspine_submit.read.dicom import read_slices, scan_study
from cspine_submit.localize import (
    cost_threshold,
    cue_features,
    cue_from_measurements,
    evaluate_ranges,
    load_ranges,
    load_truths,
    study_cue_indices,
)
from cspine_submit.localize.features import bone_centroids
from cspine_submit.datasets.volume_study import write_studies

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "real_neck"


def study_means(result: dict, key: str) -> np.ndarray:
    """Per-study mean over C1-C7 of ``key``: (studies,)."""
    return np.array([d[key] for d in result["study_summary"].values()])


def cue_cost(images: Path, ranges) -> list[dict]:
    """Per study: slices decoded for the cue and seconds to decode, measure and align (the planner's own steps)."""
    out = []
    for folder in sorted(p for p in images.iterdir() if p.is_dir()):
        header = scan_study(folder)
        t0 = time.perf_counter()
        idx = study_cue_indices(header, ranges)
        hu = read_slices(header, idx)
        t1 = time.perf_counter()
        cents = bone_centroids(hu)
        feats = cue_features(hu, header.spacing[1:], ranges, centroids=cents)
        t2 = time.perf_counter()
        cue_from_measurements(header.z[idx], feats, cents, ranges, (float(header.z[0]), float(header.z[-1])),
                              indices=idx)
        t3 = time.perf_counter()
        out.append({"slices": len(idx), "n_slices": header.n_slices, "decode": t1 - t0, "features": t2 - t1,
                    "align": t3 - t2})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--margins", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument("--keep", type=Path, default=None, help="write the studies here and keep them")
    args = parser.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_localize_real_"))
    whole_root = work / "whole"
    if not (whole_root / "segmentations").is_dir():
        write_studies(REAL, whole_root, cut=False, seed=0)
    whole_cells, _ = load_truths(whole_root / "segmentations", whole_root / "images")
    whole_areas, _ = load_truths(whole_root / "segmentations", whole_root / "images", feature_set="areas")
    shipped = load_ranges(ROOT / "weights" / "slice_ranges.json")

    rows: dict[tuple[str, float], list[dict]] = {}
    costs = []
    for seed in args.seeds:
        root = work / f"cut_seed{seed}"
        if not (root / "segmentations").is_dir():
            write_studies(REAL, root, size=args.size, slice_mm=1.25, seed=seed)
        cells, _ = load_truths(root / "segmentations", root / "images")
        areas, _ = load_truths(root / "segmentations", root / "images", feature_set="areas")
        for zm in args.margins:
            runs = {
                "fraction": evaluate_ranges(cells, method="fraction", z_margin_mm=zm),
                "mm_top": evaluate_ranges(cells, method="mm_top", z_margin_mm=zm),
                "profile areas": evaluate_ranges(areas, method="profile", learn_from=whole_areas, z_margin_mm=zm),
                "profile cells": evaluate_ranges(cells, method="profile", learn_from=whole_cells, z_margin_mm=zm),
                "shipped file": evaluate_ranges(cells, ranges=shipped, z_margin_mm=zm),
            }
            for name, r in runs.items():
                rows.setdefault((name, zm), []).append(r)
        costs.extend(cue_cost(root / "images", shipped))
        if args.keep is None:
            shutil.rmtree(root)

    n = sum(len(r["study_summary"]) for r in rows[("fraction", args.margins[0])])
    print(f"real necks: {len(args.seeds)} cut(s) x 11 patients = {n} studies, {args.size} px, 1.25 mm slices, K=15")
    print(f"{'method':<15}{'margin':>7}{'coverage':>10}{'purity':>8}{'box_cov':>9}   "
          f"{'study coverage min / p10':>25}{'centre err med / max mm':>26}")
    for (name, zm), results in rows.items():
        cov = np.concatenate([study_means(r, "coverage") for r in results])
        pur = np.concatenate([study_means(r, "purity") for r in results])
        box = np.concatenate([study_means(r, "box_coverage") for r in results])
        errs = np.abs([e for r in results for e in r.get("anchor_error_mm", []) if e is not None])
        err = f"{np.median(errs):.1f} / {errs.max():.1f}" if errs.size else "-"
        print(f"{name:<15}{zm:>7.0f}{cov.mean():>10.3f}{pur.mean():>8.3f}{box.mean():>9.3f}   "
              f"{cov.min():>14.2f} / {np.percentile(cov, 10):.2f}{err:>26}")
    default_margin = 3.0 if 3.0 in args.margins else args.margins[0]
    results = rows[("profile cells", default_margin)]
    print(f"\nprofile cells, margin {default_margin:g} mm, per vertebra (mean over studies; |offset| median mm):")
    print(f"{'':<9}" + "".join(f"{v:>8}" for v in VERTEBRAE))
    for key in ("coverage", "purity", "box_coverage"):
        vals = [np.mean([s[v][key] for r in results for s in r["per_study"].values()]) for v in VERTEBRAE]
        print(f"{key:<9}" + "".join(f"{x:>8.3f}" for x in vals))
    offs = [np.median([abs(s[v]["offset_mm"]) for r in results for s in r["per_study"].values()]) for v in VERTEBRAE]
    print(f"{'|off| mm':<9}" + "".join(f"{x:>8.1f}" for x in offs))
    c = {k: np.array([x[k] for x in costs]) for k in costs[0]}
    print(f"\ncue per study ({len(costs)} studies of {int(np.median(c['n_slices']))} slices median): "
          f"{np.median(c['slices']):.0f} slices decoded (min {c['slices'].min()}, max {c['slices'].max()}); "
          f"decode {np.median(c['decode']):.2f} s, features {np.median(c['features']) * 1e3:.0f} ms, "
          f"align {np.median(c['align']) * 1e3:.0f} ms (medians)")
    ref = shipped.extra["profile_template"].get("loo_cost")
    for name in ("profile cells", "shipped file"):
        align = np.array([d["alignment_cost"] for r in rows[(name, default_margin)]
                          for d in r["study_summary"].values() if d.get("alignment_cost") is not None])
        flagged = sum(d.get("alignment_plausible") is False for r in rows[(name, default_margin)]
                      for d in r["study_summary"].values())
        print(f"alignment cost, {name}: median {np.median(align):.2f}, max {align.max():.2f}"
              + ("" if name != "shipped file" or not ref else
                 f"; {flagged} of {align.size} above the shipped threshold {cost_threshold(ref):.2f} (3 x the "
                 f"leave-one-out max {ref['max']:.2f} of its training studies)"))
    if args.keep is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
