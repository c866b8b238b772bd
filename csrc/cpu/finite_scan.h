// check_finite's scan: are all elements of all gradients finite?
#pragma once

#include <ATen/core/Tensor.h>

namespace gerne::cpu {

// True when every element of every tensor in both lists is finite (neither inf nor NaN).
// grads_b[i] and grads_lb[i] must have the same shape, and all tensors be contiguous, on the CPU
// and of one fused dtype (the ops' checks ensure it). One parallel, vectorized read of each
// tensor that stops early once a non-finite value is seen. It reads grads_b[i] and grads_lb[i]
// side by side (two streams keep more memory requests in flight than one) and walks the tensors
// from the last to the first, so that the update pass after it, which starts at the first,
// begins with the gradients the scan read last: those still in the cache are not read again.
bool all_finite(at::TensorList grads_b, at::TensorList grads_lb);

// The ops' skip rule, checked before anything is written: true (change nothing) when found_inf
// is non-zero on entry, or when check_finite finds an inf/NaN in grads_b or grads_lb, in which
// case found_inf is set to 1 first.
bool skip_step(const at::Tensor& found_inf, bool check_finite, at::TensorList grads_b,
               at::TensorList grads_lb);

}  // namespace gerne::cpu
