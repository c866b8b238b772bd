// gerne_kernels::sgd_step_ on the CPU: the extrapolated gradient and torch.optim.SGD's update
// in one pass. Per element, with g = scale_lb * g_lb + scale_b * g_b (gerne_math.h):
//     reads  p, g_b, g_lb, buf (buf not on the first step)    writes p, buf
// which is 24 bytes per float32 parameter with momentum and 16 without it.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "arg_checks.h"
#include "finite_scan.h"
#include "gerne_math.h"
#include "multi_tensor_cpu.h"

namespace gerne::cpu {
namespace {

constexpr const char* kOp = "gerne_kernels::sgd_step_ (cpu)";

// Streams per tensor: the parameter, its momentum buffer, then the two gradients.
enum SgdStream { kParam, kBuffer, kGradB, kGradLb, kSgdStreams };

struct SgdOp {
  SgdHyper hyper;
  float scale_b, scale_lb;

  template <typename V>
  void operator()(V* v) const {
    sgd_update(v[kParam], v[kBuffer], extrapolated_grad(v[kGradB], v[kGradLb], scale_b, scale_lb),
               hyper);
  }
};

void sgd_step_cpu(at::TensorList params, at::TensorList grads_b, at::TensorList grads_lb,
                  at::TensorList momentum_buffers, const at::Tensor& found_inf, double lr,
                  double momentum, double dampening, bool nesterov, double weight_decay,
                  bool maximize, bool is_first_step, double scale_b, double scale_lb,
                  bool check_finite) {
  const bool has_buffer = momentum != 0.0;
  check_found_inf(kOp, found_inf, at::kCPU);
  check_leading_list(kOp, "params", params, at::kCPU);
  check_matching_list(kOp, "grads_b", grads_b, "params", params, at::kCPU);
  check_matching_list(kOp, "grads_lb", grads_lb, "params", params, at::kCPU);
  if (has_buffer) {
    check_matching_list(kOp, "momentum_buffers", momentum_buffers, "params", params,
                        at::kCPU);
  }
  if (params.empty() || skip_step(found_inf, check_finite, grads_b, grads_lb)) return;

  // Complements in double, rounded once to float, as torch.optim computes them in Python.
  const SgdHyper hyper = make_sgd_hyper(lr, momentum, dampening, weight_decay, nesterov,
                                        maximize, is_first_step);
  const SgdOp op{hyper, static_cast<float>(scale_b), static_cast<float>(scale_lb)};
  std::vector<int64_t> numels;
  for (const at::Tensor& p : params) numels.push_back(p.numel());

  dispatch_fused_dtype(params[0].scalar_type(), kOp, [&](auto tag) {
    using scalar_t = decltype(tag);
    std::vector<Streams<scalar_t, kSgdStreams>> streams(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      auto& s = streams[i];
      s.write[kParam] = params[i].mutable_data_ptr<scalar_t>();
      s.read[kParam] = s.write[kParam];
      s.read[kGradB] = grads_b[i].const_data_ptr<scalar_t>();
      s.read[kGradLb] = grads_lb[i].const_data_ptr<scalar_t>();
      if (has_buffer) {
        s.write[kBuffer] = momentum_buffers[i].mutable_data_ptr<scalar_t>();
        if (!is_first_step) s.read[kBuffer] = s.write[kBuffer];  // buf = g on the first step
      }
    }
    multi_tensor_apply(streams, numels, [&](int64_t) { return op; });
  });
}

// The .tensor overload: lr and the scales as CPU tensors, read here.
void sgd_step_cpu_tensor(at::TensorList params, at::TensorList grads_b, at::TensorList grads_lb,
                         at::TensorList momentum_buffers, const at::Tensor& found_inf,
                         const at::Tensor& lr, double momentum, double dampening, bool nesterov,
                         double weight_decay, bool maximize, bool is_first_step,
                         const at::Tensor& scale_b, const at::Tensor& scale_lb,
                         bool check_finite) {
  sgd_step_cpu(params, grads_b, grads_lb, momentum_buffers, found_inf, host_scalar(kOp, "lr", lr),
               momentum, dampening, nesterov, weight_decay, maximize, is_first_step,
               host_scalar(kOp, "scale_b", scale_b), host_scalar(kOp, "scale_lb", scale_lb),
               check_finite);
}

}  // namespace

TORCH_LIBRARY_IMPL(gerne_kernels, CPU, m) {
  m.impl("sgd_step_", &sgd_step_cpu);
  m.impl("sgd_step_.tensor", &sgd_step_cpu_tensor);
}

}  // namespace gerne::cpu
