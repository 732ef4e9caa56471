"""Issue 18 item 3 at decode time: a slice whose header is fine but whose pixels cannot be decoded costs that slice,
not the study. Its row holds the nearest readable slice (never what the reused stack held before), the report names
the file and the reason, and a study with too many such slices falls back to priors with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from cspine_submit import localize
from cspine_submit.config import PREDICTION_TYPES, VERTEBRAE, ModelConfig
from cspine_submit.files import default_weights_dir
from cspine_submit.read import dicom, stacks
from cspine_submit.submit.submission import companion_paths
from cspine_submit.submit.worker import StudyJob, prepare_study

from _pipeline_helpers import UID_ROOT, write_study, write_weights

JPEG_SV1 = "1.2.840.10008.1.2.4.70"


def truncate_to_jpeg(path: Path) -> Path:
    """Rewrite ``path``'s pixels as a JPEG Lossless SV1 codestream cut after its start marker (SOI, then EOI): the
    header stays readable, the pixels are refused by every route, pydicom's included. (A codestream cut later is
    decoded by pydicom's plugins into whatever they make of it: those values stand, see test_decode_safety.)"""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG_SV1
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def copy_pixels(src: Path, dst: Path) -> None:
    """``dst`` keeps its header (position, instance number) but takes ``src``'s pixels (and their syntax)."""
    ds, other = pydicom.dcmread(dst), pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = other.file_meta.TransferSyntaxUID
    ds.PixelData = other.PixelData
    ds["PixelData"].VR = other["PixelData"].VR
    ds.save_as(dst, enforce_file_format=True)


def test_a_failed_slice_takes_its_nearest_readable_neighbour_never_stale_pixels(tmp_path):
    study = write_study(tmp_path / "a", f"{UID_ROOT}.91", n_slices=8, size=16, seed=3)
    truncate_to_jpeg(study / "5.dcm")  # index 4
    header = dicom.scan_study(study)
    assert header.skipped == ()  # the header is fine: only decoding fails
    with pytest.raises(dicom.DicomReadError, match="5.dcm"):
        dicom.read_slices(header, [4])
    # Fill the reused stack with values no slice holds, as the previous study would have left it.
    stacks.reusable_stack("crops", (8, 16, 16), dicom.hu_dtype(header))[...] = 12345
    with pytest.raises(dicom.DicomReadError, match="5.dcm"):
        stacks.read_reusing(header, np.array([3, 4, 5]), np.zeros(0, np.int64), np.zeros((0, 16, 16)),
                            stack="crops", dtype=dicom.hu_dtype(header))
    failed: dict = {}
    out = stacks.read_reusing(header, np.array([2, 4, 6]), np.zeros(0, np.int64), np.zeros((0, 16, 16)),
                              stack="crops", dtype=dicom.hu_dtype(header), failed=failed)
    assert set(failed) == {4} and failed[4][1] == 3 and not failed[4][0].startswith(str(study))
    np.testing.assert_array_equal(out[1], dicom.read_slices(header, [3])[0])  # the stand-in, decoded for it
    assert not (out == 12345).any()
    # A second call of the same study reuses the record: the failed file is not decoded again.
    calls = []
    real = dicom.decode_into
    try:
        dicom.decode_into = lambda h, i, o, **kw: (calls.append(i), real(h, i, o, **kw))[1]
        again = stacks.read_reusing(header, np.array([4]), np.zeros(0, np.int64), np.zeros((0, 16, 16)),
                                    failed=failed)
    finally:
        dicom.decode_into = real
    assert calls == [3]
    np.testing.assert_array_equal(again[0], out[1])


def test_no_readable_neighbour_is_an_error_naming_the_file(tmp_path):
    study = write_study(tmp_path / "b", f"{UID_ROOT}.92", n_slices=8, size=16, seed=4)
    for k in range(1, 9):
        truncate_to_jpeg(study / f"{k}.dcm")
    header = dicom.scan_study(study)
    with pytest.raises(dicom.DicomReadError, match=r"(?s)1\.dcm.*no readable slice within 3"):
        stacks.read_reusing(header, np.array([0]), np.zeros(0, np.int64), np.zeros((0, 16, 16)), failed={})


