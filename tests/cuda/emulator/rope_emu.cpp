// Runs the rope kernel of genkernels/rope.cuh, the same source that csrc/rope.cu compiles with nvcc, on
// the CPU under the SIMT emulator of simt.h, and checks q_out and k_out against a float64 reference, on
// cases that cover the kernel's paths: fp32, fp16 and bf16; rotate_half and interleaved pairs; forward
// and inverse rotation; full and partial rotary (P < Dh / 2, odd P); grouped k (Hk != H), no k, and an
// empty q (H = 0) beside a non-empty k; inputs contiguous, in the (B, L, H, Dh) order a transpose gives,
// or rows of a wider tensor (padded by a multiple of the vector width, or by 3); outputs in the inputs'
// strides, contiguous, or the inputs themselves (in place); cos and sin in float32, float16 or bfloat16
// each, with contiguous or padded rows; 16-byte vectors and the scalar path (a P or a row stride that is
// not a multiple of the width, or pointers one element past a 16-byte boundary); grids of one block and
// of several.
//
//   rope_emu [--jobs N] [--case SUBSTRING]
//
// prints "CASES <cases>", then one line per case:
//   RESULT ok|FAIL <case> | vec <width> units <rotation> <copy> total <threads>; <largest error relative to
//   its tolerance>; <bad count>; <first bad element>
// and "PASSED" or "FAILED <count>"; exit status 0 when every case passes, 1 when one fails, 2 when the
// emulator stops on a broken rule of the execution model.
//
// The launch choices replicate csrc/rope.cu: the 16-byte width when every pointer is aligned and every
// stride, P (2P interleaved) and, when copying, Dh are multiples of it, else 1; rope_plan's units; blocks
// of kRopeThreads, one thread per unit.
//
// Reference: each element's pair partner, angle row and table column come from its logical coordinates
// (b, h, l, channel), not from the kernel's units. o1 = x1 c - x2 s, o2 = x2 c + x1 s in float64 on the
// decoded inputs and tables (s negated for the inverse); tolerance: a few float32 roundings, 2^-20 of the
// magnitude |x1 c| + |x2 s|, then one rounding to the dtype (driver::Findings::check). The pass-through
// channels must hold the input's bits exactly. Every element of an output buffer that is not part of the
// logical tensor (the padding of strided rows, the guard bytes around it) must keep what it held: the
// sentinel out of place, the input's bits in place; an out-of-place input must not change at all.
#include "simt.h"
#include "driver.h"

#include "genkernels/rope.cuh"

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

constexpr int kThreads = genkernels::kRopeThreads;
constexpr int kF32 = genkernels::kFloat32, kF16 = genkernels::kFloat16, kBF16 = genkernels::kBFloat16;

// kSlot (outputs only): positions 3 .. L + 2 of a (B, H, L + 6, Dh) KV cache, as rope(..., k_out=slot) writes.
enum class Layout { kContiguous, kBL, kPadded8, kPadded3, kSlot };
enum class Out { kSame, kContiguous, kInPlace, kSlot };  // kSlot: q_out contiguous, k_out a cache's slot

struct Shape {
  int B, H, Hk, L, Dh, P;  // Hk 0: no k
};

struct Case {
  int dtype;
  bool interleaved, inverse;
  Shape s;
  Layout layout;
  Out out;
  int cos_dtype, sin_dtype;
  bool padded_tables;
  bool misaligned;

  std::string name() const {
    static const char* const layouts[] = {"contiguous", "bl", "padded8", "padded3"};
    static const char* const outs[] = {"out:same", "out:contiguous", "in-place", "out:k-slot"};
    char buf[220];
    snprintf(buf, sizeof buf, "%s %s %s B%d H%d Hk%d L%d Dh%d P%d %s %s tables:%s/%s%s%s%s", dtype_name(dtype),
             interleaved ? "interleaved" : "rotate-half", inverse ? "inverse" : "forward", s.B, s.H, s.Hk, s.L, s.Dh,
             s.P, layouts[static_cast<int>(layout)], outs[static_cast<int>(out)], dtype_name(cos_dtype),
             dtype_name(sin_dtype), padded_tables ? " padded-tables" : "", s.Hk == 0 ? " no-k" : "",
             misaligned ? " misaligned" : "");
    return buf;
  }
};

