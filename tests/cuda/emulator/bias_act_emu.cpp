// Runs the bias_act kernels of genkernels/bias_act.cuh, the same source that csrc/bias_act.cu
// compiles with nvcc, on the CPU under the SIMT emulator of simt.h, and checks y (forward) and dz
// (gradient map) against a float64 reference, on cases that cover the kernels' paths: every
// activation; fp32, fp16 and bf16, dz in x's dtype or float32; a bias along the channels of a
// contiguous (N, C, S) tensor (stride_c = S), of a channels_last one (stride_c = 1), along dim 0
// of a (C, K) matrix, or no bias; a clamp or none; 16-byte vectors (with a scalar tail when n is
// not a multiple of the width) and the scalar path (pointers one element past a 16-byte boundary:
// every tensor, or dz alone: vectors forward, scalars in the gradient); inputs of every size,
// including |z| up to 1e4, z = 0 exactly (where relu' is 0 and lrelu' alpha, as in torch), values
// where the clamp bites, and (with the large values, fp32 and bf16) a NaN x and a NaN dy where z = 0,
// checked against torch's autograd order: g = m ? dy * gain : 0, then g * act'(z), relu's a select
// (z <= 0 ? 0 : g), so relu passes the gradient at a NaN z, gives 0 for a NaN dy where z <= 0, and a NaN
// act'(z) gives NaN even where the clamp stops the gradient. A NaN reference wants a NaN.
//
//   bias_act_emu [--jobs N] [--case SUBSTRING]
//
// prints "CASES <cases>", then one line per case:
//   RESULT ok|FAIL <case> | vec <forward> <grad> n <elements>; <largest error relative to its
//   tolerance>; <bad count>; <first bad element>
// and "PASSED" or "FAILED <count>"; exit status 0 when every case passes, 1 when one fails, 2 when
// the emulator stops on a broken rule of the execution model.
//
// The launch choices replicate csrc/bias_act.cu: 16-byte vectors when every pointer in use is
// 16-byte aligned, else one element a thread; the grid of bias_act_blocks.
//
// Reference: the bias index of each element comes from its logical coordinates (n, c, s) in the
// case's layout, not from the kernel's formula; z = x + b is rounded to float32 as the kernel
// does (one IEEE addition), then act, act' and the clamp are evaluated in float64. Tolerance: a
// few float32 roundings and the C library's expf / tanhf / erff (CUDA's are within 2 ulp), at most
// 2^-20 of the magnitude m (the expression with every term in absolute value), then one rounding
// to the output dtype: |got - ref| <= u |ref| + 2^-20 m + 2^-25, or got equal to ref rounded to
// the dtype. Where the float64 pre-clamp value lies within 2^-20 (relative) of the clamp, the
// kernel's float32 decision may go either way and both answers pass.
#include "simt.h"
#include "driver.h"

#include "genkernels/bias_act.cuh"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using driver::Buffer;
using driver::decode;
using driver::dtype_name;
using driver::encode;
using genkernels::BiasActArgs;

constexpr int kThreads = genkernels::kBiasActThreads;
constexpr int kF32 = genkernels::kFloat32, kF16 = genkernels::kFloat16, kBF16 = genkernels::kBFloat16;

enum class Layout { kChannelsFirst, kChannelsLast, kRows, kNoBias };
enum class Misalign { kNone, kAll, kOut };

struct Case {
  int dtype, out_dtype;
  int act;
  Layout layout;
  int N, C, S;  // kRows: a (C, S) matrix, bias along dim 0 (N = 1)
  bool clamp;
  bool large;  // every fifth input far out (|x| up to 1e4)
  Misalign misalign;
  bool store;      // the bias-gradient kernel writes dz too (else the bias gradient alone)
  int bias_dtype;  // the bias's dtype code (its values are exact in bf16, so the same in every dtype)

