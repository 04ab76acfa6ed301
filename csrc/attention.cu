// Fused scaled dot-product attention, forward: argument checks and launches. The kernel, and the
// description of its algorithm, is in genkernels/attention_forward.cuh, compiled here on the PTX
// primitives of genkernels/mma.cuh (tests/cuda/emulator runs the same source on the CPU).
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "genkernels/api.h"
#include "genkernels/mma.cuh"
#include "genkernels/runtime.cuh"
#include "genkernels/vec.cuh"

namespace genkernels {
namespace {

// The block's dynamic shared memory (the third launch parameter), for attention_forward.cuh.
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char smem[];
  return smem;
}

}  // namespace
}  // namespace genkernels

#include "genkernels/attention_forward.cuh"

namespace genkernels {
namespace {

void fail(const std::string& what) { throw std::invalid_argument("genkernels: attention: " + what); }

void check_problem(const AttentionProblem& p, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse) {
  if (p.batch < 1 || p.heads_q < 1 || p.heads_kv < 1 || p.len_q < 1 || p.len_kv < 1 || p.head_dim < 1) {
    fail("B, Hq, Hkv, Lq, Lkv and D must be >= 1");
  }
  if (p.heads_q % p.heads_kv != 0) {
    fail("Hq = " + std::to_string(p.heads_q) + " is not a multiple of Hkv = " + std::to_string(p.heads_kv));
  }
  if (p.head_dim % 8 != 0 || p.head_dim > 128) {
    fail("head dim " + std::to_string(p.head_dim) + " unsupported: it must be a multiple of 8 and at most 128");
  }
  if (p.dtype != kFloat16 && p.dtype != kBFloat16) {
    fail("dtype code " + std::to_string(p.dtype) + " unsupported: float16 or bfloat16 only");
  }
  if (p.len_q > kMaxLength || p.len_kv > kMaxLength) fail("Lq and Lkv must be at most 2^30");
  for (const uintptr_t ptr : {q, k, v, out}) {
    if (ptr == 0 || ptr % 16 != 0) fail("q, k, v and out must be non-null and 16-byte aligned");
  }
  if (lse == 0 || lse % 4 != 0) fail("lse must be a non-null float32 tensor");
  // q, k and v are read, and out written, in 16-byte vectors from the start of each row.
  const std::pair<const char*, const int64_t*> strided[] = {
      {"q", p.q_strides}, {"k", p.k_strides}, {"v", p.v_strides}, {"out", p.out_strides}};
  for (const auto& [name, strides] : strided) {
    for (int i = 0; i < 3; ++i) {
      if (strides[i] < 0 || strides[i] % 8 != 0) {
        fail(std::string(name) + " has batch, head and row strides (" + std::to_string(strides[0]) + ", " +
             std::to_string(strides[1]) + ", " + std::to_string(strides[2]) +
             ") elements: each must be a non-negative multiple of 8 (16 bytes)");
      }
    }
  }
  const int64_t blocks = p.batch * p.heads_q * ceil_div(p.len_q, kBlockM);
  if (blocks > 0x7fffffff) fail("grid of " + std::to_string(blocks) + " blocks exceeds 2^31 - 1");
}

// Opts each instantiation in to its shared memory once per device when it exceeds the default
// 48 KB (a per-function attribute, hence the flags live in the instantiation).
template <class T, int DP>
void launch(const AttentionArgs& a, int device, unsigned int blocks, cudaStream_t stream) {
  constexpr size_t kSmem = Tiles<DP>::kSmemBytes;
  if constexpr (kSmem > 48 * 1024) {
    static std::array<std::atomic<bool>, 64> opted_in{};
    const bool cached = device >= 0 && device < 64;
    if (!(cached && opted_in[device].load())) {
      const DeviceInfo dev = device_info(device);
      if (static_cast<size_t>(dev.smem_optin) < kSmem) {
        fail("needs " + std::to_string(kSmem) + " bytes of shared memory per block, the device allows " +
             std::to_string(dev.smem_optin));
      }
      const cudaError_t err = cudaFuncSetAttribute(attention_fwd_kernel<T, DP>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
      if (err != cudaSuccess) {
        cudaGetLastError();
        throw std::runtime_error(std::string("genkernels: attention_fwd_kernel: enabling ") + std::to_string(kSmem) +
                                 " bytes of shared memory failed: " + cudaGetErrorString(err));
      }
      if (cached) opted_in[device].store(true);
    }
  }
  attention_fwd_kernel<T, DP><<<blocks, kThreads, kSmem, stream>>>(a);
  check_launch("attention_fwd_kernel");
}

template <class T>
void launch_dim(const AttentionArgs& a, int device, unsigned int blocks, cudaStream_t stream) {
  // D (a multiple of 8) rounded up to a multiple of 16, at least 32.
  switch (a.dim <= 32 ? 32 : (a.dim + 15) / 16 * 16) {
    case 32:
      return launch<T, 32>(a, device, blocks, stream);
    case 48:
      return launch<T, 48>(a, device, blocks, stream);
    case 64:
      return launch<T, 64>(a, device, blocks, stream);
    case 80:
      return launch<T, 80>(a, device, blocks, stream);
    case 96:
      return launch<T, 96>(a, device, blocks, stream);
    case 112:
      return launch<T, 112>(a, device, blocks, stream);
    default:
      return launch<T, 128>(a, device, blocks, stream);
  }
}

}  // namespace

void attention_forward(const AttentionProblem& p, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t key_padding_mask,
                       uintptr_t out, uintptr_t lse, float scale, bool causal, uintptr_t stream_handle) {
  check_problem(p, q, k, v, out, lse);
  use_device(p.device);
  AttentionArgs a{};
  a.q = reinterpret_cast<const uint16_t*>(q);
  a.k = reinterpret_cast<const uint16_t*>(k);
  a.v = reinterpret_cast<const uint16_t*>(v);
  a.mask = reinterpret_cast<const unsigned char*>(key_padding_mask);
  a.out = reinterpret_cast<uint16_t*>(out);
  a.lse = reinterpret_cast<float*>(lse);
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = p.q_strides[i];
    a.k_stride[i] = p.k_strides[i];
    a.v_stride[i] = p.v_strides[i];
    a.out_stride[i] = p.out_strides[i];
  }
  a.heads_q = static_cast<int>(p.heads_q);
  a.group = static_cast<int>(p.heads_q / p.heads_kv);
  a.len_q = static_cast<int>(p.len_q);
  a.len_kv = static_cast<int>(p.len_kv);
  a.dim = static_cast<int>(p.head_dim);
  a.m_blocks = static_cast<int>(ceil_div(p.len_q, kBlockM));
  a.scale_log2 = scale * kLog2e;
  a.causal = causal;
  const auto blocks = static_cast<unsigned int>(p.batch * p.heads_q * a.m_blocks);
  const cudaStream_t stream = as_stream(stream_handle);
  if (p.dtype == kFloat16) {
    launch_dim<F16>(a, p.device, blocks, stream);
  } else {
    launch_dim<BF16>(a, p.device, blocks, stream);
  }
}

}  // namespace genkernels