// (batch, head, position) strides of a (B, H, L, Dh) tensor in a layout.
void strides_of(Layout layout, int B, int H, int L, int Dh, int64_t (&st)[3]) {
  (void)B;
  switch (layout) {
    case Layout::kContiguous:
      st[0] = int64_t{H} * L * Dh, st[1] = int64_t{L} * Dh, st[2] = Dh;
      return;
    case Layout::kBL:  // (B, L, H, Dh) memory viewed as (B, H, L, Dh)
      st[0] = int64_t{L} * H * Dh, st[1] = Dh, st[2] = int64_t{H} * Dh;
      return;
    case Layout::kSlot:  // positions of a (B, H, L + 6, Dh) cache
      st[0] = int64_t{H} * (L + 6) * Dh, st[1] = int64_t{L + 6} * Dh, st[2] = Dh;
      return;
    default: {  // rows of a wider (B, H, L, Dh + pad) tensor
      const int row = Dh + (layout == Layout::kPadded8 ? 8 : 3);
      st[0] = int64_t{H} * L * row, st[1] = int64_t{L} * row, st[2] = row;
    }
  }
}

// One (B, heads, L, Dh) tensor: its strides, the elements its storage spans, and whether offset e is one of
// its logical elements.
struct Tensor {
  int heads = 0;
  int64_t st[3] = {0, 0, 0};
  int64_t base = 0;  // the first element (kSlot: position 3 of the cache)
  int64_t span = 0;
  Buffer buf;
  std::vector<char> logical;

  void init(int dtype, const Shape& s, int h, Layout layout, bool misaligned) {
    heads = h;
    strides_of(layout, s.B, h, s.L, s.Dh, st);
    base = layout == Layout::kSlot ? int64_t{3} * s.Dh : 0;
    span = h == 0 ? 0 : (s.B - 1) * st[0] + (h - 1) * st[1] + (s.L - 1) * st[2] + s.Dh;
    if (layout == Layout::kSlot && h > 0) span = s.B * st[0];  // the whole cache: its other positions too
    buf.init(dtype, span, misaligned);
    logical.assign(span, 0);
    for (int b = 0; b < s.B; ++b) {
      for (int hh = 0; hh < h; ++hh) {
        for (int l = 0; l < s.L; ++l) {
          for (int c = 0; c < s.Dh; ++c) logical[offset(b, hh, l) + c] = 1;
        }
      }
    }
  }
  int64_t offset(int b, int h, int l) const { return base + b * st[0] + h * st[1] + l * st[2]; }
  // The address of element (0, 0, 0, 0): what the kernel is given.
  void* origin() { return buf.data() + base * buf.elem(); }
};

