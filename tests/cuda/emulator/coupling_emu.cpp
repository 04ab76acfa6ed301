// Runs the normalizing-flow kernels of genkernels/coupling.cuh, the same source that csrc/coupling.cu
// compiles with nvcc, on the CPU under the SIMT emulator of simt.h, and checks them against a float64
// reference: the affine coupling's y and logdet (forward and reverse) and its dx and dh, ActNorm's y
// (forward and reverse), dx and per-channel sums of dy and dy * (x + bias). Cases cover the kernels' paths:
// fp32, fp16 and bf16; channels first and channels last; 16-byte vectors and the scalar path (S, C,
// Ca or Ch not a multiple of the vector width; pointers one element past a 16-byte boundary: every
// tensor, or the gradients alone so that the forward moves vectors and the backward scalars); odd C,
// C = 2, S = 1, N = 1; every scale mode; reverse; dy or dlogdet absent; dx, dh or both wanted; the
// logdet wanted or not; one chunk per sample, several with a partial last one, more than a warp's
// worth, and more than the merge block has threads (its loop goes round twice); ActNorm channel
// tiles of one, several, and with idle
// threads; pre-activations of magnitude up to 1e4 (sigmoid and softclamp modes: no NaN or inf); ActNorm
// inputs of mean 1000 with bias = -mean, as ActNorm's data-dependent initialization sets it (the sum of
// dy * (x + bias) to the error of its own terms: summed as sum dy x + bias sum dy it would cancel).
//
//   coupling_emu [--jobs N] [--case SUBSTRING]
//
// prints "CASES <cases>", then one line per case:
//   RESULT ok|FAIL <case> | vec <forward> <backward> chunks <count>; <largest error relative to its
//   tolerance>; <first bad element>
// and "PASSED" or "FAILED <count>"; the exit status is 0 when every case passes, 1 when one fails,
// 2 when the emulator stops on a broken rule of the execution model (message on stderr).
//
// The launch choices replicate csrc/coupling.cu: channels last whenever S == 1 (the same memory);
// 16-byte vectors when S (channels first) or C, Ca and Ch (channels last) are multiples of the
// vector width and every pointer in use is 16-byte aligned, else one element a thread; ActNorm's
// backward tiles of V = min(ceil(C / VEC), 256) channel vectors. The chunk lengths are the case's own.
//
// Tolerances, from the kernels' arithmetic. The inputs are exact (the reference decodes the same
// bits); expf, log1pf, tanhf, coshf and atanf are the C library's here (an ulp or two; CUDA's are
// within two). The argument of the scale function is rounded once (h + 2, h / clamp), which moves
// log s by up to 2^-24 |h| g and g by up to 2^-23 |h / clamp| of itself, so each output gets
//   |got - ref| <= u |ref| + 2^-20 F m + 2^-25,   F = 3 + |h| (1 + 2 / clamp),
// m the output's magnitude (the expression with every term in absolute value), u the dtype's unit
// roundoff; an output that rounds to the reference's dtype value passes as is. A float32 sum (logdet,
// ActNorm's sums) errs by at most 2^-24 (d + 8) of the sum of its terms' magnitudes, d the depth of
// its summation (a thread's sequential adds, the block tree, the merge), plus each term's own error
// (dy * (x + bias): two roundings, 2^-23 of the term).
#include "simt.h"
#include "driver.h"

// Its "#pragma unroll" are for nvcc (compile with -Wno-unknown-pragmas under -Wall).
#include "genkernels/coupling.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

using driver::Buffer;
using driver::decode;
using driver::dtype_name;
using driver::encode;
using simt::Outcome;

constexpr int kThreads = genkernels::kCouplingThreads;
constexpr int kF32 = genkernels::kFloat32, kF16 = genkernels::kFloat16, kBF16 = genkernels::kBFloat16;

enum class Kind { kCoupling, kActNorm };
enum class Misalign { kNone, kAll, kGrads };  // tensors one element past a 16-byte boundary
enum class Grads { kBoth, kX, kH };           // which of dx and dh the backward writes (ActNorm: dx or none)

