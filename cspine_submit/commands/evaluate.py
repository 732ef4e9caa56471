"""Score a submission against labels with the competition metric.

Predictions may be a submission (row_id, fractured) or wide (StudyInstanceUID plus patient_overall, C1..C7, as a
training run's oof.csv writes them).

Labels may be train.csv-style (StudyInstanceUID plus patient_overall, C1..C7) or long (row_id, fractured, like the
synthetic test_labels.csv). Prints the score (weighted multi-label log loss, lower is better), then per label the
unweighted log loss and the ROC AUC. With --report DIR, also writes one ROC curve PNG per label and metrics.json.
With --calibrate, also the score after a per-label calibration fitted to the metric, cross-fitted over 5 groups of
studies (each study calibrated with parameters fitted on the others): what calibration would gain on these
predictions, e.g. on a training run's oof.csv.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

NAME = "evaluate"
HELP = "score a submission.csv against labels (competition metric, per-label log loss and AUC, ROC PNGs)"
ORDER = 60


def add_arguments(parser) -> None:
    parser.add_argument("--submission", required=True, type=Path,
                        help="predictions: a submission CSV (row_id,fractured) or a wide table with "
                             "StudyInstanceUID,patient_overall,C1..C7 (a training run's oof.csv)")
    parser.add_argument("--labels", required=True, type=Path, help="labels CSV: train.csv-style or row_id,fractured")
    parser.add_argument("--report", type=Path, default=None, help="folder for ROC curve PNGs and metrics.json")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--calibrate", action="store_true",
                        help="also show the score before and after a cross-fitted per-label calibration")


def format_table(result) -> str:
    """Human-readable lines for an :class:`~cspine_submit.train.metric.Evaluation`."""
    lines = [f"score (weighted log loss, lower is better): {result.score:.5f}   studies: {result.n_studies}",
             f"{'label':<16}{'log_loss':>10}{'auc':>8}"]
    for label, d in result.per_label.items():
        auc = "n/a" if math.isnan(d["auc"]) else f"{d['auc']:.3f}"
        lines.append(f"{label:<16}{d['log_loss']:>10.4f}{auc:>8}")
    return "\n".join(lines)


def write_roc_report(submission: Path, labels: Path, folder: Path) -> list[Path]:
    """One ROC PNG per label plus metrics.json in ``folder``; returns the PNG paths."""
    from cspine_submit.train import metric
    from cspine_submit.config import PREDICTION_TYPES

    lab = metric.read_table(labels, "labels")
    pred = metric.read_table(submission, "predictions")
    uids, y, p = metric.align(lab, pred, labels, submission)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [metric.draw_roc_png(y[:, j], p[:, j], folder / f"roc_{t}.png", t) for j, t in enumerate(PREDICTION_TYPES)]
    (folder / "metrics.json").write_text(json.dumps(metric.evaluate_arrays(y, p, uids).to_dict(), indent=2) + "\n")
    return paths


def run(args) -> int:
    from cspine_submit.train import metric

    try:
        result = metric.evaluate_files(args.submission, args.labels)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    out = result.to_dict()
    if args.calibrate:
        out["calibrated"] = calibrated_score(args.submission, args.labels)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(format_table(result))
        if args.calibrate:
            c = out["calibrated"]
            print(f"before calibration {c['before']:.4f}, after a per-label calibration cross-fitted over "
                  f"{c['groups']} groups {c['after']:.4f}")
    if args.report is not None:
        paths = write_roc_report(args.submission, args.labels, args.report)
        if not args.json:
            print(f"ROC curves: {len(paths)} PNGs in {args.report}")
    return 0


def calibrated_score(submission: Path, labels: Path, groups: int = 5, seed: int = 0) -> dict:
    """``{"before", "after", "groups"}``: the metric as submitted, and after a per-label calibration fitted to the
    metric on the other groups of studies (:mod:`cspine_submit.train.calibration`)."""
    import numpy as np

    from cspine_submit.train import calibration

    from cspine_submit.train import metric
    from cspine_submit.config import PREDICTION_TYPES
    from cspine_submit.train.data import assign_folds

    uids, y, p = metric.align(metric.read_table(labels, "labels"), metric.read_table(submission, "predictions"),
                              labels, submission)
    lab = {u: dict(zip(PREDICTION_TYPES, row)) for u, row in zip(uids, y)}
    k = max(2, min(groups, len(uids)))
    fold = assign_folds(lab, k, seed)
    index = {u: i for i, u in enumerate(uids)}

    def fit(train):
        rows = [index[u] for u in train]
        return calibration.fit_calibration(p[rows], y[rows])

    def predict(held, cal):
        return np.clip(calibration.apply_calibration(p[[index[u] for u in held]], cal), metric.EPS, 1 - metric.EPS)

    order, after = calibration.cross_fitted(fold, fit, predict)
    y_sorted = y[[index[u] for u in order]]
    return {"before": metric.competition_score(y, p), "after": metric.competition_score(y_sorted, after), "groups": k}
