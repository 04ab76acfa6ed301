// The host entry points of genkernels._C, as bindings.cpp sees them: plain C++ types only
// (no CUDA, no torch headers). Tensors travel as device addresses (uintptr_t, 0 for "absent"),
// dtypes as DtypeCode values, streams as the cudaStream_t handle value.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace genkernels {

// CUDA runtime version this module was compiled and statically linked against, e.g. "13.0".
std::string cuda_version();

// Empty when the CUDA runtime can talk to a driver and sees a device, else the reason.
std::string runtime_error();

// An (N, C, *spatial) GroupNorm problem. S is the product of the spatial sizes. Every big
// tensor (x, y, dy, dx) is dense in one of two layouts: channels first (element (n, c, s) at
// (n*C + c)*S + s) or channels last (at (n*S + s)*C + c).
struct GroupNormProblem {
  int64_t n, c, s, groups;
  bool channels_last;
  int dtype;          // DtypeCode of the big tensors
  int device;         // CUDA device ordinal that holds them
  int64_t l2_budget;  // bytes of L2 one batch of groups may occupy; 0: half of the device's L2
};

// Scratch bytes group_norm_forward needs for these tensors (0: none).
size_t group_norm_forward_workspace(const GroupNormProblem& p, uintptr_t x, uintptr_t y);

// y = act((x - mean) * rstd * weight + bias) per group, act = SiLU or identity; writes the
// float32 (N, G) mean and rstd. weight and bias: (C,) of dtype code w_dtype / b_dtype, or 0.
void group_norm_forward(const GroupNormProblem& p, uintptr_t x, uintptr_t weight, int w_dtype, uintptr_t bias,
                        int b_dtype, uintptr_t y, uintptr_t mean, uintptr_t rstd, uintptr_t workspace,
                        size_t workspace_bytes, float eps, bool silu, uintptr_t stream);

// Scratch bytes group_norm_backward needs (dx = 0 when dx is not wanted).
size_t group_norm_backward_workspace(const GroupNormProblem& p, uintptr_t dy, uintptr_t x, uintptr_t dx);

// Gradients of group_norm_forward: dx (layout of x), dweight and dbias (dtype codes w_dtype and
// b_dtype, like the parameters). Each of dx, dweight, dbias may be 0 (not wanted).
void group_norm_backward(const GroupNormProblem& p, uintptr_t dy, uintptr_t x, uintptr_t weight, int w_dtype,
                         uintptr_t bias, int b_dtype, uintptr_t mean, uintptr_t rstd, uintptr_t dx, uintptr_t dweight,
                         uintptr_t dbias, uintptr_t workspace, size_t workspace_bytes, bool silu, uintptr_t stream);

// A scaled dot-product attention problem: q and out (B, Hq, Lq, D), k and v (B, Hkv, Lkv, D), each
// with unit stride along D and arbitrary batch, head and row strides (in elements; 0 for broadcast,
// or for out a dim of size 1).
struct AttentionProblem {
  int64_t batch, heads_q, heads_kv, len_q, len_kv, head_dim;
  int64_t q_strides[3], k_strides[3], v_strides[3], out_strides[3];  // batch, head, row
  int dtype;   // DtypeCode: float16 or bfloat16
  int device;  // CUDA device ordinal that holds the tensors
};

// out = softmax(scale * q k^T over the allowed keys) v and lse = log(sum exp(scale * q k^T)) per
// query row (natural log, -inf for a row with no allowed key, whose out row is 0). Query head h
// reads kv head h / (Hq / Hkv). Key j is allowed for query i unless key_padding_mask[b, j] is
// true (a contiguous (B, Lkv) bool tensor, or 0 for none) or, when causal, j > i + Lkv - Lq.
// out: (B, Hq, Lq, D) of q's dtype at its strides; lse: contiguous float32 (B, Hq, Lq). q, k, v and
// out 16-byte aligned, strides multiples of 8 elements, D a multiple of 8 and at most 128.
void attention_forward(const AttentionProblem& p, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t key_padding_mask,
                       uintptr_t out, uintptr_t lse, float scale, bool causal, uintptr_t stream);

