// The host side that the emulator drivers (*_emu.cpp) share: names and conversions of the dtype
// codes, sentinel-guarded tensors, the vector width the host code picks, the bookkeeping of a
// case's checks and its RESULT line, and the command line (--jobs N, --case SUBSTRING).
// Include after simt.h (which brings genkernels/vec.cuh).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace driver {

inline const char* dtype_name(int code) {
  return code == genkernels::kFloat16 ? "f16" : code == genkernels::kBFloat16 ? "bf16" : "f32";
}

// Host conversions, through the dtype tags of genkernels/vec.cuh.
inline uint32_t encode(int code, float v) {
  if (code == genkernels::kFloat16) return genkernels::F16::encode(v);
  if (code == genkernels::kBFloat16) return genkernels::BF16::encode(v);
  return genkernels::F32::encode(v);
}

inline float decode(int code, uint32_t bits) {
  if (code == genkernels::kFloat16) return genkernels::F16::decode(static_cast<genkernels::F16::Bits>(bits));
  if (code == genkernels::kBFloat16) return genkernels::BF16::decode(static_cast<genkernels::BF16::Bits>(bits));
  return genkernels::F32::decode(bits);
}

// Unit roundoff of a dtype: 2^-24, 2^-11 or 2^-8.
inline double unit_roundoff(int code) {
  return std::ldexp(1.0, code == genkernels::kFloat16 ? -11 : code == genkernels::kBFloat16 ? -8 : -24);
}

// The vector width the host code picks (genkernels::vector_width), for the emulated tensors' pointers.
inline int vector_width(int dtype, int64_t n, std::initializer_list<const void*> ptrs,
                        std::initializer_list<int64_t> strides = {}) {
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return genkernels::vector_width(dtype, n, {}, strides);
}

constexpr size_t kGuardBytes = 64;  // sentinel bytes on each side of every tensor

// `count` elements of one dtype in 16-byte aligned storage, `shift` elements past the boundary,
// with sentinel bytes on both sides. Outputs start as sentinels everywhere, so untouched elements
// and stores out of bounds both show.
struct Buffer {
  int dtype = genkernels::kFloat32;
  size_t count = 0;
  size_t shift = 0;
  std::vector<uint4> storage;
  static constexpr unsigned char kSentinel = 0xff;  // a NaN in every dtype, which no case computes

  void init(int code, size_t n, bool misalign) {
    dtype = code;
    count = n;
    shift = misalign ? 1 : 0;
    const size_t bytes = 2 * kGuardBytes + (n + shift) * genkernels::element_bytes(code);
    storage.assign((bytes + 15) / 16, uint4{});
    std::memset(storage.data(), kSentinel, storage.size() * 16);
  }
  int elem() const { return genkernels::element_bytes(dtype); }
  unsigned char* base() { return reinterpret_cast<unsigned char*>(storage.data()); }
  unsigned char* data() { return base() + kGuardBytes + shift * elem(); }
  unsigned char* at_elem(int64_t i) { return data() + i * elem(); }
  size_t bytes() const { return count * elem(); }
  uint32_t bits(size_t i) {
    uint32_t b = 0;
    std::memcpy(&b, at_elem(static_cast<int64_t>(i)), elem());
    return b;
  }
  float at(size_t i) { return decode(dtype, bits(i)); }
  void set(size_t i, float v) {
    const uint32_t b = encode(dtype, v);
    std::memcpy(at_elem(static_cast<int64_t>(i)), &b, elem());
  }
  void fill(std::mt19937& rng, float scale) {
    std::normal_distribution<float> normal(0.f, scale);
    for (size_t i = 0; i < count; ++i) set(i, normal(rng));
  }
  // Whether element i still holds the sentinel (was never written).
  bool sentinel(size_t i) {
    for (int k = 0; k < elem(); ++k) {
      if (data()[i * elem() + k] != kSentinel) return false;
    }
    return true;
  }
  // Elements that still hold the sentinel.
  size_t untouched() {
    size_t n = 0;
    for (size_t i = 0; i < count; ++i) n += sentinel(i);
    return n;
  }
  // Bytes outside [data, data + bytes) that no longer hold the sentinel.
  size_t stray() {
    size_t n = 0;
    const unsigned char* b = base();
    const size_t lo = static_cast<size_t>(data() - b), hi = lo + bytes();
    for (size_t i = 0; i < storage.size() * 16; ++i) n += (i < lo || i >= hi) && b[i] != kSentinel;
    return n;
  }
};

