// gerne_kernels::scan_: one read of both gradients that sets found_inf to 1 when any element of
// g_b or g_lb is inf or NaN and, when `sums` is given, adds to it (float64)
//     [sum g^2, sum g_b^2, sum g_lb^2, sum g_b * g_lb],   g = scale_lb * g_lb + scale_b * g_b
// with g formed in float32 per element, as the update ops form it, and the products summed in
// double (gerne_math.h: scan_accumulate). An empty grads_lb scans g_b alone (g_lb = 0). Without
// sums, a cheaper float probe finds the non-finite values (nonfinite_accumulate). Both are
// reductions: the sums are added in a fixed order, so they do not depend on scheduling.
//     reads g_b, g_lb    writes found_inf (only to set it), sums
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "arg_checks.h"
#include "op_api.h"

namespace gerne {
namespace {

// The streams and arguments common to both scans.
struct ScanStreams : ReductionOp {
  static constexpr const char* kName = "scan_";
  enum Stream { kGradB, kGradLb, kStreams };
  static constexpr StreamArg kArgs[kStreams] = {{"grads_b", Use::kRead}, {"grads_lb", Use::kRead}};
};

// found_inf and the four sums.
struct ScanWithSums : ScanStreams {
  enum Value { kGrad = kStreams, kValues };  // g: a scratch value
  static constexpr int kSums = kScanSums;
  using Sum = double;

  float* found_inf;
  double* sums;
  Extrapolation grad;

  GERNE_HD ScanWithSums resolved(const CallScalars& s, const NoState&) const {
    ScanWithSums op = *this;
    op.grad.set(s);
    return op;
  }
  template <typename T>
  GERNE_HD void operator()(T (&v)[kValues]) const {
    v[kGrad] = grad(v[kGradB], v[kGradLb]);
  }
  template <typename S>
  GERNE_HD void accumulate(S (&total)[kSums], const S (&v)[kValues]) const {
    scan_accumulate(total, v[kGrad], v[kGradB], v[kGradLb]);
  }
  GERNE_HD void finish(const double (&total)[kSums]) const {
    if (!gerne_isfinite(total[kSumGradBSq] + total[kSumGradLbSq])) *found_inf = 1.0f;
    for (int s = 0; s < kSums; ++s) sums[s] += total[s];
  }
};

// found_inf alone: one probe sum per gradient (two independent dependency chains).
struct ScanForNonfinite : ScanStreams {
  enum Value { kValues = kStreams };
  static constexpr int kSums = 2;
  using Sum = float;

  float* found_inf;

  GERNE_HD ScanForNonfinite resolved(const CallScalars&, const NoState&) const { return *this; }
  template <typename T>
  GERNE_HD void operator()(T (&)[kValues]) const {}
  template <typename S>
  GERNE_HD void accumulate(S (&total)[kSums], const S (&v)[kValues]) const {
    nonfinite_accumulate(total[kGradB], v[kGradB]);
    nonfinite_accumulate(total[kGradLb], v[kGradLb]);
  }
  GERNE_HD void finish(const float (&total)[kSums]) const {
    if (total[kGradB] + total[kGradLb] != 0.0f) *found_inf = 1.0f;
  }
};

// A call of either scan over grads_b and grads_lb, checked.
template <typename Op, typename Scalar>
Call<Op> checked_scan_call(at::TensorList grads_b, at::TensorList grads_lb,
                           const at::Tensor& found_inf, Scalar scale_b, Scalar scale_lb) {
  Call<Op> call({grads_b, grads_lb}, found_inf);
  if (grads_lb.empty()) call.use(ScanStreams::kGradLb, Use::kUnused);  // read as zeros
  call.set_scales(scale_b, scale_lb);
  call.check();
  return call;
}

template <typename Scalar>
void scan(at::TensorList grads_b, at::TensorList grads_lb, const at::Tensor& found_inf,
          const std::optional<at::Tensor>& sums, Scalar scale_b, Scalar scale_lb) {
  if (!sums.has_value()) {
    auto call = checked_scan_call<ScanForNonfinite>(grads_b, grads_lb, found_inf, scale_b,
                                                    scale_lb);
    ScanForNonfinite op{};
    op.found_inf = found_inf.mutable_data_ptr<float>();
    call.reduce(op);
    return;
  }
  auto call = checked_scan_call<ScanWithSums>(grads_b, grads_lb, found_inf, scale_b, scale_lb);
  check_sums(call.name(), *sums, call.device());
  ScanWithSums op{};
  op.found_inf = found_inf.mutable_data_ptr<float>();
  op.sums = sums->mutable_data_ptr<double>();
  call.reduce(op);
}

}  // namespace

GERNE_LIBRARY_IMPL(m) {
  m.impl("scan_", &scan<double>);
  m.impl("scan_.tensor", &scan<at::Tensor>);
}

}  // namespace gerne
