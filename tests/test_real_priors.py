"""The shipped priors are the metric-minimising constants of the real train.csv labels (issue 19 item 5).

The real label table is not here; ../shared/FACTS.md gives its counts: 2019 studies, the prevalence of each label
and how many studies have 0-6 fractured vertebrae. ``calibration.fit_priors`` weighs each study by its label
weights, which depend only on how many vertebrae it has fractured, so ``patient_overall``'s constant follows from
the per-count table alone; each vertebra's also needs how its positives spread over those counts, which FACTS does
not give. The table below spreads them in proportion to the count (vertebrae exchangeable within a study), so the
vertebra constants are checked to 0.006 and patient_overall's to the 3 decimals it is shipped with.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cspine_submit.config import METRIC_PRIORS, PREDICTION_TYPES, TRAIN_PREVALENCE, VERTEBRAE, ModelConfig
from cspine_submit.train.calibration import fit_priors, label_weights

ROOT = Path(__file__).parents[1]
N_STUDIES = 2019
STUDIES_BY_FRACTURED_COUNT = (1058, 623, 239, 64, 26, 7, 2)  # FACTS.md: studies with 0, 1, ..., 6 fractured vertebrae


def labels_from_counts(scale: int = 100) -> np.ndarray:
    """An (n, 8) 0/1 label table with FACTS.md's counts (each study repeated ``scale`` times, so rounding is small).

    Within the studies with m fractured vertebrae, vertebra j holds a share of the m positives proportional to
    its prevalence (capped at one per study); patient_overall is the OR of C1-C7, as in every real study.
    """
    want_total = np.array([TRAIN_PREVALENCE[v] for v in VERTEBRAE]) * N_STUDIES
    blocks = []
    for m, n in enumerate(STUDIES_BY_FRACTURED_COUNT):
        n *= scale
        block = np.zeros((n, 7), dtype=np.int8)
        if m:
            want = want_total / want_total.sum() * m * n
            count = np.minimum(np.floor(want).astype(int), n)
            while count.sum() < m * n:  # largest remainder, at most one positive per study and vertebra
                count[np.argmax(np.where(count < n, want - count, -np.inf))] += 1
            items = np.repeat(np.arange(7), count)
            block[np.arange(items.size) % n, items] = 1  # dealt round-robin: each study gets m distinct vertebrae
            assert (block.sum(axis=1) == m).all()
        blocks.append(block)
    y7 = np.concatenate(blocks)
    return np.column_stack([y7.any(axis=1), y7]).astype(np.float64)


def _metric(y: np.ndarray, p: dict[str, float]) -> float:
    q = np.array([p[t] for t in PREDICTION_TYPES])
    bce = -(y * np.log(q) + (1 - y) * np.log1p(-q))
    return float((label_weights(y) * bce).sum(axis=1).mean())


def test_the_label_table_has_the_real_counts():
    y = labels_from_counts()
    assert y[:, 0].mean() == pytest.approx(TRAIN_PREVALENCE["patient_overall"], abs=5e-4)
    for j, v in enumerate(VERTEBRAE, start=1):
        assert y[:, j].mean() == pytest.approx(TRAIN_PREVALENCE[v], abs=4e-3), v


def test_shipped_priors_are_fit_priors_on_the_real_label_counts():
    fitted = fit_priors(labels_from_counts())
    assert round(fitted["patient_overall"], 3) == METRIC_PRIORS["patient_overall"]
    for v in VERTEBRAE:
        assert fitted[v] == pytest.approx(METRIC_PRIORS[v], abs=6e-3), v
        assert METRIC_PRIORS[v] > TRAIN_PREVALENCE[v]  # positives weigh twice negatives


def test_shipped_priors_beat_the_prevalences_on_the_real_label_counts():
    y = labels_from_counts()
    assert _metric(y, METRIC_PRIORS) < _metric(y, TRAIN_PREVALENCE) - 0.004
    assert _metric(y, METRIC_PRIORS) == pytest.approx(0.5573, abs=0.003)  # FACTS.md: 0.5573 on the real labels
    assert _metric(y, TRAIN_PREVALENCE) == pytest.approx(0.5638, abs=0.003)  # and 0.5638


def test_every_default_config_carries_them_with_their_source():
    assert ModelConfig().priors == METRIC_PRIORS  # also the seed notebook's default config
    shipped = json.loads((ROOT / "weights" / "model_config.json").read_text())
    assert shipped["priors"] == METRIC_PRIORS
    assert "fit_priors" in shipped["source"] and "train.csv" in shipped["source"]
    from cspine_submit.score.loading import NOTEBOOK_CONFIG

    assert NOTEBOOK_CONFIG.priors == METRIC_PRIORS and "fit_priors" in NOTEBOOK_CONFIG.source
