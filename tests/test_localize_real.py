"""Localization on real anatomy: the 11 real necks (tests/data/real_neck) written as competition-style studies.

The planner is judged the way users meet it: studies cut like competition scans (skull base to upper thorax, a
neck-sized field of view), leave-one-out by patient, ranges learned from the other patients' whole volumes (what
the shipped ``weights/slice_ranges.json`` is learned from).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cspine_submit.config import VERTEBRAE
from cspine_submit.localize import (
    MaskError,
    check_mask_on_bone,
    evaluate_ranges,
    load_ranges,
    load_truths,
    truth_from_files,
)

WEIGHTS = Path(__file__).parents[1] / "weights"


@pytest.fixture(scope="module")
def cut_truths(real_neck_dataset):
    root, _ = real_neck_dataset
    truths, skipped = load_truths(root / "segmentations", root / "images")
    assert skipped == [] and len(truths) == 11
    return truths


@pytest.fixture(scope="module")
def whole_truths(real_neck_whole):
    truths, skipped = load_truths(real_neck_whole / "segmentations", real_neck_whole / "images")
    assert skipped == [] and len(truths) == 11
    return truths


def test_leave_one_patient_out_profile_on_real_necks(cut_truths, whole_truths):
    result = evaluate_ranges(cut_truths, method="profile", learn_from=whole_truths, z_margin_mm=3.0)
    mean, per_v = result["mean"], result["per_vertebra"]
    # Measured on this set (seed 0, 128 px): coverage 0.870, purity 0.748, box 0.979, worst vertebra 0.82, worst
    # study 0.63, centre errors <= 6.8 mm; three 512-px cuts of the same
    # necks 0.873 / 0.751 (README). Floors a little below, so that a real regression fails and noise does not.
    assert mean["coverage"] >= 0.83 and mean["purity"] >= 0.72 and mean["box_coverage"] >= 0.95
    assert all(per_v[v]["coverage"] >= 0.70 for v in VERTEBRAE)
    errors = np.abs([e for e in result["anchor_error_mm"] if e is not None])
    assert len(errors) == 11 and np.median(errors) <= 6.0 and errors.max() <= 15.0
    # Nobody taught its own plan: every held-out study was learned from the 10 others.
    assert "minus the held-out study's UID" in result["learned_from"]
    worst = min(result["study_summary"].values(), key=lambda d: d["coverage"])
    assert worst["coverage"] >= 0.5


def test_profile_beats_the_header_only_methods_on_real_cuts(cut_truths, whole_truths):
    profile = evaluate_ranges(cut_truths, method="profile", learn_from=whole_truths)["mean"]
    fraction = evaluate_ranges(cut_truths, method="fraction")["mean"]  # leave-one-out among the cuts themselves
    mm_top = evaluate_ranges(cut_truths, method="mm_top")["mean"]
    assert profile["coverage"] > fraction["coverage"] + 0.05 and profile["purity"] > fraction["purity"] + 0.05
    assert profile["coverage"] > mm_top["coverage"] + 0.1


def test_shipped_default_ranges_are_learned_from_real_images():
    ranges = load_ranges(WEIGHTS / "slice_ranges.json")
    assert ranges.method == "profile" and ranges.n_masks == 11 and "real neck" in ranges.source
    template = ranges.extra["profile_template"]
    assert template["feature_set"] == "column_cells" and len(template["template"][0]) == 64
    # Real anatomy: C2 (with the dens) the tallest, the column 118-152 mm.
    lengths = {v: ranges.per_vertebra[v]["length_mm"]["q50"] for v in VERTEBRAE}
    assert max(lengths, key=lengths.get) == "C2"
    assert 115 <= ranges.extra["column_length_mm"]["q50"] <= 155


def test_shipped_default_ranges_on_cut_real_necks(cut_truths):
    # In-sample (the file was learned from these patients' whole volumes): a guard that the shipped file and the
    # planner agree, not a validation number (that is the leave-one-out test above).
    ranges = load_ranges(WEIGHTS / "slice_ranges.json")
    result = evaluate_ranges(cut_truths, ranges=ranges, z_margin_mm=3.0)
    assert result["mean"]["coverage"] >= 0.85 and result["mean"]["box_coverage"] >= 0.95


def test_mask_flipped_front_to_back_is_detected_not_learned(real_neck_dataset, tmp_path):
    root, records = real_neck_dataset
    uid = records[0]["uid"]
    seg = tmp_path / "segmentations"
    seg.mkdir()
    shutil.copy(root / "segmentations" / f"{uid}.nii", seg / f"{uid}.nii")
    img = nib.load(str(root / "segmentations" / f"{records[1]['uid']}.nii"))
    # The competition's sagittal layout: nibabel axis 1 runs along the study's rows (front/back).
    flipped = np.asanyarray(img.dataobj)[:, ::-1, :]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(flipped), img.affine), str(seg / f"{records[1]['uid']}.nii"))
    truths, skipped = load_truths(seg, root / "images")
    assert [t.uid for t in truths] == [uid]
    (name, reason), = skipped
    assert records[1]["uid"] in name and "do not lie on the bone" in reason and "flipped front to back" in reason
    with pytest.raises(MaskError, match="flipped front to back"):
        truth_from_files(seg / f"{records[1]['uid']}.nii", root / "images" / records[1]["uid"])


def test_check_mask_on_bone_is_pure_and_names_the_files():
    hu = np.full((2, 8, 8), 20.0)
    hu[:, 1:3, 3:5] = 600.0  # the vertebra, near the front
    labels = np.zeros((2, 8, 8), np.uint8)
    labels[:, 1:3, 3:5] = 4
    assert check_mask_on_bone(labels, hu, "m.nii", "study") == 600.0
    with pytest.raises(MaskError, match=r"m\.nii.*study.*median 20 HU.*flipped front to back"):
        check_mask_on_bone(labels[:, ::-1, :], hu, "m.nii", "study")


def test_eval_ranges_cli_reports_each_study(real_neck_dataset, real_neck_whole, capsys):
    from cspine_submit.cli import main

    root, records = real_neck_dataset
    code = main(["eval-ranges", "--segmentations", str(root / "segmentations"), "--images", str(root / "images"),
                 "--learn-segmentations", str(real_neck_whole / "segmentations"),
                 "--learn-images", str(real_neck_whole / "images"), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "profile" and set(out["study_summary"]) == {r["uid"] for r in records}
    for uid, d in out["study_summary"].items():
        assert d["worst"] in VERTEBRAE and abs(d["worst_offset_mm"]) < 40
        assert set(out["per_study"][uid]) == set(VERTEBRAE)
        assert all("offset_mm" in out["per_study"][uid][v] for v in VERTEBRAE)


def test_submit_on_real_necks_plans_every_vertebra_with_the_profile(real_neck_dataset, tmp_path, capsys):
    """``submit`` as a user runs it on real studies, with a weights folder that has no slice_ranges.json of its own
    (the seed's .h5 folder case): the shipped real-neck ranges are used, every study is ``ok``, planned with the
    image profile (no fallback), and each vertebra's planned z-range overlaps the vertebra in the study."""
    from cspine_submit.cli import main
    from cspine_submit.read.dicom import scan_study

    root, records = real_neck_dataset
    weights = tmp_path / "weights"
    # The demo classifiers and their config, without their own (synthetic) slice ranges or manifest.
    shutil.copytree(WEIGHTS / "demo", weights, ignore=shutil.ignore_patterns("slice_ranges.json", "MANIFEST.json"))
    out = tmp_path / "submission.csv"
    code = main(["submit", "--test-dir", str(root / "images"), "--test-csv", str(root / "test.csv"),
                 "--weights", str(weights), "--out", str(out), "--workers", "0", "--no-progress"])
    assert code == 0, capsys.readouterr().out
    rows = out.read_text().splitlines()
    assert rows[0] == "row_id,fractured" and len(rows) == 1 + 8 * 11
    report = json.loads(out.with_name("submission.report.json").read_text())
    studies = report["studies"]
    assert set(studies) == {r["uid"] for r in records}
    hits = []
    for rec in records:
        entry = studies[rec["uid"]]
        assert entry["status"] == "ok", entry
        plan = entry["plan"]
        assert plan["method"] == "profile" and plan["fallback_reason"] is None
        z = scan_study(root / "images" / rec["uid"]).z
        for v in VERTEBRAE:
            first, last = rec["z_ranges"][v]
            lo, hi = plan[v]["z_mm"]
            hits.append(lo <= z[last] and hi >= z[first])
    # Leave-one-out these necks reach coverage 0.87; with the file learned from them every range must overlap.
    assert all(hits)
