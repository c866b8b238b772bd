"""An inf or NaN in g_b or g_lb skips the whole step and loses nothing, wherever it sits.

test_optimizer.py covers one tensor bucket (SGD with momentum, Adam with amsgrad); test_amp.py the
GradScaler. Here: every optimizer, float32/bfloat16/float16 parameters mixed on one device (one
bad element in one bucket must stop the updates of all buckets), parameters whose momentum
buffers are partly new, a bad element in any position of a long tensor (first SIMD block, scalar
tail, a later chunk of the multi-tensor work list), the skip counter across a checkpoint, and
skip_nonfinite=False, which updates like torch.optim does.
"""

import copy

import pytest
import torch

import gerne_kernels as gk

BAD = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}
CONFIGS = {
    "sgd": dict(optimizer="sgd", lr=0.1),
    "sgd-nesterov": dict(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True,
                         weight_decay=0.01),
    "adam": dict(optimizer="adam", lr=1e-2, weight_decay=0.1),
    "adamw-amsgrad": dict(optimizer="adamw", lr=1e-2, amsgrad=True, maximize=True),
}


def make_params():
    """One group of three dtypes (three buckets on the CPU), and a second group."""
    gen = torch.Generator().manual_seed(0)
    shapes_dtypes = [((6, 5), torch.float32), ((7,), torch.bfloat16), ((3, 3), torch.float16),
                     ((4,), torch.float32)]
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
            for shape, dtype in shapes_dtypes]


