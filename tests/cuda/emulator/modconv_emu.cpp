// Runs the modulated-convolution kernels of genkernels/modconv.cuh, the same source that
// csrc/modconv.cu compiles with nvcc, on the CPU under the SIMT emulator of simt.h, and checks them
// against a float64 reference.
//
// Epilogue cases: every activation; y in fp32, fp16 and bf16, channels first or channels last; with
// and without dcoef, bias, clamp; noise absent, one image for the batch or one per sample, in fp32,
// fp16 or bf16, with a strength read from memory or none (1); 16-byte vectors (with a scalar tail in
// the forward when the length is not a multiple of the width) and the scalar path (every big tensor
// one element past a 16-byte boundary, or extents that are no multiple of the width); the backward's
// partials over one or several chunks (the driver can shrink the host's minimum chunk) and channel
// tiles, with every output of the reduction (ddcoef, dbias, dstrength) checked. Demodulation cases:
// weight in fp32, fp16 and bf16, K = 1 or 9, O not a multiple of the warps of a block, I over one
// pass of the forward's registers (several passes), N = 1 or several.
//
//   modconv_emu [--jobs N] [--case SUBSTRING]
//
// prints "CASES <count>" (epilogue and demodulation cases together), then one line per case:
//   RESULT ok|FAIL epilogue <case> | vec <forward> <backward> n <elements> chunks <c> tiles <t>; ...
//   RESULT ok|FAIL demod <case> | passes <p>; ...
// and "PASSED" or "FAILED <count>"; exit status 0 when every case passes, 1 when one fails, 2 when the
// emulator stops on a broken rule of the execution model.
//
// The launch choices replicate csrc/modconv.cu (vector widths, grids, the work split of
// epilogue_backward_split, the reduction's grid). Reference: each element's coordinates come from
// the layout, not the kernel's index arithmetic; z is the kernel's float32 fused multiply-adds (so
// decisions at z = 0 and at the clamp agree), act / act' / the clamp / the sums in float64. Elementwise
// outputs: |got - ref| <= u |ref| + 2^-20 m + 2^-25 (u the dtype's unit roundoff, m the magnitude),
// or got equal to ref rounded. Sums of T float32 terms: |got - ref| <= (T + 16) 2^-24 M + 2^-20 M +
// 2^-30 (M the sum of the terms' magnitudes); a term whose pre-clamp value sits within 2^-20 of the
// clamp may be counted or not.
#include "simt.h"
#include "driver.h"

#include "genkernels/modconv.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <variant>
#include <vector>

