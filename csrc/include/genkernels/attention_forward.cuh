// Fused scaled dot-product attention, forward (FlashAttention-2 algorithm) on the tensor cores.
//
//   s_ij = scale * q_i . k_j,  p_ij = softmax_j over the allowed keys,  out_i = sum_j p_ij v_j,
//   lse_i = log(sum over allowed j of exp(s_ij)),
// with q (B, Hq, Lq, D), k and v (B, Hkv, Lkv, D), query head h reading kv head h / (Hq / Hkv).
// Key j is allowed for query i unless key_padding_mask[b, j] is set or, when causal, j > i + Lkv - Lq
// (bottom-right alignment). A row with no allowed key gets out = 0 and lse = -inf.
//
// Algorithm. One block of 4 warps owns 64 query rows of one (batch, head); each warp owns 16 of
// them. The block copies its q tile to shared memory once and keeps it in registers as mma
// A fragments, then streams the k and v tiles of kBlockN keys through shared memory with
// cp.async, double buffered (tile t+1 is in flight while tile t is used). Per tile and warp:
//   S = Q K^T (mma.sync m16n8k16, fp32 accumulators), scaled by scale*log2(e), masked to -inf;
//   running row max m and row sum l (online softmax, exp2f), O rescaled by exp2(m_old - m_new);
//   P rounded to the input dtype stays in registers (the S accumulator layout is the A operand
//   layout) and O += P V.
// At the end O / l goes out through shared memory in 16-byte stores (each row at out's batch, head
// and row strides, which therefore are multiples of 8 elements), and lse = (m + log2 l) ln 2.
// Causal blocks stop at the last key their last row may see, so key tiles wholly above the
// diagonal are never loaded; per-element masks are only evaluated on tiles that need them.
//
// Memory traffic: q read once; k and v read once per query block (ceil(Lq / 64) times per query
// head, mostly from L2 since the query blocks of one head run next to each other); out and lse
// written once. FLOPs: 4 * B * Hq * Lq * Lkv * D (two matmuls), about half of that when causal.
//
// Shared memory rows are padded from Dp to Dp + 8 elements (Dp: D rounded up to a multiple of 16,
// at least 32): a row is then an odd number of 16-byte units long, so the 8 row addresses of
// every ldmatrix phase fall in distinct bank groups (conflict-free), and so do the 4-byte
// fragment stores of the epilogue. Columns D .. Dp-1 are zero-filled by cp.async (source size
// 0), rows past Lq or Lkv likewise: zero keys and values then contribute exactly nothing.
//
// This header is the device code alone and deliberately does not include the primitives it is
// built on: its includer provides them first, in namespace genkernels,
//   shared_address, cp_async_16, cp_async_commit, cp_async_wait<N>, ldmatrix_x4,
//   ldmatrix_x4_trans, mma_16816<T>, pack2<T>   as declared and specified in genkernels/mma.cuh,
//   unsigned char* dynamic_shared_memory()      the block's dynamic shared memory (16-byte aligned),
// together with the CUDA built-ins the kernel uses (threadIdx, blockIdx, __syncthreads, __syncwarp,
// __shfl_xor_sync, __ldg, min, exp2f, log2f, fmaxf, uint4, make_uint4). csrc/attention.cu includes
// genkernels/mma.cuh (the PTX) and compiles the kernel with nvcc; tests/cuda/emulator provides
// CPU emulations of the same names and runs the same source on the CPU. Everything here sits in
// an unnamed namespace, as the kernel is private to the one translation unit that includes it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace genkernels {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 16 * kWarps;  // query rows per block
constexpr int64_t kMaxLength = int64_t{1} << 30;  // Lq, Lkv: keeps every row/key index sum in int
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Tile shapes for the padded head dim DP; every DP uses 4 warps and 64 query rows a block (small
// enough that short sequences and few heads still fill the GPU). DP <= 64 streams 64 keys per
// tile, larger heads 32: S (kBlockN / 2 floats a thread), O (DP / 2 floats) and the q fragments
// (DP / 4 registers) then stay in registers without spills. Shared memory (q tile + two stages
// of k and v): 25 KB (DP 32), 35 KB (48), 45 KB (64), 33 KB (80), 39 KB (96), 45 KB (112) and
// 51 KB (128, above the default 48 KB: opted in at the first launch).
template <int DP>
struct Tiles {
  static_assert(DP % 16 == 0 && DP >= 32 && DP <= 128, "padded head dim: a multiple of 16 in [32, 128]");
  static constexpr int kBlockN = DP <= 64 ? 64 : 32;  // keys per tile
  static constexpr int kStride = DP + 8;              // shared memory row pitch in elements
  static constexpr int kChunks = DP / 8;              // 16-byte chunks per row
  static constexpr int kQElems = kBlockM * kStride;
  static constexpr int kKVElems = kBlockN * kStride;  // one k (or v) tile of one stage
  static constexpr size_t kSmemBytes = (kQElems + 4 * kKVElems) * sizeof(uint16_t);
  // Blocks per SM the register budget is sized for (65536 / (128 * kMinBlocks) registers a
  // thread); the values keep ptxas clear of spills on sm_80 and sm_90.
  static constexpr int kMinBlocks = DP <= 32 ? 4 : DP <= 48 ? 3 : 2;
};

struct AttentionArgs {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  const unsigned char* mask;  // (B, Lkv) bool, true = padding; nullptr when absent
  uint16_t* out;              // (B, Hq, Lq, D) at out_stride (e.g. a (B, Lq, Hq, D) tensor seen as such)
  float* lse;                 // (B, Hq, Lq) contiguous
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];  // batch, head, row strides in elements
  int heads_q, group;         // group = Hq / Hkv query heads per kv head
  int len_q, len_kv, dim;
  int m_blocks;               // ceil(Lq / kBlockM)
  float scale_log2;           // scale * log2(e)
  bool causal;
};

