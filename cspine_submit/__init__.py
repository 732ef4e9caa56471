"""cspine_submit: offline cervical-spine fracture detection and Kaggle submission (RSNA 2022)."""

__version__ = "0.1.0"

from cspine_submit import _moved  # noqa: E402  (old flat-layout import paths, for one release)

_moved.install()
