"""The fused GERNE operators, declared once with torch.library.

Every implementation (the C++ CPU and CUDA kernels, the Triton kernels and the pure-PyTorch
reference in ``_reference.py``) takes exactly these arguments. Gradients enter through two
scalar factors, so that one pass forms the extrapolated gradient and applies the update::

    g = scale_lb * g_lb + scale_b * g_b,   scale_lb = (1 + beta) * inv_scale_lb,
                                           scale_b  = -beta * inv_scale_b

``found_inf`` is a float32 scalar tensor on the parameters' device. A non-zero value on entry
makes the op change nothing; with ``check_finite`` the op first scans both gradients and sets
``found_inf`` to 1 (and changes nothing) if any element is inf or NaN.

``sgd_step_`` and ``adam_step_`` are implemented in C++ (csrc/cpu, csrc/cuda);
``triton_sgd_step_`` and ``triton_adam_step_`` have the same schemas and run the Triton kernels.
``extrapolate_`` writes g into ``out`` (used by the wrapper around other optimizers).

Each op has two overloads. ``.default`` takes lr, scale_b and scale_lb as floats. ``.tensor``
takes them as one-element float32 or float64 tensors: on the parameters' device they are read
by the kernel, never by the host, so a step with a scheduled lr or beta (or a GradScaler's
device-resident scale) needs no host sync, a captured CUDA graph picks up new values on every
replay, and torch.compile does not recompile when they change. Both overloads compute the same
float32 values (the scalars are combined in float64, then rounded once), so results agree
bit for bit.
"""

import torch

NAMESPACE = "gerne_kernels"

SGD_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads_b, Tensor[] grads_lb, Tensor(b!)[] momentum_buffers, "
    "Tensor(c!) found_inf, *, float lr, float momentum, float dampening, bool nesterov, "
    "float weight_decay, bool maximize, bool is_first_step, float scale_b, float scale_lb, "
    "bool check_finite) -> ()"
)

ADAM_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads_b, Tensor[] grads_lb, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, "
    "Tensor(f!) found_inf, *, float lr, float beta1, float beta2, float eps, float weight_decay, "
    "bool amsgrad, bool maximize, bool decoupled_weight_decay, float scale_b, float scale_lb, "
    "bool check_finite) -> ()"
)

EXTRAPOLATE_SCHEMA = (
    "(Tensor(a!)[] out, Tensor[] grads_b, Tensor[] grads_lb, Tensor(b!) found_inf, *, "
    "float scale_b, float scale_lb, bool check_finite) -> ()"
)

TENSOR_SCALARS = ("lr", "scale_b", "scale_lb")


def tensor_scalar_schema(schema):
    """The ``.tensor`` overload's schema: lr, scale_b and scale_lb become tensors."""
    for name in TENSOR_SCALARS:
        schema = schema.replace(f"float {name},", f"Tensor {name},")
    return schema


OP_SCHEMAS = {
    "sgd_step_": SGD_SCHEMA,
    "adam_step_": ADAM_SCHEMA,
    "extrapolate_": EXTRAPOLATE_SCHEMA,
    "triton_sgd_step_": SGD_SCHEMA,
    "triton_adam_step_": ADAM_SCHEMA,
    "triton_extrapolate_": EXTRAPOLATE_SCHEMA,
}

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")


OVERLOADS = ("default", "tensor")


def _is_defined(name, overload):
    try:
        torch._C._dispatch_find_schema_or_throw(f"{NAMESPACE}::{name}",
                                                "" if overload == "default" else overload)
        return True
    except RuntimeError:
        return False


def _define_all():
    for name, schema in OP_SCHEMAS.items():
        for overload in OVERLOADS:
            if _is_defined(name, overload):
                continue  # module reloaded
            if overload == "default":
                qualname, signature = f"{NAMESPACE}::{name}", name + schema
            else:
                qualname = f"{NAMESPACE}::{name}.{overload}"
                signature = f"{name}.{overload}" + tensor_scalar_schema(schema)
            _lib.define(signature)
            # The ops only mutate their inputs and return nothing: the fake implementation is
            # the identity, which lets torch.compile trace a step without a graph break.
            torch.library.register_fake(qualname, lambda *args, **kwargs: None, lib=_lib)


_define_all()


def op(name, overload="default"):
    """The OpOverload ``torch.ops.gerne_kernels.<name>.<overload>``."""
    return getattr(getattr(getattr(torch.ops, NAMESPACE), name), overload)
