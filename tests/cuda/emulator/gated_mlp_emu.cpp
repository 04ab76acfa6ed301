// Runs the gelu_tanh and swiglu kernels of genkernels/gated_mlp.cuh, the same source that
// csrc/gated_mlp.cu compiles with nvcc, on the CPU under the SIMT emulator of simt.h, and checks y
// (forward) and dx (gradient map) against a float64 reference, on cases that cover the kernels' paths:
// fp32, fp16 and bf16; gelu_tanh over flat runs of 1 element to several blocks, with a scalar tail when n
// is not a multiple of the vector width; swiglu over (R, M) with M a multiple of every width, of 4 only
// (fp32 vectors, fp16 / bf16 scalars), odd, or 1; 16-byte vectors and the scalar path (pointers one
// element past a 16-byte boundary: every tensor, the output alone, or dy alone: vectors forward, scalars
// in the gradient); inputs of every size, every fifth one far out (|x| up to 1e4, and the negative tail
// where 1 + tanh u would cancel).
//
//   gated_mlp_emu [--jobs N] [--case SUBSTRING]
//
// prints "CASES <cases>", then one line per case:
//   RESULT ok|FAIL <case> | vec <forward> <grad> n <outputs>; <largest error relative to its tolerance>;
//   <bad count>; <first bad element>
// and "PASSED" or "FAILED <count>"; exit status 0 when every case passes, 1 when one fails, 2 when the
// emulator stops on a broken rule of the execution model.
//
// The launch choices replicate csrc/gated_mlp.cu: gelu_tanh takes 16-byte vectors when every pointer in use
// is 16-byte aligned (the tail one element at a time), swiglu when M is also a multiple of the width; else
// one element a thread; the grid of gated_mlp_blocks.
//
// Reference, in float64 on the decoded inputs: gelu_tanh y = 0.5 x (1 + tanh u) and its derivative from
// sech^2 u = 1 / cosh^2 u (0.5 (1 + tanh u) taken as sigmoid(2u), the same number without cancellation);
// swiglu a sigmoid(a) b and its two partial derivatives; a and b taken from their (row, half, column)
// coordinates. Tolerance: |got - ref| <= u |ref| + 2^-20 m + 2^-25, or got equal to ref rounded to the
// dtype, with m the expression's terms in absolute value and, for gelu_tanh, the sensitivity to the
// float32 rounding of u (the kernel's u carries a few ulp: m includes |dy/du| |u|). Sentinels around
// every output catch stray or missing stores.
#include "simt.h"
#include "driver.h"

#include "genkernels/gated_mlp.cuh"

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
using genkernels::GatedMlpArgs;

constexpr int kThreads = genkernels::kGatedMlpThreads;
constexpr int kF32 = genkernels::kFloat32, kF16 = genkernels::kFloat16, kBF16 = genkernels::kBFloat16;

enum class Misalign { kNone, kAll, kOut, kDy };

struct Case {
  int dtype;
  bool swiglu;
  int64_t rows, cols;  // gelu_tanh: n = cols (rows 1); swiglu: x (rows, 2, cols)
  bool large;
  Misalign misalign;

  std::string name() const {
    static const char* const tags[] = {"", " misaligned", " misaligned-out", " misaligned-dy"};
    char buf[160];
    if (swiglu) {
      snprintf(buf, sizeof buf, "%s swiglu R%lld M%lld%s%s", dtype_name(dtype), static_cast<long long>(rows),
               static_cast<long long>(cols), large ? " large" : "", tags[static_cast<int>(misalign)]);
    } else {
      snprintf(buf, sizeof buf, "%s gelu_tanh n%lld%s%s", dtype_name(dtype), static_cast<long long>(cols),
               large ? " large" : "", tags[static_cast<int>(misalign)]);
    }
    return buf;
  }
};

double sigmoid64(double z) { return z >= 0 ? 1 / (1 + std::exp(-z)) : std::exp(z) / (1 + std::exp(z)); }

constexpr double kBeta = 0.7978845608028654, kKappa = 0.044715;

// gelu_tanh(x), gelu_tanh'(x) and their magnitudes.
void gelu64(double x, double& y, double& ymag, double& g, double& gmag) {
  const double u = kBeta * (x + kKappa * x * x * x);
  const double du = kBeta * (1 + 3 * kKappa * x * x);
  const double half = sigmoid64(2 * u);  // 0.5 (1 + tanh u)
  const double ch = std::cosh(u);
  const double sech2 = std::isinf(ch) ? 0.0 : 1 / (ch * ch);
  const double umag = kBeta * (std::fabs(x) + kKappa * std::fabs(x * x * x));
  y = x * half;
  // dy/du = 0.5 x sech^2 u: the float32 u's rounding moves y by that times |u| times a few ulp.
  ymag = std::fabs(x) * half + 0.5 * std::fabs(x) * sech2 * umag;
  g = half + 0.5 * x * sech2 * du;
  // d g / du = sech^2 u (1 + x du (-tanh u)) bounded by sech^2 u (1 + |x| du).
  gmag = half + 0.5 * std::fabs(x) * sech2 * du + sech2 * (1 + std::fabs(x) * du) * umag;
}

const float kLarge[] = {1e4f, -1e4f, 95.f, -95.f, 30.f, -30.f, 9.f, -9.f, 0.f, -0.f, -5.f, -3.5f, 5e3f, -300.f};

