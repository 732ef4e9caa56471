"""model_config.json / slice_ranges.json: round trips and clear errors naming the file."""

import json

import pytest

from cspine_submit.config import VERTEBRAE, ModelConfig, SliceRanges


def test_model_config_round_trips_and_fills_missing_keys(tmp_path):
    cfg = ModelConfig(head="tiny", input_size=64, channels="neighbours", windows=[[400, 1800]], clip=[0.01, 0.99])
    path = cfg.to_json(tmp_path / "model_config.json")
    assert ModelConfig.from_json(path) == cfg
    assert cfg.input_shape == (64, 64, 3)  # 2.5D: the slice and its two neighbours
    # An older file without newer keys still loads, with the defaults.
    data = json.loads(path.read_text())
    del data["z_margin_mm"]
    path.write_text(json.dumps(data))
    assert ModelConfig.from_json(path).z_margin_mm == ModelConfig().z_margin_mm


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", "not valid JSON"),
        ('{"head": "gap", "colour": "red"}', "unknown key(s) ['colour']"),
        ('{"channels": "rgb"}', "channels='rgb'"),
        ('{"clip": [0.0, 1.0]}', "clip"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_model_config_names_the_file_and_the_fault(tmp_path, content, words):
    path = tmp_path / "model_config.json"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        ModelConfig.from_json(path)
    assert str(path) in str(err.value) and words in str(err.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        ModelConfig.from_json(tmp_path / "nothing.json")
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        SliceRanges.from_json(tmp_path / "nothing.json")


def test_slice_ranges_need_every_vertebra(tmp_path):
    per = {v: {"fraction": {"start": {"q50": 0.1 * i}, "end": {"q50": 0.1 * i + 0.2}}} for i, v in enumerate(VERTEBRAE)}
    ranges = SliceRanges(method="fraction", layout="affine", per_vertebra=per, n_masks=2, study_uids=["a", "b"])
    assert SliceRanges.from_json(ranges.to_json(tmp_path / "r.json")) == ranges
    del per["C4"]
    with pytest.raises(ValueError, match="C4"):
        SliceRanges(method="fraction", layout="affine", per_vertebra=per, n_masks=2)
