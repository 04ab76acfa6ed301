// GroupNorm with optional fused SiLU: forward and backward.
//
// x is (N, C, S) with S the product of the spatial sizes, in one of two dense layouts:
//   channels first: element (n, c, s) at (n*C + c)*S + s   -> rows of S elements, one per channel
//   channels last:  element (n, c, s) at (n*S + s)*C + c   -> rows of C elements, one per pixel
// G groups of Cg = C/G channels. Statistics are float32 whatever the dtype.
//
// Forward, two paths:
// * fused (channels first, a group fits in shared memory): one block per group; x is read once
//   into shared memory, mean and m2 come from two exact passes over it, y is written once.
// * split (everything else): the tensor is cut into batches of groups (channels first) or
//   samples (channels last) that fit in about half of L2; per batch
//     1. partials: per-channel (mean, m2) of each chunk of the reduced axis (Welford in a
//        thread, Chan's pairwise combination across threads),
//     2. finalize: per-group mean and rstd from the Cg * P partials of the group (Chan),
//     3. apply: y = act((x - mean) * rstd * w + b), re-reading x from L2.
//   Every thread of the partials and apply kernels owns a fixed set of channels (one row in
//   channels first; VEC adjacent channels in channels last, which keeps the loads coalesced along
//   C) and walks the reduced axis, so per-channel parameters live in registers.
// Backward (split, same tiling): partials of sum(dz) and sum(dz * xhat) per channel, finalize
// into per-group coefficients, then one elementwise pass for dx; dweight and dbias are the
// per-channel partials summed over samples and chunks.
#include <algorithm>
#include <array>
#include <atomic>
#include <initializer_list>
#include <type_traits>

#include "genkernels/api.h"
#include "genkernels/runtime.cuh"
#include "genkernels/vec.cuh"
#include "genkernels/welford.cuh"

namespace genkernels {
namespace {

constexpr int kThreads = 256;                 // threads per block of the split-path kernels
constexpr int kUnroll = 4;                    // vectors a thread loads before using any of them
constexpr int kTargetVectorsPerBlock = 4096;  // split path: about 64 KiB of input per block
constexpr int kMaxColumnVectors = 32;         // channels last: column tile width (512 B rows for 16-bit)
constexpr int kMinChunkRows = 32;             // channels last: keeps partials <= 1/8 of the data read
constexpr int kFusedMaxThreads = 1024;
constexpr int kFinalizeThreads = 256;
constexpr int kParamGradThreads = 128;

template <class T>
__host__ __device__ __forceinline__ T min_of(T a, T b) {
  return a < b ? a : b;
}

__host__ __device__ __forceinline__ int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Split-path tiling, shared by the partials and elementwise kernels so both visit the same
// elements with the same threads.

struct Tiling {
  int64_t s, c, cg, groups;
  int64_t begin, end;    // this batch: rows n*C + c (channels first) or samples (channels last)
  int64_t chunk;         // reduced-axis length of a chunk: vectors (channels first) or rows
  int64_t chunk_elems;   // the same in elements of S
  int p;                 // chunks along the reduced axis
  int tc, tr;            // block = tr x tc threads; tc along the contiguous axis, one vector each
  int col_tiles;         // channels last: tiles of tc vectors across C
  bool channels_last;
};

struct Walk {
  int64_t n;             // sample
  int64_t chan0;         // channel of slot 0 of a vector
  int chan_step;         // slot k holds channel chan0 + k * chan_step (0: all slots one channel)
  int64_t first, step;   // element offset of the first vector and between consecutive vectors
  int count;             // vectors to visit (0 for inactive threads)
  int chunk;             // chunk index along the reduced axis
  bool active;           // owns a real channel; inactive threads still join the block reductions
  int red_lane, red_lanes, lane_stride;  // position among the threads sharing these channels
};

template <int VEC>
__device__ __forceinline__ Walk locate(const Tiling& t, int64_t block) {
  Walk w;
  const int x = threadIdx.x % t.tc, y = threadIdx.x / t.tc;
  if (!t.channels_last) {
    // Blocks: (tile of tr rows) x (chunk). Thread (y, x) takes row tile*tr + y, vectors
    // chunk*t.chunk + x + i*tc of it.
    const int64_t tile = block / t.p;
    w.chunk = static_cast<int>(block - tile * t.p);
    const int64_t row = t.begin + tile * t.tr + y;
    w.active = y < t.tr && row < t.end;
    const int64_t k0 = w.chunk * t.chunk + x;
    const int64_t k1 = min_of<int64_t>((w.chunk + 1) * t.chunk, t.s / VEC);
    w.count = (w.active && k0 < k1) ? static_cast<int>(div_up(k1 - k0, t.tc)) : 0;
    w.first = row * t.s + k0 * VEC;
    w.step = static_cast<int64_t>(t.tc) * VEC;
    w.n = row / t.c;
    w.chan0 = row - w.n * t.c;
    w.chan_step = 0;
    w.red_lane = x;
    w.red_lanes = t.tc;
    w.lane_stride = 1;
  } else {
    // Blocks: (sample) x (chunk of rows) x (column tile). Thread (y, x) takes channel vector
    // col_tile*tc + x in rows chunk*t.chunk + y + i*tr.
    const int col_tile = static_cast<int>(block % t.col_tiles);
    const int64_t rest = block / t.col_tiles;
    w.chunk = static_cast<int>(rest % t.p);
    w.n = t.begin + rest / t.p;
    const int64_t cv = static_cast<int64_t>(col_tile) * t.tc + x;
    w.active = y < t.tr && cv * VEC < t.c;
    const int64_t s0 = w.chunk * t.chunk + y;
    const int64_t s1 = min_of<int64_t>((w.chunk + 1) * t.chunk, t.s);
    w.count = (w.active && s0 < s1) ? static_cast<int>(div_up(s1 - s0, t.tr)) : 0;
    w.first = (w.n * t.s + s0) * t.c + cv * VEC;
    w.step = static_cast<int64_t>(t.tr) * t.c;
    w.chan0 = cv * VEC;
    w.chan_step = 1;
    w.red_lane = y;
    w.red_lanes = t.tr;
    w.lane_stride = t.tc;
  }
  return w;
}

// Tree over the threads that share channels (same row, or same channel vector), leaving the
// block's result in red_lane 0. publish() stores this thread's state in shared memory at index
// threadIdx.x; absorb(o) merges the state stored at index o into this thread's registers.
// Must be called by every thread of the block.
template <class Publish, class Absorb>
__device__ __forceinline__ void reduce_lanes(const Walk& w, Publish publish, Absorb absorb) {
  publish();
  int half = 1;
  while (half < w.red_lanes) half <<= 1;
  for (half >>= 1; half > 0; half >>= 1) {
    __syncthreads();
    if (w.active && w.red_lane < half && w.red_lane + half < w.red_lanes) {
      absorb(threadIdx.x + half * w.lane_stride);
      publish();  // nobody reads this slot in this round: its readers have red_lane >= half
    }
  }
}

struct Params {
  const void* weight;  // (C,) or nullptr (weight 1)
  const void* bias;    // (C,) or nullptr (bias 0)
  int w_dtype, b_dtype;
};

// Per-channel constants of the slots of a walk: z = (x - mean) * scale + shift.
template <int VEC>
struct SlotConstants {
  float mean[VEC], rstd[VEC], scale[VEC], shift[VEC];

