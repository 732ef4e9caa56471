"""crop.py: golden values computed by hand."""

import numpy as np
import pytest

from cspine_submit.config import ModelConfig
from cspine_submit.score.crop import PAD_HU, crop_square, prepare_crops, slices_needed, window
from cspine_submit.localize import CropPlan


def _cfg(**kw):
    base = dict(input_size=8, channels="single", windows=((400.0, 1800.0),), crop_margin=0.0)
    base.update(kw)
    return ModelConfig(**base)


def test_window_maps_level_and_edges():
    # WL 400 / WW 1800: -500 HU -> 0, 400 -> 0.5, 1300 -> 1, outside clipped.
    hu = np.array([-2000.0, -500.0, -50.0, 400.0, 850.0, 1300.0, 3000.0])
    np.testing.assert_allclose(window(hu, 400, 1800), [0, 0, 0.25, 0.5, 0.75, 1, 1], atol=1e-7)


def test_crop_square_grows_the_longer_side_around_the_centre():
    # h = 20, w = 40, margin 0.1 -> side round(40 * 1.2) = 48, centre (20, 40) -> top -4, left 16.
    assert crop_square((10, 20, 30, 60), 0.1) == (-4, 16, 48)
    assert crop_square((4, 4, 12, 12), 0.0) == (4, 4, 8)
    with pytest.raises(ValueError, match="empty"):
        crop_square((5, 5, 5, 9), 0.1)


def test_prepare_crops_without_resize_is_the_windowed_box():
    rng = np.random.default_rng(0)
    slices = rng.uniform(-1000, 2000, size=(3, 16, 16)).astype(np.float32)
    plan = CropPlan("C3", (7, 9), (4, 4, 12, 12))
    out = prepare_crops(slices, [5, 7, 9], plan, _cfg())
    assert out.shape == (2, 8, 8, 1) and out.dtype == np.float32
    # crop j is slice_indices[j] -> rows 1 and 2 of `slices`, pixels [4:12, 4:12], (hu + 500) / 1800 clipped.
    expected = np.clip((slices[[1, 2], 4:12, 4:12] + 500.0) / 1800.0, 0, 1)
    np.testing.assert_allclose(out[..., 0], expected, atol=1e-6)
    assert out[1, 3, 5, 0] == pytest.approx(np.clip((slices[2, 7, 9] + 500) / 1800, 0, 1), abs=1e-6)


def test_outside_the_image_is_air():
    slices = np.full((1, 16, 16), 1000.0, dtype=np.float32)
    # box (0, 0, 8, 8) with margin 0 is inside; shift it by using a box at the corner with margin 0.25:
    # side round(8 * 1.5) = 12, centre (4, 4) -> top -2, left -2: two rows/cols of padding.
    cfg = _cfg(input_size=12, windows=((0.0, 4096.0),), crop_margin=0.25)
    out = prepare_crops(slices, [0], CropPlan("C1", (0,), (0, 0, 8, 8)), cfg)[0, ..., 0]
    # WL 0 / WW 4096: low -2048; -1024 HU (air) -> 0.25; 1000 HU -> 3048 / 4096.
    assert PAD_HU == -1024.0
    np.testing.assert_allclose(out[:2, :], 0.25)
    np.testing.assert_allclose(out[:, :2], 0.25)
    np.testing.assert_allclose(out[2:, 2:], 3048 / 4096, rtol=1e-6)


def test_shrinking_averages_blocks():
    # 16x16 box -> 8x8 with INTER_AREA: each output pixel is the mean of a 2x2 block.
    base = np.arange(64, dtype=np.float32).reshape(8, 8) * 10.0
    big = np.kron(base, np.ones((2, 2), np.float32))
    big[::2, ::2] += 8.0  # one of the four pixels of every block: mean rises by 2 HU
    cfg = _cfg(windows=((1000.0, 4000.0),))  # low -1000
    out = prepare_crops(big[None], [0], CropPlan("C2", (0,), (0, 0, 16, 16)), cfg)[0, ..., 0]
    np.testing.assert_allclose(out, (base + 2.0 + 1000.0) / 4000.0, atol=1e-6)


def test_enlarging_is_bilinear():
    # 8x8 box -> 16x16 with INTER_LINEAR; along x, output 1 sits at source 0.25: 0.75 * a + 0.25 * b.
    row = np.array([0, 400, 800, 1200, 1600, 2000, 2400, 2800], np.float32)
    img = np.tile(row, (8, 1))
    cfg = _cfg(input_size=16, windows=((1000.0, 4000.0),))
    out = prepare_crops(img[None], [0], CropPlan("C2", (0,), (0, 0, 8, 8)), cfg)[0, 0, :, 0] * 4000.0 - 1000.0
    np.testing.assert_allclose(out[:4], [0, 100, 300, 500], atol=1e-2)
    np.testing.assert_allclose(out[-1], 2800, atol=1e-2)


