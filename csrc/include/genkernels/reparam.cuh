// The reparameterization trick's device code: z = mean + exp(lv / 2) * eps with the KL divergence
// of N(mean, exp(lv)) to N(0, 1) per sample, forward and backward, one elementwise pass each.
//
// Tensors are (B, R, K) views with unit stride along K. mean and logvar (and, in the backward,
// dmean and dlogvar) each have their own batch and row strides in elements, so the two halves of a
// moments tensor are read and written in place: contiguous (N, 2C, H, W) moments give R = 1,
// K = C*H*W and batch stride 2*C*H*W; channels_last ones give R = H*W, K = C and row stride 2*C.
// z, noise and dz are contiguous: element (b, r, k) at flat index e = (b*R + r)*K + k.
// Per element, in float32:
//     lv  = clamp(logvar, -30, 20)   (NaN stays NaN, as torch.clamp's)
//     std = exp(lv / 2);  z = mean + std * eps   (deterministic: z = mean)
//     kl[b] = 0.5 * sum over the sample of (mean^2 + expm1(lv) - lv)
// eps is the noise tensor, else element e of the Philox stream of genkernels/philox.cuh keyed by
// (seed, offset), the seed passed by value or read from a one-element int64 device tensor.
// Backward, with in = (-30 <= logvar <= 20) (the clamp's gradient passes at the bounds):
//     dmean   = dz + dkl[b] * mean
//     dlogvar = in ? 0.5 * dz * eps * std + 0.5 * dkl[b] * expm1(lv) : 0   (deterministic: no eps term)
// eps re-drawn from the same stream element (bit-identical to the forward's) when there is no noise
// tensor. expm1f(lv) instead of expf(lv) - 1: the KL term expm1(lv) - lv is never negative and keeps
// its precision near lv = 0, where exp(lv) - 1 - lv would lose it all to cancellation. Accurate
// expf / expm1f (not __expf): the emulator checks these kernels against float64 closely.
//
// Work split: each sample's R*K elements, in flat order j = r*K + k, are cut into chunks of
// `chunk` elements (the host picks it from (B, R, K) alone, never from the device, so the KL's
// rounding is the same on every GPU); block (b, c) of a 1-D grid of B * chunks blocks handles
// chunk c of sample b, its threads taking VEC-element vectors round-robin. The forward block sums
// its KL terms in a fixed tree into one float32 partial; kl_merge_kernel adds a sample's partials in
// a fixed order (a single chunk writes kl[b] directly). Deterministic, no atomics.
//
// Vectors: VEC = 16 bytes of the dtype when K and every batch / row stride are multiples of VEC and
// every pointer is 16-byte aligned (so a vector never straddles two rows), else VEC = 1.
// Memory traffic: the forward reads mean and logvar (and noise) once and writes z once plus one
// float per block; the backward reads dz, mean, logvar (and noise) once and writes dmean and dlogvar
// once, each load skipped when no output needs it.
//
// This header is the device code alone. It includes the genkernels headers it is built on (chunk_walk.cuh,
// philox.cuh) and expects its includer to provide the CUDA built-ins it uses
// (threadIdx, blockIdx, __syncthreads, __shfl_xor_sync, __ldg, __ldcs, __stcs, expf, expm1f, min,
// and those of the headers it includes). csrc/reparam.cu compiles it with nvcc; tests/cuda/emulator
// runs the same source on the CPU. Everything here sits in an unnamed namespace, as the kernels are
// private to the one translation unit that includes them.
#pragma once

#include <cstdint>

#include "genkernels/chunk_walk.cuh"
#include "genkernels/philox.cuh"

namespace genkernels {
namespace {

constexpr int kReparamThreads = 256;
constexpr float kLogvarMin = -30.f, kLogvarMax = 20.f;

// A (B, R, K) view with unit stride along K: element (b, r, k) at data + b*batch + r*row + k.
template <class P>
struct View {
  P data;
  int64_t batch, row;

