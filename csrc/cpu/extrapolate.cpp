// gerne_kernels::extrapolate_ on the CPU: out = scale_lb * g_lb + scale_b * g_b in one pass,
// for the wrapper around optimizers without a fused GERNE step. Per element:
//     reads g_b, g_lb    writes out (which may be g_lb itself)
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "arg_checks.h"
#include "finite_scan.h"
#include "gerne_math.h"
#include "multi_tensor_cpu.h"

namespace gerne::cpu {
namespace {

constexpr const char* kOp = "gerne_kernels::extrapolate_ (cpu)";

enum ExtrapolateStream { kOut, kGradB, kGradLb, kExtrapolateStreams };

struct ExtrapolateOp {
  float scale_b, scale_lb;

  template <typename V>
  void operator()(V* v) const {
    v[kOut] = extrapolated_grad(v[kGradB], v[kGradLb], scale_b, scale_lb);
  }
};

void extrapolate_cpu(at::TensorList out, at::TensorList grads_b, at::TensorList grads_lb,
                     const at::Tensor& found_inf, double scale_b, double scale_lb,
                     bool check_finite) {
  check_found_inf(kOp, found_inf, at::kCPU);
  check_leading_list(kOp, "out", out, at::kCPU);
  check_matching_list(kOp, "grads_b", grads_b, "out", out, at::kCPU);
  check_matching_list(kOp, "grads_lb", grads_lb, "out", out, at::kCPU);
  if (out.empty() || skip_step(found_inf, check_finite, grads_b, grads_lb)) return;

  const ExtrapolateOp op{static_cast<float>(scale_b), static_cast<float>(scale_lb)};
  std::vector<int64_t> numels;
  for (const at::Tensor& o : out) numels.push_back(o.numel());

  dispatch_fused_dtype(out[0].scalar_type(), kOp, [&](auto tag) {
    using scalar_t = decltype(tag);
    std::vector<Streams<scalar_t, kExtrapolateStreams>> streams(out.size());
    for (size_t i = 0; i < out.size(); ++i) {
      streams[i].write[kOut] = out[i].mutable_data_ptr<scalar_t>();
      streams[i].read[kGradB] = grads_b[i].const_data_ptr<scalar_t>();
      streams[i].read[kGradLb] = grads_lb[i].const_data_ptr<scalar_t>();
    }
    multi_tensor_apply(streams, numels, [&](int64_t) { return op; });
  });
}

// The .tensor overload: the scales as CPU tensors, read here.
void extrapolate_cpu_tensor(at::TensorList out, at::TensorList grads_b, at::TensorList grads_lb,
                            const at::Tensor& found_inf, const at::Tensor& scale_b,
                            const at::Tensor& scale_lb, bool check_finite) {
  extrapolate_cpu(out, grads_b, grads_lb, found_inf, host_scalar(kOp, "scale_b", scale_b),
                  host_scalar(kOp, "scale_lb", scale_lb), check_finite);
}

}  // namespace

TORCH_LIBRARY_IMPL(gerne_kernels, CPU, m) {
  m.impl("extrapolate_", &extrapolate_cpu);
  m.impl("extrapolate_.tensor", &extrapolate_cpu_tensor);
}

}  // namespace gerne::cpu
