"""GERNE(backend=...) end to end on every backend, against torch.optim fed the extrapolated
gradient (1 + beta) g_lb - beta g_b formed independently with torch ops: what the ops add up to
when the optimizer drives them (the scan_ and the update of each step, the state they carry).
The optimizer's own behaviour is tested in tests/test_optimizer.py and its neighbours."""

import copy

import pytest
import torch

import gerne_kernels as gk
import harness

TRAJECTORY_SHAPES = [(7, 5), (33,), (1,), (300,), (2, 3, 4)]
EQUAL_BATCH_CASES = [
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.8, dampening=0.3, maximize=True)),
    ("sgd", torch.optim.SGD, dict(lr=0.05, weight_decay=0.1)),
    ("adam", torch.optim.Adam, dict(lr=0.01, weight_decay=0.01)),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, betas=(0.8, 0.95), maximize=True)),
]


def trajectory_gradient(p, step):
    """A deterministic gradient that depends on the parameters, as a real loss's would, and
    smoothly (Lipschitz 0.5), so that rounding differences are not amplified step after step."""
    return 0.3 * p + 0.2 * torch.sin(p + step)


def equal_batch_params():
    """Every backend x case x beta; the interpreter: beta = 1 only."""
    return [pytest.param(b, kind, torch_cls, hyper, beta,
                         id=f"{b.id}-{kind}{i}-beta{beta:g}")
            for b in harness.BACKENDS for i, (kind, torch_cls, hyper) in
            enumerate(EQUAL_BATCH_CASES) for beta in (-1.0, 1.0, 3.0)
            if b.sizes.thorough or beta == 1.0]


@pytest.mark.parametrize("backend,kind,torch_cls,hyper,beta", equal_batch_params(),
                         indirect=["backend"])
def test_gerne_with_equal_batches_is_torch_optim(backend, kind, torch_cls, hyper, beta):
    """g_b == g_lb: the extrapolated gradient is the gradient itself, whatever beta, so GERNE
    follows torch.optim's trajectory (25 steps; the interpreter 3)."""
    steps = 25 if backend.sizes.thorough else 3
    start = [torch.randn(shape, device=backend.device) for shape in TRAJECTORY_SHAPES]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    opt = gk.GERNE(ours, optimizer=kind, beta=beta, backend=backend.name, **hyper)
    reference = torch_cls(theirs, foreach=False, **hyper)
    for step in range(steps):
        opt.zero_grad()
        for p in ours:
            p.grad = trajectory_gradient(p.detach(), step)
        opt.stash_biased()
        for p in ours:
            p.grad = trajectory_gradient(p.detach(), step)
        opt.step()
        reference.zero_grad()
        for p in theirs:
            p.grad = trajectory_gradient(p.detach(), step)
        reference.step()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"parameter {i} after {steps} steps: {m}")


TWO_BATCH_CASES = [
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.2, maximize=True)),
    ("adam", torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99), amsgrad=True,
                                      maximize=True)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
]


def loss_of(net, x):
    return net(x).square().mean()


@pytest.mark.parametrize("kind,torch_cls,hyper", TWO_BATCH_CASES,
                         ids=[f"{case[0]}{i}" for i, case in enumerate(TWO_BATCH_CASES)])
def test_gerne_is_torch_optim_on_the_extrapolated_gradient(backend, kind, torch_cls, hyper):
    """A small network, two different batches per step: GERNE's parameters are torch.optim's
    fed (1 + beta) g_lb - beta g_b (beta = 1.5; on a GPU a wider network, 5 steps)."""
    on_gpu = backend.device == "cuda"
    width, batch, steps, beta = (300, 32, 5, 0.7) if on_gpu else (40, 16, 4, 1.5)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(7, width), torch.nn.Tanh(),
                                torch.nn.Linear(width, 3)).to(backend.device)
    ref = copy.deepcopy(model)
    opt = gk.GERNE(model.parameters(), optimizer=kind, beta=beta, backend=backend.name,
                   **hyper)
    ref_opt = torch_cls(ref.parameters(), foreach=False, **hyper)
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x_b, x_lb = (torch.randn(batch, 7, generator=generator).to(backend.device)
                     for _ in range(2))
        opt.zero_grad()
        loss_of(model, x_b).backward()
        opt.stash_biased()
        loss_of(model, x_lb).backward()
        opt.step()

        grads = []
        for x in (x_b, x_lb):
            ref.zero_grad()
            loss_of(ref, x).backward()
            grads.append([p.grad.clone() for p in ref.parameters()])
        for p, g_b, g_lb in zip(ref.parameters(), *grads):
            p.grad = (1 + beta) * g_lb - beta * g_b
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("kind,hyper", [("sgd", dict(lr=0.1, momentum=0.9)),
                                        ("adam", dict(lr=0.1)), ("lion", dict(lr=0.01))])
def test_gerne_skips_a_step_with_a_nan_gradient(backend, kind, hyper):
    """skip_nonfinite: a NaN in the less-biased batch's gradient skips the whole step (scan_
    flags it, the update reads the flag): parameters unchanged, the skip counted, Adam's step
    counts not advanced."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(7, 40), torch.nn.Tanh(),
                                torch.nn.Linear(40, 3)).to(backend.device)
    opt = gk.GERNE(model.parameters(), optimizer=kind, beta=1.0, backend=backend.name,
                   skip_nonfinite=True, **hyper)
    x = torch.randn(8, 7).to(backend.device)
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
