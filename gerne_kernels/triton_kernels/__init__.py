"""The Triton implementations of the fused GERNE ops (triton_sgd_step_, triton_adam_step_,
triton_extrapolate_; schemas in gerne_kernels/_ops.py, specification in _reference.py).

Importing this package registers them with torch.library for the CUDA dispatch key, and, when
TRITON_INTERPRET=1 was set before the import, for the CPU key as well: Triton's interpreter then
runs the same kernels on CPU tensors with numpy, which is how CI checks their math without a GPU.
Importing needs neither a GPU nor the interpreter; kernels compile on first launch.

Launch settings, read at every call (the GPU benchmark flips them to compare):
    LAUNCH_MODE  "multi_tensor" (one launch for all tensors via a pointer table, the default)
                 or "per_tensor" (one launch per tensor); see _launch.py for why.
    BLOCK_SIZE   elements per program (a power of two); NUM_WARPS: warps per program.
A fixed configuration, no autotuning: a tuning run would replay the in-place update.

Files: math.py (per-element math, mirroring csrc/gerne_math.h), scalars.py (lr and the scales,
by value or in device memory), tables.py (reading the pointer
table in a kernel), finite_check.py, sgd.py, adam.py, extrapolate.py (one kernel each, in both
launch variants, with its host-side launcher), _launch.py (host-side checks and tables).
"""

import contextlib
import os

import torch

from .. import _ops
from .adam import adam_step_
from .extrapolate import extrapolate_
from .sgd import sgd_step_

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

LAUNCH_MODE = "multi_tensor"
# Not measured on a GPU yet: 2048 float32 elements over 4 warps is 16 per thread, four 16-byte
# vectors per tensor role. The interpreter runs one program at a time in numpy, so a smaller
# block there keeps multi-chunk tensors in tests small.
BLOCK_SIZE = 1024 if INTERPRET else 2048
NUM_WARPS = 4

# One Python function serves both overloads of each op (float or tensor lr and scales).
IMPLEMENTATIONS = {
    f"triton_{name}{overload}": function
    for name, function in (("sgd_step_", sgd_step_), ("adam_step_", adam_step_),
                           ("extrapolate_", extrapolate_))
    for overload in ("", ".tensor")
}
DISPATCH_KEYS = ("CUDA", "CPU") if INTERPRET else ("CUDA",)


@contextlib.contextmanager
def launch_settings(mode=None, block_size=None, num_warps=None):
    """Temporarily sets LAUNCH_MODE / BLOCK_SIZE / NUM_WARPS (None keeps the current value)."""
    global LAUNCH_MODE, BLOCK_SIZE, NUM_WARPS
    saved = LAUNCH_MODE, BLOCK_SIZE, NUM_WARPS
    LAUNCH_MODE = saved[0] if mode is None else mode
    BLOCK_SIZE = saved[1] if block_size is None else block_size
    NUM_WARPS = saved[2] if num_warps is None else num_warps
    try:
        yield
    finally:
        LAUNCH_MODE, BLOCK_SIZE, NUM_WARPS = saved


_lib = torch.library.Library(_ops.NAMESPACE, "IMPL")


def _register():
    for name, function in IMPLEMENTATIONS.items():
        qualname = f"{_ops.NAMESPACE}::{name}"
        for key in DISPATCH_KEYS:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
                _lib.impl(name, function, key)


_register()

__all__ = ["LAUNCH_MODE", "BLOCK_SIZE", "NUM_WARPS", "INTERPRET", "launch_settings",
           "sgd_step_", "adam_step_", "extrapolate_"]
