"""Training: labels, folds, the compact cache, augmentation, cross-validated outputs, resume, the plan, and that a
tiny model learns synthetic fractures."""

import dataclasses
import json

import numpy as np
import pytest

from cspine_submit.train import data as td
from cspine_submit.config import VERTEBRAE, ModelConfig
from cspine_submit.train.history import draw_history_png, read_history
from cspine_submit.train.options import TrainOptions, learning_rate_at
from cspine_submit.train.run import train_classifiers


def test_split_is_deterministic_stratified_and_order_free():
    labels = {f"s{i:02d}": {"patient_overall": int(i < 9)} for i in range(30)}
    tr, va = td.split_studies(labels, 1 / 3, seed=7)
    assert len(va) == 10 and len(tr) == 20 and not set(tr) & set(va)
    assert sum(labels[u]["patient_overall"] for u in va) == 3  # round(9 / 3) positives held out
    shuffled = dict(reversed(list(labels.items())))
    assert td.split_studies(shuffled, 1 / 3, seed=7) == (tr, va)
    assert td.split_studies(labels, 1 / 3, seed=8) != (tr, va)


def test_slice_targets_per_policy():
    numbers = [10, 11, 12, 13]
    boxes = {11, 12, 40}
    y, w = td.vertebra_targets(False, numbers, boxes)
    assert y.tolist() == [0, 0, 0, 0] and w.tolist() == [1, 1, 1, 1]
    y, w = td.vertebra_targets(True, numbers, boxes, "exclude")
    assert y.tolist() == [0, 1, 1, 0] and w.tolist() == [0, 1, 1, 0]
    y, w = td.vertebra_targets(True, numbers, boxes, "downweight", other_weight=0.25)
    assert y.tolist() == [0, 1, 1, 0] and w.tolist() == [0.25, 1, 1, 0.25]
    y, w = td.vertebra_targets(True, numbers, boxes, "study")
    assert y.tolist() == [1, 1, 1, 1] and w.tolist() == [1, 1, 1, 1]
    # No boxes for the study, or none on this vertebra's crops: the study label for every crop.
    assert td.vertebra_targets(True, numbers, None)[0].tolist() == [1, 1, 1, 1]
    assert td.vertebra_targets(True, numbers, {99})[0].tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="box policy"):
        td.crop_targets(True, [True], "nope")


def test_class_weights_balance_the_totals():
    y = np.array([1, 0, 0, 0, 0, 1, 0, 0])
    w = np.array([1, 1, 1, 1, 1, 1, 1, 0.0])
    wn, wp = td.class_weights(y, w)
    # total weight 7 (2 positive, 5 negative): each class gets 3.5.
    assert (wn, wp) == pytest.approx((0.7, 1.75))
    assert td.class_weights(np.zeros(3), np.ones(3)) == (1.0, 1.0)


def test_augment_is_seeded_and_stays_in_range():
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(0).uniform(0, 1, (32, 32, 2)).astype(np.float32))
    a = td.augment(x, tf.constant([1, 2], tf.int64)).numpy()
    b = td.augment(x, tf.constant([1, 2], tf.int64)).numpy()
    c = td.augment(x, tf.constant([1, 3], tf.int64)).numpy()
    assert a.shape == (32, 32, 2) and a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # No rotation, scaling or jitter: only the (seeded) flip is left, so the crop is itself or its mirror.
    d = td.augment(x, tf.constant([5, 5], tf.int64), max_rotation_deg=0, max_scale=0, max_contrast=0,
                   max_shift=0).numpy()
    assert np.allclose(d, x.numpy(), atol=1e-6) or np.allclose(d, x.numpy()[:, ::-1], atol=1e-6)


def test_history_png(tmp_path):
    hist = [{"vertebra": v, "epoch": e, "loss": 1 / e, "auc": 0.5 + e / 20, "val_loss": 1.2 / e, "val_auc": 0.5 + e / 30}
            for v in ("C1", "C2") for e in (1, 2, 3)]
    import cv2

    path = draw_history_png(hist, tmp_path / "curves.png")
    img = cv2.imread(str(path))
    assert img.shape == (380, 900, 3) and (img < 250).any()


