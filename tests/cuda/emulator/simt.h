// A CPU emulator of the parts of the CUDA execution model that the kernels of genkernels use, so
// that their device source (genkernels/attention_forward.cuh, genkernels/schedule_step.cuh) can run
// and be checked on a machine without a GPU.
//
// What it emulates:
// - A block of N CUDA threads as N cooperatively scheduled fibers (ucontext) on one OS thread:
//   threadIdx / blockIdx / gridDim / blockDim, __syncthreads, __syncwarp, __shfl_xor_sync and
//   __shfl_sync, with every lane of a warp required to take part in each warp collective (as
//   mma.sync, ldmatrix.sync and the *_sync intrinsics require) and every thread of the block in
//   each __syncthreads. A barrier that can never complete (divergent collectives, a thread that
//   exited) is reported as an error, as are lanes of one warp that meet in different collectives.
// - The primitives of genkernels/mma.cuh, from their PTX ISA definitions: ldmatrix.m8n8.x4
//   (.trans), mma.sync.m16n8k16 with fp16 / bf16 inputs and fp32 accumulators (products summed
//   in double, then rounded to float), cp.async 16-byte copies with zero fill, commit_group and
//   wait_group; every shared memory address is checked for alignment and bounds, and every
//   cp.async source against the global buffers the test registered.
// - The element types and memory access of genkernels/vec.cuh (included here, on emulated
//   __ldcs / __stcs and bit casts); __ldg and __ldcs check that they read a registered buffer.
//   __frcp_rn is exact as on the device; __fdividef and __expf are exact here (approximate there).
// - Dynamic shared memory, filled with 0xff bytes (fp16 / bf16 NaN) before each block, so that a
//   read of anything the kernel did not write poisons the result.
// - Static __shared__ variables, as static thread_local ones: the fibers of a block run on one OS
//   thread and so share one copy, as the threads of a block do. They are not poisoned: a block
//   reading what it never wrote sees zeros or what the block before it left there.
//
// Two schedules exercise the synchronization: a thread runs until it must wait, then the
// runnable thread of highest priority runs; priorities go by thread index (forward: warp 0, lane
// 0 first; reverse: the last lane first), so whole warps run ahead of the others up to the next
// __syncthreads, which exposes a missing barrier deterministically. cp.async copies land either
// when issued (immediate) or only at the wait_group that forces them (deferred), the two ends of
// what the hardware allows, so reading a tile before waiting for it shows up in deferred mode.
//
// What it cannot catch: races that need the real memory model (e.g. a missing fence between
// global writes and reads by other blocks; blocks run one after another, and a schedule is one
// deterministic interleaving, not all of them), timing and performance, bank conflicts,
// register pressure and spills, the exact rounding of the hardware (fp32 accumulation order of
// mma, the approximations of exp2f / log2f), and anything that only nvcc or ptxas would reject.
// It checks a kernel against this file's reading of the PTX ISA, not against silicon: a
// fragment layout misread here and in the kernel alike would pass. Plain global loads and all
// global stores (__stcs included) are not bounds checked; drivers guard their outputs with sentinels.
#pragma once

// vector_types.h brings CUDA's host_defines.h, which makes __global__, __device__ and
// __forceinline__ plain C++ for a host compiler; __launch_bounds__ it leaves to nvcc.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

// host_defines.h makes __shared__ an annotation that a host compiler ignores, which would give
// every emulated thread its own copy.
#undef __shared__
#define __shared__ static thread_local

// The CUDA built-in variables, per emulated thread: the scheduler sets them on every switch
// (threadIdx, blockIdx) or launch (gridDim, blockDim).
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 gridDim;
inline thread_local dim3 blockDim;

