"""Group metrics of debiasing: per-group accuracy, GBA, WGA and CBA.

With groups (y, a) and ``acc_ya`` the accuracy on the samples of group (y, a):

* GBA, group-balanced accuracy: the mean of ``acc_ya`` over the non-empty groups;
* WGA, worst-group accuracy: the minimum of ``acc_ya`` over the non-empty groups;
* CBA, class-balanced accuracy: the mean over the non-empty classes of the per-class
  accuracy ``acc_y`` (which needs no attribute labels).

Groups of the (K x A) grid without any sample are not silently averaged: their
accuracy is NaN in ``per_group``, they are listed in ``empty_groups``, and GBA/WGA are
taken over the remaining groups. K and A default to ``max + 1`` of the labels.

Inputs may be torch tensors, numpy arrays or lists. ``predictions`` are class indices
(N,) or scores (N x K), in which case the argmax is taken.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

__all__ = ["GroupMetrics", "group_metrics", "accuracy", "class_balanced_accuracy"]


def _to_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor without importing torch eagerly
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise ValueError(f"{name} must be an array, got a scalar")
    return arr


def _as_labels(x, name: str) -> np.ndarray:
    arr = _to_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integer values")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative")
    return arr


@dataclass
class GroupMetrics:
    """Accuracy per group and the summaries GBA, WGA, CBA (fractions in [0, 1]).

    ``per_group[(y, a)] = (accuracy, count)``; accuracy is NaN for an empty group.
    ``empty_groups`` lists those (y, a); ``worst_group`` is where WGA is attained.
    """

    per_group: Dict[Tuple[int, int], Tuple[float, int]]
    gba: float
    wga: float
    cba: float
    accuracy: float
    empty_groups: List[Tuple[int, int]] = field(default_factory=list)
    worst_group: Optional[Tuple[int, int]] = None

    def as_dict(self) -> dict:
        """JSON-friendly form (group keys as "y,a" strings)."""
        return {
            "gba": self.gba, "wga": self.wga, "cba": self.cba, "accuracy": self.accuracy,
            "worst_group": list(self.worst_group) if self.worst_group is not None else None,
            "empty_groups": [list(g) for g in self.empty_groups],
            "per_group": {f"{y},{a}": {"accuracy": None if math.isnan(acc) else acc, "count": n}
                          for (y, a), (acc, n) in self.per_group.items()},
        }


def _predicted_classes(predictions) -> np.ndarray:
    pred = _to_numpy(predictions, "predictions")
    if pred.ndim == 2:
        return pred.argmax(axis=1).astype(np.int64)
    return _as_labels(pred, "predictions")


def _predictions_and_labels(predictions, labels) -> Tuple[np.ndarray, np.ndarray]:
    pred, y = _predicted_classes(predictions), _as_labels(labels, "labels")
    if pred.shape != y.shape:
        raise ValueError(f"predictions and labels differ in length: {pred.shape[0]} vs {y.shape[0]}")
    if y.size == 0:
        raise ValueError("labels is empty")
    return pred, y


def accuracy(predictions, labels) -> float:
    """Plain accuracy (fraction correct)."""
    pred, y = _predictions_and_labels(predictions, labels)
    return float(np.mean(pred == y))


def class_balanced_accuracy(predictions, labels) -> float:
    """CBA: the mean over the classes present in ``labels`` of the per-class accuracy."""
    pred, y = _predictions_and_labels(predictions, labels)
    counts = np.bincount(y)
    hits = np.bincount(y, weights=(pred == y).astype(np.float64), minlength=counts.size)
    present = counts > 0
    return float(np.mean(hits[present] / counts[present]))


def group_metrics(predictions, labels, attributes, num_classes: Optional[int] = None,
                  num_attributes: Optional[int] = None) -> GroupMetrics:
    """Per-group accuracy, GBA, WGA and CBA; see the module docstring."""
    pred = _predicted_classes(predictions)
    y = _as_labels(labels, "labels")
    a = _as_labels(attributes, "attributes")
    if not (pred.shape[0] == y.shape[0] == a.shape[0]):
        raise ValueError(
            f"predictions, labels and attributes differ in length: "
            f"{pred.shape[0]}, {y.shape[0]}, {a.shape[0]}")
    if y.size == 0:
        raise ValueError("labels is empty")
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    n_a = int(a.max()) + 1 if num_attributes is None else int(num_attributes)
    if y.max() >= k or a.max() >= n_a:
        raise ValueError(f"labels/attributes exceed num_classes={k} / num_attributes={n_a}")
    correct = (pred == y).astype(np.float64)
    cell = y * n_a + a
    counts = np.bincount(cell, minlength=k * n_a)
    hits = np.bincount(cell, weights=correct, minlength=k * n_a)
    per_group: Dict[Tuple[int, int], Tuple[float, int]] = {}
    empty: List[Tuple[int, int]] = []
    accs = []
    for g in range(k * n_a):
        key = divmod(g, n_a)
        if counts[g] == 0:
            per_group[key] = (math.nan, 0)
            empty.append(key)
        else:
            acc = float(hits[g] / counts[g])
            per_group[key] = (acc, int(counts[g]))
            accs.append((acc, key))
    worst_acc, worst_key = min(accs, key=lambda t: t[0])
    return GroupMetrics(
        per_group=per_group,
        gba=float(np.mean([acc for acc, _ in accs])),
        wga=float(worst_acc),
        cba=class_balanced_accuracy(pred, y),
        accuracy=float(correct.mean()),
        empty_groups=empty,
        worst_group=worst_key,
    )