// Issues the cp.async copies of rows [row0, row0 + ROWS) of a (L, D) matrix into a padded shared
// tile; rows >= rows_end and columns >= dim are zero-filled instead of read.
template <int DP, int ROWS>
__device__ __forceinline__ void load_tile(uint16_t* dst, const uint16_t* src, int64_t row_stride, int row0,
                                          int rows_end, int dim) {
  using Tl = Tiles<DP>;
  constexpr int kTotal = ROWS * Tl::kChunks;
#pragma unroll
  for (int c0 = 0; c0 < kTotal; c0 += kThreads) {
    const int c = c0 + static_cast<int>(threadIdx.x);
    if (kTotal % kThreads == 0 || c < kTotal) {
      const int r = c / Tl::kChunks, col = (c % Tl::kChunks) * 8;
      const bool valid = row0 + r < rows_end && col < dim;
      const uint16_t* from = valid ? src + static_cast<int64_t>(row0 + r) * row_stride + col : src;
      cp_async_16(shared_address(dst + r * Tl::kStride + col), from, valid ? 16 : 0);
    }
  }
}

template <class T, int DP>
__global__ void __launch_bounds__(kThreads, Tiles<DP>::kMinBlocks) attention_fwd_kernel(const AttentionArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async and mma.m16n8k16 need sm_80; the host refuses older GPUs first
#else
  using Tl = Tiles<DP>;
  constexpr int kBlockN = Tl::kBlockN;
  constexpr int kStride = Tl::kStride;
  constexpr float kNegInf = -__builtin_huge_valf();
  uint16_t* sq = reinterpret_cast<uint16_t*>(dynamic_shared_memory());
  uint16_t* sk = sq + Tl::kQElems;     // stage s at sk + s * kKVElems
  uint16_t* sv = sk + 2 * Tl::kKVElems;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;  // fragment row group and column pair (see mma.cuh)

  // Query blocks of one (batch, head) are adjacent in the grid (their k and v stay in L2), last
  // block first: under a causal mask the later query blocks are the longest.
  const int64_t bh = blockIdx.x / a.m_blocks;
  const int m_block = a.m_blocks - 1 - static_cast<int>(blockIdx.x - bh * a.m_blocks);
  const int64_t b = bh / a.heads_q;
  const int h = static_cast<int>(bh - b * a.heads_q);
  const int hk = h / a.group;
  const int m0 = m_block * kBlockM;
  const int shift = a.len_kv - a.len_q;  // causal: key j allowed for row i iff j <= i + shift

  int n_end = a.len_kv;
  if (a.causal) n_end = min(n_end, min(m0 + kBlockM, a.len_q) + shift);
  const int n_tiles = n_end > 0 ? (n_end + kBlockN - 1) / kBlockN : 0;

  const int64_t lse_row0 = bh * a.len_q;  // index of (b, h, 0) in lse
  if (n_tiles == 0) {
    // No row of this block sees any key (causal with Lq > Lkv): zeros and lse = -inf.
    uint16_t* og = a.out + b * a.out_stride[0] + h * a.out_stride[1];
    for (int c = tid; c < kBlockM * Tl::kChunks; c += kThreads) {
      const int r = c / Tl::kChunks, col = (c % Tl::kChunks) * 8;
      if (m0 + r < a.len_q && col < a.dim) {
        *reinterpret_cast<uint4*>(og + static_cast<int64_t>(m0 + r) * a.out_stride[2] + col) = make_uint4(0, 0, 0, 0);
      }
    }
    if (tid < kBlockM && m0 + tid < a.len_q) a.lse[lse_row0 + m0 + tid] = kNegInf;
    return;
  }

  const uint16_t* qg = a.q + b * a.q_stride[0] + h * a.q_stride[1];
  const uint16_t* kg = a.k + b * a.k_stride[0] + hk * a.k_stride[1];
  const uint16_t* vg = a.v + b * a.v_stride[0] + hk * a.v_stride[1];
  const unsigned char* mask_row = a.mask != nullptr ? a.mask + b * a.len_kv : nullptr;

  load_tile<DP, kBlockM>(sq, qg, a.q_stride[2], m0, a.len_q, a.dim);
  cp_async_commit();
  load_tile<DP, kBlockN>(sk, kg, a.k_stride[2], 0, a.len_kv, a.dim);
  load_tile<DP, kBlockN>(sv, vg, a.v_stride[2], 0, a.len_kv, a.dim);
  cp_async_commit();

  // ldmatrix.x4 lane addressing (mma.cuh). For an A tile (or a .trans B tile of V) the four
  // matrices are (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15),
  // (rows 8-15, cols 8-15): registers a[0..3] (or b[0], b[1] of column tiles 0 and 1).
  // For K (B = K^T, stored [key][d]) they are (keys 0-7, d 0-7), (keys 0-7, d 8-15),
  // (keys 8-15, d 0-7), (keys 8-15, d 8-15): b[0], b[1] of key tile 0, then of key tile 1.
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
  const int k_row = (lane & 7) + (lane >> 4) * 8, k_col = ((lane >> 3) & 1) * 8;

  cp_async_wait<1>();  // the q group has landed
  __syncthreads();
  uint32_t qf[DP / 16][4];
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    ldmatrix_x4(qf[kk], shared_address(sq + (warp * 16 + a_row) * kStride + kk * 16 + a_col));
  }

  float o[DP / 8][4];
