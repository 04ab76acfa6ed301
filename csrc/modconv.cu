// StyleGAN2's modulated convolution, the demodulation coefficients and the fused epilogue: argument
// checks, the work split and the launches. The kernels, and the description of what they compute,
// are in genkernels/modconv.cuh, compiled here with nvcc (tests/cuda/emulator runs the same source on
// the CPU).
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "genkernels/api.h"
#include "genkernels/modconv.cuh"
#include "genkernels/runtime.cuh"

namespace genkernels {
namespace {

[[noreturn]] void fail(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string("genkernels: ") + op + ": " + what);
}

unsigned int grid_of(const char* op, int64_t blocks) {
  if (blocks > INT32_MAX) fail(op, "the problem needs more than 2^31 - 1 blocks");
  return static_cast<unsigned int>(blocks);
}

DemodArgs demod_args(int64_t o, int64_t i, int64_t k, int64_t n, uintptr_t weight, int dtype, uintptr_t styles) {
  const char* op = "demodulation_coefficients";
  if (o <= 0 || i <= 0 || k <= 0 || n <= 0) {
    fail(op, "O, I, K and N must be > 0, got " + std::to_string(o) + ", " + std::to_string(i) + ", " +
                 std::to_string(k) + ", " + std::to_string(n));
  }
  if (o > INT64_MAX / i / k || n > INT64_MAX / i || n > INT64_MAX / o) fail(op, "the sizes overflow");
  if (weight == 0 || styles == 0) fail(op, "weight and styles must be non-null");
  if (styles % 4 != 0) fail(op, "styles must be a float32 tensor");
  element_bytes(dtype);
  DemodArgs a{};
  a.weight = reinterpret_cast<const void*>(weight);
  a.styles = reinterpret_cast<const float*>(styles);
  a.o = o;
  a.i = i;
  a.k = k;
  a.n = n;
  return a;
}

EpilogueArgs epilogue_args(const ModconvEpilogueProblem& p, uintptr_t y, uintptr_t dcoef, uintptr_t noise,
                           uintptr_t strength, uintptr_t bias, uintptr_t out) {
  const char* op = "modconv_epilogue";
  if (p.n <= 0 || p.c <= 0 || p.s <= 0) {
    fail(op, "N, C and S must be > 0, got " + std::to_string(p.n) + ", " + std::to_string(p.c) + ", " +
                 std::to_string(p.s));
  }
  if (p.c > INT64_MAX / p.s || p.n > INT64_MAX / 8 / (p.c * p.s)) fail(op, "the sizes overflow");
  if (p.act < 0 || p.act >= kActCount) fail(op, "unknown activation code " + std::to_string(p.act));
  if (p.has_clamp && !(p.clamp > 0.f)) fail(op, "clamp must be > 0, got " + std::to_string(p.clamp));
  element_bytes(p.dtype);
  if (y == 0 || out == 0) fail(op, "y and the output must be non-null");
  if (dcoef % 4 != 0 || strength % 4 != 0 || bias % 4 != 0) fail(op, "dcoef, strength and bias must be float32");
  if (noise != 0) {
    element_bytes(p.noise_dtype);
    if (p.noise_batch != 1 && p.noise_batch != p.n) {
      fail(op, "noise has batch " + std::to_string(p.noise_batch) + ", accepted: 1 or N = " + std::to_string(p.n));
    }
  }
  EpilogueArgs a{};
  a.y = reinterpret_cast<const void*>(y);
  a.dcoef = reinterpret_cast<const float*>(dcoef);
  a.noise = reinterpret_cast<const void*>(noise);
  a.strength = reinterpret_cast<const float*>(strength);
  a.bias = reinterpret_cast<const float*>(bias);
  a.out = reinterpret_cast<void*>(out);
  a.numel = p.n * p.c * p.s;
  a.n = p.n;
  a.c = p.c;
  a.s = p.s;
  a.channels_last = p.channels_last;
  a.d1 = p.channels_last ? p.s : p.c;
  a.d2 = p.channels_last ? p.c : p.s;
  a.noise_dtype = noise != 0 ? p.noise_dtype : kFloat32;
  a.noise_stride = noise != 0 && p.noise_batch == p.n && p.n > 1 ? p.s : 0;
  a.alpha = p.alpha;
  a.gain = p.gain;
  a.clamp = p.has_clamp ? p.clamp : 0.f;
  a.has_clamp = p.has_clamp;
  a.act = p.act;
  return a;
}

// The backward's vector width: 16 bytes when every vector stays in one plane (channels first, S) or
// one pixel (channels last, C) and the big tensors are 16-byte aligned.
int backward_vector(const ModconvEpilogueProblem& p, uintptr_t dout, uintptr_t y, uintptr_t dy) {
  return vector_width(p.dtype, p.channels_last ? p.c : p.s, {dout, y, dy});
}

}  // namespace

