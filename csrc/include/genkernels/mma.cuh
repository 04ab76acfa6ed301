// Warp-level tensor-core building blocks for sm_80 and newer: asynchronous global -> shared
// copies (cp.async), shared -> register matrix loads (ldmatrix) and the 16x8x16 matrix
// multiply-accumulate (mma.sync.aligned.m16n8k16, fp16 or bf16 inputs, fp32 accumulators).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"),
// with g = lane >> 2 (groupID) and t = lane & 3 (threadID_in_group); a 32-bit register holds two
// 16-bit elements, the lower-indexed one in its low half:
//   A (16x16, row-major), 4 registers:  a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
//                                       a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   B (16x8, "col": indexed B[k][n]), 2 registers:  b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   C, D (16x8, fp32), 4 registers:     c[0], c[1] = C[g][2t, 2t+1]    c[2], c[3] = C[g+8][2t, 2t+1]
// ldmatrix.m8n8.x4 loads four 8x8 matrices of 16-bit elements; lanes 8i .. 8i+7 give the
// addresses of rows 0..7 of matrix i, and register i of lane l receives row l >> 2, columns
// 2(l & 3), 2(l & 3) + 1 of matrix i. With .trans lane l receives rows 2(l & 3), 2(l & 3) + 1 of
// column l >> 2 instead (the transposed matrix), which is how B is fed from a row-major [k][n] tile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "genkernels/vec.cuh"

namespace genkernels {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes from global `src` to shared `dst` asynchronously; with src_bytes == 0 the 16
// bytes are zero-filled and `src` is not read (it must still be a valid global address).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// "memory" keeps the shared-memory reads on their side of __syncthreads and cp.async waits.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
}

// d += a * b on one 16x8x16 tile; T is F16 or BF16 (vec.cuh), the type of a and b.
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, F16> || std::is_same_v<T, BF16>, "mma_16816 takes F16 or BF16");
  if constexpr (std::is_same_v<T, F16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded to T (F16 or BF16) and packed into one register, `lo` in the low half.
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, F16>) {
    const __half2 h = __floats2half2_rn(lo, hi);  // .x (low half) = lo
    memcpy(&bits, &h, sizeof(bits));
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&bits, &h, sizeof(bits));
  }
  return bits;
}

}  // namespace genkernels
