"""The fused CUDA ops (csrc/cuda) against the reference path, on a GPU; skipped without one.

The checks shared with the Triton tests (tests/triton_checks.py, prefix="" selects the C++ ops)
run a few steps of the op on one copy of a random problem and of gerne_kernels._reference (the
specification) on another, and compare every tensor. On top of them, the properties of the CUDA
harness (csrc/cuda/multi_tensor_apply.cuh): more tensors than one launch's table holds, tensors
whose memory is not 16-byte aligned (the element-by-element path), a tensor of more than 2^31
elements, no host sync, a step captured in a CUDA graph and replayed, and the number of kernel
launches per step.

Table capacities (tensors per launch; the tests below exceed each): the finiteness scan ~1460
gradients, SGD ~700, extrapolate_ ~840, Adam ~460.
"""

import copy
import os
import sys

import pytest
import torch

import gerne_kernels as gk
from gerne_kernels import _build, _ops, _reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton_checks as checks  # noqa: E402  (the shared op-vs-reference checks)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the CUDA kernels cannot run here")

DEVICE = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BETAS = [-1.0, 0.0, 1.0, 3.0]
# Empty, tiny, not a multiple of the 4- or 8-element vectors, exactly one 64 Ki chunk, one
# element past it, and several chunks with a ragged end.
SIZES = [0, 1, 3, 4, 15, 17, 1025, 65536, 65537, 200003]
MANY_SIZES = [(i * 37) % 101 for i in range(1600)]  # 1600 tensors, a few empty
BAD_PLACES = [(0, 1, 0), (1, 2, -1), (0, 6, 1000), (1, 7, 65535), (0, 8, 65536), (1, 9, -1)]


@pytest.fixture(scope="module", autouse=True)
def cuda_ops():
    """Builds the extension once; on a machine with a GPU a failed build is a failure."""
    built = _build.build("cuda")
    assert built.ok, f"the cuda extension failed to build: {built.error} (log: {built.log_path})"
    return {name: _ops.op(name) for name in ("sgd_step_", "adam_step_", "extrapolate_")}


def hyper_id(hyper):
    return "-".join(f"{k}={v}" for k, v in hyper.items())


# ------------------------------------------------------------------------------------------------
# The op == the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("hyper", checks.SGD_HYPERS, ids=hyper_id)
def test_sgd_step_matches_reference(dtype, beta, hyper):
    checks.check_sgd(DEVICE, dtype, SIZES, hyper, beta=beta, prefix="")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("hyper", checks.ADAM_HYPERS, ids=hyper_id)
def test_adam_step_matches_reference(dtype, beta, hyper):
    checks.check_adam(DEVICE, dtype, SIZES, hyper, beta=beta, prefix="")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("alias_out", [False, True], ids=["out", "out_is_grads_lb"])
def test_extrapolate_matches_reference(dtype, beta, alias_out):
    checks.check_extrapolate(DEVICE, dtype, SIZES, beta=beta, alias_out=alias_out, prefix="")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_inverse_loss_scales(dtype):
    """AMP: each batch's gradient arrives multiplied by its own loss scale."""
    inv_scales = (1 / 1024, 1 / 256)
    checks.check_sgd(DEVICE, dtype, SIZES, checks.SGD_HYPERS[3], inv_scales=inv_scales,
                     prefix="")
    checks.check_adam(DEVICE, dtype, SIZES, checks.ADAM_HYPERS[3], inv_scales=inv_scales,
                      prefix="")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_more_tensors_than_one_launch_holds(dtype):
    checks.check_sgd(DEVICE, dtype, MANY_SIZES, checks.SGD_HYPERS[2], beta=3.0, prefix="")
    checks.check_adam(DEVICE, dtype, MANY_SIZES, checks.ADAM_HYPERS[3], beta=3.0, prefix="")
    checks.check_extrapolate(DEVICE, dtype, MANY_SIZES, beta=3.0, prefix="")


