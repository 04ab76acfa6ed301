// The MLP activations of transformer blocks, gelu_tanh and swiglu, forward and gradient map: device code.
//
// Per element, in float32 (the formulas of genkernels/ops/gated_mlp.py):
//   gelu_tanh  y = 0.5 x (1 + tanh u),  u = sqrt(2 / pi) (x + 0.044715 x^3)
//              dx = dy (0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) u'),  u' = sqrt(2 / pi) (1 + 3 * 0.044715 x^2)
//   swiglu     y = silu(a) b = a s b,  da = dy b s (1 + a (1 - s)),  db = dy a s     (s = sigmoid(a))
// gelu_tanh is evaluated through s = sigmoid(2u) = 0.5 (1 + tanh u) and 1 - s, both from bias_act.cuh's
// sigmoid_pair (exp of a non-positive argument: no overflow, no cancellation): y = x s and
// dx = dy s (1 + 2 x (1 - s) u'), since 1 - tanh^2 u = 4 s (1 - s). Unlike 1 + tanh u, neither form
// cancels where u is very negative, so y and dx keep their relative accuracy for x far below 0.
// Accurate expf (not __expf): the emulator checks against float64.
//
// gelu_tanh: x is dense (contiguous or channels last) and y, dy and dx share its strides, so every tensor
// is one flat run of n elements in memory order. Thread v of the 1-D grid (blocks of kGatedMlpThreads)
// handles elements [v VEC, v VEC + VEC): one 16-byte vector when all of it lies below n, else the elements
// that do, one at a time (the tail). VEC is the dtype's 16-byte width when every pointer is 16-byte
// aligned, else 1. Memory traffic: forward x read once, y written once; gradient dy and x read once, dx
// written once.
//
// swiglu: x contiguous is (R, 2, M) in memory (R the product of the dims before the split dim, M half of
// it times the product of the dims after it), y and dy contiguous (R, M), dx like x. Thread v handles the
// VEC outputs [v VEC, v VEC + VEC) of y's flat index e, row r = e / M (divided once per thread), column
// c = e - r M; a at r 2M + c = e + r M, b at a + M. VEC is the 16-byte width when M is a multiple of it
// and every pointer is 16-byte aligned (a vector never straddles a row), else 1. Memory traffic: forward
// a and b read once, y written once; gradient dy, a and b read once, da and db written once.
//
// This header is the device code alone; it expects its includer to provide the CUDA built-ins it uses
// (threadIdx, blockIdx, __ldcs, __stcs, expf, fabsf and those of bias_act.cuh). csrc/gated_mlp.cu
// compiles it with nvcc; tests/cuda/emulator runs the same source on the CPU. Everything sits in an
// unnamed namespace (private to the including unit).
#pragma once

#include <cstdint>

#include "genkernels/bias_act.cuh"
#include "genkernels/chunk_walk.cuh"
#include "genkernels/vec.cuh"

