"""The house's layout: every stage's public face imports, and the flat layout's old paths still give the moved modules."""

import importlib
import subprocess
import sys
import warnings

import pytest

from cspine_submit import _moved

STAGES = ["read", "localize", "score", "submit", "train", "datasets", "tools", "commands"]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_face_imports_and_exports_what_it_lists(stage):
    face = importlib.import_module(f"cspine_submit.{stage}")
    for name in getattr(face, "__all__", []):
        assert hasattr(face, name), f"cspine_submit.{stage}.__all__ lists {name!r}, which it does not define"


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_old_import_path_is_the_moved_module(old):
    new = importlib.import_module("cspine_submit." + _moved.MOVED[old])
    sys.modules.pop(f"cspine_submit.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"cspine_submit.{old}")
    assert module is new
    assert any(issubclass(w.category, DeprecationWarning) and _moved.MOVED[old] in str(w.message) for w in caught)


def test_old_train_module_names_are_on_the_training_face():
    import cspine_submit.train as train

    for name in ("TrainOptions", "train_classifiers", "existing_outputs"):
        assert hasattr(train, name)


def test_importing_every_face_loads_no_tensorflow():
    """The CLI's argument checks run before TensorFlow loads: no face may import it at module level."""
    code = ("import sys\n" + "".join(f"import cspine_submit.{s}\n" for s in STAGES)
            + "import cspine_submit.cli\nprint('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
