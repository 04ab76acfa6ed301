// genkernels._C: the one Python module of the CUDA backend. It takes device addresses, sizes,
// dtype codes and stream handles; it includes no torch header and links no libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "genkernels/api.h"

#ifndef GENKERNELS_BUILT_ARCHS
#error "the build defines GENKERNELS_BUILT_ARCHS, e.g. \"sm_80,sm_90a,compute_90\""
#endif

namespace py = pybind11;
using genkernels::ActNormProblem;
using genkernels::AdalnProblem;
using genkernels::AdalnTensor;
using genkernels::AttentionProblem;
using genkernels::BiasActProblem;
using genkernels::CouplingProblem;
using genkernels::GroupNormProblem;
using genkernels::ModconvEpilogueProblem;
using genkernels::ReparamProblem;
using genkernels::RopeProblem;
using genkernels::RopeTensor;
using genkernels::StepProblem;

namespace {

std::vector<std::string> built_archs() {
  std::vector<std::string> out;
  std::stringstream list(GENKERNELS_BUILT_ARCHS);
  for (std::string item; std::getline(list, item, ',');) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// An adaLN operand as Python passes it: (address or 0, row stride, dtype code, per token).
using AdalnTuple = std::tuple<uintptr_t, int64_t, int, bool>;

AdalnTensor adaln_tensor(const AdalnTuple& t) {
  return AdalnTensor{std::get<0>(t), std::get<1>(t), std::get<2>(t), std::get<3>(t)};
}

// A rope operand as Python passes it: (address or 0, (batch, head, position) strides).
using RopeTuple = std::tuple<uintptr_t, std::array<int64_t, 3>>;

RopeTensor rope_tensor(const RopeTuple& t) { return RopeTensor{std::get<0>(t), std::get<1>(t)}; }

GroupNormProblem problem(int64_t n, int64_t c, int64_t s, int64_t groups, bool channels_last, int dtype, int device,
                         int64_t l2_budget) {
  return GroupNormProblem{n, c, s, groups, channels_last, dtype, device, l2_budget};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "genkernels CUDA kernels (raw-pointer launchers; see genkernels/cuda/ for the torch-facing wrappers)";

  m.def("built_archs", &built_archs,
        "Targets compiled into this module: 'sm_XY' for machine code, 'compute_XY' for PTX that the driver can "
        "JIT-compile for newer GPUs.");
  m.def("cuda_version", &genkernels::cuda_version, "CUDA runtime version compiled in (statically linked), e.g. '13.0'.");
  m.def("runtime_error", &genkernels::runtime_error,
        "Empty when the CUDA runtime works with this driver and sees a device, else the reason.");

  m.def(
      "group_norm_forward_workspace",
      [](uintptr_t x, uintptr_t y, int64_t n, int64_t c, int64_t s, int64_t groups, bool channels_last, int dtype,
         int device, int64_t l2_budget) {
        return genkernels::group_norm_forward_workspace(problem(n, c, s, groups, channels_last, dtype, device, l2_budget),
                                                        x, y);
      },
      py::arg("x"), py::arg("y"), py::arg("n"), py::arg("c"), py::arg("s"), py::arg("groups"), py::arg("channels_last"),
      py::arg("dtype"), py::arg("device"), py::arg("l2_budget"), "Scratch bytes group_norm_forward needs.");
  m.def(
      "group_norm_forward",
      [](uintptr_t x, uintptr_t weight, int w_dtype, uintptr_t bias, int b_dtype, uintptr_t y, uintptr_t mean,
         uintptr_t rstd, uintptr_t workspace, size_t workspace_bytes, int64_t n, int64_t c, int64_t s, int64_t groups,
         bool channels_last, int dtype, int device, int64_t l2_budget, float eps, bool silu, uintptr_t stream) {
        genkernels::group_norm_forward(problem(n, c, s, groups, channels_last, dtype, device, l2_budget), x, weight,
                                       w_dtype, bias, b_dtype, y, mean, rstd, workspace, workspace_bytes, eps, silu,
                                       stream);
      },
      py::arg("x"), py::arg("weight"), py::arg("w_dtype"), py::arg("bias"), py::arg("b_dtype"), py::arg("y"),
      py::arg("mean"), py::arg("rstd"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("n"), py::arg("c"),
      py::arg("s"), py::arg("groups"), py::arg("channels_last"), py::arg("dtype"), py::arg("device"),
      py::arg("l2_budget"), py::arg("eps"), py::arg("silu"), py::arg("stream"),
      "GroupNorm (+ SiLU) forward: writes y, mean and rstd. Launches on `stream`, never synchronizes.");
  m.def(
      "group_norm_backward_workspace",
      [](uintptr_t dy, uintptr_t x, uintptr_t dx, int64_t n, int64_t c, int64_t s, int64_t groups, bool channels_last,
         int dtype, int device, int64_t l2_budget) {
        return genkernels::group_norm_backward_workspace(
            problem(n, c, s, groups, channels_last, dtype, device, l2_budget), dy, x, dx);
      },
      py::arg("dy"), py::arg("x"), py::arg("dx"), py::arg("n"), py::arg("c"), py::arg("s"), py::arg("groups"),
      py::arg("channels_last"), py::arg("dtype"), py::arg("device"), py::arg("l2_budget"),
      "Scratch bytes group_norm_backward needs.");
  m.def(
      "group_norm_backward",
      [](uintptr_t dy, uintptr_t x, uintptr_t weight, int w_dtype, uintptr_t bias, int b_dtype, uintptr_t mean,
         uintptr_t rstd, uintptr_t dx, uintptr_t dweight, uintptr_t dbias, uintptr_t workspace, size_t workspace_bytes,
         int64_t n, int64_t c, int64_t s, int64_t groups, bool channels_last, int dtype, int device, int64_t l2_budget,
         bool silu, uintptr_t stream) {
        genkernels::group_norm_backward(problem(n, c, s, groups, channels_last, dtype, device, l2_budget), dy, x,
                                        weight, w_dtype, bias, b_dtype, mean, rstd, dx, dweight, dbias, workspace,
                                        workspace_bytes, silu, stream);
      },
      py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("w_dtype"), py::arg("bias"), py::arg("b_dtype"),
      py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("dweight"), py::arg("dbias"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("n"), py::arg("c"), py::arg("s"), py::arg("groups"),
      py::arg("channels_last"), py::arg("dtype"), py::arg("device"), py::arg("l2_budget"), py::arg("silu"),
      py::arg("stream"),
      "GroupNorm (+ SiLU) backward: writes dx, dweight, dbias (each optional: address 0). Never synchronizes.");
  m.def(
      "attention_forward",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t key_padding_mask, uintptr_t out, uintptr_t lse,
         int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t len_q, int64_t len_kv, int64_t head_dim,
         std::array<int64_t, 3> q_strides, std::array<int64_t, 3> k_strides, std::array<int64_t, 3> v_strides,
         std::array<int64_t, 3> out_strides, int dtype, int device, float scale, bool causal, uintptr_t stream) {
        AttentionProblem p{batch, heads_q, heads_kv, len_q, len_kv, head_dim, {}, {}, {}, {}, dtype, device};
        for (int i = 0; i < 3; ++i) {
          p.q_strides[i] = q_strides[i];
          p.k_strides[i] = k_strides[i];
          p.v_strides[i] = v_strides[i];
          p.out_strides[i] = out_strides[i];
        }
        genkernels::attention_forward(p, q, k, v, key_padding_mask, out, lse, scale, causal, stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_padding_mask"), py::arg("out"), py::arg("lse"),
      py::arg("batch"), py::arg("heads_q"), py::arg("heads_kv"), py::arg("len_q"), py::arg("len_kv"),
      py::arg("head_dim"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"), py::arg("out_strides"),
      py::arg("dtype"), py::arg("device"), py::arg("scale"), py::arg("causal"), py::arg("stream"),
      "Attention forward (fp16/bf16): writes out (B, Hq, Lq, D) at out_strides and a contiguous float32 lse (B, "
      "Hq, Lq). Strides are the (batch, head, row) strides in elements. Launches on `stream`, never "
      "synchronizes.");
  m.def(
      "schedule_step_workspace",
      [](uintptr_t model_output, int64_t batch, int64_t n, int dtype, int mo_dtype, int noise_dtype,
         int x0_prev_dtype, int device, bool guided, bool rescale) {
        const StepProblem p{batch, n, dtype, mo_dtype, noise_dtype, x0_prev_dtype, device};
        return genkernels::schedule_step_workspace(p, model_output, guided, rescale);
      },
      py::arg("model_output"), py::arg("batch"), py::arg("n"), py::arg("dtype"), py::arg("mo_dtype"),
      py::arg("noise_dtype"), py::arg("x0_prev_dtype"), py::arg("device"), py::arg("guided"), py::arg("rescale"),
      "Scratch bytes schedule_step needs (non-zero only with guidance rescale).");
  m.def(
      "schedule_step",
      [](uintptr_t x, uintptr_t model_output, uintptr_t noise, uintptr_t x0_prev, uintptr_t prev, uintptr_t x0,
         std::array<float, genkernels::kStepCoeffs> coeff_values,
         std::array<uintptr_t, genkernels::kStepCoeffs> coeff_arrays, int64_t batch, int64_t n, int dtype,
         int mo_dtype, int noise_dtype, int x0_prev_dtype, int device, bool guided, float guidance_scale,
         bool rescale, float guidance_rescale, bool clip, float clip_value, bool philox, uint64_t seed,
         uintptr_t seed_tensor, uint64_t offset, uintptr_t workspace, size_t workspace_bytes, uintptr_t stream) {
        const StepProblem p{batch, n, dtype, mo_dtype, noise_dtype, x0_prev_dtype, device};
        genkernels::schedule_step(p, x, model_output, noise, x0_prev, prev, x0, coeff_values, coeff_arrays, guided,
                                  guidance_scale, rescale, guidance_rescale, clip, clip_value, philox, seed,
                                  seed_tensor, offset, workspace, workspace_bytes, stream);
      },
      py::arg("x"), py::arg("model_output"), py::arg("noise"), py::arg("x0_prev"), py::arg("prev"), py::arg("x0"),
      py::arg("coeff_values"), py::arg("coeff_arrays"), py::arg("batch"), py::arg("n"), py::arg("dtype"),
      py::arg("mo_dtype"), py::arg("noise_dtype"), py::arg("x0_prev_dtype"), py::arg("device"), py::arg("guided"),
      py::arg("guidance_scale"), py::arg("rescale"), py::arg("guidance_rescale"), py::arg("clip"),
      py::arg("clip_value"), py::arg("philox"), py::arg("seed"), py::arg("seed_tensor"), py::arg("offset"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      "Fused sampler step on dense (B, N) views (x, prev and x0 in `dtype`; model_output, noise and x0_prev in "
      "their own dtypes): writes prev and, when its address is non-zero, x0. Coefficients px, po, ex, e0, cx, c0, "
      "ce, cn, cp: coeff_values[k], or the float32 (B,) array at coeff_arrays[k] when non-zero. The seed is read "
      "from the int64 device tensor at seed_tensor when non-zero. Launches on `stream`, never synchronizes.");
  m.def(
      "reparam_forward_workspace",
      [](int64_t batch, int64_t rows, int64_t cols, std::array<int64_t, 2> mean_strides,
         std::array<int64_t, 2> logvar_strides, int dtype, int device) {
        return genkernels::reparam_forward_workspace(
            ReparamProblem{batch, rows, cols, mean_strides, logvar_strides, dtype, device});
      },
      py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("mean_strides"), py::arg("logvar_strides"),
      py::arg("dtype"), py::arg("device"), "Scratch bytes reparam_forward needs for the KL partials (0: none).");
  m.def(
      "reparam_forward",
      [](uintptr_t mean, uintptr_t logvar, uintptr_t noise, uintptr_t z, uintptr_t kl, int64_t batch, int64_t rows,
         int64_t cols, std::array<int64_t, 2> mean_strides, std::array<int64_t, 2> logvar_strides, int dtype,
         int device, uint64_t seed, uintptr_t seed_tensor, uint64_t offset, bool deterministic, uintptr_t workspace,
         size_t workspace_bytes, uintptr_t stream) {
        genkernels::reparam_forward(ReparamProblem{batch, rows, cols, mean_strides, logvar_strides, dtype, device},
                                    mean, logvar, noise, z, kl, seed, seed_tensor, offset, deterministic, workspace,
                                    workspace_bytes, stream);
      },
      py::arg("mean"), py::arg("logvar"), py::arg("noise"), py::arg("z"), py::arg("kl"), py::arg("batch"),
      py::arg("rows"), py::arg("cols"), py::arg("mean_strides"), py::arg("logvar_strides"), py::arg("dtype"),
      py::arg("device"), py::arg("seed"), py::arg("seed_tensor"), py::arg("offset"), py::arg("deterministic"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      "Reparameterization forward on (B, R, K) views (unit stride along K; mean and logvar with their own "
      "(batch, row) strides in elements): writes z = mean + exp(clamp(logvar, -30, 20) / 2) * eps (contiguous) "
      "and, when kl is non-zero, the float32 (B,) KL to N(0, 1). eps: the noise tensor, else (not deterministic) "
      "the Philox stream keyed by (seed, offset), the seed read from the int64 device tensor at seed_tensor when "
      "non-zero. Launches on `stream`, never synchronizes.");
  m.def(
      "reparam_backward",
      [](uintptr_t dz, uintptr_t dkl, uintptr_t mean, uintptr_t logvar, uintptr_t noise, uintptr_t dmean,
         uintptr_t dlogvar, int64_t batch, int64_t rows, int64_t cols, std::array<int64_t, 2> mean_strides,
         std::array<int64_t, 2> logvar_strides, std::array<int64_t, 2> dmean_strides,
         std::array<int64_t, 2> dlogvar_strides, int dtype, int device, uint64_t seed, uintptr_t seed_tensor,
         uint64_t offset, bool deterministic, uintptr_t stream) {
        genkernels::reparam_backward(ReparamProblem{batch, rows, cols, mean_strides, logvar_strides, dtype, device},
                                     dz, dkl, mean, logvar, noise, seed, seed_tensor, offset, deterministic, dmean,
                                     dmean_strides, dlogvar, dlogvar_strides, stream);
      },
      py::arg("dz"), py::arg("dkl"), py::arg("mean"), py::arg("logvar"), py::arg("noise"), py::arg("dmean"),
      py::arg("dlogvar"), py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("mean_strides"),
      py::arg("logvar_strides"), py::arg("dmean_strides"), py::arg("dlogvar_strides"), py::arg("dtype"),
      py::arg("device"), py::arg("seed"), py::arg("seed_tensor"), py::arg("offset"), py::arg("deterministic"),
      py::arg("stream"),
      "Reparameterization backward: dmean = dz + dkl[b] * mean and dlogvar = 0.5 * dz * eps * std + "
      "0.5 * dkl[b] * (exp(lv) - 1) inside the clamp's range, else 0 (deterministic: no eps term). dz and dkl "
      "may be 0 (zero), dmean and dlogvar 0 (not written). eps as in the forward, re-drawn in the kernel. "
      "Launches on `stream`, never synchronizes.");
  m.def(
      "coupling_forward_workspace",
      [](int64_t n, int64_t c, int64_t s, int64_t h_channels, bool channels_last, int dtype, int device, int scale,
         float clamp) {
        return genkernels::coupling_forward_workspace(CouplingProblem{n, c, s, h_channels, channels_last, dtype, device},
                                                      scale, clamp);
      },
      py::arg("n"), py::arg("c"), py::arg("s"), py::arg("h_channels"), py::arg("channels_last"), py::arg("dtype"),
      py::arg("device"), py::arg("scale"), py::arg("clamp"),
      "Scratch bytes coupling_forward needs for the log-det partials (0: none).");
  m.def(
      "coupling_forward",
      [](uintptr_t x, uintptr_t h, uintptr_t y, uintptr_t logdet, int64_t n, int64_t c, int64_t s, int64_t h_channels,
         bool channels_last, int dtype, int device, int scale, float clamp, bool reverse, uintptr_t workspace,
         size_t workspace_bytes, uintptr_t stream) {
        genkernels::coupling_forward(CouplingProblem{n, c, s, h_channels, channels_last, dtype, device}, x, h, y, logdet,
                                     scale, clamp, reverse, workspace, workspace_bytes, stream);
      },
      py::arg("x"), py::arg("h"), py::arg("y"), py::arg("logdet"), py::arg("n"), py::arg("c"), py::arg("s"),
      py::arg("h_channels"), py::arg("channels_last"), py::arg("dtype"), py::arg("device"), py::arg("scale"),
      py::arg("clamp"), py::arg("reverse"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      "Affine coupling on dense (N, C, S) x and (N, Ch, S) h in one layout: y_a = x_a, y_b = x_b * s + t "
      "(reverse: (x_b - t) / s) and, when logdet is non-zero, the float32 (N,) sum of log s (reverse: negated). "
      "scale: exp 0, sigmoid 1, softclamp_tanh 2, softclamp_atan 3, additive 4. Launches on `stream`, never "
      "synchronizes.");
  m.def(
      "coupling_backward",
      [](uintptr_t dy, uintptr_t dlogdet, uintptr_t x, uintptr_t h, uintptr_t dx, uintptr_t dh, int64_t n, int64_t c,
         int64_t s, int64_t h_channels, bool channels_last, int dtype, int device, int scale, float clamp,
         uintptr_t stream) {
        genkernels::coupling_backward(CouplingProblem{n, c, s, h_channels, channels_last, dtype, device}, dy, dlogdet, x,
                                      h, dx, dh, scale, clamp, stream);
      },
      py::arg("dy"), py::arg("dlogdet"), py::arg("x"), py::arg("h"), py::arg("dx"), py::arg("dh"), py::arg("n"),
      py::arg("c"), py::arg("s"), py::arg("h_channels"), py::arg("channels_last"), py::arg("dtype"),
      py::arg("device"), py::arg("scale"), py::arg("clamp"), py::arg("stream"),
      "Affine coupling backward (forward direction): dx_a = dy_a, dx_b = dy_b * s, dt = dy_b, dh_s = (dy_b * x_b * "
      "s + dlogdet[n]) * g. dy and dlogdet may be 0 (zero), dx and dh 0 (not written). Never synchronizes.");
  m.def(
      "actnorm_forward",
      [](uintptr_t x, uintptr_t log_scale, uintptr_t bias, uintptr_t y, int64_t n, int64_t c, int64_t s,
         bool channels_last, int dtype, int device, bool reverse, uintptr_t stream) {
        genkernels::actnorm_forward(ActNormProblem{n, c, s, channels_last, dtype, device}, x, log_scale, bias, y,
                                    reverse, stream);
      },
      py::arg("x"), py::arg("log_scale"), py::arg("bias"), py::arg("y"), py::arg("n"), py::arg("c"), py::arg("s"),
      py::arg("channels_last"), py::arg("dtype"), py::arg("device"), py::arg("reverse"), py::arg("stream"),
      "ActNorm: y = (x + bias[c]) * exp(log_scale[c]) (reverse: x * exp(-log_scale[c]) - bias[c]) on dense "
      "(N, C, S) x; log_scale and bias float32 (C,). Launches on `stream`, never synchronizes.");
  m.def(
      "actnorm_backward_workspace",
      [](int64_t n, int64_t c, int64_t s, bool channels_last, int dtype, int device) {
        return genkernels::actnorm_backward_workspace(ActNormProblem{n, c, s, channels_last, dtype, device});
      },
      py::arg("n"), py::arg("c"), py::arg("s"), py::arg("channels_last"), py::arg("dtype"), py::arg("device"),
      "Scratch bytes actnorm_backward needs for the per-channel partials (0: none).");
  m.def(
      "actnorm_backward",
      [](uintptr_t dy, uintptr_t x, uintptr_t log_scale, uintptr_t bias, uintptr_t dx, uintptr_t sums, int64_t n,
         int64_t c, int64_t s, bool channels_last, int dtype, int device, uintptr_t workspace, size_t workspace_bytes,
         uintptr_t stream) {
        genkernels::actnorm_backward(ActNormProblem{n, c, s, channels_last, dtype, device}, dy, x, log_scale, bias, dx,
                                     sums, workspace, workspace_bytes, stream);
      },
      py::arg("dy"), py::arg("x"), py::arg("log_scale"), py::arg("bias"), py::arg("dx"), py::arg("sums"),
      py::arg("n"), py::arg("c"), py::arg("s"), py::arg("channels_last"), py::arg("dtype"), py::arg("device"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      "ActNorm backward: dx = dy * exp(log_scale[c]) (dx may be 0: not written) and the float32 (2, C) sums over "
      "(n, s) of dy and dy * (x + bias[c]) per channel (log_scale and bias float32 (C,)), deterministic. Never "
      "synchronizes.");
  m.def(
      "bias_act_forward",
      [](uintptr_t x, uintptr_t bias, uintptr_t y, int64_t n, int64_t stride_c, int64_t channels, int dtype,
         int device, int act, float alpha, float gain, bool has_clamp, float clamp, int bias_dtype,
         uintptr_t stream, uintptr_t codes) {
        const BiasActProblem p{n, stride_c, channels, dtype, device, act, alpha, gain, has_clamp, clamp, bias_dtype};
        genkernels::bias_act_forward(p, x, bias, y, stream, codes);
      },
      py::arg("x"), py::arg("bias"), py::arg("y"), py::arg("n"), py::arg("stride_c"), py::arg("channels"),
      py::arg("dtype"), py::arg("device"), py::arg("act"), py::arg("alpha"), py::arg("gain"), py::arg("has_clamp"),
      py::arg("clamp"), py::arg("bias_dtype"), py::arg("stream"), py::arg("codes") = 0,
      "Fused bias + activation on a dense x walked as n elements in memory order: y = act(x + bias[(e / stride_c) "
      "% channels]) * gain, clamped to [-clamp, clamp] when has_clamp. bias (channels,) in bias_dtype (the code "
      "of float32, float16 or bfloat16) or 0 (none). act: linear 0, relu 1, lrelu 2 (slope alpha), tanh 3, "
      "sigmoid 4, silu 5, gelu 6. codes (0: none): also write the gradient codes there (bias_act_codes_bytes(n) "
      "bytes; linear, relu, lrelu; x and y 16-byte aligned). Launches on `stream`, never synchronizes.");
  m.def("bias_act_codes_bytes", &genkernels::bias_act_codes_bytes, py::arg("n"),
        "Bytes of the gradient codes of n elements (2 bits an element, whole 16-bit words).");
  m.def(
      "bias_act_grad",
      [](uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t dz, int64_t n, int64_t stride_c, int64_t channels,
         int dtype, int out_dtype, int device, int act, float alpha, float gain, bool has_clamp, float clamp,
         int bias_dtype, uintptr_t stream, uintptr_t codes) {
        const BiasActProblem p{n, stride_c, channels, dtype, device, act, alpha, gain, has_clamp, clamp, bias_dtype};
        genkernels::bias_act_grad(p, dy, x, bias, dz, out_dtype, stream, codes);
      },
      py::arg("dy"), py::arg("x"), py::arg("bias"), py::arg("dz"), py::arg("n"), py::arg("stride_c"),
      py::arg("channels"), py::arg("dtype"), py::arg("out_dtype"), py::arg("device"), py::arg("act"),
      py::arg("alpha"), py::arg("gain"), py::arg("has_clamp"), py::arg("clamp"), py::arg("bias_dtype"),
      py::arg("stream"), py::arg("codes") = 0,
      "Gradient map of bias_act_forward: dz = dy * gain * act'(x + bias) * m (m: the clamp's pass mask), dy and x "
      "in `dtype`, dz in out_dtype (dtype or float32); from the forward's gradient codes instead of x and the "
      "bias when codes is not 0. Launches on `stream`, never synchronizes.");
  m.def(
      "bias_act_grad_bias_plan",
      [](uintptr_t dy, uintptr_t x, uintptr_t dz, int64_t n, int64_t stride_c, int64_t channels, int dtype,
         int device, int act, float alpha, float gain, bool has_clamp, float clamp, int bias_dtype) {
        const BiasActProblem p{n, stride_c, channels, dtype, device, act, alpha, gain, has_clamp, clamp, bias_dtype};
        return genkernels::bias_act_grad_bias_plan(p, dy, x, dz);
      },
      py::arg("dy"), py::arg("x"), py::arg("dz"), py::arg("n"), py::arg("stride_c"), py::arg("channels"),
      py::arg("dtype"), py::arg("device"), py::arg("act"), py::arg("alpha"), py::arg("gain"), py::arg("has_clamp"),
      py::arg("clamp"), py::arg("bias_dtype"),
      "The tiles of bias_act_grad_bias for these tensors (dz 0: not written): (vec, tq, per_tile, rows, grid_x, "
      "grid_y, width); the partials it fills are (grid_y, width) float32.");
  m.def(
      "bias_act_grad_bias",
      [](uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t dz, uintptr_t partials, int64_t partials_size, int64_t n,
         int64_t stride_c, int64_t channels, int dtype, int device, int act, float alpha, float gain, bool has_clamp,
         float clamp, int bias_dtype, uintptr_t stream, uintptr_t codes, uintptr_t dbias) {
        const BiasActProblem p{n, stride_c, channels, dtype, device, act, alpha, gain, has_clamp, clamp, bias_dtype};
        genkernels::bias_act_grad_bias(p, dy, x, bias, dz, partials, partials_size, stream, codes, dbias);
      },
      py::arg("dy"), py::arg("x"), py::arg("bias"), py::arg("dz"), py::arg("partials"), py::arg("partials_size"),
      py::arg("n"), py::arg("stride_c"), py::arg("channels"), py::arg("dtype"), py::arg("device"), py::arg("act"),
      py::arg("alpha"), py::arg("gain"), py::arg("has_clamp"), py::arg("clamp"), py::arg("bias_dtype"),
      py::arg("stream"), py::arg("codes") = 0, py::arg("dbias") = 0,
      "bias_act_grad's dz (in `dtype`; dz 0: not written) and, in the same pass, float32 partial sums of it "
      "(see bias_act_grad_bias_plan) that summed per channel give the bias gradient; deterministic, no atomics. "
      "codes: as in bias_act_grad (x then 0 in the plan too). dbias (0: none): a second kernel then sums the "
      "partials per channel in a fixed order into dbias, (channels,) in bias_dtype. Launches on `stream`, never "
      "synchronizes.");
  m.def(
      "modconv_demod_forward",
      [](uintptr_t weight, uintptr_t styles, uintptr_t dcoef, int64_t o, int64_t i, int64_t k, int64_t n, int dtype,
         float eps, int device, uintptr_t stream) {
        genkernels::modconv_demod_forward(o, i, k, n, weight, dtype, styles, eps, dcoef, device, stream);
      },
      py::arg("weight"), py::arg("styles"), py::arg("dcoef"), py::arg("o"), py::arg("i"), py::arg("k"), py::arg("n"),
      py::arg("dtype"), py::arg("eps"), py::arg("device"), py::arg("stream"),
      "Demodulation coefficients: float32 (N, O) dcoef = 1 / sqrt(sum_i styles[n, i]^2 sum_k weight[o, i, k]^2 + "
      "eps), weight (O, I, K) in `dtype`, styles float32 (N, I), all contiguous. Launches on `stream`, never "
      "synchronizes.");
  m.def(
      "modconv_demod_backward",
      [](uintptr_t grad, uintptr_t dcoef, uintptr_t weight, uintptr_t styles, uintptr_t d_weight, uintptr_t d_styles,
         uintptr_t w2, int64_t o, int64_t i, int64_t k, int64_t n, int dtype, int device, uintptr_t stream) {
        genkernels::modconv_demod_backward(o, i, k, n, grad, dcoef, weight, dtype, styles, d_weight, d_styles, w2,
                                           device, stream);
      },
      py::arg("grad"), py::arg("dcoef"), py::arg("weight"), py::arg("styles"), py::arg("d_weight"),
      py::arg("d_styles"), py::arg("w2"), py::arg("o"), py::arg("i"), py::arg("k"), py::arg("n"), py::arg("dtype"),
      py::arg("device"), py::arg("stream"),
      "Gradients of modconv_demod_forward with G = grad * dcoef^3: float32 d_weight (O, I, K) = -weight * sum_n G "
      "styles^2 and d_styles (N, I) = -styles * sum_o G W2; w2: float32 scratch of O * I. Deterministic, never "
      "synchronizes.");
  m.def(
      "modconv_epilogue_forward",
      [](uintptr_t y, uintptr_t dcoef, uintptr_t noise, uintptr_t strength, uintptr_t bias, uintptr_t out, int64_t n,
         int64_t c, int64_t s, bool channels_last, int dtype, int device, int noise_dtype, int64_t noise_batch,
         int act, float alpha, float gain, bool has_clamp, float clamp, uintptr_t stream) {
        genkernels::modconv_epilogue_forward(ModconvEpilogueProblem{n, c, s, channels_last, dtype, device, noise_dtype,
                                                                    noise_batch, act, alpha, gain, has_clamp, clamp},
                                             y, dcoef, noise, strength, bias, out, stream);
      },
      py::arg("y"), py::arg("dcoef"), py::arg("noise"), py::arg("strength"), py::arg("bias"), py::arg("out"),
      py::arg("n"), py::arg("c"), py::arg("s"), py::arg("channels_last"), py::arg("dtype"), py::arg("device"),
      py::arg("noise_dtype"), py::arg("noise_batch"), py::arg("act"), py::arg("alpha"), py::arg("gain"),
      py::arg("has_clamp"), py::arg("clamp"), py::arg("stream"),
      "Modulated-convolution epilogue on a dense (N, C, S) y (channels first or last): out = clamp(act(y * "
      "dcoef[n, c] + noise[n or 0, s] * strength + bias[c]) * gain). dcoef float32 (N, C), noise (noise_batch, S) "
      "in noise_dtype, strength float32 (1,) read on the device, bias float32 (C,): each 0 when absent. act: "
      "bias_act's codes. Launches on `stream`, never synchronizes.");
  m.def(
      "modconv_epilogue_backward_workspace",
      [](uintptr_t dout, uintptr_t y, uintptr_t dy, int64_t n, int64_t c, int64_t s, bool channels_last, int dtype,
         int device, int noise_dtype, int64_t noise_batch, int act, float alpha, float gain, bool has_clamp,
         float clamp) {
        return genkernels::modconv_epilogue_backward_workspace(
            ModconvEpilogueProblem{n, c, s, channels_last, dtype, device, noise_dtype, noise_batch, act, alpha, gain,
                                   has_clamp, clamp},
            dout, y, dy);
      },
      py::arg("dout"), py::arg("y"), py::arg("dy"), py::arg("n"), py::arg("c"), py::arg("s"),
      py::arg("channels_last"), py::arg("dtype"), py::arg("device"), py::arg("noise_dtype"), py::arg("noise_batch"),
      py::arg("act"), py::arg("alpha"), py::arg("gain"), py::arg("has_clamp"), py::arg("clamp"),
      "Scratch bytes modconv_epilogue_backward needs for its partials with these tensors.");
  m.def(
      "modconv_epilogue_backward",
      [](uintptr_t dout, uintptr_t y, uintptr_t dcoef, uintptr_t noise, uintptr_t strength, uintptr_t bias,
         uintptr_t dy, uintptr_t ddcoef, uintptr_t dbias, uintptr_t dstrength, int64_t n, int64_t c, int64_t s,
         bool channels_last, int dtype, int device, int noise_dtype, int64_t noise_batch, int act, float alpha,
         float gain, bool has_clamp, float clamp, uintptr_t workspace, size_t workspace_bytes, uintptr_t stream) {
        genkernels::modconv_epilogue_backward(
            ModconvEpilogueProblem{n, c, s, channels_last, dtype, device, noise_dtype, noise_batch, act, alpha, gain,
                                   has_clamp, clamp},
            dout, y, dcoef, noise, strength, bias, dy, ddcoef, dbias, dstrength, workspace, workspace_bytes, stream);
      },
      py::arg("dout"), py::arg("y"), py::arg("dcoef"), py::arg("noise"), py::arg("strength"), py::arg("bias"),
      py::arg("dy"), py::arg("ddcoef"), py::arg("dbias"), py::arg("dstrength"), py::arg("n"), py::arg("c"),
      py::arg("s"), py::arg("channels_last"), py::arg("dtype"), py::arg("device"), py::arg("noise_dtype"),
      py::arg("noise_batch"), py::arg("act"), py::arg("alpha"), py::arg("gain"), py::arg("has_clamp"),
      py::arg("clamp"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      "Modulated-convolution epilogue backward: dy = g * dcoef (y's layout and dtype), g = dout * gain * act'(z) * "
      "m, and when non-zero the float32 ddcoef (N, C) = sum_s g y, dbias (C,) = sum g, dstrength (1,) = sum g "
      "noise, deterministic. Never synchronizes.");
  m.def("adaln_max_dim", &genkernels::adaln_max_dim, "The largest D (row length) the adaLN kernels take.");
  m.def(
      "adaln_forward",
      [](const AdalnTuple& x, const AdalnTuple& res, const AdalnTuple& gate, uintptr_t weight, uintptr_t bias,
         const AdalnTuple& shift, const AdalnTuple& scale, const AdalnTuple& h, const AdalnTuple& out, uintptr_t mean,
         uintptr_t rstd, int64_t rows, int64_t tokens, int64_t dim, int dtype, int device, float eps, bool rms,
         bool norm, uintptr_t stream, int param_dtype) {
        genkernels::adaln_forward(AdalnProblem{rows, tokens, dim, dtype, device, param_dtype}, adaln_tensor(x),
                                  adaln_tensor(res),
                                  adaln_tensor(gate), weight, bias, adaln_tensor(shift), adaln_tensor(scale),
                                  adaln_tensor(h), adaln_tensor(out), mean, rstd, eps, rms, norm, stream);
      },
      py::arg("x"), py::arg("res"), py::arg("gate"), py::arg("weight"), py::arg("bias"), py::arg("shift"),
      py::arg("scale"), py::arg("h"), py::arg("out"), py::arg("mean"), py::arg("rstd"), py::arg("rows"),
      py::arg("tokens"), py::arg("dim"), py::arg("dtype"), py::arg("device"), py::arg("eps"), py::arg("rms"),
      py::arg("norm"), py::arg("stream"), py::arg("param_dtype") = 0,
      "adaLN forward over R = rows rows of D = dim: h = x + gate * res (when res is given; written rounded), "
      "out = norm(h) * (1 + scale) + shift with norm = LayerNorm or RMSNorm (rms) times weight plus bias (when "
      "norm), float32 mean and rstd per row. Tensors are (address or 0, row stride, dtype code, per token) "
      "tuples; weight and bias addresses or 0, in dtype code param_dtype (float32, or x's dtype); mean and rstd "
      "float32 addresses or 0. Launches on `stream`, never synchronizes.");
  m.def(
      "adaln_backward_workspace",
      [](int64_t rows, int64_t tokens, int64_t dim, int dtype, int device, int quantities) {
        return genkernels::adaln_backward_workspace(AdalnProblem{rows, tokens, dim, dtype, device}, quantities);
      },
      py::arg("rows"), py::arg("tokens"), py::arg("dim"), py::arg("dtype"), py::arg("device"), py::arg("quantities"),
      "Scratch bytes adaln_backward needs for `quantities` column sums (dweight, dbias, per-sample dshift, dscale, "
      "dgate).");
  m.def(
      "adaln_backward",
      [](const AdalnTuple& h, const AdalnTuple& dout, const AdalnTuple& dh, const AdalnTuple& res,
         const AdalnTuple& gate, uintptr_t weight, uintptr_t bias, const AdalnTuple& shift, const AdalnTuple& scale,
         uintptr_t mean, uintptr_t rstd, const AdalnTuple& dx, const AdalnTuple& dres, const AdalnTuple& dshift,
         const AdalnTuple& dscale, const AdalnTuple& dgate, uintptr_t dweight, uintptr_t dbias, uintptr_t workspace,
         size_t workspace_bytes, int64_t rows, int64_t tokens, int64_t dim, int dtype, int device, bool rms,
         bool norm, uintptr_t stream, int param_dtype) {
        genkernels::adaln_backward(AdalnProblem{rows, tokens, dim, dtype, device, param_dtype}, adaln_tensor(h),
                                   adaln_tensor(dout),
                                   adaln_tensor(dh), adaln_tensor(res), adaln_tensor(gate), weight, bias,
                                   adaln_tensor(shift), adaln_tensor(scale), mean, rstd, adaln_tensor(dx),
                                   adaln_tensor(dres), adaln_tensor(dshift), adaln_tensor(dscale), adaln_tensor(dgate),
                                   dweight, dbias, workspace, workspace_bytes, rms, norm, stream);
      },
      py::arg("h"), py::arg("dout"), py::arg("dh"), py::arg("res"), py::arg("gate"), py::arg("weight"),
      py::arg("bias"), py::arg("shift"), py::arg("scale"), py::arg("mean"), py::arg("rstd"), py::arg("dx"),
      py::arg("dres"), py::arg("dshift"), py::arg("dscale"), py::arg("dgate"), py::arg("dweight"), py::arg("dbias"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("rows"), py::arg("tokens"), py::arg("dim"),
      py::arg("dtype"), py::arg("device"), py::arg("rms"), py::arg("norm"), py::arg("stream"),
      py::arg("param_dtype") = 0,
      "adaLN backward in one pass over the rows: dx (the norm's input gradient plus dh; dout itself without "
      "norm), dres = dx * gate, dgate = dx * res, dshift = dout, dscale = dout * n, dweight and dbias; per-token "
      "targets written elementwise, per-sample ones (contiguous float32 (B, D)) and dweight / dbias reduced from "
      "float32 partials in a fixed order. Any output may be 0. Never synchronizes.");
  m.def(
      "rope_rotate",
      [](const RopeTuple& q, const RopeTuple& q_out, const RopeTuple& k, const RopeTuple& k_out, uintptr_t cos,
         uintptr_t sin, int64_t cos_stride, int64_t sin_stride, int cos_dtype, int sin_dtype, int64_t batch,
         int64_t heads_q, int64_t heads_k, int64_t length, int64_t head_dim, int64_t pairs, int dtype, int device,
         bool interleaved, bool inverse, uintptr_t stream) {
        genkernels::rope_rotate(RopeProblem{batch, heads_q, heads_k, length, head_dim, pairs, dtype, cos_dtype,
                                            sin_dtype, cos_stride, sin_stride, device},
                                rope_tensor(q), rope_tensor(q_out), rope_tensor(k), rope_tensor(k_out), cos, sin,
                                interleaved, inverse, stream);
      },
      py::arg("q"), py::arg("q_out"), py::arg("k"), py::arg("k_out"), py::arg("cos"), py::arg("sin"),
      py::arg("cos_stride"), py::arg("sin_stride"), py::arg("cos_dtype"), py::arg("sin_dtype"), py::arg("batch"),
      py::arg("heads_q"), py::arg("heads_k"), py::arg("length"), py::arg("head_dim"), py::arg("pairs"),
      py::arg("dtype"), py::arg("device"), py::arg("interleaved"), py::arg("inverse"), py::arg("stream"),
      "Rotary position embedding of q (B, heads_q, L, Dh) and k (B, heads_k, L, Dh; heads_k 0: none) in one "
      "launch: per pair (x1, x2) of row position l, o1 = x1 c - x2 s, o2 = x2 c + x1 s with c = cos[l, j], "
      "s = sin[l, j] (negated when inverse), pairs (j, j + P) or (2j, 2j + 1) when interleaved, channels 2P.. "
      "copied. Operands are (address or 0, (batch, head, position) strides) tuples with unit stride along Dh; "
      "an output may be its input (in place). cos, sin: (L, P) tables with row strides cos_stride / sin_stride "
      "in their own dtype codes. Launches on `stream`, never synchronizes.");
  m.def("gelu_tanh_forward", &genkernels::gelu_tanh_forward, py::arg("n"), py::arg("dtype"), py::arg("device"),
        py::arg("x"), py::arg("y"), py::arg("stream"),
        "y = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) over n elements of a dense x in memory order (y "
        "with x's strides and dtype). Launches on `stream`, never synchronizes.");
  m.def("gelu_tanh_grad", &genkernels::gelu_tanh_grad, py::arg("n"), py::arg("dtype"), py::arg("device"),
        py::arg("dy"), py::arg("x"), py::arg("dx"), py::arg("stream"),
        "dx = dy * gelu_tanh'(x) over n elements in memory order (dy, x and dx with one layout and dtype). "
        "Launches on `stream`, never synchronizes.");
  m.def("swiglu_forward", &genkernels::swiglu_forward, py::arg("rows"), py::arg("cols"), py::arg("dtype"),
        py::arg("device"), py::arg("x"), py::arg("y"), py::arg("stream"),
        "y = silu(a) * b for a contiguous x = (rows, 2, cols) = [a; b] per row, y contiguous (rows, cols). "
        "Launches on `stream`, never synchronizes.");
  m.def("swiglu_grad", &genkernels::swiglu_grad, py::arg("rows"), py::arg("cols"), py::arg("dtype"),
        py::arg("device"), py::arg("dy"), py::arg("x"), py::arg("dx"), py::arg("stream"),
        "dx = [dy b silu'(a); dy silu(a)] per row of a contiguous x = (rows, 2, cols), dy contiguous (rows, "
        "cols), dx like x. Launches on `stream`, never synchronizes.");
}
