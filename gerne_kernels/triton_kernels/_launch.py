"""Host side of the Triton kernels: argument checks, launch settings and the tensor tables.

Two launch strategies, selected by ``gerne_kernels.triton_kernels.LAUNCH_MODE``:

``"multi_tensor"`` (the default): one launch covers every tensor of a call. The host writes a
    *pointer table* (int64, one row per tensor: the data_ptr of each role, e.g. param, g_b, g_lb,
    buffers, then numel) and a *chunk table* (int32, one row per program: tensor row, chunk index
    within the tensor). Program k loads its row and casts the addresses to typed pointers. Why
    the default (reasoned, not yet measured on a GPU: none was available when this was
    written; benchmarks/bench_gpu.py compares the modes): a Triton launch costs tens of
    microseconds of Python, so per-tensor launches over 200..1,000 tensors spend milliseconds
    on the host alone, while the pointer table costs one small host-to-device copy (cached:
    the tables are pure data, keyed by their contents, and addresses repeat between steps).
    Either way the Python side checks and reads every tensor, about 1 us per tensor and role on
    the 2-core CI machine; for many small tensors capture the step in a CUDA graph. A capture
    whose tables are not cached yet (no eager step with these tensors before it) launches per
    tensor instead: see _TableCache.
``"per_tensor"``: one launch per tensor with the tensors as ordinary kernel arguments. Triton
    then specialises on pointer alignment by itself; kept so that the GPU benchmark
    (benchmarks/bench_gpu.py) can compare both, and as the path the interpreter takes for
    non-CPU tensors (it copies arguments to the host; raw addresses in a table would not be).

Both run a fixed configuration (``BLOCK_SIZE`` elements per program, ``NUM_WARPS``): there is
no autotuning, so no tuning run ever replays an in-place update.
"""

import collections
import functools
import operator
import struct
import sys

import torch

MODES = ("multi_tensor", "per_tensor")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TABLE_CACHE_SIZE = 32


def settings():
    """(mode, block_size, num_warps, interpret) as currently set on the package."""
    package = sys.modules[__package__]
    mode = package.LAUNCH_MODE
    if mode not in MODES:
        raise ValueError(f"gerne_kernels.triton_kernels.LAUNCH_MODE must be one of {MODES}, "
                         f"got {mode!r}")
    block = int(package.BLOCK_SIZE)
    if block < 16 or block & (block - 1):
        raise ValueError("gerne_kernels.triton_kernels.BLOCK_SIZE must be a power of two >= 16, "
                         f"got {block}")
    return mode, block, int(package.NUM_WARPS), package.INTERPRET


def mode_for(found_inf, dtypes):
    """(mode, block_size, num_warps) for one call: the configured mode, except per-tensor
    launches where a role mixes dtypes (a table's pointers have one element type per column)
    or where the interpreter runs on non-CPU tensors (it copies them to the host; a table's raw
    device addresses would not follow)."""
    mode, block, num_warps, interpret = settings()
    if None in dtypes.values() or (interpret and found_inf.device.type != "cpu"):
        mode = "per_tensor"
    return mode, block, num_warps


def on_found_inf_device(found_inf_index):
    """Decorates an op so that it runs with found_inf's CUDA device current: Triton launches on
    the current device and stream (the C++ ops set a device guard likewise)."""
    def decorate(op):
        @functools.wraps(op)
        def run(*args, **kwargs):
            found_inf = (args[found_inf_index] if len(args) > found_inf_index
                         else kwargs["found_inf"])
            if found_inf.is_cuda and found_inf.device.index != torch.cuda.current_device():
                with torch.cuda.device(found_inf.device):
                    return op(*args, **kwargs)
            return op(*args, **kwargs)
        return run
    return decorate


