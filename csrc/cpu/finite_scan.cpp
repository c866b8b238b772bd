// all_finite: x * 0 is 0 for every finite x and NaN for inf and NaN, and NaN is sticky under
// addition, so acc <- fma(x, 0, acc) over a chunk is 0 exactly when the chunk is finite. One
// fused multiply-add per vector keeps the scan at memory speed.
#include "finite_scan.h"

#include <atomic>
#include <cmath>
#include <vector>

#include "multi_tensor_cpu.h"

namespace gerne::cpu {
namespace {

template <typename scalar_t>
bool chunk_is_finite(const scalar_t* data, int64_t begin, int64_t end) {
  using IO = FloatIO<scalar_t>;
  FVec acc(0.0f);
  const FVec zero(0.0f);
  int64_t i = begin;
  for (; i + IO::kBlock <= end; i += IO::kBlock) {
    FVec x[IO::kVecs];
    IO::load(data + i, x);
    for (int k = 0; k < IO::kVecs; ++k) acc = at::vec::fmadd(x[k], zero, acc);
  }
  float lanes[FVec::size()];
  acc.store(lanes);
  float sum = 0.0f;
  for (int k = 0; k < FVec::size(); ++k) sum += lanes[k];
  for (; i < end; ++i) sum += load_scalar(data + i) * 0.0f;
  return sum == 0.0f;
}

}  // namespace

bool all_finite(at::TensorList first, at::TensorList second) {
  std::vector<const at::Tensor*> tensors;
  std::vector<int64_t> numels;
  for (at::TensorList list : {first, second}) {
    for (const at::Tensor& t : list) {
      tensors.push_back(&t);
      numels.push_back(t.numel());
    }
  }
  if (tensors.empty()) return true;
  std::atomic<bool> found_nonfinite{false};
  dispatch_fused_dtype(tensors[0]->scalar_type(), "all_finite", [&](auto tag) {
    using scalar_t = decltype(tag);
    for_each_chunk(numels, [&](const Chunk& c) {
      if (found_nonfinite.load(std::memory_order_relaxed)) return;
      const auto* data = tensors[c.tensor]->template const_data_ptr<scalar_t>();
      if (!chunk_is_finite(data, c.begin, c.end)) {
        found_nonfinite.store(true, std::memory_order_relaxed);
      }
    });
  });
  return !found_nonfinite.load();
}

bool skip_step(const at::Tensor& found_inf, bool check_finite, at::TensorList grads_b,
               at::TensorList grads_lb) {
  float* flag = found_inf.mutable_data_ptr<float>();
  if (*flag != 0.0f) return true;
  if (check_finite && !all_finite(grads_b, grads_lb)) {
    *flag = 1.0f;
    return true;
  }
  return false;
}

}  // namespace gerne::cpu