simt::Outcome run(const Case& c, unsigned seed) {
  const std::string label = c.name();
  std::mt19937 rng(seed);
  const Shape& s = c.s;
  const bool in_place = c.out == Out::kInPlace;
  Tensor q, k, qo, ko;
  q.init(c.dtype, s, s.H, c.layout, c.misaligned);
  k.init(c.dtype, s, s.Hk, c.layout, c.misaligned);
  q.buf.fill(rng, 2.f);
  k.buf.fill(rng, 2.f);
  if (!in_place) {
    const Layout out_layout = c.out == Out::kSame ? c.layout : Layout::kContiguous;
    qo.init(c.dtype, s, s.H, out_layout, c.misaligned);
    ko.init(c.dtype, s, s.Hk, c.out == Out::kSlot ? Layout::kSlot : out_layout, c.misaligned);
  }
  Tensor& q_out = in_place ? q : qo;
  Tensor& k_out = in_place ? k : ko;
  // Every byte of the inputs' storage (guards included) before the launch.
  const std::vector<uint4> q_before = q.buf.storage, k_before = k.buf.storage;

  // Tables: cos and sin of random angles in their own dtypes, NaN between padded rows and around them.
  // Padded: each table its own row stride (a kernel reading sin through cos's stride fails).
  const int64_t cs = c.padded_tables ? s.P + 5 : s.P, ss = c.padded_tables ? s.P + 2 : s.P;
  Buffer cos_t, sin_t;
  cos_t.init(c.cos_dtype, s.L * cs, false);
  sin_t.init(c.sin_dtype, s.L * ss, false);
  std::uniform_real_distribution<double> angle(-4.0, 4.0);
  for (int l = 0; l < s.L; ++l) {
    for (int j = 0; j < s.P; ++j) {
      const double a = angle(rng);
      cos_t.set(l * cs + j, static_cast<float>(std::cos(a)));
      sin_t.set(l * ss + j, static_cast<float>(std::sin(a)));
    }
  }

  std::vector<simt::Range> global;
  for (Buffer* b : {&q.buf, &k.buf, &cos_t, &sin_t}) {
    if (b->count) simt::register_global(global, b->data(), b->bytes());
  }

  genkernels::RopeArgs a{};
  auto operand = [&](Tensor& in, Tensor& out) {
    genkernels::RopeOperand t{};
    t.rows = int64_t{s.B} * in.heads * s.L;
    if (t.rows == 0) return t;
    t.x = in.buf.data();
    t.out = out.origin();
    t.heads = in.heads;
    for (int d = 0; d < 3; ++d) t.xs[d] = in.st[d], t.os[d] = out.st[d];
    return t;
  };
  a.q = operand(q, q_out);
  a.k = operand(k, k_out);
  a.cos = cos_t.data(), a.sin = sin_t.data();
  a.cos_stride = cs, a.sin_stride = ss;
  a.cos_dtype = c.cos_dtype, a.sin_dtype = c.sin_dtype;
  a.len = s.L;
  a.pairs = s.P;
  a.sign = c.inverse ? -1.f : 1.f;
  const bool copy = 2 * s.P < s.Dh && !in_place;
  const void* none = nullptr;
  const int vec = driver::vector_width(
      c.dtype, c.interleaved ? 2 * s.P : s.P,
      {a.q.rows ? q.buf.data() : none, a.q.rows ? q_out.origin() : none, a.k.rows ? k.buf.data() : none,
       a.k.rows ? k_out.origin() : none},
      {a.q.xs[0], a.q.xs[1], a.q.xs[2], a.q.os[0], a.q.os[1], a.q.os[2], a.k.xs[0], a.k.xs[1], a.k.xs[2], a.k.os[0],
       a.k.os[1], a.k.os[2], copy ? int64_t{s.Dh} : 0});
  genkernels::rope_plan(a, c.interleaved, vec, s.Dh, copy);
  const auto blocks = static_cast<unsigned>((a.total + kThreads - 1) / kThreads);
  genkernels::with_vector(c.dtype, vec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    simt::launch(blocks, kThreads, 0, {}, global, label, [&] {
      if (c.interleaved) {
        genkernels::rope_kernel<true, D, kVec>(a);
      } else {
        genkernels::rope_kernel<false, D, kVec>(a);
      }
    });
  });

  driver::Findings found;
  auto check_tensor = [&](const char* what, Tensor& in, Tensor& out, const std::vector<uint4>& before) {
    Buffer original;  // the input as it was
    original = in.buf;
    original.storage = before;
    for (int b = 0; b < s.B; ++b) {
      for (int h = 0; h < in.heads; ++h) {
        for (int l = 0; l < s.L; ++l) {
          const int64_t xi = in.offset(b, h, l), oi = out.offset(b, h, l);
          for (int ch = 0; ch < s.Dh; ++ch) {
            const float got = out.buf.at(oi + ch);
            if (ch >= 2 * s.P) {
              if (out.buf.bits(oi + ch) != original.bits(xi + ch)) {
                found.flag("%s[%d, %d, %d, %d] = %.9g, want the input's %.9g (pass-through)", what, b, h, l, ch, got,
                           original.at(xi + ch));
              }
              continue;
            }
            // The pair of channel ch, which half of it ch is, and the pair's angle column j.
            int j, first;
            if (c.interleaved) {
              j = ch / 2, first = ch % 2 == 0;
            } else {
              j = ch % s.P, first = ch < s.P;
            }
            const int c1 = c.interleaved ? 2 * j : j, c2 = c.interleaved ? 2 * j + 1 : j + s.P;
            const double x1 = original.at(xi + c1), x2 = original.at(xi + c2);
            const double cv = cos_t.at(l * cs + j), sv = (c.inverse ? -1.0 : 1.0) * sin_t.at(l * ss + j);
            const double want = first ? x1 * cv - x2 * sv : x2 * cv + x1 * sv;
            const double mag = std::fabs(x1 * cv) + std::fabs(x2 * sv);
            if (decode(c.dtype, encode(c.dtype, static_cast<float>(want))) == got) continue;
            found.check(what, c.dtype, oi + ch, b, got, want, mag);
          }
        }
      }
    }
    // Elements outside the logical tensor, and the guard bytes, hold what they held.
    for (int64_t e = 0; e < out.span; ++e) {
      if (out.logical[e]) continue;
      if (in_place ? out.buf.bits(e) != original.bits(e) : !out.buf.sentinel(e)) {
        found.flag("%s storage element %lld (not part of the tensor) written", what, static_cast<long long>(e));
        break;
      }
    }
    if (in_place) {
      const unsigned char* now = reinterpret_cast<const unsigned char*>(out.buf.storage.data());
      const unsigned char* was = reinterpret_cast<const unsigned char*>(before.data());
      const size_t lo = static_cast<size_t>(out.buf.data() - out.buf.base()), hi = lo + out.buf.bytes();
      for (size_t i = 0; i < before.size() * 16; ++i) {
        if ((i < lo || i >= hi) && now[i] != was[i]) {
          found.flag("a store outside %s", what);
          break;
        }
      }
    } else {
      if (out.buf.stray()) found.flag("a store outside %s", what);
      if (std::memcmp(in.buf.storage.data(), before.data(), before.size() * 16) != 0) {
        found.flag("the input of %s changed out of place", what);
      }
    }
  };
  check_tensor("q_out", q, q_out, q_before);
  check_tensor("k_out", k, k_out, k_before);

  char buf[200];
  snprintf(buf, sizeof buf, "vec %d units %lld %lld total %lld; max |err| / tol %.3g", vec,
           static_cast<long long>(a.rot_units), static_cast<long long>(a.units - a.rot_units),
           static_cast<long long>(a.total), found.worst);
  return found.outcome(label, buf);
}

