"""Write real medical image files (PNG, DICOM, NIfTI, MedMNIST .npz) for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def write_dicom(path: Path, array: np.ndarray) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = "TEST", "CT"
    ds.Rows, ds.Columns = array.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = array.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(path: Path, array: np.ndarray) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), str(path))
    return path


def blob_images(count: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two learnable classes: label 1 has a bright square in the centre."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    images = rng.integers(0, 80, (count, size, size)).astype(np.uint8)
    c = size // 2
    images[labels == 1, c - 3 : c + 3, c - 3 : c + 3] = 220
    return images, labels


def write_medmnist_npz(path: Path, shape: tuple[int, ...] = (16, 16), label_columns: int = 1, classes: int = 2, counts=(24, 8, 8)) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, *shape)).astype(np.uint8)
        if label_columns == 1:
            arrays[f"{split}_labels"] = (np.arange(n) % classes).reshape(n, 1)
        else:
            arrays[f"{split}_labels"] = rng.integers(0, 2, (n, label_columns))
    np.savez(path, **arrays)
    return path
