// Loads and stores of float32 SIMD vectors from float, bfloat16 and float16 memory.
//
// The kernels do all arithmetic in float32 (at::vec::Vectorized<float>, 16 lanes with AVX-512).
// One "block" is the elements that fill one vector of the storage type:
//   float:           one Vectorized<float>                 (kVecs = 1)
//   bfloat16, half:  one Vectorized<BFloat16/Half>, widened to two Vectorized<float> (kVecs = 2)
// so each memory access is a full-width load or store, and a reduced value is rounded to its
// storage type once, on store (round to nearest even, as Tensor.to does). Reductions in double
// widen a float vector into kWideParts double vectors (widen_part).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <tuple>

namespace gerne::cpu {

using FVec = at::vec::Vectorized<float>;
using DVec = at::vec::Vectorized<double>;

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

// Part `part` (0 .. kWideParts - 1, from the low lanes up) of a float vector, widened to double.
constexpr int kWideParts = FVec::size() / DVec::size();
static_assert(kWideParts * DVec::size() == FVec::size(), "a float vector widens to whole doubles");

inline DVec widen_part(const FVec& v, int part) {
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(kWideParts == 2, "AVX-512: 16 floats widen to two vectors of 8 doubles");
  const __m512d bits = _mm512_castps_pd(v);
  return _mm512_cvtps_pd(_mm256_castpd_ps(part == 0 ? _mm512_castpd512_pd256(bits)
                                                    : _mm512_extractf64x4_pd(bits, 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  static_assert(kWideParts == 2, "AVX2: 8 floats widen to two vectors of 4 doubles");
  return _mm256_cvtps_pd(part == 0 ? _mm256_castps256_ps128(v) : _mm256_extractf128_ps(v, 1));
#else
  float lanes[FVec::size()];
  v.store(lanes);
  double wide[DVec::size()];
  for (int k = 0; k < DVec::size(); ++k) wide[k] = lanes[part * DVec::size() + k];
  return DVec::loadu(wide);
#endif
}

}  // namespace gerne::cpu
