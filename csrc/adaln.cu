// Adaptive LayerNorm (layer_norm_modulate, gated_residual and the two fused), forward and backward:
// argument checks, the work split and the launches. The kernels, and the description of what they
// compute, are in genkernels/adaln.cuh, compiled here with nvcc (tests/cuda/emulator runs the same
// source on the CPU).
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "genkernels/adaln.cuh"
#include "genkernels/api.h"
#include "genkernels/runtime.cuh"

namespace genkernels {
namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("genkernels: adaln: " + what); }

void check_problem(const AdalnProblem& p) {
  if (p.rows <= 0 || p.tokens <= 0 || p.dim <= 0) {
    fail("rows, tokens and dim must be > 0, got " + std::to_string(p.rows) + ", " + std::to_string(p.tokens) +
         " and " + std::to_string(p.dim));
  }
  if (p.rows % p.tokens != 0) {
    fail("rows (" + std::to_string(p.rows) + ") must be a multiple of tokens (" + std::to_string(p.tokens) + ")");
  }
  if (p.dim > kAdalnMaxDim) {
    fail("dim " + std::to_string(p.dim) + " is above the largest supported, " + std::to_string(kAdalnMaxDim));
  }
  element_bytes(p.dtype);
}

// The kernels' view of an input: row r = b L + l at b * sb + l * sl.
Operand operand(const AdalnProblem& p, const AdalnTensor& t, const char* name, bool side) {
  if (t.ptr == 0) return Operand{nullptr, 0, 0, kFloat32};
  if (t.row_stride < 0) fail(std::string(name) + " has a negative row stride");
  if (!side && t.dtype != p.dtype) fail(std::string(name) + " must have the dtype of x");
  if (side && t.dtype != p.dtype && t.dtype != kFloat32) fail(std::string(name) + " must have x's dtype or float32");
  element_bytes(t.dtype);
  const int64_t sb = t.per_token ? t.row_stride * p.tokens : t.row_stride;
  const int64_t sl = t.per_token ? t.row_stride : 0;
  return Operand{reinterpret_cast<const void*>(t.ptr), sb, sl, t.dtype};
}

Target target(const AdalnProblem& p, const AdalnTensor& t, const char* name, bool side) {
  const Operand o = operand(p, t, name, side);
  return Target{const_cast<void*>(o.p), o.sb, o.sl, o.dtype};
}

// weight and bias: in p.param_dtype, float32 or x's dtype, aligned to it.
void check_params(const AdalnProblem& p, std::initializer_list<uintptr_t> ptrs) {
  if (p.param_dtype != kFloat32 && p.param_dtype != p.dtype) {
    fail("weight and bias must be float32 or have x's dtype, got dtype code " + std::to_string(p.param_dtype));
  }
  const auto bytes = static_cast<uintptr_t>(element_bytes(p.param_dtype));
  for (const uintptr_t ptr : ptrs) {
    if (ptr % bytes != 0) fail("weight and bias must be aligned to their dtype");
  }
}

void check_float32(std::initializer_list<uintptr_t> ptrs, const char* names) {
  for (const uintptr_t ptr : ptrs) {
    if (ptr % 4 != 0) fail(std::string(names) + " must be float32 tensors");
  }
}

// kAdalnVec when D, every row stride and every pointer in use allow it, else 1.
int vector_of(const AdalnProblem& p, std::initializer_list<AdalnTensor> tensors,
              std::initializer_list<uintptr_t> params) {
  const int wide = kAdalnVec;
  if (p.dim % wide != 0) return 1;
  for (const AdalnTensor& t : tensors) {
    if (t.ptr == 0) continue;
    if (t.ptr % 16 != 0 || t.row_stride % wide != 0) return 1;
  }
  for (const uintptr_t ptr : params) {
    if (ptr % 16 != 0) return 1;
  }
  return wide;
}

unsigned int grid_of(int64_t blocks) {
  if (blocks > INT32_MAX) fail("the problem needs more than 2^31 - 1 blocks");
  return static_cast<unsigned int>(blocks);
}

int threads_of(const AdalnShape& s) { return s.group * s.slots; }

}  // namespace

int64_t adaln_max_dim() { return kAdalnMaxDim; }

