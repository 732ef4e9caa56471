"""Write real CT volumes (NIfTI) as competition-style DICOM studies with their masks.

SRC is a folder of <name>_ct.nii.gz CT volumes with <name>_vert.nii.gz vertebra labels (1-7 = C1-C7; e.g.
tests/data/real_neck, the OpenKBP necks), or one such CT file. Each volume is brought to the axial frame from its
affine (any axis-aligned orientation), cut the way competition scans are cut (a random 5-35 mm above the top of C1
to 15-60 mm below the bottom of C7, a random 160-240 mm field of view centred near the vertebrae), resampled to
--size pixels and --slice-mm slices, and written as OUT/images/<uid>/<n>.dcm (files numbered by position: half the
studies feet to head; half JPEG Lossless .4.70, half PixelRepresentation 1) with its mask in the competition's
sagittal layout, OUT/segmentations/<uid>.nii. OUT/studies.csv and studies.json say, per study, its source, the cut
spec drawn, the flags and C1-C7's slices; OUT/test.csv lists 8 rows per study for `submit`. Same seed, same studies.

Examples:
  cspine-submit write-study tests/data/real_neck /tmp/real_necks
  cspine-submit learn-ranges --segmentations /tmp/real_necks/segmentations --images /tmp/real_necks/images --out /tmp/real_ranges.json
  cspine-submit eval-ranges --segmentations /tmp/real_necks/segmentations --images /tmp/real_necks/images --method all
  cspine-submit write-study tests/data/real_neck /tmp/real_whole --no-cut
"""

from __future__ import annotations

NAME = "write-study"
HELP = "write real CT volumes (NIfTI + labels) as competition-style DICOM studies and masks"
ORDER = 81


def add_arguments(parser) -> None:
    from pathlib import Path

    parser.add_argument("src", type=Path, help="folder of <name>_ct.nii.gz + <name>_vert.nii.gz, or one CT file")
    parser.add_argument("out", type=Path, help="output folder (created; must be empty unless --force)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of a cut study, pixels (default 512)")
    parser.add_argument("--slice-mm", default="1.25",
                        help="slice spacing of a cut study, mm, or 'native' for the source's slices (default 1.25)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the cuts and flags (default 0)")
    parser.add_argument("--fov", type=float, nargs=2, metavar=("LO", "HI"), default=(160.0, 240.0),
                        help="field of view range, mm (default 160 240)")
    parser.add_argument("--head", type=float, nargs=2, metavar=("LO", "HI"), default=(5.0, 35.0),
                        help="scan above the top of C1, mm (default 5 35)")
    parser.add_argument("--chest", type=float, nargs=2, metavar=("LO", "HI"), default=(15.0, 60.0),
                        help="scan below the bottom of C7, mm (default 15 60)")
    parser.add_argument("--no-cut", action="store_true",
                        help="write each volume whole on its own grid (no cut, no resampling; labels optional)")
    parser.add_argument("--reversed-fraction", type=float, default=0.5, help="share numbered feet to head (0.5)")
    parser.add_argument("--compressed-fraction", type=float, default=0.5, help="share in JPEG Lossless .4.70 (0.5)")
    parser.add_argument("--signed-fraction", type=float, default=0.5, help="share with PixelRepresentation 1 (0.5)")
    parser.add_argument("--force", action="store_true", help="replace studies already written in OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    import time

    from cspine_submit.datasets.volume_study import write_studies

    if str(args.slice_mm).lower() == "native":
        slice_mm = None
    else:
        try:
            slice_mm = float(args.slice_mm)
        except ValueError:
            print(f"error: --slice-mm {args.slice_mm!r}: expected mm (e.g. 1.25) or 'native'")
            return 2
    start = time.perf_counter()
    try:
        records = write_studies(
            args.src, args.out, size=args.size, slice_mm=slice_mm, seed=args.seed, cut=not args.no_cut,
            fov_mm=tuple(args.fov), head_mm=tuple(args.head), chest_mm=tuple(args.chest),
            reversed_fraction=args.reversed_fraction, compressed_fraction=args.compressed_fraction,
            signed_fraction=args.signed_fraction, force=args.force, progress=not args.quiet,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    elapsed = time.perf_counter() - start
    print(f"wrote {len(records)} studies to {args.out} in {elapsed:.1f} s "
          f"({sum(r['reversed'] for r in records)} numbered feet to head, "
          f"{sum(r['transfer_syntax'].endswith('.4.70') for r in records)} JPEG Lossless)")
    print(f"{'name':<10}{'uid':<28}{'slices':>7}{'rows':>6}{'slice mm':>9}{'px mm':>7}{'fov mm':>8}  C1-C7 slices")
    for r in records:
        cut = r["cut"]
        z = r["z_ranges"]
        span = f"{z['C1'][0]}-{z['C7'][1]}" if "C1" in z and "C7" in z else "-"
        fov = f"{cut['fov_mm']:.0f}" if cut else "-"
        print(f"{r['name']:<10}{r['uid']:<28}{r['n_slices']:>7}{r['rows']:>6}{r['spacing_mm'][0]:>9.3g}"
              f"{r['spacing_mm'][1]:>7.3f}{fov:>8}  {span}")
    return 0
