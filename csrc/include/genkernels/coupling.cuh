// The device code of the normalizing-flow steps: the affine coupling (forward, reverse, backward)
// and ActNorm (forward, reverse, backward with its per-channel sums), each one elementwise pass.
//
// Layouts. Every big tensor is dense (N, C, S) in one of two layouts: channels first (element
// (n, c, s) of sample n at memory position p = c*S + s) or channels last (p = s*C + c); h has the
// same layout with its own channel count Ch. Kernels walk memory positions and recover (c, s).
//
// Affine coupling, in float32, with Ca = C / 2, Cb = C - Ca and, for channel c >= Ca, h_s at h's
// channel c - Ca and t at h's channel c - Ca + Cb (additive: t at c - Ca, no h_s):
//     c < Ca:  y = x                      dx = dy
//     c >= Ca: y = x * s + t              dx = dy * s
//              (reverse: y = (x - t) / s)  dh_s = (dy * x * s + dlogdet[n]) * g,  dt = dy
//     logdet[n] = sum over the b-channels and positions of log s  (reverse: its negation)
// with log s = f(h_s) and g = f'(h_s) by scale mode (CouplingScale below); s = exp(log s).
// Accurate expf / log1pf / tanhf / coshf / atanf (not the fast intrinsics): the emulator checks these
// kernels against float64 closely, and log s feeds a long sum.
//
// ActNorm, per channel c: y = (x + bias[c]) * exp(ls[c]) (reverse: y = x * exp(-ls[c]) - bias[c]);
// backward: dx = dy * exp(ls[c]) and the per-channel sums sum_{n,s} dy and sum_{n,s} dy * (x + bias[c]),
// the latter summed as written (not as sum dy x + bias sum dy, whose two terms cancel when |bias| is large
// against x + bias, as after ActNorm's data-dependent initialization on data far from zero).
//
// Work split and determinism. The coupling and ActNorm forward passes cut each sample's C*S
// positions into chunks of `chunk` positions (a multiple of every vector width); block
// (n, k) of a 1-D grid of N * chunks blocks handles chunk k of sample n, its threads taking
// VEC-element vectors round-robin. The coupling forward block sums its log s terms in a fixed tree
// into one float32 partial per (sample, chunk), and row_sum_kernel adds a sample's partials in a
// fixed order (one chunk: the block writes logdet[n] itself). ActNorm's backward writes partial sums
// per (channel, chunk) of positions: channels first, block (c, k) walks chunk k of channel c's N*S
// elements (N runs of S) and reduces over the block; channels last, a block takes a tile of channels
// by a chunk of pixel rows (each pixel a run of C channels): thread (r, v) keeps the sums of channel
// vector v of the tile over rows r, r + R, ... in registers, and the block adds its R row lanes in a
// fixed tree. row_sum_kernel then adds the chunks of each channel in a fixed order. The host picks
// every chunk size from the sizes alone, never from the device: the same bits on every GPU (the
// order within a chunk follows the vector width, so it also depends on the tensors' alignment). No
// atomics.
//
// Vectors. VEC = 16 bytes of the dtype when a vector never straddles a channel run or the a/b
// boundary (channels first: S % VEC == 0; channels last: C, Ca and Ch multiples of VEC) and every
// pointer in use is 16-byte aligned, else VEC = 1. All index arithmetic is 64-bit.
//
// Memory traffic: coupling forward reads x and h once and writes y once (plus one float a block);
// coupling backward reads dy, x_b (only for dh) and h_s once and writes dx and dh once; ActNorm
// reads x (and dy) once and writes y (or dx) once, the parameters coming from L1.
//
// This header is the device code alone. It expects its includer to provide the CUDA built-ins it
// uses (threadIdx, blockIdx, __syncthreads, __shfl_xor_sync, __ldg, __ldcs, __stcs, expf, log1pf,
// tanhf, coshf, atanf, fabsf, fminf, min) and those of the headers it includes. csrc/coupling.cu compiles it
// with nvcc; tests/cuda/emulator/coupling_emu.cpp runs the same source on the CPU.
#pragma once

#include <cstdint>

#include "genkernels/chunk_walk.cuh"

