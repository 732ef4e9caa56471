"""The streaming submission flow end to end on small studies: every fallback path, resume, budget, determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cspine_submit.files import default_weights_dir
from cspine_submit import submit as stage
from cspine_submit.submit import run as run_steps
from cspine_submit.config import PREDICTION_TYPES
from cspine_submit.submit.submission import companion_paths

from _pipeline_helpers import UID_ROOT, write_study, write_weights

GOOD = [f"{UID_ROOT}.1", f"{UID_ROOT}.2"]
ONE_BAD_FILE = f"{UID_ROOT}.3"
TRUNCATED = f"{UID_ROOT}.4"
NON_DICOM = f"{UID_ROOT}.5"
EMPTY = f"{UID_ROOT}.6"
SINGLE = f"{UID_ROOT}.7"
MISSING = f"{UID_ROOT}.8"
ALL = GOOD + [ONE_BAD_FILE, TRUNCATED, NON_DICOM, EMPTY, SINGLE, MISSING]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def testset(tmp_path_factory):
    root = tmp_path_factory.mktemp("testset")
    images = root / "test_images"
    for i, uid in enumerate(GOOD):
        write_study(images / uid, uid, seed=i)
    write_study(images / ONE_BAD_FILE, ONE_BAD_FILE, seed=3)
    f = images / ONE_BAD_FILE / "5.dcm"
    f.write_bytes(f.read_bytes()[:-500])  # one truncated slice: skipped, the study still scores
    write_study(images / TRUNCATED, TRUNCATED, seed=4)
    for f in (images / TRUNCATED).iterdir():
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    (images / NON_DICOM).mkdir()
    for i in range(5):
        (images / NON_DICOM / f"{i + 1}.dcm").write_text("this is not a DICOM file\n" * 20)
    (images / EMPTY).mkdir()
    write_study(images / SINGLE, SINGLE, n_slices=1, seed=7)
    lines = ["row_id,StudyInstanceUID,prediction_type"]
    lines += [f"{u}_{t},{u},{t}" for u in ALL for t in PREDICTION_TYPES]
    (root / "test.csv").write_text("\n".join(lines) + "\n")
    return root


def _run(testset, weights, out, **kw):
    setup = stage.prepare_run(testset / "test_images", testset / "test.csv", weights)
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return setup, stage.run_submission(setup, out, **kw)


def _read_sub(path):
    lines = Path(path).read_text().splitlines()
    assert lines[0] == "row_id,fractured"
    return {r.split(",")[0]: float(r.split(",")[1]) for r in lines[1:]}


def test_every_path_gives_a_complete_submission(testset, weights, tmp_path):
    out = tmp_path / "submission.csv"
    setup, result = _run(testset, weights, out)
    sub = _read_sub(out)
    assert len(sub) == 8 * len(ALL)
    assert list(sub) == [f"{u}_{t}" for u in ALL for t in PREDICTION_TYPES]
    assert all(0 < p < 1 for p in sub.values())
    report = json.loads(companion_paths(out)[1].read_text())
    st = report["studies"]
    assert set(st) == set(ALL)
    for uid in GOOD + [ONE_BAD_FILE]:
        assert st[uid]["status"] == "ok", st[uid]
        assert st[uid]["reason"] is None
        assert 0 < st[uid]["slices_read"] <= 24
        assert {"scan", "plan", "read", "crop", "score", "aggregate", "wait"} <= set(st[uid]["seconds"])
    assert any("5.dcm" in w for w in st[ONE_BAD_FILE]["warnings"])
    fallbacks = {u: st[u]["reason"] for u in ALL if st[u]["status"] == "fallback"}
    assert set(fallbacks) == {TRUNCATED, NON_DICOM, EMPTY, SINGLE, MISSING}
    assert fallbacks[MISSING].startswith("study folder") and "does not exist" in fallbacks[MISSING]
    assert fallbacks[SINGLE].startswith("scan:") and "only 1" in fallbacks[SINGLE]
    for uid in (TRUNCATED, NON_DICOM, EMPTY):
        assert fallbacks[uid].startswith("scan:"), fallbacks[uid]
    # Fallback rows are exactly the clipped priors.
    prior = setup.config.priors
    for uid in fallbacks:
        assert [sub[f"{uid}_{t}"] for t in PREDICTION_TYPES] == pytest.approx([prior[t] for t in PREDICTION_TYPES])
    # Scored rows are not the priors, and overall = noisy-OR of the vertebrae.
    v = np.array([sub[f"{GOOD[0]}_C{i}"] for i in range(1, 8)])
    assert sub[f"{GOOD[0]}_patient_overall"] == pytest.approx(1 - np.prod(1 - v), abs=1e-6)
    t = report["totals"]
    assert t["studies"] == len(ALL) and t["ok"] == 3 and t["fallback"] == 5
    assert t["studies_per_s"] > 0 and t["rows"] == 8 * len(ALL)


def test_same_input_twice_is_byte_identical(testset, weights, tmp_path):
    _run(testset, weights, tmp_path / "a.csv")
    _run(testset, weights, tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_worker_processes_match_in_process(testset, weights, tmp_path):
    _run(testset, weights, tmp_path / "a.csv", workers=0)
    _, result = _run(testset, weights, tmp_path / "b.csv", workers=2)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert result.studies[TRUNCATED]["status"] == "fallback"


def test_resume_after_a_kill(testset, weights, tmp_path):
    out = tmp_path / "submission.csv"
    _run(testset, weights, tmp_path / "reference.csv")
    seen = []

    def kill_after_three(uid, entry):
        seen.append(uid)
        if len(seen) == 3:
            raise KeyboardInterrupt("simulated kill")

    # Ctrl-C ends the run cleanly (no exception out of it): the report says how far it got.
    _, stopped = _run(testset, weights, out, on_study=kill_after_three, refresh_seconds=0)
    assert stopped.totals["interrupted"] == {"signal": "SIGINT", "exit_code": 130, "done": 3, "of": len(ALL)}
    # Complete at the kill: the three finished studies as in the uninterrupted run, priors for the rest.
    ref, sub = _read_sub(tmp_path / "reference.csv"), _read_sub(out)
    assert list(sub) == list(ref)
    from cspine_submit.score import aggregate
    from cspine_submit.config import ModelConfig

    priors = aggregate.prior_probabilities(ModelConfig.from_json(weights / "model_config.json"))
    for uid in ALL:
        rows = {t: sub[f"{uid}_{t}"] for t in PREDICTION_TYPES}
        assert rows == {t: ref[f"{uid}_{t}"] for t in PREDICTION_TYPES} if uid in seen else rows == pytest.approx(priors)
    journal = companion_paths(out)[0]
    assert len(journal.read_text().splitlines()) == 1 + 3  # header + 3 studies
    again = []
    _, result = _run(testset, weights, out, resume=True, on_study=lambda uid, e: again.append(uid))
    assert not set(again) & set(seen)  # journaled studies are not redone
    assert set(again) | set(seen) == set(ALL)
    assert result.totals["resumed"] == 3
    assert all(result.studies[u].get("resumed") for u in seen)
    assert out.read_bytes() == (tmp_path / "reference.csv").read_bytes()


def test_missing_classifier_uses_priors_and_warns(testset, weights, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(weights, w)
    (w / "C3.keras").unlink()
    setup = stage.prepare_run(testset / "test_images", testset / "test.csv", w)
    assert sorted(setup.models) == ["C1", "C2", "C4", "C5", "C6", "C7"]
    assert any("NO CLASSIFIER for C3" in m for m in setup.warnings)
    assert any("SYNTHETIC" in m for m in setup.warnings)  # tiny weights say trained_on=synthetic, not a demo run
    result = stage.run_submission(setup, tmp_path / "s.csv", workers=0, progress=False)
    assert result.probabilities[f"{GOOD[0]}_C3"] == pytest.approx(setup.config.priors["C3"])
    assert result.studies[GOOD[0]]["priors_used"] == ["C3"]


def test_time_budget_lowers_slices_then_falls_back(testset, weights, tmp_path):
    # A budget far too small: K drops after the first study, and once spent the rest get priors.
    _, result = _run(testset, weights, tmp_path / "s.csv", time_budget=1e-3)
    events = result.totals["time_budget"]["events"]
    assert events, result.totals
    assert "budget" in events[-1]["action"]
    assert len(result.probabilities) == 8 * len(ALL)
    assert any("time budget" in (e["reason"] or "") for e in result.studies.values())


def test_budget_controller_projection():
    b = stage.BudgetController(100.0, n_studies=10, slices_per_vertebra=15, min_history=1)
    # 1 study in 10 s: projected 10 + 9 * 10 = 100 > 95 planned; time left per study (95 - 10) / 9 = 9.44 s
    # -> K = floor(15 * 9.44 / 10) = 14.
    assert b.update(10.0, elapsed=10.0, done=1) == 14
    assert b.events[-1]["slices_per_vertebra"] == [15, 14]
    assert b.events[-1]["projected_s"] == 100.0
    # Still 10 s per study: projected 20 + 8 * 10 = 100 -> floor(14 * (75 / 8) / 10) = floor(13.1) = 13.
    assert b.update(10.0, elapsed=20.0, done=2) == 13
    # Faster now: projected 25 + 7 * 5 = 60 < 95 -> K stays.
    assert b.update(5.0, elapsed=25.0, done=3) == 13
    assert len(b.events) == 2
    # Over budget: exhausted, K unchanged.
    b.update(80.0, elapsed=105.0, done=4)
    assert b.exhausted and "spent" in b.events[-1]["action"]


def test_budget_waits_for_min_history():
    b = stage.BudgetController(100.0, n_studies=10, slices_per_vertebra=15)  # min_history 3
    assert b.update(30.0, elapsed=30.0, done=1) == 15  # a slow first study (warm-up) alone changes nothing
    assert b.update(5.0, elapsed=35.0, done=2) == 15
    # 3 studies, mean 13.33 s: projected 40 + 7 * 13.33 = 133 > 95 -> K = floor(15 * (55 / 7) / 13.33) = 8.
    assert b.update(5.0, elapsed=40.0, done=3) == 8
    assert b.events[0]["after_study"] == 3


def test_no_budget_never_changes_k():
    b = stage.BudgetController(None, n_studies=3, slices_per_vertebra=15)
    assert [b.update(1e6, elapsed=1e6 * i, done=i) for i in (1, 2, 3)] == [15, 15, 15]
    assert b.events == [] and not b.exhausted


def test_submit_cli_public_quirk_and_no_overwrite(testset, weights, tmp_path, capsys):
    from cspine_submit.cli import main

    quirk = tmp_path / "test.csv"
    quirk.write_text("row_id,StudyInstanceUID,prediction_type\n1.2.826.0.1.3680043.10197_C1,"
                     "1.2.826.0.1.3680043.10197,C1\n")
    images = tmp_path / "test_images"
    for uid in GOOD:
        shutil.copytree(testset / "test_images" / uid, images / uid)
    out = tmp_path / "out" / "submission.csv"
    argv = ["submit", "--test-dir", str(images), "--test-csv", str(quirk), "--weights", str(weights),
            "--out", str(out), "--workers", "0", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "quirk" in printed and "SYNTHETIC" in printed and "studies/s" in printed
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + 16 and rows[1].startswith(f"{GOOD[0]}_patient_overall,")
    assert main(argv) == 1  # exists: refuses without --force
    assert "--force" in capsys.readouterr().out
    assert main(argv + ["--force", "--report", str(tmp_path / "elsewhere" / "r.json")]) == 0
    report = json.loads((tmp_path / "elsewhere" / "r.json").read_text())
    assert set(report) == {"legend", "studies", "totals"} and set(report["studies"]) == set(GOOD)
    for entry in report["studies"].values():
        assert {"status", "reason", "slices_read", "seconds"} <= set(entry)
    assert "quirk" in report["totals"]["notes"][0]


def test_parse_duration():
    from cspine_submit.commands.submit import parse_duration

    assert parse_duration("8.5h") == 30600.0
    assert parse_duration("90m") == 5400.0
    assert parse_duration("300s") == 300.0
    assert parse_duration("2") == 7200.0
    with pytest.raises(ValueError, match="8.5h"):
        parse_duration("soon")


def test_corrupt_classifier_and_unloadable_weights(testset, weights, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(weights, w)
    (w / "C5.keras").write_bytes(b"not a keras file")
    setup = stage.prepare_run(testset / "test_images", testset / "test.csv", w)
    assert "C5" not in setup.models and len(setup.models) == 6
    assert any("C5" in m and "could not be loaded" in m for m in setup.warnings)
    # No weights at all: raise by default, all priors when asked (Kaggle).
    with pytest.raises(FileNotFoundError):
        stage.prepare_run(testset / "test_images", testset / "test.csv", tmp_path / "nothing")
    setup = stage.prepare_run(testset / "test_images", testset / "test.csv", tmp_path / "nothing",
                                 weights_error="priors")
    assert setup.models == {} and "EVERY study" in setup.warnings[0]
    result = stage.run_submission(setup, tmp_path / "s.csv", workers=0, progress=False)
    assert len(result.probabilities) == 8 * len(ALL)
    assert result.probabilities[f"{GOOD[0]}_C1"] == pytest.approx(0.103)  # the default prior (config.METRIC_PRIORS)
    assert result.studies[GOOD[0]]["priors_used"] == ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]


def test_submit_defaults_on_kaggle(tmp_path, monkeypatch):
    from cspine_submit.cli import _get_parser
    from cspine_submit.commands import submit

    comp = tmp_path / "input" / "rsna-2022-cervical-spine-fracture-detection"
    (comp / "test_images").mkdir(parents=True)
    monkeypatch.setattr(submit, "KAGGLE_INPUT", tmp_path / "input")
    monkeypatch.setattr(submit, "KAGGLE_COMPETITION", comp)
    monkeypatch.setattr(submit, "KAGGLE_OUT", tmp_path / "working" / "submission.csv")
    where = submit._resolve(_get_parser().parse_args(["submit"]))
    assert where["test_dir"] == comp / "test_images" and where["test_csv"] == comp / "test.csv"
    assert where["out"] == tmp_path / "working" / "submission.csv"
    assert where["budget"] == 8.5 * 3600 and where["demo"] is None
    where = submit._resolve(_get_parser().parse_args(["submit", "--time-budget", "30m"]))
    assert where["budget"] == 1800.0


def test_synthetic_competition_layout_end_to_end(synthetic_dataset, weights, tmp_path):
    """The generator's competition layout (.4.70 and uncompressed, reversed studies, test.csv) with the shipped
    default slice ranges: every study scores, the rows follow test.csv, and the metric reads the result."""
    from cspine_submit.train import metric
    from cspine_submit.submit.submission import read_test_csv

    w = tmp_path / "w"
    shutil.copytree(weights, w)
    (w / "slice_ranges.json").unlink()  # -> the package default weights/slice_ranges.json
    setup = stage.prepare_run(synthetic_dataset / "test_images", synthetic_dataset / "test.csv", w)
    assert setup.ranges_path == default_weights_dir() / "slice_ranges.json"
    result = stage.run_submission(setup, tmp_path / "s.csv", workers=0, progress=False)
    assert all(e["status"] == "ok" for e in result.studies.values()), result.studies
    rows = [r.split(",")[0] for r in (tmp_path / "s.csv").read_text().splitlines()[1:]]
    assert rows == [rid for rid, _, _ in read_test_csv(synthetic_dataset / "test.csv")]
    ev = metric.evaluate_files(tmp_path / "s.csv", synthetic_dataset / "test_labels.csv")
    assert ev.n_studies == 3 and np.isfinite(ev.score)


def test_nan_from_a_classifier_falls_back_for_that_study(testset, weights, tmp_path, monkeypatch):
    """A NaN slice probability used to survive clipping and make the final write refuse the whole submission."""
    from cspine_submit.score import prediction as models  # where the run looks score up

    real_score = models.score

    def nan_for_good0(m, crops, batch_size=32):
        out = real_score(m, crops, batch_size)
        if crops and next(iter(crops.values())).shape[0] and nan_for_good0.calls == 1:
            out["C2"] = np.full_like(out["C2"], np.nan)
        nan_for_good0.calls += 1
        return out

    nan_for_good0.calls = 0  # call 0 is the warm-up; call 1 is the first study (GOOD[0])
    monkeypatch.setattr(models, "score", nan_for_good0)
    setup, result = _run(testset, weights, tmp_path / "s.csv")
    sub = _read_sub(tmp_path / "s.csv")
    assert len(sub) == 8 * len(ALL) and all(0 < p < 1 for p in sub.values())
    entry = result.studies[GOOD[0]]
    assert entry["status"] == "fallback" and "non-finite" in entry["reason"], entry
    assert result.studies[GOOD[1]]["status"] == "ok"


def test_classifiers_failing_warm_up_give_priors_not_a_crash(testset, weights, tmp_path, monkeypatch):
    from cspine_submit.score import prediction as models  # where the run looks score up

    def broken(*args, **kwargs):
        raise RuntimeError("out of GPU memory (simulated)")

    monkeypatch.setattr(models, "score", broken)
    setup, result = _run(testset, weights, tmp_path / "s.csv")
    assert len(_read_sub(tmp_path / "s.csv")) == 8 * len(ALL)
    assert any("warm-up" in w and "simulated" in w for w in result.totals["warnings"])
    for uid in GOOD + [ONE_BAD_FILE]:
        assert result.studies[uid]["status"] == "fallback"
        assert result.studies[uid]["reason"].startswith("score: RuntimeError"), result.studies[uid]


def test_resume_redoes_studies_the_budget_skipped(testset, weights, tmp_path):
    out = tmp_path / "submission.csv"
    _, first = _run(testset, weights, out, time_budget=1e-3)
    skipped = [u for u, e in first.studies.items() if "time budget" in (e["reason"] or "")]
    assert skipped
    _, again = _run(testset, weights, out, resume=True)  # no budget this time
    for uid in skipped:
        assert not again.studies[uid].get("resumed"), again.studies[uid]
    assert all(again.studies[u]["status"] == "ok" for u in skipped if u in GOOD + [ONE_BAD_FILE])
    assert again.totals["resumed"] == len(ALL) - len(skipped)


def test_budget_ignores_studies_prefetched_at_an_older_k():
    # Workers prefetch studies with the K in force when they were submitted. After K drops, those older-K studies
    # still take the old time; counting them would lower K again (and again) before any study ran at the new K.
    b = stage.BudgetController(100.0, n_studies=20, slices_per_vertebra=15, min_history=1)
    # Projected 10 + 19 * 10 = 200 > 95 planned: K = floor(15 * (85 / 19) / 10) = 6.
    assert b.update(10.0, elapsed=10.0, done=1, k=15) == 6
    # Two studies prefetched at K=15 finish, as slow as before: K stays 6 (it used to drop to 2 here).
    assert b.update(10.0, elapsed=20.0, done=2, k=15) == 6
    assert b.update(10.0, elapsed=30.0, done=3, k=15) == 6
    assert len(b.events) == 1 and b.projected_total(30.0, 3) is None  # nothing measured at K=6 yet
    # The first study at K=6 takes 4 s: projected 34 + 16 * 4 = 98 > 95 -> floor(6 * (61 / 16) / 4) = 5.
    assert b.update(4.0, elapsed=34.0, done=4, k=6) == 5
    assert b.events[-1]["slices_per_vertebra"] == [6, 5]


def test_a_failing_run_still_writes_every_row(testset, weights, tmp_path, monkeypatch):
    # The run itself fails after two studies (e.g. the worker pool dies for good): the studies not done get their
    # priors, are not journaled (a --resume must do them), and the submission is complete.
    real = run_steps._iter_outcomes

    def two_then_fail(items, work_fn, workers, timeout=None):
        for i, outcome in enumerate(real(items, work_fn, workers, timeout)):
            if i == 2:
                raise RuntimeError("worker pool cannot start")
            yield outcome

    monkeypatch.setattr(run_steps, "_iter_outcomes", two_then_fail)
    out = tmp_path / "submission.csv"
    setup, result = _run(testset, weights, out)
    sub = _read_sub(out)
    assert list(sub) == list(setup.plan.row_ids) and all(0 < p < 1 for p in sub.values())
    stopped = [u for u, e in result.studies.items() if "run stopped" in (e["reason"] or "")]
    assert stopped and all("worker pool cannot start" in result.studies[u]["reason"] for u in stopped)
    assert any("STOPPED EARLY" in w for w in result.totals["warnings"])
    journaled = {json.loads(line).get("uid") for line in companion_paths(out)[0].read_text().splitlines()[1:]}
    assert len(journaled) >= 2 and not journaled & set(stopped)


def test_profile_cue_slices_are_decoded_once(synthetic_info, monkeypatch):
    # The profile planner decodes its cue slices; the crops reuse those the plans also need instead of decoding
    # them a second time, and the crops equal those built from a plain read of the needed slices.
    from cspine_submit.score import crop
    from cspine_submit.read import dicom
    from cspine_submit.config import ModelConfig, VERTEBRAE
    from cspine_submit.localize import load_ranges

    ranges = load_ranges(default_weights_dir() / "demo" / "slice_ranges.json")
    assert ranges.method == "profile"
    config = ModelConfig(head="tiny", input_size=32, channels="single", windows=((400, 1800),))
    folder = synthetic_info.test[0].folder
    real_decode = dicom.decode_into
    decoded: list[int] = []

    def counting_decode(header, index, *a, **k):  # every slice decoded goes through here (read_slices too)
        decoded.append(int(index))
        return real_decode(header, index, *a, **k)

    monkeypatch.setattr(dicom, "decode_into", counting_decode)
    prepared = stage.prepare_study(stage.StudyJob(folder.name, str(folder), ranges, config, VERTEBRAE))
    assert len(decoded) == len(set(decoded)) == prepared.slices_read
    monkeypatch.setattr(dicom, "decode_into", real_decode)
    header = dicom.scan_study(folder)
    from cspine_submit.localize import plan_crops

    plans = plan_crops(header, ranges, config)
    needed = crop.slices_needed(plans, config, header.n_slices)
    slices = dicom.read_slices(header, needed)
    for v, plan in plans.items():
        np.testing.assert_array_equal(prepared.crops[v], crop.encode_crops(crop.prepare_crops(slices, needed, plan, config)))


def test_reusable_stacks_share_memory_per_name_and_read_reusing_copies_known_slices():
    """The reader's stacks (read/stacks.py): the next study of a name writes over the same buffer; known slices are
    copied, not decoded again."""
    from cspine_submit.read import stacks

    a = stacks.reusable_stack("test-a", (2, 4, 4), np.int16)
    b = stacks.reusable_stack("test-a", (1, 4, 4), np.float32)  # smaller, other dtype: the same bytes
    assert np.shares_memory(a, b) and b.dtype == np.float32 and b.shape == (1, 4, 4)
    assert not np.shares_memory(a, stacks.reusable_stack("test-b", (2, 4, 4), np.int16))

    class Header:
        rows, cols = 4, 4

    known = np.arange(2 * 16, dtype=np.int16).reshape(2, 4, 4)
    out = stacks.read_reusing(Header(), np.array([7, 3, 7]), np.array([3, 7]), known, dtype=np.int16)
    assert np.array_equal(out, known[[1, 0, 1]])  # no decode: every wanted slice was known
