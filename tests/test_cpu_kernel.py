"""The fused C++ CPU ops against the pure-PyTorch reference (the specification) and torch.optim.

Every test runs the op and the reference on identical copies of the same random inputs, several
steps in a row so that the optimizer state is exercised, and compares every tensor. float32 must
agree to float rounding; bfloat16 and float16 compute in float32 and round once on store, so they
may differ from the reference by one unit in the last place where the float32 results straddle a
rounding boundary.
"""

import os

import pytest
import torch

import gerne_kernels as gk
from gerne_kernels import _build, _ops, _reference
from gerne_testing import require_cpu_build

REQUIRE_ENV = "GERNE_KERNELS_REQUIRE_CPU"

# Odd sizes leave a scalar tail after the 16- or 32-element SIMD blocks; 0-size tensors have no
# elements at all; 40000 makes the total large enough for the parallel path (two threads). The
# test with a tensor over 1M elements covers several chunks per tensor.
SHAPES = [(0,), (1,), (15,), (17,), (3, 11), (2, 0, 3), (1025,), (40000,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BETAS = [-1.0, 0.0, 1.0, 3.0]
STEPS = 3
# Relative to the largest magnitude in the tensor list: a difference in the last place of a large
# intermediate (4 g_lb - 3 g_b cancels) shows up as an absolute error in a small result.
TOLERANCE = {  # float32 to rounding, reduced types to one unit in the last place
    torch.float32: 2e-6,
    torch.bfloat16: 2 ** -7,
    torch.float16: 2 ** -10,
}


@pytest.fixture(scope="module")
def cpu_ops():
    require_cpu_build()
    return {name: _ops.op(name) for name in ("sgd_step_", "adam_step_", "extrapolate_")}


def test_cpu_extension_builds_when_required():
    if os.environ.get(REQUIRE_ENV) != "1":
        pytest.skip(f"{REQUIRE_ENV}=1 is not set (CI sets it); the other tests skip if the "
                    "build fails")
    built = _build.build("cpu")
    assert built.ok, f"the cpu extension failed to build: {built.error} (log: {built.log_path})"


# ------------------------------------------------------------------------------------------------
# Helpers


def random_list(dtype, shapes=SHAPES, positive=False):
    tensors = [torch.randn(shape).to(dtype) for shape in shapes]
    return [t.abs() for t in tensors] if positive else tensors


def clones(tensors):
    return [t.clone() for t in tensors]


def flat(tensors):
    return torch.cat([t.float().flatten() for t in tensors]) if tensors else torch.zeros(0)


def assert_lists_close(actual, expected, dtype, what):
    """All tensors of a list at once (one comparison is much faster than one per tensor)."""
    assert [a.shape for a in actual] == [e.shape for e in expected]
    a, e = flat(actual), flat(expected)
    rtol = TOLERANCE[dtype]
    atol = rtol * max(1.0, e.abs().max().item() if e.numel() else 0.0)
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what} (all tensors flattened, concatenated): {m}")


def assert_unchanged(after, before):
    """Bit for bit, NaN included."""
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def scales(beta, inv_scale_b=1.0, inv_scale_lb=1.0):
    return dict(scale_b=-beta * inv_scale_b, scale_lb=(1.0 + beta) * inv_scale_lb)


def gradients(dtype, shapes, loss_scale_b, loss_scale_lb):
    """g_b and g_lb as a loss-scaled backward would leave them."""
    g_b = [(torch.randn(s) * loss_scale_b).to(dtype) for s in shapes]
    g_lb = [(torch.randn(s) * loss_scale_lb).to(dtype) for s in shapes]
    return g_b, g_lb


SGD_HYPER = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(momentum=0.9, dampening=0.25, nesterov=False, weight_decay=0.01, maximize=False),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, maximize=False),
    dict(momentum=0.5, dampening=0.0, nesterov=True, weight_decay=0.0, maximize=True),
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.1, maximize=True),
]

ADAM_HYPER = [
    dict(weight_decay=0.0, amsgrad=False, maximize=False, decoupled_weight_decay=False),
    dict(weight_decay=0.1, amsgrad=False, maximize=False, decoupled_weight_decay=False),
    dict(weight_decay=0.1, amsgrad=False, maximize=False, decoupled_weight_decay=True),
    dict(weight_decay=0.01, amsgrad=True, maximize=False, decoupled_weight_decay=True),
    dict(weight_decay=0.0, amsgrad=True, maximize=True, decoupled_weight_decay=False),
]


