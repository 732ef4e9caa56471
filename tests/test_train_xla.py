"""Training under XLA: the augmentation's warp is written in ops XLA compiles, ``jit_compile`` is an explicit choice,
and device errors end training with a message naming the cause and the option to change."""

import numpy as np
import pytest

from cspine_submit.config import ModelConfig
from cspine_submit.train import data as td
from cspine_submit.train import fit
from cspine_submit.train.options import TrainOptions, resolve_jit_compile

TINY = ModelConfig(head="tiny", input_size=32, channels="single", windows=((400.0, 1800.0),),
                   slices_per_vertebra=3, top_k=1, mixed_precision=False)


def _random_affine(rng, n, size, shift=3.0):
    ang, sc = rng.uniform(-0.3, 0.3, n), 1 + rng.uniform(-0.2, 0.2, n)
    c = (size - 1) / 2
    a0, a1, b0, b1 = np.cos(ang) / sc, -np.sin(ang) / sc, np.sin(ang) / sc, np.cos(ang) / sc
    z = np.zeros(n)
    return np.stack([a0, a1, c - a0 * c - a1 * c + rng.uniform(-shift, shift, n), b0, b1,
                     c - b0 * c - b1 * c, z, z], 1).astype(np.float32)


@pytest.mark.parametrize("shape", [(4, 32, 32, 1), (3, 33, 40, 3)])
def test_affine_warp_samples_as_the_projective_transform_op_and_compiles(shape):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 1, shape).astype(np.float32))
    t = tf.constant(_random_affine(rng, shape[0], shape[1]))
    ref = tf.raw_ops.ImageProjectiveTransformV3(images=x, transforms=t, output_shape=tf.shape(x)[1:3],
                                                fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    np.testing.assert_allclose(td.affine_warp(x, t).numpy(), ref.numpy(), atol=1e-6)
    compiled = tf.function(td.affine_warp, jit_compile=True)(x, t)
    np.testing.assert_allclose(compiled.numpy(), ref.numpy(), atol=1e-5)
    # The identity transform gives the image back; a shift of a whole image width gives zeros (the fill).
    eye = tf.constant(np.tile([[1, 0, 0, 0, 1, 0, 0, 0]], (shape[0], 1)).astype(np.float32))
    np.testing.assert_allclose(td.affine_warp(x, eye).numpy(), x.numpy(), atol=1e-6)
    away = tf.constant(np.tile([[1, 0, shape[2], 0, 1, 0, 0, 0]], (shape[0], 1)).astype(np.float32))
    assert float(tf.reduce_max(tf.abs(td.affine_warp(x, away)))) == 0.0


def _blobs(n, size, seed):
    """Half the images hold a bright square near the centre (label 1), the rest only noise (label 0)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.3, (n, size, size, 1)).astype(np.float32)
    y = (np.arange(n) % 2).astype(np.float32)
    lo = size // 2 - size // 6
    x[y == 1, lo:lo + size // 3, lo:lo + size // 3] += 0.6
    return x, y[:, None]


def test_training_with_xla_forced_on_cpu_runs_and_learns_with_the_augmentation():
    import keras
    import tensorflow as tf

    fit._set_seeds(1)
    options = TrainOptions(augment=True, learning_rate=3e-3)
    model = fit._make_model(TINY, options, tf.distribute.get_strategy(), seed=5, jit_compile=True)
    assert model.name == "augmenting" and model.jit_compile is True
    x, y = _blobs(64, 32, seed=0)
    history = model.fit(x, y, batch_size=16, epochs=6, verbose=0, shuffle=False).history["loss"]
    assert model.jit_compile is True  # Keras did not fall back to an uncompiled step
    assert history[-1] < 0.7 * history[0], history
    # The augmentation ran inside the compiled step: in training mode its layer changes the crops.
    aug = model.layers[1](x[:4], training=True).numpy()
    assert not np.allclose(aug, x[:4])
    keras.backend.clear_session()


def test_jit_compile_choice():
    assert resolve_jit_compile("auto", gpus=1, replicas=1) is True           # a P100 or one T4
    assert resolve_jit_compile("auto", gpus=2, replicas=2) is False          # 2 x T4, MirroredStrategy
    assert resolve_jit_compile("auto", gpus=0, replicas=1) is False          # the CPU
    assert resolve_jit_compile("on", gpus=0, replicas=1) is True
    assert resolve_jit_compile("off", gpus=1, replicas=1) is False
    with pytest.raises(ValueError, match="jit_compile"):
        resolve_jit_compile("yes", gpus=1, replicas=1)


def test_device_errors_name_the_cause_and_the_option_to_change():
    import tensorflow as tf

    options = TrainOptions(batch_size=16)
    oom = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[16,2048,16,16]")
    err = fit.device_error(oom, tag="f0/C1", config=TINY, options=options, jit_compile=False, replicas=2)
    assert isinstance(err, fit.TrainingDeviceError)
    assert "out of device memory" in str(err) and "--batch-size" in str(err) and "f0/C1" in str(err)
    assert "batch 16 per replica x 2" in str(err)
    xla = tf.errors.InvalidArgumentError(None, None, "No registered 'Foo' OpKernel for XLA_GPU_JIT devices")
    err = fit.device_error(xla, tag="f1/all", config=TINY, options=options, jit_compile=True, replicas=1)
    assert "XLA could not compile" in str(err) and "--jit-compile off" in str(err)
    assert fit.device_error(ValueError("not a device error"), tag="f0/C1", config=TINY, options=options,
                            jit_compile=True, replicas=1) is None


def test_train_command_ends_a_device_error_with_exit_3_and_the_message(tmp_path, monkeypatch, capsys):
    import cspine_submit.train as train_face
    from cspine_submit.cli import main

    def out_of_memory(*args, **kwargs):
        raise fit.TrainingDeviceError("out of device memory training f0/C1: lower --batch-size")

    import cspine_submit.train.run as run_mod

    monkeypatch.setattr(train_face, "train_classifiers", out_of_memory)
    monkeypatch.setattr(run_mod, "plan_run", lambda data, options: None)  # no data here: the label check passes
    monkeypatch.setattr(run_mod, "check_trainable", lambda plan, options: None)
    monkeypatch.setattr(run_mod, "check_inference_memory", lambda config, plan, options: {})
    ranges = tmp_path / "ranges.json"
    argv = ["train", "--data", str(tmp_path), "--ranges", str(ranges), "--out", str(tmp_path / "w"), "--quiet"]
    assert main(argv) == 3
    out = capsys.readouterr().out
    assert "error: out of device memory" in out and "--resume" in out and "Traceback" not in out
