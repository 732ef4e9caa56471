"""test.csv handling (incl. the public quirk), row ids, atomic write, the resume journal and the report."""

import json
import os
from pathlib import Path

import pytest

from cspine_submit.submit import submission as sub
from cspine_submit.config import PREDICTION_TYPES

# The public competition test.csv, verbatim (its 3 studies are not in the public test_images/).
PUBLIC_TEST_CSV = """row_id,StudyInstanceUID,prediction_type
1.2.826.0.1.3680043.10197_C1,1.2.826.0.1.3680043.10197,C1
1.2.826.0.1.3680043.10454_C1,1.2.826.0.1.3680043.10454,C1
1.2.826.0.1.3680043.10690_C1,1.2.826.0.1.3680043.10690,C1
"""
PUBLIC_TEST_IMAGES = ("1.2.826.0.1.3680043.22327", "1.2.826.0.1.3680043.25399", "1.2.826.0.1.3680043.5876")


def test_row_ids():
    assert sub.row_id("1.2.3", "C4") == "1.2.3_C4"
    assert sub.study_row_ids("9") == [f"9_{t}" for t in PREDICTION_TYPES]
    assert len(sub.study_row_ids("9")) == 8
    with pytest.raises(ValueError):
        sub.row_id("1.2.3", "T1")


def test_public_quirk_predicts_the_folders_present(tmp_path):
    (tmp_path / "test.csv").write_text(PUBLIC_TEST_CSV)
    for uid in PUBLIC_TEST_IMAGES:
        (tmp_path / "test_images" / uid).mkdir(parents=True)
    plan = sub.plan_rows(tmp_path / "test_images", tmp_path / "test.csv")
    assert plan.studies == tuple(sorted(PUBLIC_TEST_IMAGES))
    assert len(plan.row_ids) == 24
    assert plan.row_ids[:8] == tuple(sub.study_row_ids(sorted(PUBLIC_TEST_IMAGES)[0]))
    assert "quirk" in plan.notes[0]


def test_test_csv_rows_kept_in_order_and_missing_studies_noted(tmp_path):
    rows = ["row_id,StudyInstanceUID,prediction_type"]
    for uid in ("1.2.2", "1.2.1"):
        rows += [f"{uid}_{t},{uid},{t}" for t in PREDICTION_TYPES]
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "imgs" / "1.2.2").mkdir(parents=True)
    (tmp_path / "imgs" / "1.2.7").mkdir(parents=True)  # present but not listed: ignored
    plan = sub.plan_rows(tmp_path / "imgs", tmp_path / "test.csv")
    assert plan.studies == ("1.2.2", "1.2.1")
    assert plan.row_ids[0] == "1.2.2_patient_overall" and plan.row_ids[8] == "1.2.1_patient_overall"
    assert len(plan.row_ids) == 16
    assert "1 of 2 studies" in plan.notes[0]


def test_no_test_csv_uses_folders(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "file.txt").write_text("x")
    plan = sub.plan_rows(tmp_path, None)
    assert plan.studies == ("a", "b")
    assert len(plan.row_ids) == 16
    assert "no test.csv" in plan.notes[0]


def test_bad_test_csv_named(tmp_path):
    (tmp_path / "test.csv").write_text("row_id,StudyInstanceUID,prediction_type\nx_C9,x,C9\n")
    with pytest.raises(ValueError, match="test.csv: line 2"):
        sub.plan_rows(tmp_path, tmp_path / "test.csv")


def test_submission_text_exact_bytes():
    text = sub.submission_text(["a_C1", "a_C2"], {"a_C2": 0.25, "a_C1": 0.001})
    assert text == "row_id,fractured\na_C1,0.00100000\na_C2,0.25000000\n"
    with pytest.raises(ValueError, match="a_C1"):
        sub.submission_text(["a_C1"], {"a_C1": 1.0})
    with pytest.raises(KeyError, match="a_C3"):
        sub.submission_text(["a_C3"], {})


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "submission.csv"
    sub.write_submission(out, ["a_C1"], {"a_C1": 0.5})
    old = out.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        sub.write_submission(out, ["a_C1"], {"a_C1": 0.7})
    assert out.read_bytes() == old  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]  # no temp file left behind


