"""GroupDRO (Sagawa et al., ICLR 2020): exponentiated-gradient weights on the group losses.

G groups (y, a); ``q`` is a distribution over them, uniform over the groups that have
training samples at the start (0 for empty groups). Each step, with ``L_g`` the mean
cross-entropy of the batch's samples in group g (0 for a group absent from the batch):

    q_g <- q_g * exp(eta * L_g),   q <- q / sum_h q_h        (no gradient through q)
    L   = sum_g q_g * L_g                                    (the group-robust loss)

``eta`` is the group step size. Batches are drawn group-balanced within each class
(the two-batch sampler's ``B_lb`` with c = 1): Sagawa et al.'s Algorithm 1 samples a
group uniformly, then a sample of it, and with a fraction of a percent of
bias-conflicting samples class-balanced batches would rarely contain the groups whose
weight GroupDRO raises. Their recipe pairs it with strong weight decay (a setting of
the shared optimizer).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..sampler import TwoBatchSampler, group_counts
from .base import Batch, StepContext, Strategy, TrainSetup, sgd_update

__all__ = ["GroupDRO", "group_losses"]


def group_losses(losses: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of ``losses`` over the samples of each group id in ``group``; 0 where absent."""
    sums = torch.zeros(num_groups, dtype=losses.dtype, device=losses.device).index_add(
        0, group, losses)
    counts = torch.bincount(group, minlength=num_groups).to(losses.dtype)
    return sums / counts.clamp_min(1)


class GroupDRO(Strategy):
    """Group-robust loss ``sum_g q_g L_g`` with ``q`` updated by exponentiated gradient."""

    name = "groupdro"

    def __init__(self, eta: float = 0.01):
        if not float(eta) > 0:
            raise ValueError(f"eta (GroupDRO's group step size) must be > 0, got {eta!r}")
        self.eta = float(eta)
        self.q = None
        self.num_attributes = None

    def hyperparameters(self):
        return {"eta": self.eta}

    def prepare(self, setup: TrainSetup) -> None:
        counts = group_counts(setup.train.labels, setup.train.attributes)
        self.num_attributes = counts.shape[1]
        if self.q is None:
            present = (counts.view(-1) > 0).to(torch.float32)
            self.q = present / present.sum()
        self.q = self.q.to(setup.device)

    def state_dict(self):
        return {"q": self.q}

    def sampler(self, labels, attributes, batch_size, steps, generator):
        s = TwoBatchSampler(labels, attributes, batch_size, 1.0, generator=generator,
                            steps_per_epoch=steps)
        return ((s.sample_lb(),) for _ in range(steps))

    def step(self, ctx: StepContext, batches: Sequence[Batch]) -> torch.Tensor:
        (batch,) = batches
        if self.q is None:
            raise RuntimeError("GroupDRO.prepare(setup) must run before step()")
        group = batch.y * self.num_attributes + batch.a
        per_group = group_losses(ctx.per_sample_loss(batch), group, self.q.numel())
        with torch.no_grad():
            q = self.q * torch.exp(self.eta * per_group.detach())
            self.q = q / q.sum()
        return sgd_update(ctx, (self.q * per_group).sum())
