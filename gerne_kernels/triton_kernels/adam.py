"""triton_adam_step_: GERNE's extrapolated gradient followed by torch.optim.Adam / AdamW.

Per element (math.py):  g = scale_lb * g_lb + scale_b * g_b;  then Adam on g, with amsgrad,
maximize, and coupled (Adam) or decoupled (AdamW) weight decay. Parameters and moments are read
and written in their own dtype (float32, bfloat16, float16); the math is float32.

Step counts stay on the device, per tensor: after the optional non-finite check, every
state_steps[i] is incremented by (found_inf == 0) with one torch._foreach_add_ (no host sync,
capturable in a CUDA graph), and each program then derives its tensor's bias corrections from
the incremented count in float64 (math.set_bias_corrections). Computing them on the host, as the
reference does, would need the counts there: one sync per step. lr (and AdamW's 1 - lr * wd),
scale_b and scale_lb come by value or, for the .tensor overload, from device memory (scalars.py).
"""

import torch
import triton
import triton.language as tl

from . import _launch
from .finite_check import flag_nonfinite_per_tensor
from .math import set_bias_corrections, adam_update, extrapolated_grad
from .scalars import launch_scalars, runtime_double, runtime_float
from .storage import load_f32, store_f32
from .tables import remaining_elements, table_pointer, update_chunk

OP_NAME = "triton_adam_step_"
# Pointer-table columns of the multi-tensor launch; numel follows in the last column.
P, G_B, G_LB, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, STEP = (tl.constexpr(c) for c in range(7))
WIDTH = tl.constexpr(8)


@triton.jit
def adam_chunk(p_ptr, g_b_ptr, g_lb_ptr, m_ptr, v_ptr, vmax_ptr, step_ptr, remaining, scale_b,
               scale_lb, lr_hi, lr_lo, beta1_hi, beta1_lo, beta2_hi, beta2_lo, one_minus_beta1,
               beta2, one_minus_beta2, eps, weight_decay, decay_factor, BLOCK: tl.constexpr,
               HAS_WEIGHT_DECAY: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
               DECOUPLED_WEIGHT_DECAY: tl.constexpr, SCALARS_IN_MEMORY: tl.constexpr):
    """Updates the first min(remaining, BLOCK) elements after the given pointers: a full block
    unmasked (vectorizable), a tensor's last block or a skipped step (remaining == 0) masked."""
    scale_b = runtime_float(scale_b, SCALARS_IN_MEMORY)
    scale_lb = runtime_float(scale_lb, SCALARS_IN_MEMORY)
    decay_factor = runtime_float(decay_factor, SCALARS_IN_MEMORY)
    lr = runtime_double(lr_hi, lr_lo, SCALARS_IN_MEMORY)
    step_size, bias_correction2_sqrt = set_bias_corrections(
        tl.load(step_ptr), lr, beta1_hi, beta1_lo, beta2_hi, beta2_lo)
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


@triton.jit
def adam_block(p_ptr, g_b_ptr, g_lb_ptr, m_ptr, v_ptr, vmax_ptr, remaining, scale_b, scale_lb,
               one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
               step_size, bias_correction2_sqrt, BLOCK: tl.constexpr, MASKED: tl.constexpr,
               HAS_WEIGHT_DECAY: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
               DECOUPLED_WEIGHT_DECAY: tl.constexpr):
    """One block: BLOCK elements, or with MASKED those before ``remaining``."""
    offsets = tl.arange(0, BLOCK)
    g_b = load_f32(g_b_ptr, offsets, remaining, MASKED)
    g_lb = load_f32(g_lb_ptr, offsets, remaining, MASKED)
    p = load_f32(p_ptr, offsets, remaining, MASKED)
    m = load_f32(m_ptr, offsets, remaining, MASKED)
    v = load_f32(v_ptr, offsets, remaining, MASKED)
    vmax = v  # read only with amsgrad
    if AMSGRAD:
        vmax = load_f32(vmax_ptr, offsets, remaining, MASKED)
    g = extrapolated_grad(g_b, g_lb, scale_b, scale_lb)
    p, m, v, vmax = adam_update(p, m, v, vmax, g, one_minus_beta1, beta2, one_minus_beta2, eps,
                                weight_decay, decay_factor, step_size, bias_correction2_sqrt,
                                HAS_WEIGHT_DECAY, AMSGRAD, MAXIMIZE, DECOUPLED_WEIGHT_DECAY)
    store_f32(p_ptr, offsets, p, remaining, MASKED)
    store_f32(m_ptr, offsets, m, remaining, MASKED)
    store_f32(v_ptr, offsets, v, remaining, MASKED)
    if AMSGRAD:
        store_f32(vmax_ptr, offsets, vmax, remaining, MASKED)


