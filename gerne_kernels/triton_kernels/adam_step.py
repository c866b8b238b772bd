"""triton_adam_step_: GERNE's extrapolated gradient followed by torch.optim.Adam / AdamW.

Per element (update_math.py):  g = scale_lb * g_lb + scale_b * g_b;  then Adam on g, with amsgrad,
maximize, and coupled (Adam) or decoupled (AdamW) weight decay. Reads p, g_b, g_lb, exp_avg,
exp_avg_sq and (amsgrad) max_exp_avg_sq; writes p, exp_avg, exp_avg_sq and (amsgrad)
max_exp_avg_sq, each in its own dtype (float32, bfloat16, float16); the math is float32.

Two launches. Step counts stay on the device, per tensor, and so do the float64 scalars that
torch.optim derives from them in Python: the prologue (one program per tensor) adds 1 to
state_steps[i] unless found_inf is set and writes the tensor's step_size = lr / (1 - beta1^t),
sqrt(1 - beta2^t) and AdamW's 1 - lr * wd, rounded to float32, into a small scratch buffer
(update_math.set_bias_corrections); the update (one program per chunk) reads them there.
Computing them on the host, as the reference does, would need the counts there: one sync per
step. lr comes by value (a float32 pair) or, for the .tensor overload, from device memory, like
scale_b and scale_lb.
"""

import torch
import triton
import triton.language as tl

from . import launch
from .kernel_io import (chunk_pointer, column_pointer, gradient_pointers, host_double,
                        load_extrapolated_grad, load_f32, runtime_decay_factor, runtime_double,
                        runtime_scales, store_f32, update_chunk)
from .update_math import adam_update, set_bias_corrections

P, G_B, G_LB, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, STEP = (tl.constexpr(c) for c in range(7))
# Per tensor in the scratch buffer: step_size, bias_correction2_sqrt, decay_factor (float32).
STEP_SIZE, BIAS_CORRECTION2_SQRT, DECAY_FACTOR, PER_TENSOR = (tl.constexpr(i) for i in range(4))


@triton.jit(do_not_specialize=["tensor_count"])
def adam_step_count_kernel(table_ptr, tensor_count, found_inf_ptr, scratch_ptr, lr, lr_lo, beta1,
                           beta1_lo, beta2, beta2_lo, decay_factor, weight_decay,
                           weight_decay_lo, WIDTH: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr):
    """Tensor ``program_id``: t = state_steps[i] + 1 (stored unless the step is skipped) and its
    per-tensor scalars from t. A skipped step writes nothing (the update reads nothing)."""
    row = tl.program_id(0)
    if tl.load(found_inf_ptr) == 0:
        step_ptr = column_pointer(table_ptr, row, STEP, WIDTH, tl.float32, False)
        step = tl.load(step_ptr) + 1.0
        tl.store(step_ptr, step)
        step_size, bias_correction2_sqrt = set_bias_corrections(
            step, runtime_double(lr, lr_lo, SCALARS_IN_MEMORY), host_double(beta1, beta1_lo),
            host_double(beta2, beta2_lo))
        decay_factor = runtime_decay_factor(decay_factor, lr, lr_lo, weight_decay,
                                            weight_decay_lo, SCALARS_IN_MEMORY)
        scalars = scratch_ptr + row * PER_TENSOR
        tl.store(scalars + STEP_SIZE, step_size)
        tl.store(scalars + BIAS_CORRECTION2_SQRT, bias_correction2_sqrt)
        tl.store(scalars + DECAY_FACTOR, decay_factor)


@triton.jit
def adam_block(p_ptr, g_b_ptr, g_lb_ptr, m_ptr, v_ptr, vmax_ptr, remaining, scale_b, scale_lb,
               one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
               step_size, bias_correction2_sqrt, BLOCK: tl.constexpr, MASKED: tl.constexpr,
               HAS_WEIGHT_DECAY: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
               DECOUPLED_WEIGHT_DECAY: tl.constexpr):
    """One block: BLOCK elements, or with MASKED those before ``remaining``."""
    offsets = tl.arange(0, BLOCK)
    g = load_extrapolated_grad(g_b_ptr, g_lb_ptr, offsets, remaining, scale_b, scale_lb,
                               MASKED)
    p = load_f32(p_ptr, offsets, remaining, MASKED)
    m = load_f32(m_ptr, offsets, remaining, MASKED)
    v = load_f32(v_ptr, offsets, remaining, MASKED)
    vmax = v  # read only with amsgrad
    if AMSGRAD:
        vmax = load_f32(vmax_ptr, offsets, remaining, MASKED)
    p, m, v, vmax = adam_update(p, m, v, vmax, g, one_minus_beta1, beta2, one_minus_beta2, eps,
                                weight_decay, decay_factor, step_size, bias_correction2_sqrt,
                                HAS_WEIGHT_DECAY, AMSGRAD, MAXIMIZE, DECOUPLED_WEIGHT_DECAY)
    store_f32(p_ptr, offsets, p, remaining, MASKED)
    store_f32(m_ptr, offsets, m, remaining, MASKED)
    store_f32(v_ptr, offsets, v, remaining, MASKED)
    if AMSGRAD:
        store_f32(vmax_ptr, offsets, vmax, remaining, MASKED)


