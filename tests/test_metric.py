"""The competition metric against hand-computed values, including predictions of exactly 0 and 1."""

import json
import math

import numpy as np
import pytest

from cspine_submit.train import metric
from cspine_submit.config import PREDICTION_TYPES


def test_constant_half_scores_ln2():
    y = np.array([[0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 1]])
    p = np.full((2, 8), 0.5)
    assert metric.competition_score(y, p) == pytest.approx(math.log(2), abs=1e-12)


def test_weights_by_hand():
    # Study: overall and C1 positive, the rest negative. Weights 14, 2, 1 x 6 -> sum 22.
    y = np.array([[1, 1, 0, 0, 0, 0, 0, 0]])
    p = np.array([[0.8, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    # -ln 0.8 = 0.2231435513, -ln 0.5 = 0.6931471806, -ln 0.9 = 0.1053605157
    expected = (14 * 0.2231435513 + 2 * 0.6931471806 + 6 * 0.1053605157) / 22  # = 0.2337485...
    assert metric.competition_score(y, p) == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(0.2337485, abs=1e-7)


def test_negative_study_weights_by_hand():
    # All negative: weights 7, 1 x 7 -> sum 14; overall predicted 0.3, vertebrae 0.2.
    y = np.zeros((1, 8))
    p = np.array([[0.3] + [0.2] * 7])
    expected = (7 * -math.log(0.7) + 7 * -math.log(0.8)) / 14
    assert metric.competition_score(y, p) == pytest.approx(expected, abs=1e-12)


def test_mean_over_studies():
    y = np.array([[0] * 8, [1] * 8])
    p = np.full((2, 8), 0.9)
    # study 1: -ln 0.1 = 2.302585093; study 2: -ln 0.9 = 0.105360516 (all weights doubled, ratio unchanged)
    assert metric.study_losses(y, p) == pytest.approx([2.302585093, 0.105360516], abs=1e-9)
    assert metric.competition_score(y, p) == pytest.approx((2.302585093 + 0.105360516) / 2, abs=1e-9)


def test_exact_zero_and_one_predictions_are_clipped_to_1e15():
    y = np.array([[1, 0, 0, 0, 0, 0, 0, 0]])
    # overall positive predicted exactly 0: BCE = -ln(1e-15) = 34.538776394910684; the rest perfectly right.
    p = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert metric.competition_score(y, p) == pytest.approx(14 * 34.538776394910684 / 21, rel=1e-12)
    # Exactly right with exactly 0 and 1: the loss is -ln(1 - 1e-15) ~ 1.1e-15, finite and ~0.
    p_right = y.astype(float)
    s = metric.competition_score(y, p_right)
    assert 0.0 <= s < 1e-14
    # Wrong with exactly 1 on a negative label.
    y_neg = np.zeros((1, 8))
    # 1 - (1 - 1e-15) is 9.992e-16 in float64, so the loss is -ln(9.992e-16) = 34.5396, not exactly -ln(1e-15).
    assert metric.competition_score(y_neg, np.ones((1, 8))) == pytest.approx(34.538776394910684, rel=1e-4)
    assert np.isfinite(metric.competition_score(y_neg, np.ones((1, 8))))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        metric.competition_score(np.zeros((2, 7)), np.zeros((2, 7)))


def test_auc_by_hand_with_ties():
    # Positives 0.35, 0.8; negatives 0.1, 0.4: pairs won 3 of 4.
    assert metric.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # A tie between a positive and a negative counts one half.
    assert metric.roc_auc([0, 1, 1], [0.5, 0.5, 0.9]) == pytest.approx(0.75)
    assert metric.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(metric.roc_auc([1, 1], [0.2, 0.3]))


def test_roc_curve_endpoints():
    fpr, tpr = metric.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]


def test_split_row_id():
    assert metric.split_row_id("1.2.3_patient_overall") == ("1.2.3", "patient_overall")
    assert metric.split_row_id("1.2.3_C7") == ("1.2.3", "C7")
    with pytest.raises(ValueError, match="C8"):
        metric.split_row_id("1.2.3_C8")


def _write_wide(path, rows):
    lines = ["StudyInstanceUID," + ",".join(PREDICTION_TYPES)]
    lines += [uid + "," + ",".join(str(v) for v in vals) for uid, vals in rows]
    path.write_text("\n".join(lines) + "\n")


def _write_long(path, rows):
    lines = ["row_id,fractured"]
    lines += [f"{uid}_{t},{v}" for uid, vals in rows for t, v in zip(PREDICTION_TYPES, vals)]
    path.write_text("\n".join(lines) + "\n")


def test_files_wide_and_long_labels_agree(tmp_path):
    labels = [("1.2.1", [1, 1, 0, 0, 0, 0, 0, 0]), ("1.2.2", [0] * 8)]
    preds = [("1.2.1", [0.8, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]), ("1.2.2", [0.3] + [0.2] * 7), ("1.2.9", [0.5] * 8)]
    _write_wide(tmp_path / "train.csv", labels)
    _write_long(tmp_path / "labels.csv", labels)
    _write_long(tmp_path / "sub.csv", preds)
    expected = (0.2337485 + (7 * -math.log(0.7) + 7 * -math.log(0.8)) / 14) / 2
    wide = metric.evaluate_files(tmp_path / "sub.csv", tmp_path / "train.csv")
    long = metric.evaluate_files(tmp_path / "sub.csv", tmp_path / "labels.csv")
    assert wide.score == pytest.approx(expected, abs=1e-6)
    assert long.score == wide.score
    assert wide.n_studies == 2  # the unlabelled study 1.2.9 is ignored
    assert wide.per_label["patient_overall"]["auc"] == pytest.approx(1.0)
    assert wide.per_label["patient_overall"]["log_loss"] == pytest.approx((-math.log(0.8) - math.log(0.7)) / 2)
    assert math.isnan(wide.per_label["C2"]["auc"])  # one class only
    d = wide.to_dict()
    assert d["per_label"]["C2"]["auc"] is None
    json.dumps(d)


def test_missing_prediction_is_named(tmp_path):
    _write_wide(tmp_path / "train.csv", [("1.2.1", [0] * 8)])
    (tmp_path / "sub.csv").write_text("row_id,fractured\n1.2.1_C1,0.5\n")
    with pytest.raises(ValueError, match="1.2.1_patient_overall"):
        metric.evaluate_files(tmp_path / "sub.csv", tmp_path / "train.csv")


def test_roc_png(tmp_path):
    import cv2

    path = metric.draw_roc_png([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], tmp_path / "roc.png", "C1", size=200)
    img = cv2.imread(str(path))
    assert img.shape == (200, 200, 3)
    # The curve colour (blue-ish in BGR) is drawn somewhere.
    assert ((img[..., 0] > 150) & (img[..., 2] < 60)).sum() > 50


def test_evaluate_cli_json_and_report(tmp_path, capsys):
    from cspine_submit.cli import main

    labels = [("1.2.1", [1, 1, 0, 0, 0, 0, 0, 0]), ("1.2.2", [0] * 8)]
    preds = [("1.2.1", [0.8, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]), ("1.2.2", [0.3] + [0.2] * 7)]
    _write_long(tmp_path / "labels.csv", labels)
    _write_long(tmp_path / "sub.csv", preds)
    rc = main(["evaluate", "--submission", str(tmp_path / "sub.csv"), "--labels", str(tmp_path / "labels.csv"),
               "--json", "--report", str(tmp_path / "rep")])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    expected = (0.2337485 + (7 * -math.log(0.7) + 7 * -math.log(0.8)) / 14) / 2
    assert data["score"] == pytest.approx(expected, abs=1e-6)
    assert set(data["per_label"]) == set(PREDICTION_TYPES)
    assert data["per_label"]["patient_overall"]["auc"] == 1.0 and data["per_label"]["C3"]["auc"] is None
    assert sorted(p.name for p in (tmp_path / "rep").glob("roc_*.png")) == sorted(
        f"roc_{t}.png" for t in PREDICTION_TYPES)
    rc = main(["evaluate", "--submission", str(tmp_path / "sub.csv"), "--labels", str(tmp_path / "labels.csv")])
    out = capsys.readouterr().out
    assert rc == 0 and "score (weighted log loss" in out and "patient_overall" in out


def test_evaluate_cli_error_names_file(tmp_path, capsys):
    from cspine_submit.cli import main

    rc = main(["evaluate", "--submission", str(tmp_path / "nope.csv"), "--labels", str(tmp_path / "nope2.csv")])
    assert rc == 2 and "nope2.csv" in capsys.readouterr().out
