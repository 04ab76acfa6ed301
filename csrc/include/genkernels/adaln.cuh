// Adaptive LayerNorm (adaLN) row kernels: layer_norm_modulate, gated_residual and their fusion, forward
// and backward: device code.
//
// Every big tensor is (B, L, D) with a contiguous last dim; its row r = b L + l starts at element
// b sb + l sl (an Operand). A per-sample (B, D) modulation is the same with sl = 0. Per row, in float32:
//     h    = x + gate * res                       (the residual variants, gate 1 when absent; else h = x)
//     LayerNorm: xhat = (h - mean) rstd, mean = sum(h) / D, rstd = rsqrt(sum((h - mean)^2) / D + eps)
//     RMSNorm:   xhat = h rstd,          rstd = rsqrt(sum(h^2) / D + eps)        (mean stored as 0)
//     n    = xhat * weight + bias                 (weight 1 / bias 0 when absent)
//     out  = n * (1 + scale) + shift              (scale 0 / shift 0 when absent)
// The statistics are two exact passes over the row held in registers (sum, then the centered sum of
// squares), not a running sum of squares: fp16 inputs near 1e4 with a small spread keep their precision.
// The residual variants round h to the dtype, write it once and normalize that rounded h (so out is
// exactly the norm of the h they return).
//
// Backward (g = dout * (1 + scale), dxhat = g * weight, c1 = mean(dxhat), c2 = mean(dxhat * xhat)):
//     dh     = rstd (dxhat - c1 - xhat c2) + dh_in     (RMSNorm: no c1; dh_in the gradient of the h output)
//     dx     = dh,  dres = dh * gate,  dgate = dh * res
//     dweight = sum_rows g xhat,  dbias = sum_rows g,  dshift = dout,  dscale = dout * n
// xhat comes back from the saved h (or x) and the saved float32 mean and rstd. dshift, dscale and dgate
// are written elementwise for per-token (B, L, D) operands and summed over L for per-sample (B, D) ones.
// gated_residual alone (norm off): dh = dout; the same kernel writes dres and dgate.
//
// Work split: a row is spread over a group of G threads (a multiple of 32, at most 512, or 1024 on the
// scalar path); thread t of the group holds the VEC-element vectors t, t + G, ... (at most
// K of them: in the forward up to 4 vectors of 8 or 4 scalars, adaln_forward_vectors, the kernel compiled
// for K = 2, 3 and 4; in the backward one 8-element vector or 4 scalars, adaln_vectors) in registers
// between the passes. A
// block of 128 threads runs 4 rows of 32-thread groups or 2 of 64 side by side; wider groups own the
// block. Row sums go through a warp butterfly, then (groups wider than a warp) the group's warp
// totals added in warp order from shared memory: every thread of a row sees the same bits.
// The forward is one block per `slots` rows; a thread issues the loads of all its vectors of x (and, in
// the residual variants, a template flag, of res) before it decodes any, and stores h after them (a row
// waits for one DRAM round trip; tests/cuda/test_sass.py reads this off the built kernels). The backward's blocks each take a chunk of consecutive
// rows of one sample (b, chunk p) and walk it `slots` rows at a time, keeping the column sums of their
// rows (dweight, dbias, and the (B, D) dshift, dscale, dgate) in registers; at the end the slots are
// added in slot order and one float32 partial row per block and quantity is written, partials[q][b P +
// p][:]. adaln_reduce_kernel adds them in a fixed order (no atomics: the same bits every run).
// VEC is kAdalnVec = 8 elements when D and every row stride are multiples of 8 and every pointer is
// 16-byte aligned (float32 vectors take two 16-byte accesses), else 1.
// Memory traffic: forward reads x (and res, gate) and the modulation once, writes out (and h) once;
// backward reads h, dout (and dh_in, res, gate) and the modulation once, writes dx (and dres) once and
// the elementwise gradients, plus the partials (per column sum, one float32 row per chunk of at least
// kAdalnMinChunk = 16 rows).
//
// This header is the device code alone; it expects its includer to provide the CUDA built-ins it uses
// (threadIdx, blockIdx, __syncthreads, __shfl_xor_sync, __ldg, __ldcs, __stcs, min, rsqrtf, uint4 and
// make_uint4). csrc/adaln.cu compiles it with nvcc; tests/cuda/emulator runs the same
// source on the CPU. Everything sits in an unnamed namespace (private to the including unit).
#pragma once

