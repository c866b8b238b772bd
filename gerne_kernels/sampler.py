"""The two batches of GERNE (Algorithm 1, Eq. 4).

Data are grouped by (class y, attribute a); K classes, A attribute values,
``alpha_ya = |X_ya| / |X_y|`` (Eq. 2). Every step draws two class-balanced batches
with ``batch_size`` samples per class:

* the biased batch ``B_b`` draws uniformly inside each class, so that
  ``p_b(a | y) = alpha_ya`` (no attribute labels needed);
* the less-biased batch ``B_lb`` draws the group ``a`` of class ``y`` with probability

      p_lb(a | y) = (1 - c) * alpha_ya + c / A,        c in (0, 1]       (Eq. 4)

  then a sample uniformly inside that group; ``c = 1`` is group-balanced.

Rounding rule (the paper leaves it open): group indices are *sampled* i.i.d. with
these probabilities, and samples i.i.d. (with replacement) inside the class or group,
so the expected proportions of every batch are exactly ``p_b`` and ``p_lb``. Only the
realised counts vary from step to step (multinomially).

One pass over a :class:`TwoBatchSampler` is an epoch of the dataset's size: it has
``ceil(N / (K * batch_size))`` steps, so ``B_lb`` sees about ``N`` samples in a pass.

DataLoader recipe
-----------------
Either iterate the sampler and index tensors directly::

    for idx_b, idx_lb in sampler:
        loss_b = F.cross_entropy(model(x[idx_b]), y[idx_b])
        ...

or hand :meth:`TwoBatchSampler.batch_sampler` to a ``DataLoader``; every batch it
yields is the concatenation ``B_b || B_lb`` (two halves of equal size
``K * batch_size``), so split any collated tensor with ``.chunk(2)``::

    loader = DataLoader(dataset, batch_sampler=sampler.batch_sampler(), num_workers=4)
    for x, y, *_ in loader:
        (x_b, x_lb), (y_b, y_lb) = x.chunk(2), y.chunk(2)
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Tuple

import torch

__all__ = [
    "group_counts",
    "group_proportions",
    "lb_group_probabilities",
    "ClassBalancedSampler",
    "TwoBatchSampler",
    "ConcatBatchSampler",
]


def _as_long_1d(values, name: str) -> torch.Tensor:
    """Integer labels as a 1-D int64 CPU tensor, with a clear error otherwise."""
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if t.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex():
        if t.numel() and not torch.equal(t, t.round()):
            raise ValueError(f"{name} must hold integer values")
    if t.dtype == torch.bool:
        t = t.long()
    t = t.detach().to("cpu", torch.long)
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} must be non-negative integers, got min {int(t.min())}")
    return t


def _check_pair(labels, attributes) -> Tuple[torch.Tensor, torch.Tensor]:
    y = _as_long_1d(labels, "labels")
    a = _as_long_1d(attributes, "attributes")
    if y.numel() != a.numel():
        raise ValueError(
            f"labels and attributes must have the same length, got {y.numel()} and {a.numel()}"
        )
    if y.numel() == 0:
        raise ValueError("labels is empty")
    return y, a


def group_counts(labels, attributes, num_classes: Optional[int] = None,
                 num_attributes: Optional[int] = None) -> torch.Tensor:
    """The (K x A) table ``counts[y, a] = |X_ya|`` as an int64 tensor.

    K defaults to ``max(labels) + 1`` and A to ``max(attributes) + 1``; pass them
    when some class or attribute value has no sample at all.
    """
    y, a = _check_pair(labels, attributes)
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    n_a = int(a.max()) + 1 if num_attributes is None else int(num_attributes)
    if int(y.max()) >= k:
        raise ValueError(f"num_classes={k} but labels contain {int(y.max())}")
    if int(a.max()) >= n_a:
        raise ValueError(f"num_attributes={n_a} but attributes contain {int(a.max())}")
    return torch.bincount(y * n_a + a, minlength=k * n_a).view(k, n_a)


def group_proportions(counts: torch.Tensor) -> torch.Tensor:
    """``alpha_ya = |X_ya| / |X_y|`` (Eq. 2) as float64, from a (K x A) count table."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    per_class = counts.sum(dim=1, keepdim=True)
    if bool((per_class == 0).any()):
        empty = [int(i) for i in torch.nonzero(per_class.view(-1) == 0).view(-1)]
        raise ValueError(f"class(es) {empty} have no samples; alpha_ya is undefined")
    return counts / per_class