@triton.jit
def _adam_multi_tensor_kernel(table_ptr, chunks_ptr, found_inf_ptr, p_like, g_b_like, g_lb_like,
                              m_like, v_like, vmax_like, scale_b, scale_lb, lr_hi, lr_lo,
                              beta1_hi, beta1_lo, beta2_hi, beta2_lo, one_minus_beta1, beta2,
                              one_minus_beta2, eps, weight_decay, decay_factor,
                              BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
                              HAS_WEIGHT_DECAY: tl.constexpr, AMSGRAD: tl.constexpr,
                              MAXIMIZE: tl.constexpr, DECOUPLED_WEIGHT_DECAY: tl.constexpr,
                              SCALARS_IN_MEMORY: tl.constexpr):
    row, base, remaining = update_chunk(table_ptr, chunks_ptr, found_inf_ptr, WIDTH, BLOCK)
    p_ptr = table_pointer(table_ptr, row, P, WIDTH, p_like, ALIGNED) + base
    g_b_ptr = table_pointer(table_ptr, row, G_B, WIDTH, g_b_like, ALIGNED) + base
    g_lb_ptr = table_pointer(table_ptr, row, G_LB, WIDTH, g_lb_like, ALIGNED) + base
    m_ptr = table_pointer(table_ptr, row, EXP_AVG, WIDTH, m_like, ALIGNED) + base
    v_ptr = table_pointer(table_ptr, row, EXP_AVG_SQ, WIDTH, v_like, ALIGNED) + base
    vmax_ptr = table_pointer(table_ptr, row, MAX_EXP_AVG_SQ, WIDTH, vmax_like, ALIGNED) + base
    step_ptr = table_pointer(table_ptr, row, STEP, WIDTH, found_inf_ptr, False)
    adam_chunk(p_ptr, g_b_ptr, g_lb_ptr, m_ptr, v_ptr, vmax_ptr, step_ptr, remaining, scale_b,
               scale_lb, lr_hi, lr_lo, beta1_hi, beta1_lo, beta2_hi, beta2_lo, one_minus_beta1,
               beta2, one_minus_beta2, eps, weight_decay, decay_factor, BLOCK, HAS_WEIGHT_DECAY,
               AMSGRAD, MAXIMIZE, DECOUPLED_WEIGHT_DECAY, SCALARS_IN_MEMORY)