def test_folds_are_patient_level_stratified_and_deterministic():
    labels = {f"s{i:02d}": {v: int(i % 5 == 0 and v == "C2") + int(i % 7 == 0 and v == "C5") for v in VERTEBRAE}
              for i in range(40)}
    folds = td.assign_folds(labels, 5, seed=1)
    assert sorted(folds) == sorted(labels) and set(folds.values()) == set(range(5))
    sizes = np.bincount(list(folds.values()))
    assert sizes.max() - sizes.min() <= 1
    fractured = [u for u, lab in labels.items() if sum(lab.values())]
    per_fold = np.bincount([folds[u] for u in fractured], minlength=5)
    assert per_fold.max() - per_fold.min() <= 1  # fractures spread over every fold
    assert td.assign_folds(dict(reversed(list(labels.items()))), 5, seed=1) == folds
    assert td.assign_folds(labels, 5, seed=2) != folds
    with pytest.raises(ValueError):
        td.assign_folds(labels, 1, seed=0)


def test_square_codec_is_exact_for_integer_hu_and_compresses():
    rng = np.random.default_rng(0)
    sq = np.clip(rng.normal(40, 300, (3, 50, 50)), -1024, 3000).round().astype(np.float32)
    buf = td.encode_square(sq)
    back = td.decode_square(buf, 3, 50)
    assert back.dtype == np.int16
    np.testing.assert_array_equal(back, sq)
    flat = np.full((1, 64, 64), -500.0, np.float32)
    assert len(td.encode_square(flat)) < 64 * 64 * 2 / 50


def test_learning_rate_scales_with_the_global_batch_and_decays():
    o = TrainOptions(learning_rate=5e-4, batch_size=16, epochs=4)
    assert learning_rate_at(o, 1, replicas=1) == pytest.approx(5e-4)
    assert learning_rate_at(o, 1, replicas=2) == pytest.approx(1e-3)  # 2 GPUs x 16 crops
    assert learning_rate_at(o, 3, replicas=1) == pytest.approx(5e-4 * 0.5 * (1 + np.cos(np.pi * 2 / 4)))
    assert learning_rate_at(dataclasses.replace(o, lr_schedule="constant"), 4) == pytest.approx(5e-4)


TINY = ModelConfig(head="tiny", input_size=32, channels="single", windows=((400.0, 1800.0),),
                   slices_per_vertebra=3, top_k=1, mixed_precision=False)


def test_cross_validated_run_writes_only_inference_files_and_honest_oof(synthetic_dataset, synthetic_ranges, tmp_path,
                                                                      monkeypatch):
    import pandas as pd

    import cspine_submit.train.fit as fit_mod
    from cspine_submit.train.calibration import fit_priors
    from cspine_submit.manifest import verify_manifest
    from cspine_submit.train.metric import competition_score
    from cspine_submit.score.models import load_classifiers

    trained_on: dict[str, set] = {}
    real = fit_mod.train_unit

    def spy(tag, train_s, *args, **kwargs):
        trained_on[tag] = set(train_s.kept().study)
        return real(tag, train_s, *args, **kwargs)

    monkeypatch.setattr(fit_mod, "train_unit", spy)
    options = TrainOptions(folds=3, epochs=1, batch_size=8, shared=True, box_policy="study", workers=0, seed=3,
                           trained_on="synthetic")
    out = tmp_path / "weights"
    result = train_classifiers(synthetic_dataset, synthetic_ranges, out, TINY, options, progress=False)

    # --out holds the inference files and the two validation reports, nothing else.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["MANIFEST.json", "model_config.json", "oof.csv", "slice_ranges.json", "validation.json",
         "all.f0.keras", "all.f1.keras", "all.f2.keras"])
    assert result.work_dir == tmp_path / "weights.work" and (result.work_dir / "CACHEDIR.TAG").is_file()
    assert (result.work_dir / "history.csv").is_file() and any((result.work_dir / "cache").iterdir())
    assert verify_manifest(out, extra_ok=False) == []
    config, models = load_classifiers(out)
    assert config.classifier_paths("C4") == ("all.f0.keras", "all.f1.keras", "all.f2.keras")
    assert sorted(models) == list(VERTEBRAE)

    # oof.csv: every training study once; oof_score is the metric on it.
    labels = pd.read_csv(synthetic_dataset / "train.csv", dtype={"StudyInstanceUID": str}).set_index("StudyInstanceUID")
    oof = pd.read_csv(out / "oof.csv", dtype={"StudyInstanceUID": str})
    assert list(oof.columns) == ["StudyInstanceUID", "patient_overall"] + list(VERTEBRAE)
    assert sorted(oof["StudyInstanceUID"]) == sorted(labels.index) and oof["StudyInstanceUID"].is_unique
    cols = ["patient_overall"] + list(VERTEBRAE)
    y = labels.loc[oof["StudyInstanceUID"], cols].to_numpy(float)
    saved = json.loads((out / "validation.json").read_text())
    assert saved["oof_score"] == pytest.approx(competition_score(y, oof[cols].to_numpy(float)), abs=1e-7)
    assert saved["oof_score_in_sample_calibration"] <= saved["oof_score_uncalibrated"] + 1e-9

    # No study got an out-of-fold probability from a model that trained on it.
    fold_of = saved["training"]["fold_of_study"]
    assert set(trained_on) == {"f0/all", "f1/all", "f2/all"}
    for f in range(3):
        held = {u for u, g in fold_of.items() if g == f}
        assert held and not held & trained_on[f"f{f}/all"]
        predicted = json.loads((result.work_dir / "oof" / f"f{f}_C3.json").read_text())
        assert set(predicted) <= held

    # The priors minimise the metric on the training labels: no worse than the raw prevalences.
    y_all = labels[cols].to_numpy(float)
    const = lambda d: np.tile([d[t] for t in cols], (len(y_all), 1))  # noqa: E731
    assert config.priors == pytest.approx(fit_priors(y_all, config.clip))
    assert competition_score(y_all, const(config.priors)) <= competition_score(y_all, const(dict(zip(cols, y_all.mean(0)))))

    with pytest.raises(FileExistsError):
        train_classifiers(synthetic_dataset, synthetic_ranges, out, TINY, options, progress=False)


