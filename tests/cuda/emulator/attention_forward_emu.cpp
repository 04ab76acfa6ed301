// Runs the attention forward kernel of genkernels/attention_forward.cuh, the same source that
// csrc/attention.cu compiles with nvcc, on the CPU under the SIMT emulator of simt.h, and checks
// out and lse against a float64 reference on cases that cover the kernel's paths: fp16 and bf16,
// every padded head dim, ragged tiles, Lq > Lkv, GQA / MQA, strided layouts, padding masks,
// large magnitudes and a negative scale, with out in q's memory order as the launcher
// (genkernels/cuda/attention.py, through heads_like) allocates it: heads inner for the (B, L, H, D)
// layout, else contiguous. Each case runs under two schedules (simt.h): cp.async landing
// immediately with warp 0 first, and landing as late as allowed with the last warp first.
//
//   attention_forward_emu [--jobs N] [--mode both|immediate|deferred] [--case SUBSTRING]
//
// prints "CASES <cases> MODES <modes>", then one line per case and mode:
//   RESULT ok|FAIL <mode> <case> | <errors relative to their tolerances>
// and "PASSED" or "FAILED <count>"; the exit status is 0 when every case passes, 1 when one
// fails, 2 when the emulator stops on a broken rule of the execution model (message on stderr).
//
// Tolerances come from an error model of the kernel's arithmetic against the exact result, with
// u the unit roundoff of the dtype (2^-11 for fp16, 2^-8 for bf16): P is rounded to the dtype
// before P V and out is rounded once (relative u each), and the scores carry the fp32 error of
// the mma sums and the scaling, at most a few 2^-24 of smax = |scale| max_j sum_d |q_id k_jd|
// (which moves p_ij relatively by the same amount). So per element
//   |out - ref| <= 2 (u + 2^-20 smax) (sum_j p_ij |v_jd| + |ref|),
//   |lse - ref| <= 2^-20 (smax + 1 + |ref|),
// and rows without an allowed key must be exactly 0 with lse = -inf.
#include "simt.h"
#include "driver.h"

// Its "#pragma unroll" are for nvcc (compile with -Wno-unknown-pragmas under -Wall).
#include "genkernels/attention_forward.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using genkernels::AttentionArgs;
using genkernels::BF16;
using genkernels::F16;

enum class Layout {
  kBHLD,    // (B, H, L, D) with rows padded past D
  kBLHD,    // a (B, L, H, D) tensor viewed as (B, H, L, D), as diffusers produces; out likewise
  kExpand,  // (B, H, L, D) for q; k and v broadcast along B (batch stride 0)
};

struct Case {
  bool bf16;
  int B, Hq, Hkv, Lq, Lkv, D;
  bool causal, mask;
  Layout layout;
  float magnitude = 1.f;  // standard deviation of q, k and v
  float scale_mul = 1.f;  // scale = scale_mul / sqrt(D)

  // out's order, as genkernels._layout.heads_like picks it: heads inner where q's heads are inner
  // to its positions and that order shows (Hq > 1 and Lq > 1).
  bool out_heads_inner() const { return layout == Layout::kBLHD && Hq > 1 && Lq > 1; }

  std::string name() const {
    char buf[192];
    const char* layout_name = layout == Layout::kBHLD ? "bhld" : layout == Layout::kBLHD ? "blhd" : "expand";
    snprintf(buf, sizeof buf, "%s B%d Hq%d Hkv%d Lq%d Lkv%d D%d%s%s %s out-%s mag%g scale%g/sqrtD",
             bf16 ? "bf16" : "f16", B, Hq, Hkv, Lq, Lkv, D, causal ? " causal" : "", mask ? " mask" : "", layout_name,
             out_heads_inner() ? "blhd" : "bhld", magnitude, scale_mul);
    return buf;
  }
};

