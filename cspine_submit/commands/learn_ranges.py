"""Learn per-vertebra slice ranges and in-plane boxes from segmentation masks.

Reads every <uid>.nii[.gz] in --segmentations, brings it into its study's head-to-feet axial frame (--layout
competition: the competition's sagittal convention; --layout affine: the file's affine, for masks such as VerSe's),
checks the shape against the study and that C1 lies above C7, and records per vertebra the quantiles of its z-start
and z-end (as a fraction of the study, in mm below the first slice, and in mm from the column centre) and of its
in-plane box. With --images the studies' headers give the slice positions and a few slices per study give the
image profile of the `profile` method; without it each mask is learned from its own grid (fraction and mm only).
Masks that fail a check are skipped with the reason. With --extents (a table of real masks' vertebra extents) each
vertebra's z-extent comes from the table instead: its place along the column the image template finds (profile)
and the header-only fallback (fraction, mm_top); the template and in-plane boxes still come from the masks given.
"""

from __future__ import annotations

from pathlib import Path

NAME = "learn-ranges"
HELP = "learn slice ranges (weights/slice_ranges.json) from segmentation masks"
ORDER = 30


def add_arguments(parser) -> None:
    parser.add_argument("--segmentations", required=True, type=Path, help="folder of <uid>.nii / .nii.gz masks")
    parser.add_argument("--images", type=Path, default=None,
                        help="folder of <uid>/ study folders (train_images); omit to learn from the masks' own grids")
    parser.add_argument("--layout", choices=("competition", "affine"), default="competition",
                        help="how masks are oriented (default: competition)")
    parser.add_argument("--method", choices=("fraction", "mm_top", "profile"), default=None,
                        help="method the planner will use (default: profile with --images, else fraction)")
    parser.add_argument("--out", type=Path, default=Path("weights/slice_ranges.json"), help="output JSON")
    parser.add_argument("--source", default=None, help="text recorded as the file's source (default: the command)")
    parser.add_argument("--extents", type=Path, default=None,
                        help="a table of real masks' vertebra extents (CSV: StudyInstanceUID, n, dz, Ck_first, "
                             "Ck_last; e.g. tests/data/real_competition/vertebra_extents.csv): each vertebra's "
                             "z-extent along the column and the header-only fallback come from it, the image "
                             "template and boxes from --segmentations/--images (needs --images)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def run(args) -> int:
    import datetime

    from cspine_submit.localize import learn_ranges, load_extents, with_real_extents

    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists; use --force to overwrite")
        return 2
    command = f"cspine-submit learn-ranges --segmentations {args.segmentations} --layout {args.layout}"
    if args.images is not None:
        command += f" --images {args.images}"
    if args.method is not None:
        command += f" --method {args.method}"
    if args.extents is not None:
        command += f" --extents {args.extents}"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    source = args.source or f"{command} ({stamp})"
    if args.extents is not None and args.images is None:
        print("error: --extents needs --images (the image template finds the column the extents are placed on)")
        return 2
    try:
        ranges, skipped = learn_ranges(args.segmentations, args.images, layout=args.layout, method=args.method,
                                       source=source, progress=True)
        if args.extents is not None:
            ranges = with_real_extents(ranges, load_extents(args.extents), table=str(args.extents))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    for path, reason in skipped:
        print(f"skipped {Path(path).name}: {reason}")
    ranges.to_json(args.out)
    print(f"learned from {ranges.n_masks} masks (skipped {len(skipped)}), layout {ranges.layout}, "
          f"method {ranges.method}: wrote {args.out}")
    m = ranges.method
    print(f"{'vertebra':<9}{'start q50':>10}{'end q50':>10}{'length mm':>11}")
    for v, entry in ranges.per_vertebra.items():
        print(f"{v:<9}{entry[m]['start']['q50']:>10.3f}{entry[m]['end']['q50']:>10.3f}"
              f"{entry['length_mm']['q50']:>11.1f}")
    return 0
