"""GERNE(..., backend="triton") end to end in the interpreter: against torch.optim fed the
extrapolated gradient (1 + beta) g_lb - beta g_b computed independently with torch ops, and
skipping a step whose gradient holds a NaN."""

import pytest
import torch

import gerne_kernels as gk
import gerne_kernels.triton_kernels as tk
from triton_checks import check_gerne_against_torch_optim

CASES = [
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.2, maximize=True)),
    ("adam", torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99), amsgrad=True,
                                      maximize=True)),
]


def make_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(7, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))


def loss_of(model, x):
    return model(x).square().mean()


@pytest.mark.parametrize("kind,torch_cls,hyper,mode", [
    case + (mode,) for case, mode in zip(CASES, ["multi_tensor", "per_tensor"] * 2)])
def test_gerne_triton_matches_torch_optim_on_the_extrapolated_gradient(mode, kind, torch_cls,
                                                                       hyper):
    with tk.launch_settings(mode=mode):
        opt = check_gerne_against_torch_optim("cpu", kind, torch_cls, hyper)
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("kind,hyper", [("sgd", dict(lr=0.1, momentum=0.9)),
                                        ("adam", dict(lr=0.1))])
def test_gerne_triton_skips_a_step_with_a_nan_gradient(kind, hyper):
    model = make_model()
    opt = gk.GERNE(model.parameters(), optimizer=kind, beta=1.0, backend="triton", **hyper)
    x = torch.randn(8, 7)
    for bad in (False, True):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        loss_of(model, x).backward()
        opt.stash_biased()
        loss_of(model, x).backward()
        if bad:
            model[2].bias.grad[1] = float("nan")
        opt.step()
    assert opt.skipped_steps == 1
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
    if kind == "adam":
        assert all(opt.state[p]["step"].item() == 1 for p in model.parameters())
