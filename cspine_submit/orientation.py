"""Bringing segmentation masks into the studies' axial frame.

The axial frame used everywhere in this package: ``volume : (z, y, x) ndarray``, z from head to feet (the order of
``StudyHeader.files``), y = DICOM rows, x = DICOM columns.

The competition's ``segmentations/<uid>.nii`` files are stored sagittally. Read with nibabel
(``np.asanyarray(img.dataobj)``), the array ``a`` has axes (x, y, z) in NIfTI order; the top teams brought it to the
head-to-feet axial stack with ``a[:, ::-1, ::-1].transpose(2, 1, 0)``. The stored orientation follows the patient,
not the file numbering, so the same conversion holds for studies numbered feet to head once their slices are sorted
head to feet (as :func:`cspine_submit.dicom.scan_study` sorts them).
"""

from __future__ import annotations

import numpy as np


def competition_to_axial(nifti_array: np.ndarray) -> np.ndarray:
    """Competition NIfTI array -> axial head-to-feet volume.

    Parameters
    ----------
    nifti_array : (X, Y, Z) ndarray
        The mask as nibabel returns it from a competition ``segmentations/<uid>.nii`` file.

    Returns
    -------
    (Z, Y, X) ndarray
        ``volume[z, y, x]`` with z from head to feet, y rows and x columns of the DICOM slices (a view, not a copy).
    """
    if nifti_array.ndim != 3:
        raise ValueError(f"expected a 3-D mask, got shape {nifti_array.shape}")
    return nifti_array[:, ::-1, ::-1].transpose(2, 1, 0)


def axial_to_competition(volume: np.ndarray) -> np.ndarray:
    """Inverse of :func:`competition_to_axial`: axial head-to-feet (z, y, x) -> competition NIfTI (X, Y, Z) array."""
    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {volume.shape}")
    return volume.transpose(2, 1, 0)[:, ::-1, ::-1]