// A fused sampler step on dense (B, N) views: x, noise, x0_prev, prev and x0 are (B, N),
// model_output (B, N), or (2B, N) = [uncond; cond] when guided; element (b, j) at b*N + j for all
// of them (contiguous and channels-last tensors qualify alike). x, prev and x0 have one dtype;
// the other inputs may have their own (calls that mix dtypes run the scalar, unvectorized path).
struct StepProblem {
  int64_t batch, n;  // B and elements per sample
  int dtype;         // DtypeCode of x, prev and x0
  int mo_dtype, noise_dtype, x0_prev_dtype;  // DtypeCodes of the other inputs (any value when absent)
  int device;        // CUDA device ordinal that holds them
};

// Coefficients of schedule_step, in this order: px, po, ex, e0, cx, c0, ce, cn, cp.
constexpr int kStepCoeffs = 9;

// Scratch bytes schedule_step needs (non-zero only for guidance rescale).
size_t schedule_step_workspace(const StepProblem& p, uintptr_t model_output, bool guided, bool rescale);

// Per element, in float32 (each coefficient values[k], or per_sample[k][b] when that address is
// non-zero: a float32 (B,) array):
//   out  = model_output (0 when its address is 0); guided: u + guidance_scale * (c - u)
//   out *= rescale factor of the sample when rescale (phi = guidance_rescale, unbiased stds)
//   x0   = px*x + po*out, clamped to [-clip_value, clip_value] when clip
//   eps  = ex*x + e0*x0
//   prev = cx*x + c0*x0 + ce*eps + cn*noise + cp*x0_prev
// noise: the tensor at `noise`, else (philox) the stream of genkernels/philox.cuh keyed by
// (seed, offset), the seed read from the one-element int64 device tensor at seed_tensor when that
// address is non-zero, else no noise term; x0_prev: no term when its address is 0. Writes prev, and
// x0 (after clipping) when its address is non-zero. Launches on `stream`, never synchronizes.
void schedule_step(const StepProblem& p, uintptr_t x, uintptr_t model_output, uintptr_t noise, uintptr_t x0_prev,
                   uintptr_t prev, uintptr_t x0, const std::array<float, kStepCoeffs>& values,
                   const std::array<uintptr_t, kStepCoeffs>& per_sample, bool guided, float guidance_scale,
                   bool rescale, float guidance_rescale, bool clip, float clip_value, bool philox, uint64_t seed,
                   uintptr_t seed_tensor, uint64_t offset, uintptr_t workspace, size_t workspace_bytes,
                   uintptr_t stream);

// A reparameterization problem: (B, R, K) views with unit stride along K. mean and logvar have
// their own (batch, row) strides in elements (>= 0; e.g. the two halves of a moments tensor);
// z, noise and dz are contiguous: element (b, r, k) at (b*R + r)*K + k. One dtype for all of them.
struct ReparamProblem {
  int64_t batch, rows, cols;  // B, R, K (all > 0)
  std::array<int64_t, 2> mean_strides, logvar_strides;  // (batch, row)
  int dtype;   // DtypeCode
  int device;  // CUDA device ordinal that holds the tensors
};

// Scratch bytes reparam_forward needs for the KL partials (0 when a sample is a single chunk).
size_t reparam_forward_workspace(const ReparamProblem& p);