def _run(tmp_path: Path, images: Path, uids: list[str], workers: int) -> tuple[dict, dict]:
    from cspine_submit import submit as stage

    lines = ["row_id,StudyInstanceUID,prediction_type"] + [f"{u}_{t},{u},{t}" for u in uids for t in PREDICTION_TYPES]
    (tmp_path / "test.csv").write_text("\n".join(lines) + "\n")
    weights = tmp_path / "weights"
    if not weights.exists():
        write_weights(weights)
    setup = stage.prepare_run(images, tmp_path / "test.csv", weights)
    out = tmp_path / f"submission_{workers}.csv"
    stage.run_submission(setup, out, workers=workers, progress=False)
    rows = [r.split(",") for r in out.read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == [f"{u}_{t}" for u in uids for t in PREDICTION_TYPES]
    scores = {r[0]: float(r[1]) for r in rows}
    report = json.loads(companion_paths(out)[1].read_text())
    _run.totals = report["totals"]
    return scores, report["studies"]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_study_with_an_undecodable_slice_is_scored_as_with_its_stand_in(tmp_path, workers):
    """One truncated JPEG slice inside the planned range: the study is scored (ok, 8 rows), the report names the
    file and why, and the scores equal those of the same study with that slice holding its stand-in's pixels. A
    study with most slices broken, or with most of one vertebra's planned slices broken, falls back to priors, the
    reason naming a file."""
    images = tmp_path / "test_images"
    bad, same, most, thin = f"{UID_ROOT}.93", f"{UID_ROOT}.94", f"{UID_ROOT}.95", f"{UID_ROOT}.96"
    write_study(images / bad, bad, seed=7)
    shutil.copytree(images / bad, images / same)
    for p in (images / same).iterdir():  # the same pixels under the other study's UID
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = same
        ds.save_as(p, enforce_file_format=True)
    truncate_to_jpeg(images / bad / "12.dcm")  # index 11, mid-series: planned for one of C3-C4
    copy_pixels(images / same / "11.dcm", images / same / "12.dcm")  # the rule's stand-in: index 10
    write_study(images / most, most, seed=8)
    for k in range(1, 25):
        if k % 6:  # 20 of 24 slices broken
            truncate_to_jpeg(images / most / f"{k}.dcm")
    write_study(images / thin, thin, seed=9)
    for k in range(1, 25):
        if k % 3:  # 2 of every 3 slices broken, each next to a readable one: stand-ins exist, but too many
            truncate_to_jpeg(images / thin / f"{k}.dcm")
    scores, studies = _run(tmp_path, images, [bad, same, most, thin], workers)
    entry = studies[bad]
    assert entry["status"] == "ok", entry
    assert any(w.startswith("skipped 12.dcm:") and "11.dcm" in w for w in entry.get("warnings", [])), entry
    assert entry["slices_replaced"] == 1 and "files_skipped" not in entry
    assert _run.totals["slices_replaced"] == 1 and _run.totals["studies_with_bad_files"] == [bad], _run.totals
    assert studies[same]["status"] == "ok" and not studies[same].get("warnings"), studies[same]
    mine = [v for k, v in scores.items() if k.startswith(bad + "_")]
    theirs = [v for k, v in scores.items() if k.startswith(same + "_")]
    assert len(mine) == 8 and all(0.0 < v < 1.0 for v in mine)
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-6)
    assert studies[most]["status"] == "fallback", studies[most]
    assert ".dcm" in studies[most]["reason"] and "decode" in studies[most]["reason"], studies[most]
    assert studies[thin]["status"] == "fallback", studies[thin]
    assert "planned slices cannot be decoded" in studies[thin]["reason"] and ".dcm:" in studies[thin]["reason"]


