// The normalizing-flow steps, affine coupling and ActNorm: argument checks, the chunking of the work
// and the launches. The kernels, and the description of what they compute, are in
// genkernels/coupling.cuh, compiled here with nvcc (tests/cuda/emulator runs the same source on the CPU).
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "genkernels/api.h"
#include "genkernels/coupling.cuh"
#include "genkernels/runtime.cuh"

namespace genkernels {
namespace {

// Chunks: a power of two times kChunkMin elements (a multiple of every vector width, and at least 8
// elements a thread at the widest vector), sized for about kTargetBlocks blocks, at most kChunkMax.
// A function of the sizes alone: the sums' order, hence their rounding, is the same on every GPU.
constexpr int64_t kChunkMin = 8 * kCouplingThreads;
constexpr int64_t kChunkMax = 256 * kCouplingThreads;
constexpr int64_t kTargetBlocks = 4096;
constexpr int64_t kMaxGrid = INT32_MAX;

[[noreturn]] void fail(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string("genkernels: ") + op + ": " + what);
}

// Chunk length for `per_unit` elements in each of `units` independent runs.
int64_t chunk_length(int64_t units, int64_t per_unit) {
  const int64_t want = ceil_div(units * per_unit, kTargetBlocks);
  int64_t chunk = kChunkMin;
  while (chunk < want && chunk < kChunkMax) chunk *= 2;
  return chunk;
}

std::string sizes(int64_t n, int64_t c, int64_t s) {
  return "(N, C, S) = (" + std::to_string(n) + ", " + std::to_string(c) + ", " + std::to_string(s) + ")";
}

void check_sizes(const char* op, int64_t n, int64_t c, int64_t s, int dtype) {
  if (n <= 0 || c <= 0 || s <= 0) fail(op, "N, C and S must be > 0, got " + sizes(n, c, s));
  if (c > INT64_MAX / s || n > INT64_MAX / 4 / (c * s)) fail(op, sizes(n, c, s) + " overflows");
  element_bytes(dtype);
}

// ---------------------------------------------------------------------------------------------
// Affine coupling.

CouplingShape coupling_shape(const CouplingProblem& p, int scale, float clamp) {
  const char* op = "affine_coupling";
  check_sizes(op, p.n, p.c, p.s, p.dtype);
  if (p.c < 2) fail(op, "C must be >= 2, got " + std::to_string(p.c));
  if (scale < kScaleExp || scale > kScaleAdditive) {
    fail(op, "scale code " + std::to_string(scale) +
                 " (exp 0, sigmoid 1, softclamp_tanh 2, softclamp_atan 3, additive 4)");
  }
  if (!(clamp > 0.f)) fail(op, "clamp must be > 0, got " + std::to_string(clamp));
  CouplingShape s{};
  s.c = p.c;
  s.s = p.s;
  s.ca = p.c / 2;
  s.cb = p.c - s.ca;
  s.ch = scale == kScaleAdditive ? s.cb : 2 * s.cb;
  if (p.h_channels != s.ch) {
    fail(op, "h has " + std::to_string(p.h_channels) + " channels, the scale mode needs " + std::to_string(s.ch) +
                 " for C = " + std::to_string(p.c));
  }
  if (p.n > INT64_MAX / 4 / (s.ch * p.s)) fail(op, sizes(p.n, s.ch, p.s) + " (h) overflows");
  s.n = p.c * p.s;
  s.chunk = chunk_length(p.n, s.n);
  s.chunks = ceil_div(s.n, s.chunk);
  // One position is the same memory in both layouts: channels last then allows vectors (C, Ca, Ch
  // multiples of VEC) where channels first would not (S % VEC).
  s.channels_last = p.channels_last || p.s == 1;
  s.scale = scale;
  s.clamp = clamp;
  if (p.n > kMaxGrid / s.chunks) {
    fail(op, sizes(p.n, p.c, p.s) + " needs " + std::to_string(p.n) + " x " + std::to_string(s.chunks) +
                 " blocks, more than a grid holds (2^31 - 1)");
  }
  return s;
}

// 16-byte vectors when a vector stays within one channel run and on one side of the a/b boundary.
int coupling_vector(const CouplingProblem& p, const CouplingShape& s, std::initializer_list<uintptr_t> ptrs) {
  return s.channels_last ? vector_width(p.dtype, s.c, ptrs, {s.ca, s.ch}) : vector_width(p.dtype, s.s, ptrs);
}

}  // namespace

size_t coupling_forward_workspace(const CouplingProblem& p, int scale, float clamp) {
  const CouplingShape s = coupling_shape(p, scale, clamp);
  return s.chunks > 1 ? static_cast<size_t>(p.n * s.chunks) * sizeof(float) : 0;
}

