"""GERNEWrapper around torch.optim and third-party optimizers, against a plain optimizer fed
(1 + beta) g_lb - beta g_b by hand."""

import pytest
import torch

import gerne_kernels as gk
from gerne_testing import (assert_params_close, assert_same, loss_of, make_batches, make_model,
                           oracle_step, snapshot, stash_step)


class Lion(torch.optim.Optimizer):
    """A stand-in for an optimizer from another package (the Lion update of lion-pytorch)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.mul(beta1).add(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)


BASES = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
    "lion": lambda ps: Lion(ps, lr=1e-3, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(BASES))
@pytest.mark.parametrize("beta", [-1.0, 0.5, 2.0])
def test_base_steps_along_the_extrapolated_gradient(backend, name, beta):
    model, ref = make_model(), make_model()
    opt = gk.GERNEWrapper(BASES[name](model.parameters()), beta=beta, backend=backend)
    ref_opt = BASES[name](ref.parameters())
    for x_b, x_lb in make_batches(6):
        stash_step(model, opt, x_b, x_lb)
        oracle_step(ref, ref_opt, x_b, x_lb, beta)
    assert_params_close(model, ref)
    assert opt.skipped_steps == 0 and not opt.has_stash()


def test_parameter_reached_by_one_batch_only(backend):
    """A missing gradient counts as zero; the wrapper gives the base a .grad to step on."""
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt = gk.GERNEWrapper(torch.optim.SGD([a, b], lr=0.5), beta=2.0, backend=backend)
    opt.zero_grad()
    (a * 3).sum().backward()
    opt.stash_biased()
    (b * 5).sum().backward()
    opt.step()
    torch.testing.assert_close(a.detach(), a0 - 0.5 * (-2.0 * 3))
    torch.testing.assert_close(b.detach(), b0 - 0.5 * (3.0 * 5))


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_shares_param_groups_with_the_base(backend):
    model = make_model()
    base = torch.optim.SGD(model[0].parameters(), lr=1.0)
    opt = gk.GERNEWrapper(base, beta=1.0, backend=backend)
    assert opt.param_groups is base.param_groups
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5).step()
    assert base.param_groups[0]["lr"] == 0.5
    base.add_param_group({"params": [model[2].weight]})          # through the base...
    opt.add_param_group({"params": [model[2].bias], "beta": 3.0})  # ...or the wrapper
    assert len(base.param_groups) == 3
    x_b, x_lb = torch.randn(4, 7), torch.randn(4, 7)
    bias0 = model[2].bias.detach().clone()
    (g_b,) = torch.autograd.grad(loss_of(model, x_b), model[2].bias)
    (g_lb,) = torch.autograd.grad(loss_of(model, x_lb), model[2].bias)
    stash_step(model, opt, x_b, x_lb)
    assert base.param_groups[1]["beta"] == 1.0  # the wrapper's default filled in
    expected = bias0 - 1.0 * (4.0 * g_lb - 3.0 * g_b)
    torch.testing.assert_close(model[2].bias.detach(), expected)


@pytest.mark.parametrize("which", ["b", "lb"])
def test_nonfinite_gradient_skips_the_base_step(backend, which):
    model = make_model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = gk.GERNEWrapper(base, beta=1.0, backend=backend, skip_nonfinite=True)
    (x_b, x_lb), = make_batches(1)
    stash_step(model, opt, x_b, x_lb)
    before = snapshot(model, base.state_dict()["state"])
    opt.zero_grad()
    loss_of(model, x_b).backward()
    if which == "b":
        model[0].weight.grad[1, 1] = float("nan")
    opt.stash_biased()
    loss_of(model, x_lb).backward()
    if which == "lb":
        model[2].bias.grad[0] = float("inf")
    opt.step()
    assert_same(before, snapshot(model, base.state_dict()["state"]))
    assert opt.skipped_steps == 1 and not opt.has_stash()
    stash_step(model, opt, x_b, x_lb)
    assert opt.skipped_steps == 1
    assert not torch.equal(before[0][0], model[0].weight.detach())


def test_wrapping_errors():
    params = list(make_model().parameters())
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        gk.GERNEWrapper(params, beta=1.0)
    with pytest.raises(TypeError, match="already a GERNE"):
        gk.GERNEWrapper(gk.GERNE(params), beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        gk.GERNEWrapper(torch.optim.SGD(params, lr=0.1), beta=-2.0)
    opt = gk.GERNEWrapper(torch.optim.SGD(params, lr=0.1), beta=1.0)
    sum(p.sum() for p in params).backward()
    with pytest.raises(RuntimeError, match="stash_biased"):
        opt.step()