namespace simt {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kStackBytes = 64 * 1024;  // per emulated thread

enum class Landing { kImmediate, kDeferred };  // when a cp.async copy reaches shared memory
enum class Order { kForward, kReverse };       // scheduling priority by thread index

struct Options {
  Landing landing = Landing::kImmediate;
  Order order = Order::kForward;
};

// The warp collectives, named in error messages.
enum Op : int { kSyncwarp = 1, kShuffle, kLdmatrix, kLdmatrixTrans, kMmaF16, kMmaBF16, kShuffleIdx };

inline const char* op_name(int op) {
  static const char* const names[] = {"?", "__syncwarp", "__shfl_xor_sync", "ldmatrix", "ldmatrix.trans",
                                      "mma (f16)", "mma (bf16)", "__shfl_sync"};
  return op >= kSyncwarp && op <= kShuffleIdx ? names[op] : names[0];
}

// One emulated thread's pending cp.async copy.
struct Copy {
  uint32_t dst;
  const void* src;
  int bytes;  // 16, or 0 for a zero fill
};

struct Thread {
  ucontext_t context;
  bool done = false;
  int waiting = 0;   // 0 runnable, 1 on its warp's barrier, 2 on the block barrier
  unsigned gen = 0;  // generation of the barrier it waits on
  int phase = 0;     // exchange slot of its warp's next collective
  long collectives = 0;  // warp collectives it has taken part in
  std::vector<Copy> uncommitted;
  std::deque<std::vector<Copy>> in_flight;  // committed groups, oldest first
};

// The operands a warp collective gathers from its lanes. Two slots alternate, so one barrier a
// collective suffices: a lane can only reuse a slot after every lane has left it.
struct Slot {
  int op[kWarpSize];
  long seq[kWarpSize];  // each lane's count of collectives: lanes must not skip one
  uint32_t u[kWarpSize][6];
  float f[kWarpSize][4];
  bool ready;          // the warp-wide result below is computed (by the first lane to look)
  float result[16][8];  // mma: the 16x8 D tile
};

struct Warp {
  unsigned gen = 0;
  int arrived = 0;
  Slot slot[2];
};

struct Range {
  const unsigned char* begin;
  const unsigned char* end;
};

// The state of the grid being emulated on this OS thread.
struct Machine {
  Options options;
  int threads = 0;
  unsigned block = 0;
  int current = 0;
  int live = 0;
  unsigned block_gen = 0;
  int block_arrived = 0;
  std::vector<Thread> thread;
  std::vector<Warp> warp;
  std::vector<unsigned char> smem;
  std::vector<std::vector<unsigned char>> stacks;
  std::vector<Range> global;  // registered global buffers
  ucontext_t host;
  std::function<void()> body;
  std::string label;  // names the launch in error messages
};

inline thread_local Machine* tl_machine = nullptr;

inline Machine& machine() { return *tl_machine; }
inline Thread& self() { return machine().thread[machine().current]; }
inline int lane() { return machine().current % kWarpSize; }
inline Warp& own_warp() { return machine().warp[machine().current / kWarpSize]; }

// A broken rule of the execution model: reported with where it happened; the run stops.
[[noreturn]] inline void fail(const char* format, ...) {
  char what[512];
  va_list args;
  va_start(args, format);
  vsnprintf(what, sizeof what, format, args);
  va_end(args);
  const Machine* m = tl_machine;
  if (m != nullptr) {
    fprintf(stderr, "simt: error in %s, block %u, thread %d: %s\n", m->label.c_str(), m->block, m->current, what);
  } else {
    fprintf(stderr, "simt: error: %s\n", what);
  }
  fflush(stderr);
  std::_Exit(2);
}

inline bool runnable(const Machine& m, int i) {
  const Thread& t = m.thread[i];
  if (t.done) return false;
  if (t.waiting == 1) return m.warp[i / kWarpSize].gen != t.gen;
  if (t.waiting == 2) return m.block_gen != t.gen;
  return true;
}

// swapcontext returns twice; kept out of line so that no caller's locals live across it.
[[gnu::noinline]] inline void switch_context(ucontext_t* from, const ucontext_t* to) {
  if (swapcontext(from, to) != 0) fail("swapcontext failed");
}

inline void resume(int next) {
  Machine& m = machine();
  Thread& t = m.thread[m.current];
  m.current = next;
  threadIdx = make_uint3(static_cast<unsigned>(next), 0, 0);
  switch_context(&t.context, &m.thread[next].context);
}

// Hands the CPU to the runnable thread of highest priority; the caller must be waiting.
inline void switch_away() {
  Machine& m = machine();
  for (int k = 0; k < m.threads; ++k) {
    const int i = m.options.order == Order::kForward ? k : m.threads - 1 - k;
    if (runnable(m, i)) return resume(i);
  }
  fail("deadlock: every live thread waits on a barrier that cannot complete (a collective or "
       "__syncthreads not reached by every thread, or reached by a thread that exited)");
}

inline void warp_barrier() {
  Warp& w = own_warp();
  if (++w.arrived == kWarpSize) {
    w.arrived = 0;
    ++w.gen;
    return;
  }
  Thread& t = self();
  t.waiting = 1;
  t.gen = w.gen;
  switch_away();
  t.waiting = 0;
}

inline void block_barrier() {
  Machine& m = machine();
  if (++m.block_arrived == m.threads) {
    m.block_arrived = 0;
    ++m.block_gen;
    return;
  }
  Thread& t = self();
  t.waiting = 2;
  t.gen = m.block_gen;
  switch_away();
  t.waiting = 0;
}

// The slot this lane's next collective writes its operands to.
inline Slot& slot() {
  Slot& s = own_warp().slot[self().phase];
  s.ready = false;
  return s;
}

// Waits until every lane of the warp has deposited its operands of collective `op`, and checks
// that they all are in the same one (same kind, and the same number of collectives before it).
inline void collective(Slot& s, int op) {
  Thread& t = self();
  const int l = lane();
  s.op[l] = op;
  s.seq[l] = t.collectives++;
  warp_barrier();
  for (int i = 0; i < kWarpSize; ++i) {
    if (s.op[i] != s.op[l] || s.seq[i] != s.seq[l]) {
      fail("lanes %d and %d of warp %d meet in different warp collectives (%s number %ld, %s number %ld)", l, i,
           machine().current / kWarpSize, op_name(s.op[l]), s.seq[l], op_name(s.op[i]), s.seq[i]);
    }
  }
  t.phase ^= 1;
}

inline void check_full_mask(unsigned mask, const char* what) {
  if (mask != kFullMask) fail("%s with mask %#x: only full warps are emulated", what, mask);
}

inline bool is_global(const void* p, size_t bytes) {
  const auto* b = static_cast<const unsigned char*>(p);
  for (const Range& r : machine().global) {
    if (b >= r.begin && b + bytes <= r.end) return true;
  }
  return false;
}

inline void check_smem(uint32_t address, size_t bytes, const char* what) {
  if (static_cast<size_t>(address) + bytes > machine().smem.size()) {
    fail("%s: shared address %u + %zu is past the %zu bytes of dynamic shared memory", what, address, bytes,
         machine().smem.size());
  }
}

inline void land(const Copy& c) {
  unsigned char* dst = machine().smem.data() + c.dst;
  if (c.bytes == 16) {
    std::memcpy(dst, c.src, 16);
  } else {
    std::memset(dst, 0, 16);
  }
}

inline void entry() {
  Machine& m = machine();
  m.body();
  Thread& t = self();
  if (!t.uncommitted.empty()) fail("exits with cp.async copies never committed");
  t.done = true;
  if (--m.live == 0) {
    switch_context(&t.context, &m.host);
  } else {
    switch_away();
  }
  fail("a finished thread was resumed");
}

// A context that starts entry() on `stack`; out of line like switch_context (getcontext also
// returns twice).
[[gnu::noinline]] inline void make_thread_context(ucontext_t* context, std::vector<unsigned char>& stack) {
  if (getcontext(context) != 0) fail("getcontext failed");
  context->uc_stack.ss_sp = stack.data();
  context->uc_stack.ss_size = stack.size();
  context->uc_link = nullptr;
  makecontext(context, entry, 0);
}

// Registers [p, p + bytes) as global memory that cp.async and __ldg may read.
inline void register_global(std::vector<Range>& ranges, const void* p, size_t bytes) {
  const auto* b = static_cast<const unsigned char*>(p);
  ranges.push_back({b, b + bytes});
}

// Runs kernel() as a grid of `blocks` blocks of `threads` threads with `smem_bytes` of dynamic
// shared memory, one block after another; `global` lists the buffers cp.async may read.
inline void launch(unsigned blocks, int threads, size_t smem_bytes, const Options& options,
                   const std::vector<Range>& global, const std::string& label, std::function<void()> kernel) {
  if (threads <= 0 || threads % kWarpSize != 0) fail("block of %d threads: a positive multiple of 32 only", threads);
  Machine m;
  m.options = options;
  m.threads = threads;
  m.global = global;
  m.label = label;
  m.body = std::move(kernel);
  m.stacks.assign(threads, std::vector<unsigned char>(kStackBytes));
  Machine* const outer = tl_machine;
  tl_machine = &m;
  gridDim = dim3(blocks, 1, 1);
  blockDim = dim3(static_cast<unsigned>(threads), 1, 1);
  for (unsigned b = 0; b < blocks; ++b) {
    m.block = b;
    blockIdx = make_uint3(b, 0, 0);
    m.smem.assign(smem_bytes, 0xff);
    m.thread.assign(threads, Thread{});
    m.warp.assign(threads / kWarpSize, Warp{});
    m.live = threads;
    m.block_gen = 0;
    m.block_arrived = 0;
    for (int i = 0; i < threads; ++i) make_thread_context(&m.thread[i].context, m.stacks[i]);
    const int first = options.order == Order::kForward ? 0 : threads - 1;
    m.current = first;
    threadIdx = make_uint3(static_cast<unsigned>(first), 0, 0);
    switch_context(&m.host, &m.thread[first].context);
  }
  tl_machine = outer;
}

}  // namespace simt

