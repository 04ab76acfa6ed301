// The MLP activations gelu_tanh and swiglu, forward and gradient map: argument checks and launches. The
// kernels, and the description of what they compute, are in genkernels/gated_mlp.cuh, compiled here with
// nvcc (tests/cuda/emulator runs the same source on the CPU).
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "genkernels/api.h"
#include "genkernels/gated_mlp.cuh"
#include "genkernels/runtime.cuh"

namespace genkernels {
namespace {

[[noreturn]] void fail(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string("genkernels: ") + op + ": " + what);
}

// Blocks of the 1-D grid over n outputs (gated_mlp_blocks).
unsigned int grid_of(const char* op, int64_t n, int vec) {
  const int64_t blocks = gated_mlp_blocks(n, vec);
  if (blocks > INT32_MAX) fail(op, std::to_string(n) + " elements need more than 2^31 - 1 blocks");
  return static_cast<unsigned int>(blocks);
}

void check_pointers(const char* op, std::initializer_list<uintptr_t> ptrs) {
  for (const uintptr_t p : ptrs) {
    if (p == 0) fail(op, "every tensor must be non-null");
  }
}

// gelu_tanh's launch: the flat walk with a scalar tail (vectors whenever the pointers allow).
template <bool GRAD>
void gelu_tanh_launch(int64_t n, int dtype, int device, uintptr_t dy, uintptr_t x, uintptr_t out,
                      uintptr_t stream_handle) {
  const char* op = GRAD ? "gelu_tanh_grad" : "gelu_tanh_forward";
  if (n <= 0) fail(op, "n must be > 0, got " + std::to_string(n));
  check_pointers(op, {x, out});
  if (GRAD) check_pointers(op, {dy});
  const int vec = vector_width(dtype, 16 / element_bytes(dtype), {x, out, dy});
  const unsigned int grid = grid_of(op, n, vec);
  const GatedMlpArgs a{reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(dy),
                       reinterpret_cast<void*>(out), n, 1};
  use_device(device);
  const cudaStream_t stream = as_stream(stream_handle);
  with_vector(dtype, vec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    if constexpr (GRAD) {
      gelu_tanh_grad_kernel<D, kVec><<<grid, kGatedMlpThreads, 0, stream>>>(a);
    } else {
      gelu_tanh_forward_kernel<D, kVec><<<grid, kGatedMlpThreads, 0, stream>>>(a);
    }
  });
  check_launch(GRAD ? "gelu_tanh_grad_kernel" : "gelu_tanh_forward_kernel");
}

// swiglu's launch: vectors when M is a multiple of the width and the pointers allow, else scalars.
template <bool GRAD>
void swiglu_launch(int64_t rows, int64_t cols, int dtype, int device, uintptr_t dy, uintptr_t x, uintptr_t out,
                   uintptr_t stream_handle) {
  const char* op = GRAD ? "swiglu_grad" : "swiglu_forward";
  if (rows <= 0 || cols <= 0) {
    fail(op, "rows and cols must be > 0, got " + std::to_string(rows) + " and " + std::to_string(cols));
  }
  check_pointers(op, {x, out});
  if (GRAD) check_pointers(op, {dy});
  const int vec = vector_width(dtype, cols, {x, out, dy});
  const int64_t n = rows * cols;
  const unsigned int grid = grid_of(op, n, vec);
  const GatedMlpArgs a{reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(dy),
                       reinterpret_cast<void*>(out), n, cols};
  use_device(device);
  const cudaStream_t stream = as_stream(stream_handle);
  with_vector(dtype, vec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    if constexpr (GRAD) {
      swiglu_grad_kernel<D, kVec><<<grid, kGatedMlpThreads, 0, stream>>>(a);
    } else {
      swiglu_forward_kernel<D, kVec><<<grid, kGatedMlpThreads, 0, stream>>>(a);
    }
  });
  check_launch(GRAD ? "swiglu_grad_kernel" : "swiglu_forward_kernel");
}

}  // namespace

void gelu_tanh_forward(int64_t n, int dtype, int device, uintptr_t x, uintptr_t y, uintptr_t stream) {
  gelu_tanh_launch<false>(n, dtype, device, 0, x, y, stream);
}

void gelu_tanh_grad(int64_t n, int dtype, int device, uintptr_t dy, uintptr_t x, uintptr_t dx, uintptr_t stream) {
  gelu_tanh_launch<true>(n, dtype, device, dy, x, dx, stream);
}

void swiglu_forward(int64_t rows, int64_t cols, int dtype, int device, uintptr_t x, uintptr_t y, uintptr_t stream) {
  swiglu_launch<false>(rows, cols, dtype, device, 0, x, y, stream);
}

void swiglu_grad(int64_t rows, int64_t cols, int dtype, int device, uintptr_t dy, uintptr_t x, uintptr_t dx,
                 uintptr_t stream) {
  swiglu_launch<true>(rows, cols, dtype, device, dy, x, dx, stream);
}

}  // namespace genkernels
