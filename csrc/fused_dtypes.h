// The dtypes the fused kernels support (float32, bfloat16, float16, all computed in float32):
// the test and the dispatch, shared by the backends. Host code only.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace gerne {

inline bool is_fused_dtype(c10::ScalarType dtype) {
  return dtype == c10::ScalarType::Float || dtype == c10::ScalarType::BFloat16 ||
         dtype == c10::ScalarType::Half;
}

// Calls fn(scalar_t{}) with scalar_t the C++ type of dtype: float, c10::BFloat16 or c10::Half.
template <typename Fn>
void dispatch_fused_dtype(c10::ScalarType dtype, const char* op_name, const Fn& fn) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return fn(float{});
    case c10::ScalarType::BFloat16:
      return fn(c10::BFloat16{});
    case c10::ScalarType::Half:
      return fn(c10::Half{});
    default:
      TORCH_CHECK(false, op_name, ": tensors of dtype ", dtype,
                  " are not supported; use float32, bfloat16 or float16 "
                  "(or the reference backend for other dtypes)");
  }
}

}  // namespace gerne
