"""The Triton ops in the interpreter (CPU tensors) against the reference path: odd and empty
sizes, all three dtypes, both launch modes, the hyperparameter combinations, beta in
{-1, 0, 1, 3}, loss scales, found_inf on entry, inf/NaN in either batch, several steps."""

import pytest
import torch

import gerne_kernels.triton_kernels as tk
from gerne_kernels import _reference
from triton_checks import (ADAM_HYPERS, SGD_HYPERS, check_adam, check_extrapolate, check_sgd,
                           check_found_inf_of_shape_one, check_skipped, check_tensor_scalars,
                           fused_op, problem_for)

assert tk.INTERPRET, "run with TRITON_INTERPRET=1 set before triton is imported"

# A skipped Adam step leaves a never-stepped tensor at t = 0, where the (unused, masked-off)
# bias corrections divide by 1 - beta^0 = 0; numpy warns where a GPU silently makes inf.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                                        "ignore:invalid value:RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODES = ["multi_tensor", "per_tensor"]
# Odd sizes, an empty tensor, one element, and tensors of several 1024-element blocks.
SIZES = [5, 1024, 0, 1, 2500, 33]
OPS = ["sgd_step_", "adam_step_", "extrapolate_"]


@pytest.fixture(params=MODES)
def mode(request):
    with tk.launch_settings(mode=request.param):
        yield request.param


def dtype_cases(hypers, reduced_precision_indices):
    """Every hyperparameter set in float32; the richest ones in bfloat16 and float16 too (the
    interpreter is slow, and storage rounding does not depend on the hyperparameters)."""
    cases = [(torch.float32, h) for h in hypers]
    cases += [(dtype, hypers[i]) for dtype in DTYPES[1:] for i in reduced_precision_indices]
    return cases


@pytest.mark.parametrize("dtype,hyper", dtype_cases(SGD_HYPERS, [2, 3]))
def test_sgd(mode, dtype, hyper):
    check_sgd("cpu", dtype, SIZES, hyper)


@pytest.mark.parametrize("dtype,hyper", dtype_cases(ADAM_HYPERS, [3, 4]))
def test_adam(mode, dtype, hyper):
    check_adam("cpu", dtype, SIZES, hyper)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alias_out", [False, True])
def test_extrapolate(mode, dtype, alias_out):
    check_extrapolate("cpu", dtype, SIZES, alias_out=alias_out)


@pytest.mark.parametrize("beta", [-1.0, 0.0, 1.0, 3.0])
def test_beta_values(beta):
    check_sgd("cpu", torch.float32, SIZES, SGD_HYPERS[3], beta=beta)
    check_adam("cpu", torch.float32, SIZES, ADAM_HYPERS[3], beta=beta)
    check_extrapolate("cpu", torch.float32, SIZES, beta=beta)


def test_loss_scales_are_undone():
    """Each batch's gradient arrives multiplied by its loss scale; the ops divide it back out."""
    inv_scales = (1.0 / 1024, 1.0 / 256)
    check_sgd("cpu", torch.float32, SIZES, SGD_HYPERS[2], beta=0.5, inv_scales=inv_scales)
    check_adam("cpu", torch.float32, SIZES, ADAM_HYPERS[2], beta=0.5, inv_scales=inv_scales)
    check_extrapolate("cpu", torch.float32, SIZES, beta=0.5, inv_scales=inv_scales)


@pytest.mark.parametrize("block_size", [16, 64])
def test_block_boundaries(mode, block_size):
    """Tensors ending just before, on and just after a block boundary, many blocks each."""
    sizes = [block_size - 1, block_size, block_size + 1, 3 * block_size + 7]
    with tk.launch_settings(block_size=block_size):
        check_sgd("cpu", torch.bfloat16, sizes, SGD_HYPERS[2])
        check_adam("cpu", torch.float32, sizes, ADAM_HYPERS[3])


