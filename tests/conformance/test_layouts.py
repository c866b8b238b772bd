"""Every parameter layout torch.optim accepts, in every way of feeding GERNE, against torch.optim.

* channels_last convolutions in a small ResNet-like block with BatchNorm, and dense tensors in
  any other memory order (permutations, a storage offset, channels_last_3d): the fused ops run
  on them as flat storage, in place; the stash and every new state tensor keep the parameter's
  strides;
* views with gaps, the non-contiguous parameters of torch's own test_optim
  (``torch.randn(10, 5, 2)[..., 0]``): updated through temporaries, in their own storage, the
  elements between them untouched; state laid out as torch.optim lays it out;
* gradients in another layout than their parameter (set by hooks, clipping code, ...):
  handled, never refused.

The oracle is torch.optim (for-loop implementation) on an identical copy, stepped on
(1 + beta) g_lb - beta g_b formed in float64. Modes: stash, memory-lean, one-backward and
GERNEWrapper around the same torch.optim class; backends: the ``backend`` fixture.
"""

import copy

import pytest
import torch
from torch import nn

from conformance.helpers import (MODES, TORCH_OPTIMIZERS, gerne_step, make_gerne, oracle_step,
                                 state_of)

BETA = 0.7
STEPS = 3
# The two runs differ by the rounding of g (float32 in the ops, float64 in the oracle), which
# backpropagated BatchNorm and Adam's normalisation carry a little further each step.
TOLERANCE = dict(rtol=2e-5, atol=2e-6)

CONFIGS = {
    "sgd-nesterov-wd": ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "sgd-dampening": ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=1e-2)),
    "adam-wd": ("adam", dict(lr=1e-2, weight_decay=0.1)),
    "adamw-amsgrad": ("adamw", dict(lr=1e-2, weight_decay=0.05, amsgrad=True)),
}


