"""Waterbirds (and any dataset shipped as a group-DRO style ``metadata.csv``).

Layout (the group-DRO release, e.g. ``waterbird_complete95_forest2water2/``)::

    root/metadata.csv          columns img_id, img_filename, y, split, place
    root/<img_filename>        e.g. 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg

``split`` is 0 (train), 1 (val) or 2 (test); y is the bird (0 landbird, 1 waterbird),
the attribute a is ``place`` (0 land, 1 water). Items are ``(x, y, a)``.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

from ._folder import GroupImageDataset, check_split, read_csv, require, require_columns

__all__ = ["waterbirds", "metadata_csv_dataset"]

_SPLIT_CODES = {"train": "0", "val": "1", "test": "2"}

LAYOUT = """  root/metadata.csv   (columns img_id, img_filename, y, split, place; split 0/1/2 = train/val/test)
  root/<img_filename> (the images, e.g. 001.Black_footed_Albatross/....jpg)"""


def metadata_csv_dataset(root: str, split: str, transform: Optional[Callable] = None, *,
                         attribute_columns: Sequence[str] = ("place", "a"),
                         name: str = "metadata.csv dataset",
                         layout: str = LAYOUT) -> GroupImageDataset:
    """Rows of ``root/metadata.csv`` with the given split: image ``img_filename``, class
    ``y`` and the first of ``attribute_columns`` present as the attribute."""
    check_split(split)
    require(root, name, layout)
    path = require(os.path.join(root, "metadata.csv"), name, layout)
    rows = read_csv(path)
    require_columns(rows, ("img_filename", "y", "split"), path)
    attr = next((c for c in attribute_columns if c in rows[0]), None)
    if attr is None:
        raise ValueError(f"{path} has none of the attribute columns {list(attribute_columns)}")
    rows = [r for r in rows if r["split"].strip() in (_SPLIT_CODES[split], split)]
    return GroupImageDataset([os.path.join(root, r["img_filename"]) for r in rows],
                             [int(float(r["y"])) for r in rows],
                             [int(float(r[attr])) for r in rows], transform)


def waterbirds(root: str, split: str = "train",
               transform: Optional[Callable] = None) -> GroupImageDataset:
    """Waterbirds from a local folder in the group-DRO layout (see the module docstring)."""
    return metadata_csv_dataset(root, split, transform, attribute_columns=("place",),
                                name="Waterbirds", layout=LAYOUT)
