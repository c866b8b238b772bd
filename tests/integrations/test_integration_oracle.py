"""The framework tests can fail: every feature they check changes the oracle's result by far
more than their tolerance (rtol 1e-5, atol 1e-6 on parameters of order 1).

If a framework ignored beta, did not divide the accumulated losses, did not clip, or did not
autocast, its parameters would land at least this far from the oracle's.
"""

import dataclasses

import pytest
import torch

import integration_task as task_
from integration_task import OPTIMIZERS, hand_loop

STEPS, MAX_NORM = 4, 1.4
BASELINE = dict(accumulation=2, max_norm=MAX_NORM)
FAR_BEYOND_TOLERANCE = 1e-4


@dataclasses.dataclass
class Variant:
    """What a broken loop would do instead, as oracle arguments."""
    name: str
    changes: dict


VARIANTS = [
    Variant("beta ignored", dict(beta=0.0)),
    Variant("losses not divided by the accumulation steps", dict(divide=False)),
    Variant("no clipping", dict(max_norm=None)),
    Variant("no accumulation", dict(accumulation=1)),
    Variant("bf16 autocast", dict(autocast_dtype=torch.bfloat16, scaled_losses=True)),
    Variant("fp16 autocast", dict(autocast_dtype=torch.float16)),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("case", OPTIMIZERS, ids=lambda c: c.name)
def test_each_checked_feature_moves_the_result(case, variant):
    task = task_.tiny_task()
    baseline = hand_loop(task, case, STEPS, **BASELINE)
    other = hand_loop(task, case, STEPS, **{**BASELINE, **variant.changes})
    distance = max(float((a - b).abs().max()) for a, b in zip(baseline.params, other.params))
    assert distance > FAR_BEYOND_TOLERANCE, f"{variant.name}: only {distance:.2g} away"


def test_the_oracle_is_torch_optim_on_equal_batches():
    """With B_b = B_lb the extrapolated gradient is the plain one for every beta, so the oracle
    is exactly torch.optim on one batch: its g formula has no sign or factor error."""
    task = task_.tiny_task()
    case = OPTIMIZERS[0]
    net = task_.tiny_net()
    optimizer = case.torch_optim(net.parameters())
    for indices_b, _ in task.sampler():
        optimizer.zero_grad()
        task_.cross_entropy(net, task.x[indices_b], task.y[indices_b]).backward()
        optimizer.step()
        break
    equal_batches = task_.TinyTask(task.x, task.y, task.a)
    equal_batches.sampler = lambda: _same_batch_twice(task.sampler())
    oracle = hand_loop(equal_batches, case, steps=1)
    for got, want in zip(net.parameters(), oracle.params):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7)


def _same_batch_twice(sampler):
    for indices_b, _ in sampler:
        yield indices_b, indices_b
