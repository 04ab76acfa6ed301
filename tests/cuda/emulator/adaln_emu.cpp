// Runs the adaLN kernels of genkernels/adaln.cuh, the same source that csrc/adaln.cu compiles with nvcc, on
// the CPU under the SIMT emulator of simt.h, and checks every output against a float64 reference, on cases
// that cover the kernels' paths: fp32, fp16 and bf16; the three ops (layer_norm_modulate, gated_residual,
// gated_residual_layer_norm_modulate), LayerNorm and RMSNorm; weight and bias present or absent, in float32 or
// in x's dtype; shift,
// scale and gate per sample (B, D), per token (B, L, D) or absent, in x's dtype or float32; with and
// without the gradient of h; odd D (33, 40, 72, 1000, 2000, 2500) and L = 1; 8-element vectors (16 bytes
// of fp16 / bf16, two 16-byte accesses of float32) and the scalar path (a pointer one element off, a row
// stride that is not a multiple of 8, or D itself); row groups of 32 threads (4 rows a block), 64, 128
// and wider, up to 1024 scalar threads with several scalars each; backward chunks of several blocks per
// sample (the partials' fixed-order reduction); inputs far from zero (mean 1e3).
//
//   adaln_emu [--jobs N] [--case SUBSTRING]
//
// prints "CASES <cases>", then one line per case:
//   RESULT ok|FAIL <case> | vec <fwd> <bwd> group <fwd> <bwd> (threads a row) slots <fwd> <bwd> (rows a
//   block) count <fwd> <bwd> (vectors a thread) blocks <fwd> <bwd> chunks <per sample> sums <column
//   sums>; max |err| / tol <worst>; <bad> bad; <first bad element>
// and "PASSED" or "FAILED <count>"; exit status 0 when every case passes, 1 when one fails, 2 when the
// emulator stops on a broken rule of the execution model.
//
// The launch choices replicate csrc/adaln.cu (vector width from D, the row strides and the pointers;
// adaln_shape and adaln_chunk for the split, with 2 SMs so that samples split into several chunks; one
// adaln_reduce_kernel per column sum). The backward takes the forward's mean and rstd, as the op does.
//
// Reference (float64): h = x + gate * res, rounded to the dtype as the kernel does; the norm, out and
// every gradient from the h the kernel wrote (the op's contract: out is the norm of the returned h), with
// exact statistics. Tolerance per element: u |ref| + e m (+ 2^-25, half fp16's subnormal step, for fp16;
// or got equal to ref rounded to the dtype), u the output dtype's unit roundoff, m the
// magnitude (the expression with every term in absolute value, xhat's terms taken as (|h| + |mean|) rstd
// so that inputs far from zero are judged by what float32 can resolve), e = 2^-24 (D / 8 + 32), which
// covers float32 sums over a row; column sums over T rows get (T 2^-24 + e) times the sum of magnitudes.
// Sentinels around every output catch stray or missing stores.
#include "simt.h"

// The device's rsqrtf (within 2 ulp there): exact here.
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

#include "driver.h"

#include "genkernels/adaln.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

namespace {

using driver::Buffer;
using driver::dtype_name;
using genkernels::AdalnBackwardArgs;
using genkernels::AdalnForwardArgs;
using genkernels::AdalnShape;
using genkernels::Operand;
using genkernels::Target;

constexpr int kF32 = genkernels::kFloat32, kF16 = genkernels::kFloat16, kBF16 = genkernels::kBFloat16;
constexpr int kSms = 2;

enum class Op { kNorm, kGate, kFused };
enum class Mod { kAbsent, kSample, kToken };

struct Case {
  int dtype;
  Op op;
  bool rms, weight, bias;
  Mod shift, scale, gate;
  bool side32;      // modulations in float32 (else x's dtype)
  int B, L, D;
  int pad;          // extra elements between the rows of x, res and dout (1: breaks the vector width)
  bool misalign;    // x one element past a 16-byte boundary
  bool dh;          // fused: a gradient of h too
  bool far;         // inputs around 1e3 with spread 1
  bool param16 = false;  // weight and bias in x's dtype (else float32)