#include <cstdint>
#include <type_traits>

#include "genkernels/chunk_walk.cuh"
#include "genkernels/vec.cuh"
#include "genkernels/welford.cuh"

namespace genkernels {
namespace {

constexpr int kAdalnMaxDim = 4096;      // the longest row: 512 threads x 8 elements, or 1024 x 4 scalars

// Threads of a row group (and of a block) at most, and vectors of a row per thread at most, at vector
// width VEC (kAdalnVec or 1): one vector of 8 elements a thread in registers (at most 128 registers for
// 512 threads), or up to 4 scalars (at most 64 registers for 1024 threads). Every dtype takes 8-element
// vectors (float32 as two 16-byte accesses) so that a thread's elements share one address per tensor.
constexpr int kAdalnVec = 8;  // elements of a vector: 16 bytes of fp16 / bf16, two 16-byte loads of float32
__host__ __device__ constexpr int adaln_max_threads(int vec) { return vec == 1 ? 1024 : 512; }
__host__ __device__ constexpr int adaln_vectors(int vec) { return vec == 1 ? 4 : 1; }
// The forward holds up to 4 vectors (or 4 scalars) a thread: it keeps nothing but the row between its
// passes, and a thread's fixed cost (the row's offsets, two group sums, the statistics) is then spread
// over up to 32 elements instead of 8 (adaln_shape's `per`). Its kernel is compiled for K = 2, 3 and 4 a
// thread and launched with the fewest that hold the row (adaln_forward_k): registers grow with K, and fewer
// registers fit more rows on an SM (bf16, sm_90a: K = 3, DiT-XL's D = 1152, 80 registers, 6 blocks of
// 128 threads an SM; K = 4, 92 registers, 5).
__host__ __device__ constexpr int adaln_forward_vectors(int) { return 4; }

// Host: a call of f with std::integral_constant<int, K> for the forward's `count` vectors a thread
// (K = 2 for 1 or 2, else count).
template <class F>
void with_adaln_forward_k(int count, F&& f) {
  if (count <= 2) {
    f(std::integral_constant<int, 2>{});
  } else if (count == 3) {
    f(std::integral_constant<int, 3>{});
  } else {
    f(std::integral_constant<int, 4>{});
  }
}
constexpr int kAdalnBlock = 128;        // block size for groups of 32 or 64 threads
constexpr int kAdalnQuantities = 5;     // column sums: dweight, dbias, dshift, dscale, dgate
constexpr int kReduceCols = 32;         // adaln_reduce_kernel: columns per block
constexpr int kReduceLanes = 8;         // adaln_reduce_kernel: threads per column
enum AdalnQuantity : int { kSumWeight = 0, kSumBias, kSumShift, kSumScale, kSumGate };

// One (B, L, D) or (B, D) tensor: row r = b L + l at element b * sb + l * sl, D contiguous elements.
// dtype is the code of the side operands (modulation, gate, elementwise gradients), which may differ
// from the big tensors' (those are the kernel's template dtype); p is null when absent.
struct Operand {
  const void* p;
  int64_t sb, sl;
  int dtype;
};

// An output laid out the same way.
struct Target {
  void* p;
  int64_t sb, sl;
  int dtype;
};

// Rows and their split. rows = B L; groups of `group` threads, `count` (<= K) vectors a thread,
// `slots` = blockDim / group rows side by side. Backward: `chunks` (P) chunks of `chunk` rows per sample.
struct AdalnShape {
  int64_t rows, len, dim;  // R = B L, L, D
  int group, count, slots;
  int64_t chunk;
  int chunks;
};

struct AdalnForwardArgs {
  AdalnShape s;
  Operand x, res, gate;            // res and gate: residual variants only (res.p null: h = x; gate.p null: 1)
  Operand shift, scale;            // optional modulation
  const void* weight;              // (D,) or null
  const void* bias;                // (D,) or null
  int w_dtype, b_dtype;
  Target h;                        // residual variants: h (big dtype)
  Target out;                      // norm: the normalized, modulated output (big dtype)
  float* mean;                     // (R,) float32, or null
  float* rstd;                     // (R,) float32, or null
  float eps;
  bool norm, rms;
};

struct AdalnBackwardArgs {
  AdalnShape s;
  Operand h;                       // the normalized input (x, or the saved h of the residual variant)
  Operand dout;                    // gradient of out (norm) or of h (norm off)
  Operand dh;                      // norm with a residual: gradient of the h output, or null
  Operand res, gate;               // residual variants, else null
  Operand shift, scale;            // the forward's modulation (shift only says whether there was one)
  const void* weight;
  const void* bias;
  int w_dtype, b_dtype;
  const float* mean;
  const float* rstd;
  Target dx;                       // gradient of x (= of h for the residual variants): big dtype; null: not written
  Target dres;                     // gradient of res: big dtype; null: not written
  Target dshift, dscale, dgate;    // elementwise gradients of (B, L, D) operands (side dtype), or null
  float* partials[kAdalnQuantities];  // per AdalnQuantity: (B P, D) float32 column sums, or null (not wanted;
                                      // kSumShift / kSumScale / kSumGate only for (B, D) operands)
  bool norm, rms;
};

// Host (also run by the emulator's driver, so both launch the same split): rows of D elements at vector
// width vec spread over groups of 32..adaln_max_threads(vec) threads, the fewest threads that hold the row
// with up to `per` vectors a thread (the backward 1; the forward adaln_forward_vectors(vec): D = 1152 in bf16,
// 144 vectors, then runs 64 threads of 3, two rows a block, where one a thread took 160 threads a row);
// 4 or 2 groups of 32 or 64 threads share a block of kAdalnBlock. Backward chunks: `chunk` rows of a
// sample per block (from adaln_chunk); the forward passes 1. count above the kernel's K (D > kAdalnMaxDim)
// means the row does not fit.
inline AdalnShape adaln_shape(int64_t rows, int64_t len, int64_t dim, int vec, int64_t chunk, int per = 1) {
  AdalnShape s{};
  s.rows = rows;
  s.len = len;
  s.dim = dim;
  const int64_t nvec = dim / vec;
  const int64_t group = ((nvec + per - 1) / per + 31) / 32 * 32;
  s.group = static_cast<int>(group < adaln_max_threads(vec) ? group : adaln_max_threads(vec));
  s.count = static_cast<int>((nvec + s.group - 1) / s.group);
  s.slots = s.group < kAdalnBlock && kAdalnBlock % s.group == 0 ? kAdalnBlock / s.group : 1;
  s.chunk = chunk;
  s.chunks = static_cast<int>((len + chunk - 1) / chunk);
  return s;
}

// Host: a call of f with the dtype's tag and std::integral_constant<int, VEC>, VEC 1 or kAdalnVec (the
// two instantiations of each row kernel).
template <class F>
void with_adaln_vector(int dtype, int vec, F&& f) {
  with_dtype(dtype, [&](auto d) {
    if (vec == 1) {
      f(d, std::integral_constant<int, 1>{});
    } else {
      f(d, std::integral_constant<int, kAdalnVec>{});
    }
  });
}

// Rows of one sample per backward block: with column sums (`partials`), at least kAdalnMinChunk rows (the
// partials then stay under 1/16 of the rows' float32 size) and about 8 blocks per SM over the grid; without,
// one step of the widest block (kAdalnBlock / 32 rows). A multiple of kAdalnBlock / 32 either way, so
// independent of the vector width and group size (the workspace size needs no pointers).
constexpr int64_t kAdalnMinChunk = 16;
inline int64_t adaln_chunk(int64_t rows, int64_t len, bool partials, int sms) {
  constexpr int64_t step = kAdalnBlock / 32;
  if (!partials) return step;
  const int64_t samples = rows / len;
  const int64_t per_sample = (static_cast<int64_t>(sms) * 8 + samples - 1) / samples;
  int64_t chunk = (len + per_sample - 1) / per_sample;
  chunk = chunk < kAdalnMinChunk ? kAdalnMinChunk : chunk;
  return (chunk + step - 1) / step * step;
}

template <class O>
__device__ __forceinline__ int64_t operand_row(const O& o, int64_t b, int64_t l) {
  return b * o.sb + l * o.sl;
}

// VEC elements of dtype S at base[e ..] as float32: 16-byte loads (two for 8 float32), or one element.
// Cache::kKeep (the read-only cache) for the modulation rows and parameters, which every row of a sample
// re-reads; Cache::kStream for the big tensors, read once. Stores stream (never re-read by the kernel).
template <class T, Cache C>
__device__ __forceinline__ T load_cached(const T* p) {
  if constexpr (C == Cache::kStream) {
    return __ldcs(p);
  } else {
    return __ldg(p);
  }
}

// The same in two steps: the raw bits of VEC elements as 32-bit words (a scalar in the low bits of word 0),
// then their decoding. A caller that loads several vectors before it decodes any keeps every load in flight
// at once: a decode next to its load makes the next load wait for this one's data. (vec.cuh's load_raw /
// decode do this for one 16-byte access; a vector here is 8 elements in every dtype, two accesses in float32.)
template <class S, int VEC>
__host__ __device__ constexpr int vector_words() {
  return VEC == 1 ? 1 : VEC * static_cast<int>(sizeof(typename S::Bits)) / 4;
}

template <class S, int VEC, Cache C = Cache::kKeep>
__device__ __forceinline__ void load_words(const void* base, int64_t e, unsigned int (&w)[vector_words<S, VEC>()]) {
  using Bits = typename S::Bits;
  const Bits* p = static_cast<const Bits*>(base) + e;
  if constexpr (VEC == 1) {
    w[0] = static_cast<unsigned int>(load_cached<Bits, C>(p));
  } else {
    constexpr int kBytes = VEC * static_cast<int>(sizeof(Bits));
    static_assert(kBytes % 16 == 0, "whole 16-byte accesses");
#pragma unroll
    for (int c = 0; c < kBytes / 16; ++c) {
      const uint4 q = load_cached<uint4, C>(reinterpret_cast<const uint4*>(p) + c);
      w[4 * c] = q.x, w[4 * c + 1] = q.y, w[4 * c + 2] = q.z, w[4 * c + 3] = q.w;
    }
  }
}

// load_words when `when` holds, else zero bits (0 in every dtype): the load alone in its conditional block.
template <class S, int VEC, Cache C = Cache::kKeep>
__device__ __forceinline__ void load_words_if(bool when, const void* base, int64_t e,
                                              unsigned int (&w)[vector_words<S, VEC>()]) {
#pragma unroll
  for (int i = 0; i < vector_words<S, VEC>(); ++i) w[i] = 0u;
  if (when) load_words<S, VEC, C>(base, e, w);
}

template <class S, int VEC>
__device__ __forceinline__ void decode_words(const unsigned int (&w)[vector_words<S, VEC>()], float (&v)[VEC]) {
  using Bits = typename S::Bits;
  if constexpr (VEC == 1 || sizeof(Bits) == 4) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = S::decode(static_cast<Bits>(w[k]));
  } else {
#pragma unroll
    for (int k = 0; k < VEC / 2; ++k) {
      v[2 * k] = S::decode(static_cast<Bits>(w[k] & 0xffffu));
      v[2 * k + 1] = S::decode(static_cast<Bits>(w[k] >> 16));
    }
  }
}

template <class S, int VEC, Cache C = Cache::kKeep>
__device__ __forceinline__ void load_typed(const void* base, int64_t e, float (&v)[VEC]) {
  unsigned int w[vector_words<S, VEC>()];
  load_words<S, VEC, C>(base, e, w);
  decode_words<S, VEC>(w, v);
}

template <class S, int VEC>
__device__ __forceinline__ void store_typed(void* base, int64_t e, const float (&v)[VEC]) {
  using Bits = typename S::Bits;
  Bits* p = static_cast<Bits*>(base) + e;
  if constexpr (VEC == 1) {
    __stcs(p, S::encode(v[0]));
  } else {
    constexpr int kBytes = VEC * static_cast<int>(sizeof(Bits));
    unsigned int w[kBytes / 4];
    if constexpr (sizeof(Bits) == 4) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) w[k] = S::encode(v[k]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC / 2; ++k) {
        w[k] = static_cast<unsigned int>(S::encode(v[2 * k])) |
               (static_cast<unsigned int>(S::encode(v[2 * k + 1])) << 16);
      }
    }
    static_assert(kBytes % 16 == 0, "whole 16-byte accesses");
#pragma unroll
    for (int c = 0; c < kBytes / 16; ++c) {
      __stcs(reinterpret_cast<uint4*>(p) + c, make_uint4(w[4 * c], w[4 * c + 1], w[4 * c + 2], w[4 * c + 3]));
    }
  }
}