def test_resume_continues_after_an_interrupted_fold(synthetic_dataset, synthetic_ranges, tmp_path, monkeypatch):
    import cspine_submit.train.fit as fit_mod

    options = TrainOptions(vertebrae=("C5",), folds=2, epochs=1, batch_size=8, box_policy="study", workers=0,
                           seed=3, final="refit", trained_on="synthetic")
    out = tmp_path / "weights"
    real = fit_mod.train_unit
    calls = []

    def interrupted(tag, *args, **kwargs):
        calls.append(tag)
        if tag == "f1/C5" and len(calls) == 2:  # the first run only
            raise KeyboardInterrupt
        return real(tag, *args, **kwargs)

    monkeypatch.setattr(fit_mod, "train_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_classifiers(synthetic_dataset, synthetic_ranges, out, TINY, options, progress=False)
    assert not (out / "model_config.json").exists()  # nothing half-written in --out
    calls.clear()
    result = train_classifiers(synthetic_dataset, synthetic_ranges, out, TINY, options, resume=True, progress=False)
    assert calls == ["f1/C5", "refit/C5"]  # the finished fold model was kept
    assert result.config.classifier_files["C5"] == "C5.keras" and (out / "C5.keras").is_file()
    assert sorted(result.validation["per_vertebra"]) == ["C5"]
    assert result.validation["n_studies"] == 6  # both folds' held-out studies


def test_plan_matches_what_a_run_writes(synthetic_dataset, synthetic_ranges, tmp_path, capsys):
    from cspine_submit.cli import main
    from cspine_submit.train.data import build_cache, cache_key

    argv = ["train", "--data", str(synthetic_dataset), "--ranges", str(synthetic_ranges), "--out", str(tmp_path / "w"),
            "--head", "tiny", "--input-size", "32", "--channels", "single", "--windows", "400/1800",
            "--slices-per-vertebra", "3", "--workers", "0", "--shared", "--plan", "--json"]  # 6 studies: C2 needs --shared
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["studies"] == plan["studies_read"] == 6
    cache = tmp_path / "cache"
    metas, failed = build_cache(synthetic_dataset, sorted(json.loads(json.dumps(
        td.read_train_labels(synthetic_dataset)))), cache / cache_key(TINY, synthetic_ranges), synthetic_ranges, TINY,
        workers=0, progress=False)
    assert not failed and not (tmp_path / "w").exists()
    crops = sum(len(e["crops"]) for m in metas.values() for e in m["vertebrae"].values())
    on_disk = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and p.name != "CACHEDIR.TAG")
    assert plan["crops"]["total"] == crops
    assert abs(plan["cache_bytes"]["projected"] - on_disk) <= 0.1 * on_disk
    assert plan["input_crops_per_s"] > 0 and plan["epoch"]["T4_seconds"] is None  # no GPU figure for 'tiny'


