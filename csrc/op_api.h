// What an op file (csrc/ops/<op>.h) is written against: the op description that every device's
// harness (csrc/cpu/harness.h, csrc/cuda/harness.cuh) runs. Device-agnostic; GERNE_HD parts are
// compiled for the host and, in the CUDA build, for the device.
//
// An op file holds, in an unnamed namespace (it is compiled once per device library, by the unit
// that _build.py generates: the device's harness, then the op file):
//   - the op description, a struct Op deriving from UpdateOp or ReductionOp (the defaults of the
//     last three entries below), with
//       kName                     the schema's name, e.g. "lion_step_" (error messages)
//       enum: one index per stream (the schema's tensor lists, the leading one first, the one
//             whose dtype and shapes the others must match), then kStreams; then any scratch
//             values the element function uses (zeros on entry, never stored), then kValues
//       kArgs[kStreams]           each stream's argument name and default Use
//       kSkipsOnFoundInf          a non-zero found_inf on entry makes the call change nothing
//       TensorInput, TensorState  per-tensor data: what the entry point hands over per tensor
//                                 (NoInput if nothing) and what prologue() derives from it once
//                                 per tensor before any element (NoState if nothing)
//       prologue(input, scalars)  GERNE_HD, only with a TensorState
//       resolved(scalars, state)  GERNE_HD: a copy whose per-call and per-tensor fields are set
//                                 from the call's lr/scales and the tensor's state
//       operator()(T (&v)[kValues])   GERNE_HD: one element of each stream, in place; T is float
//                                 (CUDA, the CPU tail) or at::vec::Vectorized<float> (CPU SIMD)
//     and, for a reduction (run with Call::reduce instead of Call::run):
//       kSums, Sum                how many sums, and their type (float or double)
//       accumulate(S (&sums)[kSums], const S (&v)[kValues])   GERNE_HD: adds one element's
//                                 terms, the values after operator(), widened to S
//       finish(const Sum (&total)[kSums])   GERNE_HD: once, with the sums over all elements in
//                                 a fixed order (on the device on CUDA: it writes the outputs)
//   - the entry points of both overloads (one template over the scalars' type: double for
//     .default, at::Tensor for .tensor), written against the harness's Call<Op>:
//       Call<Op> call({list, ...}, found_inf);   the device: found_inf's (CPU: the CPU)
//       call.use(stream, Use::...);              this call's use of a stream, if not the default
//       call.set_scalars(lr, scale_b, scale_lb) / call.set_scales(scale_b, scale_lb)
//       call.run(op[, inputs]) / call.reduce(op)  checks every used stream, then runs
//     and call.name(), call.device() for the op's own checks;
//   - the registration: GERNE_LIBRARY_IMPL(m) { m.impl(...); } (the harness's dispatch key).
#pragma once

#include <cstdint>

#include "gerne_math.h"

namespace gerne {

// How a call uses one stream. An unused stream is neither checked nor touched (no momentum, no
// amsgrad, an empty optional list); a stream that is written but not read supplies zeros (a
// momentum buffer on its first step).
enum class Use : uint8_t { kUnused = 0, kRead = 1, kWrite = 2, kReadWrite = 3 };

constexpr bool is_read(Use use) { return (static_cast<uint8_t>(use) & 1u) != 0; }
constexpr bool is_written(Use use) { return (static_cast<uint8_t>(use) & 2u) != 0; }

struct StreamArg {
  const char* name;  // the schema's argument name
  Use use;           // the default use
};

// Per-tensor data of ops that need none.
struct NoInput {};
struct NoState {};

// The defaults an op description derives from: an update changes nothing when found_inf is
// non-zero; a reduction (which sets found_inf) runs regardless; neither has per-tensor data.
struct UpdateOp {
  static constexpr bool kSkipsOnFoundInf = true;
  using TensorInput = NoInput;
  using TensorState = NoState;
};
struct ReductionOp {
  static constexpr bool kSkipsOnFoundInf = false;
  using TensorInput = NoInput;
  using TensorState = NoState;
};

// lr, scale_b and scale_lb of one call, as double values.
struct CallScalars {
  double lr = 0.0, scale_b = 0.0, scale_lb = 0.0;
};

// One of them as the kernel receives it: a value (the .default overload's float, or a .tensor
// scalar on the CPU, read by the host), or the address of a one-element float32 or float64
// tensor on the call's device, read by the kernel (a captured CUDA graph then follows it).
struct ScalarArg {
  double value = 0.0;
  const void* device_address = nullptr;
  bool is_double = false;

  GERNE_HD double get() const {
    if (device_address == nullptr) return value;
    return is_double ? *static_cast<const double*>(device_address)
                     : static_cast<double>(*static_cast<const float*>(device_address));
  }
};

struct ScalarArgs {
  ScalarArg lr, scale_b, scale_lb;

  GERNE_HD CallScalars resolve() const { return CallScalars{lr.get(), scale_b.get(), scale_lb.get()}; }
};

// The two scale factors of the extrapolated gradient as the element functions use them.
struct Extrapolation {
  float scale_b = 0.0f, scale_lb = 0.0f;

  GERNE_HD void set(const CallScalars& s) {
    scale_b = static_cast<float>(s.scale_b);
    scale_lb = static_cast<float>(s.scale_lb);
  }
  template <typename T>
  GERNE_HD T operator()(const T& g_b, const T& g_lb) const {
    return extrapolated_grad(g_b, g_lb, scale_b, scale_lb);
  }
};

}  // namespace gerne