def test_channel_modes():
    slices = np.stack([np.full((16, 16), v, np.float32) for v in (0.0, 100.0, 200.0, 300.0, 400.0, 500.0)])
    idx = np.arange(6)
    wins = ((400.0, 1800.0), (0.0, 1000.0))
    plan = CropPlan("C5", (0, 5), (4, 4, 12, 12))
    rep = prepare_crops(slices, idx, plan, _cfg(channels="replicate", windows=wins))
    assert rep.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(rep[1, 0, 0], [1000 / 1800] * 3, rtol=1e-6)  # 500 HU in WL400/WW1800
    win = prepare_crops(slices, idx, plan, _cfg(channels="windows", windows=wins))
    assert win.shape == (2, 8, 8, 2)
    np.testing.assert_allclose(win[1, 0, 0], [1000 / 1800, 1.0], rtol=1e-6)  # 500 HU in WL0/WW1000 -> 1
    np.testing.assert_allclose(win[0, 0, 0], [500 / 1800, 0.5], rtol=1e-6)
    # neighbours (offset 2): centre 0 -> slices [0, 0, 2]; centre 5 -> [3, 5, 5] (clipped at the study ends).
    cfg_n = _cfg(channels="neighbours", neighbour_offset=2, windows=((0.0, 1000.0),))
    nb = prepare_crops(slices, idx, plan, cfg_n)
    assert nb.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(nb[0, 3, 3], [0.5, 0.5, 0.7], rtol=1e-6)
    np.testing.assert_allclose(nb[1, 3, 3], [0.8, 1.0, 1.0], rtol=1e-6)


def test_slices_needed_and_neighbours_from_a_subset():
    plans = {
        "C1": CropPlan("C1", (1, 4), (0, 0, 8, 8)),
        "C2": CropPlan("C2", (4, 9), (0, 0, 8, 8)),
    }
    assert slices_needed(plans, _cfg(), 10).tolist() == [1, 4, 9]
    cfg_n = _cfg(channels="neighbours", neighbour_offset=2)
    need = slices_needed(plans, cfg_n, 10)
    assert need.tolist() == [0, 1, 2, 3, 4, 6, 7, 9]  # 1 -> (0 clipped from -1), 3; 9 -> 7, (9 clipped from 11)
    # Built from only the decoded subset, crops equal those built from the whole study.
    rng = np.random.default_rng(1)
    study = rng.uniform(-500, 1500, size=(10, 16, 16)).astype(np.float32)
    for plan in plans.values():
        full = prepare_crops(study, np.arange(10), plan, cfg_n)
        part = prepare_crops(study[need], need, plan, cfg_n)
        np.testing.assert_array_equal(full, part)
    with pytest.raises(ValueError, match="not decoded"):
        prepare_crops(study[[1, 9]], [1, 9], plans["C2"], _cfg())
    with pytest.raises(ValueError, match="outside"):
        slices_needed(plans, _cfg(), 5)


def test_empty_plan_gives_no_crops():
    out = prepare_crops(np.zeros((0, 16, 16)), [], CropPlan("C7", (), (0, 0, 8, 8)), _cfg(channels="windows"))
    assert out.shape == (0, 8, 8, 1)


def test_the_two_halves_store_the_crop_at_its_own_resolution_and_clip_to_the_windows():
    from cspine_submit.score.crop import hu_span, hu_squares, squares_to_input

    rng = np.random.default_rng(0)
    slices = rng.normal(300, 900, (4, 40, 40)).astype(np.float32)
    wins = ((400.0, 1800.0), (40.0, 400.0))
    cfg = _cfg(input_size=32, channels="windows", windows=wins)
    assert hu_span(cfg) == (-500.0, 1300.0)
    small = CropPlan("C3", (1, 2), (10, 10, 22, 22))  # side 12 (margin 0) < 32: kept at 12
    sq = hu_squares(slices, np.arange(4), small, cfg)
    assert sq.shape == (2, 1, 12, 12) and sq.min() >= -500 and sq.max() <= 1300
    np.testing.assert_array_equal(squares_to_input(sq, cfg), prepare_crops(slices, np.arange(4), small, cfg))
    big = CropPlan("C3", (0,), (0, 0, 40, 40))  # side 40 > 32: shrunk to 32 already
    assert hu_squares(slices, np.arange(4), big, cfg).shape == (1, 1, 32, 32)
    nb = _cfg(input_size=32, channels="neighbours", neighbour_offset=1)
    assert hu_squares(slices, np.arange(4), small, nb).shape == (2, 3, 12, 12)


@pytest.mark.parametrize("channels, windows", [
    ("single", ((400.0, 1800.0),)),
    ("windows", ((400.0, 1800.0), (400.0, 2500.0), (40.0, 400.0))),
    ("replicate", ((400.0, 1800.0),)),
    ("neighbours", ((400.0, 1800.0),)),
])
@pytest.mark.parametrize("input_size", [16, 48])  # the square shrunk, and enlarged
def test_workers_encoded_crops_are_exactly_the_encoded_model_input(channels, windows, input_size):
    # What a worker sends (uint16 straight from the HU squares) must be encode_crops of the model input, bit for bit,
    # including squares that leave the image (padding) and int16 stacks.
    from cspine_submit.score.crop import encode_crops, prepare_encoded_crops

    rng = np.random.default_rng(input_size)
    slices = rng.integers(-1024, 3000, (9, 40, 40)).astype(np.int16)
    idx = np.arange(9)
    cfg = _cfg(channels=channels, windows=windows, input_size=input_size, neighbour_offset=2)
    for plan in (CropPlan("C3", (1, 4, 8), (5, 6, 30, 33)), CropPlan("C4", (0, 2), (-6, 20, 18, 46)),
                 CropPlan("C5", (), (0, 0, 10, 10))):
        got = prepare_encoded_crops(slices, idx, plan, cfg)
        want = encode_crops(prepare_crops(slices, idx, plan, cfg))
        assert got.dtype == np.uint16 and got.shape == want.shape == (len(plan.slice_indices), input_size,
                                                                        input_size, cfg.n_channels)
        np.testing.assert_array_equal(got, want)