void coupling_forward(const CouplingProblem& p, uintptr_t x, uintptr_t h, uintptr_t y, uintptr_t logdet, int scale,
                      float clamp, bool reverse, uintptr_t workspace, size_t workspace_bytes,
                      uintptr_t stream_handle) {
  const CouplingShape s = coupling_shape(p, scale, clamp);
  if (x == 0 || h == 0 || y == 0) fail("affine_coupling", "x, h and y must be non-null");
  if (logdet % 4 != 0) fail("affine_coupling", "logdet must be a float32 tensor");
  CouplingForwardArgs a{};
  a.s = s;
  a.x = reinterpret_cast<const void*>(x);
  a.h = reinterpret_cast<const void*>(h);
  a.y = reinterpret_cast<void*>(y);
  a.reverse = reverse;
  float* const out = reinterpret_cast<float*>(logdet);
  a.partials = out;
  if (logdet != 0 && s.chunks > 1) {
    const size_t need = static_cast<size_t>(p.n * s.chunks) * sizeof(float);
    if (workspace == 0 || workspace % 4 != 0 || workspace_bytes < need) {
      fail("affine_coupling", "workspace of " + std::to_string(workspace_bytes) + " bytes, need " +
                                  std::to_string(need) + " (coupling_forward_workspace)");
    }
    a.partials = reinterpret_cast<float*>(workspace);
  }
  const int vec = coupling_vector(p, s, {x, h, y});
  use_device(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  const auto grid = static_cast<unsigned int>(p.n * s.chunks);
  with_vector(p.dtype, vec, [&](auto d, auto v) {
    coupling_forward_kernel<decltype(d), decltype(v)::value><<<grid, kCouplingThreads, 0, stream>>>(a);
  });
  check_launch("coupling_forward_kernel");
  if (logdet != 0 && s.chunks > 1) {
    row_sum_kernel<<<static_cast<unsigned int>(p.n), kMergeThreads, 0, stream>>>(a.partials, out, s.chunks);
    check_launch("row_sum_kernel");
  }
}

void coupling_backward(const CouplingProblem& p, uintptr_t dy, uintptr_t dlogdet, uintptr_t x, uintptr_t h,
                       uintptr_t dx, uintptr_t dh, int scale, float clamp, uintptr_t stream_handle) {
  const CouplingShape s = coupling_shape(p, scale, clamp);
  if (dx == 0 && dh == 0) return;  // nothing wanted
  const bool additive = scale == kScaleAdditive;
  if (h == 0 && !additive) fail("affine_coupling", "h must be non-null");
  if (x == 0 && dh != 0 && !additive) fail("affine_coupling", "x must be non-null when dh is wanted");
  if (dlogdet % 4 != 0) fail("affine_coupling", "dlogdet must be a float32 tensor");
  CouplingBackwardArgs a{};
  a.s = s;
  a.dy = reinterpret_cast<const void*>(dy);
  a.dlogdet = reinterpret_cast<const float*>(dlogdet);
  a.x = reinterpret_cast<const void*>(x);
  a.h = reinterpret_cast<const void*>(h);
  a.dx = reinterpret_cast<void*>(dx);
  a.dh = reinterpret_cast<void*>(dh);
  // Only the tensors the kernel touches constrain the vector width (the kernel's conditions mirrored).
  const int vec = coupling_vector(p, s, {dy, additive ? 0 : h, dh != 0 && !additive ? x : 0, dx, dh});
  use_device(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  const auto grid = static_cast<unsigned int>(p.n * s.chunks);
  with_vector(p.dtype, vec, [&](auto d, auto v) {
    coupling_backward_kernel<decltype(d), decltype(v)::value><<<grid, kCouplingThreads, 0, stream>>>(a);
  });
  check_launch("coupling_backward_kernel");
}

// ---------------------------------------------------------------------------------------------
// ActNorm.

namespace {

// Channels last, backward: pixel rows per chunk, a power of two from 256 (several rows for each row
// lane of a tile, and fewer partials to merge), sized like the chunks above.
constexpr int64_t kRowsMin = 256;
constexpr int64_t kRowsMax = 65536;

ActNormShape actnorm_shape(const ActNormProblem& p) {
  check_sizes("actnorm", p.n, p.c, p.s, p.dtype);
  ActNormShape s{};
  s.n = p.n;
  s.c = p.c;
  s.s = p.s;
  s.channels_last = p.channels_last || p.s == 1;
  return s;
}

ActNormShape actnorm_forward_shape(const ActNormProblem& p) {
  ActNormShape s = actnorm_shape(p);
  s.chunk = chunk_length(p.n, p.c * p.s);
  s.chunks = ceil_div(p.c * p.s, s.chunk);
  if (p.n > kMaxGrid / s.chunks) fail("actnorm", sizes(p.n, p.c, p.s) + " needs more blocks than a grid holds");
  return s;
}

// The backward's chunks (per channel, or per channel tile) from the sizes alone; the tiles from VEC.
ActNormShape actnorm_backward_shape(const ActNormProblem& p, int vec) {
  ActNormShape s = actnorm_shape(p);
  const int64_t pixels = p.n * p.s;
  if (s.channels_last) {
    const int64_t want = ceil_div(pixels * p.c, kTargetBlocks);
    s.chunk = kRowsMin;
    while (s.chunk * p.c < want && s.chunk < kRowsMax) s.chunk *= 2;
    s.chunks = ceil_div(pixels, s.chunk);
    s.tile_vecs = static_cast<int>(std::min<int64_t>(ceil_div(p.c, vec), kCouplingThreads));
    s.tiles = ceil_div(p.c, static_cast<int64_t>(s.tile_vecs) * vec);
    if (s.chunks > kMaxGrid / s.tiles) fail("actnorm", sizes(p.n, p.c, p.s) + " needs more blocks than a grid holds");
  } else {
    s.chunk = chunk_length(p.c, pixels);
    s.chunks = ceil_div(pixels, s.chunk);
    s.tile_vecs = 0;
    s.tiles = 1;
    if (p.c > kMaxGrid / s.chunks) fail("actnorm", sizes(p.n, p.c, p.s) + " needs more blocks than a grid holds");
  }
  return s;
}

int actnorm_vector(const ActNormProblem& p, const ActNormShape& s, std::initializer_list<uintptr_t> ptrs) {
  return vector_width(p.dtype, s.channels_last ? s.c : s.s, ptrs);
}

}  // namespace

void actnorm_forward(const ActNormProblem& p, uintptr_t x, uintptr_t log_scale, uintptr_t bias, uintptr_t y,
                     bool reverse, uintptr_t stream_handle) {
  const ActNormShape s = actnorm_forward_shape(p);
  if (x == 0 || log_scale == 0 || bias == 0 || y == 0) fail("actnorm", "x, log_scale, bias and y must be non-null");
  if (log_scale % 4 != 0 || bias % 4 != 0) fail("actnorm", "log_scale and bias must be float32 tensors");
  ActNormForwardArgs a{};
  a.s = s;
  a.x = reinterpret_cast<const void*>(x);
  a.log_scale = reinterpret_cast<const float*>(log_scale);
  a.bias = reinterpret_cast<const float*>(bias);
  a.y = reinterpret_cast<void*>(y);
  a.reverse = reverse;
  const int vec = actnorm_vector(p, s, {x, y});
  use_device(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  const auto grid = static_cast<unsigned int>(p.n * s.chunks);
  with_vector(p.dtype, vec, [&](auto d, auto v) {
    actnorm_forward_kernel<decltype(d), decltype(v)::value><<<grid, kCouplingThreads, 0, stream>>>(a);
  });
  check_launch("actnorm_forward_kernel");
}

size_t actnorm_backward_workspace(const ActNormProblem& p) {
  const ActNormShape s = actnorm_backward_shape(p, 1);  // the chunks do not depend on the vector width
  return s.chunks > 1 ? static_cast<size_t>(2 * p.c * s.chunks) * sizeof(float) : 0;
}

void actnorm_backward(const ActNormProblem& p, uintptr_t dy, uintptr_t x, uintptr_t log_scale, uintptr_t bias,
                      uintptr_t dx, uintptr_t sums, uintptr_t workspace, size_t workspace_bytes,
                      uintptr_t stream_handle) {
  if (dy == 0 || x == 0 || log_scale == 0 || bias == 0 || sums == 0) {
    fail("actnorm", "dy, x, log_scale, bias and sums must be non-null");
  }
  if (log_scale % 4 != 0 || bias % 4 != 0 || sums % 4 != 0) {
    fail("actnorm", "log_scale, bias and sums must be float32 tensors");
  }
  const int vec = actnorm_vector(p, actnorm_shape(p), {dy, x, dx});
  const ActNormShape s = actnorm_backward_shape(p, vec);
  ActNormBackwardArgs a{};
  a.s = s;
  a.dy = reinterpret_cast<const void*>(dy);
  a.x = reinterpret_cast<const void*>(x);
  a.log_scale = reinterpret_cast<const float*>(log_scale);
  a.bias = reinterpret_cast<const float*>(bias);
  a.dx = reinterpret_cast<void*>(dx);
  float* const out = reinterpret_cast<float*>(sums);
  a.partials = out;
  if (s.chunks > 1) {
    const size_t need = static_cast<size_t>(2 * p.c * s.chunks) * sizeof(float);
    if (workspace == 0 || workspace % 4 != 0 || workspace_bytes < need) {
      fail("actnorm", "workspace of " + std::to_string(workspace_bytes) + " bytes, need " + std::to_string(need) +
                          " (actnorm_backward_workspace)");
    }
    a.partials = reinterpret_cast<float*>(workspace);
  }
  use_device(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  const auto grid = static_cast<unsigned int>(s.tiles * s.chunks * (s.channels_last ? 1 : p.c));
  with_vector(p.dtype, vec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    if (s.channels_last) {
      actnorm_backward_last_kernel<D, kVec><<<grid, kCouplingThreads, 0, stream>>>(a);
    } else {
      actnorm_backward_first_kernel<D, kVec><<<grid, kCouplingThreads, 0, stream>>>(a);
    }
  });
  check_launch(s.channels_last ? "actnorm_backward_last_kernel" : "actnorm_backward_first_kernel");
  if (s.chunks > 1) {
    row_sum_kernel<<<static_cast<unsigned int>(2 * p.c), kMergeThreads, 0, stream>>>(a.partials, out, s.chunks);
    check_launch("row_sum_kernel");
  }
}

}  // namespace genkernels
