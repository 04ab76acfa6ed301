// Mean and variance statistics that stay accurate in float32 for data far from zero.
//
// A statistic is (count, mean, m2) with m2 = sum((x - mean)^2). Partial statistics combine
// with Chan et al.'s pairwise formula, so no sum of squares is ever formed and inputs such as
// fp16 values near 1e4 with a small spread keep their precision.
#pragma once

#include <cstdint>

namespace genkernels {

// (n, mean, m2) <- (n, mean, m2) combined with (nb, mean_b, m2_b). Either side may be empty.
__device__ __forceinline__ void welford_merge(float& n, float& mean, float& m2, float nb, float mean_b, float m2_b) {
  const float total = n + nb;
  if (nb == 0.f) return;
  const float wb = nb / total;
  const float delta = mean_b - mean;
  mean += delta * wb;
  m2 += m2_b + delta * delta * n * wb;
  n = total;
}

// One more observation.
__device__ __forceinline__ void welford_add(float& n, float& mean, float& m2, float x) {
  n += 1.f;
  const float delta = x - mean;
  mean += delta / n;
  m2 += delta * (x - mean);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ void warp_welford(float& n, float& mean, float& m2) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float nb = __shfl_xor_sync(0xffffffffu, n, o);
    const float mb = __shfl_xor_sync(0xffffffffu, mean, o);
    const float m2b = __shfl_xor_sync(0xffffffffu, m2, o);
    welford_merge(n, mean, m2, nb, mb, m2b);
  }
  // merge(a, b) and merge(b, a) round differently: make every lane agree with lane 0.
  n = __shfl_sync(0xffffffffu, n, 0);
  mean = __shfl_sync(0xffffffffu, mean, 0);
  m2 = __shfl_sync(0xffffffffu, m2, 0);
}

// Sum over the block, returned to every thread. `scratch` holds 32 floats; the leading
// __syncthreads makes back-to-back calls with the same scratch safe. All threads must call.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? scratch[lane] : 0.f);
}

// Welford statistic over the block, returned to every thread. `scratch` holds 96 floats.
__device__ __forceinline__ void block_welford(float& n, float& mean, float& m2, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  warp_welford(n, mean, m2);
  __syncthreads();
  if (lane == 0) {
    scratch[warp] = n;
    scratch[32 + warp] = mean;
    scratch[64 + warp] = m2;
  }
  __syncthreads();
  n = lane < warps ? scratch[lane] : 0.f;
  mean = lane < warps ? scratch[32 + lane] : 0.f;
  m2 = lane < warps ? scratch[64 + lane] : 0.f;
  warp_welford(n, mean, m2);
}

}  // namespace genkernels