// ---------------------------------------------------------------------------------------------
// CUDA built-in functions.

inline void __syncthreads() { simt::block_barrier(); }

inline void __syncwarp(unsigned mask = simt::kFullMask) {
  simt::check_full_mask(mask, "__syncwarp");
  simt::Slot& s = simt::slot();
  simt::collective(s, simt::kSyncwarp);
}

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask, int width = simt::kWarpSize) {
  simt::check_full_mask(mask, "__shfl_xor_sync");
  if (width != simt::kWarpSize) simt::fail("__shfl_xor_sync with width %d: only 32 is emulated", width);
  simt::Slot& s = simt::slot();
  const int l = simt::lane();
  s.f[l][0] = value;
  simt::collective(s, simt::kShuffle);
  return s.f[(l ^ lane_mask) & (simt::kWarpSize - 1)][0];
}

inline float __shfl_sync(unsigned mask, float value, int src_lane, int width = simt::kWarpSize) {
  simt::check_full_mask(mask, "__shfl_sync");
  if (width != simt::kWarpSize) simt::fail("__shfl_sync with width %d: only 32 is emulated", width);
  simt::Slot& s = simt::slot();
  s.f[simt::lane()][0] = value;
  simt::collective(s, simt::kShuffleIdx);
  return s.f[src_lane & (simt::kWarpSize - 1)][0];
}

