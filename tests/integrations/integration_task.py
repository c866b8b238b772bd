"""The tiny task every framework test trains, and the oracle it is compared with.

A biased 3-class problem (a spurious attribute agrees with the class 85% of the time), a
two-layer MLP, a TwoBatchSampler with c = 1 (B_lb group-balanced, B_b not: the two gradients
differ, so beta matters). The oracle is a plain loop written by hand: per step it takes
``accumulation`` pairs (B_b, B_lb) from an identically seeded sampler, backwards each batch's
mean cross-entropy divided by ``accumulation`` separately (torch.autograd.grad), forms
g = (1 + beta) g_lb - beta g_b, clips g as clip_grad_norm_ does, puts it in .grad and steps a
torch.optim optimizer. No gerne_kernels optimizer is involved.
"""

import dataclasses
from typing import Callable, List

import torch
import torch.nn.functional as F

import gerne_kernels as gk
from gerne_kernels.integrations import split_two_batch

NUM_CLASSES, NUM_ATTRIBUTES, NUM_FEATURES = 3, 2, 6
SAMPLES, PER_CLASS = 90, 4          # each batch: 3 classes x 4 = 12 samples, a pair 24
BETA = 1.5
SAMPLER_SEED, MODEL_SEED = 1, 2
STEPS_PER_EPOCH = 100               # no epoch ends inside a test: one stream of pairs


@dataclasses.dataclass
class TinyTask:
    """Features x, labels y, attributes a (all CPU tensors of SAMPLES rows)."""
    x: torch.Tensor
    y: torch.Tensor
    a: torch.Tensor

    def sampler(self):
        """A fresh TwoBatchSampler; every call yields the same stream of pairs."""
        return gk.TwoBatchSampler(self.y, self.a, batch_size=PER_CLASS, c=1.0,
                                  generator=torch.Generator().manual_seed(SAMPLER_SEED),
                                  steps_per_epoch=STEPS_PER_EPOCH)

    def tensor_dataset(self):
        return torch.utils.data.TensorDataset(self.x, self.y)

    def loader(self):
        """DataLoader of (x, y) batches B_b || B_lb (split with .chunk(2))."""
        return torch.utils.data.DataLoader(self.tensor_dataset(),
                                           batch_sampler=self.sampler().batch_sampler())


def tiny_task():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(SAMPLES) % NUM_CLASSES
    aligned = torch.rand(SAMPLES, generator=g) < 0.85
    a = torch.where(aligned, y % NUM_ATTRIBUTES, (y + 1) % NUM_ATTRIBUTES)
    x = torch.randn(SAMPLES, NUM_FEATURES, generator=g)
    x[torch.arange(SAMPLES), y] += 1.0                  # the class signal (weak)
    x[:, NUM_CLASSES:NUM_CLASSES + NUM_ATTRIBUTES] += 2.0 * F.one_hot(a, NUM_ATTRIBUTES)
    return TinyTask(x, y, a)


def tiny_net():
    """The same initial two-layer MLP at every call."""
    torch.manual_seed(MODEL_SEED)
    return torch.nn.Sequential(torch.nn.Linear(NUM_FEATURES, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, NUM_CLASSES))


def cross_entropy(net, x, y):
    return F.cross_entropy(net(x), y)


@dataclasses.dataclass
class OptimizerCase:
    """One optimizer both ways: as GERNE (the thing under test) and as plain torch.optim (the
    oracle's), with the same hyperparameters."""
    name: str
    gerne: Callable       # (params, **two_batch_kwargs) -> GERNE / GERNEWrapper
    torch_optim: Callable  # params -> torch.optim optimizer


def _gerne_sgd(params, **kwargs):
    return gk.GERNE(params, optimizer="sgd", lr=0.1, momentum=0.9, beta=BETA,
                    backend="reference", **kwargs)


def _wrapper_adamw(params, **kwargs):
    return gk.GERNEWrapper(torch.optim.AdamW(params, lr=0.02, weight_decay=0.05), beta=BETA,
                           backend="reference", **kwargs)


OPTIMIZERS = [
    OptimizerCase("GERNE-sgd", _gerne_sgd,
                  lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)),
    OptimizerCase("GERNEWrapper-AdamW", _wrapper_adamw,
                  lambda params: torch.optim.AdamW(params, lr=0.02, weight_decay=0.05)),
]


@dataclasses.dataclass
class OracleRun:
    """What the hand loop ends with: the parameters, and the pre-clip norm of g per step."""
    params: List[torch.Tensor]
    norms: List[float]


def hand_loop(task, case, steps, accumulation=1, max_norm=None, autocast_dtype=None,
              scaled_losses=False, beta=BETA, divide=True):
    """The oracle (module docstring). ``divide=False`` (no division of the micro-batch losses
    by ``accumulation``) exists only to show the tests can tell the difference.

    ``scaled_losses``: the factors -beta and 1 + beta multiply the losses before their
    backwards (as in one backward of L_ext, or the lean mode) instead of the gradients after
    (as the stash mode does): g is the same, and under autocast its low-precision products
    then round as in the loop under test, so the comparison can stay tight.
    """
    net = tiny_net()
    params = list(net.parameters())
    optimizer = case.torch_optim(params)
    pairs = iter(task.sampler())
    factors = (-beta, 1 + beta) if scaled_losses else (1.0, 1.0)
    norms = []
    for _ in range(steps):
        g_b = [torch.zeros_like(p) for p in params]
        g_lb = [torch.zeros_like(p) for p in params]
        for _ in range(accumulation):
            for indices, total, factor in zip(next(pairs), (g_b, g_lb), factors):
                with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                                    enabled=autocast_dtype is not None):
                    loss = cross_entropy(net, task.x[indices], task.y[indices])
                if divide:
                    loss = loss / accumulation
                for t, grad in zip(total, torch.autograd.grad(loss * factor, params)):
                    t.add_(grad)
        if scaled_losses:
            g = [b + lb for b, lb in zip(g_b, g_lb)]
        else:
            g = [(1 + beta) * lb - beta * b for b, lb in zip(g_b, g_lb)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g]))
        norms.append(float(norm))
        if max_norm is not None:
            coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            g = [t * coefficient for t in g]
        for p, t in zip(params, g):
            p.grad = t
        optimizer.step()
    return OracleRun([p.detach().clone() for p in params], norms)


def initial_params():
    return [p.detach().clone() for p in tiny_net().parameters()]


def assert_trained_like(actual, oracle, rtol=1e-5, atol=1e-6):
    """actual (parameters) equals the oracle's, and training moved them far more than the
    tolerance (so that agreement is not the trivial one of two untrained models)."""
    actual = [p.detach().float() for p in actual]
    for got, want in zip(actual, oracle.params, strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    moved = max(float((want - start).abs().max())
                for want, start in zip(oracle.params, initial_params()))
    assert moved > 20 * atol, f"training moved the parameters by only {moved}"


def clip_is_mixed(oracle, max_norm):
    """True when clipping was active in some steps and not in others: then both clipping and
    the scale of g (accumulation's division) show in the result."""
    clipped = [n > max_norm for n in oracle.norms]
    return any(clipped) and not all(clipped)


def two_batch_losses(net, batch):
    """(loss_b, loss_lb) of a collated (x, y) batch B_b || B_lb, with two forwards."""
    x, y = batch
    (x_b, x_lb), (y_b, y_lb) = split_two_batch(x), split_two_batch(y)
    return cross_entropy(net, x_b, y_b), cross_entropy(net, x_lb, y_lb)
