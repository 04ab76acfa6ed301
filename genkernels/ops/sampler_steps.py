"""Named sampler steps over the one fused step kernel (genkernels.ops.schedule.schedule_step).

Every step below is, per element, linear in the sample x and the (guided) model output, so each
op only computes the coefficients of schedule_step's formula on the host, from the scheduler's
scalars, and launches the fused kernel once:

    out  = out_u + g * (out_c - out_u)            (guidance_scale g; model_output = [uncond; cond])
    x0   = px * x + po * out                      (prediction type -> predicted clean sample)
    x0   = clamp(x0, -clip, clip)                 (clip_sample)
    eps  = ex * x + e0 * x0                       (noise re-derived from the clipped x0)
    prev = cx * x + c0 * x0 + ce * eps + cn * noise + cp * x0_prev

Notation: abar_t is the cumulative product of (1 - beta) at timestep t (``alphas_cumprod``);
in the variance-preserving parametrization x_t = alpha_t * x0 + sigma_t * eps with
alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t). The sigma-space (Karras) samplers use
s = sigma_t / alpha_t = sqrt((1 - abar_t) / abar_t) and x = x0 + s * eps.

Prediction types: "epsilon" (the model predicts eps), "v_prediction" (v = alpha_t * eps -
sigma_t * x0), "sample" (x0 itself), and for flow matching "velocity" (v = eps - x0).

Every op takes the same keyword-only options, passed through to schedule_step (the
deterministic euler_step has no noise options):
guidance_scale (None: model_output is (B, *); else (2B, *) = [uncond; cond]), guidance_rescale,
clip_sample (None or the clamp bound), noise / generator / seed / offset (the step's fresh noise:
an explicit (B, *) tensor wins, then a torch.Generator, then a Philox seed and offset; see
schedule_step), return_x0 (also return the clipped x0) and backend. No op reads a device value
on the host: the coefficients are Python floats, so every op is CUDA-graph capturable.
Shapes: sample (B, *), model_output (B, *) or (2B, *); float32 / float16 / bfloat16 (math in
float32); results in sample's dtype and layout.
"""

from __future__ import annotations

import math

import torch

from .._checks import nonnegative_float
from .schedule import StepCoeffs, add_noise, schedule_step