@triton.jit(do_not_specialize=["tensor_count"])
def adam_step_kernel(table_ptr, tensor_count, found_inf_ptr, scratch_ptr, scale_b, scale_lb,
                     one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                     P_DTYPE: tl.constexpr, G_B_DTYPE: tl.constexpr, G_LB_DTYPE: tl.constexpr,
                     EXP_AVG_DTYPE: tl.constexpr, EXP_AVG_SQ_DTYPE: tl.constexpr,
                     MAX_EXP_AVG_SQ_DTYPE: tl.constexpr, WIDTH: tl.constexpr,
                     BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
                     HAS_WEIGHT_DECAY: tl.constexpr, AMSGRAD: tl.constexpr,
                     MAXIMIZE: tl.constexpr, DECOUPLED_WEIGHT_DECAY: tl.constexpr,
                     SCALARS_IN_MEMORY: tl.constexpr):
    """One chunk: a full block unmasked (vectorizable), a tensor's last block or a skipped step
    (remaining == 0; the scratch then holds nothing of this step and is not read) masked."""
    row, base, remaining = update_chunk(table_ptr, tensor_count, found_inf_ptr, WIDTH, BLOCK)
    p_ptr = chunk_pointer(table_ptr, row, base, P, WIDTH, P_DTYPE, ALIGNED)
    g_b_ptr, g_lb_ptr = gradient_pointers(table_ptr, row, base, G_B, G_LB, WIDTH, G_B_DTYPE,
                                          G_LB_DTYPE, ALIGNED)
    m_ptr = chunk_pointer(table_ptr, row, base, EXP_AVG, WIDTH, EXP_AVG_DTYPE, ALIGNED)
    v_ptr = chunk_pointer(table_ptr, row, base, EXP_AVG_SQ, WIDTH, EXP_AVG_SQ_DTYPE,
                          ALIGNED)
    vmax_ptr = chunk_pointer(table_ptr, row, base, MAX_EXP_AVG_SQ, WIDTH,
                             MAX_EXP_AVG_SQ_DTYPE, ALIGNED)
    scale_b, scale_lb = runtime_scales(scale_b, scale_lb, SCALARS_IN_MEMORY)
    scalars = scratch_ptr + row * PER_TENSOR
    live = remaining > 0
    step_size = tl.load(scalars + STEP_SIZE, mask=live, other=0.0)
    bias_correction2_sqrt = tl.load(scalars + BIAS_CORRECTION2_SQRT, mask=live, other=1.0)
    decay_factor = tl.load(scalars + DECAY_FACTOR, mask=live, other=1.0)
    if remaining >= BLOCK:
        adam_block(p_ptr, g_b_ptr, g_lb_ptr, m_ptr, v_ptr, vmax_ptr, remaining, scale_b, scale_lb,
                   one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
                   step_size, bias_correction2_sqrt, BLOCK, False, HAS_WEIGHT_DECAY, AMSGRAD,
                   MAXIMIZE, DECOUPLED_WEIGHT_DECAY)
    else:
        adam_block(p_ptr, g_b_ptr, g_lb_ptr, m_ptr, v_ptr, vmax_ptr, remaining, scale_b, scale_lb,
                   one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
                   step_size, bias_correction2_sqrt, BLOCK, True, HAS_WEIGHT_DECAY, AMSGRAD,
                   MAXIMIZE, DECOUPLED_WEIGHT_DECAY)


def _scratch(group):
    return torch.float32, PER_TENSOR.value * len(group.rows)


def adam_step_(params, grads_b, grads_lb, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
               found_inf, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
               decoupled_weight_decay, scale_b, scale_lb):
    """gerne_kernels::triton_adam_step_, both overloads (schema in _ops.py)."""
    launch.run(launch.OpLaunch(
        "triton_adam_step_",
        columns=(launch.Column("P", "params", params),
                 *launch.gradient_columns(grads_b, grads_lb),
                 launch.Column("EXP_AVG", "exp_avgs", exp_avgs),
                 launch.Column("EXP_AVG_SQ", "exp_avg_sqs", exp_avg_sqs),
                 launch.Column("MAX_EXP_AVG_SQ", "max_exp_avg_sqs",
                               max_exp_avg_sqs if amsgrad else None),
                 launch.Column("STEP", "state_steps", state_steps, per_element=False)),
        # The prologue's float64 rounds each operation, as torch.optim's Python does.
        passes=(launch.Pass(adam_step_count_kernel, launch.one_per_tensor, num_warps=1,
                            fp_fusion=False),
                launch.Pass(adam_step_kernel, launch.one_per_chunk)),
        found_inf=found_inf,
        tensor_scalars=dict(scale_b=scale_b, scale_lb=scale_lb, lr=lr),
        # In double on the host, rounded once to float32 at launch, as torch.optim does.
        scalars=dict(beta1=beta1, beta2=beta2, one_minus_beta1=1.0 - float(beta1),
                     one_minus_beta2=1.0 - float(beta2), eps=eps, weight_decay=weight_decay,
                     decay_factor=launch.host_decay_factor(lr, weight_decay)),
        doubles=("lr", "beta1", "beta2", "weight_decay"),
        flags=dict(HAS_WEIGHT_DECAY=weight_decay != 0, AMSGRAD=bool(amsgrad),
                   MAXIMIZE=bool(maximize),
                   DECOUPLED_WEIGHT_DECAY=bool(decoupled_weight_decay)),
        scratch=_scratch))
