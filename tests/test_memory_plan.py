"""score/memory.py: byte counts against real Keras models, placements that fit, refusals with the numbers, and
both devices busy (two logical CPU devices) with the one-device scores."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cspine_submit.config import VERTEBRAE, ModelConfig
from cspine_submit.score import memory as MEM
from cspine_submit.score.memory import GiB, DeviceMemory, MemoryPlanError, plan_memory

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "weights" / "demo"


def _folds(config, k=5, shared=False):
    if shared:
        return config.replace(classifier_files={v: tuple(f"all.f{i}.keras" for i in range(k)) for v in VERTEBRAE})
    return config.replace(classifier_files={v: tuple(f"{v}.f{i}.keras" for i in range(k)) for v in VERTEBRAE})


SEED = ModelConfig(head="seed", input_size=512, channels="single", windows=((400.0, 1800.0),), batch_size=16)
GAP = ModelConfig()  # the package default: gap head, 256x256x3, batch 32
ONE_16GB = [DeviceMemory("/device:GPU:0", 15 * GiB, "GPU", "T4 default")]
TWO_T4 = [DeviceMemory(f"/device:GPU:{i}", 15 * GiB, "GPU", "T4 default") for i in range(2)]


@pytest.mark.parametrize("head,shape", [("tiny", (64, 64, 1)), ("tiny", (32, 32, 3)), ("gap", (64, 64, 3)),
                                        ("gap", (32, 32, 1)), ("seed", (64, 64, 1)), ("seed", (96, 96, 3))])
def test_counts_match_the_built_keras_models(head, shape):
    from cspine_submit.score.architectures import build_classifier

    model = build_classifier(head, shape)
    assert MEM.parameter_count(head, shape) == model.count_params()
    assert MEM.activation_elements(head, shape) == MEM.graph_peak_elements(model)


def test_seed_head_bytes_are_the_issues_numbers():
    # count_params of the seed head at 512x512x1 (asserted against the built model in test_models) -> 0.588 GiB.
    net = MEM.network_bytes(SEED, "float32")
    assert net.params == 157_799_681 and net.weights == 4 * 157_799_681
    assert round(net.weights / GiB, 3) == 0.588 and net.cast_copy == 0
    assert MEM.network_bytes(SEED, "mixed_float16").cast_copy == 2 * 157_799_681
    assert MEM.parameter_count("gap", (256, 256, 3)) == 23_589_761


def test_seed_ensemble_on_one_16gb_device_is_refused_with_the_numbers_and_options():
    plan = plan_memory(_folds(SEED), ONE_16GB, host_usable=13 * GiB)
    assert not plan.fits and plan.files == 35
    with pytest.raises(MemoryPlanError) as err:
        MEM.require_fit(plan)
    msg = str(err.value)
    for want in ("35 classifier file(s)", "157,799,681", "20.575 GiB", "15.0 GiB", "--final refit", "gap head",
                 "fewer folds", "in turn: the host holds 13.0 GiB"):
        assert want in msg, (want, msg)
    assert isinstance(err.value, ValueError) and err.value.plan is plan


def test_seed_ensemble_on_one_device_is_re_placed_in_turn_when_the_host_holds_the_weights():
    plan = plan_memory(_folds(SEED), ONE_16GB, host_usable=32 * GiB)
    assert plan.fits and plan.placement.startswith("weights in host memory")
    assert {g.mode for g in plan.groups} == {"in turn"}
    (load,) = plan.loads
    assert load.weights == 0 and load.need < 2 * GiB  # one member (0.588 GiB) and its call at a time
    assert plan.host_weights == 35 * 4 * 157_799_681


def test_seed_ensemble_spreads_over_two_t4s_and_single_seed_fits_one_device():
    plan = plan_memory(_folds(SEED), TWO_T4, precision="mixed_float16", host_usable=13 * GiB)
    assert plan.fits and plan.batch_size == 16 and plan.placement.startswith("ensemble members spread")
    assert sorted(ld.members for ld in plan.loads) == [17, 18]
    single = plan_memory(SEED, ONE_16GB)
    assert single.fits and single.loads[0].members == 7 and single.loads[0].need < 6 * GiB


def test_gap_head_ensemble_fits_one_16gb_device_resident():
    plan = MEM.require_fit(plan_memory(_folds(GAP), ONE_16GB))
    assert plan.batch_size == 32 and plan.loads[0].members == 35 and plan.loads[0].need < 6 * GiB
    assert {g.mode for g in plan.groups} == {"whole"}
    json.dumps(plan.to_dict())  # goes in the run report as is
    assert set(MEM.kaggle_plans(_folds(GAP))) == {"P100", "2xT4"}
    assert all(p.fits for p in MEM.kaggle_plans(_folds(GAP)).values())


def test_a_smaller_batch_is_chosen_before_giving_up_residency():
    cfg = SEED.replace(batch_size=64)
    big = plan_memory(cfg, [DeviceMemory("g", 100 * GiB, "GPU")])
    need64 = big.loads[0].need
    per_image = MEM.network_bytes(cfg, "float32").per_image
    device = DeviceMemory("g", need64 - 40 * per_image, "GPU")  # 64 images too many, 16 fit
    plan = plan_memory(cfg, [device])
    assert plan.fits and plan.batch_size == 16 and plan.requested_batch_size == 64
    assert plan.placement.startswith("networks whole")


def test_a_shared_network_is_replicated_and_an_ensemble_split_on_two_devices():
    two = [DeviceMemory(f"d{i}", 8 * GiB, "CPU") for i in range(2)]
    one = GAP.replace(classifier_files={v: "all.keras" for v in VERTEBRAE})
    rep = plan_memory(one, two)
    assert [g.mode for g in rep.groups] == ["replicas"] and rep.groups[0].devices == ("d0", "d1")
    ens = plan_memory(_folds(GAP, shared=True), two)
    assert [g.mode for g in ens.groups] == ["members"] and ens.groups[0].devices == ("d0", "d1", "d0", "d1", "d0")


def test_load_refuses_before_reading_a_file_when_nothing_fits(monkeypatch):
    from cspine_submit.score import loading

    monkeypatch.setattr(MEM, "host_available_bytes", lambda: 1024**2)  # the CPU device gets 1 MiB
    monkeypatch.setattr(loading, "load_classifier", lambda *a: pytest.fail("a file was read"))
    with pytest.raises(MemoryPlanError, match="do not fit"):
        loading.load_classifiers(DEMO)


def test_out_of_memory_while_loading_becomes_a_clear_error_per_group(monkeypatch):
    import tensorflow as tf

    from cspine_submit.score import loading

    def oom(path, config):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[32768,256]")

    monkeypatch.setattr(loading, "load_classifier", oom)
    failures = {}
    config, models = loading.load_classifiers(DEMO, failures=failures)
    assert models == {} and sorted(failures) == sorted(VERTEBRAE)
    err = failures["C1"]
    assert isinstance(err, MEM.DeviceOutOfMemoryError) and isinstance(err, ValueError)
    assert "out of memory loading all.f0.keras" in str(err) and "CPU:0" in str(err)
    with pytest.raises(MEM.DeviceOutOfMemoryError):
        loading.load_classifiers(DEMO)


def test_the_report_carries_the_memory_plan():
    from cspine_submit.score import loading, plan_devices

    config, models = loading.load_classifiers(DEMO)
    devices = plan_devices(config).with_placement(models).to_dict()
    memory = devices["memory"]
    assert memory["fits"] and memory["files"] == 5 and memory["networks"] == 1
    assert memory["params_per_file"] == MEM.parameter_count("tiny", (64, 64, 1))
    json.dumps(devices)


_TWO_DEVICES = r"""
import sys, numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from cspine_submit.config import VERTEBRAE, ModelConfig
from cspine_submit.score import loading as L, prediction as P
from cspine_submit.score.crop import encode_crops
demo, single_dir = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
codes = {v: encode_crops(rng.uniform(0, 1, (k, 64, 64, 1))) for v, k in zip(VERTEBRAE, (15, 15, 15, 0, 15, 9, 15))}
for weights in (demo, single_dir):
    config, models = L.load_classifiers(weights)
    m = models["C1"]
    assert all(models[v] is m for v in VERTEBRAE)
    assert isinstance(m, P.Spread) and len({p._cspine_device for p in m.parts}) == 2, m._cspine_device
    for part in m.parts:  # each part's variables on its own device
        assert all(w.value.device.endswith(part._cspine_device.split("device:")[-1]) for w in part.weights)
    files = [weights + "/" + f for f in config.classifier_paths("C1")]
    with tf.device("/device:CPU:0"):
        members = [L.load_classifier(f, config) for f in files]
        one = members[0] if len(members) == 1 else L.average_classifiers(members, config.input_shape, "one")
    got = P.score(models, codes, batch_size=8)
    want = P.score({v: one for v in VERTEBRAE}, codes, batch_size=8)
    diff = max(float(np.max(np.abs(got[v] - want[v]), initial=0)) for v in VERTEBRAE)
    assert diff <= 1e-6, diff
    print("OK", m.mode, m._cspine_device, diff)
