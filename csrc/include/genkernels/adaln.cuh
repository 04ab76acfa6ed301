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
// scalar path), each holding up to K vectors of the row in registers between the passes (the forward up
// to 12 vectors of 8 or 4 scalars, adaln_forward_vectors, compiled for a few K, with_adaln_forward_k; the
// backward one 8-element vector or 4 scalars, adaln_vectors). The forward holds a row in one of two ways
// (adaln_packed): fp16 / bf16 on 8-element vectors as the raw bits, two elements a 32-bit word, decoded
// again in each pass, one warp a row up to D = 3072 and two up to kAdalnMaxDim, lane j of the row's warp w
// holding the vectors w 32 K + j + 32 k; float32 and the scalar path as float32 values, thread t of the
// group holding the vectors t, t + G, .... A block of 128 threads runs 4 rows of 32-thread groups or 2 of
// 64 side by side (the packed forward's blocks, 64 threads: 2 rows of a warp or one of two); wider groups
// own the block. Row sums go through a warp butterfly, then (groups wider than a warp) the group's warp
// totals added in warp order from shared memory: every thread of a row sees the same bits.
// The forward is one block per `slots` rows; a thread issues the loads of all its vectors of x (and, in
// the residual variants, a template flag, of res) before it decodes any, and stores h after them (a row
// waits for one DRAM round trip; tests/cuda/test_sass.py reads this off the built kernels). The backward's
// blocks each take a chunk of consecutive
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
// make_uint4); its few lines of inline PTX (compiler barriers, prefetches) compile only under
// __CUDA_ARCH__. csrc/adaln.cu compiles it with nvcc; tests/cuda/emulator runs the same
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
// The forward keeps nothing but the row between its passes, so it holds several vectors a thread: a thread's
// fixed cost (the row's offsets, two group sums, the statistics) is spread over many elements, and a row
// needs fewer threads. What decides its speed is how many rows an SM holds in flight (each waits for one
// DRAM round trip), so what it holds a row in is chosen for registers (adaln_packed):
// - fp16 / bf16 on 8-element vectors (the packed path): the raw bits as loaded, two elements a 32-bit word
//   (4 registers a vector, against 8 float32), decoded again in each pass (the sum, the centered sum of
//   squares, the output); the residual variants keep h's bits, which are rounded to the dtype anyway (the
//   header's first paragraph), so nothing is lost. Up to kAdalnPackedVectors = 12 vectors a lane: one warp
//   a row up to 384 vectors (D = 3072; the row sums are then warp butterflies alone, no shared memory and
//   no barrier), two warps of up to 8 for longer rows, up to kAdalnMaxDim. Compiled for K = 3, 5, 8 and 12
//   and launched with the fewest that hold the row: DiT-XL's D = 1152 is 144 vectors, 5 a lane (the fifth
//   on half the lanes), FLUX's 3072 is 384, 12 a lane, 4096 two warps of 8, DiT-B's 768 3 a lane. One warp
//   of 16 for D = 4096 would take another instantiation, and the residual variant's x and y bits (all
//   loaded before any is used) would be 128 registers alone. Blocks of kAdalnPackedBlock = 64 threads:
//   blocks of 4 rows would leave up to 3 warps' worth of registers an SM unused (at K = 12, 20 rows where
//   2-row blocks fit 22). Registers and rows an SM: the forward kernel's comment.
// - float32, and the scalar path of every dtype: float32 values, up to 4 vectors of 8 or 4 scalars a
//   thread, rows of 32 to 1024 threads (adaln_shape with 4 a thread: D = 1152 in float32, 144 vectors, runs
//   64 threads of 3); K = 2, 3 and 4 for float32 vectors, K = 4 alone for scalars (a scalar slot costs one
//   register; an instantiation, build time).
__host__ __device__ constexpr bool adaln_packed(int element_bytes, int vec) {
  return element_bytes == 2 && vec == kAdalnVec;
}
constexpr int kAdalnPackedVectors = 12;
constexpr int kAdalnPackedBlock = 64;
__host__ __device__ constexpr int adaln_forward_vectors(int element_bytes, int vec) {
  return adaln_packed(element_bytes, vec) ? kAdalnPackedVectors : 4;
}

