"""What is particular to the Triton backend (gerne_kernels/triton_kernels); every op against the
reference on every backend is tests/ops' job. Four kinds of checks:

  host logic     the launch skeleton with launch.launch_kernel patched to record instead of
                 launch: launch counts, grouping by dtype and alignment, the CUDA graph capture
                 rules (graph_capture.stream_is_capturing patched), argument errors. No GPU, no
                 interpreter: nothing runs on a device.
  interpreter    the kernels in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, which
                 must be set before triton is imported: this file runs itself in a subprocess
                 for them): Lion and scan_ against the reference, skips, empty calls, misaligned
                 views, mixed dtypes, both overloads, a capture through the arena.
  compiled, AOT  every kernel variant compiled for sm_80 and sm_90 without a GPU, its PTX read
                 for 16-byte vector accesses where the host promises alignment and none where
                 it does not.
  GPU            on a CUDA device (skipped without one): CUDA graph capture of whole steps,
                 tables across streams, tensors beyond 2^31 elements.
"""

import contextlib
import copy
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

import gerne_kernels
from gerne_kernels import _ops, _reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_GPU = HAS_TRITON and torch.cuda.is_available() and not INTERPRET
SUBPROCESS_TIMEOUT_S = 900

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
interpreter_only = pytest.mark.skipif(not INTERPRET, reason="runs in the interpreter subprocess "
                                      "(test_in_the_interpreter)")
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and triton")

SGD = dict(lr=0.05, momentum=0.8, dampening=0.0, nesterov=True, weight_decay=0.02,
           maximize=False, is_first_step=False)
ADAM = dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05, amsgrad=True,
            maximize=True, decoupled_weight_decay=True)
LION = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False)
SCALES = dict(scale_b=-1.5, scale_lb=2.5)


def tk():
    import gerne_kernels.triton_kernels as triton_kernels
    return triton_kernels


def randoms(sizes, dtype=torch.float32, device="cpu", seed=0, scale=1.0, uniform=False):
    generator = torch.Generator().manual_seed(seed)
    draw = torch.rand if uniform else torch.randn
    return [(draw(n, generator=generator) * scale).to(device=device, dtype=dtype)
            for n in sizes]


def problem(op_name, sizes, dtype=torch.float32, device="cpu", seed=0):
    """(args, kwargs) of one call of the op (found_inf last of args), fresh tensors."""
    params = randoms(sizes, dtype, device, seed)
    g_b, g_lb = randoms(sizes, dtype, device, seed + 1), randoms(sizes, dtype, device, seed + 2)
    found_inf = torch.zeros((), device=device)
    if op_name == "sgd_step_":
        return [params, g_b, g_lb, randoms(sizes, dtype, device, seed + 3), found_inf], \
            dict(SGD, **SCALES)
    if op_name == "adam_step_":
        v = randoms(sizes, dtype, device, seed + 4, 0.01, uniform=True)
        vmax = [x + 0.01 for x in v]
        steps = [torch.tensor(float(i % 3), device=device) for i in range(len(sizes))]
        return [params, g_b, g_lb, randoms(sizes, dtype, device, seed + 3, 0.1), v, vmax, steps,
                found_inf], dict(ADAM, **SCALES)
    if op_name == "lion_step_":
        return [params, g_b, g_lb, randoms(sizes, dtype, device, seed + 3, 0.1), found_inf], \
            dict(LION, **SCALES)
    if op_name == "extrapolate_":
        return [params, g_b, g_lb, found_inf], dict(SCALES)
    return [g_b, g_lb, found_inf, torch.zeros(4, dtype=torch.float64, device=device)], \
        dict(SCALES)


def implementation(op_name):
    return tk().IMPLEMENTATIONS["triton_" + op_name]


@contextlib.contextmanager
def recorded_launches():
    """Replaces the one launching function: yields the list of (kernel name, programs,
    arguments) that the ops would have launched."""
    from gerne_kernels.triton_kernels import launch
    launches = []
    saved = launch.launch_kernel
    launch.launch_kernel = lambda kernel, programs, arguments, options: launches.append(
        (kernel.fn.__name__, programs, arguments))
    try:
        yield launches
    finally:
        launch.launch_kernel = saved


@contextlib.contextmanager
def capturing(flag=True):
    """Makes the ops see a capturing stream (graph_capture's one question to CUDA)."""
    from gerne_kernels.triton_kernels import graph_capture
    saved = graph_capture.stream_is_capturing
    graph_capture.stream_is_capturing = lambda device: flag
    try:
        yield
    finally:
        graph_capture.stream_is_capturing = saved


