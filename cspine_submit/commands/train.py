"""Train the seven per-vertebra classifiers with K-fold cross-validation and write a weights folder inference can use.

Crops come from the same planner (--ranges) and crop function as inference, cached compressed in the work folder
(--work-dir, default OUT.work beside --out, never inside it). Labels: train.csv per vertebra; where
train_bounding_boxes.csv marks fracture slices, a fractured vertebra's crops on boxed slices are the positives and
its other crops are left out (--box-policy exclude; or downweight, or study for the seed's study-level labels).
Recipe: the seed's network and Adam 5e-4 (per 16 crops of global batch) on a fixed cosine schedule, augmentation,
positives weighted 2 as the metric weighs them. --folds K (default 5) patient-level folds: every study gets an
out-of-fold prediction; pooling (top-k, overall rule) and a per-label calibration are fitted on them by
minimising the competition metric; priors are the metric-minimising constants. The K fold models ship as an
ensemble per vertebra (--final refit: one model refit on every study instead).

Writes into --out only: the classifiers, model_config.json, slice_ranges.json (a copy of --ranges), oof.csv
(out-of-fold, cross-fitted predictions), validation.json (oof_score, before/after calibration, baselines, per-label
log loss and AUC) and MANIFEST.json. --resume continues an interrupted run. --plan trains nothing: it counts
fractured and intact studies per vertebra and fold (and refuses, exit 2, a run in which a model would see one
class only), reads headers and prints the studies, crops, projected cache and disk, and the time per epoch on this
machine, a T4 and a P100 (--json: machine-readable). Exit codes: 0 done, 2 bad arguments or data, 3 a device
error (out of memory, XLA; the message says what to change; --resume continues after the fix).

Example:
  cspine-submit train --data /kaggle/input/rsna-2022-cervical-spine-fracture-detection \\
      --ranges weights/slice_ranges.json --out /kaggle/working/weights --plan
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
    parser.add_argument("--channels", default=None, choices=("single", "replicate", "windows", "neighbours"),
                        help="what the model's input channels hold: single (one window, 1 channel), replicate (it "
                             "three times, for ImageNet weights), windows (one HU window per channel), neighbours "
                             "(the slice and its two neighbours, 2.5D)")
    parser.add_argument("--windows", type=_windows, default=None, help='HU windows "level/width;level/width;..."')
    parser.add_argument("--slices-per-vertebra", type=int, default=None, help="K crops per vertebra")
    parser.add_argument("--crop-margin", type=float, default=None,
                        help="extra border around each vertebra's planned box, as a fraction of its side")
    parser.add_argument("--vertebrae", default=",".join(("C1", "C2", "C3", "C4", "C5", "C6", "C7")),
                        help="comma-separated subset to train (default all)")
    parser.add_argument("--folds", type=int, default=5, help="patient-level folds (default 5); 1: one split "
                        "(--val-fraction held out), for quick runs")
    parser.add_argument("--final", choices=("ensemble", "refit"), default="ensemble",
                        help="ship the K fold models averaged (default) or one model refit on every study")
    parser.add_argument("--epochs", type=int, default=10, help="length of the fixed schedule (default 10)")
    parser.add_argument("--batch-size", type=int, default=16, help="crops per step per GPU (default 16)")
    parser.add_argument("--lr", type=float, default=5e-4,
                        help="peak Adam rate at a global batch of 16; scaled linearly with the global batch")
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                        help="learning rate over the epochs: cosine decay to 0 (default) or constant")
    parser.add_argument("--patience", type=int, default=0,
                        help="0 (default): fixed schedule, last epoch kept; N: early stopping on an inner split of "
                             "each fold's training studies (never on the held-out fold)")
    parser.add_argument("--monitor", choices=("val_loss", "val_auc"), default="val_loss",
                        help="early stopping criterion on the inner split (with --patience)")
    parser.add_argument("--val-fraction", type=float, default=1.0 / 3.0,
                        help="held-out share with --folds 1, and the inner split's share with --patience")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the folds, shuffling, augmentation and initial weights: the same seed, data and "
                             "config give the same files, byte for byte (default 0)")
    parser.add_argument("--no-augment", action="store_true", help="the seed recipe: no augmentation")
    parser.add_argument("--pos-weight", type=float, default=2.0,
                        help="loss weight of a positive crop, negatives 1 (default 2, as the metric)")
    parser.add_argument("--balance", action="store_true",
                        help="class balancing instead of --pos-weight (odds inflated 10-30x; calibration undoes it)")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="keep the config's pooling, no calibration (priors are still fitted)")
    parser.add_argument("--shared", action="store_true",
                        help="train one network per fold on all selected vertebrae's crops, used for each vertebra "
                             "(small data sets, e.g. the synthetic demo)")
    parser.add_argument("--box-policy", choices=("exclude", "downweight", "study"), default="exclude",
                        help="labels of a fractured vertebra's crops when train_bounding_boxes.csv marks its fracture "
                             "slices: exclude (default: boxed crops positive, its other crops left out), downweight "
                             "(the others negative with --other-weight), study (every crop positive, the seed's)")
    parser.add_argument("--other-weight", type=float, default=0.2, help="weight of box-less crops with downweight")
    parser.add_argument("--jit-compile", choices=("auto", "on", "off"), default="auto",
                        help="XLA for the training step: auto (default) compiles on exactly one GPU (P100, one T4) and "
                             "not with two GPUs (MirroredStrategy) or on the CPU; on/off force it")
    parser.add_argument("--imagenet-weights", type=Path, default=None,
                        help="local ResNet50 ImageNet 'notop' weights file (3-channel inputs only; never downloaded)")
    parser.add_argument("--trained-on", choices=("competition", "synthetic"), default="competition",
                        help="recorded in model_config.json")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="cache, checkpoints, fold models, state and logs (default: OUT.work beside --out)")
    parser.add_argument("--cache", type=Path, default=None, help="crop cache folder (default WORK_DIR/cache)")
    parser.add_argument("--workers", type=int, default=2, help="processes reading and cropping studies")
    parser.add_argument("--threads", type=int, default=2,
                        help="TensorFlow intra-op threads while training (default 2), fixed so the weights do not "
                             "depend on the machine's cores; 0: TensorFlow's default")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's start-up messages")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N studies (smoke runs)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--force", action="store_true",
                        help="replace the training outputs already in --out (other files there are kept)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--plan", action="store_true",
                        help="train nothing: count fractured/intact studies per vertebra and fold, read the "
                             "headers, print studies, crops, projected cache and disk, and time per epoch here, on a "
                             "T4 and on a P100")
    parser.add_argument("--plan-steps", type=int, default=2,
                        help="with --plan: training steps of the network timed on this machine (0: none)")
    parser.add_argument("--plan-sample", type=int, default=64,
                        help="studies whose headers --plan reads (the rest are extrapolated; default 64)")
    parser.add_argument("--plan-studies", type=int, default=None,
                        help="with --plan: project for this many studies (default: train.csv's), e.g. 2019 from a "
                             "downloaded subset")
    parser.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")


def _command_line() -> str:
    argv = sys.argv[1:]
    if argv and argv[0] == NAME:  # run from the console script (not from a library call / test)
        return "cspine-submit " + " ".join(argv)
    return "cspine-submit train (called from Python)"


def run(args) -> int:
    import shutil

    from cspine_submit.config import ModelConfig
    from cspine_submit import quiet
    from cspine_submit.train import TrainOptions, existing_outputs, train_classifiers
    from cspine_submit.train.fit import TrainingDeviceError
    from cspine_submit.train.run import check_inference_memory, check_trainable, plan_run

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
    if args.plan:
        return _run_plan(args, config)
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
        folds=args.folds, final=args.final, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
        lr_schedule=args.schedule, patience=args.patience, monitor=args.monitor, val_fraction=args.val_fraction,
        seed=args.seed, augment=not args.no_augment, pos_weight=args.pos_weight, balance=args.balance,
        calibrate=not args.no_calibrate, shared=args.shared, box_policy=args.box_policy,
        other_weight=args.other_weight, jit_compile=args.jit_compile, threads=args.threads,
        backbone_weights=str(args.imagenet_weights) if args.imagenet_weights else None,
        workers=args.workers, limit=args.limit, work_dir=str(args.work_dir) if args.work_dir else None,
        cache_dir=str(args.cache) if args.cache else None, trained_on=args.trained_on, source=_command_line(),
    )
    try:  # from train.csv alone, before TensorFlow: a model that would see one class only is refused here
        plan = plan_run(args.data, options)
        check_trainable(plan, options)
        check_inference_memory(config, plan, options)  # the classifiers must fit a Kaggle GPU machine to score
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    quiet.start_tensorflow(args.verbose)
    print(f"training {config.head} classifiers, input {config.input_shape}, channels {config.channels}, "
          f"K={config.slices_per_vertebra}, box policy {options.box_policy}")
    try:
        result = train_classifiers(args.data, args.ranges, args.out, config, options, resume=args.resume,
                                   progress=not args.quiet, log=print)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    except TrainingDeviceError as exc:  # the finished (fold, unit) models are kept: --resume continues
        print(f"error: {exc}\n(finished models are kept in the work folder: fix the cause, then rerun with --resume)")
        return 3
    v = result.validation
    print(f"{'label':<16}{'log loss':>9}{'AUC':>7}   (out of fold, {v['n_studies']} studies)")
    for label, d in v["per_label"].items():
        auc = d.get("auc")
        print(f"{label:<16}{d['log_loss']:>9.4f}{'' if auc is None else f'{auc:>7.3f}'}")
    print(f"competition metric out of fold: {v['oof_score']:.4f} calibrated (cross-fitted), "
          f"{v['oof_score_uncalibrated']:.4f} before calibration; baselines: prior only "
          f"{v['baselines']['prior_only']:.4f}, constant 0.5 {v['baselines']['constant_0.5']:.4f}")
    print(f"wrote {len(result.files)} files to {result.out_dir} in {result.seconds:.0f} s "
          f"(cache, checkpoints, fold models and logs in {result.work_dir})")
    return 0


def _run_plan(args, config) -> int:
    import json

    from cspine_submit import quiet
    from cspine_submit.train.plan import count_labels, format_plan, inference_memory, plan_training

    vertebrae = tuple(v.strip() for v in args.vertebrae.split(",") if v.strip())
    common = dict(folds=args.folds, seed=args.seed, vertebrae=vertebrae, shared=args.shared, final=args.final,
                  limit=args.limit)
    try:
        count_labels(args.data, **common)  # train.csv only: refused here, before TensorFlow loads
        inference_memory(args.data, config, **common)
        quiet.start_tensorflow(args.verbose)
        plan = plan_training(args.data, args.ranges, config, epochs=args.epochs, sample=args.plan_sample,
                             workers=args.workers, studies=args.plan_studies, batch_size=args.batch_size,
                             patience=args.patience, timed_steps=args.plan_steps, **common)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0
