"""Colored MNIST and Corrupted CIFAR-10 as released by LfF / DisEnt (DFA).

Layout (one folder per minority ratio, e.g. ``cmnist/1pct`` or ``cifar10c/1pct``)::

    root/align/<class>/<idx>_<y>_<a>.png      bias-aligned training images
    root/conflict/<class>/<idx>_<y>_<a>.png   bias-conflicting training images
    root/valid/.../<idx>_<y>_<a>.png          validation images
    root/test/.../<idx>_<y>_<a>.png           test images (or root/../test, as in DFA's release)

The class y and the attribute a are the last two ``_``-separated fields of each file
name. Items are ``(x, y, a)``.
"""
from __future__ import annotations

import glob
import os
from typing import Callable, Optional

from ._folder import GroupImageDataset, check_split, require

__all__ = ["lff_folder", "colored_mnist_folder", "corrupted_cifar10_folder"]

LAYOUT = """  root/align/<class>/<idx>_<y>_<a>.png     (train, bias-aligned)
  root/conflict/<class>/<idx>_<y>_<a>.png  (train, bias-conflicting)
  root/valid/**/<idx>_<y>_<a>.png          (val)
  root/test/**/<idx>_<y>_<a>.png or root/../test/**/... (test)"""

_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _images(folder: str):
    files = glob.glob(os.path.join(folder, "**", "*"), recursive=True)
    return sorted(f for f in files if f.lower().endswith(_EXTENSIONS))


def _parse(path: str):
    stem = os.path.splitext(os.path.basename(path))[0]
    parts = stem.split("_")
    try:
        return int(parts[-2]), int(parts[-1])
    except (IndexError, ValueError):
        raise ValueError(f"{path}: file names must end in _<y>_<a> (e.g. 12_3_7.png)") from None


def lff_folder(root: str, split: str = "train", transform: Optional[Callable] = None,
               name: str = "LfF/DFA folder") -> GroupImageDataset:
    """Images of the LfF/DFA release layout (see the module docstring)."""
    check_split(split)
    require(root, name, LAYOUT)
    if split == "train":
        folders = [require(os.path.join(root, "align"), name, LAYOUT),
                   require(os.path.join(root, "conflict"), name, LAYOUT)]
    elif split == "val":
        folders = [require(os.path.join(root, "valid"), name, LAYOUT)]
    else:
        inside, beside = os.path.join(root, "test"), os.path.join(root, os.pardir, "test")
        folders = [inside if os.path.isdir(inside) else require(beside, name, LAYOUT)]
    paths = [p for f in folders for p in _images(f)]
    if not paths:
        raise FileNotFoundError(f"{name}: no images under {folders}. Expected layout:\n{LAYOUT}")
    labels = [_parse(p) for p in paths]
    return GroupImageDataset(paths, [y for y, _ in labels], [a for _, a in labels], transform)


def colored_mnist_folder(root: str, split: str = "train",
                         transform: Optional[Callable] = None) -> GroupImageDataset:
    """LfF/DFA Colored MNIST (e.g. ``root = data/cmnist/1pct``)."""
    return lff_folder(root, split, transform, name="Colored MNIST (LfF/DFA layout)")


def corrupted_cifar10_folder(root: str, split: str = "train",
                             transform: Optional[Callable] = None) -> GroupImageDataset:
    """LfF/DFA Corrupted CIFAR-10 (e.g. ``root = data/cifar10c/1pct``)."""
    return lff_folder(root, split, transform, name="Corrupted CIFAR-10 (LfF/DFA layout)")
