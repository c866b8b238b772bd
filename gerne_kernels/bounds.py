"""Bounds on the extrapolation factor beta (Eq. 9, App. C).

In expectation GERNE weights group (y, a) by (Eq. 8)

    p_ext(a | y) = alpha_ya + c * (beta + 1) * (1/A_y - alpha_ya),

and beta is admissible when every ``p_ext(a|y)`` lies in [0, 1]. ``A_y`` is the number
of attribute values present in class y, the same ``A_y`` as the two-batch sampler's
Eq. 4 (:mod:`gerne_kernels.sampler`, "Empty groups"): it is the paper's A when no group
is empty. An empty group is drawn by neither batch (``p_ext = 0`` for every beta) and
does not constrain beta. With ``d_ya = 1/A_y - alpha_ya`` and, for each non-empty group
with ``alpha_ya != 1/A_y``,

    i1_ya = -alpha_ya / (c * d_ya) - 1          (p_ext = 0)
    i2_ya = (1 - alpha_ya) / (c * d_ya) - 1     (p_ext = 1)

the group allows ``beta in [min(i1, i2), max(i1, i2)]``; so

    beta_min = max over groups of min(i1_ya, i2_ya)
    beta_max = min over groups of max(i1_ya, i2_ya).

Groups with ``alpha_ya == 1/A_y`` do not depend on beta and are skipped; if every group
is balanced, beta is unbounded and the result is ``(-inf, inf)``.

The simplified form used in practice is ``[-1, beta_max]`` with beta_max taken at the
group with the largest alpha: ``alpha_max / (c * (alpha_max - 1/A)) - 1``. (With
``A_y`` varying between classes: the smallest over the classes of that value at the
class's largest alpha, since it decreases in alpha for a fixed ``A_y``.)
Worked example (Colored MNIST, 0.5 % minority): ``alpha_max = 0.995``, ``c = 0.5``,
``A = 10`` gives ``beta_max = 0.995 / (0.5 * 0.895) - 1 = 1.2235``.

The bounds depend only on the training-set proportions, c and ``A_y``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .sampler import attributes_per_class, group_counts, group_proportions

__all__ = ["BetaBounds", "beta_bounds"]


class BetaBounds(tuple):
    """``(low, high)`` admissible range of beta, plus ``source``, a human-readable string.

    A 2-tuple (``lo, hi = bounds`` works, and so does ``isinstance(bounds, tuple)``);
    ``bounds.low``, ``bounds.high`` and ``bounds.source`` name the parts.
    """

    def __new__(cls, low: float, high: float, source: str = ""):
        self = super().__new__(cls, (float(low), float(high)))
        self.source = str(source)
        return self

    def __getnewargs__(self):
        return (self[0], self[1], self.source)

    @property
    def low(self) -> float:
        return self[0]

    @property
    def high(self) -> float:
        return self[1]

    def __repr__(self) -> str:
        return f"BetaBounds(low={self[0]!r}, high={self[1]!r}, source={self.source!r})"


def _counts_table(labels, attributes, counts, num_classes, num_attributes) -> torch.Tensor:
    if counts is not None:
        if labels is not None or attributes is not None:
            raise ValueError("pass either labels and attributes, or counts, not both")
        t = torch.as_tensor(counts)
        if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
            raise ValueError(f"counts must be a (K x A) table, got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError("counts must be non-negative and finite")
        return t.to(torch.float64)
    if labels is None or attributes is None:
        raise ValueError("pass labels and attributes, or counts=(K x A) table of group sizes")
    return group_counts(labels, attributes, num_classes, num_attributes).to(torch.float64)


def _check_c(c) -> float:
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not (0.0 < float(c) <= 1.0):
        raise ValueError(f"c must be a number in (0, 1], got {c!r}")
    return float(c)


def beta_bounds(labels=None, attributes=None, c: float = None, *, counts=None,
                simplified: bool = False, num_classes: Optional[int] = None,
                num_attributes: Optional[int] = None) -> BetaBounds:
    """Admissible ``(beta_min, beta_max)`` of Eq. 9 as a :class:`BetaBounds`.

    Give either ``labels`` and ``attributes`` (length-N integer arrays) or
    ``counts``, a (K x A) table of group sizes ``|X_ya|`` (any non-negative numbers
    proportional to them within each class, e.g. the alphas, work too). ``c`` in (0, 1] is the
    sampler's mixing factor. ``simplified=True`` returns ``(-1, beta_max)`` with
    beta_max from the group with the largest ``alpha`` (the form used in practice).
    Empty groups are skipped and ``A_y`` counts the groups present in class y (module
    docstring), as :class:`gerne_kernels.TwoBatchSampler` does.

    If every group has ``alpha_ya == 1/A_y`` beta is unbounded: ``(-inf, inf)``
    (``(-1, inf)`` when simplified). The ``source`` names c, A (and the range of A_y
    when some group is empty) and the binding groups.
    """
    if c is None:
        raise ValueError("c is required: beta_bounds(labels, attributes, c) or beta_bounds(counts=..., c=...)")
    c = _check_c(c)
    table = _counts_table(labels, attributes, counts, num_classes, num_attributes)
    alpha = group_proportions(table)
    n_a = alpha.shape[1]
    a_y = attributes_per_class(table)
    present = alpha > 0
    d = 1.0 / a_y.to(torch.float64).view(-1, 1) - alpha
    # alpha == 1/A_y up to rounding of the division: such groups do not constrain beta
    active = present & (d.abs() > 1e-12)
    origin = "group counts" if counts is not None else "labels and attributes"
    a_text = f"A={n_a}" if bool((a_y == n_a).all()) else \
        f"A={n_a}, A_y={int(a_y.min())}..{int(a_y.max())} over the groups present"
    head = f"Eq. 9 from {origin}, c={c:g}, {a_text}"
    if simplified:
        # per class the largest alpha binds (alpha / (alpha - 1/A_y) decreases in alpha)
        majority = active & (d < 0)
        if not bool(majority.any()):
            return BetaBounds(-1.0, math.inf, f"{head} (simplified); all groups balanced, beta_max unbounded")
        safe = torch.where(majority, -d, torch.ones_like(d))
        i1 = torch.where(majority, alpha / (c * safe) - 1.0, torch.full_like(d, math.inf))
        flat = int(torch.argmin(i1))
        y, a = divmod(flat, n_a)
        return BetaBounds(-1.0, float(i1.view(-1)[flat]),
                          f"{head} (simplified [-1, beta_max]); binding group (y={y}, a={a}), "
                          f"alpha_max={float(alpha[y, a]):.6g}")
    if not bool(active.any()):
        return BetaBounds(-math.inf, math.inf, f"{head}; all groups balanced, beta unbounded")
    safe_d = torch.where(active, d, torch.ones_like(d))
    i1 = -alpha / (c * safe_d) - 1.0
    i2 = (1.0 - alpha) / (c * safe_d) - 1.0
    lows = torch.where(active, torch.minimum(i1, i2), torch.full_like(d, -math.inf))
    highs = torch.where(active, torch.maximum(i1, i2), torch.full_like(d, math.inf))
    lo_flat, hi_flat = int(torch.argmax(lows)), int(torch.argmin(highs))
    lo_y, lo_a = divmod(lo_flat, n_a)
    hi_y, hi_a = divmod(hi_flat, n_a)
    return BetaBounds(
        float(lows.view(-1)[lo_flat]), float(highs.view(-1)[hi_flat]),
        f"{head}; binding group (y={hi_y}, a={hi_a}) for beta_max "
        f"(alpha={float(alpha[hi_y, hi_a]):.6g}), (y={lo_y}, a={lo_a}) for beta_min")
