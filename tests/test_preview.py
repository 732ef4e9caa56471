"""The preview picture: a valid PNG of the expected size, bands where the plan says, mask outline when given."""

from __future__ import annotations


import numpy as np
import pytest

from cspine_submit.config import VERTEBRAE
from cspine_submit.tools import preview
from cspine_submit.tools.preview import COLOURS_BGR, LANE_W, N_LANES, render_preview, subset_indices
from cspine_submit.localize import CropPlan

cv2 = pytest.importorskip("cv2")


def _hand_made(n=60, rows=40, cols=50):
    """A study of n slices at 2 mm: a bright column in a soft-tissue body, and plans of 6 slices per vertebra."""
    hu = np.full((n, rows, cols), -1000.0, dtype=np.float32)
    hu[:, 5:35, 5:45] = 40.0
    hu[:, 18:26, 20:30] = 900.0
    z = 100.0 + 2.0 * np.arange(n)
    plans = {v: CropPlan(v, tuple(range(5 + 7 * k, 5 + 7 * k + 11, 2)), (15, 17, 29, 33)) for k, v in enumerate(VERTEBRAE)}
    return hu, z, plans


def test_render_preview_size_and_bands():
    hu, z, plans = _hand_made()
    idx = subset_indices(len(z), 20)
    assert len(idx) == 20 and idx[0] == 0 and idx[-1] == len(z) - 1
    image, geo = render_preview(hu[idx], idx, z, (2.0, 0.8, 0.8), plans)
    # Physical scale: 120 mm of z, 32 x 40 mm in-plane -> 512 / 120 px per mm.
    assert geo.scale == pytest.approx(512 / 120)
    assert image.shape == (geo.image_h, geo.width, 3) and image.dtype == np.uint8
    assert geo.height == 512 and geo.sag_w == round(40 * 0.8 * geo.scale) and geo.cor_w == round(50 * 0.8 * geo.scale)
    # Ruler, the panels with their lane strips; the direction labels above, the key below.
    assert geo.width == preview.RULER_W + geo.sag_w + geo.cor_w + 2 * N_LANES * LANE_W + preview.GAP
    assert geo.top == preview.LABEL_H and geo.image_h > geo.top + geo.height + 20
    for v, plan in plans.items():
        first, last = plan.slice_indices[0], plan.slice_indices[-1]
        top, bottom = geo.row_of(z[first] - 1.0), geo.row_of(z[last] + 1.0) - 1
        for strip in (0, 1):
            x0, x1 = geo.lane_x(v, strip)
            x = x0 + 1  # left of the name text
            assert tuple(image[top + 1, x]) == COLOURS_BGR[v]
            assert tuple(image[bottom - 1, x]) == COLOURS_BGR[v]
            assert tuple(image[top + (bottom - top) // 2, x1 - 2]) == COLOURS_BGR[v]
            if top >= 2:  # just above the band: not this vertebra's colour (lanes keep neighbours apart)
                assert tuple(image[top - 2, x]) != COLOURS_BGR[v]
    # The bone window shows the column brighter than soft tissue at the panel's centre column.
    mid_row = geo.top + geo.height // 2
    col_px = geo.sagittal_x0 + int(22 * 0.8 * geo.scale)
    soft_px = geo.sagittal_x0 + int(8 * 0.8 * geo.scale)
    assert image[mid_row, col_px].mean() > image[mid_row, soft_px].mean() + 100


def test_render_preview_draws_mask_outline():
    hu, z, plans = _hand_made()
    idx = subset_indices(len(z), 30)
    mask = np.zeros_like(hu, dtype=np.uint8)
    mask[10:20, 16:28, 18:32] = 3  # C3
    without, geo = render_preview(hu[idx], idx, z, (2.0, 0.8, 0.8), plans)
    with_mask, _ = render_preview(hu[idx], idx, z, (2.0, 0.8, 0.8), plans, mask=mask[idx])
    panel = slice(geo.sagittal_x0 + 8, geo.sagittal_x0 + geo.sag_w)  # right of the slice ticks
    colour = np.array(COLOURS_BGR["C3"])
    n_without = np.all(without[:, panel] == colour, axis=-1).sum()
    n_with = np.all(with_mask[:, panel] == colour, axis=-1).sum()
    assert n_with > n_without + 50


def test_preview_command_on_synthetic_study(synthetic_dataset, synthetic_info, tmp_path):
    from cspine_submit.cli import main

    record = next(r for r in synthetic_info.train if r.segmented)
    out = tmp_path / "p.png"
    mask = synthetic_dataset / "segmentations" / f"{record.uid}.nii"
    assert main(["preview", str(record.folder), "--out", str(out), "--mask", str(mask), "--max-slices", "24"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imread(str(out))
    assert img is not None and img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 200
    # Refuses to overwrite without --force.
    assert main(["preview", str(record.folder), "--out", str(out)]) == 2


def test_coronal_panel_cuts_through_the_column_not_the_box_centre():
    # Boxes much deeper than the column (as learned boxes are): their centre row (20) lies in front of the bone
    # (rows 27-31), so a cut at the box centre would show soft tissue only.
    hu, z, plans = _hand_made()
    hu[:, 18:26, 20:30] = 40.0
    hu[:, 27:32, 20:30] = 900.0
    plans = {v: CropPlan(v, p.slice_indices, (6, 12, 34, 38)) for v, p in plans.items()}
    idx = subset_indices(len(z), 20)
    image, geo = render_preview(hu[idx], idx, z, (2.0, 0.8, 0.8), plans, slab_mm=1.6)
    mid_row = geo.top + geo.height // 2
    bone_px = geo.coronal_x0 + int(25 * 0.8 * geo.scale)
    soft_px = geo.coronal_x0 + int(8 * 0.8 * geo.scale)
    assert image[mid_row, bone_px].mean() > image[mid_row, soft_px].mean() + 100


def test_preview_command_names_a_corrupt_mask(synthetic_info, tmp_path, capsys):
    from cspine_submit.cli import main

    record = next(r for r in synthetic_info.train if r.segmented)
    bad = tmp_path / "broken.nii"
    bad.write_bytes(b"not a nifti file at all" * 20)
    assert main(["preview", str(record.folder), "--out", str(tmp_path / "p.png"), "--mask", str(bad),
                 "--max-slices", "8"]) == 2
    assert "broken.nii" in capsys.readouterr().out


def test_preview_study_defaults_to_the_shipped_ranges(synthetic_info):
    from cspine_submit.tools.preview import preview_study

    folder = synthetic_info.test[0].folder
    image, _, plans, info = preview_study(folder)
    assert image.ndim == 3 and image.shape[2] == 3
    assert set(plans) == set(VERTEBRAE)
    assert info["n_slices"] == synthetic_info.test[0].n_slices


def test_preview_has_direction_labels_a_ruler_a_scale_bar_and_a_key():
    hu, z, plans = _hand_made()
    idx = subset_indices(len(z), 20)
    image, geo = render_preview(hu[idx], idx, z, (2.0, 0.8, 0.8), plans)
    # The direction labels follow the study's orientation: a flipped one gives other letters above the panels.
    flipped, _ = render_preview(hu[idx], idx, z, (2.0, 0.8, 0.8), plans, axcodes=("I", "A", "R"))
    labels = np.s_[: geo.top, geo.sagittal_x0 : geo.width]
    assert image[labels].max() > 200 and not np.array_equal(image[labels], flipped[labels])
    assert np.array_equal(image[geo.top :], flipped[geo.top :])  # only the labels change
    # Ruler: a tick every 5 mm below the first slice (at 512/120 px per mm, 10 mm = 43 px: labels every 10 mm).
    minor, major = preview.ruler_step_mm(geo.scale)
    assert (minor, major) == (5, 10)
    tick_x = geo.sagittal_x0 - 3
    for mm in (0, 5, 50, 115):
        assert image[geo.row_of(z[0] + mm), tick_x].max() > 150, mm
    assert image[geo.row_of(z[0] + 2.5), tick_x].max() == 0
    # Scale bar: `major` mm long under the sagittal panel, then the key's text.
    bar_row = geo.top + geo.height + 12
    bar = np.flatnonzero(image[bar_row, : geo.sagittal_x0 + int(major * geo.scale) + 6].max(axis=1) > 200)
    assert bar[0] == geo.sagittal_x0 and bar[-1] - bar[0] == pytest.approx(major * geo.scale, abs=1.5)
    assert image[bar_row + 8 :, :].max() > 150  # the key
    assert "ticks" in preview.KEY_TEXT and "planned slices" in preview.KEY_TEXT


def test_key_wraps_to_the_image_width():
    lines = preview.key_lines(300)
    assert len(lines) > 2 and " ".join(lines) == " ".join(preview.KEY_TEXT.split())
    assert all(cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, 0.33, 1)[0][0] <= 292 for line in lines)


def test_preview_with_weights_plans_as_the_run_does(synthetic_info, tmp_path, capsys):
    """`preview --weights DIR` plans with DIR's ranges and config, as `submit --weights DIR` does: the same slices
    (the run reports DICOM file numbers, preview 0-based indices and the files) and boxes as the run's worker."""
    from cspine_submit.cli import main
    from cspine_submit.config import ModelConfig
    from cspine_submit.files import default_weights_dir
    from cspine_submit.submit import load_ranges_for
    from cspine_submit.submit.run import StudyJob, prepare_study
    from cspine_submit.tools.preview import preview_study

    demo = default_weights_dir() / "demo"
    folder = synthetic_info.test[0].folder
    assert main(["preview", str(folder), "--out", str(tmp_path / "p.png"), "--weights", str(demo),
                 "--max-slices", "24"]) == 0
    out = capsys.readouterr().out
    assert f"ranges {demo / 'slice_ranges.json'}" in out and "0-based" in out and ".dcm" in out
    ranges, _, _ = load_ranges_for(demo)
    config = ModelConfig.from_json(demo / "model_config.json")
    _, _, plans, info = preview_study(folder, ranges, config, max_slices=24)
    run = prepare_study(StudyJob(folder.name, str(folder), ranges, config, VERTEBRAE))
    for v, plan in plans.items():
        files = [int(info["file_names"][i].split(".")[0]) for i in plan.slice_indices]
        assert files == run.plan[v]["slices"], v
        assert list(plan.box) == [run.plan[v]["box"][k] for k in ("y0", "x0", "y1", "x1")], v
        first, last = plan.slice_indices[0], plan.slice_indices[-1]
        assert f"{v}: slices {first}-{last} (0-based; files {info['file_names'][first]}-" in out
