"""score/backends.py: the demo classifiers score the same on Keras's tensorflow, jax and torch backends (CPU), and
the backend is chosen before Keras loads, said in the report's devices. Each backend runs in its own process
(Keras picks its backend at import); jax and torch tests skip when the package is not installed."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "weights" / "demo"

_SCORE = r"""
import json, sys
import numpy as np
from cspine_submit.score.backends import choose_backend
choice = choose_backend(sys.argv[1])
from cspine_submit.config import VERTEBRAE
from cspine_submit.score import loading, plan_devices, prediction
from cspine_submit.score.crop import encode_crops
import keras
assert keras.backend.backend() == choice.name, (keras.backend.backend(), choice)
config, models = loading.load_classifiers(sys.argv[2])
rng = np.random.default_rng(0)
crops = {v: rng.uniform(0, 1, (k, *config.input_shape)).astype(np.float32) for v, k in zip(VERTEBRAE, (15, 3, 0, 9, 15, 1, 17))}
codes = {v: encode_crops(c) for v, c in crops.items()}
got_codes = prediction.score(models, codes, batch_size=8)
got_float = prediction.score(models, crops, batch_size=8)
devices = plan_devices(config).with_placement(models).to_dict()
print(json.dumps({"backend": choice.to_dict(), "devices": devices,
                  "codes": {v: p.tolist() for v, p in got_codes.items()},
                  "float": {v: p.tolist() for v, p in got_float.items()}}))
"""


def _score(backend: str, requested: str | None = None) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
    env.pop("KERAS_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", _SCORE, requested or backend, str(DEMO)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tensorflow_scores():
    return _score("tensorflow")


def _max_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(np.asarray(a[v]) - np.asarray(b[v])), initial=0.0)) for v in a)


def test_auto_keeps_tensorflow_without_a_gpu_and_says_so(tensorflow_scores):
    auto = _score("tensorflow", "auto")
    assert auto["backend"]["name"] == "tensorflow" and "sees a GPU" in auto["backend"]["why"]
    assert auto["devices"]["backend"]["requested"] == "auto"
    assert _max_diff(auto["codes"], tensorflow_scores["codes"]) == 0.0


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_backends_give_tensorflows_probabilities(tensorflow_scores, backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    got = _score(backend)
    assert got["backend"]["name"] == backend and got["devices"]["backend"]["name"] == backend
    assert got["devices"]["kind"] == "CPU" and got["devices"]["memory"]["fits"]
    for key in ("codes", "float"):
        assert sorted(got[key]) == sorted(tensorflow_scores[key])
        assert [len(p) for p in got[key].values()] == [len(p) for p in tensorflow_scores[key].values()]
        assert _max_diff(got[key], tensorflow_scores[key]) <= 1e-5


def test_a_backend_cannot_change_once_keras_is_loaded_and_unknown_names_are_refused():
    import keras  # noqa: F401 - loaded with this process's backend

    from cspine_submit.score import backends

    other = "jax" if keras.backend.backend() != "jax" else "torch"
    with pytest.raises(RuntimeError, match="already imported"):
        backends.choose_backend(other)
    with pytest.raises(ValueError, match="expected auto or one of"):
        backends.choose_backend("mxnet")
    assert backends.choose_backend("auto").name == keras.backend.backend()


_TWO_JAX_DEVICES = r"""
import sys, numpy as np
from cspine_submit.score.backends import choose_backend
choose_backend("jax")
import jax, keras
assert len(jax.devices()) == 2, jax.devices()
from cspine_submit.config import VERTEBRAE
from cspine_submit.score import loading as L, plan_devices, prediction as P
from cspine_submit.score.crop import encode_crops
demo, single_dir = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
codes = {v: encode_crops(rng.uniform(0, 1, (k, 64, 64, 1))) for v, k in zip(VERTEBRAE, (15, 15, 15, 0, 15, 9, 15))}
for weights in (demo, single_dir):
    config, models = L.load_classifiers(weights)
    m = models["C1"]
    assert isinstance(m, P.Spread) and len(set(m.devices)) == 2, m.devices
    for part in m.parts:  # each part's variables on its own device
        dev_id = int(part._cspine_device.rsplit(":", 1)[1])
        assert all(w.value.devices() == {jax.devices()[dev_id]} for w in part.weights), part._cspine_device
    files = [weights + "/" + f for f in config.classifier_paths("C1")]
    with keras.device("cpu:0"):
        members = [L.load_classifier(f, config) for f in files]
        one = members[0] if len(members) == 1 else L.average_classifiers(members, config.input_shape, "one")
    # each call runs where its weights are: a copy of them to another device would raise
    jax.config.update("jax_transfer_guard_device_to_device", "disallow")
    got = P.score(models, codes, batch_size=8)
    want = P.score({v: one for v in VERTEBRAE}, codes, batch_size=8)
    jax.config.update("jax_transfer_guard_device_to_device", "allow")
    diff = max(float(np.max(np.abs(got[v] - want[v]), initial=0)) for v in VERTEBRAE)
    assert diff <= 1e-6, diff
    print("OK", m.mode, "+".join(m.devices), diff, plan_devices(config).strategy)
"""


def test_jax_spreads_an_ensemble_and_a_shared_network_over_two_devices(tmp_path):
    # Two jax CPU devices (XLA splits the host) stand in for two GPUs, as two logical TensorFlow devices do in
    # test_memory_plan: the demo's 5 members go 3 + 2, one shared network is replicated; one device's scores.
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    import shutil

    from cspine_submit.config import VERTEBRAE, ModelConfig

    single = tmp_path / "single"
    single.mkdir()
    config = ModelConfig.from_json(DEMO / "model_config.json")
    config.replace(classifier_files={v: "all.f0.keras" for v in VERTEBRAE}).to_json(single / "model_config.json")
    shutil.copy(DEMO / "all.f0.keras", single / "all.f0.keras")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env.pop("KERAS_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", _TWO_JAX_DEVICES, str(DEMO), str(single)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("OK")]
    assert lines[0].startswith("OK members jax:cpu:0+jax:cpu:1+jax:cpu:0+jax:cpu:1+jax:cpu:0"), lines
    assert lines[1].startswith("OK replicas jax:cpu:0+jax:cpu:1"), lines
    assert "spread over 2 CPU devices" in lines[0]
