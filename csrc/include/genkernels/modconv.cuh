// StyleGAN2's modulated convolution, the parts around the convolution: device code of the
// demodulation coefficients (forward and backward) and of the fused epilogue (forward and backward).
//
// Demodulation, in float32, with weight (O, I, K) (K = kh * kw) and styles (N, I):
//     W2[o, i] = sum_k w[o, i, k]^2,   dcoef[n, o] = 1 / sqrt(sum_i s[n, i]^2 W2[o, i] + eps)
//     G = grad * dcoef^3,  d_styles[n, i] = -s[n, i] sum_o G[n, o] W2[o, i],
//                          d_weight[o, i, k] = -w[o, i, k] sum_n G[n, o] s[n, i]^2
// Forward: one warp per row o (kDemodRows rows a block). A pass covers 32 * kDemodPerLane columns i:
// lane l computes W2[o, i] for i = l, l + 32, ... of the pass into registers (the weight is read
// once), then for every n adds s[n, i]^2 W2[o, i] over its columns and the warp adds its lanes in a
// fixed butterfly. With more columns than one pass holds, lane 0 carries the running sum in dcoef
// itself (its own writes, read back by itself). Backward: demod_weight_grad_kernel, one thread per
// (o, i), reads w[o, i, :] once, writes d_weight and W2[o, i] into a float32 (O, I) scratch;
// demod_styles_grad_kernel, one thread per (n, i), adds G[n, o] W2[o, i] over o in order. All sums run
// in a fixed order (deterministic), 1 / sqrtf and not the approximate rsqrtf.
//
// Epilogue. y (N, C, H, W), S = H * W, dense: channels first (element (b, c, s) at (b C + c) S + s) or
// channels last (at (b S + s) C + c); out / dout / dy share y's layout and dtype D. Per element, in
// float32 (the formulas of genkernels/ops/modconv.py):
//     z   = y * dc + (nz * st + bias[c])     (fused multiply-adds; dc = dcoef[b, c] or 1,
//                                              nz = noise[b or 0, s] or 0, st = *strength or 1)
//     out = act(z) * gain, clamped to [-clamp, clamp] when clamped (NaN passes)
//     g   = dout * gain * act'(z) * m    (m: the clamp's pass mask; bias_act.cuh's grad_value)
//     dy  = g * dc,  ddcoef[b, c] = sum_s g y,  dbias[c] = sum_{b, s} g,  dstrength = sum g nz
// with act / act' those of bias_act.cuh. noise is (Nn, 1, H, W) contiguous in its own dtype (fp32,
// fp16 or bf16), Nn = N or 1 (noise_stride S or 0); dcoef and bias are float32; the strength is read
// from device memory (no host synchronization).
//
// Forward work split: as bias_act's, thread v of a 1-D grid handles elements [v VEC, v VEC + VEC) of
// the memory order (a 16-byte vector when all of it lies below the end, else one element at a time);
// the (b, m, r) coordinates of the first element (e = (b D1 + m) D2 + r, (D1, D2) = (C, S) or (S, C))
// are divided out once and stepped element by element.
// Backward work split, deterministic (fixed partials, fixed merge order, no atomics): channels first,
// one warp per unit (plane (b, c), chunk k of its S positions): the lanes take vectors round-robin and
// meet in a warp butterfly; lane 0 writes the unit's partials gy, g and gn at plane * chunks + k.
// Channels last, one block per (sample b, chunk k of its S pixel rows, channel tile t): thread (r, v)
// keeps the sums of channel vector v of the tile over rows r, r + R, ... in registers, the R row lanes
// meet in a fixed tree in shared memory (gy and g at (b C + c) chunks + k) and the block sums its gn
// into one partial (at the block's index). epilogue_reduce_kernel then adds, one warp per output,
// ddcoef[b, c] over k, dbias[c] over (b, k) and dstrength over every gn partial, each in index order.
// The host picks the chunks from the sizes alone (the same bits on every GPU); the order within a
// chunk follows the vector width (channels last: the tile too), so it also depends on alignment.
//
// Memory traffic: forward y read once, out written once; backward dout and y read once, dy written
// once; dcoef, bias, noise and the strength are small side inputs gathered through the read-only cache.
//
// This header is the device code alone; it expects its includer to provide the CUDA built-ins it
// uses (threadIdx, blockIdx, __syncthreads, __shfl_xor_sync, __ldg, __ldcs, __stcs, fmaf, sqrtf and
// those of bias_act.cuh). csrc/modconv.cu compiles it with nvcc; tests/cuda/emulator/modconv_emu.cpp
// runs the same source on the CPU. Everything sits in an unnamed namespace.
#pragma once

