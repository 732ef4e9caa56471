"""The competition metric: weighted multi-label log loss, plus per-label log loss and ROC AUC.

Per study, 8 labels (``patient_overall``, ``C1`` ... ``C7``). Weights: C1-C7 negative 1, positive 2;
patient_overall negative 7, positive 14. Per study the loss is ``sum_j w_j * BCE_j / sum_j w_j`` with the
predictions clipped to ``[1e-15, 1 - 1e-15]``; the score is the mean over studies (lower is better).

The pure functions work on ``(n_studies, 8)`` arrays in :data:`~cspine_submit.config.PREDICTION_TYPES` order;
:func:`read_table` reads a CSV file (train.csv-style wide or ``row_id,fractured`` long) and :func:`align` turns
labels and predictions into such arrays; :func:`evaluate_files` does both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cspine_submit.config import PREDICTION_TYPES

EPS = 1e-15
"""Predictions are clipped to [EPS, 1 - EPS], as the competition's scorer does."""

NEGATIVE_WEIGHTS = np.array([7.0] + [1.0] * 7)
"""Weight of a negative label, in PREDICTION_TYPES order."""

POSITIVE_WEIGHTS = 2.0 * NEGATIVE_WEIGHTS
"""Weight of a positive label, in PREDICTION_TYPES order (twice the negative weight)."""


