"""What the kernels use to reach memory: the launch table, element loads and stores, and the
runtime scalars.

The launch table (built by launch.py) is int64 ``[tensor_count, WIDTH]``, one row per tensor:
the data address of each of the op's columns (0 where the call has no such tensors), then the
tensor's element count (column WIDTH - 2), then ``chunk_end``, the number of BLOCK-element
chunks of this row and all rows before it (column WIDTH - 1). Program k works on chunk k of the
launch: its row is the first whose chunk_end exceeds k, found by binary search, as the CUDA
harness does (csrc/cuda/multi_tensor_apply.cuh). An address becomes a typed pointer by a cast to
``tl.pointer_type(DTYPE)``, DTYPE a constexpr of the column, so the kernel's only pointer
arguments are the table, found_inf, scalars in memory and an op's own buffers (Adam's per-tensor
scalars, scan_'s sums).

Loads return float32; stores take float32 and convert to the column's dtype. MASKED (a
compile-time flag) selects bounds-checked accesses for a tensor's last, partial block (and for
skipped steps, where nothing is in bounds). Full blocks go unmasked: a mask whose bound the
compiler cannot see to be a multiple of the vector width forces one-element accesses, while an
unmasked block over a 16-byte-aligned address (ALIGNED, checked on the host) becomes 16-byte
vector loads and stores.

Rounding: compiled Triton rounds float32 -> bfloat16/float16 to nearest even, as torch does.
Triton's interpreter (TRITON_INTERPRET=1, numpy) truncates float32 -> bfloat16 instead, which
would put the CI checks one bfloat16 ulp off the reference; under the interpreter the bfloat16
rounding is therefore done here in integer arithmetic, bit-exact with torch's. Compiled kernels
keep the hardware conversion (SOFTWARE_BF16_ROUNDING is a compile-time constant).

Scalars: lr, scale_b and scale_lb come by value (the ops' default overload: Python floats, which
a Triton kernel takes as float32, or float32 (hi, lo) pairs where float64 is needed) or, with
``IN_MEMORY`` (the ``.tensor`` overloads), as pointers to float32 or float64 scalars on the
call's device that every program reads: no host sync, and a captured CUDA graph sees the values
of the moment it is replayed. Either way the kernel computes with the same values.
"""

import os

import triton
import triton.language as tl

from .update_math import adamw_decay_factor, extrapolated_grad

SOFTWARE_BF16_ROUNDING = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


# ---------------------------------------------------------------------------------------------
# The launch table

@triton.jit
def table_entry(table_ptr, row, COLUMN: tl.constexpr, WIDTH: tl.constexpr):
    """The int64 in (row, COLUMN); negative COLUMN counts from the row's end."""
    if COLUMN < 0:
        return tl.load(table_ptr + row * WIDTH + (WIDTH + COLUMN))
    return tl.load(table_ptr + row * WIDTH + COLUMN)


@triton.jit
def chunk_count(table_ptr, tensor_count, WIDTH: tl.constexpr):
    """Chunks of the whole launch: the last row's chunk_end."""
    return table_entry(table_ptr, tensor_count - 1, -1, WIDTH)