void modconv_demod_forward(int64_t o, int64_t i, int64_t k, int64_t n, uintptr_t weight, int dtype, uintptr_t styles,
                           float eps, uintptr_t dcoef, int device, uintptr_t stream_handle) {
  DemodArgs a = demod_args(o, i, k, n, weight, dtype, styles);
  if (dcoef == 0 || dcoef % 4 != 0) fail("demodulation_coefficients", "dcoef must be a float32 tensor");
  if (!(eps > 0.f)) fail("demodulation_coefficients", "eps must be > 0, got " + std::to_string(eps));
  a.out_dcoef = reinterpret_cast<float*>(dcoef);
  a.eps = eps;
  const unsigned int grid = grid_of("demodulation_coefficients", ceil_div(o, kModconvWarps));
  use_device(device);
  const cudaStream_t stream = as_stream(stream_handle);
  with_dtype(dtype, [&](auto d) { demod_forward_kernel<decltype(d)><<<grid, kModconvThreads, 0, stream>>>(a); });
  check_launch("demod_forward_kernel");
}

void modconv_demod_backward(int64_t o, int64_t i, int64_t k, int64_t n, uintptr_t grad, uintptr_t dcoef,
                            uintptr_t weight, int dtype, uintptr_t styles, uintptr_t d_weight, uintptr_t d_styles,
                            uintptr_t w2, int device, uintptr_t stream_handle) {
  DemodArgs a = demod_args(o, i, k, n, weight, dtype, styles);
  for (const uintptr_t ptr : {grad, dcoef, d_weight, d_styles, w2}) {
    if (ptr == 0 || ptr % 4 != 0) {
      fail("demodulation_coefficients", "grad, dcoef, d_weight, d_styles and w2 must be float32 tensors");
    }
  }
  a.grad = reinterpret_cast<const float*>(grad);
  a.dcoef = reinterpret_cast<const float*>(dcoef);
  a.d_weight = reinterpret_cast<float*>(d_weight);
  a.d_styles = reinterpret_cast<float*>(d_styles);
  a.w2 = reinterpret_cast<float*>(w2);
  const unsigned int weight_grid = grid_of("demodulation_coefficients", ceil_div(o * i, kModconvThreads));
  const unsigned int styles_grid = grid_of("demodulation_coefficients", ceil_div(n * i, kModconvThreads));
  use_device(device);
  const cudaStream_t stream = as_stream(stream_handle);
  with_dtype(dtype, [&](auto d) {
    demod_weight_grad_kernel<decltype(d)><<<weight_grid, kModconvThreads, 0, stream>>>(a);
  });
  check_launch("demod_weight_grad_kernel");
  demod_styles_grad_kernel<<<styles_grid, kModconvThreads, 0, stream>>>(a);
  check_launch("demod_styles_grad_kernel");
}

void modconv_epilogue_forward(const ModconvEpilogueProblem& p, uintptr_t y, uintptr_t dcoef, uintptr_t noise,
                              uintptr_t strength, uintptr_t bias, uintptr_t out, uintptr_t stream_handle) {
  const EpilogueArgs a = epilogue_args(p, y, dcoef, noise, strength, bias, out);
  const int vec = vector_width(p.dtype, 16 / element_bytes(p.dtype), {y, out});
  const unsigned int grid = grid_of("modconv_epilogue", ceil_div(ceil_div(a.numel, vec), kModconvThreads));
  use_device(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  with_vector(p.dtype, vec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    with_act(p.act, [&](auto act) {
      epilogue_forward_kernel<decltype(act)::value, D, kVec><<<grid, kModconvThreads, 0, stream>>>(a);
    });
  });
  check_launch("epilogue_forward_kernel");
}

