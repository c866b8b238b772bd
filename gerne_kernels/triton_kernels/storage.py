"""Loading a tensor's elements as float32 and storing float32 results in the tensor's dtype.

MASKED (a compile-time flag) selects bounds-checked accesses for a tensor's last, partial
block (and for skipped steps, where nothing is in bounds). Full blocks go unmasked: a mask whose
bound the compiler cannot see to be a multiple of the vector width forces one-element accesses,
while an unmasked block over a 16-byte-aligned address becomes 16-byte vector loads and stores.

Rounding: compiled Triton rounds float32 -> bfloat16/float16 to nearest even, as torch does.
Triton's interpreter (TRITON_INTERPRET=1, numpy) truncates float32 -> bfloat16 instead, which
would put the CI checks one bfloat16 ulp off the reference; under the interpreter the bfloat16
rounding is therefore done here in integer arithmetic, bit-exact with torch's. Compiled kernels
keep the hardware conversion (SOFTWARE_BF16_ROUNDING is a compile-time constant).
"""

import os

import triton
import triton.language as tl

SOFTWARE_BF16_ROUNDING = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def load_f32(ptr, offsets, remaining, MASKED: tl.constexpr):
    """ptr[offsets] as float32; with MASKED, offsets >= remaining read as 0."""
    if MASKED:
        x = tl.load(ptr + offsets, mask=offsets < remaining, other=0.0)
    else:
        x = tl.load(ptr + offsets)
    return x.to(tl.float32)


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