// The same with the dtype known at run time (uniform across the grid).
template <int VEC>
__device__ __forceinline__ void load_side(const void* base, int code, int64_t e, float (&v)[VEC]) {
  if (code == kFloat16) {
    load_typed<F16, VEC>(base, e, v);
  } else if (code == kBFloat16) {
    load_typed<BF16, VEC>(base, e, v);
  } else {
    load_typed<F32, VEC>(base, e, v);
  }
}

template <int VEC>
__device__ __forceinline__ void store_side(void* base, int code, int64_t e, const float (&v)[VEC]) {
  if (code == kFloat16) {
    store_typed<F16, VEC>(base, e, v);
  } else if (code == kBFloat16) {
    store_typed<BF16, VEC>(base, e, v);
  } else {
    store_typed<F32, VEC>(base, e, v);
  }
}

// VEC elements of an optional side operand at row offset `row` + column c, or `fallback` when absent.
template <int VEC>
__device__ __forceinline__ void load_optional(const void* p, int code, int64_t e, float fallback, float (&v)[VEC]) {
  if (p != nullptr) {
    load_side<VEC>(p, code, e, v);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = fallback;
  }
}

// The sum of v over the thread's row group of `group` threads (a multiple of 32 dividing blockDim),
// returned to every thread of the group with the same bits. `scratch` holds 32 floats. Every thread of
// the block must call (groups wider than a warp meet at __syncthreads).
__device__ __forceinline__ float group_sum(float v, float* scratch, int group) {
  v = warp_sum(v);
  if (group == 32) return v;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = group >> 5, first = (static_cast<int>(threadIdx.x) / group) * warps;
  float s = 0.f;
  for (int i = 0; i < warps; ++i) s += scratch[first + i];
  return s;
}

