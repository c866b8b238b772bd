"""Where the loop's batches come from: tensors in memory, or a map-style ``Dataset``.

Both sources expose ``labels`` and ``attributes`` (int64 CPU tensors, what the samplers
need), ``batches(index_tuples, device)``, which turns each step's tuple of index tensors
into a list of :class:`Batch` on the device, and ``logits(model, device)`` for evaluation.
"""
from __future__ import annotations

import collections
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .base import Batch

__all__ = ["TensorSource", "DatasetSource", "default_collate"]


class TensorSource:
    """``(x, y, a)`` tensors (e.g. a :class:`gerne_kernels.datasets.GroupTensors`); ``x`` is
    moved to the device once and indexed there."""

    def __init__(self, x: torch.Tensor, y, a, eval_batch_size: int = 4096):
        self.x = x
        self.labels = torch.as_tensor(y).long().cpu()
        self.attributes = torch.as_tensor(a).long().cpu()
        if not (x.shape[0] == self.labels.numel() == self.attributes.numel()):
            raise ValueError(f"x, y and a differ in length: {x.shape[0]}, "
                             f"{self.labels.numel()}, {self.attributes.numel()}")
        self.eval_batch_size = eval_batch_size
        self._on = {}

    @classmethod
    def of(cls, data) -> "TensorSource":
        """From any ``(x, y, a)`` triple."""
        x, y, a = data[0], data[1], data[2]
        return cls(x, y, a)

    def __len__(self) -> int:
        return self.labels.numel()

    def _device_copy(self, device):
        key = str(device)
        if key not in self._on:
            self._on[key] = (self.x.to(device), self.labels.to(device), self.attributes.to(device))
        return self._on[key]

    def batches(self, index_tuples: Iterable[Tuple[torch.Tensor, ...]],
                device) -> Iterator[List[Batch]]:
        x, y, a = self._device_copy(device)
        for parts in index_tuples:
            out = []
            for idx in parts:
                idx = idx.to(device)
                out.append(Batch(x[idx], y[idx], a[idx]))
            yield out

    @torch.no_grad()
    def logits(self, model: torch.nn.Module, device, amp_dtype=None) -> torch.Tensor:
        x = self._device_copy(device)[0]
        return _eval_logits(model, (x[i:i + self.eval_batch_size]
                                    for i in range(0, x.shape[0], self.eval_batch_size)),
                            device, amp_dtype)


def default_collate(items: Sequence[tuple]) -> Batch:
    """``(x, y, a)`` items with tensor inputs stacked into one :class:`Batch`."""
    xs, ys, as_ = zip(*items)
    return Batch(torch.stack(list(xs)), torch.as_tensor(ys, dtype=torch.long),
                 torch.as_tensor(as_, dtype=torch.long))


class _ConcatParts(torch.utils.data.Sampler):
    """Batch sampler: each step's parts concatenated; their sizes queued for splitting."""

    def __init__(self, index_tuples, sizes: collections.deque):
        self.index_tuples, self.sizes = index_tuples, sizes

    def __iter__(self):
        for parts in self.index_tuples:
            self.sizes.append([int(p.numel()) for p in parts])
            yield torch.cat(list(parts)).tolist()


def _split(batch: Batch, sizes: List[int]) -> List[Batch]:
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        x = ({k: v[sl] for k, v in batch.x.items()} if isinstance(batch.x, dict) else batch.x[sl])
        out.append(Batch(x, batch.y[sl], batch.a[sl]))
        start += n
    return out


class DatasetSource:
    """A map-style dataset with ``labels`` and ``attributes`` tensors (the package's folder
    loaders), read through a ``DataLoader``; ``collate`` turns a list of items into a
    :class:`Batch` (default: stack ``(x, y, a)`` items; a tokenizer for text)."""

    def __init__(self, dataset: Dataset, collate: Optional[Callable] = None,
                 num_workers: int = 0, eval_batch_size: int = 256, pin_memory: bool = False):
        self.dataset = dataset
        self.labels = torch.as_tensor(dataset.labels).long().cpu()
        self.attributes = torch.as_tensor(dataset.attributes).long().cpu()
        self.collate = collate or default_collate
        self.num_workers = int(num_workers)
        self.eval_batch_size = eval_batch_size
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.dataset)

    def _loader(self, **kw) -> DataLoader:
        return DataLoader(self.dataset, collate_fn=self.collate, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, **kw)

    def batches(self, index_tuples, device) -> Iterator[List[Batch]]:
        sizes = collections.deque()
        # the loader keeps the batch sampler's order, so sizes pop in step with its batches
        for batch in self._loader(batch_sampler=_ConcatParts(index_tuples, sizes)):
            yield _split(batch.to(device), sizes.popleft())

    @torch.no_grad()
    def logits(self, model: torch.nn.Module, device, amp_dtype=None) -> torch.Tensor:
        loader = self._loader(batch_size=self.eval_batch_size, shuffle=False)
        return _eval_logits(model, (b.to(device).x for b in loader), device, amp_dtype)


def _eval_logits(model, inputs, device, amp_dtype) -> torch.Tensor:
    was_training = model.training
    model.eval()
    device = torch.device(device)
    try:
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16,
                            enabled=amp_dtype is not None):
            out = [model(x).cpu() for x in inputs]
            out = [o.float() if o.dtype in (torch.bfloat16, torch.float16) else o for o in out]
    finally:
        model.train(was_training)
    return torch.cat(out)
