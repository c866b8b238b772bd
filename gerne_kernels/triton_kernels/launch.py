"""The host side of every Triton op, written once: argument checks, grouping, the launch table,
and the launch itself. An op module describes one call (``OpLaunch``: its columns, scalars,
constexpr flags and kernel passes) and hands it to ``run``.

Launch mode: multi-tensor, the only one. One launch covers every tensor of a call: the host
writes a table with one row per tensor (kernel_io.py has the layout) and program k of the grid
works on the k-th BLOCK-element chunk of the whole call. Launching per tensor instead costs tens
of microseconds of Python and driver time per launch: hundreds of launches, milliseconds, per
step of a 200-tensor model, against one small table copy that is cached (table_cache.py: the
addresses repeat from step to step) and one launch. A default optimizer step is then at most
four launches whatever the tensor count (scan_ 1, or 2 with sums; adam_step_ 2: step counts,
then the update; sgd_step_, lion_step_, extrapolate_ 1 each). Calls mixing dtypes, or 16-byte
aligned tensors with unaligned ones (a view such as t[1:]), are split into *groups* of tensors
with equal column dtypes and alignment, one table and launch per group: a column's element type
is a compile-time constant of the kernel, and aligned tensors keep their 16-byte vector accesses
however many unaligned ones share the call.

One table, not two. The program-to-chunk mapping lives in the table (each row's chunk_end,
searched by the program in log2(tensors) steps, as the CUDA harness does) rather than in a
second table with one row per chunk: the table then grows with the tensors, not the elements
(a 2^24-element step would need a chunk table of 8192 rows and its copy on every cache miss),
and one key, one copy, one cache entry and one capture-arena slice serve the launch. The search
costs log2(tensors) dependent loads of a few-kilobyte table (cache hits) per program of BLOCK
elements, at the program's start, where other resident programs' loads hide it (not yet
measured on a GPU).

Compile-time specialisation is explicit: element dtypes are constexprs per column (the kernel
casts table addresses with tl.pointer_type), float scalars are always float32 kernel arguments
(converted with float()), and the one integer argument, tensor_count, is not specialised, so a
variant is its constexprs plus the dtype and alignment of its few pointer arguments
(graph_capture.py records them for CUDA graph capture). A fixed configuration (BLOCK_SIZE
elements per program, NUM_WARPS), no autotuning: a tuning run would replay the in-place update.

No host sync anywhere: found_inf, Adam's step counts and .tensor scalars are read by kernels.
"""

import contextlib
import dataclasses
import operator
import os
import struct
from typing import Callable, Optional, Sequence

import torch
import triton.language as tl

from .. import _scalars
from . import graph_capture, table_cache

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Not measured on a GPU yet: 2048 float32 elements over 4 warps is 16 per thread, four 16-byte
# vectors per column. The interpreter runs one program at a time in numpy, so a smaller block
# there keeps multi-chunk tensors in tests small.
BLOCK_SIZE = 1024 if INTERPRET else 2048
NUM_WARPS = 4
VECTOR_BYTES = 16

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                 torch.float16: tl.float16}
SCALAR_TENSOR_DTYPES = (torch.float32, torch.float64)
# Integer kernel arguments that Triton must not specialise (do_not_specialize in the kernels).
RUNTIME_INTEGERS = frozenset({"tensor_count"})


@contextlib.contextmanager
def launch_settings(block_size=None, num_warps=None):
    """Temporarily sets BLOCK_SIZE / NUM_WARPS (None keeps the current value)."""
    global BLOCK_SIZE, NUM_WARPS
    saved = BLOCK_SIZE, NUM_WARPS
    BLOCK_SIZE = saved[0] if block_size is None else block_size
    NUM_WARPS = saved[1] if num_warps is None else num_warps
    try:
        yield
    finally:
        BLOCK_SIZE, NUM_WARPS = saved


def settings():
    """(block_size, num_warps) as currently set."""
    block = int(BLOCK_SIZE)
    if block < 16 or block & (block - 1):
        raise ValueError("gerne_kernels.triton_kernels BLOCK_SIZE must be a power of two >= 16, "
                         f"got {block}")
    return block, int(NUM_WARPS)


# ---------------------------------------------------------------------------------------------
# The description of one call

@dataclasses.dataclass(frozen=True)
class Column:
    """One tensor list of the op's schema as a column of the launch table.

    name: the kernel's name for it: the column's index constant (e.g. ``P``) and its dtype
        constexpr (``P_DTYPE``); the columns of an OpLaunch are listed in index order.
    argument: the schema's name for the list (``params``), for error messages.
    tensors: one tensor per parameter, or None where this call touches none (no momentum: no
        momentum buffers; the column then holds null addresses).
    per_element: a stream of the parameter's shape, read or written in blocks (its dtype and
        alignment count); False for one-element float32 tensors per parameter (step counts).
    """
    name: str
    argument: str
    tensors: Optional[Sequence[torch.Tensor]]
    per_element: bool = True


