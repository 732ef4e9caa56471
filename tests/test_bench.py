"""The benchmark's projection arithmetic and its naive baseline on a tiny synthetic study."""

import numpy as np
import pytest

from cspine_submit.tools import bench
from cspine_submit.config import VERTEBRAE, ModelConfig


def test_projection_matches_hand_computation():
    # 0.8 s of CPU stages over 2 workers = 0.4 s. One classifier per vertebra, K = 15, 448 px, mixed precision:
    # 990 * (224/448)^2 = 247.5 img/s per T4; round-robin C1,C3,C5,C7 on GPU 0 (60 passes), C2,C4,C6 on GPU 1 (45).
    config = ModelConfig(input_size=448, slices_per_vertebra=15)
    w = bench.gpu_workload(config)
    assert w.passes == (60, 45) and w.precision == "mixed_float16" and not w.xla
    assert "C1,C3,C5,C7 on GPU:0" in w.placement and "C2,C4,C6 on GPU:1" in w.placement
    p = bench.kaggle_projection(0.8, 0.01, w)
    assert p["cpu_seconds_per_study"] == pytest.approx(0.4)
    assert p["gpu_seconds_per_study"] == pytest.approx(60 / 247.5, abs=1e-4)  # the busier GPU, not 105 / 495
    assert p["seconds_per_study"] == pytest.approx(0.41)
    assert p["total_hours"] == pytest.approx(0.41 * 1500 / 3600, abs=1e-3)
    assert any("XLA off" in a and "mixed_float16" in a for a in p["assumptions"])
    assert any("105 classifier passes" in a for a in p["assumptions"])
    # Five folds per vertebra (train's default): five passes per crop, the 35 members spread 18:17 by the memory
    # plan; the GPU now sets the pace.
    w5 = bench.gpu_workload(config, members=5)
    assert w5.passes == (270, 255)
    p = bench.kaggle_projection(0.8, 0.0, w5)
    assert p["seconds_per_study"] == pytest.approx(270 / 247.5, rel=1e-3)
    # XLA on: 1150 img/s; float32 (mixed precision off): 430, with or without XLA.
    assert bench.kaggle_projection(0.0, 0.0, bench.gpu_workload(config, members=5, xla=True))[
        "gpu_seconds_per_study"] == pytest.approx(270 / (1150 / 4), abs=1e-4)
    f32 = bench.gpu_workload(config.replace(mixed_precision=False), members=5)
    assert bench.kaggle_projection(0.0, 0.0, f32)["gpu_seconds_per_study"] == pytest.approx(270 / (430 / 4), abs=1e-4)


def test_projection_of_a_shared_network_uses_both_gpus(tmp_path):
    # The demo's layout: one network (five fold files) for all seven vertebrae: its members split 3:2 over the GPUs
    # by the memory plan (score.memory), each scoring every crop.
    from cspine_submit.files import default_weights_dir

    demo = default_weights_dir() / "demo"
    config = ModelConfig.from_json(demo / "model_config.json")
    w = bench.gpu_workload(config, demo)
    k = config.slices_per_vertebra
    assert w.passes == (3 * 7 * k, 2 * 7 * k) and set(w.members.values()) == {5}
    assert "(3 of 5 members) on GPU:0" in w.placement and "(2 of 5 members) on GPU:1" in w.placement


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