class SgdProblem:
    """Parameters and momentum buffers for the op and, separately, for the reference."""

    def __init__(self, dtype, shapes, hyper):
        self.dtype, self.shapes, self.hyper = dtype, shapes, hyper
        self.params = random_list(dtype, shapes)
        # The first step overwrites the buffers without reading them: their content must not
        # matter, so op and reference start from different values.
        self.buffers = random_list(dtype, shapes) if hyper["momentum"] else []
        self.ref_params = clones(self.params)
        self.ref_buffers = ([torch.full_like(p, 7.0) for p in self.params]
                            if hyper["momentum"] else [])

    def step(self, op, grads_b, grads_lb, found_inf, step, **kwargs):
        op(self.params, grads_b, grads_lb, self.buffers, found_inf, lr=0.05,
           is_first_step=step == 0, **self.hyper, **kwargs)

    def ref_step(self, grads_b, grads_lb, step, **kwargs):
        _reference.sgd_step_(self.ref_params, grads_b, grads_lb, self.ref_buffers,
                             torch.zeros(()), lr=0.05, is_first_step=step == 0, **self.hyper,
                             **kwargs)

    def state(self):
        return self.params + self.buffers

    def check(self):
        assert_lists_close(self.params, self.ref_params, self.dtype, "params")
        assert_lists_close(self.buffers, self.ref_buffers, self.dtype, "momentum_buffers")


class AdamProblem:
    """Parameters, moments and per-tensor step counts (different ones) for op and reference."""

    def __init__(self, dtype, shapes, hyper):
        self.dtype, self.shapes, self.hyper = dtype, shapes, hyper
        self.params = random_list(dtype, shapes)
        self.exp_avgs = random_list(dtype, shapes)
        self.exp_avg_sqs = random_list(dtype, shapes, positive=True)
        self.max_exp_avg_sqs = random_list(dtype, shapes, positive=True) if hyper["amsgrad"] else []
        self.steps = [torch.tensor(float(i % 3 * 5)) for i in range(len(shapes))]
        self.ref = [clones(x) for x in (self.params, self.exp_avgs, self.exp_avg_sqs,
                                         self.max_exp_avg_sqs, self.steps)]

    def _args(self, tensors, grads_b, grads_lb):
        params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = tensors
        return params, grads_b, grads_lb, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps

    def tensors(self):
        return [self.params, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs, self.steps]

    def step(self, op, grads_b, grads_lb, found_inf, step, **kwargs):
        op(*self._args(self.tensors(), grads_b, grads_lb), found_inf, lr=0.01, beta1=0.9,
           beta2=0.99, eps=1e-8, **self.hyper, **kwargs)

    def ref_step(self, grads_b, grads_lb, step, **kwargs):
        _reference.adam_step_(*self._args(self.ref, grads_b, grads_lb), torch.zeros(()),
                              lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, **self.hyper, **kwargs)

    def state(self):
        return [t for group in self.tensors() for t in group]

    def check(self):
        names = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
        for name, actual, expected in zip(names, self.tensors(), self.ref):
            assert_lists_close(actual, expected, self.dtype, name)
        assert [float(s) for s in self.steps] == [float(s) for s in self.ref[4]]


def run_against_reference(op, problem, beta, inv_scale_b=1.0, inv_scale_lb=1.0):
    for step in range(STEPS):
        g_b, g_lb = gradients(problem.dtype, problem.shapes, 1 / inv_scale_b, 1 / inv_scale_lb)
        found_inf = torch.zeros(())
        kwargs = dict(check_finite=True, **scales(beta, inv_scale_b, inv_scale_lb))
        problem.step(op, g_b, g_lb, found_inf, step, **kwargs)
        problem.ref_step(g_b, g_lb, step, **kwargs)
        assert float(found_inf) == 0.0
        problem.check()


# ------------------------------------------------------------------------------------------------
# Fused op == reference


def hyper_id(hyper):
    return "-".join(f"{k}={v}" for k, v in hyper.items())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("hyper", SGD_HYPER, ids=hyper_id)
def test_sgd_step_matches_reference(cpu_ops, dtype, beta, hyper):
    run_against_reference(cpu_ops["sgd_step_"], SgdProblem(dtype, SHAPES, hyper), beta)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("hyper", ADAM_HYPER, ids=hyper_id)