// CUDA's integer min and max (the device math library's overloads).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

namespace simt {
// A global access of a T must be aligned to T (16 bytes for a uint4): the device faults with
// "misaligned address" where a host CPU would not.
template <class T>
inline void check_aligned(const char* what, const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
    simt::fail("%s of %p: a %zu-byte access not aligned to %zu bytes", what, p, sizeof(T), alignof(T));
  }
}
}  // namespace simt

template <class T>
inline T __ldg(const T* p) {
  if (!simt::is_global(p, sizeof(T))) simt::fail("__ldg of %p: not in a registered global buffer", static_cast<const void*>(p));
  simt::check_aligned<T>("__ldg", p);
  return *p;
}

// The streaming (evict-first) load and store: plain memory accesses here, the load checked as __ldg is,
// both for alignment.
template <class T>
inline T __ldcs(const T* p) {
  if (!simt::is_global(p, sizeof(T))) simt::fail("__ldcs of %p: not in a registered global buffer", static_cast<const void*>(p));
  simt::check_aligned<T>("__ldcs", p);
  return *p;
}

template <class T>
inline void __stcs(T* p, T value) {
  simt::check_aligned<T>("__stcs", p);
  *p = value;
}

inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }

// The dtype tags (F32, F16, BF16) and vector access of genkernels/vec.cuh, on the built-ins above.
#include "genkernels/vec.cuh"