"""


def test_two_devices_both_busy_with_the_one_device_scores(tmp_path):
    # A 5-member ensemble shared by every vertebra (the demo) is split over both devices, members 3 + 2; one network
    # shared by every vertebra is replicated and each study's crops split between the copies.
    single = tmp_path / "single"
    single.mkdir()
    config = ModelConfig.from_json(DEMO / "model_config.json")
    config.replace(classifier_files={v: "all.f0.keras" for v in VERTEBRAE}).to_json(single / "model_config.json")
    shutil.copy(DEMO / "all.f0.keras", single / "all.f0.keras")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES, str(DEMO), str(single)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("OK")]
    assert lines[0].startswith("OK members /device:CPU:0+/device:CPU:1+/device:CPU:0+/device:CPU:1+/device:CPU:0")
    assert lines[1].startswith("OK replicas /device:CPU:0+/device:CPU:1")


def _submit(tmp_path, monkeypatch, capsys, break_loading):
    """``submit`` on two small studies with the loading broken by ``break_loading(monkeypatch)``; (exit, rows, log)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _pipeline_helpers import UID_ROOT, write_study, write_weights

    from cspine_submit.cli import main as cli_main
    from cspine_submit.score import aggregate

    weights = write_weights(tmp_path / "weights")
    images = tmp_path / "images"
    for i in range(2):
        write_study(images / f"{UID_ROOT}.{500 + i}", f"{UID_ROOT}.{500 + i}", seed=i)
    break_loading(monkeypatch)
    out = tmp_path / "submission.csv"
    code = cli_main(["submit", "--no-progress", "--workers", "0", "--test-dir", str(images), "--weights",
                     str(weights), "--out", str(out)])
    rows = [r.split(",") for r in out.read_text().splitlines()[1:]]
    priors = aggregate.prior_probabilities(ModelConfig.from_json(weights / "model_config.json"))
    assert len(rows) == 16 and all(float(p) == pytest.approx(priors[rid.split("_", 1)[1]]) for rid, p in rows)
    return code, capsys.readouterr().out


def test_out_of_memory_at_load_ends_submit_with_exit_3_and_the_complete_priors_file(tmp_path, monkeypatch, capsys):
    def oom(monkeypatch):
        import tensorflow as tf

        from cspine_submit.score import loading

        def load(path, config):
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[32768,256]")

        monkeypatch.setattr(loading, "load_classifier", load)

    code, log = _submit(tmp_path, monkeypatch, capsys, oom)
    assert code == 3 and "out of memory loading" in log and "Traceback" not in log


def test_a_refused_memory_plan_ends_submit_with_exit_3_the_reason_and_the_priors(tmp_path, monkeypatch, capsys):
    def tiny_host(monkeypatch):
        monkeypatch.setattr(MEM, "host_available_bytes", lambda: 1024**2)

    code, log = _submit(tmp_path, monkeypatch, capsys, tiny_host)
    assert code == 3 and "do not fit the devices' memory" in log and "--final refit" in log