# ---------------------------------------------------------------------------------------------
# Host logic (no device, no interpreter)

@needs_triton
def test_every_registry_op_has_a_triton_twin_for_both_overloads():
    triton_kernels = tk()
    keys = ("CUDA", "CPU") if INTERPRET else ("CUDA",)
    for spec in _ops.OPS:
        module = importlib.import_module(
            f"gerne_kernels.triton_kernels.{triton_kernels.module_name(spec)}")
        assert triton_kernels.IMPLEMENTATIONS[spec.triton_name] is getattr(module, spec.name)
        for overload in _ops.OVERLOADS:
            name = spec.triton_name + ("" if overload == "default" else "." + overload)
            for key in keys:
                assert torch._C._dispatch_has_kernel_for_dispatch_key(
                    f"{_ops.NAMESPACE}::{name}", key), (name, key)


LAUNCHES_PER_OP = {"sgd_step_": 1, "adam_step_": 2, "lion_step_": 1, "extrapolate_": 1,
                   "scan_": 2}


@needs_triton
@pytest.mark.parametrize("op_name", list(LAUNCHES_PER_OP))
def test_launches_per_call_of_200_tensors(op_name):
    """One launch covers every tensor (Adam: step counts, then the update; scan_ with sums:
    the chunks, then their sum); nothing else is launched (no torch op around them: those
    would show in the interpreter runs, not here)."""
    sizes = [(i * 37) % 3000 + 1 for i in range(200)]
    args, kwargs = problem(op_name, sizes)
    with recorded_launches() as launches:
        implementation(op_name)(*args, **kwargs)
    assert len(launches) == LAUNCHES_PER_OP[op_name], [name for name, _, _ in launches]
    assert all(arguments["tensor_count"] == 200 for _, _, arguments in launches)


@needs_triton
def test_a_default_adam_step_is_at_most_four_launches():
    sizes = [(i * 37) % 3000 + 1 for i in range(200)]
    scan_args, _ = problem("scan_", sizes)
    args, kwargs = problem("adam_step_", sizes)
    with recorded_launches() as launches:
        implementation("scan_")(args[1], args[2], args[-1], None, **SCALES)
        implementation("adam_step_")(*args, **kwargs)
    assert len(launches) == 3


@needs_triton
def test_misaligned_tensors_launch_apart_from_aligned_ones():
    """A view at a 4-byte offset does not cost the aligned tensors their vector accesses."""
    storage = torch.zeros(4097)
    args, kwargs = problem("sgd_step_", [100, 4096, 7])
    args[0][1] = storage[1:]
    with recorded_launches() as launches:
        implementation("sgd_step_")(*args, **kwargs)
    groups = sorted((arguments["ALIGNED"], arguments["tensor_count"])
                    for _, _, arguments in launches)
    assert groups == [(False, 1), (True, 2)]


@needs_triton
def test_mixed_dtypes_launch_per_dtype_combination():
    import triton.language as tl

    args, kwargs = problem("extrapolate_", [10, 20, 30, 40])
    args[0][1] = args[0][1].to(torch.bfloat16)
    args[1][3] = args[1][3].to(torch.float16)
    with recorded_launches() as launches:
        implementation("extrapolate_")(*args, **kwargs)
    combos = sorted((str(a["OUT_DTYPE"]), str(a["G_B_DTYPE"]), a["tensor_count"])
                    for _, _, a in launches)
    assert combos == sorted([(str(tl.float32), str(tl.float32), 2),
                             (str(tl.bfloat16), str(tl.float32), 1),
                             (str(tl.float32), str(tl.float16), 1)])


@needs_triton
def test_empty_calls_launch_nothing_and_empty_tensors_get_no_programs():
    with recorded_launches() as launches:
        implementation("sgd_step_")([], [], [], [], torch.zeros(()), **SGD, **SCALES)
        implementation("scan_")([], [], torch.zeros(()), torch.zeros(4, dtype=torch.float64),
                                **SCALES)
        implementation("extrapolate_")(*problem("extrapolate_", [0, 0])[0], **SCALES)
    assert launches == []
    args, kwargs = problem("adam_step_", [0, 0])
    with recorded_launches() as launches:
        implementation("adam_step_")(*args, **kwargs)
    # the step counts of empty tensors still advance (as in the reference): the prologue only
    assert [(name, programs) for name, programs, _ in launches] == [
        ("adam_step_count_kernel", 2)]