// ---------------------------------------------------------------------------------------------------
// Forward: one row per slot, `slots` rows per block.

template <class D, int VEC, bool RESIDUAL, int K>
__global__ void __launch_bounds__(adaln_max_threads(VEC)) adaln_forward_kernel(const AdalnForwardArgs a) {
  // RESIDUAL: a.res is given (h = x + gate * y first); a template flag, so that the norm alone keeps
  // the fewer registers it needs. K: vectors a thread, at least a.s.count (with_adaln_forward_k).
  static_assert(K >= 1 && K <= adaln_forward_vectors(VEC), "at most adaln_forward_vectors a thread");
  __shared__ float scratch[32];
  const int group = a.s.group;
  const int slot = static_cast<int>(threadIdx.x) / group, t = static_cast<int>(threadIdx.x) % group;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * a.s.slots + slot;
  const bool active = r < a.s.rows;
  int64_t b = 0, l = 0;
  if (active) split_index(r, a.s.len, b, l);
  const int64_t nvec = a.s.dim / VEC;

  // Every load of the row goes out before any of its data is used: the vectors' raw bits are loaded
  // (predicated: the conditional blocks hold nothing but the loads) and decoded after the last load is
  // issued, so a row waits for one DRAM round trip, not one a vector; h's stores come after every load
  // (a store may alias a later load for all the compiler knows).
  constexpr int W = vector_words<D, VEC>();
  float v[K][VEC];
  bool valid[K];
  float sum = 0.f;
  unsigned int xr[K][W];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t col = (t + static_cast<int64_t>(k) * group) * VEC;
    valid[k] = active && k < a.s.count && col < nvec * VEC;
    load_words_if<D, VEC, Cache::kStream>(valid[k], a.x.p, operand_row(a.x, b, l) + col, xr[k]);
  }
  if constexpr (!RESIDUAL) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      decode_words<D, VEC>(xr[k], v[k]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum += v[k][i];
    }
  } else {
    unsigned int yr[K][W];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t col = (t + static_cast<int64_t>(k) * group) * VEC;
      load_words_if<D, VEC, Cache::kStream>(valid[k], a.res.p, operand_row(a.res, b, l) + col, yr[k]);
    }
    // The gate (a side operand, its dtype known at run time: decoded where it is loaded) vector by vector,
    // while x and y are in flight.
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t col = (t + static_cast<int64_t>(k) * group) * VEC;
      float gv[VEC], yv[VEC];  // no gate: the plain residual x + y
      if (valid[k]) {
        load_optional<VEC>(a.gate.p, a.gate.dtype, operand_row(a.gate, b, l) + col, 1.f, gv);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) gv[i] = 0.f;
      }
      decode_words<D, VEC>(xr[k], v[k]);
      decode_words<D, VEC>(yr[k], yv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[k][i] += gv[i] * yv[i];
      // h rounded to the dtype, stored, and normalized as stored: out is the norm of the returned h.
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[k][i] = D::decode(D::encode(v[k][i]));
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum += v[k][i];
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t col = (t + static_cast<int64_t>(k) * group) * VEC;
      if (valid[k]) store_typed<D, VEC>(a.h.p, operand_row(a.h, b, l) + col, v[k]);
    }
  }
  if (!a.norm) return;  // gated_residual: h is the output (uniform: no thread reaches a barrier)

  const float inv_d = 1.f / static_cast<float>(a.s.dim);
  float mean = 0.f;
  if (!a.rms) {
    mean = group_sum(sum, scratch, group) * inv_d;
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[k][i] = valid[k] ? v[k][i] - mean : 0.f;
    }
  }
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) sq += v[k][i] * v[k][i];
  }
  const float rstd = rsqrtf(group_sum(sq, scratch, group) * inv_d + a.eps);
  if (!active) return;
  if (t == 0) {
    if (a.mean != nullptr) a.mean[r] = mean;
    if (a.rstd != nullptr) a.rstd[r] = rstd;
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (!valid[k]) continue;
    const int64_t col = (t + static_cast<int64_t>(k) * group) * VEC;
    float w[VEC], bi[VEC], sc[VEC], sh[VEC];
    load_optional<VEC>(a.weight, a.w_dtype, col, 1.f, w);
    load_optional<VEC>(a.bias, a.b_dtype, col, 0.f, bi);
    load_optional<VEC>(a.scale.p, a.scale.dtype, operand_row(a.scale, b, l) + col, 0.f, sc);
    load_optional<VEC>(a.shift.p, a.shift.dtype, operand_row(a.shift, b, l) + col, 0.f, sh);
    float o[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] = (v[k][i] * rstd * w[i] + bi[i]) * (1.f + sc[i]) + sh[i];
    store_typed<D, VEC>(a.out.p, operand_row(a.out, b, l) + col, o);
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward: block b P + p walks rows [p chunk, min((p + 1) chunk, L)) of sample b, `slots` at a time.

template <class D, int VEC>
__global__ void __launch_bounds__(adaln_max_threads(VEC)) adaln_backward_kernel(const AdalnBackwardArgs a) {
  constexpr int K = adaln_vectors(VEC);
  constexpr int Q = kAdalnQuantities;
  __shared__ float scratch[32];
  const int group = a.s.group, slots = a.s.slots;
  const int slot = static_cast<int>(threadIdx.x) / group, t = static_cast<int>(threadIdx.x) % group;
  const int64_t b = static_cast<int64_t>(blockIdx.x) / a.s.chunks;
  const int64_t p = static_cast<int64_t>(blockIdx.x) - b * a.s.chunks;
  const int64_t l_begin = p * a.s.chunk;
  const int64_t l_end = min(l_begin + a.s.chunk, a.s.len);
  const int64_t nvec = a.s.dim / VEC;
  const float inv_d = 1.f / static_cast<float>(a.s.dim);
  const bool residual = a.res.p != nullptr;

  float acc[Q][K][VEC];
#pragma unroll
  for (int q = 0; q < Q; ++q) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[q][k][i] = 0.f;
    }
  }

  // Every slot takes the same number of steps (inactive rows join the group sums with zeros).
  for (int64_t l0 = l_begin; l0 < l_end; l0 += slots) {
    const int64_t l = l0 + slot;
    const bool active = l < l_end;
    const int64_t r = b * a.s.len + l;
    float mean = 0.f, rstd = 1.f;
    if (active && a.norm) {
      mean = a.mean[r];
      rstd = a.rstd[r];
    }
    float xhat[K][VEC], dxh[K][VEC];
    bool valid[K];
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t col = (t + static_cast<int64_t>(k) * group) * VEC;
      valid[k] = active && k < a.s.count && col < nvec * VEC;
#pragma unroll
      for (int i = 0; i < VEC; ++i) xhat[k][i] = dxh[k][i] = 0.f;
      if (!valid[k]) continue;
      float dout[VEC];
      load_typed<D, VEC, Cache::kStream>(a.dout.p, operand_row(a.dout, b, l) + col, dout);
      if (!a.norm) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) dxh[k][i] = dout[i];  // dh = dout
        continue;
      }
      float hv[VEC], w[VEC], bi[VEC], sc[VEC];
      load_typed<D, VEC, Cache::kStream>(a.h.p, operand_row(a.h, b, l) + col, hv);
      load_optional<VEC>(a.weight, a.w_dtype, col, 1.f, w);
      load_optional<VEC>(a.scale.p, a.scale.dtype, operand_row(a.scale, b, l) + col, 0.f, sc);
      float dsc[VEC];
      const bool need_n = a.partials[kSumScale] != nullptr || a.dscale.p != nullptr;
      load_optional<VEC>(need_n ? a.bias : nullptr, a.b_dtype, col, 0.f, bi);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float xh = (a.rms ? hv[i] : hv[i] - mean) * rstd;
        const float g = dout[i] * (1.f + sc[i]);
        const float d = g * w[i];
        xhat[k][i] = xh;
        dxh[k][i] = d;
        s1 += d;
        s2 += d * xh;
        acc[kSumWeight][k][i] += g * xh;
        acc[kSumBias][k][i] += g;
        acc[kSumShift][k][i] += dout[i];
        dsc[i] = need_n ? dout[i] * (xh * w[i] + bi[i]) : 0.f;
        acc[kSumScale][k][i] += dsc[i];
      }
      if (a.dshift.p != nullptr) store_side<VEC>(a.dshift.p, a.dshift.dtype, operand_row(a.dshift, b, l) + col, dout);
      if (a.dscale.p != nullptr) store_side<VEC>(a.dscale.p, a.dscale.dtype, operand_row(a.dscale, b, l) + col, dsc);
    }
    float c1 = 0.f, c2 = 0.f;
    if (a.norm) {
      if (!a.rms) c1 = group_sum(s1, scratch, group) * inv_d;
      c2 = group_sum(s2, scratch, group) * inv_d;
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (!valid[k]) continue;
      const int64_t col = (t + static_cast<int64_t>(k) * group) * VEC;
      float dh[VEC];
      if (a.norm) {
        float extra[VEC];
        if (a.dh.p != nullptr) {
          load_typed<D, VEC, Cache::kStream>(a.dh.p, operand_row(a.dh, b, l) + col, extra);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) extra[i] = 0.f;
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) dh[i] = rstd * (dxh[k][i] - c1 - xhat[k][i] * c2) + extra[i];
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) dh[i] = dxh[k][i];
      }
      if (a.dx.p != nullptr) store_typed<D, VEC>(a.dx.p, operand_row(a.dx, b, l) + col, dh);
      if (residual) {
        float rv[VEC], gv[VEC], dr[VEC], dg[VEC];
        load_typed<D, VEC, Cache::kStream>(a.res.p, operand_row(a.res, b, l) + col, rv);
        load_side<VEC>(a.gate.p, a.gate.dtype, operand_row(a.gate, b, l) + col, gv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          dr[i] = dh[i] * gv[i];
          dg[i] = dh[i] * rv[i];
          acc[kSumGate][k][i] += dg[i];
        }
        if (a.dres.p != nullptr) store_typed<D, VEC>(a.dres.p, operand_row(a.dres, b, l) + col, dr);
        if (a.dgate.p != nullptr) store_side<VEC>(a.dgate.p, a.dgate.dtype, operand_row(a.dgate, b, l) + col, dg);
      }
    }
  }

  // Column sums: slot 0 adds the other slots' in slot order (through shared memory), then writes
  // the block's partial row of each wanted quantity.
  __shared__ float columns[kAdalnBlock * K * VEC];
  const int64_t part_row = static_cast<int64_t>(blockIdx.x) * a.s.dim;
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    if (a.partials[q] == nullptr) continue;  // uniform
    if (slots > 1) {
      __syncthreads();
#pragma unroll
      for (int k = 0; k < K; ++k) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) columns[(k * VEC + i) * kAdalnBlock + threadIdx.x] = acc[q][k][i];
      }
      __syncthreads();
      if (slot == 0) {
        for (int s = 1; s < slots; ++s) {
#pragma unroll
          for (int k = 0; k < K; ++k) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[q][k][i] += columns[(k * VEC + i) * kAdalnBlock + s * group + t];
          }
        }
      }
    }
    if (slot != 0) continue;
    float* out = a.partials[q] + part_row;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t col = (t + static_cast<int64_t>(k) * group) * VEC;
      if (k < a.s.count && col < nvec * VEC) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[col + i] = acc[q][k][i];
      }
    }
  }
}

