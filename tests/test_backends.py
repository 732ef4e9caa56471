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
