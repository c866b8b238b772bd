"""Group reweighting: every group counts equally in expectation, by importance weights.

Batches are ERM's (class-balanced, ``p_b(a | y) = alpha_ya``). A sample of group (y, a)
gets the weight that turns that distribution into the group-balanced one over the
``A_y`` groups present in class y:

    w_ya = (1 / A_y) / alpha_ya = |X_y| / (A_y * |X_ya|)

(proportional to ``1 / |X_ya|`` when classes have equal sizes and equal ``A_y``), and the
batch loss is normalized per batch:

    L = sum_i w_i * CE_i / sum_i w_i.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..sampler import attributes_per_class, group_counts, group_proportions
from .base import Batch, StepContext, Strategy, TrainSetup, sgd_update

__all__ = ["GroupReweighting", "group_weights"]


def group_weights(labels, attributes, num_classes=None, num_attributes=None) -> torch.Tensor:
    """The (K x A) table ``w_ya = 1 / (A_y * alpha_ya)``, 0 for empty groups (float64)."""
    counts = group_counts(labels, attributes, num_classes, num_attributes)
    alpha = group_proportions(counts)
    a_y = attributes_per_class(counts).to(torch.float64).view(-1, 1)
    return torch.where(alpha > 0, 1.0 / (a_y * alpha.clamp_min(1e-300)), torch.zeros_like(alpha))


class GroupReweighting(Strategy):
    """Class-balanced batches, loss of each sample weighted by ``1 / (A_y alpha_ya)``."""

    name = "reweighting"

    def __init__(self):
        self.weights = None

    def prepare(self, setup: TrainSetup) -> None:
        self.weights = group_weights(setup.train.labels, setup.train.attributes).to(setup.device)

    def step(self, ctx: StepContext, batches: Sequence[Batch]) -> torch.Tensor:
        (batch,) = batches
        if self.weights is None:
            raise RuntimeError("GroupReweighting.prepare(setup) must run before step()")
        losses = ctx.per_sample_loss(batch)
        w = self.weights[batch.y, batch.a].to(losses.dtype)
        loss = (w * losses).sum() / w.sum()
        return sgd_update(ctx, loss)
