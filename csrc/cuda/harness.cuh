// The CUDA harness: runs an op description (op_api.h) over the tensors of one call on the
// call's device, on its current stream.
//
// Call<Op>::run (element-wise update): the checks (call_args.h); for ops with a TensorState, the
// prologue launches (tensor_prologue.cuh: Adam's step counts and bias corrections, into a small
// device buffer); then the multi-tensor launches (multi_tensor_apply.cuh), one per table's worth
// of tensors. Call<Op>::reduce: the multi-tensor launches, each block writing its partial sums,
// then one block that adds them in a fixed order and calls op.finish (block_sum.cuh): for up to a
// table's worth of tensors, two launches, deterministic.
//
// Nothing here waits for the device or reads device memory on the host: found_inf, the step
// counts and the .tensor overloads' device scalars are read by the kernels, so a call never
// forces a host sync and can be captured in a CUDA graph (torch.optim's capturable=True
// behaviour, always on); a captured graph follows the scalars' and found_inf's current values on
// every replay. Scratch memory comes from the caching allocator (device_buffer.cuh); no torch op
// runs around the launches.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "call_args.h"
#include "cuda/block_sum.cuh"
#include "cuda/device_buffer.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/tensor_prologue.cuh"
#include "fused_dtypes.h"
#include "op_api.h"

// An op file's registration block: TORCH_LIBRARY_IMPL for this harness's dispatch key.
#define GERNE_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(gerne_kernels, CUDA, m)

namespace gerne {
namespace cuda {

// The CUDA device a call runs on: found_inf's, else that of the first CUDA tensor of the leading
// list (the dispatcher sends a call here when any argument is a CUDA tensor). The argument checks
// then require every tensor on it.
inline at::Device call_device(const char* op, const at::Tensor& found_inf,
                              const char* leading_name, at::TensorList leading) {
  if (found_inf.defined() && found_inf.is_cuda()) return found_inf.device();
  for (const at::Tensor& t : leading) {
    if (t.defined() && t.is_cuda()) return t.device();
  }
  TORCH_CHECK(false, op, ": neither found_inf nor ", leading_name, " is on a CUDA device; the "
              "cuda backend runs on CUDA tensors (use the cpu backend for CPU tensors)");
}

}  // namespace cuda

template <typename Op>
class Call : public CallArgs<Op> {
 public:
  using Lists = typename CallArgs<Op>::Lists;
  using TensorInput = typename Op::TensorInput;
  using TensorState = typename Op::TensorState;
  using Entry = cuda::TensorEntry<Op::kStreams, cuda::TableExtra<Op>>;

  Call(const Lists& lists, const at::Tensor& found_inf)
      : CallArgs<Op>("cuda",
                     cuda::call_device(CallArgs<Op>::qualified_name("cuda"), found_inf,
                                       Op::kArgs[0].name, lists[0]),
                     lists, found_inf) {}

  // inputs: one per tensor where the op has a TensorInput (the caller checked them).
  void run(const Op& op, const std::vector<TensorInput>& inputs = {}) {
    this->check();
    if (this->tensors() == 0) return;
    const c10::cuda::CUDAGuard guard(this->device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    cuda::KernelArgs<Op> args = kernel_args(op);
    if (Op::kSkipsOnFoundInf) args.found_inf = this->found_inf().template const_data_ptr<float>();
    cuda::DeviceBuffer states;
    if constexpr (cuda::has_state<Op>) {
      states = cuda::DeviceBuffer(sizeof(TensorState) * this->tensors());
      args.states = states.as<TensorState>();
      cuda::launch_prologues(inputs, op, args.scalars, args.found_inf,
                             states.as<TensorState>(), stream);
    }
    launch(args, stream);
  }

  void reduce(const Op& op) {
    using Sum = typename Op::Sum;
    this->check();
    if (this->tensors() == 0) return;
    const c10::cuda::CUDAGuard guard(this->device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    int64_t blocks = 0;
    for (size_t i = 0; i < this->tensors(); ++i) blocks += cuda::chunks_of(this->tensor(0, i).numel());
    cuda::DeviceBuffer partials(sizeof(Sum) * Op::kSums * static_cast<size_t>(blocks));
    cuda::KernelArgs<Op> args = kernel_args(op);
    args.partials = partials.as<Sum>();
    launch(args, stream);
    cuda::finish_reduction_kernel<Op, Sum, Op::kSums>
        <<<1, cuda::kFinishThreads, 0, stream>>>(op, partials.as<Sum>(), blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  cuda::KernelArgs<Op> kernel_args(const Op& op) const {
    return cuda::KernelArgs<Op>{op, this->scalars(), nullptr, nullptr, nullptr, 0};
  }

  void launch(const cuda::KernelArgs<Op>& args, cudaStream_t stream) const {
    std::vector<Entry> entries(this->tensors());
    uint32_t reads = 0, writes = 0;
    for (int j = 0; j < Op::kStreams; ++j) {
      const Use use = this->use_of(j);
      if (is_read(use)) reads |= 1u << j;
      if (is_written(use)) writes |= 1u << j;
      for (size_t i = 0; use != Use::kUnused && i < this->tensors(); ++i) {
        const at::Tensor& t = this->tensor(j, i);
        entries[i].data[j] =
            is_written(use) ? t.mutable_data_ptr() : const_cast<void*>(t.const_data_ptr());
      }
    }
    for (size_t i = 0; i < this->tensors(); ++i) {
      entries[i].numel = this->tensor(0, i).numel();
      if constexpr (cuda::has_state<Op>) entries[i].extra = static_cast<int32_t>(i);
    }
    dispatch_fused_dtype(this->tensor(0, 0).scalar_type(), this->name(), [&](auto tag) {
      cuda::multi_tensor_apply<decltype(tag), Op>(entries, reads, writes, args, stream);
    });
  }
};

}  // namespace gerne