simt::Outcome run(const Case& c, unsigned seed) {
  const std::string label = c.name();
  std::mt19937 rng(seed);
  const int64_t n_out = c.rows * c.cols;                 // y and dy
  const int64_t n_in = c.swiglu ? 2 * n_out : n_out;     // x and dx
  const bool mis_all = c.misalign == Misalign::kAll;
  Buffer x, dy, y, dx;
  x.init(c.dtype, n_in, mis_all);
  dy.init(c.dtype, n_out, mis_all || c.misalign == Misalign::kDy);
  y.init(c.dtype, n_out, mis_all || c.misalign == Misalign::kOut);
  dx.init(c.dtype, n_in, mis_all || c.misalign == Misalign::kOut);
  x.fill(rng, 2.f);
  dy.fill(rng, 1.f);
  if (c.large) {
    for (int64_t i = 0; i < n_in; i += 5) x.set(i, kLarge[(i / 5) % 14]);
  }
  std::vector<simt::Range> global;
  simt::register_global(global, x.data(), x.bytes());
  simt::register_global(global, dy.data(), dy.bytes());

  const int wide = 16 / genkernels::element_bytes(c.dtype);
  const int64_t width_n = c.swiglu ? c.cols : wide;  // what the width must divide
  const int fvec = driver::vector_width(c.dtype, width_n, {x.data(), y.data()});
  const int gvec = driver::vector_width(c.dtype, width_n, {dy.data(), x.data(), dx.data()});
  auto blocks = [&](int vec) { return static_cast<unsigned>(genkernels::gated_mlp_blocks(n_out, vec)); };
  const GatedMlpArgs fa{x.data(), nullptr, y.data(), n_out, c.swiglu ? c.cols : 1};
  const GatedMlpArgs ga{x.data(), dy.data(), dx.data(), n_out, c.swiglu ? c.cols : 1};
  genkernels::with_vector(c.dtype, fvec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    simt::launch(blocks(kVec), kThreads, 0, {}, global, label + " (forward)", [&] {
      if (c.swiglu) {
        genkernels::swiglu_forward_kernel<D, kVec>(fa);
      } else {
        genkernels::gelu_tanh_forward_kernel<D, kVec>(fa);
      }
    });
  });
  genkernels::with_vector(c.dtype, gvec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    simt::launch(blocks(kVec), kThreads, 0, {}, global, label + " (grad)", [&] {
      if (c.swiglu) {
        genkernels::swiglu_grad_kernel<D, kVec>(ga);
      } else {
        genkernels::gelu_tanh_grad_kernel<D, kVec>(ga);
      }
    });
  });

  driver::Findings found;
  auto check = [&](const char* what, int64_t e, float got, double want, double magnitude) {
    if (decode(c.dtype, encode(c.dtype, static_cast<float>(want))) == got) return;
    found.check(what, c.dtype, e, 0, got, want, magnitude);
  };
  if (c.swiglu) {
    for (int64_t r = 0; r < c.rows; ++r) {
      for (int64_t col = 0; col < c.cols; ++col) {
        const int64_t ia = (r * 2) * c.cols + col, ib = (r * 2 + 1) * c.cols + col, iy = r * c.cols + col;
        const double a = x.at(ia), b = x.at(ib), g = dy.at(iy);
        const double s = sigmoid64(a), sc = sigmoid64(-a);
        check("y", iy, y.at(iy), a * s * b, std::fabs(a * s * b));
        check("da", ia, dx.at(ia), g * b * s * (1 + a * sc), std::fabs(g * b) * s * (1 + std::fabs(a) * sc));
        check("db", ib, dx.at(ib), g * a * s, std::fabs(g * a) * s);
      }
    }
  } else {
    for (int64_t e = 0; e < n_out; ++e) {
      double want_y, ymag, gr, gmag;
      gelu64(x.at(e), want_y, ymag, gr, gmag);
      const double g = dy.at(e);
      check("y", e, y.at(e), want_y, ymag);
      check("dx", e, dx.at(e), g * gr, std::fabs(g) * gmag);
    }
  }
  if (y.untouched() || dx.untouched()) found.flag("an output element never written");
  if (y.stray() || dx.stray()) found.flag("a store outside y or dx");

  char buf[200];
  snprintf(buf, sizeof buf, "vec %d %d n %lld; max |err| / tol %.3g", fvec, gvec, static_cast<long long>(n_out),
           found.worst);
  return found.outcome(label, buf);
}

// gelu_tanh lengths: single elements, odd, a multiple of 8, several blocks with a tail (blocks of 256
// threads of 4 vectors). swiglu (R, M): M a multiple of 8, of 4 only, odd, 1; several blocks on the vector
// and the scalar paths.
const int64_t kGeluLengths[] = {1, 7, 37, 1000, 2061, 4099, 9001};
const int64_t kSwigluShapes[][2] = {{1, 8}, {3, 16}, {5, 7}, {2, 4}, {4, 520}, {1, 2050}, {7, 1}, {3, 3000}};

std::vector<Case> make_cases() {
  std::vector<Case> cases;
  int k = 0;
  for (const int dtype : {kF32, kF16, kBF16}) {
    for (int variant = 0; variant < 4; ++variant) {
      // Each shape meets every misalignment over the four variants.
      int i = 0;
      for (const int64_t n : kGeluLengths) {
        cases.push_back({dtype, false, 1, n, k % 2 == 0, static_cast<Misalign>((i++ + variant) % 4)});
        ++k;
      }
      for (const auto& shape : kSwigluShapes) {
        cases.push_back({dtype, true, shape[0], shape[1], k % 2 == 0, static_cast<Misalign>((i++ + variant) % 4)});
        ++k;
      }
    }
  }
  return cases;
}

}  // namespace

int main(int argc, char** argv) { return driver::run_driver(argc, argv, make_cases(), 9000u, run); }
