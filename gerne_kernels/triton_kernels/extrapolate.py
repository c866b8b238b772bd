"""triton_extrapolate_: out[i] = scale_lb * g_lb[i] + scale_b * g_b[i], the extrapolated
gradient alone (the wrapper around other optimizers feeds it to them). out[i] may be
grads_lb[i]: each element is read before it is written, by the same program. The scales come by
value or, for the .tensor overload, from device memory (scalars.py)."""

import triton
import triton.language as tl

from . import _launch
from .finite_check import flag_nonfinite_per_tensor
from .math import extrapolated_grad
from .scalars import launch_scalars, runtime_float
from .storage import load_f32, store_f32
from .tables import remaining_elements, table_pointer, update_chunk

OP_NAME = "triton_extrapolate_"
# Pointer-table columns of the multi-tensor launch; numel follows in the last column.
OUT, G_B, G_LB = (tl.constexpr(column) for column in range(3))
WIDTH = tl.constexpr(4)


@triton.jit
def extrapolate_chunk(out_ptr, g_b_ptr, g_lb_ptr, remaining, scale_b, scale_lb,
                      BLOCK: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr):
    """The first min(remaining, BLOCK) elements: a full block unmasked (vectorizable), a
    tensor's last block or a skipped step (remaining == 0) masked."""
    scale_b = runtime_float(scale_b, SCALARS_IN_MEMORY)
    scale_lb = runtime_float(scale_lb, SCALARS_IN_MEMORY)
    if remaining >= BLOCK:
        extrapolate_block(out_ptr, g_b_ptr, g_lb_ptr, remaining, scale_b, scale_lb, BLOCK, False)
    else:
        extrapolate_block(out_ptr, g_b_ptr, g_lb_ptr, remaining, scale_b, scale_lb, BLOCK, True)


@triton.jit
def extrapolate_block(out_ptr, g_b_ptr, g_lb_ptr, remaining, scale_b, scale_lb,
                      BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    g_b = load_f32(g_b_ptr, offsets, remaining, MASKED)
    g_lb = load_f32(g_lb_ptr, offsets, remaining, MASKED)
    g = extrapolated_grad(g_b, g_lb, scale_b, scale_lb)
    store_f32(out_ptr, offsets, g, remaining, MASKED)


@triton.jit
def _extrapolate_multi_tensor_kernel(table_ptr, chunks_ptr, found_inf_ptr, out_like, g_b_like,
                                     g_lb_like, scale_b, scale_lb, BLOCK: tl.constexpr,
                                     ALIGNED: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr):
    row, base, remaining = update_chunk(table_ptr, chunks_ptr, found_inf_ptr, WIDTH, BLOCK)
    out_ptr = table_pointer(table_ptr, row, OUT, WIDTH, out_like, ALIGNED) + base
    g_b_ptr = table_pointer(table_ptr, row, G_B, WIDTH, g_b_like, ALIGNED) + base
    g_lb_ptr = table_pointer(table_ptr, row, G_LB, WIDTH, g_lb_like, ALIGNED) + base
    extrapolate_chunk(out_ptr, g_b_ptr, g_lb_ptr, remaining, scale_b, scale_lb, BLOCK,
                      SCALARS_IN_MEMORY)


@triton.jit
def _extrapolate_per_tensor_kernel(out_ptr, g_b_ptr, g_lb_ptr, found_inf_ptr, numel, scale_b,
                                   scale_lb, BLOCK: tl.constexpr,
                                   SCALARS_IN_MEMORY: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * BLOCK
    remaining = remaining_elements(found_inf_ptr, numel, base)
    extrapolate_chunk(out_ptr + base, g_b_ptr + base, g_lb_ptr + base, remaining, scale_b,
                      scale_lb, BLOCK, SCALARS_IN_MEMORY)


@_launch.on_found_inf_device(3)
def extrapolate_(out, grads_b, grads_lb, found_inf, *, scale_b, scale_lb, check_finite):
    """The Triton implementation of gerne_kernels::triton_extrapolate_, both overloads (schema
    in _ops.py): scale_b and scale_lb are floats, or tensors for .tensor."""
    device_index = _launch.check_found_inf(found_inf, OP_NAME)
    numels = [g.numel() for g in grads_lb]
    dtypes = _launch.check_lists(OP_NAME, device_index, numels, out=out, grads_b=grads_b,
                                 grads_lb=grads_lb)
    if not out:
        return
    mode, block, num_warps = _launch.mode_for(found_inf, dtypes)
    scalars, tensor_scalars = launch_scalars(OP_NAME, found_inf, scale_b=scale_b,
                                             scale_lb=scale_lb)
    scalars["SCALARS_IN_MEMORY"] = tensor_scalars
    prepared = None
    if mode == "multi_tensor":
        prepared = _launch.prepare_multi_tensor(
            found_inf, [out, grads_b, grads_lb], numels, g_b_column=G_B.value,
            g_lb_column=G_LB.value, check_finite=check_finite, block=block,
            num_warps=num_warps)
    if prepared is not None:
        table, chunks, aligned, likes = prepared
        if chunks.shape[0]:
            _extrapolate_multi_tensor_kernel[(chunks.shape[0],)](
                table, chunks, found_inf, *likes, **scalars, BLOCK=block, ALIGNED=aligned,
                num_warps=num_warps)
        return
    if check_finite:
        flag_nonfinite_per_tensor(grads_b, grads_lb, found_inf, block=block,
                                  num_warps=num_warps)
    for o, g_b, g_lb, numel in zip(out, grads_b, grads_lb, numels):
        if numel:
            _extrapolate_per_tensor_kernel[(triton.cdiv(numel, block),)](
                o, g_b, g_lb, found_inf, numel, **scalars, BLOCK=block, num_warps=num_warps)