__all__ = [
    "add_noise",
    "ddim_step",
    "ddpm_step",
    "dpmpp_2m_step",
    "euler_ancestral_step",
    "euler_step",
    "flow_euler_step",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check_prediction(prediction_type: str, accepted: tuple[str, ...] = PREDICTION_TYPES) -> None:
    if prediction_type not in accepted:
        raise ValueError(f"prediction_type must be one of {', '.join(map(repr, accepted))}, got {prediction_type!r}")


def _host_float(name: str, value) -> float:
    """A schedule scalar as a host float (a device tensor would need a sync: rejected)."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or value.numel() != 1:
            raise TypeError(
                f"{name} must be a Python float or a one-element CPU tensor, "
                f"got a tensor of shape {tuple(value.shape)} on {value.device}"
            )
        value = value.item()
    return float(value)


def _check_abar(alpha_prod_t, alpha_prod_t_prev, prediction_type: str) -> tuple[float, float]:
    """abar_t in [0, 1) (0, zero terminal SNR, only where x0 does not divide by it), abar_prev in (0, 1]."""
    a = _host_float("alpha_prod_t", alpha_prod_t)
    a_prev = _host_float("alpha_prod_t_prev", alpha_prod_t_prev)
    low_ok = a > 0.0 or (a == 0.0 and prediction_type != "epsilon")
    if not (low_ok and a < 1.0):
        accepted = "(0, 1)" if prediction_type == "epsilon" else "[0, 1)"
        raise ValueError(f"alpha_prod_t must be in {accepted} for prediction_type {prediction_type!r}, got {a!r}")
    if not 0.0 < a_prev <= 1.0:
        raise ValueError(f"alpha_prod_t_prev must be in (0, 1], got {a_prev!r}")
    return a, a_prev


def _check_sigma(name: str, value: float, allow_zero: bool) -> float:
    value = _host_float(name, value)
    if not (value > 0.0 or (allow_zero and value == 0.0)) or not math.isfinite(value):
        accepted = "a finite float >= 0" if allow_zero else "a finite float > 0"
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return value


def _vp_x0_coeffs(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(px, po) with x0 = px * x + po * out, for x = alpha * x0 + sigma * eps."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":
        return alpha, -sigma
    return 0.0, 1.0


def _options(guidance_scale, guidance_rescale, clip_sample, backend, noise=None, generator=None, seed=None, offset=0):
    """The schedule_step keywords every named op passes through unchanged."""
    return {
        "guidance_scale": guidance_scale,
        "guidance_rescale": guidance_rescale,
        "clip_sample": clip_sample,
        "backend": backend,
        "noise": noise,
        "generator": generator,
        "seed": seed,
        "offset": offset,
    }


def _step(sample, model_output, coeffs, opts, return_x0, x0_prev=None):
    return schedule_step(sample, model_output, coeffs, x0_prev=x0_prev, return_x0=return_x0, **opts)


def ddpm_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: float,
    alpha_prod_t_prev: float,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    add_variance: bool = True,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_sample: float | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    offset: int = 0,
    return_x0: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One DDPM ancestral step x_t -> x_prev (the posterior mean plus its noise).

    With a = alpha_prod_t (abar_t), a' = alpha_prod_t_prev (1.0 past the first training step),
    b = 1 - a, alpha_step = a / a' and beta_step = 1 - alpha_step:

        x0   = x0(x, out) for the prediction type, then clamped to +-clip_sample
        prev = sqrt(a') * beta_step / b * x0 + sqrt(alpha_step) * (1 - a') / b * x + std * noise

    std = sqrt(max((1 - a') / b * beta_step, 1e-20)) for variance_type "fixed_small" (and
    "fixed_small_log", the same value), sqrt(beta_step) for "fixed_large"; no noise when
    add_variance is False (diffusers adds none at t = 0). Returns prev, and x0 when return_x0.
    """
    _check_prediction(prediction_type)
    if variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
        raise ValueError(
            f"variance_type must be 'fixed_small', 'fixed_small_log' or 'fixed_large', got {variance_type!r}"
        )
    a, a_prev = _check_abar(alpha_prod_t, alpha_prod_t_prev, prediction_type)
    if a_prev < a:
        raise ValueError(
            "ddpm_step runs the posterior toward less noise: alpha_prod_t_prev must be >= alpha_prod_t, got "
            f"alpha_prod_t={a}, alpha_prod_t_prev={a_prev}"
        )
    b = 1.0 - a
    alpha_step = a / a_prev
    beta_step = 1.0 - alpha_step
    px, po = _vp_x0_coeffs(prediction_type, math.sqrt(a), math.sqrt(b))
    cn = 0.0
    if add_variance:
        variance = max((1.0 - a_prev) / b * beta_step, 1e-20) if variance_type != "fixed_large" else beta_step
        cn = math.sqrt(variance)
    coeffs = StepCoeffs(
        px=px,
        po=po,
        cx=math.sqrt(alpha_step) * (1.0 - a_prev) / b,
        c0=math.sqrt(a_prev) * beta_step / b,
        cn=cn,
    )
    opts = _options(guidance_scale, guidance_rescale, clip_sample, backend, noise, generator, seed, offset)
    return _step(sample, model_output, coeffs, opts, return_x0)


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: float,
    alpha_prod_t_prev: float,
    *,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    use_clipped_model_output: bool = False,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_sample: float | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    offset: int = 0,
    return_x0: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (eta = 0: deterministic; eta = 1: DDPM-like variance).

    With a = alpha_prod_t, a' = alpha_prod_t_prev, b = 1 - a:

        x0   = x0(x, out), clamped to +-clip_sample
        eps  = (x - sqrt(a) * x0) / sqrt(b)
        std  = eta * sqrt((1 - a') / b * (1 - a / a'))
        prev = sqrt(a') * x0 + sqrt(1 - a' - std^2) * eps + std * noise

    eps is taken from the unclipped x0 (the model's own noise estimate) unless
    use_clipped_model_output, as in DDIM's reference formulation. When clipping is on and
    use_clipped_model_output is False, the step runs as two fused passes (the first writes
    sqrt(1 - a' - std^2) * eps + std * noise, in sample's dtype; the second adds sqrt(a') * clipped x0),
    because one pass only sees the clipped x0. Returns prev, and x0 (clipped) when return_x0.
    """
    _check_prediction(prediction_type)
    eta = nonnegative_float("eta", eta)
    a, a_prev = _check_abar(alpha_prod_t, alpha_prod_t_prev, prediction_type)
    if eta > 0 and a_prev < a:
        raise ValueError(
            f"eta > 0 adds noise on a step toward less noise only (alpha_prod_t_prev >= alpha_prod_t); got eta={eta} "
            f"with alpha_prod_t={a}, alpha_prod_t_prev={a_prev} (deterministic inversion runs with eta=0)"
        )
    b = 1.0 - a
    px, po = _vp_x0_coeffs(prediction_type, math.sqrt(a), math.sqrt(b))
    std = eta * math.sqrt((1.0 - a_prev) / b * (1.0 - a / a_prev)) if eta > 0 else 0.0
    direction = math.sqrt(max(1.0 - a_prev - std * std, 0.0))
    # dir * eps = dir / sqrt(b) * x - dir * sqrt(a) / sqrt(b) * x0, folded into the coefficients of x and x0
    # in float64: forming eps first rounds it at the size of x / sqrt(b), where x0 and eps nearly cancel.
    cx, c_eps0 = direction / math.sqrt(b), -direction * math.sqrt(a) / math.sqrt(b)
    opts = _options(guidance_scale, guidance_rescale, None, backend, noise, generator, seed, offset)
    if clip_sample is None or use_clipped_model_output:
        coeffs = StepCoeffs(px=px, po=po, cx=cx, c0=math.sqrt(a_prev) + c_eps0, cn=std)
        return _step(sample, model_output, coeffs, {**opts, "clip_sample": clip_sample}, return_x0)
    partial = _step(sample, model_output, StepCoeffs(px=px, po=po, cx=cx, c0=c_eps0, cn=std), opts, False)
    opts.update(noise=None, generator=None, seed=None, clip_sample=clip_sample)
    coeffs = StepCoeffs(px=px, po=po, c0=math.sqrt(a_prev), cp=1.0)
    return _step(sample, model_output, coeffs, opts, return_x0, x0_prev=partial)


def _karras_x0_coeffs(prediction_type: str, sigma: float) -> tuple[float, float]:
    """(px, po) for x = x0 + sigma * eps (the sample is not divided by sqrt(sigma^2 + 1))."""
    if prediction_type == "epsilon":
        return 1.0, -sigma
    if prediction_type == "v_prediction":
        return 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
    return 0.0, 1.0


def _euler_update(sigma: float, sigma_to: float) -> dict[str, float]:
    """cx, c0, ex, e0, ce of the Euler update x + (sigma_to - sigma) * (x - x0) / sigma.

    Formed as eps = x - x0, prev = x + ((sigma_to - sigma) / sigma) * eps: like diffusers'
    x + d * dt, it rounds once at the size of x. A ratio form r * x + (1 - r) * x0 also rounds r
    and r * x there: on the small steps of a long schedule over a large x, that is more than the
    criterion allows against diffusers. sigma_to = 0 lands on x0 itself (prev = x0).
    """
    if sigma_to == 0.0:
        return {"c0": 1.0}
    return {"cx": 1.0, "ex": 1.0, "e0": -1.0, "ce": (sigma_to - sigma) / sigma}


def euler_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: float,
    sigma_next: float,
    *,
    prediction_type: str = "epsilon",
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_sample: float | None = None,
    return_x0: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One Euler step of the probability-flow ODE in sigma space (Karras et al. 2022, no churn).

    x = x0 + sigma * eps (sigma = sqrt((1 - abar) / abar)); the derivative is d = (x - x0) / sigma:

        x0   = x - sigma * out                                      (epsilon)
             = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * out   (v_prediction)
             = out                                                  (sample)
        prev = x + (sigma_next - sigma) * d = sigma_next / sigma * x + (1 - sigma_next / sigma) * x0

    evaluated in float32 as x + ((sigma_next - sigma) / sigma) * (x - x0), which rounds once at the size of x
    as diffusers' x + d * dt does; sigma_next = 0 returns x0 itself. Deterministic (no noise). Returns prev,
    and x0 when return_x0.
    """
    _check_prediction(prediction_type)
    s = _check_sigma("sigma", sigma, allow_zero=False)
    s_next = _check_sigma("sigma_next", sigma_next, allow_zero=True)
    px, po = _karras_x0_coeffs(prediction_type, s)
    coeffs = StepCoeffs(px=px, po=po, **_euler_update(s, s_next))
    opts = _options(guidance_scale, guidance_rescale, clip_sample, backend)
    return _step(sample, model_output, coeffs, opts, return_x0)


def euler_ancestral_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: float,
    sigma_next: float,
    *,
    prediction_type: str = "epsilon",
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_sample: float | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    offset: int = 0,
    return_x0: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One Euler-ancestral step: an Euler step down to sigma_down, then fresh noise of std sigma_up.

        sigma_up   = sqrt(sigma_next^2 * (sigma^2 - sigma_next^2) / sigma^2)
        sigma_down = sqrt(sigma_next^2 - sigma_up^2)
        prev       = x + (sigma_down - sigma) * d + sigma_up * noise     (d = (x - x0) / sigma)

    x0, and the evaluation of the drift, as in euler_step (sigma_down for sigma_next). The last step
    (sigma_next = 0) draws no noise. Returns prev, and x0 when return_x0.
    """
    _check_prediction(prediction_type)
    s = _check_sigma("sigma", sigma, allow_zero=False)
    s_next = _check_sigma("sigma_next", sigma_next, allow_zero=True)
    px, po = _karras_x0_coeffs(prediction_type, s)
    sigma_up = math.sqrt(max(s_next * s_next * (s * s - s_next * s_next) / (s * s), 0.0))
    sigma_down = math.sqrt(max(s_next * s_next - sigma_up * sigma_up, 0.0))
    coeffs = StepCoeffs(px=px, po=po, cn=sigma_up, **_euler_update(s, sigma_down))
    opts = _options(guidance_scale, guidance_rescale, clip_sample, backend, noise, generator, seed, offset)
    return _step(sample, model_output, coeffs, opts, return_x0)


def dpmpp_2m_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: float,
    sigma_next: float,
    x0_prev: torch.Tensor | None = None,
    sigma_prev: float | None = None,
    *,
    prediction_type: str = "epsilon",
    solver_type: str = "midpoint",
    sde: bool = False,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_sample: float | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    offset: int = 0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++ step (data prediction), second order when the previous x0 is given.

    sigma, sigma_next, sigma_prev are sigma-space values s = sqrt((1 - abar) / abar) of the
    current, next and previous timesteps; alpha_t = 1 / sqrt(s^2 + 1), sigma_t = s * alpha_t,
    lambda = log(alpha_t / sigma_t) = -log(s). With h = lambda_next - lambda (so exp(-h) =
    s_next / s), x0 = x0(x, out) from the prediction type with (alpha_t, sigma_t) of sigma, then
    clamped to +-clip_sample:

        first order (x0_prev None):  prev = sigma_t' / sigma_t * x - alpha_t' * (exp(-h) - 1) * x0
        second order, r = (lambda - lambda_prev) / h, D1 = (x0 - x0_prev) / r:
            midpoint:  prev = first order - 0.5 * alpha_t' * (exp(-h) - 1) * D1
            heun:      prev = first order + alpha_t' * ((exp(-h) - 1) / h + 1) * D1

    (primes: at sigma_next). A step of no length (sigma_next = sigma: h = 0) returns x, the limit of both
    orders; a previous sigma equal to sigma (r = 0: no slope to estimate) takes the first-order step.
    sde=True is SDE-DPM-Solver++: x's coefficient gains a factor
    exp(-h), alpha_t' * (exp(-h) - 1) becomes -alpha_t' * (1 - exp(-2h)) (the heun D1 term
    alpha_t' * ((1 - exp(-2h)) / (-2h) + 1)), and sigma_t' * sqrt(1 - exp(-2h)) * noise is added.
    sigma_next = 0 (the final step) gives prev = x0. Returns (prev, x0): x0 is the next step's
    x0_prev.
    """
    _check_prediction(prediction_type)
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    s = _check_sigma("sigma", sigma, allow_zero=False)
    s_next = _check_sigma("sigma_next", sigma_next, allow_zero=True)
    alpha = 1.0 / math.sqrt(s * s + 1.0)
    px, po = _vp_x0_coeffs(prediction_type, alpha, s * alpha)
    alpha_next = 1.0 / math.sqrt(s_next * s_next + 1.0)
    sigma_t_next = s_next * alpha_next
    cp = cn = 0.0
    if s_next == 0.0:  # h = inf: every path lands on x0
        cx, c0 = 0.0, 1.0
    else:
        h = math.log(s / s_next)
        decay = math.exp(-h)
        if sde:
            cx = sigma_t_next / (s * alpha) * decay
            d0 = alpha_next * (1.0 - math.exp(-2.0 * h))
            cn = sigma_t_next * math.sqrt(max(1.0 - math.exp(-2.0 * h), 0.0))
        else:
            cx = sigma_t_next / (s * alpha)
            d0 = -alpha_next * (decay - 1.0)
        c0 = d0
        if x0_prev is not None:
            if sigma_prev is None:
                raise ValueError("sigma_prev is required with x0_prev (the second-order step needs lambda_prev)")
            s_prev = _check_sigma("sigma_prev", sigma_prev, allow_zero=False)
        if x0_prev is not None and h != 0.0 and s_prev != s:
            r = math.log(s_prev / s) / h
            if solver_type == "midpoint":
                d1 = 0.5 * d0
            elif sde:
                d1 = alpha_next * ((1.0 - math.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
            else:
                d1 = alpha_next * ((decay - 1.0) / h + 1.0)
            c0 = d0 + d1 / r
            cp = -d1 / r
    coeffs = StepCoeffs(px=px, po=po, cx=cx, c0=c0, cn=cn, cp=cp)
    opts = _options(guidance_scale, guidance_rescale, clip_sample, backend, noise, generator, seed, offset)
    return _step(sample, model_output, coeffs, opts, True, x0_prev=x0_prev if cp != 0.0 else None)


def flow_euler_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: float,
    sigma_next: float,
    *,
    prediction_type: str = "velocity",
    stochastic: bool = False,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_sample: float | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    offset: int = 0,
    return_x0: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One flow-matching Euler step, x_sigma = (1 - sigma) * x0 + sigma * eps, velocity v = eps - x0.

        x0   = x - sigma * v
        prev = x + (sigma_next - sigma) * v = sigma_next / sigma * x + (1 - sigma_next / sigma) * x0
                                    (evaluated as x + ((sigma_next - sigma) / sigma) * (x - x0), see euler_step)
        prev = (1 - sigma_next) * x0 + sigma_next * noise                  (stochastic=True)

    prediction_type must be "velocity" ("flow_prediction" is accepted as its other name).
    Returns prev, and x0 when return_x0.
    """
    _check_prediction(prediction_type, ("velocity", "flow_prediction"))
    s = _check_sigma("sigma", sigma, allow_zero=False)
    s_next = _check_sigma("sigma_next", sigma_next, allow_zero=True)
    if stochastic:
        coeffs = StepCoeffs(px=1.0, po=-s, c0=1.0 - s_next, cn=s_next)
    else:
        coeffs = StepCoeffs(px=1.0, po=-s, **_euler_update(s, s_next))
    opts = _options(guidance_scale, guidance_rescale, clip_sample, backend, noise, generator, seed, offset)
    return _step(sample, model_output, coeffs, opts, return_x0)