@needs_triton
def test_capture_refuses_a_kernel_variant_never_launched_eagerly():
    """Compiling or loading a module while a stream captures is not permitted: a variant
    (here: a block size no other test uses) not yet launched eagerly raises, naming the fix."""
    args, kwargs = problem("sgd_step_", [33, 2000])
    with recorded_launches() as launches, tk().launch_settings(block_size=32):
        implementation("sgd_step_")(*args, **kwargs)  # eager: records it, creates the arena
        with capturing(), pytest.raises(RuntimeError, match="one eager step"):
            implementation("sgd_step_")(*args, **dict(kwargs, maximize=True))
        assert len(launches) == 1, "a refused capture launched something"
        with capturing():  # the variant of the eager call
            implementation("sgd_step_")(*args, **kwargs)
    assert len(launches) == 2


@needs_triton
def test_capture_takes_tables_from_the_arena_never_from_or_into_the_cache():
    from gerne_kernels.triton_kernels import graph_capture, table_cache

    args, kwargs = problem("lion_step_", [33, 2000, 5])
    with recorded_launches() as launches:
        implementation("lion_step_")(*args, **kwargs)
        arena = graph_capture._arenas[torch.device("cpu")]
        with capturing():
            implementation("lion_step_")(*args, **kwargs)
            implementation("lion_step_")(*args, **kwargs)
        implementation("lion_step_")(*args, **kwargs)
    tables = [arguments["table_ptr"] for _, _, arguments in launches]
    in_arena = [t.untyped_storage().data_ptr() == arena.device.untyped_storage().data_ptr()
                for t in tables]
    assert in_arena == [False, True, True, False]
    assert tables[1].data_ptr() != tables[2].data_ptr(), "an arena slice was handed out twice"
    assert torch.equal(tables[1], tables[2]) and torch.equal(tables[1], tables[0])
    assert not table_cache._recent or all(
        entry.table.data_ptr() not in (tables[1].data_ptr(), tables[2].data_ptr())
        for entry in table_cache._recent.values())


@needs_triton
def test_an_exhausted_capture_arena_raises():
    from gerne_kernels.triton_kernels import graph_capture

    args, kwargs = problem("extrapolate_", [3] * 50)
    with recorded_launches():
        implementation("extrapolate_")(*args, **kwargs)
        arena = graph_capture._arenas[torch.device("cpu")]
        saved = arena.used
        arena.used = arena.host.numel() - 10
        try:
            with capturing(), pytest.raises(RuntimeError, match="capture arena .* is full"):
                implementation("extrapolate_")(*args, **kwargs)
        finally:
            arena.used = saved


@needs_triton
def test_argument_errors():
    sgd = implementation("sgd_step_")
    p, g = [torch.zeros(4, 3)], [torch.zeros(4, 3)]
    hyper = dict(SGD, **SCALES)
    with recorded_launches():
        with pytest.raises(ValueError, match="momentum_buffers has 0 tensors"):
            sgd(p, g, g, [], torch.zeros(()), **hyper)
        with pytest.raises(ValueError, match="not contiguous"):
            sgd(p, [torch.zeros(3, 4).t()], g, [torch.zeros(4, 3)], torch.zeros(()), **hyper)
        with pytest.raises(ValueError, match="has 11 elements"):
            sgd(p, [torch.zeros(11)], g, [torch.zeros(4, 3)], torch.zeros(()), **hyper)
        with pytest.raises(TypeError, match="found_inf must be a float32"):
            sgd(p, g, g, [torch.zeros(4, 3)], torch.zeros((), dtype=torch.float64), **hyper)
        f64 = [torch.zeros(2, dtype=torch.float64)]
        with pytest.raises(TypeError, match="float64"):
            sgd(f64, f64, f64, f64, torch.zeros(()), **hyper)
        with pytest.raises(TypeError, match="state_steps"):
            implementation("adam_step_")(p, g, g, [torch.zeros(4, 3)], [torch.zeros(4, 3)], [],
                                         [torch.zeros((), dtype=torch.int64)], torch.zeros(()),
                                         **dict(ADAM, amsgrad=False), **SCALES)
        with pytest.raises(TypeError, match="sums must be"):
            implementation("scan_")(g, g, torch.zeros(()), torch.zeros(4), **SCALES)
        with pytest.raises(ValueError, match="grads_lb has 2 tensors"):
            implementation("scan_")(g, g + g, torch.zeros(()), None, **SCALES)
        with pytest.raises(TypeError, match="one-element float32 or float64"):
            sgd(p, g, g, [torch.zeros(4, 3)], torch.zeros(()),
                **dict(hyper, lr=torch.zeros(2), scale_b=torch.zeros(()),
                       scale_lb=torch.zeros(())))


