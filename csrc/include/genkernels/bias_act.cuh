// Fused bias + activation (StyleGAN's bias_act), forward and gradient map: device code.
//
// x is dense (contiguous or channels last) and y, dy and dz share its strides, so every tensor is
// one flat run of n elements in memory order. The bias of flat element e is bias[(e / stride_c) % C]
// (stride_c = x.stride(dim), C = x.shape[dim]), which holds in both layouts; bias is (C,) in float32,
// float16 or bfloat16 (read in its own dtype), or absent. Per element, in float32 (the formulas of
// genkernels/ops/bias_act.py):
//     z  = x + b
//     y  = act(z) * gain, then y = y < -clamp ? -clamp : (y > clamp ? clamp : y) when clamped (NaN passes)
//     dz = dy * gain * act'(z) * m,  m = (-clamp <= act(z) * gain <= clamp) when clamped, else 1
// in torch's autograd order: g = m ? dy * gain : 0, then dz = g * act'(z), for relu a select
// (z <= 0 ? 0 : g, as threshold_backward: a NaN z passes g, a NaN dy gives 0 where z <= 0), so a NaN
// act'(z) keeps dz NaN where the clamp stops the gradient, as torch's does.
// act: linear 0, relu 1 (z < 0 ? 0 : z), lrelu 2 (z > 0 ? z : alpha z), tanh 3, sigmoid 4, silu 5
// (z sigmoid(z)), gelu 6 (exact: z Phi(z), Phi(z) = 0.5 (1 + erf(z / sqrt 2))). act' is torch's
// autograd's: lrelu z > 0 ? 1 : alpha, tanh 4t / (1 + t)^2 with t = exp(-2|z|)
// (1 - tanh^2 without cancellation), sigmoid s (1 - s), silu s (1 + z (1 - s)), gelu Phi(z) + z phi(z).
// sigmoid and 1 - sigmoid come from e = exp(-|z|) (1 / (1 + e) and e / (1 + e)): no overflow and no
// cancellation, and every exponential sees a non-positive argument, so all of it stays finite for
// large |z|. Accurate expf / tanhf / erff (not __expf): the emulator checks against float64.
//
// Work split: block b of the 1-D grid covers kBiasActUnroll * kBiasActThreads consecutive vectors
// of VEC elements (VEC: the dtype's 16-byte width when every pointer is 16-byte aligned, else 1), and
// thread t its vectors t, t + kBiasActThreads, ..., loading all of them before storing any; a vector
// that lies partly past n is done one element at a time (the tail of a length that is not a multiple
// of VEC). The bias index is divided out once per vector and then stepped element by element. The
// activation is a template parameter; the bias and the clamp are uniform run-time branches. The
// gradient's output dtype O is x's or float32 (unrounded dz for the bias gradient's sum): an 8-wide
// fp16 / bf16 vector then stores two 4-wide float32 vectors.
// Memory traffic: forward x read once, y written once; gradient dy and x read once, dz written
// once; the bias gathered through the read-only cache.
//
// Gradient codes (the piecewise-linear activations linear, relu and lrelu, whose act' takes two values):
// the forward can also write 2 bits an element from which the gradient follows without x, element e's at
// bits 2 (e % 4) of byte e / 4 of `codes`: bit 0 the slope is 1 (z > 0; relu: !(z <= 0), so a NaN z),
// bit 1 the clamp passes the gradient (always set without a clamp). The gradient kernels then read the
// codes in place of x (a quarter of a byte an element instead of 2 or 4) and compute g = dy * gain, 0
// where bit 1 is clear, then where bit 0 is clear 0 (relu) or g * alpha (lrelu): the float32 operations
// of the gradient from z, so the same bits. A forward vector of W elements (W = 4 or 8, the 16-byte
// width: the forward writes codes on its vector path only) writes W / 4 whole bytes, so no two threads
// share a byte; the codes buffer holds
// 2 * ceil(n / 8) bytes (whole words for a partial last vector). The gradients read them at any width.
//
// This header is the device code alone; it expects its includer to provide the CUDA built-ins it
// uses (threadIdx, blockIdx, __ldg, __ldcs, __stcs, expf, tanhf, erff, fabsf and those of
// chunk_walk.cuh). csrc/bias_act.cu compiles it with nvcc; tests/cuda/emulator runs the same
// source on the CPU. Everything sits in an unnamed namespace (private to the including unit).
#pragma once

