"""The user's path through ``submit`` (issue 21): wrong paths fail fast and say what to do, a run that cannot score
says so in its report, and an interrupted run ends cleanly and resumes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cspine_submit.cli import main as cli_main
from cspine_submit.config import VERTEBRAE, ModelConfig
from cspine_submit.submit.submission import companion_paths, split_row_id

from _pipeline_helpers import UID_ROOT, write_study, write_weights

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for i in range(2):
        write_study(root / f"{UID_ROOT}.{700 + i}", f"{UID_ROOT}.{700 + i}", seed=i)
    return root


def _cli(*argv) -> int:
    return cli_main(["submit", "--no-progress", "--workers", "0", *map(str, argv)])


# ---------------------------------------------------------------------------------------------------------------
# Wrong paths: exit 2 before TensorFlow, the path and the fix in the message, no CSV


_BAD_PATHS = r"""
import contextlib, io, json, sys
from cspine_submit.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        rc = main(["submit", "--no-progress", "--workers", "0", *argv])
    results.append([rc, text.getvalue()])
print(json.dumps({"results": results, "tensorflow": "tensorflow" in sys.modules}))
"""


def test_wrong_paths_exit_2_before_tensorflow_naming_the_path_and_the_fix(weights, images, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_study = images / f"{UID_ROOT}.700"  # a study's own folder given as the test folder
    competition = tmp_path / "competition"
    (competition / "test_images" / "x").mkdir(parents=True)
    no_weights = tmp_path / "no_weights_here"
    not_weights = tmp_path / "not_weights"
    not_weights.mkdir()
    (not_weights / "notes.txt").write_text("hello\n")
    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    (bad_config / "model_config.json").write_text("{not json")
    bad_csv = tmp_path / "csv" / "test.csv"
    bad_csv.parent.mkdir()
    bad_csv.write_bytes(b"\x00\x01\xff\xfe binary \x00")
    out = tmp_path / "out" / "submission.csv"
    cases = [  # (argv, what the message must name, a word of the fix)
        (["--test-dir", tmp_path / "no_such_dir", "--weights", weights], tmp_path / "no_such_dir", "test_images"),
        (["--test-dir", empty, "--weights", weights], empty, "one sub-folder per study"),
        (["--test-dir", one_study, "--weights", weights], one_study, "give its parent"),
        (["--test-dir", competition, "--weights", weights], competition, str(competition / "test_images")),
        (["--test-dir", images, "--weights", no_weights], no_weights, "--weights weights/demo"),
        (["--test-dir", images, "--weights", not_weights], not_weights, "cspine-submit train"),
        (["--test-dir", images, "--weights", bad_config], bad_config / "model_config.json", "train"),
        (["--test-dir", images, "--test-csv", bad_csv, "--weights", weights], bad_csv, "--test-csv"),
        (["--test-dir", images, "--test-csv", tmp_path / "missing.csv", "--weights", weights],
         tmp_path / "missing.csv", "leave --test-csv out"),
    ]
    argvs = [[str(a) for a in argv] + ["--out", str(out)] for argv, _, _ in cases]
    proc = subprocess.run([sys.executable, "-c", _BAD_PATHS, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    for (argv, path, fix), (rc, text) in zip(cases, report["results"]):
        assert rc == 2, (argv, text)
        assert str(path) in text and fix in text, (argv, text)
    assert report["tensorflow"] is False  # every case stopped at the argument check
    assert not out.parent.exists()  # no CSV, no report, no journal


def test_a_test_csv_naming_missing_studies_still_runs_them_as_missing(weights, tmp_path):
    """An empty test folder is fine when test.csv lists the studies: they are reported missing (priors), as today."""
    empty = tmp_path / "test_images"
    empty.mkdir()
    uid = f"{UID_ROOT}.799"
    (tmp_path / "test.csv").write_text("row_id,StudyInstanceUID,prediction_type\n"
                                       + "".join(f"{uid}_{v},{uid},{v}\n" for v in VERTEBRAE))
    out = tmp_path / "submission.csv"
    assert _cli("--test-dir", empty, "--weights", weights, "--out", out) == 3  # every study missing: cannot be right
    assert len(out.read_text().splitlines()) == 1 + 7
    report = json.loads(companion_paths(out)[1].read_text())
    assert "does not exist" in report["studies"][uid]["reason"]


# ---------------------------------------------------------------------------------------------------------------
# A run without classifiers: exit 3, a report that counts what happened, the fix named


def test_no_classifier_run_writes_a_report_of_priors_and_points_to_train(weights, images, tmp_path, capsys):
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    config = ModelConfig.from_json(weights / "model_config.json").replace(trained_on="untrained")
    config.to_json(untrained / "model_config.json")  # a config, but none of its classifier files
    out = tmp_path / "a" / "submission.csv"
    assert _cli("--test-dir", images, "--weights", untrained, "--out", out) == 3
    text = capsys.readouterr().out
    assert "no classifier could be loaded" in text and "cspine-submit train" in text and "--weights weights/demo" in text
    assert len(out.read_text().splitlines()) == 1 + 16
    report = json.loads(companion_paths(out)[1].read_text())
    totals = report["totals"]
    assert totals["ok"] == 0 and totals["fallback"] == 2 and totals["fell_back"] == 2, totals
    assert all("no classifier" in e["reason"] for e in report["studies"].values())
    assert "0 ok, 2 fallback" in text


def test_a_priors_only_run_accepted_with_allow_priors_is_not_counted_ok(weights, images, tmp_path, capsys):
    """It used to report ``"ok": 2, "fell_back": 2`` and "2 ok, 0 fallback" while every row was a prior."""
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    ModelConfig.from_json(weights / "model_config.json").to_json(untrained / "model_config.json")
    out = tmp_path / "submission.csv"
    assert _cli("--test-dir", images, "--weights", untrained, "--out", out, "--allow-priors") == 0
    totals = json.loads(companion_paths(out)[1].read_text())["totals"]
    assert totals["ok"] == 0 and totals["fallback"] == 2 and totals["fell_back"] == 2, totals
    assert "0 ok, 2 fallback" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: one line, the report, no traceback, a complete file; --resume finishes it


def _start_and_interrupt(cmd, journal: Path, sig: int, tmp_path: Path, after: int = 2):
    """Start ``cmd``, send ``sig`` once ``after`` studies are journaled; returns (returncode, stdout, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        while proc.poll() is None and not (journal.is_file() and len(journal.read_text().splitlines()) > after):
            time.sleep(0.01)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stdout, stderr


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_ends_cleanly_and_resumes_to_the_same_bytes(synthetic_info, tmp_path, sig, code):
    demo = REPO / "weights" / "demo"
    images = tmp_path / "test_images"
    sources = [r.folder for r in synthetic_info.test]
    uids = [f"{UID_ROOT}.{900 + i}" for i in range(12)]
    for i, uid in enumerate(uids):
        shutil.copytree(sources[i % len(sources)], images / uid)
    out = tmp_path / "run" / "submission.csv"
    cmd = [sys.executable, str(REPO / "make_submission.py"), "--test-dir", str(images), "--weights", str(demo),
           "--out", str(out), "--workers", "2", "--no-progress", "--refresh-every", "0"]
    journal, report_path = companion_paths(out)
    rc, stdout, stderr = _start_and_interrupt(cmd, journal, sig, tmp_path)
    assert rc == code, (rc, stdout[-2000:], stderr[-2000:])
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1, stdout[-2000:]
    done = int(lines[0].split()[1])
    assert lines[0].startswith(f"interrupted: {done} of {len(uids)} studies done; the submission holds their scores "
                               "and priors for the rest; rerun with --resume")
    assert 2 <= done < len(uids), "the run finished before it could be interrupted"
    report = json.loads(report_path.read_text())
    assert report["totals"]["interrupted"] == {"signal": signal.Signals(sig).name, "exit_code": code, "done": done,
                                               "of": len(uids)}
    assert sum("interrupted" in (e["reason"] or "") for e in report["studies"].values()) == len(uids) - done
    interrupted = out.read_text().splitlines()
    assert interrupted[0] == "row_id,fractured" and len(interrupted) == 1 + 8 * len(uids)
    assert all(0.0 < float(line.split(",")[1]) < 1.0 for line in interrupted[1:])

    from cspine_submit import submit as stage

    setup = stage.prepare_run(images, None, demo)
    reference = stage.run_submission(setup, tmp_path / "reference.csv", workers=0, progress=False).out
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"{done} resumed" in resumed.stdout
    assert out.read_bytes() == reference.read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# Out of memory while the classifiers load: exit 3, a complete priors file, the reason, no traceback


def _out_of_memory_errors():
    import tensorflow as tf

    return [MemoryError("simulated: host out of memory"),
            tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor (simulated)")]


@pytest.mark.parametrize("which", [0, 1], ids=["MemoryError", "ResourceExhaustedError"])
def test_out_of_memory_at_model_load_exits_3_with_priors_and_the_reason(weights, images, tmp_path, capsys,
                                                                         monkeypatch, which):
    from cspine_submit.score import aggregate, loading

    error = _out_of_memory_errors()[which]

    def out_of_memory(path, config):
        raise error

    monkeypatch.setattr(loading, "load_classifier", out_of_memory)
    out = tmp_path / "submission.csv"
    assert _cli("--test-dir", images, "--weights", weights, "--out", out) == 3  # returned, not raised
    text = capsys.readouterr().out
    assert "out of" in text and "memory" in text and "no classifier could be loaded" in text, text[-3000:]
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 16
    priors = aggregate.prior_probabilities(ModelConfig.from_json(weights / "model_config.json"))
    rows = {split_row_id(line.split(",")[0])[1]: float(line.split(",")[1]) for line in lines[1:]}
    assert rows == pytest.approx(priors)  # the weights' own priors, not the package defaults
    report = json.loads(companion_paths(out)[1].read_text())
    assert report["totals"]["classifiers_loaded"] == 0 and report["totals"]["fell_back"] == 2
    assert any("memory" in w for w in report["totals"]["warnings"]), report["totals"]["warnings"]


# ---------------------------------------------------------------------------------------------------------------
# Previews of the worst-aligned studies; the report's boxes and slices say what they are


def test_previews_of_the_worst_aligned_studies_beside_the_report(synthetic_info, tmp_path, capsys):
    import cv2

    from cspine_submit.submit.previews import worst_aligned

    images = tmp_path / "test_images"
    for record in synthetic_info.test:
        shutil.copytree(record.folder, images / record.folder.name)
    out = tmp_path / "run" / "submission.csv"
    assert _cli("--test-dir", images, "--weights", REPO / "weights" / "demo", "--out", out, "--previews", "2") == 0
    report_path = companion_paths(out)[1]
    report = json.loads(report_path.read_text())
    worst = worst_aligned(report["studies"], 2)
    assert len(worst) == 2
    costs = {u: e["plan"]["alignment"]["cost"] / e["plan"]["alignment"]["threshold"] for u, e in report["studies"].items()}
    assert min(costs[u] for u in worst) >= max(c for u, c in costs.items() if u not in worst)
    text = capsys.readouterr().out
    for uid in worst:
        path = report_path.parent / f"submission.preview_{uid}.png"
        assert f"preview: {path}" in text
        image = cv2.imread(str(path))
        assert image is not None and image.ndim == 3 and image.shape[0] > 100
    assert len(list(report_path.parent.glob("*.png"))) == 2
    # What the plan fields mean is in the report itself; boxes are named, slices are DICOM file numbers.
    assert "DICOM file numbers" in report["legend"]["slices"]
    entry = report["studies"][worst[0]]["plan"]["C3"]
    assert set(entry["box"]) == {"y0", "x0", "y1", "x1"} and entry["box"]["y0"] < entry["box"]["y1"]
    numbers = {int(p.stem) for p in (images / worst[0]).glob("*.dcm")}
    assert entry["slices"] and set(entry["slices"]) <= numbers


_HUNG_EXIT = r"""
import sys, threading
from cspine_submit import cli
cli.INTERRUPTED_EXIT_S = float(sys.argv[2])
if sys.argv[3] == "kernel":
    sys.modules["ipykernel"] = type(sys)("ipykernel")  # as inside a notebook
threading.Thread(target=threading.Event().wait, daemon=False).start()  # a pool thread that never joins
cli.exit_promptly_after_interrupt(int(sys.argv[1]))
print("armed" if any(isinstance(t, threading.Timer) for t in threading.enumerate()) else "not armed", flush=True)
if sys.argv[3] == "kernel":
    import os
    os._exit(0)
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("code", [130, 143])
def test_after_an_interrupt_the_process_ends_even_with_a_thread_that_never_joins(code):
    # cspine-submit and make_submission.py alike: the interpreter's exit would wait for the thread for good.
    proc = subprocess.run([sys.executable, "-c", _HUNG_EXIT, str(code), "0.5", "script"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == code and proc.stdout.strip() == "armed", (proc.returncode, proc.stdout, proc.stderr)


def test_no_exit_timer_for_a_clean_run_or_inside_a_notebook():
    from cspine_submit import cli

    before = {t for t in __import__("threading").enumerate()}
    cli.exit_promptly_after_interrupt(0)  # a finished run: nothing armed
    assert {t for t in __import__("threading").enumerate()} == before
    proc = subprocess.run([sys.executable, "-c", _HUNG_EXIT, "130", "0.5", "kernel"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.stdout.strip() == "not armed", (proc.stdout, proc.stderr)
