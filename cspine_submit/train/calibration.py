"""Probabilities fitted to the competition metric: priors, pooling and a per-label calibration.

The metric (:mod:`cspine_submit.train.metric`) is, per study, ``sum_j w_ij BCE_ij / W_i`` with ``W_i = sum_j w_ij``,
and ``w_ij`` depends on the labels only (1/2 for a vertebra, 7/14 for patient_overall). So for fixed labels the
score is a sum over the 8 labels of a BCE weighted per study by ``w_ij / W_i`` (:func:`label_weights`), and
each label's constant or calibration can be fitted on its own, minimising the metric itself:

- :func:`fit_priors`: the constant per label that minimises the metric, in closed form
  ``sum_i v_ij y_ij / sum_i v_ij`` with ``v = w / W`` (above the prevalence: positives weigh twice);
- :func:`fit_calibration`: ``sigmoid(a * logit(p) + b)`` per label by Newton's method on the weighted BCE
  (a little L2 toward the identity keeps it sane on few studies);
- :func:`fit_pooling`: the slice -> vertebra ``top_k`` and the ``overall_rule`` chosen from a small grid, each
  candidate scored after its own calibration fit.

All of them see pooled probabilities made by :func:`cspine_submit.score.aggregate.aggregate_study` itself, so what is
fitted is what inference computes. :func:`cross_fitted` applies a fit to each group of studies with parameters
fitted on the other groups only: that is the honest out-of-fold score of the whole recipe.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from cspine_submit.score import aggregate
from cspine_submit.config import PREDICTION_TYPES, ModelConfig
from cspine_submit.train.metric import NEGATIVE_WEIGHTS, POSITIVE_WEIGHTS, competition_score

OVERALL_CANDIDATES: tuple[str, ...] = aggregate.OVERALL_RULES
PRIOR_STUDIES = 20.0
"""Strength of the pull of each calibration toward the identity, in studies' worth of evidence: with 60 studies it
matters, with 2000 it hardly does (a fit to a few dozen studies otherwise swings the slope wildly)."""

INNER_FOLDS = 5
"""Folds of the inner cross-validation that decides whether the fitted pooling + calibration beat the starting
config's pooling without calibration on the studies being fitted to."""


def label_weights(y: np.ndarray) -> np.ndarray:
    """``(n, 8)`` per-study weights ``w_ij / W_i`` of each label's BCE in the metric (rows sum to 1)."""
    y = np.asarray(y, dtype=np.float64)
    w = np.where(y > 0.5, POSITIVE_WEIGHTS, NEGATIVE_WEIGHTS)
    return w / w.sum(axis=1, keepdims=True)


def fit_priors(y: np.ndarray, clip: tuple[float, float] = (1e-3, 1 - 1e-3)) -> dict[str, float]:
    """The constant probability per label that minimises the competition metric on labels ``y`` ((n, 8)).

    Returns
    -------
    {type: probability}, clipped to ``clip``
    """
    y = np.asarray(y, dtype=np.float64)
    v = label_weights(y)
    c = (v * y).sum(axis=0) / v.sum(axis=0)
    return {t: float(np.clip(c[j], *clip)) for j, t in enumerate(PREDICTION_TYPES)}


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(q) - np.log1p(-q)


def fit_logit_affine(p: np.ndarray, y: np.ndarray, weight: np.ndarray, prior_studies: float = PRIOR_STUDIES,
                     iterations: int = 50) -> tuple[float, float]:
    """``(a, b)`` minimising ``sum_i weight_i BCE(y_i, sigmoid(a logit(p_i) + b)) + lam ((a-1)^2 + b^2)``.

    Newton's method with backtracking (the objective is convex); ``lam = prior_studies * mean(weight)``: the
    identity is worth ``prior_studies`` studies of evidence.

    Parameters
    ----------
    p, y, weight : (n,) ndarrays
        Probabilities, 0/1 labels, per-study weights (``label_weights`` column).
    """
    z = _logit(p)
    y = np.asarray(y, dtype=np.float64)
    wt = np.asarray(weight, dtype=np.float64)
    lam = prior_studies * (wt.mean() if wt.size else 0.0)
    theta = np.array([1.0, 0.0])
    X = np.stack([z, np.ones_like(z)], axis=1)

    def objective(t):
        m = X @ t
        # BCE with logits, stable: log(1 + e^m) - y m
        return float((wt * (np.logaddexp(0.0, m) - y * m)).sum() + lam * ((t[0] - 1.0) ** 2 + t[1] ** 2))

    f = objective(theta)
    for _ in range(iterations):
        q = 1.0 / (1.0 + np.exp(-(X @ theta)))
        grad = X.T @ (wt * (q - y)) + 2 * lam * (theta - [1.0, 0.0])
        hess = (X * (wt * q * (1 - q))[:, None]).T @ X + 2 * lam * np.eye(2)
        step = np.linalg.solve(hess + 1e-12 * np.eye(2), grad)
        # Backtracking: a full Newton step can overshoot on the flat tails of the logistic loss.
        t = 1.0
        while t > 1e-6 and objective(theta - t * step) > f:
            t *= 0.5
        if t <= 1e-6:
            break
        theta = theta - t * step
        f_new = objective(theta)
        if abs(f - f_new) < 1e-12 * max(abs(f), 1.0):
            break
        f = f_new
    return float(theta[0]), float(theta[1])


