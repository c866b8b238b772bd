"""Reading the multi-tensor launch's tables inside a kernel (see _launch.py for their layout).

Program k handles chunk ``chunks[k, 1]`` (BLOCK elements) of the tensor in row
``rows = chunks[k, 0]`` of the pointer table, whose columns are that tensor's addresses, one per
role, and its element count last. An address is an int64 cast to a typed pointer; the element
type comes from a ``like`` argument, a tensor of that role passed as an ordinary argument.
"""

import triton
import triton.language as tl


@triton.jit
def program_chunk(chunks_ptr, BLOCK: tl.constexpr):
    """(row, base): this program's pointer-table row and the int64 offset of its first
    element within that tensor (64-bit, so tensors beyond 2^31 elements index correctly)."""
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(chunks_ptr + 2 * pid).to(tl.int64)
    chunk = tl.load(chunks_ptr + 2 * pid + 1).to(tl.int64)
    return row, chunk * BLOCK


@triton.jit
def table_numel(table_ptr, row, WIDTH: tl.constexpr):
    return tl.load(table_ptr + row * WIDTH + (WIDTH - 1))


@triton.jit
def table_pointer(table_ptr, row, COLUMN: tl.constexpr, WIDTH: tl.constexpr, like,
                  ALIGNED: tl.constexpr):
    """The address in (row, COLUMN) as a pointer of ``like``'s type; ALIGNED promises the
    compiler a 16-byte boundary (checked on the host), which allows vector loads."""
    pointer = tl.load(table_ptr + row * WIDTH + COLUMN).to(like.dtype)
    if ALIGNED:  # on the pointer: a hint on the int64 does not survive the cast
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def remaining_elements(found_inf_ptr, numel, base):
    """Elements of the tensor from ``base`` on, or 0 when found_inf is set: every load and store
    of a skipped step is masked off, so the step changes nothing (read on the device, no sync)."""
    return tl.where(tl.load(found_inf_ptr) == 0, numel - base, 0)


@triton.jit
def update_chunk(table_ptr, chunks_ptr, found_inf_ptr, WIDTH: tl.constexpr,
                 BLOCK: tl.constexpr):
    """(row, base, remaining) for an update kernel's program: remaining_elements of its chunk."""
    row, base = program_chunk(chunks_ptr, BLOCK)
    return row, base, remaining_elements(found_inf_ptr, table_numel(table_ptr, row, WIDTH), base)
