"""Splitting a collated ``B_b || B_lb`` batch into its two halves.

``TwoBatchSampler.batch_sampler()`` yields the biased batch's indices followed by the
less-biased batch's, both of the same size, so a DataLoader collates one batch whose first half
is B_b along dimension 0 of every tensor. Frameworks hand that batch over whole (a dict in HF
Trainer, a tuple in Lightning); this cuts every tensor in it in two.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch


@dataclasses.dataclass
class BatchPair:
    """The biased and the less-biased half of something (inputs, outputs, losses); unpacks as
    ``biased, less_biased = pair``."""
    biased: Any
    less_biased: Any

    def __iter__(self):
        yield self.biased
        yield self.less_biased


def split_two_batch(batch):
    """``BatchPair`` of the halves of every tensor in ``batch``: a tensor, or mappings, lists
    and tuples of them (mappings come back as dicts); other values go to both halves unchanged.
    A tensor whose first dimension is odd cannot be two equal batches: ValueError."""
    if torch.is_tensor(batch):
        if batch.dim() == 0 or batch.shape[0] % 2:
            raise ValueError(f"a B_b || B_lb batch has an even first dimension (two halves of "
                             f"equal size), got a tensor of shape {tuple(batch.shape)}: is the "
                             "DataLoader's batch_sampler TwoBatchSampler.batch_sampler()?")
        half = batch.shape[0] // 2
        return BatchPair(batch[:half], batch[half:])
    if isinstance(batch, Mapping):  # dict, HF's BatchEncoding: halves as plain dicts
        pairs = {key: split_two_batch(value) for key, value in batch.items()}
        return BatchPair({k: p.biased for k, p in pairs.items()},
                         {k: p.less_biased for k, p in pairs.items()})
    if isinstance(batch, (list, tuple)):
        pairs = [split_two_batch(value) for value in batch]
        halves = ([p.biased for p in pairs], [p.less_biased for p in pairs])
        if hasattr(batch, "_fields"):  # a namedtuple
            return BatchPair(*(type(batch)(*half) for half in halves))
        return BatchPair(*(type(batch)(half) for half in halves))
    return BatchPair(batch, batch)
