"""Vertebra extents as the competition's masks define them (issue 19 items 1-2), from the real tables in
tests/data/real_competition (58 of the competition's masks: per vertebra its first and last slice, whole bone).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cspine_submit.config import VERTEBRAE
from cspine_submit.localize import (
    column_extents,
    evaluate_ranges,
    load_extents,
    load_ranges,
    load_truths,
    plan_crops,
    ranges_from_truths,
    truths_from_extents,
    with_real_extents,
)

DATA = Path(__file__).parent / "data"
EXTENTS = DATA / "real_competition" / "vertebra_extents.csv"
WEIGHTS = Path(__file__).parents[1] / "weights"


@pytest.fixture(scope="module")
def extents():
    return load_extents(EXTENTS)


@pytest.fixture(scope="module")
def real_heights(extents):
    """Per vertebra (min, max) height in the 58 masks, mm; per neighbour pair (min, max) z-overlap, mm."""
    heights = {v: [(e.z_ranges[v][1] - e.z_ranges[v][0]) * e.dz for e in extents] for v in VERTEBRAE}
    overlaps = {(a, b): [(e.z_ranges[a][1] - e.z_ranges[b][0]) * e.dz for e in extents]
                for a, b in zip(VERTEBRAE, VERTEBRAE[1:])}
    return ({v: (min(h), max(h)) for v, h in heights.items()}, {k: (min(o), max(o)) for k, o in overlaps.items()})


def test_the_table_reads_and_is_the_whole_bone(extents, real_heights):
    assert len(extents) == 58
    heights, overlaps = real_heights
    # FACTS.md: 27-33 mm a vertebra at the median (C2 44 with the dens); neighbours overlap by 11-22 mm.
    med = {v: np.median([(e.z_ranges[v][1] - e.z_ranges[v][0]) * e.dz for e in extents]) for v in VERTEBRAE}
    assert max(med, key=med.get) == "C2" and 40 <= med["C2"] <= 48
    assert all(24 <= med[v] <= 35 for v in VERTEBRAE if v != "C2")
    assert all(lo > 0 for lo, _ in overlaps.values())  # every pair overlaps in every study


def test_bad_table_names_file_and_column(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("StudyInstanceUID,n,dz\n1.2.3,10,1.0\n")
    with pytest.raises(ValueError, match=r"t\.csv.*C1_first"):
        load_extents(bad)
    with pytest.raises(FileNotFoundError, match="no such extents table"):
        load_extents(tmp_path / "missing.csv")


def test_column_fractions_have_a_small_spread(extents):
    col = column_extents(extents)
    assert col["C1"]["top"]["q50"] == 0.0 and col["C7"]["bottom"]["q50"] == 1.0
    # FACTS.md: as fractions of the C1-top..C7-bottom span the tops and bottoms spread by sd 0.017-0.045.
    spreads = [col[v][edge]["std"] for v in VERTEBRAE for edge in ("top", "bottom")
               if not (v, edge) in (("C1", "top"), ("C7", "bottom"))]
    assert max(spreads) < 0.05
    for a, b in zip(VERTEBRAE, VERTEBRAE[1:]):  # neighbours overlap along the column too
        assert col[b]["top"]["q50"] < col[a]["bottom"]["q50"]


def _study_spread(result, key):
    a = np.array([s[key] for s in result["study_summary"].values()])
    return a.mean(), np.percentile(a, 5)


def test_header_only_planner_learned_leave_one_out_on_the_real_masks(extents, monkeypatch):
    """Issue 19: leave-one-out on the 58 real masks' geometry, 3 mm margin, the header-only planner covers at least
    0.75 of each vertebra's slices on average with purity at least 0.60."""
    truths = truths_from_extents(extents)
    result = evaluate_ranges(truths, method="fraction", z_margin_mm=3.0)
    # Measured (the column model: C1 top / C7 bottom from extent and spacing): coverage 0.758, purity 0.634;
    # per vertebra coverage 0.73-0.84; the 5th-percentile study 0.36 / 0.37.
    assert result["mean"]["coverage"] >= 0.75 and result["mean"]["purity"] >= 0.60
    assert all(result["per_vertebra"][v]["coverage"] >= 0.70 for v in VERTEBRAE)
    cov_mean, cov_p5 = _study_spread(result, "coverage")
    assert cov_p5 >= 0.30
    mm_top = evaluate_ranges(truths, method="mm_top", z_margin_mm=3.0)["mean"]
    assert result["mean"]["coverage"] > mm_top["coverage"] + 0.08  # beats mm from the top (0.61)
    # The per-edge fractions of the extent (what files without the column model plan with): 0.747 / 0.615, the
    # 5th-percentile study 0.24. The column model beats them on coverage, purity and the bad tail.
    import cspine_submit.localize.learn as learn

    monkeypatch.setattr(learn, "fit_header_column", lambda *a, **k: None)
    old = evaluate_ranges(truths, method="fraction", z_margin_mm=3.0)
    assert "header_column" not in learn.ranges_from_truths(truths).extra
    assert result["mean"]["coverage"] > old["mean"]["coverage"] and result["mean"]["purity"] > old["mean"]["purity"]
    assert cov_p5 > _study_spread(old, "coverage")[1] + 0.05