namespace {

using driver::Buffer;
using driver::dtype_name;
using genkernels::EpilogueArgs;

constexpr int kThreads = genkernels::kModconvThreads;
constexpr int kF32 = genkernels::kFloat32, kF16 = genkernels::kFloat16, kBF16 = genkernels::kBFloat16;
const char* const kActs[] = {"linear", "relu", "lrelu", "tanh", "sigmoid", "silu", "gelu"};

double sigmoid64(double z) { return z >= 0 ? 1 / (1 + std::exp(-z)) : std::exp(z) / (1 + std::exp(z)); }

// act(z), act'(z) and their magnitudes (every term in absolute value).
void act64(int act, double z, double alpha, double& v, double& vmag, double& g, double& gmag) {
  switch (act) {
    case 0:
      v = z, g = 1;
      break;
    case 1:
      v = z < 0 ? 0 : z, g = z > 0 ? 1 : 0;
      break;
    case 2:
      v = z > 0 ? z : alpha * z, g = z > 0 ? 1 : alpha;
      break;
    case 3: {
      const double t = std::tanh(z);
      v = t, g = 1 - t * t;
      break;
    }
    case 4: {
      const double s = sigmoid64(z);
      v = s, g = s * (1 - s);
      break;
    }
    case 5: {
      const double s = sigmoid64(z), sc = sigmoid64(-z);
      v = z * s, g = s * (1 + z * sc);
      gmag = s * (1 + std::fabs(z) * sc);
      vmag = std::fabs(v);
      return;
    }
    default: {
      const double erf = std::erf(z / std::sqrt(2.0));
      const double pdf = std::exp(-0.5 * z * z) / std::sqrt(2 * M_PI);
      v = 0.5 * z * (1 + erf), g = 0.5 * (1 + erf) + z * pdf;
      vmag = 0.5 * std::fabs(z) * (1 + std::fabs(erf));
      gmag = 0.5 * (1 + std::fabs(erf)) + std::fabs(z) * pdf;
      return;
    }
  }
  vmag = std::fabs(v);
  gmag = std::fabs(g);
}

// f(std::integral_constant<int, ACT>) for an activation code.
template <class F>
void with_act(int act, F&& f) {
  switch (act) {
    case 0: return f(std::integral_constant<int, 0>{});
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    default: return f(std::integral_constant<int, 6>{});
  }
}

// A float32 side tensor with NaN sentinels on both sides.
struct Side {
  std::vector<float> v;
  void init(size_t n) { v.assign(n + 2, NAN); }
  float* data() { return v.data() + 1; }
  float& operator[](size_t i) { return v[i + 1]; }
  size_t size() const { return v.size() - 2; }
  bool guarded() const { return std::isnan(v.front()) && std::isnan(v.back()); }
};

// A sum's float64 reference, its magnitude, its term count and the slack of terms on a clamp edge.
struct Sum {
  double value = 0, mag = 0, slack = 0;
  int64_t terms = 0;
  // A term t whose float32 evaluation has magnitude tmag (>= |t|: act' may cancel, as gelu's does).
  void add(double t, double tmag, bool either) {
    if (either) {
      slack += tmag;
    } else {
      value += t;
    }
    mag += tmag;
    ++terms;
  }
};

void check_sum(driver::Findings& found, const char* what, int64_t i, double got, const Sum& s) {
  const double tol = (static_cast<double>(s.terms) + 16) * std::ldexp(s.mag, -24) + std::ldexp(s.mag, -20) +
                     s.slack + std::ldexp(1.0, -30);
  const double err = std::fabs(got - s.value);
  if (!(err <= tol)) found.flag("%s[%lld] = %.9g, want %.9g (tol %.3g)", what, static_cast<long long>(i), got, s.value, tol);
  found.worst = std::max(found.worst, driver::ratio(err, tol));
}

// ---------------------------------------------------------------------------------------------
// Epilogue.

struct EpilogueCase {
  int dtype, act;
  bool channels_last;
  int N, C, H, W;
  bool dcoef, bias, clamp, strength;
  int noise;  // 0 none, 1 one image for the batch, 2 one per sample
  int noise_dtype;
  bool misalign;
  int64_t min_chunk;  // 0: the host's; else the backward's smallest chunk (positions or rows)

