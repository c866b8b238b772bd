"""GERNE (Algorithm 1) and group resampling as strategies.

Each step draws the biased batch ``B_b`` and the less-biased batch ``B_lb`` (Eq. 4) and
steps along ``(1 + beta) * g_lb - beta * g_b`` with :class:`gerne_kernels.GERNE`:

    opt.zero_grad(); L_b.backward(); opt.stash_biased(); L_lb.backward(); opt.step()

beta is given in one of three ways (Eq. 8: in expectation only the strength
``s = c * (beta + 1)`` matters; ``s = 1`` weights every group equally, the GBA target,
``s > 1`` weights the minority groups beyond that, towards WGA):

* ``beta`` itself;
* ``strength`` s, i.e. ``beta = s / c - 1`` (default ``s = 1``);
* ``beta_frac`` f in [0, 1]: ``s = f * s_max`` where ``s_max = c * (beta_max + 1)`` is the
  strength at the upper bound of Eq. 9 for the training counts (known when the
  pseudo-groups are), i.e. ``beta = f * (beta_max + 1) - 1``.

beta must lie inside the bounds of Eq. 9 (checked, with the bounds' source in the error).
With ``beta = 0`` the biased batch has no weight and is neither drawn nor forwarded:
group resampling is ``c = 1, beta = 0``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..bounds import beta_bounds
from ..sampler import TwoBatchSampler
from .base import Batch, StepContext, Strategy, TrainSetup

__all__ = ["GERNEStrategy", "GroupResampling"]


class GERNEStrategy(Strategy):
    """GERNE on the training set's attribute labels, or on ``self.attributes`` when set
    (pseudo-attributes, see :class:`GERNEUnknown`)."""

    name = "gerne"

    def __init__(self, c: float = 0.5, beta: Optional[float] = None,
                 strength: Optional[float] = None, beta_frac: Optional[float] = None):
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < float(c) <= 1:
            raise ValueError(f"c must be in (0, 1], got {c!r}")
        given = [k for k, v in (("beta", beta), ("strength", strength), ("beta_frac", beta_frac))
                 if v is not None]
        if len(given) > 1:
            raise ValueError(f"give one of beta, strength, beta_frac; got {given}")
        if beta_frac is not None and not 0 <= float(beta_frac) <= 1:
            raise ValueError(f"beta_frac must be in [0, 1], got {beta_frac!r}")
        self.c = float(c)
        self.beta_frac = None if beta_frac is None else float(beta_frac)
        if beta is None and beta_frac is None:
            beta = (1.0 if strength is None else float(strength)) / self.c - 1.0
        self.beta = None if beta is None else float(beta)  # None until prepare (beta_frac)
        self.bounds = None
        self.attributes = None

    def hyperparameters(self):
        out = {"c": self.c}
        if self.beta is None:
            out["beta_frac"] = self.beta_frac
        else:
            out.update(beta=self.beta, s=self.c * (self.beta + 1.0))
        return out

    def train_attributes(self, setup: TrainSetup) -> torch.Tensor:
        return setup.train.attributes if self.attributes is None else self.attributes

    def resolve_beta(self, bounds) -> float:
        """beta for these Eq. 9 bounds (from ``beta_frac`` when given), checked inside them;
        ValueError naming the bounds and their source otherwise."""
        beta = self.beta
        if self.beta_frac is not None:
            if not math.isfinite(bounds.high):
                raise ValueError(f"beta_frac needs a finite beta_max ({bounds.source})")
            beta = self.beta_frac * (bounds.high + 1.0) - 1.0
        if not bounds.low <= beta <= bounds.high:
            raise ValueError(f"beta = {beta:.6g} is outside [{bounds.low:.6g}, "
                             f"{bounds.high:.6g}] ({bounds.source}); pass a beta inside them "
                             "or beta_frac in [0, 1]")
        return beta

    def prepare(self, setup: TrainSetup) -> None:
        self.bounds = beta_bounds(setup.train.labels, self.train_attributes(setup), self.c)
        self.beta = self.resolve_beta(self.bounds)

    def sampler(self, labels, attributes, batch_size, steps, generator):
        if self.attributes is not None:
            attributes = self.attributes
        s = TwoBatchSampler(labels, attributes, batch_size, self.c, generator=generator,
                            steps_per_epoch=steps)
        if self.beta == 0:
            return ((s.sample_lb(),) for _ in range(steps))
        return ((s.sample_b(), s.sample_lb()) for _ in range(steps))

    def optimizer(self, params, settings):
        import gerne_kernels

        if self.beta is None:
            raise RuntimeError("GERNEStrategy.prepare(setup) must run before optimizer()")
        extra = {"momentum": settings.momentum} if settings.name == "sgd" else {}
        return gerne_kernels.GERNE(params, optimizer=settings.name, lr=settings.lr,
                                   weight_decay=settings.weight_decay, beta=self.beta,
                                   beta_bounds=self.bounds, backend=settings.backend, **extra)

    def step(self, ctx: StepContext, batches: Sequence[Batch]) -> torch.Tensor:
        opt = ctx.optimizer
        opt.zero_grad(set_to_none=True)
        if len(batches) == 2:
            F.cross_entropy(ctx.logits(batches[0]), batches[0].y).backward()
            opt.stash_biased()
        lb = batches[-1]
        loss_lb = F.cross_entropy(ctx.logits(lb), lb.y)
        loss_lb.backward()
        opt.step()
        return loss_lb.detach()


class GroupResampling(GERNEStrategy):
    """Group-balanced batches and plain cross-entropy: GERNE with ``c = 1, beta = 0``."""

    name = "resampling"

    def __init__(self):
        super().__init__(c=1.0, beta=0.0)

    def hyperparameters(self):
        return {}
