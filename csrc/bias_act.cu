// Fused bias + activation, forward and gradient map: argument checks and launches. The kernels,
// and the description of what they compute, are in genkernels/bias_act.cuh, compiled here with
// nvcc (tests/cuda/emulator runs the same source on the CPU).
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "genkernels/api.h"
#include "genkernels/bias_act.cuh"
#include "genkernels/runtime.cuh"

namespace genkernels {
namespace {

void fail(const std::string& what) { throw std::invalid_argument("genkernels: bias_act: " + what); }

// Blocks of the 1-D grid: one thread per vector (or per element, VEC = 1).
unsigned int check_problem(const BiasActProblem& p, int vec) {
  if (p.n <= 0) fail("n must be > 0, got " + std::to_string(p.n));
  if (p.stride_c <= 0 || p.channels <= 0) {
    fail("stride_c and channels must be > 0, got " + std::to_string(p.stride_c) + " and " +
         std::to_string(p.channels));
  }
  if (p.act < 0 || p.act >= kActCount) fail("unknown activation code " + std::to_string(p.act));
  element_bytes(p.dtype);
  const int64_t blocks = ceil_div(ceil_div(p.n, vec), kBiasActThreads);
  if (blocks > INT32_MAX) fail(std::to_string(p.n) + " elements need more than 2^31 - 1 blocks");
  return static_cast<unsigned int>(blocks);
}

// A call of f with std::integral_constant<int, ACT> for the activation code.
template <class F>
void with_act(int act, F&& f) {
  switch (act) {
    case kActLinear:
      return f(std::integral_constant<int, kActLinear>{});
    case kActRelu:
      return f(std::integral_constant<int, kActRelu>{});
    case kActLrelu:
      return f(std::integral_constant<int, kActLrelu>{});
    case kActTanh:
      return f(std::integral_constant<int, kActTanh>{});
    case kActSigmoid:
      return f(std::integral_constant<int, kActSigmoid>{});
    case kActSilu:
      return f(std::integral_constant<int, kActSilu>{});
    default:
      return f(std::integral_constant<int, kActGelu>{});
  }
}

BiasActArgs make_args(const BiasActProblem& p, uintptr_t x, uintptr_t dy, uintptr_t bias, uintptr_t out) {
  if (x == 0 || out == 0) fail("x and the output must be non-null");
  if (bias % 4 != 0) fail("bias must be a float32 tensor");
  BiasActArgs a{};
  a.x = reinterpret_cast<const void*>(x);
  a.dy = reinterpret_cast<const void*>(dy);
  a.bias = reinterpret_cast<const float*>(bias);
  a.out = reinterpret_cast<void*>(out);
  a.n = p.n;
  a.stride_c = bias != 0 ? p.stride_c : 1;
  a.channels = bias != 0 ? p.channels : 1;
  a.alpha = p.alpha;
  a.gain = p.gain;
  a.clamp = p.has_clamp ? p.clamp : 0.f;
  a.has_clamp = p.has_clamp;
  return a;
}

}  // namespace

void bias_act_forward(const BiasActProblem& p, uintptr_t x, uintptr_t bias, uintptr_t y, uintptr_t stream_handle) {
  const int vec = vector_width(p.dtype, 16 / element_bytes(p.dtype), {x, y});
  const unsigned int grid = check_problem(p, vec);
  const BiasActArgs a = make_args(p, x, 0, bias, y);
  use_device(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  with_vector(p.dtype, vec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    with_act(p.act, [&](auto act) {
      bias_act_forward_kernel<decltype(act)::value, D, kVec><<<grid, kBiasActThreads, 0, stream>>>(a);
    });
  });
  check_launch("bias_act_forward_kernel");
}

void bias_act_grad(const BiasActProblem& p, uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t dz, int out_dtype,
                   uintptr_t stream_handle) {
  if (out_dtype != p.dtype && out_dtype != kFloat32) fail("out_dtype must be x's dtype or float32");
  if (dy == 0) fail("dy must be non-null");
  const int vec = vector_width(p.dtype, 16 / element_bytes(p.dtype), {dy, x, dz});
  const unsigned int grid = check_problem(p, vec);
  const BiasActArgs a = make_args(p, x, dy, bias, dz);
  use_device(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  with_vector(p.dtype, vec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    with_act(p.act, [&](auto act) {
      constexpr int kAct = decltype(act)::value;
      if (out_dtype == p.dtype) {
        bias_act_grad_kernel<kAct, D, D, kVec><<<grid, kBiasActThreads, 0, stream>>>(a);
      } else if constexpr (!std::is_same_v<D, F32>) {
        bias_act_grad_kernel<kAct, D, F32, kVec><<<grid, kBiasActThreads, 0, stream>>>(a);
      }
    });
  });
  check_launch("bias_act_grad_kernel");
}

}  // namespace genkernels
