"""The runtime scalars of a launch: lr, scale_b and scale_lb (and what derives from lr).

Passed by value (the ops' default overload: Python floats, which a Triton kernel takes as
float32, or float32 (hi, lo) pairs where float64 is needed), or, with ``IN_MEMORY`` (the
``.tensor`` overloads), as pointers to float64 scalars on the call's device that every program
reads: no host sync, and a captured CUDA graph sees the values of the moment it is replayed.
Either way the kernel computes with the same float32 (or float64) values.
"""

import torch
import triton
import triton.language as tl

from .. import _scalars


@triton.jit
def runtime_float(value_or_pointer, IN_MEMORY: tl.constexpr):
    """A float32 scalar: the argument, or the float64 it points to rounded once to float32."""
    value = value_or_pointer
    if IN_MEMORY:
        value = tl.load(value_or_pointer).to(tl.float32)
    return value


@triton.jit
def runtime_double(hi_or_pointer, lo, IN_MEMORY: tl.constexpr):
    """A float64 scalar: hi + lo (a float32 pair, see _launch.split_double), or the float64
    that hi_or_pointer points to (lo is then unused)."""
    if IN_MEMORY:
        value = tl.load(hi_or_pointer)
    else:
        value = tl.cast(hi_or_pointer, tl.float64) + tl.cast(lo, tl.float64)
    return value


def launch_scalars(op_name, found_inf, **scalars):
    """(values, in_memory): the op's runtime scalars as kernel arguments. Floats (the default
    overload) stay Python floats; tensors (.tensor) become float64 0-d tensors on the call's
    device (_scalars.on_device: no copy where they already are, a fill for CPU tensors),
    checked: one element, float32 or float64."""
    if not any(isinstance(t, torch.Tensor) for t in scalars.values()):
        return {name: float(v) for name, v in scalars.items()}, False
    out = {}
    for name, t in scalars.items():
        if (not isinstance(t, torch.Tensor) or t.numel() != 1
                or t.dtype not in (torch.float32, torch.float64)):
            raise TypeError(f"{op_name}: {name} must be a one-element float32 or float64 tensor "
                            f"(the .tensor overload), got {t!r}")
        out[name] = _scalars.on_device(t, found_inf.device)
    return out, True
