"""Localization on the 11 real necks, cut the way competition scans are cut: before and after the real extents.

    python benchmarks/bench_localize_real.py [--seeds 0 1 2] [--size 128] [--margins 3] [--cut real|first]
        [--before-ranges OLD_slice_ranges.json] [--keep DIR]

For each seed the real necks of tests/data/real_neck are written as competition-style studies (``write-study``):
``--cut real`` (the default) draws each cut like the competition's studies (the scan above C1 and below C7 together
from one of 58 real masks, the field of view from the real pixel spacings, the slice spacing with its thickness
from the 2019 real studies); ``--cut first`` is the first cut (5-35 mm above C1, 15-60 mm below C7, 160-240 mm,
1.25 mm slices). Each neck is also written once whole (native grid). Every cut study is then planned
leave-one-patient-out and scored against its mask (the necks' labels are level by level: a vertebra ends at its
discs, so a plan of the whole bone as the competition's masks define it, 9-12 mm taller, pays in purity here):

- ``fraction`` (before): headers only, learned from the other cut studies;
- ``fraction 58 masks`` (after): the header-only fallback learned from the 58 real masks' geometry;
- ``profile`` (before): the cue's template and the vertebra extents learned from the other patients' whole
  volumes (level-by-level extents);
- ``profile + real extents`` (after): the same template, each vertebra placed along the column as the 58 real
  masks place it (``learn-ranges --extents``);
- ``shipped before`` / ``shipped file``: ``--before-ranges`` (e.g. ``git show 605ac60:weights/slice_ranges.json``)
  and weights/slice_ranges.json as they are (in-sample for the template: learned from these patients).

Per method: coverage, purity, box coverage (mean over studies, and the min / p5 / p95 over studies), the centre
(anchor) error of the cue, and the error of the planned top of C1 and bottom of C7 (mm; mean |error|, p95, max).

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
    load_extents,
    load_ranges,
    load_truths,
    ranges_from_truths,
    study_cue_indices,
    with_real_extents,
)
from cspine_submit.localize.features import bone_centroids
from cspine_submit.datasets.volume_study import write_studies

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "real_neck"
EXTENTS = ROOT / "tests" / "data" / "real_competition" / "vertebra_extents.csv"
FIRST_CUT = dict(slice_mm=1.25, head_mm=(5.0, 35.0), chest_mm=(15.0, 60.0), fov_mm=(160.0, 240.0),
                 reversed_fraction=0.5)
"""The first cut's ranges (``--cut first``)."""


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


def _spread(values) -> str:
    a = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if not a.size:
        return "-"
    return f"{a.mean():.3f} ({a.min():.2f} / {np.percentile(a, 5):.2f} / {np.percentile(a, 95):.2f})"