  __device__ __forceinline__ void load(const Walk& w, const Tiling& t, const float* mean_g, const float* rstd_g,
                                       const Params& prm) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = w.chan0 + k * w.chan_step;
      const int64_t unit = w.n * t.groups + c / t.cg;
      mean[k] = mean_g[unit];
      rstd[k] = rstd_g[unit];
      scale[k] = rstd[k] * load_param(prm.weight, prm.w_dtype, c, 1.f);
      shift[k] = load_param(prm.bias, prm.b_dtype, c, 0.f);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Forward, split path.

// Per-channel (mean, m2) of one chunk, written to partials[(n*C + c)*P + chunk].
// Memory: reads x once (left in L2 for the apply pass when the batch fits); writes N*C*P float2.
template <class D, int VEC>
__global__ void __launch_bounds__(kThreads) gn_fwd_partials_kernel(const void* __restrict__ x,
                                                                   float2* __restrict__ partials, Tiling t) {
  __shared__ float sh_n[kThreads];
  __shared__ float sh_mean[VEC][kThreads];
  __shared__ float sh_m2[VEC][kThreads];
  const Walk w = locate<VEC>(t, blockIdx.x);

  float n = 0.f, mean[VEC], m2[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) mean[k] = m2[k] = 0.f;
  for (int i0 = 0; i0 < w.count; i0 += kUnroll) {
    RawT<D, VEC> raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + u < w.count) raw[u] = load_raw<D, VEC>(x, w.first + (i0 + u) * w.step);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + u < w.count) {
        float v[VEC];
        decode<D, VEC>(raw[u], v);
        n += 1.f;
        const float inv = __frcp_rn(n);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = v[k] - mean[k];
          mean[k] += d * inv;
          m2[k] += d * (v[k] - mean[k]);
        }
      }
    }
  }
  // Channels first: the VEC slots hold one channel; fold them (equal counts) into slot 0.
  const int slots = w.chan_step == 0 ? 1 : VEC;
  if (VEC > 1 && w.chan_step == 0) {
    float mu = 0.f;
#pragma unroll
    for (int k = 0; k < VEC; ++k) mu += mean[k];
    mu *= 1.f / VEC;
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = mean[k] - mu;
      s += m2[k] + n * d * d;
    }
    mean[0] = mu;
    m2[0] = s;
    n *= VEC;
  }
  reduce_lanes(
      w,
      [&] {
        sh_n[threadIdx.x] = n;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          sh_mean[k][threadIdx.x] = mean[k];
          sh_m2[k][threadIdx.x] = m2[k];
        }
      },
      [&](int o) {
        const float nb = sh_n[o];
        if (nb == 0.f) return;
        const float total = n + nb, wb = nb / total;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          if (k < slots) {
            const float d = sh_mean[k][o] - mean[k];
            mean[k] += d * wb;
            m2[k] += sh_m2[k][o] + d * d * n * wb;
          }
        }
        n = total;
      });
  if (w.active && w.red_lane == 0) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (k < slots) partials[(w.n * t.c + w.chan0 + k * w.chan_step) * t.p + w.chunk] = make_float2(mean[k], m2[k]);
    }
  }
}

