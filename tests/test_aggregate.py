"""Slice -> vertebra -> overall aggregation, clipping and priors, with hand-computed values."""

import numpy as np
import pytest

from cspine_submit import aggregate
from cspine_submit.config import PREDICTION_TYPES, VERTEBRAE, ModelConfig


def test_pool_slices_rules():
    p = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    assert aggregate.pool_slices(p, "topk_mean", 2) == pytest.approx(0.8)
    assert aggregate.pool_slices(p, "topk_mean", 3) == pytest.approx((0.9 + 0.7 + 0.5) / 3)
    assert aggregate.pool_slices(p, "topk_mean", 50) == pytest.approx(0.5)  # k larger than the slices: all
    assert aggregate.pool_slices(p, "mean", 3) == pytest.approx(0.5)
    assert aggregate.pool_slices(p, "max", 3) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="topk_mean"):
        aggregate.pool_slices(p, "median", 3)
    with pytest.raises(ValueError):
        aggregate.pool_slices(np.array([]), "mean", 3)


def test_overall_noisy_or_by_hand():
    p = np.array([0.5, 0.2, 0.0, 0.0, 0.0, 0.0, 0.1])
    # 1 - 0.5 * 0.8 * 0.9 = 0.64
    assert aggregate.overall_probability(p, "noisy_or") == pytest.approx(0.64)
    assert aggregate.overall_probability(p, "max") == pytest.approx(0.5)


def test_aggregate_study_clips_and_uses_priors_for_missing():
    cfg = ModelConfig(top_k=2, clip=(0.01, 0.99))
    slices = {v: np.array([0.0, 0.0, 0.0]) for v in VERTEBRAE}
    slices["C2"] = np.array([1.0, 1.0, 0.2])
    del slices["C7"]
    probs, from_prior = aggregate.aggregate_study(slices, cfg)
    assert list(probs) == list(PREDICTION_TYPES)
    assert from_prior == ["C7"]
    assert probs["C1"] == 0.01  # clipped from 0
    assert probs["C2"] == 0.99  # clipped from 1
    assert probs["C7"] == pytest.approx(0.195)  # train prevalence prior
    # overall: noisy-OR of the unclipped vertebra values: C2 = 1 -> 1 -> clipped 0.99
    assert probs["patient_overall"] == 0.99


def test_aggregate_overall_from_vertebrae():
    cfg = ModelConfig(top_k=1, clip=(0.001, 0.999))
    slices = {v: np.array([0.1]) for v in VERTEBRAE}
    probs, from_prior = aggregate.aggregate_study(slices, cfg)
    assert from_prior == []
    assert probs["patient_overall"] == pytest.approx(1 - 0.9**7)


def test_all_missing_gives_exactly_the_priors():
    cfg = ModelConfig()
    probs, from_prior = aggregate.aggregate_study({}, cfg)
    assert from_prior == list(VERTEBRAE)
    assert probs == aggregate.prior_probabilities(cfg)
    assert probs["patient_overall"] == pytest.approx(0.476)


def test_priors_must_be_complete():
    cfg = ModelConfig(priors={"patient_overall": 0.5})
    with pytest.raises(ValueError, match="C1"):
        aggregate.prior_probabilities(cfg)


def test_non_finite_slice_probabilities_raise_instead_of_writing_nan():
    # min/max clipping keeps a NaN, and submission_text then refuses the whole file: the study must fail here.
    cfg = ModelConfig()
    slices = {v: np.array([0.2, 0.3]) for v in VERTEBRAE}
    slices["C4"] = np.array([0.2, np.nan])
    with pytest.raises(ValueError, match="C4: non-finite"):
        aggregate.aggregate_study(slices, cfg)
    slices["C4"] = np.array([np.inf])
    with pytest.raises(ValueError, match="C4"):
        aggregate.aggregate_study(slices, cfg)
