"""score/: architectures, parameter counts, every loading path round-trips bit-exactly, devices, scoring."""

import shutil
from pathlib import Path
import warnings

import numpy as np
import pytest

from cspine_submit.config import VERTEBRAE, ModelConfig
from cspine_submit.score import architectures as A, devices as D, loading as L, prediction as P

SHAPE = (32, 32, 1)


def _x(shape=SHAPE, n=5, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, size=(n,) + tuple(shape)).astype(np.float32)


def _randomize(model, seed=0):
    """Non-trivial weights everywhere (BN statistics too), so round trips test every variable."""
    rng = np.random.default_rng(seed)
    new = []
    for v, w in zip(model.weights, model.get_weights()):
        r = rng.normal(0, 0.2, w.shape).astype(w.dtype)
        new.append(np.abs(r) + 0.5 if "moving_variance" in v.name else r)  # variances must stay positive
    model.set_weights(new)
    return model


def _assert_same_weights(a, b):
    wa, wb = a.get_weights(), b.get_weights()
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)


def _tiny_config(fmt="keras", **kw):
    files = {v: f"{v}.{fmt}" for v in VERTEBRAE}
    return ModelConfig(head="tiny", input_size=32, channels="single", windows=((400.0, 1800.0),),
                       classifier_files=files, mixed_precision=False, **kw)


def test_unknown_head_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown classifier head 'vit'.*\['gap', 'seed', 'tiny'\]"):
        A.build_classifier("vit", SHAPE)


def test_tiny_contract_and_size():
    m = A.build_classifier("tiny", (64, 64, 3))
    assert m.input_shape == (None, 64, 64, 3) and m.output_shape == (None, 1)
    assert m.count_params() < 150_000
    p = np.asarray(m.predict_on_batch(_x((64, 64, 3), 3)))
    assert p.shape == (3, 1) and np.all((p > 0) & (p < 1))


def test_resnet_heads_parameter_counts():
    # FACTS.md: the seed notebook's summary, ResNet50 + Flatten + Dense(256) + Dense(1) at 512x512x1.
    assert A.build_classifier("seed", (512, 512, 1)).count_params() == 157_799_681
    # 3 channels adds 2 x 7 x 7 x 64 = 6,272 weights in conv1.
    assert A.build_classifier("seed", (512, 512, 3)).count_params() == 157_805_953
    # ResNet50 (23,581,440 at 1 channel) + Dense(2048 -> 1).
    gap = A.build_classifier("gap", (256, 256, 1)).count_params()
    assert gap == 23_581_440 + 2049


def test_backbone_weights_rules(tmp_path):
    with pytest.raises(ValueError, match="3-channel"):
        A.build_classifier("gap", (64, 64, 1), backbone_weights=tmp_path / "w.h5")
    with pytest.raises(ValueError, match="no ResNet50"):
        A.build_classifier("tiny", (64, 64, 3), backbone_weights=tmp_path / "w.h5")
    with pytest.raises(FileNotFoundError, match="w.h5"):
        A.build_classifier("gap", (64, 64, 3), backbone_weights=tmp_path / "w.h5")
    with pytest.raises(ValueError, match="local file"):
        A.build_classifier("gap", (64, 64, 3), backbone_weights="imagenet")


def test_backbone_weights_from_a_local_file(tmp_path):
    # A stand-in for Keras' resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5: a Keras-2 weights file.
    tf_keras = pytest.importorskip("tf_keras")

    donor = tf_keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    path = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    donor.save_weights(path)
    m = A.build_classifier("gap", (64, 64, 3), backbone_weights=path)
    w = m.get_layer("conv1_conv").get_weights()[0]
    np.testing.assert_array_equal(w, donor.get_layer("conv1_conv").get_weights()[0])


@pytest.mark.parametrize("fmt", ["keras", "h5", "weights.h5"])
def test_keras3_round_trips_are_exact(tmp_path, fmt):
    model = _randomize(A.build_classifier("tiny", SHAPE), seed=1)
    x = _x()
    want = np.asarray(model.predict_on_batch(x))
    config = _tiny_config(fmt)
    config.to_json(tmp_path / "model_config.json")
    for v in VERTEBRAE:
        if fmt == "weights.h5":
            model.save_weights(tmp_path / f"{v}.weights.h5")
        else:
            L.save_classifier(model, tmp_path / f"{v}.{fmt}")
    loaded_config, models = L.load_classifiers(tmp_path)
    assert loaded_config == config
    assert sorted(models) == list(VERTEBRAE)
    got = P.score(models, {"C3": x}, batch_size=4)["C3"]
    np.testing.assert_array_equal(got, want[:, 0])


