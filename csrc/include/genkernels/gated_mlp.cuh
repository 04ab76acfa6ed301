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
// is one flat run of n elements in memory order, walked by chunk_walk.cuh's flat_walk (blocks of
// kGatedMlpThreads, kFlatUnroll vectors a thread, every load ahead of the stores; a vector partly past n
// is done one element at a time). VEC is the dtype's 16-byte width when every pointer is 16-byte
// aligned, else 1. Memory traffic: forward x read once, y written once; gradient dy and x read once,
// dx written once.
//
// swiglu: x contiguous is (R, 2, M) in memory (R the product of the dims before the split dim, M half of
// it times the product of the dims after it), y and dy contiguous (R, M), dx like x. The same flat walk
// over y's flat index e; the vector at e is row r = e / M (divided once a vector), column c = e - r M;
// a at r 2M + c = e + r M, b at a + M. VEC is the 16-byte width when M is a multiple of it
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

// Flat walks (chunk_walk.cuh's flat_walk) in blocks of bias_act's size.
constexpr int kGatedMlpThreads = kBiasActThreads;

// Host: blocks of the 1-D grid over n outputs in vectors of vec.
inline int64_t gated_mlp_blocks(int64_t n, int vec) { return flat_blocks(n, kGatedMlpThreads, vec); }

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

// y of W elements, in place of x.
template <int W>
__device__ __forceinline__ void gelu_tanh_values(float (&x)[W]) {
#pragma unroll
  for (int i = 0; i < W; ++i) {
    float s, sc;
    gelu_tanh_halves(x[i], s, sc);
    x[i] *= s;
  }
}

// dx of W elements, in place of dy.
template <int W>
__device__ __forceinline__ void gelu_tanh_grad_values(const float (&x)[W], float (&dy)[W]) {
#pragma unroll
  for (int i = 0; i < W; ++i) {
    float s, sc;
    gelu_tanh_halves(x[i], s, sc);
    const float du = kGeluBeta * (1.f + 3.f * kGeluKappa * x[i] * x[i]);
    dy[i] *= s * (1.f + 2.f * x[i] * sc * du);
  }
}

// y = silu(a) b of W elements, in place of a.
template <int W>
__device__ __forceinline__ void swiglu_values(float (&xa)[W], const float (&xb)[W]) {
#pragma unroll
  for (int i = 0; i < W; ++i) {
    float s, sc;
    sigmoid_pair(xa[i], s, sc);
    xa[i] = xa[i] * s * xb[i];
  }
}

// (da, db) of W elements, in place of (a, b).
template <int W>
__device__ __forceinline__ void swiglu_grad_values(float (&xa)[W], float (&xb)[W], const float (&dy)[W]) {
#pragma unroll
  for (int i = 0; i < W; ++i) {
    float s, sc;
    sigmoid_pair(xa[i], s, sc);
    const float da = dy[i] * xb[i] * (s * (1.f + xa[i] * sc));
    xb[i] = dy[i] * (xa[i] * s);
    xa[i] = da;
  }
}

// Offset of a in x for y's flat index e (a vector of VEC outputs lies in one row: M % VEC == 0).
__device__ __forceinline__ int64_t swiglu_a_offset(const GatedMlpArgs& a, int64_t e) {
  int64_t r, c;
  split_index(e, a.cols, r, c);
  return e + r * a.cols;
}

// One element at e, a pass's tail (gelu_tanh's flat runs of a length that is not a multiple of the width;
// swiglu's vectors never straddle n).
template <class D>
__device__ __forceinline__ void gelu_tanh_forward_element(const GatedMlpArgs& a, int64_t e) {
  float x[1];
  load_stream<D, 1>(a.x, e, x);
  gelu_tanh_values<1>(x);
  store_stream<D, 1>(a.out, e, x);
}

template <class D>
__device__ __forceinline__ void gelu_tanh_grad_element(const GatedMlpArgs& a, int64_t e) {
  float x[1], dy[1];
  load_stream<D, 1>(a.x, e, x);
  load_stream<D, 1>(a.dy, e, dy);
  gelu_tanh_grad_values<1>(x, dy);
  store_stream<D, 1>(a.out, e, dy);
}

template <class D>
__device__ __forceinline__ void swiglu_forward_element(const GatedMlpArgs& a, int64_t e) {
  const int64_t ea = swiglu_a_offset(a, e);
  float xa[1], xb[1];
  load_stream<D, 1>(a.x, ea, xa);
  load_stream<D, 1>(a.x, ea + a.cols, xb);
  swiglu_values<1>(xa, xb);
  store_stream<D, 1>(a.out, e, xa);
}

