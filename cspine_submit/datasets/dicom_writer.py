"""Writing a rendered synthetic study as DICOM slices and a competition-style NIfTI mask (IO only).

Geometry written (DICOM patient LPS): ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]`` (rows run to the patient's
left, columns to posterior); +z points to the head, so the most cranial slice has the LARGEST
ImagePositionPatient z and z decreases from head to feet. Files are ``<n>.dcm`` with n = 1..N, numbered head to
feet, or feet to head for "reversed" studies. JPEG Lossless Process 14 SV1 (.4.70) frames are encoded in memory by GDCM
(the only Python-reachable encoder of that syntax) and the files written by pydicom, so that GDCM adds no tags of
its own (it would fill in Modality, StudyDate with today's date, ...).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"


def _ds(value: float) -> str:
    """A DICOM DS string (at most 16 characters) for a float."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def stored_values(hu: np.ndarray, signed: bool) -> np.ndarray:
    """HU -> stored pixel values: int16 with intercept 0 (signed) or uint16 with intercept -1024 (12-bit unsigned)."""
    if signed:
        return hu.astype(np.int16)
    return (hu.astype(np.int32) + 1024).astype(np.uint16)


def encode_jpeg_lossless(pixels: np.ndarray, bits_stored: int) -> bytes:
    """Encode one slice as a JPEG Lossless Process 14 SV1 (.4.70) frame with GDCM, in memory.

    Parameters
    ----------
    pixels : (rows, cols) int16 or uint16 ndarray
        Stored values (signed when int16).
    bits_stored : int
        BitsStored of the file (12 or 16).

    Returns
    -------
    bytes
        The JPEG frame, to be encapsulated as the file's single fragment.
    """
    import gdcm

    rows, cols = pixels.shape
    signed = pixels.dtype == np.int16
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimension(0, cols)
    image.SetDimension(1, rows)
    image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits_stored, bits_stored - 1, 1 if signed else 0))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.MONOCHROME2))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ExplicitVRLittleEndian))
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetByteStringValue(np.ascontiguousarray(pixels).tobytes())
    image.SetDataElement(element)
    # The filter keeps the image in a C++ SmartPointer, which frees it; were Python to own it too, destroying
    # the proxy would abort the process ("ReferenceCount > 0") or free it twice.
    image.thisown = False
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(image)
    if not change.Change():
        raise OSError("GDCM could not encode JPEG Lossless (.4.70)")
    fragments = change.GetOutput().GetDataElement().GetSequenceOfFragments()
    if fragments is None or fragments.GetNumberOfFragments() != 1:
        raise OSError("GDCM returned no single JPEG fragment")
    value = fragments.GetFragment(0).GetByteValue()
    expected = int(str(value.GetLength()))
    try:
        # Copy straight from GDCM's buffer (a SWIG void* converts to its address).
        data = ctypes.string_at(int(value.GetVoidPointer()), expected)
    except (TypeError, ValueError):
        # GDCM's binding also hands buffers over as str decoded with surrogateescape: slower, same bytes.
        data = value.GetBuffer().encode("utf-8", "surrogateescape")
    if len(data) != expected:
        raise OSError(f"GDCM fragment: got {len(data)} bytes, expected {expected}")
    return data


def file_numbers(n_slices: int, reversed_: bool) -> np.ndarray:
    """File number (``<n>.dcm``) of each slice in head-to-feet order.

    Returns
    -------
    (n_slices,) int ndarray
        ``1..N`` for a normal study, ``N..1`` for a reversed one (numbered feet to head).
    """
    n = np.arange(1, n_slices + 1)
    return n[::-1].copy() if reversed_ else n