  __device__ __forceinline__ int64_t at(int64_t b, int64_t r, int64_t k) const { return b * batch + r * row + k; }
};

// What both passes share: the problem, the work split and the noise.
struct ReparamShape {
  int64_t rows, cols;  // R, K
  int64_t n;           // R * K, elements per sample
  int64_t chunk;       // elements per chunk, a multiple of every vector width
  int64_t chunks;      // chunks per sample: ceil(n / chunk)
  const void* noise;   // (B, R, K) contiguous, or nullptr
  uint64_t seed, offset;      // in-kernel noise: key and counter offset (genkernels/philox.cuh)
  const long long* seed_ptr;  // the seed in a one-element int64 device tensor instead, or nullptr
  bool philox;                // draw eps in the kernel (noise == nullptr and not deterministic)
};

struct ReparamForwardArgs {
  ReparamShape s;
  View<const void*> mean, logvar;
  void* z;          // (B, R, K) contiguous
  float* partials;  // (B, chunks) KL partials (kl itself when chunks == 1), or nullptr: no KL
};

struct ReparamBackwardArgs {
  ReparamShape s;
  View<const void*> mean, logvar;
  const void* dz;      // (B, R, K) contiguous, or nullptr (zero)
  const float* dkl;    // (B,) float32, or nullptr (zero)
  View<void*> dmean, dlogvar;  // data nullptr: not wanted
};

// One thread's vectors through its block's chunk of a sample: q the row, r the column.
template <int VEC>
using ReparamWalk = VecWalk<kReparamThreads, VEC>;

// eps of elements e .. e + VEC - 1 (e = b*n + j): the noise tensor's, from its raw bits `raw` (loaded with
// the step's other inputs: load_raw_if), or the Philox stream's.
template <class D, int VEC>
__device__ __forceinline__ void eps_of(const ReparamShape& s, uint64_t seed, int64_t e, const RawT<D, VEC>& raw,
                                       float (&eps)[VEC]) {
  if (s.noise != nullptr) {
    decode<D, VEC>(raw, eps);
  } else {
    stream_normals<VEC>(seed, s.offset, e, eps);
  }
}

__device__ __forceinline__ uint64_t stream_seed(const ReparamShape& s) {
  return s.seed_ptr != nullptr ? static_cast<uint64_t>(__ldg(s.seed_ptr)) : s.seed;
}

// lv = clamp(logvar, -30, 20) with NaN passed through, as torch.clamp does (fminf / fmaxf would drop it).
__device__ __forceinline__ float clamp_logvar(float v) {
  return v < kLogvarMin ? kLogvarMin : (v > kLogvarMax ? kLogvarMax : v);
}

template <class D, int VEC>
__global__ void __launch_bounds__(kReparamThreads) reparam_forward_kernel(const ReparamForwardArgs a) {
  __shared__ float scratch[32];
  int64_t b, chunk;
  split_index(blockIdx.x, a.s.chunks, b, chunk);
  const bool draw = a.s.noise != nullptr || a.s.philox;
  const uint64_t seed = a.s.philox ? stream_seed(a.s) : 0;
  const int64_t sample = b * a.s.n;
  float kl = 0.f;
  for (ReparamWalk<VEC> c(chunk * a.s.chunk, min(a.s.n, (chunk + 1) * a.s.chunk), a.s.cols); c.valid(); c.next()) {
    // The step's loads (mean, logvar, a noise tensor's eps) all go out before any is decoded.
    const RawT<D, VEC> rm = load_raw<D, VEC, Cache::kStream>(a.mean.data, a.mean.at(b, c.q, c.r));
    const RawT<D, VEC> rl = load_raw<D, VEC, Cache::kStream>(a.logvar.data, a.logvar.at(b, c.q, c.r));
    const RawT<D, VEC> rn = load_raw_if<D, VEC>(a.s.noise != nullptr, a.s.noise, sample + c.j);
    float m[VEC], lv[VEC], z[VEC];
    decode<D, VEC>(rm, m);
    decode<D, VEC>(rl, lv);
    if (draw) {
      float eps[VEC];
      eps_of<D, VEC>(a.s, seed, sample + c.j, rn, eps);
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] = m[i] + expf(0.5f * clamp_logvar(lv[i])) * eps[i];
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] = m[i];
    }
    store_stream<D, VEC>(a.z, sample + c.j, z);
    if (a.partials != nullptr) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float l = clamp_logvar(lv[i]);
        kl += m[i] * m[i] + (expm1f(l) - l);
      }
    }
  }
  if (a.partials != nullptr) {  // uniform over the grid: every thread of the block takes part
    store_block_sum(kl, scratch, a.partials + blockIdx.x, 0.5f);
  }
}