class Block(nn.Module):
    """A stem and one ResNet basic block (conv-BN-ReLU-conv-BN, identity shortcut), then a
    linear head whose weight is stored transposed (dense, in the other memory order)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        self.head.weight = nn.Parameter(self.head.weight.detach().t().contiguous().t())

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.relu(x + y).mean((2, 3)))


def block_batches(steps, seed=3):
    gen = torch.Generator().manual_seed(seed)

    def batch():
        x = torch.randn(2, 3, 5, 5, generator=gen).to(memory_format=torch.channels_last)
        return x, torch.randn(2, 3, generator=gen)
    return [(batch(), batch()) for _ in range(steps)]


def block_loss(model, batch):
    x, target = batch
    return (model(x) - target).square().mean()


def layouts_of(params):
    return [(p.stride(), p.storage_offset(), p.data_ptr()) for p in params]


def check_state_layouts(opt, params, expected_strides):
    for p, strides in zip(params, expected_strides):
        assert state_of(opt, p), tuple(p.shape)  # state exists to be checked
        for key, value in state_of(opt, p).items():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.stride() == strides, (key, tuple(p.shape))


def stash_checker(opt, mode, params, strides):
    """on_grads for gerne_step: while the stash is pending, each parameter's stash has the
    given strides."""
    def on_grads(stage):
        if stage == "lb" and mode in ("stash", "wrapper"):
            for p, expected in zip(params, strides):
                assert opt.state[p]["grad_b"].stride() == expected, tuple(p.shape)
    return on_grads


def run_against_torch(params, ref_params, loss, batches, kind, hyper, mode, backend,
                      on_grads=None):
    """GERNE in ``mode`` on params and torch.optim on ref_params over the batches."""
    opt = make_gerne(mode, params, kind, hyper, BETA, backend)
    ref_opt = TORCH_OPTIMIZERS[kind](ref_params, foreach=False, **hyper)
    for x_b, x_lb in batches:
        gerne_step(opt, mode, lambda: loss(params, x_b), lambda: loss(params, x_lb),
                   on_grads(opt) if on_grads else None)
        oracle_step(ref_params, ref_opt, lambda: loss(ref_params, x_b),
                    lambda: loss(ref_params, x_lb), BETA)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCE)
    return opt, ref_opt


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_channels_last_resnet_block(backend, config, mode):
    kind, hyper = CONFIGS[config]
    torch.manual_seed(0)
    model = Block().to(memory_format=torch.channels_last)
    ref = copy.deepcopy(model)
    params, ref_params = list(model.parameters()), list(ref.parameters())
    assert sum(not p.is_contiguous() for p in params) == 4  # three convs and the head
    before = layouts_of(params)
    strides = [p.stride() for p in params]

    def loss(ps, batch):
        return block_loss(model if ps is params else ref, batch)
    opt, _ = run_against_torch(
        params, ref_params, loss, block_batches(STEPS), kind, hyper, mode, backend,
        lambda opt: stash_checker(opt, mode, params, strides))
    for name, buffer in model.named_buffers():  # both saw the same forwards in train mode
        torch.testing.assert_close(buffer, ref.get_buffer(name), **TOLERANCE)
    assert layouts_of(params) == before  # updated in place, still channels_last
    check_state_layouts(opt, params, strides)


def permuted_params():
    """Dense parameters in other memory orders: a 3-d permutation, a transposed matrix, a
    transposed view with a storage offset, a channels_last_3d Conv3d weight."""
    torch.manual_seed(1)
    return [nn.Parameter(torch.randn(4, 5, 6).permute(2, 0, 1)),
            nn.Parameter(torch.randn(6, 4).t()),
            nn.Parameter(torch.randn(2, 3, 4)[1].t()),
            nn.Parameter(torch.randn(2, 3, 2, 2, 2).to(memory_format=torch.channels_last_3d))]


def elementwise_batches(params, steps, seed=4):
    gen = torch.Generator().manual_seed(seed)
    return [tuple([torch.randn(p.shape, generator=gen) for p in params] for _ in range(2))
            for _ in range(steps)]


def elementwise_loss(params, xs):
    return sum((p * x).tanh().sum() + (p * p * x).mean() for p, x in zip(params, xs))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_dense_parameters_in_any_memory_order(backend, config, mode):
    kind, hyper = CONFIGS[config]
    params, ref_params = permuted_params(), permuted_params()
    assert not any(p.is_contiguous() for p in params)
    before = layouts_of(params)
    strides = [p.stride() for p in params]
    opt, _ = run_against_torch(
        params, ref_params, elementwise_loss, elementwise_batches(params, STEPS), kind, hyper,
        mode, backend, lambda opt: stash_checker(opt, mode, params, strides))
    assert layouts_of(params) == before
    check_state_layouts(opt, params, strides)


def gapped_params():
    """torch's test_optim's non-contiguous parameters (views with gaps), and a 4-d one; each
    with the tensor it is a view of."""
    torch.manual_seed(2)
    bases = [torch.randn(10, 5, 2), torch.randn(10, 2), torch.randn(3, 2, 2, 6)]
    views = [bases[0][..., 0], bases[1][..., 0], bases[2][..., ::2]]
    return [nn.Parameter(v) for v in views], bases


def mv_loss(params, x):
    weight, bias, extra = params
    return (weight.mv(x[0]) + bias).pow(2).sum() + (extra * x[1]).sin().sum()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_views_with_gaps_as_in_torch_test_optim(backend, config, mode):
    kind, hyper = CONFIGS[config]
    (params, bases), (ref_params, _) = gapped_params(), gapped_params()
    assert all(p.data_ptr() == b.data_ptr() for p, b in zip(params, bases))
    gaps = [bases[0][..., 1].clone(), bases[1][..., 1].clone(), bases[2][..., 1::2].clone()]
    before = layouts_of(params)
    gen = torch.Generator().manual_seed(6)
    batches = [tuple((torch.randn(5, generator=gen), torch.randn(3, 2, 2, 3, generator=gen))
                     for _ in range(2)) for _ in range(STEPS)]
    moved = {}

    def on_grads(opt):
        def check(stage):
            if mode not in ("stash", "wrapper"):
                return
            for i, p in enumerate(params):
                if stage == "b":
                    moved[i] = p.grad
                else:  # the stash is the biased gradient itself: moved, not copied
                    assert opt.state[p]["grad_b"] is moved[i]
        return check
    opt, ref_opt = run_against_torch(params, ref_params, mv_loss, batches, kind, hyper, mode,
                                     backend, on_grads)
    assert layouts_of(params) == before  # still views of the same tensors
    for gap, now in zip(gaps, [bases[0][..., 1], bases[1][..., 1], bases[2][..., 1::2]]):
        assert torch.equal(gap, now)  # the elements between the views' elements untouched
    check_state_layouts(opt, params, [
        next(v for v in ref_opt.state[q].values() if torch.is_tensor(v) and v.dim()).stride()
        for q in ref_params])  # laid out as torch.optim lays out its state for them


def gapped_like(g, p):
    """g's values in a view with gaps (every other element of a larger tensor)."""
    return torch.empty(*g.shape, 3, dtype=g.dtype)[..., 1].copy_(g)


def dense_other_order_like(g, p):
    """g's values, dense, in a memory order other than p's: its dimensions reversed, or
    contiguous where reversing gives p's own order."""
    order = list(range(g.dim()))[::-1]
    out = torch.empty([g.shape[d] for d in order], dtype=g.dtype).permute(
        *[order.index(d) for d in range(g.dim())])
    if out.stride() == p.stride():
        out = torch.empty(g.shape, dtype=g.dtype)
    return out.copy_(g)


RELAYOUTS = {"gapped": gapped_like, "dense-other-order": dense_other_order_like}


def mixed_params():
    """Contiguous, channels_last, transposed and gapped parameters."""
    torch.manual_seed(3)
    return [nn.Parameter(torch.randn(6, 4)),
            nn.Parameter(torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last)),
            nn.Parameter(torch.randn(6, 4).t()),
            nn.Parameter(torch.randn(10, 5, 2)[..., 0])]