// Host: a call of f with std::integral_constant<int, K>, the fewest vectors a thread compiled for dtype D
// at width VEC that hold `count` (adaln_shape's, at most adaln_forward_vectors): the packed path's 3, 5, 8
// or 12, float32 vectors' 2, 3 or 4, the scalar path's 4. Only these K are instantiated (28 forward
// kernels: 16 packed, 6 float32 vectors, 6 scalar).
template <class D, int VEC, class F>
void with_adaln_forward_k(int count, F&& f) {
  if constexpr (adaln_packed(sizeof(typename D::Bits), VEC)) {
    if (count <= 3) {
      f(std::integral_constant<int, 3>{});
    } else if (count <= 5) {
      f(std::integral_constant<int, 5>{});
    } else if (count <= 8) {
      f(std::integral_constant<int, 8>{});
    } else {
      f(std::integral_constant<int, 12>{});
    }
  } else if constexpr (VEC == 1) {
    f(std::integral_constant<int, 4>{});
  } else if (count <= 2) {
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
// with up to `per` vectors a thread (the backward 1; the forward adaln_forward_vectors); groups of 32 or 64
// threads share a block of `block` threads (kAdalnBlock; the packed forward kAdalnPackedBlock,
// adaln_forward_block), wider ones own theirs. Backward chunks: `chunk` rows of a sample per block (from
// adaln_chunk); the forward passes 1. count above the kernel's K (D > kAdalnMaxDim) means the row does not
// fit.
inline AdalnShape adaln_shape(int64_t rows, int64_t len, int64_t dim, int vec, int64_t chunk, int per = 1,
                              int block = kAdalnBlock) {
  AdalnShape s{};
  s.rows = rows;
  s.len = len;
  s.dim = dim;
  const int64_t nvec = dim / vec;
  const int64_t group = ((nvec + per - 1) / per + 31) / 32 * 32;
  s.group = static_cast<int>(group < adaln_max_threads(vec) ? group : adaln_max_threads(vec));
  s.count = static_cast<int>((nvec + s.group - 1) / s.group);
  s.slots = s.group < block && block % s.group == 0 ? block / s.group : 1;
  s.chunk = chunk;
  s.chunks = static_cast<int>((len + chunk - 1) / chunk);
  return s;
}

// Host: the forward's block size, kAdalnPackedBlock on the packed path, else kAdalnBlock.
inline int adaln_forward_block(int element_bytes, int vec) {
  return adaln_packed(element_bytes, vec) ? kAdalnPackedBlock : kAdalnBlock;
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

// The bits of VEC float32 values rounded to dtype S (two 16-bit elements a word, the first in the low half),
// and their streaming store.
template <class S, int VEC>
__device__ __forceinline__ void encode_words(const float (&v)[VEC], unsigned int (&w)[vector_words<S, VEC>()]) {
  using Bits = typename S::Bits;
  if constexpr (VEC == 1 || sizeof(Bits) == 4) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) w[k] = static_cast<unsigned int>(S::encode(v[k]));
  } else {
#pragma unroll
    for (int k = 0; k < VEC / 2; ++k) {
      w[k] = static_cast<unsigned int>(S::encode(v[2 * k])) |
             (static_cast<unsigned int>(S::encode(v[2 * k + 1])) << 16);
    }
  }
}

template <class S, int VEC>
__device__ __forceinline__ void store_words(void* base, int64_t e, const unsigned int (&w)[vector_words<S, VEC>()]) {
  using Bits = typename S::Bits;
  Bits* p = static_cast<Bits*>(base) + e;
  if constexpr (VEC == 1) {
    __stcs(p, static_cast<Bits>(w[0]));
  } else {
    constexpr int kBytes = VEC * static_cast<int>(sizeof(Bits));
    static_assert(kBytes % 16 == 0, "whole 16-byte accesses");
#pragma unroll
    for (int c = 0; c < kBytes / 16; ++c) {
      __stcs(reinterpret_cast<uint4*>(p) + c, make_uint4(w[4 * c], w[4 * c + 1], w[4 * c + 2], w[4 * c + 3]));
    }
  }
}

template <class S, int VEC>
__device__ __forceinline__ void store_typed(void* base, int64_t e, const float (&v)[VEC]) {
  unsigned int w[vector_words<S, VEC>()];
  encode_words<S, VEC>(v, w);
  store_words<S, VEC>(base, e, w);
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

// Element e of a tensor of dtype S, and of a side operand whose dtype code is known at run time (null stays
// null): a row's pointer, from which a thread's vectors lie at constant offsets.
template <class S, class P>
__device__ __forceinline__ P* element_at(P* p, int64_t e) {
  using Bits = std::conditional_t<std::is_const_v<P>, const typename S::Bits, typename S::Bits>;
  return static_cast<Bits*>(p) + e;
}

__device__ __forceinline__ const void* side_at(const void* p, int code, int64_t e) {
  if (p == nullptr) return nullptr;
  return static_cast<const char*>(p) + e * (code == kFloat32 ? 4 : 2);
}

// p, computed here once: without it the compiler moves the row pointer's arithmetic into each vector's
// conditional load and keeps one 64-bit copy a vector live (an 8-byte register pair each), where one
// pointer and constant offsets do.
template <class P>
__device__ __forceinline__ P* row_pointer(P* p) {
#ifdef __CUDA_ARCH__
  uint64_t u = reinterpret_cast<uint64_t>(p);
  asm("mov.b64 %0, %0;" : "+l"(u));
  return reinterpret_cast<P*>(u);
#else
  return p;
#endif
}

// f(i, m[i]) for each element i of the 8-element vector m of an optional side operand at p + e (dtype code
// known at run time; no call when absent). Each dtype's branch loads, decodes and calls f itself: only
// what f updates in place leaves a branch, where decoding one vector for all three dtypes would hold each
// branch's values and their merge in separate registers (measured: 4 to 10 more a thread).
template <class F>
__device__ __forceinline__ void side_each(const void* p, int code, int64_t e, F&& f) {
  if (p == nullptr) return;
  float m[kAdalnVec];
  if (code == kFloat32) {
    load_typed<F32, kAdalnVec>(p, e, m);
#pragma unroll
    for (int i = 0; i < kAdalnVec; ++i) f(i, m[i]);
  } else if (code == kFloat16) {
    load_typed<F16, kAdalnVec>(p, e, m);
#pragma unroll
    for (int i = 0; i < kAdalnVec; ++i) f(i, m[i]);
  } else {
    load_typed<BF16, kAdalnVec>(p, e, m);
#pragma unroll
    for (int i = 0; i < kAdalnVec; ++i) f(i, m[i]);
  }
}

// Element i of a vector of 16-bit dtype S packed two a word (the first in the low half).
template <class S, int N>
__device__ __forceinline__ float word_value(const unsigned int (&w)[N], int i) {
  using Bits = typename S::Bits;
  return S::decode(static_cast<Bits>(i % 2 == 0 ? w[i / 2] & 0xffffu : w[i / 2] >> 16));
}

// w again, through an instruction the compiler cannot see through (an identity byte permutation, one PRMT a
// word), so that a pass that decodes w cannot reuse what the previous pass decoded or computed from it:
// without it the compiler keeps those values, 8 float32 registers a vector between the passes, which is
// what the packed path exists to avoid (an empty asm is not enough: it leaves no trace for ptxas, which
// then merges the passes' identical arithmetic).
template <int N>
__device__ __forceinline__ void opaque_words(unsigned int (&w)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#ifdef __CUDA_ARCH__
    unsigned int o;
    asm volatile("prmt.b32 %0, %1, 0, 0x3210;" : "=r"(o) : "r"(w[i]));
    w[i] = o;
#else
    asm volatile("" : "+r"(w[i]));
#endif
  }
}

// A hint that a thread's K vectors of a side operand (at p + k 256 elements; dtype code known at run time;
// null: none) will be read soon, those of the row (32 k < left): their cache lines are fetched into L1
// without holding a register.
template <int K>
__device__ __forceinline__ void prefetch_side(const void* p, int code, int left) {
#ifdef __CUDA_ARCH__
  if (p == nullptr) return;
  const char* c = static_cast<const char*>(p);
  if (code == kFloat32) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (32 * k < left) asm volatile("prefetch.global.L1 [%0];" : : "l"(c + k * kAdalnVec * 32 * 4));
    }
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (32 * k < left) asm volatile("prefetch.global.L1 [%0];" : : "l"(c + k * kAdalnVec * 32 * 2));
    }
  }