  std::string name() const {
    char buf[240];
    snprintf(buf, sizeof buf, "%s %s %s N%d C%d H%d W%d%s%s%s%s%s%s%s", dtype_name(dtype), kActs[act],
             channels_last ? "channels-last" : "channels-first", N, C, H, W, dcoef ? " dcoef" : "",
             bias ? " bias" : "", clamp ? " clamp" : "",
             noise == 0 ? "" : noise == 1 ? " noise1" : " noiseN", noise ? (std::string(":") + dtype_name(noise_dtype)).c_str() : "",
             noise && strength ? " strength" : "", misalign ? " misaligned" : "");
    std::string s = buf;
    if (min_chunk) s += " chunk" + std::to_string(min_chunk);
    return s;
  }
};

const float kLarge[] = {1e4f, -1e4f, 95.f, -95.f, 30.f, -30.f, 9.f, -9.f, 5e3f, -300.f};

simt::Outcome run_epilogue(const EpilogueCase& c, unsigned seed) {
  const std::string label = "epilogue " + c.name();
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uniform(0.25f, 1.75f);
  const int64_t S = int64_t{c.H} * c.W, n = int64_t{c.N} * c.C * S;
  auto at = [&](int64_t b, int64_t ch, int64_t s) {
    return c.channels_last ? (b * S + s) * c.C + ch : (b * c.C + ch) * S + s;
  };
  Buffer y, dout, out, dy, noise;
  y.init(c.dtype, n, c.misalign);
  dout.init(c.dtype, n, c.misalign);
  out.init(c.dtype, n, c.misalign);
  dy.init(c.dtype, n, c.misalign);
  y.fill(rng, 2.f);
  dout.fill(rng, 1.f);
  for (int64_t i = 2; i < n; i += 7) y.set(i, kLarge[(i / 7) % 10]);
  if (!c.bias && !c.noise) {
    for (int64_t i = 3; i < n; i += 11) y.set(i, 0.f);  // z = 0 exactly: relu' = 0, lrelu' = alpha
  }
  const int64_t noise_batch = c.noise == 2 ? c.N : 1;
  noise.init(c.noise ? c.noise_dtype : kF32, c.noise ? noise_batch * S : 1, false);
  if (c.noise) noise.fill(rng, 1.f);
  Side dcoef, bias, strength;
  dcoef.init(int64_t{c.N} * c.C);
  for (size_t i = 0; i < dcoef.size(); ++i) dcoef[i] = uniform(rng);
  bias.init(c.C);
  for (int i = 0; i < c.C; ++i) bias[i] = normal(rng);
  strength.init(1);
  strength[0] = -0.75f;

  std::vector<simt::Range> global;
  simt::register_global(global, y.data(), y.bytes());
  simt::register_global(global, dout.data(), dout.bytes());
  simt::register_global(global, dcoef.data(), dcoef.size() * sizeof(float));
  simt::register_global(global, bias.data(), bias.size() * sizeof(float));
  simt::register_global(global, strength.data(), sizeof(float));
  if (c.noise) simt::register_global(global, noise.data(), noise.bytes());

  const float alpha = c.act == 2 ? 0.2f : 0.37f;
  const float gain = c.act == 1 || c.act == 2 ? static_cast<float>(std::sqrt(2.0)) : 1.25f;
  const float clamp = c.act == 3 || c.act == 4 ? 0.9f : 1.5f;

  EpilogueArgs a{};
  a.y = y.data();
  a.dcoef = c.dcoef ? dcoef.data() : nullptr;
  a.noise = c.noise ? noise.data() : nullptr;
  a.strength = c.noise && c.strength ? strength.data() : nullptr;
  a.bias = c.bias ? bias.data() : nullptr;
  a.numel = n;
  a.n = c.N, a.c = c.C, a.s = S;
  a.channels_last = c.channels_last;
  a.d1 = c.channels_last ? S : c.C;
  a.d2 = c.channels_last ? c.C : S;
  a.noise_dtype = c.noise ? c.noise_dtype : kF32;
  a.noise_stride = c.noise == 2 && c.N > 1 ? S : 0;
  a.alpha = alpha, a.gain = gain, a.clamp = c.clamp ? clamp : 0.f, a.has_clamp = c.clamp;
  a.act = c.act;

  // Forward, as modconv_epilogue_forward launches it.
  const int wide = 16 / genkernels::element_bytes(c.dtype);
  const int fvec = driver::vector_width(c.dtype, wide, {y.data(), out.data()});
  EpilogueArgs fa = a;
  fa.out = out.data();
  genkernels::with_vector(c.dtype, fvec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    const auto blocks = static_cast<unsigned>(((n + kVec - 1) / kVec + kThreads - 1) / kThreads);
    with_act(c.act, [&](auto act) {
      simt::launch(blocks, kThreads, 0, {}, global, label + " (forward)",
                   [&] { genkernels::epilogue_forward_kernel<decltype(act)::value, D, kVec>(fa); });
    });
  });

