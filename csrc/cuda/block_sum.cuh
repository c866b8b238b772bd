// Sums over a thread block in a fixed order, for the reductions: the result does not depend on
// which warp finishes first, so a reduction gives the same bits on every run.
//
// Each warp folds its 32 values with a shuffle tree (lane i takes lane i + 16, then i + 8, ...),
// lane 0 of each warp stores the warp's sums in shared memory, and warp 0 folds those the same
// way. finish_reduction_kernel adds a reduction's per-block partial sums, each thread a fixed
// stride of them, with the same block sum, and hands the total to the op's finish.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace gerne::cuda {

constexpr int kWarp = 32;

// The sums of v over the block (kThreads threads, a multiple of 32, all of which must call it)
// in thread 0's v; the other threads' v are left partial.
template <int kThreads, typename Sum, int kSums>
__device__ __forceinline__ void block_sum(Sum (&v)[kSums]) {
  static_assert(kThreads % kWarp == 0 && kThreads / kWarp <= kWarp, "one warp folds the warps");
  __shared__ Sum warp_sums[kThreads / kWarp][kSums];
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int s = 0; s < kSums; ++s) v[s] += __shfl_down_sync(0xffffffffu, v[s], offset);
  }
  if (lane == 0) {
#pragma unroll
    for (int s = 0; s < kSums; ++s) warp_sums[warp][s] = v[s];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int s = 0; s < kSums; ++s) v[s] = lane < kThreads / kWarp ? warp_sums[lane][s] : Sum(0);
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int s = 0; s < kSums; ++s) v[s] += __shfl_down_sync(0xffffffffu, v[s], offset);
    }
  }
}

constexpr int kFinishThreads = 256;

// One block: the sums of the `count` partials (partials[i * kSums + s]), then op.finish(total).
template <typename Op, typename Sum, int kSums>
__global__ void __launch_bounds__(kFinishThreads)
    finish_reduction_kernel(const Op op, const Sum* partials, int64_t count) {
  Sum v[kSums];
#pragma unroll
  for (int s = 0; s < kSums; ++s) v[s] = Sum(0);
  for (int64_t i = threadIdx.x; i < count; i += kFinishThreads) {
#pragma unroll
    for (int s = 0; s < kSums; ++s) v[s] += partials[i * kSums + s];
  }
  block_sum<kFinishThreads>(v);
  if (threadIdx.x == 0) op.finish(v);
}

}  // namespace gerne::cuda