  std::string name() const {
    static const char* const acts[] = {"linear", "relu", "lrelu", "tanh", "sigmoid", "silu", "gelu"};
    static const char* const layouts[] = {"channels-first", "channels-last", "rows", "no-bias"};
    char buf[200];
    snprintf(buf, sizeof buf, "%s dz:%s %s %s N%d C%d S%d bias:%s%s%s%s", dtype_name(dtype), dtype_name(out_dtype),
             acts[act], layouts[static_cast<int>(layout)], N, C, S, dtype_name(bias_dtype), clamp ? " clamp" : "",
             large ? " large" : "",
             misalign == Misalign::kAll ? " misaligned" : misalign == Misalign::kOut ? " misaligned-out" : "");
    return buf;
  }
};

// The partials' sentinel: a NaN whose payload no computation makes (a NaN partial is a NaN sum, not an
// unwritten one).
constexpr uint32_t kUnwrittenBits = 0x7fedcba9u;
bool unwritten(float v) { return std::bit_cast<uint32_t>(v) == kUnwrittenBits; }

double sigmoid64(double z) { return z >= 0 ? 1 / (1 + std::exp(-z)) : std::exp(z) / (1 + std::exp(z)); }

// act(z) and its magnitude (every term in absolute value).
void act64(int act, double z, double alpha, double& v, double& mag) {
  switch (act) {
    case 0:
      v = z, mag = std::fabs(z);
      return;
    case 1:
      v = z < 0 ? 0 : z, mag = std::fabs(v);
      return;
    case 2:
      v = z > 0 ? z : alpha * z, mag = std::fabs(v);
      return;
    case 3:
      v = std::tanh(z), mag = std::fabs(v);
      return;
    case 4:
      v = sigmoid64(z), mag = v;
      return;
    case 5:
      v = z * sigmoid64(z), mag = std::fabs(v);
      return;
    default: {
      const double erf = std::erf(z / std::sqrt(2.0));
      v = 0.5 * z * (1 + erf), mag = 0.5 * std::fabs(z) * (1 + std::fabs(erf));
    }
  }
}

// act'(z) and its magnitude.
void grad64(int act, double z, double alpha, double& g, double& mag) {
  switch (act) {
    case 0:
      g = 1, mag = 1;
      return;
    case 1:
      g = z <= 0 ? 0 : 1, mag = g;  // a NaN z passes the gradient (torch's threshold_backward)
      return;
    case 2:
      g = z > 0 ? 1 : alpha, mag = std::fabs(g);
      return;
    case 3: {
      // 1 - tanh(z)^2 without the cancellation that makes it exactly 0 past |z| ~ 19 in float64: with
      // e = exp(-2|z|), it is 4e / (1 + e)^2 (the form the kernels compute).
      const double e = std::exp(-2 * std::fabs(z));
      g = 4 * e / ((1 + e) * (1 + e)), mag = g;
      return;
    }
    case 4: {
      const double s = sigmoid64(z);
      g = s * (1 - s), mag = g;
      return;
    }
    case 5: {
      const double s = sigmoid64(z), sc = sigmoid64(-z);
      g = s * (1 + z * sc), mag = s * (1 + std::fabs(z) * sc);
      return;
    }
    default: {
      const double erf = std::erf(z / std::sqrt(2.0));
      const double pdf = std::exp(-0.5 * z * z) / std::sqrt(2 * M_PI);
      g = 0.5 * (1 + erf) + z * pdf, mag = 0.5 * (1 + std::fabs(erf)) + std::fabs(z) * pdf;
    }
  }
}

const float kLarge[] = {1e4f, -1e4f, 95.f, -95.f, 30.f, -30.f, 9.f, -9.f, 0.f, -0.f, 5e3f, -300.f};

