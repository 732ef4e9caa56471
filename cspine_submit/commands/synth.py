"""Write synthetic cervical-spine CT studies in the competition's layout.

OUT receives train_images/<uid>/<n>.dcm, test_images/<uid>/<n>.dcm, segmentations/<uid>.nii (for --segmented
training studies), train.csv, train_bounding_boxes.csv, test.csv, sample_submission.csv and test_labels.csv (the
truth of the test studies). The same seed and parameters give the same bytes.

Parameters can also come from a JSON file (--params, e.g. weights/demo/synthetic_params.json: the keys of
cspine_submit.datasets.synthetic.DEFAULTS plus n_train, n_test, n_segmented, seed); options given on the command line win.

By default (--scheme real) each study is drawn like the competition's: slice spacing with its thickness, pixel
spacing, the scan above C1 and below C7, numbering direction and image size from the real distributions, no
Modality or Manufacturer tag, the real labels' joint distribution, boxes (one per slice) for about a quarter of the
fractured studies; a range option (--spacing, --fov, --head, --chest, --size) replaces that draw.

Examples:
  cspine-submit synth /tmp/synth --studies 40 --test 10 --seed 1 --size 160
  cspine-submit synth /tmp/bench --studies 2 --test 0 --size 512 --spacing 0.5 1.0
"""

from __future__ import annotations

NAME = "synth"
HELP = "write synthetic CT studies (DICOM, masks, CSVs) in the competition's layout"
ORDER = 80


def add_arguments(parser) -> None:
    parser.add_argument("out", help="output folder (created; must be empty unless --force)")
    parser.add_argument("--studies", type=int, default=None, help="training studies (default 6)")
    parser.add_argument("--test", type=int, default=None, help="test studies (default 3)")
    parser.add_argument("--segmented", type=int, default=None, help="training studies with a mask (default all)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    parser.add_argument("--scheme", choices=("real", "uniform"), default=None,
                        help="real (default): geometry, headers and labels drawn like the competition's studies; "
                             "uniform: the first generator's ranges (the demo's classifiers were trained on it)")
    parser.add_argument("--size", type=int, default=None,
                        help="rows = columns, pixels (default: real sizes, 512 almost always; uniform scheme 256)")
    parser.add_argument("--spacing", type=float, nargs=2, metavar=("LO", "HI"), help="slice spacing range, mm")
    parser.add_argument("--fov", type=float, nargs=2, metavar=("LO", "HI"), help="field of view range, mm")
    parser.add_argument("--head", type=float, nargs=2, metavar=("LO", "HI"), help="scan above the top of C1, mm")
    parser.add_argument("--chest", type=float, nargs=2, metavar=("LO", "HI"), help="scan below the bottom of C7, mm")
    parser.add_argument("--noise", type=float, nargs=2, metavar=("LO", "HI"), help="noise standard deviation, HU")
    parser.add_argument("--compressed-fraction", type=float, help="share of studies in JPEG Lossless .4.70")
    parser.add_argument("--reversed-fraction", type=float, help="share of studies numbered feet to head")
    parser.add_argument("--signed-fraction", type=float, help="share with PixelRepresentation 1 (intercept 0)")
    parser.add_argument("--no-modality-fraction", type=float, help="share of studies without a Modality tag")
    parser.add_argument("--wedge-fraction", type=float, help="share of C3-C7 fractures that are wedge compressions")
    parser.add_argument("--table-fraction", type=float, help="share of studies with a patient table in view")
    parser.add_argument("--boxed-fraction", type=float,
                        help="share of studies whose fracture boxes are written, drawn over all studies; only "
                             "fractured training studies have boxes (default 1)")
    parser.add_argument(
        "--prevalence",
        help="fracture probability per vertebra: one number for all, or C1=0.1,C2=0.2,... (default: train.csv's)",
    )
    parser.add_argument("--params", help="JSON file of generator parameters (command-line options win)")
    parser.add_argument("--force", action="store_true", help="replace a dataset already in OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _prevalence(text: str) -> dict[str, float]:
    from cspine_submit.config import VERTEBRAE

    text = text.strip()
    if "=" not in text:
        return {v: float(text) for v in VERTEBRAE}
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in VERTEBRAE:
            raise ValueError(f"--prevalence: unknown vertebra {key!r}; expected one of {list(VERTEBRAE)}")
        out[key] = float(value)
    return out


def run(args) -> int:
    import json
    from pathlib import Path

    from cspine_submit.datasets.synthetic import generate_dataset

    params: dict = {}
    if args.params:
        path = Path(args.params)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        data = json.loads(path.read_text(encoding="utf-8"))
        # Accept the parameters at the top level or nested as the demo's synthetic_params.json may hold them.
        params = dict(data.get("generate_dataset", data.get("params", data)))
        params = {k: v for k, v in params.items() if k not in ("out_dir", "force", "progress")}
    for key in ("scheme", "spacing", "fov", "head", "chest", "noise", "size", "compressed_fraction",
                "reversed_fraction", "signed_fraction", "no_modality_fraction", "wedge_fraction", "table_fraction",
                "boxed_fraction"):
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    if args.prevalence:
        try:
            params["prevalence"] = _prevalence(args.prevalence)
        except ValueError as exc:
            print(f"error: {exc}")
            return 2
    n_train = args.studies if args.studies is not None else params.pop("n_train", 6)
    n_test = args.test if args.test is not None else params.pop("n_test", 3)
    n_seg = args.segmented if args.segmented is not None else params.pop("n_segmented", None)
    seed = args.seed if args.seed is not None else params.pop("seed", 0)
    for key in ("n_train", "n_test", "n_segmented", "seed"):
        params.pop(key, None)
    try:
        ds = generate_dataset(
            args.out, n_train, n_test, seed, n_segmented=n_seg, force=args.force, progress=not args.quiet, **params
        )
    except (FileExistsError, ValueError) as exc:  # an existing dataset, or a parameter out of range (named)
        print(f"error: {exc}")
        return 2
    n_slices = [r.n_slices for r in ds.studies]
    positives = sum(r.labels["patient_overall"] for r in ds.train)
    print(f"wrote {len(ds.train)} training studies ({positives} with a fracture, "
          f"{sum(r.segmented for r in ds.train)} with masks, {sum(r.n_boxes for r in ds.train)} boxes) "
          f"and {len(ds.test)} test studies to {ds.root}")
    if n_slices:
        print(f"slices per study: {min(n_slices)}-{max(n_slices)}; "
              f"compressed {sum(r.spec.compressed for r in ds.studies)}, "
              f"reversed {sum(r.spec.reversed for r in ds.studies)} of {len(ds.studies)}")
    return 0
