"""Pure-PyTorch reference implementations of the fused GERNE ops: the specification.

Same signatures as the ops declared in ``_ops.py``. They run on any device and any floating
dtype; half and bfloat16 tensors are computed in float32 and rounded once on store, as the
fused kernels do, and float64 stays float64. The math, per element::

    g = scale_lb * g_lb + scale_b * g_b                  # (1 + beta) g_lb - beta g_b, unscaled

followed by torch.optim.SGD's or torch.optim.Adam/AdamW's update on g, operation for operation.
"""

import math

import torch

_REDUCED = (torch.float16, torch.bfloat16)


def _compute_dtype(t):
    return torch.float32 if t.dtype in _REDUCED else t.dtype


def _up(t):
    return t.to(_compute_dtype(t))


def has_nonfinite(tensors):
    """True when any element of any tensor is inf or NaN (one host sync)."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return False
    flags = torch.stack([torch.logical_not(torch.isfinite(t).all()) for t in tensors])
    return bool(flags.any())


def _host(value):
    """A float or one-element tensor scalar as a Python float (reads a device tensor)."""
    return float(value)


def _skip(found_inf, check_finite, grads_b, grads_lb):
    if check_finite and has_nonfinite(list(grads_b) + list(grads_lb)):
        found_inf.fill_(1.0)
    return bool(found_inf.item() != 0)


def extrapolated_grad(g_b, g_lb, scale_b, scale_lb):
    """scale_lb * g_lb + scale_b * g_b in the compute dtype."""
    return _up(g_lb).mul(scale_lb).add_(_up(g_b), alpha=scale_b)


def sgd_step_(params, grads_b, grads_lb, momentum_buffers, found_inf, *, lr, momentum,
              dampening, nesterov, weight_decay, maximize, is_first_step, scale_b, scale_lb,
              check_finite):
    if _skip(found_inf, check_finite, grads_b, grads_lb):
        return
    lr, scale_b, scale_lb = _host(lr), _host(scale_b), _host(scale_lb)
    for i, (p, g_b, g_lb) in enumerate(zip(params, grads_b, grads_lb)):
        g = extrapolated_grad(g_b, g_lb, scale_b, scale_lb)
        p32 = _up(p)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p32, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if is_first_step:
                buf32 = g.clone()
            else:
                buf32 = _up(buf).mul(momentum).add_(g, alpha=1 - dampening)
            buf.copy_(buf32)
            g = g.add(buf32, alpha=momentum) if nesterov else buf32
        p.copy_(p32.add(g, alpha=-lr))


def adam_step_(params, grads_b, grads_lb, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
               found_inf, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
               decoupled_weight_decay, scale_b, scale_lb, check_finite):
    if _skip(found_inf, check_finite, grads_b, grads_lb):
        return
    lr, scale_b, scale_lb = _host(lr), _host(scale_b), _host(scale_lb)
    for i, (p, g_b, g_lb) in enumerate(zip(params, grads_b, grads_lb)):
        g = extrapolated_grad(g_b, g_lb, scale_b, scale_lb)
        p32, m, v = _up(p), _up(exp_avgs[i]), _up(exp_avg_sqs[i])
        state_steps[i].add_(1)
        step = float(state_steps[i].item())
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled_weight_decay:
                p32 = p32.mul(1 - lr * weight_decay)
            else:
                g = g.add(p32, alpha=weight_decay)
        m = m.lerp(g, 1 - beta1)
        v = v.mul(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
        second_moment = v
        if amsgrad:
            second_moment = torch.maximum(_up(max_exp_avg_sqs[i]), v)
            max_exp_avg_sqs[i].copy_(second_moment)
        denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)
        p.copy_(p32.addcdiv(m, denom, value=-step_size))
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)


def extrapolate_(out, grads_b, grads_lb, found_inf, *, scale_b, scale_lb, check_finite):
    if _skip(found_inf, check_finite, grads_b, grads_lb):
        return
    scale_b, scale_lb = _host(scale_b), _host(scale_lb)
    for o, g_b, g_lb in zip(out, grads_b, grads_lb):
        o.copy_(extrapolated_grad(g_b, g_lb, scale_b, scale_lb))