  std::string name() const {
    static const char* const ops[] = {"norm", "gate", "fused"};
    static const char* const mods[] = {"-", "bd", "bld"};
    char buf[240];
    snprintf(buf, sizeof buf, "%s %s%s w%d b%d%s shift:%s scale:%s gate:%s%s B%d L%d D%d pad%d%s%s%s",
             dtype_name(dtype), ops[static_cast<int>(op)], rms ? " rms" : "", weight, bias,
             param16 ? " param:x" : "", mods[static_cast<int>(shift)], mods[static_cast<int>(scale)],
             mods[static_cast<int>(gate)], side32 ? " side:f32" : "", B, L, D, pad, misalign ? " misaligned" : "",
             dh ? " dh" : "", far ? " far" : "");
    return buf;
  }
};

// An (S, D) tensor with row stride `stride` in dtype `code`, absent when rows == 0.
struct Rows {
  Buffer buf;
  int64_t rows = 0, stride = 0;
  bool per_token = false;

  void init(int code, int64_t r, int64_t d, int64_t pad, bool token, bool misalign) {
    rows = r;
    stride = d + pad;
    per_token = token;
    buf.init(code, static_cast<size_t>(r * stride), misalign);
  }
  bool present() const { return rows > 0; }
  // Row of token (b, l).
  int64_t row(int64_t b, int64_t l, int64_t len) const { return per_token ? b * len + l : b; }
  float at(int64_t b, int64_t l, int64_t len, int64_t j) {
    return buf.at(static_cast<size_t>(row(b, l, len) * stride + j));
  }
  void* data() { return present() ? buf.data() : nullptr; }
  Operand operand(int64_t len) {
    if (!present()) return Operand{nullptr, 0, 0, kF32};
    return Operand{buf.data(), per_token ? stride * len : stride, per_token ? stride : 0, buf.dtype};
  }
  Target target(int64_t len) {
    const Operand o = operand(len);
    return Target{const_cast<void*>(o.p), o.sb, o.sl, o.dtype};
  }
};

double unit(int code) { return driver::unit_roundoff(code); }

// The vector width csrc/adaln.cu picks: kAdalnVec when D and every row stride are multiples of it and every
// pointer (null: absent) is 16-byte aligned, else 1.
int vector_width(int64_t d, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides) {
  constexpr int wide = genkernels::kAdalnVec;
  if (d % wide != 0) return 1;
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  for (const int64_t s : strides) {
    if (s % wide != 0) return 1;
  }
  return wide;
}

simt::Outcome run(const Case& c, unsigned seed) {
  const std::string label = c.name();
  std::mt19937 rng(seed);
  const int64_t R = int64_t{c.B} * c.L, D = c.D, L = c.L;
  const bool norm = c.op != Op::kGate, residual = c.op != Op::kNorm;
  // Without a gate the residual is x + y, and the op's backward takes y's gradient from x's: it launches the
  // backward with neither y nor gate (the norm's, with dh), or (gated_residual alone) no backward at all.
  const bool gated = residual && c.gate != Mod::kAbsent;
  const int side = c.side32 ? kF32 : c.dtype;
  auto mod_rows = [&](Mod m) { return m == Mod::kAbsent ? 0 : m == Mod::kSample ? c.B : R; };

  Rows x, res, gate, shift, scale, dout, dh;
  x.init(c.dtype, R, D, c.pad, true, c.misalign);
  if (residual) {
    res.init(c.dtype, R, D, c.pad, true, false);
    gate.init(side, mod_rows(c.gate), D, 0, c.gate == Mod::kToken, false);
  }
  if (norm) {
    if (c.shift != Mod::kAbsent) shift.init(side, mod_rows(c.shift), D, 0, c.shift == Mod::kToken, false);
    if (c.scale != Mod::kAbsent) scale.init(side, mod_rows(c.scale), D, 0, c.scale == Mod::kToken, false);
  }
  dout.init(c.dtype, R, D, c.pad, true, false);
  if (c.dh) dh.init(c.dtype, R, D, 0, true, false);
  Buffer weight, bias;
  const int param = c.param16 ? c.dtype : kF32;
  if (c.weight) weight.init(param, D, false);
  if (c.bias) bias.init(param, D, false);

  std::normal_distribution<float> normal(0.f, 1.f);
  const float offset = c.far ? 1000.f : 0.f;
  for (int64_t i = 0; i < R * x.stride; ++i) x.buf.set(i, offset + (c.far ? 1.f : 2.f) * normal(rng) + 0.3f);
  if (residual) {
    res.buf.fill(rng, 1.5f);
    gate.buf.fill(rng, 0.8f);
  }
  if (shift.present()) shift.buf.fill(rng, 0.5f);
  if (scale.present()) scale.buf.fill(rng, 0.5f);
  if (c.weight) {
    for (int64_t j = 0; j < D; ++j) weight.set(j, 1.f + 0.5f * normal(rng));
  }
  if (c.bias) bias.fill(rng, 0.5f);
  dout.buf.fill(rng, 1.f);
  if (c.dh) dh.buf.fill(rng, 0.7f);

  std::vector<simt::Range> global;
  for (Rows* t : {&x, &res, &gate, &shift, &scale, &dout, &dh}) {
    if (t->present()) simt::register_global(global, t->buf.data(), t->buf.bytes());
  }
  if (c.weight) simt::register_global(global, weight.data(), weight.bytes());
  if (c.bias) simt::register_global(global, bias.data(), bias.bytes());

  // Outputs, contiguous as the launcher allocates them.
  Rows h, out, dx, dres, dgate_t, dscale_t;
  if (residual) h.init(c.dtype, R, D, 0, true, false);
  if (norm) out.init(c.dtype, R, D, 0, true, false);
  std::vector<float> mean(R + 2, NAN), rstd(R + 2, NAN);  // NaN sentinels on both sides
  if (h.present()) simt::register_global(global, h.buf.data(), h.buf.bytes());  // the backward reads it

  // Forward.
  AdalnForwardArgs fa{};
  fa.x = x.operand(L);
  fa.res = res.operand(L);
  fa.gate = gate.operand(L);
  fa.shift = shift.operand(L);
  fa.scale = scale.operand(L);
  fa.weight = c.weight ? weight.data() : nullptr;
  fa.bias = c.bias ? bias.data() : nullptr;
  fa.w_dtype = fa.b_dtype = param;
  fa.h = h.target(L);
  fa.out = out.target(L);
  fa.mean = norm ? mean.data() + 1 : nullptr;
  fa.rstd = norm ? rstd.data() + 1 : nullptr;
  fa.eps = 1e-5f;
  fa.norm = norm;
  fa.rms = c.rms;
  const int fvec = vector_width(
      D, {x.buf.data(), res.data(), gate.data(), shift.data(), scale.data(), h.data(), out.data(),
                   c.weight ? weight.data() : nullptr, c.bias ? bias.data() : nullptr},
      {x.stride, res.stride, gate.stride, shift.stride, scale.stride, h.stride, out.stride});
  fa.s = genkernels::adaln_shape(R, L, D, fvec, 1, genkernels::adaln_forward_vectors(fvec));
  const unsigned fblocks = static_cast<unsigned>((R + fa.s.slots - 1) / fa.s.slots);
  genkernels::with_adaln_vector(c.dtype, fvec, [&](auto d, auto v) {
    genkernels::with_bool(fa.res.p != nullptr, [&](auto residual) {
      genkernels::with_adaln_forward_k(fa.s.count, [&](auto k) {
        simt::launch(fblocks, fa.s.group * fa.s.slots, 0, {}, global, label + " (forward)", [&] {
          genkernels::adaln_forward_kernel<decltype(d), decltype(v)::value, decltype(residual)::value,
                                           decltype(k)::value>(fa);
        });
      });
    });
  });

  // Backward: the op's outputs for this variant.
  const int64_t B = c.B;
  Buffer dweight, dbias, dshift_s, dscale_s, dgate_s;  // column sums, float32
  if (norm) dx.init(c.dtype, R, D, 0, true, false);  // gated_residual: x's gradient is dout (the op uses it)
  if (gated) {
    dres.init(c.dtype, R, D, 0, true, false);
    if (c.gate == Mod::kToken) dgate_t.init(side, R, D, 0, true, false);
    if (c.gate == Mod::kSample) dgate_s.init(kF32, B * D, false);
  }
  if (c.weight) dweight.init(kF32, D, false);
  if (c.bias) dbias.init(kF32, D, false);
  if (shift.present() && c.shift == Mod::kSample) dshift_s.init(kF32, B * D, false);
  if (scale.present()) {
    if (c.scale == Mod::kToken) dscale_t.init(side, R, D, 0, true, false);
    if (c.scale == Mod::kSample) dscale_s.init(kF32, B * D, false);
  }
  Buffer* sums[genkernels::kAdalnQuantities] = {&dweight, &dbias, &dshift_s, &dscale_s, &dgate_s};
  int quantities = 0;
  for (Buffer* s : sums) quantities += s->count > 0;

  AdalnBackwardArgs ba{};
  Rows& hin = residual ? h : x;
  ba.h = norm ? hin.operand(L) : Operand{nullptr, 0, 0, kF32};
  ba.dout = dout.operand(L);
  ba.dh = dh.operand(L);
  ba.res = gated ? res.operand(L) : Operand{nullptr, 0, 0, kF32};
  ba.gate = gate.operand(L);
  ba.shift = shift.operand(L);
  ba.scale = scale.operand(L);
  ba.weight = fa.weight;
  ba.bias = fa.bias;
  ba.w_dtype = ba.b_dtype = param;
  ba.mean = mean.data() + 1;
  ba.rstd = rstd.data() + 1;
  ba.dx = dx.target(L);
  ba.dres = dres.target(L);
  ba.dshift = Target{nullptr, 0, 0, kF32};  // per token: dout itself (the op uses it)
  ba.dscale = dscale_t.target(L);
  ba.dgate = dgate_t.target(L);
  ba.norm = norm;
  ba.rms = c.rms;
  const int bvec = vector_width(
      D, {norm ? hin.buf.data() : nullptr, dout.data(), dh.data(), gated ? res.data() : nullptr, gate.data(), shift.data(), scale.data(),
                   dx.data(), dres.data(), dscale_t.data(), dgate_t.data(), c.weight ? weight.data() : nullptr,
                   c.bias ? bias.data() : nullptr},
      {norm ? hin.stride : 0, dout.stride, dh.stride, res.stride, gate.stride, shift.stride, scale.stride, dx.stride,
       dres.stride, dscale_t.stride, dgate_t.stride});
  ba.s = genkernels::adaln_shape(R, L, D, bvec, genkernels::adaln_chunk(R, L, quantities > 0, kSms));
  const int64_t bblocks = B * ba.s.chunks;
  std::vector<std::vector<float>> partials(genkernels::kAdalnQuantities);
  for (int q = 0; q < genkernels::kAdalnQuantities; ++q) {
    if (sums[q]->count == 0) continue;
    partials[q].assign(bblocks * D + 2, NAN);  // NaN sentinels on both sides
    ba.partials[q] = partials[q].data() + 1;
  }
  const bool backward = norm || gated;
  if (backward) {
    genkernels::with_adaln_vector(c.dtype, bvec, [&](auto d, auto v) {
      simt::launch(static_cast<unsigned>(bblocks), ba.s.group * ba.s.slots, 0, {}, global, label + " (backward)",
                   [&] { genkernels::adaln_backward_kernel<decltype(d), decltype(v)::value>(ba); });
    });
  }
  for (int q = 0; q < genkernels::kAdalnQuantities; ++q) {
    if (sums[q]->count == 0) continue;
    genkernels::AdalnReduceArgs r{};
    r.partials = ba.partials[q];
    r.out = sums[q]->data();
    r.out_dtype = kF32;
    const bool per_sample = q >= genkernels::kSumShift;
    r.groups = per_sample ? B : 1;
    r.terms = per_sample ? ba.s.chunks : bblocks;
    r.dim = D;
    r.col_blocks = (D + genkernels::kReduceCols - 1) / genkernels::kReduceCols;
    simt::launch(static_cast<unsigned>(r.groups * r.col_blocks), genkernels::kReduceCols * genkernels::kReduceLanes,
                 0, {}, global, label + " (reduce)", [&] { genkernels::adaln_reduce_kernel(r); });
  }

  // ------------------------------------------------------------------------------- checks
  driver::Findings found;
  const double e_rel = std::ldexp(1.0, -24) * (D / 8.0 + 32.0);
  // Half a subnormal step of fp16 (2^-25) as an absolute floor: fp16 gradients reach its subnormals.
  auto check = [&](const char* what, int code, int64_t e, double got, double want, double mag) {
    if (driver::decode(code, driver::encode(code, static_cast<float>(want))) == got) return;
    const double tol = unit(code) * std::fabs(want) + e_rel * mag + (code == kF16 ? std::ldexp(1.0, -25) : 1e-30);
    const double err = std::fabs(got - want);
    found.worst = std::max(found.worst, driver::ratio(err, tol));
    if (!(err <= tol)) found.flag("%s[%lld] = %.9g, want %.9g (tol %.3g)", what, (long long)e, got, want, tol);
  };
  auto check_sum = [&](const char* what, int64_t e, double got, double want, double mag, int64_t terms) {
    const double tol = (terms * std::ldexp(1.0, -24) + e_rel) * mag + 1e-30;
    const double err = std::fabs(got - want);
    found.worst = std::max(found.worst, driver::ratio(err, tol));
    if (!(err <= tol)) found.flag("%s[%lld] = %.9g, want %.9g (tol %.3g)", what, (long long)e, got, want, tol);
  };
  auto val = [&](Rows& t, int64_t b, int64_t l, int64_t j, double fallback) {
    return t.present() ? static_cast<double>(t.at(b, l, L, j)) : fallback;
  };

  // Column sums in float64, and their magnitudes.
  std::vector<double> sw(D, 0), sb(D, 0), mw(D, 0), mb(D, 0);
  std::vector<double> ssh(B * D, 0), ssc(B * D, 0), sg(B * D, 0), msh(B * D, 0), msc(B * D, 0), mg(B * D, 0);
  std::vector<double> hv(D), dxh(D), amag(D), g(D), dxv(D), dxmag(D);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t l = 0; l < L; ++l) {
      const int64_t r = b * L + l;
      // h: x + gate * res rounded as the kernel does (float32 product and sum, then the dtype).
      for (int64_t j = 0; j < D; ++j) {
        const double xv = x.at(b, l, L, j);
        if (residual) {
          const float gv = gated ? gate.at(b, l, L, j) : 1.f;  // no gate: x + y
          const float want = static_cast<float>(xv + static_cast<float>(gv * static_cast<float>(res.at(b, l, L, j))));
          const double got = h.at(b, l, L, j);
          const double mag = std::fabs(xv) + std::fabs(gv * res.at(b, l, L, j));
          if (driver::decode(c.dtype, driver::encode(c.dtype, want)) != got) {
            check("h", c.dtype, r * D + j, got, want, 2 * mag);
          }
          hv[j] = got;
        } else {
          hv[j] = xv;
        }
      }
      double mu = 0, var = 0, rs = 1;
      if (norm) {
        if (!c.rms) {
          for (int64_t j = 0; j < D; ++j) mu += hv[j];
          mu /= D;
        }
        for (int64_t j = 0; j < D; ++j) var += (hv[j] - mu) * (hv[j] - mu);
        var /= D;
        rs = 1 / std::sqrt(var + fa.eps);
        const double mean_mag = c.rms ? 0.0 : std::fabs(mu);
        check("mean", kF32, r, mean[1 + r], mu, std::fabs(mu) + (c.rms ? 0 : std::sqrt(var)));
        check("rstd", kF32, r, rstd[1 + r], rs, rs * (1 + mean_mag * rs));
        // out.
        for (int64_t j = 0; j < D; ++j) {
          const double xh = (hv[j] - mu) * rs, a = (std::fabs(hv[j]) + mean_mag) * rs;
          amag[j] = a;
          const double w = c.weight ? weight.at(j) : 1.0, bi = c.bias ? bias.at(j) : 0.0;
          const double sc = val(scale, b, l, j, 0.0), sh = val(shift, b, l, j, 0.0);
          const double n = xh * w + bi;
          const double want = n * (1 + sc) + sh;
          const double mag = (a * std::fabs(w) + std::fabs(bi)) * std::fabs(1 + sc) + std::fabs(sh);
          check("out", c.dtype, r * D + j, out.at(b, l, L, j), want, mag);
        }
      }
      // Backward of the row.
      double c1 = 0, c2 = 0, m1 = 0, m2 = 0;
      for (int64_t j = 0; j < D; ++j) {
        const double dy = dout.at(b, l, L, j);
        if (!norm) {
          dxv[j] = dy;
          dxmag[j] = std::fabs(dy);
          continue;
        }
        const double w = c.weight ? weight.at(j) : 1.0, bi = c.bias ? bias.at(j) : 0.0;
        const double sc = val(scale, b, l, j, 0.0);
        const double xh = (hv[j] - mu) * rs;
        g[j] = dy * (1 + sc);
        dxh[j] = g[j] * w;
        c1 += dxh[j];
        c2 += dxh[j] * xh;
        m1 += std::fabs(dxh[j]);
        m2 += std::fabs(dxh[j]) * amag[j];
        sw[j] += g[j] * xh;
        mw[j] += std::fabs(g[j]) * amag[j];
        sb[j] += g[j];
        mb[j] += std::fabs(g[j]);
        const double n = xh * w + bi, nmag = amag[j] * std::fabs(w) + std::fabs(bi);
        if (c.shift == Mod::kSample) {
          ssh[b * D + j] += dy;
          msh[b * D + j] += std::fabs(dy);
        }
        if (c.scale == Mod::kSample) {
          ssc[b * D + j] += dy * n;
          msc[b * D + j] += std::fabs(dy) * nmag;
        }
        if (c.scale == Mod::kToken) {
          check("dscale", side, r * D + j, dscale_t.at(b, l, L, j), dy * n, std::fabs(dy) * nmag);
        }
      }
      if (norm) {
        c1 = c.rms ? 0 : c1 / D;
        c2 /= D;
        m1 /= D;
        m2 /= D;
        for (int64_t j = 0; j < D; ++j) {
          const double xh = (hv[j] - mu) * rs;
          const double extra = val(dh, b, l, j, 0.0);
          dxv[j] = rs * (dxh[j] - c1 - xh * c2) + extra;
          dxmag[j] = rs * (std::fabs(dxh[j]) + (c.rms ? 0 : m1) + amag[j] * m2) + std::fabs(extra);
          check("dx", c.dtype, r * D + j, dx.at(b, l, L, j), dxv[j], dxmag[j]);
        }
      }
      if (gated) {
        for (int64_t j = 0; j < D; ++j) {
          const double gv = gate.at(b, l, L, j), rv = res.at(b, l, L, j);
          check("dy", c.dtype, r * D + j, dres.at(b, l, L, j), dxv[j] * gv, dxmag[j] * std::fabs(gv));
          if (c.gate == Mod::kToken) {
            check("dgate", side, r * D + j, dgate_t.at(b, l, L, j), dxv[j] * rv, dxmag[j] * std::fabs(rv));
          } else {
            sg[b * D + j] += dxv[j] * rv;
            mg[b * D + j] += dxmag[j] * std::fabs(rv);
          }
        }
      }
    }
  }
  for (int64_t j = 0; j < D; ++j) {
    if (c.weight) check_sum("dweight", j, dweight.at(j), sw[j], mw[j], R);
    if (c.bias) check_sum("dbias", j, dbias.at(j), sb[j], mb[j], R);
  }
  for (int64_t e = 0; e < B * D; ++e) {
    if (dshift_s.count) check_sum("dshift", e, dshift_s.at(e), ssh[e], msh[e], L);
    if (dscale_s.count) check_sum("dscale", e, dscale_s.at(e), ssc[e], msc[e], L);
    if (dgate_s.count) check_sum("dgate", e, dgate_s.at(e), sg[e], mg[e], L);
  }
  // Every output written, nothing outside.
  for (Rows* t : {&h, &out, &dx, &dres, &dgate_t, &dscale_t}) {
    if (t->present() && t->buf.untouched()) found.flag("an output element never written (%zu)", t->buf.untouched());
    if (t->present() && t->buf.stray()) found.flag("a store outside an output");
  }
  for (Buffer* s : sums) {
    if (s->count && s->untouched()) found.flag("a column sum never written");
    if (s->count && s->stray()) found.flag("a store outside a column sum");
  }
  if (norm && (!std::isnan(mean.front()) || !std::isnan(mean.back()) || !std::isnan(rstd.front()) ||
               !std::isnan(rstd.back()))) {
    found.flag("a store outside mean or rstd");
  }
  for (int q = 0; q < genkernels::kAdalnQuantities; ++q) {
    if (partials[q].empty()) continue;
    if (!std::isnan(partials[q].front()) || !std::isnan(partials[q].back())) found.flag("a store outside the partials");
    for (size_t i = 1; i + 1 < partials[q].size(); ++i) {
      if (std::isnan(partials[q][i])) {
        found.flag("partial %zu of quantity %d never written", i - 1, q);
        break;
      }
    }
  }

  char buf[320];
  snprintf(buf, sizeof buf,
           "vec %d %d group %d %d slots %d %d count %d %d blocks %u %lld chunks %d sums %d; max |err| / tol %.3g", fvec,
           bvec, fa.s.group, ba.s.group, fa.s.slots, ba.s.slots, fa.s.count, ba.s.count, fblocks,
           static_cast<long long>(bblocks), ba.s.chunks, quantities, found.worst);
  return found.outcome(label, buf);
}