namespace genkernels {
namespace {

// A flat walk of one vector a thread, in blocks of bias_act's size.
constexpr int kGatedMlpThreads = kBiasActThreads;

// First element of this thread's vector.
__device__ __forceinline__ int64_t gated_mlp_first(int vec) {
  return (static_cast<int64_t>(blockIdx.x) * kGatedMlpThreads + threadIdx.x) * vec;
}

struct GatedMlpArgs {
  const void* x;   // gelu_tanh: n elements; swiglu: (rows, 2, cols)
  const void* dy;  // the output's shape (gradients only)
  void* out;       // y, or dx (x's shape)
  int64_t n;       // gelu_tanh: elements; swiglu: rows * cols (y's elements)
  int64_t cols;    // swiglu: M (> 0)
};

constexpr float kGeluBeta = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluKappa = 0.044715f;

// (s, 1 - s) with s = sigmoid(2u) = 0.5 (1 + tanh u), u = sqrt(2 / pi) (x + 0.044715 x^3), as torch forms u.
__device__ __forceinline__ void gelu_tanh_halves(float x, float& s, float& sc) {
  const float u = kGeluBeta * (x + kGeluKappa * x * x * x);
  sigmoid_pair(2.f * u, s, sc);
}

template <class D, int W>
__device__ __forceinline__ void gelu_tanh_forward_elements(const GatedMlpArgs& a, int64_t e) {
  float x[W], y[W];
  load_stream<D, W>(a.x, e, x);
#pragma unroll
  for (int i = 0; i < W; ++i) {
    float s, sc;
    gelu_tanh_halves(x[i], s, sc);
    y[i] = x[i] * s;
  }
  store_stream<D, W>(a.out, e, y);
}

template <class D, int W>
__device__ __forceinline__ void gelu_tanh_grad_elements(const GatedMlpArgs& a, int64_t e) {
  float x[W], dy[W], dx[W];
  load_stream<D, W>(a.x, e, x);
  load_stream<D, W>(a.dy, e, dy);
#pragma unroll
  for (int i = 0; i < W; ++i) {
    float s, sc;
    gelu_tanh_halves(x[i], s, sc);
    const float du = kGeluBeta * (1.f + 3.f * kGeluKappa * x[i] * x[i]);
    dx[i] = dy[i] * (s * (1.f + 2.f * x[i] * sc * du));
  }
  store_stream<D, W>(a.out, e, dx);
}

template <class D, int VEC>
__global__ void __launch_bounds__(kGatedMlpThreads) gelu_tanh_forward_kernel(const GatedMlpArgs a) {
  const int64_t e = gated_mlp_first(VEC);
  if (e + VEC <= a.n) {
    gelu_tanh_forward_elements<D, VEC>(a, e);
  } else {
    for (int64_t k = e; k < a.n; ++k) gelu_tanh_forward_elements<D, 1>(a, k);
  }
}

template <class D, int VEC>
__global__ void __launch_bounds__(kGatedMlpThreads) gelu_tanh_grad_kernel(const GatedMlpArgs a) {
  const int64_t e = gated_mlp_first(VEC);
  if (e + VEC <= a.n) {
    gelu_tanh_grad_elements<D, VEC>(a, e);
  } else {
    for (int64_t k = e; k < a.n; ++k) gelu_tanh_grad_elements<D, 1>(a, k);
  }
}

// Offset of a in x for y's flat index e (a vector of VEC outputs lies in one row: M % VEC == 0).
__device__ __forceinline__ int64_t swiglu_a_offset(const GatedMlpArgs& a, int64_t e) {
  int64_t r, c;
  split_index(e, a.cols, r, c);
  return e + r * a.cols;
}

template <class D, int VEC>
__global__ void __launch_bounds__(kGatedMlpThreads) swiglu_forward_kernel(const GatedMlpArgs a) {
  const int64_t e = gated_mlp_first(VEC);
  if (e >= a.n) return;
  const int64_t ea = swiglu_a_offset(a, e);
  float xa[VEC], xb[VEC], y[VEC];
  load_stream<D, VEC>(a.x, ea, xa);
  load_stream<D, VEC>(a.x, ea + a.cols, xb);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    float s, sc;
    sigmoid_pair(xa[i], s, sc);
    y[i] = xa[i] * s * xb[i];
  }
  store_stream<D, VEC>(a.out, e, y);
}

template <class D, int VEC>
__global__ void __launch_bounds__(kGatedMlpThreads) swiglu_grad_kernel(const GatedMlpArgs a) {
  const int64_t e = gated_mlp_first(VEC);
  if (e >= a.n) return;
  const int64_t ea = swiglu_a_offset(a, e);
  float xa[VEC], xb[VEC], dy[VEC], da[VEC], db[VEC];
  load_stream<D, VEC>(a.x, ea, xa);
  load_stream<D, VEC>(a.x, ea + a.cols, xb);
  load_stream<D, VEC>(a.dy, e, dy);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    float s, sc;
    sigmoid_pair(xa[i], s, sc);
    da[i] = dy[i] * xb[i] * (s * (1.f + xa[i] * sc));
    db[i] = dy[i] * (xa[i] * s);
  }
  store_stream<D, VEC>(a.out, ea, da);
  store_stream<D, VEC>(a.out, ea + a.cols, db);
}

}  // namespace
}  // namespace genkernels