// Per element, in float32: lv = clamp(logvar, -30, 20); z = mean + exp(lv / 2) * eps (deterministic:
// z = mean), eps the tensor at `noise` or else the Philox stream of genkernels/philox.cuh keyed by
// (seed, offset) at element (b*R + r)*K + k, the seed read from the one-element int64 device tensor
// at seed_tensor when that address is non-zero. Writes z, and when kl is non-zero the float32 (B,)
// kl[b] = 0.5 * sum over the sample of (mean^2 + exp(lv) - 1 - lv), deterministic (fixed chunks
// merged in a fixed order). Launches on `stream`, never synchronizes.
void reparam_forward(const ReparamProblem& p, uintptr_t mean, uintptr_t logvar, uintptr_t noise, uintptr_t z,
                     uintptr_t kl, uint64_t seed, uintptr_t seed_tensor, uint64_t offset, bool deterministic,
                     uintptr_t workspace, size_t workspace_bytes, uintptr_t stream);

// Gradients of reparam_forward, per element in float32, with in = (-30 <= logvar <= 20):
//   dmean   = dz + dkl[b] * mean
//   dlogvar = in ? 0.5 * dz * eps * exp(logvar / 2) + 0.5 * dkl[b] * (exp(logvar) - 1) : 0
// (deterministic: no eps term; eps as in the forward, re-drawn bit for bit when noise is 0).
// dz (contiguous, mean's dtype) and dkl (float32 (B,)) may be 0 (zero); dmean and dlogvar (mean's
// dtype, their own (batch, row) strides) may be 0 (not written). Never synchronizes.
void reparam_backward(const ReparamProblem& p, uintptr_t dz, uintptr_t dkl, uintptr_t mean, uintptr_t logvar,
                      uintptr_t noise, uint64_t seed, uintptr_t seed_tensor, uint64_t offset, bool deterministic,
                      uintptr_t dmean, const std::array<int64_t, 2>& dmean_strides, uintptr_t dlogvar,
                      const std::array<int64_t, 2>& dlogvar_strides, uintptr_t stream);

// An affine coupling problem: x (and y, dy, dx) dense (N, C, S), h (and dh) dense (N, Ch, S) in the
// same layout: channels first (element (n, c, s) at (n*C + c)*S + s) or channels last (at
// (n*S + s)*C + c). One dtype for all of them. Ch = 2 * (C - C / 2), or C - C / 2 when additive.
struct CouplingProblem {
  int64_t n, c, s;     // N, C (>= 2), S (all > 0)
  int64_t h_channels;  // Ch
  bool channels_last;
  int dtype;   // DtypeCode
  int device;  // CUDA device ordinal that holds the tensors
};

// Scale modes (log s as a function of h_s): exp 0 (h_s), sigmoid 1 (logsigmoid(h_s + 2)),
// softclamp_tanh 2 (clamp * tanh(h_s / clamp)), softclamp_atan 3 (0.636 * clamp * atan(h_s / clamp)),
// additive 4 (0; h is the shift alone).

// Scratch bytes coupling_forward needs for the log-det partials (0 when a sample is a single chunk).
size_t coupling_forward_workspace(const CouplingProblem& p, int scale, float clamp);

// Per element, in float32, with Ca = C / 2, Cb = C - Ca, h_s = h[:, :Cb], t = h[:, Cb:] (additive:
// t = h): y_a = x_a, y_b = x_b * s + t (reverse: (x_b - t) * exp(-log s)). Writes y, and when logdet
// is non-zero the float32 (N,) logdet[n] = sum of log s over the sample's b-elements (reverse: its
// negation), deterministic (fixed chunks merged in a fixed order). Launches on `stream`, never
// synchronizes.
void coupling_forward(const CouplingProblem& p, uintptr_t x, uintptr_t h, uintptr_t y, uintptr_t logdet, int scale,
                      float clamp, bool reverse, uintptr_t workspace, size_t workspace_bytes, uintptr_t stream);

// Gradients of the forward direction, in float32: dx_a = dy_a, dx_b = dy_b * s, dt = dy_b,
// dh_s = (dy_b * x_b * s + dlogdet[n]) * d log s / d h_s. dy (x's layout) and dlogdet (float32 (N,))
// may be 0 (zero); dx (x's layout) and dh (h's) may be 0 (not written). Never synchronizes.
void coupling_backward(const CouplingProblem& p, uintptr_t dy, uintptr_t dlogdet, uintptr_t x, uintptr_t h,
                       uintptr_t dx, uintptr_t dh, int scale, float clamp, uintptr_t stream);