struct Finalize {
  int64_t s, c, cg, groups;
  int64_t chunk_elems;  // elements of S per chunk; the last chunk may be shorter
  int64_t unit_begin;   // first group n*G + g of the batch
  int p;
  float eps;
};

// Group mean and rstd from the group's Cg*P channel partials (one block per group).
// Memory: reads Cg*P float2 per group; writes mean and rstd.
__global__ void __launch_bounds__(kFinalizeThreads) gn_fwd_finalize_kernel(const float2* __restrict__ partials,
                                                                           float* __restrict__ mean_out,
                                                                           float* __restrict__ rstd_out, Finalize f) {
  __shared__ float scratch[96];
  const int64_t unit = f.unit_begin + blockIdx.x;
  const int64_t n = unit / f.groups, g = unit - n * f.groups;
  const float2* src = partials + (n * f.c + g * f.cg) * f.p;  // the group's partials are contiguous
  float cnt = 0.f, mean = 0.f, m2 = 0.f;
  for (int64_t j = threadIdx.x; j < f.cg * f.p; j += blockDim.x) {
    const int64_t chunk = j % f.p;
    const float2 v = src[j];
    welford_merge(cnt, mean, m2, static_cast<float>(min_of(f.chunk_elems, f.s - chunk * f.chunk_elems)), v.x, v.y);
  }
  block_welford(cnt, mean, m2, scratch);
  if (threadIdx.x == 0) {
    mean_out[unit] = mean;
    rstd_out[unit] = rsqrtf(fmaxf(m2 / cnt, 0.f) + f.eps);
  }
}

// y = act((x - mean) * rstd * w + b).
// Memory: reads x (from L2 when the batch fits) and writes y, once each. Blocks run in reverse
// order because the partials pass left the end of the batch in L2 most recently.
template <class D, int VEC, bool SILU>
__global__ void __launch_bounds__(kThreads)
    gn_fwd_apply_kernel(const void* __restrict__ x, void* __restrict__ y, const float* __restrict__ mean,
                        const float* __restrict__ rstd, Params prm, Tiling t) {
  const Walk w = locate<VEC>(t, static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x);
  if (w.count == 0) return;
  SlotConstants<VEC> k;
  k.load(w, t, mean, rstd, prm);
  for (int i0 = 0; i0 < w.count; i0 += kUnroll) {
    RawT<D, VEC> raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + u < w.count) raw[u] = load_raw<D, VEC, Cache::kStream>(x, w.first + (i0 + u) * w.step);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + u < w.count) {
        float v[VEC];
        decode<D, VEC>(raw[u], v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float z = (v[j] - k.mean[j]) * k.scale[j] + k.shift[j];
          v[j] = SILU ? silu(z) : z;
        }
        store_raw<D, VEC, Cache::kStream>(y, w.first + (i0 + u) * w.step, encode<D, VEC>(v));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward, fused path (channels first): the group's Cg*S elements are contiguous.

struct Fused {
  int64_t s, cg, groups, len;  // len = Cg*S < 2^31 (it fits in shared memory)
  float eps;
  bool vectorized;             // len % VEC == 0 and x, y 16-byte aligned
};

__host__ __device__ __forceinline__ size_t fused_table_bytes(int64_t cg) {
  return static_cast<size_t>(div_up(cg * static_cast<int64_t>(sizeof(float2)), 16) * 16);
}

template <class D, int VEC, bool SILU>
__device__ __forceinline__ void fused_group(const void* __restrict__ x, void* __restrict__ y, float* mean_out,
                                            float* rstd_out, const Params& prm, const Fused& f, unsigned char* smem,
                                            float* scratch) {
  using R = RawT<D, VEC>;
  const int64_t unit = blockIdx.x;
  const int64_t g = unit % f.groups;
  const int64_t base = unit * f.len;
  const int nv = static_cast<int>(f.len / VEC);
  const int tid = threadIdx.x, nt = blockDim.x;
  float2* table = reinterpret_cast<float2*>(smem);                   // per channel of the group: (scale, bias)
  R* buf = reinterpret_cast<R*>(smem + fused_table_bytes(f.cg));     // the group, as stored in memory

  // Pass 1: global -> shared memory, and the sum.
  float sum = 0.f;
  for (int i0 = tid; i0 < nv; i0 += kUnroll * nt) {
    R raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * nt;
      if (i < nv) raw[u] = load_raw<D, VEC>(x, base + static_cast<int64_t>(i) * VEC);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * nt;
      if (i < nv) {
        buf[i] = raw[u];
        float v[VEC];
        decode<D, VEC>(raw[u], v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum += v[k];
      }
    }
  }
  const float mean = block_sum(sum, scratch) / static_cast<float>(f.len);  // also publishes buf

  // Pass 2: m2 about the mean (exact two-pass: no cancellation for data far from zero).
  float m2 = 0.f;
  for (int i = tid; i < nv; i += nt) {
    float v[VEC];
    decode<D, VEC>(buf[i], v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = v[k] - mean;
      m2 += d * d;
    }
  }
  const float rstd = rsqrtf(block_sum(m2, scratch) / static_cast<float>(f.len) + f.eps);
  if (tid == 0) {
    mean_out[unit] = mean;
    rstd_out[unit] = rstd;
  }
  for (int j = tid; j < f.cg; j += nt) {
    const int64_t c = g * f.cg + j;
    table[j] = make_float2(rstd * load_param(prm.weight, prm.w_dtype, c, 1.f), load_param(prm.bias, prm.b_dtype, c, 0.f));
  }
  __syncthreads();

  // Pass 3: normalize from shared memory. Element e of the group is channel e / S; a vector may
  // straddle channels when S % VEC != 0.
  const unsigned int s = static_cast<unsigned int>(f.s);
  for (int i = tid; i < nv; i += nt) {
    float v[VEC];
    decode<D, VEC>(buf[i], v);
    const unsigned int e = static_cast<unsigned int>(i) * VEC;
    unsigned int j = e / s, r = e - j * s;
    if (r + VEC <= s) {  // the whole vector is one channel (always, when S % VEC == 0)
      const float2 sb = table[j];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float z = (v[k] - mean) * sb.x + sb.y;
        v[k] = SILU ? silu(z) : z;
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float2 sb = table[j];
        const float z = (v[k] - mean) * sb.x + sb.y;
        v[k] = SILU ? silu(z) : z;
        if (++r == s) {
          r = 0;
          ++j;
        }
      }
    }
    store_raw<D, VEC>(y, base + e, encode<D, VEC>(v));
  }
}