namespace genkernels {

// Scale modes of the affine coupling (log s as a function of h_s). Must match genkernels/cuda/coupling.py.
enum CouplingScale : int {
  kScaleExp = 0,            // log s = h_s
  kScaleSigmoid = 1,        // log s = logsigmoid(h_s + 2)
  kScaleSoftclampTanh = 2,  // log s = clamp * tanh(h_s / clamp)
  kScaleSoftclampAtan = 3,  // log s = 0.636 * clamp * atan(h_s / clamp)
  kScaleAdditive = 4,       // log s = 0, h is t alone
};

namespace {

constexpr int kCouplingThreads = 256;
constexpr float kAtanScale = 0.636f;

// One thread's vectors through [begin, end) of (q, r) pairs, j = q * inner + r.
template <int VEC>
using Walk = VecWalk<kCouplingThreads, VEC>;

// log s and g = d log s / d h_s of VEC pre-activations, in the scale mode (uniform over the grid, so
// the switch sits outside the element loop). Each form stays finite for any finite h:
//   sigmoid: log s = min(z, 0) - log1p(exp(-|z|)), g = sigmoid(-z), z = h + 2 (no log(0), no exp overflow);
//   tanh:    g = 1 / cosh^2 (not 1 - tanh^2, which loses g's relative precision as tanh nears 1; cosh^2 may
//            overflow to inf: g = 0);  atan: g = 0.636 / (1 + u^2) (u^2 may be inf: g = 0).
template <int VEC>
__device__ __forceinline__ void log_scale(int mode, float clamp, const float (&h)[VEC], float (&ls)[VEC],
                                          float (&g)[VEC]) {
  switch (mode) {
    case kScaleSigmoid:
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float z = h[i] + 2.f;
        const float e = expf(-fabsf(z));
        ls[i] = fminf(z, 0.f) - log1pf(e);
        g[i] = (z >= 0.f ? e : 1.f) / (1.f + e);
      }
      break;
    case kScaleSoftclampTanh:
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float u = h[i] / clamp, ch = coshf(u);
        ls[i] = clamp * tanhf(u);
        g[i] = 1.f / (ch * ch);
      }
      break;
    case kScaleSoftclampAtan:
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float u = h[i] / clamp;
        ls[i] = kAtanScale * clamp * atanf(u);
        g[i] = kAtanScale / (1.f + u * u);
      }
      break;
    case kScaleAdditive:
#pragma unroll
      for (int i = 0; i < VEC; ++i) ls[i] = 0.f, g[i] = 0.f;
      break;
    default:  // kScaleExp
#pragma unroll
      for (int i = 0; i < VEC; ++i) ls[i] = h[i], g[i] = 1.f;
  }
}

// What every coupling pass shares: sizes, layout, scale mode and the work split.
struct CouplingShape {
  int64_t c, s;        // channels and positions of x
  int64_t ca, cb, ch;  // a-channels (C / 2), b-channels (C - Ca), channels of h (2 Cb, additive Cb)
  int64_t n;           // C * S, elements per sample
  int64_t chunk;       // positions per chunk, a multiple of every vector width
  int64_t chunks;      // chunks per sample: ceil(n / chunk)
  bool channels_last;
  int scale;    // CouplingScale
  float clamp;  // softclamp modes

  // h's element index of h-channel k at position sp of sample b.
  __device__ __forceinline__ int64_t h_at(int64_t b, int64_t k, int64_t sp) const {
    return b * ch * s + (channels_last ? sp * ch + k : k * s + sp);
  }
  // h-channel of the shift t of b-channel k.
  __device__ __forceinline__ int64_t t_channel(int64_t k) const { return scale == kScaleAdditive ? k : k + cb; }
};

struct CouplingForwardArgs {
  CouplingShape s;
  const void* x;  // the input (y when reverse)
  const void* h;
  void* y;          // the output (x when reverse)
  float* partials;  // (N, chunks) log-det partials (logdet itself when chunks == 1), or nullptr: not wanted
  bool reverse;
};

struct CouplingBackwardArgs {
  CouplingShape s;
  const void* dy;       // or nullptr (zero)
  const float* dlogdet;  // (N,) float32, or nullptr (zero)
  const void* x;
  const void* h;
  void* dx;  // nullptr: not wanted
  void* dh;  // nullptr: not wanted
};

