// gerne_kernels::lion_step_: the extrapolated gradient and Lion's update (Chen et al. 2023) in
// one pass. Per element (gerne_math.h: extrapolated_grad_as_reference, lion_update):
//     c = beta1 * m + (1 - beta1) * g;   p = p * (1 - lr * wd) - lr * sign(c);
//     m = beta2 * m + (1 - beta2) * g
//     reads  p, g_b, g_lb, m    writes p, m
// which is 24 bytes per float32 parameter.
#pragma once

#include <ATen/core/Tensor.h>

#include "op_api.h"

namespace gerne {
namespace {

struct LionStep : UpdateOp {
  static constexpr const char* kName = "lion_step_";
  enum Value { kParam, kGradB, kGradLb, kExpAvg, kStreams, kValues = kStreams };
  static constexpr StreamArg kArgs[kStreams] = {{"params", Use::kReadWrite},
                                                {"grads_b", Use::kRead},
                                                {"grads_lb", Use::kRead},
                                                {"exp_avgs", Use::kReadWrite}};

  LionHyper hyper;
  double weight_decay;
  Extrapolation grad;

  GERNE_HD LionStep resolved(const CallScalars& s, const NoState&) const {
    LionStep op = *this;
    op.hyper.lr = static_cast<float>(s.lr);
    op.hyper.decay_factor = decay_factor(s.lr, weight_decay);
    op.grad.set(s);
    return op;
  }
  template <typename T>
  GERNE_HD void operator()(T (&v)[kValues]) const {
    lion_update(v[kParam], v[kExpAvg],
                extrapolated_grad_as_reference(v[kGradB], v[kGradLb], grad.scale_b, grad.scale_lb),
                hyper);
  }
};

template <typename Scalar>
void lion_step(at::TensorList params, at::TensorList grads_b, at::TensorList grads_lb,
               at::TensorList exp_avgs, const at::Tensor& found_inf, Scalar lr, double beta1,
               double beta2, double weight_decay, bool maximize, Scalar scale_b,
               Scalar scale_lb) {
  Call<LionStep> call({params, grads_b, grads_lb, exp_avgs}, found_inf);
  call.set_scalars(lr, scale_b, scale_lb);
  LionStep op{};
  op.hyper = make_lion_hyper(beta1, beta2, weight_decay, maximize);
  op.weight_decay = weight_decay;
  call.run(op);
}

}  // namespace

GERNE_LIBRARY_IMPL(m) {
  m.impl("lion_step_", &lion_step<double>);
  m.impl("lion_step_.tensor", &lion_step<at::Tensor>);
}

}  // namespace gerne