// One block per group (n, g).
// Memory: reads x once and writes y once; the group waits in shared memory between passes.
template <class D, bool SILU>
__global__ void __launch_bounds__(kFusedMaxThreads)
    gn_fwd_fused_kernel(const void* __restrict__ x, void* __restrict__ y, float* __restrict__ mean_out,
                        float* __restrict__ rstd_out, Params prm, Fused f) {
  extern __shared__ uint4 smem[];
  __shared__ float scratch[32];
  unsigned char* bytes = reinterpret_cast<unsigned char*>(smem);
  if (f.vectorized) {
    fused_group<D, D::kVec, SILU>(x, y, mean_out, rstd_out, prm, f, bytes, scratch);
  } else {
    fused_group<D, 1, SILU>(x, y, mean_out, rstd_out, prm, f, bytes, scratch);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward. With z = (x - mean) * rstd * w + b, xhat = (x - mean) * rstd and dz = dy * act'(z):
//   dweight[c] = sum_{n,s} dz * xhat,   dbias[c] = sum_{n,s} dz,
//   dx = rstd * (dz * w - mean_g(dz * w) - xhat * mean_g(dz * w * xhat)).

template <bool SILU>
__device__ __forceinline__ float grad_z(float dy, float z) {
  return SILU ? dy * silu_grad(z) : dy;
}

// Per-channel (sum dz, sum dz * xhat) of one chunk, written to partials[(n*C + c)*P + chunk].
// Memory: reads dy and x once (left in L2 for the dx pass when the batch fits); writes N*C*P float2.
template <class D, int VEC, bool SILU>
__global__ void __launch_bounds__(kThreads)
    gn_bwd_partials_kernel(const void* __restrict__ dy, const void* __restrict__ x, const float* __restrict__ mean,
                           const float* __restrict__ rstd, Params prm, float2* __restrict__ partials, Tiling t) {
  __shared__ float sh_a[VEC][kThreads];
  __shared__ float sh_b[VEC][kThreads];
  const Walk w = locate<VEC>(t, blockIdx.x);
  SlotConstants<VEC> k;
  if (w.active) k.load(w, t, mean, rstd, prm);

  float a[VEC], b[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) a[j] = b[j] = 0.f;
  for (int i0 = 0; i0 < w.count; i0 += kUnroll) {
    RawT<D, VEC> raw_dy[kUnroll], raw_x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + u < w.count) {
        raw_dy[u] = load_raw<D, VEC>(dy, w.first + (i0 + u) * w.step);
        raw_x[u] = load_raw<D, VEC>(x, w.first + (i0 + u) * w.step);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + u < w.count) {
        float g[VEC], v[VEC];
        decode<D, VEC>(raw_dy[u], g);
        decode<D, VEC>(raw_x[u], v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float xc = v[j] - k.mean[j];
          const float dz = grad_z<SILU>(g[j], xc * k.scale[j] + k.shift[j]);
          a[j] += dz;
          b[j] += dz * (xc * k.rstd[j]);
        }
      }
    }
  }
  const int slots = w.chan_step == 0 ? 1 : VEC;
  if (VEC > 1 && w.chan_step == 0) {
#pragma unroll
    for (int j = 1; j < VEC; ++j) {
      a[0] += a[j];
      b[0] += b[j];
    }
  }
  reduce_lanes(
      w,
      [&] {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          sh_a[j][threadIdx.x] = a[j];
          sh_b[j][threadIdx.x] = b[j];
        }
      },
      [&](int o) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          a[j] += sh_a[j][o];
          b[j] += sh_b[j][o];
        }
      });
  if (w.active && w.red_lane == 0) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (j < slots) partials[(w.n * t.c + w.chan0 + j * w.chan_step) * t.p + w.chunk] = make_float2(a[j], b[j]);
    }
  }
}