def fit_calibration(p: np.ndarray, y: np.ndarray) -> dict[str, tuple[float, float]]:
    """Per-label ``(a, b)`` (see :func:`cspine_submit.score.aggregate.calibrate`) minimising the metric on (n, 8) arrays."""
    v = label_weights(y)
    return {t: fit_logit_affine(p[:, j], y[:, j], v[:, j]) for j, t in enumerate(PREDICTION_TYPES)}


def apply_calibration(p: np.ndarray, calibration: Mapping[str, Sequence[float]]) -> np.ndarray:
    """(n, 8) probabilities with each label's calibration applied (labels without one unchanged)."""
    out = np.array(p, dtype=np.float64, copy=True)
    for j, t in enumerate(PREDICTION_TYPES):
        if t in calibration:
            out[:, j] = aggregate.calibrate(out[:, j], *calibration[t])
    return out


def predict_table(slice_probs: Mapping[str, Mapping[str, np.ndarray]], uids: Sequence[str],
                  config: ModelConfig) -> np.ndarray:
    """(n, 8) probabilities of ``uids`` exactly as inference writes them under ``config`` (a study without slice
    probabilities gets the priors, as a study that cannot be read does)."""
    return np.array([[aggregate.aggregate_study(slice_probs.get(u, {}), config)[0][t] for t in PREDICTION_TYPES]
                     for u in uids], dtype=np.float64).reshape(-1, len(PREDICTION_TYPES))


class PooledTable:
    """Pooled (uncalibrated) vertebra and overall probabilities of many studies for many pooling choices, fast.

    Each vertebra's slice probabilities are sorted once; a ``top_k`` choice is then a cumulative-sum lookup.
    Matches :func:`cspine_submit.score.aggregate.aggregate_study` with an empty calibration (tested).
    """

    def __init__(self, slice_probs: Mapping[str, Mapping[str, np.ndarray]], uids: Sequence[str],
                 priors: Mapping[str, float]):
        self.uids = list(uids)
        self.priors = dict(priors)
        self.cums = [{v: np.cumsum(np.sort(np.asarray(p, np.float64).ravel())[::-1])
                      for v, p in slice_probs.get(u, {}).items() if np.asarray(p).size} for u in self.uids]

    def table(self, top_k: int, slices_per_vertebra: int, overall_rule: str) -> np.ndarray:
        """(n, 8) pooled probabilities, PREDICTION_TYPES order, before calibration and clipping."""
        from cspine_submit.config import VERTEBRAE

        out = np.zeros((len(self.uids), len(PREDICTION_TYPES)))
        for i, cums in enumerate(self.cums):
            vals = []
            for v in VERTEBRAE:
                c = cums.get(v)
                if c is None:
                    vals.append(self.priors[v])
                else:
                    k = aggregate.effective_top_k(top_k, c.size, slices_per_vertebra)
                    vals.append(c[k - 1] / k)
            out[i, 1:] = vals
            out[i, 0] = (self.priors["patient_overall"] if not cums
                         else aggregate.overall_probability(np.array(vals), overall_rule))
        return out