// Head dims 40 / 64 / 72 / 128 / 48; full rotary and partial (P < Dh / 2, odd P); grouped k (Hk < H); L = 1;
// no k; an empty q beside k; one with many rows (several blocks on every path).
const Shape kShapes[] = {
    {2, 3, 1, 5, 40, 20}, {1, 2, 2, 7, 64, 32}, {2, 2, 1, 3, 128, 64}, {1, 2, 1, 1, 72, 16},
    {2, 1, 1, 9, 40, 13}, {1, 3, 0, 6, 48, 24}, {1, 0, 2, 4, 32, 8},   {2, 4, 2, 9, 64, 16},
};

std::vector<Case> make_cases() {
  std::vector<Case> cases;
  const int table_dtypes[][2] = {{kF32, kF32}, {kF16, kF16}, {kBF16, kF32}, {kF32, kBF16}};
  int k = 0;
  for (int round = 0; round < 2; ++round) {
    for (const int dtype : {kF32, kF16, kBF16}) {
      for (const bool interleaved : {false, true}) {
        for (const Shape& s : kShapes) {
          Case c{};
          c.dtype = dtype;
          c.interleaved = interleaved;
          c.s = s;
          c.inverse = (k + round) % 2 == 1;
          c.layout = static_cast<Layout>((k + round) % 4);
          c.out = static_cast<Out>((k / 2 + round) % 4);
          const int t = (k + 2 * round) % 4;
          c.cos_dtype = table_dtypes[t][0], c.sin_dtype = table_dtypes[t][1];
          c.padded_tables = (k + round) % 3 == 1;
          c.misaligned = k % 7 == 3;
          cases.push_back(c);
          ++k;
        }
      }
    }
  }
  return cases;
}

}  // namespace

int main(int argc, char** argv) { return driver::run_driver(argc, argv, make_cases(), 7000u, run); }