def gradient_columns(grads_b, grads_lb):
    """The G_B and G_LB columns, which every op reads."""
    return Column("G_B", "grads_b", grads_b), Column("G_LB", "grads_lb", grads_lb)


@dataclasses.dataclass(frozen=True)
class Pass:
    """One kernel launch per group: ``kernel`` over ``programs(group)`` programs (none: skipped).
    The kernel receives, by name, those of the launch's arguments that its signature lists.
    fp_fusion=False compiles it without contracting a * b + c into fused multiply-adds (each
    operation rounds, as the reference's separate tensor ops do; the interpreter never fuses)."""
    kernel: object
    programs: Callable[["Group"], int]
    num_warps: Optional[int] = None  # None: NUM_WARPS
    fp_fusion: bool = True


@dataclasses.dataclass(frozen=True)
class OpLaunch:
    """One call of an op: what ``run`` needs besides the shared skeleton.

    columns: the table's columns; the first is the parameters (it sets the tensor count).
    found_inf: the call's one-element float32 flag (the device of the call).
    tensor_scalars: lr / scale_b / scale_lb: floats (default overload) or one-element tensors
        (.tensor): kernel arguments NAME, by value or as pointers (SCALARS_IN_MEMORY).
    scalars: other float kernel arguments (float32).
    doubles: names of tensor_scalars or scalars that the kernel also reads as float64: it gets
        NAME_lo besides NAME (kernel_scalars).
    flags: constexpr kernel arguments.
    pointers: other tensor kernel arguments (e.g. scan_'s sums).
    scratch: (dtype, numel) of a per-group device buffer, the kernels' scratch_ptr (None
        without).
    """
    op_name: str
    columns: Sequence[Column]
    passes: Sequence[Pass]
    found_inf: torch.Tensor
    tensor_scalars: dict = dataclasses.field(default_factory=dict)
    doubles: tuple = ()
    scalars: dict = dataclasses.field(default_factory=dict)
    flags: dict = dataclasses.field(default_factory=dict)
    pointers: dict = dataclasses.field(default_factory=dict)
    scratch: Optional[Callable[["Group"], tuple]] = None


@dataclasses.dataclass(frozen=True)
class Group:
    """Tensors of one call launched together: equal column dtypes and alignment."""
    rows: tuple          # indices into the call's tensor lists
    dtypes: tuple        # per column: the tensors' torch dtype, or None for an unused column
    aligned: bool        # every per-element pointer of every tensor is 16-byte aligned
    chunk_count: int     # BLOCK-element chunks of all rows


def one_per_chunk(group):
    return group.chunk_count


def one_per_tensor(group):
    return len(group.rows)


def one_if_any_chunk(group):
    return 1 if group.chunk_count else 0


# ---------------------------------------------------------------------------------------------
# Host-side values