#include <cstdint>

#include "genkernels/bias_act.cuh"

namespace genkernels {
namespace {

constexpr int kModconvThreads = 256;
constexpr int kModconvWarps = kModconvThreads / 32;
constexpr int kDemodPerLane = 16;  // W2 columns a lane holds in registers per pass (512 a warp)

struct DemodArgs {
  const void* weight;    // (O, I, K), dtype D
  const float* styles;   // (N, I)
  const float* grad;     // (N, O), backward
  const float* dcoef;    // (N, O), backward input
  float* out_dcoef;      // (N, O), forward output
  float* d_weight;       // (O, I, K)
  float* d_styles;       // (N, I)
  float* w2;             // (O, I) scratch of the backward
  int64_t o, i, k, n;
  float eps;
};

// G[n, o] = grad[n, o] dcoef[n, o]^3.
__device__ __forceinline__ float demod_g(const DemodArgs& a, int64_t n, int64_t o) {
  const float dc = __ldg(a.dcoef + n * a.o + o);
  return __ldg(a.grad + n * a.o + o) * (dc * dc * dc);
}

template <class D>
__global__ void __launch_bounds__(kModconvThreads) demod_forward_kernel(const DemodArgs a) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kModconvWarps + (threadIdx.x >> 5);
  if (o >= a.o) return;  // the whole warp
  const auto* w = static_cast<const typename D::Bits*>(a.weight);
  for (int64_t i0 = 0; i0 < a.i; i0 += 32 * kDemodPerLane) {
    float w2[kDemodPerLane];
#pragma unroll
    for (int j = 0; j < kDemodPerLane; ++j) {
      const int64_t i = i0 + j * 32 + lane;
      float sum = 0.f;
      if (i < a.i) {
        const int64_t base = (o * a.i + i) * a.k;
        for (int64_t k = 0; k < a.k; ++k) {
          const float v = D::decode(__ldg(w + base + k));
          sum = fmaf(v, v, sum);
        }
      }
      w2[j] = sum;
    }
    const bool last = i0 + 32 * kDemodPerLane >= a.i;
    for (int64_t n = 0; n < a.n; ++n) {
      float part = 0.f;
#pragma unroll
      for (int j = 0; j < kDemodPerLane; ++j) {
        const int64_t i = i0 + j * 32 + lane;
        if (i < a.i) {
          const float s = __ldg(a.styles + n * a.i + i);
          part = fmaf(s * s, w2[j], part);
        }
      }
      float total = warp_sum(part);
      if (lane == 0) {
        float* dst = a.out_dcoef + n * a.o + o;
        if (i0 > 0) total += *dst;
        *dst = last ? 1.f / sqrtf(total + a.eps) : total;
      }
    }
  }
}

// One thread per (o, i): d_weight[o, i, :] and W2[o, i].
template <class D>
__global__ void __launch_bounds__(kModconvThreads) demod_weight_grad_kernel(const DemodArgs a) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kModconvThreads + threadIdx.x;
  if (t >= a.o * a.i) return;
  int64_t o, i;
  split_index(t, a.i, o, i);
  float acc = 0.f;
  for (int64_t n = 0; n < a.n; ++n) {
    const float s = __ldg(a.styles + n * a.i + i);
    acc = fmaf(demod_g(a, n, o), s * s, acc);
  }
  const auto* w = static_cast<const typename D::Bits*>(a.weight);
  float w2 = 0.f;
  for (int64_t k = 0; k < a.k; ++k) {
    const float v = D::decode(__ldg(w + t * a.k + k));
    w2 = fmaf(v, v, w2);
    a.d_weight[t * a.k + k] = -v * acc;
  }
  a.w2[t] = w2;
}