simt::Outcome run(const Case& c, unsigned seed) {
  const std::string label = c.name();
  std::mt19937 rng(seed);
  const int64_t n = int64_t{c.N} * c.C * c.S;
  const bool has_bias = c.layout != Layout::kNoBias;
  const int64_t stride_c = c.layout == Layout::kChannelsFirst ? c.S : c.layout == Layout::kRows ? c.S : 1;
  // Channel of every flat element, from the logical coordinates.
  std::vector<int> channel(n, 0);
  for (int b = 0; b < c.N; ++b) {
    for (int ch = 0; ch < c.C; ++ch) {
      for (int s = 0; s < c.S; ++s) {
        const int64_t e = c.layout == Layout::kChannelsLast ? (int64_t{b} * c.S + s) * c.C + ch
                                                             : (int64_t{b} * c.C + ch) * c.S + s;
        channel[e] = ch;
      }
    }
  }
  const bool mis_in = c.misalign == Misalign::kAll, mis_out = c.misalign != Misalign::kNone;
  Buffer x, dy, y, dz;
  x.init(c.dtype, n, mis_in);
  dy.init(c.dtype, n, mis_in);
  y.init(c.dtype, n, mis_in);
  dz.init(c.out_dtype, n, mis_out);
  x.fill(rng, 2.f);
  dy.fill(rng, 1.f);
  if (c.large) {
    for (int64_t i = 0; i < n; i += 5) x.set(i, kLarge[(i / 5) % 12]);
  }
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> bias(c.C + 2, NAN);  // NaN sentinels on both sides
  // Bias values exact in bf16 (so in every dtype): x = -b below gives z = 0 exactly.
  for (int i = 1; i <= c.C; ++i) bias[i] = decode(kBF16, encode(kBF16, normal(rng)));
  for (int64_t i = 3; i < n; i += 11) x.set(i, has_bias ? -bias[1 + channel[i]] : 0.f);  // z = 0: relu' = 0
  if (c.large && n > 7 && c.dtype != kF16) {  // a NaN z, and a NaN dy where z = 0 (element 3)
    // Not in fp16, whose NaN widens to 0x7fffffff (a negated one then has the all-ones bits of the outputs'
    // sentinel); bf16 widens its NaN by a shift. The quiet NaN with the smallest payload, so that no float32
    // NaN computed from it has all bits set either.
    const uint32_t nan_bits = c.dtype == kBF16 ? 0x7fc0u : 0x7fc00000u;
    std::memcpy(x.at_elem(7), &nan_bits, x.elem());
    std::memcpy(dy.at_elem(3), &nan_bits, dy.elem());
  }
  const float alpha = c.act == 2 ? 0.2f : 0.37f;
  const float gain = c.act == 1 || c.act == 2 ? static_cast<float>(std::sqrt(2.0)) : 1.25f;
  // The clamp bites on a fair share of the elements.
  const float clamp = c.act == 3 || c.act == 4 ? 0.9f : 1.5f;

  std::vector<simt::Range> global;
  simt::register_global(global, x.data(), x.bytes());
  simt::register_global(global, dy.data(), dy.bytes());
  Buffer typed_bias;  // what the kernels read: the values in the case's bias dtype, guards around them
  typed_bias.init(c.bias_dtype, c.C, false);
  for (int i = 0; i < c.C; ++i) typed_bias.set(i, bias[1 + i]);
  simt::register_global(global, typed_bias.data(), typed_bias.bytes());

  BiasActArgs a{};
  a.x = x.data();
  a.bias = has_bias ? typed_bias.data() : nullptr;
  a.bias_dtype = c.bias_dtype;
  a.n = n;
  a.stride_c = has_bias ? stride_c : 1;
  a.channels = has_bias ? c.C : 1;
  a.alpha = alpha, a.gain = gain, a.clamp = c.clamp ? clamp : 0.f, a.has_clamp = c.clamp;

  const int wide = 16 / genkernels::element_bytes(c.dtype);
  const int fvec = driver::vector_width(c.dtype, wide, {x.data(), y.data()});
  const int gvec = driver::vector_width(c.dtype, wide, {dy.data(), x.data(), dz.data()});
  auto blocks = [&](int vec) { return static_cast<unsigned>(genkernels::bias_act_blocks(n, vec)); };
  BiasActArgs fa = a;
  fa.out = y.data();
  BiasActArgs ga = a;
  ga.dy = dy.data();
  ga.out = dz.data();
  genkernels::with_vector(c.dtype, fvec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    simt::launch(blocks(kVec), kThreads, 0, {}, global, label + " (forward)", [&] {
      switch (c.act) {
        case 0: return genkernels::bias_act_forward_kernel<0, D, kVec>(fa);
        case 1: return genkernels::bias_act_forward_kernel<1, D, kVec>(fa);
        case 2: return genkernels::bias_act_forward_kernel<2, D, kVec>(fa);
        case 3: return genkernels::bias_act_forward_kernel<3, D, kVec>(fa);
        case 4: return genkernels::bias_act_forward_kernel<4, D, kVec>(fa);
        case 5: return genkernels::bias_act_forward_kernel<5, D, kVec>(fa);
        default: return genkernels::bias_act_forward_kernel<6, D, kVec>(fa);
      }
    });
  });
  genkernels::with_vector(c.dtype, gvec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    auto go = [&](auto o) {
      using O = decltype(o);
      simt::launch(blocks(kVec), kThreads, 0, {}, global, label + " (grad)", [&] {
        switch (c.act) {
          case 0: return genkernels::bias_act_grad_kernel<0, D, O, kVec>(ga);
          case 1: return genkernels::bias_act_grad_kernel<1, D, O, kVec>(ga);
          case 2: return genkernels::bias_act_grad_kernel<2, D, O, kVec>(ga);
          case 3: return genkernels::bias_act_grad_kernel<3, D, O, kVec>(ga);
          case 4: return genkernels::bias_act_grad_kernel<4, D, O, kVec>(ga);
          case 5: return genkernels::bias_act_grad_kernel<5, D, O, kVec>(ga);
          default: return genkernels::bias_act_grad_kernel<6, D, O, kVec>(ga);
        }
      });
    };
    if (c.out_dtype == c.dtype) {
      go(D{});
    } else {
      go(genkernels::F32{});
    }
  });

  // The gradient map with the bias gradient (bias_act_grad_bias_kernel, dz in x's dtype): dz again,
  // bit for bit the gradient kernel's (or nothing written), and partials that sum to the bias gradient.
  const bool bias_grad = has_bias && c.out_dtype == c.dtype;
  const int64_t cols = int64_t{c.C} * stride_c;
  // One launch of it as the host plans it, reading x or (from_codes) the gradient codes: args' out receives dz
  // when the case stores it; the column partials go to `parts` (NaN sentinels on both sides). Returns the plan.
  auto grad_bias = [&](auto from_codes, const BiasActArgs& args, std::vector<float>& parts, const char* what) {
    constexpr bool kCodes = decltype(from_codes)::value;
    const void* stored = c.store ? args.out : nullptr;
    const bool aligned = driver::vector_width(c.dtype, wide, {args.dy, args.x, stored}) == wide;
    const genkernels::BiasGradPlan p = genkernels::bias_grad_plan(wide, aligned, n, stride_c, c.C);
    parts.assign(p.grid_y * p.width + 2, std::bit_cast<float>(kUnwrittenBits));
    const genkernels::BiasGradTile t{parts.data() + 1, n / cols, cols, p.rows, p.width, p.grid_x, p.tq, p.per_tile,
                                     c.store};
    genkernels::with_vector(c.dtype, p.vec, [&](auto d, auto v) {
      using D = decltype(d);
      constexpr int kVec = decltype(v)::value;
      const auto blocks_total = static_cast<unsigned>(p.grid_x * p.grid_y);
      genkernels::with_uniform<kVec>(args.stride_c, [&](auto uniform) {
        constexpr bool kUniform = std::decay_t<decltype(uniform)>::value;
        genkernels::with_act(c.act, [&](auto act) {
          constexpr int kAct = decltype(act)::value;
          if constexpr (!kCodes || genkernels::kCodable<kAct>) {
            simt::launch(blocks_total, kThreads, 0, {}, global, label + what, [&] {
              genkernels::bias_act_grad_bias_kernel<kAct, D, kVec, kUniform, kCodes>(args, t);
            });
          }
        });
      });
    });
    return p;
  };
  Buffer dz2;
  std::vector<float> partials;
  genkernels::BiasGradPlan plan{};
  if (bias_grad) {
    dz2.init(c.dtype, n, mis_out);
    BiasActArgs ba = a;
    ba.dy = dy.data();
    ba.out = c.store ? static_cast<void*>(dz2.data()) : static_cast<void*>(x.data());
    plan = grad_bias(std::false_type{}, ba, partials, " (grad + bias)");
  }

  driver::Findings found;
  auto check = [&](const char* what, int dtype, int64_t e, float got, double want, double magnitude) {
    if (std::isnan(want)) {
      if (!std::isnan(got)) found.flag("%s[%lld] = %.9g, want NaN", what, (long long)e, got);
      return;
    }
    if (decode(dtype, encode(dtype, static_cast<float>(want))) == got) return;
    found.check(what, dtype, e, 0, got, want, magnitude);
  };
  const double tol_rel = std::ldexp(1.0, -20);
  // Per channel: the float64 bias gradient, its magnitude, the slack of elements near the clamp.
  std::vector<double> db_want(c.C, 0.0), db_mag(c.C, 0.0), db_slack(c.C, 0.0);
  for (int64_t e = 0; e < n; ++e) {
    const float b = has_bias ? bias[1 + channel[e]] : 0.f;
    const double z = static_cast<float>(x.at(e) + b);  // the kernel's one float32 addition
    double v, vmag, g, gmag;
    act64(c.act, z, alpha, v, vmag);
    grad64(c.act, z, alpha, g, gmag);
    const double pre = v * gain;
    bool pass = true, either = false;
    double want_y = pre;
    if (c.clamp) {
      pass = pre >= -clamp && pre <= clamp;
      either = std::fabs(std::fabs(pre) - clamp) <= tol_rel * clamp;
      want_y = std::min<double>(std::max<double>(pre, -clamp), clamp);
    }
    const double yg = y.at(e);
    if (either) {
      if (!(std::fabs(yg - want_y) <= 4 * tol_rel * clamp)) found.flag("y[%lld] = %.9g near the clamp", (long long)e, yg);
    } else {
      check("y", c.dtype, e, static_cast<float>(yg), want_y, std::fabs(gain) * vmag);
    }
    const double d = dy.at(e);
    // torch's order: the clamp's gradient, then act' (relu's a select).
    auto through = [&](double gd) { return c.act == 1 ? (z <= 0 ? 0.0 : gd) : gd * g; };
    const double want_dz = through(d * gain), stopped = through(0.0);
    const double dz_mag = c.act == 1 && z <= 0 ? 0.0 : std::fabs(d * gain) * gmag;
    const float got = dz.at(e);
    if (either) {
      if (got != stopped) check("dz", c.out_dtype, e, got, want_dz, dz_mag);
    } else {
      check("dz", c.out_dtype, e, got, pass ? want_dz : stopped, dz_mag);
      if (!pass && !std::isnan(stopped) && got != 0.f) {
        found.flag("dz[%lld] = %.9g outside the clamp: want 0", (long long)e, got);
      }
    }
    if (has_bias) {
      const int ch = channel[e];
      if (either) {
        db_slack[ch] += std::fabs(want_dz);
      } else {
        db_want[ch] += pass ? want_dz : stopped;
      }
      if (std::isfinite(dz_mag)) db_mag[ch] += dz_mag;  // a NaN dy stopped by the clamp adds 0
    }
  }
  char extra[200] = "";
  if (bias_grad) {
    if (c.store) {
      for (int64_t e = 0; e < n; ++e) {
        if (dz2.bits(e) != dz.bits(e)) {
          found.flag("bias-grad dz[%lld] = %.9g, gradient kernel %.9g", (long long)e, dz2.at(e), dz.at(e));
          break;
        }
      }
      if (dz2.stray()) found.flag("a store outside dz (bias-grad kernel)");
    } else if (dz2.untouched() != static_cast<size_t>(n)) {
      found.flag("dz written by the bias-grad kernel without store");
    }
    if (!unwritten(partials.front()) || !unwritten(partials.back())) found.flag("a store outside the partials");
    std::vector<double> got(c.C, 0.0);
    for (int64_t by = 0; by < plan.grid_y; ++by) {
      for (int64_t j = 0; j < plan.width; ++j) {
        const float v = partials[1 + by * plan.width + j];
        if (unwritten(v)) {
          found.flag("partial (%lld, %lld) never written", (long long)by, (long long)j);
          continue;
        }
        const int64_t col = plan.per_tile ? j * plan.tq * plan.vec : j;
        got[(col / stride_c) % c.C] += v;
      }
    }
    const double terms = static_cast<double>(n) / c.C;
    for (int ch = 0; ch < c.C; ++ch) {
      const double tol = (terms * std::ldexp(1.0, -24) + tol_rel) * db_mag[ch] + db_slack[ch] + 1e-30;
      if (std::isnan(db_want[ch])) {
        if (!std::isnan(got[ch])) found.flag("dbias[%d] = %.9g, want NaN", ch, got[ch]);
        continue;
      }
      const double err = std::fabs(got[ch] - db_want[ch]);
      found.worst = std::max(found.worst, driver::ratio(err, tol));
      if (!(err <= tol)) found.flag("dbias[%d] = %.9g, want %.9g (tol %.3g)", ch, got[ch], db_want[ch], tol);
    }
    // The finishing kernel, launched as csrc/bias_act.cu does: dbias in the bias's dtype from the partials,
    // each channel within the partials' tolerance and one rounding to that dtype, every element written once
    // and nothing outside it.
    Buffer dbias;
    dbias.init(c.bias_dtype, c.C, false);
    const int64_t per = plan.per_tile ? stride_c / (int64_t{plan.tq} * plan.vec) : stride_c;
    const genkernels::BiasGradFinish fin{partials.data() + 1, dbias.data(), plan.grid_y, c.C, per};
    constexpr int kFinishWarps = genkernels::kBiasFinishThreads / 32;
    genkernels::with_dtype(c.bias_dtype, [&](auto o) {
      simt::launch((c.C + kFinishWarps - 1) / kFinishWarps, genkernels::kBiasFinishThreads, 0, {}, global,
                   label + " (bias-grad finish)", [&] { genkernels::bias_grad_finish_kernel<decltype(o)>(fin); });
    });
    if (dbias.untouched() || dbias.stray()) found.flag("dbias: an element never written or a stray store");
    for (int ch = 0; ch < c.C; ++ch) {
      const double tol = (terms * std::ldexp(1.0, -24) + tol_rel) * db_mag[ch] + db_slack[ch] + 1e-30;
      const double want = db_want[ch], rounded = driver::unit_roundoff(c.bias_dtype) * std::fabs(want);
      if (std::isnan(want)) {
        if (!std::isnan(dbias.at(ch))) found.flag("finished dbias[%d] = %.9g, want NaN", ch, dbias.at(ch));
        continue;
      }
      const double err = std::fabs(dbias.at(ch) - want);
      found.worst = std::max(found.worst, driver::ratio(err, tol + rounded));
      if (!(err <= tol + rounded)) {
        found.flag("finished dbias[%d] = %.9g, want %.9g (tol %.3g)", ch, dbias.at(ch), want, tol + rounded);
      }
    }
    snprintf(extra, sizeof extra, "; bias-grad vec %d tq %d %s %s %s blocks %lldx%lld; finish per %lld terms %lld",
             plan.vec, plan.tq, plan.per_tile ? "per-tile" : "per-column",
             stride_c % plan.vec == 0 ? "uniform" : "mixed", c.store ? "store" : "no-store", (long long)plan.grid_x,
             (long long)plan.grid_y, (long long)per, (long long)(plan.grid_y * per));
  }
  if (y.untouched() || dz.untouched()) found.flag("an output element never written");
  if (y.stray() || dz.stray()) found.flag("a store outside y or dz");

  // Gradient codes (linear, relu, lrelu on the forward's vector path): the forward writes y bit for bit
  // as without them and the codes of the format (z > 0, the clamp passes); the gradient kernels, from the
  // codes and never x, write dz and the partials bit for bit as from x.
  char codes_extra[120] = "";
  if (c.act <= 2 && fvec > 1) {
    const int64_t words = (n + 7) / 8;  // 2 * ceil(n / 8) bytes: whole 16-bit words
    std::vector<uint16_t> code_store(words + 2, 0xa5a5);  // sentinel words on both sides
    unsigned char* codes = reinterpret_cast<unsigned char*>(code_store.data() + 1);
    simt::register_global(global, codes, static_cast<size_t>(words) * 2);
    Buffer y3, dz3;
    y3.init(c.dtype, n, mis_in);
    dz3.init(c.out_dtype, n, mis_out);
    BiasActArgs fc = fa;
    fc.out = y3.data();
    fc.codes = codes;
    genkernels::with_vector(c.dtype, fvec, [&](auto d, auto v) {
      using D = decltype(d);
      constexpr int kVec = decltype(v)::value;
      if constexpr (kVec > 1) {
        genkernels::with_act(c.act, [&](auto act) {
          constexpr int kAct = decltype(act)::value;
          if constexpr (genkernels::kCodable<kAct>) {
            simt::launch(blocks(kVec), kThreads, 0, {}, global, label + " (forward + codes)", [&] {
              genkernels::bias_act_forward_kernel<kAct, D, kVec, true>(fc);
            });
          }
        });
      }
    });
    for (int64_t e = 0; e < n; ++e) {
      if (y3.bits(e) != y.bits(e)) {
        found.flag("y[%lld] = %.9g with codes, %.9g without", (long long)e, y3.at(e), y.at(e));
        break;
      }
    }
    if (y3.stray()) found.flag("a store outside y (forward with codes)");
    if (code_store.front() != 0xa5a5 || code_store.back() != 0xa5a5) found.flag("a store outside the codes");
    for (int64_t e = 0; e < n; ++e) {
      const float b = has_bias ? bias[1 + channel[e]] : 0.f;
      const float z = x.at(e) + b;
      double v, vmag;
      act64(c.act, z, alpha, v, vmag);
      const double pre = v * gain;
      if (c.clamp && std::fabs(std::fabs(pre) - clamp) <= tol_rel * clamp) continue;  // either way
      const bool slope_one = c.act == 1 ? !(z <= 0.f) : z > 0.f;  // relu's gradient passes at a NaN z
      const unsigned want = (slope_one ? 1u : 0u) | (!c.clamp || (pre >= -clamp && pre <= clamp) ? 2u : 0u);
      const unsigned got = (codes[e / 4] >> (2 * (e % 4))) & 3u;
      if (got != want) {
        found.flag("code[%lld] = %u, want %u (z %.9g)", (long long)e, got, want, z);
        break;
      }
    }
    BiasActArgs gc = ga;
    gc.x = nullptr;  // from the codes alone
    gc.codes = codes;
    gc.out = dz3.data();
    const int cvec = driver::vector_width(c.dtype, wide, {dy.data(), dz3.data()});
    genkernels::with_vector(c.dtype, cvec, [&](auto d, auto v) {
      using D = decltype(d);
      constexpr int kVec = decltype(v)::value;
      auto go = [&](auto o) {
        using O = decltype(o);
        genkernels::with_act(c.act, [&](auto act) {
          constexpr int kAct = decltype(act)::value;
          if constexpr (genkernels::kCodable<kAct>) {
            simt::launch(blocks(kVec), kThreads, 0, {}, global, label + " (grad from codes)", [&] {
              genkernels::bias_act_grad_kernel<kAct, D, O, kVec, true>(gc);
            });
          }
        });
      };
      if (c.out_dtype == c.dtype) {
        go(D{});
      } else {
        go(genkernels::F32{});
      }
    });
    for (int64_t e = 0; e < n; ++e) {
      if (dz3.bits(e) != dz.bits(e)) {
        found.flag("dz[%lld] = %.9g from codes, %.9g from x", (long long)e, dz3.at(e), dz.at(e));
        break;
      }
    }
    if (dz3.untouched() || dz3.stray()) found.flag("dz from codes: an element never written or a stray store");
    const char* bias_codes = "";
    if (bias_grad) {
      Buffer dz4;
      dz4.init(c.dtype, n, mis_out);
      std::vector<float> partials2;
      BiasActArgs bc = a;
      bc.x = nullptr;
      bc.codes = codes;
      bc.dy = dy.data();
      bc.out = c.store ? static_cast<void*>(dz4.data()) : static_cast<void*>(dy.data());
      const genkernels::BiasGradPlan plan2 = grad_bias(std::true_type{}, bc, partials2, " (grad + bias from codes)");
      if (plan2.vec != plan.vec || plan2.grid_y != plan.grid_y || plan2.width != plan.width) {
        found.flag("the bias-grad plan from codes differs from the plan from x");
      } else if (std::memcmp(partials2.data(), partials.data(), partials.size() * sizeof(float)) != 0) {
        found.flag("bias-grad partials from codes differ from those from x");
      }
      if (c.store) {
        for (int64_t e = 0; e < n; ++e) {
          if (dz4.bits(e) != dz2.bits(e)) {
            found.flag("bias-grad dz[%lld] = %.9g from codes, %.9g from x", (long long)e, dz4.at(e), dz2.at(e));
            break;
          }
        }
      } else if (dz4.untouched() != static_cast<size_t>(n)) {
        found.flag("dz written by the bias-grad kernel from codes without store");
      }
      bias_codes = " bias";
    }
    snprintf(codes_extra, sizeof codes_extra, "; codes fwd %d grad %d%s", fvec, cvec, bias_codes);
  }

  char buf[400];
  snprintf(buf, sizeof buf, "vec %d %d n %lld; max |err| / tol %.3g%s%s", fvec, gvec, static_cast<long long>(n),
           found.worst, extra, codes_extra);
  return found.outcome(label, buf);
}

