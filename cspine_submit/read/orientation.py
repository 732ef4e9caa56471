"""Bringing segmentation masks into the studies' axial frame.

The axial frame used everywhere in this package: ``volume : (z, y, x) ndarray``, z from head to feet (the order of
``StudyHeader.files``), y = DICOM rows, x = DICOM columns.

The competition's ``segmentations/<uid>.nii`` files are stored sagittally. Read with nibabel
(``np.asanyarray(img.dataobj)``), the array ``a`` has axes (x, y, z) in NIfTI order; the top teams brought it to the
head-to-feet axial stack with ``a[:, ::-1, ::-1].transpose(2, 1, 0)``. The stored orientation follows the patient,
not the file numbering, so the same conversion holds for studies numbered feet to head once their slices are sorted
head to feet (as :func:`cspine_submit.read.dicom.scan_study` sorts them).
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


# --- the affine layout (masks such as VerSe's, stored with a meaningful affine) ---------------------------------

_LPS_CODES = (("R", "L"), ("A", "P"), ("I", "S"))  # (negative, positive) end of each DICOM patient LPS axis


def _lps_code(direction: np.ndarray) -> str:
    """Axis code (nibabel's RAS letters) of the patient direction an LPS unit vector mostly points to."""
    axis = int(np.argmax(np.abs(direction)))
    return _LPS_CODES[axis][int(direction[axis] > 0)]


def axial_axcodes(orientation: np.ndarray | None = None) -> tuple[str, str, str]:
    """nibabel axis codes of the axial head-to-feet frame ``(z, y, x)`` of a study.

    Parameters
    ----------
    orientation : (6,) ndarray, optional
        DICOM ImageOrientationPatient (row direction cosines then column direction cosines, patient LPS).
        None means the standard axial ``[1, 0, 0, 0, 1, 0]``.

    Returns
    -------
    (str, str, str)
        Codes of the z, y and x axes, e.g. ``("I", "P", "L")`` for a standard axial study: z toward the feet,
        y (rows) toward the patient's back, x (columns) toward the patient's left.
    """
    if orientation is None:
        orientation = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    orientation = np.asarray(orientation, dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:6]
    # Columns (x index) advance along the row direction cosines, rows (y index) along the column cosines.
    return ("I", _lps_code(col_dir), _lps_code(row_dir))


def affine_to_axial(
    array: np.ndarray, affine: np.ndarray, orientation: np.ndarray | None = None
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Any 3-D NIfTI array with a trustworthy affine -> axial head-to-feet volume.

    Uses nibabel's vocabulary: ``io_orientation`` of the affine, ``ornt_transform`` to the study's axial codes
    (:func:`axial_axcodes`), ``apply_orientation``. Only axis permutations and flips are applied (no resampling):
    an oblique affine is snapped to its closest axes.

    Parameters
    ----------
    array : (I, J, K) ndarray
        The mask as nibabel returns it (voxel axes of the file).
    affine : (4, 4) ndarray
        Voxel -> RAS+ mm affine of the file.
    orientation : (6,) ndarray, optional
        ImageOrientationPatient of the study the mask belongs to (default: standard axial).

    Returns
    -------
    volume : (z, y, x) ndarray
        z from head to feet, y rows, x columns of the study's axial slices.
    spacing : (dz, dy, dx) tuple of float
        Voxel size in mm along the returned axes.
    """
    from nibabel import orientations as ornts
    from nibabel.affines import voxel_sizes

    if array.ndim != 3:
        raise ValueError(f"expected a 3-D mask, got shape {array.shape}")
    start = ornts.io_orientation(affine)
    target = ornts.axcodes2ornt(axial_axcodes(orientation))
    transform = ornts.ornt_transform(start, target)
    volume = ornts.apply_orientation(array, transform)
    sizes = voxel_sizes(affine)
    # transform[i, 0] is the output axis of input axis i.
    spacing = [0.0, 0.0, 0.0]
    for in_axis, (out_axis, _flip) in enumerate(transform):
        spacing[int(out_axis)] = float(sizes[in_axis])
    return volume, (spacing[0], spacing[1], spacing[2])


def axial_to_affine_layout(volume: np.ndarray, affine: np.ndarray, orientation: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`affine_to_axial`: axial head-to-feet (z, y, x) -> the voxel axes of ``affine``."""
    from nibabel import orientations as ornts

    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {volume.shape}")
    transform = ornts.ornt_transform(ornts.axcodes2ornt(axial_axcodes(orientation)), ornts.io_orientation(affine))
    return ornts.apply_orientation(volume, transform)


LAYOUTS: tuple[str, ...] = ("competition", "affine")
"""How a mask file is brought into the axial frame: the competition's sagittal convention, or the file's affine."""


def mask_to_axial(
    array: np.ndarray,
    affine: np.ndarray,
    layout: str = "competition",
    orientation: np.ndarray | None = None,
    file_order_reversed: bool = False,
) -> np.ndarray:
    """Bring a mask array into the study's axial head-to-feet frame by the chosen layout.

    Parameters
    ----------
    array : 3-D ndarray
        The mask as nibabel returns it.
    affine : (4, 4) ndarray
        The file's affine (used by ``layout="affine"`` only).
    layout : {"competition", "affine"}
    orientation : (6,) ndarray, optional
        The study's ImageOrientationPatient (``affine`` layout only).
    file_order_reversed : bool
        Only for callers that keep slices in file-name order rather than head to feet: True when the study is
        numbered feet to head (``StudyHeader.reversed``); the result is then flipped along z to match the file
        order. Code in this package sorts head to feet and leaves this False.

    Returns
    -------
    (z, y, x) ndarray
        z from head to feet (or in file order when ``file_order_reversed``).
    """
    if layout == "competition":
        volume = competition_to_axial(array)
    elif layout == "affine":
        volume, _ = affine_to_axial(array, affine, orientation)
    else:
        raise ValueError(f"layout={layout!r}: expected one of {list(LAYOUTS)}")
    return volume[::-1] if file_order_reversed else volume