def fp32(x):
    """x rounded to the nearest float32, as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def split_double(x):
    """(hi, lo) float32 values with hi + lo == x to about 48 bits (kernel_io.host_double)."""
    x = float(x)
    hi = fp32(x)
    return hi, float(x - hi)


def host_decay_factor(lr, weight_decay):
    """1 - lr * weight_decay in float64, as torch.optim computes it, for a float lr; a tensor lr
    is read by the kernel, which computes it (kernel_io.runtime_decay_factor)."""
    return 1.0 if isinstance(lr, torch.Tensor) else 1.0 - float(lr) * float(weight_decay)


def kernel_scalars(op_name, device, tensor_scalars, scalars, doubles):
    """(arguments, in_memory): an OpLaunch's scalars as kernel arguments.

    scalars: floats, passed as float32; those named in ``doubles`` also get NAME_lo, so that
    host_double(NAME, NAME_lo) is their float64 to about 48 bits (split_double: NAME is the
    float32 rounding of the value either way). tensor_scalars: all floats (the default
    overload) are passed the same way; otherwise (.tensor) each becomes a pointer to a
    one-element float32/float64 tensor on ``device``, passed as it is (a tensor elsewhere, e.g.
    on the CPU, or a float, is filled in on the device by _scalars.on_device: no sync), with
    NAME_lo = 0 unused."""
    in_memory = any(isinstance(v, torch.Tensor) for v in tensor_scalars.values())
    out = {}
    for name, value in (scalars if in_memory else dict(tensor_scalars, **scalars)).items():
        if name in doubles:
            out[name], out[name + "_lo"] = split_double(value)
        else:
            out[name] = float(value)
    if not in_memory:
        return out, False
    for name, t in tensor_scalars.items():
        if isinstance(t, torch.Tensor) and (t.numel() != 1
                                            or t.dtype not in SCALAR_TENSOR_DTYPES):
            raise TypeError(f"{op_name}: {name} must be a one-element float32 or float64 tensor "
                            f"(the .tensor overload), got {t!r}")
        on_device = isinstance(t, torch.Tensor) and t.device == device
        out[name] = t.detach() if on_device else _scalars.on_device(t, device)
        if name in doubles:
            out[name + "_lo"] = 0.0
    return out, True


# ---------------------------------------------------------------------------------------------
# Argument checks: cheap host-side properties only, never a device sync.

_DTYPE = operator.attrgetter("dtype")


def check_found_inf(found_inf, op_name):
    if found_inf.dtype != torch.float32 or found_inf.numel() != 1:
        raise TypeError(f"{op_name}: found_inf must be a float32 tensor with one element "
                        f"(a 0-d tensor), got {found_inf.dtype} of shape "
                        f"{tuple(found_inf.shape)}")
    if INTERPRET and found_inf.device.type != "cpu":
        raise RuntimeError(f"{op_name}: under TRITON_INTERPRET=1 the Triton ops run on CPU "
                           f"tensors only (the interpreter copies kernel arguments to the host; "
                           f"the addresses in a launch table would not follow), got "
                           f"{found_inf.device}")


def check_column(op_name, device_index, numels, name, tensors, per_element):
    """One list: one tensor per parameter, on found_inf's device; per-element lists of a fused
    dtype, the parameter's numel and contiguous, else one-element float32 tensors. The fast path
    maps C-level methods over the list: a step checks every tensor, and Python time per tensor
    is what limits many small tensors."""
    if len(tensors) != len(numels):
        raise ValueError(f"{op_name}: {name} has {len(tensors)} tensors, expected "
                         f"{len(numels)} (one per parameter)")
    if any(i != device_index for i in map(torch.Tensor.get_device, tensors)):
        bad = next(i for i, t in enumerate(tensors) if t.get_device() != device_index)
        raise ValueError(f"{op_name}: {name}[{bad}] is on {tensors[bad].device} but found_inf "
                         f"is on device index {device_index}; all tensors of one call must "
                         "share the parameters' device")
    if not per_element:
        for i, s in enumerate(tensors):
            if s.dtype != torch.float32 or s.numel() != 1:
                raise TypeError(f"{op_name}: {name}[{i}] must be a float32 0-d tensor on the "
                                f"parameters' device, got {s.dtype} of shape {tuple(s.shape)}")
        return
    if (any(d not in FUSED_DTYPES for d in set(map(_DTYPE, tensors)))
            or list(map(torch.Tensor.numel, tensors)) != numels
            or not all(map(torch.Tensor.is_contiguous, tensors))):
        for i, (t, n) in enumerate(zip(tensors, numels)):
            if t.dtype not in FUSED_DTYPES:
                raise TypeError(f"{op_name}: {name}[{i}] has dtype {t.dtype}; the Triton "
                                "kernels take float32, bfloat16 and float16 (use the "
                                "reference backend for other dtypes)")
            if t.numel() != n:
                raise ValueError(f"{op_name}: {name}[{i}] has {t.numel()} elements, its "
                                 f"parameter {n}; shapes must match")
            if not t.is_contiguous():
                raise ValueError(f"{op_name}: {name}[{i}] is not contiguous (strides "
                                 f"{t.stride()}); make it contiguous first")


# ---------------------------------------------------------------------------------------------
# Groups and tables

def _groups(columns, numels, block):
    """The call's tensors split by (column dtypes, alignment), in first-appearance order; an
    empty tensor is aligned by definition (no element is accessed)."""
    streams = [c for c in columns if c.tensors is not None and c.per_element]
    dtypes = [list(map(_DTYPE, c.tensors)) for c in streams]
    misaligned = [[address % VECTOR_BYTES != 0 for address in map(torch.Tensor.data_ptr,
                                                                   c.tensors)]
                  for c in streams]
    by_key = {}
    for i, n in enumerate(numels):
        aligned = n == 0 or not any(m[i] for m in misaligned)
        by_key.setdefault((tuple(d[i] for d in dtypes), aligned), []).append(i)
    groups = []
    for (row_dtypes, aligned), rows in by_key.items():
        stream_dtypes = iter(row_dtypes)
        column_dtypes = tuple(next(stream_dtypes) if c.tensors is not None and c.per_element
                              else (torch.float32 if c.tensors is not None else None)
                              for c in columns)
        chunks = sum(-(-numels[i] // block) for i in rows)
        groups.append(Group(tuple(rows), column_dtypes, aligned, chunks))
    return groups


def _table_values(columns, numels, rows, block):
    """The group's table, row-major: per row its columns' addresses, numel, chunk_end."""
    addresses = [None if c.tensors is None else [c.tensors[i].data_ptr() for i in rows]
                 for c in columns]
    values = []
    chunk_end = 0
    for k, i in enumerate(rows):
        chunk_end += -(-numels[i] // block)
        values.extend(0 if a is None else a[k] for a in addresses)
        values.append(numels[i])
        values.append(chunk_end)
    return tuple(values)


def _variant(kernel, device, arguments, options):
    """What makes Triton compile a kernel anew (see graph_capture)."""
    signature = []
    for name, value in arguments.items():
        if isinstance(value, torch.Tensor):
            signature.append((name, str(value.dtype), value.data_ptr() % VECTOR_BYTES == 0))
        elif isinstance(value, float) or name in RUNTIME_INTEGERS:
            signature.append((name, type(value).__name__))
        else:
            signature.append((name, str(value)))
    return (kernel_name(kernel), str(device), tuple(signature), tuple(sorted(options.items())))


def kernel_name(kernel):
    """module.function of a @triton.jit kernel (compiled or interpreted)."""
    return f"{kernel.fn.__module__}.{kernel.fn.__name__}"


def launch_kernel(kernel, programs, arguments, options):
    """kernel[(programs,)](**arguments, **options): the one place that launches (tests count
    launches by patching it)."""
    kernel[(programs,)](**arguments, **options)


# ---------------------------------------------------------------------------------------------
# The skeleton

def run(op):
    """Checks, groups, tables, launches: one OpLaunch on found_inf's device and current
    stream (Triton launches on the current device; the C++ ops set a device guard likewise)."""
    found_inf = op.found_inf
    check_found_inf(found_inf, op.op_name)
    if found_inf.is_cuda and found_inf.device.index != torch.cuda.current_device():
        with torch.cuda.device(found_inf.device):
            return _run(op)
    return _run(op)


def _run(op):
    found_inf = op.found_inf
    device, device_index = found_inf.device, found_inf.get_device()
    params = op.columns[0].tensors
    numels = list(map(torch.Tensor.numel, params))
    for column in op.columns:
        if column.tensors is not None:
            check_column(op.op_name, device_index, numels, column.argument, column.tensors,
                         column.per_element)
    if not numels:
        return
    block, num_warps = settings()
    scalars, in_memory = kernel_scalars(op.op_name, device, op.tensor_scalars, op.scalars,
                                        op.doubles)
    shared = dict(found_inf_ptr=found_inf, **op.pointers, **scalars, **op.flags,
                  SCALARS_IN_MEMORY=in_memory, BLOCK=block, WIDTH=len(op.columns) + 2)
    capturing = graph_capture.stream_is_capturing(device)
    launches = []
    for group in _groups(op.columns, numels, block):
        values = _table_values(op.columns, numels, group.rows, block)
        arguments = dict(shared, table_ptr=table_cache.device_table(device, values,
                                                                    shared["WIDTH"], capturing),
                         tensor_count=len(group.rows), ALIGNED=group.aligned)
        for column, dtype in zip(op.columns, group.dtypes):
            arguments[column.name + "_DTYPE"] = TRITON_DTYPES[dtype or torch.float32]
        arguments["scratch_ptr"] = None
        if op.scratch is not None:
            dtype, numel = op.scratch(group)
            arguments["scratch_ptr"] = torch.empty(max(numel, 1), dtype=dtype, device=device)
        for step in op.passes:
            programs = step.programs(group)
            if programs:
                kernel_arguments = _arguments_of(step.kernel, arguments, op.op_name)
                options = dict(num_warps=step.num_warps or num_warps)
                if not step.fp_fusion:
                    options["enable_fp_fusion"] = False
                launches.append((step.kernel, programs, kernel_arguments, options))
    variants = [_variant(kernel, device, kernel_arguments, options)
                for kernel, _, kernel_arguments, options in launches]
    if capturing:  # all before any launch: a capture that must fail records no half step
        for variant in variants:
            graph_capture.require_launched(variant)
    for (kernel, programs, kernel_arguments, options), variant in zip(launches, variants):
        launch_kernel(kernel, programs, kernel_arguments, options)
        if not capturing:
            graph_capture.record_launched(variant)


def _arguments_of(kernel, arguments, op_name):
    try:
        return {name: arguments[name] for name in kernel.arg_names}
    except KeyError as missing:
        raise TypeError(f"{op_name}: the kernel {kernel_name(kernel)} takes {missing}, which its "
                        "OpLaunch does not provide") from None
