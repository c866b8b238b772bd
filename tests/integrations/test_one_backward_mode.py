"""The one-backward mode's contract with the stock loops, without a framework.

Per-group betas are refused with an error naming the fix; the mode is marked when the loss's
backward runs, so the order of Lightning's automatic optimization (training_step builds the
loss, then zero_grad(), then backward) steps along g, and a loss that is built but never
backwarded (logged, say) leaves the next step free to use the stash mode.
"""

import pytest
import torch

import integration_task as task_
from integration_task import OPTIMIZERS


def per_group_betas(case):
    net = task_.tiny_net()
    first, second = net[0], net[2]
    opt = case.gerne(first.parameters())
    opt.add_param_group({"params": list(second.parameters()), "beta": 0.5})
    return net, opt


@pytest.mark.parametrize("case", OPTIMIZERS, ids=lambda c: c.name)
def test_per_group_betas_are_refused_with_the_fix_named(case):
    net, opt = per_group_betas(case)
    task = task_.tiny_task()
    loss_b, loss_lb = task_.two_batch_losses(net, next(iter(task.loader())))
    with pytest.raises(ValueError, match=r"betas \[0\.5, 1\.5\].*stash mode \(stash_biased\(\)\)"):
        opt.extrapolated_loss(loss_b, loss_lb)


def one_step(order):
    """Parameters after one SGD step of the tiny task, the loss built and backwarded in
    ``order``; and the same step by torch.optim on the hand-formed g."""
    task = task_.tiny_task()
    batch = next(iter(task.loader()))
    case = OPTIMIZERS[0]
    net = task_.tiny_net()
    opt = case.gerne(net.parameters())
    loss = opt.extrapolated_loss(*task_.two_batch_losses(net, batch))
    if order == "zero_grad between building and backward":
        opt.zero_grad()
    loss.backward()
    opt.step()
    return net, task_.hand_loop(task, case, steps=1)


@pytest.mark.parametrize("order", ["zero_grad between building and backward", "plain"])
def test_the_mode_is_marked_by_the_backward(order):
    net, oracle = one_step(order)
    task_.assert_trained_like(net.parameters(), oracle, atol=1e-7)


def test_a_loss_never_backwarded_marks_nothing():
    task = task_.tiny_task()
    batch = next(iter(task.loader()))
    net = task_.tiny_net()
    opt = OPTIMIZERS[0].gerne(net.parameters())
    with torch.no_grad():
        logged = opt.extrapolated_loss(*task_.two_batch_losses(net, batch))
    assert torch.isfinite(logged)
    loss_b, loss_lb = task_.two_batch_losses(net, batch)
    loss_b.backward()
    opt.stash_biased()            # not refused: no one-backward step is under way
    loss_lb.backward()
    opt.step()
    opt.zero_grad()
    opt.extrapolated_loss(*task_.two_batch_losses(net, batch))  # built, dropped
    task_.two_batch_losses(net, batch)[1].backward()
    with pytest.raises(RuntimeError, match="needs the biased batch's gradient"):
        opt.step()