struct Case {
  Kind kind;
  int dtype;
  int N, C, S;
  bool channels_last;
  int scale;
  float clamp;
  bool reverse, want_logdet, dy, dlogdet;
  Grads grads;
  Misalign misalign;
  bool large_h;     // pre-activations up to 1e4 in magnitude
  bool large_mean;  // ActNorm: x of mean 1000 per channel, bias = -that mean
  int64_t chunk;    // coupling and ActNorm forward: positions per chunk; ActNorm backward: elements
                    // (channels first) or pixel rows (channels last) per chunk

  std::string name() const {
    static const char* const scales[] = {"exp", "sigmoid", "softclamp_tanh", "softclamp_atan", "additive"};
    static const char* const grad_names[] = {"d:both", "d:x", "d:h"};
    char buf[256];
    if (kind == Kind::kCoupling) {
      snprintf(buf, sizeof buf, "coupling %s N%d C%d S%d %s %s clamp%g%s%s%s%s %s%s%s chunk%lld", dtype_name(dtype), N,
               C, S, channels_last ? "last" : "first", scales[scale], clamp, reverse ? " reverse" : "",
               want_logdet ? " logdet" : " no-logdet", dy ? "" : " no-dy", dlogdet ? "" : " no-dlogdet",
               grad_names[static_cast<int>(grads)],
               misalign == Misalign::kAll ? " misaligned" : misalign == Misalign::kGrads ? " misaligned-grads" : "",
               large_h ? " large-h" : "", static_cast<long long>(chunk));
    } else {
      snprintf(buf, sizeof buf, "actnorm %s N%d C%d S%d %s%s%s%s%s chunk%lld", dtype_name(dtype), N, C, S,
               channels_last ? "last" : "first", reverse ? " reverse" : "", grads == Grads::kBoth ? " dx" : " no-dx",
               misalign == Misalign::kAll ? " misaligned" : misalign == Misalign::kGrads ? " misaligned-grads" : "",
               large_mean ? " large-mean" : "", static_cast<long long>(chunk));
    }
    return buf;
  }
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Element (n, c, s) of a dense (N, channels, S) tensor in the case's layout.
int64_t at(bool last, int64_t channels, int64_t S, int64_t n, int64_t c, int64_t s) {
  return last ? (n * S + s) * channels + c : (n * channels + c) * S + s;
}

// log s and g = d log s / d h in float64.
void reference_scale(int mode, double clamp, double h, double& ls, double& g) {
  switch (mode) {
    case genkernels::kScaleSigmoid: {
      const double z = h + 2.0;
      ls = std::min(z, 0.0) - std::log1p(std::exp(-std::fabs(z)));
      g = z >= 0 ? std::exp(-z) / (1.0 + std::exp(-z)) : 1.0 / (1.0 + std::exp(z));
      break;
    }
    case genkernels::kScaleSoftclampTanh: {
      const double t = std::tanh(h / clamp);
      ls = clamp * t;
      g = 1.0 - t * t;
      break;
    }
    case genkernels::kScaleSoftclampAtan: {
      const double u = h / clamp;
      ls = 0.636 * clamp * std::atan(u);
      g = 0.636 / (1.0 + u * u);
      break;
    }
    case genkernels::kScaleAdditive:
      ls = 0, g = 0;
      break;
    default:
      ls = h, g = 1;
  }
}

// A pre-activation: N(0, sigma), or with large_h every third one of magnitude 30 to 1e4.
float draw_h(std::mt19937& rng, const Case& c) {
  std::normal_distribution<float> normal(0.f, c.scale == genkernels::kScaleExp ? 1.f : 3.f);
  if (c.large_h && rng() % 3 == 0) {
    static const float kLarge[] = {30.f, -30.f, 95.f, -95.f, 1e3f, -1e3f, 1e4f, -1e4f, 200.5f, -200.5f};
    return kLarge[rng() % 10];
  }
  return normal(rng);
}

struct Check {
  driver::Findings& found;
  int dtype;
  // Output `what`[e] against the float64 reference, with magnitude m and argument factor f.
  void operator()(const char* what, int64_t e, int64_t n, float got, double want, double m, double f) {
    if (decode(dtype, encode(dtype, static_cast<float>(want))) == got) return;  // same value in the dtype
    found.check(what, dtype, e, n, got, want, f * m);
  }
};

// A float32 sum `got` of terms whose exact sum is `want`, their magnitudes summing to `mag` and
// their own errors to `term_err`, added to depth `depth`.
void check_sum(driver::Findings& found, const char* what, int64_t i, float got, double want, double mag,
               double term_err, double depth) {
  const double tol = std::ldexp(1.0, -24) * (depth + 8) * mag + term_err + 1e-30;
  const double err = std::fabs(got - want);
  if (!(err <= tol)) {
    found.flag("%s[%lld] = %.9g, want %.9g (tol %.3g)", what, static_cast<long long>(i), got, want, tol);
  }
  found.worst = std::max(found.worst, driver::ratio(err, tol));
}

Outcome run_coupling(const Case& c, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int64_t N = c.N, C = c.C, S = c.S;
  const int64_t Ca = C / 2, Cb = C - Ca;
  const bool additive = c.scale == genkernels::kScaleAdditive;
  const int64_t Ch = additive ? Cb : 2 * Cb;
  const bool last = c.channels_last || S == 1;  // as csrc/coupling.cu
  const int64_t n_elem = C * S, chunks = ceil_div(n_elem, c.chunk);
  const bool want_dx = c.grads != Grads::kH, want_dh = c.grads != Grads::kX;

  Buffer x, h, y, dy, dx, dh;
  const bool shift = c.misalign == Misalign::kAll, shift_grads = c.misalign != Misalign::kNone;
  x.init(c.dtype, N * n_elem, shift);
  h.init(c.dtype, N * Ch * S, shift);
  y.init(c.dtype, N * n_elem, shift);
  dy.init(c.dtype, N * n_elem, shift);
  dx.init(c.dtype, N * n_elem, shift_grads);
  dh.init(c.dtype, N * Ch * S, shift_grads);
  x.fill(rng, 1.5f);
  dy.fill(rng, 1.f);
  for (size_t i = 0; i < h.count; ++i) h.set(i, draw_h(rng, c));
  if (!additive) {  // shifts t of ordinary size even with large pre-activations
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = Cb; k < Ch; ++k) {
        for (int64_t s = 0; s < S; ++s) h.set(at(last, Ch, S, n, k, s), 1.5f * normal(rng));
      }
    }
  }
  std::vector<float> dlogdet(N);
  for (float& v : dlogdet) v = normal(rng);
  std::vector<float> logdet(N + 2, NAN), partials(N * chunks + 2, NAN);  // NaN guards each side

  std::vector<simt::Range> global;
  auto reg = [&global](const void* p, size_t bytes) { simt::register_global(global, p, bytes); };
  reg(x.data(), x.bytes());
  reg(h.data(), h.bytes());
  if (c.dy) reg(dy.data(), dy.bytes());
  if (c.dlogdet) reg(dlogdet.data(), dlogdet.size() * sizeof(float));

  genkernels::CouplingShape sh{};
  sh.c = C, sh.s = S, sh.ca = Ca, sh.cb = Cb, sh.ch = Ch, sh.n = n_elem;
  sh.chunk = c.chunk, sh.chunks = chunks, sh.channels_last = last, sh.scale = c.scale, sh.clamp = c.clamp;
  auto vec = [&](std::initializer_list<const void*> ptrs) {
    return last ? driver::vector_width(c.dtype, C, ptrs, {Ca, Ch}) : driver::vector_width(c.dtype, S, ptrs);
  };

  genkernels::CouplingForwardArgs fa{};
  fa.s = sh;
  fa.x = x.data();
  fa.h = h.data();
  fa.y = y.data();
  fa.partials = !c.want_logdet ? nullptr : chunks > 1 ? partials.data() + 1 : logdet.data() + 1;
  fa.reverse = c.reverse;
  const int fvec = vec({fa.x, fa.h, fa.y});

  genkernels::CouplingBackwardArgs ba{};
  ba.s = sh;
  ba.dy = c.dy ? dy.data() : nullptr;
  ba.dlogdet = c.dlogdet ? dlogdet.data() : nullptr;
  ba.x = x.data();
  ba.h = h.data();
  ba.dx = want_dx ? dx.data() : nullptr;
  ba.dh = want_dh ? dh.data() : nullptr;
  const int bvec = vec({ba.dy, additive ? nullptr : ba.h, want_dh && !additive ? ba.x : nullptr, ba.dx, ba.dh});

  const std::string label = c.name();
  const auto grid = static_cast<unsigned>(N * chunks);
  genkernels::with_vector(c.dtype, fvec, [&](auto d, auto v) {
    simt::launch(grid, kThreads, 0, {}, global, label + " (forward)",
                 [&] { genkernels::coupling_forward_kernel<decltype(d), decltype(v)::value>(fa); });
  });
  if (c.want_logdet && chunks > 1) {
    simt::launch(static_cast<unsigned>(N), genkernels::kMergeThreads, 0, {}, global, label + " (merge)",
                 [&] { genkernels::row_sum_kernel(partials.data() + 1, logdet.data() + 1, chunks); });
  }
  if (!c.reverse) {  // the fused backward serves the forward direction
    genkernels::with_vector(c.dtype, bvec, [&](auto d, auto v) {
      simt::launch(grid, kThreads, 0, {}, global, label + " (backward)",
                   [&] { genkernels::coupling_backward_kernel<decltype(d), decltype(v)::value>(ba); });
    });
  }

  // float64 reference.
  driver::Findings found;
  Check check{found, c.dtype};
  const double clamp = c.clamp;
  // Per-thread sequential adds of the logdet: the vectors a thread takes in a chunk, VEC terms each.
  const double depth = static_cast<double>(ceil_div(c.chunk, int64_t{kThreads} * fvec) * fvec) + 8 +
                       static_cast<double>(ceil_div(chunks, genkernels::kMergeThreads) + 8);
  bool finite = true;
  for (int64_t n = 0; n < N; ++n) {
    double ld = 0, ld_mag = 0, ld_err = 0;
    for (int64_t ch = 0; ch < C; ++ch) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t e = at(last, C, S, n, ch, s);
        const double xv = x.at(e), gy = c.dy ? dy.at(e) : 0.0;
        if (ch < Ca) {
          check("y", e, n, y.at(e), xv, std::fabs(xv), 1);
          if (!c.reverse && want_dx) check("dx", e, n, dx.at(e), gy, std::fabs(gy), 1);
          continue;
        }
        const int64_t k = ch - Ca;
        const int64_t hs_at = at(last, Ch, S, n, k, s), t_at = at(last, Ch, S, n, additive ? k : k + Cb, s);
        const double hv = additive ? 0.0 : h.at(hs_at), tv = h.at(t_at);
        double ls, g;
        reference_scale(c.scale, clamp, hv, ls, g);
        const double f = 3 + std::fabs(hv) * (1 + 2 / clamp);
        const double sv = std::exp(ls);
        ld += ls;
        ld_mag += std::fabs(ls);
        ld_err += std::ldexp(1.0, -21) * (std::fabs(ls) + f);
        const float yv = y.at(e);
        finite = finite && std::isfinite(yv);
        if (c.reverse) {
          check("y", e, n, yv, (xv - tv) / sv, (std::fabs(xv) + std::fabs(tv)) / sv, f);
          continue;
        }
        check("y", e, n, yv, xv * sv + tv, std::fabs(xv * sv) + std::fabs(tv), f);
        if (want_dx) {
          check("dx", e, n, dx.at(e), gy * sv, std::fabs(gy * sv), f);
          finite = finite && std::isfinite(dx.at(e));
        }
        if (want_dh) {
          const double dl = c.dlogdet ? dlogdet[n] : 0.0;
          if (!additive) {
            const float got = dh.at(hs_at);
            finite = finite && std::isfinite(got);
            check("dh_s", hs_at, n, got, (gy * xv * sv + dl) * g, (std::fabs(gy * xv * sv) + std::fabs(dl)) * g, f);
          }
          check("dt", t_at, n, dh.at(t_at), gy, std::fabs(gy), 1);
        }
      }
    }
    if (c.want_logdet) check_sum(found, "logdet", n, logdet[n + 1], c.reverse ? -ld : ld, ld_mag, ld_err, depth);
  }
  if (c.large_h && c.scale != genkernels::kScaleExp && !finite) found.flag("a NaN or inf with large |h|");
  if (y.untouched()) found.flag("y: %zu elements never written", y.untouched());
  if (!c.reverse && want_dx && dx.untouched()) found.flag("dx: %zu elements never written", dx.untouched());
  if (!c.reverse && want_dh && dh.untouched()) found.flag("dh: %zu elements never written", dh.untouched());
  if ((c.reverse || !want_dx) && dx.untouched() != dx.count) found.flag("dx written though not wanted");
  if ((c.reverse || !want_dh) && dh.untouched() != dh.count) found.flag("dh written though not wanted");
  if (y.stray() || dx.stray() || dh.stray()) found.flag("a store outside y, dx or dh");
  if (!std::isnan(logdet.front()) || !std::isnan(logdet.back())) found.flag("a store outside logdet");
  if (!c.want_logdet && !std::all_of(logdet.begin(), logdet.end(), [](float v) { return std::isnan(v); })) {
    found.flag("logdet written though not wanted");
  }
  if (!std::isnan(partials.front()) || !std::isnan(partials.back())) found.flag("a store outside the partials");

  char buf[200];
  snprintf(buf, sizeof buf, "vec %d %d chunks %lld; max |err| / tol %.3g", fvec, c.reverse ? 0 : bvec,
           static_cast<long long>(chunks), found.worst);
  return found.outcome(c.name(), buf);
}

