"""Pure-PyTorch reference implementations of the fused GERNE ops: the specification.

Same signatures as the ops of ``_ops.py``. They run on any device and any floating dtype; half
and bfloat16 tensors are computed in float32 and rounded once on store, as the fused kernels do,
and float64 stays float64. Per element::

    g = scale_lb * g_lb + scale_b * g_b                  # (1 + beta) g_lb - beta g_b, unscaled

followed by torch.optim.SGD's or Adam/AdamW's update on g, operation for operation, or Lion's
(Chen et al. 2023):

    c = beta1 * m + (1 - beta1) * g;   p = p * (1 - lr * wd) - lr * sign(c);
    m = beta2 * m + (1 - beta2) * g

The update ops change nothing when ``found_inf`` is non-zero. ``scan_`` sets ``found_inf`` to 1
when any gradient element is inf or NaN and adds the sums of g^2, g_b^2, g_lb^2 and g_b * g_lb,
computed in float64, into ``sums``.
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


def _skipped(found_inf):
    return bool(found_inf.item() != 0)


def _host(value):
    """A float or one-element tensor scalar as a Python float (reads a device tensor)."""
    return float(value)


def extrapolated_grad(g_b, g_lb, scale_b, scale_lb):
    """scale_lb * g_lb + scale_b * g_b in the compute dtype."""
    return _up(g_lb).mul(scale_lb).add_(_up(g_b), alpha=scale_b)


def sgd_step_(params, grads_b, grads_lb, momentum_buffers, found_inf, *, lr, momentum,
              dampening, nesterov, weight_decay, maximize, is_first_step, scale_b, scale_lb):
    if _skipped(found_inf):
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
               decoupled_weight_decay, scale_b, scale_lb):
    if _skipped(found_inf):
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


def lion_step_(params, grads_b, grads_lb, exp_avgs, found_inf, *, lr, beta1, beta2,
               weight_decay, maximize, scale_b, scale_lb):
    if _skipped(found_inf):
        return
    lr, scale_b, scale_lb = _host(lr), _host(scale_b), _host(scale_lb)
    for p, g_b, g_lb, exp_avg in zip(params, grads_b, grads_lb, exp_avgs):
        g = extrapolated_grad(g_b, g_lb, scale_b, scale_lb)
        p32, m = _up(p), _up(exp_avg)
        if maximize:
            g = -g
        c = m.mul(beta1).add_(g.mul(1 - beta1))
        if weight_decay != 0:
            p32 = p32.mul(1 - lr * weight_decay)
        p.copy_(p32.sub(c.sign().mul_(lr)))
        exp_avg.copy_(m.mul(beta2).add_(g.mul(1 - beta2)))


def extrapolate_(out, grads_b, grads_lb, found_inf, *, scale_b, scale_lb):
    if _skipped(found_inf):
        return
    scale_b, scale_lb = _host(scale_b), _host(scale_lb)
    for o, g_b, g_lb in zip(out, grads_b, grads_lb):
        o.copy_(extrapolated_grad(g_b, g_lb, scale_b, scale_lb))


def scan_(grads_b, grads_lb, found_inf, sums, *, scale_b, scale_lb):
    """The sums are exact sums of the float64 values (the kernels form g per element in float32
    and accumulate in float32 or float64: they agree to about 1e-6 relative)."""
    grads_lb = grads_lb if len(grads_lb) else [torch.zeros_like(g) for g in grads_b]
    if has_nonfinite(list(grads_b) + list(grads_lb)):
        found_inf.fill_(1.0)
    if sums is None or not len(grads_b):
        return
    scale_b, scale_lb = _host(scale_b), _host(scale_lb)
    total = torch.zeros(4, dtype=torch.float64, device=sums.device)
    for g_b, g_lb in zip(grads_b, grads_lb, strict=True):
        b, lb = g_b.double().reshape(-1), g_lb.double().reshape(-1)
        g = lb * scale_lb + b * scale_b
        total += torch.stack([g.dot(g), b.dot(b), lb.dot(lb), b.dot(lb)]).to(sums.device)
    sums.add_(total.to(sums.dtype))
