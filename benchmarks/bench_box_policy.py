"""Which crops of a fractured vertebra count as positives? Train the same tiny shared model under each box policy.

    python benchmarks/bench_box_policy.py --data /tmp/cspine_demo/data --ranges /tmp/cspine_demo/slice_ranges.json \
        --cache /tmp/cspine_demo/cache --epochs 8

Prints, per policy, the held-out vertebra-level AUC (slice probabilities pooled as inference pools them) per
vertebra, the held-out competition metric (calibrated, cross-fitted) and the training time. One split (1/3 held
out), same seed, config and fixed schedule for every policy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--ranges", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--policies", default="exclude,downweight,study")
    args = parser.parse_args()

    from cspine_submit.config import VERTEBRAE, ModelConfig
    from cspine_submit.train import TrainOptions, train_classifiers

    config = ModelConfig(head="tiny", input_size=args.input_size, channels="single", windows=((400.0, 1800.0),))
    rows = []
    for policy in args.policies.split(","):
        options = TrainOptions(folds=1, epochs=args.epochs, learning_rate=1e-3, shared=True, seed=0,
                               box_policy=policy, trained_on="synthetic",
                               cache_dir=str(args.cache) if args.cache else None)
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            options = dataclasses.replace(options, work_dir=str(Path(out) / "work"))
            result = train_classifiers(args.data, args.ranges, Path(out) / "w", config, options, progress=False)
            seconds = time.perf_counter() - t0
        per = result.validation["per_vertebra"]
        rows.append((policy, [per.get(v, {}).get("auc", float("nan")) for v in VERTEBRAE],
                     result.validation["oof_score"], seconds))
    print(f"{'policy':<11}" + "".join(f"{v:>6}" for v in VERTEBRAE) + f"{'metric':>8}{'seconds':>9}")
    for policy, aucs, pooled, seconds in rows:
        print(f"{policy:<11}" + "".join(f"{a:>6.2f}" for a in aucs) + f"{pooled:>8.3f}{seconds:>9.0f}")


if __name__ == "__main__":
    main()
