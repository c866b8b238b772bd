"""CivilComments in the WILDS layout; items are ``(text, y, a)``.

Layout (WILDS ``civilcomments_v1.0``; ``root`` may be that folder or its parent)::

    root/all_data_with_identities.csv   columns comment_text, split (train/val/test),
                                        toxicity (0..1), and identity columns
                                        male, female, LGBTQ, christian, muslim,
                                        other_religions, black, white, ...

y = 1 when toxicity >= 0.5. The attribute follows the balanced-groups setup: a = 1 when
any of the eight identities above is mentioned (score >= 0.5), else 0; pass
``identity="black"`` (any column) for a single identity instead. ``transform`` maps
the text (e.g. a tokenizer); by default the raw string is returned.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ._folder import check_split, read_csv, require, require_columns

__all__ = ["civilcomments", "CivilComments", "IDENTITIES"]

IDENTITIES = ("male", "female", "LGBTQ", "christian", "muslim", "other_religions", "black",
              "white")

LAYOUT = """  root/all_data_with_identities.csv  (WILDS civilcomments_v1.0: comment_text, split,
                                      toxicity, male, female, LGBTQ, christian, muslim,
                                      other_religions, black, white, ...)"""


def _score(value: str) -> float:
    value = value.strip()
    return float(value) if value else 0.0


class CivilComments(Dataset):
    """Texts with toxicity label y and identity attribute a (see the module docstring)."""

    def __init__(self, texts, labels, attributes, transform: Optional[Callable] = None):
        self.texts = list(texts)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.attributes = torch.as_tensor(np.asarray(attributes, dtype=np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int):
        text = self.texts[index]
        if self.transform is not None:
            text = self.transform(text)
        return text, int(self.labels[index]), int(self.attributes[index])


def civilcomments(root: str, split: str = "train", transform: Optional[Callable] = None, *,
                  identity: Optional[str] = None) -> CivilComments:
    """CivilComments from a local folder in the WILDS layout."""
    check_split(split)
    require(root, "CivilComments", LAYOUT)
    path = os.path.join(root, "all_data_with_identities.csv")
    if not os.path.exists(path):
        path = os.path.join(root, "civilcomments_v1.0", "all_data_with_identities.csv")
    rows = read_csv(require(path, "CivilComments", LAYOUT))
    identities = IDENTITIES if identity is None else (identity,)
    require_columns(rows, ("comment_text", "split", "toxicity") + tuple(identities), path)
    rows = [r for r in rows if r["split"].strip() == split]
    return CivilComments([r["comment_text"] for r in rows],
                         [int(_score(r["toxicity"]) >= 0.5) for r in rows],
                         [int(any(_score(r[i]) >= 0.5 for i in identities)) for r in rows],
                         transform)