# ---------------------------------------------------------------------------------------------
# The interpreter

def run_this_file(keyword, interpret):
    """This file's tests matching ``keyword`` in a fresh process with TRITON_INTERPRET set to
    ``interpret`` (Triton reads it when a kernel is decorated, so a session cannot switch),
    importing the same gerne_kernels as this session; fails with its report."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(gerne_kernels.__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0")
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    here = os.path.abspath(__file__)
    command = [sys.executable, "-m", "pytest", here, "-q", "-p", "no:cacheprovider",
               "-k", keyword, "--durations=5"]
    result = subprocess.run(command, env=env, cwd=os.path.dirname(here), capture_output=True,
                            text=True, timeout=SUBPROCESS_TIMEOUT_S)
    report = (result.stdout + result.stderr)[-12000:]
    assert result.returncode == 0, f"the subprocess's tests failed:\n{report}"
    assert " passed" in report and " skipped" not in report, report


@needs_triton
@pytest.mark.skipif(INTERPRET, reason="this session runs them itself")
def test_in_the_interpreter():
    """The interpreter tests, from a session with compiled kernels (a GPU machine's)."""
    run_this_file("interpreter_", interpret=True)


def op(op_name, overload="default"):
    tk()
    return _ops.op("triton_" + op_name, overload)


def run_both(op_name, args, kwargs):
    """(triton's arguments, the reference's arguments) after one call of each on copies."""
    outcome = []
    for function in (op(op_name), getattr(_reference, op_name)):
        call = copy.deepcopy(args)
        function(*call, **kwargs)
        outcome.append(call)
    return outcome


def assert_close_lists(actual, expected, **tolerance):
    for a, e in zip(actual, expected):
        if isinstance(a, list):
            assert_close_lists(a, e, **tolerance)
        else:
            torch.testing.assert_close(a, e, **tolerance)


# Odd sizes, an empty tensor, one element, tensors over several 1024-element blocks.
SIZES = [5, 1024, 0, 1, 2500, 33]
LION_HYPERS = [dict(LION), dict(LION, weight_decay=0.0, maximize=True),
               dict(lr=3e-2, beta1=0.0, beta2=0.5, weight_decay=0.5, maximize=True)]


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def lion_steps(function, args, kwargs, steps=3):
    call = copy.deepcopy(args)
    for _ in range(steps):
        function(*call, **kwargs)
    return call


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("hyper", LION_HYPERS, ids=["wd", "maximize", "beta1=0"])
@pytest.mark.parametrize("overload", ["default", "tensor"])
def test_interpreter_lion_is_the_reference_operation_for_operation(dtype, hyper, overload):
    """Three Lion steps, bit for bit the reference's. scale_b = 0 here: the reference forms g
    with one fused multiply-add (torch's add with alpha), every fused kernel with two roundings,
    and with scale_b = 0 both are the one rounding of scale_lb * g_lb."""
    args, _ = problem("lion_step_", SIZES, dtype)
    kwargs = dict(hyper, scale_b=0.0, scale_lb=2.5)
    scalars = {k: torch.tensor(v, dtype=torch.float64) for k, v in kwargs.items()
               if k in _ops.TENSOR_SCALARS} if overload == "tensor" else {}
    actual = lion_steps(op("lion_step_", overload), args, dict(kwargs, **scalars))
    expected = lion_steps(_reference.lion_step_, args, kwargs)
    for a, e in zip(actual[0] + actual[3], expected[0] + expected[3]):
        assert torch.equal(bits(a), bits(e))
    assert actual[-1].item() == 0


@interpreter_only
@pytest.mark.parametrize("hyper", LION_HYPERS, ids=["wd", "maximize", "beta1=0"])
def test_interpreter_lion_with_both_batches_is_within_float_rounding(hyper):
    args, kwargs = problem("lion_step_", SIZES)
    kwargs = dict(hyper, **SCALES)
    actual = lion_steps(op("lion_step_"), args, kwargs)
    expected = lion_steps(_reference.lion_step_, args, kwargs)
    assert_close_lists(actual[0] + actual[3], expected[0] + expected[3], rtol=2e-6, atol=1e-6)


@interpreter_only
def test_interpreter_lion_sign_of_zero_leaves_p_unchanged():
    """sign(0) = 0 (and torch.sign(NaN) = 0): with m = 0 and g = 0, p only decays."""
    p = [torch.tensor([1.0, -2.0, 0.0])]
    zeros = [torch.zeros(3)]
    m = [torch.zeros(3)]
    op("lion_step_")(p, zeros, zeros, m, torch.zeros(()), **dict(LION, weight_decay=0.0),
                     **SCALES)
    assert torch.equal(p[0], torch.tensor([1.0, -2.0, 0.0])) and torch.equal(m[0], zeros[0])


@interpreter_only
@pytest.mark.parametrize("overload", ["default", "tensor"])
@pytest.mark.parametrize("with_lb", [True, False], ids=["both", "g_b_alone"])
def test_interpreter_scan_sums_match_the_reference(overload, with_lb):
    """Sums of g^2, g_b^2, g_lb^2, g_b g_lb, added into sums; the scan is deterministic."""
    sizes = SIZES + [3000]
    g_b, g_lb = randoms(sizes, seed=1), randoms(sizes, seed=2, scale=3.0)
    if not with_lb:
        g_lb = []
    scales = dict(SCALES)
    if overload == "tensor":
        scales = {k: torch.tensor(v, dtype=torch.float64) for k, v in scales.items()}
    start = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    outcome = []
    for function in (op("scan_", overload), op("scan_", overload), _reference.scan_):
        found_inf, sums = torch.zeros(()), start.clone()
        function(g_b, g_lb, found_inf, sums, **scales)
        outcome.append((found_inf, sums))
    (f1, s1), (f2, s2), (f_ref, s_ref) = outcome
    assert f1.item() == f_ref.item() == 0
    assert torch.equal(s1, s2), "the same scan gave different sums"
    torch.testing.assert_close(s1, s_ref, rtol=1e-6, atol=0)  # g in float32 vs float64


@interpreter_only
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [(0, 0, 0), (0, 4, 2499), (1, 1, 1023), (1, 5, 32)],
                         ids=["g_b_first", "g_b_late_block", "g_lb_block_end", "g_lb_last"])
