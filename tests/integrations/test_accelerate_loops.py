"""GERNE in a plain accelerate loop, against the hand-written loop (integration_task.hand_loop).

One-backward mode: ``accelerator.backward(opt.extrapolated_loss(loss_b, loss_lb))`` inside
``accelerator.accumulate(model)``, with ``accelerator.clip_grad_norm_`` clipping g. Stash
mode: reached through the AcceleratedOptimizer as ``accelerated.optimizer.stash_biased()``
(and ``accumulate_biased()`` for accumulation), g clipped by the optimizer's max_grad_norm.
"""

import pytest
import torch

pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402

import integration_task as task_  # noqa: E402
from gerne_kernels.integrations import two_batch_optimizer  # noqa: E402
from integration_task import OPTIMIZERS, assert_trained_like, hand_loop  # noqa: E402

STEPS = 4
MAX_NORM = 1.4


def train(case, mode, accumulation, mixed_precision="no", accelerator_clips=False,
          **two_batch_kwargs):
    """STEPS optimizer steps of the tiny task in an accelerate loop; returns the network."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation,
                              mixed_precision=mixed_precision)
    net = task_.tiny_net()
    opt = case.gerne(net.parameters(), **two_batch_kwargs)
    net, accelerated, loader = accelerator.prepare(net, opt, task_.tiny_task().loader())
    assert accelerated.optimizer is opt and two_batch_optimizer(accelerated) is opt
    steps = 0
    for batch in loader:
        with accelerator.accumulate(net):
            loss_b, loss_lb = task_.two_batch_losses(net, batch)
            if mode == "one-backward":
                accelerator.backward(accelerated.optimizer.extrapolated_loss(loss_b, loss_lb))
            elif mode == "stash":
                accelerator.backward(loss_b)
                accelerated.optimizer.stash_biased()
                accelerator.backward(loss_lb)
            else:  # "accumulate": interleaved pairs
                with accelerated.optimizer.accumulate_biased():
                    accelerator.backward(loss_b)
                accelerator.backward(loss_lb)
            if accelerator_clips and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(net.parameters(), MAX_NORM)
            accelerated.step()          # only at the end of an accumulation window
            accelerated.zero_grad()
        steps += accelerator.sync_gradients
        if steps == STEPS:
            return net
    raise AssertionError("the loader ran out of pairs")


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
@pytest.mark.parametrize("case", OPTIMIZERS, ids=lambda c: c.name)
def test_one_backward_with_accelerate_clipping_and_accumulation(case, mixed_precision):
    net = train(case, "one-backward", accumulation=2, mixed_precision=mixed_precision,
                accelerator_clips=True)
    bf16 = mixed_precision == "bf16"
    oracle = hand_loop(task_.tiny_task(), case, STEPS, accumulation=2, max_norm=MAX_NORM,
                       autocast_dtype=torch.bfloat16 if bf16 else None, scaled_losses=bf16)
    assert task_.clip_is_mixed(oracle, MAX_NORM)
    assert_trained_like(net.parameters(), oracle)


@pytest.mark.parametrize("case", OPTIMIZERS, ids=lambda c: c.name)
def test_stash_mode_through_the_accelerated_optimizer(case):
    net = train(case, "stash", accumulation=1)
    assert_trained_like(net.parameters(), hand_loop(task_.tiny_task(), case, STEPS))


@pytest.mark.parametrize("case", OPTIMIZERS, ids=lambda c: c.name)
def test_accumulate_biased_under_accelerate_accumulate(case):
    net = train(case, "accumulate", accumulation=2, max_grad_norm=MAX_NORM)
    oracle = hand_loop(task_.tiny_task(), case, STEPS, accumulation=2, max_norm=MAX_NORM)
    assert task_.clip_is_mixed(oracle, MAX_NORM)
    assert_trained_like(net.parameters(), oracle)