// An ActNorm problem: x (and y, dy, dx) dense (N, C, S), channels first or channels last; one dtype.
struct ActNormProblem {
  int64_t n, c, s;  // all > 0
  bool channels_last;
  int dtype;   // DtypeCode
  int device;  // CUDA device ordinal that holds the tensors
};

// y = (x + bias[c]) * exp(log_scale[c]) (reverse: y = x * exp(-log_scale[c]) - bias[c]); log_scale
// and bias float32 (C,). Launches on `stream`, never synchronizes.
void actnorm_forward(const ActNormProblem& p, uintptr_t x, uintptr_t log_scale, uintptr_t bias, uintptr_t y,
                     bool reverse, uintptr_t stream);

// Scratch bytes actnorm_backward needs for the per-channel partials (0: none).
size_t actnorm_backward_workspace(const ActNormProblem& p);

// dx = dy * exp(log_scale[c]) (when dx is non-zero) and, into the float32 (2, C) `sums`, sum over
// (n, s) of dy and of dy * (x + bias[c]) per channel, deterministic (fixed partials merged in a fixed
// order); log_scale and bias float32 (C,). The second sum adds dy * (x + bias) itself: sum dy x +
// bias sum dy cancels where |bias| is large against x + bias. Launches on `stream`, never synchronizes.
void actnorm_backward(const ActNormProblem& p, uintptr_t dy, uintptr_t x, uintptr_t log_scale, uintptr_t bias,
                      uintptr_t dx, uintptr_t sums, uintptr_t workspace, size_t workspace_bytes, uintptr_t stream);

// A bias_act problem: x (and y, dy, dz) dense, walked as one flat run of n elements in memory order;
// the bias (float32 (C,), optional) of flat element e is bias[(e / stride_c) % channels]. One dtype
// for x, y and dy; dz in it or float32.
struct BiasActProblem {
  int64_t n;         // elements (> 0)
  int64_t stride_c;  // x.stride(dim) (> 0)
  int64_t channels;  // C = x.shape[dim] (> 0)
  int dtype;         // DtypeCode
  int device;        // CUDA device ordinal that holds the tensors
  int act;           // linear 0, relu 1, lrelu 2, tanh 3, sigmoid 4, silu 5, gelu 6
  float alpha, gain;
  bool has_clamp;
  float clamp;       // > 0 when has_clamp
  int bias_dtype;    // DtypeCode of the bias: float32, float16 or bfloat16
};

// y = act(x + bias) * gain, clamped to [-clamp, clamp] when has_clamp (NaN passes), in float32;
// bias may be 0 (none). codes (0: none): also write the gradient codes there, 2 bits an element
// (bias_act_codes_bytes(n) bytes; linear, relu and lrelu, x and y 16-byte aligned; see
// genkernels/bias_act.cuh). Launches on `stream`, never synchronizes.
void bias_act_forward(const BiasActProblem& p, uintptr_t x, uintptr_t bias, uintptr_t y, uintptr_t stream,
                      uintptr_t codes = 0);

// The bytes of the gradient codes of n elements: 2 * ceil(n / 8).
int64_t bias_act_codes_bytes(int64_t n);

// dz = dy * gain * act'(x + bias) * m (m: 1 where -clamp <= act(z) * gain <= clamp, else 0; 1 without a
// clamp), written in out_dtype (p.dtype or float32); from the forward's gradient codes instead of x and
// the bias when codes is not 0 (x then unused). Launches on `stream`, never synchronizes.
void bias_act_grad(const BiasActProblem& p, uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t dz, int out_dtype,
                   uintptr_t stream, uintptr_t codes = 0);

