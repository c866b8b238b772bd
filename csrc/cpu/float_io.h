// Loads and stores of float32 SIMD vectors from float, bfloat16 and float16 memory.
//
// The kernels do all arithmetic in float32 (at::vec::Vectorized<float>, 16 lanes with AVX-512).
// One "block" is the elements that fill one vector of the storage type:
//   float:           one Vectorized<float>                 (kVecs = 1)
//   bfloat16, half:  one Vectorized<BFloat16/Half>, widened to two Vectorized<float> (kVecs = 2)
// so each memory access is a full-width load or store, and a reduced value is rounded to its
// storage type once, on store (round to nearest even, as Tensor.to does).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <tuple>

namespace gerne::cpu {

using FVec = at::vec::Vectorized<float>;

template <typename scalar_t>
struct FloatIO {
  // bfloat16 and half: widen one storage vector into two float vectors.
  using StorageVec = at::vec::Vectorized<scalar_t>;
  static constexpr int kVecs = 2;
  static constexpr int64_t kBlock = StorageVec::size();
  static_assert(kBlock == kVecs * FVec::size(), "a storage vector must widen to kVecs floats");

  static void load(const scalar_t* src, FVec* out) {
    std::tie(out[0], out[1]) = at::vec::convert_to_float<scalar_t>(StorageVec::loadu(src));
  }
  static void store(scalar_t* dst, const FVec* in) {
    at::vec::convert_from_float<scalar_t>(in[0], in[1]).store(dst);
  }
};

template <>
struct FloatIO<float> {
  static constexpr int kVecs = 1;
  static constexpr int64_t kBlock = FVec::size();

  static void load(const float* src, FVec* out) { out[0] = FVec::loadu(src); }
  static void store(float* dst, const FVec* in) { in[0].store(dst); }
};

// The scalar tail: one element, widened to float and rounded back on store.
template <typename scalar_t>
inline float load_scalar(const scalar_t* src) {
  return static_cast<float>(*src);
}
template <typename scalar_t>
inline void store_scalar(scalar_t* dst, float value) {
  *dst = static_cast<scalar_t>(value);
}

}  // namespace gerne::cpu