def test_interpreter_scan_finds_nonfinite_anywhere(value, where):
    batch, tensor, element = where
    grads = [randoms(SIZES, torch.bfloat16, seed=1), randoms(SIZES, torch.bfloat16, seed=2)]
    grads[batch][tensor][element] = value
    found_inf = torch.zeros(())
    op("scan_")(*grads, found_inf, None, **SCALES)
    assert found_inf.item() == 1.0
    clean = torch.full((), 3.0)  # a set flag is never cleared
    op("scan_")(randoms(SIZES), randoms(SIZES), clean, None, **SCALES)
    assert clean.item() == 3.0


UPDATE_OPS = ["sgd_step_", "adam_step_", "lion_step_", "extrapolate_"]


@interpreter_only
@pytest.mark.parametrize("op_name", UPDATE_OPS)
@pytest.mark.parametrize("overload", ["default", "tensor"])
def test_interpreter_found_inf_on_entry_changes_nothing(op_name, overload):
    args, kwargs = problem(op_name, SIZES)
    args[-1].fill_(2.5)
    if overload == "tensor":
        kwargs = {k: torch.tensor(v) if k in _ops.TENSOR_SCALARS else v
                  for k, v in kwargs.items()}
    call = copy.deepcopy(args)
    op(op_name, overload)(*call, **kwargs)
    for before, after in zip(args, call):
        for x, y in zip(before if isinstance(before, list) else [before],
                        after if isinstance(after, list) else [after]):
            assert torch.equal(x.view(torch.int32), y.view(torch.int32)), op_name


@interpreter_only
@pytest.mark.parametrize("op_name", UPDATE_OPS + ["scan_"])
@pytest.mark.parametrize("scalar_dtype", [torch.float64, torch.float32], ids=str)
def test_interpreter_tensor_overload_gives_the_default_overloads_bits(op_name, scalar_dtype):
    args, kwargs = problem(op_name, SIZES)
    results = []
    for overload in ("default", "tensor"):
        call = copy.deepcopy(args)
        values = {k: v for k, v in kwargs.items() if k in _ops.TENSOR_SCALARS}
        tensors = {k: torch.tensor(v, dtype=scalar_dtype) for k, v in values.items()}
        floats = {k: float(t) for k, t in tensors.items()}  # the tensors' values
        op(op_name, overload)(*call, **dict(kwargs, **(tensors if overload == "tensor"
                                                       else floats)))
        results.append(call)
    for a, b in zip(*results):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert torch.equal(x, y), op_name