struct Shape {
  Layout layout;
  int N, C, S;
};

// Channels first with S a multiple of every width and odd; channels last with small and odd C;
// a (C, S) matrix with bias along dim 0; no bias; n above a block's step (several blocks) with a
// tail that is not a whole vector; single elements.
const Shape kShapes[] = {
    {Layout::kChannelsFirst, 2, 3, 16},  {Layout::kChannelsFirst, 2, 5, 7},   {Layout::kChannelsLast, 3, 6, 5},
    {Layout::kChannelsLast, 2, 7, 9},    {Layout::kRows, 1, 9, 13},           {Layout::kNoBias, 1, 1, 37},
    {Layout::kChannelsFirst, 3, 17, 61}, {Layout::kChannelsLast, 4, 24, 33},  {Layout::kNoBias, 1, 1, 1},
    // The bias-gradient kernel's tiles: one channel per tile (S a multiple of 256 vectors, or of 256
    // elements on the scalar path), and many row tiles of per-column partials.
    {Layout::kChannelsFirst, 1, 2, 2048}, {Layout::kChannelsFirst, 2, 3, 256}, {Layout::kChannelsLast, 8, 16, 64},
    // The finishing kernel's walk over more than a warp's worth of partials a channel: a few columns a channel
    // over many row tiles (per 5 and 3), one partial a channel (channels last) over many row tiles, and a
    // matrix's 100 columns a channel in one row tile. (17 shapes: prime to the option cycles below.)
    {Layout::kChannelsFirst, 64, 3, 5}, {Layout::kChannelsLast, 80, 8, 4}, {Layout::kChannelsFirst, 48, 2, 3},
    {Layout::kRows, 1, 3, 100},
    // Several blocks of the elementwise kernels (kBiasActUnroll vectors a thread), the last one partly
    // past n and ending in a partial vector.
    {Layout::kChannelsFirst, 2, 5, 1001},
};

std::vector<Case> make_cases() {
  std::vector<Case> cases;
  int k = 0;
  for (const int dtype : {kF32, kF16, kBF16}) {
    for (int act = 0; act < 7; ++act) {
      for (const Shape& s : kShapes) {
        Case c{};
        c.dtype = dtype;
        c.out_dtype = (dtype != kF32 && k % 3 == 1) ? kF32 : dtype;
        c.act = act;
        c.layout = s.layout, c.N = s.N, c.C = s.C, c.S = s.S;
        c.clamp = k % 2 == 0;
        c.large = k % 4 < 2;
        c.misalign = k % 5 == 3 ? Misalign::kAll : k % 5 == 4 ? Misalign::kOut : Misalign::kNone;
        c.store = k % 3 != 2;
        c.bias_dtype = (k / 3) % 3 == 0 ? kF32 : (k / 3) % 3 == 1 ? kF16 : kBF16;
        cases.push_back(c);
        ++k;
      }
    }
  }
  return cases;
}

}  // namespace

int main(int argc, char** argv) { return driver::run_driver(argc, argv, make_cases(), 5000u, run); }