Outcome run_actnorm(const Case& c, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int64_t N = c.N, C = c.C, S = c.S;
  const bool last = c.channels_last || S == 1;
  const bool want_dx = c.grads == Grads::kBoth;

  Buffer x, y, dy, dx;
  const bool shift = c.misalign == Misalign::kAll, shift_grads = c.misalign != Misalign::kNone;
  x.init(c.dtype, N * C * S, shift);
  y.init(c.dtype, N * C * S, shift);
  dy.init(c.dtype, N * C * S, shift);
  dx.init(c.dtype, N * C * S, shift_grads);
  x.fill(rng, 1.5f);
  dy.fill(rng, 1.f);
  std::vector<float> log_scale(C), bias(C);
  for (float& v : log_scale) v = 0.7f * normal(rng);
  for (float& v : bias) v = normal(rng);
  if (c.large_mean) {  // x + 1000 in the dtype, bias = -the channel mean of what the kernels read
    for (int64_t ch = 0; ch < C; ++ch) {
      double mean = 0;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t e = at(last, C, S, n, ch, s);
          x.set(e, 1000.f + x.at(e));
          mean += x.at(e);
        }
      }
      bias[ch] = static_cast<float>(-mean / static_cast<double>(N * S));
    }
  }

  std::vector<simt::Range> global;
  auto reg = [&global](const void* p, size_t bytes) { simt::register_global(global, p, bytes); };
  reg(x.data(), x.bytes());
  reg(dy.data(), dy.bytes());
  reg(log_scale.data(), C * sizeof(float));
  reg(bias.data(), C * sizeof(float));
  auto vec = [&](std::initializer_list<const void*> ptrs) { return driver::vector_width(c.dtype, last ? C : S, ptrs); };

  // Forward: chunks of positions per sample (a multiple of 8 of the case's chunk).
  genkernels::ActNormShape fs{};
  fs.n = N, fs.c = C, fs.s = S, fs.channels_last = last;
  fs.chunk = (c.chunk + 7) / 8 * 8;
  fs.chunks = ceil_div(C * S, fs.chunk);
  genkernels::ActNormForwardArgs fa{fs, x.data(), log_scale.data(), bias.data(), y.data(), c.reverse};
  const int fvec = vec({fa.x, fa.y});

  // Backward: per-channel chunks (channels first: elements of N*S, a multiple of 8; channels last:
  // pixel rows), channel tiles as csrc/coupling.cu picks them.
  const int bvec = vec({dy.data(), x.data(), want_dx ? dx.data() : nullptr});
  genkernels::ActNormShape bs{};
  bs.n = N, bs.c = C, bs.s = S, bs.channels_last = last;
  if (last) {
    bs.chunk = c.chunk;
    bs.chunks = ceil_div(N * S, bs.chunk);
    bs.tile_vecs = static_cast<int>(std::min<int64_t>(ceil_div(C, bvec), kThreads));
    bs.tiles = ceil_div(C, int64_t{bs.tile_vecs} * bvec);
  } else {
    bs.chunk = (c.chunk + 7) / 8 * 8;
    bs.chunks = ceil_div(N * S, bs.chunk);
    bs.tile_vecs = 0;
    bs.tiles = 1;
  }
  std::vector<float> sums(2 * C + 2, NAN), partials(2 * C * bs.chunks + 2, NAN);
  genkernels::ActNormBackwardArgs ba{bs, dy.data(), x.data(), log_scale.data(), bias.data(),
                                     want_dx ? dx.data() : nullptr,
                                     bs.chunks > 1 ? partials.data() + 1 : sums.data() + 1};

  const std::string label = c.name();
  genkernels::with_vector(c.dtype, fvec, [&](auto d, auto v) {
    simt::launch(static_cast<unsigned>(N * fs.chunks), kThreads, 0, {}, global, label + " (forward)",
                 [&] { genkernels::actnorm_forward_kernel<decltype(d), decltype(v)::value>(fa); });
  });
  if (!c.reverse) {
    const auto grid = static_cast<unsigned>(bs.tiles * bs.chunks * (last ? 1 : C));
    genkernels::with_vector(c.dtype, bvec, [&](auto d, auto v) {
      using D = decltype(d);
      constexpr int kVec = decltype(v)::value;
      simt::launch(grid, kThreads, 0, {}, global, label + " (backward)", [&] {
        if (last) {
          genkernels::actnorm_backward_last_kernel<D, kVec>(ba);
        } else {
          genkernels::actnorm_backward_first_kernel<D, kVec>(ba);
        }
      });
    });
    if (bs.chunks > 1) {
      simt::launch(static_cast<unsigned>(2 * C), genkernels::kMergeThreads, 0, {}, global, label + " (merge)",
                   [&] { genkernels::row_sum_kernel(partials.data() + 1, sums.data() + 1, bs.chunks); });
    }
  }

  driver::Findings found;
  Check check{found, c.dtype};
  // A thread's sequential adds: its vectors in a chunk (channels first), or its rows (channels last).
  const double per_thread = last ? static_cast<double>(ceil_div(bs.chunk, kThreads / bs.tile_vecs))
                                 : static_cast<double>(ceil_div(bs.chunk, int64_t{kThreads} * bvec) * bvec);
  const double depth = per_thread + 8 + static_cast<double>(ceil_div(bs.chunks, genkernels::kMergeThreads) + 8);
  for (int64_t ch = 0; ch < C; ++ch) {
    const double ls = log_scale[ch], b = bias[ch], sc = std::exp(ls);
    double sdy = 0, sdy_mag = 0, sdyxb = 0, sdyxb_mag = 0;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t e = at(last, C, S, n, ch, s);
        const double xv = x.at(e), gy = dy.at(e);
        if (c.reverse) {
          check("y", e, n, y.at(e), xv / sc - b, std::fabs(xv / sc) + std::fabs(b), 1);
          continue;
        }
        check("y", e, n, y.at(e), (xv + b) * sc, (std::fabs(xv) + std::fabs(b)) * sc, 1);
        if (want_dx) check("dx", e, n, dx.at(e), gy * sc, std::fabs(gy * sc), 1);
        sdy += gy;
        sdy_mag += std::fabs(gy);
        sdyxb += gy * (xv + b);
        sdyxb_mag += std::fabs(gy * (xv + b));
      }
    }
    if (!c.reverse) {
      check_sum(found, "sum_dy", ch, sums[ch + 1], sdy, sdy_mag, 0, depth);
      const double term_err = std::ldexp(1.0, -23) * sdyxb_mag;
      check_sum(found, "sum_dy_xb", ch, sums[C + ch + 1], sdyxb, sdyxb_mag, term_err, depth);
    }
  }
  if (y.untouched()) found.flag("y: %zu elements never written", y.untouched());
  if (!c.reverse && want_dx && dx.untouched()) found.flag("dx: %zu elements never written", dx.untouched());
  if ((c.reverse || !want_dx) && dx.untouched() != dx.count) found.flag("dx written though not wanted");
  if (y.stray() || dx.stray()) found.flag("a store outside y or dx");
  if (!std::isnan(sums.front()) || !std::isnan(sums.back())) found.flag("a store outside the sums");
  if (!std::isnan(partials.front()) || !std::isnan(partials.back())) found.flag("a store outside the partials");

  char buf[200];
  snprintf(buf, sizeof buf, "vec %d %d chunks %lld; max |err| / tol %.3g", fvec, c.reverse ? 0 : bvec,
           static_cast<long long>(c.reverse ? fs.chunks : bs.chunks), found.worst);
  return found.outcome(c.name(), buf);
}

