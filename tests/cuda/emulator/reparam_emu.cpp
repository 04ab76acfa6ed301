// Runs the reparameterization kernels of genkernels/reparam.cuh, the same source that
// csrc/reparam.cu compiles with nvcc, on the CPU under the SIMT emulator of simt.h, and checks z,
// the per-sample KL, dmean and dlogvar against a float64 reference, on cases that cover the
// kernels' paths: fp32, fp16 and bf16; 16-byte vectors and the scalar path (K not a multiple of the
// vector width, row padding that is not, pointers one element past a 16-byte boundary: every
// tensor, or the gradients alone so that the forward moves vectors and the backward scalars);
// layouts of mean and logvar (separate contiguous tensors, the two halves of contiguous moments
// with batch stride 2*R*K, the halves of channels_last moments with row stride 2*K, padded rows and
// samples, a mean broadcast over the batch with batch stride 0), the gradients written into the same
// kind of layout; B = 1, R = 1, odd K; noise from a tensor, from the in-kernel Philox stream (seed
// by value or in an int64 tensor) or none (deterministic); the KL wanted or not; chunks of one per
// sample, several with a partial last one, more than a warp's worth (the merge loop goes round
// twice), and chunks longer than a block's step (each thread walks several vectors, carrying across
// rows); dz or dkl absent; dmean, dlogvar or both wanted; logvar at and beyond the clamp's bounds.
//
//   reparam_emu [--jobs N] [--case SUBSTRING]
//
// prints "CASES <cases>", then one line per case:
//   RESULT ok|FAIL <case> | vec <forward> <backward> chunks <per sample>; <largest error relative
//   to its tolerance>; <first bad element>
// and "PASSED" or "FAILED <count>"; the exit status is 0 when every case passes, 1 when one
// fails, 2 when the emulator stops on a broken rule of the execution model (message on stderr),
// e.g. a load outside the input buffers.
//
// The launch choices replicate csrc/reparam.cu: 16-byte vectors when K and the strides in use are
// multiples of the vector width and every pointer in use is 16-byte aligned, else one element a
// thread; strides of a size-1 batch or row dim passed as 0. The chunk length is the case's own
// (csrc/reparam.cu would pick 2048 elements for every tensor this small).
//
// Tolerances, from the kernels' arithmetic: the inputs are exact (the reference decodes the same
// bits, and the in-kernel eps is the host Philox stream of genkernels/philox.cuh, bit for bit on
// the emulator); expf and expm1f are the C library's here (within an ulp or two; CUDA's are within
// two), and each output goes through a handful of float32 roundings, together at most 2^-20 of
// the magnitude m (the expression with every term taken in absolute value), then one rounding to
// the dtype (unit roundoff u: 2^-24, 2^-11 or 2^-8, plus half the smallest fp16 subnormal):
//   |got - ref| <= u |ref| + 2^-20 m + 2^-25,
// an output that rounds to the same dtype value (an fp16 overflow to inf included) passing as is.
// dlogvar outside the clamp's range must be exactly 0. The KL, a float32 sum of terms that are
// never negative, errs by at most 2^-24 (d + 8) of the sum of the terms' magnitudes, d the depth
// of its summation (a thread's sequential adds, the block's two warp butterflies, the merge).
// Stream-only cases (mean 0, logvar 0: z = 0 + 1 * eps exactly) must reproduce the host stream bit
// for bit, rounded to the dtype.
#include "simt.h"
#include "driver.h"

// Its "#pragma unroll" are for nvcc (compile with -Wno-unknown-pragmas under -Wall).
#include "genkernels/reparam.cuh"

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
using genkernels::ReparamBackwardArgs;
using genkernels::ReparamForwardArgs;
using genkernels::ReparamShape;
using genkernels::View;

constexpr int kThreads = genkernels::kReparamThreads;