def _abs_mm(values) -> str:
    a = np.abs([v for v in values if v is not None and np.isfinite(v)])
    return "-" if not a.size else f"{a.mean():.1f} / {np.percentile(a, 95):.1f} / {a.max():.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--margins", type=float, nargs="+", default=[3.0])
    parser.add_argument("--cut", choices=("real", "first"), default="real")
    parser.add_argument("--before-ranges", type=Path, default=None, help="the slice_ranges.json shipped before")
    parser.add_argument("--keep", type=Path, default=None, help="write the studies here and keep them")
    args = parser.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_localize_real_"))
    whole_root = work / "whole"
    if not (whole_root / "segmentations").is_dir():
        write_studies(REAL, whole_root, cut=False, seed=0)
    whole, _ = load_truths(whole_root / "segmentations", whole_root / "images")
    shipped = load_ranges(ROOT / "weights" / "slice_ranges.json")
    before = load_ranges(args.before_ranges) if args.before_ranges else None
    extents = load_extents(EXTENTS)
    header_only = with_real_extents(ranges_from_truths(whole, method="profile", with_cost_reference=False), extents,
                                    table=str(EXTENTS))
    cut_params = {} if args.cut == "real" else FIRST_CUT

    rows: dict[tuple[str, float], list[dict]] = {}
    costs, slices = [], []
    for seed in args.seeds:
        root = work / f"cut_{args.cut}_seed{seed}"
        if not (root / "segmentations").is_dir():
            write_studies(REAL, root, size=args.size, seed=seed, **cut_params)
        cells, _ = load_truths(root / "segmentations", root / "images")
        slices.extend(t.n_slices for t in cells)
        for zm in args.margins:
            runs = {
                "fraction": evaluate_ranges(cells, method="fraction", z_margin_mm=zm),
                "fraction 58 masks": evaluate_ranges(cells, ranges=header_only, method="fraction", z_margin_mm=zm),
                "profile": evaluate_ranges(cells, method="profile", learn_from=whole, z_margin_mm=zm),
                "profile + real extents": evaluate_ranges(cells, method="profile", learn_from=whole, extents=extents,
                                                          z_margin_mm=zm),
                "shipped file": evaluate_ranges(cells, ranges=shipped, z_margin_mm=zm),
            }
            if before is not None:
                runs["shipped before"] = evaluate_ranges(cells, ranges=before, z_margin_mm=zm)
            for name, r in runs.items():
                rows.setdefault((name, zm), []).append(r)
        costs.extend(cue_cost(root / "images", shipped))
        if args.keep is None:
            shutil.rmtree(root)

    n = sum(len(r["study_summary"]) for r in rows[("fraction", args.margins[0])])
    print(f"real necks, {args.cut} cut: {len(args.seeds)} cut(s) x 11 patients = {n} studies, {args.size} px, "
          f"slices per study median {np.median(slices):.0f} ({min(slices)}-{max(slices)}), K=15")
    print("mean over studies (min / p5 / p95 over studies); |error| mm mean / p95 / max")
    print(f"{'method':<24}{'margin':>6}  {'coverage':<29}{'purity':<29}{'box coverage':<29}"
          f"{'|centre err|':<19}{'|C1 top err|':<19}{'|C7 bottom err|':<19}")
    for (name, zm), results in rows.items():
        summaries = [d for r in results for d in r["study_summary"].values()]
        print(f"{name:<24}{zm:>6.0f}  "
              + "".join(f"{_spread([d[k] for d in summaries]):<29}" for k in ("coverage", "purity", "box_coverage"))
              + "".join(f"{_abs_mm([d[k] for d in summaries]):<19}"
                        for k in ("anchor_error_mm", "c1_top_error_mm", "c7_bottom_error_mm")))
    default_margin = 3.0 if 3.0 in args.margins else args.margins[0]
    for name in ("profile", "profile + real extents"):
        results = rows[(name, default_margin)]
        print(f"\n{name}, margin {default_margin:g} mm, per vertebra (mean over studies; planned length mm median):")
        print(f"{'':<9}" + "".join(f"{v:>8}" for v in VERTEBRAE))
        for key in ("coverage", "purity", "box_coverage"):
            vals = [np.mean([s[v][key] for r in results for s in r["per_study"].values()]) for v in VERTEBRAE]
            print(f"{key:<9}" + "".join(f"{x:>8.3f}" for x in vals))
        lengths = [np.median([s[v]["end_error_mm"] - s[v]["start_error_mm"] for r in results
                              for s in r["per_study"].values()]) for v in VERTEBRAE]
        print(f"{'len+ mm':<9}" + "".join(f"{x:>8.1f}" for x in lengths) + "   (planned minus labelled length)")
    c = {k: np.array([x[k] for x in costs]) for k in costs[0]}
    print(f"\ncue per study ({len(costs)} studies of {int(np.median(c['n_slices']))} slices median): "
          f"{np.median(c['slices']):.0f} slices decoded (min {c['slices'].min()}, max {c['slices'].max()}); "
          f"decode {np.median(c['decode']):.2f} s, features {np.median(c['features']) * 1e3:.0f} ms, "
          f"align {np.median(c['align']) * 1e3:.0f} ms (medians)")
    ref = shipped.extra["profile_template"].get("loo_cost")
    align = np.array([d["alignment_cost"] for r in rows[("shipped file", default_margin)]
                      for d in r["study_summary"].values() if d.get("alignment_cost") is not None])
    flagged = sum(d.get("alignment_plausible") is False for r in rows[("shipped file", default_margin)]
                  for d in r["study_summary"].values())
    if ref:
        print(f"alignment cost, shipped file: median {np.median(align):.2f}, max {align.max():.2f}; {flagged} of "
              f"{align.size} above its threshold {cost_threshold(ref):.2f}")
    if args.keep is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