def write_dicom_series(
    folder: Path,
    hu: np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    spacing: tuple[float, float, float],
    z_head: float,
    origin_xy: tuple[float, float],
    reversed_: bool,
    compressed: bool,
    signed: bool,
    modality: bool,
    window: tuple[float, float] | None = None,
    thickness: float | None = None,
    manufacturer: str | None = "cspine_submit synthetic",
) -> list[Path]:
    """Write an axial volume as ``<n>.dcm`` files.

    Parameters
    ----------
    folder : Path
        Study folder (created); its name should be ``study_uid``.
    hu : (z, y, x) int16 ndarray
        HU, z from head to feet, already within the stored range (see :func:`stored_values`).
    spacing : (dz, dy, dx)
        mm.
    z_head : float
        ImagePositionPatient z of the most cranial slice, mm; slice i (head to feet) is at ``z_head - i * dz``.
    origin_xy : (float, float)
        ImagePositionPatient x, y (centre of the first pixel), mm.
    reversed_ : bool
        Number the files feet to head.
    compressed : bool
        JPEG Lossless .4.70 (GDCM) rather than explicit VR little endian.
    signed : bool
        PixelRepresentation 1, BitsStored 16, RescaleIntercept 0; otherwise 0, 12, -1024.
    modality : bool
        Write the Modality tag (some competition files lack it).
    window : (level, width) or None
        WindowCenter/WindowWidth to write.
    thickness : float, optional
        SliceThickness, mm (default: the slice spacing).
    manufacturer : str or None
        Manufacturer tag to write; None writes none (the real training files have none).

    Returns
    -------
    list of Path
        The files written, in head-to-feet order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nz, rows, cols = hu.shape
    ds = _series_dataset(study_uid, series_uid, shape=(rows, cols), spacing=spacing, signed=signed,
                         modality=modality, window=window, thickness=thickness, compressed=compressed,
                         manufacturer=manufacturer)
    numbers = file_numbers(nz, reversed_)
    paths = []
    for i in range(nz):
        path = folder / f"{int(numbers[i])}.dcm"
        _write_slice(path, ds, hu[i], number=int(numbers[i]), z=z_head - i * spacing[0], origin_xy=origin_xy,
                     compressed=compressed)
        paths.append(path)
    return paths


def _series_dataset(
    study_uid: str,
    series_uid: str,
    *,
    shape: tuple[int, int],
    spacing: tuple[float, float, float],
    signed: bool,
    modality: bool,
    window: tuple[float, float] | None,
    thickness: float | None,
    compressed: bool,
    manufacturer: str | None = "cspine_submit synthetic",
):
    """The header every slice of a series shares (a pydicom Dataset with its file meta); per-slice tags are
    filled in by :func:`_write_slice`. Parameters as for :func:`write_dicom_series`; ``shape`` is (rows, cols)."""
    from pydicom.dataset import Dataset, FileMetaDataset

    rows, cols = shape
    dz, dy, dx = spacing
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.TransferSyntaxUID = JPEG_LOSSLESS_SV1 if compressed else EXPLICIT_VR_LITTLE_ENDIAN
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    if modality:
        ds.Modality = "CT"
    if manufacturer is not None:
        ds.Manufacturer = manufacturer
    ds.PatientID = study_uid.rsplit(".", 1)[-1]
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = series_uid + ".0"
    ds.SeriesNumber = 1
    ds.SliceThickness = _ds(dz if thickness is None else thickness)
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [_ds(dy), _ds(dx)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if window is not None:
        ds.WindowCenter = _ds(window[0])
        ds.WindowWidth = _ds(window[1])
    ds.RescaleIntercept = "0" if signed else "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _write_slice(path: Path, ds, hu: np.ndarray, *, number: int, z: float, origin_xy: tuple[float, float],
                 compressed: bool) -> None:
    """Fill the per-slice tags of ``ds`` (file number ``number``, ImagePositionPatient z ``z`` mm) and the pixels
    of one (rows, cols) HU slice, and save it to ``path``."""
    from pydicom.encaps import encapsulate

    sop = f"{ds.SeriesInstanceUID}.{number}"
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPInstanceUID = sop
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [_ds(origin_xy[0]), _ds(origin_xy[1]), _ds(z)]
    ds.SliceLocation = _ds(z)
    stored = stored_values(hu, ds.PixelRepresentation == 1)
    if compressed:
        ds.PixelData = encapsulate([encode_jpeg_lossless(stored, ds.BitsStored)])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)


def competition_affine(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], z_head: float, origin_xy: tuple[float, float]
) -> np.ndarray:
    """RAS affine of a mask stored in the competition's layout (see :mod:`cspine_submit.read.orientation`).

    The stored array ``a`` has axes (x = DICOM column, rows reversed, slices reversed), so voxel ``(i, j, k)`` is the
    pixel at column ``i``, row ``rows - 1 - j`` of the head-to-feet slice ``nz - 1 - k``. In RAS (nibabel's frame,
    LPS with x and y negated) that is::

        R = -(ox + i * dx),  A = -(oy + (rows - 1 - j) * dy),  S = z_head - (nz - 1 - k) * dz

    which nibabel reads as axis codes ('L', 'A', 'S').

    Parameters
    ----------
    shape : (nz, rows, cols)
        Axial volume shape, z from head to feet.
    """
    nz, rows, _ = shape
    dz, dy, dx = spacing
    ox, oy = origin_xy
    return np.array(
        [
            [-dx, 0.0, 0.0, -ox],
            [0.0, dy, 0.0, -(oy + (rows - 1) * dy)],
            [0.0, 0.0, dz, z_head - (nz - 1) * dz],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def write_mask(
    path: Path,
    labels: np.ndarray,
    spacing: tuple[float, float, float],
    z_head: float,
    origin_xy: tuple[float, float],
) -> Path:
    """Write an axial label volume as the competition stores it (sagittal layout, uint8, uncompressed ``.nii``).

    Parameters
    ----------
    labels : (z, y, x) uint8 ndarray
        z from head to feet, 1-7 = C1-C7, 8+ = T1..., whatever the study's file numbering.
    """
    import nibabel as nib

    from cspine_submit.read.orientation import axial_to_competition

    # A view: NIfTI stores Fortran order, so nibabel writes this (X, Y, Z) view without a strided copy.
    arr = axial_to_competition(labels.astype(np.uint8, copy=False))
    img = nib.Nifti1Image(arr, competition_affine(labels.shape, spacing, z_head, origin_xy))
    img.header.set_data_dtype(np.uint8)
    img.header.set_xyzt_units("mm")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path
