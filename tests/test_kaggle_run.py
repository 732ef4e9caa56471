"""The Kaggle run as a user sees it: a complete file at every moment (a real SIGKILL), exit codes when the run
cannot be right, the decoder self-test, devices, a vertebra outside the scan, the plan summary against the slices
actually decoded, a scoring hang that costs one study."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cspine_submit.files import default_weights_dir
from cspine_submit.score import aggregate

from cspine_submit import submit as stage
from cspine_submit.submit import run as run_steps

from cspine_submit.read import preflight
from cspine_submit.cli import main as cli_main
from cspine_submit.config import PREDICTION_TYPES, VERTEBRAE, ModelConfig, SliceRanges
from cspine_submit.submit.submission import LiveSubmission, companion_paths, split_row_id

from _pipeline_helpers import UID_ROOT, hand_ranges, write_study, write_weights

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def priors(weights):
    return aggregate.prior_probabilities(ModelConfig.from_json(weights / "model_config.json"))


def _read_sub(path) -> dict[str, float]:
    lines = Path(path).read_text().splitlines()
    assert lines[0] == "row_id,fractured"
    return {r.split(",")[0]: float(r.split(",")[1]) for r in lines[1:]}


def _by_study(sub: dict[str, float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for rid, p in sub.items():
        uid, kind = split_row_id(rid)
        out.setdefault(uid, {})[kind] = p
    return out


def _cli(*argv) -> int:
    return cli_main(["submit", "--no-progress", "--workers", "0", *map(str, argv)])


# ---------------------------------------------------------------------------------------------------------------
# A complete file at every moment


def test_sigkill_after_the_first_studies_leaves_a_complete_file(synthetic_info, weights, priors, tmp_path):
    """A real `submit` process killed with SIGKILL once two studies are journaled: submission.csv has every row, in
    (0, 1); the studies it holds as finished equal an uninterrupted run's, the rest are priors. `--resume` then
    finishes with the uninterrupted run's bytes, and TensorFlow's CUDA probing never reaches the user."""
    images = tmp_path / "test_images"
    sources = [r.folder for r in synthetic_info.test]
    uids = [f"{UID_ROOT}.{200 + i}" for i in range(8)]
    for i, uid in enumerate(uids):
        shutil.copytree(sources[i % len(sources)], images / uid)
    out = tmp_path / "run" / "submission.csv"
    cmd = [sys.executable, "-m", "cspine_submit", "submit", "--test-dir", str(images), "--weights", str(weights),
           "--out", str(out), "--workers", "0", "--no-progress", "--refresh-every", "0"]
    journal = companion_paths(out)[0]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        while proc.poll() is None and not (journal.is_file() and len(journal.read_text().splitlines()) >= 3):
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed = _read_sub(out)

    setup = stage.prepare_run(images, None, weights)
    reference = stage.run_submission(setup, tmp_path / "reference.csv", workers=0, progress=False).out
    ref = _read_sub(reference)
    assert list(killed) == list(ref) and len(killed) == 8 * len(uids)
    assert all(0.0 < p < 1.0 for p in killed.values())
    journaled = {json.loads(line)["uid"] for line in journal.read_text().splitlines()[1:] if line.strip()}
    finished = set()
    for uid, rows in _by_study(killed).items():
        if rows == pytest.approx(priors, abs=0):
            continue
        finished.add(uid)
        assert rows == _by_study(ref)[uid], uid  # a finished study is exactly what the uninterrupted run wrote
    assert finished and finished <= journaled and len(finished) < len(uids)

    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert out.read_bytes() == reference.read_bytes()
    assert "cuInit" not in done.stderr and "cuda" not in done.stderr.lower()  # no CUDA probing without --verbose


def test_live_submission_is_complete_before_any_study_and_refreshes_on_time(tmp_path):
    rows = [f"1.2.3_{t}" for t in PREDICTION_TYPES] + [f"4.5_{t}" for t in ("C1", "patient_overall")]
    live = LiveSubmission(tmp_path / "s.csv", rows, {t: 0.25 for t in PREDICTION_TYPES}, every_s=3600)
    live.write()
    assert _read_sub(tmp_path / "s.csv") == {r: 0.25 for r in rows}
    live.set_study("4.5", {t: 0.5 for t in PREDICTION_TYPES})
    assert not live.refresh_if_due()  # an hour has not passed
    assert _read_sub(tmp_path / "s.csv")["4.5_C1"] == 0.25
    live.every_s = 0.0
    assert live.refresh_if_due()
    sub = _read_sub(tmp_path / "s.csv")
    assert sub["4.5_C1"] == sub["4.5_patient_overall"] == 0.5 and sub["1.2.3_C7"] == 0.25
    assert not live.refresh_if_due()  # nothing changed
    with pytest.raises(ValueError, match="4.5_C1.*not strictly inside"):
        live.set_study("4.5", {t: 1.0 for t in PREDICTION_TYPES})
    assert live.stats(10.0)["writes"] == 2


def test_the_run_steps_write_a_complete_file_before_any_scoring(weights, priors, tmp_path):
    images = tmp_path / "images"
    uids = [f"{UID_ROOT}.800"]
    write_study(images / uids[0], uids[0])
    setup = stage.prepare_run(images, None, weights)
    out = tmp_path / "submission.csv"
    state = run_steps.start_run(setup, out)
    assert not out.exists() and state.todo == [uids[0]]
    run_steps.write_priors_file(state)  # before the warm-up: the file is complete, every study at its priors
    assert _by_study(_read_sub(out)) == {uids[0]: pytest.approx(priors)}
    run_steps.warm_up(state)
    run_steps.stream_studies(state, workers=0, progress=False)
    result = run_steps.finish_run(state)
    scored = result.probabilities[f"{uids[0]}_C1"]
    assert _read_sub(out)[f"{uids[0]}_C1"] == pytest.approx(scored, abs=5e-9) and scored != pytest.approx(priors["C1"])
    assert result.totals["submission_refresh"]["writes"] >= 2


_HANG_SCRIPT = r"""
import json, sys, threading
from cspine_submit.score import prediction as models
from cspine_submit import submit as pipeline
real_score, calls = models.score, []

