// Device building blocks of the elementwise passes: the chunked ones (reparam.cuh, coupling.cuh), where
// a block of THREADS threads walks one chunk of a flat index range in VEC-element vectors, and the flat
// ones (bias_act.cuh, gated_mlp.cuh), where a block takes kFlatUnroll vectors a thread; both stream their
// loads and stores past L1, and reduce float32 partials in a fixed order (no atomics: the same bits
// every run).
//
// Expects its includer to provide the CUDA built-ins it uses (threadIdx, __syncthreads,
// __shfl_xor_sync, __ldcs, __stcs, min) and those of vec.cuh and welford.cuh. Everything sits in an
// unnamed namespace, as the kernels built on it are private to the translation unit including them.
#pragma once

#include <cstdint>

#include "genkernels/vec.cuh"
#include "genkernels/welford.cuh"

namespace genkernels {
namespace {

// Quotient and remainder of j by k for non-negative operands; 32-bit division when both fit, as
// they almost always do (64-bit division is a long software sequence on the GPU).
__device__ __forceinline__ void split_index(int64_t j, int64_t k, int64_t& q, int64_t& r) {
  if (((static_cast<uint64_t>(j) | static_cast<uint64_t>(k)) >> 32) == 0) {
    const uint32_t q32 = static_cast<uint32_t>(j) / static_cast<uint32_t>(k);
    q = q32;
    r = j - static_cast<int64_t>(q32) * k;
  } else {
    q = j / k;
    r = j - q * k;
  }
}

// Walks one thread's vectors through [begin, end) of a run of (q, r) pairs, j = q * inner + r, thread
// t starting at begin + t * VEC and advancing THREADS * VEC a step without dividing again.
template <int THREADS, int VEC>
struct VecWalk {
  int64_t j, end, q, r, dq, dr, inner;

  __device__ __forceinline__ VecWalk(int64_t begin, int64_t end_, int64_t inner_) : end(end_), inner(inner_) {
    j = begin + static_cast<int64_t>(threadIdx.x) * VEC;
    q = r = dq = dr = 0;
    if (j < end) {
      split_index(j, inner, q, r);
      split_index(static_cast<int64_t>(THREADS) * VEC, inner, dq, dr);
    }
  }
  __device__ __forceinline__ bool valid() const { return j < end; }
  __device__ __forceinline__ void next() {
    j += static_cast<int64_t>(THREADS) * VEC;
    q += dq;
    r += dr;
    if (r >= inner) {
      r -= inner;
      ++q;
    }
  }
};

// A flat elementwise pass over n elements in vectors of VEC: block b of the 1-D grid covers
// kFlatUnroll * THREADS consecutive vectors, and thread t its vectors t, t + THREADS, ... (each load
// instruction of a warp one contiguous run), loading all of them before storing any: a store may alias
// a later load for all the compiler knows, so interleaving them would leave one vector a thread in
// flight (the memory-level parallelism a streaming kernel lives on).
constexpr int kFlatUnroll = 4;

// Host: blocks of a flat pass's grid (flat_walk) over n elements in vectors of vec.
inline int64_t flat_blocks(int64_t n, int threads, int vec) {
  const int64_t per_block = static_cast<int64_t>(threads) * kFlatUnroll * vec;
  return (n + per_block - 1) / per_block;
}

// A compiler barrier (a memory clobber: no memory access moves across it). Placed after a step's loads,
// it keeps the compiler from sinking the later loads below the first vector's arithmetic, which it does
// when that arithmetic has branches of its own (an IEEE division's slow path): the loads would then go
// out one DRAM round trip apart.
__device__ __forceinline__ void loads_issued() { asm volatile("" ::: "memory"); }

// This thread's vectors of a flat pass: load(u, e) for each vector u (first element e) lying wholly
// below n, then finish(u, e) for those and tail(e) for one partly past n. A block lying wholly below n
// (all but the last) runs without bounds checks.
template <int THREADS, int VEC, class Load, class Finish, class Tail>
__device__ __forceinline__ void flat_walk(int64_t n, Load load, Finish finish, Tail tail) {
  constexpr int U = kFlatUnroll;
  constexpr int64_t kStep = static_cast<int64_t>(THREADS) * VEC;
  const int64_t block_first = static_cast<int64_t>(blockIdx.x) * U * kStep;
  const int64_t first = block_first + static_cast<int64_t>(threadIdx.x) * VEC;
  if (block_first + U * kStep <= n) {
#pragma unroll
    for (int u = 0; u < U; ++u) load(u, first + u * kStep);
    loads_issued();
#pragma unroll
    for (int u = 0; u < U; ++u) finish(u, first + u * kStep);
  } else {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (first + u * kStep + VEC <= n) load(u, first + u * kStep);
    }
    loads_issued();
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t e = first + u * kStep;
      if (e + VEC <= n) {
        finish(u, e);
      } else if (e < n) {
        tail(e);
      }
    }
  }
}

// VEC elements of dtype D at base[elem ..], as float32; read or written once, so streamed past L1.
template <class D, int VEC>
__device__ __forceinline__ void load_stream(const void* base, int64_t elem, float (&v)[VEC]) {
  decode<D, VEC>(load_raw<D, VEC, Cache::kStream>(base, elem), v);
}

template <class D, int VEC>
__device__ __forceinline__ void store_stream(void* base, int64_t elem, const float (&v)[VEC]) {
  store_raw<D, VEC, Cache::kStream>(base, elem, encode<D, VEC>(v));
}

// *out = factor * (the block's sum of v) in block_sum's fixed tree; factor is exact (1, -1, 0.5), so
// it may stand outside the sum. `scratch` holds 32 floats. All threads must call; thread 0 writes.
__device__ __forceinline__ void store_block_sum(float v, float* scratch, float* out, float factor = 1.f) {
  const float total = block_sum(v, scratch);
  if (threadIdx.x == 0) *out = factor * total;
}

// out[row] = the sum of row `row` of a (rows, cols) float32 matrix of partials, one block of THREADS
// threads per row: thread t adds columns t, t + THREADS, ... in order, then a fixed tree (a warp's
// butterfly when THREADS == 32; `scratch`, 32 floats, is only used above that).
template <int THREADS>
__device__ __forceinline__ void row_sum(const float* __restrict__ partials, float* __restrict__ out, int64_t cols,
                                        float* scratch) {
  const int64_t row = blockIdx.x;
  float sum = 0.f;
  for (int64_t k = threadIdx.x; k < cols; k += THREADS) sum += partials[row * cols + k];
  if constexpr (THREADS == 32) {
    sum = warp_sum(sum);
  } else {
    sum = block_sum(sum, scratch);
  }
  if (threadIdx.x == 0) out[row] = sum;
}

}  // namespace
}  // namespace genkernels