@interpreter_only
@pytest.mark.parametrize("op_name", UPDATE_OPS)
def test_interpreter_misaligned_views_and_mixed_dtypes_match_the_reference(op_name):
    """t[1:] views of float32 storage and lists mixing dtypes (separate launches) give what
    aligned float32 tensors give, up to the storage rounding of the reduced dtypes."""
    sizes = [7, 1500, 3]
    args, kwargs = problem(op_name, sizes)
    storage = torch.zeros(1501)
    args[0][1] = storage[1:].copy_(args[0][1])
    args[1][2] = args[1][2].to(torch.bfloat16)
    args[2][0] = args[2][0].to(torch.float16)
    actual, expected = run_both(op_name, args, kwargs)
    assert_close_lists(actual, expected, rtol=1e-5, atol=1e-5)


@interpreter_only
def test_interpreter_extrapolate_into_grads_lb():
    g_b, g_lb = randoms(SIZES, seed=1), randoms(SIZES, seed=2)
    expected = [(2.5 * lb - 1.5 * b) for b, lb in zip(g_b, g_lb)]
    op("extrapolate_")(g_lb, g_b, g_lb, torch.zeros(()), **SCALES)
    assert_close_lists(g_lb, expected, rtol=1e-6, atol=1e-6)


@interpreter_only
def test_interpreter_adam_counts_steps_of_empty_tensors_and_skips_on_found_inf():
    args, kwargs = problem("adam_step_", [0, 3, 0])
    steps = args[6]
    op("adam_step_")(*args, **kwargs)
    assert [s.item() for s in steps] == [1.0, 2.0, 3.0]
    args[-1].fill_(1.0)
    op("adam_step_")(*args, **kwargs)
    assert [s.item() for s in steps] == [1.0, 2.0, 3.0]


@interpreter_only
@pytest.mark.parametrize("op_name", ["adam_step_", "scan_"])
def test_interpreter_a_captured_call_reads_its_arena_table(op_name):
    """The capture path end to end on CPU tensors: the call whose table comes from the arena
    computes what the eager call computes."""
    args, kwargs = problem(op_name, SIZES)
    eager, captured = copy.deepcopy(args), copy.deepcopy(args)
    op(op_name)(*eager, **kwargs)
    with capturing():
        op(op_name)(*captured, **kwargs)
    for a, b in zip(eager, captured):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# Compiled ahead of time for sm_80 and sm_90, without a GPU: triton.compile runs the same
# front end, LLVM and ptxas as a launch on a device would, so GPU-only compile errors show here.

POINTER_ARGUMENTS = {"table_ptr": "*i64", "found_inf_ptr": "*fp32", "sums_ptr": "*fp64"}
SCRATCH = {"adam_step_count_kernel": "*fp32", "adam_step_kernel": "*fp32",
           "scan_kernel": "*fp64", "scan_sums_kernel": "*fp64"}
TENSOR_SCALARS = set(_ops.TENSOR_SCALARS)