// ---------------------------------------------------------------------------------------------
// genkernels/mma.cuh and the dynamic shared memory that kernels built on it expect.

namespace genkernels {

inline unsigned char* dynamic_shared_memory() { return simt::machine().smem.data(); }

inline uint32_t shared_address(const void* p) {
  const auto* b = static_cast<const unsigned char*>(p);
  const auto& smem = simt::machine().smem;
  if (b < smem.data() || b > smem.data() + smem.size()) simt::fail("shared_address of a pointer outside shared memory");
  return static_cast<uint32_t>(b - smem.data());
}

inline void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  if (src_bytes != 0 && src_bytes != 16) simt::fail("cp.async with src-size %d: 0 or 16 only", src_bytes);
  if (dst % 16 != 0) simt::fail("cp.async destination %u is not 16-byte aligned", dst);
  simt::check_smem(dst, 16, "cp.async");
  if (src_bytes == 16 && reinterpret_cast<uintptr_t>(src) % 16 != 0) simt::fail("cp.async source is not 16-byte aligned");
  if (!simt::is_global(src, static_cast<size_t>(src_bytes == 0 ? 1 : src_bytes))) {
    simt::fail("cp.async source %p (%d bytes) is not in a registered global buffer", src, src_bytes);
  }
  const simt::Copy c{dst, src, src_bytes};
  if (simt::machine().options.landing == simt::Landing::kImmediate) {
    simt::land(c);
  } else {
    simt::self().uncommitted.push_back(c);
  }
}

inline void cp_async_commit() {
  simt::Thread& t = simt::self();
  t.in_flight.push_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}

template <int N>
inline void cp_async_wait() {
  simt::Thread& t = simt::self();
  while (t.in_flight.size() > static_cast<size_t>(N)) {
    for (const simt::Copy& c : t.in_flight.front()) simt::land(c);
    t.in_flight.pop_front();
  }
}

