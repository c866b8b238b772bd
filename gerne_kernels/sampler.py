"""The two batches of GERNE (Algorithm 1, Eq. 4).

Data are grouped by (class y, attribute a); K classes, A attribute values,
``alpha_ya = |X_ya| / |X_y|`` (Eq. 2). Every step draws two class-balanced batches
with ``batch_size`` samples per class:

* the biased batch ``B_b`` draws uniformly inside each class, so that
  ``p_b(a | y) = alpha_ya`` (no attribute labels needed);
* the less-biased batch ``B_lb`` draws the group ``a`` of class ``y`` with probability

      p_lb(a | y) = (1 - c) * alpha_ya + c / A_y   if |X_ya| > 0,        c in (0, 1]
      p_lb(a | y) = 0                              if |X_ya| = 0         (Eq. 4)

  then a sample uniformly inside that group; ``c = 1`` is group-balanced.

Empty groups (the generalization of Eq. 4)
------------------------------------------
The paper writes Eq. 4 with ``c / A`` for every group, which presumes that every class
has samples of every attribute value. Real bias-conflicting data is sparse: the LfF
Colored MNIST at 0.5 % has about 27 conflicting digits per class spread over 9 colors,
so some (digit, color) groups are empty by chance, and Eq. 4 would ask ``B_lb`` to draw
from a group with nothing in it. Here ``A_y`` is the number of attribute values
*present* in class y and the ``c / A_y`` share goes to the present groups only:
``p_lb(.|y)`` still sums to one, is group-balanced over what exists when ``c = 1``,
equals the paper's Eq. 4 whenever no group is empty, and never draws an empty group
(nor does ``B_b``, since ``alpha_ya = 0`` there). :func:`gerne_kernels.beta_bounds`
uses the same ``A_y``, so the bounds on beta describe the batches actually drawn. The
sampler warns once, at construction, and lists the empty groups in ``empty_groups``.
A class without any sample has no ``alpha_ya`` at all and stays an error.

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
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "group_counts",
    "group_proportions",
    "lb_group_probabilities",
    "attributes_per_class",
    "ClassBalancedSampler",
    "WeightedClassSampler",
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


def attributes_per_class(counts: torch.Tensor) -> torch.Tensor:
    """``A_y``: how many attribute values have at least one sample in class y, int64 (K,)."""
    return (torch.as_tensor(counts) > 0).sum(dim=1)


def lb_group_probabilities(counts: torch.Tensor, c: float) -> torch.Tensor:
    """Eq. 4 over the groups present, float64 (K x A):
    ``p_lb(a | y) = (1 - c) * alpha_ya + c / A_y`` where ``|X_ya| > 0``, else 0."""
    alpha = group_proportions(counts)
    present = alpha > 0
    a_y = present.sum(dim=1, keepdim=True).to(torch.float64)
    return torch.where(present, (1.0 - c) * alpha + c / a_y, torch.zeros_like(alpha))


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


class WeightedClassSampler(ClassBalancedSampler):
    """Class-balanced batches drawn non-uniformly inside each class.

    ``batch_size`` samples per class; sample i of class y is drawn (with replacement) with
    probability ``weights[i] / sum_{j in X_y} weights[j]``. JTT's second stage uses it with
    ``weights = lambda_up`` on the error set and 1 elsewhere (the error set repeated
    ``lambda_up`` times). Every class needs a positive total weight.
    """

    def __init__(self, labels, weights, batch_size: int,
                 generator: Optional[torch.Generator] = None,
                 num_classes: Optional[int] = None, steps_per_epoch: Optional[int] = None):
        super().__init__(labels, batch_size, generator, num_classes, steps_per_epoch)
        w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
        if w.shape != self.labels.shape:
            raise ValueError(f"weights must have one entry per sample ({self.labels.numel()}), "
                             f"got shape {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("weights must be finite and non-negative")
        sizes = self._class_sizes
        # (K x n_max) table of each class's weights, zero-padded: one multinomial per step
        table = torch.zeros(self.num_classes, int(sizes.max()), dtype=torch.float64)
        pos = torch.arange(self.labels.numel()) - self._class_offsets[self.labels[self._class_sorted]]
        table[self.labels[self._class_sorted], pos] = w[self._class_sorted]
        zero = torch.nonzero(table.sum(dim=1) == 0).view(-1)
        if zero.numel():
            raise ValueError(f"weights: class(es) {zero.tolist()} have total weight 0")
        self.weights = w
        self._table = table

    def sample_b(self) -> torch.Tensor:
        """``batch_size`` draws per class, sample i with probability ``w_i / sum_{X_y} w``."""
        pos = torch.multinomial(self._table, self.batch_size, replacement=True,
                                generator=self.generator)
        return self._class_sorted[(self._class_offsets.view(-1, 1) + pos).view(-1)]


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
    Groups without samples are never drawn: ``B_lb`` spreads ``c`` over the ``A_y``
    attribute values present in class y (module docstring, "Empty groups"); they are
    listed in ``empty_groups`` with one warning. A class without samples is an error.

    Attributes: ``counts`` (K x A), ``alpha`` and ``p_lb`` (float64, K x A),
    ``attributes_per_class`` (``A_y``, K), ``empty_groups`` (list of ``(y, a)``).
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
        self.attributes_per_class = attributes_per_class(counts)
        self.empty_groups: List[Tuple[int, int]] = [
            (int(g[0]), int(g[1])) for g in torch.nonzero(counts == 0)]
        if self.empty_groups:
            warnings.warn(_empty_groups_message(self.empty_groups, self.attributes_per_class),
                          stacklevel=2)
        n_a = self.num_attributes
        self._group_sorted = torch.argsort(y * n_a + a, stable=True)
        self._group_sizes = counts.view(-1)
        self._group_offsets = torch.cumsum(self._group_sizes, 0) - self._group_sizes
        self._class_base = (torch.arange(self.num_classes) * n_a).view(-1, 1)

    def beta_bounds(self, simplified: bool = False):
        """Eq. 9 for this sampler's group counts and c (same ``A_y``), a ``BetaBounds``."""
        from .bounds import beta_bounds

        return beta_bounds(counts=self.counts, c=self.c, simplified=simplified)

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


def _empty_groups_message(empty: List[Tuple[int, int]], a_y: torch.Tensor) -> str:
    shown = ", ".join(f"(y={y}, a={a})" for y, a in empty[:10])
    more = "" if len(empty) <= 10 else f" and {len(empty) - 10} more"
    return (f"TwoBatchSampler: {len(empty)} group(s) have no samples: {shown}{more}. B_lb never "
            "draws them; class y spreads c over the A_y attribute values it has, "
            f"p_lb = (1 - c) * alpha + c / A_y (A_y from {int(a_y.min())} to {int(a_y.max())}); "
            "the list is in sampler.empty_groups")


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