struct Shape {
  int B, L, D, pad;
  bool misalign;
};

// Groups of 32 (4 rows a block: D 72 at 8 a vector, 33 scalars), 64 and 128 threads and 1024 scalar
// threads with 3 scalars each (D 2500); L = 1; several chunks per sample (L 40 with column sums); padded
// rows that keep the vectors (pad 8) or break them (pad 1), a misaligned x, odd D; DiT-XL's D = 1152 (the
// forward's 64 threads of 3 vectors, the third on 16 of them).
const Shape kShapes[] = {
    {2, 3, 72, 0, false},  {1, 1, 72, 8, false},   {2, 40, 64, 0, false}, {2, 5, 33, 0, false},
    {2, 6, 1000, 0, false}, {1, 21, 256, 1, false}, {3, 2, 512, 8, true},  {1, 37, 40, 0, false},
    {2, 3, 1152, 0, false},
};

std::vector<Case> make_cases() {
  std::vector<Case> cases;
  int k = 0;
  const Mod mods[] = {Mod::kSample, Mod::kToken, Mod::kAbsent};
  for (const int dtype : {kF32, kF16, kBF16}) {
    for (const Op op : {Op::kNorm, Op::kFused, Op::kGate}) {
      for (const Shape& s : kShapes) {
        Case c{};
        c.dtype = dtype;
        c.op = op;
        c.rms = op != Op::kGate && k % 3 == 1;
        c.weight = op != Op::kGate && k % 4 != 3;
        c.bias = op != Op::kGate && !c.rms && k % 5 != 2;
        c.shift = op != Op::kGate ? mods[k % 3] : Mod::kAbsent;
        c.scale = op != Op::kGate ? mods[(k / 3) % 3] : Mod::kAbsent;
        c.gate = op != Op::kNorm ? mods[k % 2] : Mod::kAbsent;
        c.side32 = dtype != kF32 && k % 4 == 1;
        c.B = s.B, c.L = s.L, c.D = s.D, c.pad = s.pad, c.misalign = s.misalign;
        c.dh = op == Op::kFused && k % 2 == 0;
        c.far = op != Op::kGate && k % 7 == 3;
        c.param16 = dtype != kF32 && (c.weight || c.bias) && k % 3 == 2;
        cases.push_back(c);
        ++k;
      }
    }
  }
  // Every column sum at once, over several chunks, per dtype; the widest rows.
  for (const int dtype : {kF32, kF16, kBF16}) {
    Case c{dtype, Op::kFused, false, true, true, Mod::kSample, Mod::kSample, Mod::kSample, false, 2, 40, 96, 0,
           false, true, false};
    cases.push_back(c);
    c.D = 4096, c.L = 2, c.B = 1, c.shift = Mod::kToken;
    cases.push_back(c);
  }
  cases.push_back(Case{kF32, Op::kNorm, false, true, true, Mod::kSample, Mod::kToken, Mod::kAbsent, false, 1, 2,
                       2000, 1, false, false, false});
  // No gate: a pre-norm transformer's residual add and RMSNorm (vectors, with and without dh; scalars), and
  // the plain residual alone.
  for (const int dtype : {kF32, kF16, kBF16}) {
    cases.push_back(Case{dtype, Op::kFused, true, true, false, Mod::kAbsent, Mod::kAbsent, Mod::kAbsent, false, 2, 3,
                         512, 0, false, dtype != kF16, false, dtype == kBF16});
    cases.push_back(Case{dtype, Op::kFused, false, false, false, Mod::kSample, Mod::kToken, Mod::kAbsent, false, 2,
                         5, 33, 0, false, true, false});
    cases.push_back(Case{dtype, Op::kGate, false, false, false, Mod::kAbsent, Mod::kAbsent, Mod::kAbsent, false, 2,
                         3, 72, 0, false, false, false});
  }
  cases.push_back(Case{kBF16, Op::kFused, true, true, false, Mod::kToken, Mod::kSample, Mod::kToken, true, 2, 2,
                       2500, 1, false, true, true});
  return cases;
}

}  // namespace

int main(int argc, char** argv) { return driver::run_driver(argc, argv, make_cases(), 9100u, run); }
