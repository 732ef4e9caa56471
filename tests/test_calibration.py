"""Priors, calibration and pooling fitted to the competition metric, checked against the metric itself."""

import numpy as np
import pytest

from cspine_submit.train import calibration as C
from cspine_submit.config import PREDICTION_TYPES, VERTEBRAE, ModelConfig
from cspine_submit.train.metric import competition_score


def _labels(n, seed=0):
    rng = np.random.default_rng(seed)
    prev = np.array([0.07, 0.14, 0.04, 0.05, 0.08, 0.14, 0.2])
    v = (rng.uniform(size=(n, 7)) < prev).astype(int)
    return {f"s{i:03d}": dict(zip(VERTEBRAE, map(int, v[i])), patient_overall=int(v[i].any())) for i in range(n)}


def _y(labels):
    return np.array([[labels[u][t] for t in PREDICTION_TYPES] for u in sorted(labels)], float)


def test_label_weights_and_priors_by_hand():
    y = np.array([[1, 1, 0, 0, 0, 0, 0, 0], [0] * 8], float)
    v = C.label_weights(y)
    # study 0: weights 14, 2, 1 x 6 -> W = 22; study 1: 7 + 7 = 14
    np.testing.assert_allclose(v[0, :2], [14 / 22, 2 / 22])
    np.testing.assert_allclose(v[1, :2], [7 / 14, 1 / 14])
    pri = C.fit_priors(y)
    assert pri["patient_overall"] == pytest.approx((14 / 22) / (14 / 22 + 7 / 14))
    assert pri["C1"] == pytest.approx((2 / 22) / (2 / 22 + 1 / 14))


def test_metric_priors_beat_the_prevalences_and_are_the_minimum():
    labels = _labels(400)
    y = _y(labels)
    pri = C.fit_priors(y)
    const = lambda d: np.tile([d[t] for t in PREDICTION_TYPES], (len(y), 1))  # noqa: E731
    prevalence = dict(zip(PREDICTION_TYPES, y.mean(axis=0)))
    fitted = competition_score(y, const(pri))
    assert fitted < competition_score(y, const(prevalence))
    for t in PREDICTION_TYPES:  # a nudge either way is worse: it is the minimum
        for d in (-0.01, 0.01):
            assert competition_score(y, const(dict(pri, **{t: pri[t] + d}))) > fitted


def test_calibration_undoes_inflated_odds_out_of_sample():
    """Slice probabilities with odds inflated 20x (class balancing): pooled, cross-fitted calibration repairs them."""
    labels = _labels(300, seed=1)
    rng = np.random.default_rng(2)
    slice_probs = {}
    for u, lab in labels.items():
        d = {}
        for v in VERTEBRAE:
            z = rng.normal(1.5 if lab[v] else -1.5, 1.0, size=15) + np.log(20.0) - 2.5
            d[v] = 1 / (1 + np.exp(-z))
        slice_probs[u] = d
    cfg = ModelConfig(slices_per_vertebra=15, top_k=5)
    uids = sorted(labels)
    y = _y(labels)
    raw = competition_score(y, C.predict_table(slice_probs, uids, cfg))
    groups = {u: i % 5 for i, u in enumerate(uids)}
    fit = lambda tr: C.fit_pooling(slice_probs, labels, tr, cfg)[0]  # noqa: E731
    _, crossed = C.cross_fitted(groups, fit, lambda held, c: C.predict_table(slice_probs, held, c))
    assert all(C.fit_pooling(slice_probs, labels, uids[:30], cfg, inner_folds=0)[0].calibration for _ in [0])
    calibrated = competition_score(y, crossed)
    assert calibrated < raw - 0.05, (raw, calibrated)
    fitted, table = C.fit_pooling(slice_probs, labels, uids, cfg)
    inner, table = table[0]["inner_cv"], table[1:]
    assert inner["fitted"] < inner["starting_uncalibrated"]  # the inner check kept the fit
    assert table[0]["score"] == min(r["score"] for r in table) and fitted.top_k == table[0]["top_k"]
    # The fast pooled table is aggregate_study's pooling.
    table_fast = C.PooledTable(slice_probs, uids[:50], cfg.priors).table(3, 15, "max")
    slow = C.predict_table(slice_probs, uids[:50], cfg.replace(top_k=3, overall_rule="max", clip=(1e-9, 1 - 1e-9)))
    np.testing.assert_allclose(table_fast, slow, atol=1e-12)
    # What inference computes with the fitted config is what the fit scored.
    assert competition_score(y, C.predict_table(slice_probs, uids, fitted)) == pytest.approx(table[0]["score"], abs=1e-4)


def test_logit_affine_fit_recovers_a_known_map():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, 20000)
    truth = 1 / (1 + np.exp(-(0.5 * z - 1.0)))
    y = (rng.uniform(size=z.size) < truth).astype(float)
    a, b = C.fit_logit_affine(1 / (1 + np.exp(-z)), y, np.ones_like(z), prior_studies=0.0)
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(-1.0, abs=0.06)


def test_evaluate_calibrate_shows_before_and_after(tmp_path, capsys):
    import json

    from cspine_submit.cli import main

    labels = _labels(300, seed=4)
    rng = np.random.default_rng(5)
    uids = sorted(labels)
    rows_l = ["StudyInstanceUID," + ",".join(PREDICTION_TYPES)]
    rows_p = list(rows_l)
    for u in uids:
        y = np.array([labels[u][t] for t in PREDICTION_TYPES])
        z = rng.normal(np.where(y > 0, 1.0, -1.0), 1.0) + 2.0  # informative but odds inflated e^2
        rows_l.append(u + "," + ",".join(str(int(v)) for v in y))
        rows_p.append(u + "," + ",".join(f"{1 / (1 + np.exp(-v)):.6f}" for v in z))
    (tmp_path / "labels.csv").write_text("\n".join(rows_l) + "\n")
    (tmp_path / "oof.csv").write_text("\n".join(rows_p) + "\n")
    assert main(["evaluate", "--submission", str(tmp_path / "oof.csv"), "--labels", str(tmp_path / "labels.csv"),
                 "--calibrate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibrated"]["before"] == pytest.approx(out["score"])
    assert out["calibrated"]["after"] < out["calibrated"]["before"] - 0.1


def test_a_calibration_that_does_not_help_out_of_sample_is_not_kept():
    """Uninformative slice probabilities (already at the metric's constants): the inner check keeps the start."""
    labels = _labels(120, seed=6)
    rng = np.random.default_rng(7)
    slice_probs = {u: {v: np.clip(rng.normal(0.1, 0.02, 15), 0.01, 0.99) for v in VERTEBRAE} for u in labels}
    cfg = ModelConfig(slices_per_vertebra=15, top_k=5)
    fitted, table = C.fit_pooling(slice_probs, labels, sorted(labels), cfg)
    inner = table[0]["inner_cv"]
    kept_start = fitted.calibration == {} and fitted.top_k == 5
    assert kept_start == (inner["fitted"] >= inner["starting_uncalibrated"])
