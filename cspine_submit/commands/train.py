"""Train the seven per-vertebra classifiers and write a weights folder inference can use.

Crops come from the same planner (--ranges) and crop function as inference. Labels: train.csv per vertebra; where
train_bounding_boxes.csv marks fracture slices, a fractured vertebra's crops on boxed slices are the positives and
its other crops are left out (--box-policy exclude; or downweight, or study for the seed's study-level labels).
Seed recipe (BCE, Adam 5e-4, batch 16, early stopping on validation loss, 1/3 of the studies held out, seeded and
stratified) plus augmentation and class balancing. Crops are cached per study (--cache) and streamed with tf.data.

Writes C1.keras..C7.keras, model_config.json, slice_ranges.json (a copy of --ranges), history.csv,
validation.json (vertebra-level AUC on the held-out studies), training_curves.png and MANIFEST.json.
--resume continues an interrupted run in the same --out.

Example:
  cspine-submit train --data /kaggle/input/rsna-2022-cervical-spine-fracture-detection \\
      --ranges weights/slice_ranges.json --out weights --head gap --input-size 256 --channels windows
"""

from __future__ import annotations

import sys
from pathlib import Path

NAME = "train"
HELP = "train the per-vertebra classifiers (writes classifier files, model_config.json, MANIFEST.json)"
ORDER = 40


def _windows(text: str):
    out = []
    for part in text.split(";"):
        level, width = part.split("/")
        out.append((float(level), float(width)))
    return tuple(out)


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="competition-layout folder (train.csv, train_images/)")
    parser.add_argument("--ranges", required=True, type=Path, help="slice_ranges.json to plan crops with")
    parser.add_argument("--out", required=True, type=Path, help="weights folder to write")
    parser.add_argument("--config", type=Path, default=None,
                        help="start from this model_config.json (default: the package defaults); flags below override")
    parser.add_argument("--head", default=None, help="classifier head: seed, gap (default) or tiny")
    parser.add_argument("--input-size", type=int, default=None, help="model input side, pixels")
    parser.add_argument("--channels", default=None, choices=("single", "replicate", "windows", "neighbours"))
    parser.add_argument("--windows", type=_windows, default=None, help='HU windows "level/width;level/width;..."')
    parser.add_argument("--slices-per-vertebra", type=int, default=None, help="K crops per vertebra")
    parser.add_argument("--crop-margin", type=float, default=None)
    parser.add_argument("--vertebrae", default=",".join(("C1", "C2", "C3", "C4", "C5", "C6", "C7")),
                        help="comma-separated subset to train (default all)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--monitor", choices=("val_loss", "val_auc"), default="val_loss",
                        help="early stopping and best-epoch criterion (default val_loss, as the seed notebook)")
    parser.add_argument("--val-fraction", type=float, default=1.0 / 3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-augment", action="store_true", help="the seed recipe: no augmentation")
    parser.add_argument("--no-balance", action="store_true", help="no class balancing")
    parser.add_argument("--shared", action="store_true",
                        help="train one network on all selected vertebrae's crops, saved as each vertebra's file "
                             "(small data sets, e.g. the synthetic demo)")
    parser.add_argument("--box-policy", choices=("exclude", "downweight", "study"), default="exclude")
    parser.add_argument("--other-weight", type=float, default=0.2, help="weight of box-less crops with downweight")
    parser.add_argument("--imagenet-weights", type=Path, default=None,
                        help="local ResNet50 ImageNet 'notop' weights file (3-channel inputs only; never downloaded)")
    parser.add_argument("--trained-on", choices=("competition", "synthetic"), default="competition",
                        help="recorded in model_config.json")
    parser.add_argument("--cache", type=Path, default=None, help="crop cache folder (default OUT/cache)")
    parser.add_argument("--workers", type=int, default=2, help="processes reading and cropping studies")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N studies (smoke runs)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--force", action="store_true",
                        help="replace the training outputs already in --out (other files there are kept)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _command_line() -> str:
    argv = sys.argv[1:]
    if argv and argv[0] == NAME:  # run from the console script (not from a library call / test)
        return "cspine-submit " + " ".join(argv)
    return "cspine-submit train (called from Python)"


def run(args) -> int:
    import shutil

    from cspine_submit.config import ModelConfig
    from cspine_submit.train import TrainOptions, existing_outputs, train_classifiers

    try:
        config = ModelConfig.from_json(args.config) if args.config else ModelConfig()
        changes = {k: v for k, v in {
            "head": args.head, "input_size": args.input_size, "channels": args.channels, "windows": args.windows,
            "slices_per_vertebra": args.slices_per_vertebra, "crop_margin": args.crop_margin}.items() if v is not None}
        if not args.config and "head" not in changes:
            changes["head"] = "gap"
        config = config.replace(**changes)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    # After reading --config: it may be one of the outputs being replaced.
    # The ranges input may live in --out (weights/slice_ranges.json): it is an input, never replaced.
    existing = [p for p in existing_outputs(args.out) if p.resolve() != args.ranges.resolve()]
    if existing and not args.resume:
        if not args.force:
            print(f"error: {args.out} already holds training outputs ({', '.join(p.name for p in existing[:4])}); "
                  "use --resume to continue that run or --force to replace them")
            return 2
        for path in existing:  # only what training writes; other files in --out stay
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    options = TrainOptions(
        vertebrae=tuple(v.strip() for v in args.vertebrae.split(",") if v.strip()),
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, patience=args.patience,
        monitor=args.monitor,
        val_fraction=args.val_fraction, seed=args.seed, augment=not args.no_augment, balance=not args.no_balance,
        shared=args.shared,
        box_policy=args.box_policy, other_weight=args.other_weight,
        backbone_weights=str(args.imagenet_weights) if args.imagenet_weights else None,
        workers=args.workers, limit=args.limit, cache_dir=str(args.cache) if args.cache else None,
        trained_on=args.trained_on, source=_command_line(),
    )
    print(f"training {config.head} classifiers, input {config.input_shape}, channels {config.channels}, "
          f"K={config.slices_per_vertebra}, box policy {options.box_policy}")
    try:
        result = train_classifiers(args.data, args.ranges, args.out, config, options, resume=args.resume,
                                   progress=not args.quiet, log=print)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    print(f"{'vertebra':<9}{'val studies':>12}{'positive':>9}{'AUC':>7}")
    for v, info in result.validation.get("per_vertebra", {}).items():
        print(f"{v:<9}{info.get('n_val_studies', 0):>12}{info.get('n_val_pos', 0):>9}{info.get('auc', float('nan')):>7.3f}")
    print(f"pooled vertebra-level validation AUC: {result.validation.get('pooled_auc', float('nan')):.3f}")
    print(f"wrote {len(result.files)} files to {result.out_dir} in {result.seconds:.0f} s")
    return 0
