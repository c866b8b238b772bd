"""The per-element GERNE math in Triton: csrc/gerne_math.h, function for function.

Same names, same operation order as the C++/CUDA header, so that the Triton kernels compute
what the C++ kernels and the reference (gerne_kernels/_reference.py) compute, to float rounding
(bit for bit in the interpreter, which neither contracts a * b + c into an fma nor approximates
division). Differences forced by Triton:

  - Triton functions cannot write through references: each update returns its new values
    (``p, buf = sgd_update(...)`` instead of ``sgd_update(p, buf, ...)``).
  - The hyperparameter structs become arguments. Flags that decide which tensors exist
    (momentum != 0, weight_decay != 0, amsgrad, ...) are ``tl.constexpr``, so a kernel compiled
    for momentum == 0 never touches a momentum buffer; the float scalars stay runtime values.
  - Division and square root use ``tl.div_rn`` / ``tl.sqrt_rn``: on NVIDIA GPUs Triton's ``/``
    and ``tl.sqrt`` on float32 are the faster approximate instructions, torch's are IEEE.

Element math is float32 (the kernels load float32/bfloat16/float16 and convert before calling);
what torch.optim computes in Python doubles (bias corrections, 1 - lr * wd) and the scan's sums
are float64.
"""

import triton
import triton.language as tl


@triton.jit
def gerne_sqrt(x):
    return tl.sqrt_rn(x)


@triton.jit
def gerne_max(a, b):
    """(a > b || a != a) ? a : b: max(a, b) propagating NaN from either side, as torch.maximum."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def gerne_sign(x):
    """torch.sign: 1 for x > 0, -1 for x < 0, +0 otherwise (0, -0 and NaN)."""
    return tl.where(x > 0, 1.0, 0.0) - tl.where(x < 0, 1.0, 0.0)


@triton.jit
def extrapolated_grad(g_b, g_lb, scale_b, scale_lb):
    """grad L_ext = (1 + beta) g_lb - beta g_b with the inverse loss scales folded in:
    scale_lb = (1 + beta) * inv_scale_lb, scale_b = -beta * inv_scale_b."""
    return scale_lb * g_lb + scale_b * g_b


@triton.jit
def lerp(start, end, weight):
    """torch's lerp: start + w * (end - start) for w < 0.5, else end - (end - start) * (1 - w)."""
    return tl.where(weight < 0.5, start + weight * (end - start),
                    end - (end - start) * (1.0 - weight))


@triton.jit
def sgd_update(p, buf, g, lr, momentum, one_minus_dampening, weight_decay,
               HAS_MOMENTUM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
               NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, IS_FIRST_STEP: tl.constexpr):
    """torch.optim.SGD on the extrapolated gradient g; returns (p, buf):
      g <- -g (maximize);  g <- g + wd * p;
      buf <- g (first step) or momentum * buf + (1 - dampening) * g;
      g <- g + momentum * buf (nesterov) or buf;   p <- p - lr * g
    """
    if MAXIMIZE:
        g = 0.0 - g
    if HAS_WEIGHT_DECAY:
        g = g + weight_decay * p
    if HAS_MOMENTUM:
        if IS_FIRST_STEP:
            buf = g
        else:
            buf = momentum * buf + one_minus_dampening * g
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - lr * g
    return p, buf


@triton.jit
def adam_update(p, m, v, vmax, g, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                decay_factor, step_size, bias_correction2_sqrt,
                HAS_WEIGHT_DECAY: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                DECOUPLED_WEIGHT_DECAY: tl.constexpr):
    """torch.optim.Adam (DECOUPLED_WEIGHT_DECAY=False) / AdamW (True) on g; returns
    (p, m, v, vmax):
      g <- -g (maximize);  p <- p * (1 - lr * wd) (AdamW) or g <- g + wd * p (Adam);
      m <- lerp(m, g, 1 - beta1);  v <- beta2 * v + (1 - beta2) * g * g;  vmax <- max(vmax, v);
      p <- p - step_size * m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps)
    """
    if MAXIMIZE:
        g = 0.0 - g
    if HAS_WEIGHT_DECAY:
        if DECOUPLED_WEIGHT_DECAY:
            p = p * decay_factor
        else:
            g = g + weight_decay * p
    m = lerp(m, g, one_minus_beta1)
    v = beta2 * v + one_minus_beta2 * g * g
    second_moment = v
    if AMSGRAD:
        vmax = gerne_max(vmax, v)
        second_moment = vmax
    denom = tl.div_rn(gerne_sqrt(second_moment), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    return p, m, v, vmax


@triton.jit
def lion_update(p, m, g, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay_factor,
                HAS_WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr):
    """Lion (Chen et al. 2023) on g, as _reference.lion_step_ computes it; returns (p, m):
      g <- -g (maximize);  c <- beta1 * m + (1 - beta1) * g;
      p <- p * (1 - lr * wd);  p <- p - lr * sign(c);  m <- beta2 * m + (1 - beta2) * g
    """
    if MAXIMIZE:
        g = -g
    c = m * beta1 + g * one_minus_beta1
    if HAS_WEIGHT_DECAY:
        p = p * decay_factor
    p = p - gerne_sign(c) * lr
    m = m * beta2 + g * one_minus_beta2
    return p, m


@triton.jit
def adamw_decay_factor(lr, weight_decay):
    """1 - lr * weight_decay in float64 (lr and weight_decay float64), rounded once to float32,
    as torch.optim computes it in Python; the decoupled decay of AdamW and Lion."""
    return (1.0 - lr * weight_decay).to(tl.float32)


@triton.jit
def integer_power(base, exponent):
    """base ** exponent for a float64 base and a non-negative integer exponent, by repeated
    squaring: within a few float64 ulps of the host's pow for any step count."""
    result = tl.full([], 1.0, tl.float64)
    n = exponent
    while n > 0:
        result = tl.where((n & 1) == 1, result * base, result)
        base = base * base
        n = n >> 1
    return result


@triton.jit
def set_bias_corrections(step, lr, beta1, beta2):
    """The per-tensor AdamHyper fields from a tensor's (already incremented) step count t,
    returned as float32 (step_size, bias_correction2_sqrt), computed in float64 as torch.optim
    does in Python:  step_size = lr / (1 - beta1^t),  bias_correction2_sqrt = sqrt(1 - beta2^t).
    lr, beta1 and beta2 are float64 (kernel_io.runtime_double, host_double); pow becomes
    integer_power: t is a whole number."""
    t = step.to(tl.int64)
    step_size = lr / (1.0 - integer_power(beta1, t))
    bias_correction2_sqrt = tl.sqrt(1.0 - integer_power(beta2, t))  # float64 sqrt is IEEE
    return step_size.to(tl.float32), bias_correction2_sqrt.to(tl.float32)


@triton.jit
def is_nonfinite(x):
    """x is inf, -inf or NaN."""
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def gradient_sums(g_b, g_lb, scale_b, scale_lb):
    """The scan's four sums over a block, float64 scalars:
    (sum g^2, sum g_b^2, sum g_lb^2, sum g_b * g_lb), with g = extrapolated_grad(g_b, g_lb) in
    float32 per element (the g the update ops step along), each product in float64."""
    g = extrapolated_grad(g_b, g_lb, scale_b, scale_lb).to(tl.float64)
    b = g_b.to(tl.float64)
    lb = g_lb.to(tl.float64)
    return (tl.sum(g * g, axis=0), tl.sum(b * b, axis=0), tl.sum(lb * lb, axis=0),
            tl.sum(b * lb, axis=0))