// The launch of bias_act_grad_bias for these tensors (dz 0: not written; x 0 with codes): {vec, tq, per_tile, rows,
// grid_x, grid_y, width}; its partials are (grid_y, width) float32.
std::array<int64_t, 7> bias_act_grad_bias_plan(const BiasActProblem& p, uintptr_t dy, uintptr_t x, uintptr_t dz);

// bias_act_grad's dz in x's dtype (dz may be 0: not written) and, in the same pass, float32 partial sums of the
// unrounded dz: per tile (grid_y, grid_x) when each tile lies in one channel, else per column (grid_y, C *
// stride_c); summed per channel they give the bias gradient. bias must be non-null (its dtype and channels
// are the gradient's; with codes its values are not read). codes: as in bias_act_grad. dbias (0: none): a
// second launch then sums the partials per channel in a fixed order into dbias, (C,) in the bias's dtype.
// Never synchronizes.
void bias_act_grad_bias(const BiasActProblem& p, uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t dz,
                        uintptr_t partials, int64_t partials_size, uintptr_t stream, uintptr_t codes = 0,
                        uintptr_t dbias = 0);

// Demodulation coefficients of StyleGAN2's modulated convolution, weight (O, I, K) in dtype code
// `dtype`, styles float32 (N, I), all contiguous and > 0 in size: writes the float32 (N, O)
// dcoef[n, o] = 1 / sqrt(sum_i styles[n, i]^2 sum_k weight[o, i, k]^2 + eps). Launches on `stream`,
// never synchronizes.
void modconv_demod_forward(int64_t o, int64_t i, int64_t k, int64_t n, uintptr_t weight, int dtype, uintptr_t styles,
                           float eps, uintptr_t dcoef, int device, uintptr_t stream);

// Its gradients, with G = grad * dcoef^3 (grad, dcoef float32 (N, O)): the float32 (O, I, K)
// d_weight = -weight * sum_n G[n, o] styles[n, i]^2 and the float32 (N, I) d_styles =
// -styles * sum_o G[n, o] W2[o, i]. w2 is float32 scratch of O * I elements. Deterministic; never
// synchronizes.
void modconv_demod_backward(int64_t o, int64_t i, int64_t k, int64_t n, uintptr_t grad, uintptr_t dcoef,
                            uintptr_t weight, int dtype, uintptr_t styles, uintptr_t d_weight, uintptr_t d_styles,
                            uintptr_t w2, int device, uintptr_t stream);

// The fused epilogue of the modulated convolution: y (N, C, S = H * W) dense, channels first or
// channels last; out / dout / dy share its layout and dtype. noise (noise_batch in {1, N}, S)
// contiguous in dtype code noise_dtype.
struct ModconvEpilogueProblem {
  int64_t n, c, s;  // all > 0
  bool channels_last;
  int dtype;   // DtypeCode of y
  int device;  // CUDA device ordinal that holds the tensors
  int noise_dtype;
  int64_t noise_batch;
  int act;  // bias_act's codes: linear 0, relu 1, lrelu 2, tanh 3, sigmoid 4, silu 5, gelu 6
  float alpha, gain;
  bool has_clamp;
  float clamp;  // > 0 when has_clamp
};

// out = clamp(act(y * dcoef[n, c] + noise[n or 0, s] * strength + bias[c]) * gain), in float32.
// dcoef (float32 (N, C)), noise, strength (float32 (1,), read on the device; 1 when 0) and bias
// (float32 (C,)) may each be 0 (absent). Launches on `stream`, never synchronizes.
void modconv_epilogue_forward(const ModconvEpilogueProblem& p, uintptr_t y, uintptr_t dcoef, uintptr_t noise,
                              uintptr_t strength, uintptr_t bias, uintptr_t out, uintptr_t stream);

// Scratch bytes modconv_epilogue_backward needs for its partials with these tensors.
size_t modconv_epilogue_backward_workspace(const ModconvEpilogueProblem& p, uintptr_t dout, uintptr_t y, uintptr_t dy);