@triton.jit
def program_chunk(table_ptr, tensor_count, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """(row, base, numel) of this program's chunk: its table row, the int64 offset of its first
    element within that tensor (64-bit, so tensors beyond 2^31 elements index correctly) and
    the tensor's element count. Rows without elements own no chunk and are never found."""
    pid = tl.program_id(0)
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + (tensor_count - 1)
    while lo < hi:  # the first row whose chunk_end exceeds pid
        mid = (lo + hi) // 2
        after = table_entry(table_ptr, mid, -1, WIDTH) > pid
        hi = tl.where(after, mid, hi)
        lo = tl.where(after, lo, mid + 1)
    first_chunk = tl.where(lo > 0, table_entry(table_ptr, tl.maximum(lo - 1, 0), -1, WIDTH), 0)
    base = (pid - first_chunk).to(tl.int64) * BLOCK
    return lo, base, table_entry(table_ptr, lo, -2, WIDTH)


@triton.jit
def column_pointer(table_ptr, row, COLUMN: tl.constexpr, WIDTH: tl.constexpr,
                   DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The address in (row, COLUMN) as a pointer to DTYPE; ALIGNED promises the compiler a
    16-byte boundary (checked on the host), which allows vector loads."""
    pointer = table_entry(table_ptr, row, COLUMN, WIDTH).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # on the pointer: a hint on the int64 does not survive the cast
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def chunk_pointer(table_ptr, row, base, COLUMN: tl.constexpr, WIDTH: tl.constexpr,
                  DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """column_pointer moved to the chunk's first element."""
    return column_pointer(table_ptr, row, COLUMN, WIDTH, DTYPE, ALIGNED) + base


@triton.jit
def gradient_pointers(table_ptr, row, base, G_B: tl.constexpr, G_LB: tl.constexpr,
                      WIDTH: tl.constexpr, G_B_DTYPE: tl.constexpr, G_LB_DTYPE: tl.constexpr,
                      ALIGNED: tl.constexpr):
    """(g_b, g_lb) chunk pointers: every op reads both gradients."""
    return (chunk_pointer(table_ptr, row, base, G_B, WIDTH, G_B_DTYPE, ALIGNED),
            chunk_pointer(table_ptr, row, base, G_LB, WIDTH, G_LB_DTYPE, ALIGNED))


@triton.jit
def remaining_elements(found_inf_ptr, numel, base):
    """Elements of the tensor from ``base`` on, or 0 when found_inf is set: every load and store
    of a skipped step is masked off, so the step changes nothing (read on the device, no sync)."""
    return tl.where(tl.load(found_inf_ptr) == 0, numel - base, 0)


@triton.jit
def update_chunk(table_ptr, tensor_count, found_inf_ptr, WIDTH: tl.constexpr,
                 BLOCK: tl.constexpr):
    """(row, base, remaining) for an update kernel's program: remaining_elements of its chunk."""
    row, base, numel = program_chunk(table_ptr, tensor_count, WIDTH, BLOCK)
    return row, base, remaining_elements(found_inf_ptr, numel, base)


# ---------------------------------------------------------------------------------------------
# Elements

@triton.jit
def load_f32(ptr, offsets, remaining, MASKED: tl.constexpr):
    """ptr[offsets] as float32; with MASKED, offsets >= remaining read as 0."""
    if MASKED:
        x = tl.load(ptr + offsets, mask=offsets < remaining, other=0.0)
    else:
        x = tl.load(ptr + offsets)
    return x.to(tl.float32)


@triton.jit
def load_extrapolated_grad(g_b_ptr, g_lb_ptr, offsets, remaining, scale_b, scale_lb,
                           MASKED: tl.constexpr):
    """g = scale_lb * g_lb + scale_b * g_b of the elements at offsets (update_math)."""
    g_b = load_f32(g_b_ptr, offsets, remaining, MASKED)
    g_lb = load_f32(g_lb_ptr, offsets, remaining, MASKED)
    return extrapolated_grad(g_b, g_lb, scale_b, scale_lb)


@triton.jit
def store_f32(ptr, offsets, x, remaining, MASKED: tl.constexpr):
    """ptr[offsets] = float32 x in ptr's dtype; with MASKED, only offsets < remaining."""
    value = to_storage(x, ptr)
    if MASKED:
        tl.store(ptr + offsets, value, mask=offsets < remaining)
    else:
        tl.store(ptr + offsets, value)


@triton.jit
def round_to_bfloat16(x):
    """float32 -> bfloat16, round to nearest, ties to even; NaN stays (a quiet) NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_storage(x, ptr):
    """float32 x converted to the element type of ``ptr``."""
    if SOFTWARE_BF16_ROUNDING and ptr.dtype.element_ty == tl.bfloat16:
        return round_to_bfloat16(x)
    return x.to(ptr.dtype.element_ty)


# ---------------------------------------------------------------------------------------------
# Scalars

@triton.jit
def runtime_float(value_or_pointer, IN_MEMORY: tl.constexpr):
    """A float32 scalar: the argument, or the float32/float64 it points to, rounded once."""
    value = value_or_pointer
    if IN_MEMORY:
        value = tl.load(value_or_pointer).to(tl.float32)
    return value


@triton.jit
def runtime_scales(scale_b, scale_lb, IN_MEMORY: tl.constexpr):
    """(scale_b, scale_lb) as float32 (runtime_float of each)."""
    return runtime_float(scale_b, IN_MEMORY), runtime_float(scale_lb, IN_MEMORY)


@triton.jit
def host_double(hi, lo):
    """The float64 hi + lo of a float32 pair (launch.kernel_scalars): a Triton kernel takes float
    arguments as float32, and e.g. float32 beta2 = 0.999 alone would move 1 - beta2 by 1e-5
    relative; the pair carries the host's double to about 48 bits."""
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


@triton.jit
def runtime_double(hi_or_pointer, lo, IN_MEMORY: tl.constexpr):
    """A float64 scalar: host_double(hi, lo), or the float32/float64 that hi_or_pointer points
    to (lo is then unused)."""
    if IN_MEMORY:
        value = tl.load(hi_or_pointer).to(tl.float64)
    else:
        value = host_double(hi_or_pointer, lo)
    return value


@triton.jit
def runtime_decay_factor(decay_factor, lr, lr_lo, weight_decay, weight_decay_lo,
                         IN_MEMORY: tl.constexpr):
    """AdamW's and Lion's 1 - lr * wd as float32: decay_factor, computed on the host in float64
    from a float lr (launch.host_decay_factor), or, for lr in device memory, computed here in
    float64 from it and weight_decay's float32 pair."""
    if IN_MEMORY:
        decay_factor = adamw_decay_factor(runtime_double(lr, lr_lo, IN_MEMORY),
                                          host_double(weight_decay, weight_decay_lo))
    return decay_factor
