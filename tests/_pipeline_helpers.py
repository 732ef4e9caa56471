"""Builders for the submission tests: small hand-written DICOM studies, hand-made slice ranges, tiny weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cspine_submit.config import VERTEBRAE, ModelConfig, SliceRanges

UID_ROOT = "1.2.826.0.1.3680043.99"


def write_ct_slice(path: Path, stored: np.ndarray, bits_stored: int, signed: bool, syntax: str) -> Path:
    """One uncompressed CT slice with a competition header: ``stored`` values in 16 bits with ``bits_stored`` used,
    PixelRepresentation 1 with intercept 0 (``signed``) or 0 with intercept -1024, in transfer syntax ``syntax``
    (Implicit or Explicit VR Little Endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    rows, cols = stored.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, int(signed)
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0 if signed else -1024
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_study(folder: Path, uid: str, n_slices: int = 24, size: int = 48, seed: int = 0) -> Path:
    """Write an uncompressed axial CT study (head first: largest z first), files 1.dcm..n.dcm."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    series = generate_uid()
    for i in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uid, series
        ds.Modality = "CT"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, 100.0 - 2.0 * i]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 2.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        img = rng.integers(-1000, 1500, size=(size, size), dtype=np.int16)
        ds.PixelData = img.tobytes()
        ds.save_as(folder / f"{i + 1}.dcm", enforce_file_format=True)
    return folder


def hand_ranges() -> SliceRanges:
    """Fraction ranges: C1..C7 split the study's z-extent evenly, box the central half of the image."""
    def q(v):
        return {"q10": v, "q50": v, "q90": v}

    per = {}
    for i, v in enumerate(VERTEBRAE):
        per[v] = {
            "fraction": {"start": q(i / 7), "end": q((i + 1) / 7)},
            "box": {"y0": q(0.25), "x0": q(0.25), "y1": q(0.75), "x1": q(0.75)},
        }
    return SliceRanges(method="fraction", layout="competition", per_vertebra=per, n_masks=0, source="tests: by hand")


def tiny_config(**changes) -> ModelConfig:
    cfg = ModelConfig(head="tiny", input_size=16, channels="single", windows=((400.0, 1800.0),),
                      slices_per_vertebra=4, top_k=2, batch_size=8, mixed_precision=False, trained_on="synthetic",
                      source="tests")
    return cfg.replace(**changes)


def write_weights(folder: Path, config: ModelConfig | None = None, seed: int = 1) -> Path:
    """Tiny classifiers for C1..C7 (random but seeded), model_config.json and slice_ranges.json."""
    import keras

    from cspine_submit.score.models import build_classifier, save_classifier

    config = config or tiny_config()
    folder.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    for v in VERTEBRAE:
        save_classifier(build_classifier(config.head, config.input_shape), folder / config.classifier_files[v])
    config.to_json(folder / "model_config.json")
    hand_ranges().to_json(folder / "slice_ranges.json")
    return folder
