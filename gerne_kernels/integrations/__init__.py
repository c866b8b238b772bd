"""GERNE in the stock training loops of Lightning, HF Trainer and accelerate.

Nothing here imports a framework: ``two_batch_optimizer`` finds the GERNE optimizer behind a
framework's wrapper (accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer) and
``split_two_batch`` splits a collated ``B_b || B_lb`` batch. ``gerne_kernels.integrations.hf``
(which imports transformers) holds ``GERNETrainer``. How each mode (stash, lean, one-backward)
meets each framework's clipping and accumulation: docs/integrations.md.
"""

from .split import BatchPair, split_two_batch
from .unwrap import two_batch_optimizer

__all__ = ["BatchPair", "split_two_batch", "two_batch_optimizer"]
