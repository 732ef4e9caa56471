"""The import paths of modules that moved into the stage subpackages (2026-12), kept for one release.

``import cspine_submit.dicom`` (or ``from cspine_submit import dicom``) gives the very module object
``cspine_submit.read.dicom``, with a :class:`DeprecationWarning`, so code and pickles written against the flat layout
keep working and a monkeypatch through the old name patches the new module. ``cspine_submit.train`` itself became
the training package; its face re-exports what the old module offered.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "dicom_header": "read.dicom_header",
    "pixels": "read.pixels",
    "dicom": "read.dicom",
    "reader": "read.reader",
    "orientation": "read.orientation",
    "preflight": "read.preflight",
    "crop": "score.crop",
    "models": "score.models",
    "aggregate": "score.aggregate",
    "pipeline": "submit.run",
    "submission": "submit.submission",
    "plan_report": "submit.plan_report",
    "train_data": "train.data",
    "train_plan": "train.plan",
    "calibration": "train.calibration",
    "metric": "train.metric",
    "synthetic": "datasets.synthetic",
    "synthetic_anatomy": "datasets.anatomy",
    "synthetic_dicom": "datasets.dicom_writer",
    "volume_cut": "datasets.volume_cut",
    "volume_study": "datasets.volume_study",
    "dataset_folder": "datasets.folder",
    "bench": "tools.bench",
    "bundle": "tools.bundle",
    "demo": "tools.demo",
    "preview": "tools.preview",
    "reproduce": "tools.reproduce",
}
"""Old module name under ``cspine_submit`` -> its new dotted path under ``cspine_submit``."""


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``cspine_submit.<old>`` and loads it as the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package == "cspine_submit" and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = "cspine_submit." + MOVED[spec.name.rpartition(".")[2]]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        """Nothing to run: the module at the new path is already executed."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (importing the package does this)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())  # before the path finders: no stale file may win
