"""What every op of _ops.OPS promises on every backend, beyond its math (tests/ops/test_<op>.py):

- an update op only reads found_inf: non-zero on entry, the call changes nothing at all (every
  tensor bit for bit, Adam's step counts included), and it never looks for inf or NaN itself;
- found_inf may be any one-element float32 tensor (GradScaler's have shape (1,));
- empty lists, and lists of empty tensors, change nothing (but Adam's step counts, which count
  calls, as the reference's do);
- the .tensor overload (lr, scale_b, scale_lb as one-element float32 or float64 tensors) gives
  the .default overload's bits; the reference takes either;
- torch.library.opcheck passes (schema, fake tensors, AOT dispatch) on sample inputs, and
  torch.compile(fullgraph=True) traces a call without a graph break and runs what eager runs;
- a bad argument raises before anything is written, with a message naming it.
"""

import dataclasses
import os
from typing import Callable

import pytest
import torch

import harness
from gerne_kernels import _build, _ops
from gerne_testing import REQUIRE_CPU_ENV

OPS = harness.OP_NAMES
UPDATE_OPS = harness.UPDATE_OPS


def test_every_op_has_a_problem_builder_and_variants():
    """A new op of _ops.OPS needs its builder, variants and default hyperparameters in the
    harness before the tests can run it."""
    for table in (harness.BUILDERS, harness.VARIANTS, harness.DEFAULT_HYPERS):
        assert set(table) == set(OPS)


def test_the_cpu_backend_builds_where_required():
    """In CI (GERNE_KERNELS_REQUIRE_CPU=1) the C++ CPU kernels must build; elsewhere the cpu
    backend's tests skip with the build error."""
    if os.environ.get(REQUIRE_CPU_ENV) != "1":
        pytest.skip(f"{REQUIRE_CPU_ENV}=1 is not set (CI sets it); the cpu tests skip if the "
                    "build fails")
    built = _build.build("cpu")
    assert built.ok, f"the cpu extension failed to build: {built.error} (log: {built.log_path})"


def test_tensor_overload_schemas():
    """.tensor: lr, scale_b and scale_lb as Tensors; everything else as in .default."""
    for spec in _ops.OPS:
        for name in (spec.name, spec.triton_name):
            default = str(_ops.op(name)._schema)
            tensor = str(_ops.op(name, "tensor")._schema)
            assert "Tensor scale_b" in tensor and "Tensor scale_lb" in tensor, tensor
            assert ("Tensor lr" in tensor) == ("float lr" in default), tensor
            assert "float scale" not in tensor and "float lr" not in tensor, tensor


# ---------------------------------------------------------------------------------------------
# found_inf


@pytest.mark.parametrize("found", [1.0, 2.5])
@pytest.mark.parametrize("op_name", UPDATE_OPS)
def test_found_inf_on_entry_changes_nothing(backend, op_name, found):
    """Not a bit changes, although a gradient holds a NaN (which must not even be looked at)
    and the step would be a first one (SGD's momentum buffers, NaN, are not written)."""
    problem = harness.build(op_name, backend, shapes=backend.sizes.shapes)
    problem.tensors["grads_lb"][-1].view(-1)[-1] = float("nan")
    problem.tensors["found_inf"].fill_(found)
    before = problem.copy()
    problem.call(backend.op(op_name), step=0)
    harness.assert_unchanged(problem, before)


@pytest.mark.parametrize("op_name", UPDATE_OPS)
def test_update_ops_never_look_for_nonfinite_gradients(backend, op_name):
    """inf in a gradient: found_inf stays 0 (scan_ is the op that looks)."""
    problem = harness.build(op_name, backend, shapes=[(20,), (3,)])
    problem.tensors["grads_b"][0][3] = float("inf")
    problem.call(backend.op(op_name), step=0)
    assert float(problem.tensors["found_inf"]) == 0.0


