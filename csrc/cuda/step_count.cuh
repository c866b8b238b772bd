// Adam's per-tensor step counts: step <- step + 1 on the device, unless found_inf is non-zero.
//
// It runs as its own launch after the finiteness scan and before the update launch, on the same
// stream: every block of the update must see the incremented count, and no block of a single
// launch could safely increment a count that other blocks of that launch still read.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "multi_tensor_apply.cuh"

namespace gerne::cuda {

struct StepTable {
  static constexpr int kCapacity = (kTableBytes - 16) / sizeof(float*);
  float* step[kCapacity];
  int32_t size;
};

__global__ void increment_steps_kernel(const __grid_constant__ StepTable table,
                                       const float* found_inf) {
  if (*found_inf != 0.0f) return;
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < table.size) *table.step[i] += 1.0f;
}

// Increments every step count (float32 scalars on the current device) on the current stream.
inline void increment_steps(const std::vector<float*>& steps, const float* found_inf) {
  constexpr int kStepThreads = 256;
  auto table = std::make_unique<StepTable>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (size_t first = 0; first < steps.size(); first += StepTable::kCapacity) {
    const size_t count = std::min<size_t>(StepTable::kCapacity, steps.size() - first);
    std::copy(steps.begin() + first, steps.begin() + first + count, table->step);
    table->size = static_cast<int32_t>(count);
    const unsigned blocks = static_cast<unsigned>((count + kStepThreads - 1) / kStepThreads);
    increment_steps_kernel<<<blocks, kStepThreads, 0, stream>>>(*table, found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace gerne::cuda