  // Backward, as modconv_epilogue_backward launches it.
  EpilogueArgs ba = a;
  ba.dout = dout.data();
  ba.out = dy.data();
  const int bvec = driver::vector_width(c.dtype, c.channels_last ? c.C : S, {dout.data(), y.data(), dy.data()});
  const int64_t min_chunk =
      c.min_chunk ? c.min_chunk : c.channels_last ? genkernels::kEpilogueRowsMin : genkernels::kEpilogueChunkMin;
  const int64_t max_chunk = c.channels_last ? genkernels::kEpilogueRowsMax : genkernels::kEpilogueChunkMax;
  const int64_t partials = genkernels::epilogue_backward_split(ba, bvec, min_chunk, max_chunk);
  std::vector<float> work(partials + 2, NAN);
  float* const base = work.data() + 1;
  const int64_t per = ba.n * ba.c * ba.chunks;
  ba.part_gy = base;
  ba.part_g = base + per;
  ba.part_gn = c.noise ? base + 2 * per : nullptr;
  genkernels::with_vector(c.dtype, bvec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    const auto blocks = static_cast<unsigned>(genkernels::epilogue_backward_blocks(ba));
    with_act(c.act, [&](auto act) {
      constexpr int kAct = decltype(act)::value;
      simt::launch(blocks, kThreads, 0, {}, global, label + " (backward)", [&] {
        if (ba.channels_last) {
          genkernels::epilogue_backward_last_kernel<kAct, D, kVec>(ba);
        } else {
          genkernels::epilogue_backward_first_kernel<kAct, D, kVec>(ba);
        }
      });
    });
  });
  Side ddcoef, dbias, dstrength;
  ddcoef.init(int64_t{c.N} * c.C);
  dbias.init(c.C);
  dstrength.init(1);
  genkernels::EpilogueReduceArgs r{};
  r.part_gy = ba.part_gy;
  r.part_g = ba.part_g;
  r.part_gn = ba.part_gn;
  r.ddcoef = ddcoef.data();
  r.dbias = dbias.data();
  r.dstrength = dstrength.data();
  r.n = ba.n, r.c = ba.c, r.chunks = ba.chunks;
  r.gn_count = ba.part_gn != nullptr ? ba.gn_count : 0;
  const int64_t outputs = int64_t{c.N} * c.C + c.C + 1;
  simt::launch(static_cast<unsigned>((outputs + genkernels::kModconvWarps - 1) / genkernels::kModconvWarps), kThreads,
               0, {}, global, label + " (reduce)", [&] { genkernels::epilogue_reduce_kernel(r); });

  // Reference.
  driver::Findings found;
  auto check = [&](const char* what, int64_t e, float got, double want, double magnitude) {
    if (driver::decode(c.dtype, driver::encode(c.dtype, static_cast<float>(want))) == got) return;
    found.check(what, c.dtype, e, 0, got, want, magnitude);
  };
  const double edge = std::ldexp(1.0, -20);
  const float st = c.noise && c.strength ? strength[0] : 1.f;
  std::vector<Sum> sum_dcoef(int64_t{c.N} * c.C), sum_bias(c.C);
  Sum sum_strength;
  for (int64_t b = 0; b < c.N; ++b) {
    for (int64_t ch = 0; ch < c.C; ++ch) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t e = at(b, ch, s);
        const float yv = y.at(e);
        const float dc = c.dcoef ? dcoef[b * c.C + ch] : 1.f;
        const float nz = c.noise ? noise.at((c.noise == 2 ? b : 0) * S + s) : 0.f;
        const float bv = c.bias ? bias[ch] : 0.f;
        const float shift = c.noise ? std::fmaf(nz, st, bv) : bv;
        const double z = std::fmaf(yv, dc, shift);  // the kernel's float32 pre-activation
        double v, vmag, g, gmag;
        act64(c.act, z, alpha, v, vmag, g, gmag);
        const double pre = v * gain;
        bool pass = true, either = false;
        double want = pre;
        if (c.clamp) {
          pass = pre >= -clamp && pre <= clamp;
          either = std::fabs(std::fabs(pre) - clamp) <= edge * clamp;
          want = std::min<double>(std::max<double>(pre, -clamp), clamp);
        }
        const float got = out.at(e);
        if (either) {
          if (!(std::fabs(got - want) <= 4 * edge * clamp)) found.flag("out[%lld] = %.9g near the clamp", (long long)e, got);
        } else {
          check("out", e, got, want, std::fabs(gain) * vmag);
        }
        const double d = dout.at(e);
        const double gr = pass ? d * gain * g : 0.0;
        const float dyg = dy.at(e);
        if (either) {
          if (dyg != 0.f) check("dy", e, dyg, d * gain * g * dc, std::fabs(d * gain * dc) * gmag);
        } else {
          check("dy", e, dyg, gr * dc, std::fabs(d * gain * dc) * gmag);
        }
        const double gm = pass || either ? std::fabs(d * gain) * gmag : 0.0;
        sum_dcoef[b * c.C + ch].add(gr * yv, gm * std::fabs(yv), either);
        sum_bias[ch].add(gr, gm, either);
        sum_strength.add(gr * nz, gm * std::fabs(nz), either);
      }
    }
  }
  for (size_t i = 0; i < sum_dcoef.size(); ++i) check_sum(found, "ddcoef", static_cast<int64_t>(i), ddcoef[i], sum_dcoef[i]);
  for (int i = 0; i < c.C; ++i) check_sum(found, "dbias", i, dbias[i], sum_bias[i]);
  check_sum(found, "dstrength", 0, dstrength[0], sum_strength);
  if (out.untouched() || dy.untouched()) found.flag("an output element never written");
  if (out.stray() || dy.stray()) found.flag("a store outside out or dy");
  if (!ddcoef.guarded() || !dbias.guarded() || !dstrength.guarded() || !std::isnan(work.front()) ||
      !std::isnan(work.back())) {
    found.flag("a store outside ddcoef, dbias, dstrength or the partials");
  }

  char buf[240];
  snprintf(buf, sizeof buf, "vec %d %d n %lld chunks %lld tiles %lld; max |err| / tol %.3g", fvec, bvec,
           static_cast<long long>(n), static_cast<long long>(ba.chunks), static_cast<long long>(ba.tiles), found.worst);
  return found.outcome(label, buf);
}