def test_a_nonfinite_gradient_flows_through_extrapolate(backend):
    g_b = [torch.ones(20, device=backend.device)]
    g_lb = [torch.ones(20, device=backend.device)]
    g_b[0][3] = float("inf")
    out = [torch.zeros(20, device=backend.device)]
    found_inf = torch.zeros((), device=backend.device)
    backend.op("extrapolate_")(out, g_b, g_lb, found_inf, scale_b=1.0, scale_lb=1.0)
    assert float(found_inf) == 0.0
    assert out[0][3].item() == float("inf") and out[0][0].item() == 2.0


@pytest.mark.parametrize("op_name", OPS)
def test_found_inf_of_shape_one(backend, op_name):
    """found_inf of shape (1,): the op gives what the oracle gives with a 0-d found_inf; an
    update op skips on ones(1); scan_ sets it to [1.0] on a NaN."""
    problem = harness.build(op_name, backend, shapes=backend.sizes.shapes)
    problem.tensors["found_inf"] = torch.zeros(1, device=backend.device)
    before = problem.copy()
    expected = harness.oracle_problem(backend, problem)
    expected.tensors["found_inf"] = torch.zeros((), device=backend.device)
    problem.call(backend.op(op_name), step=0)
    expected.call(harness.reference_op(op_name), step=0)
    harness.compare_step(problem, expected, before)
    assert problem.tensors["found_inf"].shape == (1,)

    flagged = before.copy()
    if op_name in UPDATE_OPS:
        flagged.tensors["found_inf"].fill_(1.0)
        untouched = flagged.copy()
        flagged.call(backend.op(op_name), step=0)
        harness.assert_unchanged(flagged, untouched)
    else:
        flagged.tensors["grads_b"][-1].view(-1)[0] = float("nan")
        flagged.call(backend.op(op_name))
        assert flagged.tensors["found_inf"].tolist() == [1.0]


# ---------------------------------------------------------------------------------------------
# Empty calls


@pytest.mark.parametrize("op_name", OPS)
def test_empty_lists_change_nothing(backend, op_name):
    problem = harness.build(op_name, backend, shapes=())
    before = problem.copy()
    problem.call(backend.op(op_name), step=0)
    harness.assert_unchanged(problem, before)


@pytest.mark.parametrize("op_name", OPS)
def test_empty_tensors_change_nothing_but_step_counts(backend, op_name):
    """Only empty tensors: no element to update; found_inf and the sums stay as they were;
    Adam still counts a step for every tensor, as the oracle does."""
    problem = harness.build(op_name, backend, shapes=[(0,), (2, 0, 3)], steps=2)
    before = problem.copy()
    harness.run_against_oracle(backend, problem)
    harness.assert_unchanged(problem, before, [n for n in problem.tensors if n != "state_steps"])


# ---------------------------------------------------------------------------------------------
# .tensor == .default

# lr factor and beta per step: the values move from step to step, as schedules move them.
SCHEDULE = [(1.0, 1.0), (0.5, 0.3), (0.125, 2.0)]


