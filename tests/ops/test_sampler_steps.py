"""The named sampler steps on every backend against the samplers' textbook formulas, under the criterion.

The formulas below are written the way the papers (and diffusers) write them (epsilon, the
derivative d = (x - x0) / sigma, lambda = log(alpha / sigma) ...), not as the fused kernel's
coefficients: ref64 evaluates them in float64 on upcast inputs, ref in the input dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

from genkernels.ops import sampler_steps as ss
from tests.criterion import assert_criterion

BACKENDS = ["reference", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]
# The Triton interpreter mishandles bfloat16: bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
SHAPE = (2, 3, 5, 7)


# --------------------------------------------------------------------------- textbook formulas


def _guided(out, g):
    if g is None:
        return out
    out_u, out_c = out.chunk(2)
    return out_u + g * (out_c - out_u)


def _x0_vp(pred, x, out, a):
    if pred == "epsilon":
        return (x - math.sqrt(1 - a) * out) / math.sqrt(a)
    if pred == "v_prediction":
        return math.sqrt(a) * x - math.sqrt(1 - a) * out
    return out


def _eps_vp(pred, x, out, a):
    if pred == "epsilon":
        return out
    if pred == "v_prediction":
        return math.sqrt(a) * out + math.sqrt(1 - a) * x
    return (x - math.sqrt(a) * out) / math.sqrt(1 - a)


def _x0_karras(pred, x, out, s):
    if pred == "epsilon":
        return x - s * out
    if pred == "v_prediction":
        return out * (-s / math.sqrt(s * s + 1)) + x / (s * s + 1)
    return out


def _clip(x0, clip):
    return x0 if clip is None else x0.clamp(-clip, clip)


def ddpm_formula(x, out, noise, *, pred, clip, a=0.3, a_prev=0.6):
    x0 = _clip(_x0_vp(pred, x, out, a), clip)
    beta_step = 1 - a / a_prev
    mean = (math.sqrt(a_prev) * beta_step * x0 + math.sqrt(a / a_prev) * (1 - a_prev) * x) / (1 - a)
    return mean + math.sqrt((1 - a_prev) / (1 - a) * beta_step) * noise, x0


def ddim_formula(x, out, noise, *, pred, clip, a=0.3, a_prev=0.6, eta=0.7):
    eps = _eps_vp(pred, x, out, a)
    x0 = _clip(_x0_vp(pred, x, out, a), clip)
    std = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps + std * noise, x0


def euler_formula(x, out, noise, *, pred, clip, s=2.5, s_next=1.1):
    x0 = _clip(_x0_karras(pred, x, out, s), clip)
    return x + (x - x0) / s * (s_next - s), x0


def euler_ancestral_formula(x, out, noise, *, pred, clip, s=2.5, s_next=1.1):
    x0 = _clip(_x0_karras(pred, x, out, s), clip)
    s_up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
    s_down = math.sqrt(s_next**2 - s_up**2)
    return x + (x - x0) / s * (s_down - s) + s_up * noise, x0


def dpmpp_2m_formula(x, out, x0_prev, *, pred, clip, s_prev=4.0, s=2.5, s_next=1.1):
    def alpha_sigma(v):
        alpha = 1 / math.sqrt(v * v + 1)
        return alpha, v * alpha

    (a_t, sg_t), (a_s, sg_s), (a_p, sg_p) = alpha_sigma(s_next), alpha_sigma(s), alpha_sigma(s_prev)
    lam_t, lam_s, lam_p = (math.log(a / g) for a, g in ((a_t, sg_t), (a_s, sg_s), (a_p, sg_p)))
    x0 = _clip(_x0_vp(pred, x, out, a_s**2), clip)
    h = lam_t - lam_s
    d0, d1 = x0, (x0 - x0_prev) / ((lam_s - lam_p) / h)
    return sg_t / sg_s * x - a_t * (math.exp(-h) - 1) * d0 - 0.5 * a_t * (math.exp(-h) - 1) * d1, x0


def flow_formula(x, v, noise, *, pred, clip, s=0.8, s_next=0.55):
    return x + (s_next - s) * v, _clip(x - s * v, clip)


def _call(op, out, x, extra, pred, clip, g, backend):
    common = dict(prediction_type=pred, guidance_scale=g, clip_sample=clip, backend=backend)
    if op == "ddpm":
        return ss.ddpm_step(out, x, 0.3, 0.6, noise=extra, return_x0=True, **common)
    if op == "ddim":
        return ss.ddim_step(out, x, 0.3, 0.6, eta=0.7, noise=extra, return_x0=True, **common)
    if op == "euler":
        return ss.euler_step(out, x, 2.5, 1.1, return_x0=True, **common)
    if op == "euler_ancestral":
        return ss.euler_ancestral_step(out, x, 2.5, 1.1, noise=extra, return_x0=True, **common)
    if op == "dpmpp_2m":
        return ss.dpmpp_2m_step(out, x, 2.5, 1.1, extra, 4.0, **common)
    return ss.flow_euler_step(out, x, 0.8, 0.55, return_x0=True, **common)


FORMULAS = {
    "ddpm": ddpm_formula,
    "ddim": ddim_formula,
    "euler": euler_formula,
    "euler_ancestral": euler_ancestral_formula,
    "dpmpp_2m": dpmpp_2m_formula,
    "flow_euler": flow_formula,
}
# (op, prediction type, clip, guidance scale): every prediction type of every op, clipping and guidance.
CASES = [
    *[
        (op, p, None, None)
        for op in ("ddpm", "ddim", "euler", "euler_ancestral", "dpmpp_2m")
        for p in ("epsilon", "v_prediction", "sample")
    ],
    ("flow_euler", "velocity", None, None),
    ("ddpm", "epsilon", 1.0, 4.0),
    ("ddim", "v_prediction", 1.0, 7.5),
    ("ddim", "sample", 0.5, None),
    ("euler", "epsilon", None, 7.5),
    ("euler_ancestral", "v_prediction", 2.0, 3.0),
    ("dpmpp_2m", "epsilon", 1.5, 5.0),
    ("flow_euler", "velocity", None, 3.5),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,pred,clip,g", CASES)
def test_named_step_matches_formula(op, pred, clip, g, backend, dtype, device):
    x = torch.randn(SHAPE, device=device).to(dtype)
    out = torch.randn((2 * SHAPE[0] if g else SHAPE[0], *SHAPE[1:]), device=device).to(dtype)
    extra = torch.randn(SHAPE, device=device).to(dtype)  # the noise, or DPM-Solver's previous x0
    prev, x0 = _call(op, out, x, extra, pred, clip, g, backend)
    formula = FORMULAS[op]
    ref, ref_x0 = formula(x, _guided(out, g), extra, pred=pred, clip=clip)
    ref64, ref64_x0 = formula(x.double(), _guided(out.double(), g), extra.double(), pred=pred, clip=clip)
    assert_criterion(prev, ref.to(dtype), ref64, name=f"{op} prev")
    assert_criterion(x0, ref_x0.to(dtype), ref64_x0, name=f"{op} x0")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_channels_last_and_first_order_dpm(backend, device):
    """A channels_last sample keeps its layout; DPM-Solver++ without x0_prev is the first-order update."""
    x = torch.randn(SHAPE, device=device).to(memory_format=torch.channels_last)
    out = torch.randn(SHAPE, device=device).to(memory_format=torch.channels_last)
    prev, x0 = ss.dpmpp_2m_step(out, x, 2.5, 1.1, backend=backend)
    assert prev.is_contiguous(memory_format=torch.channels_last)
    a_s, a_t = 1 / math.sqrt(2.5**2 + 1), 1 / math.sqrt(1.1**2 + 1)

    def first_order(x, out):
        x0 = (x - 2.5 * a_s * out) / a_s
        return (1.1 * a_t) / (2.5 * a_s) * x - a_t * (1.1 / 2.5 - 1) * x0

    assert_criterion(prev, first_order(x, out), first_order(x.double(), out.double()), name="dpm first order")


def test_final_steps_land_on_x0():
    """sigma_next = 0 (the last step of Euler, DPM-Solver++ and flow matching) returns x0 itself."""
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    for step in (ss.euler_step, ss.euler_ancestral_step, ss.flow_euler_step):
        kwargs = {"prediction_type": "velocity"} if step is ss.flow_euler_step else {}
        prev, x0 = step(out, x, 0.7, 0.0, return_x0=True, backend="reference", **kwargs)
        torch.testing.assert_close(prev, x0, rtol=0, atol=1e-6)
    prev, x0 = ss.dpmpp_2m_step(out, x, 0.7, 0.0, torch.randn(SHAPE), 1.3, backend="reference")
    torch.testing.assert_close(prev, x0, rtol=0, atol=0)


def test_dpm_steps_of_no_length_and_repeated_sigmas():
    """A schedule with repeated timesteps (1000 inference steps on 1000 trained ones) gives DPM-Solver++ a step
    of no length (sigma_next = sigma: x itself, the limit of both orders) and a previous sigma equal to the
    current one (no slope to estimate: the first-order step). Both divided by zero before."""
    x, out, x0_prev = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    for sde in (False, True):
        for solver in ("midpoint", "heun"):
            kw = dict(sde=sde, solver_type=solver, seed=1, backend="reference")
            prev, _ = ss.dpmpp_2m_step(out, x, 1.0, 1.0, x0_prev, 2.0, **kw)
            torch.testing.assert_close(prev, x, rtol=0, atol=1e-6)
            first, _ = ss.dpmpp_2m_step(out, x, 1.0, 0.5, **kw)
            repeated, _ = ss.dpmpp_2m_step(out, x, 1.0, 0.5, x0_prev, 1.0, **kw)
            torch.testing.assert_close(repeated, first, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_seeded_noise_is_deterministic_and_matches_across_backends(backend, device):
    x, out = torch.randn(SHAPE, device=device), torch.randn(SHAPE, device=device)
    kwargs = dict(seed=77, offset=3, backend=backend)
    a = ss.euler_ancestral_step(out, x, 2.5, 1.1, **kwargs)
    b = ss.euler_ancestral_step(out, x, 2.5, 1.1, **kwargs)
    assert torch.equal(a, b)
    c = ss.euler_ancestral_step(out, x, 2.5, 1.1, seed=77, offset=4, backend=backend)
    assert not torch.allclose(a, c)
    ref = ss.euler_ancestral_step(out, x, 2.5, 1.1, seed=77, offset=3, backend="reference")
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)


def test_errors_name_the_argument():
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    with pytest.raises(ValueError, match="prediction_type"):
        ss.ddim_step(out, x, 0.3, 0.6, prediction_type="eps")
    with pytest.raises(ValueError, match="alpha_prod_t"):
        ss.ddpm_step(out, x, 0.0, 0.6)  # zero SNR cannot take an epsilon prediction
    with pytest.raises(ValueError, match="sigma_prev"):
        ss.dpmpp_2m_step(out, x, 2.5, 1.1, torch.randn(SHAPE))
    with pytest.raises(ValueError, match="sigma"):
        ss.euler_step(out, x, 0.0, 0.0)
    with pytest.raises(TypeError, match="sigma"):
        ss.euler_step(out, x, torch.tensor([2.0, 3.0]), 1.0)
    with pytest.raises(ValueError, match="prediction_type"):
        ss.flow_euler_step(out, x, 0.8, 0.5, prediction_type="epsilon")
    for eta in (float("nan"), True, -0.5):
        with pytest.raises(ValueError, match="eta must be a finite float >= 0"):
            ss.ddim_step(out, x, 0.3, 0.6, eta=eta, seed=0)
    with pytest.raises(ValueError, match="eta > 0 adds noise on a step toward less noise only"):
        ss.ddim_step(out, x, 0.6, 0.3, eta=0.5, seed=0)  # the inversion direction
    assert torch.isfinite(ss.ddim_step(out, x, 0.6, 0.3)).all()  # deterministic inversion: fine
    with pytest.raises(ValueError, match="alpha_prod_t_prev must be >= alpha_prod_t"):
        ss.ddpm_step(out, x, 0.6, 0.3, variance_type="fixed_large", seed=0)


def test_compiles_without_graph_breaks():
    """The host-side coefficient arithmetic traces to constants: a whole DDIM step (two fused passes) compiles."""
    x, out, noise = torch.randn(SHAPE), torch.randn((2 * SHAPE[0], *SHAPE[1:])), torch.randn(SHAPE)

    def step(out, x, noise):
        return ss.ddim_step(
            out,
            x,
            0.3,
            0.6,
            eta=0.5,
            noise=noise,
            guidance_scale=3.0,
            clip_sample=1.0,
            return_x0=True,
            backend="reference",
        )

    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(compiled(out, x, noise), step(out, x, noise)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
