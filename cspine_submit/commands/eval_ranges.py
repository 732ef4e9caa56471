"""Measure how well learned slice ranges localize C1-C7, leave-one-out over a folder of masks.

For each mask: learn from all the others, plan the left-out study, and compare with its mask. Per vertebra:
coverage (share of the vertebra's true slices inside the planned range), purity (share of the planned slices that
contain the vertebra), box coverage (share of the vertebra's voxels inside the planned in-plane box) and the median
distance between the planned and the true centre (mm). Per study the same, with the vertebra planned farthest off,
so that a regression on one neck shows at once.

With --learn-segmentations/--learn-images the ranges are learned from another set of the same patients (e.g. whole
volumes), leaving out the held-out study's UID each time.
"""

from __future__ import annotations

import json
from pathlib import Path

from cspine_submit.config import ModelConfig

NAME = "eval-ranges"
HELP = "leave-one-out coverage/purity/box coverage of the learned slice ranges"
ORDER = 31


def add_arguments(parser) -> None:
    parser.add_argument("--segmentations", required=True, type=Path, help="folder of <uid>.nii / .nii.gz masks")
    parser.add_argument("--images", type=Path, default=None, help="folder of <uid>/ study folders")
    parser.add_argument("--layout", choices=("competition", "affine"), default="competition")
    parser.add_argument("--method", choices=("fraction", "mm_top", "profile", "all"), default=None,
                        help="method to evaluate (default: profile with --images, else fraction); 'all' compares")
    defaults = ModelConfig()  # the planner's K and z margin come from model_config.json; these are its defaults
    parser.add_argument("--slices", type=int, default=defaults.slices_per_vertebra,
                        help=f"K slices per vertebra (default {defaults.slices_per_vertebra})")
    parser.add_argument("--z-margin", type=float, default=defaults.z_margin_mm,
                        help=f"mm added above and below each range (default {defaults.z_margin_mm:g})")
    parser.add_argument("--ranges", type=Path, default=None,
                        help="evaluate this slice_ranges.json on every mask instead of leave-one-out learning")
    parser.add_argument("--learn-segmentations", type=Path, default=None,
                        help="learn from these masks instead (leave-one-out by study UID)")
    parser.add_argument("--learn-images", type=Path, default=None, help="study folders of --learn-segmentations")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def format_table(result: dict) -> str:
    how = "leave-one-out over" if result.get("leave_one_out", True) else "fixed ranges on"
    lines = [f"method {result['method']}: {how} {result['n_studies']} masks, K={result['k']}, "
             f"z margin {result['z_margin_mm']} mm, learned from {result.get('learned_from', 'the other studies')}",
             f"{'vertebra':<9}{'coverage':>10}{'purity':>9}{'box_cov':>9}{'|off| mm':>10}"]
    rows = list(result["per_vertebra"].items()) + [("mean", result["mean"])]
    for name, d in rows:
        off = f"{d['abs_offset_mm']:>10.1f}" if "abs_offset_mm" in d else ""
        lines.append(f"{name:<9}{d['coverage']:>10.3f}{d['purity']:>9.3f}{d['box_coverage']:>9.3f}{off}")
    if result.get("anchor_error_mm"):
        errs = [abs(e) for e in result["anchor_error_mm"] if e is not None]
        if errs:
            lines.append(f"column-centre error: median {sorted(errs)[len(errs) // 2]:.1f} mm, max {max(errs):.1f} mm")
    reference = result.get("alignment_reference")
    if reference and reference.get("cost_reference"):
        ref = reference["cost_reference"]
        lines.append(f"alignment cost reference (the ranges' {ref['n']} training studies, leave-one-out): median "
                     f"{ref['q50']:.2f}, max {ref['max']:.2f}; implausible above {reference['threshold']:.2f} (marked !)")
    summary = result.get("study_summary")
    if summary:
        costs = any(d.get("alignment_cost") is not None for d in summary.values())
        lines.append("")
        lines.append(f"{'study (worst first)':<32}{'coverage':>9}{'purity':>8}{'box_cov':>8}  worst vertebra"
                     f"{'centre err':>12}" + (f"{'align cost':>12}" if costs else ""))
        for uid, d in sorted(summary.items(), key=lambda kv: kv[1]["coverage"]):
            err = d.get("anchor_error_mm")
            err_text = "" if err is None else f"{err:>+11.1f}"
            cost = d.get("alignment_cost")
            cost_text = "" if cost is None else f"{cost:>11.2f}" + ("!" if d.get("alignment_plausible") is False else "")
            lines.append(f"{uid[-31:]:<32}{d['coverage']:>9.3f}{d['purity']:>8.3f}{d['box_coverage']:>8.3f}  "
                         f"{d['worst']} {d['worst_offset_mm']:>+6.1f} mm{err_text:>12}" + (f"{cost_text:>12}" if costs else ""))
    return "\n".join(lines)


def run(args) -> int:
    from cspine_submit.localize import DEFAULT_FEATURE_SET, METHODS, evaluate_ranges, load_ranges, load_truths

    fixed = None
    if args.ranges is not None:
        try:
            fixed = load_ranges(args.ranges)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}")
            return 2

    try:
        # A fixed ranges file is matched with the features its template was learned with.
        feature_set = DEFAULT_FEATURE_SET
        if fixed is not None and "profile_template" in fixed.extra:
            feature_set = fixed.extra["profile_template"].get("feature_set", "areas")
        truths, skipped = load_truths(args.segmentations, args.images, layout=args.layout,
                                      with_profile=args.images is not None, progress=not args.json,
                                      feature_set=feature_set)
    except FileNotFoundError as exc:
        print(f"error: {exc}")
        return 2
    learn_from = None
    if args.learn_segmentations is not None:
        try:
            learn_from, learn_skipped = load_truths(args.learn_segmentations, args.learn_images, layout=args.layout,
                                                    with_profile=args.learn_images is not None,
                                                    progress=not args.json)
        except FileNotFoundError as exc:
            print(f"error: {exc}")
            return 2
        skipped = skipped + learn_skipped
    if not args.json:
        for path, reason in skipped:
            print(f"skipped {Path(path).name}: {reason}")
    if args.method == "all":
        methods = [m for m in METHODS
                   if m != "profile" or all(t.profile is not None for t in [*truths, *(learn_from or [])])]
        if fixed is not None:
            methods = [m for m in methods if m in fixed.extra.get("methods", [fixed.method])]
    else:
        methods = [args.method]
    results = []
    try:
        for m in methods:
            results.append(evaluate_ranges(truths, method=m, k=args.slices, z_margin_mm=args.z_margin,
                                           layout=args.layout, ranges=fixed, learn_from=learn_from))
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    if args.json:
        keep = ("method", "leave_one_out", "learned_from", "n_studies", "k", "z_margin_mm", "per_vertebra", "mean",
                "anchor_error_mm", "alignment_reference", "study_summary", "per_study")
        out = [{k: r[k] for k in keep if k in r} for r in results]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        print("\n\n".join(format_table(r) for r in results))
    return 0