void adaln_forward(const AdalnProblem& p, const AdalnTensor& x, const AdalnTensor& res, const AdalnTensor& gate,
                   uintptr_t weight, uintptr_t bias, const AdalnTensor& shift, const AdalnTensor& scale,
                   const AdalnTensor& h, const AdalnTensor& out, uintptr_t mean, uintptr_t rstd, float eps, bool rms,
                   bool norm, uintptr_t stream_handle) {
  check_problem(p);
  if (x.ptr == 0) fail("x must be non-null");
  if ((res.ptr == 0) != (h.ptr == 0)) fail("the residual's y and h come together (both non-null or both null)");
  if (gate.ptr != 0 && res.ptr == 0) fail("a gate needs the residual's y (and h)");
  if (!norm && res.ptr == 0) fail("without the norm there must be a residual (y, h)");
  if (norm && out.ptr == 0) fail("out must be non-null");
  if (norm && !(eps > 0.f)) fail("eps must be > 0, got " + std::to_string(eps));
  check_params(p, {weight, bias});
  check_float32({mean, rstd}, "mean and rstd");
  AdalnForwardArgs a{};
  a.x = operand(p, x, "x", false);
  a.res = operand(p, res, "y", false);
  a.gate = operand(p, gate, "gate", true);
  a.shift = norm ? operand(p, shift, "shift", true) : Operand{nullptr, 0, 0, kFloat32};
  a.scale = norm ? operand(p, scale, "scale", true) : Operand{nullptr, 0, 0, kFloat32};
  a.weight = norm ? reinterpret_cast<const void*>(weight) : nullptr;
  a.bias = norm ? reinterpret_cast<const void*>(bias) : nullptr;
  a.w_dtype = a.b_dtype = p.param_dtype;
  a.h = target(p, h, "h", false);
  a.out = norm ? target(p, out, "out", false) : Target{nullptr, 0, 0, kFloat32};
  a.mean = norm ? reinterpret_cast<float*>(mean) : nullptr;
  a.rstd = norm ? reinterpret_cast<float*>(rstd) : nullptr;
  a.eps = eps;
  a.norm = norm;
  a.rms = rms;
  const int vec = vector_of(p, {x, res, gate, shift, scale, h, out}, {weight, bias});
  a.s = adaln_shape(p.rows, p.tokens, p.dim, vec, 1, adaln_forward_vectors(vec));
  const unsigned int grid = grid_of(ceil_div(p.rows, a.s.slots));
  use_device(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  with_adaln_vector(p.dtype, vec, [&](auto d, auto v) {
    with_bool(a.res.p != nullptr, [&](auto residual) {
      with_adaln_forward_k(a.s.count, [&](auto k) {
        adaln_forward_kernel<decltype(d), decltype(v)::value, decltype(residual)::value, decltype(k)::value>
            <<<grid, threads_of(a.s), 0, stream>>>(a);
      });
    });
  });
  check_launch("adaln_forward_kernel");
}

size_t adaln_backward_workspace(const AdalnProblem& p, int quantities) {
  check_problem(p);
  if (quantities < 0 || quantities > kAdalnQuantities) fail("quantities must be in [0, 5]");
  if (quantities == 0) return 0;
  const int64_t chunk = adaln_chunk(p.rows, p.tokens, true, device_info(p.device).sms);
  const int64_t blocks = p.rows / p.tokens * ceil_div(p.tokens, chunk);
  return static_cast<size_t>(quantities) * static_cast<size_t>(blocks * p.dim) * sizeof(float);
}

void adaln_backward(const AdalnProblem& p, const AdalnTensor& h, const AdalnTensor& dout, const AdalnTensor& dh,
                    const AdalnTensor& res, const AdalnTensor& gate, uintptr_t weight, uintptr_t bias,
                    const AdalnTensor& shift, const AdalnTensor& scale, uintptr_t mean, uintptr_t rstd,
                    const AdalnTensor& dx, const AdalnTensor& dres, const AdalnTensor& dshift,
                    const AdalnTensor& dscale, const AdalnTensor& dgate, uintptr_t dweight, uintptr_t dbias,
                    uintptr_t workspace, size_t workspace_bytes, bool rms, bool norm, uintptr_t stream_handle) {
  check_problem(p);
  if (dout.ptr == 0) fail("dout must be non-null");
  if ((res.ptr == 0) != (gate.ptr == 0)) fail("the residual's y and gate come together");
  if (!norm && res.ptr == 0) fail("without the norm there must be a residual (y, gate)");
  if (norm && (h.ptr == 0 || mean == 0 || rstd == 0)) fail("the norm's backward needs h (or x), mean and rstd");
  if (res.ptr == 0 && (dres.ptr != 0 || dgate.ptr != 0)) fail("dy and dgate need the residual's y and gate");
  if (!norm && (dh.ptr != 0 || dshift.ptr != 0 || dscale.ptr != 0 || dweight != 0 || dbias != 0)) {
    fail("dh, dshift, dscale, dweight and dbias belong to the norm");
  }
  if ((dshift.ptr != 0 && shift.ptr == 0) || (dscale.ptr != 0 && scale.ptr == 0) ||
      (dweight != 0 && weight == 0) || (dbias != 0 && bias == 0)) {
    fail("a gradient was asked of an absent input (shift, scale, weight or bias)");
  }
  check_params(p, {weight, bias});
  check_float32({mean, rstd, dweight, dbias, workspace}, "mean, rstd, dweight, dbias and workspace");
  for (const AdalnTensor* t : {&dshift, &dscale, &dgate}) {
    if (t->ptr != 0 && !t->per_token && (t->dtype != kFloat32 || t->ptr % 4 != 0)) {
      fail("per-sample gradients (dshift, dscale, dgate) are contiguous float32 (B, D)");
    }
  }
  if (dshift.ptr != 0 && dshift.per_token != shift.per_token) fail("dshift must be per token exactly when shift is");
  if (dscale.ptr != 0 && dscale.per_token != scale.per_token) fail("dscale must be per token exactly when scale is");
  if (dgate.ptr != 0 && dgate.per_token != gate.per_token) fail("dgate must be per token exactly when gate is");

  AdalnBackwardArgs a{};
  const Operand none{nullptr, 0, 0, kFloat32};
  const Target no_target{nullptr, 0, 0, kFloat32};
  a.h = norm ? operand(p, h, "h", false) : none;
  a.dout = operand(p, dout, "dout", false);
  a.dh = norm ? operand(p, dh, "dh", false) : none;
  a.res = operand(p, res, "y", false);
  a.gate = operand(p, gate, "gate", true);
  a.shift = norm ? operand(p, shift, "shift", true) : none;
  a.scale = norm ? operand(p, scale, "scale", true) : none;
  a.weight = norm ? reinterpret_cast<const void*>(weight) : nullptr;
  a.bias = norm ? reinterpret_cast<const void*>(bias) : nullptr;
  a.w_dtype = a.b_dtype = p.param_dtype;
  a.mean = reinterpret_cast<const float*>(mean);
  a.rstd = reinterpret_cast<const float*>(rstd);
  a.dx = target(p, dx, "dx", false);
  a.dres = target(p, dres, "dy", false);
  a.dshift = dshift.per_token ? target(p, dshift, "dshift", true) : no_target;
  a.dscale = dscale.per_token ? target(p, dscale, "dscale", true) : no_target;
  a.dgate = dgate.per_token ? target(p, dgate, "dgate", true) : no_target;
  a.norm = norm;
  a.rms = rms;
  // The column sums, in the order of AdalnQuantity, where each lands, and its partials in the workspace
  // (the wanted ones back to back).
  const uintptr_t sums[kAdalnQuantities] = {dweight, dbias, dshift.per_token ? 0 : dshift.ptr,
                                            dscale.per_token ? 0 : dscale.ptr, dgate.per_token ? 0 : dgate.ptr};
  int quantities = 0;
  for (const uintptr_t sum : sums) quantities += sum != 0;

  const int vec = vector_of(p, {h, dout, dh, res, gate, shift, scale, dx, dres, dshift, dscale, dgate}, {weight, bias});
  const int sms = device_info(p.device).sms;
  a.s = adaln_shape(p.rows, p.tokens, p.dim, vec, adaln_chunk(p.rows, p.tokens, quantities > 0, sms));
  const int64_t samples = p.rows / p.tokens;
  const int64_t blocks = samples * a.s.chunks;
  const unsigned int grid = grid_of(blocks);
  const size_t need = adaln_backward_workspace(p, quantities);
  if (workspace_bytes < need || (need > 0 && workspace == 0)) {
    fail("workspace of " + std::to_string(workspace_bytes) + " bytes, need " + std::to_string(need) +
         " (adaln_backward_workspace)");
  }
  float* next = reinterpret_cast<float*>(workspace);
  for (int q = 0; q < kAdalnQuantities; ++q) {
    a.partials[q] = sums[q] != 0 ? next : nullptr;
    if (sums[q] != 0) next += blocks * p.dim;
  }
  use_device(p.device);
  const cudaStream_t stream = as_stream(stream_handle);
  with_adaln_vector(p.dtype, vec, [&](auto d, auto v) {
    adaln_backward_kernel<decltype(d), decltype(v)::value><<<grid, threads_of(a.s), 0, stream>>>(a);
  });
  check_launch("adaln_backward_kernel");
  for (int q = 0; q < kAdalnQuantities; ++q) {
    if (sums[q] == 0) continue;
    AdalnReduceArgs r{};
    r.partials = a.partials[q];
    r.out = reinterpret_cast<void*>(sums[q]);
    r.out_dtype = kFloat32;
    const bool per_sample = q >= kSumShift;
    r.groups = per_sample ? samples : 1;
    r.terms = per_sample ? a.s.chunks : blocks;
    r.dim = p.dim;
    r.col_blocks = ceil_div(p.dim, kReduceCols);
    adaln_reduce_kernel<<<grid_of(r.groups * r.col_blocks), kReduceCols * kReduceLanes, 0, stream>>>(r);
    check_launch("adaln_reduce_kernel");
  }
}

}  // namespace genkernels