def score_hanging_on_the_second_study(*args, **kw):
    calls.append(1)
    if len(calls) == 3:  # warm-up, first study, then the second study hangs inside "TensorFlow" for good
        threading.Event().wait()
    return real_score(*args, **kw)

models.score = score_hanging_on_the_second_study
setup = pipeline.prepare_run(sys.argv[1], None, sys.argv[2])
result = pipeline.run_submission(setup, sys.argv[3], workers=0, progress=False, study_timeout=2.0)
print(json.dumps({u: [e["status"], e["reason"]] for u, e in result.studies.items()}), result.totals["score_timeouts"])
"""


def test_a_hang_scoring_one_study_costs_that_study_only(weights, tmp_path):
    # In a real process: the hung study falls back, the next ones score, and the process still exits (the stuck
    # thread does not hold it).
    images = tmp_path / "images"
    uids = [f"{UID_ROOT}.{300 + i}" for i in range(3)]
    for i, uid in enumerate(uids):
        write_study(images / uid, uid, seed=i)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _HANG_SCRIPT, str(images), str(weights), str(tmp_path / "s.csv")],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line, timeouts = proc.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    studies = json.loads(line)
    assert {u: studies[u][0] for u in uids} == {uids[0]: "ok", uids[1]: "fallback", uids[2]: "ok"}
    assert studies[uids[1]][1] == "score: ScoringTimeout: scoring did not finish within 2 s" and timeouts == "1"
    assert len(_read_sub(tmp_path / "s.csv")) == 24


def test_guarded_scorer_gives_up_after_repeated_hangs():
    scorer = run_steps.GuardedScorer(lambda crops: threading.Event().wait(5), timeout=0.2, max_timeouts=2)
    for _ in range(2):
        with pytest.raises(run_steps.ScoringTimeout, match="within 0 s"):
            scorer({})
    t = time.perf_counter()
    with pytest.raises(run_steps.ScoringTimeout, match="hung 2 times in a row"):
        scorer({})
    assert time.perf_counter() - t < 0.1  # no further wait: the remaining studies get their priors at once
    assert run_steps.GuardedScorer(lambda crops: {"C1": 1}, timeout=None)({}) == {"C1": 1}


# ---------------------------------------------------------------------------------------------------------------
# Exit codes: the run cannot be right


def test_unloadable_classifiers_exit_nonzero_with_a_complete_file(weights, priors, tmp_path, capsys):
    images = tmp_path / "images"
    uids = [f"{UID_ROOT}.{400 + i}" for i in range(2)]
    for i, uid in enumerate(uids):
        write_study(images / uid, uid, seed=i)
    broken = tmp_path / "broken"
    shutil.copytree(weights, broken)
    for v in VERTEBRAE:
        (broken / f"{v}.keras").write_bytes(b"PK\x03\x04 not a model")
    out = tmp_path / "a" / "submission.csv"
    assert _cli("--test-dir", images, "--weights", broken, "--out", out) == 3
    text = capsys.readouterr().out
    assert "no classifier could be loaded" in text and "C1.keras" in text and "--allow-priors" in text
    sub = _read_sub(out)
    assert len(sub) == 16 and all(rows == pytest.approx(priors) for rows in _by_study(sub).values())
    # Accepted on purpose: the run goes through (every study scanned and reported), exit 0.
    out2 = tmp_path / "b" / "submission.csv"
    assert _cli("--test-dir", images, "--weights", broken, "--out", out2, "--allow-priors") == 0
    assert _read_sub(out2) == sub
    report = json.loads(companion_paths(out2)[1].read_text())
    assert report["totals"]["classifiers_loaded"] == 0 and report["totals"]["fell_back"] == 2
    assert "THIS RUN CANNOT BE RIGHT: no classifier was loaded" in capsys.readouterr().out


def test_most_studies_unreadable_exit_nonzero(weights, tmp_path, capsys):
    images = tmp_path / "images"
    good = f"{UID_ROOT}.500"
    write_study(images / good, good, seed=1)
    for i in range(2):
        bad = images / f"{UID_ROOT}.{501 + i}"
        bad.mkdir(parents=True)
        for k in range(5):
            (bad / f"{k + 1}.dcm").write_text("not a DICOM file\n" * 20)
    out = tmp_path / "submission.csv"
    assert _cli("--test-dir", images, "--weights", weights, "--out", out) == 3
    text = capsys.readouterr().out
    assert "2 of 3 studies fell back to the priors (more than half): 2 x scan:" in text
    assert len(_read_sub(out)) == 24
    assert _cli("--test-dir", images, "--weights", weights, "--out", out, "--force", "--allow-priors") == 0
    # One of three falling back is a normal run.
    shutil.rmtree(images / f"{UID_ROOT}.502")
    assert _cli("--test-dir", images, "--weights", weights, "--out", out, "--force") == 0


_NO_DECODERS = r"""
import sys
for name in ("gdcm", "pylibjpeg", "libjpeg", "openjpeg", "rle", "dicomsdl"):  # (dicomsdl: the direct route)
    sys.modules[name] = None  # as on an image without the decoder wheels
