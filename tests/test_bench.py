"""The benchmark's projection arithmetic and its naive baseline on a tiny synthetic study."""

import numpy as np
import pytest

from cspine_submit.tools import bench
from cspine_submit.config import VERTEBRAE, ModelConfig


def test_projection_matches_hand_computation():
    # 0.8 s of CPU stages over 2 workers = 0.4 s; 105 crops at 448 px on 2 T4s:
    # 990 * (224/448)^2 = 247.5 img/s per T4, 495 img/s for two -> 105 / 495 = 0.2121 s. CPU is slower: 0.4 + 0.01.
    p = bench.kaggle_projection(0.8, 105, 448, 0.01)
    assert p["cpu_seconds_per_study"] == pytest.approx(0.4)
    assert p["gpu_seconds_per_study"] == pytest.approx(105 / 495, abs=1e-4)
    assert p["seconds_per_study"] == pytest.approx(0.41)
    assert p["total_hours"] == pytest.approx(0.41 * 1500 / 3600, abs=1e-3)
    # When the GPU is the bottleneck it sets the pace instead.
    p = bench.kaggle_projection(0.01, 10000, 512, 0.0)
    assert p["seconds_per_study"] == pytest.approx(10000 / (2 * 990 * (224 / 512) ** 2), rel=1e-3)


def test_naive_baseline_scores_every_slice_and_ours_only_the_planned(synthetic_dataset, tmp_path):
    from cspine_submit.localize import load_ranges

    config = ModelConfig(head="tiny", input_size=32, slices_per_vertebra=4, trained_on="untrained")
    models = bench.make_weights(tmp_path / "w", config)
    ranges = load_ranges(tmp_path / "w" / "slice_ranges.json")
    folder = sorted((synthetic_dataset / "test_images").iterdir())[0]
    naive, n_naive = bench.naive_per_study(folder, config, models)
    ours, n_ours = bench.ours_per_study(folder, ranges, config, models)
    n_files = len(list(folder.glob("*.dcm")))
    assert n_naive == n_files
    assert 0 < n_ours < n_files
    assert set(naive) >= {"decode", "crop", "score", "aggregate"}
    assert all(np.isfinite(v) and v >= 0 for v in list(naive.values()) + list(ours.values()))
    assert set(models) == set(VERTEBRAE)


def test_marginal_seconds_take_start_up_out():
    # One study took 4.0 s (start-up + latency), five took 6.0 s: each further study costs (6 - 4) / 4 = 0.5 s.
    m = bench.marginal_seconds(6.0, 4.0, 5)
    assert m["seconds_per_study"] == pytest.approx(0.5)
    assert m["studies_per_s"] == pytest.approx(2.0)
    assert m["startup_s"] == pytest.approx(3.5)


def test_marginal_seconds_over_a_few_studies():
    # 2 studies took 5.0 s, 10 took 9.0 s: each further study costs (9 - 5) / 8 = 0.5 s; start-up 5 - 2 * 0.5 = 4 s.
    m = bench.marginal_seconds(9.0, 5.0, 10, 2)
    assert m["seconds_per_study"] == pytest.approx(0.5)
    assert m["startup_s"] == pytest.approx(4.0)


def test_naive_decode_and_the_direct_loop_read_every_slice(synthetic_dataset, monkeypatch):
    from cspine_submit.read import dicom

    folder = sorted((synthetic_dataset / "test_images").iterdir())[0]
    n_files = len(list(folder.glob("*.dcm")))
    seconds, n = bench.naive_decode_seconds(folder)
    assert n == n_files and seconds > 0
    header = dicom.scan_study(folder)
    opened = []
    real_fromfile = np.fromfile
    monkeypatch.setattr(np, "fromfile", lambda *a, **k: opened.append(a[0]) or real_fromfile(*a, **k))
    decoder = bench.fastest_direct_loop(header, range(header.n_slices))
    assert decoder in ("dicomsdl", "gdcm")
    native = [f for f, ts in zip(header.files, header.transfer_syntaxes) if ts in ("1.2.840.10008.1.2",
                                                                                   "1.2.840.10008.1.2.1")]
    assert sorted(opened) == sorted(str(f) for f in native)
