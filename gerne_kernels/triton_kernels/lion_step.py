"""triton_lion_step_: GERNE's extrapolated gradient followed by Lion (Chen et al. 2023).

Per element (update_math.py):  g = scale_lb * g_lb + scale_b * g_b;  then
    c = beta1 * m + (1 - beta1) * g;   p = p * (1 - lr * wd) - lr * sign(c);
    m = beta2 * m + (1 - beta2) * g
(maximize negates g first). Reads p, g_b, g_lb and exp_avg (m); writes p and exp_avg, each in
its own dtype (float32, bfloat16, float16); the math is float32, 1 - lr * wd float64 rounded
once (on the host for a float lr, in the kernel for lr in device memory). One launch.
"""

import triton
import triton.language as tl

from . import launch
from .kernel_io import (chunk_pointer, gradient_pointers, load_extrapolated_grad, load_f32,
                        runtime_decay_factor, runtime_float, runtime_scales, store_f32,
                        update_chunk)
from .update_math import lion_update

P, G_B, G_LB, EXP_AVG = (tl.constexpr(column) for column in range(4))


@triton.jit
def lion_block(p_ptr, g_b_ptr, g_lb_ptr, m_ptr, remaining, scale_b, scale_lb, lr, beta1,
               one_minus_beta1, beta2, one_minus_beta2, decay_factor, BLOCK: tl.constexpr,
               MASKED: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr):
    """One block: BLOCK elements, or with MASKED those before ``remaining``."""
    offsets = tl.arange(0, BLOCK)
    g = load_extrapolated_grad(g_b_ptr, g_lb_ptr, offsets, remaining, scale_b, scale_lb,
                               MASKED)
    p = load_f32(p_ptr, offsets, remaining, MASKED)
    m = load_f32(m_ptr, offsets, remaining, MASKED)
    p, m = lion_update(p, m, g, lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                       decay_factor, HAS_WEIGHT_DECAY, MAXIMIZE)
    store_f32(p_ptr, offsets, p, remaining, MASKED)
    store_f32(m_ptr, offsets, m, remaining, MASKED)


@triton.jit(do_not_specialize=["tensor_count"])
def lion_step_kernel(table_ptr, tensor_count, found_inf_ptr, scale_b, scale_lb, lr, lr_lo,
                     beta1, one_minus_beta1, beta2, one_minus_beta2, decay_factor, weight_decay,
                     weight_decay_lo, P_DTYPE: tl.constexpr,
                     G_B_DTYPE: tl.constexpr, G_LB_DTYPE: tl.constexpr,
                     EXP_AVG_DTYPE: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
                     ALIGNED: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                     MAXIMIZE: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr):
    """One chunk: a full block unmasked (vectorizable), a tensor's last block or a skipped step
    (remaining == 0) masked."""
    row, base, remaining = update_chunk(table_ptr, tensor_count, found_inf_ptr, WIDTH, BLOCK)
    p_ptr = chunk_pointer(table_ptr, row, base, P, WIDTH, P_DTYPE, ALIGNED)
    g_b_ptr, g_lb_ptr = gradient_pointers(table_ptr, row, base, G_B, G_LB, WIDTH, G_B_DTYPE,
                                          G_LB_DTYPE, ALIGNED)
    m_ptr = chunk_pointer(table_ptr, row, base, EXP_AVG, WIDTH, EXP_AVG_DTYPE, ALIGNED)
    scale_b, scale_lb = runtime_scales(scale_b, scale_lb, SCALARS_IN_MEMORY)
    decay_factor = runtime_decay_factor(decay_factor, lr, lr_lo, weight_decay, weight_decay_lo,
                                        SCALARS_IN_MEMORY)
    lr = runtime_float(lr, SCALARS_IN_MEMORY)
    if remaining >= BLOCK:
        lion_block(p_ptr, g_b_ptr, g_lb_ptr, m_ptr, remaining, scale_b, scale_lb, lr, beta1,
                   one_minus_beta1, beta2, one_minus_beta2, decay_factor, BLOCK, False,
                   HAS_WEIGHT_DECAY, MAXIMIZE)
    else:
        lion_block(p_ptr, g_b_ptr, g_lb_ptr, m_ptr, remaining, scale_b, scale_lb, lr, beta1,
                   one_minus_beta1, beta2, one_minus_beta2, decay_factor, BLOCK, True,
                   HAS_WEIGHT_DECAY, MAXIMIZE)


def lion_step_(params, grads_b, grads_lb, exp_avgs, found_inf, *, lr, beta1, beta2,
               weight_decay, maximize, scale_b, scale_lb):
    """gerne_kernels::triton_lion_step_, both overloads (schema in _ops.py)."""
    launch.run(launch.OpLaunch(
        "triton_lion_step_",
        columns=(launch.Column("P", "params", params),
                 *launch.gradient_columns(grads_b, grads_lb),
                 launch.Column("EXP_AVG", "exp_avgs", exp_avgs)),
        # No fused multiply-adds: c = beta1 * m + (1 - beta1) * g rounds each product as the
        # reference does, so that sign(c) near 0 does not flip (p would move by 2 lr).
        passes=(launch.Pass(lion_step_kernel, launch.one_per_chunk, fp_fusion=False),),
        found_inf=found_inf,
        tensor_scalars=dict(scale_b=scale_b, scale_lb=scale_lb, lr=lr),
        # In double on the host, rounded once to float32 at launch, as torch does.
        scalars=dict(beta1=beta1, one_minus_beta1=1.0 - float(beta1), beta2=beta2,
                     one_minus_beta2=1.0 - float(beta2), weight_decay=weight_decay,
                     decay_factor=launch.host_decay_factor(lr, weight_decay)),
        doubles=("lr", "weight_decay"),
        flags=dict(HAS_WEIGHT_DECAY=weight_decay != 0, MAXIMIZE=bool(maximize))))