from cspine_submit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_missing_jpeg_decoders_stop_the_run_at_start(synthetic_info, weights, tmp_path):
    out = tmp_path / "submission.csv"
    images = synthetic_info.root / "test_images"
    args = ["submit", "--test-dir", str(images), "--weights", str(weights), "--out", str(out), "--workers", "0",
            "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", _NO_DECODERS, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    head = proc.stdout.splitlines()[:4]
    assert any("JPEG Lossless (.4.70) cannot be decoded here" in line for line in head), head  # top of the log
    assert "python-gdcm" in proc.stdout and "stopping before the run" in proc.stdout
    assert len(_read_sub(out)) == 8 * len(synthetic_info.test)  # the complete priors file is there


def test_decoder_self_test_checks_values_not_imports(tmp_path):
    check = preflight.check_selftest()
    assert check.ok and "decoded exactly" in check.notes[0]
    # Same file, one decoded value off: a decoder that returns wrong numbers is caught.
    wrong = preflight.check_selftest(expected_sha256="0" * 64)
    assert not wrong.ok and "WRONG values" in wrong.problems[0]
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(preflight.SELFTEST_FILE.read_bytes()[:2000])
    truncated = preflight.check_selftest(bad)  # gdcm refuses it, pylibjpeg decodes garbage: caught either way
    assert not truncated.ok and "JPEG Lossless (.4.70)" in truncated.problems[0]


def test_devices_said_and_require_gpu(weights, tmp_path, capsys, monkeypatch):
    from cspine_submit.commands import submit

    images = tmp_path / "images"
    write_study(images / f"{UID_ROOT}.600", f"{UID_ROOT}.600")
    kaggle = tmp_path / "kaggle_input"
    kaggle.mkdir()
    monkeypatch.setattr(submit, "KAGGLE_INPUT", kaggle)  # on Kaggle, where a GPU is expected
    out = tmp_path / "submission.csv"
    assert _cli("--test-dir", images, "--weights", weights, "--out", out, "--require-gpu") == 3
    text = capsys.readouterr().out
    assert "WARNING: NO GPU: the classifiers would run on the CPU in float32 (no GPU visible to TensorFlow:" in text
    assert "--require-gpu and TensorFlow sees no GPU" in text
    assert _cli("--test-dir", images, "--weights", weights, "--out", out, "--force") == 0
    text = capsys.readouterr().out
    assert "classifiers run on: CPU" in text and "WARNING: NO GPU" in text
    devices = json.loads(companion_paths(out)[1].read_text())["totals"]["devices"]
    assert devices["kind"] == "CPU" and devices["precision"] == "float32" and devices["strategy"] == "one device"
    assert devices["why"][0].startswith("no GPU visible to TensorFlow: ")


# ---------------------------------------------------------------------------------------------------------------
# Where each vertebra was looked for


def _mm_top_ranges() -> SliceRanges:
    """mm below the first slice: C1 0-12 mm, C2 10-22 ..., C7 60-72 mm; box the central half."""
    def q(v):
        return {"q10": v, "q50": v, "q90": v}

    per = {v: {"mm_top": {"start": q(10.0 * i), "end": q(10.0 * i + 12.0)},
               "box": {"y0": q(0.25), "x0": q(0.25), "y1": q(0.75), "x1": q(0.75)}} for i, v in enumerate(VERTEBRAE)}
    return SliceRanges(method="mm_top", layout="competition", per_vertebra=per, n_masks=0, source="tests: by hand")


def test_a_vertebra_planned_outside_the_scan_takes_its_prior(weights, priors, tmp_path):
    # 24 slices 2 mm apart cover 0..46 mm (47 mm with half a slice): C6 (50-62 mm) and C7 (60-72) lie below the scan;
    # C5 (40-52) overlaps it and is scored on the slices inside.
    w = tmp_path / "w"
    shutil.copytree(weights, w)
    _mm_top_ranges().to_json(w / "slice_ranges.json")
    images = tmp_path / "images"
    uid = f"{UID_ROOT}.700"
    write_study(images / uid, uid, n_slices=24)
    setup = stage.prepare_run(images, None, w)
    result = stage.run_submission(setup, tmp_path / "s.csv", workers=0, progress=False)
    entry = result.studies[uid]
    assert entry["status"] == "ok" and entry["priors_used"] == ["C6", "C7"]
    for v in ("C6", "C7"):
        assert result.probabilities[f"{uid}_{v}"] == pytest.approx(priors[v])
        assert entry["plan"][v]["slices"] == []
        start = 10.0 * VERTEBRAE.index(v) - 100.0  # z grows toward the feet from the first slice at -100 mm
        assert entry["plan"][v]["prior"] == f"planned z {start:.1f}..{start + 12:.1f} mm lies below the scan (-101.0..-53.0 mm)"
    assert entry["plan"]["C5"]["prior"] is None and entry["plan"]["C5"]["slices"]
    assert entry["plan"]["method"] == "mm_top" and entry["plan"]["fallback_reason"] is None


def test_plan_summary_matches_the_slices_actually_read(synthetic_info, monkeypatch):
    """Profile method on a synthetic study: the summary's cue slices and per-vertebra slices (file numbers) are
    exactly the files decoded, its boxes and ranges are the planner's, and the method is the one used."""
    from cspine_submit.score import crop
    from cspine_submit.read import dicom
    from cspine_submit.localize import load_ranges, measure_cue, plan_crops

    ranges = load_ranges(default_weights_dir() / "demo" / "slice_ranges.json")
    config = ModelConfig(head="tiny", input_size=32, channels="neighbours", windows=((400, 1800),),
                         slices_per_vertebra=5)
    record = next(r for r in synthetic_info.test if r.spec.reversed) if any(
        r.spec.reversed for r in synthetic_info.test) else synthetic_info.test[0]
    folder = record.folder
    real_decode, decoded = dicom.decode_into, []

    def recording_decode(header, index, *a, **k):  # every slice decoded goes through here (read_slices too)
        decoded.append(int(header.files[int(index)].stem))
        return real_decode(header, index, *a, **k)

    monkeypatch.setattr(dicom, "decode_into", recording_decode)
    prepared = stage.prepare_study(stage.StudyJob(folder.name, str(folder), ranges, config, VERTEBRAE))
    monkeypatch.setattr(dicom, "decode_into", real_decode)
    summary = prepared.plan
    listed = set(summary["cue_slices"]) | {n for v in VERTEBRAE for n in summary[v]["slices"]}
    assert listed == set(decoded) and len(decoded) == prepared.slices_read
    header = dicom.scan_study(folder)
    cue = measure_cue(header, ranges)
    plans = plan_crops(header, ranges, config, cue=cue)
    assert summary["method"] == ("profile" if cue.fallback is None else "fraction")
    for v in VERTEBRAE:
        assert summary[v]["box"] == dict(zip(("y0", "x0", "y1", "x1"), plans[v].box))
        assert summary[v]["z_mm"] == pytest.approx(list(plans[v].z_range_mm), abs=0.01)
        want = crop.slices_needed({v: plans[v]}, config, header.n_slices)  # centres and their 2.5D neighbours
        assert summary[v]["slices"] == [int(header.files[i].stem) for i in want]
        assert prepared.crops[v].shape[0] == len(plans[v].slice_indices)


def test_method_used_follows_the_cue():
    from types import SimpleNamespace

    from cspine_submit.submit import plan_report

    profile = SimpleNamespace(method="profile")
    assert plan_report.method_used(profile, None) == "profile"
    assert plan_report.method_used(profile, SimpleNamespace(fallback=None)) == "profile"
    assert plan_report.method_used(profile, SimpleNamespace(fallback="fraction ranges (...)")) == "fraction"
    assert plan_report.method_used(profile, SimpleNamespace(method="anatomy", fallback=None)) == "anatomy"
    assert plan_report.outside_scan((10.0, 20.0), np.array([0.0, 2.0, 4.0]), 2.0) == (
        "planned z 10.0..20.0 mm lies below the scan (-1.0..5.0 mm)")
    assert plan_report.outside_scan((-8.0, -1.5), np.array([0.0, 2.0, 4.0]), 2.0).endswith("lies above the scan (-1.0..5.0 mm)")
    assert plan_report.outside_scan((-8.0, -0.5), np.array([0.0, 2.0, 4.0]), 2.0) is None
