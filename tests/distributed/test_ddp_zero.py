"""GERNE under DistributedDataParallel beyond tests/test_ddp.py (the stash and lean modes), and
ZeroRedundancyOptimizer, on 2 CPU processes with gloo.

DDP, gradient_as_bucket_view off and on, against one process taking the full-batch step with
torch.optim fed (1 + beta) g_lb - beta g_b:

* one-backward mode: one backward of opt.extrapolated_loss(loss_b, loss_lb), two forwards;
* accumulate_biased() over 2 interleaved micro-batch pairs (biased, less-biased, biased, ...),
  every backward all-reduced, or the first pair under no_sync(): one step equals the full-batch
  step;
* GERNEWrapper over ZeroRedundancyOptimizer(AdamW) (the wrapper sees every parameter; ZeRO
  shards only the base's state).

ZeroRedundancyOptimizer(optimizer_class=GERNE or GERNEWrapper, or a class that builds a
wrapper) raises sharding.refuse_zero_redundancy's error: ZeRO would hand GERNE a shard of the
parameters, leaving the other parameters' biased gradient in .grad.
"""

import contextlib

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import gerne_kernels as gk
from gerne_testing import assert_params_close, loss_of, make_batches, make_model, oracle_step
from dist_launch import BACKEND, requires_gloo, shard, spawn

pytestmark = requires_gloo

BETA = 1.5
STEPS = 3
MICRO = 2  # micro-batch pairs per step in the accumulation modes
CONFIGS = [  # (optimizer, mode, gradient_as_bucket_view)
    ("gerne", "one-backward", False),
    ("gerne", "one-backward", True),
    ("gerne", "accumulate", False),
    ("gerne", "accumulate", True),
    ("gerne", "accumulate-no-sync", False),
    ("gerne", "accumulate-no-sync", True),
    ("wrapper", "one-backward", True),
    ("wrapper", "accumulate", True),
    ("wrapper-zero", "stash", False),
    ("wrapper-zero", "accumulate", True),
]
ORACLES = {"gerne": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
           "wrapper": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
           "wrapper-zero": lambda ps: torch.optim.AdamW(ps, lr=1e-2)}


def make_opt(name, params):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if name == "gerne":
        return gk.GERNE(params, optimizer="sgd", lr=0.1, momentum=0.9, beta=BETA,
                        backend=BACKEND)
    if name == "wrapper":
        return gk.GERNEWrapper(torch.optim.AdamW(params, lr=1e-2), beta=BETA, backend=BACKEND)
    return gk.GERNEWrapper(ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW,
                                                   lr=1e-2), beta=BETA, backend=BACKEND)


def ddp_step(ddp, opt, mode, x_b, x_lb):
    opt.zero_grad()
    if mode == "stash":
        loss_of(ddp, x_b).backward()
        opt.stash_biased()
        loss_of(ddp, x_lb).backward()
    elif mode == "one-backward":
        opt.extrapolated_loss(loss_of(ddp, x_b), loss_of(ddp, x_lb)).backward()
    else:
        pairs = list(zip(x_b.chunk(MICRO), x_lb.chunk(MICRO)))
        for j, (mb_b, mb_lb) in enumerate(pairs):
            quiet = mode == "accumulate-no-sync" and j < len(pairs) - 1
            with ddp.no_sync() if quiet else contextlib.nullcontext():
                with opt.accumulate_biased():
                    (loss_of(ddp, mb_b) / MICRO).backward()
                (loss_of(ddp, mb_lb) / MICRO).backward()
    opt.step()


def ddp_run(rank, name, mode, bucket_view):
    model = make_model()
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    opt = make_opt(name, model.parameters())
    for x_b, x_lb in make_batches(STEPS, size=8):
        ddp_step(ddp, opt, mode, shard(x_b, rank), shard(x_lb, rank))
    return [p.detach().clone() for p in model.parameters()]


class WrapperOfAdamW(gk.GERNEWrapper):
    """A class ZeroRedundancyOptimizer can construct from parameters: it builds its base."""

    def __init__(self, params, lr=1e-3):
        super().__init__(torch.optim.AdamW(params, lr=lr), beta=BETA, backend=BACKEND)


def zero_errors():
    """What ZeroRedundancyOptimizer(optimizer_class=...) raises for GERNE's optimizers."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    attempts = {"GERNE": (gk.GERNE, dict(optimizer="sgd", lr=0.1, beta=BETA)),
                "GERNEWrapper": (gk.GERNEWrapper, dict(beta=BETA)),
                "subclass": (WrapperOfAdamW, dict(lr=1e-2))}
    errors = {}
    for name, (cls, kwargs) in attempts.items():
        try:
            ZeroRedundancyOptimizer(make_model().parameters(), optimizer_class=cls, **kwargs)
            errors[name] = None
        except TypeError as error:
            errors[name] = str(error)
    return errors


def worker(rank, out_dir):
    return {"runs": [ddp_run(rank, *config) for config in CONFIGS], "zero": zero_errors()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(worker, tmp_path_factory.mktemp("ddp"))


def full_batch_run(name):
    model = make_model()
    base = ORACLES[name](model.parameters())
    for x_b, x_lb in make_batches(STEPS, size=8):
        oracle_step(model, base, x_b, x_lb, BETA)
    return model


@pytest.mark.parametrize("index", range(len(CONFIGS)),
                         ids=["-".join(map(str, config)) for config in CONFIGS])
def test_ddp_equals_one_process_full_batch_step(ranks, index):
    name = CONFIGS[index][0]
    reference = full_batch_run(name)
    for result in ranks:
        model = make_model(seed=2)
        with torch.no_grad():
            for p, value in zip(model.parameters(), result["runs"][index]):
                p.copy_(value)
        assert_params_close(model, reference)


@pytest.mark.parametrize("name", ["GERNE", "GERNEWrapper", "subclass"])
def test_zero_redundancy_optimizer_is_refused(ranks, name):
    for result in ranks:
        message = result["zero"][name]
        assert message is not None, f"ZeroRedundancyOptimizer accepted {name}"
        assert "cannot run inside ZeroRedundancyOptimizer" in message, message