// out[g, d] = sum over k < K of partials[(g K + k) D + d] (g < G), in a fixed order: lane j of a
// column adds k = j, j + kReduceLanes, ..., then the lanes are added in lane order. A block covers
// kReduceCols columns of one g; out has dtype code out_dtype.
struct AdalnReduceArgs {
  const float* partials;
  void* out;
  int out_dtype;
  int64_t groups, terms, dim, col_blocks;  // G, K, D, ceil(D / kReduceCols)
};

__global__ void __launch_bounds__(kReduceCols * kReduceLanes) adaln_reduce_kernel(const AdalnReduceArgs a) {
  __shared__ float lanes[kReduceLanes][kReduceCols];
  const int64_t g = static_cast<int64_t>(blockIdx.x) / a.col_blocks;
  const int64_t d = (static_cast<int64_t>(blockIdx.x) - g * a.col_blocks) * kReduceCols + threadIdx.x % kReduceCols;
  const int lane = static_cast<int>(threadIdx.x) / kReduceCols;
  float s = 0.f;
  if (d < a.dim) {
    for (int64_t k = lane; k < a.terms; k += kReduceLanes) s += a.partials[(g * a.terms + k) * a.dim + d];
  }
  lanes[lane][threadIdx.x % kReduceCols] = s;
  __syncthreads();
  if (lane == 0 && d < a.dim) {
    float total = 0.f;
    for (int j = 0; j < kReduceLanes; ++j) total += lanes[j][threadIdx.x];
    store_param(a.out, a.out_dtype, g * a.dim + d, total);
  }
}

}  // namespace
}  // namespace genkernels