# A gradient that is a view (the dense-other-order one is a permuted view) is copied into the
# stash and zeroed in place, as DDP's bucket views must be; the next backward then accumulates
# into it, about which autograd warns (a performance note, not an error).
@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("relayout", sorted(RELAYOUTS))
@pytest.mark.parametrize("config", ["sgd-nesterov-wd", "adamw-amsgrad"])
def test_gradients_in_another_layout_than_their_parameter(backend, config, relayout, mode):
    kind, hyper = CONFIGS[config]
    params, ref_params = mixed_params(), mixed_params()
    before = layouts_of(params)
    new_layout = RELAYOUTS[relayout]

    def on_grads(opt):
        def relayout_grads(stage):
            for p in params:
                p.grad = new_layout(p.grad, p)
                assert p.grad.stride() != p.stride()
        return relayout_grads
    opt, _ = run_against_torch(params, ref_params, elementwise_loss,
                               elementwise_batches(params, STEPS), kind, hyper, mode, backend,
                               on_grads)
    assert layouts_of(params) == before
    if mode != "wrapper":  # GERNE's new state takes the parameter's layout, as torch's Adam's
        check_state_layouts(opt, params, [
            torch.zeros_like(p, memory_format=torch.preserve_format).stride() for p in params])


@pytest.mark.parametrize("config", ["sgd-nesterov-wd", "adamw-amsgrad"])
def test_state_in_another_layout_than_its_parameter(backend, config):
    """A checkpoint of a contiguous model loaded after model.to(channels_last): its state keeps
    the contiguous layout, and the steps continue as torch.optim's from the same checkpoint."""
    kind, hyper = CONFIGS[config]
    torch.manual_seed(0)
    model = Block()
    opt = make_gerne("stash", model.parameters(), kind, hyper, BETA, backend)
    data = block_batches(STEPS + 2)
    for x_b, x_lb in data[:2]:
        gerne_step(opt, "stash", lambda: block_loss(model, (x_b[0].contiguous(), x_b[1])),
                   lambda: block_loss(model, (x_lb[0].contiguous(), x_lb[1])))
    checkpoint = copy.deepcopy(opt.state_dict())
    saved = [p.stride() for p in model.parameters()]  # the state's layout in the checkpoint
    model = model.to(memory_format=torch.channels_last)
    ref = copy.deepcopy(model)
    params = list(model.parameters())
    opt = make_gerne("stash", params, kind, hyper, BETA, backend)
    ref_opt = TORCH_OPTIMIZERS[kind](ref.parameters(), foreach=False, **hyper)
    opt.load_state_dict(copy.deepcopy(checkpoint))
    ref_opt.load_state_dict(copy.deepcopy(checkpoint))
    assert sum(a != p.stride() for a, p in zip(saved, params)) == 3  # the three convs
    check_state_layouts(opt, params, saved)
    for x_b, x_lb in data[2:]:
        gerne_step(opt, "stash", lambda: block_loss(model, x_b), lambda: block_loss(model, x_lb))
        oracle_step(list(ref.parameters()), ref_opt, lambda: block_loss(ref, x_b),
                    lambda: block_loss(ref, x_lb), BETA)
    for p, q in zip(params, ref.parameters()):
        torch.testing.assert_close(p, q, **TOLERANCE)
    check_state_layouts(opt, params, saved)  # updated where it lies


def test_dense_layouts_are_operands_in_place():
    """What the fused ops receive: a dense parameter in any memory order, its gradients and its
    state are flat views of their own memory (no temporary, nothing to copy back); a view with
    gaps, and a gradient in another layout, go through temporaries."""
    from gerne_kernels import buckets
    dense = permuted_params() + [nn.Parameter(torch.randn(6, 4))]
    gapped, _ = gapped_params()
    odd = nn.Parameter(torch.randn(6, 4).t())
    for p in dense + gapped:
        p.grad = torch.randn_like(p)  # autograd's layout: the parameter's, where it is dense
    odd.grad = torch.randn(4, 6)  # contiguous: another layout than its parameter's
    state = {p: {"grad_b": torch.randn_like(p)} for p in dense + gapped + [odd]}
    with torch.no_grad():
        bucket, = buckets.gather({"params": dense}, state, has_stash=True)
        for i, p in enumerate(dense):
            for operand, tensor in ((bucket.p[i], p), (bucket.grads_lb[i], p.grad),
                                    (bucket.grads_b[i], state[p]["grad_b"])):
                assert operand.is_contiguous() and operand.numel() == p.numel()
                assert operand.data_ptr() == tensor.data_ptr()
            exp_avg = torch.zeros_like(p, memory_format=torch.preserve_format)
            assert bucket.operand(i, exp_avg, written=True).data_ptr() == exp_avg.data_ptr()
        assert not bucket._write_backs
        bucket, = buckets.gather({"params": gapped + [odd]}, state, has_stash=True)
        for i, p in enumerate(gapped):
            assert bucket.p[i].is_contiguous() and bucket.p[i].data_ptr() != p.data_ptr()
        assert [t for t, _ in bucket._write_backs] == gapped  # copied back after the op
        assert bucket.p[-1].data_ptr() == odd.data_ptr()
        assert bucket.grads_lb[-1].data_ptr() != odd.grad.data_ptr()  # a temporary, read only
        assert torch.equal(bucket.grads_lb[-1], buckets.flat_view(
            torch.empty_like(odd).copy_(odd.grad)))