// kl[b] = sum of sample b's `chunks` partials: lane l adds chunks l, l + 32, ... in order, then a
// fixed butterfly over the warp. One warp per sample.
__global__ void __launch_bounds__(32) kl_merge_kernel(const float* __restrict__ partials, float* __restrict__ kl,
                                                     int64_t chunks) {
  row_sum<32>(partials, kl, chunks, nullptr);
}

template <class D, int VEC>
__global__ void __launch_bounds__(kReparamThreads) reparam_backward_kernel(const ReparamBackwardArgs a) {
  int64_t b, chunk;
  split_index(blockIdx.x, a.s.chunks, b, chunk);
  const float dkl = a.dkl != nullptr ? __ldg(a.dkl + b) : 0.f;
  const bool want_dmean = a.dmean.data != nullptr, want_dlogvar = a.dlogvar.data != nullptr;
  // The eps term exists when dz does and the forward drew noise (not deterministic).
  const bool eps_term = want_dlogvar && a.dz != nullptr && (a.s.noise != nullptr || a.s.philox);
  const bool read_mean = want_dmean && a.dkl != nullptr;
  const uint64_t seed = eps_term && a.s.philox ? stream_seed(a.s) : 0;
  const int64_t sample = b * a.s.n;
  for (ReparamWalk<VEC> c(chunk * a.s.chunk, min(a.s.n, (chunk + 1) * a.s.chunk), a.s.cols); c.valid(); c.next()) {
    const int64_t e = sample + c.j;
    // Every load of the step (dz, mean, logvar, a noise tensor's eps) before any is decoded, and all of
    // them ahead of the stores (a store may alias a later load for all the compiler knows: loads after a
    // store, or after another load's decode, would wait for it, leaving fewer in flight). Absent inputs
    // keep zero bits (0).
    const RawT<D, VEC> rdz = load_raw_if<D, VEC>(a.dz != nullptr, a.dz, e);
    const RawT<D, VEC> rm = load_raw_if<D, VEC>(read_mean, a.mean.data, a.mean.at(b, c.q, c.r));
    const RawT<D, VEC> rl = load_raw_if<D, VEC>(want_dlogvar, a.logvar.data, a.logvar.at(b, c.q, c.r));
    const RawT<D, VEC> rn = load_raw_if<D, VEC>(eps_term && a.s.noise != nullptr, a.s.noise, e);
    float dz[VEC], m[VEC], lv[VEC], eps[VEC];
    decode<D, VEC>(rdz, dz);
    decode<D, VEC>(rm, m);
    decode<D, VEC>(rl, lv);
    if (eps_term) eps_of<D, VEC>(a.s, seed, e, rn, eps);
    if (want_dmean) {
      float dm[VEC];
      if (read_mean) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) dm[i] = dz[i] + dkl * m[i];
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) dm[i] = dz[i];
      }
      store_stream<D, VEC>(a.dmean.data, a.dmean.at(b, c.q, c.r), dm);
    }
    if (want_dlogvar) {
      float dlv[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float l = lv[i];
        float g = a.dkl != nullptr ? 0.5f * dkl * expm1f(l) : 0.f;
        if (eps_term) g += 0.5f * dz[i] * eps[i] * expf(0.5f * l);
        dlv[i] = l >= kLogvarMin && l <= kLogvarMax ? g : 0.f;
      }
      store_stream<D, VEC>(a.dlogvar.data, a.dlogvar.at(b, c.q, c.r), dlv);
    }
  }
}

}  // namespace
}  // namespace genkernels
