// The multi-tensor harness of the CPU kernels: one parallel pass over many tensors.
//
// Work list. Every tensor is cut into chunks of at most kChunk elements; the chunks of all
// tensors, in order, form one flat list of (tensor, begin, end). The list is split into one
// contiguous group per thread with equal cost, cost = elements + a fixed per-chunk overhead, so
// that one huge tensor, many tiny ones, or a mix of both keep every core busy; each thread then
// streams through its group in address order. Small problems (under kMinParallelElements in
// all) run on the calling thread: waking the pool costs more than it saves there.
//
// Element-wise pass. A kernel names N streams per tensor (parameter, gradients, state), each with
// a read pointer and a write pointer, either of which may be null: a null read supplies zeros (a
// momentum buffer on its first step is written, never read), a null write discards the value (a
// gradient is read-only). Each element of each stream is thus read once and written at most
// once. The update op is a functor with
//     template <typename V> void operator()(V* values) const
// called with V = Vectorized<float> on full blocks and V = float on the tail of each tensor, so
// the same gerne_math.h templates serve both.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "float_io.h"
#include "fused_dtypes.h"

namespace gerne::cpu {

// A multiple of every storage type's block (16 or 32 elements), so that only a tensor's last
// chunk has a scalar tail. 64 Ki elements keeps the per-chunk overhead negligible while the
// largest imbalance between threads stays under one chunk.
constexpr int64_t kChunk = int64_t{1} << 16;
constexpr int64_t kChunkOverhead = 256;  // cost of one chunk beyond its elements, in elements
constexpr int64_t kMinParallelElements = int64_t{1} << 15;

struct Chunk {
  int64_t tensor, begin, end;
};

inline std::vector<Chunk> chunk_work_list(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t begin = 0; begin < numels[t]; begin += kChunk) {
      chunks.push_back({t, begin, std::min(numels[t], begin + kChunk)});
    }
  }
  return chunks;
}

// Calls fn(chunk) for every chunk of every tensor, in parallel; see the file comment.
template <typename Fn>
void for_each_chunk(const std::vector<int64_t>& numels, const Fn& fn) {
  const std::vector<Chunk> chunks = chunk_work_list(numels);
  const int64_t n = static_cast<int64_t>(chunks.size());
  if (n == 0) return;
  int64_t total = 0;
  for (int64_t numel : numels) total += numel;
  const int64_t groups = std::min<int64_t>(at::get_num_threads(), n);
  if (total < kMinParallelElements || groups <= 1 || at::in_parallel_region()) {
    for (const Chunk& c : chunks) fn(c);
    return;
  }
  // first[g] = the first chunk of group g: the chunk where the running cost crosses g / groups
  // of the total cost.
  std::vector<int64_t> first(groups + 1, n);
  const int64_t total_cost = total + n * kChunkOverhead;
  int64_t cost = 0;
  int64_t g = 0;
  for (int64_t i = 0; i < n && g < groups; ++i) {
    while (g < groups && cost >= (total_cost * g) / groups) first[g++] = i;
    cost += chunks[i].end - chunks[i].begin + kChunkOverhead;
  }
  at::parallel_for(0, groups, 1, [&](int64_t group_begin, int64_t group_end) {
    for (int64_t group = group_begin; group < group_end; ++group) {
      for (int64_t i = first[group]; i < first[group + 1]; ++i) fn(chunks[i]);
    }
  });
}

// The memory of one tensor's N streams; see the file comment for null pointers.
template <typename scalar_t, int N>
struct Streams {
  std::array<const scalar_t*, N> read{};
  std::array<scalar_t*, N> write{};
};

// Applies op to elements [begin, end) of one tensor's streams: full blocks in SIMD, the rest
// one element at a time.
template <typename scalar_t, int N, typename Op>
void apply_elementwise(const Streams<scalar_t, N>& s, int64_t begin, int64_t end, const Op& op) {
  using IO = FloatIO<scalar_t>;
  constexpr int K = IO::kVecs;
  int64_t i = begin;
  for (; i + IO::kBlock <= end; i += IO::kBlock) {
    FVec v[N][K];
    for (int j = 0; j < N; ++j) {
      if (s.read[j] != nullptr) {
        IO::load(s.read[j] + i, v[j]);
      } else {
        for (int k = 0; k < K; ++k) v[j][k] = FVec(0.0f);
      }
    }
    for (int k = 0; k < K; ++k) {
      FVec lane[N];
      for (int j = 0; j < N; ++j) lane[j] = v[j][k];
      op(lane);
      for (int j = 0; j < N; ++j) v[j][k] = lane[j];
    }
    for (int j = 0; j < N; ++j) {
      if (s.write[j] != nullptr) IO::store(s.write[j] + i, v[j]);
    }
  }
  for (; i < end; ++i) {
    float x[N];
    for (int j = 0; j < N; ++j) x[j] = s.read[j] != nullptr ? load_scalar(s.read[j] + i) : 0.0f;
    op(x);
    for (int j = 0; j < N; ++j) {
      if (s.write[j] != nullptr) store_scalar(s.write[j] + i, x[j]);
    }
  }
}

// One parallel pass over all tensors: op_for(t) returns the op of tensor t.
template <typename scalar_t, int N, typename OpFor>
void multi_tensor_apply(const std::vector<Streams<scalar_t, N>>& streams,
                        const std::vector<int64_t>& numels, const OpFor& op_for) {
  for_each_chunk(numels, [&](const Chunk& c) {
    apply_elementwise(streams[c.tensor], c.begin, c.end, op_for(c.tensor));
  });
}

}  // namespace gerne::cpu
