// gerne_kernels::adam_step_ on the CPU: the extrapolated gradient and torch.optim.Adam's
// (decoupled_weight_decay = false) or AdamW's (true) update in one pass. Per element:
//     reads  p, g_b, g_lb, m, v (vmax with amsgrad)    writes p, m, v (vmax)
// which is 32 bytes per float32 parameter, 40 with amsgrad.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "arg_checks.h"
#include "finite_scan.h"
#include "gerne_math.h"
#include "multi_tensor_cpu.h"

namespace gerne::cpu {
namespace {

constexpr const char* kOp = "gerne_kernels::adam_step_ (cpu)";

enum AdamStream { kParam, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kGradB, kGradLb, kAdamStreams };

struct AdamOp {
  AdamHyper hyper;
  float scale_b, scale_lb;

  template <typename V>
  void operator()(V* v) const {
    adam_update(v[kParam], v[kExpAvg], v[kExpAvgSq], v[kMaxExpAvgSq],
                extrapolated_grad(v[kGradB], v[kGradLb], scale_b, scale_lb), hyper);
  }
};

// Adds one to a step counter and returns the new count as torch reads it back: computed in the
// counter's own dtype (float32 normally), then widened to double.
double increment_step(const at::Tensor& step) {
  if (step.scalar_type() == at::kDouble) {
    double* count = step.mutable_data_ptr<double>();
    *count += 1.0;
    return *count;
  }
  float* count = step.mutable_data_ptr<float>();
  *count += 1.0f;
  return static_cast<double>(*count);
}

void adam_step_cpu(at::TensorList params, at::TensorList grads_b, at::TensorList grads_lb,
                   at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                   const at::Tensor& found_inf, double lr, double beta1, double beta2, double eps,
                   double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                   double scale_b, double scale_lb, bool check_finite) {
  check_found_inf(kOp, found_inf, at::kCPU);
  check_leading_list(kOp, "params", params, at::kCPU);
  check_matching_list(kOp, "grads_b", grads_b, "params", params, at::kCPU);
  check_matching_list(kOp, "grads_lb", grads_lb, "params", params, at::kCPU);
  check_matching_list(kOp, "exp_avgs", exp_avgs, "params", params, at::kCPU);
  check_matching_list(kOp, "exp_avg_sqs", exp_avg_sqs, "params", params, at::kCPU);
  if (amsgrad) {
    check_matching_list(kOp, "max_exp_avg_sqs", max_exp_avg_sqs, "params", params, at::kCPU);
  }
  check_step_counters(kOp, state_steps, params, at::kCPU, /*allow_float64=*/true);
  if (params.empty() || skip_step(found_inf, check_finite, grads_b, grads_lb)) return;

  // Host-side scalars in double, rounded once to float, as torch.optim computes them in Python;
  // the bias corrections per tensor from its incremented step count t.
  const AdamHyper common = make_adam_hyper(lr, beta1, beta2, eps, weight_decay, amsgrad,
                                           maximize, decoupled_weight_decay);
  std::vector<AdamOp> ops(params.size(), AdamOp{common, static_cast<float>(scale_b),
                                                 static_cast<float>(scale_lb)});
  std::vector<int64_t> numels;
  for (size_t i = 0; i < params.size(); ++i) {
    set_bias_corrections(ops[i].hyper, lr, beta1, beta2, increment_step(state_steps[i]));
    numels.push_back(params[i].numel());
  }

  dispatch_fused_dtype(params[0].scalar_type(), kOp, [&](auto tag) {
    using scalar_t = decltype(tag);
    std::vector<Streams<scalar_t, kAdamStreams>> streams(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      auto& s = streams[i];
      s.write[kParam] = params[i].mutable_data_ptr<scalar_t>();
      s.write[kExpAvg] = exp_avgs[i].mutable_data_ptr<scalar_t>();
      s.write[kExpAvgSq] = exp_avg_sqs[i].mutable_data_ptr<scalar_t>();
      if (amsgrad) s.write[kMaxExpAvgSq] = max_exp_avg_sqs[i].mutable_data_ptr<scalar_t>();
      for (int j : {kParam, kExpAvg, kExpAvgSq, kMaxExpAvgSq}) s.read[j] = s.write[j];
      s.read[kGradB] = grads_b[i].const_data_ptr<scalar_t>();
      s.read[kGradLb] = grads_lb[i].const_data_ptr<scalar_t>();
    }
    multi_tensor_apply(streams, numels, [&](int64_t t) { return ops[t]; });
  });
}

// The .tensor overload: lr and the scales as CPU tensors, read here.
void adam_step_cpu_tensor(at::TensorList params, at::TensorList grads_b, at::TensorList grads_lb,
                          at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                          at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                          const at::Tensor& found_inf, const at::Tensor& lr, double beta1,
                          double beta2, double eps, double weight_decay, bool amsgrad,
                          bool maximize, bool decoupled_weight_decay, const at::Tensor& scale_b,
                          const at::Tensor& scale_lb, bool check_finite) {
  adam_step_cpu(params, grads_b, grads_lb, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                found_inf, host_scalar(kOp, "lr", lr), beta1, beta2, eps, weight_decay, amsgrad,
                maximize, decoupled_weight_decay, host_scalar(kOp, "scale_b", scale_b),
                host_scalar(kOp, "scale_lb", scale_lb), check_finite);
}

}  // namespace

TORCH_LIBRARY_IMPL(gerne_kernels, CPU, m) {
  m.impl("adam_step_", &adam_step_cpu);
  m.impl("adam_step_.tensor", &adam_step_cpu_tensor);
}

}  // namespace gerne::cpu