template <class D, int VEC>
__global__ void __launch_bounds__(kCouplingThreads) coupling_forward_kernel(const CouplingForwardArgs a) {
  __shared__ float scratch[32];
  const CouplingShape& sh = a.s;
  int64_t b, chunk;
  split_index(blockIdx.x, sh.chunks, b, chunk);
  const int64_t sample = b * sh.n;
  const int64_t inner = sh.channels_last ? sh.c : sh.s;
  float sum = 0.f;
  for (Walk<VEC> w(chunk * sh.chunk, min(sh.n, (chunk + 1) * sh.chunk), inner); w.valid(); w.next()) {
    const int64_t c = sh.channels_last ? w.r : w.q, sp = sh.channels_last ? w.q : w.r;
    // The vector is all b-channels (or all a-channels, copied as they are). x and h's channels k (the
    // log-scale input; additive: t) and k + cb (affine: t) load together and are decoded after.
    const bool transformed = c >= sh.ca, additive = sh.scale == kScaleAdditive;
    const int64_t k = c - sh.ca;
    const RawT<D, VEC> rx = load_raw<D, VEC, Cache::kStream>(a.x, sample + w.j);
    const RawT<D, VEC> rk = load_raw_if<D, VEC>(transformed, a.h, sh.h_at(b, k, sp));
    const RawT<D, VEC> rt = load_raw_if<D, VEC>(transformed && !additive, a.h, sh.h_at(b, k + sh.cb, sp));
    float x[VEC];
    decode<D, VEC>(rx, x);
    if (transformed) {
      float t[VEC], h[VEC], ls[VEC], g[VEC];
      decode<D, VEC>(rk, h);
      decode<D, VEC>(rt, t);
      if (additive) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) t[i] = h[i], h[i] = 0.f;
      }
      log_scale<VEC>(sh.scale, sh.clamp, h, ls, g);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        x[i] = a.reverse ? (x[i] - t[i]) * expf(-ls[i]) : x[i] * expf(ls[i]) + t[i];
        sum += ls[i];
      }
    }
    store_stream<D, VEC>(a.y, sample + w.j, x);
  }
  if (a.partials != nullptr) {  // uniform over the grid: every thread of the block takes part
    store_block_sum(sum, scratch, a.partials + blockIdx.x, a.reverse ? -1.f : 1.f);
  }
}

template <class D, int VEC>
__global__ void __launch_bounds__(kCouplingThreads) coupling_backward_kernel(const CouplingBackwardArgs a) {
  const CouplingShape& sh = a.s;
  int64_t b, chunk;
  split_index(blockIdx.x, sh.chunks, b, chunk);
  const int64_t sample = b * sh.n;
  const int64_t inner = sh.channels_last ? sh.c : sh.s;
  const float dlogdet = a.dlogdet != nullptr ? __ldg(a.dlogdet + b) : 0.f;
  const bool additive = sh.scale == kScaleAdditive;
  for (Walk<VEC> w(chunk * sh.chunk, min(sh.n, (chunk + 1) * sh.chunk), inner); w.valid(); w.next()) {
    const int64_t c = sh.channels_last ? w.r : w.q, sp = sh.channels_last ? w.q : w.r;
    const int64_t e = sample + w.j;
    const bool scaled = c >= sh.ca && !additive;  // else s = 1: dx = dy; dh is dt = dy alone
    const int64_t k = c - sh.ca;
    // Every load of the step (dy, and for scaled channels h and x) before any is decoded and ahead of the
    // stores (a store may alias a later load for all the compiler knows: loads after a store, or after
    // another load's decode, would wait for it, leaving fewer in flight). Absent ones keep zero bits (0).
    const RawT<D, VEC> rdy = load_raw_if<D, VEC>(a.dy != nullptr, a.dy, e);
    const RawT<D, VEC> rh = load_raw_if<D, VEC>(scaled, a.h, sh.h_at(b, k, sp));
    const RawT<D, VEC> rx = load_raw_if<D, VEC>(scaled && a.dh != nullptr, a.x, e);
    float dy[VEC];
    decode<D, VEC>(rdy, dy);
    if (!scaled) {
      if (a.dx != nullptr) store_stream<D, VEC>(a.dx, e, dy);
      if (c >= sh.ca && a.dh != nullptr) store_stream<D, VEC>(a.dh, sh.h_at(b, k, sp), dy);
      continue;
    }
    float h[VEC], ls[VEC], g[VEC], x[VEC];
    decode<D, VEC>(rh, h);
    decode<D, VEC>(rx, x);
    log_scale<VEC>(sh.scale, sh.clamp, h, ls, g);
#pragma unroll
    for (int i = 0; i < VEC; ++i) ls[i] = expf(ls[i]);  // s
    if (a.dx != nullptr) {
      float dx[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) dx[i] = dy[i] * ls[i];
      store_stream<D, VEC>(a.dx, e, dx);
    }
    if (a.dh != nullptr) {
      float dhs[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) dhs[i] = (dy[i] * x[i] * ls[i] + dlogdet) * g[i];
      store_stream<D, VEC>(a.dh, sh.h_at(b, k, sp), dhs);
      store_stream<D, VEC>(a.dh, sh.h_at(b, k + sh.cb, sp), dy);
    }
  }
}