Outcome run(const Case& c, unsigned seed) {
  return c.kind == Kind::kCoupling ? run_coupling(c, seed) : run_actnorm(c, seed);
}

struct Shape {
  int N, C, S;
};

// Coupling: C = 2 with S a multiple of 8 (channels first vectors, channels last scalars: Ca = 1);
// odd C; C, Ca and Ch multiples of 8 (vectors in both layouts); S = 1 (channels last addressing, with
// vectors when C allows); N = 1; S odd; C a multiple of 4 but not 8 (fp32 vectors, 16-bit scalars);
// a sample longer than a block's step (threads walk several vectors across channel runs).
const Shape kCouplingShapes[] = {{2, 2, 16}, {3, 5, 7}, {2, 16, 24}, {4, 16, 1}, {1, 8, 40},
                                 {2, 12, 9}, {2, 7, 1},  {1, 32, 96}};

// Chunk lengths (multiples of 8): 2048 (what the host picks for tensors this small: one chunk), about
// a third of a sample (three chunks, the last partial), 8 where that makes more chunks than a warp has
// lanes, else about a sixth of a sample.
int64_t coupling_chunk(int choice, int64_t n) {
  switch (choice % 3) {
    case 0:
      return 2048;
    case 1:
      return std::max<int64_t>(8, (n / 3 + 7) / 8 * 8);
    default:
      return n > 32 * 8 && n <= 400 ? 8 : std::max<int64_t>(8, (n / 6 + 7) / 8 * 8);
  }
}