// ---------------------------------------------------------------------------------------------
// Demodulation.

struct DemodCase {
  int dtype;
  int O, I, K, N;
  std::string name() const {
    char buf[120];
    snprintf(buf, sizeof buf, "%s O%d I%d K%d N%d", dtype_name(dtype), O, I, K, N);
    return buf;
  }
};

simt::Outcome run_demod(const DemodCase& c, unsigned seed) {
  const std::string label = "demod " + c.name();
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uniform(0.05f, 2.f);
  const int64_t O = c.O, I = c.I, K = c.K, N = c.N;
  Buffer w;
  w.init(c.dtype, O * I * K, false);
  w.fill(rng, 1.f);
  Side styles, grad, dcoef_in, dcoef, dweight, dstyles, w2;
  styles.init(N * I);
  for (size_t i = 0; i < styles.size(); ++i) styles[i] = normal(rng);
  grad.init(N * O);
  for (size_t i = 0; i < grad.size(); ++i) grad[i] = normal(rng);
  dcoef_in.init(N * O);
  for (size_t i = 0; i < dcoef_in.size(); ++i) dcoef_in[i] = uniform(rng);
  dcoef.init(N * O);
  dweight.init(O * I * K);
  dstyles.init(N * I);
  w2.init(O * I);
  std::vector<simt::Range> global;
  simt::register_global(global, w.data(), w.bytes());
  simt::register_global(global, styles.data(), styles.size() * sizeof(float));
  simt::register_global(global, grad.data(), grad.size() * sizeof(float));
  simt::register_global(global, dcoef_in.data(), dcoef_in.size() * sizeof(float));
  simt::register_global(global, w2.data(), w2.size() * sizeof(float));

  const float eps = 1e-8f;
  genkernels::DemodArgs a{};
  a.weight = w.data();
  a.styles = styles.data();
  a.grad = grad.data();
  a.dcoef = dcoef_in.data();
  a.out_dcoef = dcoef.data();
  a.d_weight = dweight.data();
  a.d_styles = dstyles.data();
  a.w2 = w2.data();
  a.o = O, a.i = I, a.k = K, a.n = N;
  a.eps = eps;
  auto blocks = [](int64_t items, int per) { return static_cast<unsigned>((items + per - 1) / per); };
  genkernels::with_dtype(c.dtype, [&](auto d) {
    using D = decltype(d);
    simt::launch(blocks(O, genkernels::kModconvWarps), kThreads, 0, {}, global, label + " (forward)",
                 [&] { genkernels::demod_forward_kernel<D>(a); });
    simt::launch(blocks(O * I, kThreads), kThreads, 0, {}, global, label + " (weight grad)",
                 [&] { genkernels::demod_weight_grad_kernel<D>(a); });
  });
  simt::launch(blocks(N * I, kThreads), kThreads, 0, {}, global, label + " (styles grad)",
               [&] { genkernels::demod_styles_grad_kernel(a); });

  driver::Findings found;
  std::vector<double> W2(O * I, 0.0);
  for (int64_t o = 0; o < O; ++o) {
    for (int64_t i = 0; i < I; ++i) {
      for (int64_t k = 0; k < K; ++k) W2[o * I + i] += double(w.at((o * I + i) * K + k)) * w.at((o * I + i) * K + k);
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t o = 0; o < O; ++o) {
      double sum = eps;
      for (int64_t i = 0; i < I; ++i) sum += double(styles[n * I + i]) * styles[n * I + i] * W2[o * I + i];
      const double want = 1 / std::sqrt(sum);
      const double tol = (static_cast<double>(I * K) + 16) * std::ldexp(want, -24) + std::ldexp(want, -22);
      const double err = std::fabs(dcoef[n * O + o] - want);
      if (!(err <= tol)) found.flag("dcoef[%lld] = %.9g, want %.9g", (long long)(n * O + o), dcoef[n * O + o], want);
      found.worst = std::max(found.worst, driver::ratio(err, tol));
    }
  }
  auto G = [&](int64_t n, int64_t o) {
    const double dc = dcoef_in[n * O + o];
    return grad[n * O + o] * dc * dc * dc;
  };
  for (int64_t o = 0; o < O; ++o) {
    for (int64_t i = 0; i < I; ++i) {
      Sum t;
      for (int64_t n = 0; n < N; ++n) {
        const double v = G(n, o) * styles[n * I + i] * styles[n * I + i];
        t.add(v, std::fabs(v), false);
      }
      for (int64_t k = 0; k < K; ++k) {
        const double wv = w.at((o * I + i) * K + k);
        Sum dw;
        dw.value = -wv * t.value, dw.mag = std::fabs(wv) * t.mag, dw.terms = t.terms + 4;
        check_sum(found, "d_weight", (o * I + i) * K + k, dweight[(o * I + i) * K + k], dw);
      }
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < I; ++i) {
      Sum t;
      for (int64_t o = 0; o < O; ++o) {
        const double v = G(n, o) * W2[o * I + i];
        t.add(v, std::fabs(v), false);
      }
      const double s = styles[n * I + i];
      Sum ds;
      ds.value = -s * t.value, ds.mag = std::fabs(s) * t.mag, ds.terms = t.terms + K + 4;
      check_sum(found, "d_styles", n * I + i, dstyles[n * I + i], ds);
    }
  }
  for (const Side* out : {&dcoef, &dweight, &dstyles, &w2}) {
    if (!out->guarded()) found.flag("a store outside an output");
    for (size_t i = 0; i < out->size(); ++i) {
      if (std::isnan(out->v[i + 1])) {
        found.flag("an output element never written");
        break;
      }
    }
  }
  char buf[120];
  snprintf(buf, sizeof buf, "passes %lld; max |err| / tol %.3g",
           static_cast<long long>((I + 32 * genkernels::kDemodPerLane - 1) / (32 * genkernels::kDemodPerLane)),
           found.worst);
  return found.outcome(label, buf);
}

