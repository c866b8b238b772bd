// 16-byte vectors of a storage type, and their elements as float32 two at a time: float32 as it
// is, bfloat16 and float16 with the paired conversions of sm_80+ (one instruction widens or
// rounds two elements; rounding to nearest even, as the single-element conversions and
// Tensor.to do). Pairs keep the registers a thread needs per vector low.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace gerne::cuda {

constexpr int kVectorBytes = 16;  // one vector load or store

template <typename scalar_t>
struct alignas(kVectorBytes) Vector {
  static constexpr int kSize = kVectorBytes / sizeof(scalar_t);
  static constexpr int kPairs = kSize / 2;
  scalar_t value[kSize];
};

// Elements 2 * pair and 2 * pair + 1 of v, as floats; and back, rounded to the storage type.
__device__ __forceinline__ float2 load_pair(const Vector<float>& v, int pair) {
  return make_float2(v.value[2 * pair], v.value[2 * pair + 1]);
}
__device__ __forceinline__ void store_pair(Vector<float>& v, int pair, float2 x) {
  v.value[2 * pair] = x.x;
  v.value[2 * pair + 1] = x.y;
}
__device__ __forceinline__ float2 load_pair(const Vector<c10::Half>& v, int pair) {
  return __half22float2(reinterpret_cast<const __half2*>(v.value)[pair]);
}
__device__ __forceinline__ void store_pair(Vector<c10::Half>& v, int pair, float2 x) {
  reinterpret_cast<__half2*>(v.value)[pair] = __floats2half2_rn(x.x, x.y);
}
__device__ __forceinline__ float2 load_pair(const Vector<c10::BFloat16>& v, int pair) {
  return __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(v.value)[pair]);
}
__device__ __forceinline__ void store_pair(Vector<c10::BFloat16>& v, int pair, float2 x) {
  reinterpret_cast<__nv_bfloat162*>(v.value)[pair] = __floats2bfloat162_rn(x.x, x.y);
}

}  // namespace gerne::cuda
