// Runs the fused sampler-step kernels of genkernels/schedule_step.cuh, the same source that
// csrc/schedule.cu compiles with nvcc, on the CPU under the SIMT emulator of simt.h, and checks
// prev, x0 and the guidance-rescale factor against a float64 reference, on cases that cover the
// kernels' paths: no model output, unguided, guided and guided with rescale (the two statistics
// kernels, with one chunk per sample as the host plans small tensors, and with many, more than a
// warp's worth); scalar and per-sample coefficients; clipping; x0 returned or not; x0_prev; noise
// from a tensor, from the in-kernel Philox stream (seed given by value or in an int64 tensor) or
// none; fp32, fp16, bf16 and mixed input dtypes; 16-byte vectors and the scalar path (misaligned
// pointers, N not a multiple of the vector width); one block striding over the whole tensor and
// one thread per vector; NaN and +-inf model outputs under clipping (a NaN x0 stays NaN).
//
//   schedule_step_emu [--jobs N] [--case SUBSTRING]
//
// prints "CASES <cases>", then one line per case:
//   RESULT ok|FAIL <case> | <largest error relative to its tolerance>; <first bad element>
// and "PASSED" or "FAILED <count>"; the exit status is 0 when every case passes, 1 when one
// fails, 2 when the emulator stops on a broken rule of the execution model (message on stderr),
// e.g. a load outside the input buffers.
//
// The launch choices replicate csrc/schedule.cu: 16-byte vectors for the step kernel when every
// tensor has the sample's dtype, is 16-byte aligned and N is a multiple of the vector width, else
// one element a thread; the statistics kernel vectorizes on the model output alone.
//
// Tolerances, per element, from the kernel's arithmetic: the inputs are exact (the reference
// decodes the same bits), the float32 pipeline (guidance, x0, clamp, eps, prev: about ten
// roundings) errs by at most 2^-20 of the magnitude m (the same expression with every term taken
// in absolute value), and the output is rounded once to the sample's dtype (unit roundoff u:
// 2^-24, 2^-11 or 2^-8, plus half the smallest fp16 subnormal):
//   |got - ref| <= u |ref| + 2^-20 m + 2^-25.
// The rescale factor is checked against a two-pass float64 standard deviation to 2^-16 relative,
// and the elementwise reference then uses the kernel's factor. Noise-only cases (every
// coefficient 0 but cn = 1) must reproduce the host Philox stream of genkernels/philox.cuh
// bit for bit, rounded to the output dtype.
#include "simt.h"
#include "driver.h"

// Its "#pragma unroll" are for nvcc (compile with -Wno-unknown-pragmas under -Wall).
#include "genkernels/schedule_step.cuh"

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
using genkernels::Coef;
using genkernels::StepArgs;

constexpr int kCoeffs = 9;  // px, po, ex, e0, cx, c0, ce, cn, cp

enum class Model { kNone, kPlain, kGuided, kRescale };
enum class Noise { kNone, kTensor, kPhilox, kPhiloxSeedTensor };

struct Case {
  int dtype, mo_dtype, noise_dtype, x0_prev_dtype;
  int B, N;
  bool misalign;  // every tensor one element past a 16-byte boundary: the scalar path
  Model model;
  Noise noise;
  bool per_sample, clip, want_x0, x0_prev;
  int64_t chunk_vectors;  // rescale statistics: vectors per chunk
  unsigned max_blocks;    // cap on the step kernel's grid (1: one block strides over everything)
  bool noise_only;        // every coefficient 0 but cn = 1: prev is the noise itself
  bool nonfinite;         // model output elements 1, 2, 3 are NaN, +inf, -inf (unguided, clipped)
  uint64_t seed, offset;

  std::string name() const {
    static const char* const models[] = {"no-model", "plain", "guided", "rescale"};
    static const char* const noises[] = {"no-noise", "noise-tensor", "philox", "philox-seed-tensor"};
    char buf[256];
    snprintf(buf, sizeof buf, "%s mo:%s noise:%s x0p:%s B%d N%d%s %s %s%s%s%s%s%s%s chunk%lld grid<=%u seed%llx off%llx",
             dtype_name(dtype), dtype_name(mo_dtype), dtype_name(noise_dtype), dtype_name(x0_prev_dtype), B, N,
             misalign ? " misaligned" : "", models[static_cast<int>(model)], noises[static_cast<int>(noise)],
             per_sample ? " per-sample" : " scalar", clip ? " clip" : "", want_x0 ? " x0" : "",
             x0_prev ? " x0_prev" : "", noise_only ? " noise-only" : "", nonfinite ? " nonfinite" : "",
             static_cast<long long>(chunk_vectors),
             max_blocks, static_cast<unsigned long long>(seed), static_cast<unsigned long long>(offset));
    return buf;
  }
};

