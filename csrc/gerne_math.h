// The per-element GERNE math, written once for C++ and CUDA.
//
// Every element-wise function is templated on the value type T so that the same source serves
//   - the CUDA kernel (T = float, one element per thread iteration),
//   - the CPU kernel's SIMD body (T = at::vec::Vectorized<float>),
//   - the CPU kernel's scalar tail (T = float).
// Scalars arrive as float and are broadcast with T(x). The operation order follows
// torch.optim's single-tensor SGD / Adam (and the reference's Lion) so that results agree to
// float rounding. The per-call and per-tensor scalars (1 - lr * wd, Adam's bias corrections) are
// double expressions, as torch.optim computes them in Python, rounded once to float; they are
// computed on the host (CPU kernels) or on the device (CUDA kernels) with the *_rn functions
// below, which round every operation the same way on both.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GERNE_HD __host__ __device__ __forceinline__
#else
#define GERNE_HD inline
#include <ATen/cpu/vec/vec.h>
#endif

namespace gerne {

// ------------------------------------------------------------------------------------------------
// Arithmetic with one rounding per operation, never fused. nvcc contracts a * b + c into one fused
// multiply-add (one rounding) unless told otherwise, and g++ does the same on the host (-mfma),
// while Python (torch.optim's double scalars) and torch's separate tensor ops round the product
// first. Where results must round as those do, the math uses these: on the device the explicitly
// rounded intrinsics, which nvcc never contracts; on the host the product passes through
// `opaque`, which the optimizer cannot see through.

#if !defined(__CUDA_ARCH__)
// x, unchanged, as a value the optimizer knows nothing about (no instruction is emitted).
template <typename T>
inline T opaque(T x) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(x));  // float, double, __m256, __m512: in a vector register
#else
  asm("" : "+m"(x));
#endif
  return x;
}
#endif

// name(a, b): on the device the rounded intrinsic, on the host the expression.
#if defined(__CUDA_ARCH__)
#define GERNE_ROUNDED_OP(type, name, intrinsic, host) \
  GERNE_HD type name(type a, type b) { return intrinsic(a, b); }
#else
#define GERNE_ROUNDED_OP(type, name, intrinsic, host) \
  GERNE_HD type name(type a, type b) { return host; }
#endif
GERNE_ROUNDED_OP(double, mul_rn, __dmul_rn, opaque(a * b))
GERNE_ROUNDED_OP(double, sub_rn, __dsub_rn, a - b)
GERNE_ROUNDED_OP(double, div_rn, __ddiv_rn, a / b)
GERNE_ROUNDED_OP(float, mul_rn, __fmul_rn, opaque(a * b))
GERNE_ROUNDED_OP(float, add_rn, __fadd_rn, a + b)
GERNE_ROUNDED_OP(float, sub_rn, __fsub_rn, a - b)
#undef GERNE_ROUNDED_OP

GERNE_HD double sqrt_rn(double x) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// a * b + c with one rounding.
GERNE_HD float fused_mul_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

#if !(defined(__CUDACC__) || defined(__HIPCC__))
inline at::vec::Vectorized<float> opaque(const at::vec::Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return opaque(static_cast<__m512>(x));
#elif defined(CPU_CAPABILITY_AVX2)
  return opaque(static_cast<__m256>(x));
#else
  at::vec::Vectorized<float> y = x;
  asm("" : "+m"(y));
  return y;
#endif
}
inline at::vec::Vectorized<float> mul_rn(const at::vec::Vectorized<float>& a,
                                         const at::vec::Vectorized<float>& b) {
  return opaque(a * b);
}
inline at::vec::Vectorized<float> add_rn(const at::vec::Vectorized<float>& a,
                                         const at::vec::Vectorized<float>& b) {
  return a + b;
}
inline at::vec::Vectorized<float> sub_rn(const at::vec::Vectorized<float>& a,
                                         const at::vec::Vectorized<float>& b) {
  return a - b;
}
inline at::vec::Vectorized<float> fused_mul_add(const at::vec::Vectorized<float>& a,
                                                const at::vec::Vectorized<float>& b,
                                                const at::vec::Vectorized<float>& c) {
  return at::vec::fmadd(a, b, c);
}
#endif

// ------------------------------------------------------------------------------------------------
// Element-wise helpers for float and (host) Vectorized<float>.

GERNE_HD float gerne_sqrt(float x) { return sqrtf(x); }
// max(a, b) that propagates NaN from either side, as torch.maximum does.
GERNE_HD float gerne_max(float a, float b) { return (a > b || a != a) ? a : b; }
GERNE_HD bool gerne_isfinite(double x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}
// torch.sign: 1, -1, or +0 for zeros and NaN, i.e. (x > 0) - (x < 0).
GERNE_HD float gerne_sign(float x) { return (x > 0.0f ? 1.0f : 0.0f) - (x < 0.0f ? 1.0f : 0.0f); }
#if !(defined(__CUDACC__) || defined(__HIPCC__))
inline at::vec::Vectorized<float> gerne_sqrt(const at::vec::Vectorized<float>& x) { return x.sqrt(); }
inline at::vec::Vectorized<float> gerne_max(const at::vec::Vectorized<float>& a,
                                            const at::vec::Vectorized<float>& b) {
  return at::vec::maximum(a, b);
}
inline at::vec::Vectorized<float> gerne_sign(const at::vec::Vectorized<float>& x) {
  using V = at::vec::Vectorized<float>;
  const V zero(0.0f), one(1.0f);
  return V::blendv(zero, one, zero < x) - V::blendv(zero, one, x < zero);
}
#endif

