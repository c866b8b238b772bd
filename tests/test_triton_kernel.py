"""The Triton kernels: in Triton's interpreter on the CPU (always), and compiled on a GPU
(skipped without one), both against the reference path (tests/triton_checks.py).

The interpreter is picked when a kernel is decorated, i.e. when gerne_kernels.triton_kernels is
first imported, and this session imports it without TRITON_INTERPRET. So the interpreter tests
(tests/interpret/) run in a subprocess with TRITON_INTERPRET=1; its failures fail
test_triton_kernels_in_the_interpreter with the subprocess's report. A session started with
TRITON_INTERPRET=1 collects tests/interpret/ directly instead.
"""

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import gerne_kernels
from gerne_kernels import _reference
from triton_checks import (ADAM_HYPERS, SGD_HYPERS, adam_state, check_adam,
                           check_capture_with_cold_tables, check_extrapolate,
                           check_found_inf_of_shape_one, check_gerne_against_torch_optim,
                           check_sgd, check_skipped, fused_op, gradients, random_tensors, scales)

TESTS = os.path.dirname(os.path.abspath(__file__))
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_GPU = HAS_TRITON and torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
INTERPRETER_TIMEOUT_S = 900


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="TRITON_INTERPRET=1: tests/interpret/ runs in this session itself")
def test_triton_kernels_in_the_interpreter():
    """tests/interpret/ in a fresh interpreter-mode process: ops vs reference, GERNE vs
    torch.optim. The subprocess imports the same gerne_kernels as this session."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(gerne_kernels.__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    interpret_dir = os.path.join(TESTS, "interpret")
    command = [sys.executable, "-m", "pytest", interpret_dir, "-q", "-p", "no:cacheprovider",
               f"--confcutdir={interpret_dir}", "--durations=5"]
    result = subprocess.run(command, env=env, cwd=TESTS, capture_output=True, text=True,
                            timeout=INTERPRETER_TIMEOUT_S)
    report = (result.stdout + result.stderr)[-12000:]
    assert result.returncode == 0, f"interpreter tests failed:\n{report}"


# ---------------------------------------------------------------------------------------------
# Compiled ahead of time for sm_80 and sm_90, without a GPU: triton.compile runs the same
# front end, LLVM and ptxas as a launch on a device would, so GPU-only compile errors show in CI.

def compile_for_gpu(kernel, arch, dtype, constexprs, aligned):
    """PTX of one kernel variant. Argument types follow their names: *_ptr / *_like tensors
    (the tables int64/int32, found_inf and step float32, the rest ``dtype``), numel int64,
    other scalars float32. ``aligned`` gives every tensor 16-byte alignment, as the launcher
    specialises for aligned arguments."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    special = {"table_ptr": "*i64", "chunks_ptr": "*i32", "found_inf_ptr": "*fp32",
               "step_ptr": "*fp32"}
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr") or name.endswith("_like"):
            signature[name] = special.get(name, "*" + dtype)
            if aligned:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "numel":
            signature[name] = "i64"
        elif constexprs.get("SCALARS_IN_MEMORY") and name in IN_MEMORY_SCALARS:
            signature[name] = "*fp64"
        else:
            signature[name] = "fp32"
    names = inspect.signature(ASTSource).parameters
    constant_key = "constexprs" if "constexprs" in names else "constants"
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       **{constant_key: constexprs})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=4))
    return compiled.asm["ptx"]


# The arguments that become float64 pointers with SCALARS_IN_MEMORY (the .tensor overloads).
IN_MEMORY_SCALARS = {"lr", "lr_hi", "scale_b", "scale_lb", "decay_factor"}