enum class Noise { kTensor, kPhilox, kPhiloxSeedTensor, kDeterministic };
enum class Layout { kSeparate, kMomentsFirst, kMomentsLast, kPadded8, kPadded3, kBroadcast };
enum class Grads { kBoth, kMean, kLogvar };
enum class Misalign { kNone, kAll, kGrads };  // tensors one element past a 16-byte boundary

struct Case {
  int dtype;
  int B, R, K;
  Layout layout;
  Noise noise;
  Grads grads;
  bool dz, dkl, want_kl;
  Misalign misalign;
  bool stream_only;  // mean 0, logvar 0: z is the noise itself
  int64_t chunk;     // elements per chunk (a multiple of 8)
  uint64_t seed, offset;

  std::string name() const {
    static const char* const layouts[] = {"separate", "moments-first", "moments-last", "padded8", "padded3",
                                          "broadcast"};
    static const char* const noises[] = {"noise-tensor", "philox", "philox-seed-tensor", "deterministic"};
    static const char* const grad_names[] = {"d:both", "d:mean", "d:logvar"};
    char buf[256];
    snprintf(buf, sizeof buf, "%s B%d R%d K%d %s %s %s%s%s%s%s%s chunk%lld seed%llx off%llx", dtype_name(dtype), B, R,
             K, layouts[static_cast<int>(layout)], noises[static_cast<int>(noise)], grad_names[static_cast<int>(grads)],
             dz ? "" : " no-dz", dkl ? "" : " no-dkl", want_kl ? " kl" : " no-kl",
             misalign == Misalign::kAll ? " misaligned" : misalign == Misalign::kGrads ? " misaligned-grads" : "",
             stream_only ? " stream-only" : "", static_cast<long long>(chunk), static_cast<unsigned long long>(seed),
             static_cast<unsigned long long>(offset));
    return buf;
  }
};

int64_t round_up8(int64_t v) { return (v + 7) / 8 * 8; }

// Where mean and logvar (or dmean and dlogvar) sit in one buffer: offsets and (batch, row) strides.
struct Placement {
  int64_t mean_off, mb, mr;
  int64_t logvar_off, lb, lr;
  int64_t size;
};

Placement place(Layout layout, int64_t B, int64_t R, int64_t K) {
  const int64_t n = R * K;
  switch (layout) {
    case Layout::kMomentsFirst:  // (B, 2, R*K) moments: halves at 0 and R*K, batch stride 2*R*K
      return {0, 2 * n, K, n, 2 * n, K, 2 * B * n};
    case Layout::kMomentsLast:  // (B, R, 2K) moments (channels_last): halves at 0 and K, row stride 2K
      return {0, 2 * n, 2 * K, K, 2 * n, 2 * K, 2 * B * n};
    case Layout::kPadded8: {  // padded rows and samples, pads of multiples of 8 (vectors still possible)
      const int64_t mb = R * (K + 8) + 16, lb = R * (K + 16) + 8;
      const int64_t lo = round_up8(B * mb) + 8;
      return {0, mb, K + 8, lo, lb, K + 16, lo + B * lb};
    }
    case Layout::kPadded3: {  // odd pads: the scalar path
      const int64_t mb = R * (K + 3) + 1, lb = R * (K + 5) + 2;
      const int64_t lo = B * mb + 3;
      return {0, mb, K + 3, lo, lb, K + 5, lo + B * lb};
    }
    case Layout::kBroadcast: {  // one mean for every sample (batch stride 0), logvar contiguous
      const int64_t lo = round_up8(n) + 8;
      return {0, 0, K, lo, n, K, lo + B * n};
    }
    default: {  // separate contiguous tensors
      const int64_t lo = round_up8(B * n) + 8;
      return {0, n, K, lo, n, K, lo + B * n};
    }
  }
}

// logvar values: mostly N(0, 2), every seventh one from this list: the clamp's bounds (its
// gradient passes there) and values beyond them (clamped, gradient 0).
const float kLogvarEdges[] = {-30.f, 20.f, -31.f, 20.5f, -45.f, 27.f, -29.5f, 19.75f};