// out[i] = the sum of row i of a (rows, cols) float32 matrix in a fixed order (row_sum). One block per row.
constexpr int kMergeThreads = 256;

__global__ void __launch_bounds__(kMergeThreads) row_sum_kernel(const float* __restrict__ partials,
                                                                float* __restrict__ out, int64_t cols) {
  __shared__ float scratch[32];
  row_sum<kMergeThreads>(partials, out, cols, scratch);
}

// ActNorm: sizes, layout and the work split.
struct ActNormShape {
  int64_t n, c, s;
  bool channels_last;
  int64_t chunk;   // forward: positions of a sample per chunk; backward: elements (channels first) or
                   // pixel rows (channels last) per chunk
  int64_t chunks;  // forward: chunks per sample; backward: chunks per channel (or per channel tile)
  int tile_vecs;   // backward, channels last: channel vectors in a tile (V); row lanes R = 256 / V
  int64_t tiles;   // backward, channels last: channel tiles, ceil(C / (V * VEC))
};

struct ActNormForwardArgs {
  ActNormShape s;
  const void* x;
  const float* log_scale;  // (C,) float32
  const float* bias;       // (C,) float32
  void* y;
  bool reverse;
};

struct ActNormBackwardArgs {
  ActNormShape s;
  const void* dy;
  const void* x;
  const float* log_scale;  // (C,) float32
  const float* bias;       // (C,) float32
  void* dx;                // nullptr: not wanted
  float* partials;         // (2, C, chunks): sums of dy, then of dy * (x + bias) (the sums when chunks == 1)
};

template <class D, int VEC>
__global__ void __launch_bounds__(kCouplingThreads) actnorm_forward_kernel(const ActNormForwardArgs a) {
  const ActNormShape& sh = a.s;
  int64_t b, chunk;
  split_index(blockIdx.x, sh.chunks, b, chunk);
  const int64_t per_sample = sh.c * sh.s;
  const int64_t sample = b * per_sample;
  const int64_t inner = sh.channels_last ? sh.c : sh.s;
  for (Walk<VEC> w(chunk * sh.chunk, min(per_sample, (chunk + 1) * sh.chunk), inner); w.valid(); w.next()) {
    float x[VEC];
    load_stream<D, VEC>(a.x, sample + w.j, x);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      // Channels first: one channel per vector; channels last: VEC consecutive channels.
      const int64_t c = sh.channels_last ? w.r + i : w.q;
      const float ls = __ldg(a.log_scale + c), bias = __ldg(a.bias + c);
      x[i] = a.reverse ? x[i] * expf(-ls) - bias : (x[i] + bias) * expf(ls);
    }
    store_stream<D, VEC>(a.y, sample + w.j, x);
  }
}