// Every padded head dim (32 .. 128 by 16) in both dtypes, D = 8 .. 128 by 8, ragged tile edges
// everywhere, and the corner cases named in the comments.
const Case kCases[] = {
    {false, 1, 1, 1, 33, 97, 8, true, false, Layout::kBLHD},
    {true, 1, 1, 1, 16, 16, 16, false, false, Layout::kBHLD},
    {false, 2, 4, 2, 7, 130, 24, true, true, Layout::kBLHD},  // GQA; batch 0 wholly masked
    {true, 1, 1, 1, 64, 64, 32, true, false, Layout::kBHLD},   // exact tiles, causal diagonal
    {false, 2, 2, 2, 65, 33, 40, true, false, Layout::kBLHD},
    {true, 1, 2, 1, 150, 330, 48, true, false, Layout::kBHLD},  // MQA
    {false, 1, 2, 2, 129, 300, 56, true, true, Layout::kBHLD},
    {true, 2, 4, 2, 20, 190, 64, false, true, Layout::kBLHD},
    {false, 1, 2, 1, 70, 100, 64, false, false, Layout::kBHLD},
    {false, 2, 4, 2, 7, 100, 72, true, true, Layout::kBLHD},
    {true, 1, 1, 1, 1, 1, 80, false, false, Layout::kBHLD},  // Lq = Lkv = 1
    {false, 1, 1, 1, 1, 1, 16, true, false, Layout::kBHLD},
    {false, 2, 2, 1, 64, 129, 88, false, true, Layout::kBHLD},
    {true, 3, 2, 1, 40, 70, 96, true, false, Layout::kExpand},  // k, v expanded along B
    {true, 1, 2, 2, 100, 100, 104, true, false, Layout::kBHLD},
    {false, 1, 1, 1, 90, 45, 112, false, true, Layout::kBLHD},
    {true, 1, 2, 2, 33, 70, 112, true, true, Layout::kBLHD},
    {false, 1, 1, 1, 200, 200, 120, false, false, Layout::kBLHD},
    {false, 1, 1, 1, 130, 60, 128, true, false, Layout::kBHLD},  // Lq > Lkv: a block sees no key
    {true, 2, 3, 1, 150, 40, 56, true, false, Layout::kBLHD},    // the same into a heads-inner out
    {false, 2, 1, 1, 300, 40, 24, true, true, Layout::kBHLD},    // Lq >> Lkv, with a mask
    {true, 2, 3, 1, 50, 97, 128, false, true, Layout::kBLHD},
    {false, 2, 2, 1, 50, 60, 40, false, true, Layout::kExpand},
    {false, 1, 2, 1, 80, 150, 64, true, true, Layout::kBHLD, 30.f, 1.f},    // large magnitudes
    {true, 2, 2, 1, 80, 150, 128, false, true, Layout::kBLHD, 20.f, -0.5f},  // negative scale
    {false, 1, 1, 1, 70, 70, 32, true, false, Layout::kBHLD, 4.f, -1.f},
};

struct Mode {
  const char* name;
  simt::Options options;
};

const Mode kModes[] = {
    {"immediate", {simt::Landing::kImmediate, simt::Order::kForward}},
    {"deferred", {simt::Landing::kDeferred, simt::Order::kReverse}},
};

constexpr uint16_t kPoison = 0x7e01;  // a NaN in fp16 and in bf16: slots the kernel must not read

// One (B, H, L, D) input: storage with the case's layout and strides, and its values as doubles.
struct Tensor {
  std::vector<uint16_t> storage;  // whole 16-byte units, so that the data start 16-byte aligned
  int64_t stride[3] = {0, 0, 0};  // batch, head, row, in elements
  std::vector<double> value;      // dense (B, H, L, D)

  template <class T>
  void fill(const Case& c, int H, int L, bool broadcast, std::mt19937& rng) {
    std::normal_distribution<float> normal(0.f, c.magnitude);
    const int D = c.D, pitch = (D + 8 + 7) / 8 * 8;  // rows padded past D, poisoned there
    const int batches = broadcast ? 1 : c.B;
    if (c.layout == Layout::kBLHD) {
      stride[1] = pitch, stride[2] = int64_t{H} * pitch;
    } else {
      stride[2] = pitch, stride[1] = int64_t{L} * pitch;
    }
    stride[0] = broadcast ? 0 : int64_t{H} * L * pitch;
    storage.assign(static_cast<size_t>(batches) * H * L * pitch, kPoison);
    value.assign(static_cast<size_t>(c.B) * H * L * D, 0.0);
    for (int b = 0; b < batches; ++b) {
      for (int h = 0; h < H; ++h) {
        for (int l = 0; l < L; ++l) {
          for (int d = 0; d < D; ++d) {
            const uint16_t bits = T::encode(normal(rng));
            storage[b * stride[0] + h * stride[1] + l * stride[2] + d] = bits;
            value[((static_cast<size_t>(b) * H + h) * L + l) * D + d] = genkernels::emu::decode<T>(bits);
          }
        }
      }
    }
    if (broadcast) {
      for (int b = 1; b < c.B; ++b) {
        std::copy_n(value.begin(), static_cast<size_t>(H) * L * D, value.begin() + static_cast<size_t>(b) * H * L * D);
      }
    }
  }
};

template <class T, int DP>
void launch(const AttentionArgs& a, unsigned blocks, const simt::Options& options,
            const std::vector<simt::Range>& global, const std::string& label) {
  simt::launch(blocks, genkernels::kThreads, genkernels::Tiles<DP>::kSmemBytes, options, global, label,
               [&a] { genkernels::attention_fwd_kernel<T, DP>(a); });
}