using simt::Outcome;

Outcome run(const Case& c, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int64_t B = c.B, R = c.R, K = c.K, n = R * K, total = B * n;
  const int64_t chunks = (n + c.chunk - 1) / c.chunk;
  const bool philox = c.noise == Noise::kPhilox || c.noise == Noise::kPhiloxSeedTensor;
  const bool deterministic = c.noise == Noise::kDeterministic;
  const bool want_dmean = c.grads != Grads::kLogvar, want_dlogvar = c.grads != Grads::kMean;

  // Inputs: mean and logvar in one buffer (their layout), noise and dz contiguous, dkl float32.
  const Placement in_place = place(c.layout, B, R, K);
  const Placement out_place = place(c.layout == Layout::kBroadcast ? Layout::kSeparate : c.layout, B, R, K);
  Buffer in, noise, dz, z, grads;
  const bool shift = c.misalign == Misalign::kAll;
  in.init(c.dtype, in_place.size, shift);
  noise.init(c.dtype, total, shift);
  dz.init(c.dtype, total, shift);
  z.init(c.dtype, total, shift);
  grads.init(c.dtype, out_place.size, c.misalign != Misalign::kNone);
  for (int64_t i = 0; i < in_place.size; ++i) in.set(i, 1.5f * normal(rng));
  auto mean_at = [&](const Placement& p, int64_t b, int64_t r, int64_t k) {
    return p.mean_off + b * p.mb + r * p.mr + k;
  };
  auto logvar_at = [&](const Placement& p, int64_t b, int64_t r, int64_t k) {
    return p.logvar_off + b * p.lb + r * p.lr + k;
  };
  int edge = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t k = 0; k < K; ++k) {
        float lv = 2.f * normal(rng);
        if (rng() % 7 == 0) lv = kLogvarEdges[edge++ % 8];
        in.set(logvar_at(in_place, b, r, k), c.stream_only ? 0.f : lv);
        if (c.stream_only) in.set(mean_at(in_place, b, r, k), 0.f);
      }
    }
  }
  for (int64_t i = 0; i < total; ++i) noise.set(i, normal(rng));
  for (int64_t i = 0; i < total; ++i) dz.set(i, normal(rng));
  std::uniform_real_distribution<float> coef(-1.5f, 1.5f);
  std::vector<float> dkl(B);
  for (float& v : dkl) v = coef(rng);
  // kl and the partials with a NaN guard each side; NaN where never written.
  std::vector<float> kl(B + 2, NAN), partials(B * chunks + 2, NAN);
  const long long seed_tensor = static_cast<long long>(c.seed);

  std::vector<simt::Range> global;
  auto reg = [&global](const void* p, size_t bytes) { simt::register_global(global, p, bytes); };
  reg(in.data(), in.bytes());
  if (c.noise == Noise::kTensor) reg(noise.data(), noise.bytes());
  if (c.dz) reg(dz.data(), dz.bytes());
  if (c.dkl) reg(dkl.data(), dkl.size() * sizeof(float));
  if (c.noise == Noise::kPhiloxSeedTensor) reg(&seed_tensor, sizeof seed_tensor);

  // Strides of a size-1 dim are passed as 0, as csrc/reparam.cu does.
  auto nb = [&](int64_t s) { return B > 1 ? s : 0; };
  auto nr = [&](int64_t s) { return R > 1 ? s : 0; };
  ReparamShape s{};
  s.rows = R;
  s.cols = K;
  s.n = n;
  s.chunk = c.chunk;
  s.chunks = chunks;
  s.noise = c.noise == Noise::kTensor ? noise.data() : nullptr;
  // A seed given in a tensor travels by pointer; the value passed alongside must then be ignored.
  s.seed = c.noise == Noise::kPhiloxSeedTensor ? ~c.seed : c.seed;
  s.seed_ptr = c.noise == Noise::kPhiloxSeedTensor ? &seed_tensor : nullptr;
  s.offset = c.offset;
  s.philox = philox;
  const View<const void*> mean_view{in.at_elem(in_place.mean_off), nb(in_place.mb), nr(in_place.mr)};
  const View<const void*> logvar_view{in.at_elem(in_place.logvar_off), nb(in_place.lb), nr(in_place.lr)};

  ReparamForwardArgs fa{};
  fa.s = s;
  fa.mean = mean_view;
  fa.logvar = logvar_view;
  fa.z = z.data();
  fa.partials = !c.want_kl ? nullptr : chunks > 1 ? partials.data() + 1 : kl.data() + 1;
  const int fvec = driver::vector_width(c.dtype, K, {fa.mean.data, fa.logvar.data, s.noise, fa.z},
                                {fa.mean.batch, fa.mean.row, fa.logvar.batch, fa.logvar.row});

  ReparamBackwardArgs ba{};
  ba.s = s;
  ba.mean = mean_view;
  ba.logvar = logvar_view;
  ba.dz = c.dz ? dz.data() : nullptr;
  ba.dkl = c.dkl ? dkl.data() : nullptr;
  ba.dmean = {want_dmean ? grads.at_elem(out_place.mean_off) : nullptr, nb(out_place.mb), nr(out_place.mr)};
  ba.dlogvar = {want_dlogvar ? grads.at_elem(out_place.logvar_off) : nullptr, nb(out_place.lb), nr(out_place.lr)};
  const bool read_mean = want_dmean && c.dkl;
  const bool read_noise = want_dlogvar && c.dz && s.noise != nullptr;
  const int bvec = driver::vector_width(
      c.dtype, K,
      {ba.dz, read_mean ? ba.mean.data : nullptr, want_dlogvar ? ba.logvar.data : nullptr,
       read_noise ? s.noise : nullptr, ba.dmean.data, ba.dlogvar.data},
      {read_mean ? ba.mean.batch : 0, read_mean ? ba.mean.row : 0, want_dlogvar ? ba.logvar.batch : 0,
       want_dlogvar ? ba.logvar.row : 0, ba.dmean.batch, ba.dmean.row, ba.dlogvar.batch, ba.dlogvar.row});

  const std::string label = c.name();
  const auto grid = static_cast<unsigned>(B * chunks);
  genkernels::with_vector(c.dtype, fvec, [&](auto d, auto v) {
    simt::launch(grid, kThreads, 0, {}, global, label + " (forward)",
                 [&] { genkernels::reparam_forward_kernel<decltype(d), decltype(v)::value>(fa); });
  });
  genkernels::with_vector(c.dtype, bvec, [&](auto d, auto v) {
    simt::launch(grid, kThreads, 0, {}, global, label + " (backward)",
                 [&] { genkernels::reparam_backward_kernel<decltype(d), decltype(v)::value>(ba); });
  });
  if (c.want_kl && chunks > 1) {
    simt::launch(static_cast<unsigned>(B), 32, 0, {}, global, label + " (kl merge)",
                 [&] { genkernels::kl_merge_kernel(partials.data() + 1, kl.data() + 1, chunks); });
  }

  // float64 reference.
  driver::Findings found;
  auto check = [&](const char* what, int64_t e, float got, double want, double magnitude) {
    if (decode(c.dtype, encode(c.dtype, static_cast<float>(want))) == got) return;  // same value in the dtype
    found.check(what, c.dtype, e, e / n, got, want, magnitude);
  };

  std::vector<char> expect_written(out_place.size, 0);
  for (int64_t b = 0; b < B; ++b) {
    double kl_ref = 0, kl_mag = 0;
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = (b * R + r) * K + k;
        const double m = in.at(mean_at(in_place, b, r, k));
        const double raw = in.at(logvar_at(in_place, b, r, k));
        const double lv = std::min(std::max(raw, -30.0), 20.0);
        const double sd = std::exp(0.5 * lv);
        double eps = 0;
        if (c.noise == Noise::kTensor) eps = noise.at(e);
        if (philox) eps = genkernels::philox_normal(c.seed, c.offset, static_cast<uint64_t>(e));
        if (c.stream_only) {
          const uint32_t want = encode(c.dtype, static_cast<float>(eps));
          if (z.bits(e) != want) found.flag("z[%lld] = %.9g, want %.9g (host Philox)", static_cast<long long>(e), z.at(e),
                                      decode(c.dtype, want));
        } else {
          check("z", e, z.at(e), m + sd * eps, std::fabs(m) + sd * std::fabs(eps));
        }
        kl_ref += 0.5 * (m * m + std::expm1(lv) - lv);
        kl_mag += 0.5 * (m * m + std::fabs(std::expm1(lv)) + std::fabs(lv));

        const double g = c.dz ? dz.at(e) : 0.0, dk = c.dkl ? dkl[b] : 0.0;
        if (want_dmean) {
          const int64_t at = mean_at(out_place, b, r, k);
          expect_written[at] = 1;
          check("dmean", e, grads.at(at), g + dk * m, std::fabs(g) + std::fabs(dk * m));
        }
        if (want_dlogvar) {
          const int64_t at = logvar_at(out_place, b, r, k);
          expect_written[at] = 1;
          if (raw >= -30.0 && raw <= 20.0) {
            const double noise_term = deterministic ? 0.0 : 0.5 * g * eps * sd;
            const double kl_term = 0.5 * dk * std::expm1(lv);
            check("dlogvar", e, grads.at(at), noise_term + kl_term, std::fabs(noise_term) + std::fabs(kl_term));
          } else if (grads.at(at) != 0.f) {
            found.flag("dlogvar[%lld] = %.9g at logvar %g, outside the clamp: want 0", static_cast<long long>(e),
                 grads.at(at), raw);
          }
        }
      }
    }
    if (c.want_kl) {
      const int64_t per_thread = (std::min(n, c.chunk) + int64_t{kThreads} * fvec - 1) / (int64_t{kThreads} * fvec);
      const double depth = static_cast<double>(per_thread * fvec + 10 + (chunks + 31) / 32 + 5);
      const double tol = std::ldexp(1.0, -24) * (depth + 8) * kl_mag;
      const double err = std::fabs(kl[b + 1] - kl_ref);
      if (!(err <= tol)) {
        found.flag("kl[%lld] = %.9g, want %.9g (tol %.3g)", static_cast<long long>(b), kl[b + 1], kl_ref, tol);
      }
      found.worst = std::max(found.worst, driver::ratio(err, tol));
    }
  }
  for (int64_t i = 0; i < total; ++i) {
    if (z.sentinel(i)) {
      found.flag("z[%lld] never written", static_cast<long long>(i));
      break;
    }
  }
  for (int64_t i = 0; i < out_place.size; ++i) {
    if (!expect_written[i] && !grads.sentinel(i)) {
      found.flag("gradient buffer element %lld written, though no wanted gradient sits there", static_cast<long long>(i));
      break;
    }
  }
  if (z.stray() || grads.stray()) found.flag("a store outside z or the gradients");
  if (!std::isnan(kl.front()) || !std::isnan(kl.back())) found.flag("a store outside kl");
  if (!c.want_kl && !std::all_of(kl.begin(), kl.end(), [](float v) { return std::isnan(v); })) {
    found.flag("kl written though not wanted");
  }
  if (!std::isnan(partials.front()) || !std::isnan(partials.back())) found.flag("a store outside the KL partials");

  char buf[200];
  snprintf(buf, sizeof buf, "vec %d %d chunks %lld; max |err| / tol %.3g", fvec, bvec, static_cast<long long>(chunks),
           found.worst);
  return found.outcome(label, buf);
}