#else
  (void)p, (void)code, (void)left;
#endif
}

// v[0] + ... + v[N - 1] pairwise (N a power of 2): a short dependency chain, the same order every time.
template <int N>
__device__ __forceinline__ float pairwise_sum(const float (&v)[N]) {
  float s[N];
#pragma unroll
  for (int i = 0; i < N; ++i) s[i] = v[i];
#pragma unroll
  for (int n = N / 2; n >= 1; n /= 2) {
#pragma unroll
    for (int i = 0; i < n; ++i) s[i] = s[2 * i] + s[2 * i + 1];
  }
  return s[0];
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

// group_sum for groups of one or two warps (the packed forward's), the same bits: a loop over a run-time
// number of warps, which the compiler unrolls with all its shared-memory reads in flight, would cost
// registers that the packed path's rows need.
__device__ __forceinline__ float group_sum_two(float v, float* scratch, int group) {
  v = warp_sum(v);
  if (group == 32) return v;
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  const int first = static_cast<int>(threadIdx.x >> 6) * 2;
  return (0.f + scratch[first]) + scratch[first + 1];
}

// ---------------------------------------------------------------------------------------------------
// Forward: one row per slot, `slots` rows per block. RESIDUAL: a.res is given (h = x + gate * y first); a
// template flag, so that the norm alone keeps the fewer registers it needs. K: vectors a thread, at least
// a.s.count (with_adaln_forward_k).

// The float path (float32, and the scalar path of every dtype): the row as float32 values in registers.
template <class D, int VEC, bool RESIDUAL, int K>
__device__ __forceinline__ void adaln_forward_floats(const AdalnForwardArgs& a, float* scratch) {
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

// The packed path (fp16 / bf16 on 8-element vectors): the row as its raw bits, 4 words a vector, decoded in
// each pass. The same loads, sums and outputs as the float path; what differs is what lives in registers
// between the passes, and where a thread's vectors lie: lane j of the row's warp w holds the row's vectors
// w 32 K + j + 32 k (k < K), at constant offsets (k 512 bytes) from one pointer a tensor, so that nothing
// a vector but its bits stays in a register.
template <class D, bool RESIDUAL, int K>
__device__ __forceinline__ void adaln_forward_packed(const AdalnForwardArgs& a, float* scratch) {
  constexpr int VEC = kAdalnVec, W = vector_words<D, VEC>();
  constexpr int kStride = 32 * VEC;  // elements from a thread's vector k to its vector k + 1
  const int group = a.s.group;       // 32 or 64 (adaln_shape with kAdalnPackedVectors)
  const int tid = static_cast<int>(threadIdx.x);
  const int slot = group == 32 ? tid >> 5 : tid >> 6, t = tid - slot * group;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * a.s.slots + slot;
  const bool active = r < a.s.rows;
  int64_t b = 0, l = 0;
  if (active) split_index(r, a.s.len, b, l);
  const int nvec = static_cast<int>(a.s.dim / VEC);
  const int first = (t >> 5) * 32 * K + (t & 31);  // the thread's first vector of the row
  const int left = active ? nvec - first : 0;      // its vector k is in the row when 32 k < left
  const int col = first * VEC;                     // the first vector's column

  // Every load of the row before any of its data is used, as on the float path. An absent vector holds
  // zero bits (0 in every dtype), so the plain sums need no test.
  unsigned int xr[K][W];  // x's bits; the residual variants then keep h's there
  const void* xrow = row_pointer(element_at<D>(a.x.p, operand_row(a.x, b, l) + col));
#pragma unroll
  for (int k = 0; k < K; ++k) load_words_if<D, VEC, Cache::kStream>(32 * k < left, xrow, k * kStride, xr[k]);
  unsigned int yr[RESIDUAL ? K : 1][W];
  if constexpr (RESIDUAL) {
    const void* yrow = row_pointer(element_at<D>(a.res.p, operand_row(a.res, b, l) + col));
#pragma unroll
    for (int k = 0; k < K; ++k) load_words_if<D, VEC, Cache::kStream>(32 * k < left, yrow, k * kStride, yr[k]);
  }
  // The per-row side operands are read vector by vector, after the row's data arrives (the gate) or after
  // its two sums (scale, shift). Their cache lines are asked for early (prefetch_side: no register held,
  // where loading the values this early would hold 4 to 8 registers a vector and operand), so that their
  // round trips (L2, or DRAM for per-token operands) overlap the row's: the gate's and (norm alone) the
  // modulation's now, behind x's; with a residual, the modulation's after h is stored, where the pointers
  // no longer add to the registers that x's and y's bits peak at.
  const void* grow = RESIDUAL ? side_at(a.gate.p, a.gate.dtype, operand_row(a.gate, b, l) + col) : nullptr;
  if constexpr (RESIDUAL) {
    prefetch_side<K>(grow, a.gate.dtype, left);
  } else if (a.norm) {
    prefetch_side<K>(side_at(a.scale.p, a.scale.dtype, operand_row(a.scale, b, l) + col), a.scale.dtype, left);
    prefetch_side<K>(side_at(a.shift.p, a.shift.dtype, operand_row(a.shift, b, l) + col), a.shift.dtype, left);
  }

  float sum = 0.f;  // pass 1, vector by vector (each vector pairwise): the same order every run
  if constexpr (!RESIDUAL) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float v[VEC];
      decode_words<D, VEC>(xr[k], v);
      sum += pairwise_sum(v);
    }
  } else {
    // h = x + gate y, rounded to the dtype, replaces x's bits: stored, and normalized as stored (out is the
    // norm of the returned h), so the packed row loses nothing. The gate (its dtype known at run time) is
    // loaded vector by vector and applied in its dtype's branch; h's elements are packed in pairs as soon
    // as both are known.
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float pair[2];
      auto residual = [&](int i, float g) {
        pair[i % 2] = word_value<D>(xr[k], i) + g * word_value<D>(yr[k], i);
        if (i % 2 == 1) {
          xr[k][i / 2] = static_cast<unsigned int>(D::encode(pair[0])) |
                         (static_cast<unsigned int>(D::encode(pair[1])) << 16);
        }
      };
      if (grow != nullptr && 32 * k < left) {
        side_each(grow, a.gate.dtype, k * kStride, residual);
      } else {  // no gate: the plain residual x + y (an absent vector's zeros stay zero)
#pragma unroll
        for (int i = 0; i < VEC; ++i) residual(i, 1.f);
      }
      float hv[VEC];
      decode_words<D, VEC>(xr[k], hv);
      sum += pairwise_sum(hv);
    }
    void* hrow = row_pointer(element_at<D>(a.h.p, operand_row(a.h, b, l) + col));
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (32 * k < left) store_words<D, VEC>(hrow, k * kStride, xr[k]);
    }
  }
  if (!a.norm) return;  // gated_residual: h is the output (uniform: no thread reaches a barrier)
  const void* crow = side_at(a.scale.p, a.scale.dtype, operand_row(a.scale, b, l) + col);
  const void* frow = side_at(a.shift.p, a.shift.dtype, operand_row(a.shift, b, l) + col);
  if constexpr (RESIDUAL) {
    prefetch_side<K>(crow, a.scale.dtype, left);
    prefetch_side<K>(frow, a.shift.dtype, left);
  }

  const float inv_d = 1.f / static_cast<float>(a.s.dim);
  float mean = 0.f;
  if (!a.rms) mean = group_sum_two(sum, scratch, group) * inv_d;
  // Pass 2: the centered sum of squares, from the bits decoded again.
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    opaque_words<W>(xr[k]);
    float v[VEC];
    decode_words<D, VEC>(xr[k], v);
    float part = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float d = v[i] - mean;
      part += d * d;
    }
    sq += 32 * k < left ? part : 0.f;  // an absent vector's zeros are not the row's
  }
  const float rstd = rsqrtf(group_sum_two(sq, scratch, group) * inv_d + a.eps);
  if (!active) return;
  if (t == 0) {
    if (a.mean != nullptr) a.mean[r] = mean;
    if (a.rstd != nullptr) a.rstd[r] = rstd;
  }
  // Pass 3: out, vector by vector, from the bits decoded again; each side operand is applied in place in
  // its dtype's branch (side_each), absent ones not at all: (xhat w + b)(1 + scale) + shift a step at a
  // time, rounded to float32 after each.
  const void* wrow = side_at(a.weight, a.w_dtype, col);
  const void* brow = side_at(a.bias, a.b_dtype, col);
  void* orow = row_pointer(element_at<D>(a.out.p, operand_row(a.out, b, l) + col));
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (32 * k >= left) continue;
    const int e = k * kStride;
    opaque_words<W>(xr[k]);
    float o[VEC];
    decode_words<D, VEC>(xr[k], o);
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] = (o[i] - mean) * rstd;
    side_each(wrow, a.w_dtype, e, [&](int i, float m) { o[i] *= m; });
    side_each(brow, a.b_dtype, e, [&](int i, float m) { o[i] += m; });
    side_each(crow, a.scale.dtype, e, [&](int i, float m) { o[i] += o[i] * m; });  // o (1 + scale)
    side_each(frow, a.shift.dtype, e, [&](int i, float m) { o[i] += m; });
    store_typed<D, VEC>(orow, e, o);
  }
}

