// Rotary position embedding (RoPE) of q and k in one launch, forward and inverse: device code.
//
// q (B, H, L, Dh) and k (B, Hk, L, Dh) are rows of Dh channels (a row is one (b, h, l)) addressed through
// their (batch, head, position) strides with a unit stride along Dh; each output has its own strides and
// may be its input (in place). With the (L, P) tables cos and sin (2P <= Dh, unit last stride, row
// strides of their own, float32 / float16 / bfloat16 each), each pair (x1, x2) of row position l turns by
// the angles of table row l, in float32 (the formulas of genkernels/ops/rope.py):
//     o1 = x1 c - x2 s,   o2 = x2 c + x1 s,   c = cos[l, j],  s = sign * sin[l, j]   (sign -1: inverse)
// Pairs are (j, j + P) (rotate_half) or, INTERLEAVED, (2j, 2j + 1). Channels 2P .. Dh-1 (partial rotary)
// are copied bit for bit to the output, or left alone in place (the host then plans no copy units).
//
// Work split: a row is `units` work units, first the rotation units, then the copy units; thread v of
// the 1-D grid (blocks of kRopeThreads) takes unit v % units of row v / units, the rows of q first and
// then those of k, so both tensors turn in one launch. The row index is split into (b, h, l) once per
// thread. A rotation unit covers kPairs = rope_unit_pairs(INTERLEAVED, VEC) pairs: rotate_half, the two
// runs x[j .. j + VEC) and x[P + j .. P + j + VEC) (two 16-byte vectors, or two single elements);
// interleaved, the VEC channels [2j, 2j + VEC) as one 16-byte vector holding VEC / 2 pairs (one pair,
// two single elements, on the scalar path). A copy unit moves VEC channels. VEC is the dtype's 16-byte
// width when every pointer is 16-byte aligned and every offset the kernel forms is a multiple of it
// (the strides, P for rotate_half, 2P interleaved, and Dh when copying), else 1 (the host decides).
// The tables are read per element through the read-only cache with a uniform run-time switch on their
// dtype: they are small and stay in L1 / L2. A unit issues all its loads (x, then the tables) before it
// decodes any (tests/cuda/test_sass.py reads this off the built kernel).
// Memory traffic: q and k read once, the outputs written once; cos and sin gathered from cache.
//
// This header is the device code alone; it expects its includer to provide the CUDA built-ins it uses
// (threadIdx, blockIdx, __ldg, __ldcs, __stcs). csrc/rope.cu compiles it with nvcc; tests/cuda/emulator
// runs the same source on the CPU. Everything sits in an unnamed namespace (private to the including
// unit).
#pragma once

#include <cstdint>

#include "genkernels/chunk_walk.cuh"
#include "genkernels/vec.cuh"

