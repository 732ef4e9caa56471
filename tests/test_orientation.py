"""Mask orientation: the competition's sagittal convention and the affine layout, on hand-made masks."""

from __future__ import annotations

import numpy as np
import pytest

from cspine_submit.read.orientation import (
    affine_to_axial,
    axial_axcodes,
    axial_to_affine_layout,
    axial_to_competition,
    competition_to_axial,
    mask_to_axial,
)


def _axial_volume(shape=(5, 4, 3)) -> np.ndarray:
    """Every voxel holds a distinct value, so any wrong permutation or flip shows."""
    return np.arange(np.prod(shape), dtype=np.int32).reshape(shape)


def test_competition_conversion_known_voxel():
    # A NIfTI array (X=3, Y=4, Z=5) with one marked voxel at x=2, y=0, z=0. The convention a[:, ::-1, ::-1]
    # .transpose(2, 1, 0) puts nifti z=0 at the feet end and nifti y=0 at the last row.
    a = np.zeros((3, 4, 5), dtype=np.uint8)
    a[2, 0, 0] = 7
    v = competition_to_axial(a)
    assert v.shape == (5, 4, 3)
    assert list(zip(*np.nonzero(v))) == [(4, 3, 2)]


def test_competition_round_trip():
    vol = _axial_volume()
    back = competition_to_axial(axial_to_competition(vol))
    np.testing.assert_array_equal(back, vol)
    assert axial_to_competition(vol).shape == (3, 4, 5)


def test_axcodes_from_dicom_orientation():
    assert axial_axcodes() == ("I", "P", "L")
    assert axial_axcodes(np.array([1.0, 0, 0, 0, 1, 0])) == ("I", "P", "L")
    # Rows and columns both flipped (patient scanned prone-like): columns run to the right, rows to the front.
    assert axial_axcodes(np.array([-1.0, 0, 0, 0, -1, 0])) == ("I", "A", "R")


def test_affine_lps_like_verse():
    # VerSe-like file: voxel axes point to Left, Posterior, Superior (affine diag(-dx, -dy, dz) in RAS).
    X, Y, Z = 3, 4, 5
    affine = np.diag([-0.5, -0.6, 1.25, 1.0])
    a = np.zeros((X, Y, Z), dtype=np.uint8)
    a[2, 1, 4] = 1  # most superior file slice -> must become the first (head) slice
    a[0, 3, 0] = 2  # most inferior -> last slice
    v, spacing = affine_to_axial(a, affine)
    assert v.shape == (Z, Y, X)
    assert spacing == (1.25, 0.6, 0.5)
    assert list(zip(*np.nonzero(v == 1))) == [(0, 1, 2)]
    assert list(zip(*np.nonzero(v == 2))) == [(4, 3, 0)]


def test_affine_ras_flips_rows_and_columns():
    # Plain RAS voxel axes: x increases to the patient's right, y to the front: both must be flipped.
    X, Y, Z = 3, 4, 5
    a = np.zeros((X, Y, Z), dtype=np.uint8)
    a[0, 0, 0] = 1  # right-most, front-most, most inferior
    v, spacing = affine_to_axial(a, np.eye(4))
    assert list(zip(*np.nonzero(v))) == [(Z - 1, Y - 1, X - 1)]
    assert spacing == (1.0, 1.0, 1.0)


def test_affine_sagittal_storage_like_competition():
    # A sagittal file whose voxel axes are (P, I, L): the affine maps i -> -y(RAS)=P, j -> -z = I, k -> -x = L.
    affine = np.array([[0, 0, -0.4, 0], [-0.7, 0, 0, 0], [0, -0.9, 0, 0], [0, 0, 0, 1.0]])
    vol = _axial_volume((5, 4, 3))  # (z=I, y=P, x=L)
    stored = axial_to_affine_layout(vol, affine)
    assert stored.shape == (4, 5, 3)  # (P, I, L)
    back, spacing = affine_to_axial(stored, affine)
    np.testing.assert_array_equal(back, vol)
    assert spacing == pytest.approx((0.9, 0.7, 0.4))


def test_mask_to_axial_layouts_and_file_order():
    vol = _axial_volume()
    nifti = axial_to_competition(vol)
    np.testing.assert_array_equal(mask_to_axial(nifti, np.eye(4), "competition"), vol)
    # A caller keeping file-name order of a study numbered feet to head gets the z-flipped stack.
    np.testing.assert_array_equal(mask_to_axial(nifti, np.eye(4), "competition", file_order_reversed=True), vol[::-1])
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_array_equal(mask_to_axial(axial_to_affine_layout(vol, lps), lps, "affine"), vol)
    with pytest.raises(ValueError, match="layout"):
        mask_to_axial(nifti, np.eye(4), "sideways")