constexpr int kF32 = genkernels::kFloat32, kF16 = genkernels::kFloat16, kBF16 = genkernels::kBFloat16;

struct Shape {
  int B, R, K;
};

// B = 1 with R = 1 and odd K; R = 1 with vectors of every width; small K with R > 1 (channels_last
// latents); K a multiple of 4 but not 8 (fp32 vectors, 16-bit scalars); odd K with more elements
// per sample than a block's step (threads walk twice, carrying across rows); a sample of two full
// fp16 vector steps; K = 24 with many rows (a step of 2048 or 1024 elements is not a whole number
// of rows: the walk carries).
const Shape kShapes[] = {{1, 1, 37}, {2, 1, 48}, {3, 5, 16}, {2, 7, 12}, {2, 3, 97}, {2, 16, 128}, {1, 200, 24}};

const uint64_t kSeeds[] = {0, 42, 0xfedcba9876543210ull, 0x8000000000000003ull};  // high words, sign bit
const uint64_t kOffsets[] = {0, 7, (uint64_t{1} << 33) + 5, ~uint64_t{0}};

// Chunk lengths: 2048 (what the host picks for tensors this small: one chunk, or a few for the
// larger shapes), about a third of a sample (three chunks, the last one partial), 8 elements where
// that makes more chunks than a warp has lanes (else 8192: one long chunk, several steps a thread).
int64_t chunk_for(int choice, int64_t n) {
  switch (choice) {
    case 0:
      return 2048;
    case 1:
      return round_up8((n + 2) / 3);
    case 2:
      return n > 32 * 8 && n <= 400 ? 8 : 8192;
    default:
      return 8192;
  }
}