// One thread per (n, i): d_styles[n, i], after demod_weight_grad_kernel has written W2.
__global__ void __launch_bounds__(kModconvThreads) demod_styles_grad_kernel(const DemodArgs a) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kModconvThreads + threadIdx.x;
  if (t >= a.n * a.i) return;
  int64_t n, i;
  split_index(t, a.i, n, i);
  float acc = 0.f;
  for (int64_t o = 0; o < a.o; ++o) acc = fmaf(demod_g(a, n, o), __ldg(a.w2 + o * a.i + i), acc);
  a.d_styles[t] = -__ldg(a.styles + t) * acc;
}

// ---------------------------------------------------------------------------------------------
// Epilogue.

struct EpilogueArgs {
  const void* y;          // dtype D, y's layout
  const void* dout;       // backward
  const float* dcoef;     // (N, C) or nullptr
  const void* noise;      // (Nn, S), dtype code noise_dtype, or nullptr
  const float* strength;  // (1,) or nullptr (strength 1)
  const float* bias;      // (C,) or nullptr
  void* out;              // forward: out; backward: dy
  float* part_gy;         // backward partials (nullptr: not wanted)
  float* part_g;
  float* part_gn;
  int64_t numel, n, c, s;
  int64_t d1, d2;  // memory order e = (b d1 + m) d2 + r: (C, S) channels first, (S, C) channels last
  bool channels_last;
  int noise_dtype;
  int64_t noise_stride;  // elements between noise samples: S, or 0 (one noise image for the batch)
  float alpha, gain, clamp;
  bool has_clamp;
  int act;
  int64_t chunk, chunks;  // backward: positions (channels first) or pixel rows (last) per chunk
  int tile_vecs;          // backward, channels last: channel vectors per tile (V), row lanes 256 / V
  int64_t tiles;          // backward, channels last: channel tiles
  int64_t gn_count;       // backward: gn partials (channels first: N C chunks; last: blocks)
};

// Host side: the backward's work split from the sizes alone (and the vector width, which sets the
// channels-last tile), written into a. Channels first: chunks of `min_chunk` * 2^j positions (a
// multiple of every vector width), sized for about kEpilogueTargetUnits warps, at most `max_chunk`.
// Channels last: chunks of pixel rows from `min_chunk` * 2^j, sized for about kEpilogueTargetBlocks
// blocks, tiles of at most kModconvThreads channel vectors. Returns the float32 partials the
// workspace holds: gy and g (N C chunks each), then the gn partials.
constexpr int64_t kEpilogueTargetUnits = 16384;
constexpr int64_t kEpilogueTargetBlocks = 4096;
constexpr int64_t kEpilogueChunkMin = 256, kEpilogueChunkMax = 65536;  // channels first, positions
constexpr int64_t kEpilogueRowsMin = 16, kEpilogueRowsMax = 65536;     // channels last, pixel rows