// grad L_ext = (1 + beta) * g_lb - beta * g_b, each batch's gradient first unscaled by its
// inverse loss scale: scale_lb = (1 + beta) * inv_scale_lb and scale_b = -beta * inv_scale_b.
template <typename T>
GERNE_HD T extrapolated_grad(const T& g_b, const T& g_lb, float scale_b, float scale_lb) {
  return T(scale_lb) * g_lb + T(scale_b) * g_b;
}

// The extrapolated gradient rounded exactly as the reference rounds it,
// g_lb.mul(scale_lb).add_(g_b, alpha=scale_b): the product scale_lb * g_lb, then one fused
// multiply-add (torch's add with alpha). Lion needs this: a last-bit difference in g can flip
// sign(c). extrapolated_grad leaves the fusing to the compiler (which fuses the other product
// in the CPU's SIMD body) and stays as it is, so that the existing ops' results do not change.
template <typename T>
GERNE_HD T extrapolated_grad_as_reference(const T& g_b, const T& g_lb, float scale_b,
                                          float scale_lb) {
  return fused_mul_add(T(scale_b), g_b, mul_rn(T(scale_lb), g_lb));
}

// torch's lerp: start + w * (end - start) for w < 0.5, else end - (end - start) * (1 - w).
template <typename T>
GERNE_HD T lerp(const T& start, const T& end, float weight) {
  return weight < 0.5f ? start + T(weight) * (end - start)
                       : end - (end - start) * T(1.0f - weight);
}

// The decay factor 1 - lr * weight_decay of AdamW and Lion, in double as torch.optim computes it
// in Python, rounded once to float.
GERNE_HD float decay_factor(double lr, double weight_decay) {
  return static_cast<float>(sub_rn(1.0, mul_rn(lr, weight_decay)));
}

// ------------------------------------------------------------------------------------------------
// SGD

// Complements such as 1 - dampening are computed on the host in double, as torch.optim does in
// Python, and rounded once to float: computing them in float would differ in the last bits.
struct SgdHyper {
  float lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov, maximize, is_first_step;
};

// The op's arguments but lr (set per call from the scalars) as an SgdHyper (host side).
inline SgdHyper make_sgd_hyper(double momentum, double dampening, double weight_decay,
                               bool nesterov, bool maximize, bool is_first_step) {
  return SgdHyper{0.0f, static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
                  static_cast<float>(weight_decay), nesterov, maximize, is_first_step};
}

// torch.optim.SGD on the extrapolated gradient g:
//   g <- -g (maximize);  g <- g + wd * p;
//   buf <- g (first step) or momentum * buf + (1 - dampening) * g;
//   g <- g + momentum * buf (nesterov) or buf;   p <- p - lr * g
template <typename T>
GERNE_HD void sgd_update(T& p, T& buf, T g, const SgdHyper& h) {
  if (h.maximize) g = T(0.0f) - g;
  if (h.weight_decay != 0.0f) g = g + T(h.weight_decay) * p;
  if (h.momentum != 0.0f) {
    buf = h.is_first_step ? g : T(h.momentum) * buf + T(h.one_minus_dampening) * g;
    g = h.nesterov ? g + T(h.momentum) * buf : buf;
  }
  p = p - T(h.lr) * g;
}

// ------------------------------------------------------------------------------------------------
// Adam / AdamW

struct AdamHyper {
  float one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  float decay_factor;  // 1 - lr * weight_decay, used by AdamW only
  bool amsgrad, maximize, decoupled_weight_decay;
  // Per tensor, from its step count t: lr / (1 - beta1^t) and sqrt(1 - beta2^t).
  float step_size, bias_correction2_sqrt;
};

// The op's arguments as an AdamHyper (host side); decay_factor (per call, from lr) and the
// per-tensor fields are set from the scalars and the step count.
inline AdamHyper make_adam_hyper(double beta1, double beta2, double eps, double weight_decay,
                                 bool amsgrad, bool maximize, bool decoupled_weight_decay) {
  return AdamHyper{static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                   static_cast<float>(1.0 - beta2), static_cast<float>(eps),
                   static_cast<float>(weight_decay), 1.0f, amsgrad, maximize,
                   decoupled_weight_decay, 0.0f, 0.0f};
}

struct AdamBiasCorrections {
  float step_size, bias_correction2_sqrt;
};

// beta^t as the bias corrections use it. On the device a call, not inlined: pow is a long DFMA
// sequence of its own, kept apart from the expressions around it.
#if defined(__CUDA_ARCH__)
__device__ __noinline__ inline double bias_power(double beta, double step) { return pow(beta, step); }
#else
inline double bias_power(double beta, double step) { return std::pow(beta, step); }
#endif

