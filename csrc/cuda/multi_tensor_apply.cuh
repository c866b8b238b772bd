// The multi-tensor kernel of the CUDA harness: one launch applies an op description (op_api.h)
// to every element of many tensors and, for a reduction, writes one partial sum per block.
//
// Work list. Every tensor is cut into chunks of kChunk elements (its last chunk may be shorter);
// one thread block processes one chunk. A launch carries a TensorTable by value as its kernel
// argument: per tensor, the data pointers of its streams, its element count, its per-tensor extra
// (the index of its state, for ops with a prologue) and the running total of chunks up to and
// including it (chunk_end). Block b finds its tensor by binary search in chunk_end, so the grid
// has exactly as many blocks as the launch has chunks, however unevenly the elements are spread.
//
// Table size. Since CUDA 12.1 a kernel argument may take up to 32764 bytes on Volta and newer
// (sm_70+); the table fills most of that, i.e. hundreds of tensors per launch (Adam: 494,
// SGD and Lion: 699, extrapolate: 846, the scan: 1072); more tensors make more launches. The
// table is a __grid_constant__ argument: the kernel reads it where the launch put it (constant
// bank 0), never copies it.
//
// Streams. The launch says which streams are read and which written (the same for all its
// tensors): an unread stream supplies zeros, an unwritten one is discarded, one that is neither
// has null pointers. Each element is read once and written at most once, by one thread that
// reads all its streams before writing any, so a written stream may alias a read one
// (extrapolate_ writing into grads_lb).
//
// Memory access. If every pointer of a tensor is 16-byte aligned, its chunks are read and written
// in 16-byte vectors (4 float32 or 8 bfloat16/float16 elements; kChunk is a multiple of both, so
// every chunk starts aligned) and the last few elements of the tensor one by one; otherwise the
// tensor goes element by element. Arithmetic is in float32; reduced types round once on store.
// A chunk's offset in its tensor is 64-bit (tensors may exceed 2^31 elements); offsets inside a
// chunk are 32-bit.
//
// Per block, before its first element: found_inf (ops that skip on it: a plain load, it is read
// only), the call's scalars (values, or loads of the .tensor overload's device scalars), the
// tensor's state (loaded from the prologue's buffer), combined by op.resolved.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cuda/block_sum.cuh"
#include "cuda/launch_shape.cuh"
#include "cuda/vector_io.cuh"
#include "op_api.h"

namespace gerne::cuda {

// Elements per thread block: 128 per thread, as many as with the earlier 512-thread blocks.
constexpr int64_t kChunk = int64_t{1} << 15;
constexpr int kMaxKernelArgBytes = 32764;      // CUDA >= 12.1, sm_70+
constexpr int kOpArgBytes = 512;               // room left for KernelArgs next to the table
constexpr int kTableBytes = kMaxKernelArgBytes - kOpArgBytes;

// What a reduction sums (Sum, kSums) and whether the op is one, from its description.
template <typename Op, typename = void>
struct Reduction {
  static constexpr bool kIsReduction = false;
  static constexpr int kSums = 1;
  using Sum = float;
};
template <typename Op>
struct Reduction<Op, std::void_t<decltype(Op::kSums)>> {
  static constexpr bool kIsReduction = true;
  static constexpr int kSums = Op::kSums;
  using Sum = typename Op::Sum;
};

template <typename Op>
constexpr bool has_state = !std::is_same_v<typename Op::TensorState, NoState>;

// Per-tensor extra of the table: the index of the tensor's state, or nothing.
struct NoExtra {};
template <typename Op>
using TableExtra = std::conditional_t<has_state<Op>, int32_t, NoExtra>;

template <int N, typename Extra>
struct TensorTable {
  static constexpr int kBytesPerTensor =
      N * sizeof(void*) + sizeof(int64_t) + sizeof(int32_t) + sizeof(uint8_t) + sizeof(Extra);
  static constexpr int kHeaderBytes = 16;
  static constexpr int kCapacity = (kTableBytes - kHeaderBytes - 64) / kBytesPerTensor;

