"""MedMNIST .npz files (PneumoniaMNIST): <split>_images uint8 [N, H, W], <split>_labels [N, 1]."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from openmedgemma.errors import DataError

from .files import find_file, require_dir

PNEUMONIA_FILES = (
    "medmnist/pneumoniamnist_28_varun19424.npz",
    "medmnist/pneumoniamnist.npz",
    "medmnist/pneumoniamnist_28.npz",
    "pneumoniamnist_28_varun19424.npz",
    "pneumoniamnist.npz",
    "pneumoniamnist_28.npz",
)
PNEUMONIA_CLASSES = ("normal", "pneumonia")


def pneumonia_file(data_dir: Path | str, file: str, task: str) -> Path:
    if file:
        path = Path(file)
        path = path if path.is_absolute() else require_dir(data_dir, task) / path
        if not path.is_file():
            raise DataError(f"{task}: data file {path} does not exist")
        return path
    return find_file(data_dir, PNEUMONIA_FILES, task)


def read_npz_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W], labels int [N]) of one split."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    keys = (f"{split}_images", f"{split}_labels")
    with archive:
        missing = [k for k in keys if k not in archive.files]
        if missing:
            raise DataError(f"{path}: missing array(s) {missing}; has {sorted(archive.files)}")
        images, labels = archive[keys[0]], archive[keys[1]]
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(
            f"{path}: {keys[0]} must be uint8 [N, H, W] grayscale, got {images.dtype} {images.shape}"
        )
    labels = labels.reshape(len(labels), -1)
    if labels.shape != (len(images), 1):
        raise DataError(f"{path}: {keys[1]} must hold one label per image, got shape {labels.shape}")
    return images, labels[:, 0].astype(int)


def gray_to_rgb(image: np.ndarray) -> np.ndarray:
    """[H, W] uint8 -> [H, W, 3] uint8 (the gray value copied to R, G and B)."""
    return np.repeat(image[:, :, None], 3, axis=2)
