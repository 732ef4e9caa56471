#!/usr/bin/env bash
# Regenerate the demo weights (weights/demo) from scratch, exactly as committed: the synthetic training set, the
# slice ranges learned from its masks, the cross-validated tiny classifiers, then the golden output and manifests.
# Run from the repository root: bash weights/demo/regenerate.sh [WORK]   (WORK defaults to /tmp/cspine_demo)
# Takes about 20 minutes on 2 CPU cores. Re-run it after a change of the synthetic generator, the crop geometry,
# the localization defaults or the training recipe; `cspine-submit check` must pass afterwards.
set -euo pipefail
WORK="${1:-/tmp/cspine_demo}"
rm -rf "$WORK/data" "$WORK/work" "$WORK/slice_ranges.json"
cspine-submit synth "$WORK/data" --studies 72 --test 12 --seed 2022 --params weights/demo/synthetic_params.json --quiet
cspine-submit learn-ranges --segmentations "$WORK/data/segmentations" --images "$WORK/data/train_images" \
    --out "$WORK/slice_ranges.json" \
    --source "synthetic demo set: cspine-submit synth WORK/data --studies 72 --test 12 --seed 2022 --params weights/demo/synthetic_params.json"
cspine-submit train --data "$WORK/data" --ranges "$WORK/slice_ranges.json" --out weights/demo --work-dir "$WORK/work" \
    --head tiny --input-size 64 --channels single --windows "400/1800" --shared --lr 1e-3 --epochs 10 --folds 5 \
    --trained-on synthetic --quiet --force
cspine-submit check --write-golden
cspine-submit check --weights weights/demo --write-manifest
cspine-submit check --write-manifest
cspine-submit check