template <class D>
__device__ __forceinline__ void swiglu_grad_element(const GatedMlpArgs& a, int64_t e) {
  const int64_t ea = swiglu_a_offset(a, e);
  float xa[1], xb[1], dy[1];
  load_stream<D, 1>(a.x, ea, xa);
  load_stream<D, 1>(a.x, ea + a.cols, xb);
  load_stream<D, 1>(a.dy, e, dy);
  swiglu_grad_values<1>(xa, xb, dy);
  store_stream<D, 1>(a.out, ea, xa);
  store_stream<D, 1>(a.out, ea + a.cols, xb);
}

template <class D, int VEC>
__global__ void __launch_bounds__(kGatedMlpThreads) gelu_tanh_forward_kernel(const GatedMlpArgs a) {
  RawT<D, VEC> raw[kFlatUnroll];
  flat_walk<kGatedMlpThreads, VEC>(
      a.n, [&](int u, int64_t e) { raw[u] = load_raw<D, VEC, Cache::kStream>(a.x, e); },
      [&](int u, int64_t e) {
        float x[VEC];
        decode<D, VEC>(raw[u], x);
        gelu_tanh_values<VEC>(x);
        store_stream<D, VEC>(a.out, e, x);
      },
      [&](int64_t e) {
        for (int64_t k = e; k < a.n; ++k) gelu_tanh_forward_element<D>(a, k);
      });
}

template <class D, int VEC>
__global__ void __launch_bounds__(kGatedMlpThreads) gelu_tanh_grad_kernel(const GatedMlpArgs a) {
  RawT<D, VEC> raw_x[kFlatUnroll], raw_dy[kFlatUnroll];
  flat_walk<kGatedMlpThreads, VEC>(
      a.n,
      [&](int u, int64_t e) {
        raw_x[u] = load_raw<D, VEC, Cache::kStream>(a.x, e);
        raw_dy[u] = load_raw<D, VEC, Cache::kStream>(a.dy, e);
      },
      [&](int u, int64_t e) {
        float x[VEC], dy[VEC];
        decode<D, VEC>(raw_x[u], x);
        decode<D, VEC>(raw_dy[u], dy);
        gelu_tanh_grad_values<VEC>(x, dy);
        store_stream<D, VEC>(a.out, e, dy);
      },
      [&](int64_t e) {
        for (int64_t k = e; k < a.n; ++k) gelu_tanh_grad_element<D>(a, k);
      });
}

template <class D, int VEC>
__global__ void __launch_bounds__(kGatedMlpThreads) swiglu_forward_kernel(const GatedMlpArgs a) {
  RawT<D, VEC> raw_a[kFlatUnroll], raw_b[kFlatUnroll];
  flat_walk<kGatedMlpThreads, VEC>(
      a.n,
      [&](int u, int64_t e) {
        const int64_t ea = swiglu_a_offset(a, e);
        raw_a[u] = load_raw<D, VEC, Cache::kStream>(a.x, ea);
        raw_b[u] = load_raw<D, VEC, Cache::kStream>(a.x, ea + a.cols);
      },
      [&](int u, int64_t e) {
        float xa[VEC], xb[VEC];
        decode<D, VEC>(raw_a[u], xa);
        decode<D, VEC>(raw_b[u], xb);
        swiglu_values<VEC>(xa, xb);
        store_stream<D, VEC>(a.out, e, xa);
      },
      [&](int64_t e) {
        for (int64_t k = e; k < a.n; ++k) swiglu_forward_element<D>(a, k);
      });
}

template <class D, int VEC>
__global__ void __launch_bounds__(kGatedMlpThreads) swiglu_grad_kernel(const GatedMlpArgs a) {
  RawT<D, VEC> raw_a[kFlatUnroll], raw_b[kFlatUnroll], raw_dy[kFlatUnroll];
  int64_t ea[kFlatUnroll];
  flat_walk<kGatedMlpThreads, VEC>(
      a.n,
      [&](int u, int64_t e) {
        ea[u] = swiglu_a_offset(a, e);
        raw_a[u] = load_raw<D, VEC, Cache::kStream>(a.x, ea[u]);
        raw_b[u] = load_raw<D, VEC, Cache::kStream>(a.x, ea[u] + a.cols);
        raw_dy[u] = load_raw<D, VEC, Cache::kStream>(a.dy, e);
      },
      [&](int u, int64_t) {
        float xa[VEC], xb[VEC], dy[VEC];
        decode<D, VEC>(raw_a[u], xa);
        decode<D, VEC>(raw_b[u], xb);
        decode<D, VEC>(raw_dy[u], dy);
        swiglu_grad_values<VEC>(xa, xb, dy);
        store_stream<D, VEC>(a.out, ea[u], xa);
        store_stream<D, VEC>(a.out, ea[u] + a.cols, xb);
      },
      [&](int64_t e) {
        for (int64_t k = e; k < a.n; ++k) swiglu_grad_element<D>(a, k);
      });
}

}  // namespace
}  // namespace genkernels