// g = dout * gain * act'(z) * m (z as in the forward, m the clamp's pass mask): writes dy = g * dcoef and,
// each when non-zero, the float32 ddcoef (N, C) = sum_s g y, dbias (C,) = sum_{n, s} g and dstrength
// (1,) = sum g noise; deterministic (fixed partials merged in a fixed order). Never synchronizes.
void modconv_epilogue_backward(const ModconvEpilogueProblem& p, uintptr_t dout, uintptr_t y, uintptr_t dcoef,
                               uintptr_t noise, uintptr_t strength, uintptr_t bias, uintptr_t dy, uintptr_t ddcoef,
                               uintptr_t dbias, uintptr_t dstrength, uintptr_t workspace, size_t workspace_bytes,
                               uintptr_t stream);

// An adaLN problem (csrc/adaln.cu): R = B * L rows of D elements (L = tokens, the rows per sample), the big
// tensors (x, y, h, out, dy, dout, dh, dx) in dtype code `dtype`.
struct AdalnProblem {
  int64_t rows, tokens, dim;  // R (> 0, a multiple of tokens), L (> 0), D (> 0, at most adaln_max_dim())
  int dtype;                  // DtypeCode of the big tensors
  int device;                 // CUDA device ordinal that holds the tensors
  int param_dtype = 0;        // DtypeCode of weight and bias: float32 (kFloat32) or the big tensors' dtype
};

// One (S, D) operand: device address (0: absent), row stride in elements (>= 0), DtypeCode, and whether it
// has a row per token (S = R, row r reads row r) or per sample (S = R / L, row r reads row r / L).
struct AdalnTensor {
  uintptr_t ptr;
  int64_t row_stride;
  int dtype;
  bool per_token;
};

// The largest D the kernels take (a row lives in the registers of one block).
int64_t adaln_max_dim();

// Per row r, in float32: h = x + gate * res when res is given (h rounded to the dtype and written once),
// else h = x; with norm, out = (xhat * weight + bias) * (1 + scale) + shift, xhat = (h - mean) * rstd
// (LayerNorm) or h * rstd (rms), statistics over D of the (rounded) h; mean and rstd float32 (R,) (mean 0
// when rms), each may be 0. weight and bias: (D,) in p.param_dtype (float32 or x's dtype), or 0; shift / scale /
// gate: x's dtype or float32.
// Without norm only h is written. Launches on `stream`, never synchronizes.
void adaln_forward(const AdalnProblem& p, const AdalnTensor& x, const AdalnTensor& res, const AdalnTensor& gate,
                   uintptr_t weight, uintptr_t bias, const AdalnTensor& shift, const AdalnTensor& scale,
                   const AdalnTensor& h, const AdalnTensor& out, uintptr_t mean, uintptr_t rstd, float eps, bool rms,
                   bool norm, uintptr_t stream);

// Scratch bytes adaln_backward needs for `quantities` (0..5) column sums (dweight, dbias and the per-sample
// dshift, dscale, dgate that are wanted).
size_t adaln_backward_workspace(const AdalnProblem& p, int quantities);

// Gradients of adaln_forward, in one pass over the rows. With norm: h is the forward's normalized input
// (x, or the returned h), dout the gradient of out and dh (or 0) that of h; the input gradient
// dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) + dh (no mean(dxhat) term when rms), with
// g = dout (1 + scale), dxhat = g weight (weight and bias in p.param_dtype, as in the forward). Without norm:
// dx = dout. With res: dres = dx * gate and
// dgate = dx * res. dweight = sum g xhat, dbias = sum g (float32 (D,)); dshift = dout, dscale = dout * n.
// An elementwise gradient target (dshift, dscale, dgate) marked per_token is written (R, D) in its dtype;
// one marked per sample receives the sum over the sample's rows as contiguous float32 (R / L, D). Any
// output may be 0 (not wanted); per-sample sums, dweight and dbias are reduced from float32 partials in
// a fixed order (deterministic, no atomics). Launches on `stream`, never synchronizes.
void adaln_backward(const AdalnProblem& p, const AdalnTensor& h, const AdalnTensor& dout, const AdalnTensor& dh,
                    const AdalnTensor& res, const AdalnTensor& gate, uintptr_t weight, uintptr_t bias,
                    const AdalnTensor& shift, const AdalnTensor& scale, uintptr_t mean, uintptr_t rstd,
                    const AdalnTensor& dx, const AdalnTensor& dres, const AdalnTensor& dshift,
                    const AdalnTensor& dscale, const AdalnTensor& dgate, uintptr_t dweight, uintptr_t dbias,
                    uintptr_t workspace, size_t workspace_bytes, bool rms, bool norm, uintptr_t stream);