size_t modconv_epilogue_backward_workspace(const ModconvEpilogueProblem& p, uintptr_t dout, uintptr_t y,
                                           uintptr_t dy) {
  EpilogueArgs a = epilogue_args(p, y, 0, 0, 0, 0, dy);
  const int64_t min_chunk = p.channels_last ? kEpilogueRowsMin : kEpilogueChunkMin;
  const int64_t max_chunk = p.channels_last ? kEpilogueRowsMax : kEpilogueChunkMax;
  return static_cast<size_t>(epilogue_backward_split(a, backward_vector(p, dout, y, dy), min_chunk, max_chunk)) *
         sizeof(float);
}

void modconv_epilogue_backward(const ModconvEpilogueProblem& p, uintptr_t dout, uintptr_t y, uintptr_t dcoef,
                               uintptr_t noise, uintptr_t strength, uintptr_t bias, uintptr_t dy, uintptr_t ddcoef,
                               uintptr_t dbias, uintptr_t dstrength, uintptr_t workspace, size_t workspace_bytes,
                               uintptr_t stream_handle) {
  const char* op = "modconv_epilogue";
  EpilogueArgs a = epilogue_args(p, y, dcoef, noise, strength, bias, dy);
  if (dout == 0) fail(op, "dout must be non-null");
  if (ddcoef % 4 != 0 || dbias % 4 != 0 || dstrength % 4 != 0) fail(op, "ddcoef, dbias and dstrength must be float32");
  a.dout = reinterpret_cast<const void*>(dout);
  const int vec = backward_vector(p, dout, y, dy);
  const int64_t min_chunk = p.channels_last ? kEpilogueRowsMin : kEpilogueChunkMin;
  const int64_t max_chunk = p.channels_last ? kEpilogueRowsMax : kEpilogueChunkMax;
  const int64_t partials = epilogue_backward_split(a, vec, min_chunk, max_chunk);
  const bool reduce = ddcoef != 0 || dbias != 0 || dstrength != 0;
  if (reduce) {
    const size_t need = static_cast<size_t>(partials) * sizeof(float);
    if (workspace == 0 || workspace % 4 != 0 || workspace_bytes < need) {
      fail(op, "workspace of " + std::to_string(workspace_bytes) + " bytes, need " + std::to_string(need) +
                   " (modconv_epilogue_backward_workspace)");
    }
    float* const base = reinterpret_cast<float*>(workspace);
    const int64_t per = a.n * a.c * a.chunks;
    a.part_gy = ddcoef != 0 ? base : nullptr;
    a.part_g = dbias != 0 ? base + per : nullptr;
    a.part_gn = dstrength != 0 && noise != 0 ? base + 2 * per : nullptr;
  }
  const unsigned int grid = grid_of(op, epilogue_backward_blocks(a));
  use_device(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  with_vector(p.dtype, vec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    with_act(p.act, [&](auto act) {
      constexpr int kAct = decltype(act)::value;
      if (a.channels_last) {
        epilogue_backward_last_kernel<kAct, D, kVec><<<grid, kModconvThreads, 0, stream>>>(a);
      } else {
        epilogue_backward_first_kernel<kAct, D, kVec><<<grid, kModconvThreads, 0, stream>>>(a);
      }
    });
  });
  check_launch(a.channels_last ? "epilogue_backward_last_kernel" : "epilogue_backward_first_kernel");
  if (!reduce) return;
  EpilogueReduceArgs r{};
  r.part_gy = a.part_gy;
  r.part_g = a.part_g;
  r.part_gn = a.part_gn;
  r.ddcoef = reinterpret_cast<float*>(ddcoef);
  r.dbias = reinterpret_cast<float*>(dbias);
  r.dstrength = reinterpret_cast<float*>(dstrength);
  r.n = a.n;
  r.c = a.c;
  r.chunks = a.chunks;
  r.gn_count = a.part_gn != nullptr ? a.gn_count : 0;  // no noise: dstrength = 0, the empty sum
  const int64_t outputs = (ddcoef != 0 ? a.n * a.c : 0) + (dbias != 0 ? a.c : 0) + (dstrength != 0 ? 1 : 0);
  epilogue_reduce_kernel<<<grid_of(op, ceil_div(outputs, kModconvWarps)), kModconvThreads, 0, stream>>>(r);
  check_launch("epilogue_reduce_kernel");
}

}  // namespace genkernels