def _write_keras2_h5(path, head, shape, seed=0):
    """A Keras-2-era full-model .h5, written by tf_keras (as the seed notebook's spine_C*.h5 were)."""
    tf_keras = pytest.importorskip("tf_keras")
    m2 = A.build_classifier(head, shape, keras_module=tf_keras)
    _randomize(m2, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m2.save(path)
    return m2


def test_keras2_h5_loads_exactly(tmp_path):
    x = _x()
    m2 = _write_keras2_h5(tmp_path / "C1.h5", "tiny", SHAPE, seed=2)
    want = m2.predict(x, verbose=0)[:, 0]
    info = L.inspect_model_file(tmp_path / "C1.h5")
    assert info["format"] == "h5-keras2" and info["input_shape"] == SHAPE and info["head"] == "tiny"
    model = L.load_classifier(tmp_path / "C1.h5", _tiny_config("h5"))
    _assert_same_weights(model, m2)  # bit-exact weights; outputs may differ in the last ulp (other kernels)
    np.testing.assert_allclose(P.predict(model, x, batch_size=8), want, rtol=1e-6, atol=1e-7)


def test_notebook_folder_without_config_uses_the_default(tmp_path):
    # Seed-head files at a small input, named like the notebook's: the input size is read from the file.
    shape = (32, 32, 1)
    m2 = _write_keras2_h5(tmp_path / "spine_C1.h5", "seed", shape, seed=3)
    for v in VERTEBRAE[1:]:
        shutil.copy(tmp_path / "spine_C1.h5", tmp_path / f"spine_{v}.h5")
    with pytest.warns(L.DefaultConfigWarning, match="no model_config.json"):
        config, models = L.load_classifiers(tmp_path, vertebrae=("C7",))
    assert L.is_default_config(config)
    assert config.head == "seed" and config.input_shape == shape and config.channels == "single"
    assert config.classifier_files["C7"] == "spine_C7.h5"
    x = _x(shape, 3)
    _assert_same_weights(models["C7"], m2)
    np.testing.assert_allclose(P.score(models, {"C7": x})["C7"], m2.predict(x, verbose=0)[:, 0], rtol=1e-6, atol=1e-7)


def _write_seed_notebook_h5(path, shape, seed=0):
    """An ``.h5`` exactly as the seed notebook saved its models: a tf-keras ``Sequential`` holding ResNet50 as ONE
    nested Functional layer, then Flatten, Dense(256, relu), Dense(1, sigmoid) (its summary: resnet50 (Functional),
    flatten, dense, dense_1). Weights are random at a He-like scale (BN statistics too) so that the output is
    neither 0 nor 1 and every variable matters."""
    tf_keras = pytest.importorskip("tf_keras")
    base = tf_keras.applications.ResNet50(include_top=False, weights=None, input_shape=tuple(shape))
    m2 = tf_keras.Sequential([base, tf_keras.layers.Flatten(), tf_keras.layers.Dense(256, activation="relu"),
                              tf_keras.layers.Dense(1, activation="sigmoid")])
    m2.compile(optimizer="adam", loss="binary_crossentropy")
    rng = np.random.default_rng(seed)
    new = []
    for v, w in zip(m2.weights, m2.get_weights()):
        if "moving_variance" in v.name or "gamma" in v.name:
            new.append(rng.uniform(0.8, 1.2, w.shape).astype(w.dtype))
        elif "kernel" in v.name:
            new.append(rng.normal(0, np.sqrt(1.0 / np.prod(w.shape[:-1])), w.shape).astype(w.dtype))
        else:
            new.append(rng.normal(0, 0.05, w.shape).astype(w.dtype))
    m2.set_weights(new)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m2.save(path)
    return m2


def test_seed_notebook_nested_h5_folder_loads_and_predicts_like_tf_keras(tmp_path):
    # The reproduction: the seed's own files (nested resnet50 layer), no model_config.json, a small input.
    shape = (40, 40, 1)  # not 512: the size must come from the file
    m2 = _write_seed_notebook_h5(tmp_path / "spine_C1.h5", shape, seed=7)
    assert [layer.name for layer in m2.layers] == ["resnet50", "flatten", "dense", "dense_1"]
    for v in VERTEBRAE[1:]:
        (tmp_path / f"spine_{v}.h5").symlink_to(tmp_path / "spine_C1.h5")
    info = L.inspect_model_file(tmp_path / "spine_C4.h5")
    assert info["format"] == "h5-keras2" and info["input_shape"] == shape and info["head"] == "seed"
    x = _x(shape, 6, seed=8)
    want = m2.predict(x, verbose=0)[:, 0]
    assert want.std() > 1e-3 and np.all((want > 0.01) & (want < 0.99))  # a comparison that can fail
    with pytest.warns(L.DefaultConfigWarning):
        config, models = L.load_classifiers(tmp_path, vertebrae=("C4",))
    assert config.head == "seed" and config.input_shape == shape and L.is_default_config(config)
    got = P.score(models, {"C4": x}, batch_size=4)["C4"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # Every stored variable arrived unchanged (the ResNet50 ones by name, the head by order).
    stored = dict(L.read_h5_layer_weights(tmp_path / "spine_C4.h5"))
    assert len(stored) == 106 + 2  # 53 conv and 53 BN layers in ResNet50, then dense and dense_1
    np.testing.assert_array_equal(models["C4"].get_layer("conv5_block3_3_bn").get_weights()[3],
                                  stored["conv5_block3_3_bn"]["moving_variance"])
    np.testing.assert_array_equal(models["C4"].get_layer("probability").get_weights()[0], stored["dense_1"]["kernel"])


def test_keras2_h5_of_another_network_is_a_clear_error(tmp_path):
    m2 = _write_keras2_h5(tmp_path / "C1.h5", "tiny", SHAPE, seed=2)
    stored = L.read_h5_layer_weights(tmp_path / "C1.h5")
    model = A.build_classifier("tiny", SHAPE)
    with pytest.raises(ValueError, match="X.h5: 4 layers with weights"):
        L.set_weights_by_layer(model, stored[:4], "X.h5")
    bad = [(n, dict(w)) for n, w in stored]
    bad[0][1]["kernel"] = bad[0][1]["kernel"][..., :3]
    with pytest.raises(ValueError, match=r"X.h5: layer 'conv0' kernel has shape"):
        L.set_weights_by_layer(model, bad, "X.h5")
    L.set_weights_by_layer(model, stored, "X.h5")
    _assert_same_weights(model, m2)
    # A seed folder whose network takes a non-square input cannot be fed square crops: said, naming the file.
    for v in VERTEBRAE:
        _write_keras2_h5(tmp_path / f"spine_{v}.h5", "tiny", (32, 48, 1)) if v == "C1" else None
    with pytest.raises(ValueError, match=r"spine_C1.h5: its model takes input \(32, 48, 1\)"):
        L.notebook_config(tmp_path)


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        L.load_classifiers(tmp_path)
    config = _tiny_config("keras")
    config.to_json(tmp_path / "model_config.json")
    model = A.build_classifier("tiny", SHAPE)
    for v in VERTEBRAE[:-1]:
        L.save_classifier(model, tmp_path / f"{v}.keras")
    with pytest.raises(FileNotFoundError, match="C7.keras"):
        L.load_classifiers(tmp_path)
    (tmp_path / "C7.keras").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="C7.keras"):
        L.load_classifiers(tmp_path)
    # A corrupt .h5 and a file whose network does not match the config.
    (tmp_path / "C7.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(ValueError, match=r"C7.h5.*HDF5"):
        L.load_classifier(tmp_path / "C7.h5", config)
    L.save_classifier(A.build_classifier("tiny", (48, 48, 1)), tmp_path / "C7.keras")
    with pytest.raises(ValueError, match=r"C7.keras.*\(48, 48, 1\)"):
        L.load_classifiers(tmp_path)


def test_score_pads_batches_and_keeps_order():
    model = _randomize(A.build_classifier("tiny", SHAPE), seed=4)
    x = _x(n=11, seed=5)
    want = np.asarray(model.predict_on_batch(x))[:, 0]
    for bs in (1, 4, 16):
        got = P.predict(model, x, batch_size=bs)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert P._bucket(3, 32) == 4 and P._bucket(11, 4) == 4 and P._bucket(17, 32) == 32
    out = P.score({"C2": model}, {"C2": x[:0]})
    assert out["C2"].shape == (0,)
    with pytest.raises(ValueError, match="no classifier loaded"):
        P.score({"C2": model}, {"C3": x})


@pytest.mark.slow
def test_keras2_seed_at_512_loads_exactly(tmp_path):
    # The real notebook path: the seed's Sequential(resnet50 nested, flatten, dense, dense_1) at 512x512x1 named
    # spine_C*.h5, no config.
    x = _x((512, 512, 1), 2)
    m2 = _write_seed_notebook_h5(tmp_path / "spine_C1.h5", (512, 512, 1), seed=6)
    want = m2.predict(x, verbose=0)[:, 0]
    for v in VERTEBRAE[1:]:
        (tmp_path / f"spine_{v}.h5").symlink_to(tmp_path / "spine_C1.h5")
    with pytest.warns(L.DefaultConfigWarning):
        config, models = L.load_classifiers(tmp_path, vertebrae=("C1",))
    assert config.input_shape == (512, 512, 1) and config.head == "seed"
    assert models["C1"].count_params() == m2.count_params() == 157_799_681
    np.testing.assert_allclose(P.score(models, {"C1": x}, batch_size=2)["C1"], want, rtol=0, atol=1e-5)


_TWO_DEVICES_SCRIPT = r"""
import sys, numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from cspine_submit.score import crop
from cspine_submit.score import architectures as A, devices as D, loading as L, prediction as P
from cspine_submit.config import VERTEBRAE, ModelConfig
weights = sys.argv[1]
plan = D.plan_devices()
assert plan.kind == "CPU" and len(plan.devices) == 2, plan
config, models = L.load_classifiers(weights)
# Round-robin by vertebra: each model's variables live on its device only (no MirroredStrategy, no copies).
for i, v in enumerate(VERTEBRAE):
    want = plan.devices[i % 2]
    assert all(w.value.device.endswith(want.split("device:")[-1]) for w in models[v].weights), (v, want)
rng = np.random.default_rng(0)
x = crop.decode_crops(crop.encode_crops(rng.uniform(0, 1, (11, 32, 32, 1))))
single = A.build_classifier("tiny", (32, 32, 1))
got = P.score(models, {v: crop.encode_crops(x) for v in VERTEBRAE}, batch_size=4)
for v in VERTEBRAE:
    single.set_weights(models[v].get_weights())
    want = np.asarray(single.predict_on_batch(x))[:, 0]
    np.testing.assert_allclose(got[v], want, rtol=0, atol=1e-5)
# Vertebrae sharing one model: one group per device, balanced by the crops each scores (C3-C7's network, 5
# vertebrae, on the first; C1-C2's two-member ensemble, 2 x 2, on the second, as one graph), scored as alone.
config, shared = L.load_classifiers(sys.argv[2])
device_of = plan.with_placement(shared).to_dict()["placement"]
assert [device_of[v] for v in VERTEBRAE] == [plan.devices[1]] * 2 + [plan.devices[0]] * 5, device_of
for v in VERTEBRAE:
    assert all(w.value.device.endswith(device_of[v].split("device:")[-1]) for w in shared[v].weights), v
codes = {v: crop.encode_crops(rng.uniform(0, 1, (k, 32, 32, 1))) for v, k in zip(VERTEBRAE, (5, 0, 9, 3, 7, 4, 6))}
got = P.score(shared, codes, batch_size=4)
for v in VERTEBRAE:
    np.testing.assert_allclose(got[v], P.predict(shared[v], codes[v], 4), rtol=0, atol=1e-6)
print("OK", plan.strategy)
"""


def test_classifiers_round_robin_over_two_devices_with_compact_crops(tmp_path):
    # Two logical CPU devices stand in for Kaggle's two T4s (device setup needs a fresh process). uint16 crops are
    # converted on the device; the probabilities match a single-device model's on the same crops in float32.
    import os
    import subprocess
    import sys

    config = _tiny_config("keras")
    config.to_json(tmp_path / "model_config.json")
    for i, v in enumerate(VERTEBRAE):
        L.save_classifier(_randomize(A.build_classifier("tiny", SHAPE), seed=10 + i), tmp_path / f"{v}.keras")
    shared = tmp_path / "shared"
    shared.mkdir()
    _tiny_config("keras").replace(classifier_files={**{v: "C3.keras" for v in VERTEBRAE[2:]},
                                                    "C1": ["C1.keras", "C2.keras"], "C2": ["C1.keras", "C2.keras"]},
                                  ).to_json(shared / "model_config.json")
    for v in ("C1", "C2", "C3"):
        shutil.copy(tmp_path / f"{v}.keras", shared / f"{v}.keras")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES_SCRIPT, str(tmp_path), str(shared)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK classifiers spread over 2 CPU devices" in proc.stdout


def test_compact_crops_round_trip_within_their_step_and_score_alike():
    from cspine_submit.score import crop

    x = np.concatenate([_x(n=3, seed=9).ravel(), [0.0, 1.0, 0.5, 1e-6]]).astype(np.float32)
    code = crop.encode_crops(x)
    assert code.dtype == np.uint16 and code.nbytes == x.nbytes // 2
    assert code[-4:].tolist() == [0, 65535, 32768, 0]
    assert np.abs(crop.decode_crops(code) - x).max() <= 0.5 / 65535 + 1e-7
    # Converted on the device exactly as on the host.
    model = _randomize(A.build_classifier("tiny", SHAPE), seed=4)
    code = crop.encode_crops(_x(n=6, seed=9))
    np.testing.assert_array_equal(P.predict(model, code, 4), P.predict(model, crop.decode_crops(code), 4))


def test_precision_policy_stays_float32_without_a_fast_gpu():
    import keras

    cfg = ModelConfig(mixed_precision=True)
    if not D.fast_float16_available():
        assert D.precision_policy(cfg) == "float32"
    assert D.precision_policy(cfg.replace(mixed_precision=False)) == "float32"
    before = keras.config.dtype_policy().name
    with D.dtype_policy("mixed_float16"):
        m = A.build_classifier("tiny", SHAPE)
    assert keras.config.dtype_policy().name == before
    # float16 compute, but the probability layer stays float32
    assert m.get_layer("conv0").compute_dtype == "float16" and m.output.dtype == "float32"


def test_scored_models_can_be_freed():
    # The compiled inference function refers to its model; keeping it in a cache keyed by the model kept every
    # model ever scored alive (a ResNet50 per vertebra and per training unit).
    import gc
    import weakref

    import numpy as np

    from cspine_submit.score import build_classifier, predict

    model = build_classifier("tiny", (32, 32, 1))
    assert predict(model, np.zeros((3, 32, 32, 1), np.float32), 4).shape == (3,)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_list_of_files_per_vertebra_is_an_ensemble_averaging_probabilities(tmp_path):
    members = [_randomize(A.build_classifier("tiny", SHAPE), seed=s) for s in (11, 12, 13)]
    x = _x(n=6)
    want = np.mean([np.asarray(m.predict_on_batch(x))[:, 0] for m in members], axis=0)
    files = {v: [f"{v}.fold{i}.keras" for i in range(3)] for v in VERTEBRAE}
    config = _tiny_config("keras").replace(classifier_files=files)
    config.to_json(tmp_path / "model_config.json")
    for i, m in enumerate(members):
        L.save_classifier(m, tmp_path / f"C2.fold{i}.keras")
    _, models = L.load_classifiers(tmp_path, ["C2"])
    got = P.score(models, {"C2": x}, batch_size=4)["C2"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(set(np.round(want, 4))) > 1  # the members differ, so the mean is not any one of them


def _shared_weights(tmp_path):
    """A weights folder mixing a shared ensemble (C1, C2, C4), a shared single file (C3, C5) and two classifiers of
    their own (C6; C7 lists the ensemble's files in the other order, so it is another model)."""
    nets = {name: _randomize(A.build_classifier("tiny", SHAPE), seed=s)
            for name, s in (("a0", 21), ("a1", 22), ("b", 23), ("c", 24))}
    for name, m in nets.items():
        L.save_classifier(m, tmp_path / f"{name}.keras")
    files = {"C1": ["a0.keras", "a1.keras"], "C2": ["a0.keras", "a1.keras"], "C3": "b.keras",
             "C4": ["a0.keras", "a1.keras"], "C5": "b.keras", "C6": "c.keras", "C7": ["a1.keras", "a0.keras"]}
    _tiny_config("keras").replace(classifier_files=files).to_json(tmp_path / "model_config.json")
    return nets


def test_vertebrae_listing_the_same_files_share_one_model_loaded_once(tmp_path, monkeypatch):
    nets = _shared_weights(tmp_path)
    read = []
    real = L.load_classifier
    monkeypatch.setattr(L, "load_classifier", lambda path, config: read.append(Path(path).name) or real(path, config))
    config, models = L.load_classifiers(tmp_path)
    assert sorted(read) == ["a0.keras", "a1.keras", "b.keras", "c.keras"]  # each file once, not 11 reads
    assert models["C1"] is models["C2"] is models["C4"] and models["C3"] is models["C5"]
    assert len({id(m) for m in models.values()}) == 4
    assert [vs for _f, vs in L.classifier_groups(tmp_path, config)] == [
        ("C1", "C2", "C4"), ("C3", "C5"), ("C6",), ("C7",)]
    # Groups go round-robin over the devices, each on one.
    plan = D.DevicePlan("GPU", ("/gpu:0", "/gpu:1"), ("a", "b"), "float32", "test")
    assert plan.place([("C1", "C2", "C4"), ("C3", "C5"), ("C6",), ("C7",)]) == {
        "C1": "/gpu:0", "C2": "/gpu:0", "C4": "/gpu:0", "C3": "/gpu:1", "C5": "/gpu:1", "C6": "/gpu:0", "C7": "/gpu:1"}
    assert plan.place([(v,) for v in VERTEBRAE]) == {v: plan.device_for(v) for v in VERTEBRAE}
    x = _x(n=4, seed=3)
    want = np.mean([np.asarray(nets[n].predict_on_batch(x))[:, 0] for n in ("a0", "a1")], axis=0)
    np.testing.assert_allclose(P.predict(models["C2"], x, 4), want, rtol=1e-5, atol=1e-6)


def test_shared_models_score_in_one_pass_exactly_as_alone(tmp_path, monkeypatch):
    from cspine_submit.score import crop

    _shared_weights(tmp_path)
    _, models = L.load_classifiers(tmp_path)
    rng = np.random.default_rng(7)
    sizes = {"C1": 11, "C2": 0, "C3": 5, "C4": 20, "C5": 3, "C6": 7, "C7": 9}
    crops = {v: crop.encode_crops(rng.uniform(0, 1, (k,) + SHAPE)) for v, k in sizes.items()}
    crops["C5"] = crop.decode_crops(crops["C5"])  # float32 beside uint16 in one group: scored apart, still right
    alone = {v: P.predict(models[v], c, 8) for v, c in crops.items()}
    calls = []
    for m in {id(m): m for m in models.values()}.values():
        fn = P._predict_fn(m)
        object.__setattr__(m, P._PREDICT_FN_ATTR, lambda b, fn=fn: calls.append(len(b)) or fn(b))
    got = P.score(models, crops, batch_size=8)
    assert list(got) == list(crops)
    for v, k in sizes.items():
        assert got[v].shape == (k,) and got[v].dtype == np.float32
        np.testing.assert_allclose(got[v], alone[v], rtol=0, atol=1e-6)
    # C1+C4 (C2 empty): 31 crops -> 8, 8, 8, 8 (7 real); C3 uint16: 5 -> 8; C5 float32: 3 -> 4; C6: 7 -> 8;
    # C7: 9 -> 8, 1. Scored alone it would be 2 + 3 + 1 + 1 + 1 + 2 = 10 calls.
    assert sorted(calls) == sorted([8, 8, 8, 8, 8, 4, 8, 8, 1])
    assert set(P.score(models, {"C2": crops["C2"], "C6": crops["C6"][:0]}).keys()) == {"C2", "C6"}


def test_batches_lay_arrays_end_to_end_and_pad_the_last():
    arrays = [np.arange(a, b, dtype=np.float32).reshape(-1, 1) for a, b in ((0, 5), (5, 5), (5, 16), (16, 19))]
    batches = list(P._batches([a for a in arrays if len(a)], 4))
    assert [(len(b), n) for b, n in batches] == [(4, 4)] * 4 + [(4, 3)]
    np.testing.assert_array_equal(np.concatenate([b[:n] for b, n in batches])[:, 0], np.arange(19))
    assert np.all(batches[-1][0][3:] == 0)
    assert np.shares_memory(batches[0][0], arrays[0])  # within one array: a view, no copy


def test_a_bad_file_costs_only_the_vertebrae_that_list_it(tmp_path):
    from cspine_submit.submit import run as pipeline

    _shared_weights(tmp_path)
    (tmp_path / "b.keras").write_bytes(b"not a zip")
    failures = {}
    _, models = L.load_classifiers(tmp_path, failures=failures)
    assert sorted(models) == ["C1", "C2", "C4", "C6", "C7"] and sorted(failures) == ["C3", "C5"]
    assert "b.keras" in str(failures["C3"])
    with pytest.raises(ValueError, match="b.keras"):
        L.load_classifiers(tmp_path)
    _, models, messages = pipeline.load_models(tmp_path)
    assert sorted(models) == ["C1", "C2", "C4", "C6", "C7"]
    assert [m.split(" could")[0] for m in messages] == ["classifier for C3", "classifier for C5"]