def test_a_broken_cue_slice_costs_that_slice_on_the_profile_planner(synthetic_info, tmp_path):
    """The profile planner's cue is decoded first: a broken cue slice is replaced there as well, so the plans and
    the crops are those of the study with the stand-in's pixels in that file."""
    ranges = localize.load_ranges(default_weights_dir() / "demo" / "slice_ranges.json")
    config = ModelConfig(head="tiny", input_size=32, channels="single", windows=((400, 1800),))
    source = synthetic_info.test[0].folder
    broken, fixed = tmp_path / source.name, tmp_path / "same" / source.name
    shutil.copytree(source, broken)
    shutil.copytree(source, fixed)
    header = dicom.scan_study(broken)
    cue = localize.study_cue_indices(header, ranges)
    c = int(cue[len(cue) // 2])
    name = header.files[c].name
    truncate_to_jpeg(broken / name)
    copy_pixels(fixed / header.files[c - 1].name, fixed / name)
    got = prepare_study(StudyJob(source.name, str(broken), ranges, config, VERTEBRAE))
    want = prepare_study(StudyJob(source.name, str(fixed), ranges, config, VERTEBRAE))
    said = [w for w in got.warnings if w.startswith(f"skipped {name}:")]
    assert len(said) == 1 and header.files[c - 1].name in said[0], got.warnings
    assert got.plan == want.plan and set(got.crops) == set(want.crops)
    for v in want.crops:
        np.testing.assert_array_equal(got.crops[v], want.crops[v])


def test_a_retried_study_says_so_in_the_report(tmp_path, monkeypatch):
    """A study whose worker died and whose retry on pydicom's route succeeded (``Outcome.retried``, issue 18.4) is
    scored, and its report entry says it was retried (the reader's crash-and-retry itself: test_reader)."""
    import dataclasses

    from cspine_submit.read.reader import RETRIED
    from cspine_submit.submit import run

    images = tmp_path / "test_images"
    uids = [f"{UID_ROOT}.97", f"{UID_ROOT}.98"]
    for i, uid in enumerate(uids):
        write_study(images / uid, uid, seed=10 + i)
    real = run._iter_outcomes

    def one_retried(*args, **kwargs):
        for outcome in real(*args, **kwargs):
            if outcome.item.uid == uids[1]:
                outcome = dataclasses.replace(outcome, retried=f"{RETRIED} (SIGSEGV)")
            yield outcome

    monkeypatch.setattr(run, "_iter_outcomes", one_retried)
    _, studies = _run(tmp_path, images, uids, 0)
    assert studies[uids[0]]["status"] == "ok" and not studies[uids[0]].get("warnings"), studies[uids[0]]
    assert studies[uids[1]]["status"] == "ok", studies[uids[1]]
    assert any(RETRIED in w for w in studies[uids[1]].get("warnings", [])), studies[uids[1]]


def test_a_cue_mostly_broken_falls_back_with_the_reason(synthetic_info, tmp_path):
    """Every cue slice broken (each with readable neighbours, so stand-ins exist): the cue is no longer the study's,
    the study fails at its plan stage, the reason naming a file and the count."""
    from cspine_submit.submit.worker import StudyFailure

    ranges = localize.load_ranges(default_weights_dir() / "demo" / "slice_ranges.json")
    config = ModelConfig(head="tiny", input_size=32, channels="single", windows=((400, 1800),))
    source = synthetic_info.test[0].folder
    broken = tmp_path / source.name
    shutil.copytree(source, broken)
    header = dicom.scan_study(broken)
    cue = [int(i) for i in localize.study_cue_indices(header, ranges)]
    assert len(cue) >= 3 and len(cue) < header.n_slices  # slices between cue slices stay readable: stand-ins
    for i in cue:
        truncate_to_jpeg(header.files[i])
    with pytest.raises(StudyFailure, match=rf"^plan: ValueError: {len(cue)} of the planner's {len(cue)} cue slices "
                                           rf"cannot be decoded \(.*\.dcm: cannot decode pixel data"):
        prepare_study(StudyJob(source.name, str(broken), ranges, config, VERTEBRAE))
