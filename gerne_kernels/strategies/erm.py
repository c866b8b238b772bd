"""ERM: class-balanced batches (the biased batch ``B_b`` alone), mean cross-entropy.

    L = (1 / |B|) * sum_{i in B} CE(f(x_i), y_i),   B ~ p_b(a | y) = alpha_ya
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import Batch, StepContext, Strategy, sgd_update

__all__ = ["ERM"]


class ERM(Strategy):
    """Empirical risk minimization on class-balanced batches."""

    name = "erm"

    def step(self, ctx: StepContext, batches: Sequence[Batch]) -> torch.Tensor:
        (batch,) = batches
        return sgd_update(ctx, ctx.per_sample_loss(batch).mean())