def aot_cases():
    if not HAS_TRITON:
        return []
    from gerne_kernels.triton_kernels import adam, extrapolate, finite_check, sgd
    block = dict(BLOCK=2048)
    multi = dict(block, ALIGNED=True)
    in_memory = dict(SCALARS_IN_MEMORY=True)
    by_value = dict(SCALARS_IN_MEMORY=False)
    sgd_flags = dict(HAS_MOMENTUM=True, HAS_WEIGHT_DECAY=True, NESTEROV=True, MAXIMIZE=True,
                     IS_FIRST_STEP=False, **by_value)
    adam_flags = dict(HAS_WEIGHT_DECAY=True, AMSGRAD=True, MAXIMIZE=True,
                      DECOUPLED_WEIGHT_DECAY=True, **by_value)
    return [
        ("sgd_multi_tensor_in_memory", sgd._sgd_multi_tensor_kernel,
         dict(multi, **dict(sgd_flags, **in_memory))),
        ("adam_multi_tensor_in_memory", adam._adam_multi_tensor_kernel,
         dict(multi, **dict(adam_flags, **in_memory))),
        ("extrapolate_per_tensor_in_memory", extrapolate._extrapolate_per_tensor_kernel,
         dict(block, **in_memory)),
        ("sgd_multi_tensor", sgd._sgd_multi_tensor_kernel, dict(multi, **sgd_flags)),
        ("sgd_per_tensor", sgd._sgd_per_tensor_kernel, dict(block, **sgd_flags)),
        ("adam_multi_tensor", adam._adam_multi_tensor_kernel, dict(multi, **adam_flags)),
        ("adam_per_tensor", adam._adam_per_tensor_kernel, dict(block, **adam_flags)),
        ("extrapolate_multi_tensor", extrapolate._extrapolate_multi_tensor_kernel,
         dict(multi, **by_value)),
        ("extrapolate_per_tensor", extrapolate._extrapolate_per_tensor_kernel,
         dict(block, **by_value)),
        ("nonfinite_multi_tensor", finite_check._nonfinite_multi_tensor_kernel,
         dict(multi, G_B_COLUMN=1, G_LB_COLUMN=2, WIDTH=5)),
        ("nonfinite_per_tensor", finite_check._nonfinite_per_tensor_kernel, block),
    ]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the interpreter replaces the kernels; compile them without it")
@pytest.mark.parametrize("arch,dtype", [(90, "fp32"), (80, "bf16")])
@pytest.mark.parametrize("name,kernel,constexprs", aot_cases(),
                         ids=[case[0] for case in aot_cases()])
def test_kernels_compile_for_sm80_and_sm90(name, kernel, constexprs, arch, dtype):
    """Every kernel compiles; full blocks of aligned tensors move 16 bytes per access (the
    multi-tensor kernels through the pointer table's alignment hint); float32 division and
    square root are the IEEE-rounded instructions, not the approximate ones."""
    ptx = compile_for_gpu(kernel, arch, dtype, constexprs, aligned=True)
    assert "ld.global.v4" in ptx, f"{name}: no 16-byte vector loads for aligned tensors"
    if not name.startswith("nonfinite"):
        assert "st.global.v4" in ptx, f"{name}: no 16-byte vector stores for aligned tensors"
    assert "div.full" not in ptx and "sqrt.approx" not in ptx, name
    if name.startswith("adam"):
        assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx, name


# ---------------------------------------------------------------------------------------------
# Compiled on a GPU

gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and triton")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODES = ["multi_tensor", "per_tensor"]
# Larger than the interpreter's: several programs per tensor, 16-byte unaligned lengths.
GPU_SIZES = [1, 7, 4096, 65537, 0, 1_000_003, 3, 2 ** 18]


@pytest.fixture(params=MODES)
def mode(request):
    import gerne_kernels.triton_kernels as tk
    with tk.launch_settings(mode=request.param):
        yield request.param


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hyper", [SGD_HYPERS[0], SGD_HYPERS[2], SGD_HYPERS[3]])
def test_sgd_on_gpu(mode, dtype, hyper):
    check_sgd("cuda", dtype, GPU_SIZES, hyper, beta=1.0, steps=3)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hyper", [ADAM_HYPERS[1], ADAM_HYPERS[2], ADAM_HYPERS[3],
                                   ADAM_HYPERS[4]])
def test_adam_on_gpu(mode, dtype, hyper):
    check_adam("cuda", dtype, GPU_SIZES, hyper, beta=3.0, steps=3)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_extrapolate_on_gpu(mode, dtype):
    check_extrapolate("cuda", dtype, GPU_SIZES, beta=-1.0 if dtype == torch.float16 else 1.0)
    check_extrapolate("cuda", dtype, GPU_SIZES, alias_out=True, inv_scales=(1 / 1024, 1 / 64))