using simt::Outcome;

Outcome run(const Case& c, unsigned seed) {
  std::mt19937 rng(seed);
  const int64_t total = int64_t{c.B} * c.N;
  const bool guided = c.model == Model::kGuided || c.model == Model::kRescale;
  const bool rescale = c.model == Model::kRescale;
  const bool has_mo = c.model != Model::kNone;
  const bool philox = c.noise == Noise::kPhilox || c.noise == Noise::kPhiloxSeedTensor;
  const bool has_noise = c.noise != Noise::kNone;
  const float guidance = guided ? 4.5f : 0.f, phi = 0.7f, clip = 1.f;

  Buffer x, mo, noise, x0p, prev, x0;
  x.init(c.dtype, total, c.misalign);
  mo.init(c.mo_dtype, (guided ? 2 : 1) * total, c.misalign);
  noise.init(c.noise_dtype, total, c.misalign);
  x0p.init(c.x0_prev_dtype, total, c.misalign);
  prev.init(c.dtype, total, c.misalign);
  x0.init(c.dtype, total, c.misalign);
  x.fill(rng, 1.f);
  mo.fill(rng, 1.5f);
  noise.fill(rng, 1.f);
  x0p.fill(rng, 1.f);
  if (c.nonfinite) mo.set(1, NAN), mo.set(2, INFINITY), mo.set(3, -INFINITY);

  // Coefficients: scalars, and with per_sample every other one a (B,) array (both kinds in one launch).
  std::uniform_real_distribution<float> coef(-1.5f, 1.5f);
  float value[kCoeffs];
  std::vector<std::vector<float>> array(kCoeffs);
  bool is_array[kCoeffs];
  for (int k = 0; k < kCoeffs; ++k) {
    value[k] = c.noise_only ? (k == 7 ? 1.f : 0.f) : coef(rng);
    is_array[k] = c.per_sample && k % 2 == static_cast<int>(seed % 2);
    array[k].resize(c.B);
    for (float& v : array[k]) v = coef(rng);
  }
  auto coefficient = [&](int k, int64_t b) { return is_array[k] ? array[k][b] : value[k]; };

  std::vector<simt::Range> global;
  auto reg = [&global](const void* p, size_t bytes) { simt::register_global(global, p, bytes); };
  reg(x.data(), x.bytes());
  if (has_mo) reg(mo.data(), mo.bytes());
  if (c.noise == Noise::kTensor) reg(noise.data(), noise.bytes());
  if (c.x0_prev) reg(x0p.data(), x0p.bytes());
  for (int k = 0; k < kCoeffs; ++k) {
    if (is_array[k]) reg(array[k].data(), array[k].size() * sizeof(float));
  }
  const long long seed_tensor = static_cast<long long>(c.seed);
  if (c.noise == Noise::kPhiloxSeedTensor) reg(&seed_tensor, sizeof seed_tensor);

  StepArgs a{};
  a.x = x.data();
  a.mo = has_mo ? mo.data() : nullptr;
  a.noise = c.noise == Noise::kTensor ? noise.data() : nullptr;
  a.x0_prev = c.x0_prev ? x0p.data() : nullptr;
  a.prev = prev.data();
  a.x0 = c.want_x0 ? x0.data() : nullptr;
  Coef* coefs[kCoeffs] = {&a.px, &a.po, &a.ex, &a.e0, &a.cx, &a.c0, &a.ce, &a.cn, &a.cp};
  for (int k = 0; k < kCoeffs; ++k) {
    coefs[k]->value = value[k];
    coefs[k]->per_sample = is_array[k] ? array[k].data() : nullptr;
  }
  a.n = c.N;
  a.total = total;
  // A seed given in a tensor travels by pointer; the value passed alongside must then be ignored.
  a.seed = c.noise == Noise::kPhiloxSeedTensor ? ~c.seed : c.seed;
  a.seed_ptr = c.noise == Noise::kPhiloxSeedTensor ? &seed_tensor : nullptr;
  a.offset = c.offset;
  a.mo_dtype = c.mo_dtype;
  a.noise_dtype = c.noise_dtype;
  a.x0_prev_dtype = c.x0_prev_dtype;
  a.guidance = guidance;
  a.clip = clip;
  a.guided = guided;
  a.clipped = c.clip;
  a.philox = philox;

  const std::string label = c.name();
  std::vector<float> factor;
  if (rescale) {
    const int svec = driver::vector_width(c.mo_dtype, c.N, {a.mo});
    const int64_t sample_vectors = c.N / svec;
    const int64_t chunks = std::max<int64_t>(1, (sample_vectors + c.chunk_vectors - 1) / c.chunk_vectors);
    std::vector<float4> partials(c.B * chunks, make_float4(NAN, NAN, NAN, NAN));  // unwritten: NaN factor
    const auto blocks = static_cast<unsigned>(c.B * chunks);
    genkernels::with_vector(c.mo_dtype, svec, [&](auto d, auto v) {
      simt::launch(blocks, genkernels::kThreads, 0, {}, global, label + " (stats)", [&] {
        genkernels::rescale_stats_kernel<decltype(d), decltype(v)::value>(a.mo, partials.data(), c.N, total,
                                                                          c.chunk_vectors, chunks, guidance);
      });
    });
    factor.assign(c.B + 2, NAN);  // a NaN guard each side
    simt::launch(static_cast<unsigned>(c.B), 32, 0, {}, global, label + " (factor)", [&] {
      genkernels::rescale_factor_kernel(partials.data(), factor.data() + 1, c.N, c.chunk_vectors * svec, chunks, phi);
    });
    a.factor = factor.data() + 1;
    reg(a.factor, c.B * sizeof(float));
  }
  a.per_sample = c.per_sample || a.factor != nullptr;

  const bool one_dtype = (!has_mo || c.mo_dtype == c.dtype) && (c.noise != Noise::kTensor || c.noise_dtype == c.dtype) &&
                         (!c.x0_prev || c.x0_prev_dtype == c.dtype);
  const int vec = one_dtype ? driver::vector_width(c.dtype, c.N, {a.x, a.mo, a.noise, a.x0_prev, a.prev, a.x0}) : 1;
  const int64_t vectors = total / vec;
  const auto grid = static_cast<unsigned>(
      std::min<int64_t>((vectors + genkernels::kThreads - 1) / genkernels::kThreads, c.max_blocks));
  genkernels::with_vector(c.dtype, vec, [&](auto d, auto v) {
    simt::launch(grid, genkernels::kThreads, 0, {}, global, label,
                 [&] { genkernels::schedule_step_kernel<decltype(d), decltype(v)::value>(a); });
  });

  // float64 reference.
  driver::Findings found;
  if (rescale) {
    for (int b = 0; b < c.B; ++b) {
      double mean_c = 0, mean_g = 0;
      std::vector<double> cond(c.N), out(c.N);
      for (int j = 0; j < c.N; ++j) {
        const double u = mo.at(b * c.N + j), cv = mo.at(total + b * c.N + j);
        cond[j] = cv;
        out[j] = u + double{guidance} * (cv - u);
        mean_c += cond[j] / c.N;
        mean_g += out[j] / c.N;
      }
      double var_c = 0, var_g = 0;
      for (int j = 0; j < c.N; ++j) {
        var_c += (cond[j] - mean_c) * (cond[j] - mean_c);
        var_g += (out[j] - mean_g) * (out[j] - mean_g);
      }
      const double want = phi * std::sqrt(var_c / var_g) + (1 - phi);
      const double tol = std::ldexp(1.0, -16) * std::fabs(want);
      const double e = std::fabs(a.factor[b] - want);
      if (!(e <= tol)) found.flag("factor[%d] = %.9g, want %.9g (tol %.3g)", b, a.factor[b], want, tol);
      found.worst = std::max(found.worst, driver::ratio(e, tol));
    }
    if (!std::isnan(factor.front()) || !std::isnan(factor.back())) found.flag("a store outside factor");
  }
  auto check = [&](const char* what, int64_t e, double got, double want, double magnitude) {
    if (std::isnan(want)) {  // a NaN model output stays NaN through the clamp, as in torch.clamp
      if (!std::isnan(got)) found.flag("%s[%lld] = %.9g, want NaN", what, static_cast<long long>(e), got);
      return;
    }
    found.check(what, c.dtype, e, e / c.N, got, want, magnitude);
  };
  for (int64_t e = 0; e < total; ++e) {
    const int64_t b = e / c.N;
    const double xv = x.at(e);
    double out = 0, out_m = 0;
    if (has_mo) {
      const double u = mo.at(e);
      out = u, out_m = std::fabs(u);
      if (guided) {
        const double cv = mo.at(total + e);
        out = u + double{guidance} * (cv - u);
        out_m = std::fabs(u) + std::fabs(guidance) * (std::fabs(cv) + std::fabs(u));
      }
      if (rescale) out *= a.factor[b], out_m *= std::fabs(a.factor[b]);
    }
    const double px = coefficient(0, b), po = coefficient(1, b), ex = coefficient(2, b), e0 = coefficient(3, b);
    const double cx = coefficient(4, b), c0 = coefficient(5, b), ce = coefficient(6, b), cn = coefficient(7, b);
    const double cp = coefficient(8, b);
    double v = px * xv + po * out;
    const double v_m = std::fabs(px * xv) + std::fabs(po) * out_m;
    if (c.clip && !std::isnan(v)) v = std::min(std::max(v, -double{clip}), double{clip});
    const double eps = ex * xv + e0 * v;
    const double eps_m = std::fabs(ex * xv) + std::fabs(e0) * v_m;
    double p = cx * xv + c0 * v + ce * eps;
    double p_m = std::fabs(cx * xv) + std::fabs(c0) * v_m + std::fabs(ce) * eps_m;
    double z = 0;
    if (c.noise == Noise::kTensor) z = noise.at(e);
    if (philox) z = genkernels::philox_normal(c.seed, c.offset, static_cast<uint64_t>(e));
    if (has_noise) p += cn * z, p_m += std::fabs(cn * z);
    if (c.x0_prev) {
      const double xp = x0p.at(e);
      p += cp * xp, p_m += std::fabs(cp * xp);
    }
    if (c.noise_only) {
      // prev = 1 * z + 0 exactly in float32, then rounded to the dtype: the host stream, bit for bit.
      const uint32_t want = encode(c.dtype, genkernels::philox_normal(c.seed, c.offset, static_cast<uint64_t>(e)));
      if (prev.bits(e) != want) {
        found.flag("noise[%lld] = %.9g, want %.9g (host Philox)", static_cast<long long>(e), prev.at(e),
             decode(c.dtype, want));
      }
    } else {
      check("prev", e, prev.at(e), p, p_m);
    }
    if (c.want_x0) check("x0", e, x0.at(e), v, v_m);
  }
  if (const size_t n = prev.untouched()) found.flag("%zu elements of prev never written", n);
  if (c.want_x0) {
    if (const size_t n = x0.untouched()) found.flag("%zu elements of x0 never written", n);
  } else if (x0.untouched() != static_cast<size_t>(total)) {
    found.flag("x0 written though not wanted");
  }
  if (prev.stray() || x0.stray()) found.flag("a store outside prev or x0");

  char buf[200];
  snprintf(buf, sizeof buf, "vec %d grid %u; max |err| / tol %.3g", vec, grid, found.worst);
  return found.outcome(label, buf);
}

