// gerne_kernels::sgd_step_: the extrapolated gradient and torch.optim.SGD's update in one pass.
// Per element, with g = scale_lb * g_lb + scale_b * g_b (gerne_math.h: extrapolated_grad,
// sgd_update):
//     reads  p, g_b, g_lb, buf (buf not on the first step)    writes p, buf
// which is 24 bytes per float32 parameter with momentum and 16 without it.
#pragma once

#include <ATen/core/Tensor.h>

#include "op_api.h"

namespace gerne {
namespace {

struct SgdStep : UpdateOp {
  static constexpr const char* kName = "sgd_step_";
  enum Value { kParam, kGradB, kGradLb, kBuffer, kStreams, kValues = kStreams };
  static constexpr StreamArg kArgs[kStreams] = {{"params", Use::kReadWrite},
                                                {"grads_b", Use::kRead},
                                                {"grads_lb", Use::kRead},
                                                {"momentum_buffers", Use::kReadWrite}};

  SgdHyper hyper;
  Extrapolation grad;

  GERNE_HD SgdStep resolved(const CallScalars& s, const NoState&) const {
    SgdStep op = *this;
    op.hyper.lr = static_cast<float>(s.lr);
    op.grad.set(s);
    return op;
  }
  template <typename T>
  GERNE_HD void operator()(T (&v)[kValues]) const {
    sgd_update(v[kParam], v[kBuffer], grad(v[kGradB], v[kGradLb]), hyper);
  }
};

template <typename Scalar>
void sgd_step(at::TensorList params, at::TensorList grads_b, at::TensorList grads_lb,
              at::TensorList momentum_buffers, const at::Tensor& found_inf, Scalar lr,
              double momentum, double dampening, bool nesterov, double weight_decay,
              bool maximize, bool is_first_step, Scalar scale_b, Scalar scale_lb) {
  Call<SgdStep> call({params, grads_b, grads_lb, momentum_buffers}, found_inf);
  if (momentum == 0.0) {
    call.use(SgdStep::kBuffer, Use::kUnused);
  } else if (is_first_step) {
    call.use(SgdStep::kBuffer, Use::kWrite);  // buf = g on the first step
  }
  call.set_scalars(lr, scale_b, scale_lb);
  SgdStep op{};
  op.hyper = make_sgd_hyper(momentum, dampening, weight_decay, nesterov, maximize, is_first_step);
  call.run(op);
}

}  // namespace

GERNE_LIBRARY_IMPL(m) {
  m.impl("sgd_step_", &sgd_step<double>);
  m.impl("sgd_step_.tensor", &sgd_step<at::Tensor>);
}

}  // namespace gerne