def set_grads(params, seed, bad=None, index=None):
    gen = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        if bad is not None and i == index:
            p.grad.view(-1)[p.numel() // 2] = bad


def two_batch_step(opt, params, seed, bad=None, which=None, index=None):
    opt.zero_grad()
    set_grads(params, seed, bad if which == "b" else None, index)
    opt.stash_biased()
    set_grads(params, seed + 1, bad if which == "lb" else None, index)
    opt.step()


def snapshot(params, opt):
    return copy.deepcopy(([p.detach() for p in params], opt.state_dict()["state"]))


def assert_same(a, b):
    (params_a, state_a), (params_b, state_b) = a, b
    assert all(torch.equal(p, q) for p, q in zip(params_a, params_b))
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert state_a[k].keys() == state_b[k].keys(), k
        for key in state_a[k]:
            assert torch.equal(state_a[k][key], state_b[k][key]), (k, key)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("which", ["b", "lb"])
@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
@pytest.mark.parametrize("index", [0, 1, 2, 3], ids=["f32", "bf16", "f16", "group1"])
def test_one_bad_element_in_one_bucket_skips_every_bucket(backend, config, which, bad, index):
    params = make_params()
    opt = gk.GERNE([{"params": params[:3]}, {"params": params[3:], "beta": 0.5}], beta=1.0,
                   skip_nonfinite=True, backend=backend, **config)
    two_batch_step(opt, params, seed=1)
    before = snapshot(params, opt)
    two_batch_step(opt, params, seed=3, bad=bad, which=which, index=index)
    assert_same(before, snapshot(params, opt))
    assert opt.skipped_steps == 1 and not opt.has_stash()
    two_batch_step(opt, params, seed=5)
    assert opt.skipped_steps == 1
    assert all(not torch.equal(p, q) for p, q in zip(params, before[0]))


@pytest.mark.parametrize("which", ["b", "lb"])
def test_skip_when_some_momentum_buffers_are_new(backend, which):
    """a has a momentum buffer, b gets its first gradient now: two kernel calls, one skip."""
    a = torch.nn.Parameter(torch.randn(40))
    b = torch.nn.Parameter(torch.randn(40))
    opt = gk.GERNE([a, b], optimizer="sgd", lr=0.1, momentum=0.9, beta=1.0,
                   skip_nonfinite=True, backend=backend)
    two_batch_step(opt, [a], seed=1)  # b has no gradient: no buffer
    before = snapshot([a, b], opt)
    assert "momentum_buffer" not in opt.state.get(b, {})
    two_batch_step(opt, [a, b], seed=2, bad=float("nan"), which=which, index=1)
    assert_same(before, snapshot([a, b], opt))
    assert opt.skipped_steps == 1


def test_bad_biased_gradient_of_a_parameter_without_less_biased_gradient(backend):
    a, b = torch.nn.Parameter(torch.randn(9)), torch.nn.Parameter(torch.randn(9))
    opt = gk.GERNE([a, b], optimizer="adam", lr=1e-2, beta=2.0, skip_nonfinite=True,
                   backend=backend)
    before = snapshot([a, b], opt)
    a.grad = torch.full((9,), float("inf"))
    opt.stash_biased()
    b.grad = torch.ones(9)  # a gets no g_lb: zeros stand in for it
    opt.step()
    assert_same(before, snapshot([a, b], opt))
    assert opt.skipped_steps == 1 and opt.state.get(a, {}) == {}


# Positions in a tensor of 2 * 65536 + 5 elements: the first SIMD block, its last element, the
# scalar tail, and inside the second chunk of the CPU kernel's work list (chunks of 65536).
LONG = 2 * 65536 + 5


@pytest.mark.parametrize("position", [0, 15, 31, LONG - 1, LONG - 3, 65536 + 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("which", ["b", "lb"])
def test_bad_element_found_anywhere_in_a_long_tensor(backend, position, dtype, which):
    p = torch.nn.Parameter(torch.randn(LONG).to(dtype))
    small = torch.nn.Parameter(torch.randn(3).to(dtype))
    opt = gk.GERNE([p, small], optimizer="sgd", lr=0.1, momentum=0.9, beta=1.0,
                   skip_nonfinite=True, backend=backend)
    two_batch_step(opt, [p, small], seed=1)
    before = snapshot([p, small], opt)
    opt.zero_grad()
    set_grads([p, small], seed=2)
    if which == "b":
        p.grad[position] = float("nan")
    opt.stash_biased()
    set_grads([p, small], seed=3)
    if which == "lb":
        p.grad[position] = float("-inf")
    opt.step()
    assert_same(before, snapshot([p, small], opt))
    assert opt.skipped_steps == 1


def test_skip_count_survives_a_checkpoint(backend):
    params = make_params()
    opt = gk.GERNE(params, optimizer="adam", lr=1e-2, skip_nonfinite=True, backend=backend)
    two_batch_step(opt, params, seed=1)
    two_batch_step(opt, params, seed=2, bad=float("nan"), which="lb", index=0)
    two_batch_step(opt, params, seed=3, bad=float("inf"), which="b", index=2)
    saved = copy.deepcopy(opt.state_dict())
    fresh = gk.GERNE(params, optimizer="adam", lr=1e-2, skip_nonfinite=True, backend=backend)
    fresh.load_state_dict(saved)
    assert fresh.skipped_steps == 2
    two_batch_step(fresh, params, seed=4, bad=float("inf"), which="b", index=1)
    assert fresh.skipped_steps == 3


def test_skip_nonfinite_false_updates_like_torch_optim(backend):
    """Without the skip, a NaN in g reaches the parameter exactly as it would in torch.optim."""
    p = torch.nn.Parameter(torch.randn(20))
    q = torch.nn.Parameter(p.detach().clone())
    opt = gk.GERNE([p], optimizer="sgd", lr=0.1, momentum=0.9, beta=1.0, backend=backend,
                   skip_nonfinite=False)
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    g_b, g_lb = torch.randn(20), torch.randn(20)
    g_lb[4] = float("nan")
    opt.zero_grad()
    p.grad = g_b.clone()
    opt.stash_biased()
    p.grad = g_lb.clone()
    opt.step()
    q.grad = 2 * g_lb - g_b
    ref.step()
    torch.testing.assert_close(p, q, equal_nan=True)
    assert torch.isnan(p[4]) and opt.skipped_steps == 0
