// Argument checks of the fused ops, shared by the backends: each call runs on one device (the
// CPU, or found_inf's CUDA device) and each failure raises (TORCH_CHECK) with a message that
// names the op, the argument and its index, and says how to fix the call. Host code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "fused_dtypes.h"

namespace gerne {

// found_inf: a float32 tensor with one element, on the device the call runs on.
inline void check_found_inf(const char* op, const at::Tensor& found_inf,
                            const at::Device& device) {
  TORCH_CHECK(found_inf.defined(), op, ": found_inf is an undefined tensor");
  TORCH_CHECK(found_inf.device() == device && found_inf.scalar_type() == at::kFloat &&
                  found_inf.numel() == 1,
              op, ": found_inf must be a float32 tensor with one element on ", device, ", got ",
              found_inf.scalar_type(), " of shape ", found_inf.sizes(), " on ",
              found_inf.device(), "; pass torch.zeros((), dtype=torch.float32, device=",
              "params[0].device)");
}

inline void check_placed_contiguous(const char* op, const char* name, size_t i,
                                    const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is an undefined tensor");
  TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(),
              " but this call runs on ", device, "; every tensor of a call must be on one "
              "device (use the cpu backend for CPU tensors, cuda or triton for GPU tensors)");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] of shape ", t.sizes(),
              " has strides ", t.strides(), " and is not contiguous; pass t.contiguous() "
              "(the fused kernels walk memory linearly)");
}

// The list that sets the dtype and shapes for the others (params, or out for extrapolate_):
// on `device`, contiguous, one dtype among float32, bfloat16, float16.
inline void check_leading_list(const char* op, const char* name, at::TensorList tensors,
                               const at::Device& device) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    check_placed_contiguous(op, name, i, t, device);
    TORCH_CHECK(is_fused_dtype(t.scalar_type()), op, ": ", name, "[", i, "] has dtype ",
                t.scalar_type(), "; the fused kernels support float32, bfloat16 and float16 "
                "(use the reference backend for other dtypes)");
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(), op, ": ", name, "[", i,
                "] has dtype ", t.scalar_type(), " but ", name, "[0] has ",
                tensors[0].scalar_type(), "; one call takes tensors of one dtype (split the "
                "list by dtype)");
  }
}

// A list that must pair up with the leading one: same length, and tensor i on `device`,
// contiguous, with leading[i]'s dtype and shape.
inline void check_matching_list(const char* op, const char* name, at::TensorList tensors,
                                const char* leading_name, at::TensorList leading,
                                const at::Device& device) {
  TORCH_CHECK(tensors.size() == leading.size(), op, ": ", name, " has ", tensors.size(),
              " tensors but ", leading_name, " has ", leading.size(), "; pass one per ",
              leading_name, " entry");
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    check_placed_contiguous(op, name, i, t, device);
    TORCH_CHECK(t.scalar_type() == leading[i].scalar_type(), op, ": ", name, "[", i,
                "] has dtype ", t.scalar_type(), " but ", leading_name, "[", i, "] has ",
                leading[i].scalar_type(), "; gradients and optimizer state must have their "
                "parameter's dtype");
    TORCH_CHECK(t.sizes() == leading[i].sizes(), op, ": ", name, "[", i, "] has shape ",
                t.sizes(), " but ", leading_name, "[", i, "] has shape ", leading[i].sizes(),
                "; gradients and optimizer state must have their parameter's shape");
  }
}

// Adam's step counters: one per parameter, each a one-element float32 (or float64: torch.optim
// makes float64 steps when the default dtype is float64) tensor on `device`.
inline void check_step_counters(const char* op, at::TensorList state_steps,
                                at::TensorList params, const at::Device& device) {
  TORCH_CHECK(state_steps.size() == params.size(), op, ": state_steps has ",
              state_steps.size(), " tensors but params has ", params.size(),
              "; pass one step counter per parameter");
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const at::Tensor& s = state_steps[i];
    TORCH_CHECK(s.defined(), op, ": state_steps[", i, "] is an undefined tensor");
    const bool dtype_ok = s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble;
    TORCH_CHECK(s.device() == device && s.numel() == 1 && dtype_ok, op, ": state_steps[", i,
                "] must be a one-element float32 tensor on ", device, ", got ",
                s.scalar_type(), " of shape ", s.sizes(), " on ", s.device(),
                "; create it with torch.zeros((), dtype=torch.float32, device=param.device)");
  }
}

// scan_'s optional sums: a contiguous float64 tensor of four elements on `device`.
inline void check_sums(const char* op, const at::Tensor& sums, const at::Device& device) {
  TORCH_CHECK(sums.defined(), op, ": sums is an undefined tensor; pass None instead");
  TORCH_CHECK(sums.device() == device && sums.scalar_type() == at::kDouble &&
                  sums.numel() == 4 && sums.is_contiguous(),
              op, ": sums must be a contiguous float64 tensor of 4 elements on ", device,
              ", got ", sums.scalar_type(), " of shape ", sums.sizes(), " on ", sums.device(),
              "; pass torch.zeros(4, dtype=torch.float64, device=grads_b[0].device), or None");
}

// A scalar of the ops' .tensor overloads (lr, scale_b, scale_lb): a one-element float32 or
// float64 tensor, on `device` (read there by the kernel) or on the CPU (read by the host).
inline void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t,
                                const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  const bool dtype_ok = t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
  TORCH_CHECK(t.numel() == 1 && dtype_ok && (t.device() == device || t.is_cpu()), op, ": ",
              name, " must be a one-element float32 or float64 tensor on ", device,
              " (or on the CPU), got ", t.scalar_type(), " of shape ", t.sizes(), " on ",
              t.device(), "; pass torch.tensor(value, dtype=torch.float64, device=",
              "params[0].device), or a float to the default overload");
}

}  // namespace gerne