// An error relative to its tolerance, a NaN error counting as infinitely far off.
inline double ratio(double err, double tol) { return std::isnan(err) ? INFINITY : err / tol; }

// What one case's checks found: how many failed, the first one described, and the largest error
// relative to its tolerance.
struct Findings {
  int bad = 0;
  std::string first;
  double worst = 0;

  template <class... Args>
  void flag(const char* format, Args... args) {
    if (bad++ == 0) {
      char buf[240];
      snprintf(buf, sizeof buf, format, args...);
      first = std::string("; first: ") + buf;
    }
  }

  // Element e (of sample b) of a float32 pipeline rounded once to `dtype`, against the float64
  // reference `want`: |got - want| <= u |want| + 2^-20 magnitude + 2^-25 (u the dtype's unit
  // roundoff, magnitude the reference with every term taken in absolute value).
  void check(const char* what, int dtype, int64_t e, int64_t b, double got, double want, double magnitude) {
    const double tol = unit_roundoff(dtype) * std::fabs(want) + std::ldexp(1.0, -20) * magnitude + std::ldexp(1.0, -25);
    const double err = std::fabs(got - want);
    if (!(err <= tol)) {
      flag("%s[%lld] (b %lld) = %.9g, want %.9g (tol %.3g)", what, static_cast<long long>(e),
           static_cast<long long>(b), got, want, tol);
    }
    worst = std::max(worst, ratio(err, tol));
  }

  // The case's line: "RESULT ok|FAIL <label> | <details>; <bad> bad" and the first failure.
  simt::Outcome outcome(const std::string& label, const std::string& details) const {
    return {bad == 0, std::string("RESULT ") + (bad == 0 ? "ok" : "FAIL") + " " + label + " | " + details + "; " +
                          std::to_string(bad) + " bad" + first};
  }
};

// The command line every driver takes: --jobs N (worker threads; default the CPUs, at most 8) and
// --case SUBSTRING (only the cases whose name contains it), plus the driver's own options: an
// option with a value that extra(option, value) accepts. Prints the usage and returns false on
// anything else.
struct CommandLine {
  unsigned jobs = std::max(1u, std::min(8u, std::thread::hardware_concurrency()));
  std::string only;

  template <class Extra>
  bool parse(int argc, char** argv, const char* extra_usage, Extra&& extra) {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "--jobs" && i + 1 < argc) {
        jobs = static_cast<unsigned>(std::max(1, std::atoi(argv[++i])));
      } else if (arg == "--case" && i + 1 < argc) {
        only = argv[++i];
      } else if (!(i + 1 < argc && extra(arg, std::string(argv[i + 1])))) {
        fprintf(stderr, "usage: %s [--jobs N]%s [--case SUBSTRING]\n", argv[0], extra_usage);
        return false;
      } else {
        ++i;
      }
    }
    return true;
  }
  bool parse(int argc, char** argv) {
    return parse(argc, argv, "", [](const std::string&, const std::string&) { return false; });
  }

  // Indices of the cases whose name contains --case's substring.
  template <class Cases>
  std::vector<size_t> select(const Cases& all) const {
    std::vector<size_t> picked;
    size_t i = 0;
    for (const auto& c : all) {
      if (only.empty() || c.name().find(only) != std::string::npos) picked.push_back(i);
      ++i;
    }
    return picked;
  }
};

// The main of a driver whose cases are `all`: parses the command line, prints "CASES <count>",
// runs run(case, seed_base + index) for each selected case on worker threads, each with its own
// emulated machine, and prints the results in order (simt::run_cases); returns the exit status.
template <class Case, class Run>
int run_driver(int argc, char** argv, const std::vector<Case>& all, unsigned seed_base, Run run) {
  CommandLine cl;
  if (!cl.parse(argc, argv)) return 2;
  const std::vector<size_t> cases = cl.select(all);
  printf("CASES %zu\n", cases.size());
  fflush(stdout);
  return simt::run_cases(cases.size(), cl.jobs, [&](size_t n) {
    return run(all[cases[n]], seed_base + static_cast<unsigned>(cases[n]));
  });
}

}  // namespace driver
