"""triton_extrapolate_: out[i] = scale_lb * g_lb[i] + scale_b * g_b[i], the extrapolated
gradient alone (the wrapper around other optimizers feeds it to them). Reads g_b and g_lb,
writes out. out[i] may be grads_lb[i]: each element is read before it is written, by the same
program. The scales come by value or, for the .tensor overload, from device memory. One launch.
"""

import triton
import triton.language as tl

from . import launch
from .kernel_io import (chunk_pointer, gradient_pointers, load_extrapolated_grad, runtime_scales,
                        store_f32, update_chunk)

OUT, G_B, G_LB = (tl.constexpr(column) for column in range(3))


@triton.jit
def extrapolate_block(out_ptr, g_b_ptr, g_lb_ptr, remaining, scale_b, scale_lb,
                      BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    g = load_extrapolated_grad(g_b_ptr, g_lb_ptr, offsets, remaining, scale_b, scale_lb,
                               MASKED)
    store_f32(out_ptr, offsets, g, remaining, MASKED)


@triton.jit(do_not_specialize=["tensor_count"])
def extrapolate_kernel(table_ptr, tensor_count, found_inf_ptr, scale_b, scale_lb,
                       OUT_DTYPE: tl.constexpr, G_B_DTYPE: tl.constexpr,
                       G_LB_DTYPE: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
                       ALIGNED: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr):
    """One chunk: a full block unmasked (vectorizable), a tensor's last block or a skipped step
    (remaining == 0) masked."""
    row, base, remaining = update_chunk(table_ptr, tensor_count, found_inf_ptr, WIDTH, BLOCK)
    out_ptr = chunk_pointer(table_ptr, row, base, OUT, WIDTH, OUT_DTYPE, ALIGNED)
    g_b_ptr, g_lb_ptr = gradient_pointers(table_ptr, row, base, G_B, G_LB, WIDTH, G_B_DTYPE,
                                          G_LB_DTYPE, ALIGNED)
    scale_b, scale_lb = runtime_scales(scale_b, scale_lb, SCALARS_IN_MEMORY)
    if remaining >= BLOCK:
        extrapolate_block(out_ptr, g_b_ptr, g_lb_ptr, remaining, scale_b, scale_lb, BLOCK, False)
    else:
        extrapolate_block(out_ptr, g_b_ptr, g_lb_ptr, remaining, scale_b, scale_lb, BLOCK, True)


def extrapolate_(out, grads_b, grads_lb, found_inf, *, scale_b, scale_lb):
    """gerne_kernels::triton_extrapolate_, both overloads (schema in _ops.py)."""
    launch.run(launch.OpLaunch(
        "triton_extrapolate_",
        columns=(launch.Column("OUT", "out", out), *launch.gradient_columns(grads_b, grads_lb)),
        passes=(launch.Pass(extrapolate_kernel, launch.one_per_chunk),),
        found_inf=found_inf,
        tensor_scalars=dict(scale_b=scale_b, scale_lb=scale_lb)))