// Per group: dx = dz * rstd * w + k.x + xhat * k.y with k.x = -rstd * mean_g(dz * w) and
// k.y = -rstd * mean_g(dz * w * xhat), from the group's Cg*P channel partials.
// Memory: reads Cg*P float2 per group; writes one float2.
__global__ void __launch_bounds__(kFinalizeThreads)
    gn_bwd_finalize_kernel(const float2* __restrict__ partials, const float* __restrict__ rstd, Params prm,
                           float2* __restrict__ coef, Finalize f) {
  __shared__ float scratch[32];
  const int64_t unit = f.unit_begin + blockIdx.x;
  const int64_t n = unit / f.groups, g = unit - n * f.groups;
  const float2* src = partials + (n * f.c + g * f.cg) * f.p;
  float a = 0.f, b = 0.f;
  for (int64_t j = threadIdx.x; j < f.cg * f.p; j += blockDim.x) {
    const float wc = load_param(prm.weight, prm.w_dtype, g * f.cg + j / f.p, 1.f);
    const float2 v = src[j];
    a += wc * v.x;
    b += wc * v.y;
  }
  a = block_sum(a, scratch);
  b = block_sum(b, scratch);
  if (threadIdx.x == 0) {
    const float r = rstd[unit] / static_cast<float>(static_cast<double>(f.cg) * static_cast<double>(f.s));
    coef[unit] = make_float2(-r * a, -r * b);
  }
}

// Memory: reads dy and x (from L2 when the batch fits) and writes dx, once each; reverse block
// order as in the forward apply pass.
template <class D, int VEC, bool SILU>
__global__ void __launch_bounds__(kThreads)
    gn_bwd_dx_kernel(const void* __restrict__ dy, const void* __restrict__ x, void* __restrict__ dx,
                     const float* __restrict__ mean, const float* __restrict__ rstd, Params prm,
                     const float2* __restrict__ coef, Tiling t) {
  const Walk w = locate<VEC>(t, static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x);
  if (w.count == 0) return;
  SlotConstants<VEC> k;
  k.load(w, t, mean, rstd, prm);
  float2 kk[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) kk[j] = coef[w.n * t.groups + (w.chan0 + j * w.chan_step) / t.cg];
  for (int i0 = 0; i0 < w.count; i0 += kUnroll) {
    RawT<D, VEC> raw_dy[kUnroll], raw_x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + u < w.count) {
        raw_dy[u] = load_raw<D, VEC, Cache::kStream>(dy, w.first + (i0 + u) * w.step);
        raw_x[u] = load_raw<D, VEC, Cache::kStream>(x, w.first + (i0 + u) * w.step);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + u < w.count) {
        float g[VEC], v[VEC];
        decode<D, VEC>(raw_dy[u], g);
        decode<D, VEC>(raw_x[u], v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float xc = v[j] - k.mean[j];
          const float dz = grad_z<SILU>(g[j], xc * k.scale[j] + k.shift[j]);
          v[j] = dz * k.scale[j] + kk[j].x + (xc * k.rstd[j]) * kk[j].y;
        }
        store_raw<D, VEC, Cache::kStream>(dx, w.first + (i0 + u) * w.step, encode<D, VEC>(v));
      }
    }
  }
}

