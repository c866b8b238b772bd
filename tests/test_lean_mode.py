"""The memory-lean mode: backward_biased(loss_b) and backward_less_biased(loss_lb) accumulate
-beta g_b + (1 + beta) g_lb in .grad; it must follow the stash mode's trajectory within float
rounding, skip inf/NaN steps, work with GradScaler, and refuse what it cannot do."""

import pytest
import torch

import gerne_kernels as gk
from gerne_testing import (assert_params_close, assert_same, lean_step, loss_of, make_batches,
                           make_model, snapshot, stash_step)

OPTIMIZERS = {
    "sgd": lambda ps, backend, beta=1.5: gk.GERNE(ps, optimizer="sgd", lr=0.1, momentum=0.9,
                                                  beta=beta, backend=backend),
    "adamw": lambda ps, backend, beta=1.5: gk.GERNE(ps, optimizer="adamw", lr=1e-2, beta=beta,
                                                    backend=backend),
    "wrapper": lambda ps, backend, beta=1.5: gk.GERNEWrapper(torch.optim.AdamW(ps, lr=1e-2),
                                                             beta=beta, backend=backend),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_lean_mode_follows_the_stash_mode(backend, name):
    stash_model, lean_model = make_model(), make_model()
    stash_opt = OPTIMIZERS[name](stash_model.parameters(), backend)
    lean_opt = OPTIMIZERS[name](lean_model.parameters(), backend)
    for x_b, x_lb in make_batches(8):
        stash_step(stash_model, stash_opt, x_b, x_lb)
        lean_step(lean_model, lean_opt, x_b, x_lb)
    assert not any("grad_b" in state for state in lean_opt.state.values())
    assert_params_close(lean_model, stash_model)


def test_micro_batches_accumulate(backend):
    """Gradient accumulation: each backward may run several times per step."""
    whole, split = make_model(), make_model()
    opt_whole = OPTIMIZERS["sgd"](whole.parameters(), backend)
    opt_split = OPTIMIZERS["sgd"](split.parameters(), backend)
    for x_b, x_lb in make_batches(3):
        lean_step(whole, opt_whole, x_b, x_lb)
        opt_split.zero_grad()
        for half in x_b.chunk(2):
            opt_split.backward_biased(loss_of(split, half) / 2)
        for half in x_lb.chunk(2):
            opt_split.backward_less_biased(loss_of(split, half) / 2)
        opt_split.step()
    assert_params_close(split, whole)


@pytest.mark.parametrize("which", ["b", "lb"])
def test_nonfinite_gradient_changes_nothing(backend, which):
    model = make_model()
    opt = OPTIMIZERS["adamw"](model.parameters(), backend)
    opt.skip_nonfinite = True
    (x_b, x_lb), = make_batches(1)
    lean_step(model, opt, x_b, x_lb)
    before = snapshot(model, opt.state_dict()["state"])
    opt.zero_grad()
    opt.backward_biased(loss_of(model, x_b))
    if which == "b":
        model[0].bias.grad[0] = float("nan")
    opt.backward_less_biased(loss_of(model, x_lb))
    if which == "lb":
        model[2].weight.grad[0, 0] = float("inf")
    opt.step()
    assert_same(before, snapshot(model, opt.state_dict()["state"]))
    assert opt.skipped_steps == 1


def scaled_lean_step(model, opt, scaler, x_b, x_lb, inject=None):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss_b = loss_of(model, x_b)
    opt.backward_biased(scaler.scale(loss_b))
    if inject == "b":
        model[0].bias.grad[0] = float("inf")
    with torch.autocast("cpu", dtype=torch.float16):
        loss_lb = loss_of(model, x_lb)
    opt.backward_less_biased(scaler.scale(loss_lb))
    if inject == "lb":
        model[2].weight.grad[1, 2] = float("nan")
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("name", ["sgd", "wrapper"])
def test_grad_scaler_needs_nothing_more(backend, name):
    """.grad holds all the scaler must unscale and check: no grad_scaler= needed. beta = 1
    scales the losses by -1 and 2, exact in float16, so both modes see the same gradients."""
    stash_model, lean_model = make_model(), make_model()
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
               for _ in range(2)]
    stash_opt = OPTIMIZERS[name](stash_model.parameters(), backend, beta=1.0)
    stash_opt.grad_scaler = scalers[0]
    lean_opt = OPTIMIZERS[name](lean_model.parameters(), backend, beta=1.0)
    for x_b, x_lb in make_batches(4):
        stash_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            scalers[0].scale(loss_of(stash_model, x_b)).backward()
            stash_opt.stash_biased()
            scalers[0].scale(loss_of(stash_model, x_lb)).backward()
        scalers[0].step(stash_opt)
        scalers[0].update()
        scaled_lean_step(lean_model, lean_opt, scalers[1], x_b, x_lb)
    assert scalers[1].get_scale() == 2.0 ** 12 and lean_opt.skipped_steps == 0
    assert_params_close(lean_model, stash_model)


@pytest.mark.parametrize("name", ["sgd", "wrapper"])
@pytest.mark.parametrize("which", ["b", "lb"])
def test_grad_scaler_backs_off(backend, name, which):
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    opt = OPTIMIZERS[name](model.parameters(), backend)
    (x_b, x_lb), = make_batches(1)
    scaled_lean_step(model, opt, scaler, x_b, x_lb)
    def state():
        return opt.state_dict()["state"]

    before = snapshot(model, state())
    scaled_lean_step(model, opt, scaler, x_b, x_lb, inject=which)
    assert_same(before, snapshot(model, state()))
    assert scaler.get_scale() == 2.0 ** 9


def test_refusals():
    model = make_model()
    (x_b, x_lb), = make_batches(1)
    opt = gk.GERNE([{"params": model[0].parameters(), "beta": 1.0},
                    {"params": model[2].parameters(), "beta": 2.0}], lr=0.1)
    with pytest.raises(ValueError, match="one beta"):
        opt.backward_biased(loss_of(model, x_b))
    opt = gk.GERNE(model.parameters(), lr=0.1, beta=1.0)
    opt.backward_biased(loss_of(model, x_b))
    with pytest.raises(RuntimeError, match="backward_less_biased"):
        opt.step()
    with pytest.raises(RuntimeError, match="already uses the lean mode"):
        opt.stash_biased()
    opt.param_groups[0]["beta"] = 3.0
    with pytest.raises(RuntimeError, match="beta changed"):
        opt.backward_less_biased(loss_of(model, x_lb))
    opt.zero_grad()
    loss_of(model, x_b).backward()
    opt.stash_biased()
    with pytest.raises(RuntimeError, match="already uses the stash mode"):
        opt.backward_less_biased(loss_of(model, x_lb))
    opt = gk.GERNE(model.parameters(), lr=0.1, beta=1.0, track_statistics=True)
    with pytest.raises(RuntimeError, match="track_statistics"):
        opt.backward_biased(loss_of(model, x_b))
