// Threads per block and the resident blocks per SM that the register budget must allow, for the
// multi-tensor kernel of an op (multi_tensor_apply.cuh).
//
// The kernels are memory-bound: per Little's law an SM keeps its share of the bandwidth only with
// enough bytes in flight, on an H200 about 4.8 TB/s / 132 SMs * ~700 ns = ~25 KB, better 32-64
// KB. A thread has one 16-byte load in flight per stream it reads (all issued before the first
// use), so an SM has  threads * 16 B * streams  in flight, and the threads per SM are bounded by
// the registers: 65536 / registers per thread. 256-thread blocks keep that granularity fine.
// Registers per thread from `-Xptxas -v` (benchmarks/tools/cuda_resource_report.py), sm_90 (sm_80
// within a few registers), with these bounds; no kernel spills:
//
//   op (streams read)         float32  bfloat16  float16  blocks/SM  threads/SM  in flight/SM
//   adam_step_ (5, amsgrad 6)      92      100       99      2          512      40 (48) KB
//   sgd_step_ (4, no momentum 3)   64       76       74     4, 3, 3   1024, 768  64, 48 KB
//   lion_step_ (4)                 71       78       79      3          768        48 KB
//   extrapolate_ (2)               46       56       52     5, 4, 4   1280, 1024  40, 32 KB
//   scan_ with sums (2)            59       59       61      4         1024        32 KB
//   scan_ without sums (2)         44       46       41      5         1280        40 KB
//
// The bounds: an op of 5 or more streams may use up to 128 registers (2 blocks), one of 4 up to
// 80 (3 blocks), fewer up to 64 (4 blocks); fewer registers give more blocks. Capping Adam at 80
// registers (3 blocks) would spill 24 bytes a thread inside its main loop. Before, 512-thread
// blocks ran bfloat16/float16 Adam at 122 registers: one block, 512 threads per SM; converting
// 16-bit elements two at a time (vector_io.cuh) brought every 16-bit kernel under 100.
#pragma once

namespace gerne::cuda {

template <typename Op>
struct LaunchShape {
  static constexpr int kThreads = 256;
  static constexpr int kMinBlocksPerSm = Op::kStreams >= 5 ? 2 : Op::kStreams == 4 ? 3 : 4;
};

}  // namespace gerne::cuda
