"""triton_sgd_step_: GERNE's extrapolated gradient followed by torch.optim.SGD, one pass.

Per element (update_math.py):  g = scale_lb * g_lb + scale_b * g_b;  then SGD with momentum,
dampening, nesterov, weight decay and maximize on g. Reads p, g_b, g_lb and (momentum, after
the first step) the momentum buffer; writes p and (momentum) the buffer, each in its own dtype
(float32, bfloat16, float16); the math is float32. lr, scale_b and scale_lb come by value or,
for the .tensor overload, from device memory. One launch.
"""

import triton
import triton.language as tl

from . import launch
from .kernel_io import (chunk_pointer, gradient_pointers, load_extrapolated_grad, load_f32,
                        runtime_float, runtime_scales, store_f32, update_chunk)
from .update_math import sgd_update

P, G_B, G_LB, BUF = (tl.constexpr(column) for column in range(4))


@triton.jit
def sgd_block(p_ptr, g_b_ptr, g_lb_ptr, buf_ptr, remaining, scale_b, scale_lb, lr, momentum,
              one_minus_dampening, weight_decay, BLOCK: tl.constexpr, MASKED: tl.constexpr,
              HAS_MOMENTUM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
              NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, IS_FIRST_STEP: tl.constexpr):
    """One block: BLOCK elements, or with MASKED those before ``remaining``."""
    offsets = tl.arange(0, BLOCK)
    g = load_extrapolated_grad(g_b_ptr, g_lb_ptr, offsets, remaining, scale_b, scale_lb,
                               MASKED)
    p = load_f32(p_ptr, offsets, remaining, MASKED)
    buf = p  # not read: the first step sets buf = g, and without momentum there is no buffer
    if HAS_MOMENTUM:
        if not IS_FIRST_STEP:
            buf = load_f32(buf_ptr, offsets, remaining, MASKED)
    p, buf = sgd_update(p, buf, g, lr, momentum, one_minus_dampening, weight_decay,
                        HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, IS_FIRST_STEP)
    store_f32(p_ptr, offsets, p, remaining, MASKED)
    if HAS_MOMENTUM:
        store_f32(buf_ptr, offsets, buf, remaining, MASKED)


@triton.jit(do_not_specialize=["tensor_count"])
def sgd_step_kernel(table_ptr, tensor_count, found_inf_ptr, scale_b, scale_lb, lr, momentum,
                    one_minus_dampening, weight_decay, P_DTYPE: tl.constexpr,
                    G_B_DTYPE: tl.constexpr, G_LB_DTYPE: tl.constexpr,
                    BUF_DTYPE: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
                    ALIGNED: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                    HAS_WEIGHT_DECAY: tl.constexpr, NESTEROV: tl.constexpr,
                    MAXIMIZE: tl.constexpr, IS_FIRST_STEP: tl.constexpr,
                    SCALARS_IN_MEMORY: tl.constexpr):
    """One chunk: a full block unmasked (vectorizable), a tensor's last block or a skipped step
    (remaining == 0) masked."""
    row, base, remaining = update_chunk(table_ptr, tensor_count, found_inf_ptr, WIDTH, BLOCK)
    p_ptr = chunk_pointer(table_ptr, row, base, P, WIDTH, P_DTYPE, ALIGNED)
    g_b_ptr, g_lb_ptr = gradient_pointers(table_ptr, row, base, G_B, G_LB, WIDTH, G_B_DTYPE,
                                          G_LB_DTYPE, ALIGNED)
    buf_ptr = chunk_pointer(table_ptr, row, base, BUF, WIDTH, BUF_DTYPE, ALIGNED)
    scale_b, scale_lb = runtime_scales(scale_b, scale_lb, SCALARS_IN_MEMORY)
    lr = runtime_float(lr, SCALARS_IN_MEMORY)
    if remaining >= BLOCK:
        sgd_block(p_ptr, g_b_ptr, g_lb_ptr, buf_ptr, remaining, scale_b, scale_lb, lr, momentum,
                  one_minus_dampening, weight_decay, BLOCK, False, HAS_MOMENTUM,
                  HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, IS_FIRST_STEP)
    else:
        sgd_block(p_ptr, g_b_ptr, g_lb_ptr, buf_ptr, remaining, scale_b, scale_lb, lr, momentum,
                  one_minus_dampening, weight_decay, BLOCK, True, HAS_MOMENTUM,
                  HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, IS_FIRST_STEP)


def sgd_step_(params, grads_b, grads_lb, momentum_buffers, found_inf, *, lr, momentum,
              dampening, nesterov, weight_decay, maximize, is_first_step, scale_b, scale_lb):
    """gerne_kernels::triton_sgd_step_, both overloads (schema in _ops.py)."""
    has_momentum = momentum != 0
    launch.run(launch.OpLaunch(
        "triton_sgd_step_",
        columns=(launch.Column("P", "params", params),
                 *launch.gradient_columns(grads_b, grads_lb),
                 launch.Column("BUF", "momentum_buffers",
                               momentum_buffers if has_momentum else None)),
        passes=(launch.Pass(sgd_step_kernel, launch.one_per_chunk),),
        found_inf=found_inf,
        tensor_scalars=dict(scale_b=scale_b, scale_lb=scale_lb, lr=lr),
        # In double on the host, rounded once to float32 at launch, as torch.optim does.
        scalars=dict(momentum=momentum, one_minus_dampening=1.0 - float(dampening),
                     weight_decay=weight_decay),
        flags=dict(HAS_MOMENTUM=has_momentum, HAS_WEIGHT_DECAY=weight_decay != 0,
                   NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
                   IS_FIRST_STEP=bool(is_first_step))))