inline int64_t epilogue_backward_split(EpilogueArgs& a, int vec, int64_t min_chunk, int64_t max_chunk) {
  const int64_t total = a.n * a.c * a.s;
  int64_t chunk = min_chunk, gn_count;
  if (!a.channels_last) {
    const int64_t want = (total + kEpilogueTargetUnits - 1) / kEpilogueTargetUnits;
    while (chunk < want && chunk < max_chunk) chunk *= 2;
    a.chunks = (a.s + chunk - 1) / chunk;
    a.tile_vecs = 0;
    a.tiles = 1;
    gn_count = a.n * a.c * a.chunks;
  } else {
    const int64_t want = (total + kEpilogueTargetBlocks - 1) / kEpilogueTargetBlocks;
    while (chunk * a.c < want && chunk < max_chunk) chunk *= 2;
    a.chunks = (a.s + chunk - 1) / chunk;
    const int64_t vecs = (a.c + vec - 1) / vec;
    a.tile_vecs = static_cast<int>(vecs < kModconvThreads ? vecs : kModconvThreads);
    a.tiles = (a.c + int64_t{a.tile_vecs} * vec - 1) / (int64_t{a.tile_vecs} * vec);
    gn_count = a.n * a.chunks * a.tiles;
  }
  a.chunk = chunk;
  a.gn_count = gn_count;
  return 2 * a.n * a.c * a.chunks + gn_count;
}

// Blocks of the backward's grid (after epilogue_backward_split).
inline int64_t epilogue_backward_blocks(const EpilogueArgs& a) {
  return a.channels_last ? a.n * a.chunks * a.tiles : (a.n * a.c * a.chunks + kModconvWarps - 1) / kModconvWarps;
}

// The side inputs of element (b, c, s): z = fmaf(y, dc, fmaf(nz, st, bias)).
struct EpilogueSide {
  float dc, nz, shift;
};

__device__ __forceinline__ float epilogue_strength(const EpilogueArgs& a) {
  return a.noise != nullptr && a.strength != nullptr ? __ldg(a.strength) : 1.f;
}

__device__ __forceinline__ EpilogueSide epilogue_side(const EpilogueArgs& a, int64_t b, int64_t c, int64_t s,
                                                      float st) {
  EpilogueSide side;
  side.dc = a.dcoef != nullptr ? __ldg(a.dcoef + b * a.c + c) : 1.f;
  side.nz = load_param(a.noise, a.noise_dtype, b * a.noise_stride + s, 0.f);
  const float bias = a.bias != nullptr ? __ldg(a.bias + c) : 0.f;
  side.shift = a.noise != nullptr ? fmaf(side.nz, st, bias) : bias;
  return side;
}

template <int ACT>
__device__ __forceinline__ float epilogue_value(const EpilogueArgs& a, float z) {
  float v = act_value<ACT>(z, a.alpha) * a.gain;
  if (a.has_clamp) v = v < -a.clamp ? -a.clamp : (v > a.clamp ? a.clamp : v);  // NaN passes
  return v;
}

// dout * gain * act'(z) * m, in torch's order (bias_act.cuh's grad_value).
template <int ACT>
__device__ __forceinline__ float epilogue_grad(const EpilogueArgs& a, float z, float dout) {
  return grad_value<ACT>(dout, z, a.alpha, a.gain, a.has_clamp, a.clamp);
}

template <int ACT, class D, int W>
__device__ __forceinline__ void epilogue_forward_elements(const EpilogueArgs& a, int64_t e) {
  float v[W];
  load_stream<D, W>(a.y, e, v);
  int64_t q, r, b, m;
  split_index(e, a.d2, q, r);
  split_index(q, a.d1, b, m);
  const float st = epilogue_strength(a);
#pragma unroll
  for (int i = 0; i < W; ++i) {
    const EpilogueSide side = epilogue_side(a, b, a.channels_last ? r : m, a.channels_last ? m : r, st);
    v[i] = epilogue_value<ACT>(a, fmaf(v[i], side.dc, side.shift));
    if (++r == a.d2) {
      r = 0;
      if (++m == a.d1) {
        m = 0;
        ++b;
      }
    }
  }
  store_stream<D, W>(a.out, e, v);
}