// The dispatch of csrc/attention.cu: D rounded up to a multiple of 16, at least 32.
template <class T>
void launch_dim(const AttentionArgs& a, unsigned blocks, const simt::Options& options,
                const std::vector<simt::Range>& global, const std::string& label) {
  switch (a.dim <= 32 ? 32 : (a.dim + 15) / 16 * 16) {
    case 32:
      return launch<T, 32>(a, blocks, options, global, label);
    case 48:
      return launch<T, 48>(a, blocks, options, global, label);
    case 64:
      return launch<T, 64>(a, blocks, options, global, label);
    case 80:
      return launch<T, 80>(a, blocks, options, global, label);
    case 96:
      return launch<T, 96>(a, blocks, options, global, label);
    case 112:
      return launch<T, 112>(a, blocks, options, global, label);
    default:
      return launch<T, 128>(a, blocks, options, global, label);
  }
}

using simt::Outcome;

template <class T>
Outcome run(const Case& c, const Mode& mode, unsigned seed) {
  std::mt19937 rng(seed);
  const bool broadcast = c.layout == Layout::kExpand;
  Tensor q, k, v;
  q.fill<T>(c, c.Hq, c.Lq, false, rng);
  k.fill<T>(c, c.Hkv, c.Lkv, broadcast, rng);
  v.fill<T>(c, c.Hkv, c.Lkv, broadcast, rng);
  std::vector<unsigned char> mask(static_cast<size_t>(c.B) * c.Lkv, 0);
  if (c.mask) {
    for (auto& m : mask) m = rng() % 3 == 0;
    if (c.B > 1) std::fill_n(mask.begin(), c.Lkv, 1);  // batch 0: every key is padding
  }
  const int D = c.D;
  const size_t rows = static_cast<size_t>(c.B) * c.Hq * c.Lq;
  // out is dense, (B, Lq, Hq, D) or (B, Hq, Lq, D) in memory (batch, head, row strides below).
  int64_t out_stride[3];
  out_stride[0] = int64_t{c.Hq} * c.Lq * D;
  out_stride[1] = c.out_heads_inner() ? D : int64_t{c.Lq} * D;
  out_stride[2] = c.out_heads_inner() ? int64_t{c.Hq} * D : D;
  // Poisoned guards on both sides of out and lse, a block of rows wide: a store past either end
  // lands in them (and is reported) instead of corrupting the heap.
  const size_t guard = static_cast<size_t>(genkernels::kBlockM) * D, lse_guard = genkernels::kBlockM;
  std::vector<uint16_t> out(rows * D + 2 * guard, kPoison);
  std::vector<float> lse(rows + 2 * lse_guard, std::nanf(""));

  AttentionArgs a{};
  a.q = q.storage.data();
  a.k = k.storage.data();
  a.v = v.storage.data();
  a.mask = c.mask ? mask.data() : nullptr;
  a.out = out.data() + guard;
  a.lse = lse.data() + lse_guard;
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = q.stride[i], a.k_stride[i] = k.stride[i], a.v_stride[i] = v.stride[i];
    a.out_stride[i] = out_stride[i];
  }
  a.heads_q = c.Hq;
  a.group = c.Hq / c.Hkv;
  a.len_q = c.Lq;
  a.len_kv = c.Lkv;
  a.dim = D;
  a.m_blocks = (c.Lq + genkernels::kBlockM - 1) / genkernels::kBlockM;
  const float scale = c.scale_mul / std::sqrt(static_cast<float>(D));
  a.scale_log2 = scale * genkernels::kLog2e;
  a.causal = c.causal;
  for (const void* p : {static_cast<const void*>(a.q), static_cast<const void*>(a.k), static_cast<const void*>(a.v),
                        static_cast<const void*>(a.out)}) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) simt::fail("test buffer not 16-byte aligned");
  }
  std::vector<simt::Range> global;
  simt::register_global(global, q.storage.data(), q.storage.size() * 2);
  simt::register_global(global, k.storage.data(), k.storage.size() * 2);
  simt::register_global(global, v.storage.data(), v.storage.size() * 2);
  if (c.mask) simt::register_global(global, mask.data(), mask.size());
  const std::string label = c.name() + " (" + mode.name + ")";
  launch_dim<T>(a, static_cast<unsigned>(c.B * c.Hq * a.m_blocks), mode.options, global, label);

  // float64 reference and the error model of the header comment.
  const double u = std::is_same_v<T, F16> ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
  const double fp32 = std::ldexp(1.0, -20);
  double worst_out = 0, worst_lse = 0;
  driver::Findings found;
  std::vector<double> s(c.Lkv);
  for (int b = 0; b < c.B; ++b) {
    for (int h = 0; h < c.Hq; ++h) {
      const int hk = h / (c.Hq / c.Hkv);
      const double* kb = &k.value[(static_cast<size_t>(b) * c.Hkv + hk) * c.Lkv * D];
      const double* vb = &v.value[(static_cast<size_t>(b) * c.Hkv + hk) * c.Lkv * D];
      for (int i = 0; i < c.Lq; ++i) {
        const size_t row = (static_cast<size_t>(b) * c.Hq + h) * c.Lq + i;
        const double* qi = &q.value[row * D];
        double m = -INFINITY, smax = 0;
        for (int j = 0; j < c.Lkv; ++j) {
          double dot = 0, dot_abs = 0;
          for (int d = 0; d < D; ++d) dot += qi[d] * kb[j * D + d], dot_abs += std::fabs(qi[d] * kb[j * D + d]);
          smax = std::max(smax, std::fabs(scale) * dot_abs);
          const bool allowed = !(c.mask && mask[b * c.Lkv + j]) && !(c.causal && j > i + c.Lkv - c.Lq);
          s[j] = allowed ? scale * dot : -INFINITY;
          m = std::max(m, s[j]);
        }
        double l = 0;
        for (int j = 0; j < c.Lkv; ++j) {
          s[j] = s[j] == -INFINITY ? 0.0 : std::exp(s[j] - m);  // s now holds the unnormalized p
          l += s[j];
        }
        const double want_lse = l > 0 ? m + std::log(l) : -INFINITY;
        const double got_lse = lse[lse_guard + row];
        if (l == 0) {
          if (!(std::isinf(got_lse) && got_lse < 0)) found.flag("lse[%d, %d, %d] = %.6g, want -inf", b, h, i, got_lse);
        } else {
          const double tol = fp32 * (smax + 1 + std::fabs(want_lse));
          const double e = std::fabs(got_lse - want_lse);
          if (!(e <= tol)) found.flag("lse[%d, %d, %d] = %.6g, want %.6g (tol %.3g)", b, h, i, got_lse, want_lse, tol);
          worst_lse = std::max(worst_lse, driver::ratio(e, tol));
        }
        for (int d = 0; d < D; ++d) {
          double want = 0, weight = 0;
          if (l > 0) {
            for (int j = 0; j < c.Lkv; ++j) want += s[j] * vb[j * D + d], weight += s[j] * std::fabs(vb[j * D + d]);
            want /= l, weight /= l;
          }
          const double got =
              genkernels::emu::decode<T>(out[guard + b * out_stride[0] + h * out_stride[1] + i * out_stride[2] + d]);
          const double tol = 2 * (u + fp32 * smax) * (weight + std::fabs(want));
          const double e = std::fabs(got - want);
          if (!(e <= tol)) found.flag("out[%d, %d, %d, %d] = %.6g, want %.6g (tol %.3g)", b, h, i, d, got, want, tol);
          if (tol > 0) worst_out = std::max(worst_out, driver::ratio(e, tol));
        }
      }
    }
  }
  for (size_t i = 0; i < guard; ++i) {
    if (out[i] != kPoison || out[out.size() - 1 - i] != kPoison) {
      found.flag("a store outside out");
      break;
    }
  }
  for (size_t i = 0; i < lse_guard; ++i) {
    if (!std::isnan(lse[i]) || !std::isnan(lse[lse.size() - 1 - i])) {
      found.flag("a store outside lse");
      break;
    }
  }
  char buf[160];
  snprintf(buf, sizeof buf, "max |err| / tol: out %.3g lse %.3g", worst_out, worst_lse);
  return found.outcome(std::string(mode.name) + " " + c.name(), buf);
}

}  // namespace