def test_companion_paths(tmp_path):
    journal, report = sub.companion_paths(tmp_path / "submission.csv")
    assert journal.name == "submission.journal.jsonl"
    assert report.name == "submission.report.json"


def test_journal_resume_and_torn_line(tmp_path):
    path = tmp_path / "j.jsonl"
    probs = {t: 0.1 for t in PREDICTION_TYPES}
    j = sub.Journal(path, "fp1")
    j.start(keep=False)
    j.append("s1", probs, {"status": "ok"})
    j.append("s2", probs, {"status": "fallback", "reason": "x"})
    j.close()
    with open(path, "a") as fh:  # a kill in the middle of writing the third record
        fh.write('{"uid": "s3", "pro')
    records, notes = sub.Journal(path, "fp1").load()
    assert sorted(records) == ["s1", "s2"]
    assert "incomplete" in notes[0]
    # Resuming appends after the torn line, on a new line.
    j = sub.Journal(path, "fp1")
    j.start(keep=True)
    j.append("s3", probs, {"status": "ok"})
    j.close()
    records, _ = sub.Journal(path, "fp1").load()
    assert sorted(records) == ["s1", "s2", "s3"]
    assert records["s2"]["report"]["reason"] == "x"
    # Another run's journal is not reused.
    records, notes = sub.Journal(path, "fp2").load()
    assert records == {} and "another run" in notes[0]
    j = sub.Journal(path, "fp2")
    j.start(keep=True)  # mismatched: starts afresh
    j.close()
    assert len(path.read_text().splitlines()) == 1


def test_report_shape(tmp_path):
    import numpy as np

    path = sub.write_report(
        tmp_path / "r.json",
        {"s1": {"status": "ok", "reason": None, "slices_read": np.int64(12), "seconds": {"read": 0.5}}},
        {"studies": 1, "studies_per_s": 2.0},
    )
    data = json.loads(Path(path).read_text())
    assert data["studies"]["s1"]["slices_read"] == 12
    assert data["totals"]["studies_per_s"] == 2.0


def test_atomic_write_gives_normal_permissions(tmp_path):
    # mkstemp creates owner-only 0600 files; the submission must be as readable as any file written with open().
    old = os.umask(0o022)
    try:
        out = sub.write_submission(tmp_path / "submission.csv", ["a_C1"], {"a_C1": 0.5})
        assert out.stat().st_mode & 0o777 == 0o644
        os.chmod(out, 0o640)  # a file that exists keeps its mode
        sub.write_submission(out, ["a_C1"], {"a_C1": 0.6})
        assert out.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_probabilities_near_0_and_1_never_print_as_0_or_1():
    text = sub.submission_text(["a_C1", "a_C2", "a_C3"], {"a_C1": 1e-9, "a_C2": 1 - 1e-9, "a_C3": 0.5})
    values = [float(line.split(",")[1]) for line in text.splitlines()[1:]]
    assert all(0.0 < v < 1.0 for v in values), text
    assert values[0] == 1e-9 and values[1] == 1 - 1e-9
    assert text.splitlines()[3] == "a_C3,0.50000000"


def test_fallback_causes_group_without_any_path_relative_or_absolute():
    from cspine_submit.submit.run_report import _cause

    assert _cause("/tmp/x/empty_dir/1.2.3: empty study folder (no files)") == "<path>: empty study folder (no files)"
    assert _cause("empty_dir/1.2.3: empty study folder (no files)") == "<path>: empty study folder (no files)"
    assert _cause("test_images/1.2.3/12.dcm: truncated, 4 KiB (reading 1.2.3)") == \
        "<path>: truncated, 4 KiB (reading 1.2.3)"
    assert _cause("no GPU memory") == "no GPU memory"
