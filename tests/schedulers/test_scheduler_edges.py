"""Schedulers at the edges of their diffusers interface: steps without a noise source, timesteps and step
counts that are not in (or not valid for) the schedule, steps past the end, and the errors each gives."""

from __future__ import annotations

import math

import pytest
import torch

import genkernels.schedulers as S
from genkernels.ops import ddim_step
from tests.criterion import assert_criterion

SHAPE = (2, 3, 4, 4)
ALL = [
    "DDPMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
]
# (scheduler, constructor keywords, step keywords): every step that draws noise.
STOCHASTIC = [
    ("DDPMScheduler", {}, {}),
    ("DDIMScheduler", {}, {"eta": 0.5}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, {}),
]


def _ddpm64(out, x, abar_t, abar_prev, noise, clip=1.0):
    """Ho et al. (2020), eq. 7, epsilon prediction, in float64: the posterior mean plus its std times noise."""
    out, x, noise = out.double(), x.double(), noise.double()
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    x0 = ((x - math.sqrt(1 - abar_t) * out) / math.sqrt(abar_t)).clamp(-clip, clip)
    mean = math.sqrt(abar_prev) * beta_t / (1 - abar_t) * x0 + math.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t) * x
    return mean + math.sqrt((1 - abar_prev) / (1 - abar_t) * beta_t) * noise


@pytest.mark.parametrize("name,config,kwargs", STOCHASTIC, ids=[c[0] for c in STOCHASTIC])
def test_step_without_a_noise_source_draws_from_torchs_global_rng(name, config, kwargs):
    """diffusers' step(out, t, x) with generator=None draws torch.randn from the global RNG; a pipeline
    written for diffusers passes generator=None (its default): that step must run, and give the step on
    the noise torch.randn would have drawn after the same torch.manual_seed."""
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    first, second = getattr(S, name)(**config), getattr(S, name)(**config)
    for s in (first, second):
        s.set_timesteps(4)
    t = first.timesteps[1]
    torch.manual_seed(11)
    got = first.step(out, t, x, backend="reference", **kwargs).prev_sample
    torch.manual_seed(11)
    noise = torch.randn(SHAPE)
    expected = second.step(out, t, x, variance_noise=noise, backend="reference", **kwargs).prev_sample
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ddpm_step_without_a_noise_source_matches_the_formula_and_the_seed(backend, device):
    """The plain diffusers loop (no generator) on DDPM: the posterior step of Ho et al. on global-RNG noise,
    the same under the same torch.manual_seed, other noise under another."""
    sched = S.DDPMScheduler()
    sched.set_timesteps(10)
    t = int(sched.timesteps[2])
    t_prev = int(sched.timesteps[3])
    abar = sched.alphas_cumprod.double()
    x, out = torch.randn(SHAPE, device=device), torch.randn(SHAPE, device=device)

    def run(seed):
        torch.manual_seed(seed)
        return sched.step(out, t, x, backend=backend).prev_sample

    first, again, other = run(3), run(3), run(4)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-3
    if backend == "reference":  # the reference draws torch.randn with the global (CPU) generator, as diffusers
        torch.manual_seed(3)
        noise = torch.randn(SHAPE).to(device)
        ref = sched.step(out, t, x, variance_noise=noise, backend="reference").prev_sample
        assert_criterion(first, ref, _ddpm64(out, x, abar[t].item(), abar[t_prev].item(), noise), "prev_sample")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("steps", [2.5, 10.0, None, True])
def test_num_inference_steps_must_be_an_int(name, steps):
    """2.5 gave DDPM / DDIM three steps (and DDIM a TypeError at step() for 10.0); None and floats gave
    TypeErrors from inside numpy or a comparison; True ran one step."""
    sched = getattr(S, name)()
    with pytest.raises(ValueError, match=rf"num_inference_steps must be an int (in \[1, 1000\]|>= 1), got {steps!r}"):
        sched.set_timesteps(steps)


