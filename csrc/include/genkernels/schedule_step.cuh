// The fused sampler step's device code: one elementwise pass (plus, with guidance rescale, a
// per-sample statistics pass before it).
//
// Every big tensor is a dense (B, N) view: element (b, j) at flat index e = b*N + j, which holds
// for contiguous and channels-last tensors alike (the batch dim is outermost in both, and x,
// model_output, noise, x0_prev, prev and x0 share one layout). Per element, in float32:
//     out  = mo[e] (or 0 without a model output); guided: mo is (2B, N) = [uncond; cond] and
//            out = u + g*(c - u) with u = mo[e], c = mo[B*N + e]
//     out *= factor[b]                      guidance rescale (see below), when asked
//     x0   = px*x + po*out;  x0 = clamp(x0, -clip, clip) when clipping
//     eps  = ex*x + e0*x0
//     prev = cx*x + c0*x0 + ce*eps + cn*noise + cp*x0_prev
// Each coefficient is one float for the whole batch or a float32 (B,) array read at b. noise is a
// tensor or, in-kernel, the Philox stream of genkernels/philox.cuh keyed by (seed, offset) (element
// e takes element e of the stream: lane e % 4 of Philox group e / 4). The terms of absent inputs
// (noise, x0_prev) are left out.
//
// Vectors: VEC elements per 16-byte access when every tensor has the sample's dtype and is
// 16-byte aligned and N is a multiple of VEC (so a vector never straddles two samples and the cond
// half starts on a vector), else VEC = 1. On the scalar path model_output, noise and x0_prev may
// each have their own dtype (prev and x0 take the sample's). Each input is read once and each
// output written once; on the vector path a thread issues the loads of all its inputs before it decodes
// any (one DRAM round trip a step; tests/cuda/test_sass.py reads it off the built kernel).
//
// Guidance rescale phi: factor[b] = phi * std(c_b) / std(out_b) + (1 - phi), std over the N
// elements of sample b (torch's default, unbiased: the N - 1 cancels in the ratio; N = 1 gives
// NaN as torch's does). Statistics: (count, mean, m2) Welford/Chan in float32; each block of the
// stats kernel reduces a fixed chunk of one sample into a partial, and one warp per sample merges
// that sample's partials in a fixed order: deterministic run to run, no atomics.
//
// This header is the device code alone. It includes the genkernels headers it is built on (vec.cuh,
// philox.cuh, welford.cuh: plain CUDA C++) and expects its includer to provide the CUDA built-ins
// it uses (threadIdx, blockIdx, gridDim, blockDim, __syncthreads, __shfl_xor_sync, __shfl_sync,
// __ldg, __ldcs, __stcs, __frcp_rn, min, sqrtf, float4, make_float4, and those of the
// headers it includes). csrc/schedule.cu compiles it with nvcc; tests/cuda/emulator provides CPU
// emulations of the same names and runs the same source on the CPU. Everything here sits in an
// unnamed namespace, as the kernels are private to the one translation unit that includes them.
#pragma once

#include <cstdint>
#include <type_traits>

#include "genkernels/philox.cuh"
#include "genkernels/vec.cuh"
#include "genkernels/welford.cuh"

namespace genkernels {
namespace {

constexpr int kThreads = 256;

// A per-sample coefficient: `value` for every sample, or per_sample[b] when per_sample is set.
struct Coef {
  float value;
  const float* per_sample;