  void* data[N][kCapacity];       // data[j][t]: stream j of tensor t, or null
  int64_t numel[kCapacity];
  Extra extra[kCapacity];
  int32_t chunk_end[kCapacity];   // chunks of tensors 0..t together
  uint8_t vectorized[kCapacity];  // all of tensor t's pointers are 16-byte aligned
  int32_t size;                   // tensors in this table
  uint32_t read_mask;             // bit j: stream j is read
  uint32_t write_mask;            // bit j: stream j is written
};

// One tensor as the host hands it to multi_tensor_apply.
template <int N, typename Extra>
struct TensorEntry {
  std::array<void*, N> data{};
  int64_t numel = 0;
  Extra extra{};
};

// The kernel's arguments besides the table.
template <typename Op>
struct KernelArgs {
  using Sum = typename Reduction<Op>::Sum;
  Op op;
  ScalarArgs scalars;
  const float* found_inf;                     // ops that skip on it, else null
  const typename Op::TensorState* states;     // ops with a prologue, else null
  Sum* partials;                              // reductions: kSums per block of the call
  int64_t first_block;                        // this launch's first block among the call's
};

// The tensor that block `block` works on: the first t with chunk_end[t] > block.
__device__ __forceinline__ int tensor_of_block(const int32_t* chunk_end, int size, int block) {
  int lo = 0;
  int hi = size - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (chunk_end[mid] > block) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// A thread's running sums: nothing for an update, the op's sums for a reduction.
template <typename Op, bool = Reduction<Op>::kIsReduction>
struct ThreadSums {
  __device__ __forceinline__ void add(const Op&, const float (&)[Op::kValues]) {}
};
template <typename Op>
struct ThreadSums<Op, true> {
  using Sum = typename Op::Sum;
  Sum value[Op::kSums] = {};

  __device__ __forceinline__ void add(const Op& op, const float (&x)[Op::kValues]) {
    Sum wide[Op::kValues];
#pragma unroll
    for (int j = 0; j < Op::kValues; ++j) wide[j] = static_cast<Sum>(x[j]);
    op.accumulate(value, wide);
  }
};

// One element: load (or zero) the values, apply the op, add to the sums; the caller stores.
template <typename Op>
__device__ __forceinline__ void apply_element(float (&x)[Op::kValues], const Op& op,
                                              ThreadSums<Op>& sums) {
  op(x);
  sums.add(op, x);
}

// Elements [begin, n) of one chunk, element by element with stride kThreads.
template <typename scalar_t, int kThreads, typename Op>
__device__ __forceinline__ void apply_scalar(scalar_t* const (&ptr)[Op::kStreams], int begin,
                                             int n, uint32_t reads, uint32_t writes,
                                             const Op& op, ThreadSums<Op>& sums) {
  for (int i = begin + static_cast<int>(threadIdx.x); i < n; i += kThreads) {
    float x[Op::kValues] = {};
#pragma unroll
    for (int j = 0; j < Op::kStreams; ++j) {
      if (reads >> j & 1u) x[j] = static_cast<float>(ptr[j][i]);
    }
    apply_element(x, op, sums);
#pragma unroll
    for (int j = 0; j < Op::kStreams; ++j) {
      if (writes >> j & 1u) ptr[j][i] = static_cast<scalar_t>(x[j]);
    }
  }
}

// The full vectors of one chunk of n elements; returns the number of elements they cover.
template <typename scalar_t, int kThreads, typename Op>
__device__ __forceinline__ int apply_vectorized(scalar_t* const (&ptr)[Op::kStreams], int n,
                                                uint32_t reads, uint32_t writes, const Op& op,
                                                ThreadSums<Op>& sums) {
  using Vec = Vector<scalar_t>;
  constexpr int kSize = Vec::kSize;
  const int vectors = n / kSize;
  for (int v = static_cast<int>(threadIdx.x); v < vectors; v += kThreads) {
    Vec in[Op::kStreams];
#pragma unroll
    for (int j = 0; j < Op::kStreams; ++j) {
      if (reads >> j & 1u) in[j] = reinterpret_cast<const Vec*>(ptr[j])[v];
    }
#pragma unroll
    for (int pair = 0; pair < Vec::kPairs; ++pair) {  // results replace their inputs in place
      float x[2][Op::kValues] = {};
#pragma unroll
      for (int j = 0; j < Op::kStreams; ++j) {
        if (reads >> j & 1u) {
          const float2 both = load_pair(in[j], pair);
          x[0][j] = both.x;
          x[1][j] = both.y;
        }
      }
      apply_element(x[0], op, sums);
      apply_element(x[1], op, sums);
#pragma unroll
      for (int j = 0; j < Op::kStreams; ++j) {
        if (writes >> j & 1u) store_pair(in[j], pair, make_float2(x[0][j], x[1][j]));
      }
    }
#pragma unroll
    for (int j = 0; j < Op::kStreams; ++j) {
      if (writes >> j & 1u) reinterpret_cast<Vec*>(ptr[j])[v] = in[j];
    }
  }
  return vectors * kSize;
}

template <typename Op>
__device__ __forceinline__ typename Op::TensorState tensor_state(const KernelArgs<Op>& args,
                                                                 const TableExtra<Op>& extra) {
  if constexpr (has_state<Op>) {
    return args.states[extra];
  } else {
    return NoState{};
  }
}

// One block = one chunk of one tensor.
template <typename scalar_t, typename Op>
__global__ void __launch_bounds__(LaunchShape<Op>::kThreads,
                                  LaunchShape<Op>::kMinBlocksPerSm)
    multi_tensor_kernel(const __grid_constant__ TensorTable<Op::kStreams, TableExtra<Op>> table,
                        const KernelArgs<Op> args) {
  constexpr int kThreads = LaunchShape<Op>::kThreads;
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;
  const int block = static_cast<int>(blockIdx.x);
  const int t = tensor_of_block(table.chunk_end, table.size, block);
  const int first_chunk = t == 0 ? 0 : table.chunk_end[t - 1];
  const int64_t begin = static_cast<int64_t>(block - first_chunk) * kChunk;
  const int64_t left = table.numel[t] - begin;
  const int n = static_cast<int>(left < kChunk ? left : kChunk);
  scalar_t* ptr[Op::kStreams];
#pragma unroll
  for (int j = 0; j < Op::kStreams; ++j) {
    scalar_t* base = static_cast<scalar_t*>(table.data[j][t]);
    ptr[j] = base == nullptr ? nullptr : base + begin;
  }
  const Op op = args.op.resolved(args.scalars.resolve(), tensor_state(args, table.extra[t]));
  ThreadSums<Op> sums;
  const int done = table.vectorized[t]
                       ? apply_vectorized<scalar_t, kThreads>(ptr, n, table.read_mask,
                                                              table.write_mask, op, sums)
                       : 0;
  apply_scalar<scalar_t, kThreads>(ptr, done, n, table.read_mask, table.write_mask, op, sums);
  if constexpr (Reduction<Op>::kIsReduction) {
    block_sum<kThreads>(sums.value);
    if (threadIdx.x == 0) {
      auto* out = args.partials + (args.first_block + block) * Op::kSums;
#pragma unroll
      for (int s = 0; s < Op::kSums; ++s) out[s] = sums.value[s];
    }
  }
}

inline bool is_vector_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0;
}

// The chunks (thread blocks) a tensor of numel elements takes.
inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Applies args.op to every element of every entry, on `stream`, in as few launches as the
// table capacity allows; entries without elements are skipped. scalar_t: the element type of
// all streams (float, c10::BFloat16 or c10::Half).
template <typename scalar_t, typename Op>
void multi_tensor_apply(const std::vector<TensorEntry<Op::kStreams, TableExtra<Op>>>& entries,
                        uint32_t reads, uint32_t writes, KernelArgs<Op> args,
                        cudaStream_t stream) {
  using Table = TensorTable<Op::kStreams, TableExtra<Op>>;
  constexpr int N = Op::kStreams;
  static_assert(sizeof(Table) <= kTableBytes, "the tensor table exceeds its argument budget");
  static_assert(sizeof(KernelArgs<Op>) <= kOpArgBytes,
                "the op's arguments exceed their budget next to the tensor table");
  static_assert(kChunk % Vector<scalar_t>::kSize == 0, "chunks must start vector-aligned");
  static_assert(kChunk <= std::numeric_limits<int>::max(), "chunk offsets are 32-bit");
  constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();

  auto table = std::make_unique<Table>();  // ~32 KB: on the heap, not the host stack
  table->size = 0;
  table->read_mask = reads;
  table->write_mask = writes;
  int64_t chunks = 0;
  auto launch = [&]() {
    if (table->size == 0) return;
    multi_tensor_kernel<scalar_t, Op>
        <<<static_cast<unsigned>(chunks), LaunchShape<Op>::kThreads, 0, stream>>>(*table,
                                                                                      args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    args.first_block += chunks;
    table->size = 0;
    chunks = 0;
  };
  for (const auto& entry : entries) {
    if (entry.numel == 0) continue;
    const int64_t entry_chunks = chunks_of(entry.numel);
    TORCH_CHECK(entry_chunks <= kMaxBlocks, "gerne_kernels: a tensor of ", entry.numel,
                " elements exceeds the CUDA kernels' limit of ", kMaxBlocks * kChunk);
    if (table->size == Table::kCapacity || chunks + entry_chunks > kMaxBlocks) launch();
    const int t = table->size++;
    bool aligned = true;
    for (int j = 0; j < N; ++j) {
      table->data[j][t] = entry.data[j];
      aligned = aligned && is_vector_aligned(entry.data[j]);  // null is aligned
    }
    table->numel[t] = entry.numel;
    table->extra[t] = entry.extra;
    table->vectorized[t] = aligned ? 1 : 0;
    chunks += entry_chunks;
    table->chunk_end[t] = static_cast<int32_t>(chunks);
  }
  launch();
}

}  // namespace gerne::cuda