#pragma unroll
  for (int j = 0; j < DP / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float row_max[2] = {kNegInf, kNegInf};  // rows g and g + 8, in scaled log2 units
  float row_sum[2] = {0.f, 0.f};          // this thread's share of the row sums
  const int row_lo = m0 + warp * 16 + g;  // rows of c[0], c[1] (row_lo) and c[2], c[3] (row_lo + 8)

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < n_tiles) {
      const int n1 = (tile + 1) * kBlockN;
      load_tile<DP, kBlockN>(sk + (stage ^ 1) * Tl::kKVElems, kg, a.k_stride[2], n1, a.len_kv, a.dim);
      load_tile<DP, kBlockN>(sv + (stage ^ 1) * Tl::kKVElems, vg, a.v_stride[2], n1, a.len_kv, a.dim);
    }
    cp_async_commit();   // possibly empty: keeps the group count of wait<1> uniform
    cp_async_wait<1>();  // tile `tile` has landed (only tile + 1 may be in flight)
    __syncthreads();
    const uint16_t* sk_t = sk + stage * Tl::kKVElems;
    const uint16_t* sv_t = sv + stage * Tl::kKVElems;
    const int n0 = tile * kBlockN;

    // S = Q K^T: s[j] is the 16x8 tile of keys n0 + 8j .. n0 + 8j + 7.
    float s[kBlockN / 8][4];
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
#pragma unroll
      for (int jj = 0; jj < kBlockN / 16; ++jj) {
        uint32_t kb[4];
        ldmatrix_x4(kb, shared_address(sk_t + (jj * 16 + k_row) * kStride + kk * 16 + k_col));
        mma_16816<T>(s[2 * jj], qf[kk], kb[0], kb[1]);
        mma_16816<T>(s[2 * jj + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // Scale into log2 units; mask where some element of the tile may be disallowed.
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] *= a.scale_log2;
    }
    const bool needs_mask =
        mask_row != nullptr || n0 + kBlockN > a.len_kv || (a.causal && n0 + kBlockN - 1 > m0 + shift);
    if (needs_mask) {
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int key = n0 + 8 * j + 2 * t4 + c;
          const bool key_ok = key < a.len_kv && (mask_row == nullptr || __ldg(mask_row + key) == 0);
          if (!key_ok || (a.causal && key > row_lo + shift)) s[j][c] = kNegInf;
          if (!key_ok || (a.causal && key > row_lo + 8 + shift)) s[j][2 + c] = kNegInf;
        }
      }
    }

    // Online softmax. The four threads of a quad hold one row's columns: reduce over them.
    float tile_max[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
      tile_max[0] = fmaxf(tile_max[0], fmaxf(s[j][0], s[j][1]));
      tile_max[1] = fmaxf(tile_max[1], fmaxf(s[j][2], s[j][3]));
    }
    float rescale[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float new_max = fmaxf(row_max[r], tile_max[r]);
      // A row with nothing allowed yet keeps max -inf; exponentiate against 0 there, so that
      // exp2(-inf - 0) = 0 instead of exp2(-inf + inf) = NaN.
      base[r] = new_max == kNegInf ? 0.f : new_max;
      rescale[r] = exp2f(row_max[r] - base[r]);
      row_max[r] = new_max;
      row_sum[r] *= rescale[r];
    }
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(s[j][e] - base[e >> 1]);
        row_sum[e >> 1] += s[j][e];
      }
    }
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) {
      o[j][0] *= rescale[0];
      o[j][1] *= rescale[0];
      o[j][2] *= rescale[1];
      o[j][3] *= rescale[1];
    }

    // O += P V. The A fragment of keys 16kk .. 16kk + 15 is the accumulators of key tiles 2kk
    // and 2kk + 1 (same rows, columns 2t4 and 2t4 + 8).
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dd = 0; dd < DP / 16; ++dd) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, shared_address(sv_t + (kk * 16 + a_row) * kStride + dd * 16 + a_col));
        mma_16816<T>(o[2 * dd], pa, vb[0], vb[1]);
        mma_16816<T>(o[2 * dd + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  // Epilogue: full row sums, normalize, stage the warp's 16 rows in its own (dead) q rows of
  // shared memory, then 16-byte coalesced stores.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
    inv[r] = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
  }
  uint16_t* so = sq + warp * 16 * kStride;
#pragma unroll
  for (int j = 0; j < DP / 8; ++j) {
    *reinterpret_cast<uint32_t*>(so + g * kStride + 8 * j + 2 * t4) = pack2<T>(o[j][0] * inv[0], o[j][1] * inv[0]);
    *reinterpret_cast<uint32_t*>(so + (g + 8) * kStride + 8 * j + 2 * t4) =
        pack2<T>(o[j][2] * inv[1], o[j][3] * inv[1]);
  }
  if (t4 == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row_lo + 8 * r;
      if (row < a.len_q) {
        a.lse[lse_row0 + row] = row_sum[r] > 0.f ? (row_max[r] + log2f(row_sum[r])) * kLn2 : kNegInf;
      }
    }
  }
  __syncwarp();
  uint16_t* og = a.out + b * a.out_stride[0] + h * a.out_stride[1];
#pragma unroll
  for (int c0 = 0; c0 < 16 * Tl::kChunks; c0 += 32) {
    const int c = c0 + lane;
    const int r = c / Tl::kChunks, col = (c % Tl::kChunks) * 8;
    const int row = m0 + warp * 16 + r;
    if ((16 * Tl::kChunks % 32 == 0 || c < 16 * Tl::kChunks) && row < a.len_q && col < a.dim) {
      *reinterpret_cast<uint4*>(og + static_cast<int64_t>(row) * a.out_stride[2] + col) =
          *reinterpret_cast<const uint4*>(so + r * kStride + col);
    }
  }
#endif
}

}  // namespace
}  // namespace genkernels