def compile_for_gpu(kernel, arch, constexprs, **options):
    """PTX of one kernel variant, with the argument types the launch skeleton gives: the table
    and other pointers 16-byte aligned (as allocations are), tensor_count int32, lr / scale_b /
    scale_lb float64 pointers with SCALARS_IN_MEMORY, other scalars float32."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTER_ARGUMENTS or name == "scratch_ptr":
            signature[name] = POINTER_ARGUMENTS.get(name) or SCRATCH[kernel.fn.__name__]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "tensor_count":
            signature[name] = "i32"
        elif constexprs.get("SCALARS_IN_MEMORY") and name in TENSOR_SCALARS:
            signature[name] = "*fp64"
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    names = inspect.signature(ASTSource).parameters
    constant_key = "constexprs" if "constexprs" in names else "constants"
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       **{constant_key: constexprs})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(dict(num_warps=4), **options))
    return compiled.asm["ptx"]


def aot_cases():
    """(name, kernel, constexprs, whether its element accesses may be 16-byte vectors, launch
    options) for every kernel, aligned and not, by value and in memory, with its richest
    flags."""
    if not HAS_TRITON:
        return []
    import triton.language as tl

    from gerne_kernels.triton_kernels import adam_step, extrapolate, lion_step, scan, sgd_step

    def dtypes(kernel, dtype):
        return {name: dtype for name in kernel.arg_names if name.endswith("_DTYPE")}

    updates = [
        ("sgd", sgd_step.sgd_step_kernel, dict(
            HAS_MOMENTUM=True, HAS_WEIGHT_DECAY=True, NESTEROV=True, MAXIMIZE=True,
            IS_FIRST_STEP=False, WIDTH=6)),
        ("adam", adam_step.adam_step_kernel, dict(
            HAS_WEIGHT_DECAY=True, AMSGRAD=True, MAXIMIZE=True, DECOUPLED_WEIGHT_DECAY=True,
            WIDTH=9)),
        ("lion", lion_step.lion_step_kernel, dict(HAS_WEIGHT_DECAY=True, MAXIMIZE=True,
                                                  WIDTH=6)),
        ("extrapolate", extrapolate.extrapolate_kernel, dict(WIDTH=5)),
        ("scan", scan.scan_kernel, dict(HAS_G_LB=True, HAS_SUMS=True, WIDTH=4)),
    ]
    cases = []
    for name, kernel, flags in updates:
        for aligned in (True, False):
            for dtype, in_memory in ((tl.float32, False), (tl.bfloat16, True)):
                constexprs = dict(flags, BLOCK=2048, ALIGNED=aligned,
                                  SCALARS_IN_MEMORY=in_memory, **dtypes(kernel, dtype))
                variant = (f"{name}_{'aligned' if aligned else 'unaligned'}_{dtype}"
                           f"{'_in_memory' if in_memory else ''}")
                options = dict(enable_fp_fusion=False) if name == "lion" else {}
                cases.append((variant, kernel, constexprs, aligned, options))
    for in_memory in (False, True):
        cases.append((f"adam_step_count{'_in_memory' if in_memory else ''}",
                      adam_step.adam_step_count_kernel,
                      dict(WIDTH=9, SCALARS_IN_MEMORY=in_memory), None,
                      dict(num_warps=1, enable_fp_fusion=False)))
    cases.append(("scan_sums", scan.scan_sums_kernel, dict(WIDTH=4), None, {}))
    return cases


@needs_triton
@pytest.mark.skipif(not INTERPRET, reason="this session compiles them itself")
def test_compilation_outside_the_interpreter():
    """The AOT tests, from an interpreter session (CI's, tests/conftest.py without a GPU)."""
    run_this_file("compile_for_sm80", interpret=False)


@needs_triton
@pytest.mark.skipif(INTERPRET, reason="the interpreter replaces the kernels: "
                    "test_compilation_outside_the_interpreter runs these")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name,kernel,constexprs,vector,options", aot_cases(),
                         ids=[case[0] for case in aot_cases()])
def test_kernels_compile_for_sm80_and_sm90(name, kernel, constexprs, vector, options, arch):
    """Every kernel compiles. Aligned variants move 16 bytes per access in full blocks (through
    the table's alignment hint); unaligned ones never promise the compiler more than an element
    (no vector access of any width); float32 division and square root are the IEEE-rounded
    instructions, not the approximate ones; offsets into a tensor are 64-bit; Lion and Adam's
    prologue have no fused multiply-add."""
    ptx = compile_for_gpu(kernel, arch, constexprs, **options)
    accesses = set(re.findall(r"\b(?:ld|st)\.global(?:\.\w+)*", ptx))
    if vector:
        assert any(".v4." in a for a in accesses if a.startswith("ld")), (name, accesses)
        if not name.startswith("scan"):
            assert any(".v4." in a for a in accesses if a.startswith("st")), (name, accesses)
    elif vector is False:
        assert not any(".v2." in a or ".v4." in a for a in accesses), (name, accesses)
    assert "div.full" not in ptx and "sqrt.approx" not in ptx, name
    if name.startswith("adam_aligned") or name.startswith("adam_unaligned"):
        assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx, name
    if options.get("enable_fp_fusion") is False:  # rounding each operation as torch does
        assert "fma.rn" not in ptx, name
    if vector is not None:
        assert re.search(r"mul\.wide\.[su]32|mul\.lo\.s64", ptx), f"{name}: no 64-bit offsets"


# ---------------------------------------------------------------------------------------------
# On a GPU

def adam_problem(sizes, device="cuda", seed=0):
    args, kwargs = problem("adam_step_", sizes, device=device, seed=seed)
    return args, kwargs