// ---------------------------------------------------------------------------------------------
// Cases.

struct Shape {
  bool channels_last;
  int N, C, H, W;
  int64_t min_chunk;
};

// Channels first: S a multiple of every width (4x4, 8x8), odd (7, 61), several chunks (min chunk 8 or
// 16), H * W = 1; channels last: C a multiple of the widths, odd C, C over one tile of the scalar path
// (300 > 256), several row chunks (min 2 rows), 256 % V != 0 (C = 3).
const Shape kShapes[] = {
    {false, 2, 3, 4, 4, 0},  {false, 2, 5, 1, 7, 0},  {false, 3, 2, 8, 8, 16}, {false, 2, 3, 1, 61, 8},
    {false, 3, 4, 1, 1, 0},  {true, 2, 16, 3, 3, 0},  {true, 2, 3, 2, 5, 0},   {true, 2, 24, 4, 5, 2},
    {true, 1, 300, 1, 3, 0}, {true, 3, 8, 3, 7, 1},
};

std::vector<EpilogueCase> epilogue_cases() {
  std::vector<EpilogueCase> cases;
  int k = 0;
  const int noise_dtypes[] = {kF32, kF16, kBF16};
  for (const int dtype : {kF32, kF16, kBF16}) {
    for (int act = 0; act < 7; ++act) {
      for (const Shape& s : kShapes) {
        if ((k % 3 == 2) && s.C == 300) {
          ++k;
          continue;  // the largest shape in two of three rotations only
        }
        EpilogueCase c{};
        c.dtype = dtype;
        c.act = act;
        c.channels_last = s.channels_last;
        c.N = s.N, c.C = s.C, c.H = s.H, c.W = s.W;
        c.min_chunk = s.min_chunk;
        c.dcoef = k % 4 != 1;
        c.bias = k % 3 != 2;
        c.clamp = k % 2 == 0;
        c.noise = k % 5 == 0 ? 0 : k % 5 < 3 ? 2 : 1;
        c.noise_dtype = noise_dtypes[(k / 5) % 3];
        c.strength = k % 7 != 3;
        c.misalign = k % 6 == 4 || s.C == 300;
        cases.push_back(c);
        ++k;
      }
    }
  }
  return cases;
}

