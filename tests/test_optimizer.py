"""GERNE against torch.optim and against the extrapolated-gradient formula in float64."""

import copy

import pytest
import torch

import gerne_kernels as gk
import gerne_testing
from gerne_testing import assert_same

SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(lr=0.05, momentum=0.5, maximize=True),
]
ADAM_CASES = [
    ("adam", torch.optim.Adam, dict(lr=1e-2)),
    ("adam", torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05,
                                      amsgrad=True, maximize=True)),
]
CASES = ([("sgd", torch.optim.SGD, c) for c in SGD_CASES] + ADAM_CASES)


def make_model(dtype=torch.float32):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(),
                               torch.nn.Linear(13, 3)).to(dtype)


def loss_of(model, x):
    return model(x).square().mean()


def gerne_step(model, opt, x_b, x_lb):
    opt.zero_grad()
    loss_of(model, x_b).backward()
    opt.stash_biased()
    loss_of(model, x_lb).backward()
    opt.step()


@pytest.mark.parametrize("kind,torch_cls,hyper", CASES)
@pytest.mark.parametrize("beta", [-1.0, 0.0, 1.0, 3.0])
def test_equal_batches_reproduce_torch_optim(backend, kind, torch_cls, hyper, beta):
    """With g_b == g_lb, (1 + beta) g - beta g = g: GERNE is torch.optim for every beta."""
    model, ref = make_model(), make_model()
    opt = gk.GERNE(model.parameters(), optimizer=kind, beta=beta, backend=backend, **hyper)
    ref_opt = torch_cls(ref.parameters(), foreach=False, **hyper)
    for _ in range(22):
        x = torch.randn(16, 7)
        gerne_step(model, opt, x, x)
        ref_opt.zero_grad()
        loss_of(ref, x).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [-1.0, 0.0, 0.5, 3.0])
def test_one_sgd_step_is_the_extrapolated_gradient_in_float64(backend, beta):
    """p <- p - lr * ((1 + beta) g_lb - beta g_b), computed independently in float64."""
    model = make_model()
    before = [p.detach().double().clone() for p in model.parameters()]
    opt = gk.GERNE(model.parameters(), optimizer="sgd", lr=0.3, beta=beta, backend=backend)
    x_b, x_lb = torch.randn(16, 7), torch.randn(16, 7)
    grads = {}
    for name, x in (("b", x_b), ("lb", x_lb)):
        model.zero_grad()
        loss_of(model, x).backward()
        grads[name] = [p.grad.double().clone() for p in model.parameters()]
    gerne_step(model, opt, x_b, x_lb)
    for p, p0, g_b, g_lb in zip(model.parameters(), before, grads["b"], grads["lb"]):
        expected = p0 - 0.3 * ((1 + beta) * g_lb - beta * g_b)
        torch.testing.assert_close(p.double(), expected, rtol=1e-6, atol=1e-7)


def test_reference_is_exact_in_float64():
    model, ref = make_model(torch.float64), make_model(torch.float64)
    opt = gk.GERNE(model.parameters(), optimizer="adamw", beta=2.0, lr=1e-2, amsgrad=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, amsgrad=True, foreach=False)
    for _ in range(10):
        x = torch.randn(4, 7, dtype=torch.float64)
        gerne_step(model, opt, x, x)
        ref_opt.zero_grad()
        loss_of(ref, x).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_missing_gradient_counts_as_zero(backend):
    """A parameter used by only one batch gets zero for the other batch's gradient."""
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt = gk.GERNE([a, b], optimizer="sgd", lr=0.5, beta=2.0, backend=backend)
    opt.zero_grad()
    (a * 3).sum().backward()         # biased batch touches only a: g_b(a) = 3
    opt.stash_biased()
    (b * 5).sum().backward()         # less-biased batch touches only b: g_lb(b) = 5
    opt.step()
    torch.testing.assert_close(a.detach(), a0 - 0.5 * (-2.0 * 3))
    torch.testing.assert_close(b.detach(), b0 - 0.5 * (3.0 * 5))


def test_parameter_with_no_gradient_is_skipped(backend):
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = gk.GERNE([used, unused], optimizer="adamw", lr=0.1, beta=1.0, backend=backend)
    for _ in range(2):
        opt.zero_grad()
        used.sum().backward()
        opt.stash_biased()
        used.sum().backward()
        opt.step()
    assert torch.equal(unused.detach(), torch.ones(3))
    assert "step" not in opt.state[unused] and float(opt.state[used]["step"]) == 2.0


