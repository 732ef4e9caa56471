"""Slice ranges: learn them from segmentation masks, plan crops for a new study from its headers.

Axis convention: ``volume : (z, y, x)``, z from head to feet (index 0 = most cranial slice).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CropPlan:
    """What to read and crop for one vertebra of one study.

    Attributes
    ----------
    vertebra : str
        ``C1`` ... ``C7``.
    slice_indices : tuple of int
        Indices into ``StudyHeader.files`` (head to feet), increasing, the centre slices of the crops.
    box : (y0, x0, y1, x1) tuple of int
        In-plane box in pixels, half-open, inside (0, 0, rows, cols).
    """

    vertebra: str
    slice_indices: tuple[int, ...]
    box: tuple[int, int, int, int]
