// The fused sampler step: argument checks, the stats chunking and the launches. The kernels, and
// the description of what they compute, are in genkernels/schedule_step.cuh, compiled here with
// nvcc (tests/cuda/emulator runs the same source on the CPU).
#include <algorithm>
#include <array>
#include <stdexcept>
#include <string>

#include "genkernels/api.h"
#include "genkernels/runtime.cuh"
#include "genkernels/schedule_step.cuh"

namespace genkernels {
namespace {

constexpr int kBlocksPerSm = 8;         // grid-stride step kernel: resident blocks aimed at per SM
constexpr int kStatsTargetBlocks = 256; // stats kernel: chunks sized for about this many blocks
constexpr int64_t kStatsMinChunkVectors = kThreads;
constexpr int64_t kStatsMaxChunkVectors = 16 * kThreads;

void fail(const std::string& what) { throw std::invalid_argument("genkernels: schedule_step: " + what); }

void check_problem(const StepProblem& p) {
  if (p.batch < 0 || p.n < 0) {
    fail("B and N must be >= 0, got B = " + std::to_string(p.batch) + ", N = " + std::to_string(p.n));
  }
  element_bytes(p.dtype);
  element_bytes(p.mo_dtype);
  element_bytes(p.noise_dtype);
  element_bytes(p.x0_prev_dtype);
}

unsigned int grid_dim(int64_t blocks) {
  if (blocks < 1 || blocks > 0x7fffffff) fail("grid of " + std::to_string(blocks) + " blocks");
  return static_cast<unsigned int>(blocks);
}

// Stats chunking, a function of (B, N, VEC) only (never of the device), so the rounding of the
// rescale statistics is the same on every GPU.
struct StatsPlan {
  int64_t chunk_vectors, chunks;
  size_t partial_bytes, factor_bytes;
};

constexpr size_t kAlign = 256;
size_t align_up(size_t b) { return (b + kAlign - 1) / kAlign * kAlign; }

StatsPlan plan_stats(const StepProblem& p, int vec) {
  StatsPlan s{};
  const int64_t sample_vectors = p.n / vec;
  int64_t want = ceil_div(p.batch * sample_vectors, kStatsTargetBlocks);
  int64_t cv = kStatsMinChunkVectors;
  while (cv < want && cv < kStatsMaxChunkVectors) cv *= 2;
  s.chunk_vectors = cv;
  s.chunks = std::max<int64_t>(1, ceil_div(sample_vectors, cv));
  s.partial_bytes = align_up(static_cast<size_t>(p.batch * s.chunks) * sizeof(float4));
  s.factor_bytes = align_up(static_cast<size_t>(p.batch) * sizeof(float));
  return s;
}

}  // namespace

size_t schedule_step_workspace(const StepProblem& p, uintptr_t model_output, bool guided, bool rescale) {
  check_problem(p);
  if (!guided || !rescale || model_output == 0 || p.batch == 0 || p.n == 0) return 0;
  const StatsPlan s = plan_stats(p, vector_width(p.mo_dtype, p.n, {model_output}));
  return s.partial_bytes + s.factor_bytes;
}

void schedule_step(const StepProblem& p, uintptr_t x, uintptr_t model_output, uintptr_t noise, uintptr_t x0_prev,
                   uintptr_t prev, uintptr_t x0, const std::array<float, kStepCoeffs>& values,
                   const std::array<uintptr_t, kStepCoeffs>& per_sample, bool guided, float guidance_scale,
                   bool rescale, float guidance_rescale, bool clip, float clip_value, bool philox, uint64_t seed,
                   uintptr_t seed_tensor, uint64_t offset, uintptr_t workspace, size_t workspace_bytes,
                   uintptr_t stream_handle) {
  check_problem(p);
  if (p.batch == 0 || p.n == 0) return;
  if (x == 0 || prev == 0) fail("x and prev must be non-null");
  if (guided && model_output == 0) fail("guidance needs a model output");
  if (rescale && !guided) fail("guidance rescale needs guidance");
  if (seed_tensor % 8 != 0) fail("the seed tensor must be an int64 tensor");
  for (const uintptr_t ptr : per_sample) {
    if (ptr % 4 != 0) fail("per-sample coefficients must be float32 arrays");
  }
  if (p.batch > INT64_MAX / 2 / p.n) fail("B * N overflows");
  use_device(p.device);
  const cudaStream_t stream = as_stream(stream_handle);

  StepArgs a{};
  a.x = reinterpret_cast<const void*>(x);
  a.mo = reinterpret_cast<const void*>(model_output);
  a.noise = reinterpret_cast<const void*>(noise);
  a.x0_prev = reinterpret_cast<const void*>(x0_prev);
  a.prev = reinterpret_cast<void*>(prev);
  a.x0 = reinterpret_cast<void*>(x0);
  Coef* coefs[kStepCoeffs] = {&a.px, &a.po, &a.ex, &a.e0, &a.cx, &a.c0, &a.ce, &a.cn, &a.cp};
  bool any_per_sample = false;
  for (int k = 0; k < kStepCoeffs; ++k) {
    coefs[k]->value = values[k];
    coefs[k]->per_sample = reinterpret_cast<const float*>(per_sample[k]);
    any_per_sample = any_per_sample || per_sample[k] != 0;
  }
  a.n = p.n;
  a.total = p.batch * p.n;
  a.seed = seed;
  a.seed_ptr = reinterpret_cast<const long long*>(seed_tensor);
  a.offset = offset;
  a.guidance = guidance_scale;
  a.clip = clip_value;
  a.guided = guided;
  a.clipped = clip;
  a.philox = philox && noise == 0;
  a.mo_dtype = p.mo_dtype;
  a.noise_dtype = p.noise_dtype;
  a.x0_prev_dtype = p.x0_prev_dtype;

  if (rescale) {
    const int vec = vector_width(p.mo_dtype, p.n, {model_output});
    const StatsPlan s = plan_stats(p, vec);
    if (workspace == 0 || workspace_bytes < s.partial_bytes + s.factor_bytes) {
      fail("workspace of " + std::to_string(workspace_bytes) + " bytes, need " +
           std::to_string(s.partial_bytes + s.factor_bytes));
    }
    float4* partials = reinterpret_cast<float4*>(workspace);
    float* factor = reinterpret_cast<float*>(workspace + s.partial_bytes);
    const unsigned int stats_grid = grid_dim(p.batch * s.chunks);
    with_vector(p.mo_dtype, vec, [&](auto d, auto v) {
      rescale_stats_kernel<decltype(d), decltype(v)::value><<<stats_grid, kThreads, 0, stream>>>(
          a.mo, partials, p.n, a.total, s.chunk_vectors, s.chunks, guidance_scale);
    });
    check_launch("rescale_stats_kernel");
    rescale_factor_kernel<<<grid_dim(p.batch), 32, 0, stream>>>(partials, factor, p.n, s.chunk_vectors * vec, s.chunks,
                                                               guidance_rescale);
    check_launch("rescale_factor_kernel");
    a.factor = factor;
  }
  a.per_sample = any_per_sample || a.factor != nullptr;

  const bool one_dtype = (model_output == 0 || p.mo_dtype == p.dtype) && (noise == 0 || p.noise_dtype == p.dtype) &&
                         (x0_prev == 0 || p.x0_prev_dtype == p.dtype);
  const int vec = one_dtype ? vector_width(p.dtype, p.n, {x, model_output, noise, x0_prev, prev, x0}) : 1;
  const int64_t vectors = a.total / vec;
  const int64_t max_blocks = static_cast<int64_t>(device_info(p.device).sms) * kBlocksPerSm;
  const unsigned int grid = grid_dim(std::min(ceil_div(vectors, kThreads), max_blocks));
  with_vector(p.dtype, vec, [&](auto d, auto v) {
    schedule_step_kernel<decltype(d), decltype(v)::value><<<grid, kThreads, 0, stream>>>(a);
  });
  check_launch("schedule_step_kernel");
}

}  // namespace genkernels