template <int ACT, class D, int VEC>
__global__ void __launch_bounds__(kModconvThreads) epilogue_forward_kernel(const EpilogueArgs a) {
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * kModconvThreads + threadIdx.x) * VEC;
  if (e + VEC <= a.numel) {
    epilogue_forward_elements<ACT, D, VEC>(a, e);
  } else {
    for (int64_t k = e; k < a.numel; ++k) epilogue_forward_elements<ACT, D, 1>(a, k);
  }
}

// Channels first: warp `unit` = (plane b C + c, chunk k) walks positions [k chunk, (k + 1) chunk) of
// its plane; S and the chunk are multiples of VEC, so every vector is whole.
template <int ACT, class D, int VEC>
__global__ void __launch_bounds__(kModconvThreads) epilogue_backward_first_kernel(const EpilogueArgs a) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kModconvWarps + (threadIdx.x >> 5);
  if (unit >= a.n * a.c * a.chunks) return;  // the whole warp
  int64_t plane, k, b, c;
  split_index(unit, a.chunks, plane, k);
  split_index(plane, a.c, b, c);
  const float st = epilogue_strength(a);
  const int64_t end = min(a.s, (k + 1) * a.chunk);
  float sum_gy = 0.f, sum_g = 0.f, sum_gn = 0.f;
  for (int64_t s0 = k * a.chunk + lane * VEC; s0 < end; s0 += 32 * VEC) {
    const int64_t e = plane * a.s + s0;
    float y[VEC], d[VEC];
    load_stream<D, VEC>(a.y, e, y);
    load_stream<D, VEC>(a.dout, e, d);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const EpilogueSide side = epilogue_side(a, b, c, s0 + i, st);
      const float g = epilogue_grad<ACT>(a, fmaf(y[i], side.dc, side.shift), d[i]);
      sum_gy = fmaf(g, y[i], sum_gy);
      sum_g += g;
      sum_gn = fmaf(g, side.nz, sum_gn);
      d[i] = g * side.dc;
    }
    store_stream<D, VEC>(a.out, e, d);
  }
  sum_gy = warp_sum(sum_gy);
  sum_g = warp_sum(sum_g);
  sum_gn = warp_sum(sum_gn);
  if (lane == 0) {
    if (a.part_gy != nullptr) a.part_gy[unit] = sum_gy;
    if (a.part_g != nullptr) a.part_g[unit] = sum_g;
    if (a.part_gn != nullptr) a.part_gn[unit] = sum_gn;
  }
}