def lb_group_probabilities(counts: torch.Tensor, c: float) -> torch.Tensor:
    """``p_lb(a | y) = (1 - c) * alpha_ya + c / A`` (Eq. 4), float64 (K x A)."""
    alpha = group_proportions(counts)
    return (1.0 - c) * alpha + c / alpha.shape[1]


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (samples per class), got {batch_size!r}")
    return int(batch_size)


def _draw(sorted_idx: torch.Tensor, offsets: torch.Tensor, sizes: torch.Tensor,
          cells: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One uniform sample (with replacement) from each cell named in ``cells``.

    ``sorted_idx[offsets[g] : offsets[g] + sizes[g]]`` are the dataset indices of cell g.
    """
    u = torch.rand(cells.shape, generator=generator, dtype=torch.float64)
    n = sizes[cells]
    pos = torch.minimum((u * n).long(), n - 1)  # u < 1, the clamp only guards rounding
    return sorted_idx[offsets[cells] + pos]


class ClassBalancedSampler:
    """Class-balanced batches: ``batch_size`` samples per class, uniform inside a class.

    This is the biased batch ``B_b`` alone (``p_b(a|y) = alpha_ya``), i.e. ERM on
    class-balanced batches, as used to train the biased model of Algorithm 2.
    Iterating yields ``ceil(N / (K * batch_size))`` LongTensors of ``K * batch_size``
    indices, class-major (all of class 0, then class 1, ...).
    """

    def __init__(self, labels, batch_size: int, generator: Optional[torch.Generator] = None,
                 num_classes: Optional[int] = None, steps_per_epoch: Optional[int] = None):
        y = _as_long_1d(labels, "labels")
        if y.numel() == 0:
            raise ValueError("labels is empty")
        self.batch_size = _check_batch_size(batch_size)
        k = int(y.max()) + 1 if num_classes is None else int(num_classes)
        sizes = torch.bincount(y, minlength=k)
        if bool((sizes == 0).any()):
            empty = [int(i) for i in torch.nonzero(sizes == 0).view(-1)]
            raise ValueError(
                f"labels: class(es) {empty} have no samples; every class needs at least one "
                "(pass num_classes only if all of those classes are present)")
        self.labels = y
        self.num_classes = k
        self.generator = generator
        self._class_sorted = torch.argsort(y, stable=True)
        self._class_sizes = sizes
        self._class_offsets = torch.cumsum(sizes, 0) - sizes
        self._class_cells = torch.arange(k).repeat_interleave(self.batch_size)
        self._steps = steps_per_epoch
        if steps_per_epoch is not None and int(steps_per_epoch) < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")

    def __len__(self) -> int:
        if self._steps is not None:
            return int(self._steps)
        return math.ceil(self.labels.numel() / (self.num_classes * self.batch_size))

    def sample_b(self) -> torch.Tensor:
        """One biased batch: ``batch_size`` uniform draws inside each class."""
        return _draw(self._class_sorted, self._class_offsets, self._class_sizes,
                     self._class_cells, self.generator)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _ in range(len(self)):
            yield self.sample_b()


class TwoBatchSampler(ClassBalancedSampler):
    """Iterable of ``(indices_b, indices_lb)`` per Algorithm 1 and Eq. 4.

    Parameters
    ----------
    labels, attributes:
        Integer class and attribute labels of the training set (length N), values
        ``0..K-1`` and ``0..A-1``. For unknown attributes pass pseudo-attributes
        (:func:`gerne_kernels.pseudo_attributes`, A = 2).
    batch_size:
        Samples *per class* in each batch (both batches hold ``K * batch_size``).
    c:
        Share of the group-balanced distribution in ``B_lb``, ``c in (0, 1]``.
    generator:
        Optional ``torch.Generator`` for reproducibility.
    num_classes, num_attributes:
        K and A when they are not ``max + 1`` of the labels.
    steps_per_epoch:
        Overrides ``len()`` (default ``ceil(N / (K * batch_size))``).

    Each index tensor is class-major: ``batch_size`` indices of class 0, then class 1...
    A group that ``B_lb`` can draw (``p_lb > 0``, always the case for ``c > 0``) must
    have at least one sample; an empty group raises ``ValueError``.
    """

    def __init__(self, labels, attributes, batch_size: int, c: float,
                 generator: Optional[torch.Generator] = None,
                 num_classes: Optional[int] = None, num_attributes: Optional[int] = None,
                 steps_per_epoch: Optional[int] = None):
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not (0.0 < float(c) <= 1.0):
            raise ValueError(f"c must be a number in (0, 1], got {c!r}")
        y, a = _check_pair(labels, attributes)
        super().__init__(y, batch_size, generator, num_classes, steps_per_epoch)
        counts = group_counts(y, a, self.num_classes, num_attributes)
        self.c = float(c)
        self.attributes = a
        self.num_attributes = counts.shape[1]
        self.counts = counts
        self.alpha = group_proportions(counts)
        self.p_lb = lb_group_probabilities(counts, self.c)
        missing = torch.nonzero((counts == 0) & (self.p_lb > 0))
        if missing.numel():
            groups = ", ".join(f"(y={int(g[0])}, a={int(g[1])})" for g in missing[:10])
            more = "" if missing.shape[0] <= 10 else f" and {missing.shape[0] - 10} more"
            raise ValueError(
                f"attributes: group(s) {groups}{more} have no samples but B_lb draws them with "
                f"probability (1 - c) * alpha + c / A = {self.c / self.num_attributes:.4g} > 0 "
                "(Eq. 4); drop that attribute value for the class, merge groups, or pass "
                "num_attributes matching the values actually used")
        n_a = self.num_attributes
        self._group_sorted = torch.argsort(y * n_a + a, stable=True)
        self._group_sizes = counts.view(-1)
        self._group_offsets = torch.cumsum(self._group_sizes, 0) - self._group_sizes
        self._class_base = (torch.arange(self.num_classes) * n_a).view(-1, 1)

    def sample_lb(self) -> torch.Tensor:
        """One less-biased batch: a group ~ p_lb(.|y), then a uniform sample in it."""
        a = torch.multinomial(self.p_lb, self.batch_size, replacement=True,
                              generator=self.generator)
        cells = (self._class_base + a).view(-1)
        return _draw(self._group_sorted, self._group_offsets, self._group_sizes, cells,
                     self.generator)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(len(self)):
            yield self.sample_b(), self.sample_lb()

    def batch_sampler(self) -> "ConcatBatchSampler":
        """A ``DataLoader`` batch sampler yielding ``B_b || B_lb`` (split with ``.chunk(2)``)."""
        return ConcatBatchSampler(self)


class ConcatBatchSampler(torch.utils.data.Sampler):
    """Wraps a :class:`TwoBatchSampler` for ``DataLoader(batch_sampler=...)``.

    Each item is a list of ``2 * K * batch_size`` indices: first the biased batch,
    then the less-biased one; ``tensor.chunk(2)`` recovers ``(b, lb)``.
    """

    def __init__(self, sampler: TwoBatchSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Sequence[int]]:
        for b, lb in self.sampler:
            yield torch.cat([b, lb]).tolist()