def test_mixed_dtypes_within_a_list_use_per_tensor_launches():
    """A table column has one element type; a list mixing dtypes goes per tensor."""
    generator = torch.Generator().manual_seed(3)
    sizes = [7, 1500]
    p32 = [torch.randn(n, generator=generator) for n in sizes]
    mixed = [p32[0], p32[1].to(torch.float16)]
    g_b = [torch.randn(n, generator=generator).to(p.dtype) for n, p in zip(sizes, mixed)]
    g_lb = [torch.randn(n, generator=generator).to(p.dtype) for n, p in zip(sizes, mixed)]
    results = []
    for op in (fused_op("sgd_step_"), _reference.sgd_step_):
        p = [t.clone() for t in mixed]
        bufs = [torch.zeros_like(t) for t in mixed]
        op(p, g_b, g_lb, bufs, torch.zeros(()), **SGD_HYPERS[1], is_first_step=False,
           scale_b=-1.0, scale_lb=2.0, check_finite=True)
        results.append(p + bufs)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_empty_calls_and_empty_tensors():
    """No tensors at all, or only empty ones: nothing to update, but Adam still counts a step
    for every tensor, as the reference does."""
    check_adam("cpu", torch.float32, [0, 0], ADAM_HYPERS[0])
    check_adam("cpu", torch.float32, [], ADAM_HYPERS[0])
    check_sgd("cpu", torch.float32, [0], SGD_HYPERS[1])
    check_extrapolate("cpu", torch.float32, [])


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("found", [1.0, 2.5])
def test_found_inf_on_entry_changes_nothing(mode, op_name, found):
    assert check_skipped(op_name, "cpu", torch.float32, SIZES, found_on_entry=found) == found


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("batch", [0, 1], ids=["g_b", "g_lb"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_gradient_skips_the_step(mode, op_name, batch, value):
    # In the last tensor's second block, so that the flag comes from a later program.
    corrupt = (batch, 4, 1500, value)
    assert check_skipped(op_name, "cpu", torch.bfloat16, SIZES, corrupt=corrupt) == 1.0


@pytest.mark.parametrize("op_name", OPS)
def test_nonfinite_gradient_without_check_finite_is_not_looked_for(op_name):
    """check_finite=False: no scan; found_inf stays 0 (the update itself then carries the NaN,
    exactly as the reference does, which check_skipped does not compare)."""
    op, _, args, kwargs = problem_for(op_name, "cpu", torch.float32, SIZES)
    args[1][0][0] = float("nan")
    found_inf = torch.zeros(())
    op(*args, found_inf, **kwargs, check_finite=False)
    assert found_inf.item() == 0


def test_argument_errors():
    sgd = fused_op("sgd_step_")
    hyper = dict(SGD_HYPERS[1], is_first_step=False, scale_b=-1.0, scale_lb=2.0,
                 check_finite=False)
    p, g = [torch.zeros(4, 3)], [torch.zeros(4, 3)]
    with pytest.raises(ValueError, match="momentum_buffers has 0 tensors"):
        sgd(p, g, g, [], torch.zeros(()), **hyper)
    with pytest.raises(ValueError, match="not contiguous"):
        sgd(p, [torch.zeros(3, 4).t()], g, [torch.zeros(4, 3)], torch.zeros(()), **hyper)
    with pytest.raises(ValueError, match="has 11 elements"):
        sgd(p, [torch.zeros(11)], g, [torch.zeros(4, 3)], torch.zeros(()), **hyper)
    with pytest.raises(TypeError, match="found_inf must be a float32"):
        sgd(p, g, g, [torch.zeros(4, 3)], torch.zeros((), dtype=torch.float64), **hyper)
    with pytest.raises(TypeError, match="float64"):
        sgd([torch.zeros(2, dtype=torch.float64)], [torch.zeros(2, dtype=torch.float64)],
            [torch.zeros(2, dtype=torch.float64)], [torch.zeros(2, dtype=torch.float64)],
            torch.zeros(()), **hyper)
    adam = fused_op("adam_step_")
    with pytest.raises(TypeError, match="state_steps"):
        adam(p, g, g, [torch.zeros(4, 3)], [torch.zeros(4, 3)], [],
             [torch.zeros((), dtype=torch.int64)], torch.zeros(()), **ADAM_HYPERS[0],
             scale_b=-1.0, scale_lb=2.0, check_finite=False)
    with tk.launch_settings(mode="one_by_one"):
        with pytest.raises(ValueError, match="LAUNCH_MODE"):
            sgd(p, g, g, [torch.zeros(4, 3)], torch.zeros(()), **hyper)


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("scalar_dtype", [torch.float64, torch.float32], ids=str)
def test_tensor_scalars_match_float_scalars(mode, op_name, scalar_dtype):
    check_tensor_scalars(op_name, "cpu", torch.float32, SIZES, scalar_dtype=scalar_dtype)


@pytest.mark.parametrize("op_name", OPS)
def test_found_inf_of_shape_one(mode, op_name):
    check_found_inf_of_shape_one(op_name, "cpu", torch.float32, SIZES)