// Channels last: block (b, k, t) takes pixel rows [k chunk, (k + 1) chunk) of sample b and channel
// tile t (V vectors of VEC channels; C is a multiple of VEC, so a vector in range is whole).
template <int ACT, class D, int VEC>
__global__ void __launch_bounds__(kModconvThreads) epilogue_backward_last_kernel(const EpilogueArgs a) {
  __shared__ float lanes[2 * VEC * kModconvThreads];  // [sum][vector element][thread]
  __shared__ float scratch[32];
  const int tile_vecs = a.tile_vecs, rows = kModconvThreads / tile_vecs;
  const int tid = static_cast<int>(threadIdx.x);
  const int v = tid % tile_vecs, r = tid / tile_vecs;
  int64_t bk, t, b, k;
  split_index(blockIdx.x, a.tiles, bk, t);
  split_index(bk, a.chunks, b, k);
  const int64_t c0 = (t * tile_vecs + v) * VEC;
  const bool active = r < rows && c0 < a.c;
  const float st = epilogue_strength(a);
  float dc[VEC], bias[VEC], sum_gy[VEC], sum_g[VEC], sum_gn = 0.f;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    sum_gy[i] = sum_g[i] = 0.f;
    dc[i] = active && a.dcoef != nullptr ? __ldg(a.dcoef + b * a.c + c0 + i) : 1.f;
    bias[i] = active && a.bias != nullptr ? __ldg(a.bias + c0 + i) : 0.f;
  }
  if (active) {
    const int64_t end = min(a.s, (k + 1) * a.chunk);
    for (int64_t q = k * a.chunk + r; q < end; q += rows) {
      const int64_t e = (b * a.s + q) * a.c + c0;
      const float nz = load_param(a.noise, a.noise_dtype, b * a.noise_stride + q, 0.f);
      float y[VEC], d[VEC];
      load_stream<D, VEC>(a.y, e, y);
      load_stream<D, VEC>(a.dout, e, d);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float shift = a.noise != nullptr ? fmaf(nz, st, bias[i]) : bias[i];
        const float g = epilogue_grad<ACT>(a, fmaf(y[i], dc[i], shift), d[i]);
        sum_gy[i] = fmaf(g, y[i], sum_gy[i]);
        sum_g[i] += g;
        sum_gn = fmaf(g, nz, sum_gn);
        d[i] = g * dc[i];
      }
      store_stream<D, VEC>(a.out, e, d);
    }
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    lanes[i * kModconvThreads + tid] = sum_gy[i];
    lanes[(VEC + i) * kModconvThreads + tid] = sum_g[i];
  }
  // Row lane r adds lane r + half while the live lanes halve (rounded up): a fixed tree for any R.
  for (int live = rows; live > 1;) {
    const int half = (live + 1) / 2;
    __syncthreads();
    if (r < live - half) {
#pragma unroll
      for (int j = 0; j < 2 * VEC; ++j) {
        lanes[j * kModconvThreads + tid] += lanes[j * kModconvThreads + tid + half * tile_vecs];
      }
    }
    live = half;
  }
  __syncthreads();
  if (r == 0 && active) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int64_t at = (b * a.c + c0 + i) * a.chunks + k;
      if (a.part_gy != nullptr) a.part_gy[at] = lanes[i * kModconvThreads + tid];
      if (a.part_g != nullptr) a.part_g[at] = lanes[(VEC + i) * kModconvThreads + tid];
    }
  }
  const float gn = block_sum(sum_gn, scratch);
  if (tid == 0 && a.part_gn != nullptr) a.part_gn[blockIdx.x] = gn;
}

struct EpilogueReduceArgs {
  const float* part_gy;  // (N C, chunks)
  const float* part_g;   // (N, C, chunks)
  const float* part_gn;  // (gn_count,)
  float* ddcoef;         // (N, C) or nullptr
  float* dbias;          // (C,) or nullptr
  float* dstrength;      // (1,) or nullptr
  int64_t n, c, chunks, gn_count;
};

// One warp per output: ddcoef rows first (when wanted), then dbias, then dstrength; a lane adds
// items lane, lane + 32, ... in order, then the warp's butterfly.
__global__ void __launch_bounds__(kModconvThreads) epilogue_reduce_kernel(const EpilogueReduceArgs a) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  int64_t w = static_cast<int64_t>(blockIdx.x) * kModconvWarps + (threadIdx.x >> 5);
  float sum = 0.f;
  float* dst = nullptr;
  const int64_t dcoef_rows = a.ddcoef != nullptr ? a.n * a.c : 0;
  const int64_t bias_rows = a.dbias != nullptr ? a.c : 0;
  if (w < dcoef_rows) {
    for (int64_t k = lane; k < a.chunks; k += 32) sum += a.part_gy[w * a.chunks + k];
    dst = a.ddcoef + w;
  } else if ((w -= dcoef_rows) < bias_rows) {
    for (int64_t j = lane; j < a.n * a.chunks; j += 32) {
      int64_t b, k;
      split_index(j, a.chunks, b, k);
      sum += a.part_g[(b * a.c + w) * a.chunks + k];
    }
    dst = a.dbias + w;
  } else if (w - bias_rows == 0 && a.dstrength != nullptr) {
    for (int64_t j = lane; j < a.gn_count; j += 32) sum += a.part_gn[j];
    dst = a.dstrength;
  } else {
    return;  // the whole warp
  }
  sum = warp_sum(sum);
  if (lane == 0) *dst = sum;
}

}  // namespace
}  // namespace genkernels
