"""DICOM study headers, slice ordering, decoding through pydicom's pixel plugins, HU conversion.

Axis convention everywhere: ``volume : (z, y, x) ndarray``, z from head to feet, y rows (anterior to
posterior for a standard axial CT), x columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class StudyHeader:
    """Everything known about a study from its DICOM headers alone (no pixel data decoded).

    Attributes
    ----------
    folder : Path
        The study folder.
    study_uid : str
        StudyInstanceUID (from the headers; the folder name when the headers lack it).
    files : tuple of Path
        Kept slice files, ordered head to feet.
    z : (n,) ndarray of float64
        Slice position in mm along the head-to-feet axis, one per file, strictly increasing
        (position projected on the slice normal, sign chosen so that z grows toward the feet).
    spacing : (dz, dy, dx) tuple of float
        mm; dz is the median difference of ``z``, dy/dx from PixelSpacing.
    rows, cols : int
        In-plane shape of every kept slice.
    transfer_syntaxes : tuple of str
        Transfer syntax UID of each kept file, in ``files`` order.
    reversed : bool
        True when file-name (slice number) order ran feet to head.
    skipped : tuple of (str, str)
        ``(file name, reason)`` for every file left out (not DICOM, truncated, other series/shape, duplicate).
    warnings : tuple of str
        Fallbacks used (e.g. ordering by InstanceNumber because positions were missing).
    positions : (n, 3) ndarray of float64
        ImagePositionPatient of each kept file (mm, patient LPS), NaN when missing.
    orientation : (6,) ndarray of float64
        ImageOrientationPatient shared by the series (row direction cosines, then column direction cosines).
    """

    folder: Path
    study_uid: str
    files: tuple[Path, ...]
    z: np.ndarray
    spacing: tuple[float, float, float]
    rows: int
    cols: int
    transfer_syntaxes: tuple[str, ...]
    reversed: bool = False
    skipped: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = ()
    positions: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    orientation: np.ndarray = field(default_factory=lambda: np.array([1.0, 0, 0, 0, 1.0, 0]))

    @property
    def n_slices(self) -> int:
        """Number of kept slices."""
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape (z, y, x)."""
        return (self.n_slices, self.rows, self.cols)
