// Scratch memory for the launches of one call: Adam's per-tensor bias corrections, a reduction's
// per-block partial sums.
//
// It comes from PyTorch's caching allocator on the current device, for the current stream, and
// goes back to it when the buffer dies, right after the launches are queued. That is safe without
// any synchronisation: the allocator hands a freed block again only to work queued later on the
// same stream (stream order), and under CUDA graph capture it allocates from the graph's pool. No
// torch op (and no dispatcher call) is involved.
#pragma once

#include <c10/core/Allocator.h>
#include <c10/cuda/CUDACachingAllocator.h>

#include <cstddef>

namespace gerne::cuda {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes)
      : memory_(c10::cuda::CUDACachingAllocator::get()->allocate(bytes)) {}

  template <typename T>
  T* as() const {
    return static_cast<T*>(memory_.get());
  }

 private:
  c10::DataPtr memory_;
};

}  // namespace gerne::cuda
