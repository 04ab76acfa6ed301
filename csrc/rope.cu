// Rotary position embedding of q and k, forward and inverse: argument checks and the launch. The kernel,
// and the description of what it computes, are in genkernels/rope.cuh, compiled here with nvcc
// (tests/cuda/emulator runs the same source on the CPU).
#include <cstdint>
#include <stdexcept>
#include <string>

#include "genkernels/api.h"
#include "genkernels/rope.cuh"
#include "genkernels/runtime.cuh"

namespace genkernels {
namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("genkernels: rope: " + what); }

// The kernel's view of an operand with `heads` heads (0: absent) and its output.
RopeOperand operand(const char* name, const RopeProblem& p, int64_t heads, const RopeTensor& in,
                    const RopeTensor& out) {
  RopeOperand t{};
  t.rows = p.batch * heads * p.len;
  if (t.rows == 0) return t;
  if (in.ptr == 0 || out.ptr == 0) fail(std::string(name) + " and its output must be non-null");
  for (int d = 0; d < 3; ++d) {
    if (in.strides[d] < 0 || out.strides[d] < 0) fail(std::string(name) + " has a negative stride");
    t.xs[d] = in.strides[d];
    t.os[d] = out.strides[d];
  }
  // In place is an output that is the input, element for element; any other overlap is refused upstream.
  if (in.ptr == out.ptr && in.strides != out.strides) {
    fail(std::string(name) + "'s output starts at " + name + " but has other strides");
  }
  t.x = reinterpret_cast<const void*>(in.ptr);
  t.out = reinterpret_cast<void*>(out.ptr);
  t.heads = heads;
  return t;
}

}  // namespace

void rope_rotate(const RopeProblem& p, const RopeTensor& q, const RopeTensor& q_out, const RopeTensor& k,
                 const RopeTensor& k_out, uintptr_t cos, uintptr_t sin, bool interleaved, bool inverse,
                 uintptr_t stream_handle) {
  if (p.batch <= 0 || p.len <= 0 || p.head_dim <= 0) {
    fail("batch, len and head_dim must be > 0, got " + std::to_string(p.batch) + ", " + std::to_string(p.len) +
         ", " + std::to_string(p.head_dim));
  }
  if (p.heads_q < 0 || p.heads_k < 0) fail("heads_q and heads_k must be >= 0");
  if (p.pairs < 1 || 2 * p.pairs > p.head_dim) {
    fail("pairs must be in [1, head_dim / 2 = " + std::to_string(p.head_dim / 2) + "], got " +
         std::to_string(p.pairs));
  }
  if (cos == 0 || sin == 0) fail("cos and sin must be non-null");
  if (p.cos_stride < 0 || p.sin_stride < 0) fail("the table row strides must be >= 0");
  element_bytes(p.dtype);
  element_bytes(p.cos_dtype);
  element_bytes(p.sin_dtype);
  RopeArgs a{};
  a.q = operand("q", p, p.heads_q, q, q_out);
  a.k = operand("k", p, p.heads_k, k, k_out);
  if (a.q.rows + a.k.rows == 0) fail("q and k are both empty: nothing to launch");
  a.cos = reinterpret_cast<const void*>(cos);
  a.sin = reinterpret_cast<const void*>(sin);
  a.cos_stride = p.cos_stride;
  a.sin_stride = p.sin_stride;
  a.cos_dtype = p.cos_dtype;
  a.sin_dtype = p.sin_dtype;
  a.len = p.len;
  a.pairs = p.pairs;
  a.sign = inverse ? -1.f : 1.f;
  // Out of place (for either tensor) the pass-through channels are copied; for an operand that is in
  // place the copy rewrites each element with its own bits, which is harmless.
  const bool copy = 2 * p.pairs < p.head_dim && ((a.q.rows && a.q.x != a.q.out) || (a.k.rows && a.k.x != a.k.out));
  const uintptr_t ptrs[4] = {a.q.rows ? q.ptr : 0, a.q.rows ? q_out.ptr : 0, a.k.rows ? k.ptr : 0,
                             a.k.rows ? k_out.ptr : 0};
  const int vec = vector_width(p.dtype, interleaved ? 2 * p.pairs : p.pairs, {ptrs[0], ptrs[1], ptrs[2], ptrs[3]},
                               {a.q.xs[0], a.q.xs[1], a.q.xs[2], a.q.os[0], a.q.os[1], a.q.os[2], a.k.xs[0],
                                a.k.xs[1], a.k.xs[2], a.k.os[0], a.k.os[1], a.k.os[2], copy ? p.head_dim : 0});
  rope_plan(a, interleaved, vec, p.head_dim, copy);
  const int64_t blocks = ceil_div(a.total, kRopeThreads);
  if (blocks > INT32_MAX) fail(std::to_string(a.total) + " work units need more than 2^31 - 1 blocks");
  use_device(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  const auto grid = static_cast<unsigned int>(blocks);
  with_vector(p.dtype, vec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    if (interleaved) {
      rope_kernel<true, D, kVec><<<grid, kRopeThreads, 0, stream>>>(a);
    } else {
      rope_kernel<false, D, kVec><<<grid, kRopeThreads, 0, stream>>>(a);
    }
  });
  check_launch("rope_kernel");
}

}  // namespace genkernels