std::vector<DemodCase> demod_cases() {
  std::vector<DemodCase> cases;
  const DemodCase shapes[] = {{0, 3, 5, 1, 1}, {0, 9, 17, 9, 3}, {0, 8, 600, 1, 2}, {0, 17, 40, 3, 4},
                              {0, 5, 1030, 2, 1}, {0, 12, 33, 9, 5}};
  for (const int dtype : {kF32, kF16, kBF16}) {
    for (DemodCase c : shapes) {
      c.dtype = dtype;
      cases.push_back(c);
    }
  }
  return cases;
}

struct AnyCase {
  std::variant<EpilogueCase, DemodCase> c;
  std::string name() const {
    return std::holds_alternative<EpilogueCase>(c) ? "epilogue " + std::get<EpilogueCase>(c).name()
                                                    : "demod " + std::get<DemodCase>(c).name();
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<AnyCase> all;
  for (const EpilogueCase& c : epilogue_cases()) all.push_back({c});
  for (const DemodCase& c : demod_cases()) all.push_back({c});
  return driver::run_driver(argc, argv, all, 7000u, [](const AnyCase& c, unsigned seed) {
    return std::holds_alternative<EpilogueCase>(c.c) ? run_epilogue(std::get<EpilogueCase>(c.c), seed)
                                                     : run_demod(std::get<DemodCase>(c.c), seed);
  });
}