// dweight[c] and dbias[c]: channel c's partials summed over samples and chunks (one block per
// channel, fixed order: deterministic).
// Memory: reads N*C*P float2; writes C weights and C biases.
__global__ void __launch_bounds__(kParamGradThreads)
    gn_bwd_param_grads_kernel(const float2* __restrict__ partials, void* __restrict__ dweight, int w_dtype,
                              void* __restrict__ dbias, int b_dtype, int64_t n_samples, int64_t channels, int p) {
  __shared__ float scratch[32];
  const int64_t c = blockIdx.x;
  float a = 0.f, b = 0.f;
  for (int64_t j = threadIdx.x; j < n_samples * p; j += blockDim.x) {
    const int64_t n = j / p;
    const float2 v = partials[(n * channels + c) * p + (j - n * p)];
    a += v.x;
    b += v.y;
  }
  a = block_sum(a, scratch);
  b = block_sum(b, scratch);
  if (threadIdx.x == 0) {
    if (dweight != nullptr) store_param(dweight, w_dtype, c, b);
    if (dbias != nullptr) store_param(dbias, b_dtype, c, a);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: planning and launching.

bool aligned16(std::initializer_list<uintptr_t> ptrs) {
  for (const uintptr_t p : ptrs) {
    if (p % 16 != 0) return false;
  }
  return true;
}

void check_problem(const GroupNormProblem& p) {
  if (p.n < 1 || p.c < 1 || p.s < 1 || p.groups < 1 || p.c % p.groups != 0) {
    throw std::invalid_argument("genkernels: group_norm needs N, C, S >= 1 and groups dividing C");
  }
  element_bytes(p.dtype);
}

struct SplitPlan {
  Tiling t;
  int vec;
  int64_t units;            // batching units: groups (channels first) or samples (channels last)
  int64_t units_per_batch;
  size_t partial_bytes;

  // Tiling, grid and finalize unit range of the batch [u0, u1).
  Tiling batch(int64_t u0, int64_t u1) const {
    Tiling b = t;
    b.begin = t.channels_last ? u0 : u0 * t.cg;
    b.end = t.channels_last ? u1 : u1 * t.cg;
    return b;
  }
  int64_t grid(int64_t u0, int64_t u1) const {
    return t.channels_last ? (u1 - u0) * t.p * t.col_tiles : div_up((u1 - u0) * t.cg, t.tr) * t.p;
  }
  Finalize finalize(int64_t u0, float eps) const {
    return Finalize{t.s, t.c, t.cg, t.groups, t.chunk_elems, t.channels_last ? u0 * t.groups : u0, t.p, eps};
  }
  int64_t finalize_grid(int64_t u0, int64_t u1) const { return (u1 - u0) * (t.channels_last ? t.groups : 1); }
};

// `inputs`: big tensors the elementwise pass re-reads (x; or dy and x). batched = false puts
// everything in one batch (when nothing is re-read).
SplitPlan plan_split(const GroupNormProblem& p, bool aligned, int inputs, bool batched, const DeviceInfo& dev) {
  SplitPlan pl{};
  Tiling& t = pl.t;
  const int elem = element_bytes(p.dtype);
  t.s = p.s;
  t.c = p.c;
  t.groups = p.groups;
  t.cg = p.c / p.groups;
  t.channels_last = p.channels_last;
  const int full = 16 / elem;
  const int64_t contiguous = p.channels_last ? p.c : p.s;
  pl.vec = (aligned && contiguous % full == 0) ? full : 1;
  const int64_t vectors = contiguous / pl.vec;
  // Channels first: up to a block of threads along a row. Channels last: C split evenly into
  // column tiles of at most kMaxColumnVectors vectors, so wide C keeps several rows per block.
  t.tc = static_cast<int>(p.channels_last ? div_up(vectors, div_up(vectors, kMaxColumnVectors))
                                          : std::min<int64_t>(vectors, kThreads));
  t.tr = kThreads / t.tc;

  int64_t red_len, red_threads, unit_bytes;
  if (!p.channels_last) {
    red_len = vectors;  // a row's vectors
    red_threads = t.tc;
    t.col_tiles = 1;
    pl.units = p.n * p.groups;
    unit_bytes = t.cg * p.s * elem * inputs;
  } else {
    red_len = p.s;  // rows (pixels) of a sample
    red_threads = t.tr;
    t.col_tiles = static_cast<int>(div_up(vectors, t.tc));
    pl.units = p.n;
    unit_bytes = p.s * p.c * elem * inputs;
  }
  const int64_t budget = p.l2_budget > 0 ? p.l2_budget : dev.l2_bytes / 2;
  pl.units_per_batch = batched ? std::clamp<int64_t>(budget / unit_bytes, 1, pl.units) : pl.units;

  // Chunks along the reduced axis: about kTargetVectorsPerBlock vectors per block, but at least
  // two blocks per SM in a batch when the data allows it. A channels-last chunk keeps at least
  // kMinChunkRows rows: each chunk writes one 8-byte partial per channel.
  const int64_t chan_blocks =
      p.channels_last ? pl.units_per_batch * t.col_tiles : div_up(pl.units_per_batch * t.cg, t.tr);
  const int64_t max_iters = div_up(red_len, red_threads);
  const int64_t min_iters = p.channels_last ? std::min(max_iters, div_up(kMinChunkRows, t.tr)) : 1;
  int64_t iters = std::clamp<int64_t>(kTargetVectorsPerBlock / (t.tc * t.tr), min_iters, max_iters);
  while (iters > min_iters && chan_blocks * div_up(red_len, red_threads * iters) < 2 * dev.sms) {
    iters = std::max(min_iters, div_up(iters, 2));
  }
  t.chunk = red_threads * iters;
  t.p = static_cast<int>(div_up(red_len, t.chunk));
  t.chunk_elems = p.channels_last ? t.chunk : t.chunk * pl.vec;
  pl.partial_bytes = static_cast<size_t>(p.n * p.c * t.p) * sizeof(float2);
  return pl;
}

// Static shared memory of gn_fwd_fused_kernel (its reduction scratch): the dynamic part may take
// what is left of the block's limit, and needs the opt-in as soon as both exceed the default 48 KB.
constexpr size_t kFusedStaticSmem = 32 * sizeof(float);

// Shared memory of the fused kernel for one group, or 0 when the group does not fit.
size_t fused_smem_bytes(const GroupNormProblem& p, const DeviceInfo& dev) {
  if (p.channels_last) return 0;
  const int64_t len = p.c / p.groups * p.s;
  const size_t bytes = fused_table_bytes(p.c / p.groups) + static_cast<size_t>(len) * element_bytes(p.dtype);
  const size_t limit = static_cast<size_t>(dev.smem_optin) - kFusedStaticSmem;
  return bytes <= limit ? bytes : 0;
}

constexpr size_t kAlign = 256;
size_t align_up(size_t b) { return (b + kAlign - 1) / kAlign * kAlign; }

void check_workspace(size_t have, size_t need) {
  if (have < need) {
    throw std::invalid_argument("genkernels: workspace of " + std::to_string(have) + " bytes, need " +
                                std::to_string(need));
  }
}

// Grid sizes travel as unsigned int.
unsigned int grid_dim(int64_t blocks) {
  if (blocks < 1 || blocks > 0x7fffffff) {
    throw std::invalid_argument("genkernels: group_norm grid of " + std::to_string(blocks) + " blocks");
  }
  return static_cast<unsigned int>(blocks);
}

// Launches the fused kernel for one (dtype, SILU); opts it in to large shared memory once per
// device (a per-function attribute, so the flags live in this instantiation).
template <class D, bool SILU>
void launch_fused(const GroupNormProblem& p, const DeviceInfo& dev, size_t smem, int threads, cudaStream_t stream,
                  const void* x, void* y, float* mean, float* rstd, const Params& prm, const Fused& f) {
  static std::array<std::atomic<bool>, 64> opted_in{};
  const bool cached = p.device >= 0 && p.device < 64;
  if (smem + kFusedStaticSmem > 48 * 1024 && !(cached && opted_in[p.device].load())) {
    const cudaError_t err = cudaFuncSetAttribute(gn_fwd_fused_kernel<D, SILU>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 dev.smem_optin - static_cast<int>(kFusedStaticSmem));
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error(std::string("genkernels: gn_fwd_fused_kernel: enabling ") + std::to_string(smem) +
                               " bytes of shared memory failed: " + cudaGetErrorString(err));
    }
    if (cached) opted_in[p.device].store(true);
  }
  gn_fwd_fused_kernel<D, SILU><<<grid_dim(p.n * p.groups), threads, smem, stream>>>(x, y, mean, rstd, prm, f);
  check_launch("gn_fwd_fused_kernel");
}

}  // namespace