def test_shipped_fallback_does_as_well_on_the_real_masks(extents):
    ranges = load_ranges(WEIGHTS / "slice_ranges.json")
    assert ranges.extra["header_column"]["n_studies"] == 58
    result = evaluate_ranges(truths_from_extents(extents), ranges=ranges, method="fraction", z_margin_mm=3.0)
    # Measured: 0.774 / 0.648 (it has seen these studies; leave-one-out above is the honest number).
    assert result["mean"]["coverage"] >= 0.75 and result["mean"]["purity"] >= 0.60


def test_shipped_file_is_the_necks_template_with_the_real_extents(real_neck_whole, extents):
    """Regenerating the shipped file (its ``source`` says how) gives the same ranges."""
    shipped = load_ranges(WEIGHTS / "slice_ranges.json")
    truths, _ = load_truths(real_neck_whole / "segmentations", real_neck_whole / "images")
    again = with_real_extents(ranges_from_truths(truths, method="profile"), extents, table=str(EXTENTS))
    assert json.loads(json.dumps(again.per_vertebra)) == json.loads(json.dumps(shipped.per_vertebra))
    # The header-only column model is the table's (58 masks), not one of the 11 whole-volume necks.
    assert json.loads(json.dumps(again.extra["header_column"])) == shipped.extra["header_column"]
    assert shipped.extra["header_column"]["n_studies"] == 58 and "column model" in shipped.source
    assert json.loads(json.dumps(again.extra["profile_template"]["template"])) == \
        shipped.extra["profile_template"]["template"]
    assert "58 competition masks' extents" in shipped.source and "vertebra_extents.csv" in shipped.source
    assert "11 studies with images" in shipped.source and "real neck" in shipped.source
    assert shipped.extra["z_extents"]["n_studies"] == 58


def test_planned_extents_on_real_necks_are_real_heights_and_overlap(real_neck_dataset, real_heights):
    """The shipped planner on the 11 cut real necks: each vertebra's expected range is as tall as the real masks'
    vertebrae and overlaps its neighbours as they do."""
    from cspine_submit.config import ModelConfig
    from cspine_submit.read.dicom import scan_study

    heights, overlaps = real_heights
    ranges = load_ranges(WEIGHTS / "slice_ranges.json")
    root, records = real_neck_dataset
    for rec in records:
        plans = plan_crops(scan_study(root / "images" / rec["uid"]), ranges, ModelConfig())
        z = {v: plans[v].z_range_mm for v in VERTEBRAE}
        for v in VERTEBRAE:
            lo, hi = heights[v]
            assert lo <= z[v][1] - z[v][0] <= hi, (rec["name"], v, z[v])
        for (a, b), (lo, hi) in overlaps.items():
            assert lo - 2.0 <= z[a][1] - z[b][0] <= hi + 2.0, (rec["name"], a, b)