DEMO_LIKE = dict(scheme="uniform", size=128, spacing=(1.5, 2.5), seed=5, prevalence={v: 0.35 for v in VERTEBRAE})
"""The demo's generator parameters (weights/demo/synthetic_params.json) with thicker slices, fewer studies."""


@pytest.mark.slow
def test_tiny_model_learns_synthetic_fractures(tmp_path):
    """Out-of-fold vertebra-level AUC of a tiny shared model on a small synthetic set is well above chance, and the
    calibrated out-of-fold metric beats the prior-only baseline."""
    from cspine_submit.localize import learn_ranges
    from cspine_submit.datasets.synthetic import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, n_train=60, n_test=0, **DEMO_LIKE)
    ranges, _ = learn_ranges(data / "segmentations", data / "train_images")
    ranges.to_json(tmp_path / "ranges.json")
    config = ModelConfig(head="tiny", input_size=64, channels="single", windows=((400.0, 1800.0),),
                         slices_per_vertebra=10, mixed_precision=False)
    options = TrainOptions(folds=3, epochs=10, learning_rate=1e-3, shared=True, workers=2, seed=0,
                           trained_on="synthetic")
    result = train_classifiers(data, tmp_path / "ranges.json", tmp_path / "w", config, options, progress=False)
    v = result.validation
    aucs = [d["auc"] for d in v["per_vertebra"].values()]
    print(f"out-of-fold vertebra AUCs {np.round(aucs, 3)}; metric {v['oof_score']:.4f} (uncalibrated "
          f"{v['oof_score_uncalibrated']:.4f}, prior only {v['baselines']['prior_only']:.4f}); {result.seconds:.0f} s")
    assert np.nanmean(aucs) > 0.6
    assert v["oof_score"] < v["baselines"]["prior_only"] < v["baselines"]["constant_0.5"]


def test_training_crops_are_the_inference_crops(synthetic_info, synthetic_ranges, tmp_path):
    """No train/serve skew: the cached squares, windowed on load, are what the submission pipeline feeds the models
    (up to the int16 rounding of HU the cache stores: half a HU, 0.5 / 1800 after the window)."""
    from cspine_submit.localize import load_ranges
    from cspine_submit.submit.run import StudyJob, prepare_study

    config = ModelConfig(head="tiny", input_size=32, channels="neighbours", neighbour_offset=1,
                         slices_per_vertebra=4, mixed_precision=False)
    ranges = load_ranges(synthetic_ranges)
    for record in synthetic_info.train[:2]:
        job = td.CacheJob(record.uid, str(record.folder), str(tmp_path), str(synthetic_ranges),
                          json.dumps(td._config_dict(config)))
        meta = td.cache_study(job)
        served = prepare_study(StudyJob(record.uid, str(record.folder), ranges, config, VERTEBRAE)).crops
        assert served, record.uid
        labels = {record.uid: {v: 0 for v in VERTEBRAE}}
        for v, crops in served.items():
            crops = np.asarray(crops)
            if crops.dtype == np.uint16:
                from cspine_submit.score.crop import decode_crops

                crops = decode_crops(crops)
            s = td.collect_samples({record.uid: meta}, [record.uid], v, tmp_path, labels, {})
            cached = np.stack(list(td.load_crops(s, config)))
            assert cached.shape == crops.shape == (len(meta["vertebrae"][v]["slice_indices"]), 32, 32, 3)
            np.testing.assert_allclose(cached, crops, atol=0.5 / 1800 + 1e-5)


def _square_samples(folder, n, side=20, planes=1):
    """``n`` cached crops of random HU squares in one crops.bin, with distinct targets and weights."""
    rng = np.random.default_rng(7)
    path = folder / "crops.bin"
    offsets, nbytes = [], []
    with open(path, "wb") as fh:
        for _ in range(n):
            buf = td.encode_square(rng.integers(-1000, 1500, (planes, side, side)).astype(np.float32))
            offsets.append(fh.tell())
            nbytes.append(len(buf))
            fh.write(buf)
    return td.Samples(np.array([str(path)] * n, dtype=object), np.array(offsets), np.array(nbytes),
                      np.full(n, side), (np.arange(n) % 2).astype(np.float32),
                      np.linspace(0.1, 1.0, n).astype(np.float32), np.array(["s"] * n, dtype=object))