namespace emu {

inline uint16_t smem16(uint32_t address) {
  uint16_t v;
  std::memcpy(&v, simt::machine().smem.data() + address, 2);
  return v;
}

// ldmatrix.m8n8.x4: lanes 8i .. 8i + 7 address rows 0..7 of matrix i; register i of lane l
// receives row l / 4, columns 2(l % 4) and 2(l % 4) + 1 of matrix i (with .trans: rows
// 2(l % 4), 2(l % 4) + 1 of column l / 4).
inline void ldmatrix(uint32_t (&r)[4], uint32_t address, bool trans) {
  if (address % 16 != 0) simt::fail("ldmatrix row address %u is not 16-byte aligned", address);
  simt::check_smem(address, 16, "ldmatrix");
  simt::Slot& s = simt::slot();
  const int l = simt::lane();
  s.u[l][0] = address;
  simt::collective(s, trans ? simt::kLdmatrixTrans : simt::kLdmatrix);
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint32_t row = s.u[8 * i + l / 4][0];
      lo = smem16(row + 2 * (2 * (l % 4)));
      hi = smem16(row + 2 * (2 * (l % 4) + 1));
    } else {
      lo = smem16(s.u[8 * i + 2 * (l % 4)][0] + 2 * (l / 4));
      hi = smem16(s.u[8 * i + 2 * (l % 4) + 1][0] + 2 * (l / 4));
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

template <class T>
inline float decode(uint32_t bits16) {
  const auto b = static_cast<uint16_t>(bits16);
  if constexpr (std::is_same_v<T, F16>) {
    __half_raw raw;
    raw.x = b;
    return __half2float(__half(raw));
  } else {
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
}

}  // namespace emu

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) { emu::ldmatrix(r, address, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) { emu::ldmatrix(r, address, true); }

// mma.sync.m16n8k16.row.col.f32: D = A B + C with the fragment layouts of mma.cuh.
template <class T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, F16> || std::is_same_v<T, BF16>, "mma_16816 takes F16 or BF16");
  simt::Slot& s = simt::slot();
  const int l = simt::lane();
  for (int i = 0; i < 4; ++i) s.u[l][i] = a[i], s.f[l][i] = d[i];
  s.u[l][4] = b0;
  s.u[l][5] = b1;
  simt::collective(s, std::is_same_v<T, F16> ? simt::kMmaF16 : simt::kMmaBF16);
  if (!s.ready) {
    float A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < simt::kWarpSize; ++lane) {
      const int g = lane / 4, t = lane % 4;
      for (int i = 0; i < 4; ++i) {  // a[i]: rows g (i even) or g + 8, columns 2t (+ 8 for i >= 2)
        const int row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);
        A[row][col] = emu::decode<T>(s.u[lane][i] & 0xffffu);
        A[row][col + 1] = emu::decode<T>(s.u[lane][i] >> 16);
      }
      for (int i = 0; i < 2; ++i) {  // b[i]: rows 2t, 2t + 1 (+ 8 for b[1]) of column g
        B[2 * t + 8 * i][g] = emu::decode<T>(s.u[lane][4 + i] & 0xffffu);
        B[2 * t + 8 * i + 1][g] = emu::decode<T>(s.u[lane][4 + i] >> 16);
      }
      for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = s.f[lane][i];
    }
    for (int row = 0; row < 16; ++row) {
      for (int col = 0; col < 8; ++col) {
        double acc = C[row][col];
        for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * B[k][col];
        s.result[row][col] = static_cast<float>(acc);
      }
    }
    s.ready = true;
  }
  const int g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) d[i] = s.result[g + 8 * (i >> 1)][2 * t + (i & 1)];
}

template <class T>
inline uint32_t pack2(float lo, float hi) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, F16>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    std::memcpy(&bits, &h, sizeof(bits));
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    std::memcpy(&bits, &h, sizeof(bits));
  }
  return bits;
}

}  // namespace genkernels

namespace simt {

// What a driver reports for one case: pass or fail, and the line it prints.
struct Outcome {
  bool ok;
  std::string line;
};

// Runs run(n) for n in [0, count) on up to `jobs` worker threads (each case its own emulated
// machine), then prints every outcome's line in order and PASSED or FAILED k; returns the exit
// status (0 when every case passed).
template <class Run>
int run_cases(size_t count, unsigned jobs, Run run) {
  std::vector<Outcome> outcome(count);
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t n; (n = next++) < count;) outcome[n] = run(n);
  };
  std::vector<std::thread> workers;
  for (unsigned w = 0; w < std::min<size_t>(jobs, count); ++w) workers.emplace_back(work);
  for (std::thread& w : workers) w.join();
  int failed = 0;
  for (const Outcome& o : outcome) {
    printf("%s\n", o.line.c_str());
    failed += !o.ok;
  }
  if (failed) {
    printf("FAILED %d\n", failed);
  } else {
    printf("PASSED\n");
  }
  return failed ? 1 : 0;
}

}  // namespace simt
