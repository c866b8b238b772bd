// The per-tensor prologue of ops with a TensorState (Adam: advance the step count, then the
// bias corrections step_size and bias_correction2_sqrt): one thread per tensor, each writing its
// tensor's state into a small device buffer that every block of the update then reads.
//
// It runs as its own launch before the update's, on the same stream: every block of the update
// must see the advanced count, and no block of a single launch could safely advance a count that
// other blocks of that launch still read. One prologue launch covers as many tensors as one
// update table holds, so a call of up to a table's worth of tensors is two launches. With
// found_inf non-zero it does nothing (the counts stay), and the update does nothing either.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "cuda/multi_tensor_apply.cuh"
#include "op_api.h"

namespace gerne::cuda {

constexpr int kPrologueThreads = 128;

template <typename Op>
struct PrologueTable {
  static constexpr int kCapacity = TensorTable<Op::kStreams, TableExtra<Op>>::kCapacity;
  typename Op::TensorInput input[kCapacity];
  int32_t size;   // tensors in this table
  int32_t first;  // index of input[0] among the call's tensors
};

template <typename Op>
__global__ void __launch_bounds__(kPrologueThreads)
    tensor_prologue_kernel(const __grid_constant__ PrologueTable<Op> table, const Op op,
                           const ScalarArgs scalars, const float* found_inf,
                           typename Op::TensorState* states) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int i = static_cast<int>(blockIdx.x) * kPrologueThreads + static_cast<int>(threadIdx.x);
  if (i < table.size) states[table.first + i] = op.prologue(table.input[i], scalars.resolve());
}

// states[i] = op.prologue(inputs[i], scalars) for every tensor i, on `stream`.
template <typename Op>
void launch_prologues(const std::vector<typename Op::TensorInput>& inputs, const Op& op,
                      const ScalarArgs& scalars, const float* found_inf,
                      typename Op::TensorState* states, cudaStream_t stream) {
  using Table = PrologueTable<Op>;
  static_assert(sizeof(Table) <= kTableBytes, "the prologue table exceeds its argument budget");
  auto table = std::make_unique<Table>();
  for (size_t first = 0; first < inputs.size(); first += Table::kCapacity) {
    const size_t count = std::min<size_t>(Table::kCapacity, inputs.size() - first);
    std::copy(inputs.begin() + first, inputs.begin() + first + count, table->input);
    table->size = static_cast<int32_t>(count);
    table->first = static_cast<int32_t>(first);
    const unsigned blocks = static_cast<unsigned>((count + kPrologueThreads - 1) /
                                                  kPrologueThreads);
    tensor_prologue_kernel<Op>
        <<<blocks, kPrologueThreads, 0, stream>>>(*table, op, scalars, found_inf, states);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace gerne::cuda