  __device__ __forceinline__ float at(int64_t b) const { return per_sample != nullptr ? __ldg(per_sample + b) : value; }
};

struct StepArgs {
  const void* x;
  const void* mo;       // (B, N), (2B, N) when guided, or nullptr (out = 0)
  const void* noise;    // (B, N) or nullptr
  const void* x0_prev;  // (B, N) or nullptr
  void* prev;
  void* x0;             // nullptr: not wanted
  const float* factor;  // (B,) guidance rescale factor, or nullptr
  Coef px, po, ex, e0, cx, c0, ce, cn, cp;
  int64_t n;            // elements per sample
  int64_t total;        // B * N
  uint64_t seed, offset;      // in-kernel noise: key and counter offset (genkernels/philox.cuh)
  const long long* seed_ptr;  // the seed as a one-element int64 device tensor instead, or nullptr
  int mo_dtype, noise_dtype, x0_prev_dtype;  // DtypeCodes; differ from the sample's only when VEC = 1
  float guidance;
  float clip;
  bool guided;
  bool clipped;
  bool philox;          // draw the noise in the kernel (noise == nullptr)
  bool per_sample;      // some coefficient is an array, or factor is set: the batch index is needed
};

template <class D, int VEC>
__device__ __forceinline__ void load_vec(const void* base, int64_t e, float (&v)[VEC]) {
  decode<D, VEC>(load_raw<D, VEC, Cache::kStream>(base, e), v);
}

template <class D>
__host__ __device__ constexpr int dtype_code_of() {
  if constexpr (std::is_same_v<D, F16>) return kFloat16;
  if constexpr (std::is_same_v<D, BF16>) return kBFloat16;
  return kFloat32;
}

// An input vector stored as `dtype`: on the vector path always D (the host checks it), on the
// scalar path any of the three (a uniform branch).
template <class D, int VEC>
__device__ __forceinline__ void load_input(const void* base, int dtype, int64_t e, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    if (dtype != dtype_code_of<D>()) {
      v[0] = load_param(base, dtype, e, 0.f);
      return;
    }
  }
  load_vec<D, VEC>(base, e, v);
}

template <class D, int VEC>
__device__ __forceinline__ void store_vec(void* base, int64_t e, const float (&v)[VEC]) {
  store_raw<D, VEC, Cache::kStream>(base, e, encode<D, VEC>(v));
}

// Grid-stride over vectors; vector i holds elements e = i*VEC .. e + VEC - 1, all of sample e / N.
template <class D, int VEC>
__global__ void __launch_bounds__(kThreads) schedule_step_kernel(const StepArgs a) {
  const int64_t vectors = a.total / VEC;
  const int64_t guided_shift = a.total;  // the cond half of a guided model output starts B*N elements in
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < vectors;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t e = i * VEC;
    const int64_t b = a.per_sample ? e / a.n : 0;

    // Absent inputs read as 0 (the model output, its cond half) or are left out below (noise, x0_prev).
    float x[VEC], out[VEC], cond[VEC], noise[VEC], x0p[VEC];
    if constexpr (VEC > 1) {
      // Every input's raw bits first (the conditional blocks hold nothing but loads), decoded after the
      // last load is issued: a step waits for one DRAM round trip, not one per input (x, the model output
      // and its cond half, noise, x0_prev: up to five). Absent inputs keep zero bits (0).
      const RawT<D, VEC> rx = load_raw<D, VEC, Cache::kStream>(a.x, e);
      const RawT<D, VEC> rmo = load_raw_if<D, VEC>(a.mo != nullptr, a.mo, e);
      const RawT<D, VEC> rcond = load_raw_if<D, VEC>(a.mo != nullptr && a.guided, a.mo, guided_shift + e);
      const RawT<D, VEC> rnoise = load_raw_if<D, VEC>(a.noise != nullptr, a.noise, e);
      const RawT<D, VEC> rx0p = load_raw_if<D, VEC>(a.x0_prev != nullptr, a.x0_prev, e);
      decode<D, VEC>(rx, x);
      decode<D, VEC>(rmo, out);
      decode<D, VEC>(rcond, cond);
      decode<D, VEC>(rnoise, noise);
      decode<D, VEC>(rx0p, x0p);
    } else {  // one element, each input in its own dtype
      load_vec<D, VEC>(a.x, e, x);
      out[0] = cond[0] = noise[0] = x0p[0] = 0.f;
      if (a.mo != nullptr) load_input<D, VEC>(a.mo, a.mo_dtype, e, out);
      if (a.mo != nullptr && a.guided) load_input<D, VEC>(a.mo, a.mo_dtype, guided_shift + e, cond);
      if (a.noise != nullptr) load_input<D, VEC>(a.noise, a.noise_dtype, e, noise);
      if (a.x0_prev != nullptr) load_input<D, VEC>(a.x0_prev, a.x0_prev_dtype, e, x0p);
    }
    if (a.guided) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = out[k] + a.guidance * (cond[k] - out[k]);
    }
    if (a.mo != nullptr && a.factor != nullptr) {
      const float f = __ldg(a.factor + b);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] *= f;
    }
    if (a.philox) {  // noise drawn in the kernel (no noise tensor)
      const uint64_t seed = a.seed_ptr != nullptr ? static_cast<uint64_t>(__ldg(a.seed_ptr)) : a.seed;
      stream_normals<VEC>(seed, a.offset, e, noise);
    }

    const float px = a.px.at(b), po = a.po.at(b), ex = a.ex.at(b), e0 = a.e0.at(b);
    const float cx = a.cx.at(b), c0 = a.c0.at(b), ce = a.ce.at(b), cn = a.cn.at(b), cp = a.cp.at(b);
    const bool has_noise = a.noise != nullptr || a.philox;
    float x0[VEC], prev[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float v = px * x[k] + po * out[k];
      // Comparisons, not fminf / fmaxf: those return the bound for a NaN, torch.clamp keeps the NaN.
      if (a.clipped) v = v < -a.clip ? -a.clip : (v > a.clip ? a.clip : v);
      x0[k] = v;
      const float eps = ex * x[k] + e0 * v;
      float p = cx * x[k] + c0 * v + ce * eps;
      if (has_noise) p += cn * noise[k];
      if (a.x0_prev != nullptr) p += cp * x0p[k];
      prev[k] = p;
    }
    store_vec<D, VEC>(a.prev, e, prev);
    if (a.x0 != nullptr) store_vec<D, VEC>(a.x0, e, x0);
  }
}

