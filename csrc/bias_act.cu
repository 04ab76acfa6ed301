// Fused bias + activation, forward and gradient map: argument checks and launches. The kernels,
// and the description of what they compute, are in genkernels/bias_act.cuh, compiled here with
// nvcc (tests/cuda/emulator runs the same source on the CPU).
#include <array>
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

// Blocks of the elementwise kernels' 1-D grid (bias_act_blocks).
unsigned int check_problem(const BiasActProblem& p, int vec) {
  if (p.n <= 0) fail("n must be > 0, got " + std::to_string(p.n));
  if (p.stride_c <= 0 || p.channels <= 0) {
    fail("stride_c and channels must be > 0, got " + std::to_string(p.stride_c) + " and " +
         std::to_string(p.channels));
  }
  if (p.act < 0 || p.act >= kActCount) fail("unknown activation code " + std::to_string(p.act));
  element_bytes(p.dtype);
  const int64_t blocks = bias_act_blocks(p.n, vec);
  if (blocks > INT32_MAX) fail(std::to_string(p.n) + " elements need more than 2^31 - 1 blocks");
  return static_cast<unsigned int>(blocks);
}

bool codable(int act) { return act == kActLinear || act == kActRelu || act == kActLrelu; }

// The codes pointer of a call that passes one (2-byte aligned: the gradients read 16-bit words).
void check_codes(const BiasActProblem& p, uintptr_t codes) {
  if (!codable(p.act)) fail("gradient codes are for linear, relu and lrelu, got activation code " + std::to_string(p.act));
  if (codes % 2 != 0) fail("codes must be 2-byte aligned");
}

BiasActArgs make_args(const BiasActProblem& p, uintptr_t x, uintptr_t dy, uintptr_t bias, uintptr_t out,
                      uintptr_t codes = 0) {
  if ((x == 0 && codes == 0) || out == 0) fail("x (or the codes) and the output must be non-null");
  if (p.bias_dtype != kFloat32 && p.bias_dtype != kFloat16 && p.bias_dtype != kBFloat16) {
    fail("bias_dtype must be float32, float16 or bfloat16, got code " + std::to_string(p.bias_dtype));
  }
  if (bias % static_cast<uintptr_t>(element_bytes(p.bias_dtype)) != 0) fail("bias is not aligned to its dtype");
  BiasActArgs a{};
  a.x = reinterpret_cast<const void*>(x);
  a.dy = reinterpret_cast<const void*>(dy);
  a.bias = reinterpret_cast<const void*>(bias);
  a.bias_dtype = p.bias_dtype;
  a.out = reinterpret_cast<void*>(out);
  a.n = p.n;
  a.stride_c = bias != 0 ? p.stride_c : 1;
  a.channels = bias != 0 ? p.channels : 1;
  a.alpha = p.alpha;
  a.gain = p.gain;
  a.clamp = p.has_clamp ? p.clamp : 0.f;
  a.has_clamp = p.has_clamp;
  a.codes = reinterpret_cast<void*>(codes);
  return a;
}

}  // namespace

void bias_act_forward(const BiasActProblem& p, uintptr_t x, uintptr_t bias, uintptr_t y, uintptr_t stream_handle,
                      uintptr_t codes) {
  const int wide = 16 / element_bytes(p.dtype);
  const int vec = vector_width(p.dtype, wide, {x, y});
  const unsigned int grid = check_problem(p, vec);
  if (codes != 0) {
    check_codes(p, codes);
    if (vec != wide) fail("gradient codes need x and y 16-byte aligned");
  }
  const BiasActArgs a = make_args(p, x, 0, bias, y, codes);
  use_device(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  with_vector(p.dtype, vec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    with_act(p.act, [&](auto act) {
      constexpr int kAct = decltype(act)::value;
      if constexpr (kCodable<kAct> && kVec > 1) {
        if (codes != 0) {
          bias_act_forward_kernel<kAct, D, kVec, true><<<grid, kBiasActThreads, 0, stream>>>(a);
          return;
        }
      }
      bias_act_forward_kernel<kAct, D, kVec><<<grid, kBiasActThreads, 0, stream>>>(a);
    });
  });
  check_launch("bias_act_forward_kernel");
}

int64_t bias_act_codes_bytes(int64_t n) {
  if (n < 0) fail("n must be >= 0, got " + std::to_string(n));
  return 2 * ((n + 7) / 8);
}

