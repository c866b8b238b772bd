"""JTT, Just Train Twice (Liu et al., ICML 2021), for unknown attributes.

1. Train an ERM model for ``first_stage_steps`` = T steps (short, constant learning
   rate) and take its error set on the training data,

       E = { i : argmax_k f_T(x_i)_k != y_i }.

2. Train a fresh model on batches in which every sample of E is drawn ``lambda_up``
   times as often as the others: here inside class-balanced batches (like every strategy
   of this package), so a sample i of class y is drawn with probability

       p(i | y) = u_i / sum_{j in X_y} u_j,   u_i = lambda_up if i in E else 1,

   i.e. E repeated ``lambda_up`` times, then ERM. T and ``lambda_up`` are tuned.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..sampler import WeightedClassSampler
from .base import Batch, StepContext, Strategy, TrainSetup, sgd_update

__all__ = ["JTT", "error_set", "upweights"]


def error_set(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask (N,) of the samples the model misclassifies: ``argmax logits != y``."""
    return logits.argmax(dim=1).cpu() != torch.as_tensor(labels).cpu()


def upweights(errors: torch.Tensor, lambda_up: float) -> torch.Tensor:
    """Per-sample draw weights ``u_i``: ``lambda_up`` on the error set, 1 elsewhere."""
    return torch.where(errors, float(lambda_up), 1.0).to(torch.float64)


class JTT(Strategy):
    """ERM on class-balanced batches with the first stage's error set upweighted."""

    name = "jtt"

    def __init__(self, lambda_up: float, first_stage_steps: int,
                 errors: Optional[torch.Tensor] = None):
        if not float(lambda_up) >= 1:
            raise ValueError(f"lambda_up must be >= 1, got {lambda_up!r}")
        if int(first_stage_steps) < 1:
            raise ValueError(f"first_stage_steps must be >= 1, got {first_stage_steps!r}")
        self.lambda_up = float(lambda_up)
        self.first_stage_steps = int(first_stage_steps)
        self.errors = errors  # given: the first stage was run elsewhere (shared by a grid)

    def hyperparameters(self):
        return {"T": self.first_stage_steps, "lambda_up": self.lambda_up}

    def prepare(self, setup: TrainSetup) -> None:
        if self.errors is None:
            self.errors = first_stage_error_sets(setup, [self.first_stage_steps])[
                self.first_stage_steps]

    def state_dict(self):
        return {"errors": self.errors}

    def sampler(self, labels, attributes, batch_size, steps, generator):
        if self.errors is None:
            raise RuntimeError("JTT.prepare(setup) must run before sampler()")
        s = WeightedClassSampler(labels, upweights(self.errors, self.lambda_up), batch_size,
                                 generator=generator, steps_per_epoch=steps)
        return ((idx,) for idx in s)

    def step(self, ctx: StepContext, batches: Sequence[Batch]) -> torch.Tensor:
        (batch,) = batches
        return sgd_update(ctx, ctx.per_sample_loss(batch).mean())


def first_stage_error_sets(setup: TrainSetup, steps_list: Sequence[int]) -> dict:
    """JTT's first stage for several T at once: one ERM run with a constant learning rate
    (so its state after T steps is the state of a run of length T), the error set on the
    training data recorded at each T. Returns ``{T: bool mask (N,)}``."""
    from .erm import ERM
    from .loop import LoopSettings, train

    wanted = sorted({int(t) for t in steps_list})
    out = {}

    def record(step, model):
        if step in wanted:
            out[step] = error_set(setup.train.logits(model, setup.device), setup.train.labels)

    train(setup.model_factory(), ERM(), setup,
          LoopSettings(steps=wanted[-1], schedule="constant", select="last",
                       seed=setup.seed + 20_000),
          on_step=record)
    return out