@pytest.mark.parametrize("scalar_dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("op_name", OPS)
def test_tensor_overload_matches_the_default_overload(backend, op_name, scalar_dtype):
    """lr, scale_b and scale_lb as tensors on the device give the bits that the same values
    as floats give (float32 tensors round them: the floats are the tensors' values), over
    steps whose lr and beta change."""
    shapes = backend.sizes.shapes
    problem = harness.build(op_name, backend, shapes=shapes, steps=len(SCHEDULE))
    runs = []
    for tensor_scalars in (False, True):
        run = problem.copy()
        op = backend.op(op_name, tensor_scalars)
        for step, (lr_factor, beta) in enumerate(SCHEDULE):
            values = dict(zip(("scale_b", "scale_lb"), harness.scales(beta, 0.5, 0.25)))
            if "lr" in run.scalars:
                values["lr"] = problem.scalars["lr"] * lr_factor
            tensors = {name: torch.tensor(v, dtype=scalar_dtype, device=backend.device)
                       for name, v in values.items()}
            scalars = tensors if tensor_scalars else {n: float(t) for n, t in tensors.items()}
            run.use_step(step).call(op, step, **scalars)
        runs.append(run)
    for name, value in runs[0].written().items():
        harness.assert_bitwise_equal(runs[1].tensors[name], value, f"{op_name} {name}")
    harness.assert_something_written(runs[0], problem)


@pytest.mark.parametrize("bad", [torch.tensor([0.1, 0.2]), torch.tensor(1, dtype=torch.int64),
                                 torch.tensor(0.1, dtype=torch.float16)],
                         ids=["two_elements", "int64", "float16"])
def test_tensor_overload_names_a_bad_scalar(backend, bad):
    harness.require_fused(backend, "it does not check its arguments")
    problem = harness.build("sgd_step_", backend, shapes=[(5,)])
    problem.scalars.update({name: torch.tensor(float(problem.scalars[name]),
                                               dtype=torch.float64, device=backend.device)
                            for name in _ops.TENSOR_SCALARS})
    problem.scalars["lr"] = bad.to(backend.device)
    before = problem.copy()
    with pytest.raises((RuntimeError, TypeError, ValueError),
                       match=r"lr must be a one-element float32 or float64"):
        problem.call(backend.op("sgd_step_", tensor_scalars=True))
    harness.assert_unchanged(problem, before)


# ---------------------------------------------------------------------------------------------
# opcheck


def opcheck_samples():
    """Per op, one sample per dtype, each with another of the op's variants (flags, outputs,
    sums): every backend x op x sample x overload; the interpreter: one sample per op."""
    cases = []
    for backend in harness.BACKENDS:
        for op_name in OPS:
            variants = harness.VARIANTS[op_name]
            for index, dtype in enumerate(harness.DTYPES):
                if index and not backend.sizes.thorough:
                    continue
                variant = variants[(3 * index + 1) % len(variants)]
                for overload in _ops.OVERLOADS:
                    cases.append(pytest.param(
                        backend, op_name, dtype, variant, overload,
                        id=f"{backend.id}-{op_name}-{str(dtype)[6:]}-variant"
                           f"{variants.index(variant)}-{overload}"))
    return cases


@pytest.mark.parametrize("backend,op_name,dtype,variant,overload", opcheck_samples(),
                         indirect=["backend"])
def test_opcheck(backend, op_name, dtype, variant, overload):
    harness.require_fused(backend, "it is no torch.library op")
    problem = harness.build(op_name, backend, dtype, shapes=[(5,), (3, 2), (0,), (33,)],
                            **variant)
    tensor_scalars = overload == "tensor"
    if tensor_scalars:
        problem.scalars.update({
            name: torch.tensor(float(problem.scalars[name]), dtype=torch.float64,
                               device=backend.device)
            for name in _ops.TENSOR_SCALARS if name in problem.scalars})
    args, kwargs = problem.arguments(step=0)
    results = torch.library.opcheck(backend.op(op_name, tensor_scalars), args, kwargs)
    assert all(result == "SUCCESS" for result in results.values()), results


COMPILERS = ["aot_eager"] + (["inductor"] if os.environ.get("GERNE_SLOW_TESTS") == "1" else [])


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("op_name", OPS)
def test_compiled_call_matches_eager(backend, op_name, compiler):
    """Two calls under torch.compile(fullgraph=True) (no graph break at the op) write what two
    eager calls write, bit for bit, and they did write something. aot_eager runs Dynamo and
    AOTAutograd's functionalization of the mutating op, as inductor does, without inductor's
    C++ compilation (GERNE_SLOW_TESTS=1 adds inductor)."""
    harness.require_fused(backend, "Dynamo would trace its Python, not an op")
    torch._dynamo.reset()
    problem = harness.build(op_name, backend, shapes=[(5,), (3, 2), (0,), (33,)],
                            mid_training=True)
    kwargs = problem.arguments()[1]
    op = backend.op(op_name)

    def two_calls(*tensors):
        op(*tensors, **kwargs)
        op(*tensors, **kwargs)

    eager, compiled = problem.copy(), problem.copy()
    two_calls(*eager.arguments()[0])
    try:
        torch.compile(two_calls, backend=compiler, fullgraph=True)(*compiled.arguments()[0])
    finally:
        torch._dynamo.reset()
    for name, value in eager.written().items():
        harness.assert_bitwise_equal(compiled.tensors[name], value, f"compiled {name}")
    harness.assert_something_written(eager, problem)


# ---------------------------------------------------------------------------------------------
# Argument errors


@dataclasses.dataclass(frozen=True)
class BadCall:
    """One call that an op must refuse, and what its message must say.

    spoil: (problem, device) -> None, makes a good call (two parameters, of shapes (4, 3) and
        (5,), with the op's default hyperparameters) bad.
    words: in every refusing backend's message; cpp_words / triton_words: also in the C++
        ops' (which raise RuntimeError) / the Triton ops' (which raise triton_error).
    refused_by: the backends that refuse it (the others accept it: Triton launches a list
        mixing dtypes as one group per dtype).
    on_gpu: needs the parameters on a CUDA device (another device's tensors beside them).
    """
    id: str
    op_name: str
    spoil: Callable
    words: tuple
    cpp_words: tuple = ()
    triton_words: tuple = ()
    triton_error: type = ValueError
    refused_by: tuple = ("cpu", "cuda", "triton")
    on_gpu: bool = False


def replace(name, index, make):
    """spoil: tensors[name][index] = make(that tensor, device)."""
    def spoil(problem, device):
        tensors = problem.tensors[name]
        tensors[index] = make(tensors[index], device)
    return spoil


def truncate(name, length):
    def spoil(problem, device):
        problem.tensors[name] = problem.tensors[name][:length]
    return spoil


def every_list_to(dtype):
    def spoil(problem, device):
        for name, value in problem.tensors.items():
            if isinstance(value, list) and name != "state_steps":
                problem.tensors[name] = [t.to(dtype) for t in value]
    return spoil


def transposed(t, device):
    return torch.randn(t.shape[::-1], device=device).t().to(t.dtype)


def second_parameter_in_bfloat16(problem, device):
    """params[1] and its state in bfloat16, params[0] in float32 (its gradients too)."""
    for name in ("params", "momentum_buffers", "grads_b", "grads_lb"):
        problem.tensors[name][1] = problem.tensors[name][1].bfloat16()


def found_inf_as(make):
    def spoil(problem, device):
        problem.tensors["found_inf"] = make(device)
    return spoil


BAD_CALLS = [
    BadCall("grads_b_too_short", "sgd_step_", truncate("grads_b", 1), ("grads_b has 1",),
            cpp_words=("params has 2",)),
    BadCall("no_momentum_buffers", "sgd_step_", truncate("momentum_buffers", 0),
            ("momentum_buffers has 0",)),
    BadCall("grads_lb_dtype", "sgd_step_", replace("grads_lb", 1, lambda t, d: t.half()),
            ("grads_lb[1]", "Half", "Float"), refused_by=("cpu", "cuda")),
    BadCall("grads_lb_shape", "sgd_step_", replace("grads_lb", 1,
                                                    lambda t, d: torch.randn(6, device=d)),
            ("grads_lb[1]", "shape")),
    BadCall("grads_b_numel", "sgd_step_", replace("grads_b", 0,
                                                   lambda t, d: torch.randn(11, device=d)),
            ("grads_b[0]",), cpp_words=("shape",), triton_words=("has 11 elements",)),
    BadCall("grads_b_not_contiguous", "sgd_step_", replace("grads_b", 0, transposed),
            ("grads_b[0]", "not contiguous")),
    BadCall("params_not_contiguous", "sgd_step_", replace("params", 0, transposed),
            ("params[0]", "not contiguous")),
    BadCall("float64_params", "sgd_step_", every_list_to(torch.float64), ("params[0]",),
            cpp_words=("Double",), triton_words=("float64",), triton_error=TypeError),
    BadCall("params_of_two_dtypes", "sgd_step_", second_parameter_in_bfloat16,
            ("params[1]", "one dtype"), refused_by=("cpu", "cuda")),
    BadCall("float64_found_inf", "sgd_step_",
            found_inf_as(lambda d: torch.zeros((), dtype=torch.float64, device=d)),
            ("found_inf", "float32"), triton_error=TypeError),
    BadCall("state_steps_too_short", "adam_step_", truncate("state_steps", 1),
            ("state_steps has 1",), cpp_words=("params has 2",)),
    BadCall("int64_state_step", "adam_step_",
            replace("state_steps", 1, lambda t, d: torch.zeros((), dtype=torch.int64, device=d)),
            ("state_steps[1]", "float32"), triton_error=TypeError),
    BadCall("state_step_of_two_elements", "adam_step_",
            replace("state_steps", 1, lambda t, d: torch.zeros(2, device=d)),
            ("state_steps[1]",), cpp_words=("one-element",), triton_words=("0-d",),
            triton_error=TypeError),
    BadCall("amsgrad_without_max_exp_avg_sqs", "adam_step_", truncate("max_exp_avg_sqs", 0),
            ("max_exp_avg_sqs has 0",)),
    BadCall("exp_avgs_too_short", "lion_step_", truncate("exp_avgs", 1), ("exp_avgs has 1",),
            cpp_words=("params has 2",)),
    BadCall("grads_lb_too_short_for_out", "extrapolate_", truncate("grads_lb", 1),
            ("grads_lb has 1",), cpp_words=("out has 2",)),
    BadCall("grads_lb_too_short", "scan_", truncate("grads_lb", 1), ("grads_lb has 1",)),
    BadCall("float32_sums", "scan_", lambda problem, device: problem.tensors.update(
        sums=torch.zeros(4, device=device)), ("sums",), triton_error=TypeError),
    BadCall("sums_of_three", "scan_", lambda problem, device: problem.tensors.update(
        sums=torch.zeros(3, dtype=torch.float64, device=device)), ("sums",),
        triton_error=TypeError),
    BadCall("grads_b_on_the_host", "sgd_step_",
            replace("grads_b", 0, lambda t, d: t.cpu()), ("grads_b[0] is on cpu",),
            on_gpu=True),
    BadCall("found_inf_on_the_host", "sgd_step_", found_inf_as(lambda d: torch.zeros(())),
            ("found_inf",), cpp_words=("found_inf must be a float32 tensor",), on_gpu=True),
    BadCall("state_step_on_the_host", "adam_step_",
            replace("state_steps", 1, lambda t, d: t.cpu()), ("state_steps[1]",),
            cpp_words=("must be a one-element float32",), on_gpu=True),
]


def bad_call_params():
    return [pytest.param(b, case, id=f"{b.id}-{case.id}")
            for b in harness.BACKENDS if b.fused for case in BAD_CALLS
            if b.name in case.refused_by]


@pytest.mark.parametrize("backend,case", bad_call_params(), indirect=["backend"])
def test_a_bad_argument_is_named_before_anything_is_written(backend, case):
    if case.on_gpu and backend.device != "cuda":
        pytest.skip("needs the parameters on a CUDA device")
    problem = harness.build(case.op_name, backend, shapes=[(4, 3), (5,)])
    case.spoil(problem, backend.device)
    before = problem.copy()
    error = RuntimeError if backend.cpp else case.triton_error
    with pytest.raises(error) as info:
        problem.call(backend.op(case.op_name), step=0)
    words = case.words + (case.cpp_words if backend.cpp else case.triton_words)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
    harness.assert_unchanged(problem, before)


@harness.over_backends(["cpu"])
def test_the_cpu_kernel_names_a_tensor_on_another_device(backend):
    """The CPU kernel itself, reached by redispatching to the CPU key, names the device."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=r"grads_b\[0\] is on meta"):
        backend.op("extrapolate_").redispatch(
            keys, [torch.randn(3)], [torch.randn(3, device="meta")], [torch.randn(3)],
            torch.zeros(()), scale_b=-1.0, scale_lb=2.0)