// A rotary position embedding problem (csrc/rope.cu): q (B, H, L, Dh) and k (B, Hk, L, Dh) rotated by the
// (L, P) tables cos and sin (unit last stride, row strides cos_stride / sin_stride, float32, float16 or
// bfloat16 each). One dtype for q, k and their outputs.
struct RopeProblem {
  int64_t batch, heads_q, heads_k, len, head_dim, pairs;  // B, H, Hk (0: no k), L, Dh (all > 0 but H, Hk), P
  int dtype;                                              // DtypeCode of q, k and the outputs
  int cos_dtype, sin_dtype;                               // DtypeCodes of the tables
  int64_t cos_stride, sin_stride;                         // row strides of the tables, in elements
  int device;                                             // CUDA device ordinal that holds the tensors
};

// One (B, H, L, Dh) operand of rope: device address (0: absent) and its (batch, head, position) strides in
// elements (>= 0); the stride along Dh is 1.
struct RopeTensor {
  uintptr_t ptr;
  std::array<int64_t, 3> strides;
};

// Per row position l and pair j < P, in float32: o1 = x1 c - x2 s, o2 = x2 c + x1 s with c = cos[l, j],
// s = sin[l, j] (negated when inverse), pairs (j, j + P), or (2j, 2j + 1) when interleaved; channels 2P ..
// Dh-1 copied bit for bit. Writes the rotation of q into q_out and of k into k_out (k may be absent:
// heads_k 0) in one launch; an output may be its input (the same address and strides: in place).
// Launches on `stream`, never synchronizes.
void rope_rotate(const RopeProblem& p, const RopeTensor& q, const RopeTensor& q_out, const RopeTensor& k,
                 const RopeTensor& k_out, uintptr_t cos, uintptr_t sin, bool interleaved, bool inverse,
                 uintptr_t stream);

// The MLP activations of transformer blocks (csrc/gated_mlp.cu), in float32, every tensor in dtype code
// `dtype`. gelu_tanh: x (and y, dy, dx) dense, walked as n > 0 elements in memory order:
//     y = 0.5 x (1 + tanh u),  u = sqrt(2 / pi) (x + 0.044715 x^3)
//     dx = dy (0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2 / pi) (1 + 3 * 0.044715 x^2))
// Launches on `stream`, never synchronizes.
void gelu_tanh_forward(int64_t n, int dtype, int device, uintptr_t x, uintptr_t y, uintptr_t stream);
void gelu_tanh_grad(int64_t n, int dtype, int device, uintptr_t dy, uintptr_t x, uintptr_t dx, uintptr_t stream);

// swiglu: x contiguous (R, 2, M) = [a; b] per row, y and dy contiguous (R, M), dx like x (R, M > 0):
//     y = silu(a) b = a sigmoid(a) b,   da = dy b silu'(a),  db = dy silu(a)
// Launches on `stream`, never synchronizes.
void swiglu_forward(int64_t rows, int64_t cols, int dtype, int device, uintptr_t x, uintptr_t y, uintptr_t stream);
void swiglu_grad(int64_t rows, int64_t cols, int dtype, int device, uintptr_t dy, uintptr_t x, uintptr_t dx,
                 uintptr_t stream);

}  // namespace genkernels
