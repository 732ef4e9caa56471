"""cspine_submit: offline cervical-spine fracture detection and Kaggle submission (RSNA 2022)."""

__version__ = "0.1.0"
