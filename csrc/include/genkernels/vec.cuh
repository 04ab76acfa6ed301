// Element types, conversions and vectorized global memory access.
//
// Tensors reach the kernels as raw pointers and a dtype code. Kernels are templated on a small
// tag type (F32, F16, BF16) that knows the storage bits and the conversions to and from float;
// all arithmetic is in float. A "vector" is VEC consecutive elements: VEC = Dtype::kVec moves
// 16 bytes in one transaction (the pointer must be 16-byte aligned), VEC = 1 is the scalar
// fallback for unaligned tensors and odd sizes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace genkernels {

// Must match genkernels/cuda/_common.py.
enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct F32 {
  using Bits = unsigned int;
  static constexpr int kVec = 4;
  static __device__ __forceinline__ float decode(Bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ Bits encode(float v) { return __float_as_uint(v); }
};

struct F16 {
  using Bits = unsigned short;
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float decode(Bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Bits encode(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

struct BF16 {
  using Bits = unsigned short;
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float decode(Bits b) { return __uint_as_float(static_cast<unsigned int>(b) << 16); }
  static __device__ __forceinline__ Bits encode(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

// Host side: bytes of one element of a dtype code, and a call of f with the dtype's tag
// (f(F32{}), f(F16{}) or f(BF16{})); an unknown code throws std::invalid_argument.
inline int element_bytes(int dtype) {
  switch (dtype) {
    case kFloat32:
      return 4;
    case kFloat16:
    case kBFloat16:
      return 2;
    default:
      throw std::invalid_argument("genkernels: unsupported dtype code " + std::to_string(dtype) +
                                  " (float32 0, float16 1, bfloat16 2)");
  }
}

template <class F>
void with_dtype(int dtype, F&& f) {
  element_bytes(dtype);  // throws for an unknown code
  switch (dtype) {
    case kFloat32:
      return f(F32{});
    case kFloat16:
      return f(F16{});
    default:
      return f(BF16{});
  }
}

// Host side: elements of `dtype` per 16-byte vector when the length n and every stride are
// multiples of it and every pointer is 16-byte aligned (0, a null pointer, is), else 1.
inline int vector_width(int dtype, int64_t n, std::initializer_list<uintptr_t> ptrs,
                        std::initializer_list<int64_t> strides = {}) {
  const int vec = 16 / element_bytes(dtype);
  if (n % vec != 0) return 1;
  for (const uintptr_t ptr : ptrs) {
    if (ptr % 16 != 0) return 1;
  }
  for (const int64_t s : strides) {
    if (s % vec != 0) return 1;
  }
  return vec;
}

// Host side: a call of f with std::true_type or std::false_type (a kernel's compile-time flag).
template <class F>
void with_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Host side: a call of f with the dtype's tag and std::integral_constant<int, VEC>, VEC = 1 when
// vec is 1, else the tag's 16-byte width (the two instantiations of a kernel<D, VEC>).
template <class F>
void with_vector(int dtype, int vec, F&& f) {
  with_dtype(dtype, [&](auto d) {
    if (vec == 1) {
      f(d, std::integral_constant<int, 1>{});
    } else {
      f(d, std::integral_constant<int, decltype(d)::kVec>{});
    }
  });
}

// The raw storage of one vector: a uint4 for a full 16-byte vector, the element bits for VEC = 1.
template <class D, int VEC>
struct Raw {
  static_assert(VEC == D::kVec, "a vector is either one element or 16 bytes");
  using Type = uint4;
};
template <class D>
struct Raw<D, 1> {
  using Type = typename D::Bits;
};
template <class D, int VEC>
using RawT = typename Raw<D, VEC>::Type;

// Cache policy of a load or store. kKeep: default (data read again soon, e.g. by the apply pass
// from L2). kStream: evict-first (last use of the data, or output not re-read by this op).
enum class Cache { kKeep, kStream };

template <class D, int VEC, Cache C = Cache::kKeep>
__device__ __forceinline__ RawT<D, VEC> load_raw(const void* base, int64_t elem) {
  const auto* p = reinterpret_cast<const RawT<D, VEC>*>(static_cast<const typename D::Bits*>(base) + elem);
  if constexpr (C == Cache::kStream) {
    return __ldcs(p);
  } else {
    return __ldg(p);
  }
}

// load_raw when `when` holds, else zero bits (0 in every dtype): the load alone in its conditional block.
// A kernel that loads a step's optional inputs this way and decodes them after the last load keeps them all
// in flight at once; a decode inside each block would make the next load wait for this one's data.
template <class D, int VEC, Cache C = Cache::kStream>
__device__ __forceinline__ RawT<D, VEC> load_raw_if(bool when, const void* base, int64_t elem) {
  RawT<D, VEC> r{};
  if (when) r = load_raw<D, VEC, C>(base, elem);
  return r;
}

template <class D, int VEC, Cache C = Cache::kKeep>
__device__ __forceinline__ void store_raw(void* base, int64_t elem, RawT<D, VEC> v) {
  auto* p = reinterpret_cast<RawT<D, VEC>*>(static_cast<typename D::Bits*>(base) + elem);
  if constexpr (C == Cache::kStream) {
    __stcs(p, v);
  } else {
    *p = v;
  }
}

// Little-endian lanes: element 2i sits in the low half of 32-bit word i.
template <class D, int VEC>
__device__ __forceinline__ void decode(const RawT<D, VEC>& r, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = D::decode(r);
  } else {
    const unsigned int w[4] = {r.x, r.y, r.z, r.w};
    if constexpr (sizeof(typename D::Bits) == 4) {
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = D::decode(w[k]);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        v[2 * k] = D::decode(static_cast<typename D::Bits>(w[k] & 0xffffu));
        v[2 * k + 1] = D::decode(static_cast<typename D::Bits>(w[k] >> 16));
      }
    }
  }
}

template <class D, int VEC>
__device__ __forceinline__ RawT<D, VEC> encode(const float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    return D::encode(v[0]);
  } else {
    unsigned int w[4];
    if constexpr (sizeof(typename D::Bits) == 4) {
#pragma unroll
      for (int k = 0; k < 4; ++k) w[k] = D::encode(v[k]);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        w[k] = static_cast<unsigned int>(D::encode(v[2 * k])) | (static_cast<unsigned int>(D::encode(v[2 * k + 1])) << 16);
      }
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// One element of a small parameter tensor (GroupNorm weight or bias) whose dtype is only known
// at run time; `fallback` when the tensor is absent (nullptr). The switch is uniform across the
// grid and the loads hit L1, so parameters need no template axis of their own.
__device__ __forceinline__ float load_param(const void* p, int code, int64_t i, float fallback) {
  if (p == nullptr) return fallback;
  switch (code) {
    case kFloat16:
      return F16::decode(__ldg(static_cast<const unsigned short*>(p) + i));
    case kBFloat16:
      return BF16::decode(__ldg(static_cast<const unsigned short*>(p) + i));
    default:
      return __ldg(static_cast<const float*>(p) + i);
  }
}

// N consecutive parameter elements p[i ..] of dtype `code` as raw bits (float32's, or a 16-bit value in the
// low half), loaded straight-line within one branch on the dtype: no decode between the loads, so they are
// all in flight at once (load_param per element decodes each where it loads it). param_value decodes them.
template <int N>
__device__ __forceinline__ void param_bits(const void* p, int code, int64_t i, unsigned int (&w)[N]) {
  if (code == kFloat32) {
#pragma unroll
    for (int k = 0; k < N; ++k) w[k] = __ldg(static_cast<const unsigned int*>(p) + i + k);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) w[k] = __ldg(static_cast<const unsigned short*>(p) + i + k);
  }
}

__device__ __forceinline__ float param_value(int code, unsigned int w) {
  if (code == kFloat16) return F16::decode(static_cast<unsigned short>(w));
  if (code == kBFloat16) return BF16::decode(static_cast<unsigned short>(w));
  return __uint_as_float(w);
}

__device__ __forceinline__ void store_param(void* p, int code, int64_t i, float v) {
  switch (code) {
    case kFloat16:
      static_cast<unsigned short*>(p)[i] = F16::encode(v);
      break;
    case kBFloat16:
      static_cast<unsigned short*>(p)[i] = BF16::encode(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

// SiLU and its derivative. __expf overflows to inf for z < -88, where __fdividef returns 0:
// silu(z) -> -0 and silu'(z) -> 0, the right limits.
__device__ __forceinline__ float silu(float z) { return __fdividef(z, 1.f + __expf(-z)); }

__device__ __forceinline__ float silu_grad(float z) {
  const float s = __fdividef(1.f, 1.f + __expf(-z));
  return s * (1.f + z * (1.f - s));
}

}  // namespace genkernels
