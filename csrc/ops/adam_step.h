// gerne_kernels::adam_step_: the extrapolated gradient and torch.optim.Adam's
// (decoupled_weight_decay = false) or AdamW's (true) update in one pass. Per element
// (gerne_math.h: extrapolated_grad, adam_update):
//     reads  p, g_b, g_lb, m, v (vmax with amsgrad)    writes p, m, v (vmax)
// which is 32 bytes per float32 parameter, 40 with amsgrad. Per tensor, once, before its
// elements (the prologue): its step count t <- t + 1, then (adam_bias_corrections)
//     step_size = lr / (1 - beta1^t),   bias_correction2_sqrt = sqrt(1 - beta2^t)
// Every count advances, empty tensors' too, as in the reference.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "arg_checks.h"
#include "op_api.h"

namespace gerne {
namespace {

// A step counter (a one-element float32 or float64 tensor) as the prologue receives it.
struct StepCount {
  void* address;
  bool is_double;

  // t <- t + 1 in the counter's own dtype; the new count as torch reads it back, as a double.
  GERNE_HD double advance() const {
    if (is_double) {
      double* count = static_cast<double*>(address);
      *count += 1.0;
      return *count;
    }
    float* count = static_cast<float*>(address);
    *count += 1.0f;
    return static_cast<double>(*count);
  }
};

struct AdamStep : UpdateOp {
  static constexpr const char* kName = "adam_step_";
  enum Value {
    kParam, kGradB, kGradLb, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kStreams, kValues = kStreams
  };
  static constexpr StreamArg kArgs[kStreams] = {
      {"params", Use::kReadWrite},   {"grads_b", Use::kRead},
      {"grads_lb", Use::kRead},      {"exp_avgs", Use::kReadWrite},
      {"exp_avg_sqs", Use::kReadWrite}, {"max_exp_avg_sqs", Use::kReadWrite}};
  using TensorInput = StepCount;
  using TensorState = AdamBiasCorrections;

  AdamHyper hyper;
  double beta1, beta2, weight_decay;
  Extrapolation grad;

  GERNE_HD AdamBiasCorrections prologue(const StepCount& step, const CallScalars& s) const {
    return adam_bias_corrections(s.lr, beta1, beta2, step.advance());
  }
  GERNE_HD AdamStep resolved(const CallScalars& s, const AdamBiasCorrections& tensor) const {
    AdamStep op = *this;
    op.hyper.decay_factor = decay_factor(s.lr, weight_decay);
    op.hyper.step_size = tensor.step_size;
    op.hyper.bias_correction2_sqrt = tensor.bias_correction2_sqrt;
    op.grad.set(s);
    return op;
  }
  template <typename T>
  GERNE_HD void operator()(T (&v)[kValues]) const {
    adam_update(v[kParam], v[kExpAvg], v[kExpAvgSq], v[kMaxExpAvgSq], grad(v[kGradB], v[kGradLb]),
                hyper);
  }
};

template <typename Scalar>
void adam_step(at::TensorList params, at::TensorList grads_b, at::TensorList grads_lb,
               at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
               const at::Tensor& found_inf, Scalar lr, double beta1, double beta2, double eps,
               double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
               Scalar scale_b, Scalar scale_lb) {
  Call<AdamStep> call({params, grads_b, grads_lb, exp_avgs, exp_avg_sqs, max_exp_avg_sqs},
                      found_inf);
  if (!amsgrad) call.use(AdamStep::kMaxExpAvgSq, Use::kUnused);
  call.set_scalars(lr, scale_b, scale_lb);
  call.check();
  check_step_counters(call.name(), state_steps, params, call.device());
  std::vector<StepCount> steps;
  steps.reserve(state_steps.size());
  for (const at::Tensor& s : state_steps) {
    steps.push_back(StepCount{s.mutable_data_ptr(), s.scalar_type() == at::kDouble});
  }
  AdamStep op{};
  op.hyper = make_adam_hyper(beta1, beta2, eps, weight_decay, amsgrad, maximize,
                             decoupled_weight_decay);
  op.beta1 = beta1;
  op.beta2 = beta2;
  op.weight_decay = weight_decay;
  call.run(op, steps);
}

}  // namespace

GERNE_LIBRARY_IMPL(m) {
  m.impl("adam_step_", &adam_step<double>);
  m.impl("adam_step_.tensor", &adam_step<at::Tensor>);
}

}  // namespace gerne
