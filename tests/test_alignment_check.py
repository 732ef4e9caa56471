"""The plausibility check of the ``profile`` alignment: the training studies' leave-one-out alignment costs stored
with the template, and the run report's warning for a study whose cue matches the learned neck far worse.

The implausible study is written the way the real producer writes studies (``write_volume_study`` of a real neck
volume, cut like a competition scan), blanked to air below C4 like the partly blanked OpenKBP volumes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cspine_submit.config import VERTEBRAE, SliceRanges
from cspine_submit.localize import (
    IMPLAUSIBLE_FACTOR,
    alignment_check,
    cue_indices,
    load_ranges,
    load_truths,
    loo_alignment_costs,
    match_profile,
    plan_crops,
    ranges_from_truths,
)

WEIGHTS = Path(__file__).parents[1] / "weights"
REAL = Path(__file__).parent / "data" / "real_neck"


@pytest.fixture(scope="module")
def whole_truths(real_neck_whole):
    truths, skipped = load_truths(real_neck_whole / "segmentations", real_neck_whole / "images")
    assert skipped == [] and len(truths) == 11
    return truths


def _cost(truth, ranges) -> float:
    idx = cue_indices(truth.n_slices, truth.z_mm, ranges.extra.get("cue"))
    return match_profile(truth.z_mm[idx], truth.profile[idx], ranges, (truth.z_mm[0], truth.z_mm[-1]))[2]


def test_leave_one_out_cost_reference_is_learned_and_stored(whole_truths, tmp_path):
    ranges = ranges_from_truths(whole_truths, method="profile")
    ref = ranges.extra["profile_template"]["loo_cost"]
    assert ref["n"] == 11 and len(ref["values"]) == 11
    values = np.array(ref["values"])
    assert ref["max"] == pytest.approx(values.max()) and ref["q50"] == pytest.approx(np.median(values))
    assert ref["q50"] <= ref["q90"] <= ref["max"]
    # Each value is the study aligned to ranges learned without it: the same as leaving it out by hand, and
    # dearer than aligning it to the template that learned from it (in-sample).
    held = 3
    others = [t for i, t in enumerate(whole_truths) if i != held]
    assert values[held] == pytest.approx(_cost(whole_truths[held], ranges_from_truths(others, method="profile")),
                                         abs=1e-4)
    in_sample = np.array([_cost(t, ranges) for t in whole_truths])
    assert (values >= in_sample - 1e-9).sum() >= 9 and values.mean() > 1.2 * in_sample.mean()
    # JSON-safe and read back as written.
    path = tmp_path / "slice_ranges.json"
    ranges.to_json(path)
    assert load_ranges(path).extra["profile_template"]["loo_cost"] == ref
    # Measured on these whole volumes: 0.74-2.83 (pt_34 the dearest).
    assert 0.5 < values.min() and values.max() < 4.0


def test_shipped_ranges_carry_the_reference_of_these_necks(whole_truths):
    """weights/slice_ranges.json is learned from these whole volumes: its stored reference is what this code gives."""
    shipped = load_ranges(WEIGHTS / "slice_ranges.json").extra["profile_template"]["loo_cost"]
    costs = loo_alignment_costs(whole_truths)
    assert [u for u, _ in costs] == [t.uid for t in whole_truths]
    np.testing.assert_allclose(shipped["values"], [c for _, c in costs], atol=1e-3)
    demo = load_ranges(WEIGHTS / "demo" / "slice_ranges.json").extra["profile_template"]["loo_cost"]
    assert demo["n"] == 72


def test_headers_only_ranges_have_no_reference(whole_truths):
    ranges = ranges_from_truths(whole_truths, method="fraction")
    assert "loo_cost" not in ranges.extra["profile_template"]
    assert loo_alignment_costs(whole_truths[:1]) == []


def test_old_ranges_without_reference_plan_the_same_and_judge_nothing(real_neck_dataset, tmp_path):
    from cspine_submit.config import ModelConfig
    from cspine_submit.read.dicom import scan_study
    from cspine_submit.localize import measure_cue

    root, records = real_neck_dataset
    new = load_ranges(WEIGHTS / "slice_ranges.json")
    d = json.loads((WEIGHTS / "slice_ranges.json").read_text())
    del d["extra"]["profile_template"]["loo_cost"]  # a file learned before the reference existed
    (tmp_path / "old.json").write_text(json.dumps(d))
    old = load_ranges(tmp_path / "old.json")
    header = scan_study(root / "images" / records[0]["uid"])
    cue_new, cue_old = measure_cue(header, new), measure_cue(header, old)
    assert cue_new == cue_old
    config = ModelConfig()
    assert plan_crops(header, new, config, cue=cue_new) == plan_crops(header, old, config, cue=cue_old)
    judged = alignment_check(cue_old.cost, old)
    assert judged["cost_reference"] is None and judged["threshold"] is None and judged["plausible"] is None
    assert judged["cost"] == pytest.approx(cue_old.cost, abs=1e-4) and judged["warning"] is None
    judged = alignment_check(cue_new.cost, new)
    assert judged["plausible"] is True and judged["threshold"] == pytest.approx(
        IMPLAUSIBLE_FACTOR * new.extra["profile_template"]["loo_cost"]["max"], abs=1e-3)


def test_alignment_check_thresholds_at_the_reference():
    ranges = SliceRanges(method="profile", layout="competition", per_vertebra={v: {} for v in VERTEBRAE}, n_masks=4,
                         extra={"profile_template": {"loo_cost": {"n": 4, "q50": 1.0, "q90": 1.8, "max": 2.0,
                                                                  "values": [0.5, 1.0, 1.0, 2.0]}}})
    assert alignment_check(2.0 * IMPLAUSIBLE_FACTOR, ranges)["plausible"] is True
    out = alignment_check(2.0 * IMPLAUSIBLE_FACTOR + 0.01, ranges)
    assert out["plausible"] is False and out["threshold"] == pytest.approx(2.0 * IMPLAUSIBLE_FACTOR)
    assert "implausible" in out["warning"] and "cspine-submit preview" in out["warning"]
    assert out["cost_reference"] == {"n": 4, "q50": 1.0, "q90": 1.8, "max": 2.0}
    assert alignment_check(None, ranges)["plausible"] is None  # could not be aligned at all: the fallback says so


def _write_blanked_study(folder: Path, uid: str, name: str = "pt_122") -> None:
    """A real neck written as a competition-style study (128 px, 1.25 mm, as the session's cut necks), its CT
    blanked to air from the top of C4 down: the cue sees a head and upper neck, then nothing."""
    from cspine_submit.datasets.volume_cut import competition_cut
    from cspine_submit.datasets.volume_study import load_pair, write_volume_study

    ct, labels = load_pair(REAL / f"{name}_ct.nii.gz", REAL / f"{name}_vert.nii.gz")
    c4_top = int(np.flatnonzero((labels.volume == 4).any(axis=(1, 2)))[0])
    hu = np.array(ct.volume, copy=True)
    hu[c4_top:] = -1024
    spec = competition_cut(labels.volume, labels.spacing, np.random.default_rng(5), size=128, slice_mm=1.25)
    write_volume_study(folder, dataclasses.replace(ct, volume=hu), labels, uid=uid, cut=spec, compressed=True)


def test_submit_warns_on_an_implausible_alignment_and_still_scores(real_neck_dataset, tmp_path, capsys):
    """Two real neck cuts and one blanked below C4, run with the shipped real-neck ranges: the blanked study is
    scored (``ok``) with the header-only fallback plan and a warning in its plan entry, counted in the totals and
    named on the console; the real cuts are plausible."""
    from cspine_submit.cli import main
    from cspine_submit.config import PREDICTION_TYPES

    root, records = real_neck_dataset
    test_dir = tmp_path / "images"
    normal = [r["uid"] for r in records[:2]]
    for uid in normal:
        shutil.copytree(root / "images" / uid, test_dir / uid)
    bad = "1.2.826.0.1.3680043.99.9122"
    _write_blanked_study(test_dir / bad, bad)
    uids = normal + [bad]
    (tmp_path / "test.csv").write_text("row_id,StudyInstanceUID,prediction_type\n" + "".join(
        f"{u}_{t},{u},{t}\n" for u in uids for t in PREDICTION_TYPES))
    weights = tmp_path / "weights"
    shutil.copytree(WEIGHTS / "demo", weights, ignore=shutil.ignore_patterns("slice_ranges.json", "MANIFEST.json"))
    out = tmp_path / "submission.csv"
    code = main(["submit", "--test-dir", str(test_dir), "--test-csv", str(tmp_path / "test.csv"),
                 "--weights", str(weights), "--out", str(out), "--workers", "0", "--no-progress"])
    console = capsys.readouterr().out
    assert code == 0, console
    report = json.loads(out.with_name("submission.report.json").read_text())
    studies, totals = report["studies"], report["totals"]
    reference = load_ranges(WEIGHTS / "slice_ranges.json").extra["profile_template"]["loo_cost"]
    for uid in normal:
        alignment = studies[uid]["plan"]["alignment"]
        assert studies[uid]["status"] == "ok" and alignment["plausible"] is True and alignment["warning"] is None
        assert alignment["cost"] < reference["max"]  # the real cuts cost 0.46-1.9 against a max of 2.83
    entry = studies[bad]
    alignment = entry["plan"]["alignment"]
    # Still scored, but planned with the header-only fallback (learned from real masks' geometry), and it says why.
    assert entry["status"] == "ok" and entry["plan"]["method"] == "fraction"
    assert "aligned implausibly" in entry["plan"]["fallback_reason"]
    assert alignment["plausible"] is False and alignment["cost"] > alignment["threshold"]
    assert alignment["cost_reference"]["max"] == reference["max"]
    assert any("implausible profile alignment" in w for w in entry["warnings"])
    assert totals["implausible_alignment"] == 1 and totals["implausible_alignment_studies"] == [bad]
    assert "1 of 3 studies had an implausible profile alignment" in console
    assert f"cspine-submit preview {test_dir / bad}" in console
    assert len(out.read_text().splitlines()) == 1 + 8 * 3


def test_eval_ranges_shows_each_studys_cost_against_the_reference(real_neck_dataset, capsys):
    from cspine_submit.cli import main

    root, records = real_neck_dataset
    args = ["eval-ranges", "--segmentations", str(root / "segmentations"), "--images", str(root / "images"),
            "--ranges", str(WEIGHTS / "slice_ranges.json")]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = out["alignment_reference"]
    assert ref["cost_reference"]["n"] == 11 and ref["threshold"] == pytest.approx(
        IMPLAUSIBLE_FACTOR * ref["cost_reference"]["max"], abs=1e-3)
    costs = [d["alignment_cost"] for d in out["study_summary"].values()]
    assert len(costs) == 11 and all(0 < c < ref["threshold"] for c in costs)
    assert all(d["alignment_plausible"] is True for d in out["study_summary"].values())
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "align cost" in table and f"implausible above {ref['threshold']:.2f}" in table