size_t group_norm_forward_workspace(const GroupNormProblem& p, uintptr_t x, uintptr_t y) {
  check_problem(p);
  const DeviceInfo dev = device_info(p.device);
  if (fused_smem_bytes(p, dev) != 0) return 0;
  return align_up(plan_split(p, aligned16({x, y}), 1, true, dev).partial_bytes);
}

void group_norm_forward(const GroupNormProblem& p, uintptr_t x, uintptr_t weight, int w_dtype, uintptr_t bias,
                        int b_dtype, uintptr_t y, uintptr_t mean, uintptr_t rstd, uintptr_t workspace,
                        size_t workspace_bytes, float eps, bool silu, uintptr_t stream_handle) {
  check_problem(p);
  use_device(p.device);
  const DeviceInfo dev = device_info(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  const Params prm{reinterpret_cast<const void*>(weight), reinterpret_cast<const void*>(bias), w_dtype, b_dtype};
  const void* xp = reinterpret_cast<const void*>(x);
  void* yp = reinterpret_cast<void*>(y);
  float* mean_p = reinterpret_cast<float*>(mean);
  float* rstd_p = reinterpret_cast<float*>(rstd);

  const size_t smem = fused_smem_bytes(p, dev);
  if (smem != 0) {
    const int64_t len = p.c / p.groups * p.s;
    const int elem = element_bytes(p.dtype);
    const bool vectorized = aligned16({x, y}) && len % (16 / elem) == 0;
    const Fused f{p.s, p.c / p.groups, p.groups, len, eps, vectorized};
    const int64_t nv = vectorized ? len / (16 / elem) : len;
    const int threads = static_cast<int>(std::clamp<int64_t>(div_up(div_up(nv, kUnroll), 32) * 32, 32, kFusedMaxThreads));
    with_dtype(p.dtype, [&](auto d) {
      using D = decltype(d);
      with_bool(silu, [&](auto s) {
        launch_fused<D, decltype(s)::value>(p, dev, smem, threads, stream, xp, yp, mean_p, rstd_p, prm, f);
      });
    });
    return;
  }

  const SplitPlan pl = plan_split(p, aligned16({x, y}), 1, true, dev);
  check_workspace(workspace_bytes, pl.partial_bytes);
  float2* partials = reinterpret_cast<float2*>(workspace);
  with_dtype(p.dtype, [&](auto d) {
    using D = decltype(d);
    with_bool(silu, [&](auto s) {
      constexpr bool kSilu = decltype(s)::value;
      auto run = [&](auto vec) {
        constexpr int VEC = decltype(vec)::value;
        for (int64_t u0 = 0; u0 < pl.units; u0 += pl.units_per_batch) {
          const int64_t u1 = std::min(pl.units, u0 + pl.units_per_batch);
          const Tiling t = pl.batch(u0, u1);
          const unsigned int grid = grid_dim(pl.grid(u0, u1));
          gn_fwd_partials_kernel<D, VEC><<<grid, kThreads, 0, stream>>>(xp, partials, t);
          check_launch("gn_fwd_partials_kernel");
          gn_fwd_finalize_kernel<<<grid_dim(pl.finalize_grid(u0, u1)), kFinalizeThreads, 0, stream>>>(
              partials, mean_p, rstd_p, pl.finalize(u0, eps));
          check_launch("gn_fwd_finalize_kernel");
          gn_fwd_apply_kernel<D, VEC, kSilu><<<grid, kThreads, 0, stream>>>(xp, yp, mean_p, rstd_p, prm, t);
          check_launch("gn_fwd_apply_kernel");
        }
      };
      if (pl.vec == 1) {
        run(std::integral_constant<int, 1>{});
      } else {
        run(std::integral_constant<int, D::kVec>{});
      }
    });
  });
}

size_t group_norm_backward_workspace(const GroupNormProblem& p, uintptr_t dy, uintptr_t x, uintptr_t dx) {
  check_problem(p);
  const DeviceInfo dev = device_info(p.device);
  const SplitPlan pl = plan_split(p, aligned16({dy, x, dx}), 2, dx != 0, dev);
  const size_t coef = dx != 0 ? static_cast<size_t>(p.n * p.groups) * sizeof(float2) : 0;
  return align_up(pl.partial_bytes) + align_up(coef);
}

void group_norm_backward(const GroupNormProblem& p, uintptr_t dy, uintptr_t x, uintptr_t weight, int w_dtype,
                         uintptr_t bias, int b_dtype, uintptr_t mean, uintptr_t rstd, uintptr_t dx, uintptr_t dweight,
                         uintptr_t dbias, uintptr_t workspace, size_t workspace_bytes, bool silu,
                         uintptr_t stream_handle) {
  check_problem(p);
  if (dx == 0 && dweight == 0 && dbias == 0) return;
  use_device(p.device);
  const DeviceInfo dev = device_info(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  const Params prm{reinterpret_cast<const void*>(weight), reinterpret_cast<const void*>(bias), w_dtype, b_dtype};
  const void* dyp = reinterpret_cast<const void*>(dy);
  const void* xp = reinterpret_cast<const void*>(x);
  void* dxp = reinterpret_cast<void*>(dx);
  const float* mean_p = reinterpret_cast<const float*>(mean);
  const float* rstd_p = reinterpret_cast<const float*>(rstd);

  const SplitPlan pl = plan_split(p, aligned16({dy, x, dx}), 2, dx != 0, dev);
  check_workspace(workspace_bytes, group_norm_backward_workspace(p, dy, x, dx));
  float2* partials = reinterpret_cast<float2*>(workspace);
  float2* coef = reinterpret_cast<float2*>(workspace + align_up(pl.partial_bytes));
  with_dtype(p.dtype, [&](auto d) {
    using D = decltype(d);
    with_bool(silu, [&](auto s) {
      constexpr bool kSilu = decltype(s)::value;
      auto run = [&](auto vec) {
        constexpr int VEC = decltype(vec)::value;
        for (int64_t u0 = 0; u0 < pl.units; u0 += pl.units_per_batch) {
          const int64_t u1 = std::min(pl.units, u0 + pl.units_per_batch);
          const Tiling t = pl.batch(u0, u1);
          const unsigned int grid = grid_dim(pl.grid(u0, u1));
          gn_bwd_partials_kernel<D, VEC, kSilu><<<grid, kThreads, 0, stream>>>(dyp, xp, mean_p, rstd_p, prm, partials, t);
          check_launch("gn_bwd_partials_kernel");
          if (dx == 0) continue;
          gn_bwd_finalize_kernel<<<grid_dim(pl.finalize_grid(u0, u1)), kFinalizeThreads, 0, stream>>>(
              partials, rstd_p, prm, coef, pl.finalize(u0, 0.f));
          check_launch("gn_bwd_finalize_kernel");
          gn_bwd_dx_kernel<D, VEC, kSilu><<<grid, kThreads, 0, stream>>>(dyp, xp, dxp, mean_p, rstd_p, prm, coef, t);
          check_launch("gn_bwd_dx_kernel");
        }
      };
      if (pl.vec == 1) {
        run(std::integral_constant<int, 1>{});
      } else {
        run(std::integral_constant<int, D::kVec>{});
      }
    });
  });
  if (dweight != 0 || dbias != 0) {
    gn_bwd_param_grads_kernel<<<grid_dim(p.c), kParamGradThreads, 0, stream>>>(
        partials, reinterpret_cast<void*>(dweight), w_dtype, reinterpret_cast<void*>(dbias), b_dtype, p.n, p.c, pl.t.p);
    check_launch("gn_bwd_param_grads_kernel");
  }
}

}  // namespace genkernels
