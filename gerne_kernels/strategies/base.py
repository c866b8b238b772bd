"""What every training strategy shares: the batch, the step context, the optimizer settings.

A strategy is one debiasing method (ERM, group reweighting, GroupDRO, JTT, GERNE, ...)
expressed over the same model and the same loop (:func:`gerne_kernels.strategies.train`):

* ``prepare(setup)`` runs once before training (JTT's first stage, GERNE's biased model
  for unknown attributes); most strategies do nothing;
* ``sampler(labels, attributes, batch_size, steps, generator)`` yields, per step, a tuple
  of index tensors (one batch, or GERNE's two);
* ``optimizer(params, settings)`` builds the optimizer (``torch.optim`` or ``gk.GERNE``);
* ``step(ctx, batches)`` does one update from the fetched batches and returns the loss
  (a detached 0-d tensor: reading it is the loop's choice, since it syncs a GPU).

Every strategy draws class-balanced batches (``batch_size`` samples per class); what
differs is how samples are drawn inside a class and how their losses are combined.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["Batch", "OptimizerSettings", "StepContext", "Strategy", "TrainSetup",
           "torch_optimizer", "sgd_update"]


@dataclass
class Batch:
    """One batch on the training device: inputs ``x`` (a tensor, or a dict of tensors for
    text models), class labels ``y`` and attribute labels ``a`` (int64)."""

    x: Any
    y: torch.Tensor
    a: torch.Tensor

    def to(self, device) -> "Batch":
        x = ({k: v.to(device, non_blocking=True) for k, v in self.x.items()}
             if isinstance(self.x, dict) else self.x.to(device, non_blocking=True))
        return Batch(x, self.y.to(device, non_blocking=True), self.a.to(device, non_blocking=True))


@dataclass
class OptimizerSettings:
    """The optimizer every method of a comparison shares (SGD with momentum or AdamW)."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.01
    backend: str = "auto"  # GERNE's kernel backend

    def __post_init__(self):
        if self.name not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.name!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")

    def scaled(self, lr_factor: float = 1.0, weight_decay_factor: float = 1.0):
        """A copy with lr and weight decay multiplied (the biased model of Algorithm 2)."""
        return OptimizerSettings(self.name, self.lr * lr_factor, self.momentum,
                                 self.weight_decay * weight_decay_factor, self.backend)


def torch_optimizer(params, settings: OptimizerSettings) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` (with momentum) or ``torch.optim.AdamW`` from the settings."""
    if settings.name == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


@dataclass
class StepContext:
    """What a strategy's ``step`` works with: the model, its optimizer, and the forward
    pass (under autocast when the loop trains in bfloat16)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    amp_dtype: Optional[torch.dtype] = None

    def logits(self, batch: Batch) -> torch.Tensor:
        """The model's logits on ``batch.x``; half-precision outputs of autocast as float32."""
        device_type = batch.y.device.type
        with torch.autocast(device_type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            out = self.model(batch.x)
        return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out

    def per_sample_loss(self, batch: Batch) -> torch.Tensor:
        """Cross-entropy of every sample of the batch (N,)."""
        return F.cross_entropy(self.logits(batch), batch.y, reduction="none")


@dataclass
class TrainSetup:
    """What ``Strategy.prepare`` may use to train auxiliary models with the same loop."""

    model_factory: Callable[[], torch.nn.Module]
    train: Any               # a data source (gerne_kernels.strategies.data)
    val: Any
    optimizer: OptimizerSettings
    batch_size: int
    device: torch.device
    seed: int = 0
    amp_dtype: Optional[torch.dtype] = None
    progress: Callable[[int], None] = field(default=lambda n: None)
    # where the biased model of Algorithm 2 is selected by CBA (no attribute labels needed);
    # None: ``val``. A split drawn like the training set keeps the most biased checkpoint.
    biased_val: Any = None


class Strategy:
    """Base class: ERM's choices (class-balanced batches, torch optimizer, no preparation).

    Subclasses override what differs; ``hyperparameters()`` names the knobs for reports.
    """

    name = "strategy"

    def hyperparameters(self) -> Dict[str, Any]:
        return {}

    def prepare(self, setup: TrainSetup) -> None:
        """Runs once before training; the default does nothing. State restored by
        ``load_state_dict`` (a resumed run) is kept, not recomputed."""

    def state_dict(self) -> Dict[str, Any]:
        """Tensors the strategy learned (GroupDRO's q, JTT's error set, pseudo-groups)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def sampler(self, labels: torch.Tensor, attributes: torch.Tensor, batch_size: int,
                steps: int, generator: torch.Generator) -> Iterable[Tuple[torch.Tensor, ...]]:
        from ..sampler import ClassBalancedSampler

        s = ClassBalancedSampler(labels, batch_size, generator=generator, steps_per_epoch=steps)
        return ((idx,) for idx in s)

    def optimizer(self, params, settings: OptimizerSettings) -> torch.optim.Optimizer:
        return torch_optimizer(params, settings)

    def step(self, ctx: StepContext, batches: Sequence[Batch]) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        """``name (k=v, ...)`` for tables and logs."""
        hp = self.hyperparameters()
        if not hp:
            return self.name
        return f"{self.name} (" + ", ".join(f"{k}={_short(v)}" for k, v in hp.items()) + ")"


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def sgd_update(ctx: StepContext, loss: torch.Tensor) -> torch.Tensor:
    """zero_grad, backward of ``loss``, one optimizer step; returns the detached loss."""
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ctx.optimizer.step()
    return loss.detach()