// A tensor's bias corrections from its step count t (already incremented), in double as
// torch.optim computes them in Python: lr / (1 - beta1^t) and sqrt(1 - beta2^t).
GERNE_HD AdamBiasCorrections adam_bias_corrections(double lr, double beta1, double beta2,
                                                   double step) {
  return AdamBiasCorrections{
      static_cast<float>(div_rn(lr, sub_rn(1.0, bias_power(beta1, step)))),
      static_cast<float>(sqrt_rn(sub_rn(1.0, bias_power(beta2, step))))};
}

// torch.optim.Adam (decoupled_weight_decay=False) / AdamW (True) on the extrapolated gradient g:
//   g <- -g (maximize);  p <- p * (1 - lr * wd) (AdamW) or g <- g + wd * p (Adam);
//   m <- lerp(m, g, 1 - beta1);  v <- beta2 * v + (1 - beta2) * g * g;  vmax <- max(vmax, v);
//   p <- p - step_size * m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps)
template <typename T>
GERNE_HD void adam_update(T& p, T& m, T& v, T& vmax, T g, const AdamHyper& h) {
  if (h.maximize) g = T(0.0f) - g;
  if (h.weight_decay != 0.0f) {
    if (h.decoupled_weight_decay) {
      p = p * T(h.decay_factor);
    } else {
      g = g + T(h.weight_decay) * p;
    }
  }
  m = lerp(m, g, h.one_minus_beta1);
  v = T(h.beta2) * v + T(h.one_minus_beta2) * g * g;
  T second_moment = v;
  if (h.amsgrad) {
    vmax = gerne_max(vmax, v);
    second_moment = vmax;
  }
  const T denom = gerne_sqrt(second_moment) / T(h.bias_correction2_sqrt) + T(h.eps);
  p = p - T(h.step_size) * (m / denom);
}

// ------------------------------------------------------------------------------------------------
// Lion

struct LionHyper {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay;
  float decay_factor;  // 1 - lr * weight_decay
  bool maximize;
};

// The op's arguments as a LionHyper (host side); lr and decay_factor are set per call.
inline LionHyper make_lion_hyper(double beta1, double beta2, double weight_decay, bool maximize) {
  return LionHyper{0.0f, static_cast<float>(beta1), static_cast<float>(1.0 - beta1),
                   static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                   static_cast<float>(weight_decay), 1.0f, maximize};
}

// Lion (Chen et al. 2023) on the extrapolated gradient g, rounded operation for operation as the
// reference's separate tensor ops round (every product before its sum: a fused one could flip
// sign(c) where c is near 0):
//   g <- -g (maximize);  c <- beta1 * m + (1 - beta1) * g;
//   p <- p * (1 - lr * wd) (wd != 0);  p <- p - lr * sign(c);  m <- beta2 * m + (1 - beta2) * g
template <typename T>
GERNE_HD void lion_update(T& p, T& m, T g, const LionHyper& h) {
  if (h.maximize) g = T(0.0f) - g;
  const T c = add_rn(mul_rn(m, T(h.beta1)), mul_rn(g, T(h.one_minus_beta1)));
  if (h.weight_decay != 0.0f) p = mul_rn(p, T(h.decay_factor));
  p = sub_rn(p, gerne_sign(c) * T(h.lr));  // the product is exact: sign(c) is 1, -1 or 0
  m = add_rn(mul_rn(m, T(h.beta2)), mul_rn(g, T(h.one_minus_beta2)));
}

// ------------------------------------------------------------------------------------------------
// The scan

// Its four sums, in the order of scan_'s `sums` argument.
enum ScanSum { kSumGradSq, kSumGradBSq, kSumGradLbSq, kSumGradBGradLb, kScanSums };

// Adds one element's terms, in double D, to the scan's sums:
//   [g * g, g_b * g_b, g_lb * g_lb, g_b * g_lb]   (g: the extrapolated gradient, formed in float)
// The products of two floats are exact in double, so a fused multiply-add rounds as a multiply
// then an add would: only the sums round. The sums of squares of finite floats cannot overflow
// a double, so sums[kSumGradBSq] + sums[kSumGradLbSq] is finite exactly when every g_b and g_lb
// element was.
template <typename D>
GERNE_HD void scan_accumulate(D (&sums)[kScanSums], const D& g, const D& g_b, const D& g_lb) {
  sums[kSumGradSq] = sums[kSumGradSq] + g * g;
  sums[kSumGradBSq] = sums[kSumGradBSq] + g_b * g_b;
  sums[kSumGradLbSq] = sums[kSumGradLbSq] + g_lb * g_lb;
  sums[kSumGradBGradLb] = sums[kSumGradBGradLb] + g_b * g_lb;
}

// The flag-only scan's probe: x * 0 is 0 for every finite x and NaN for inf and NaN, and NaN is
// sticky under addition, so the sum stays 0 exactly while all elements are finite.
template <typename T>
GERNE_HD void nonfinite_accumulate(T& sum, const T& x) {
  sum = sum + x * T(0.0f);
}

}  // namespace gerne