// Registers a thread (sm_90a, nvcc 13.0; the bound of 512 threads keeps every instantiation within 128) and
// the rows an SM they allow (65536 registers an SM, allocated a warp at a time in multiples of 8 a thread;
// at most 64 warps and 32 blocks), at the benchmarks' bf16 shapes (fp16 within 2 registers of these):
//   D = 1152, K = 5:   54 registers, 36 rows an SM (81 KiB of x in flight); with the residual 66, 28 rows
//                      (126 KiB of x and y)
//   D = 3072, K = 12:  82 registers, 22 rows (132 KiB); with the residual 124, 16 rows (192 KiB)
// The float path held these rows as float32 values in 64 threads of 3 vectors (D = 1152: 80 registers, 74
// with the residual, 12 rows an SM) and 96 threads of 4 (D = 3072: 92 and 84, 7 rows). K = 3 takes 48 (52
// with the residual), K = 8 64 (98). tests/cuda/test_sass.py bounds these by the row's words plus 44.
template <class D, int VEC, bool RESIDUAL, int K>
__global__ void __launch_bounds__(adaln_max_threads(VEC)) adaln_forward_kernel(const AdalnForwardArgs a) {
  constexpr bool kPacked = adaln_packed(sizeof(typename D::Bits), VEC);
  static_assert(K >= 1 && K <= adaln_forward_vectors(sizeof(typename D::Bits), VEC),
                "at most adaln_forward_vectors a thread");
  __shared__ float scratch[32];
  if constexpr (kPacked) {
    adaln_forward_packed<D, RESIDUAL, K>(a, scratch);
  } else {
    adaln_forward_floats<D, VEC, RESIDUAL, K>(a, scratch);
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
