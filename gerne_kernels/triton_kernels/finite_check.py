"""check_finite: the first pass of a step, which sets found_inf = 1 when any element of g_b or
g_lb is inf or NaN. The update kernels launched after it read found_inf on the device and then
change nothing, so the whole step is skipped without a host sync.

Every program that sees a non-finite element stores 1.0 into found_inf; they all store the same
value, so the race between them is benign (and found_inf ends as 1.0, as in the reference).
"""

import triton
import triton.language as tl

from .storage import load_f32
from .tables import program_chunk, table_numel, table_pointer


@triton.jit
def count_nonfinite(ptr, offsets, remaining, MASKED: tl.constexpr):
    x = load_f32(ptr, offsets, remaining, MASKED)
    nonfinite = (x != x) | (tl.abs(x) == float("inf"))
    return tl.sum(nonfinite.to(tl.int32), axis=0)


@triton.jit
def flag_nonfinite_chunk(g_b_ptr, g_lb_ptr, found_inf_ptr, remaining, BLOCK: tl.constexpr):
    """found_inf = 1 if any of the first min(remaining, BLOCK) elements of g_b or g_lb is inf
    or NaN (a full block unmasked, the last one masked)."""
    offsets = tl.arange(0, BLOCK)
    if remaining >= BLOCK:
        bad = (count_nonfinite(g_b_ptr, offsets, remaining, False)
               + count_nonfinite(g_lb_ptr, offsets, remaining, False))
    else:
        bad = (count_nonfinite(g_b_ptr, offsets, remaining, True)
               + count_nonfinite(g_lb_ptr, offsets, remaining, True))
    tl.store(found_inf_ptr, 1.0, mask=bad > 0)


@triton.jit
def _nonfinite_multi_tensor_kernel(table_ptr, chunks_ptr, found_inf_ptr, g_b_like, g_lb_like,
                                   G_B_COLUMN: tl.constexpr, G_LB_COLUMN: tl.constexpr,
                                   WIDTH: tl.constexpr, BLOCK: tl.constexpr,
                                   ALIGNED: tl.constexpr):
    row, base = program_chunk(chunks_ptr, BLOCK)
    remaining = table_numel(table_ptr, row, WIDTH) - base
    g_b_ptr = table_pointer(table_ptr, row, G_B_COLUMN, WIDTH, g_b_like, ALIGNED) + base
    g_lb_ptr = table_pointer(table_ptr, row, G_LB_COLUMN, WIDTH, g_lb_like, ALIGNED) + base
    flag_nonfinite_chunk(g_b_ptr, g_lb_ptr, found_inf_ptr, remaining, BLOCK)


@triton.jit
def _nonfinite_per_tensor_kernel(g_b_ptr, g_lb_ptr, found_inf_ptr, numel, BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * BLOCK
    flag_nonfinite_chunk(g_b_ptr + base, g_lb_ptr + base, found_inf_ptr, numel - base, BLOCK)


def flag_nonfinite_multi_tensor(table, chunks, found_inf, g_b_like, g_lb_like, *, g_b_column,
                                g_lb_column, aligned, block, num_warps):
    """One launch over an op's pointer table (its g_b and g_lb columns)."""
    if chunks.shape[0] == 0:
        return
    _nonfinite_multi_tensor_kernel[(chunks.shape[0],)](
        table, chunks, found_inf, g_b_like, g_lb_like, G_B_COLUMN=g_b_column,
        G_LB_COLUMN=g_lb_column, WIDTH=table.shape[1], BLOCK=block, ALIGNED=aligned,
        num_warps=num_warps)


def flag_nonfinite_per_tensor(grads_b, grads_lb, found_inf, *, block, num_warps):
    """One launch per tensor pair."""
    for g_b, g_lb in zip(grads_b, grads_lb):
        numel = g_b.numel()
        if numel:
            _nonfinite_per_tensor_kernel[(triton.cdiv(numel, block),)](
                g_b, g_lb, found_inf, numel, BLOCK=block, num_warps=num_warps)