std::vector<Case> make_cases() {
  std::vector<Case> cases;
  int group = 0;
  for (const int dtype : {kF32, kF16, kBF16}) {
    for (const Shape& s : kCouplingShapes) {
      for (int i = 0; i < 8; ++i) {
        Case c{};
        c.kind = Kind::kCoupling;
        c.dtype = dtype;
        c.N = s.N, c.C = s.C, c.S = s.S;
        c.scale = (i + group) % 5;
        c.clamp = (i + group) % 2 ? 2.f : 0.7f;
        c.channels_last = (i / 5 + group) % 2 == 1;
        // The binary options run through their patterns, shifted per group so that each meets every
        // scale mode and layout across the groups.
        const int bits = (i * 7 + group * 3) % 32;
        c.reverse = bits % 5 == 4;
        c.want_logdet = !(bits & 1);
        c.dy = !(bits & 2) || bits % 5 == 0;
        c.dlogdet = !(bits & 4);
        c.grads = static_cast<Grads>((i + 2 * group) % 3);
        c.misalign = !(bits & 8) ? Misalign::kNone : (i + group) % 3 == 0 ? Misalign::kGrads : Misalign::kAll;
        c.chunk = coupling_chunk(i + group, int64_t{s.C} * s.S);
        cases.push_back(c);
      }
      ++group;
    }
  }
  // Pre-activations up to 1e4 in the sigmoid and softclamp modes (and reverse for softclamp).
  for (const int dtype : {kF32, kF16, kBF16}) {
    for (const int scale :
         {genkernels::kScaleSigmoid, genkernels::kScaleSoftclampTanh, genkernels::kScaleSoftclampAtan}) {
      for (const bool rev : {false, true}) {
        if (rev && scale == genkernels::kScaleSigmoid) continue;  // exp(-log s) overflows there, as it must
        for (const bool last : {false, true}) {
          Case c{};
          c.kind = Kind::kCoupling;
          c.dtype = dtype;
          c.N = 2, c.C = 16, c.S = last ? 5 : 16;
          c.scale = scale;
          c.clamp = 1.5f;
          c.channels_last = last;
          c.reverse = rev;
          c.want_logdet = c.dy = c.dlogdet = true;
          c.grads = Grads::kBoth;
          c.large_h = true;
          c.chunk = 64;
          cases.push_back(c);
        }
      }
    }
  }
  // ActNorm: channels first with S a multiple of 8 or odd, channels last with C a multiple of 8 or
  // not, S = 1, C = 3 (85 row lanes of a 3-vector tile: an uneven tree), C = 129 (one row lane, idle
  // threads) and C = 300 scalar (two channel tiles).
  const Shape kActNormShapes[] = {{2, 6, 16}, {3, 5, 7}, {2, 16, 9}, {4, 24, 1}, {1, 3, 50}, {2, 129, 3}, {1, 300, 2}};
  group = 0;
  for (const int dtype : {kF32, kF16, kBF16}) {
    for (const Shape& s : kActNormShapes) {
      for (int i = 0; i < 8; ++i) {
        Case c{};
        c.kind = Kind::kActNorm;
        c.dtype = dtype;
        c.N = s.N, c.C = s.C, c.S = s.S;
        if (s.C > 64 && i % 2 == 1) continue;  // wide channels: the channel tiles of channels last (halves the cost)
        c.channels_last = s.C > 64 || (i + group) % 2 == 1;
        c.reverse = (i + group) % 4 == 3;
        c.grads = (i / 2 + group) % 3 == 2 ? Grads::kH : Grads::kBoth;
        c.misalign = (i + group) % 5 == 1 ? Misalign::kAll : (i + group) % 5 == 3 ? Misalign::kGrads : Misalign::kNone;
        // Chunks: one (2048), a few, or the most (1 row / 8 elements a chunk).
        const int64_t per = int64_t{s.N} * s.S;
        const int choice = (i / 2 + group) % 3;
        c.chunk = choice == 0 ? 2048 : choice == 1 ? std::max<int64_t>(1, per / 3) : 1;
        cases.push_back(c);
      }
      ++group;
    }
  }
  // ActNorm on data of mean 1000 with bias = -mean: both layouts, one chunk and several (merged).
  for (const int dtype : {kF32, kF16, kBF16}) {
    for (const bool last : {false, true}) {
      for (const int64_t chunk : {int64_t{2048}, int64_t{5}}) {
        Case c{};
        c.kind = Kind::kActNorm;
        c.dtype = dtype;
        c.N = 2, c.C = last ? 8 : 5, c.S = last ? 33 : 32;
        c.channels_last = last;
        c.grads = Grads::kBoth;
        c.large_mean = true;
        c.chunk = chunk;
        cases.push_back(c);
      }
    }
  }
  // More chunks than the merge block has threads: its loop goes round twice.
  for (const int dtype : {kF32, kF16, kBF16}) {
    Case c{};
    c.kind = Kind::kCoupling;
    c.dtype = dtype;
    c.N = 1, c.C = 8, c.S = 264;
    c.scale = genkernels::kScaleSigmoid;
    c.clamp = 2.f;
    c.channels_last = dtype == kF16;
    c.reverse = dtype == kBF16;
    c.want_logdet = c.dy = c.dlogdet = true;
    c.grads = Grads::kBoth;
    c.chunk = 8;
    cases.push_back(c);
    Case a{};
    a.kind = Kind::kActNorm;
    a.dtype = dtype;
    a.channels_last = dtype != kF16;
    a.N = a.channels_last ? 2 : 1, a.C = a.channels_last ? 4 : 2, a.S = a.channels_last ? 140 : 2100;
    a.grads = Grads::kBoth;
    a.chunk = 1;
    cases.push_back(a);
  }
  return cases;
}

}  // namespace

int main(int argc, char** argv) { return driver::run_driver(argc, argv, make_cases(), 7000u, run); }
