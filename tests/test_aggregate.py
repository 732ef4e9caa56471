"""Slice -> vertebra -> overall aggregation, clipping and priors, with hand-computed values."""

import numpy as np
import pytest

from cspine_submit.score import aggregate
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
    assert probs["C7"] == pytest.approx(0.256)  # its default prior (config.METRIC_PRIORS)
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
    assert probs["patient_overall"] == pytest.approx(0.531)  # the metric-minimising constant (config.METRIC_PRIORS)


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


def test_top_k_keeps_its_share_when_the_time_budget_lowers_k():
    # top 5 of 15 is the top third: of 6 slices the top 2, of 3 the top 1; never 0, never more than there are.
    assert aggregate.effective_top_k(5, 15, 15) == 5
    assert aggregate.effective_top_k(5, 6, 15) == 2
    assert aggregate.effective_top_k(5, 3, 15) == 1
    assert aggregate.effective_top_k(5, 1, 15) == 1
    assert aggregate.effective_top_k(15, 4, 15) == 4
    cfg = ModelConfig(top_k=5, slices_per_vertebra=15, overall_rule="max")
    slices = {v: np.array([0.9, 0.6, 0.3, 0.1, 0.0, 0.0]) for v in VERTEBRAE}
    probs, _ = aggregate.aggregate_study(slices, cfg)
    assert probs["C3"] == pytest.approx(0.75)  # mean of the top 2 of 6, not of the top 5


def test_calibration_is_a_logit_affine_map_applied_after_pooling():
    assert aggregate.calibrate(0.3, 1.0, 0.0) == pytest.approx(0.3)
    # logit(0.5) = 0 -> sigmoid(b)
    assert aggregate.calibrate(0.5, 3.0, np.log(3.0)) == pytest.approx(0.75)
    # logit(0.2) = -log 4; a = 2 -> -log 16 -> 1/17
    assert aggregate.calibrate(0.2, 2.0, 0.0) == pytest.approx(1 / 17)
    cal = {"C1": (2.0, 0.0), "patient_overall": (1.0, np.log(3.0))}
    cfg = ModelConfig(top_k=1, slices_per_vertebra=1, calibration=cal, overall_rule="max")
    slices = {v: np.array([0.2]) for v in VERTEBRAE}
    slices["C2"] = np.array([0.5])
    probs, _ = aggregate.aggregate_study(slices, cfg)
    assert probs["C1"] == pytest.approx(1 / 17)
    assert probs["C3"] == pytest.approx(0.2)  # no calibration for C3: as pooled
    # overall from the POOLED vertebrae (max = C2's 0.5), then its own calibration: odds x 3 -> 0.75
    assert probs["patient_overall"] == pytest.approx(0.75)
    # A vertebra that took its prior is not recalibrated (priors are fitted to the metric already).
    del slices["C1"]
    probs, from_prior = aggregate.aggregate_study(slices, cfg)
    assert from_prior == ["C1"] and probs["C1"] == pytest.approx(cfg.priors["C1"])


def test_calibration_round_trips_through_json(tmp_path):
    cfg = ModelConfig(calibration={"C1": [1.5, -0.5]}, classifier_files={v: [f"{v}.f0.keras", f"{v}.f1.keras"]
                                                                        for v in VERTEBRAE})
    back = ModelConfig.from_json(cfg.to_json(tmp_path / "m.json"))
    assert back == cfg and back.calibration["C1"] == (1.5, -0.5)
    assert back.classifier_paths("C2") == ("C2.f0.keras", "C2.f1.keras")
    assert ModelConfig().classifier_paths("C2") == ("C2.keras",)
    with pytest.raises(ValueError, match="calibration"):
        ModelConfig(calibration={"C8": (1.0, 0.0)})