@gpu
def test_unaligned_views_on_gpu(mode):
    """Tensors at odd element offsets inside one buffer: no 16-byte alignment promise."""
    generator = torch.Generator().manual_seed(5)
    flat = torch.randn(3 * 10_001 + 3, generator=generator).cuda()
    views = [flat[1 + i * 10_001:1 + (i + 1) * 10_001] for i in range(3)]
    g_b = random_tensors([10_001] * 3, torch.float32, "cuda", generator)
    g_lb = random_tensors([10_001] * 3, torch.float32, "cuda", generator)
    expected = [v.clone() for v in views]
    kwargs = dict(SGD_HYPERS[5], is_first_step=False, scale_b=-1.0, scale_lb=2.0,
                  check_finite=True)
    _reference.sgd_step_(expected, g_b, g_lb, [], torch.zeros((), device="cuda"), **kwargs)
    fused_op("sgd_step_")(views, g_b, g_lb, [], torch.zeros((), device="cuda"), **kwargs)
    for v, e in zip(views, expected):
        torch.testing.assert_close(v, e, rtol=2e-6, atol=1e-6)


@gpu
@pytest.mark.parametrize("op_name", ["sgd_step_", "adam_step_", "extrapolate_"])
def test_skipped_steps_on_gpu(mode, op_name):
    assert check_skipped(op_name, "cuda", torch.float32, GPU_SIZES, found_on_entry=1.0) == 1.0
    for batch in (0, 1):
        corrupt = (batch, 5, 999_999, float("nan"))
        assert check_skipped(op_name, "cuda", torch.bfloat16, GPU_SIZES, corrupt=corrupt) == 1.0


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
    fused_op("extrapolate_")([out], [g_b], [g_lb], torch.zeros((), device="cuda"),
                                   scale_b=-1.0, scale_lb=2.0, check_finite=False)
    assert out[0].item() == 3.0 and out[2 ** 31 - 1].item() == 3.0
    assert out[-3:].tolist() == [1.0, 0.0, -1.0]
    del g_b, g_lb, out


@gpu
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_capture_with_cold_tables_launches_per_tensor(kind):
    check_capture_with_cold_tables(kind)


@gpu
@pytest.mark.parametrize("op_name", ["sgd_step_", "adam_step_", "extrapolate_"])
def test_found_inf_of_shape_one_on_gpu(mode, op_name):
    check_found_inf_of_shape_one(op_name, "cuda", torch.float32, GPU_SIZES)


@gpu
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_captured_step_replays_in_a_cuda_graph(mode, kind):
    """A step captured once and replayed: each replay is one more step (Adam's step counts and
    bias corrections advance on the device) and reads found_inf at replay time."""
    sizes = [4096, 1, 70_001, 33]
    generator = torch.Generator().manual_seed(7)
    params = random_tensors(sizes, torch.float32, "cuda", generator)
    (g_b, g_lb), = gradients(sizes, torch.float32, "cuda", generator, 1)
    scale_b, scale_lb = scales(1.0)
    if kind == "sgd":
        state = [random_tensors(sizes, torch.float32, "cuda", generator)]
        hyper = dict(SGD_HYPERS[3], is_first_step=False)
        op, reference = fused_op("sgd_step_"), _reference.sgd_step_
    else:
        state = list(adam_state(sizes, torch.float32, "cuda", generator, True, (0, 2)))
        hyper = dict(ADAM_HYPERS[3])
        op, reference = fused_op("adam_step_"), _reference.adam_step_
    kwargs = dict(hyper, scale_b=scale_b, scale_lb=scale_lb, check_finite=True)
    expected_params, expected_state = copy.deepcopy(params), copy.deepcopy(state)
    found_inf = torch.zeros((), device="cuda")

    def step():
        op(params, g_b, g_lb, *state, found_inf, **kwargs)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compiles the kernels and fills the table caches
    torch.cuda.current_stream().wait_stream(stream)
    reference(expected_params, g_b, g_lb, *expected_state, torch.zeros((), device="cuda"),
              **kwargs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for replay in range(3):
        graph.replay()
        reference(expected_params, g_b, g_lb, *expected_state, torch.zeros((), device="cuda"),
                  **kwargs)
    found_inf.fill_(1.0)
    graph.replay()  # skipped on the device
    torch.cuda.synchronize()
    assert found_inf.item() == 1.0
    for a, e in zip(params + sum(state, []), expected_params + sum(expected_state, [])):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.parametrize("kind,torch_cls,hyper", [
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
])
def test_gerne_triton_backend_on_gpu_matches_torch_optim(mode, kind, torch_cls, hyper):
    check_gerne_against_torch_optim("cuda", kind, torch_cls, hyper, beta=0.7, steps=5,
                                    width=300, batch=32)
