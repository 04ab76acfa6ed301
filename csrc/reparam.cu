// The reparameterization trick, forward (z and the per-sample KL) and backward: argument checks,
// the chunking of the work and the launches. The kernels, and the description of what they
// compute, are in genkernels/reparam.cuh, compiled here with nvcc (tests/cuda/emulator runs the
// same source on the CPU).
#include <algorithm>
#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "genkernels/api.h"
#include "genkernels/reparam.cuh"
#include "genkernels/runtime.cuh"

namespace genkernels {
namespace {

// Chunks of a sample: a power of two times kChunkMin elements (so a multiple of every vector
// width, and at least 8 elements a thread at the widest vector), sized for about kTargetBlocks
// blocks and at most kChunkMax elements. A function of (B, R*K) alone: the KL's summation order,
// hence its rounding, does not depend on the GPU the op runs on.
constexpr int64_t kChunkMin = 8 * kReparamThreads;
constexpr int64_t kChunkMax = 256 * kReparamThreads;
constexpr int64_t kTargetBlocks = 4096;

void fail(const std::string& what) { throw std::invalid_argument("genkernels: reparameterize: " + what); }

struct Plan {
  int64_t n, chunk, chunks;
};

Plan plan(const ReparamProblem& p) {
  Plan s{};
  s.n = p.rows * p.cols;
  const int64_t want = ceil_div(p.batch * s.n, kTargetBlocks);
  s.chunk = kChunkMin;
  while (s.chunk < want && s.chunk < kChunkMax) s.chunk *= 2;
  s.chunks = ceil_div(s.n, s.chunk);
  return s;
}

std::string sizes(const ReparamProblem& p) {
  return "(B, R, K) = (" + std::to_string(p.batch) + ", " + std::to_string(p.rows) + ", " + std::to_string(p.cols) +
         ")";
}

void check_strides(const char* name, const std::array<int64_t, 2>& s) {
  if (s[0] < 0 || s[1] < 0) {
    fail(std::string(name) + " strides must be >= 0, got (" + std::to_string(s[0]) + ", " + std::to_string(s[1]) +
         ")");
  }
}

Plan check_problem(const ReparamProblem& p) {
  if (p.batch <= 0 || p.rows <= 0 || p.cols <= 0) fail("B, R and K must be > 0, got " + sizes(p));
  if (p.rows > INT64_MAX / p.cols || p.batch > INT64_MAX / 2 / (p.rows * p.cols)) fail(sizes(p) + " overflows");
  element_bytes(p.dtype);
  check_strides("mean", p.mean_strides);
  check_strides("logvar", p.logvar_strides);
  const Plan s = plan(p);
  if (p.batch > INT32_MAX / s.chunks) {
    fail(sizes(p) + " needs " + std::to_string(p.batch) + " x " + std::to_string(s.chunks) +
         " blocks, more than a grid holds (2^31 - 1)");
  }
  return s;
}

// A stride that is never multiplied by a non-zero index (R == 1 rows, B == 1 samples) is whatever
// torch reports; it must not stop the vector path.
View<const void*> input_view(const ReparamProblem& p, uintptr_t ptr, const std::array<int64_t, 2>& s) {
  return {reinterpret_cast<const void*>(ptr), p.batch > 1 ? s[0] : 0, p.rows > 1 ? s[1] : 0};
}

View<void*> output_view(const ReparamProblem& p, uintptr_t ptr, const std::array<int64_t, 2>& s) {
  return {reinterpret_cast<void*>(ptr), p.batch > 1 ? s[0] : 0, p.rows > 1 ? s[1] : 0};
}

ReparamShape shape(const ReparamProblem& p, const Plan& s, uintptr_t noise, uint64_t seed, uintptr_t seed_tensor,
                   uint64_t offset, bool deterministic) {
  if (seed_tensor % 8 != 0) fail("the seed tensor must be an int64 tensor");
  ReparamShape r{};
  r.rows = p.rows;
  r.cols = p.cols;
  r.n = s.n;
  r.chunk = s.chunk;
  r.chunks = s.chunks;
  r.noise = deterministic ? nullptr : reinterpret_cast<const void*>(noise);
  r.seed = seed;
  r.offset = offset;
  r.seed_ptr = reinterpret_cast<const long long*>(seed_tensor);
  r.philox = !deterministic && noise == 0;
  return r;
}

// Launches the forward or the backward kernel (by the arguments' type) on p's device and the
// stream: one block of kReparamThreads per chunk of each sample, vec elements a thread and step.
// Returns the stream.
template <class Args>
cudaStream_t launch(const ReparamProblem& p, const Plan& s, int vec, uintptr_t stream_handle, const Args& a) {
  constexpr bool kForward = std::is_same_v<Args, ReparamForwardArgs>;
  use_device(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  const auto grid = static_cast<unsigned int>(p.batch * s.chunks);
  with_vector(p.dtype, vec, [&](auto d, auto v) {
    using D = decltype(d);
    constexpr int kVec = decltype(v)::value;
    if constexpr (kForward) {
      reparam_forward_kernel<D, kVec><<<grid, kReparamThreads, 0, stream>>>(a);
    } else {
      reparam_backward_kernel<D, kVec><<<grid, kReparamThreads, 0, stream>>>(a);
    }
  });
  check_launch(kForward ? "reparam_forward_kernel" : "reparam_backward_kernel");
  return stream;
}

}  // namespace

size_t reparam_forward_workspace(const ReparamProblem& p) {
  const Plan s = check_problem(p);
  return s.chunks > 1 ? static_cast<size_t>(p.batch * s.chunks) * sizeof(float) : 0;
}

void reparam_forward(const ReparamProblem& p, uintptr_t mean, uintptr_t logvar, uintptr_t noise, uintptr_t z,
                     uintptr_t kl, uint64_t seed, uintptr_t seed_tensor, uint64_t offset, bool deterministic,
                     uintptr_t workspace, size_t workspace_bytes, uintptr_t stream_handle) {
  const Plan s = check_problem(p);
  if (mean == 0 || logvar == 0 || z == 0) fail("mean, logvar and z must be non-null");
  if (kl % 4 != 0) fail("kl must be a float32 tensor");
  ReparamForwardArgs a{};
  a.s = shape(p, s, noise, seed, seed_tensor, offset, deterministic);
  a.mean = input_view(p, mean, p.mean_strides);
  a.logvar = input_view(p, logvar, p.logvar_strides);
  a.z = reinterpret_cast<void*>(z);
  float* const kl_out = reinterpret_cast<float*>(kl);
  a.partials = kl_out;
  if (kl != 0 && s.chunks > 1) {
    const size_t need = static_cast<size_t>(p.batch * s.chunks) * sizeof(float);
    if (workspace == 0 || workspace % 4 != 0 || workspace_bytes < need) {
      fail("workspace of " + std::to_string(workspace_bytes) + " bytes, need " + std::to_string(need) +
           " (reparam_forward_workspace)");
    }
    a.partials = reinterpret_cast<float*>(workspace);
  }
  const int vec = vector_width(p.dtype, p.cols, {mean, logvar, a.s.noise != nullptr ? noise : 0, z},
                               {a.mean.batch, a.mean.row, a.logvar.batch, a.logvar.row});
  const cudaStream_t stream = launch(p, s, vec, stream_handle, a);
  if (kl != 0 && s.chunks > 1) {
    kl_merge_kernel<<<static_cast<unsigned int>(p.batch), 32, 0, stream>>>(a.partials, kl_out, s.chunks);
    check_launch("kl_merge_kernel");
  }
}

void reparam_backward(const ReparamProblem& p, uintptr_t dz, uintptr_t dkl, uintptr_t mean, uintptr_t logvar,
                      uintptr_t noise, uint64_t seed, uintptr_t seed_tensor, uint64_t offset, bool deterministic,
                      uintptr_t dmean, const std::array<int64_t, 2>& dmean_strides, uintptr_t dlogvar,
                      const std::array<int64_t, 2>& dlogvar_strides, uintptr_t stream_handle) {
  const Plan s = check_problem(p);
  check_strides("dmean", dmean_strides);
  check_strides("dlogvar", dlogvar_strides);
  if (dmean == 0 && dlogvar == 0) return;  // nothing wanted
  if (mean == 0 || logvar == 0) fail("mean and logvar must be non-null");
  if (dkl % 4 != 0) fail("dkl must be a float32 tensor");
  ReparamBackwardArgs a{};
  a.s = shape(p, s, noise, seed, seed_tensor, offset, deterministic);
  a.mean = input_view(p, mean, p.mean_strides);
  a.logvar = input_view(p, logvar, p.logvar_strides);
  a.dz = reinterpret_cast<const void*>(dz);
  a.dkl = reinterpret_cast<const float*>(dkl);
  a.dmean = output_view(p, dmean, dmean_strides);
  a.dlogvar = output_view(p, dlogvar, dlogvar_strides);
  // Only the tensors the kernel touches constrain the vector width (the host mirrors its conditions).
  const bool want_dmean = dmean != 0, want_dlogvar = dlogvar != 0;
  const bool read_mean = want_dmean && dkl != 0;
  const bool read_noise = want_dlogvar && dz != 0 && a.s.noise != nullptr;
  const int vec = vector_width(
      p.dtype, p.cols, {dz, read_mean ? mean : 0, want_dlogvar ? logvar : 0, read_noise ? noise : 0, dmean, dlogvar},
      {read_mean ? a.mean.batch : 0, read_mean ? a.mean.row : 0, want_dlogvar ? a.logvar.batch : 0,
       want_dlogvar ? a.logvar.row : 0, a.dmean.batch, a.dmean.row, a.dlogvar.batch, a.dlogvar.row});
  launch(p, s, vec, stream_handle, a);
}

}  // namespace genkernels
