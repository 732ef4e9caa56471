"""Reproducible training on the CPU: the same data, config and seed give the same bytes at any intra-op thread count,
after a kill and ``--resume``, and in a second run; each replica of a MirroredStrategy draws its own augmentation;
no per-batch callback (a host sync) without a progress bar."""

import hashlib
import json
import subprocess
import sys
import textwrap
import zipfile

import pytest

from cspine_submit.config import ModelConfig
from cspine_submit.train import fit
from cspine_submit.train.determinism import normalise_keras_file
from cspine_submit.train.options import TrainOptions
from cspine_submit.train.run import train_classifiers

TINY = ModelConfig(head="tiny", input_size=32, channels="single", windows=((400.0, 1800.0),),
                   slices_per_vertebra=3, top_k=1, mixed_precision=False)
OPTIONS = dict(folds=2, epochs=2, batch_size=8, shared=True, box_policy="study", workers=0, seed=3,
               trained_on="synthetic", source="test")


def _digests(folder):
    """sha256 of every file a run writes into its weights folder."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_run_killed_after_an_epoch_and_resumed_writes_the_same_bytes(synthetic_dataset, synthetic_ranges, tmp_path,
                                                                       monkeypatch):
    options = TrainOptions(**OPTIONS, work_dir=str(tmp_path / "work_a"))
    train_classifiers(synthetic_dataset, synthetic_ranges, tmp_path / "a", TINY, options, progress=False)
    a = _digests(tmp_path / "a")
    assert sorted(a) == ["MANIFEST.json", "all.f0.keras", "all.f1.keras", "model_config.json", "oof.csv",
                         "slice_ranges.json", "validation.json"]

    # Killed after the first epoch of the first fold (its checkpoint and history row are on disk), then resumed.
    real = fit.append_history
    calls = []

    def killed(path, row):
        real(path, row)
        calls.append(row["epoch"])
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(fit, "append_history", killed)
    options_c = TrainOptions(**OPTIONS, work_dir=str(tmp_path / "work_c"))
    with pytest.raises(KeyboardInterrupt):
        train_classifiers(synthetic_dataset, synthetic_ranges, tmp_path / "c", TINY, options_c, progress=False)
    train_classifiers(synthetic_dataset, synthetic_ranges, tmp_path / "c", TINY, options_c, resume=True, progress=False)
    assert calls == [1, 2, 1, 2]  # the resumed fold went on at epoch 2
    assert _digests(tmp_path / "c") == a  # .keras files, MANIFEST.json and the oof score: byte for byte


RUN_AT_THREADS = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))  # what a caller may have set
    from cspine_submit.config import ModelConfig
    from cspine_submit.train.options import TrainOptions
    from cspine_submit.train.run import train_classifiers
    config = ModelConfig(**json.loads(sys.argv[5]))
    options = TrainOptions(**json.loads(sys.argv[6]))
    result = train_classifiers(sys.argv[2], sys.argv[3], sys.argv[4], config, options, progress=False)
    print(result.validation["training"]["intra_op_threads"])
""")


def test_weights_and_oof_score_do_not_depend_on_the_thread_count_tensorflow_started_with(synthetic_dataset,
                                                                                       synthetic_ranges, tmp_path):
    cfg = json.dumps({"head": "tiny", "input_size": 32, "channels": "single", "windows": [[400.0, 1800.0]],
                      "slices_per_vertebra": 3, "top_k": 1, "mixed_precision": False})
    outs = []
    for threads in (1, 2):
        out = tmp_path / f"w{threads}"
        opts = json.dumps({**OPTIONS, "epochs": 1, "work_dir": str(tmp_path / f"work{threads}")})
        done = subprocess.run([sys.executable, "-c", RUN_AT_THREADS, str(threads), str(synthetic_dataset),
                               str(synthetic_ranges), str(out), cfg, opts], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split()[-1] == "2"  # training pinned its pool at TrainOptions.threads
        outs.append(_digests(out))
    assert outs[0] == outs[1]  # two trainings, two processes: the same .keras bytes, MANIFEST.json, oof score


def test_normalised_keras_files_depend_only_on_the_model(tmp_path):
    import keras

    from cspine_submit.score.models import build_classifier, save_classifier

    keras.utils.set_random_seed(0)
    model = build_classifier("tiny", (16, 16, 1))
    a = normalise_keras_file(save_classifier(model, tmp_path / "a.keras"))
    b = save_classifier(model, tmp_path / "b.keras")
    with zipfile.ZipFile(b) as z:
        meta = json.loads(z.read("metadata.json"))
    assert "date_saved" in meta  # what Keras writes
    normalise_keras_file(b)
    assert a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as z:
        assert "date_saved" not in json.loads(z.read("metadata.json"))
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    back = keras.models.load_model(a)
    x = keras.random.uniform((2, 16, 16, 1), seed=1)
    assert float(keras.ops.max(keras.ops.abs(back(x) - model(x)))) == 0.0


REPLICAS = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from cspine_submit.train.data import TrainAugment
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        layer = TrainAugment(seed=4, dtype="float32")
        layer.build((None, 24, 24, 1))
    x = tf.constant(np.random.default_rng(0).uniform(0, 1, (1, 24, 24, 1)).astype(np.float32))
    out = strategy.run(tf.function(lambda: layer(x, training=True)))
    a, b = [t.numpy() for t in strategy.experimental_local_results(out)]
    single = TrainAugment(seed=4, dtype="float32")(x, training=True).numpy()
    print(np.abs(a - b).max() > 1e-3, np.abs(a - single).max() < 1e-5)
""")


def test_each_replica_draws_its_own_augmentation():
    done = subprocess.run([sys.executable, "-c", REPLICAS], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["True", "True"]  # replicas differ; replica 0 is the one-device draw


def test_no_batch_callback_without_a_progress_bar(monkeypatch):
    """Keras skips the per-batch hooks (and their host syncs) when no callback defines one."""
    seen = []

    class FakeModel:
        class optimizer:
            class learning_rate:
                assign = staticmethod(lambda v: None)

        def fit(self, *args, callbacks=(), **kwargs):
            seen.append(list(callbacks))

            class H:
                history = {"loss": [0.5], "auc": [0.6]}

            return H()

    fit._fit_epoch(FakeModel(), None, None, 1, tag="f0/C1", steps=3, lr=1e-3, options=TrainOptions(), progress=False)
    assert seen[-1] == []
