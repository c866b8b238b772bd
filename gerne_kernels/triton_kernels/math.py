"""The per-element GERNE update in Triton: csrc/gerne_math.h, function for function.

Same names, same operation order as the C++/CUDA header, so that the Triton kernels compute
what the C++ kernels and the reference compute, to float rounding. Differences forced by Triton:

  - Triton functions cannot write through references: each update returns its new values
    (``p, buf = sgd_update(...)`` instead of ``sgd_update(p, buf, ...)``).
  - The hyperparameter structs become arguments. Flags that decide which tensors exist
    (momentum != 0, weight_decay != 0, amsgrad, ...) are ``tl.constexpr``, so a kernel compiled
    for momentum == 0 never touches a momentum buffer; the float scalars stay runtime values.
  - Division and square root use ``tl.div_rn`` / ``tl.sqrt_rn``: on NVIDIA GPUs Triton's ``/``
    and ``tl.sqrt`` on float32 are the faster approximate instructions, torch's are IEEE.

All math is float32; the kernels load float32/bfloat16/float16 and convert before calling.
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
def set_bias_corrections(step, lr, beta1_hi, beta1_lo, beta2_hi, beta2_lo):
    """The per-tensor AdamHyper fields from a tensor's (already incremented) step count t,
    returned as float32 (step_size, bias_correction2_sqrt), computed in float64 as torch.optim
    does in Python:  step_size = lr / (1 - beta1^t),  bias_correction2_sqrt = sqrt(1 - beta2^t).
    lr is float64 (scalars.runtime_double). A Triton kernel takes float arguments as float32,
    so beta1 and beta2 arrive as (hi, lo) float32 pairs with hi + lo = the double to 48 bits
    (float32 beta2 = 0.999 alone would move 1 - beta2 by 1e-5 relative). pow becomes
    integer_power: t is a whole number."""
    t = step.to(tl.int64)
    beta1 = tl.cast(beta1_hi, tl.float64) + tl.cast(beta1_lo, tl.float64)
    beta2 = tl.cast(beta2_hi, tl.float64) + tl.cast(beta2_lo, tl.float64)
    step_size = lr / (1.0 - integer_power(beta1, t))
    bias_correction2_sqrt = tl.sqrt(1.0 - integer_power(beta2, t))  # float64 sqrt is IEEE
    return step_size.to(tl.float32), bias_correction2_sqrt.to(tl.float32)