def test_eval_ranges_checks_the_shipped_fallback_on_masks_alone(capsys):
    """The user's way to check the shipped header-only fallback on their own masks (no images)."""
    from cspine_submit.cli import main

    code = main(["eval-ranges", "--segmentations", str(DATA / "nifti" / "verse"), "--layout", "affine",
                 "--ranges", str(WEIGHTS / "slice_ranges.json"), "--method", "fraction", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    result = out[0] if isinstance(out, list) else out
    assert result["method"] == "fraction" and result["n_studies"] == 2
    # VerSe scans are whole-spine-ish cuts, not neck CTs: the fraction fallback is not for them; only that it runs.
    assert 0.0 <= result["mean"]["coverage"] <= 1.0


def test_learn_ranges_extents_needs_images(tmp_path, capsys):
    from cspine_submit.cli import main

    code = main(["learn-ranges", "--segmentations", str(DATA / "nifti" / "verse"), "--layout", "affine",
                 "--extents", str(EXTENTS), "--out", str(tmp_path / "r.json")])
    assert code == 2 and "--extents needs --images" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# The real distributions the generator and the cut draw from (cspine_submit.datasets.real_geometry)


def _csv(name):
    import csv

    with open(DATA / "real_competition" / name, newline="") as fh:
        return list(csv.DictReader(fh))


def test_real_geometry_constants_are_the_tables():
    from collections import Counter

    from cspine_submit.datasets import real_geometry as R

    rows = _csv("study_geometry.csv")
    assert len(rows) == R.N_STUDIES == 2019
    pairs = Counter((float(r["dz_median"]), float(r["thk"])) for r in rows)
    assert {(a, b): n for a, b, n in R.SPACING_THICKNESS} == dict(pairs)
    assert R.REVERSED_SHARE == pytest.approx(sum(r["head_first"] == "False" for r in rows) / 2019)
    assert dict(R.SIZE_COUNTS) == {512: sum(r["H"] == "512" for r in rows), 768: sum(r["H"] == "768" for r in rows)}
    ext = _csv("vertebra_extents.csv")
    margins = [(float(r["C1_top_mm"]), float(r["zextent"]) - float(r["C7_bot_mm"])) for r in ext]
    assert [(a, pytest.approx(b, abs=1e-3)) for a, b in R.MARGINS_MM] == margins


def test_label_model_matches_the_real_label_counts():
    """Exact under the model (enumerated), against FACTS.md's counts of the real train.csv."""
    from cspine_submit.datasets import real_geometry as R

    probs = R.label_set_probabilities()
    assert sum(probs.values()) == pytest.approx(1.0)
    n = 2019
    counts = [n * sum(p for s, p in probs.items() if len(s) == m) for m in range(7)]
    assert counts == pytest.approx([1058, 623, 239, 64, 26, 7, 2], abs=0.5)
    prevalence = {"C1": 0.072, "C2": 0.141, "C3": 0.036, "C4": 0.053, "C5": 0.080, "C6": 0.137, "C7": 0.195}
    for v, p in prevalence.items():
        assert sum(q for s, q in probs.items() if v in s) == pytest.approx(p, abs=0.002), v
    pair = {(a, b): n * sum(q for s, q in probs.items() if a in s and b in s) for a, b in zip(VERTEBRAE, VERTEBRAE[1:])}
    assert pair[("C1", "C2")] == pytest.approx(56, abs=2)
    assert pair[("C5", "C6")] == pytest.approx(90, abs=2)
    assert pair[("C6", "C7")] == pytest.approx(130, abs=2)
    # FACTS.md: P(C2 | C1) = 0.38, P(C6 | C5) = 0.56, P(C7 | C6) = 0.47.
    assert pair[("C1", "C2")] / (n * prevalence["C1"]) == pytest.approx(0.38, abs=0.02)
    assert pair[("C5", "C6")] / (n * prevalence["C5"]) == pytest.approx(0.56, abs=0.02)
    assert pair[("C6", "C7")] / (n * prevalence["C6"]) == pytest.approx(0.47, abs=0.02)


# ---------------------------------------------------------------------------------------------------------------
# Odd real geometries (study_geometry.csv), written small and read back (issue 19 item 4)


def _geometry_row(uid_suffix: str) -> dict:
    return next(r for r in _csv("study_geometry.csv") if r["StudyInstanceUID"].endswith(uid_suffix))


def _write_positions(folder: Path, slices, *, size: int = 8, thickness: float = 1.0) -> Path:
    """One tiny uncompressed file per ``(file number, x, y, z, series uid)``, minimal competition headers."""
    from pydicom.dataset import Dataset, FileMetaDataset

    folder.mkdir(parents=True, exist_ok=True)
    for number, x, y, z, series in slices:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = f"{series}.{number}"
        meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.99.1", series
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [f"{x:.4f}", f"{y:.4f}", f"{z:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = thickness
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.full((size, size), number % 1000, np.int16).tobytes()  # the file's number, to check order
        ds.save_as(folder / f"{number}.dcm", enforce_file_format=True)
    return folder


def _plans_follow_the_real_z(header):
    """Header-only planning with the shipped fallback: every planned slice lies in its vertebra's expected range
    (plus the margin) by the header's own z, which is each slice's real position."""
    import dataclasses

    from cspine_submit.config import ModelConfig

    ranges = load_ranges(WEIGHTS / "slice_ranges.json")
    config = ModelConfig()
    plans = plan_crops(header, dataclasses.replace(ranges, method="fraction"), config)
    for v, plan in plans.items():
        idx = np.asarray(plan.slice_indices)
        assert (np.diff(idx) > 0).all() and 0 <= idx.min() and idx.max() < header.n_slices
        lo, hi = plan.z_range_mm
        inside = (header.z[idx] >= lo - config.z_margin_mm - 1e-6) & (header.z[idx] <= hi + config.z_margin_mm + 1e-6)
        assert inside.all() or len(idx) == 1, (v, header.z[idx], plan.z_range_mm)
    return plans


def test_repeated_positions_keep_one_slice_per_position(tmp_path):
    """1.2.826.0.1.3680043.20756: files 542-1082 repeat the z of files 1-541 (0.4 mm)."""
    from cspine_submit.read.dicom import scan_study

    row = _geometry_row(".20756")
    assert int(row["n"]) == 1082 and int(row["n_dup_z"]) == 541
    n, dz, top = 60, float(row["dz_median"]), float(row["zmax"])
    slices = [(i + 1, 0.0, 0.0, top - i * dz, "1.2.3.1") for i in range(n)]
    slices += [(n + i + 1, 0.0, 0.0, top - i * dz, "1.2.3.1") for i in range(n)]
    header = scan_study(_write_positions(tmp_path / "dup", slices))
    assert header.n_slices == n and [p.name for p in header.files] == [f"{i + 1}.dcm" for i in range(n)]
    np.testing.assert_allclose(np.diff(header.z), dz, atol=1e-3)
    dups = [r for _, r in header.skipped if r.startswith("duplicate position")]
    assert len(dups) == n
    # Two series at the same positions: the first file's series is kept, the other named.
    slices2 = [(i + 1, 0.0, 0.0, top - i * dz, "1.2.3.1") for i in range(n)]
    slices2 += [(n + i + 1, 0.0, 0.0, top - i * dz, "1.2.3.2") for i in range(n)]
    header2 = scan_study(_write_positions(tmp_path / "two", slices2))
    assert header2.n_slices == n and header2.series_uid == "1.2.3.1"
    assert all("other series 1.2.3.2 (study series is 1.2.3.1)" in r for _, r in header2.skipped)
    _plans_follow_the_real_z(header)


@pytest.mark.parametrize("uid", [".24673", ".29630"])
def test_drifting_in_plane_position_and_irregular_spacing_plan_with_the_real_z(tmp_path, uid):
    """Gantry tilt: x and y drift per slice, steps 0.76-1.26 mm (and one repeated z in .24673)."""
    from cspine_submit.read.dicom import scan_study

    row = _geometry_row(uid)
    n = int(row["n"])
    rng = np.random.default_rng(0)
    steps = rng.uniform(float(row["dz_min"]) or 0.76, float(row["dz_max"]), size=n - 1)
    if int(row["n_dup_z"]):
        steps[n // 2] = 0.0
    z = float(row["zmax"]) - np.concatenate([[0.0], np.cumsum(steps)])
    start = int(row["slice_min"])
    slices = [(start + i, -80.0 + 0.11 * i, -120.0 + 0.37 * i, z[i], "1.2.3.1") for i in range(n)]
    header = scan_study(_write_positions(tmp_path / uid.strip("."), slices))
    expected = n - int(row["n_dup_z"])
    assert header.n_slices == expected
    order = sorted(range(n), key=lambda i: -z[i])  # head first: largest z
    kept = [f"{start + i}.dcm" for i in order if not (int(row["n_dup_z"]) and i == n // 2 + 1)]
    assert [p.name for p in header.files] == kept
    # z is each slice's own position (toward the feet), not index x median step.
    np.testing.assert_allclose(header.z - header.z[0], z.max() - z[[int(f[:-4]) - start for f in kept]], atol=1e-3)
    assert any("uneven slice spacing" in w for w in header.warnings)
    assert np.ptp(header.positions[:, 0]) > 1.0 and np.ptp(header.positions[:, 1]) > 1.0
    _plans_follow_the_real_z(header)


@pytest.mark.parametrize("uid,first", [(".29872", 2), (".8362", 2)])
def test_any_first_file_number(tmp_path, uid, first):
    from cspine_submit.read.dicom import scan_study

    row = _geometry_row(uid)
    assert int(row["slice_min"]) == first
    n = int(row["n"])
    dz = float(row["z_extent_mm"]) / (n - 1)  # regular: the table's median step is rounded
    head_first = row["head_first"] == "True"
    top = float(row["zmax"])
    slices = [(first + i, 0.0, 0.0, (top - i * dz) if head_first else (top - (n - 1 - i) * dz), "1.2.3.1")
              for i in range(n)]
    header = scan_study(_write_positions(tmp_path / uid.strip("."), slices))
    assert header.n_slices == n and header.reversed == (not head_first)
    names = [f"{first + i}.dcm" for i in range(n)]
    assert [p.name for p in header.files] == (names if head_first else names[::-1])
    assert header.z[-1] - header.z[0] == pytest.approx(float(row["z_extent_mm"]), abs=0.01)
    _plans_follow_the_real_z(header)


def test_a_file_numbered_from_59(tmp_path):
    from cspine_submit.read.dicom import scan_study

    slices = [(59 + i, 0.0, 0.0, 100.0 - 0.625 * i, "1.2.3.1") for i in range(40)]
    header = scan_study(_write_positions(tmp_path / "s59", slices))
    assert header.files[0].name == "59.dcm" and header.files[-1].name == "98.dcm" and not header.reversed


@pytest.mark.parametrize("uid", [".20574", ".8693", ".20925"])
def test_very_short_and_very_long_studies_are_planned(tmp_path, uid):
    """.20574: 48.5 mm (98 slices, feet first); .8693: 69 slices 2.63 mm apart with drift; .20925: 825 slices."""
    from cspine_submit.config import ModelConfig
    from cspine_submit.read.dicom import scan_study

    row = _geometry_row(uid)
    n = int(row["n"])
    dz = float(row["z_extent_mm"]) / (n - 1)  # regular steps (.20925 alternates 0.312 / 0.313 mm)
    head_first = row["head_first"] == "True"
    drift = int(row["x_nuniq"]) > 1
    slices = [(i + 1, 0.3 * i * drift, 0.2 * i * drift,
               (float(row["zmax"]) - i * dz) if head_first else (float(row["zmin"]) + i * dz), "1.2.3.1")
              for i in range(n)]
    header = scan_study(_write_positions(tmp_path / uid.strip("."), slices, size=4))
    assert header.n_slices == n and header.spacing[0] == pytest.approx(float(row["dz_median"]), abs=2e-3)
    assert header.z[-1] - header.z[0] == pytest.approx(float(row["z_extent_mm"]), abs=0.01)
    _plans_follow_the_real_z(header)
    # With the image cue (the shipped method) these random images cannot be aligned: the plan falls back to the
    # header-only ranges and says so.
    from cspine_submit.localize import measure_cue

    ranges = load_ranges(WEIGHTS / "slice_ranges.json")
    cue = measure_cue(header, ranges)
    plans = plan_crops(header, ranges, ModelConfig(), cue=cue)
    assert all(len(p.slice_indices) >= 1 for p in plans.values())
    if cue.anchor_mm is None:
        assert "fraction" in cue.fallback


def test_inspect_says_what_it_found(tmp_path, capsys):
    from cspine_submit.cli import main

    n = 30
    slices = [(2 + i, -80.0 + 0.2 * i, -100.0 + 0.3 * i, 50.0 - 0.625 * i, "1.2.3.1") for i in range(n)]
    slices += [(2 + n + i, -80.0 + 0.2 * i, -100.0 + 0.3 * i, 50.0 - 0.625 * i, "1.2.3.1") for i in range(n)]
    folder = _write_positions(tmp_path / "odd", slices)
    assert main(["inspect", str(folder), "--no-pixels"]) == 0
    out = capsys.readouterr().out
    assert "30 file(s) repeat another file's position" in out and "files numbered 2-31" in out
    assert "in-plane position drifts by 5.8 mm in x and 8.7 mm in y" in out
    assert "short: 18.1 mm" in out and "every ImagePositionPatient repeats 2 times" in out