@gpu
@pytest.mark.parametrize("op_name", ["sgd_step_", "adam_step_", "lion_step_"])
def test_whole_step_capture_with_fresh_tensors_replays_like_eager_steps(op_name):
    """torch's capture recipe with new addresses inside the graph (as whole-step capture gives
    .grad tensors from the graph's pool): warm-up eager on a side stream, capture scan_ and the
    update, replay; every replay is one more step (Adam's counts advance on the device) and a
    replay with a set flag changes nothing."""
    sizes = [4096, 1, 70_001, 33]
    args, kwargs = problem(op_name, sizes, device="cuda")
    if op_name == "lion_step_":  # see test_interpreter_lion_is_the_reference_...: sign(c)
        kwargs["scale_b"] = 0.0
    expected = copy.deepcopy(args)
    found_inf = args[-1]
    scan, update = op("scan_"), op(op_name)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on other tensors: compiles and loads every kernel
        warm = copy.deepcopy(args)
        scan(warm[1], warm[2], warm[-1], None, **SCALES)
        update(*warm, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_b = [g.clone() for g in args[1]]  # fresh addresses from the graph's pool
        g_lb = [g.clone() for g in args[2]]
        scan(g_b, g_lb, found_inf, None, **SCALES)
        update(args[0], g_b, g_lb, *args[3:], **kwargs)
    reference = getattr(_reference, op_name)
    for _ in range(3):
        graph.replay()
        reference(*expected, **kwargs)
    torch.cuda.synchronize()
    assert found_inf.item() == 0
    for a, e in zip(args[:-1], expected[:-1]):
        assert_close_lists(a if isinstance(a, list) else [a], e if isinstance(e, list) else [e],
                           rtol=1e-5, atol=1e-6)
    before = copy.deepcopy(args)
    found_inf.fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(args[:-1], before[:-1]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@gpu
def test_capture_of_an_unseen_variant_raises_on_a_gpu():
    args, kwargs = problem("extrapolate_", [100, 7], torch.float16, device="cuda", seed=9)
    op("extrapolate_")(*copy.deepcopy(args), **kwargs)  # eager: the device's arena exists
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="one eager step"):
        with torch.cuda.graph(graph), tk().launch_settings(block_size=64):  # never launched
            op("extrapolate_")(*args, **kwargs)


@gpu
def test_a_cached_table_waits_for_its_fill_on_another_stream():
    """The table filled on stream a, behind a long kernel, and used at once by the same call on
    stream b: b's kernel must wait for the fill (an event), not read an unfilled table."""
    from gerne_kernels.triton_kernels import table_cache

    table_cache.clear()
    args, kwargs = problem("extrapolate_", [1 << 20, 3, 1 << 16], device="cuda", seed=4)
    expected = [2.5 * lb - 1.5 * b for b, lb in zip(args[1], args[2])]
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    for stream in (a, b):
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(a):
        torch.cuda._sleep(50_000_000)  # the fill lands only after this
        op("extrapolate_")(*args, **kwargs)
    with torch.cuda.stream(b):  # the same tensors: the cached table, its fill still queued on a
        op("extrapolate_")(*args, **kwargs)
    torch.cuda.synchronize()
    assert_close_lists(args[0], expected, rtol=1e-6, atol=1e-6)


@gpu
def test_cpu_tensor_scalars_for_a_gpu_call_are_read_without_a_sync():
    args, kwargs = problem("sgd_step_", [4096, 5], device="cuda")
    expected = copy.deepcopy(args)
    op("sgd_step_")(*expected, **kwargs)  # also compiles, and allocates the capture arena
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in kwargs.items()
               if k in _ops.TENSOR_SCALARS}
    # The variant that the CPU scalars become (float64 pointers), compiled and loaded first.
    op("sgd_step_", "tensor")(*copy.deepcopy(args),
                              **dict(kwargs, **{k: t.cuda() for k, t in tensors.items()}))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        op("sgd_step_", "tensor")(*args, **dict(kwargs, **tensors))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(x, y) for x, y in zip(args[0], expected[0]))


@gpu
def test_tensor_beyond_two_to_the_31_elements():
    """64-bit offsets: extrapolate over 2^31 + 5 bfloat16 elements (about 13 GB in all)."""
    n = 2 ** 31 + 5
    free, _ = torch.cuda.mem_get_info()
    if free < 14 * 2 ** 30:
        pytest.skip("needs 14 GiB of free GPU memory")
    g_b = torch.full((n,), 1.0, dtype=torch.bfloat16, device="cuda")
    g_lb = torch.full((n,), 2.0, dtype=torch.bfloat16, device="cuda")
    g_b[-3:] = torch.tensor([3.0, 4.0, 5.0], dtype=torch.bfloat16)
    out = torch.zeros_like(g_lb)
    op("extrapolate_")([out], [g_b], [g_lb], torch.zeros((), device="cuda"), scale_b=-1.0,
                       scale_lb=2.0)
    assert out[0].item() == 3.0 and out[2 ** 31 - 1].item() == 3.0
    assert out[-3:].tolist() == [1.0, 0.0, -1.0]
    del g_b, g_lb, out
