"""``train --plan`` tells the truth early: fractured/intact studies per vertebra and fold, a refusal before
TensorFlow of a run that cannot train, this machine's timed step, the disk against Kaggle's 20 GB, no TensorFlow
start-up noise."""

import json
import re
import subprocess
import sys

import pandas as pd
import pytest

from cspine_submit import quiet
from cspine_submit.config import VERTEBRAE

TINY_ARGS = ["--head", "tiny", "--input-size", "32", "--channels", "single", "--windows", "400/1800",
             "--slices-per-vertebra", "3", "--workers", "0"]


def _cli(*argv, timeout=600):
    code = "import sys; from cspine_submit.cli import main; rc = main(sys.argv[1:]); " \
           "print('TENSORFLOW_LOADED', 'tensorflow' in sys.modules); sys.exit(rc)"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=timeout)


def test_plan_json_counts_labels_per_vertebra_and_fold_times_a_step_and_counts_disk(synthetic_dataset,
                                                                                     synthetic_ranges, tmp_path):
    done = _cli("train", "--data", str(synthetic_dataset), "--ranges", str(synthetic_ranges),
                "--out", str(tmp_path / "w"),
                *TINY_ARGS, "--folds", "2", "--seed", "3", "--shared", "--plan", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout[: done.stdout.rindex("TENSORFLOW_LOADED")]
    plan = json.loads(text)
    noise = [line for line in (done.stdout + done.stderr).splitlines()
             if any(re.search(p, line) for p in quiet.START_UP_PATTERNS)]
    assert noise == []  # TensorFlow's start-up lines hidden without --verbose

    labels = pd.read_csv(synthetic_dataset / "train.csv", dtype={"StudyInstanceUID": str})
    assert sorted(plan["labels"]) == sorted(VERTEBRAE) and set(plan["labels"]["C1"]) == {"f0", "f1"}
    for v in VERTEBRAE:
        per = plan["labels"][v]
        assert sum(c["held_positive"] for c in per.values()) == int(labels[v].sum())  # every study held out once
        assert sum(c["held_positive"] + c["held_negative"] for c in per.values()) == len(labels)
        for c in per.values():
            assert c["train_positive"] + c["held_positive"] == int(labels[v].sum())
    machine = plan["this_machine"]
    assert machine["device"] == "CPU" and machine["seconds_per_step"] > 0 and machine["params"] > 0
    assert plan["epoch"]["this_machine_seconds"] > 0 and plan["run"]["this_machine_hours"] > 0
    disk = plan["disk_bytes"]
    assert disk["models"] == plan["run"]["models"] * machine["params"] * 4
    assert disk["total"] == pytest.approx(disk["cache"] + disk["models"] + disk["checkpoints"], abs=2)
    assert disk["fits_kaggle"] is True and disk["kaggle_limit"] == 20e9
    assert "FACTS.md" not in text
    assert set(plan["inference_memory"]) == {"P100", "2xT4"} and all(m["fits"] for m in plan["inference_memory"].values())
    assert plan["inference_memory"]["P100"]["files"] == 2  # --shared, 2 folds: the two fold models ship


def test_classifiers_that_fit_no_kaggle_machine_are_refused_with_the_numbers_and_options():
    from cspine_submit.config import ModelConfig
    from cspine_submit.score.memory import MemoryPlanError
    from cspine_submit.train.options import TrainOptions
    from cspine_submit.train.run import RunPlan, check_inference_memory

    seed_head = ModelConfig(head="seed", input_size=512, channels="single")
    units = [(v, [v]) for v in VERTEBRAE]
    ten_folds = RunPlan({}, [], {}, [f"f{i}" for i in range(10)], units, {})
    with pytest.raises(MemoryPlanError, match="--final refit"):  # 70 models of 0.59 GiB
        check_inference_memory(seed_head, ten_folds, TrainOptions(folds=10))
    plans = check_inference_memory(seed_head, ten_folds, TrainOptions(folds=10, final="refit"))  # 7 models
    assert all(p.files == 7 for p in plans.values()) and any(p.fits for p in plans.values())


def test_a_vertebra_without_fractures_is_refused_before_tensorflow_naming_the_options(synthetic_dataset,
                                                                                     synthetic_ranges, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train_images").symlink_to(synthetic_dataset / "train_images")
    labels = pd.read_csv(synthetic_dataset / "train.csv", dtype={"StudyInstanceUID": str})
    labels["C3"] = 0
    labels["patient_overall"] = labels[list(VERTEBRAE)].max(axis=1)
    labels.to_csv(data / "train.csv", index=False)
    for extra in ([], ["--plan", "--json"]):
        done = _cli("train", "--data", str(data), "--ranges", str(synthetic_ranges), "--out", str(tmp_path / "w"),
                    *TINY_ARGS, "--folds", "2", "--seed", "3", "--vertebrae", "C3,C5", *extra)
        assert done.returncode == 2, done.stdout + done.stderr[-2000:]
        assert "cannot train C3" in done.stdout and "--shared" in done.stdout and "--vertebrae C5" in done.stdout
        assert "TENSORFLOW_LOADED False" in done.stdout
    assert not (tmp_path / "w").exists()


def test_plan_table_lists_every_vertebra_and_fold():
    from cspine_submit.train.plan import format_label_counts

    counts = {v: {f: {"train_positive": 2, "train_negative": 5, "held_positive": 1, "held_negative": 2}
                  for f in ("f0", "f1", "f2")} for v in ("C1", "C2")}
    lines = format_label_counts(counts)
    assert "f2" in lines[1] and lines[2].split()[0] == "C1" and lines[2].count("2/5 (1/2)") == 3


def test_one_split_with_a_single_held_out_study_is_refused_before_training():
    from cspine_submit.train.options import TrainOptions
    from cspine_submit.train.run import RunPlan, check_trainable

    labels = {f"s{i}": {"C1": i % 2} for i in range(3)}
    plan = RunPlan(labels, sorted(labels), {"s0": -1, "s1": -1, "s2": 0}, ["split"], [("C1", ["C1"])], {})
    with pytest.raises(ValueError, match="holds out 1 of 3 studies.*--folds 2"):
        check_trainable(plan, TrainOptions(folds=1, vertebrae=("C1",)))


def test_the_plan_says_whether_the_input_pipeline_feeds_each_gpu():
    from cspine_submit.train.plan import GPU_TRAIN_224, _input_need

    t4_256 = GPU_TRAIN_224["T4"]["img_s"] * (224 / 256) ** 2  # about 324 crops/s
    plan = {"config": {"head": "gap", "input_shape": [256, 256, 3]}, "input_crops_per_s": 1.5 * t4_256}
    line = _input_need(plan)
    assert f"one T4 {t4_256:.0f} (fed)" in line and "two T4s (at most) 648 (INPUT-BOUND)" in line
    assert "a P100" in line and line.count("(fed)") == 2
    assert _input_need({"config": {"head": "tiny", "input_shape": [32, 32, 3]}, "input_crops_per_s": 10.0}) == ""
