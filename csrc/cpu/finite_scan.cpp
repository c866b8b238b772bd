// all_finite: x * 0 is 0 for every finite x and NaN for inf and NaN, and NaN is sticky under
// addition, so acc <- fma(x, 0, acc) over a chunk is 0 exactly when the chunk is finite. One
// fused multiply-add per vector keeps the scan at memory speed.
//
// A core reads faster from several streams at once than from one (more requests in flight), so
// each chunk is probed as four streams: the first and second halves of g_b and of g_lb. On this
// machine that made the scan of 2^24 float32 parameters ~25% faster than one tensor at a time.
#include "finite_scan.h"

#include <array>
#include <atomic>
#include <vector>

#include "multi_tensor_cpu.h"

namespace gerne::cpu {
namespace {

// Accumulates x * 0 over the elements it is applied to: 0 while all are finite, NaN after.
template <int N>
struct NonfiniteProbe {
  FVec* vector_sum;
  float* scalar_sum;

  void operator()(FVec* v) const {
    for (int j = 0; j < N; ++j) vector_sum[j] = at::vec::fmadd(v[j], FVec(0.0f), vector_sum[j]);
  }
  void operator()(float* v) const {
    for (int j = 0; j < N; ++j) *scalar_sum += v[j] * 0.0f;
  }
};

// Sum of x * 0 over elements [begin, end) of each of the N streams.
template <typename scalar_t, int N>
float probe(const std::array<const scalar_t*, N>& reads, int64_t begin, int64_t end) {
  Streams<scalar_t, N> streams;
  streams.read = reads;
  FVec vector_sum[N];
  for (int j = 0; j < N; ++j) vector_sum[j] = FVec(0.0f);
  float scalar_sum = 0.0f;
  apply_elementwise(streams, begin, end, NonfiniteProbe<N>{vector_sum, &scalar_sum});
  float lanes[FVec::size()];
  for (int j = 0; j < N; ++j) {
    vector_sum[j].store(lanes);
    for (int k = 0; k < FVec::size(); ++k) scalar_sum += lanes[k];
  }
  return scalar_sum;
}

// Elements [begin, end) of g_b and g_lb: both halves side by side (a half that is a multiple of
// kAlign), then the few elements left over.
template <typename scalar_t>
bool chunk_is_finite(const scalar_t* g_b, const scalar_t* g_lb, int64_t begin, int64_t end) {
  const int64_t half = (end - begin) / 2 / kAlign * kAlign;
  float sum = probe<scalar_t, 4>({g_b, g_lb, g_b + half, g_lb + half}, begin, begin + half);
  sum += probe<scalar_t, 2>({g_b, g_lb}, begin + 2 * half, end);
  return sum == 0.0f;
}

}  // namespace

bool all_finite(at::TensorList grads_b, at::TensorList grads_lb) {
  std::vector<int64_t> numels;
  for (const at::Tensor& g : grads_b) numels.push_back(g.numel());
  if (numels.empty()) return true;
  std::atomic<bool> found_nonfinite{false};
  dispatch_fused_dtype(grads_b[0].scalar_type(), "all_finite", [&](auto tag) {
    using scalar_t = decltype(tag);
    for_each_chunk(numels, [&](const Chunk& c) {
      if (found_nonfinite.load(std::memory_order_relaxed)) return;
      if (!chunk_is_finite(grads_b[c.tensor].const_data_ptr<scalar_t>(),
                           grads_lb[c.tensor].const_data_ptr<scalar_t>(), c.begin, c.end)) {
        found_nonfinite.store(true, std::memory_order_relaxed);
      }
    }, ItemOrder::kReverse);
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