def test_adam_step_matches_reference(cpu_ops, dtype, beta, hyper):
    run_against_reference(cpu_ops["adam_step_"], AdamProblem(dtype, SHAPES, hyper), beta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_inverse_loss_scales(cpu_ops, dtype, kind):
    """AMP: each batch's gradient arrives multiplied by its own loss scale."""
    problem = (SgdProblem(dtype, SHAPES, SGD_HYPER[3]) if kind == "sgd"
               else AdamProblem(dtype, SHAPES, ADAM_HYPER[3]))
    run_against_reference(cpu_ops[f"{kind}_step_"], problem, beta=1.0, inv_scale_b=1 / 1024,
                          inv_scale_lb=1 / 256)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_one_large_tensor_and_many_small_ones(cpu_ops, kind):
    """A tensor over 1M elements beside 300 tiny ones: chunking and thread groups cut both."""
    shapes = [((1 << 20) + 3,)] + [(i % 40,) for i in range(300)]
    problem = (SgdProblem(torch.float32, shapes, SGD_HYPER[2]) if kind == "sgd"
               else AdamProblem(torch.float32, shapes, ADAM_HYPER[3]))
    run_against_reference(cpu_ops[f"{kind}_step_"], problem, beta=3.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("alias", [False, True], ids=["out", "out_is_grads_lb"])
def test_extrapolate_matches_reference(cpu_ops, dtype, beta, alias):
    g_b, g_lb = gradients(dtype, SHAPES, 4.0, 2.0)
    expected = [torch.empty_like(g) for g in g_lb]
    _reference.extrapolate_(expected, g_b, g_lb, torch.zeros(()), check_finite=True,
                            **scales(beta, 0.25, 0.5))
    out = g_lb if alias else [torch.empty_like(g) for g in g_lb]
    cpu_ops["extrapolate_"](out, g_b, g_lb, torch.zeros(()), check_finite=True,
                            **scales(beta, 0.25, 0.5))
    assert_lists_close(out, expected, dtype, "out")


def test_empty_lists_are_a_no_op(cpu_ops):
    found_inf = torch.zeros(())
    cpu_ops["sgd_step_"]([], [], [], [], found_inf, lr=0.1, momentum=0.9, dampening=0.0,
                         nesterov=False, weight_decay=0.0, maximize=False, is_first_step=True,
                         check_finite=True, **scales(1.0))
    cpu_ops["adam_step_"]([], [], [], [], [], [], [], found_inf, lr=0.1, beta1=0.9, beta2=0.99,
                          eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                          decoupled_weight_decay=True, check_finite=True, **scales(1.0))
    cpu_ops["extrapolate_"]([], [], [], found_inf, check_finite=True, **scales(1.0))
    assert float(found_inf) == 0.0


# ------------------------------------------------------------------------------------------------
# Skipped steps change nothing


def make_problem(kind, dtype, shapes):
    if kind == "sgd":
        return SgdProblem(dtype, shapes, SGD_HYPER[3])
    return AdamProblem(dtype, shapes, ADAM_HYPER[3])


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("check_finite", [False, True])
def test_found_inf_on_entry_changes_nothing(cpu_ops, kind, check_finite):
    problem = make_problem(kind, torch.float32, SHAPES)
    g_b, g_lb = gradients(torch.float32, SHAPES, 1.0, 1.0)
    g_lb[-1][5] = float("nan")  # must not even be looked at
    before = clones(problem.state())
    found_inf = torch.tensor(1.0)
    problem.step(cpu_ops[f"{kind}_step_"], g_b, g_lb, found_inf, step=1,
                 check_finite=check_finite, **scales(1.0))
    assert float(found_inf) == 1.0
    assert_unchanged(problem.state(), before)


INF, NAN = float("inf"), float("nan")
# The bad value and where it sits: (value, which gradient, tensor index, element index); -1 is the
# last element, in the scalar tail of a size that is not a multiple of the SIMD block; tensor 7
# (40000 elements) is split between the two threads.
BAD_PLACES = [(INF, "g_b", 1, 0), (NAN, "g_lb", 2, -1), (-INF, "g_b", 6, 500),
              (NAN, "g_lb", 6, -1), (INF, "g_b", 7, 39000), (-INF, "g_lb", 7, -1),
              (NAN, "g_lb", 3, 16), (NAN, "g_b", 7, 3)]


@pytest.mark.parametrize("kind", ["sgd", "adam", "extrapolate"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("place", BAD_PLACES, ids=lambda p: f"{p[0]}@{p[1]}[{p[2]}][{p[3]}]")
def test_check_finite_skips_the_whole_step(cpu_ops, kind, dtype, place):
    bad, which, tensor, index = place
    g_b, g_lb = gradients(dtype, SHAPES, 1.0, 1.0)
    (g_b if which == "g_b" else g_lb)[tensor].view(-1)[index] = bad
    found_inf = torch.zeros(())
    if kind == "extrapolate":
        out = [torch.zeros_like(g) for g in g_lb]
        cpu_ops["extrapolate_"](out, g_b, g_lb, found_inf, check_finite=True, **scales(1.0))
        state, before = out, [torch.zeros_like(g) for g in g_lb]
    else:
        problem = make_problem(kind, dtype, SHAPES)
        before = clones(problem.state())
        problem.step(cpu_ops[f"{kind}_step_"], g_b, g_lb, found_inf, step=1, check_finite=True,
                     **scales(1.0))
        state = problem.state()
    assert float(found_inf) == 1.0
    assert_unchanged(state, before)


def test_large_finite_gradients_are_not_flagged(cpu_ops):
    """The scan flags inf and NaN only: the largest finite float32 and -0.0 pass."""
    g_b = [torch.full((33,), torch.finfo(torch.float32).max), torch.full((5,), -0.0)]
    g_lb = [torch.full((33,), -torch.finfo(torch.float32).max), torch.zeros(5)]
    found_inf = torch.zeros(())
    out = [torch.empty_like(g) for g in g_lb]
    cpu_ops["extrapolate_"](out, g_b, g_lb, found_inf, check_finite=True, scale_b=1.0,
                            scale_lb=1.0)
    assert float(found_inf) == 0.0
    assert torch.equal(out[0], torch.zeros(33))


def test_without_check_finite_a_nonfinite_gradient_flows_through(cpu_ops):
    g_b, g_lb = [torch.ones(20)], [torch.ones(20)]
    g_b[0][3] = float("inf")
    out = [torch.zeros(20)]
    found_inf = torch.zeros(())
    cpu_ops["extrapolate_"](out, g_b, g_lb, found_inf, check_finite=False, scale_b=1.0,
                            scale_lb=1.0)
    assert float(found_inf) == 0.0
    assert out[0][3] == float("inf") and out[0][0] == 2.0


# ------------------------------------------------------------------------------------------------
# Errors: raised before anything is written, naming the argument


def sgd_args(params, grads_b=None, grads_lb=None, buffers=None, found_inf=None):
    grads_b = [torch.randn_like(p) for p in params] if grads_b is None else grads_b
    grads_lb = [torch.randn_like(p) for p in params] if grads_lb is None else grads_lb
    buffers = [torch.zeros_like(p) for p in params] if buffers is None else buffers
    found_inf = torch.zeros(()) if found_inf is None else found_inf
    return (params, grads_b, grads_lb, buffers, found_inf)


SGD_KWARGS = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
                  maximize=False, is_first_step=False, check_finite=True, scale_b=-1.0,
                  scale_lb=2.0)


def two_params():
    return [torch.randn(4, 3), torch.randn(5)]


@pytest.mark.parametrize("case,words", [
    (lambda: sgd_args(two_params(), grads_b=[torch.randn(4, 3)]),
     ["grads_b has 1", "params has 2"]),
    (lambda: sgd_args(two_params(), buffers=[]), ["momentum_buffers has 0"]),
    (lambda: sgd_args(two_params(), grads_lb=[torch.randn(4, 3), torch.randn(5).half()]),
     ["grads_lb[1]", "Half", "Float"]),
    (lambda: sgd_args(two_params(), grads_lb=[torch.randn(4, 3), torch.randn(6)]),
     ["grads_lb[1]", "shape"]),
    (lambda: sgd_args(two_params(), grads_b=[torch.randn(3, 4).t(), torch.randn(5)]),
     ["grads_b[0]", "not contiguous"]),
    (lambda: sgd_args([torch.randn(3, 4).t()]), ["params[0]", "not contiguous"]),
    (lambda: sgd_args([torch.randn(3, dtype=torch.float64)]), ["params[0]", "Double"]),
    (lambda: sgd_args([torch.randn(3), torch.randn(3).bfloat16()]), ["params[1]", "one dtype"]),
    (lambda: sgd_args(two_params(), found_inf=torch.zeros((), dtype=torch.float64)),
     ["found_inf", "float32"]),
])
def test_sgd_errors(cpu_ops, case, words):
    args = case()
    before = clones(args[0])
    with pytest.raises(RuntimeError) as info:
        cpu_ops["sgd_step_"](*args, **SGD_KWARGS)
    for word in words:
        assert word in str(info.value)
    assert_unchanged(args[0], before)


def adam_call(op, params, steps, max_exp_avg_sqs=()):
    zeros = [torch.zeros_like(p) for p in params]
    op(params, clones(zeros), clones(zeros), clones(zeros), clones(zeros), list(max_exp_avg_sqs),
       steps, torch.zeros(()), lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
       amsgrad=bool(max_exp_avg_sqs) or not steps, maximize=False, decoupled_weight_decay=True,
       check_finite=True, scale_b=-1.0, scale_lb=2.0)


@pytest.mark.parametrize("steps,words", [
    ([torch.zeros(())], ["state_steps has 1", "params has 2"]),
    ([torch.zeros(()), torch.zeros((), dtype=torch.int64)], ["state_steps[1]", "float32"]),
    ([torch.zeros(()), torch.zeros(2)], ["state_steps[1]", "one-element"]),
])
def test_adam_step_counter_errors(cpu_ops, steps, words):
    with pytest.raises(RuntimeError) as info:
        adam_call(cpu_ops["adam_step_"], two_params(), steps)
    for word in words:
        assert word in str(info.value)


def test_adam_float64_step_counters(cpu_ops):
    """torch.optim makes float64 steps when the default dtype is float64; they count as well."""
    problem = AdamProblem(torch.float32, SHAPES, ADAM_HYPER[2])
    problem.steps = [s.double() for s in problem.steps]
    problem.ref[4] = [s.double() for s in problem.ref[4]]
    run_against_reference(cpu_ops["adam_step_"], problem, beta=1.0)
    assert all(s.dtype == torch.float64 for s in problem.steps)


def test_adam_amsgrad_needs_max_exp_avg_sqs(cpu_ops):
    with pytest.raises(RuntimeError, match="max_exp_avg_sqs has 0"):
        adam_call(cpu_ops["adam_step_"], two_params(), [])


def test_tensors_on_another_device_are_rejected(cpu_ops):
    """The CPU kernel itself, reached by redispatching to the CPU key, names the device."""
    params = [torch.randn(3)]
    grads = [torch.randn(3, device="meta")]
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=r"grads_b\[0\] is on meta"):
        cpu_ops["extrapolate_"].redispatch(keys, params, grads, [torch.randn(3)], torch.zeros(()),
                                           scale_b=-1.0, scale_lb=2.0, check_finite=True)


# ------------------------------------------------------------------------------------------------
# End to end: GERNE(backend="cpu") with g_b == g_lb is torch.optim


TRAJECTORY_SHAPES = [(7, 5), (33,), (1,), (300,), (2, 3, 4)]


def trajectory_gradient(p, step):
    """A deterministic gradient that depends on the parameters, as a real loss's would, and
    smoothly (Lipschitz 0.5), so that rounding differences are not amplified step after step."""
    return 0.3 * p + 0.2 * torch.sin(p + step)


@pytest.mark.parametrize("kind,torch_cls,hyper", [
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.8, dampening=0.3, maximize=True)),
    ("sgd", torch.optim.SGD, dict(lr=0.05, weight_decay=0.1)),
    ("adam", torch.optim.Adam, dict(lr=0.01, weight_decay=0.01)),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, betas=(0.8, 0.95), maximize=True)),
])
@pytest.mark.parametrize("beta", [-1.0, 1.0, 3.0])
def test_gerne_cpu_with_equal_batches_is_torch_optim(cpu_ops, kind, torch_cls, hyper, beta):
    start = [torch.randn(shape) for shape in TRAJECTORY_SHAPES]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    opt = gk.GERNE(ours, optimizer=kind, beta=beta, backend="cpu", **hyper)
    reference = torch_cls(theirs, foreach=False, **hyper)
    for step in range(25):
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
                                   msg=lambda m: f"parameter {i} after 25 steps: {m}")