def test_dataset_batches_are_the_seeded_order_of_per_crop_loads(tmp_path):
    """Each batch is loaded whole (one call), and holds exactly the crops, targets and weights of the seeded
    epoch order, with a short last batch; a resumed run (first_epoch) draws that epoch's order."""
    config = ModelConfig(head="tiny", input_size=32, channels="windows", mixed_precision=False)
    n, batch, seed = 37, 8, 5
    samples = _square_samples(tmp_path, n)
    reference = np.stack([td.load_crop(samples, i, config) for i in range(n)])
    ds = td.make_dataset(samples, config, batch, shuffle=True, augment_data=False, seed=seed, workers=2)
    for epoch in (0, 1):
        batches = list(ds)
        assert [int(b[0].shape[0]) for b in batches] == [8, 8, 8, 8, 5]
        order = np.random.default_rng([seed, epoch]).permutation(n)
        x = np.concatenate([b[0] for b in batches])
        np.testing.assert_array_equal(x, reference[order])
        np.testing.assert_array_equal(np.concatenate([b[1] for b in batches])[:, 0], samples.y[order])
        np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), samples.w[order])
    resumed = td.make_dataset(samples, config, batch, shuffle=True, augment_data=False, seed=seed, first_epoch=1)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in resumed]), x)  # epoch 1's order, as above
    plain = td.make_dataset(samples, config, batch, shuffle=False, augment_data=False)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in plain]), reference)


def test_load_crop_writes_into_a_given_buffer(tmp_path):
    config = ModelConfig(head="tiny", input_size=32, channels="windows", mixed_precision=False)
    samples = _square_samples(tmp_path, 3)
    out = np.full((32, 32, 3), -1.0, np.float32)
    got = td.load_crop(samples, 2, config, out=out)
    assert np.shares_memory(got, out)
    np.testing.assert_array_equal(out, td.load_crop(samples, 2, config))
    with pytest.raises(ValueError, match="out: expected"):
        td.load_crop(samples, 2, config, out=np.zeros((32, 32, 1), np.float32))


def test_augmentation_runs_inside_the_model_only_while_training(tmp_path):
    import keras

    from cspine_submit.score.models import build_classifier

    clf = build_classifier("tiny", (32, 32, 1))
    model = td.augmenting_model(clf, (32, 32, 1), seed=4)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(model(x, training=False), clf(x, training=False), atol=1e-6)
    aug = model.layers[1](x, training=True).numpy()
    assert aug.shape == x.shape and not np.allclose(aug, x) and aug.min() >= 0 and aug.max() <= 1
    model.save(tmp_path / "ckpt.keras")  # a training checkpoint round-trips (resume)
    back = keras.models.load_model(tmp_path / "ckpt.keras")
    np.testing.assert_allclose(back(x, training=False), model(x, training=False), atol=1e-6)


def test_one_split_for_quick_runs(synthetic_dataset, synthetic_ranges, tmp_path):
    """--folds 1: one model per unit, trained on 2/3 of the studies; only the held-out third gets oof rows."""
    import pandas as pd

    options = TrainOptions(folds=1, epochs=1, batch_size=8, shared=True, box_policy="study", workers=0, seed=3,
                           trained_on="synthetic", work_dir=str(tmp_path / "scratch"))
    result = train_classifiers(synthetic_dataset, synthetic_ranges, tmp_path / "w", TINY, options, progress=False)
    assert result.config.classifier_files["C1"] == "all.keras" and (tmp_path / "w" / "all.keras").is_file()
    held = {u for u, f in result.validation["training"]["fold_of_study"].items() if f == 0}
    oof = pd.read_csv(tmp_path / "w" / "oof.csv", dtype={"StudyInstanceUID": str})
    assert set(oof["StudyInstanceUID"]) == held and len(held) == 2
    assert not (tmp_path / "w.work").exists() and (tmp_path / "scratch" / "CACHEDIR.TAG").is_file()
