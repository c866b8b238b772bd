// The per-element GERNE update, written once for C++ and CUDA.
//
// Every function is templated on the value type T so that the same source serves
//   - the CUDA kernel (T = float, one element per thread iteration),
//   - the CPU kernel's SIMD body (T = at::vec::Vectorized<float>),
//   - the CPU kernel's scalar tail (T = float).
// Scalars arrive as float and are broadcast with T(x). The operation order follows
// torch.optim's single-tensor SGD / Adam so that results agree to float rounding.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GERNE_HD __host__ __device__ __forceinline__
#else
#define GERNE_HD inline
#include <ATen/cpu/vec/vec.h>
#endif

namespace gerne {

GERNE_HD float gerne_sqrt(float x) { return sqrtf(x); }
// max(a, b) that propagates NaN from either side, as torch.maximum does.
GERNE_HD float gerne_max(float a, float b) { return (a > b || a != a) ? a : b; }
#if !(defined(__CUDACC__) || defined(__HIPCC__))
inline at::vec::Vectorized<float> gerne_sqrt(const at::vec::Vectorized<float>& x) { return x.sqrt(); }
inline at::vec::Vectorized<float> gerne_max(const at::vec::Vectorized<float>& a,
                                            const at::vec::Vectorized<float>& b) {
  return at::vec::maximum(a, b);
}
#endif

// grad L_ext = (1 + beta) * g_lb - beta * g_b, each batch's gradient first unscaled by its
// inverse loss scale: scale_lb = (1 + beta) * inv_scale_lb and scale_b = -beta * inv_scale_b.
template <typename T>
GERNE_HD T extrapolated_grad(const T& g_b, const T& g_lb, float scale_b, float scale_lb) {
  return T(scale_lb) * g_lb + T(scale_b) * g_b;
}

// torch's lerp: start + w * (end - start) for w < 0.5, else end - (end - start) * (1 - w).
template <typename T>
GERNE_HD T lerp(const T& start, const T& end, float weight) {
  return weight < 0.5f ? start + T(weight) * (end - start)
                       : end - (end - start) * T(1.0f - weight);
}

// Complements such as 1 - dampening are computed on the host in double, as torch.optim does in
// Python, and rounded once to float: computing them in float would differ in the last bits.
struct SgdHyper {
  float lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov, maximize, is_first_step;
};

// The op's arguments as an SgdHyper (host side; shared by the CPU and CUDA kernels).
inline SgdHyper make_sgd_hyper(double lr, double momentum, double dampening, double weight_decay,
                               bool nesterov, bool maximize, bool is_first_step) {
  return SgdHyper{static_cast<float>(lr), static_cast<float>(momentum),
                  static_cast<float>(1.0 - dampening), static_cast<float>(weight_decay),
                  nesterov, maximize, is_first_step};
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

struct AdamHyper {
  float one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  float decay_factor;  // 1 - lr * weight_decay, used by AdamW only
  bool amsgrad, maximize, decoupled_weight_decay;
  // Per tensor, from its step count t: lr / (1 - beta1^t) and sqrt(1 - beta2^t).
  float step_size, bias_correction2_sqrt;
};

// AdamW's decay factor 1 - lr * weight_decay, in double as torch.optim computes it in Python.
// Host and device: with lr in device memory (the .tensor overloads) the CUDA kernel computes it.
GERNE_HD float adamw_decay_factor(double lr, double weight_decay) {
  return static_cast<float>(1.0 - lr * weight_decay);
}

// The op's arguments as an AdamHyper (host side; shared by the CPU and CUDA kernels). The
// per-tensor fields are left for set_bias_corrections.
inline AdamHyper make_adam_hyper(double lr, double beta1, double beta2, double eps,
                                 double weight_decay, bool amsgrad, bool maximize,
                                 bool decoupled_weight_decay) {
  return AdamHyper{static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                   static_cast<float>(1.0 - beta2), static_cast<float>(eps),
                   static_cast<float>(weight_decay), adamw_decay_factor(lr, weight_decay),
                   amsgrad, maximize, decoupled_weight_decay, 0.0f, 0.0f};
}

// The per-tensor fields from its step count t (already incremented), in double as torch.optim
// computes them in Python: step_size = lr / (1 - beta1^t), bias_correction2_sqrt = sqrt(1 - beta2^t).
// Host and device: the CUDA kernel reads t from device memory, so a step needs no host sync.
GERNE_HD void set_bias_corrections(AdamHyper& h, double lr, double beta1, double beta2,
                                   double step) {
  h.step_size = static_cast<float>(lr / (1.0 - pow(beta1, step)));
  h.bias_correction2_sqrt = static_cast<float>(sqrt(1.0 - pow(beta2, step)));
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

}  // namespace gerne