namespace genkernels {
namespace {

constexpr int kRopeThreads = 256;

// One (B, H, L, Dh) operand and its output.
struct RopeOperand {
  const void* x;   // input rows
  void* out;       // output rows (may be x: in place)
  int64_t rows;    // B * H * L (0: absent)
  int64_t heads;   // H (> 0 when rows > 0)
  int64_t xs[3];   // input strides (batch, head, position), elements
  int64_t os[3];   // output strides
};

struct RopeArgs {
  RopeOperand q, k;
  const void* cos;
  const void* sin;
  int64_t cos_stride, sin_stride;  // table row strides, elements
  int cos_dtype, sin_dtype;        // DtypeCodes of the tables
  int64_t len;                     // L
  int64_t pairs;                   // P
  int64_t units;                   // work units per row (rotation units, then copy units)
  int64_t rot_units;               // rotation units per row
  int64_t total;                   // (q.rows + k.rows) * units
  float sign;                      // 1, or -1 for the inverse rotation
};

// Pairs one rotation unit covers (host and device).
__host__ __device__ constexpr int rope_unit_pairs(bool interleaved, int vec) {
  return interleaved ? (vec > 1 ? vec / 2 : 1) : vec;
}

// Host: fills the unit counts of `a` (its rows and pairs already set) for vector width vec; copy: whether
// the channels 2P .. Dh-1 are copied (out of place).
inline void rope_plan(RopeArgs& a, bool interleaved, int vec, int64_t head_dim, bool copy) {
  a.rot_units = a.pairs / rope_unit_pairs(interleaved, vec);
  a.units = a.rot_units + (copy ? (head_dim - 2 * a.pairs) / vec : 0);
  a.total = (a.q.rows + a.k.rows) * a.units;
}

// N consecutive elements at e: one 16-byte vector (N == VEC) or N single elements (VEC == 1).
template <class D, int VEC, int N>
__device__ __forceinline__ void store_run(void* base, int64_t e, const float (&v)[N]) {
  if constexpr (N == VEC) {
    store_stream<D, VEC>(base, e, v);
  } else {
    static_assert(VEC == 1, "a run is one vector or single elements");
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float one[1] = {v[i]};
      store_stream<D, 1>(base, e + i, one);
    }
  }
}

// Unit u of row r of operand t.
template <bool INTERLEAVED, class D, int VEC>
__device__ __forceinline__ void rope_unit(const RopeArgs& a, const RopeOperand& t, int64_t r, int64_t u) {
  int64_t bh, l, b, h;
  split_index(r, a.len, bh, l);
  split_index(bh, t.heads, b, h);
  const int64_t xrow = b * t.xs[0] + h * t.xs[1] + l * t.xs[2];
  const int64_t orow = b * t.os[0] + h * t.os[1] + l * t.os[2];
  if (u >= a.rot_units) {  // pass-through channels, copied bit for bit
    const int64_t ch = 2 * a.pairs + (u - a.rot_units) * VEC;
    store_raw<D, VEC, Cache::kStream>(t.out, orow + ch, load_raw<D, VEC, Cache::kStream>(t.x, xrow + ch));
    return;
  }
  constexpr int kPairs = rope_unit_pairs(INTERLEAVED, VEC);
  constexpr int kRuns = INTERLEAVED ? 1 : 2;  // runs of x: [2j, 2j + 2 kPairs), or [j, ..) and [P + j, ..)
  constexpr int kRun = INTERLEAVED ? 2 * kPairs : kPairs;
  const int64_t j = u * kPairs;
  // Every load of the unit before any is decoded: x's runs (the DRAM round trip) first, then both tables'
  // bits (read through the cache), straight-line within a dtype's branch. Decoding each table element where
  // it was loaded made the next load wait for it: kPairs * 2 cache round trips before x was even requested.
  RawT<D, VEC> xr[kRuns][kRun / VEC];
#pragma unroll
  for (int q = 0; q < kRuns; ++q) {
    const int64_t at = xrow + (INTERLEAVED ? 2 * j : q * a.pairs + j);
#pragma unroll
    for (int i = 0; i < kRun / VEC; ++i) xr[q][i] = load_raw<D, VEC, Cache::kStream>(t.x, at + i * VEC);
  }
  unsigned int cw[kPairs], sw[kPairs];
  param_bits<kPairs>(a.cos, a.cos_dtype, l * a.cos_stride + j, cw);
  param_bits<kPairs>(a.sin, a.sin_dtype, l * a.sin_stride + j, sw);
  float c[kPairs], s[kPairs];
#pragma unroll
  for (int i = 0; i < kPairs; ++i) {
    c[i] = param_value(a.cos_dtype, cw[i]);
    s[i] = a.sign * param_value(a.sin_dtype, sw[i]);
  }
  float x[kRuns][kRun];
#pragma unroll
  for (int q = 0; q < kRuns; ++q) {
#pragma unroll
    for (int i = 0; i < kRun / VEC; ++i) {
      float part[VEC];
      decode<D, VEC>(xr[q][i], part);
#pragma unroll
      for (int k = 0; k < VEC; ++k) x[q][i * VEC + k] = part[k];
    }
  }
  if constexpr (INTERLEAVED) {
    float (&v)[2 * kPairs] = x[0];
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      const float x1 = v[2 * i], x2 = v[2 * i + 1];
      v[2 * i] = x1 * c[i] - x2 * s[i];
      v[2 * i + 1] = x2 * c[i] + x1 * s[i];
    }
    store_run<D, VEC>(t.out, orow + 2 * j, v);
  } else {
    float o1[kPairs], o2[kPairs];
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      o1[i] = x[0][i] * c[i] - x[1][i] * s[i];
      o2[i] = x[1][i] * c[i] + x[0][i] * s[i];
    }
    store_run<D, VEC>(t.out, orow + j, o1);
    store_run<D, VEC>(t.out, orow + a.pairs + j, o2);
  }
}

template <bool INTERLEAVED, class D, int VEC>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(const RopeArgs a) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * kRopeThreads + threadIdx.x;
  if (v >= a.total) return;
  int64_t row, u;
  split_index(v, a.units, row, u);
  // Two inlined calls rather than a pointer to the operand: no local-memory copy of the parameters.
  if (row < a.q.rows) {
    rope_unit<INTERLEAVED, D, VEC>(a, a.q, row, u);
  } else {
    rope_unit<INTERLEAVED, D, VEC>(a, a.k, row - a.q.rows, u);
  }
}

}  // namespace
}  // namespace genkernels
