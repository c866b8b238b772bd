// The multi-tensor harness of the CPU kernels: one parallel pass over many tensors.
//
// Work list. Lay all tensors end to end, each padded to a multiple of kAlign elements, and cut
// that line every item_size() elements (kChunk, or kLongChunk for large problems): each cut is
// one work item, the chunks (tensor, begin, end) that fall inside it, i.e. a slice of one large
// tensor or a run of many small ones. The pool's threads
// claim items in order through one atomic counter until none is left, so that one huge tensor,
// many tiny ones or a mix of both keep every core busy with items of equal size, and a thread
// that the OS preempts (on a shared machine) delays only the item it holds: the others take over
// the rest. Padding keeps every cut inside a tensor at a multiple of the SIMD block, so only a
// tensor's last elements take the scalar path. Small problems (under kMinParallelElements in
// all) run on the calling thread: waking the pool costs more than it saves there.
//
// Element-wise pass. A kernel names N streams per tensor (parameter, gradients, state), each with
// a read pointer and a write pointer, either of which may be null: a null read supplies zeros (a
// momentum buffer on its first step is written, never read), a null write discards the value (a
// gradient is read-only). Each element of each stream is thus read once and written at most
// once. The op is a functor with
//     template <typename T> void operator()(T (&values)[N]) const
// called with T = Vectorized<float> on full blocks and T = float on the tail of each tensor, so
// the same gerne_math.h templates serve both. (Reductions: multi_tensor_reduce.h.)
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <vector>

#include "cpu/float_io.h"

namespace gerne::cpu {

// kAlign is a multiple of every storage type's SIMD block (16 or 32 elements) and the item sizes
// multiples of kAlign. 64 Ki elements (256 KiB of each float32 stream) keep the per-item cost
// (one atomic increment) negligible and the streams long enough for the hardware prefetchers.
// Problems that still make kMinItems items of kLongChunk elements take those: longer runs per
// stream moved the SGD and AdamW steps on 2^24 float32 parameters 3-10% closer to the bandwidth
// floor on 2 cores (benchmarks/RESULTS.md), and kMinItems items still keep that many threads
// busy. The item size depends on the problem alone, never on the thread count, so that
// reductions (multi_tensor_reduce.h) give the same bits on any machine.
constexpr int64_t kAlign = 64;
constexpr int64_t kChunk = int64_t{1} << 16;
constexpr int64_t kLongChunk = int64_t{1} << 18;
constexpr int64_t kMinItems = 64;
constexpr int64_t kMinParallelElements = int64_t{1} << 15;
static_assert(kChunk % kAlign == 0 && kLongChunk % kAlign == 0,
              "cuts must fall on block boundaries");

struct Chunk {
  int64_t tensor, begin, end;
};

struct WorkList {
  std::vector<Chunk> chunks;
  std::vector<int64_t> item_begin;  // item i is chunks[item_begin[i], item_begin[i + 1])
  int64_t items() const { return static_cast<int64_t>(item_begin.size()) - 1; }
};

// The elements of one work item: kLongChunk where that still makes kMinItems items, else kChunk.
inline int64_t item_size(const std::vector<int64_t>& numels) {
  int64_t total = 0;
  for (int64_t numel : numels) total += numel;
  return total >= kMinItems * kLongChunk ? kLongChunk : kChunk;
}

inline WorkList make_work_list(const std::vector<int64_t>& numels) {
  WorkList work;
  const int64_t chunk = item_size(numels);
  int64_t position = 0;  // on the padded line
  int64_t current_item = -1;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t begin = 0; begin < numels[t];) {
      const int64_t item = position / chunk;
      const int64_t end = std::min(numels[t], begin + (item + 1) * chunk - position);
      if (item != current_item) {
        work.item_begin.push_back(static_cast<int64_t>(work.chunks.size()));
        current_item = item;
      }
      work.chunks.push_back({t, begin, end});
      position += end - begin;
      begin = end;
    }
    position = (position + kAlign - 1) / kAlign * kAlign;
  }
  work.item_begin.push_back(static_cast<int64_t>(work.chunks.size()));
  return work;
}

// The order in which items are claimed. A reduction (the scan) walks the tensors from the last to
// the first, so that the update pass after it, which starts at the first, begins with the
// tensors it read last: those still in the cache are not read again.
enum class ItemOrder { kForward, kReverse };

// Calls fn(item, first_chunk, end_chunk) for every item of the work list of tensors of `numels`
// elements, in parallel; see the file comment.
template <typename Fn>
void for_each_item(const WorkList& work, const std::vector<int64_t>& numels, const Fn& fn,
                   ItemOrder order = ItemOrder::kForward) {
  const int64_t items = work.items();
  auto run_item = [&](int64_t claimed) {
    const int64_t i = order == ItemOrder::kForward ? claimed : items - 1 - claimed;
    fn(i, work.chunks.data() + work.item_begin[i], work.chunks.data() + work.item_begin[i + 1]);
  };
  int64_t total = 0;
  for (int64_t numel : numels) total += numel;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), items);
  if (total < kMinParallelElements || workers <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < items; ++i) run_item(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < items;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      run_item(i);
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
void apply_elementwise(const Streams<scalar_t, N>& s, int64_t begin, int64_t end, Op& op) {
  using IO = FloatIO<scalar_t>;
  constexpr int K = IO::kVecs;
  static_assert(kAlign % IO::kBlock == 0, "work-list cuts must fall on block boundaries");
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
  for_each_item(make_work_list(numels), numels, [&](int64_t, const Chunk* first,
                                                    const Chunk* end) {
    for (const Chunk* c = first; c != end; ++c) {
      // A local copy: the stores through the streams' pointers cannot alias it, so the compiler
      // keeps the hyperparameters in registers across them.
      const auto op = op_for(c->tensor);
      apply_elementwise(streams[c->tensor], c->begin, c->end, op);
    }
  });
}

}  // namespace gerne::cpu