std::vector<Case> make_cases() {
  std::vector<Case> cases;
  int group = 0;
  for (const int dtype : {kF32, kF16, kBF16}) {
    for (const Shape& s : kShapes) {
      for (int i = 0; i < 16; ++i) {
        Case c{};
        c.dtype = dtype;
        c.B = s.B, c.R = s.R, c.K = s.K;
        c.noise = static_cast<Noise>(i % 4);
        c.layout = static_cast<Layout>((i + group) % 6);
        c.grads = static_cast<Grads>((i / 2 + group) % 3);
        // The binary options run through all 16 patterns, shifted per group so that each meets
        // every noise kind and layout across the groups.
        const int bits = (i * 7 + group * 3) % 16;
        c.dz = !(bits & 1), c.dkl = !(bits & 2), c.want_kl = !(bits & 4);
        // Misaligned gradients alone (vectors in the forward, scalars in the backward) now and then.
        c.misalign = !(bits & 8) ? Misalign::kNone : (i + group) % 3 == 0 ? Misalign::kGrads : Misalign::kAll;
        c.chunk = chunk_for((i + 2 * group) % 4, int64_t{s.R} * s.K);
        c.seed = kSeeds[(i + group) % 4];
        c.offset = kOffsets[(i / 4 + group) % 4];
        cases.push_back(c);
      }
      ++group;
    }
  }
  // The noise alone, against the host stream: each dtype, vectors and scalars, seed by value and in a tensor.
  for (const int dtype : {kF32, kF16, kBF16}) {
    for (const Shape& s : {Shape{2, 4, 32}, Shape{3, 5, 7}}) {
      for (const Noise noise : {Noise::kPhilox, Noise::kPhiloxSeedTensor}) {
        Case c{};
        c.dtype = dtype;
        c.B = s.B, c.R = s.R, c.K = s.K;
        c.layout = Layout::kMomentsLast;
        c.noise = noise;
        c.grads = Grads::kBoth;
        c.dz = c.dkl = c.want_kl = true;
        c.stream_only = true;
        c.chunk = 2048;
        c.seed = kSeeds[2 + (noise == Noise::kPhilox)];
        c.offset = kOffsets[2 + (s.K % 2)];
        cases.push_back(c);
      }
    }
  }
  return cases;
}

}  // namespace

int main(int argc, char** argv) { return driver::run_driver(argc, argv, make_cases(), 3000u, run); }