@triton.jit
def _adam_per_tensor_kernel(p_ptr, g_b_ptr, g_lb_ptr, m_ptr, v_ptr, vmax_ptr, step_ptr,
                            found_inf_ptr, numel, scale_b, scale_lb, lr_hi, lr_lo, beta1_hi,
                            beta1_lo, beta2_hi, beta2_lo, one_minus_beta1, beta2,
                            one_minus_beta2, eps, weight_decay, decay_factor,
                            BLOCK: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                            AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                            DECOUPLED_WEIGHT_DECAY: tl.constexpr,
                            SCALARS_IN_MEMORY: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * BLOCK
    remaining = remaining_elements(found_inf_ptr, numel, base)
    adam_chunk(p_ptr + base, g_b_ptr + base, g_lb_ptr + base, m_ptr + base, v_ptr + base,
               vmax_ptr + base, step_ptr, remaining, scale_b, scale_lb, lr_hi, lr_lo, beta1_hi,
               beta1_lo, beta2_hi, beta2_lo, one_minus_beta1, beta2, one_minus_beta2, eps,
               weight_decay, decay_factor, BLOCK, HAS_WEIGHT_DECAY, AMSGRAD, MAXIMIZE,
               DECOUPLED_WEIGHT_DECAY, SCALARS_IN_MEMORY)


def increment_steps_(state_steps, found_inf):
    """state_steps[i] += 1 unless the step is skipped, on the device: += (found_inf == 0)."""
    if state_steps:
        torch._foreach_add_(state_steps, (found_inf == 0).to(torch.float32).reshape(()))


@_launch.on_found_inf_device(7)
def adam_step_(params, grads_b, grads_lb, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
               found_inf, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
               decoupled_weight_decay, scale_b, scale_lb, check_finite):
    """The Triton implementation of gerne_kernels::triton_adam_step_, both overloads (schema
    in _ops.py): lr, scale_b and scale_lb are floats, or tensors for .tensor."""
    device_index = _launch.check_found_inf(found_inf, OP_NAME)
    numels = [p.numel() for p in params]
    lists = dict(params=params, grads_b=grads_b, grads_lb=grads_lb, exp_avgs=exp_avgs,
                 exp_avg_sqs=exp_avg_sqs)
    if amsgrad:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    dtypes = _launch.check_lists(OP_NAME, device_index, numels, **lists)
    _launch.check_steps(OP_NAME, device_index, state_steps, len(params))
    if not params:
        return
    mode, block, num_warps = _launch.mode_for(found_inf, dtypes)
    beta1, beta2, weight_decay = float(beta1), float(beta2), float(weight_decay)
    scalars, tensor_scalars = launch_scalars(OP_NAME, found_inf, scale_b=scale_b,
                                             scale_lb=scale_lb, lr_hi=lr)
    lr = scalars["lr_hi"]  # a float, or a float64 device tensor
    # 1 - lr * wd in float64 (on the device for a tensor lr), as torch.optim computes it.
    scalars.update(decay_factor=1.0 - lr * weight_decay, lr_lo=0.0)
    if not tensor_scalars:
        scalars["lr_hi"], scalars["lr_lo"] = _launch.split_double(lr)
    beta1_hi, beta1_lo = _launch.split_double(beta1)
    beta2_hi, beta2_lo = _launch.split_double(beta2)
    # Host-side scalars in double, rounded once to float32 at launch, as torch.optim does.
    scalars.update(beta1_hi=beta1_hi, beta1_lo=beta1_lo, beta2_hi=beta2_hi, beta2_lo=beta2_lo,
                   one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
                   eps=float(eps), weight_decay=weight_decay)
    flags = dict(HAS_WEIGHT_DECAY=weight_decay != 0, AMSGRAD=bool(amsgrad),
                 MAXIMIZE=bool(maximize), DECOUPLED_WEIGHT_DECAY=bool(decoupled_weight_decay),
                 SCALARS_IN_MEMORY=tensor_scalars)
    maxima = max_exp_avg_sqs if amsgrad else None
    prepared = None
    if mode == "multi_tensor":
        prepared = _launch.prepare_multi_tensor(
            found_inf, [params, grads_b, grads_lb, exp_avgs, exp_avg_sqs, maxima, state_steps],
            numels, g_b_column=G_B.value, g_lb_column=G_LB.value, check_finite=check_finite,
            block=block, num_warps=num_warps, unchecked_columns=(STEP.value,))
    if prepared is not None:
        table, chunks, aligned, likes = prepared
        increment_steps_(state_steps, found_inf)
        if chunks.shape[0]:
            _adam_multi_tensor_kernel[(chunks.shape[0],)](
                table, chunks, found_inf, *likes[:STEP.value], **scalars, BLOCK=block,
                ALIGNED=aligned, **flags, num_warps=num_warps)
        return
    if check_finite:
        flag_nonfinite_per_tensor(grads_b, grads_lb, found_inf, block=block,
                                  num_warps=num_warps)
    increment_steps_(state_steps, found_inf)
    for i, p in enumerate(params):
        if numels[i]:
            vmax = maxima[i] if amsgrad else p
            _adam_per_tensor_kernel[(triton.cdiv(numels[i], block),)](
                p, grads_b[i], grads_lb[i], exp_avgs[i], exp_avg_sqs[i], vmax, state_steps[i],
                found_inf, numels[i], **scalars, BLOCK=block, **flags, num_warps=num_warps)
