// The multi-tensor harness of the CUDA kernels: one launch applies an element-wise op to every
// element of many tensors.
//
// Work list. Every tensor is cut into chunks of kChunk elements (its last chunk may be shorter);
// one thread block processes one chunk. A launch carries a TensorTable by value as its kernel
// argument: per tensor, the data pointers of its N streams (parameter, gradients, state), its
// element count and the running total of chunks up to and including it (chunk_end). Block b
// finds its tensor by binary search in chunk_end, so the grid has exactly as many blocks as the
// launch has chunks, however unevenly the elements are spread over the tensors.
//
// Table size. Since CUDA 12.1 a kernel argument may take up to 32764 bytes on Volta and newer
// (sm_70+); the table fills most of that, i.e. hundreds of tensors per launch (Adam: 466,
// SGD: 699, extrapolate: 846, the finiteness scan: 1462); more tensors make more launches. The
// table is a __grid_constant__ argument: the kernel reads it where the launch put it (constant
// bank 0), never copies it.
//
// Streams. For each stream the launch says whether it is read and whether it is written (the same
// for all tensors of the launch): an unread stream supplies zeros (a momentum buffer on its
// first step is written, never read), an unwritten one is discarded (a gradient is read-only),
// and a stream that is neither (no momentum, no amsgrad) has null pointers. Each element is read
// once and written at most once, by one thread that reads all its streams before writing any,
// so a written stream may alias a read one (extrapolate_ writing into grads_lb).
//
// Memory access. If every pointer of a tensor is 16-byte aligned, its chunks are read and written
// in 16-byte vectors (4 float32 or 8 bfloat16/float16 elements; kChunk is a multiple of both, so
// every chunk starts aligned) and the last few elements of the tensor one by one; otherwise the
// tensor goes element by element. Arithmetic is in float32; reduced types round once on store.
//
// Indexing. A chunk's offset in its tensor is 64-bit (tensors may exceed 2^31 elements); offsets
// inside a chunk are 32-bit.
//
// The op. A functor with
//     template <typename Extra> __device__ TensorOp for_tensor(const Extra& extra) const
// returning the op of one tensor (Extra: per-tensor data carried in the table, e.g. Adam's step
// count), whose
//     __device__ void operator()(float (&values)[N])     // one element of each stream, in place
//     __device__ void finish()                           // once per thread, after its elements
// do the work.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

namespace gerne::cuda {

constexpr int64_t kChunk = int64_t{1} << 16;  // elements per thread block
constexpr int kThreads = 512;                  // threads per block
constexpr int kVectorBytes = 16;               // one vector load or store
constexpr int kMaxKernelArgBytes = 32764;      // CUDA >= 12.1, sm_70+
constexpr int kOpArgBytes = 512;               // room left for the op's and the launch's other args
constexpr int kTableBytes = kMaxKernelArgBytes - kOpArgBytes;

// Per-tensor payload of ops that need none.
struct NoExtra {};

template <int N, typename Extra = NoExtra>
struct TensorTable {
  static constexpr int kBytesPerTensor =
      N * sizeof(void*) + sizeof(int64_t) + sizeof(int32_t) + sizeof(uint8_t) + sizeof(Extra);
  static constexpr int kHeaderBytes = 16;
  static constexpr int kCapacity = (kTableBytes - kHeaderBytes - 64) / kBytesPerTensor;

  void* data[N][kCapacity];     // data[j][t]: stream j of tensor t, or null
  int64_t numel[kCapacity];
  Extra extra[kCapacity];
  int32_t chunk_end[kCapacity];  // chunks of tensors 0..t together
  uint8_t vectorized[kCapacity];  // all of tensor t's pointers are 16-byte aligned
  int32_t size;                  // tensors in this table
  uint32_t read_mask;            // bit j: stream j is read
  uint32_t write_mask;           // bit j: stream j is written
};

// One tensor as the host hands it to multi_tensor_apply.
template <int N, typename Extra = NoExtra>
struct TensorEntry {
  std::array<void*, N> data{};
  int64_t numel = 0;
  Extra extra{};
};

template <typename scalar_t>
struct alignas(kVectorBytes) Vector {
  static constexpr int kSize = kVectorBytes / sizeof(scalar_t);
  scalar_t value[kSize];
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

// Elements [begin, n) of one chunk, element by element with stride blockDim.x.
template <typename scalar_t, int N, typename TensorOp>
__device__ __forceinline__ void apply_scalar(scalar_t* const (&ptr)[N], int begin, int n,
                                             uint32_t reads, uint32_t writes, TensorOp& op) {
  for (int i = begin + threadIdx.x; i < n; i += blockDim.x) {
    float x[N];
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] = (reads >> j & 1u) ? static_cast<float>(ptr[j][i]) : 0.0f;
    op(x);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (writes >> j & 1u) ptr[j][i] = static_cast<scalar_t>(x[j]);
    }
  }
}

