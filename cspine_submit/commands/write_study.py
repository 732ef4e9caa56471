"""Write real CT volumes (NIfTI) as competition-style DICOM studies with their masks.

SRC is a folder of <name>_ct.nii.gz CT volumes with <name>_vert.nii.gz vertebra labels (1-7 = C1-C7; e.g.
tests/data/real_neck, the OpenKBP necks), or one such CT file. Each volume is brought to the axial frame from its
affine (any axis-aligned orientation), cut the way competition scans are cut (by default each draw like the
competition's studies: the scan above the top of C1 and below the bottom of C7 together from one of 58 real masked
studies, the field of view from the real pixel spacings times 512, the slice spacing with its SliceThickness from
the 2019 real studies; --head/--chest/--fov ranges and a --slice-mm value replace those draws), centred near the
vertebrae, resampled to --size pixels, and written as OUT/images/<uid>/<n>.dcm (files numbered by position: 9.8 %
feet to head as in the real set; half JPEG Lossless .4.70, half PixelRepresentation 1; no Modality or Manufacturer
tag, like the real files) with its mask in the competition's sagittal layout, OUT/segmentations/<uid>.nii. OUT/studies.csv and studies.json say, per study, its source, the cut
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
    parser.add_argument("--slice-mm", default="real",
                        help="slice spacing of a cut study, mm, 'native' for the source's slices, or 'real' (default: "
                             "drawn with its thickness from the real studies)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the cuts and flags (default 0)")
    parser.add_argument("--fov", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                        help="field of view range, mm (default: the real studies' pixel spacing x 512)")
    parser.add_argument("--head", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                        help="scan above the top of C1, mm (default: with --chest, from a real masked study)")
    parser.add_argument("--chest", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                        help="scan below the bottom of C7, mm (default: with --head, from a real masked study)")
    parser.add_argument("--no-cut", action="store_true",
                        help="write each volume whole on its own grid (no cut, no resampling; labels optional)")
    parser.add_argument("--reversed-fraction", type=float, default=0.098,
                        help="share numbered feet to head (default 0.098, the real share)")
    parser.add_argument("--compressed-fraction", type=float, default=0.5, help="share in JPEG Lossless .4.70 (0.5)")
    parser.add_argument("--signed-fraction", type=float, default=0.5, help="share with PixelRepresentation 1 (0.5)")
    parser.add_argument("--force", action="store_true", help="replace studies already written in OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _range(value):
    return "real" if value is None else tuple(value)


def run(args) -> int:
    import time

    from cspine_submit.datasets.volume_study import write_studies

    if str(args.slice_mm).lower() == "native":
        slice_mm = None
    elif str(args.slice_mm).lower() == "real":
        slice_mm = "real"
    else:
        try:
            slice_mm = float(args.slice_mm)
        except ValueError:
            print(f"error: --slice-mm {args.slice_mm!r}: expected mm (e.g. 1.25), 'native' or 'real'")
            return 2
    start = time.perf_counter()
    try:
        records = write_studies(
            args.src, args.out, size=args.size, slice_mm=slice_mm, seed=args.seed, cut=not args.no_cut,
            fov_mm=_range(args.fov), head_mm=_range(args.head), chest_mm=_range(args.chest),
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