// Channels first: block (c, k) walks chunk k of channel c's N*S elements, j = n*S + s.
template <class D, int VEC>
__global__ void __launch_bounds__(kCouplingThreads) actnorm_backward_first_kernel(const ActNormBackwardArgs a) {
  __shared__ float scratch[32];
  const ActNormShape& sh = a.s;
  int64_t c, chunk;
  split_index(blockIdx.x, sh.chunks, c, chunk);
  const float scale = expf(__ldg(a.log_scale + c)), bias = __ldg(a.bias + c);
  const int64_t total = sh.n * sh.s;
  float sum_dy = 0.f, sum_dyxb = 0.f;
  for (Walk<VEC> w(chunk * sh.chunk, min(total, (chunk + 1) * sh.chunk), sh.s); w.valid(); w.next()) {
    const int64_t e = (w.q * sh.c + c) * sh.s + w.r;
    float dy[VEC], x[VEC];
    load_stream<D, VEC>(a.dy, e, dy);
    load_stream<D, VEC>(a.x, e, x);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      sum_dy += dy[i];
      sum_dyxb += dy[i] * (x[i] + bias);
      dy[i] *= scale;
    }
    if (a.dx != nullptr) store_stream<D, VEC>(a.dx, e, dy);
  }
  store_block_sum(sum_dy, scratch, a.partials + c * sh.chunks + chunk);
  store_block_sum(sum_dyxb, scratch, a.partials + (sh.c + c) * sh.chunks + chunk);
}

// Channels last: block (k, tile) takes pixel rows [k * chunk, (k + 1) * chunk) of channel tile `tile`
// (V vectors of VEC channels); thread (r, v) = (tid / V, tid % V) adds rows r, r + R, ... of its
// vector's channels, then the R row lanes meet in a fixed tree in shared memory.
template <class D, int VEC>
__global__ void __launch_bounds__(kCouplingThreads) actnorm_backward_last_kernel(const ActNormBackwardArgs a) {
  __shared__ float lanes[2 * VEC * kCouplingThreads];  // [sum][vector element][thread]
  const ActNormShape& sh = a.s;
  const int tile_vecs = sh.tile_vecs, rows = kCouplingThreads / tile_vecs;
  const int v = static_cast<int>(threadIdx.x) % tile_vecs, r = static_cast<int>(threadIdx.x) / tile_vecs;
  int64_t chunk, tile;
  split_index(blockIdx.x, sh.tiles, chunk, tile);
  const int64_t c0 = (tile * tile_vecs + v) * VEC;
  const bool active = r < rows && c0 < sh.c;  // with VEC > 1, C % VEC == 0: the whole vector is in range
  float sum_dy[VEC], sum_dyxb[VEC], scale[VEC], bias[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    sum_dy[i] = sum_dyxb[i] = 0.f;
    scale[i] = active ? expf(__ldg(a.log_scale + c0 + i)) : 0.f;
    bias[i] = active ? __ldg(a.bias + c0 + i) : 0.f;
  }
  if (active) {
    const int64_t end = min(sh.n * sh.s, (chunk + 1) * sh.chunk);
    for (int64_t q = chunk * sh.chunk + r; q < end; q += rows) {
      const int64_t e = q * sh.c + c0;
      float dy[VEC], x[VEC];
      load_stream<D, VEC>(a.dy, e, dy);
      load_stream<D, VEC>(a.x, e, x);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        sum_dy[i] += dy[i];
        sum_dyxb[i] += dy[i] * (x[i] + bias[i]);
        dy[i] *= scale[i];
      }
      if (a.dx != nullptr) store_stream<D, VEC>(a.dx, e, dy);
    }
  }
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    lanes[i * kCouplingThreads + tid] = sum_dy[i];
    lanes[(VEC + i) * kCouplingThreads + tid] = sum_dyxb[i];
  }
  // Row lane r adds lane r + half while the live lanes halve (rounded up): a fixed tree for any R.
  for (int live = rows; live > 1;) {
    const int half = (live + 1) / 2;
    __syncthreads();
    if (r < live - half) {
#pragma unroll
      for (int k = 0; k < 2 * VEC; ++k) {
        lanes[k * kCouplingThreads + tid] += lanes[k * kCouplingThreads + tid + half * tile_vecs];
      }
    }
    live = half;
  }
  __syncthreads();
  if (r == 0 && active) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      a.partials[(c0 + i) * sh.chunks + chunk] = lanes[i * kCouplingThreads + tid];
      a.partials[(sh.c + c0 + i) * sh.chunks + chunk] = lanes[(VEC + i) * kCouplingThreads + tid];
    }
  }
}

}  // namespace
}  // namespace genkernels
