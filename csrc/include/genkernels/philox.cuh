// Counter-based random numbers: Philox4x32-10 and the standard normals the kernels draw from it.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) maps a
// 128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1) to four 32-bit words through ten
// rounds of
//     (hi0, lo0) = 0xD2511F53 * c0;  (hi1, lo1) = 0xCD9E8D57 * c2      (32 x 32 -> 64-bit products)
//     (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
// with the key bumped by (0x9E3779B9, 0xBB67AE85) between rounds. It reproduces the published
// known-answer vectors (tests/cuda/test_philox.py compiles this header on the host and checks them).
//
// The noise stream of genkernels' kernels (genkernels/ops/schedule.py, "Philox stream"), keyed by
// (seed, offset), both unsigned 64-bit:
//   element i of a tensor (its flat index in memory order, 0 <= i < numel, for contiguous and
//   channels-last tensors alike) belongs to group q = i / 4 and takes lane l = i % 4 of it;
//   group q runs Philox4x32-10 on
//       counter = (lo32(q), hi32(q), lo32(offset), hi32(offset)),   key = (lo32(seed), hi32(seed)),
//   giving words (r0, r1, r2, r3); Box-Muller turns (r0, r1) into lanes 0 and 1 and (r2, r3)
//   into lanes 2 and 3:
//       u(r)  = (2 * (r >> 9) + 1) / 2^24                 uniform on (0, 1), never 0 or 1, exact
//       rho   = sqrt(-2 ln u(r0)),  theta = pi * (2 u(r1) - 1)     (pi and the product in float32)
//       z0 = rho cos(theta),  z1 = rho sin(theta)         (and z2, z3 from r2, r3 the same way)
// So element i's value depends only on (seed, offset, i): not on the launch configuration, the
// vector width, the dtype or the device. Each offset is a separate stream (it fills the high
// counter words), so a sampler that passes its step number as the offset gets independent noise
// at every step; streams with different offsets never overlap for tensors below 2^66 elements.
// |z| is at most sqrt(2 ln 2^24) ~ 5.77 (tails beyond that have probability below 1e-8).
// The arithmetic is float32 with the correctly rounded-or-nearly library functions (logf, sincosf,
// sqrtf) on host and device alike, not the fast intrinsics, so the kernels agree with a float32
// reference of the same formulas to a few ulp.
//
// This is not the stream of Triton's tl.randn (one Philox call per element with the offset added
// to the element index, one normal kept) nor of torch's generators: four normals per Philox call
// are cheaper in a vectorized kernel.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GENKERNELS_HD __host__ __device__ __forceinline__
#else
#define GENKERNELS_HD inline
#endif

namespace genkernels {

struct Philox4 {
  uint32_t v[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

GENKERNELS_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Philox4x32 with ten rounds on counter (c0, c1, c2, c3) and key (k0, k1).
GENKERNELS_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kPhiloxM0, c0, hi0, lo0);
    philox_mulhilo(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// u(r) = (2 * (r >> 9) + 1) / 2^24: 2^23 odd multiples of 2^-24, each exact in float32.
GENKERNELS_HD float philox_uniform(uint32_t r) {
  return static_cast<float>(((r >> 9) << 1) | 1u) * (1.0f / 16777216.0f);
}

// Box-Muller: two standard normals from two words (see the header comment).
GENKERNELS_HD void philox_box_muller(uint32_t ra, uint32_t rb, float& z0, float& z1) {
  const float u0 = philox_uniform(ra);
  const float theta = 3.14159265358979f * (2.0f * philox_uniform(rb) - 1.0f);  // 2u - 1 is exact
#if defined(__CUDA_ARCH__)
  const float rho = sqrtf(-2.0f * logf(u0));
  float s, c;
  sincosf(theta, &s, &c);
#else
  const float rho = std::sqrt(-2.0f * std::log(u0));
  const float s = std::sin(theta), c = std::cos(theta);
#endif
  z0 = rho * c;
  z1 = rho * s;
}

// The Philox words of group q of the stream keyed by (seed, offset).
GENKERNELS_HD Philox4 philox_group(uint64_t seed, uint64_t offset, uint64_t q) {
  return philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), static_cast<uint32_t>(offset),
                       static_cast<uint32_t>(offset >> 32), static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// The four standard normals of group q (elements 4q .. 4q + 3) of the stream keyed by (seed, offset).
GENKERNELS_HD void philox_normal4(uint64_t seed, uint64_t offset, uint64_t q, float (&z)[4]) {
  const Philox4 r = philox_group(seed, offset, q);
  philox_box_muller(r.v[0], r.v[1], z[0], z[1]);
  philox_box_muller(r.v[2], r.v[3], z[2], z[3]);
}

// The standard normal of element i alone, for scalar code paths: the Box-Muller pair of its lane
// only, picked with selects (an indexed array would go to local memory on the device).
GENKERNELS_HD float philox_normal(uint64_t seed, uint64_t offset, uint64_t i) {
  const Philox4 r = philox_group(seed, offset, i >> 2);
  const bool high_pair = (i & 2) != 0;
  float z0, z1;
  philox_box_muller(high_pair ? r.v[2] : r.v[0], high_pair ? r.v[3] : r.v[1], z0, z1);
  return (i & 1) != 0 ? z1 : z0;
}

// The standard normals of elements e .. e + VEC - 1 of the stream, for kernels that move VEC
// elements at a time: VEC = 1 draws element e alone (philox_normal); VEC a multiple of 4 needs e a
// multiple of 4, so the vector covers whole Philox groups and each group is computed once.
template <int VEC>
GENKERNELS_HD void stream_normals(uint64_t seed, uint64_t offset, int64_t e, float (&z)[VEC]) {
  if constexpr (VEC == 1) {
    z[0] = philox_normal(seed, offset, static_cast<uint64_t>(e));
  } else {
    static_assert(VEC % 4 == 0, "vectors cover whole Philox groups");
#pragma unroll
    for (int g = 0; g < VEC / 4; ++g) {
      float q[4];
      philox_normal4(seed, offset, static_cast<uint64_t>(e) / 4 + g, q);
#pragma unroll
      for (int k = 0; k < 4; ++k) z[4 * g + k] = q[k];
    }
  }
}

}  // namespace genkernels