def top_k_candidates(slices_per_vertebra: int) -> list[int]:
    """The k of ``topk_mean`` tried by :func:`fit_pooling`: 1 (max), a few in between, K (mean)."""
    K = int(slices_per_vertebra)
    return sorted({k for k in (1, 2, 3, 5, 8, K // 3, K // 2, K) if 1 <= k <= K})


def fit_pooling(slice_probs: Mapping[str, Mapping[str, np.ndarray]], labels: Mapping[str, Mapping[str, int]],
                uids: Sequence[str], config: ModelConfig, priors: Mapping[str, float] | None = None,
                calibrate: bool = True, inner_folds: int = INNER_FOLDS) -> tuple[ModelConfig, list[dict]]:
    """Pooling (``top_k``, ``overall_rule``) and calibration fitted on ``uids`` by minimising the metric.

    Parameters
    ----------
    slice_probs : {uid: {vertebra: (k,) ndarray}}
        Out-of-fold slice probabilities.
    labels : {uid: {type: 0/1}}
    uids : the studies to fit on
    config : ModelConfig
        The starting config (its aggregation rule ``topk_mean`` is kept; only k and the overall rule vary).
    priors : dict, optional
        Priors for studies without slice probabilities (default: the config's).
    calibrate : bool
        Fit a calibration per candidate (False: compare the pooling candidates uncalibrated).
    inner_folds : int
        The best candidate is kept only if, cross-validated over ``inner_folds`` groups of ``uids``, it scores
        better than the starting config's pooling without calibration; otherwise that is returned (0: no check).

    Returns
    -------
    config : ModelConfig
        With the best ``top_k``, ``overall_rule``, ``calibration`` (and ``priors`` when given).
    candidates : list of dict
        ``{"top_k", "overall_rule", "score"}`` per candidate, in-sample, best first; preceded by
        ``{"inner_cv": {"fitted", "starting_uncalibrated"}}`` when the inner check ran.
    """
    y = np.array([[labels[u][t] for t in PREDICTION_TYPES] for u in uids], dtype=np.float64).reshape(-1, 8)
    pooled = PooledTable(slice_probs, uids, priors or config.priors)
    rows = []
    for k in top_k_candidates(config.slices_per_vertebra):
        for rule in OVERALL_CANDIDATES:
            p = pooled.table(k, config.slices_per_vertebra, rule)
            cal = fit_calibration(p, y) if calibrate else {}
            score = competition_score(y, np.clip(apply_calibration(p, cal), *config.clip))
            rows.append({"top_k": k, "overall_rule": rule, "score": score, "calibration": cal})
    rows.sort(key=lambda r: r["score"])
    best = rows[0]
    fitted = config.replace(aggregation="topk_mean", top_k=best["top_k"], overall_rule=best["overall_rule"],
                            calibration=best["calibration"], priors=dict(priors or config.priors))
    table = [{k: r[k] for k in ("top_k", "overall_rule", "score")} for r in rows]
    if calibrate and inner_folds >= 2 and len(uids) >= 2 * inner_folds:
        # Keep the fit only if it beats the starting pooling, uncalibrated, on studies it was not fitted to.
        starting = config.replace(calibration={}, priors=dict(priors or config.priors))
        lab = {u: labels[u] for u in uids}
        groups = _inner_groups(lab, inner_folds)
        fit_inner = lambda tr: fit_pooling(slice_probs, labels, tr, config, priors, True, inner_folds=0)[0]  # noqa: E731
        order, p_fit = cross_fitted(groups, fit_inner, lambda held, c: predict_table(slice_probs, held, c))
        y_ord = np.array([[labels[u][t] for t in PREDICTION_TYPES] for u in order], dtype=np.float64)
        fitted_cv = competition_score(y_ord, p_fit)
        starting_cv = competition_score(y_ord, predict_table(slice_probs, order, starting))
        table.insert(0, {"inner_cv": {"fitted": fitted_cv, "starting_uncalibrated": starting_cv}})
        if fitted_cv >= starting_cv:
            return starting, table
    return fitted, table


def _inner_groups(labels: Mapping[str, Mapping[str, int]], k: int) -> dict[str, int]:
    """Deterministic groups for the inner cross-validation, dealt in sorted order within label strata."""
    uids = sorted(labels, key=lambda u: (sum(int(labels[u].get(t, 0)) for t in PREDICTION_TYPES[1:]), u))
    return {u: i % k for i, u in enumerate(uids)}


def cross_fitted(groups: Mapping[str, int], fit: Callable[[list[str]], ModelConfig],
                 predict: Callable[[list[str], ModelConfig], np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Predictions for every study from parameters fitted without its group.

    Parameters
    ----------
    groups : {uid: group}
        E.g. the cross-validation folds.
    fit : callable(train_uids) -> ModelConfig
    predict : callable(uids, config) -> (n, 8) ndarray

    Returns
    -------
    uids : sorted list
    p : (n, 8) ndarray, row i predicted with parameters that never saw study i
    """
    uids = sorted(groups)
    out = np.zeros((len(uids), len(PREDICTION_TYPES)))
    index = {u: i for i, u in enumerate(uids)}
    for g in sorted(set(groups.values())):
        held = [u for u in uids if groups[u] == g]
        rest = [u for u in uids if groups[u] != g]
        cfg = fit(rest)
        out[[index[u] for u in held]] = predict(held, cfg)
    return uids, out
