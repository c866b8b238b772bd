// The device-agnostic half of one call of an op: its tensor lists with this call's use of each,
// found_inf and the lr/scale arguments, and the argument checks, all driven by the op
// description (op_api.h). Each device's Call<Op> (cpu/harness.h, cuda/harness.cuh) derives from
// it and adds the running. Host code only.
//
// Checks, in this order: found_inf, then every used stream: the leading one (stream 0: on the
// call's device, contiguous, one fused dtype) and each other against it (same length, and tensor
// i with the leading tensor i's dtype and shape). The scalars are checked when they are set.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <string>

#include "arg_checks.h"
#include "op_api.h"

namespace gerne {

template <typename Op>
class CallArgs {
 public:
  using Lists = std::array<at::TensorList, Op::kStreams>;

  // device_kind: "cpu" or "cuda", for the messages' "gerne_kernels::<op> (<kind>)".
  CallArgs(const char* device_kind, const at::Device& device, const Lists& lists,
           const at::Tensor& found_inf)
      : name_(qualified_name(device_kind)), device_(device), lists_(lists),
        found_inf_(found_inf) {
    for (int j = 0; j < Op::kStreams; ++j) uses_[j] = Op::kArgs[j].use;
  }

  // "gerne_kernels::<op> (<kind>)": the prefix of every message of this op on this device.
  static const char* qualified_name(const char* device_kind) {
    static const std::string name =
        std::string("gerne_kernels::") + Op::kName + " (" + device_kind + ")";
    return name.c_str();
  }

  const char* name() const { return name_; }
  const at::Device& device() const { return device_; }

  // This call's use of stream j, where it differs from Op::kArgs[j].use.
  void use(int j, Use use) { uses_[j] = use; }

  template <typename Scalar>
  void set_scalars(const Scalar& lr, const Scalar& scale_b, const Scalar& scale_lb) {
    scalars_.lr = scalar_arg("lr", lr);
    set_scales(scale_b, scale_lb);
  }
  template <typename Scalar>
  void set_scales(const Scalar& scale_b, const Scalar& scale_lb) {
    scalars_.scale_b = scalar_arg("scale_b", scale_b);
    scalars_.scale_lb = scalar_arg("scale_lb", scale_lb);
  }

 // Runs the checks (once; run and reduce call it too): an op with checks of its own that must
  // come after those of the lists calls it first.
  void check() {
    if (checked_) return;
    check_found_inf(name_, found_inf_, device_);
    for (int j = 0; j < Op::kStreams; ++j) {
      if (uses_[j] == Use::kUnused) continue;
      if (j == 0) {
        check_leading_list(name_, Op::kArgs[0].name, lists_[0], device_);
      } else {
        check_matching_list(name_, Op::kArgs[j].name, lists_[j], Op::kArgs[0].name, lists_[0],
                            device_);
      }
    }
    checked_ = true;
  }

 protected:
  size_t tensors() const { return lists_[0].size(); }
  const at::Tensor& tensor(int stream, size_t i) const { return lists_[stream][i]; }
  Use use_of(int stream) const { return uses_[stream]; }
  const at::Tensor& found_inf() const { return found_inf_; }
  const ScalarArgs& scalars() const { return scalars_; }

 private:
  ScalarArg scalar_arg(const char*, double value) const {
    ScalarArg arg;
    arg.value = value;
    return arg;
  }
  // A CPU tensor is read here; one on the call's device is left for the kernel to read.
  ScalarArg scalar_arg(const char* arg_name, const at::Tensor& t) const {
    check_scalar_tensor(name_, arg_name, t, device_);
    ScalarArg arg;
    arg.is_double = t.scalar_type() == at::kDouble;
    if (!t.is_cpu()) {
      arg.device_address = t.const_data_ptr();
    } else {
      arg.value = arg.is_double ? *t.const_data_ptr<double>()
                                : static_cast<double>(*t.const_data_ptr<float>());
    }
    return arg;
  }

  const char* name_;
  at::Device device_;
  Lists lists_;
  std::array<Use, Op::kStreams> uses_;
  const at::Tensor& found_inf_;
  ScalarArgs scalars_;
  bool checked_ = false;
};

}  // namespace gerne
