"""CelebA with target Blond_Hair and attribute Male, as in the group-DRO release.

Layout (group-DRO's ``celebA/data``; ``root`` may be that folder or its parent)::

    root/list_attr_celeba.csv      columns image_id, 5_o_Clock_Shadow, ..., Blond_Hair, ..., Male, ...
                                   (values -1 / 1)
    root/list_eval_partition.csv   columns image_id, partition (0 train, 1 val, 2 test)
    root/img_align_celeba/<image_id>

A ``root/metadata.csv`` with columns img_filename, y, split and a (or place) is read
instead when present. y = 1 for blond hair, a = 1 for male by default.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from ._folder import GroupImageDataset, check_split, read_csv, require, require_columns
from .waterbirds import metadata_csv_dataset

__all__ = ["celeba"]

LAYOUT = """  root/list_attr_celeba.csv      (image_id and the 40 attributes as -1/1, incl. Blond_Hair, Male)
  root/list_eval_partition.csv   (image_id, partition: 0 train, 1 val, 2 test)
  root/img_align_celeba/<image_id>
(root may also be the parent of a data/ folder holding these, or hold a metadata.csv with
 columns img_filename, y, split, a)"""

_PARTITIONS = {"train": "0", "val": "1", "test": "2"}


def celeba(root: str, split: str = "train", transform: Optional[Callable] = None, *,
           target: str = "Blond_Hair", attribute: str = "Male") -> GroupImageDataset:
    """CelebA from a local folder (see the module docstring); items ``(x, y, a)``."""
    check_split(split)
    require(root, "CelebA", LAYOUT)
    if os.path.exists(os.path.join(root, "metadata.csv")):
        return metadata_csv_dataset(root, split, transform, attribute_columns=("a", "place"),
                                    name="CelebA", layout=LAYOUT)
    base = root
    if not os.path.exists(os.path.join(base, "list_attr_celeba.csv")) and os.path.isdir(
            os.path.join(root, "data")):
        base = os.path.join(root, "data")
    attrs = read_csv(require(os.path.join(base, "list_attr_celeba.csv"), "CelebA", LAYOUT))
    parts = read_csv(require(os.path.join(base, "list_eval_partition.csv"), "CelebA", LAYOUT))
    require_columns(attrs, ("image_id", target, attribute), "list_attr_celeba.csv")
    require_columns(parts, ("image_id", "partition"), "list_eval_partition.csv")
    partition = {r["image_id"]: r["partition"].strip() for r in parts}
    rows = [r for r in attrs if partition.get(r["image_id"]) == _PARTITIONS[split]]
    images = os.path.join(base, "img_align_celeba")
    return GroupImageDataset([os.path.join(images, r["image_id"]) for r in rows],
                             [int(int(r[target]) > 0) for r in rows],
                             [int(int(r[attribute]) > 0) for r in rows], transform)