def binary_cross_entropy(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Element-wise BCE in nats, with ``p`` clipped to [EPS, 1 - EPS].

    Parameters
    ----------
    y : ndarray of {0, 1}
    p : ndarray of float, same shape, probabilities of the positive class
    """
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    y = np.asarray(y, dtype=np.float64)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


def study_losses(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Weighted log loss of each study.

    Parameters
    ----------
    y : (n, 8) ndarray of {0, 1}
        Truth, columns in PREDICTION_TYPES order.
    p : (n, 8) ndarray of float
        Predicted probabilities, same order.

    Returns
    -------
    (n,) ndarray of float64
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(PREDICTION_TYPES):
        raise ValueError(f"expected two (n, 8) arrays, got {y.shape} and {p.shape}")
    w = np.where(y > 0.5, POSITIVE_WEIGHTS, NEGATIVE_WEIGHTS)
    return (w * binary_cross_entropy(y, p)).sum(axis=1) / w.sum(axis=1)


def competition_score(y: np.ndarray, p: np.ndarray) -> float:
    """The competition score: mean over studies of :func:`study_losses`."""
    return float(study_losses(y, p).mean())


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN when only one class is present.

    Parameters
    ----------
    y : (n,) ndarray of {0, 1}
    p : (n,) ndarray of float
    """
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    sorted_p = p[order]
    ranks = np.empty(len(p), dtype=np.float64)
    # Mid-ranks: tied predictions share the mean of the ranks they span.
    start = 0
    while start < len(p):
        stop = start
        while stop + 1 < len(p) and sorted_p[stop + 1] == sorted_p[start]:
            stop += 1
        ranks[order[start : stop + 1]] = 0.5 * (start + stop) + 1.0
        start = stop + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC points (false positive rate, true positive rate), from (0, 0) to (1, 1), one point per distinct threshold.

    Returns
    -------
    fpr, tpr : (m,) ndarray of float64
    """
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(-p, kind="mergesort")
    y_sorted, p_sorted = y[order], p[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    last_of_tie = np.r_[p_sorted[1:] != p_sorted[:-1], True]
    tp, fp = tp[last_of_tie], fp[last_of_tie]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


@dataclass(frozen=True)
class Evaluation:
    """Result of :func:`evaluate`.

    Attributes
    ----------
    score : float
        Competition score (weighted log loss, lower is better).
    per_label : dict
        ``{label: {"log_loss": unweighted mean BCE over studies, "auc": ROC AUC or NaN}}``.
    n_studies : int
    study_uids : tuple of str
    """

    score: float
    per_label: dict
    n_studies: int
    study_uids: tuple

    def to_dict(self) -> dict:
        """JSON-ready ``{"score": .., "per_label": {label: {"log_loss": .., "auc": ..}}, "n_studies": ..}``;
        NaN AUCs become None."""
        per_label = {
            k: {m: (None if isinstance(v, float) and np.isnan(v) else v) for m, v in d.items()}
            for k, d in self.per_label.items()
        }
        return {"score": self.score, "per_label": per_label, "n_studies": self.n_studies}


def evaluate_arrays(y: np.ndarray, p: np.ndarray, study_uids=()) -> Evaluation:
    """Score, per-label log loss and AUC from (n, 8) arrays in PREDICTION_TYPES order."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    score = competition_score(y, p)
    bce = binary_cross_entropy(y, p)
    per_label = {
        label: {"log_loss": float(bce[:, j].mean()), "auc": roc_auc(y[:, j], p[:, j])}
        for j, label in enumerate(PREDICTION_TYPES)
    }
    return Evaluation(score=score, per_label=per_label, n_studies=len(y), study_uids=tuple(study_uids))


# ---------------------------------------------------------------------------------------------------------------
# CSV IO


def split_row_id(row_id: str) -> tuple[str, str]:
    """``"<uid>_<type>"`` -> ``(uid, type)``; raises ValueError for an unknown type."""
    uid, _, kind = str(row_id).rpartition("_")
    if kind == "overall" and uid.endswith("_patient"):
        uid, kind = uid[: -len("_patient")], "patient_overall"
    if not uid or kind not in PREDICTION_TYPES:
        raise ValueError(f"row_id {row_id!r}: expected '<StudyInstanceUID>_<type>' with type in {list(PREDICTION_TYPES)}")
    return uid, kind


def _long_to_table(df, value_column: str, path) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for row_id, value in zip(df["row_id"], df[value_column]):
        try:
            uid, kind = split_row_id(row_id)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        table.setdefault(uid, {})[kind] = float(value)
    return table


def read_table(path: str | Path, kind: str) -> dict[str, dict[str, float]]:
    """Read labels or predictions into ``{uid: {type: value}}``.

    Parameters
    ----------
    path : path of a CSV, either wide (``StudyInstanceUID`` plus some of the 8 label columns, like train.csv)
        or long (``row_id`` plus ``fractured``, like submission.csv / test_labels.csv).
    kind : "labels" or "predictions" (used in error messages only)
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({kind})")
    df = pd.read_csv(path)
    if {"row_id", "fractured"} <= set(df.columns):
        return _long_to_table(df, "fractured", path)
    if "StudyInstanceUID" in df.columns and any(t in df.columns for t in PREDICTION_TYPES):
        cols = [t for t in PREDICTION_TYPES if t in df.columns]
        return {str(r["StudyInstanceUID"]): {t: float(r[t]) for t in cols} for _, r in df.iterrows()}
    raise ValueError(
        f"{path}: {kind} CSV must have columns 'row_id,fractured' or 'StudyInstanceUID' plus "
        f"{list(PREDICTION_TYPES)}; found {list(df.columns)}"
    )


def align(labels: dict, predictions: dict, labels_path="labels", predictions_path="submission"):
    """Arrays for the studies that have labels.

    Every labelled study must have all 8 labels and all 8 predictions; otherwise ValueError naming what is missing
    (the first few row_ids). Predictions for unlabelled studies are ignored.

    Returns
    -------
    uids : list of str (sorted)
    y, p : (n, 8) ndarray of float64
    """
    uids = sorted(labels)
    missing_labels = [f"{u}_{t}" for u in uids for t in PREDICTION_TYPES if t not in labels[u]]
    if missing_labels:
        raise ValueError(
            f"{labels_path}: {len(missing_labels)} label(s) missing, e.g. {missing_labels[:3]}; every study needs all 8"
        )
    missing = [f"{u}_{t}" for u in uids for t in PREDICTION_TYPES if t not in predictions.get(u, {})]
    if missing:
        raise ValueError(f"{predictions_path}: {len(missing)} prediction(s) missing, e.g. {missing[:3]}")
    y = np.array([[labels[u][t] for t in PREDICTION_TYPES] for u in uids], dtype=np.float64).reshape(-1, 8)
    p = np.array([[predictions[u][t] for t in PREDICTION_TYPES] for u in uids], dtype=np.float64).reshape(-1, 8)
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"{labels_path}: labels must be 0 or 1")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"{predictions_path}: predictions must be finite probabilities in [0, 1]")
    return uids, y, p


def evaluate_files(submission: str | Path, labels: str | Path) -> Evaluation:
    """Score a submission CSV against a labels CSV (wide or long)."""
    lab = read_table(labels, "labels")
    pred = read_table(submission, "predictions")
    uids, y, p = align(lab, pred, labels, submission)
    if not uids:
        raise ValueError(f"{labels}: no labelled studies")
    return evaluate_arrays(y, p, uids)


def roc_empty_reason(positives: int, negatives: int) -> str:
    """Why a label has no ROC curve (two lines for the picture): it needs at least one of each class."""
    if positives == 0 and negatives == 0:
        return "no curve: no studies\nwith this label"
    missing = "positive (fractured)" if positives == 0 else "negative (intact)"
    return f"no curve: no {missing} study\n({positives} positive, {negatives} negative)"


def draw_roc_png(y: np.ndarray, p: np.ndarray, path: str | Path, title: str, size: int = 400) -> Path:
    """Draw one ROC curve as a PNG with cv2 (white background, diagonal, curve, title with AUC); a label without
    positives or without negatives gets the reason written on its empty axes instead of a curve."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((size, size, 3), 255, np.uint8)
    m = 40  # margin, pixels
    side = size - 2 * m

    def px(fx: float, fy: float) -> tuple[int, int]:
        return int(round(m + fx * side)), int(round(size - m - fy * side))

    cv2.rectangle(img, px(0, 1), px(1, 0), (0, 0, 0), 1)
    cv2.line(img, px(0, 0), px(1, 1), (180, 180, 180), 1, cv2.LINE_AA)
    auc = roc_auc(y, p)
    if not np.isnan(auc):
        fpr, tpr = roc_curve(y, p)
        pts = np.array([px(a, b) for a, b in zip(fpr, tpr)], np.int32).reshape(-1, 1, 2)
        cv2.polylines(img, [pts], False, (200, 80, 0), 2, cv2.LINE_AA)
    text = f"{title}  AUC={'n/a' if np.isnan(auc) else f'{auc:.3f}'}"
    cv2.putText(img, text, (m, m - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    if np.isnan(auc):  # say why the axes are empty: an ROC curve needs both classes
        yb = np.asarray(y) > 0.5
        for i, line in enumerate(roc_empty_reason(int(yb.sum()), int((~yb).sum())).split("\n")):
            cv2.putText(img, line, (m + 10, m + 40 + 22 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 200), 1,
                        cv2.LINE_AA)
    for label, (x, y) in (("0", px(0, 0)), ("1", px(1, 0)), ("1", px(0, 1))):
        dx, dy = (-14, 4) if (x, y) == px(0, 1) else (-4, 16)
        cv2.putText(img, label, (x + dx, y + dy), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "FPR", (size // 2 - 12, size - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "TPR", (4, size // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"{path}: could not write PNG")
    return path
