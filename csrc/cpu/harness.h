// The CPU harness: runs an op description (op_api.h) over the tensors of one call, on the host.
//
// Call<Op>::run (element-wise update): the checks (call_args.h); nothing if there are no
// tensors or (Op::kSkipsOnFoundInf) found_inf is non-zero; then, per tensor, the op's prologue
// (Adam: the step count) and its resolved copy (lr, scales, per-tensor state), and one parallel,
// vectorized pass over all elements (multi_tensor_cpu.h). Call<Op>::reduce: the checks, one
// deterministic parallel reduction (multi_tensor_reduce.h), then op.finish on the totals.
//
// Each stream's memory follows this call's use of it: read streams are loaded, written ones
// stored, a stream that is written but not read starts from zeros, an unused one is neither.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "call_args.h"
#include "cpu/multi_tensor_cpu.h"
#include "cpu/multi_tensor_reduce.h"
#include "fused_dtypes.h"
#include "op_api.h"

// An op file's registration block: TORCH_LIBRARY_IMPL for this harness's dispatch key.
#define GERNE_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(gerne_kernels, CPU, m)

namespace gerne {

template <typename Op>
class Call : public CallArgs<Op> {
 public:
  using TensorInput = typename Op::TensorInput;
  using TensorState = typename Op::TensorState;

  Call(const typename CallArgs<Op>::Lists& lists, const at::Tensor& found_inf)
      : CallArgs<Op>("cpu", at::kCPU, lists, found_inf) {}

  // inputs: one per tensor where the op has a TensorInput (the caller checked them).
  void run(const Op& op, const std::vector<TensorInput>& inputs = {}) {
    static_assert(Op::kValues == Op::kStreams,
                  "the CPU update pass has no scratch values (reductions do)");
    this->check();
    if (this->tensors() == 0) return;
    if (Op::kSkipsOnFoundInf && *this->found_inf().template const_data_ptr<float>() != 0.0f) {
      return;
    }
    const CallScalars scalars = this->scalars().resolve();
    std::vector<Op> ops;  // one for every tensor, or one for all when there is no state
    if constexpr (std::is_same_v<TensorState, NoState>) {
      ops.push_back(op.resolved(scalars, NoState{}));
    } else {
      for (size_t i = 0; i < this->tensors(); ++i) {
        ops.push_back(op.resolved(scalars, op.prologue(inputs[i], scalars)));
      }
    }
    const bool per_tensor = ops.size() > 1;
    dispatch_fused_dtype(this->tensor(0, 0).scalar_type(), this->name(), [&](auto tag) {
      cpu::multi_tensor_apply(memory<decltype(tag)>(), numels(),
                              [&](int64_t t) -> const Op& { return ops[per_tensor ? t : 0]; });
    });
  }

  void reduce(const Op& op) {
    this->check();
    if (this->tensors() == 0) return;
    const Op resolved = op.resolved(this->scalars().resolve(), NoState{});
    typename Op::Sum total[Op::kSums];
    dispatch_fused_dtype(this->tensor(0, 0).scalar_type(), this->name(), [&](auto tag) {
      cpu::multi_tensor_reduce(memory<decltype(tag)>(), numels(), resolved, total);
    });
    resolved.finish(total);
  }

 private:
  std::vector<int64_t> numels() const {
    std::vector<int64_t> out;
    out.reserve(this->tensors());
    for (size_t i = 0; i < this->tensors(); ++i) out.push_back(this->tensor(0, i).numel());
    return out;
  }

  template <typename scalar_t>
  std::vector<cpu::Streams<scalar_t, Op::kStreams>> memory() const {
    std::vector<cpu::Streams<scalar_t, Op::kStreams>> streams(this->tensors());
    for (int j = 0; j < Op::kStreams; ++j) {
      const Use use = this->use_of(j);
      for (size_t i = 0; use != Use::kUnused && i < this->tensors(); ++i) {
        const at::Tensor& t = this->tensor(j, i);
        if (is_written(use)) streams[i].write[j] = t.template mutable_data_ptr<scalar_t>();
        if (is_read(use)) streams[i].read[j] = t.template const_data_ptr<scalar_t>();
      }
    }
    return streams;
  }
};

}  // namespace gerne
