// gerne_kernels::extrapolate_: out = scale_lb * g_lb + scale_b * g_b in one pass, for the wrapper
// around optimizers without a fused GERNE step. Per element (gerne_math.h: extrapolated_grad):
//     reads g_b, g_lb    writes out (which may be g_lb itself: each element is read before it is
//                        written, by the same thread)
#pragma once

#include <ATen/core/Tensor.h>

#include "op_api.h"

namespace gerne {
namespace {

struct Extrapolate : UpdateOp {
  static constexpr const char* kName = "extrapolate_";
  enum Value { kOut, kGradB, kGradLb, kStreams, kValues = kStreams };
  static constexpr StreamArg kArgs[kStreams] = {
      {"out", Use::kWrite}, {"grads_b", Use::kRead}, {"grads_lb", Use::kRead}};

  Extrapolation grad;

  GERNE_HD Extrapolate resolved(const CallScalars& s, const NoState&) const {
    Extrapolate op = *this;
    op.grad.set(s);
    return op;
  }
  template <typename T>
  GERNE_HD void operator()(T (&v)[kValues]) const {
    v[kOut] = grad(v[kGradB], v[kGradLb]);
  }
};

template <typename Scalar>
void extrapolate(at::TensorList out, at::TensorList grads_b, at::TensorList grads_lb,
                 const at::Tensor& found_inf, Scalar scale_b, Scalar scale_lb) {
  Call<Extrapolate> call({out, grads_b, grads_lb}, found_inf);
  call.set_scales(scale_b, scale_lb);
  call.run(Extrapolate{});
}

}  // namespace

GERNE_LIBRARY_IMPL(m) {
  m.impl("extrapolate_", &extrapolate<double>);
  m.impl("extrapolate_.tensor", &extrapolate<at::Tensor>);
}

}  // namespace gerne