// Guidance-rescale statistics, pass 1: block (b, chunk) reduces elements [chunk*C, min(N, (chunk+1)*C))
// of sample b (C = chunk_vectors * VEC) to (mean, m2) of cond and of the guided out, written to
// partials[b * chunks + chunk] as (mean_c, m2_c, mean_g, m2_g). The count is implied by the chunk.
template <class D, int VEC>
__global__ void __launch_bounds__(kThreads) rescale_stats_kernel(const void* __restrict__ mo,
                                                                 float4* __restrict__ partials,
                                                                 int64_t n, int64_t total, int64_t chunk_vectors,
                                                                 int64_t chunks, float guidance) {
  __shared__ float scratch[96];
  const int64_t b = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x - b * chunks;
  const int64_t sample_vectors = n / VEC;
  const int64_t v0 = chunk * chunk_vectors;
  const int64_t v1 = min(sample_vectors, v0 + chunk_vectors);
  const int64_t base = b * n;

  float cnt = 0.f, mean_c = 0.f, m2_c = 0.f, mean_g = 0.f, m2_g = 0.f;
  for (int64_t v = v0 + threadIdx.x; v < v1; v += kThreads) {
    const int64_t e = base + v * VEC;
    float u[VEC], c[VEC];
    load_vec<D, VEC>(mo, e, u);
    load_vec<D, VEC>(mo, total + e, c);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float g = u[k] + guidance * (c[k] - u[k]);
      cnt += 1.f;
      const float inv = __frcp_rn(cnt);
      const float dc = c[k] - mean_c;
      mean_c += dc * inv;
      m2_c += dc * (c[k] - mean_c);
      const float dg = g - mean_g;
      mean_g += dg * inv;
      m2_g += dg * (g - mean_g);
    }
  }
  float cnt_g = cnt;
  block_welford(cnt, mean_c, m2_c, scratch);
  block_welford(cnt_g, mean_g, m2_g, scratch);  // block_welford begins with __syncthreads: scratch reuse is safe
  if (threadIdx.x == 0) partials[blockIdx.x] = make_float4(mean_c, m2_c, mean_g, m2_g);
}

// Pass 2: one warp per sample merges its chunks' partials in a fixed order into
// factor[b] = phi * std(c) / std(out) + (1 - phi).
__global__ void __launch_bounds__(32) rescale_factor_kernel(const float4* __restrict__ partials,
                                                            float* __restrict__ factor,
                                                            int64_t n, int64_t chunk_elems, int64_t chunks, float phi) {
  const int64_t b = blockIdx.x;
  float cnt_c = 0.f, mean_c = 0.f, m2_c = 0.f, cnt_g = 0.f, mean_g = 0.f, m2_g = 0.f;
  for (int64_t chunk = threadIdx.x; chunk < chunks; chunk += 32) {
    const float4 p = partials[b * chunks + chunk];
    const float count = static_cast<float>(min(n, (chunk + 1) * chunk_elems) - chunk * chunk_elems);
    welford_merge(cnt_c, mean_c, m2_c, count, p.x, p.y);
    welford_merge(cnt_g, mean_g, m2_g, count, p.z, p.w);
  }
  warp_welford(cnt_c, mean_c, m2_c);
  warp_welford(cnt_g, mean_g, m2_g);
  if (threadIdx.x == 0) {
    const float dof = static_cast<float>(n - 1);
    const float std_c = sqrtf(m2_c / dof), std_g = sqrtf(m2_g / dof);
    factor[b] = phi * (std_c / std_g) + (1.f - phi);
  }
}

}  // namespace
}  // namespace genkernels