// Dtype pairings: (sample, model output, noise, x0_prev).
constexpr int kF32 = genkernels::kFloat32, kF16 = genkernels::kFloat16, kBF16 = genkernels::kBFloat16;
const int kDtypes[][4] = {
    {kF32, kF32, kF32, kF32},   {kF16, kF16, kF16, kF16},   {kBF16, kBF16, kBF16, kBF16},
    {kF16, kF32, kBF16, kF32},  // mixed: the scalar step, the model output's own stats vectors
    {kBF16, kF16, kF32, kF16},  {kF32, kBF16, kF16, kBF16},
};

struct Shape {
  int B, N;
  bool misalign;
};

// 16-byte vectors for every dtype (N = 48); N a multiple of 4 but not 8 (fp32 vectors, 16-bit
// scalars); odd N; misaligned pointers; N = 1 elements per sample would make the std NaN and is
// left to the Python tests.
const Shape kShapes[] = {{2, 48, false}, {2, 12, false}, {3, 197, false}, {2, 40, true}};

const uint64_t kSeeds[] = {0, 42, 0xfedcba9876543210ull, 0x8000000000000003ull};  // high words, sign bit
const uint64_t kOffsets[] = {0, 7, (uint64_t{1} << 33) + 5, ~uint64_t{0}};

