// gerne_kernels::sgd_step_, adam_step_ and extrapolate_ on CUDA devices.
//
// Per element, with g = scale_lb * g_lb + scale_b * g_b (gerne_math.h):
//     sgd_step_:    reads p, g_b, g_lb, buf (not on the first step)     writes p, buf
//     adam_step_:   reads p, g_b, g_lb, m, v (vmax with amsgrad)         writes p, m, v (vmax)
//     extrapolate_: reads g_b, g_lb                                      writes out
//
// Launches per call, for up to a table's worth of tensors (multi_tensor_apply.cuh: ~460 for
// Adam, ~700 for SGD): check_finite's scan (1), Adam's step counts (1), the update (1). Nothing
// waits for the device: found_inf and the step counts are read and written on the device, so a
// call never forces a host sync and can be captured in a CUDA graph (torch.optim's
// capturable=True behaviour, always on). The .tensor overloads take lr, scale_b and scale_lb as
// tensors: on the call's device the kernel reads them (a captured graph then follows their
// current values); the other hyperparameters are fixed floats of the schema.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "arg_checks.h"
#include "fused_dtypes.h"
#include "gerne_math.h"
#include "multi_tensor_apply.cuh"
#include "step_count.cuh"
#include "update_ops.cuh"

namespace gerne::cuda {
namespace {

constexpr const char* kSgdOp = "gerne_kernels::sgd_step_ (cuda)";
constexpr const char* kAdamOp = "gerne_kernels::adam_step_ (cuda)";
constexpr const char* kExtrapolateOp = "gerne_kernels::extrapolate_ (cuda)";

// The CUDA device the call runs on: found_inf's, else that of the first CUDA tensor of the
// leading list (the dispatcher sends a call here when any argument is a CUDA tensor). The
// argument checks then require every tensor on it.
at::Device call_device(const char* op, const at::Tensor& found_inf, const char* leading_name,
                       at::TensorList leading) {
  if (found_inf.defined() && found_inf.is_cuda()) return found_inf.device();
  for (const at::Tensor& t : leading) {
    if (t.defined() && t.is_cuda()) return t.device();
  }
  TORCH_CHECK(false, op, ": neither found_inf nor ", leading_name, " is on a CUDA device; the "
              "cuda backend runs on CUDA tensors (use the cpu backend for CPU tensors)");
}

void* data_of(const at::Tensor& t) { return t.data_ptr(); }

// lr, scale_b and scale_lb of one call. By value: the default overload's floats, or .tensor
// scalars that lie on the CPU. In device memory: .tensor scalars on the call's device, as
// float64 copies (no copy when already float64) that the kernel reads; never the host.
struct CallScalars {
  double lr = 0.0, scale_b = 0.0, scale_lb = 0.0;
  DeviceScalars in_memory;
  std::vector<at::Tensor> keep_alive;  // the float64 copies, until the launches are queued
};

CallScalars by_value(double lr, double scale_b, double scale_lb) {
  CallScalars s;
  s.lr = lr;
  s.scale_b = scale_b;
  s.scale_lb = scale_lb;
  return s;
}

// One .tensor scalar into `value` (CPU tensor) or `in_memory` (device tensor).
void take_scalar(const char* op, const char* name, const at::Tensor& t, const at::Device& device,
                 CallScalars& s, double& value, const double*& in_memory) {
  check_scalar_tensor(op, name, t, device);
  if (t.is_cpu()) {
    value = t.item<double>();
    return;
  }
  at::Tensor as_double = t.to(at::kDouble).contiguous();
  in_memory = as_double.const_data_ptr<double>();
  s.keep_alive.push_back(std::move(as_double));
}

// lr is null for extrapolate_, which has none.
CallScalars from_tensors(const char* op, const at::Device& device, const at::Tensor* lr,
                         const at::Tensor& scale_b, const at::Tensor& scale_lb) {
  CallScalars s;
  if (lr != nullptr) take_scalar(op, "lr", *lr, device, s, s.lr, s.in_memory.lr);
  take_scalar(op, "scale_b", scale_b, device, s, s.scale_b, s.in_memory.scale_b);
  take_scalar(op, "scale_lb", scale_lb, device, s, s.scale_lb, s.in_memory.scale_lb);
  return s;
}

// multi_tensor_apply with scalar_t the C++ type of dtype.
template <int N, typename Extra, typename Op>
void apply_in_dtype(c10::ScalarType dtype, const char* op_name,
                    const std::vector<TensorEntry<N, Extra>>& entries, uint32_t reads,
                    uint32_t writes, const Op& op, const float* found_inf) {
  dispatch_fused_dtype(dtype, op_name, [&](auto tag) {
    multi_tensor_apply<decltype(tag)>(entries, reads, writes, op, found_inf);
  });
}

// check_finite: one launch scans both gradient lists and sets found_inf to 1 if any element is
// inf or NaN; the launches after it, in stream order, then see found_inf != 0 and do nothing.
void scan_nonfinite(const char* op_name, at::TensorList grads_b, at::TensorList grads_lb,
                    const at::Tensor& found_inf) {
  if (grads_b.empty()) return;
  float* found = found_inf.data_ptr<float>();
  std::vector<TensorEntry<1>> entries;
  for (at::TensorList list : {grads_b, grads_lb}) {
    for (const at::Tensor& g : list) entries.push_back({{data_of(g)}, g.numel()});
  }
  apply_in_dtype(grads_b[0].scalar_type(), op_name, entries, stream_bit(0), 0u,
                 NonfiniteScanOp{found}, found);
}

// Both overloads, once the device and the scalars are known.
void sgd_step(const at::Device& device, at::TensorList params, at::TensorList grads_b,
              at::TensorList grads_lb, at::TensorList momentum_buffers,
              const at::Tensor& found_inf, const CallScalars& scalars, double momentum,
              double dampening, bool nesterov, double weight_decay, bool maximize,
              bool is_first_step, bool check_finite) {
  const bool has_buffer = momentum != 0.0;
  check_found_inf(kSgdOp, found_inf, device);
  check_leading_list(kSgdOp, "params", params, device);
  check_matching_list(kSgdOp, "grads_b", grads_b, "params", params, device);
  check_matching_list(kSgdOp, "grads_lb", grads_lb, "params", params, device);
  if (has_buffer) {
    check_matching_list(kSgdOp, "momentum_buffers", momentum_buffers, "params", params, device);
  }
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(device);
  if (check_finite) scan_nonfinite(kSgdOp, grads_b, grads_lb, found_inf);

  const SgdOp op{make_sgd_hyper(scalars.lr, momentum, dampening, weight_decay, nesterov,
                                maximize, is_first_step),
                 static_cast<float>(scalars.scale_b), static_cast<float>(scalars.scale_lb),
                 scalars.in_memory};
  uint32_t reads = stream_bit(kSgdParam) | stream_bit(kSgdGradB) | stream_bit(kSgdGradLb);
  uint32_t writes = stream_bit(kSgdParam);
  if (has_buffer) {
    writes |= stream_bit(kSgdMomentumBuffer);
    if (!is_first_step) reads |= stream_bit(kSgdMomentumBuffer);  // buf = g on the first step
  }
  std::vector<TensorEntry<kSgdStreams>> entries(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    auto& e = entries[i];
    e.data[kSgdParam] = data_of(params[i]);
    e.data[kSgdGradB] = data_of(grads_b[i]);
    e.data[kSgdGradLb] = data_of(grads_lb[i]);
    if (has_buffer) e.data[kSgdMomentumBuffer] = data_of(momentum_buffers[i]);
    e.numel = params[i].numel();
  }
  apply_in_dtype(params[0].scalar_type(), kSgdOp, entries, reads, writes, op,
                 found_inf.data_ptr<float>());
}

// Both overloads, once the device and the scalars are known.
void adam_step(const at::Device& device, at::TensorList params, at::TensorList grads_b,
               at::TensorList grads_lb, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
               const at::Tensor& found_inf, const CallScalars& scalars, double beta1,
               double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
               bool decoupled_weight_decay, bool check_finite) {
  check_found_inf(kAdamOp, found_inf, device);
  check_leading_list(kAdamOp, "params", params, device);
  check_matching_list(kAdamOp, "grads_b", grads_b, "params", params, device);
  check_matching_list(kAdamOp, "grads_lb", grads_lb, "params", params, device);
  check_matching_list(kAdamOp, "exp_avgs", exp_avgs, "params", params, device);
  check_matching_list(kAdamOp, "exp_avg_sqs", exp_avg_sqs, "params", params, device);
  if (amsgrad) {
    check_matching_list(kAdamOp, "max_exp_avg_sqs", max_exp_avg_sqs, "params", params, device);
  }
  // float32 only: the kernels read and increment the counts as floats on the device.
  check_step_counters(kAdamOp, state_steps, params, device, /*allow_float64=*/false);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(device);
  const float* found = found_inf.data_ptr<float>();
  if (check_finite) scan_nonfinite(kAdamOp, grads_b, grads_lb, found_inf);

  // Every counter advances, empty tensors' too, as in the reference; then the update reads them.
  std::vector<float*> steps;
  steps.reserve(state_steps.size());
  for (const at::Tensor& s : state_steps) steps.push_back(s.data_ptr<float>());
  increment_steps(steps, found);

  const AdamOp op{make_adam_hyper(scalars.lr, beta1, beta2, eps, weight_decay, amsgrad,
                                  maximize, decoupled_weight_decay),
                  scalars.lr, beta1, beta2, weight_decay,
                  static_cast<float>(scalars.scale_b), static_cast<float>(scalars.scale_lb),
                  scalars.in_memory};
  uint32_t state = stream_bit(kAdamParam) | stream_bit(kAdamExpAvg) | stream_bit(kAdamExpAvgSq);
  if (amsgrad) state |= stream_bit(kAdamMaxExpAvgSq);
  const uint32_t reads = state | stream_bit(kAdamGradB) | stream_bit(kAdamGradLb);
  std::vector<TensorEntry<kAdamStreams, const float*>> entries(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    auto& e = entries[i];
    e.data[kAdamParam] = data_of(params[i]);
    e.data[kAdamGradB] = data_of(grads_b[i]);
    e.data[kAdamGradLb] = data_of(grads_lb[i]);
    e.data[kAdamExpAvg] = data_of(exp_avgs[i]);
    e.data[kAdamExpAvgSq] = data_of(exp_avg_sqs[i]);
    if (amsgrad) e.data[kAdamMaxExpAvgSq] = data_of(max_exp_avg_sqs[i]);
    e.numel = params[i].numel();
    e.extra = steps[i];
  }
  apply_in_dtype(params[0].scalar_type(), kAdamOp, entries, reads, state, op, found);
}

// Both overloads, once the device and the scalars are known.
void extrapolate(const at::Device& device, at::TensorList out, at::TensorList grads_b,
                 at::TensorList grads_lb, const at::Tensor& found_inf,
                 const CallScalars& scalars, bool check_finite) {
  check_found_inf(kExtrapolateOp, found_inf, device);
  check_leading_list(kExtrapolateOp, "out", out, device);
  check_matching_list(kExtrapolateOp, "grads_b", grads_b, "out", out, device);
  check_matching_list(kExtrapolateOp, "grads_lb", grads_lb, "out", out, device);
  if (out.empty()) return;
  const c10::cuda::CUDAGuard guard(device);
  if (check_finite) scan_nonfinite(kExtrapolateOp, grads_b, grads_lb, found_inf);

  std::vector<TensorEntry<kExtrapolateStreams>> entries(out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    auto& e = entries[i];
    e.data[kExtrapolateOut] = data_of(out[i]);
    e.data[kExtrapolateGradB] = data_of(grads_b[i]);
    e.data[kExtrapolateGradLb] = data_of(grads_lb[i]);
    e.numel = out[i].numel();
  }
  const uint32_t reads = stream_bit(kExtrapolateGradB) | stream_bit(kExtrapolateGradLb);
  const ExtrapolateOp op{static_cast<float>(scalars.scale_b),
                         static_cast<float>(scalars.scale_lb), scalars.in_memory};
  apply_in_dtype(out[0].scalar_type(), kExtrapolateOp, entries, reads,
                 stream_bit(kExtrapolateOut), op, found_inf.data_ptr<float>());
}

// The entry points of the two overloads of each op.

void sgd_step_cuda(at::TensorList params, at::TensorList grads_b, at::TensorList grads_lb,
                   at::TensorList momentum_buffers, const at::Tensor& found_inf, double lr,
                   double momentum, double dampening, bool nesterov, double weight_decay,
                   bool maximize, bool is_first_step, double scale_b, double scale_lb,
                   bool check_finite) {
  sgd_step(call_device(kSgdOp, found_inf, "params", params), params, grads_b, grads_lb,
           momentum_buffers, found_inf, by_value(lr, scale_b, scale_lb), momentum, dampening,
           nesterov, weight_decay, maximize, is_first_step, check_finite);
}

void sgd_step_cuda_tensor(at::TensorList params, at::TensorList grads_b, at::TensorList grads_lb,
                          at::TensorList momentum_buffers, const at::Tensor& found_inf,
                          const at::Tensor& lr, double momentum, double dampening,
                          bool nesterov, double weight_decay, bool maximize, bool is_first_step,
                          const at::Tensor& scale_b, const at::Tensor& scale_lb,
                          bool check_finite) {
  const at::Device device = call_device(kSgdOp, found_inf, "params", params);
  sgd_step(device, params, grads_b, grads_lb, momentum_buffers, found_inf,
           from_tensors(kSgdOp, device, &lr, scale_b, scale_lb), momentum, dampening, nesterov,
           weight_decay, maximize, is_first_step, check_finite);
}

void adam_step_cuda(at::TensorList params, at::TensorList grads_b, at::TensorList grads_lb,
                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                    const at::Tensor& found_inf, double lr, double beta1, double beta2,
                    double eps, double weight_decay, bool amsgrad, bool maximize,
                    bool decoupled_weight_decay, double scale_b, double scale_lb,
                    bool check_finite) {
  adam_step(call_device(kAdamOp, found_inf, "params", params), params, grads_b, grads_lb,
            exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, found_inf,
            by_value(lr, scale_b, scale_lb), beta1, beta2, eps, weight_decay, amsgrad, maximize,
            decoupled_weight_decay, check_finite);
}

void adam_step_cuda_tensor(at::TensorList params, at::TensorList grads_b,
                           at::TensorList grads_lb, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                           at::TensorList state_steps, const at::Tensor& found_inf,
                           const at::Tensor& lr, double beta1, double beta2, double eps,
                           double weight_decay, bool amsgrad, bool maximize,
                           bool decoupled_weight_decay, const at::Tensor& scale_b,
                           const at::Tensor& scale_lb, bool check_finite) {
  const at::Device device = call_device(kAdamOp, found_inf, "params", params);
  adam_step(device, params, grads_b, grads_lb, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
            state_steps, found_inf, from_tensors(kAdamOp, device, &lr, scale_b, scale_lb), beta1,
            beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, check_finite);
}

void extrapolate_cuda(at::TensorList out, at::TensorList grads_b, at::TensorList grads_lb,
                      const at::Tensor& found_inf, double scale_b, double scale_lb,
                      bool check_finite) {
  extrapolate(call_device(kExtrapolateOp, found_inf, "out", out), out, grads_b, grads_lb,
              found_inf, by_value(0.0, scale_b, scale_lb), check_finite);
}

void extrapolate_cuda_tensor(at::TensorList out, at::TensorList grads_b, at::TensorList grads_lb,
                             const at::Tensor& found_inf, const at::Tensor& scale_b,
                             const at::Tensor& scale_lb, bool check_finite) {
  const at::Device device = call_device(kExtrapolateOp, found_inf, "out", out);
  extrapolate(device, out, grads_b, grads_lb, found_inf,
              from_tensors(kExtrapolateOp, device, nullptr, scale_b, scale_lb), check_finite);
}

}  // namespace

TORCH_LIBRARY_IMPL(gerne_kernels, CUDA, m) {
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("sgd_step_.tensor", &sgd_step_cuda_tensor);
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("adam_step_.tensor", &adam_step_cuda_tensor);
  m.impl("extrapolate_", &extrapolate_cuda);
  m.impl("extrapolate_.tensor", &extrapolate_cuda_tensor);
}

}  // namespace gerne::cuda