#include <cstdint>
#include <type_traits>

#include "genkernels/chunk_walk.cuh"
#include "genkernels/vec.cuh"

namespace genkernels {
namespace {

constexpr int kBiasActThreads = 256;

// Must match ACTS in genkernels/cuda/bias_act.py.
enum BiasActKind : int {
  kActLinear = 0,
  kActRelu = 1,
  kActLrelu = 2,
  kActTanh = 3,
  kActSigmoid = 4,
  kActSilu = 5,
  kActGelu = 6,
  kActCount = 7
};

// Host: a call of f with std::integral_constant<int, ACT> for the activation code.
template <class F>
void with_act(int act, F&& f) {
  switch (act) {
    case kActLinear:
      return f(std::integral_constant<int, kActLinear>{});
    case kActRelu:
      return f(std::integral_constant<int, kActRelu>{});
    case kActLrelu:
      return f(std::integral_constant<int, kActLrelu>{});
    case kActTanh:
      return f(std::integral_constant<int, kActTanh>{});
    case kActSigmoid:
      return f(std::integral_constant<int, kActSigmoid>{});
    case kActSilu:
      return f(std::integral_constant<int, kActSilu>{});
    default:
      return f(std::integral_constant<int, kActGelu>{});
  }
}

struct BiasActArgs {
  const void* x;       // n elements, dtype D
  const void* dy;      // n elements, dtype D (gradient only)
  const void* bias;    // (C,) in bias_dtype, or nullptr
  int bias_dtype;      // kFloat32, kFloat16 or kBFloat16 (a branch the whole grid takes alike)
  void* out;           // y (dtype D) or dz (dtype O)
  void* codes;         // gradient codes (uint8, 2 bits an element): written by the forward, read by the
                       // gradients in place of x, when their CODES flag is set
  int64_t n;           // elements
  int64_t stride_c;    // x.stride(dim) (> 0)
  int64_t channels;    // C = x.shape[dim] (> 0)
  float alpha, gain, clamp;
  bool has_clamp;
};

// (sigmoid(z), 1 - sigmoid(z)), each without cancellation or overflow.
__device__ __forceinline__ void sigmoid_pair(float z, float& s, float& sc) {
  const float e = expf(-fabsf(z));
  const float p = 1.f / (1.f + e);
  const float q = e * p;
  const bool pos = z >= 0.f;
  s = pos ? p : q;
  sc = pos ? q : p;
}

// Phi(z) = 0.5 (1 + erf(z / sqrt 2)), torch's exact GELU formula.
__device__ __forceinline__ float gelu_cdf(float z) { return 0.5f * (1.f + erff(z * 0.70710678118654752f)); }

template <int ACT>
__device__ __forceinline__ float act_value(float z, float alpha) {
  if constexpr (ACT == kActLinear) {
    return z;
  } else if constexpr (ACT == kActRelu) {
    return z < 0.f ? 0.f : z;  // NaN passes, as in F.relu
  } else if constexpr (ACT == kActLrelu) {
    return z > 0.f ? z : z * alpha;
  } else if constexpr (ACT == kActTanh) {
    return tanhf(z);
  } else if constexpr (ACT == kActSigmoid) {
    float s, sc;
    sigmoid_pair(z, s, sc);
    return s;
  } else if constexpr (ACT == kActSilu) {
    float s, sc;
    sigmoid_pair(z, s, sc);
    return z * s;
  } else {
    static_assert(ACT == kActGelu, "unknown activation");
    return z * gelu_cdf(z);
  }
}

// act'(z) of every activation but relu (a select: act_backward).
template <int ACT>
__device__ __forceinline__ float act_grad(float z, float alpha) {
  static_assert(ACT != kActRelu, "relu's derivative is a select: act_backward");
  if constexpr (ACT == kActLinear) {
    return 1.f;
  } else if constexpr (ACT == kActLrelu) {
    return z > 0.f ? 1.f : alpha;
  } else if constexpr (ACT == kActTanh) {
    const float t = expf(-2.f * fabsf(z));
    const float u = 1.f + t;
    return 4.f * t / (u * u);
  } else if constexpr (ACT == kActSigmoid) {
    float s, sc;
    sigmoid_pair(z, s, sc);
    return s * sc;
  } else if constexpr (ACT == kActSilu) {
    float s, sc;
    sigmoid_pair(z, s, sc);
    return s * (1.f + z * sc);
  } else {
    static_assert(ACT == kActGelu, "unknown activation");
    return gelu_cdf(z) + z * (0.3989422804014327f * expf(-0.5f * z * z));
  }
}

// g * act'(z), as torch's autograd applies act' to an incoming gradient g: for relu a select (0 where
// z <= 0, else g, as threshold_backward: a NaN z passes g, a NaN or infinite g gives 0 where z <= 0).
template <int ACT>
__device__ __forceinline__ float act_backward(float g, float z, float alpha) {
  if constexpr (ACT == kActRelu) {
    return z <= 0.f ? 0.f : g;
  } else {
    return g * act_grad<ACT>(z, alpha);
  }
}

// dz = act_backward(m ? dy * gain : 0, z), m the clamp's pass mask (torch.clamp's gradient; NaN: 0), in
// torch's order: a NaN act'(z) keeps dz NaN where the clamp stops the gradient.
template <int ACT>
__device__ __forceinline__ float grad_value(float dy, float z, float alpha, float gain, bool has_clamp, float clamp) {
  float g = dy * gain;
  if (has_clamp) {
    const float pre = act_value<ACT>(z, alpha) * gain;
    if (!(pre >= -clamp && pre <= clamp)) g = 0.f;
  }
  return act_backward<ACT>(g, z, alpha);
}

// bias[c] as float32, read in the bias's own dtype.
__device__ __forceinline__ float bias_value(const BiasActArgs& a, int64_t c) {
  if (a.bias_dtype == kBFloat16) return BF16::decode(__ldg(static_cast<const unsigned short*>(a.bias) + c));
  if (a.bias_dtype == kFloat16) return F16::decode(__ldg(static_cast<const unsigned short*>(a.bias) + c));
  return __ldg(static_cast<const float*>(a.bias) + c);
}

// z[i] += bias[((e + i) / stride_c) % C] for i < W (e a multiple of W): one division, then one bias
// value for the whole vector when stride_c is a multiple of W (contiguous NCHW: the vector lies in one
// channel); channels innermost (channels_last) with the vector's W channels consecutive, W values loaded
// straight-line before any is added; else stepped element by element (a vector across the last channel).
template <int W>
__device__ __forceinline__ void add_bias(const BiasActArgs& a, int64_t e, float (&z)[W]) {
  if (a.bias == nullptr) return;
  int64_t q, r, wraps, c;
  split_index(e, a.stride_c, q, r);
  split_index(q, a.channels, wraps, c);
  if (W > 1 && (a.stride_c & (W - 1)) == 0) {
    const float b = bias_value(a, c);
#pragma unroll
    for (int i = 0; i < W; ++i) z[i] += b;
  } else if (W > 1 && a.stride_c == 1 && c + W <= a.channels) {
    // Channels innermost (channels_last), the vector's W channels consecutive: their W values load
    // straight-line, all before any is added (one loaded and added at a time would make each load wait
    // for the one before it).
    unsigned int bits[W];
    param_bits<W>(a.bias, a.bias_dtype, c, bits);
#pragma unroll
    for (int i = 0; i < W; ++i) z[i] += param_value(a.bias_dtype, bits[i]);
  } else {
#pragma unroll
    for (int i = 0; i < W; ++i) {
      z[i] += bias_value(a, c);
      if (++r == a.stride_c) {
        r = 0;
        if (++c == a.channels) c = 0;
      }
    }
  }
}

// W elements of float32 values as dtype O at out[e ..]: one store of O's width, or two 4-wide
// float32 vectors for an 8-wide fp16 / bf16 vector of the input.
template <class O, int W>
__device__ __forceinline__ void store_out(void* out, int64_t e, const float (&v)[W]) {
  if constexpr (W == 1 || W == O::kVec) {
    store_stream<O, W>(out, e, v);
  } else {
    static_assert(W == 2 * O::kVec, "an 8-wide vector stored as two 4-wide float32 vectors");
    float lo[O::kVec], hi[O::kVec];
#pragma unroll
    for (int i = 0; i < O::kVec; ++i) {
      lo[i] = v[i];
      hi[i] = v[O::kVec + i];
    }
    store_stream<O, O::kVec>(out, e, lo);
    store_stream<O, O::kVec>(out, e + O::kVec, hi);
  }
}

// y of W elements at e from their pre-activations z.
template <int ACT, class D, int W>
__device__ __forceinline__ void forward_store(const BiasActArgs& a, int64_t e, const float (&z)[W]) {
  float y[W];
#pragma unroll
  for (int i = 0; i < W; ++i) {
    float v = act_value<ACT>(z[i], a.alpha) * a.gain;
    if (a.has_clamp) v = v < -a.clamp ? -a.clamp : (v > a.clamp ? a.clamp : v);  // NaN passes
    y[i] = v;
  }
  store_stream<D, W>(a.out, e, y);
}

// dz of W elements, in place of dy, from their pre-activations z.
template <int ACT, int W>
__device__ __forceinline__ void grad_map(const BiasActArgs& a, const float (&z)[W], float (&dy)[W]) {
#pragma unroll
  for (int i = 0; i < W; ++i) dy[i] = grad_value<ACT>(dy[i], z[i], a.alpha, a.gain, a.has_clamp, a.clamp);
}

// One element at e (the tail of a length that is not a multiple of the vector width).
template <int ACT, class D>
__device__ __forceinline__ void forward_element(const BiasActArgs& a, int64_t e) {
  float z[1];
  load_stream<D, 1>(a.x, e, z);
  add_bias<1>(a, e, z);
  forward_store<ACT, D, 1>(a, e, z);
}

// ---------------------------------------------------------------------------------------------------
// Gradient codes (see the header).
template <int ACT>
constexpr bool kCodable = ACT == kActLinear || ACT == kActRelu || ACT == kActLrelu;

// The 2-bit code of one element from its pre-activation z: bit 0 the slope is 1 (z > 0; relu !(z <= 0), as
// act_backward: its gradient passes at a NaN z), bit 1 the clamp passes.
template <int ACT>
__device__ __forceinline__ unsigned int grad_code(const BiasActArgs& a, float z) {
  static_assert(kCodable<ACT>, "codes are for the piecewise-linear activations");
  unsigned int c = (ACT == kActRelu ? !(z <= 0.f) : z > 0.f) ? 1u : 0u;
  if (a.has_clamp) {
    const float pre = act_value<ACT>(z, a.alpha) * a.gain;
    if (pre >= -a.clamp && pre <= a.clamp) c |= 2u;
  } else {
    c |= 2u;
  }
  return c;
}

// W codes at element e (a multiple of W) as one word, element e + i at bits 2 i: a 16-bit load for W = 8,
// an 8-bit one for W = 4, and for W = 1 the byte holding element e shifted down to it.
template <int W>
__device__ __forceinline__ unsigned int load_codes(const void* codes, int64_t e) {
  const auto* bytes = static_cast<const unsigned char*>(codes);
  if constexpr (W == 8) {
    return __ldcs(reinterpret_cast<const unsigned short*>(bytes) + e / 8);
  } else if constexpr (W == 4) {
    return __ldcs(bytes + e / 4);
  } else {
    static_assert(W == 1, "codes are read 1, 4 or 8 elements at a time");
    return static_cast<unsigned int>(__ldcs(bytes + e / 4)) >> (2 * (e % 4));
  }
}

// The word of W codes (W = 4 or 8) of the forward vector at element e.
template <int W>
__device__ __forceinline__ void store_codes(void* codes, int64_t e, unsigned int word) {
  auto* bytes = static_cast<unsigned char*>(codes);
  if constexpr (W == 8) {
    __stcs(reinterpret_cast<unsigned short*>(bytes) + e / 8, static_cast<unsigned short>(word));
  } else {
    static_assert(W == 4, "the forward writes codes on its 16-byte vector path only");
    __stcs(bytes + e / 4, static_cast<unsigned char>(word));
  }
}

// dz of W elements, in place of dy, from their codes (element i at bits 2 i of word): the operations of
// grad_map on the slope the code stands for.
template <int ACT, int W>
__device__ __forceinline__ void grad_map_codes(const BiasActArgs& a, unsigned int word, float (&dy)[W]) {
  static_assert(kCodable<ACT>, "codes are for the piecewise-linear activations");
#pragma unroll
  for (int i = 0; i < W; ++i) {
    const unsigned int c = word >> (2 * i);
    float g = dy[i] * a.gain;
    if (a.has_clamp && !(c & 2u)) g = 0.f;
    if constexpr (ACT == kActRelu) g = (c & 1u) ? g : 0.f;
    if constexpr (ACT == kActLrelu) g = (c & 1u) ? g : g * a.alpha;
    dy[i] = g;
  }
}

// What a gradient kernel reads besides dy for W elements at e: x (dz from z = x + bias, through grad_map)
// or, CODES, their codes (through grad_map_codes). load() issues the read; map() turns the decoded dy into
// dz in place, adding the bias to z with add_bias(z) (the caller's: by index, or the values it holds).
template <int ACT, class D, int W, bool CODES>
struct GradSource {
  static_assert(!CODES || kCodable<ACT>, "codes are for the piecewise-linear activations");
  RawT<D, W> x;
  unsigned int word;