std::vector<Case> make_cases() {
  std::vector<Case> cases;
  int group = 0;
  for (const auto& dt : kDtypes) {
    for (const Shape& s : kShapes) {
      for (int i = 0; i < 16; ++i) {
        Case c{};
        c.dtype = dt[0], c.mo_dtype = dt[1], c.noise_dtype = dt[2], c.x0_prev_dtype = dt[3];
        c.B = s.B, c.N = s.N, c.misalign = s.misalign;
        c.model = static_cast<Model>(i % 4);
        c.noise = static_cast<Noise>(i / 4);
        // The binary options run through all 16 patterns, shifted per group so that each meets
        // every model and noise kind across the groups.
        const int bits = (i * 7 + group * 3) % 16;
        c.per_sample = bits & 1, c.clip = bits & 2, c.want_x0 = bits & 4, c.x0_prev = bits & 8;
        // Rescale statistics in one chunk per sample (as the host plans tensors this small) or
        // in three, the last one partial where N does not divide evenly.
        const int mo_vec = c.mo_dtype == kF32 ? 4 : 8;
        const int64_t sample_vectors = !s.misalign && s.N % mo_vec == 0 ? s.N / mo_vec : s.N;
        c.chunk_vectors = (i / 4 + group) % 2 == 0 ? genkernels::kThreads : (sample_vectors + 2) / 3;
        const unsigned grid_choices[] = {1, 2, 1u << 20};
        c.max_blocks = grid_choices[(i + 2 * group) % 3];
        c.seed = kSeeds[(i + group) % 4];
        c.offset = kOffsets[(i / 4 + group) % 4];
        cases.push_back(c);
      }
      ++group;
    }
  }
  // Rescale statistics with more chunks per sample than the factor kernel's warp has lanes (its
  // merge loop goes round twice), and with chunks longer than a block (the stats loop goes round
  // twice in a full chunk, once in the short last one), as the host plans for large tensors.
  struct Chunking {
    int dtype, B, N;
    int64_t chunk_vectors;
  };
  for (const Chunking& k : {Chunking{kF32, 1, 40, 1}, Chunking{kBF16, 2, 40, 1}, Chunking{kF16, 1, 999, 512}}) {
    Case c{};
    c.dtype = c.mo_dtype = c.noise_dtype = c.x0_prev_dtype = k.dtype;
    c.B = k.B, c.N = k.N, c.misalign = true;
    c.model = Model::kRescale;
    c.noise = Noise::kTensor;
    c.per_sample = c.clip = c.want_x0 = c.x0_prev = true;
    c.chunk_vectors = k.chunk_vectors;
    c.max_blocks = 1u << 20;
    c.seed = kSeeds[1], c.offset = kOffsets[1];
    cases.push_back(c);
  }
  // The noise alone, against the host stream: each dtype, vectors and scalars, seed by value and in a tensor.
  for (const int dtype : {kF32, kF16, kBF16}) {
    for (const Shape& s : {Shape{2, 64, false}, Shape{3, 37, true}}) {
      for (const Noise n : {Noise::kPhilox, Noise::kPhiloxSeedTensor}) {
        Case c{};
        c.dtype = c.mo_dtype = c.noise_dtype = c.x0_prev_dtype = dtype;
        c.B = s.B, c.N = s.N, c.misalign = s.misalign;
        c.model = Model::kNone;
        c.noise = n;
        c.noise_only = true;
        c.chunk_vectors = genkernels::kThreads;
        c.max_blocks = 1u << 20;
        c.seed = kSeeds[2 + (n == Noise::kPhilox)];
        c.offset = kOffsets[2 + s.misalign];
        cases.push_back(c);
      }
    }
  }
  // Non-finite model outputs, clipped: NaN stays NaN (x0 and prev), +-inf clamps to the bounds; vectors and scalars.
  for (const int dtype : {kF32, kF16, kBF16}) {
    for (const Shape& s : {Shape{2, 48, false}, Shape{2, 40, true}}) {
      Case c{};
      c.dtype = c.mo_dtype = c.noise_dtype = c.x0_prev_dtype = dtype;
      c.B = s.B, c.N = s.N, c.misalign = s.misalign;
      c.model = Model::kPlain;
      c.noise = Noise::kNone;
      c.clip = c.want_x0 = c.nonfinite = true;
      c.chunk_vectors = genkernels::kThreads;
      c.max_blocks = 1u << 20;
      cases.push_back(c);
    }
  }
  return cases;
}

}  // namespace

int main(int argc, char** argv) { return driver::run_driver(argc, argv, make_cases(), 2000u, run); }
