// The element-wise ops that multi_tensor_apply runs: each is one call into gerne_math.h, the
// single definition of the GERNE math shared with the CPU kernel,
//     g = scale_lb * g_lb + scale_b * g_b,   then torch.optim's SGD or Adam/AdamW update on g,
// plus the finiteness scan of check_finite. Stream order (the index j of values[j]) is given
// by the enums; see multi_tensor_apply.cuh for the functor protocol.
#pragma once

#include "gerne_math.h"
#include "multi_tensor_apply.cuh"

namespace gerne::cuda {

enum SgdStream { kSgdParam, kSgdGradB, kSgdGradLb, kSgdMomentumBuffer, kSgdStreams };
enum AdamStream {
  kAdamParam, kAdamGradB, kAdamGradLb, kAdamExpAvg, kAdamExpAvgSq, kAdamMaxExpAvgSq, kAdamStreams
};
enum ExtrapolateStream {
  kExtrapolateOut, kExtrapolateGradB, kExtrapolateGradLb, kExtrapolateStreams
};

constexpr uint32_t stream_bit(int j) { return 1u << j; }

// lr, scale_b and scale_lb in device memory (the ops' .tensor overloads), as float64; a null
// pointer means the op carries that value itself. Each thread reads them once, in for_tensor
// (cached loads of a few bytes), so a captured CUDA graph sees the values of the moment it is
// replayed.
struct DeviceScalars {
  const double* lr = nullptr;
  const double* scale_b = nullptr;
  const double* scale_lb = nullptr;

  __device__ void load_scales(float& scale_b_out, float& scale_lb_out) const {
    if (scale_b) scale_b_out = static_cast<float>(*scale_b);
    if (scale_lb) scale_lb_out = static_cast<float>(*scale_lb);
  }
};

// p, buf <- torch.optim.SGD's update with the extrapolated gradient.
struct SgdOp {
  SgdHyper hyper;
  float scale_b, scale_lb;
  DeviceScalars in_memory;

  __device__ SgdOp for_tensor(const NoExtra&) const {
    SgdOp op = *this;
    if (in_memory.lr) op.hyper.lr = static_cast<float>(*in_memory.lr);
    in_memory.load_scales(op.scale_b, op.scale_lb);
    return op;
  }
  __device__ __forceinline__ void operator()(float (&x)[kSgdStreams]) const {
    const float g = extrapolated_grad(x[kSgdGradB], x[kSgdGradLb], scale_b, scale_lb);
    sgd_update(x[kSgdParam], x[kSgdMomentumBuffer], g, hyper);
  }
  __device__ void finish() const {}
};

// p, m, v, vmax <- torch.optim.Adam/AdamW's update with the extrapolated gradient. The
// per-tensor bias corrections come from the tensor's step count, read from device memory (the
// step was already incremented by increment_steps in the same stream), so a step needs no host
// sync and a captured CUDA graph advances the count on every replay.
struct AdamOp {
  AdamHyper hyper;  // step_size and bias_correction2_sqrt: set per tensor by for_tensor
  double lr, beta1, beta2, weight_decay;
  float scale_b, scale_lb;
  DeviceScalars in_memory;

  __device__ AdamOp for_tensor(const float* const& step) const {
    AdamOp op = *this;
    if (in_memory.lr) {
      op.lr = *in_memory.lr;
      op.hyper.decay_factor = adamw_decay_factor(op.lr, weight_decay);
    }
    in_memory.load_scales(op.scale_b, op.scale_lb);
    set_bias_corrections(op.hyper, op.lr, beta1, beta2, static_cast<double>(*step));
    return op;
  }
  __device__ __forceinline__ void operator()(float (&x)[kAdamStreams]) const {
    const float g = extrapolated_grad(x[kAdamGradB], x[kAdamGradLb], scale_b, scale_lb);
    adam_update(x[kAdamParam], x[kAdamExpAvg], x[kAdamExpAvgSq], x[kAdamMaxExpAvgSq], g, hyper);
  }
  __device__ void finish() const {}
};

// out <- the extrapolated gradient.
struct ExtrapolateOp {
  float scale_b, scale_lb;
  DeviceScalars in_memory;

  __device__ ExtrapolateOp for_tensor(const NoExtra&) const {
    ExtrapolateOp op = *this;
    in_memory.load_scales(op.scale_b, op.scale_lb);
    return op;
  }
  __device__ __forceinline__ void operator()(float (&x)[kExtrapolateStreams]) const {
    x[kExtrapolateOut] =
        extrapolated_grad(x[kExtrapolateGradB], x[kExtrapolateGradLb], scale_b, scale_lb);
  }
  __device__ void finish() const {}
};

// check_finite's scan, one stream: a thread that saw inf or NaN stores 1 into found_inf when
// done (every such store writes the same value, so the race between them is harmless).
struct NonfiniteScanOp {
  float* found_inf;
  bool found = false;

  __device__ NonfiniteScanOp for_tensor(const NoExtra&) const { return *this; }
  __device__ __forceinline__ void operator()(float (&x)[1]) { found = found || !isfinite(x[0]); }
  __device__ void finish() const {
    if (found) *found_inf = 1.0f;
  }
};

}  // namespace gerne::cuda