  __device__ __forceinline__ void load(const BiasActArgs& a, int64_t e) {
    if constexpr (CODES) {
      word = load_codes<W>(a.codes, e);
    } else {
      x = load_raw<D, W, Cache::kStream>(a.x, e);
    }
  }

  template <class AddBias>
  __device__ __forceinline__ void map(const BiasActArgs& a, float (&g)[W], AddBias add_bias) const {
    if constexpr (CODES) {
      grad_map_codes<ACT, W>(a, word, g);
    } else {
      float z[W];
      decode<D, W>(x, z);
      add_bias(z);
      grad_map<ACT, W>(a, z, g);
    }
  }
};

template <int ACT, class D, class O, bool CODES>
__device__ __forceinline__ void grad_element(const BiasActArgs& a, int64_t e) {
  GradSource<ACT, D, 1, CODES> src;
  src.load(a, e);
  float g[1];
  load_stream<D, 1>(a.dy, e, g);
  src.map(a, g, [&](float(&z)[1]) { add_bias<1>(a, e, z); });
  store_out<O, 1>(a.out, e, g);
}

// The elementwise kernels are flat walks (chunk_walk.cuh's flat_walk) in blocks of kBiasActThreads;
// the gradient with dbias takes kBiasActUnroll rows a step the same way.
constexpr int kBiasActUnroll = kFlatUnroll;

// Host: blocks of the elementwise kernels' 1-D grid for n elements in vectors of vec.
inline int64_t bias_act_blocks(int64_t n, int vec) { return flat_blocks(n, kBiasActThreads, vec); }

// CODES: also write the gradient codes (kCodable activations, the 16-byte vector path only).
template <int ACT, class D, int VEC, bool CODES = false>
__global__ void __launch_bounds__(kBiasActThreads) bias_act_forward_kernel(const BiasActArgs a) {
  static_assert(!CODES || (kCodable<ACT> && VEC > 1), "codes: a piecewise-linear activation, 16-byte vectors");
  RawT<D, VEC> raw[kBiasActUnroll];
  flat_walk<kBiasActThreads, VEC>(
      a.n, [&](int u, int64_t e) { raw[u] = load_raw<D, VEC, Cache::kStream>(a.x, e); },
      [&](int u, int64_t e) {
        float z[VEC];
        decode<D, VEC>(raw[u], z);
        add_bias<VEC>(a, e, z);
        forward_store<ACT, D, VEC>(a, e, z);
        if constexpr (CODES) {
          unsigned int word = 0;
#pragma unroll
          for (int i = 0; i < VEC; ++i) word |= grad_code<ACT>(a, z[i]) << (2 * i);
          store_codes<VEC>(a.codes, e, word);
        }
      },
      [&](int64_t e) {
        unsigned int word = 0;
        for (int64_t k = e; k < a.n; ++k) {
          forward_element<ACT, D>(a, k);
          if constexpr (CODES) {  // z read again (at most VEC - 1 elements a tensor): keeping it spills
            float z[1];
            load_stream<D, 1>(a.x, k, z);
            add_bias<1>(a, k, z);
            word |= grad_code<ACT>(a, z[0]) << (2 * (k - e));
          }
        }
        if constexpr (CODES) store_codes<VEC>(a.codes, e, word);
      });
}

// CODES: from the gradient codes in place of x (kCodable activations; a.x unused).
template <int ACT, class D, class O, int VEC, bool CODES = false>
__global__ void __launch_bounds__(kBiasActThreads) bias_act_grad_kernel(const BiasActArgs a) {
  GradSource<ACT, D, VEC, CODES> src[kBiasActUnroll];
  RawT<D, VEC> raw_dy[kBiasActUnroll];
  flat_walk<kBiasActThreads, VEC>(
      a.n,
      [&](int u, int64_t e) {
        src[u].load(a, e);
        raw_dy[u] = load_raw<D, VEC, Cache::kStream>(a.dy, e);
      },
      [&](int u, int64_t e) {
        float g[VEC];
        decode<D, VEC>(raw_dy[u], g);
        src[u].map(a, g, [&](float(&z)[VEC]) { add_bias<VEC>(a, e, z); });
        store_out<O, VEC>(a.out, e, g);
      },
      [&](int64_t e) {
        for (int64_t k = e; k < a.n; ++k) grad_element<ACT, D, O, CODES>(a, k);
      });
}

// ---------------------------------------------------------------------------------------------------
// Gradient map with the bias gradient in the same pass. Memory order is viewed as a matrix of R rows
// by Q = C * inner columns (inner = stride_c: every dense layout is (outer, C, inner) in memory), and
// a block of kBiasActThreads threads covers a tile of `rows` rows by tq * VEC columns: thread t owns
// the column vector (t % tq) * VEC (its bias values fixed for the whole tile) and walks the rows
// t / tq, t / tq + tr, ... (tr = kBiasActThreads / tq), kBiasActUnroll of them a step with every load
// of the step ahead of its stores (as the elementwise kernels), writing dz (unless only the bias
// gradient is wanted) and summing the unrounded float32 dz per column (per vector when the vector lies
// in one channel, the UNIFORM instantiation: one bias value and one sum a thread, fewer registers).
// Then either (per_tile: tq * VEC divides inner, so the tile lies in one channel) one block sum per
// tile into partials[by][bx], or per column (the tr row groups summed in order through shared memory)
// into partials[by][q]. The caller sums the partials per channel in a fixed order: no atomics, the
// same bits every run. tq, per_tile and store are uniform run-time values (few instantiations).
// Memory traffic: dy and x read once, dz written once (or not at all), and the partials (at most
// 1 / rows of dz, in float32, per column).
struct BiasGradPlan {
  int vec;          // elements per thread access: the dtype's 16-byte width, or 1
  int tq;           // threads along the columns: 32 .. kBiasActThreads, a power of two
  bool per_tile;    // one partial per tile (tq * vec divides inner) or one per column
  int64_t rows;     // rows per block, a multiple of kBiasActThreads / tq
  int64_t grid_x;   // column tiles
  int64_t grid_y;   // row tiles (the launch is one 1-D grid of grid_x * grid_y blocks)
  int64_t width;    // row length of the (grid_y, width) float32 partials: grid_x or Q
};

// The launch of n elements, bias along a dim of stride `inner` and C channels; max_vec is the dtype's
// 16-byte width and `aligned` whether every pointer in use is 16-byte aligned. Host code (also run by
// the emulator's driver, so both launch the same tiles).
inline BiasGradPlan bias_grad_plan(int max_vec, bool aligned, int64_t n, int64_t inner, int64_t channels) {
  constexpr int64_t kTargetBlocks = 2048;
  const int64_t q = channels * inner, r = n / q;
  BiasGradPlan plan{};
  plan.vec = aligned && q % max_vec == 0 ? max_vec : 1;
  const int64_t col_vectors = q / plan.vec;
  int tq = 32;
  while (tq < kBiasActThreads && tq < col_vectors) tq *= 2;
  plan.tq = tq;
  const int64_t tr = kBiasActThreads / tq;
  plan.per_tile = inner % (static_cast<int64_t>(tq) * plan.vec) == 0;
  plan.grid_x = (col_vectors + tq - 1) / tq;
  const int64_t row_groups = (r + tr - 1) / tr;
  int64_t gy = (kTargetBlocks + plan.grid_x - 1) / plan.grid_x;
  gy = gy < 1 ? 1 : (gy > row_groups ? row_groups : gy);
  const int64_t per_block = (r + gy - 1) / gy;
  plan.rows = (per_block + tr - 1) / tr * tr;
  plan.grid_y = (r + plan.rows - 1) / plan.rows;
  plan.width = plan.per_tile ? plan.grid_x : q;
  return plan;
}

struct BiasGradTile {
  float* partials;     // (grid_y, width) float32
  int64_t rows_total;  // R
  int64_t cols;        // Q = C * inner
  int64_t rows;        // rows per block
  int64_t width;       // row length of partials
  int64_t grid_x;      // column tiles (the grid is 1-D: grid_x * grid_y blocks)
  int tq;              // threads along the columns
  bool per_tile;       // one partial per tile, else per column
  bool store;          // write dz
};

template <int ACT, class D, int VEC, bool UNIFORM, bool CODES = false>
__global__ void __launch_bounds__(kBiasActThreads) bias_act_grad_bias_kernel(const BiasActArgs a, const BiasGradTile t) {
  // UNIFORM: each vector lies in one channel (VEC = 1, or stride_c a multiple of VEC): one bias value
  // and one running sum a thread, the sum standing for the vector's first column (its other columns 0).
  // CODES: from the gradient codes in place of x and the bias (kCodable activations).
  constexpr int NB = UNIFORM ? 1 : VEC;
  const int tq = t.tq, tr = kBiasActThreads / t.tq;
  const int cq = static_cast<int>(threadIdx.x) % tq, cr = static_cast<int>(threadIdx.x) / tq;
  // A 1-D grid of grid_x * grid_y blocks, column tiles fastest.
  const int64_t bx = static_cast<int64_t>(blockIdx.x) % t.grid_x, by = static_cast<int64_t>(blockIdx.x) / t.grid_x;
  const int64_t q = (bx * tq + cq) * VEC;
  const bool active = q < t.cols;  // Q is a multiple of VEC
  float acc[NB];
#pragma unroll
  for (int i = 0; i < NB; ++i) acc[i] = 0.f;
  if (active) {
    float b[NB];
    int64_t wraps, r, c;
    split_index(q, a.stride_c, wraps, r);
    split_index(wraps, a.channels, wraps, c);
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      b[i] = CODES ? 0.f : bias_value(a, c);
      if (++r == a.stride_c) {
        r = 0;
        if (++c == a.channels) c = 0;
      }
    }
    const int64_t row0 = by * t.rows;
    const int64_t row_end = min(row0 + t.rows, t.rows_total);
    // kBiasActUnroll rows a step, every load of the step before any store (see the elementwise kernels).
    constexpr int U = kBiasActUnroll;
    const int64_t row_step = static_cast<int64_t>(tr) * t.cols;
    for (int64_t row = row0 + cr; row < row_end; row += U * tr) {
      GradSource<ACT, D, VEC, CODES> src[U];
      RawT<D, VEC> raw_dy[U];
      const int64_t e0 = row * t.cols + q;
      const int64_t left = (row_end - row + tr - 1) / tr;  // rows of this thread from row on
      const int rows_here = left < U ? static_cast<int>(left) : U;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u < rows_here) {
          src[u].load(a, e0 + u * row_step);
          raw_dy[u] = load_raw<D, VEC, Cache::kStream>(a.dy, e0 + u * row_step);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u < rows_here) {
          float g[VEC];
          decode<D, VEC>(raw_dy[u], g);
          src[u].map(a, g, [&](float(&z)[VEC]) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) z[i] += b[UNIFORM ? 0 : i];
          });
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[UNIFORM ? 0 : i] += g[i];
          if (t.store) store_stream<D, VEC>(a.out, e0 + u * row_step, g);
        }
      }
    }
  }
  if (t.per_tile) {
    __shared__ float scratch[32];
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < NB; ++i) s += acc[i];
    store_block_sum(s, scratch, t.partials + by * t.width + bx);
  } else {
    __shared__ float columns[kBiasActThreads * VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) columns[threadIdx.x * VEC + i] = i < NB ? acc[i] : 0.f;
    __syncthreads();
    if (cr == 0 && active) {
      float sum[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum[i] = 0.f;
      for (int k = 0; k < tr; ++k) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) sum[i] += columns[(k * tq + cq) * VEC + i];
      }
      float* out = t.partials + by * t.width + q;
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = sum[i];
    }
  }
}