int main(int argc, char** argv) {
  driver::CommandLine cl;
  std::string mode_arg = "both";
  auto mode_option = [&mode_arg](const std::string& arg, const std::string& value) {
    if (arg != "--mode") return false;
    mode_arg = value;
    return true;
  };
  if (!cl.parse(argc, argv, " [--mode both|immediate|deferred]", mode_option)) return 2;
  std::vector<const Mode*> modes;
  for (const Mode& mode : kModes) {
    if (mode_arg == "both" || mode_arg == mode.name) modes.push_back(&mode);
  }
  if (modes.empty()) {
    fprintf(stderr, "unknown mode %s\n", mode_arg.c_str());
    return 2;
  }
  const std::vector<size_t> cases = cl.select(kCases);
  printf("CASES %zu MODES %zu\n", cases.size(), modes.size());
  fflush(stdout);

  // Jobs (case, mode) go to worker threads, each with its own emulated machine; the results are
  // printed in order once all are done.
  return simt::run_cases(cases.size() * modes.size(), cl.jobs, [&](size_t n) {
    const Case& c = kCases[cases[n / modes.size()]];
    const Mode& mode = *modes[n % modes.size()];
    const unsigned seed = 1000u + static_cast<unsigned>(cases[n / modes.size()]);  // same inputs in every mode
    return c.bf16 ? run<BF16>(c, mode, seed) : run<F16>(c, mode, seed);
  });
}
