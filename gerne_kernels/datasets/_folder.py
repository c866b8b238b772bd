"""Shared pieces of the folder loaders: a lazy (x, y, a) image dataset and layout errors."""
from __future__ import annotations

import csv
import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")


def to_tensor(image) -> torch.Tensor:
    """A PIL image as a float32 (C, H, W) tensor in [0, 1] (the default transform)."""
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def require(path: str, what: str, layout: str) -> str:
    """``path`` if it exists, else FileNotFoundError naming the expected layout."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: {path!r} not found. Expected layout:\n{layout}")
    return path


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def read_csv(path: str) -> List[Dict[str, str]]:
    """All rows of a CSV file with a header, as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def require_columns(rows: Sequence[Dict[str, str]], columns: Sequence[str], path: str) -> None:
    if not rows:
        raise ValueError(f"{path} has no rows")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; it has {sorted(rows[0])}")


class GroupImageDataset(Dataset):
    """Images on disk with class and attribute labels; items are ``(x, y, a)``.

    Images are read lazily with PIL (converted to RGB) and passed through
    ``transform`` (default :func:`to_tensor`). ``labels`` and ``attributes`` are int64
    tensors available without reading any image, e.g. for
    :class:`gerne_kernels.TwoBatchSampler`.
    """

    def __init__(self, paths: Sequence[str], labels, attributes,
                 transform: Optional[Callable] = None):
        if not (len(paths) == len(labels) == len(attributes)):
            raise ValueError("paths, labels and attributes differ in length")
        self.paths = list(paths)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.attributes = torch.as_tensor(np.asarray(attributes, dtype=np.int64))
        self.transform = transform if transform is not None else to_tensor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.paths[index]) as img:
            x = self.transform(img.convert("RGB"))
        return x, int(self.labels[index]), int(self.attributes[index])