// The bias gradient from bias_act_grad_bias_kernel's partials, which are (groups, channels, per) float32
// (groups = grid_y; per = the partials of one channel in a row of them: inner / (tq vec) tiles, or inner
// columns): dbias[c] = the sum of channel c's groups * per partials, written in dtype O. One warp a
// channel: lane i adds terms i, i + 32, ... (term k = (group k / per, partial k % per)) in order, then
// the warp's butterfly: the same bits every run, no atomics. Memory traffic: the partials read once.
constexpr int kBiasFinishThreads = 256;
struct BiasGradFinish {
  const float* partials;
  void* dbias;  // (channels,) in O
  int64_t groups, channels, per;
};

template <class O>
__global__ void __launch_bounds__(kBiasFinishThreads) bias_grad_finish_kernel(const BiasGradFinish f) {
  constexpr int kWarps = kBiasFinishThreads / 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  if (c >= f.channels) return;  // a whole warp: the butterfly below has every lane of the ones that stay
  const int64_t terms = f.groups * f.per, stride = f.channels * f.per;
  float s = 0.f;
  int64_t g = lane / f.per, k = lane - g * f.per;  // term `lane` as (group, partial), then advanced by 32
  const int64_t step_g = 32 / f.per, step_k = 32 - step_g * f.per;
  for (int64_t i = lane; i < terms; i += 32) {
    s += f.partials[g * stride + c * f.per + k];
    g += step_g, k += step_k;
    if (k >= f.per) g += 1, k -= f.per;
  }
  s = warp_sum(s);
  if (lane == 0) static_cast<typename O::Bits*>(f.dbias)[c] = O::encode(s);
}

// Host: a call of f with std::integral_constant<bool, UNIFORM> for a launch of vectors of vec elements
// along a dim of stride stride_c (always true for vec = 1: one instantiation fewer).
template <int VEC, class F>
void with_uniform(int64_t stride_c, F&& f) {
  if constexpr (VEC == 1) {
    f(std::true_type{});
  } else {
    with_bool(stride_c % VEC == 0, f);
  }
}

}  // namespace
}  // namespace genkernels
