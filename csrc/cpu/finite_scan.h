// check_finite's scan: are all elements of all gradients finite?
#pragma once

#include <ATen/core/Tensor.h>

namespace gerne::cpu {

// True when every element of every tensor in both lists is finite (neither inf nor NaN).
// One parallel, vectorized read of each tensor; stops early once a non-finite value is seen.
// All tensors must be contiguous, on the CPU, of one fused dtype (the op's checks ensure it).
bool all_finite(at::TensorList first, at::TensorList second);

// The ops' skip rule, checked before anything is written: true (change nothing) when found_inf
// is non-zero on entry, or when check_finite finds an inf/NaN in grads_b or grads_lb, in which
// case found_inf is set to 1 first.
bool skip_step(const at::Tensor& found_inf, bool check_finite, at::TensorList grads_b,
               at::TensorList grads_lb);

}  // namespace gerne::cpu
