"""Slice probabilities -> vertebra probabilities -> patient_overall; priors; clipping.

The rules and constants come from :class:`~cspine_submit.config.ModelConfig` (``aggregation``, ``top_k``,
``overall_rule``, ``calibration``, ``clip``, ``priors``); nothing here has its own constants.

Order, per study: slices -> pooled vertebra probability (``top_k`` scaled to the slices actually scored) ->
``patient_overall`` by ``overall_rule`` from the pooled vertebrae -> each of the 8 calibrated by its
``calibration[label] = (a, b)`` -> clipped. Training fits pooling and calibration on out-of-fold predictions
(:mod:`cspine_submit.train.calibration`) through this very function, so what it fits is what inference does.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from cspine_submit.config import PREDICTION_TYPES, VERTEBRAE, ModelConfig

AGGREGATIONS: tuple[str, ...] = ("topk_mean", "mean", "max")
"""Slice -> vertebra rules."""

OVERALL_RULES: tuple[str, ...] = ("noisy_or", "max")
"""Vertebrae -> patient_overall rules."""


def pool_slices(probs: np.ndarray, rule: str = "topk_mean", top_k: int = 5) -> float:
    """One vertebra's probability from its slice probabilities.

    Parameters
    ----------
    probs : (k,) ndarray of float
        Probability of a fracture on each sampled slice of the vertebra (k >= 1).
    rule : str
        ``topk_mean``: mean of the ``min(top_k, k)`` highest; ``mean``; ``max``.
    top_k : int

    Returns
    -------
    float
    """
    probs = np.asarray(probs, dtype=np.float64).ravel()
    if probs.size == 0:
        raise ValueError("pool_slices: no slice probabilities")
    if rule == "topk_mean":
        k = max(1, min(int(top_k), probs.size))
        return float(np.sort(probs)[-k:].mean())
    if rule == "mean":
        return float(probs.mean())
    if rule == "max":
        return float(probs.max())
    raise ValueError(f"aggregation={rule!r}: expected one of {list(AGGREGATIONS)}")


def effective_top_k(top_k: int, n_slices: int, slices_per_vertebra: int) -> int:
    """The k of ``topk_mean`` for a vertebra scored on ``n_slices`` slices when ``top_k`` was set for
    ``slices_per_vertebra``: the same share, ``round(top_k * n / K)``, between 1 and ``n_slices``.

    The time budget lowers K mid-run; mean-of-top-5 of 6 slices would be a near-mean, not the top third it
    was fitted as.
    """
    n = max(int(n_slices), 1)
    k = int(np.floor(top_k * n / max(int(slices_per_vertebra), 1) + 0.5))
    return int(min(max(k, 1), n))


def calibrate(p, a: float, b: float):
    """``sigmoid(a * logit(p) + b)``, with ``p`` kept inside [1e-7, 1 - 1e-7] so the logit is finite.

    Parameters
    ----------
    p : float or ndarray of float
    a, b : float
        Slope and offset on the logit scale (``(1, 0)`` is the identity).
    """
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1.0 - 1e-7)
    z = a * (np.log(q) - np.log1p(-q)) + b
    out = 1.0 / (1.0 + np.exp(-z))
    return float(out) if np.ndim(out) == 0 else out


def overall_probability(vertebra_probs: np.ndarray, rule: str = "noisy_or") -> float:
    """patient_overall from the seven vertebra probabilities.

    Parameters
    ----------
    vertebra_probs : (7,) ndarray of float
        C1 ... C7.
    rule : str
        ``noisy_or``: ``1 - prod(1 - p_k)`` (a fracture anywhere, vertebrae treated as independent); ``max``.
    """
    p = np.asarray(vertebra_probs, dtype=np.float64).ravel()
    if rule == "noisy_or":
        return float(1.0 - np.prod(1.0 - p))
    if rule == "max":
        return float(p.max())
    raise ValueError(f"overall_rule={rule!r}: expected one of {list(OVERALL_RULES)}")


def clip_probability(p: float, clip: tuple[float, float]) -> float:
    """Clip into ``[clip[0], clip[1]]`` so that no row costs an unbounded loss."""
    return float(min(max(float(p), clip[0]), clip[1]))


def prior_probabilities(config: ModelConfig) -> dict[str, float]:
    """The 8 fallback probabilities (config priors, clipped), in PREDICTION_TYPES order.

    A type missing from ``config.priors`` is an error: the fallback must always be complete.
    """
    missing = [t for t in PREDICTION_TYPES if t not in config.priors]
    if missing:
        raise ValueError(f"model config priors lack {missing}")
    return {t: clip_probability(config.priors[t], config.clip) for t in PREDICTION_TYPES}


def aggregate_study(slice_probs: Mapping[str, np.ndarray], config: ModelConfig) -> tuple[dict[str, float], list[str]]:
    """The 8 probabilities of one study from the slice probabilities of its vertebrae.

    Parameters
    ----------
    slice_probs : dict
        ``{vertebra: (k,) ndarray}``; a vertebra that is absent (no classifier, or nothing to score) takes its prior.
    config : ModelConfig

    Returns
    -------
    probs : dict
        ``{type: probability}`` for the 8 PREDICTION_TYPES, clipped to ``config.clip``.
    from_prior : list of str
        The vertebrae that took their prior.

    Raises
    ------
    ValueError
        A slice probability is NaN or infinite (a diverged model, a float16 overflow): clipping would keep the NaN
        and the submission could not be written, so the caller falls back for this study instead.
    """
    priors = prior_probabilities(config)
    out: dict[str, float] = {}
    from_prior: list[str] = []
    for v in VERTEBRAE:
        probs = slice_probs.get(v)
        if probs is None or np.asarray(probs).size == 0:
            out[v] = priors[v]
            from_prior.append(v)
        else:
            if not np.isfinite(np.asarray(probs, dtype=np.float64)).all():
                raise ValueError(f"{v}: non-finite slice probabilities {np.asarray(probs).ravel().tolist()[:8]}")
            k = effective_top_k(config.top_k, np.asarray(probs).size, config.slices_per_vertebra)
            out[v] = pool_slices(probs, config.aggregation, k)
    if len(from_prior) == len(VERTEBRAE):
        # Nothing was scored: the learned overall prior beats noisy-OR of seven priors (which would be ~0.55).
        overall = priors["patient_overall"]
    else:
        overall = overall_probability(np.array([out[v] for v in VERTEBRAE]), config.overall_rule)
    out["patient_overall"] = overall
    scored = set(PREDICTION_TYPES) - set(from_prior) - ({"patient_overall"} if len(from_prior) == len(VERTEBRAE) else set())
    result = {}
    for t in PREDICTION_TYPES:
        p = out[t]
        if t in scored and t in config.calibration:  # a prior is already fitted to the metric: never recalibrated
            p = calibrate(p, *config.calibration[t])
        result[t] = clip_probability(p, config.clip)
    return result, from_prior
