"""Training: labels, split, augmentation, outputs, resume, and that a tiny model learns synthetic fractures."""

import dataclasses
import json

import numpy as np
import pytest

from cspine_submit import train_data as td
from cspine_submit.config import VERTEBRAE, ModelConfig
from cspine_submit.train import TrainOptions, draw_history_png, read_history, train_classifiers


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


@pytest.fixture(scope="module")
def fixture_ranges(synthetic_dataset, tmp_path_factory):
    from cspine_submit.localize import learn_ranges

    ranges, _ = learn_ranges(synthetic_dataset / "segmentations", synthetic_dataset / "train_images")
    path = tmp_path_factory.mktemp("ranges") / "slice_ranges.json"
    ranges.to_json(path)
    return path


def test_train_writes_a_loadable_folder_and_resumes(synthetic_dataset, fixture_ranges, tmp_path):
    from cspine_submit.bundle import verify_manifest
    from cspine_submit.models import load_classifiers

    config = ModelConfig(head="tiny", input_size=32, channels="single", windows=((400.0, 1800.0),),
                         slices_per_vertebra=3, mixed_precision=False)
    options = TrainOptions(epochs=1, batch_size=8, shared=True, box_policy="study", workers=0, seed=3,
                           cache_dir=str(tmp_path / "cache"), trained_on="synthetic", patience=5)
    out = tmp_path / "weights"
    r1 = train_classifiers(synthetic_dataset, fixture_ranges, out, config, options, progress=False)
    assert [r["epoch"] for r in read_history(out / "history.csv")] == [1]
    for name in ["model_config.json", "slice_ranges.json", "history.csv", "validation.json", "training_curves.png",
                 "MANIFEST.json"] + [f"{v}.keras" for v in VERTEBRAE]:
        assert (out / name).is_file(), name
    assert verify_manifest(out) == []
    assert not (out / "train_state.json").exists() and not (out / "checkpoints").exists()
    loaded, models = load_classifiers(out)
    assert loaded.trained_on == "synthetic" and loaded.input_shape == (32, 32, 1)
    assert sorted(models) == list(VERTEBRAE)
    assert r1.validation["per_vertebra"]["C1"]["n_val_studies"] == 2

    with pytest.raises(FileExistsError):
        train_classifiers(synthetic_dataset, fixture_ranges, out, config, options, progress=False)
    # An interrupted run: state says nothing is done and a checkpoint after epoch 1 exists -> resume goes on at 2.
    out2 = tmp_path / "weights2"
    train_classifiers(synthetic_dataset, fixture_ranges, out2, config, options, progress=False)
    from cspine_submit.models import build_classifier

    import keras

    ckpt = out2 / "checkpoints"
    ckpt.mkdir()
    m = build_classifier("tiny", (32, 32, 1))
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
              weighted_metrics=[keras.metrics.AUC(name="auc")])
    m.save(ckpt / "all.last.keras")
    (out2 / "train_state.json").write_text(json.dumps({"done": []}))
    more = dataclasses.replace(options, epochs=2)
    train_classifiers(synthetic_dataset, fixture_ranges, out2, config, more, resume=True, progress=False)
    assert [r["epoch"] for r in read_history(out2 / "history.csv")] == [1, 2]


DEMO_LIKE = dict(size=128, spacing=(1.5, 2.5), seed=5, prevalence={v: 0.35 for v in VERTEBRAE})
"""The demo's generator parameters (weights/demo/synthetic_params.json) with thicker slices, fewer studies."""


@pytest.mark.slow
def test_tiny_model_learns_synthetic_fractures(tmp_path):
    """Held-out vertebra-level AUC of a tiny shared model on a small synthetic set is well above chance."""
    from cspine_submit.localize import learn_ranges
    from cspine_submit.synthetic import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, n_train=60, n_test=0, **DEMO_LIKE)
    ranges, _ = learn_ranges(data / "segmentations", data / "train_images")
    ranges.to_json(tmp_path / "ranges.json")
    config = ModelConfig(head="tiny", input_size=64, channels="single", windows=((400.0, 1800.0),),
                         slices_per_vertebra=10, mixed_precision=False)
    options = TrainOptions(epochs=10, patience=4, learning_rate=1e-3, shared=True, workers=2, seed=0, monitor="val_auc",
                           cache_dir=str(tmp_path / "cache"), trained_on="synthetic")
    result = train_classifiers(data, tmp_path / "ranges.json", tmp_path / "w", config, options, progress=False)
    auc = result.validation["pooled_auc"]
    for r in read_history(tmp_path / "w" / "history.csv"):
        print(r)
    print(f"pooled held-out vertebra AUC {auc:.3f}, {result.seconds:.0f} s")
    assert auc > 0.62


def test_training_crops_are_the_inference_crops(synthetic_info, fixture_ranges, tmp_path):
    """No train/serve skew: the cached training crops equal what the submission pipeline feeds the models."""
    from cspine_submit.pipeline import StudyJob, prepare_study
    from cspine_submit.localize import load_ranges

    config = ModelConfig(head="tiny", input_size=32, channels="neighbours", neighbour_offset=1,
                         slices_per_vertebra=4, mixed_precision=False)
    ranges = load_ranges(fixture_ranges)
    for record in synthetic_info.train[:2]:
        job = td.CacheJob(record.uid, str(record.folder), str(tmp_path), str(fixture_ranges),
                          json.dumps(td._config_dict(config)))
        meta = td.cache_study(job)
        served = prepare_study(StudyJob(record.uid, str(record.folder), ranges, config, VERTEBRAE)).crops
        assert served, record.uid
        for v, crops in served.items():
            cached = np.load(tmp_path / record.uid / meta["vertebrae"][v]["file"])
            assert cached.shape == crops.shape == (len(meta["vertebrae"][v]["slice_indices"]), 32, 32, 3)
            np.testing.assert_array_equal(cached, crops.astype(np.float16))


def test_resume_keeps_the_validation_of_vertebrae_finished_before_the_interruption(
        synthetic_dataset, fixture_ranges, tmp_path, monkeypatch):
    import cspine_submit.train as train_mod

    config = ModelConfig(head="tiny", input_size=32, channels="single", windows=((400.0, 1800.0),),
                         slices_per_vertebra=3, mixed_precision=False)
    options = TrainOptions(vertebrae=("C5", "C7"), epochs=1, batch_size=8, box_policy="study", workers=0, seed=3,
                           cache_dir=str(tmp_path / "cache"), trained_on="synthetic")
    out = tmp_path / "weights"
    real = train_mod.train_vertebra

    def interrupted(name, *args, **kwargs):
        if name == "C7":
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_vertebra", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_classifiers(synthetic_dataset, fixture_ranges, out, config, options, progress=False)
    monkeypatch.setattr(train_mod, "train_vertebra", real)
    result = train_classifiers(synthetic_dataset, fixture_ranges, out, config, options, resume=True, progress=False)
    assert sorted(result.validation["per_vertebra"]) == ["C5", "C7"]
    saved = json.loads((out / "validation.json").read_text())
    assert sorted(saved["per_vertebra"]) == ["C5", "C7"] and "auc" in saved["per_vertebra"]["C5"]
