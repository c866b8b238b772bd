"""GERNE with unknown attributes (Section 4.2, Algorithm 2) as a strategy.

1. A biased model: ERM on class-balanced batches with a tenth of the learning rate and
   twice the weight decay, the checkpoint with the best validation CBA (which needs no
   attribute labels) kept (:func:`biased_model_logits`), on ``setup.biased_val`` when
   given: a validation split drawn like the training set, where the checkpoint with the
   best CBA is the one that fits the shortcut best (on an unbiased split CBA would favour
   the least biased checkpoint, the opposite of what step 2 needs).
2. Pseudo-attributes: per class, the ``floor(t * |X_y|)`` samples the biased model is
   least confident about get pseudo-attribute 1, the others 0
   (:func:`gerne_kernels.pseudo_attributes`).
3. GERNE (Algorithm 1) on these two pseudo-groups, beta inside their Eq. 9 bounds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..pseudo_groups import pseudo_attributes
from .base import TrainSetup
from .gerne import GERNEStrategy

__all__ = ["GERNEUnknown", "BiasedLogits", "biased_model_logits"]


@dataclass
class BiasedLogits:
    """The biased model's logits on the training set, and where its checkpoint was kept."""

    logits: torch.Tensor
    best_step: int
    best_cba: float


def biased_model_logits(setup: TrainSetup, steps: int, lr_factor: float = 0.1,
                        weight_decay_factor: float = 2.0, evaluations: int = 10,
                        seed: Optional[int] = None) -> BiasedLogits:
    """Step 1 of Algorithm 2 in the shared loop; the logits of the kept model on the
    training set (step 2's input). Its model is ``setup.model_factory()``."""
    from dataclasses import replace

    from .erm import ERM
    from .loop import LoopSettings, train

    biased_setup = replace(setup, optimizer=setup.optimizer.scaled(lr_factor, weight_decay_factor),
                           val=setup.val if setup.biased_val is None else setup.biased_val)
    result = train(setup.model_factory(), ERM(), biased_setup,
                   LoopSettings(steps=steps, eval_every=max(1, steps // evaluations),
                                select="cba", schedule="constant",
                                seed=(setup.seed if seed is None else seed) + 10_000))
    return BiasedLogits(setup.train.logits(result.model, setup.device, setup.amp_dtype),
                        result.best_step, result.best_value)


class GERNEUnknown(GERNEStrategy):
    """Algorithm 2: pseudo-groups by ``t`` from a biased model, then GERNE (A = 2).

    ``biased_steps`` trains the biased model in ``prepare``; pass ``biased`` (a
    :class:`BiasedLogits`) to reuse one biased model for several t (a grid).
    """

    name = "gerne_unknown"

    def __init__(self, t: float, c: float = 0.5, beta: Optional[float] = None,
                 strength: Optional[float] = None, beta_frac: Optional[float] = None,
                 biased_steps: int = 300, biased: Optional[BiasedLogits] = None):
        super().__init__(c, beta, strength, beta_frac)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < float(t) <= 0.5:
            raise ValueError(f"t must be in (0, 1/2], got {t!r}")
        self.t = float(t)
        self.biased_steps = int(biased_steps)
        self.biased = biased
        self.biased_info = {}

    def hyperparameters(self):
        return {"t": self.t, **super().hyperparameters()}

    def pseudo_group_counts(self, labels) -> torch.Tensor:
        """The (K x 2) sizes of the pseudo-groups, known before the biased model is:
        ``|X_y| - floor(t |X_y|)`` and ``floor(t |X_y|)`` (so beta can be checked early)."""
        sizes = torch.bincount(torch.as_tensor(labels).long())
        hard = torch.floor(self.t * sizes.double()).long()
        return torch.stack([sizes - hard, hard], dim=1)

    def state_dict(self):
        return {"attributes": self.attributes, "biased_info": self.biased_info}

    def prepare(self, setup: TrainSetup) -> None:
        if self.attributes is None:
            biased = self.biased or biased_model_logits(setup, self.biased_steps)
            self.attributes = pseudo_attributes(biased.logits, setup.train.labels, self.t,
                                                scores_are="logits")
            self.biased_info = {"best_step": biased.best_step, "best_val_cba": biased.best_cba}
        super().prepare(setup)