def fp32(x):
    """x rounded to the nearest float32, as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def split_double(x):
    """(hi, lo) float32 values with hi + lo == x to about 48 bits (x a Python float)."""
    x = float(x)
    hi = fp32(x)
    return hi, float(x - hi)


# ---------------------------------------------------------------------------------------------
# Argument checks: cheap host-side properties only, never a device sync.

def check_found_inf(found_inf, op_name):
    if found_inf.dtype != torch.float32 or found_inf.numel() != 1:
        raise TypeError(f"{op_name}: found_inf must be a float32 tensor with one element "
                        f"(a 0-d tensor), got {found_inf.dtype} of shape "
                        f"{tuple(found_inf.shape)}")
    return found_inf.get_device()


def check_lists(op_name, device_index, numels, **lists):
    """Checks each named list (one tensor per parameter) for device, dtype, numel and
    contiguity; returns {name: its dtype, or None where the list mixes dtypes (per-tensor
    launches handle that)}. The fast path maps C-level methods over each list: a step calls
    this for every tensor, and Python time per tensor is what limits many small tensors."""
    dtypes = {}
    for name, tensors in lists.items():
        if len(tensors) != len(numels):
            raise ValueError(f"{op_name}: {name} has {len(tensors)} tensors, expected "
                             f"{len(numels)} (one per parameter)")
        seen = set(map(_DTYPE, tensors))
        if (any(d not in FUSED_DTYPES for d in seen)
                or any(i != device_index for i in map(torch.Tensor.get_device, tensors))
                or list(map(torch.Tensor.numel, tensors)) != numels
                or not all(map(torch.Tensor.is_contiguous, tensors))):
            _raise_for_first_bad(op_name, device_index, numels, name, tensors)
        dtypes[name] = seen.pop() if len(seen) == 1 else None
    return dtypes


_DTYPE = operator.attrgetter("dtype")


def _raise_for_first_bad(op_name, device_index, numels, name, tensors):
    for i, (t, n) in enumerate(zip(tensors, numels)):
        if t.get_device() != device_index:
            raise ValueError(f"{op_name}: {name}[{i}] is on {t.device} but found_inf is on "
                             f"device index {device_index}; all tensors of one call must "
                             "share the parameters' device")
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


def check_steps(op_name, device_index, state_steps, n):
    if len(state_steps) != n:
        raise ValueError(f"{op_name}: state_steps has {len(state_steps)} tensors but params has "
                         f"{n}; pass one per parameter")
    for i, s in enumerate(state_steps):
        if s.dtype != torch.float32 or s.numel() != 1 or s.get_device() != device_index:
            raise TypeError(f"{op_name}: state_steps[{i}] must be a float32 0-d tensor on the "
                            f"parameters' device, got {s.dtype} of shape {tuple(s.shape)} on "
                            f"{s.device}")


def first_nonempty(tensors, default):
    """A tensor of the list with data (used only for its dtype), else default."""
    for t in tensors:
        if t.numel():
            return t
    return default


# ---------------------------------------------------------------------------------------------
# Tables for the multi-tensor launch

class _TableCache:
    """Device copies of small host tables, keyed by their full contents (so a hit is the same
    data by construction), the most recent ones kept.

    CUDA graph capture never builds a table: a copy recorded into a graph runs only when the
    graph is first replayed, so the table would be unfilled for whoever got it before (and
    pinning the host side during capture is not safe on every supported torch). A miss during
    capture returns None and the op launches per tensor instead, with the tensors as plain
    kernel arguments; a hit is kept for the life of the process, since the graph reads it at
    every replay. A table used on another stream than the one it was made on is marked with
    record_stream, so that its eviction cannot recycle the memory under a queued kernel."""

    def __init__(self, size):
        self.size = size
        self.recent = collections.OrderedDict()  # key -> (table, stream it was made on)
        self.captured = {}  # key -> table that a captured graph reads

    def get(self, key, device, build_host):
        """The table, or None for a miss during CUDA graph capture."""
        on_cuda = device.type == "cuda"
        capturing = on_cuda and torch.cuda.is_current_stream_capturing()
        entry = self.recent.get(key)
        if entry is None:
            table = self.captured.get(key)
            if table is not None:
                return table  # filled before its capture and never freed: any stream, any time
            if capturing:
                return None
            host = build_host()
            table = host.to(device, non_blocking=True) if on_cuda else host
            entry = (table, torch.cuda.current_stream(device) if on_cuda else None)
        table, stream = entry
        if capturing:
            self.captured[key] = table
            return table
        if on_cuda and stream != torch.cuda.current_stream(device):
            table.record_stream(torch.cuda.current_stream(device))
        self.recent[key] = entry
        self.recent.move_to_end(key)
        if len(self.recent) > self.size:
            self.recent.popitem(last=False)
        return table


_pointer_tables = _TableCache(_TABLE_CACHE_SIZE)
_chunk_tables = _TableCache(_TABLE_CACHE_SIZE)


def pointer_table(device, columns, numels, unchecked_columns=()):
    """(table, aligned): table (None for a miss during CUDA graph capture) is int64
    [n, len(columns) + 1], row i = (data_ptr of
    columns[c][i] for each c, numel_i); a column given as None holds zeros (a role the kernel
    never touches). aligned: every non-empty tensor starts on a 16-byte boundary, so the kernel
    may promise the compiler that (vector loads), as Triton does itself for plain arguments;
    unchecked_columns (e.g. scalar step counts, never read as vectors) do not count."""
    n = len(numels)
    pointers = [[0] * n if col is None else list(map(torch.Tensor.data_ptr, col))
                for col in columns]
    aligned = all(address % 16 == 0 for c, col in enumerate(pointers)
                  if c not in unchecked_columns for address, numel in zip(col, numels) if numel)
    flat = tuple(v for row in zip(*pointers, numels) for v in row)
    width = len(columns) + 1

    def build_host():
        return torch.tensor(flat, dtype=torch.int64).view(n, width)

    return _pointer_tables.get((device, width, flat), device, build_host), aligned


def chunk_table(device, numels, block):
    """int32 [num_chunks, 2]: program k processes chunk table[k, 1] (of BLOCK elements) of the
    tensor in row table[k, 0]; empty tensors get no program. None for a miss during CUDA graph
    capture."""
    key = (device, block, tuple(numels))

    def build_host():
        rows = [(i, c) for i, n in enumerate(numels) for c in range(-(-n // block))]
        return torch.tensor(rows, dtype=torch.int32).view(len(rows), 2)

    return _chunk_tables.get(key, device, build_host)


def prepare_multi_tensor(found_inf, columns, numels, *, g_b_column, g_lb_column, check_finite,
                         block, num_warps, unchecked_columns=()):
    """The tables of one multi-tensor launch, after the optional non-finite pass over them.

    Returns (table, chunks, aligned, likes): likes[c] is a non-empty tensor of column c, passed
    to the kernel only to type that column's pointers (the first column's where c has none); or
    None, having launched nothing, where a table would have to be built during CUDA graph
    capture (the caller then launches per tensor)."""
    from .finite_check import flag_nonfinite_multi_tensor

    device = found_inf.device
    table, aligned = pointer_table(device, columns, numels, unchecked_columns)
    chunks = chunk_table(device, numels, block)
    if table is None or chunks is None:
        return None  # a new table during CUDA graph capture: launch per tensor
    default = first_nonempty(columns[0], columns[0][0])
    likes = [default if col is None else first_nonempty(col, default) for col in columns]
    if check_finite:
        flag_nonfinite_multi_tensor(table, chunks, found_inf, likes[g_b_column],
                                    likes[g_lb_column], g_b_column=g_b_column,
                                    g_lb_column=g_lb_column, aligned=aligned, block=block,
                                    num_warps=num_warps)
    return table, chunks, aligned, likes
