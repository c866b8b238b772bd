"""The Triton implementations of the fused GERNE ops: ``triton_NAME`` for every op NAME of the
registry gerne_kernels._ops.OPS (schemas there, specification in gerne_kernels/_reference.py).

Importing this package walks the registry and registers each op's implementation with
torch.library, for both overloads (one Python function serves the float and the tensor lr and
scales), for the CUDA dispatch key, and, when TRITON_INTERPRET=1 was set before the import, for
the CPU key as well: Triton's interpreter then runs the same kernels on CPU tensors with numpy,
which is how CI checks their math without a GPU. Importing needs neither a GPU nor the
interpreter; kernels compile on first launch.

Naming convention: op NAME (e.g. ``sgd_step_``) is implemented by the function NAME of the
module ``triton_kernels/<NAME without its trailing underscore>.py`` (``sgd_step.py``). A new op
is its math in update_math.py plus one such module: its kernel(s) and a function that describes
the call to the shared launch skeleton (launch.OpLaunch).

Modules:
    update_math.py    per-element math, mirroring csrc/gerne_math.h function for function
    kernel_io.py      what kernels use to reach memory: the launch table, element loads and
                      stores, runtime scalars
    launch.py         the host skeleton: checks, grouping, tables, launches (launch mode, why)
    table_cache.py    device copies of launch tables for eager calls (cache, stream events)
    graph_capture.py  CUDA graph capture: kernel variants launched eagerly, capture arenas
    sgd_step.py, adam_step.py, lion_step.py, extrapolate.py, scan.py: one op each

Launch settings (launch.BLOCK_SIZE, launch.NUM_WARPS; ``launch_settings`` changes them for a
block): a fixed configuration, no autotuning: a tuning run would replay the in-place update.
"""

import importlib

import torch

from .. import _ops
from .launch import INTERPRET, launch_settings

DISPATCH_KEYS = ("CUDA", "CPU") if INTERPRET else ("CUDA",)


def module_name(spec):
    """The kernel module of an op: its name without the trailing underscore."""
    return spec.name.rstrip("_")


def implementation(spec):
    """The Python function that implements ``spec``'s Triton op (both overloads)."""
    qualified = f"{__name__}.{module_name(spec)}"
    try:
        module = importlib.import_module(qualified)
    except ModuleNotFoundError as error:
        if error.name != qualified:
            raise
        raise ImportError(f"gerne_kernels.triton_kernels has no module {module_name(spec)}.py "
                          f"for the registry's op {spec.name!r}: every op of _ops.OPS needs a "
                          "Triton twin") from error
    return getattr(module, spec.name)


IMPLEMENTATIONS = {spec.triton_name: implementation(spec) for spec in _ops.OPS}

_lib = torch.library.Library(_ops.NAMESPACE, "IMPL")


def _register():
    for name, function in IMPLEMENTATIONS.items():
        for overload in _ops.OVERLOADS:
            qualified = name if overload == "default" else f"{name}.{overload}"
            for key in DISPATCH_KEYS:
                if not torch._C._dispatch_has_kernel_for_dispatch_key(
                        f"{_ops.NAMESPACE}::{qualified}", key):
                    _lib.impl(qualified, function, key)


_register()

__all__ = ["INTERPRET", "IMPLEMENTATIONS", "launch_settings", "module_name", "implementation"]
