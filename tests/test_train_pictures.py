"""The training pictures say what they show: the curves' key names only the lines drawn and the legend wraps for
many units; an ROC plot without a curve says why."""

import numpy as np

from cspine_submit.train.history import draw_history_png, legend_note
from cspine_submit.train.metric import draw_roc_png, roc_empty_reason


def _rows(units, val):
    return [{"vertebra": u, "epoch": e, "loss": 1 / e, "auc": 0.5 + e / 20,
             "val_loss": 1.2 / e if val else float("nan"), "val_auc": 0.5 + e / 30 if val else float("nan")}
            for u in units for e in (1, 2, 3)]


def test_curves_key_names_only_the_lines_drawn_and_the_legend_wraps(tmp_path):
    import cv2

    assert "validation" in legend_note(_rows(["f0/C1"], val=True))
    fixed = legend_note(_rows(["f0/C1"], val=False))
    assert "no validation line" in fixed and "dashed" not in fixed
    few = cv2.imread(str(draw_history_png(_rows(["f0/all", "f1/all"], val=False), tmp_path / "few.png")))
    many = cv2.imread(str(draw_history_png(_rows([f"f{f}/C{v}" for f in range(5) for v in range(1, 8)], val=False),
                                           tmp_path / "many.png")))
    assert few.shape == (380, 900, 3) and many.shape[0] > 380 and many.shape[1] == 900
    assert (many[380:] < 128).any()  # the extra legend rows hold text


def test_roc_without_positives_says_why(tmp_path):
    import cv2

    assert "no positive (fractured) study" in roc_empty_reason(0, 12) and "12 negative" in roc_empty_reason(0, 12)
    assert "no negative (intact) study" in roc_empty_reason(3, 0)
    empty = cv2.imread(str(draw_roc_png(np.zeros(12), np.linspace(0, 1, 12), tmp_path / "empty.png", "C7")))
    red = (empty[..., 2] > 150) & (empty[..., 0] < 80) & (empty[..., 1] < 80)
    assert red.sum() > 50  # the reason, written in red on the empty axes
    full = cv2.imread(str(draw_roc_png(np.arange(12) % 2, np.linspace(0, 1, 12), tmp_path / "full.png", "C1")))
    assert not ((full[..., 2] > 150) & (full[..., 0] < 80) & (full[..., 1] < 80)).any()
