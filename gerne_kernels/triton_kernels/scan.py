"""triton_scan_: the optional first pass of a step over both gradients, read once.

found_inf = 1 if any element of g_b or g_lb is inf or NaN (an empty grads_lb: g_b alone); the
update kernels launched after it read found_inf on the device and then change nothing, so the
whole step is skipped without a host sync. Every program that sees a non-finite element stores
1.0 into found_inf; they all store the same value, so the race between them is benign.

With ``sums`` (float64, 4 elements): adds [sum g^2, sum g_b^2, sum g_lb^2, sum g_b * g_lb] into
it (update_math.gradient_sums: g = scale_lb * g_lb + scale_b * g_b in float32 per element, the
products and sums in float64). Deterministic: each program writes its chunk's four sums into a
scratch buffer, and a second launch of one program adds them up in a fixed order (BLOCK-wide
slices, then a fixed reduction tree) and into ``sums``: the same inputs give the same bits, run
after run. Without sums: one launch.
"""

import torch
import triton
import triton.language as tl

from . import launch
from .kernel_io import chunk_count, gradient_pointers, load_f32, program_chunk, runtime_scales
from .update_math import gradient_sums, is_nonfinite

G_B, G_LB = (tl.constexpr(column) for column in range(2))
SUMS = tl.constexpr(4)
FINISH_BLOCK = tl.constexpr(1024)  # chunk sums added per iteration of the finishing program


@triton.jit
def scan_block(g_b_ptr, g_lb_ptr, found_inf_ptr, scratch_ptr, remaining, scale_b, scale_lb,
               BLOCK: tl.constexpr, MASKED: tl.constexpr, HAS_G_LB: tl.constexpr,
               HAS_SUMS: tl.constexpr):
    """One block: BLOCK elements, or with MASKED those before ``remaining`` (the others read 0,
    which is finite and adds nothing)."""
    offsets = tl.arange(0, BLOCK)
    g_b = load_f32(g_b_ptr, offsets, remaining, MASKED)
    g_lb = tl.zeros([BLOCK], tl.float32)
    if HAS_G_LB:
        g_lb = load_f32(g_lb_ptr, offsets, remaining, MASKED)
    bad = tl.sum((is_nonfinite(g_b) | is_nonfinite(g_lb)).to(tl.int32), axis=0)
    tl.store(found_inf_ptr, 1.0, mask=bad > 0)
    if HAS_SUMS:
        g_sq, b_sq, lb_sq, b_lb = gradient_sums(g_b, g_lb, scale_b, scale_lb)
        partial_ptr = scratch_ptr + tl.program_id(0).to(tl.int64) * SUMS
        tl.store(partial_ptr + 0, g_sq)
        tl.store(partial_ptr + 1, b_sq)
        tl.store(partial_ptr + 2, lb_sq)
        tl.store(partial_ptr + 3, b_lb)


@triton.jit(do_not_specialize=["tensor_count"])
def scan_kernel(table_ptr, tensor_count, found_inf_ptr, scratch_ptr, scale_b, scale_lb,
                G_B_DTYPE: tl.constexpr, G_LB_DTYPE: tl.constexpr, WIDTH: tl.constexpr,
                BLOCK: tl.constexpr, ALIGNED: tl.constexpr, HAS_G_LB: tl.constexpr,
                HAS_SUMS: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr):
    """One chunk: found_inf, and with HAS_SUMS the chunk's four sums into scratch[4 * chunk:]
    (without sums, scratch_ptr is None)."""
    row, base, numel = program_chunk(table_ptr, tensor_count, WIDTH, BLOCK)
    remaining = numel - base
    g_b_ptr, g_lb_ptr = gradient_pointers(table_ptr, row, base, G_B, G_LB, WIDTH, G_B_DTYPE,
                                          G_LB_DTYPE, ALIGNED)
    scale_b, scale_lb = runtime_scales(scale_b, scale_lb, SCALARS_IN_MEMORY)
    if remaining >= BLOCK:
        scan_block(g_b_ptr, g_lb_ptr, found_inf_ptr, scratch_ptr, remaining, scale_b, scale_lb,
                   BLOCK, False, HAS_G_LB, HAS_SUMS)
    else:
        scan_block(g_b_ptr, g_lb_ptr, found_inf_ptr, scratch_ptr, remaining, scale_b, scale_lb,
                   BLOCK, True, HAS_G_LB, HAS_SUMS)


@triton.jit(do_not_specialize=["tensor_count"])
def scan_sums_kernel(table_ptr, tensor_count, scratch_ptr, sums_ptr, WIDTH: tl.constexpr):
    """One program: sums[k] += the chunks' k-th sums, in a fixed order."""
    chunks = chunk_count(table_ptr, tensor_count, WIDTH)
    offsets = tl.arange(0, FINISH_BLOCK)
    acc = tl.zeros([FINISH_BLOCK, SUMS], tl.float64)
    terms = tl.arange(0, SUMS)
    start = chunks * 0
    while start < chunks:  # not range(): triton 3.6's interpreter cannot bound it by a load
        chunk = start + offsets
        mask = (chunk < chunks)[:, None]
        acc += tl.load(scratch_ptr + chunk[:, None] * SUMS + terms[None, :], mask=mask,
                       other=0.0)
        start += FINISH_BLOCK
    tl.store(sums_ptr + terms, tl.load(sums_ptr + terms) + tl.sum(acc, axis=0))


def _scratch(group):
    return torch.float64, SUMS.value * group.chunk_count


def scan_(grads_b, grads_lb, found_inf, sums, *, scale_b, scale_lb):
    """gerne_kernels::triton_scan_, both overloads (schema in _ops.py)."""
    has_g_lb = len(grads_lb) > 0
    has_sums = sums is not None
    if has_sums and (sums.dtype != torch.float64 or sums.numel() != 4
                     or not sums.is_contiguous() or sums.device != found_inf.device):
        raise TypeError(f"triton_scan_: sums must be a contiguous float64 tensor of 4 elements "
                        f"on found_inf's device, got {sums.dtype} of shape {tuple(sums.shape)} "
                        f"on {sums.device}")
    passes = [launch.Pass(scan_kernel, launch.one_per_chunk)]
    if has_sums:
        passes.append(launch.Pass(scan_sums_kernel, launch.one_if_any_chunk))
    launch.run(launch.OpLaunch(
        "triton_scan_",
        columns=launch.gradient_columns(grads_b, grads_lb if has_g_lb else None),
        passes=tuple(passes),
        found_inf=found_inf,
        tensor_scalars=dict(scale_b=scale_b, scale_lb=scale_lb),
        flags=dict(HAS_G_LB=has_g_lb, HAS_SUMS=has_sums),
        pointers=dict(sums_ptr=sums) if has_sums else {},
        scratch=_scratch if has_sums else None))
