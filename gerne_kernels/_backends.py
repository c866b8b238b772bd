"""Which implementation of the fused ops runs for a given backend, device and dtype.

Backends: ``reference`` (pure PyTorch, any device and floating dtype), ``cpu`` (the C++ kernel,
compiled on first use), ``cuda`` (the C++/CUDA multi-tensor kernel) and ``triton``. ``auto`` picks
per device: on CPU the C++ kernel, on CUDA the CUDA kernel then Triton, falling back to the
reference path with one warning when a build fails.
"""

import dataclasses
import importlib
import os
import sys
import warnings

import torch

from . import _build, _ops, _reference

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
FUSED_DTYPES = _ops.FUSED_DTYPES
AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One backend's ops, by their registry names (``_ops.OPS``), all with the signatures of
    ``_ops.py``: ``impl.op("sgd_step_")``."""
    name: str
    ops: dict

    def op(self, name):
        return self.ops[name]


REFERENCE = Implementation("reference", {spec.name: getattr(_reference, spec.name)
                                         for spec in _ops.OPS})



def _no_op(*args, **kwargs):
    """Meta tensors carry no values: a step on them creates state and computes nothing, as
    torch.optim's does."""


META = Implementation("meta", {spec.name: _no_op for spec in _ops.OPS})

_status_cache = {}
_warned = set()


def _triton_status():
    try:
        importlib.import_module("triton")
    except Exception as exc:
        return False, f"triton is not importable ({exc})"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
    try:
        importlib.import_module("gerne_kernels.triton_kernels")
    except Exception as exc:
        return False, f"the Triton kernels failed to import: {type(exc).__name__}: {exc}"
    return True, ""


def _is_cached(kind):
    """True when a finished build of the current sources lies in the cache (loading it takes
    well under a second; building takes about a minute)."""
    try:
        return os.path.isfile(os.path.join(_build.build_dir_for(kind), "ok"))
    except Exception:  # sources missing, unreadable cache: not cached
        return False


def status(name, *, build=True):
    """(available, reason, BuildResult or None) for one backend. With ``build`` a C++ backend
    is compiled on first call; without it, only a cached build is loaded and an unbuilt one is
    reported as such (nothing compiles)."""
    if name == "reference":
        return True, "", None
    if name in _status_cache:
        return _status_cache[name]
    if name == "triton":
        ok, reason = _triton_status()
        result = (ok, reason, None)
    elif name in ("cpu", "cuda"):
        if name == "cuda" and not torch.cuda.is_available():
            result = (False, "no CUDA device is visible", None)
        elif not build and not _is_cached(name):
            return (False, "not built yet: it compiles on first use (about a minute); "
                    "`python -m gerne_kernels build` compiles it now", None)
        else:
            built = _build.build(name)
            reason = "" if built.ok else built.error
            result = (built.ok, reason, built)
    else:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _status_cache[name] = result
    return result


def auto_choice(device_type, *, build=True):
    """The backend ``auto`` runs float32 tensors of this device type with (without ``build``:
    among what is available without compiling)."""
    for name in AUTO_ORDER.get(device_type, ()):
        if status(name, build=build)[0]:
            return name
    return "reference"


def available_backends():
    """The backends that work in this process (building the C++ kernels if needed)."""
    return [name for name in BACKENDS[1:] if status(name)[0]]


_FUSED = {}  # (backend, tensor_scalars) -> Implementation: built once, a dict read after that


def _fused(name, tensor_scalars):
    key = (name, tensor_scalars)
    impl = _FUSED.get(key)
    if impl is None:
        overload = "tensor" if tensor_scalars else "default"
        impl = _FUSED[key] = Implementation(name, {
            spec.name: _ops.op(spec.triton_name if name == "triton" else spec.name, overload)
            for spec in _ops.OPS})
    return impl


def _unavailable_message(name, reason, built):
    message = f"gerne_kernels: the {name!r} backend is unavailable: {reason}."
    if built is not None and built.log_path:
        message += f" Build log: {built.log_path}."
    return message + " Run `python -m gerne_kernels info` for details."


def _device_matches(name, device_type):
    if name == "cpu":
        return device_type == "cpu"
    if name == "cuda":
        return device_type == "cuda"
    if name == "triton":
        return device_type == "cuda" or (device_type == "cpu"
                                         and os.environ.get("TRITON_INTERPRET") == "1")
    return True


def implementation(backend, device_type, dtype, tensor_scalars=False):
    """The Implementation that runs ``backend`` for tensors of this device type and dtype;
    with tensor_scalars, its ops take lr, scale_b and scale_lb as tensors (the ``.tensor``
    overloads; the reference takes either).

    An explicitly named backend that cannot run raises with the reason; ``auto`` falls back to
    the reference path and warns once per reason.
    """
    if device_type == "meta":
        return META
    if backend == "reference":
        return REFERENCE
    if backend != "auto":
        if not _device_matches(backend, device_type):
            raise ValueError(f"backend={backend!r} cannot run on {device_type} tensors; use "
                             f"backend='auto' or a backend for {device_type}")
        if dtype not in FUSED_DTYPES:
            raise TypeError(f"backend={backend!r} supports float32, bfloat16 and float16 "
                            f"parameters, not {dtype}; use backend='reference' (any dtype) or "
                            "backend='auto'")
        ok, reason, built = status(backend)
        if not ok:
            raise RuntimeError(_unavailable_message(backend, reason, built))
        return _fused(backend, tensor_scalars)
    if dtype not in FUSED_DTYPES:
        return REFERENCE
    for name in AUTO_ORDER.get(device_type, ()):
        ok, reason, built = status(name)
        if ok:
            return _fused(name, tensor_scalars)
        if reason and (name, reason) not in _warned:
            _warned.add((name, reason))
            warnings.warn(_unavailable_message(name, reason, built) +
                          " Falling back to the next backend (finally the reference path).",
                          RuntimeWarning, stacklevel=_caller_outside_packages())
    return REFERENCE


_PACKAGE_DIRS = (os.path.dirname(os.path.abspath(__file__)),
                 os.path.dirname(os.path.abspath(torch.__file__)))


def _caller_outside_packages():
    """The stacklevel of the first caller outside gerne_kernels and torch (the user's
    step() call), so that a warning points there."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            _PACKAGE_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def reset():
    """Forget build results and warnings (tests use this with a throwaway cache)."""
    _status_cache.clear()
    _FUSED.clear()
    _warned.clear()