// The full vectors of one chunk of n elements; returns the number of elements they cover.
template <typename scalar_t, int N, typename TensorOp>
__device__ __forceinline__ int apply_vectorized(scalar_t* const (&ptr)[N], int n, uint32_t reads,
                                                uint32_t writes, TensorOp& op) {
  using Vec = Vector<scalar_t>;
  constexpr int kSize = Vec::kSize;
  const int vectors = n / kSize;
  for (int v = threadIdx.x; v < vectors; v += blockDim.x) {
    Vec in[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (reads >> j & 1u) in[j] = reinterpret_cast<const Vec*>(ptr[j])[v];
    }
#pragma unroll
    for (int k = 0; k < kSize; ++k) {  // results replace their inputs: no second set of registers
      float x[N];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        x[j] = (reads >> j & 1u) ? static_cast<float>(in[j].value[k]) : 0.0f;
      }
      op(x);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (writes >> j & 1u) in[j].value[k] = static_cast<scalar_t>(x[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (writes >> j & 1u) reinterpret_cast<Vec*>(ptr[j])[v] = in[j];
    }
  }
  return vectors * kSize;
}

// Resident blocks per SM that the register budget must allow. The kernels are memory-bound and
// need many loads in flight: for float32 two blocks of 512 threads (<= 64 registers a thread;
// ptxas spills a few bytes for Adam, to L1). For 16-bit types a thread holds twice the elements
// per vector and needs ~120 registers for Adam; capping it at 64 spills ~100 bytes, so one block.
template <typename scalar_t>
constexpr int kMinBlocksPerSm = sizeof(scalar_t) == 4 ? 2 : 1;

// One block = one chunk of one tensor. found_inf (may be null): a non-zero value skips the work.
template <typename scalar_t, int N, typename Extra, typename Op>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<scalar_t>)
    multi_tensor_kernel(const __grid_constant__ TensorTable<N, Extra> table, const Op op,
                        const float* found_inf) {
  // volatile: in the finiteness scan, other blocks of this launch may be storing 1 into it.
  if (found_inf != nullptr && *static_cast<const volatile float*>(found_inf) != 0.0f) return;
  const int block = static_cast<int>(blockIdx.x);
  const int t = tensor_of_block(table.chunk_end, table.size, block);
  const int first_chunk = t == 0 ? 0 : table.chunk_end[t - 1];
  const int64_t begin = static_cast<int64_t>(block - first_chunk) * kChunk;
  const int64_t left = table.numel[t] - begin;
  const int n = static_cast<int>(left < kChunk ? left : kChunk);
  scalar_t* ptr[N];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    scalar_t* base = static_cast<scalar_t*>(table.data[j][t]);
    ptr[j] = base == nullptr ? nullptr : base + begin;
  }
  auto tensor_op = op.for_tensor(table.extra[t]);
  const int done = table.vectorized[t]
                       ? apply_vectorized<scalar_t, N>(ptr, n, table.read_mask,
                                                       table.write_mask, tensor_op)
                       : 0;
  apply_scalar<scalar_t, N>(ptr, done, n, table.read_mask, table.write_mask, tensor_op);
  tensor_op.finish();
}

inline bool is_vector_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0;
}

// Applies op to every element of every entry, on the current CUDA stream, in as few launches as
// the table capacity allows. Entries without elements are skipped. scalar_t: the element type
// of all streams (float, c10::BFloat16 or c10::Half).
template <typename scalar_t, int N, typename Extra, typename Op>
void multi_tensor_apply(const std::vector<TensorEntry<N, Extra>>& entries, uint32_t reads,
                        uint32_t writes, const Op& op, const float* found_inf) {
  using Table = TensorTable<N, Extra>;
  static_assert(sizeof(Table) <= kTableBytes, "the tensor table exceeds its argument budget");
  static_assert(sizeof(Op) + 2 * sizeof(void*) <= kOpArgBytes,
                "the op's arguments exceed their budget next to the tensor table");
  static_assert(kChunk % Vector<scalar_t>::kSize == 0, "chunks must start vector-aligned");
  static_assert(kChunk <= std::numeric_limits<int>::max(), "chunk offsets are 32-bit");
  constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();

  auto table = std::make_unique<Table>();  // ~32 KB: on the heap, not the host stack
  table->size = 0;
  table->read_mask = reads;
  table->write_mask = writes;
  int64_t chunks = 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&]() {
    if (table->size == 0) return;
    multi_tensor_kernel<scalar_t, N, Extra, Op>
        <<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(*table, op, found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table->size = 0;
    chunks = 0;
  };
  for (const auto& entry : entries) {
    if (entry.numel == 0) continue;
    const int64_t entry_chunks = (entry.numel + kChunk - 1) / kChunk;
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
