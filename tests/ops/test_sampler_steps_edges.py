"""The named sampler steps against diffusers' own step at the edges of their use: many small steps on
large samples, where the order of the float32 operations decides whether the criterion holds.

``ref`` is diffusers' step in float32, ``ref64`` the same scheduler on float64 inputs with its sigmas
upcast to float64 (computed from the same float32 table ours read).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from genkernels.ops import sampler_steps as ss
from tests.criterion import assert_criterion

diffusers = pytest.importorskip("diffusers")

MANY = 1000
# Many elements: the largest rounding error of a step reaches its bound.
SHAPE = (4, 64, 64)


def _pair(name: str, **config):
    """diffusers' scheduler in float32 and its float64 twin, both at MANY steps."""
    ref, ref64 = getattr(diffusers, name)(**config), getattr(diffusers, name)(**config)
    for s in (ref, ref64):
        s.set_timesteps(MANY)
        s.is_scale_input_called = True  # the step alone is compared: no warning
    ref64.sigmas = ref64.sigmas.double()
    return ref, ref64


def _diffusers_prev(sched, i: int, out, x):
    sched._step_index = i
    return sched.step(out, sched.timesteps[i], x).prev_sample


def _sigma_to(op: str, sigma: float, sigma_next: float) -> float:
    """Where the step's drift goes: sigma_next, or sigma_down for the ancestral step."""
    if op != "euler_ancestral":
        return sigma_next
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    return (sigma_next**2 - sigma_up**2) ** 0.5


def _hardest_steps(op: str, sigmas: list[float], count: int, sigma_min: float) -> list[int]:
    """The steps (sigma > sigma_min: large samples) whose ratio sigma_to / sigma is least exact in float32."""

    def ratio_error(i: int) -> float:
        r = _sigma_to(op, sigmas[i], sigmas[i + 1]) / sigmas[i]
        return abs(float(torch.tensor(r, dtype=torch.float32)) - r) / r

    return sorted((i for i in range(MANY - 1) if sigmas[i] > sigma_min), key=ratio_error)[-count:]


# (op, diffusers scheduler, its config, sigma_min of the steps checked, scale of x (None: 8 sigma), of out)
MANY_STEP_CASES = [
    ("euler", "EulerDiscreteScheduler", dict(), 50.0, None, 1.0),
    ("euler", "EulerDiscreteScheduler", dict(prediction_type="v_prediction"), 50.0, None, 1.0),
    ("euler", "EulerDiscreteScheduler", dict(prediction_type="sample"), 50.0, None, 100.0),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", dict(), 50.0, None, 1.0),
    ("flow_euler", "FlowMatchEulerDiscreteScheduler", dict(shift=3.0), 0.5, 300.0, 300.0),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("op,name,config,sigma_min,x_scale,out_scale", MANY_STEP_CASES, ids=str)
def test_many_small_steps_round_as_diffusers(
    op, name, config, sigma_min, x_scale, out_scale, backend, device, monkeypatch
):
    """1000 steps of the default linear schedule (sigma from 157 down) on large samples (8 sigma: |x| up to
    ~5000, where the criterion's floor is far below an ulp): each step's update is a small correction to a
    large x. diffusers adds it once (x + d * dt); a ratio form r * x + (1 - r) * x0 also rounds r and r * x
    at the size of x, and went up to 1.5 times over the criterion's bound (1.2 times at the sampler's own
    |x| ~ sigma).

    The ancestral step runs on zero noise: its drift alone (the noise term adds a rounding of the size of
    x to both sides, which hides the drift's).
    """
    ref, ref64 = _pair(name, **config)
    sigmas = ref.sigmas.tolist()
    pred = config.get("prediction_type", "epsilon")
    if op == "euler_ancestral":
        module = importlib.import_module("diffusers.schedulers.scheduling_euler_ancestral_discrete")
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.zeros(shape, dtype=kw.get("dtype")))
    for i in _hardest_steps(op, sigmas, 6, sigma_min):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x = torch.randn(SHAPE) * (8 * sigma if x_scale is None else x_scale)
        out = torch.randn(SHAPE) * out_scale
        xd, outd = x.to(device), out.to(device)  # diffusers' steps run on the CPU tensors
        if op == "euler":
            mine = ss.euler_step(outd, xd, sigma, sigma_next, prediction_type=pred, backend=backend)
        elif op == "euler_ancestral":
            noise = torch.zeros(SHAPE, device=device)
            mine = ss.euler_ancestral_step(outd, xd, sigma, sigma_next, noise=noise, backend=backend)
        else:
            mine = ss.flow_euler_step(outd, xd, sigma, sigma_next, backend=backend)
        want, want64 = _diffusers_prev(ref, i, out, x), _diffusers_prev(ref64, i, out.double(), x.double())
        assert_criterion(mine, want, want64, name=f"{op} prev at step {i} (sigma={sigma:.4g})")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("pred", ["sample"])
def test_ddim_many_steps_on_large_samples_rounds_as_diffusers(pred, backend, device):
    """DDIM at 1000 steps on large samples and outputs (|x| ~ 300): the x0 and eps terms of
    prev = sqrt(a') x0 + dir eps are large and nearly cancel. Forming eps = (x - sqrt(a) x0) / sqrt(b)
    first rounded it at the size of x / sqrt(b), and a few steps in a thousand went up to 1.3 times over
    the criterion's bound; prev written in x and x0 (the coefficients combined in float64) stays within it."""
    config = dict(clip_sample=False, prediction_type=pred)
    ref, ref64 = diffusers.DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    for s in (ref, ref64):
        s.set_timesteps(MANY)
    ref64.alphas_cumprod = ref64.alphas_cumprod.double()
    ref64.final_alpha_cumprod = ref64.final_alpha_cumprod.double()
    abar = ref.alphas_cumprod.tolist()
    # Every step on the reference (a few of them exceed the bound before); every 25th under the slow interpreter.
    for t in range(MANY - 1, 0, -1 if backend == "reference" else -25):
        x, out = torch.randn(4, 32, 32) * 300, torch.randn(4, 32, 32) * 300
        mine = ss.ddim_step(out.to(device), x.to(device), abar[t], abar[t - 1], prediction_type=pred, backend=backend)
        want, want64 = ref.step(out, t, x).prev_sample, ref64.step(out.double(), t, x.double()).prev_sample
        assert_criterion(mine, want, want64, name=f"ddim prev at t={t}")
