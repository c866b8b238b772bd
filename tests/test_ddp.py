"""GERNE under DistributedDataParallel: 2 CPU processes (gloo) must end with the parameters of one
process training on the union of their batches.

Stash mode: each backward all-reduces its own gradient; stash_biased() copies a .grad that is a
bucket view (gradient_as_bucket_view=True), whose storage the second backward overwrites, and
the stash must survive that backward. Lean mode: the biased backward runs under no_sync(), so
the step all-reduces once, the accumulated -beta g_b + (1 + beta) g_lb.
"""

import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

import gerne_kernels as gk
from gerne_testing import assert_params_close, loss_of, make_batches, make_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed"))
from dist_launch import WORLD, requires_gloo, shard, spawn  # noqa: E402

STEPS = 4
CONFIGS = [  # (optimizer, mode, gradient_as_bucket_view)
    ("gerne", "stash", False),
    ("gerne", "stash", True),
    ("gerne", "lean", False),
    ("gerne", "lean", True),
    ("wrapper", "stash", True),
]


def make_opt(name, params):
    if name == "gerne":
        return gk.GERNE(params, optimizer="sgd", lr=0.1, momentum=0.9, beta=1.5,
                        backend="reference")
    return gk.GERNEWrapper(torch.optim.AdamW(params, lr=1e-2), beta=1.5, backend="reference")


def ddp_run(rank, name, mode, bucket_view):
    model = make_model()
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    opt = make_opt(name, model.parameters())
    for x_b, x_lb in make_batches(STEPS, size=8):
        opt.zero_grad()
        if mode == "stash":
            loss_of(ddp, shard(x_b, rank)).backward()
            opt.stash_biased()
            stashed = [opt.state[p]["grad_b"].clone() for p in model.parameters()]
            loss_of(ddp, shard(x_lb, rank)).backward()
            for p, before in zip(model.parameters(), stashed):
                assert torch.equal(opt.state[p]["grad_b"], before), "the stash was overwritten"
        else:
            with ddp.no_sync():
                opt.backward_biased(loss_of(ddp, shard(x_b, rank)))
            opt.backward_less_biased(loss_of(ddp, shard(x_lb, rank)))
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def worker(rank, out_dir):
    return [ddp_run(rank, *config) for config in CONFIGS]


def single_process_run(name):
    model = make_model()
    opt = make_opt(name, model.parameters())
    for x_b, x_lb in make_batches(STEPS, size=8):
        opt.zero_grad()
        loss_of(model, x_b).backward()
        opt.stash_biased()
        loss_of(model, x_lb).backward()
        opt.step()
    return model


@requires_gloo
def test_two_processes_equal_one_process_on_the_union(tmp_path):
    ranks = spawn(worker, tmp_path)
    references = {name: single_process_run(name) for name in {c[0] for c in CONFIGS}}
    for i, (name, mode, bucket_view) in enumerate(CONFIGS):
        for rank in range(WORLD):
            model = make_model()
            with torch.no_grad():
                for p, value in zip(model.parameters(), ranks[rank][i]):
                    p.copy_(value)
            assert_params_close(model, references[name])