void bias_act_grad(const BiasActProblem& p, uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t dz, int out_dtype,
                   uintptr_t stream_handle, uintptr_t codes) {
  if (out_dtype != p.dtype && out_dtype != kFloat32) fail("out_dtype must be x's dtype or float32");
  if (dy == 0) fail("dy must be non-null");
  if (codes != 0) check_codes(p, codes);
  const int vec = vector_width(p.dtype, 16 / element_bytes(p.dtype), {dy, codes != 0 ? 0 : x, dz});
  const unsigned int grid = check_problem(p, vec);
  const BiasActArgs a = make_args(p, codes != 0 ? 0 : x, dy, bias, dz, codes);
  use_device(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  with_vector(p.dtype, vec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    with_act(p.act, [&](auto act) {
      constexpr int kAct = decltype(act)::value;
      auto launch = [&](auto o, auto from_codes) {
        using O = decltype(o);
        bias_act_grad_kernel<kAct, D, O, kVec, decltype(from_codes)::value><<<grid, kBiasActThreads, 0, stream>>>(a);
      };
      auto with_out = [&](auto from_codes) {
        if (out_dtype == p.dtype) {
          launch(D{}, from_codes);
        } else if constexpr (!std::is_same_v<D, F32>) {
          launch(F32{}, from_codes);
        }
      };
      if constexpr (kCodable<kAct>) {
        with_bool(codes != 0, with_out);
      } else {
        with_out(std::false_type{});
      }
    });
  });
  check_launch("bias_act_grad_kernel");
}

namespace {

BiasGradPlan grad_bias_plan(const BiasActProblem& p, uintptr_t dy, uintptr_t x, uintptr_t dz) {
  check_problem(p, 1);
  if (p.n % (p.channels * p.stride_c) != 0) fail("n must be a multiple of channels * stride_c");
  const int max_vec = 16 / element_bytes(p.dtype);
  const bool aligned = dy % 16 == 0 && x % 16 == 0 && dz % 16 == 0;  // dz 0: no store; x 0: codes
  const BiasGradPlan plan = bias_grad_plan(max_vec, aligned, p.n, p.stride_c, p.channels);
  if (plan.grid_x * plan.grid_y > INT32_MAX) {
    fail("the tiles of " + std::to_string(p.n) + " elements do not fit a grid");
  }
  return plan;
}

}  // namespace

std::array<int64_t, 7> bias_act_grad_bias_plan(const BiasActProblem& p, uintptr_t dy, uintptr_t x, uintptr_t dz) {
  const BiasGradPlan plan = grad_bias_plan(p, dy, x, dz);
  return {plan.vec, plan.tq, plan.per_tile ? 1 : 0, plan.rows, plan.grid_x, plan.grid_y, plan.width};
}

void bias_act_grad_bias(const BiasActProblem& p, uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t dz,
                        uintptr_t partials, int64_t partials_size, uintptr_t stream_handle, uintptr_t codes,
                        uintptr_t dbias) {
  if (dy == 0 || bias == 0 || partials == 0) fail("dy, bias and partials must be non-null");
  if (dbias % static_cast<uintptr_t>(element_bytes(p.bias_dtype)) != 0) fail("dbias is not aligned to its dtype");
  // The finishing kernel's grid (with dbias): a warp a channel.
  constexpr int64_t kWarps = kBiasFinishThreads / 32;
  const int64_t blocks = (p.channels + kWarps - 1) / kWarps;
  if (blocks > INT32_MAX) fail("the bias gradient of " + std::to_string(p.channels) + " channels does not fit a grid");
  if (codes != 0) {
    check_codes(p, codes);
    x = 0;
  }
  const BiasGradPlan plan = grad_bias_plan(p, dy, x, dz);
  if (partials_size != plan.grid_y * plan.width) {
    fail("partials must hold " + std::to_string(plan.grid_y * plan.width) + " floats (bias_act_grad_bias_plan), got " +
         std::to_string(partials_size));
  }
  BiasActArgs a = make_args(p, x, dy, bias, dz == 0 ? dy : dz, codes);  // out is unused without dz
  const BiasGradTile t{reinterpret_cast<float*>(partials), p.n / (p.channels * p.stride_c), p.channels * p.stride_c,
                       plan.rows, plan.width, plan.grid_x, plan.tq, plan.per_tile, dz != 0};
  use_device(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  const unsigned int grid = static_cast<unsigned int>(plan.grid_x * plan.grid_y);
  with_vector(p.dtype, plan.vec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    with_uniform<kVec>(a.stride_c, [&](auto uniform) {
      with_act(p.act, [&](auto act) {
        constexpr int kAct = decltype(act)::value;
        auto launch = [&](auto from_codes) {
          bias_act_grad_bias_kernel<kAct, D, kVec, decltype(uniform)::value, decltype(from_codes)::value>
              <<<grid, kBiasActThreads, 0, stream>>>(a, t);
        };
        if constexpr (kCodable<kAct>) {
          with_bool(codes != 0, launch);
        } else {
          launch(std::false_type{});
        }
      });
    });
  });
  check_launch("bias_act_grad_bias_kernel");
  if (dbias == 0) return;
  const int64_t inner = p.stride_c;
  const BiasGradFinish f{reinterpret_cast<const float*>(partials), reinterpret_cast<void*>(dbias), plan.grid_y,
                         p.channels, plan.per_tile ? inner / (int64_t{plan.tq} * plan.vec) : inner};
  with_dtype(p.bias_dtype, [&](auto o) {
    bias_grad_finish_kernel<decltype(o)><<<static_cast<unsigned int>(blocks), kBiasFinishThreads, 0, stream>>>(f);
  });
  check_launch("bias_grad_finish_kernel");
}

}  // namespace genkernels
