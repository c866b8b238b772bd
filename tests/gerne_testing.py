"""Shared pieces of the training-integration tests: a tiny model, batches, the two ways to run a
GERNE step, and the oracle that feeds a plain torch optimizer (1 + beta) g_lb - beta g_b."""

import copy
import os

import pytest
import torch

from gerne_kernels import _build

REQUIRE_CPU_ENV = "GERNE_KERNELS_REQUIRE_CPU"


def require_cpu_build():
    """Builds the C++ CPU extension, or skips the calling test (fails it where
    GERNE_KERNELS_REQUIRE_CPU=1, as in CI) with the build error and its log."""
    built = _build.build("cpu")
    if not built.ok:
        message = f"the cpu extension failed to build: {built.error} (log: {built.log_path})"
        if os.environ.get(REQUIRE_CPU_ENV) == "1":
            pytest.fail(message)
        pytest.skip(message)


def make_model(seed=1, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(),
                               torch.nn.Linear(13, 3)).to(dtype)


def make_batches(steps, seed=5, size=8):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 7, generator=gen), torch.randn(size, 7, generator=gen))
            for _ in range(steps)]


def loss_of(model, x):
    return (model(x) - 0.5).square().mean()


def stash_step(model, opt, x_b, x_lb):
    opt.zero_grad()
    loss_of(model, x_b).backward()
    opt.stash_biased()
    loss_of(model, x_lb).backward()
    opt.step()


def lean_step(model, opt, x_b, x_lb):
    opt.zero_grad()
    opt.backward_biased(loss_of(model, x_b))
    opt.backward_less_biased(loss_of(model, x_lb))
    opt.step()


def gradients(model, x):
    model.zero_grad()
    loss_of(model, x).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


def oracle_step(model, base_opt, x_b, x_lb, beta):
    """The independent oracle: a plain optimizer fed .grad = (1 + beta) g_lb - beta g_b."""
    g_b, g_lb = gradients(model, x_b), gradients(model, x_lb)
    for p, gb, glb in zip(model.parameters(), g_b, g_lb):
        p.grad = (1 + beta) * glb - beta * gb
    base_opt.step()


def snapshot(model, opt_state):
    """Parameters and an optimizer's state (a state_dict()["state"]), deep-copied."""
    return copy.deepcopy(([p.detach() for p in model.parameters()], opt_state))


def assert_same(a, b):
    """Bit-identical parameters and state."""
    params_a, state_a = a
    params_b, state_b = b
    for p, q in zip(params_a, params_b):
        assert torch.equal(p, q)
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert state_a[k].keys() == state_b[k].keys()
        for key in state_a[k]:
            assert torch.equal(torch.as_tensor(state_a[k][key]),
                               torch.as_tensor(state_b[k][key])), key


def assert_params_close(model, ref, rtol=1e-5, atol=1e-6):
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