@pytest.mark.parametrize(
    "name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"]
)
def test_a_step_past_the_end_says_so(name):
    """It was an IndexError (Euler, flow) or a complaint about a missing noise source (Euler ancestral)."""
    sched = getattr(S, name)()
    sched.set_timesteps(3)
    x = torch.randn(SHAPE)
    for t in sched.timesteps:
        x = sched.step(0.1 * x, t, x, **_noise_like(name, x)).prev_sample
    with pytest.raises(ValueError, match="all 3 steps of the schedule have run"):
        sched.step(0.1 * x, sched.timesteps[-1], x, **_noise_like(name, x))
    if hasattr(sched, "scale_model_input") and name != "FlowMatchEulerDiscreteScheduler":
        with pytest.raises(ValueError, match="all 3 steps of the schedule have run"):  # was an IndexError
            sched.scale_model_input(x, sched.timesteps[-1])


def _noise_like(name, x):
    return {} if name == "EulerDiscreteScheduler" else {"variance_noise": torch.randn_like(x)}


def test_ddpm_step_at_a_timestep_not_in_the_schedule():
    """It was "ValueError: 123 is not in list", from list.index."""
    sched = S.DDPMScheduler()
    sched.set_timesteps(10)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match=r"timestep 123 is not in this scheduler's timesteps \[900, 800"):
        sched.step(torch.randn(SHAPE), 123, x, variance_noise=torch.randn(SHAPE))


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_discrete_schedulers_refuse_fractional_timesteps(name):
    """900.5 ran as t = 900 (int() truncated it); diffusers fails indexing its tables with a float. An integral
    float (900.0) is the timestep 900."""
    sched = getattr(S, name)()
    sched.set_timesteps(10)
    x, out, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    with pytest.raises(ValueError, match=r"timestep must be an integer.*got 900\.5"):
        sched.step(out, 900.5, x, variance_noise=noise)
    with pytest.raises(ValueError, match=r"timesteps must be integers in \[0, 1000\).*999\.7"):
        sched.add_noise(x, noise, torch.tensor([999.7, 3.0]))
    whole = getattr(S, name)()
    whole.set_timesteps(10)
    ints = whole.step(out, 900, x, variance_noise=noise).prev_sample
    sched = getattr(S, name)()
    sched.set_timesteps(10)
    torch.testing.assert_close(sched.step(out, 900.0, x, variance_noise=noise).prev_sample, ints, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("bad", [1000, -1])
def test_add_noise_refuses_timesteps_outside_the_training_range(name, bad):
    """It was "IndexError: index out of range in self" (and, on a GPU, a device-side assert)."""
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match=rf"timesteps must be integers in \[0, 1000\), got .*{bad}"):
        getattr(S, name)().add_noise(x, torch.randn(SHAPE), torch.tensor([bad, 0]))


@pytest.mark.parametrize(
    "name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"]
)
def test_add_noise_refuses_host_timesteps_not_in_the_schedule(name):
    """t = 500 is not among 10 inference timesteps: its sigma was silently the first step's (the largest);
    diffusers fails. Host timesteps are checked (no synchronization needed); those of the schedule work."""
    sched = getattr(S, name)()
    sched.set_timesteps(10)
    x, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    with pytest.raises(ValueError, match=r"timesteps .*500.* not in this scheduler's timesteps"):
        sched.add_noise(x, noise, torch.tensor([float(sched.timesteps[0]), 500.0]))
    t = sched.timesteps[[0, 9]]
    sigma = sched.sigmas[[0, 9]].double().view(-1, 1, 1, 1)
    if name == "FlowMatchEulerDiscreteScheduler":
        ref64 = (1 - sigma) * x.double() + sigma * noise.double()
    else:
        ref64 = x.double() + sigma * noise.double()
    assert_criterion(sched.add_noise(x, noise, t), ref64.float(), ref64, "add_noise")


def test_named_step_error_for_a_batch_of_abar():
    """alphas_cumprod[t] for a batch of t (a (B,) CPU tensor) was refused as "got one on cpu"."""
    x = torch.randn(SHAPE)
    with pytest.raises(
        TypeError,
        match=r"alpha_prod_t must be a Python float or a one-element CPU tensor, got a "
        r"tensor of shape \(2,\) on cpu",
    ):
        ddim_step(torch.randn(SHAPE), x, torch.tensor([0.5, 0.6]), 0.9)