def offset_copy(t, offset):
    """A contiguous copy of t whose data starts `offset` elements into its storage."""
    storage = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = storage[offset:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_unaligned_tensors_take_the_scalar_path(cuda_ops, dtype, kind):
    """Tensors 1..3 elements off a 16-byte boundary, beside aligned ones, in one call."""
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    sizes = [65537, 1000, 70001, 33]
    offsets = [1, 0, 3, 2]

    def fresh(positive=False):
        out = []
        for n, offset in zip(sizes, offsets):
            t = torch.randn(n, generator=gen, device=DEVICE).to(dtype)
            out.append(offset_copy(t.abs() if positive else t, offset))
        return out

    params, g_b, g_lb = fresh(), fresh(), fresh()
    if kind == "sgd":
        state = [fresh()]
        kwargs = dict(checks.SGD_HYPERS[3], is_first_step=False)
    else:
        state = [fresh(), fresh(positive=True), fresh(positive=True),
                 [torch.full((), 4.0, device=DEVICE) for _ in sizes]]
        kwargs = dict(checks.ADAM_HYPERS[3])
    kwargs.update(scale_b=-2.0, scale_lb=3.0, check_finite=True)
    op, reference = cuda_ops[f"{kind}_step_"], getattr(_reference, f"{kind}_step_")
    expected = copy.deepcopy([params] + state)
    op(params, g_b, g_lb, *state, torch.zeros((), device=DEVICE), **kwargs)
    reference(expected[0], g_b, g_lb, *expected[1:], torch.zeros((), device=DEVICE), **kwargs)
    names = ["params", "state0", "state1", "state2"]
    for name, actual, wanted in zip(names, [params] + state[:3], expected[:4]):
        checks.assert_all_close(actual, wanted, dtype, name)


# ------------------------------------------------------------------------------------------------
# Skipped steps change nothing


@pytest.mark.parametrize("op_name", ["sgd_step_", "adam_step_", "extrapolate_"])
def test_found_inf_of_shape_one(op_name):
    checks.check_found_inf_of_shape_one(op_name, DEVICE, torch.float32, SIZES, prefix="")


@pytest.mark.parametrize("op_name", ["sgd_step_", "adam_step_", "extrapolate_"])
@pytest.mark.parametrize("check_finite", [False, True])
def test_found_inf_on_entry_changes_nothing(op_name, check_finite):
    found = checks.check_skipped(op_name, DEVICE, torch.float32, SIZES, found_on_entry=1.0,
                                 check_finite=check_finite, prefix="")
    assert found == 1.0


@pytest.mark.parametrize("op_name", ["sgd_step_", "adam_step_", "extrapolate_"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("place", BAD_PLACES, ids=lambda p: f"batch{p[0]}[{p[1]}][{p[2]}]")
def test_check_finite_skips_the_whole_step(op_name, dtype, bad, place):
    found = checks.check_skipped(op_name, DEVICE, dtype, SIZES, corrupt=(*place, bad), prefix="")
    assert found == 1.0


@pytest.mark.parametrize("op_name", ["sgd_step_", "adam_step_"])
@pytest.mark.parametrize("tensor", [0, 700, len(MANY_SIZES) - 1])
def test_check_finite_across_launches(op_name, tensor):
    """A NaN in the first, a middle or the last of 1600 tensors (several scan launches and
    several update launches) stops every update launch."""
    sizes = [max(n, 1) for n in MANY_SIZES]
    found = checks.check_skipped(op_name, DEVICE, torch.float32, sizes,
                                 corrupt=(1, tensor, -1, float("nan")), prefix="")
    assert found == 1.0


def test_without_check_finite_a_nonfinite_gradient_flows_through(cuda_ops):
    g_b = [torch.ones(20, device=DEVICE)]
    g_lb = [torch.ones(20, device=DEVICE)]
    g_b[0][3] = float("inf")
    out = [torch.zeros(20, device=DEVICE)]
    found_inf = torch.zeros((), device=DEVICE)
    cuda_ops["extrapolate_"](out, g_b, g_lb, found_inf, check_finite=False, scale_b=1.0,
                             scale_lb=1.0)
    assert found_inf.item() == 0.0
    assert out[0][3].item() == float("inf") and out[0][0].item() == 2.0


# ------------------------------------------------------------------------------------------------
# Large tensors, host syncs, CUDA graphs, launches

HUGE = (1 << 31) + 4099  # past int32 indexing, with a ragged last chunk


def free_gib():
    return torch.cuda.mem_get_info()[0] / 2 ** 30


@pytest.mark.skipif(not torch.cuda.is_available() or free_gib() < 16,
                    reason="needs 16 GiB of free GPU memory")
def test_tensor_over_two_billion_elements(cuda_ops):
    """float16 SGD on one tensor of 2^31 + 4099 elements (12 GiB for p, g_b, g_lb): the
    elements around 2^31 and at the end are updated, and match the reference on slices."""
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    p = torch.randn(HUGE, generator=gen, device=DEVICE, dtype=torch.float16)
    g_b = torch.randn(HUGE, generator=gen, device=DEVICE, dtype=torch.float16)
    g_lb = torch.randn(HUGE, generator=gen, device=DEVICE, dtype=torch.float16)
    windows = [slice(0, 4096), slice((1 << 31) - 2048, (1 << 31) + 2048),
               slice(HUGE - 70000, HUGE)]
    before = [p[w].clone() for w in windows]
    hyper = dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.01,
                 maximize=False, is_first_step=False, scale_b=-1.0, scale_lb=2.0,
                 check_finite=True)
    found_inf = torch.zeros((), device=DEVICE)
    cuda_ops["sgd_step_"]([p], [g_b], [g_lb], [], found_inf, **hyper)
    assert found_inf.item() == 0.0
    for w, start in zip(windows, before):
        expected = [start.clone()]
        _reference.sgd_step_(expected, [g_b[w]], [g_lb[w]], [], torch.zeros((), device=DEVICE),
                             **hyper)
        checks.assert_all_close([p[w]], expected, torch.float16, f"params[{w}]")
    del p, g_b, g_lb
    torch.cuda.empty_cache()


def adam_problem(n_tensors, numel, dtype=torch.float32, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def tensors(scale=1.0, positive=False):
        out = [torch.randn(numel, generator=gen, device=DEVICE, dtype=dtype) * scale
               for _ in range(n_tensors)]
        return [t.abs() for t in out] if positive else out

    return dict(params=tensors(), grads_b=tensors(), grads_lb=tensors(), exp_avgs=tensors(0.1),
                exp_avg_sqs=tensors(0.01, positive=True), max_exp_avg_sqs=[],
                state_steps=[torch.full((), float(i % 4), device=DEVICE)
                             for i in range(n_tensors)])


ADAMW = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=False,
             maximize=False, decoupled_weight_decay=True, scale_b=-1.0, scale_lb=2.0)


def call_adam(op, problem, found_inf, check_finite=True):
    op(problem["params"], problem["grads_b"], problem["grads_lb"], problem["exp_avgs"],
       problem["exp_avg_sqs"], problem["max_exp_avg_sqs"], problem["state_steps"], found_inf,
       **ADAMW, check_finite=check_finite)


def test_a_step_never_syncs_with_the_host(cuda_ops):
    problem = adam_problem(20, 3000)
    found_inf = torch.zeros((), device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call_adam(cuda_ops["adam_step_"], problem, found_inf)
        cuda_ops["sgd_step_"](problem["params"], problem["grads_b"], problem["grads_lb"],
                              problem["exp_avgs"], found_inf, lr=0.1, momentum=0.9,
                              dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False,
                              is_first_step=False, scale_b=-1.0, scale_lb=2.0, check_finite=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_captured_op_replays_like_eager_calls(cuda_ops):
    """adam_step_ captured once and replayed three times == three eager calls, bit for bit: the
    step counts live on the device and advance on every replay."""
    eager = adam_problem(30, 5000)
    graphed = copy.deepcopy(eager)
    found_eager = torch.zeros((), device=DEVICE)
    found_graphed = torch.zeros((), device=DEVICE)
    new_grads = [adam_problem(30, 5000, seed=s)["grads_lb"] for s in (1, 2, 3)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
        scratch = copy.deepcopy(graphed)
        call_adam(cuda_ops["adam_step_"], scratch, torch.zeros((), device=DEVICE))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call_adam(cuda_ops["adam_step_"], graphed, found_graphed)
    for grads in new_grads:
        for static, eager_grad, new in zip(graphed["grads_lb"], eager["grads_lb"], grads):
            static.copy_(new)
            eager_grad.copy_(new)
        graph.replay()
        call_adam(cuda_ops["adam_step_"], eager, found_eager)
    torch.cuda.synchronize()
    for key in ("params", "exp_avgs", "exp_avg_sqs", "state_steps"):
        for a, b in zip(graphed[key], eager[key]):
            assert torch.equal(a, b), key
    assert [s.item() for s in graphed["state_steps"]] == [float(i % 4 + 3) for i in range(30)]


@pytest.mark.parametrize("kind,hyper", [
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1)),
])
def test_captured_gerne_step_replays_like_eager_steps(kind, hyper):
    """A full GERNE(backend="cuda") step (found_inf, check_finite, the fused update, the skip
    counter) captured in a CUDA graph and replayed, against the same steps run eagerly."""
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    shapes = [(64, 33), (33,), (1000, 7), (5,)]
    start = [torch.randn(s, generator=gen, device=DEVICE) for s in shapes]
    grads = [([torch.randn(s, generator=gen, device=DEVICE) for s in shapes],
              [torch.randn(s, generator=gen, device=DEVICE) for s in shapes]) for _ in range(5)]

    def make():
        params = [torch.nn.Parameter(t.clone()) for t in start]
        return params, gk.GERNE(params, optimizer=kind, beta=2.0, backend="cuda", **hyper)

    def eager_step(params, opt, g_b, g_lb):
        for p, g in zip(params, g_b):
            p.grad = g.clone()
        opt.stash_biased()
        for p, g in zip(params, g_lb):
            p.grad = g.clone()
        opt.step()

    eager_params, eager_opt = make()
    graph_params, graph_opt = make()
    static_b = [torch.zeros_like(t) for t in start]
    static_lb = [torch.zeros_like(t) for t in start]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the first step creates the state (and reads found_inf once)
        eager_step(graph_params, graph_opt, *grads[0])
    torch.cuda.current_stream().wait_stream(side)
    eager_step(eager_params, eager_opt, *grads[0])

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for p, g in zip(graph_params, static_b):
            p.grad = g
        graph_opt.stash_biased()
        for p, g in zip(graph_params, static_lb):
            p.grad = g
        graph_opt.step()
    for g_b, g_lb in grads[1:]:
        for static, new in zip(static_b + static_lb, g_b + g_lb):
            static.copy_(new)
        graph.replay()
        eager_step(eager_params, eager_opt, g_b, g_lb)
    torch.cuda.synchronize()
    for a, b in zip(graph_params, eager_params):
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(graph_params, eager_params):
        for key, value in eager_opt.state[b].items():
            if torch.is_tensor(value) and key != "grad_b":
                assert torch.equal(graph_opt.state[a][key], value), key


def count_kernel_launches(fn):
    from torch.profiler import ProfilerActivity, profile
    fn()  # warm-up: lazy initialisation must not count
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels), sorted({e.name for e in kernels})


def test_at_most_four_launches_per_step_for_200_tensors(cuda_ops):
    problem = adam_problem(200, 4096)
    found_inf = torch.zeros((), device=DEVICE)
    launches, names = count_kernel_launches(
        lambda: call_adam(cuda_ops["adam_step_"], problem, found_inf))
    assert launches <= 4, names  # the scan, the step counts, the update
    launches, names = count_kernel_launches(lambda: cuda_ops["sgd_step_"](
        problem["params"], problem["grads_b"], problem["grads_lb"], problem["exp_avgs"],
        found_inf, lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
        maximize=False, is_first_step=False, scale_b=-1.0, scale_lb=2.0, check_finite=True))
    assert launches <= 2, names  # the scan, the update


# ------------------------------------------------------------------------------------------------
# Errors name the argument


def test_tensors_on_two_devices_are_rejected(cuda_ops):
    params = [torch.randn(3, device=DEVICE)]
    with pytest.raises(RuntimeError, match=r"grads_b\[0\] is on cpu"):
        cuda_ops["extrapolate_"](params, [torch.randn(3)], [torch.randn(3, device=DEVICE)],
                                 torch.zeros((), device=DEVICE), scale_b=-1.0, scale_lb=2.0,
                                 check_finite=True)
    with pytest.raises(RuntimeError, match="found_inf must be a float32 tensor"):
        cuda_ops["extrapolate_"](params, [torch.randn(3, device=DEVICE)], params,
                                 torch.zeros(()), scale_b=-1.0, scale_lb=2.0, check_finite=True)


def test_step_counters_on_the_host_are_rejected(cuda_ops):
    problem = adam_problem(2, 10)
    problem["state_steps"][1] = torch.zeros(())
    with pytest.raises(RuntimeError, match=r"state_steps\[1\] must be a one-element float32"):
        call_adam(cuda_ops["adam_step_"], problem, torch.zeros((), device=DEVICE))