def run_trajectory(kind, hyper, steps, backend, checkpoint_at=None):
    model = make_model()
    opt = gk.GERNE(model.parameters(), optimizer=kind, beta=1.5, backend=backend, **hyper)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 7, generator=gen), torch.randn(8, 7, generator=gen))
               for _ in range(steps)]
    for i, (x_b, x_lb) in enumerate(batches):
        if i == checkpoint_at:
            opt.zero_grad()
            loss_of(model, x_b).backward()
            opt.stash_biased()  # checkpoint taken with the biased gradient pending
            saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
            model = make_model()
            torch.nn.init.zeros_(model[0].weight)  # the load must overwrite everything
            opt = gk.GERNE(model.parameters(), optimizer=kind, beta=1.5, backend=backend,
                           **hyper)
            model.load_state_dict(saved[0])
            opt.load_state_dict(saved[1])
            loss_of(model, x_lb).backward()
            opt.step()
            continue
        gerne_step(model, opt, x_b, x_lb)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind,hyper", [("sgd", dict(lr=0.1, momentum=0.9)),
                                        ("adamw", dict(lr=1e-2, amsgrad=True))])
def test_state_dict_mid_run_continues_identically(backend, kind, hyper):
    straight = run_trajectory(kind, hyper, 8, backend)
    resumed = run_trajectory(kind, hyper, 8, backend, checkpoint_at=4)
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)


def test_loads_a_torch_optim_checkpoint():
    """Same state keys as torch.optim: an Adam checkpoint continues under GERNE(adam)."""
    model, ref = make_model(), make_model()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=False)
    x = torch.randn(8, 7)
    for _ in range(3):
        ref_opt.zero_grad()
        loss_of(ref, x).backward()
        ref_opt.step()
    model.load_state_dict(ref.state_dict())
    opt = gk.GERNE(model.parameters(), optimizer="adam", lr=1e-2, beta=0.5)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # load shares tensors
    gerne_step(model, opt, x, x)
    ref_opt.zero_grad()
    loss_of(ref, x).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def snapshot(model, opt):
    return gerne_testing.snapshot(model, dict(opt.state_dict()["state"]))


@pytest.mark.parametrize("kind,hyper", [("sgd", dict(lr=0.1, momentum=0.9)),
                                        ("adam", dict(lr=1e-2, amsgrad=True))])
@pytest.mark.parametrize("which", ["b", "lb"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("first_step", [True, False])
def test_nonfinite_gradient_changes_nothing(backend, kind, hyper, which, bad, first_step):
    model = make_model()
    opt = gk.GERNE(model.parameters(), optimizer=kind, beta=1.0, backend=backend,
                   skip_nonfinite=True, **hyper)
    x = torch.randn(8, 7)
    if not first_step:
        gerne_step(model, opt, x, x)
    before = snapshot(model, opt)
    opt.zero_grad()
    loss_of(model, x).backward()
    if which == "b":
        model[2].bias.grad[1] = bad
    opt.stash_biased()
    loss_of(model, x).backward()
    if which == "lb":
        model[0].weight.grad[3, 2] = bad
    opt.step()
    assert_same(before, snapshot(model, opt))
    assert opt.skipped_steps == 1
    assert not opt.has_stash()
    gerne_step(model, opt, x, x)  # the next clean step proceeds
    assert opt.skipped_steps == 1
    assert not torch.equal(before[0][0], model[0].weight.detach())


def test_lr_scheduler_and_beta_schedule(backend):
    model = make_model()
    opt = gk.GERNE(model.parameters(), optimizer="sgd", lr=1.0, beta=0.0, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(4, 7)
    gerne_step(model, opt, x, x)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    opt.param_groups[0]["beta"] = 2.0
    p0 = model[2].bias.detach().clone()
    opt.zero_grad()
    loss_of(model, x).backward()
    g_b = model[2].bias.grad.clone()
    opt.stash_biased()
    loss_of(model, 2 * x).backward()
    g_lb = model[2].bias.grad.clone()
    opt.step()
    torch.testing.assert_close(model[2].bias.detach(), p0 - 0.5 * (3 * g_lb - 2 * g_b))


def test_param_groups_with_different_dtypes_and_betas(backend):
    a = torch.nn.Parameter(torch.randn(6))
    b = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt = gk.GERNE([{"params": [a], "beta": 1.0}, {"params": [b, ], "beta": 3.0}],
                   optimizer="sgd", lr=0.1, backend="auto")
    opt.zero_grad()
    (a.sum() + b.sum()).backward()
    opt.stash_biased()
    (2 * a.sum() + 2 * b.sum()).backward()
    opt.step()
    torch.testing.assert_close(a.detach(), a0 - 0.1 * (2 * 2 - 1 * 1))
    torch.testing.assert_close(b.detach(), b0 - 0.1 * (4 * 2 - 3 * 1))


def test_beta_zero_needs_no_stash():
    model = make_model()
    opt = gk.GERNE(model.parameters(), optimizer="sgd", lr=0.1, beta=0.0)
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.randn(4, 7)
    opt.zero_grad()
    loss_of(model, x).backward()
    opt.step()
    ref_opt.zero_grad()
    loss_of(ref, x).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
