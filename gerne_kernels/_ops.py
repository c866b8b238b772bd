"""The fused GERNE operators: one registry, from which everything else is derived.

Each ``OpSpec`` below is one op. From the registry come the torch.library schemas (``.default``
and ``.tensor`` overloads, for the C++ op ``NAME`` and the Triton op ``triton_NAME``), the fake
implementations for torch.compile, each backend's table of implementations (``_backends.py``),
the Triton registration (``triton_kernels``) and the tests' parametrization (``tests/ops``). A
new op is one entry here plus its math: ``_reference.py`` (the specification),
``csrc/gerne_math.h`` with its op file in ``csrc/ops/``, and a Triton kernel module.

Gradients enter the update ops through two scalar factors, so that one pass forms the
extrapolated gradient and applies the update::

    g = scale_lb * g_lb + scale_b * g_b,   scale_lb = (1 + beta) * inv_scale_lb,
                                           scale_b  = -beta * inv_scale_b

``found_inf`` is a float32 tensor with one element on the parameters' device. The update ops
change nothing when it is non-zero on entry (read on the device: no host sync). ``scan_`` is the
optional pass before them: it sets ``found_inf`` to 1 when any element of g_b or g_lb is inf or
NaN, and, when ``sums`` is given (float64, 4 elements), adds ``[sum g^2, sum g_b^2, sum g_lb^2,
sum g_b * g_lb]`` over all elements into it: the norms that clipping and the gradient statistics
need, from the same single read of both gradients. An empty ``grads_lb`` scans g_b alone.

Two overloads per op. ``.default`` takes ``lr``, ``scale_b`` and ``scale_lb`` as floats;
``.tensor`` takes them as one-element float32 or float64 tensors: on the parameters' device
they are read by the kernel, never by the host, so a step with a scheduled lr or beta (or a
GradScaler's device-resident scale, or a clipping factor computed on the device) needs no host
sync, a captured CUDA graph picks up new values on every replay, and torch.compile does not
recompile when they change. Both overloads compute the same float32 values (the scalars are
combined in float64, then rounded once), so results agree bit for bit.
"""

import dataclasses
import re

import torch

NAMESPACE = "gerne_kernels"
# The dtypes of the fused kernels (all computed in float32); other dtypes take the reference.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OVERLOADS = ("default", "tensor")
TENSOR_SCALARS = ("lr", "scale_b", "scale_lb")
EXTRAPOLATION_ARGS = "float scale_b, float scale_lb"


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One fused op.

    name: the C++ op's name (the Triton op is ``triton_`` + name).
    arguments: the schema's argument list, without parentheses.
    streams: the per-parameter tensor lists, in schema order, each read or written once per
        element by one pass (documentation, and the tests' view of what may change).
    bytes_per_param: float32 bytes the op moves per parameter in its usual configuration
        (the benchmarks' bandwidth floor).
    """
    name: str
    arguments: str
    streams: tuple
    bytes_per_param: int

    @property
    def triton_name(self):
        return "triton_" + self.name

    def schema(self, overload="default"):
        """The argument list and return of one overload (``.tensor``: tensor lr and scales)."""
        arguments = self.arguments
        if overload == "tensor":
            arguments = re.sub(rf"\bfloat ({'|'.join(TENSOR_SCALARS)})\b", r"Tensor \1",
                               arguments)
        return f"({arguments}) -> ()"


OPS = (
    OpSpec(
        "sgd_step_",
        "Tensor(a!)[] params, Tensor[] grads_b, Tensor[] grads_lb, "
        "Tensor(b!)[] momentum_buffers, Tensor found_inf, *, float lr, float momentum, "
        f"float dampening, bool nesterov, float weight_decay, bool maximize, "
        f"bool is_first_step, {EXTRAPOLATION_ARGS}",
        streams=("params", "grads_b", "grads_lb", "momentum_buffers"),
        bytes_per_param=24),
    OpSpec(
        "adam_step_",
        "Tensor(a!)[] params, Tensor[] grads_b, Tensor[] grads_lb, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, "
        "Tensor found_inf, *, float lr, float beta1, float beta2, float eps, "
        "float weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
        f"{EXTRAPOLATION_ARGS}",
        streams=("params", "grads_b", "grads_lb", "exp_avgs", "exp_avg_sqs",
                 "max_exp_avg_sqs"),
        bytes_per_param=32),
    OpSpec(
        "lion_step_",
        "Tensor(a!)[] params, Tensor[] grads_b, Tensor[] grads_lb, Tensor(b!)[] exp_avgs, "
        "Tensor found_inf, *, float lr, float beta1, float beta2, float weight_decay, "
        f"bool maximize, {EXTRAPOLATION_ARGS}",
        streams=("params", "grads_b", "grads_lb", "exp_avgs"),
        bytes_per_param=24),
    OpSpec(
        "extrapolate_",
        "Tensor(a!)[] out, Tensor[] grads_b, Tensor[] grads_lb, Tensor found_inf, *, "
        f"{EXTRAPOLATION_ARGS}",
        streams=("out", "grads_b", "grads_lb"),
        bytes_per_param=12),
    OpSpec(
        "scan_",
        "Tensor[] grads_b, Tensor[] grads_lb, Tensor(a!) found_inf, Tensor(b!)? sums, *, "
        f"{EXTRAPOLATION_ARGS}",
        streams=("grads_b", "grads_lb"),
        bytes_per_param=8),
)
BY_NAME = {spec.name: spec for spec in OPS}

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")


def _is_defined(qualname, overload):
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "" if overload == "default" else overload)
        return True
    except RuntimeError:
        return False


def _define_all():
    for spec in OPS:
        for name in (spec.name, spec.triton_name):
            for overload in OVERLOADS:
                if _is_defined(f"{NAMESPACE}::{name}", overload):
                    continue  # module reloaded
                full = name if overload == "default" else f"{name}.{overload}"
                _lib.define(full + spec.schema(overload))
                # The ops only mutate their inputs and return nothing: the fake implementation
                # is the identity, which lets torch.compile trace a step without a graph break.
                torch.library.register_fake(f"{NAMESPACE}::{full}",
                                            lambda *args, **kwargs: None, lib=_lib)


_define_all()


def op(name, overload="default"):
    """The OpOverload ``torch.ops.gerne_kernels.<name>.<overload>``."""
    return getattr(getattr(getattr(torch.ops, NAMESPACE), name), overload)
