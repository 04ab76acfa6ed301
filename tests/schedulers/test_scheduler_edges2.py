"""Schedulers against diffusers where a pipeline written for diffusers relies on them: configs converted with
from_config, ``order``, lists of generators and generators reused across runs, and configs that do not fit."""

from __future__ import annotations

import pytest
import torch

import genkernels.schedulers as S
from genkernels import train
from tests.criterion import assert_criterion
from tests.schedulers.test_scheduler_edges import ALL, SHAPE

diffusers = pytest.importorskip("diffusers")

# (scheduler, constructor keywords, step keywords): every step that draws noise in diffusers.
STOCHASTIC = [
    ("DDPMScheduler", {}, {}),
    ("DDIMScheduler", {}, {"eta": 1.0}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, {}),
]
# Stable Diffusion 1.x's scheduler_config.json as published (no timestep_spacing: it predates the option).
SD_HUB_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("DDPMScheduler", "FlowMatchEulerDiscreteScheduler")])
@pytest.mark.parametrize("source", ["sd-hub", "ddpm-defaults"])
def test_from_config_takes_its_own_defaults_where_the_source_used_defaults(name, source):
    """``pipe.scheduler = X.from_config(pipe.scheduler.config)``: diffusers leaves out the keys the source
    scheduler took by default (its config's ``_use_default_values``), so X uses its own defaults there. Ours
    took the source's: Euler got "leading" timesteps [801, 601, ...] instead of [999, 749.25, ...] and a third of
    the initial noise, DDIM (from PNDM) set_alpha_to_one=False; other images, no error."""
    if source == "sd-hub":
        config = diffusers.PNDMScheduler.from_config(SD_HUB_CONFIG).config
    else:
        config = diffusers.DDPMScheduler(beta_schedule="scaled_linear", clip_sample=False).config
    mine, theirs = getattr(S, name).from_config(config), getattr(diffusers, name).from_config(config)
    for key in ("timestep_spacing", "steps_offset", "beta_schedule", "set_alpha_to_one", "clip_sample"):
        if key in mine.config:
            assert mine.config[key] == theirs.config[key], key
    for s in (mine, theirs):
        s.set_timesteps(5)
    torch.testing.assert_close(mine.timesteps, theirs.timesteps, rtol=0, atol=0)
    assert float(mine.init_noise_sigma) == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)
    # Keyword arguments still win over the config, defaults or not.
    assert getattr(S, name).from_config(config, timestep_spacing="trailing").config.timestep_spacing == "trailing"


@pytest.mark.parametrize("name", ALL)
def test_order_is_diffusers(name):
    """order is the number of timesteps per denoising step (pipelines slice ``timesteps[t_start * order:]`` and
    call ``set_begin_index(t_start * order)`` for img2img). DPM-Solver++ 2M said 2 (its solver order): img2img
    at strength 0.5 then skipped all the timesteps, and partial schedules started at twice the index."""
    assert getattr(S, name)().order == getattr(diffusers, name)().order == 1
    if name == "DPMSolverMultistepScheduler":
        assert S.DPMSolverMultistepScheduler(solver_order=1).order == 1


@pytest.mark.parametrize("name,config,kwargs", STOCHASTIC, ids=[c[0] for c in STOCHASTIC])
def test_list_of_generators_gives_diffusers_noise(name, config, kwargs):
    """diffusers' pipelines take one generator per image and pass the list to step (randn_tensor draws each
    sample's noise with its own generator). It was a TypeError; now the reference matches diffusers, and the
    triton backend runs on the same noise."""
    mine, theirs = getattr(S, name)(**config), getattr(diffusers, name)(**config)
    for s in (mine, theirs):
        s.set_timesteps(4)
    gens_mine = [torch.Generator().manual_seed(s) for s in (3, 4)]
    gens_theirs = [torch.Generator().manual_seed(s) for s in (3, 4)]
    x = torch.randn(SHAPE)
    for t in mine.timesteps[:2]:
        out = torch.randn(SHAPE)
        got = mine.step(out, t, x, generator=gens_mine, backend="reference", **kwargs).prev_sample
        expected = theirs.step(out, t, x, generator=gens_theirs, **kwargs).prev_sample
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        x = got
    # Sample i's noise comes from generator i alone: the first sample's step is the same in a batch of one.
    single, batch = getattr(S, name)(**config), getattr(S, name)(**config)
    for s in (single, batch):
        s.set_timesteps(4)
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    t = single.timesteps[1]
    gen = [torch.Generator().manual_seed(7)]
    one = single.step(out[:1], t, x[:1], generator=gen, backend="reference", **kwargs).prev_sample
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    both = batch.step(out, t, x, generator=gens, backend="reference", **kwargs).prev_sample
    torch.testing.assert_close(both[:1], one, rtol=0, atol=0)


def test_list_of_generators_on_a_fast_backend_and_errors():
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    runs = {}
    for backend in ("reference", "triton"):
        sched = S.EulerAncestralDiscreteScheduler()
        sched.set_timesteps(4)
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        runs[backend] = sched.step(out, sched.timesteps[1], x, generator=gens, backend=backend).prev_sample
    sched = S.EulerAncestralDiscreteScheduler()
    sched.set_timesteps(4)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    ref64 = sched.step(out.double(), sched.timesteps[1], x.double(), generator=gens, backend="reference")
    assert_criterion(runs["triton"], runs["reference"], ref64.prev_sample, "prev_sample")
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match=r"generator is a list of 3 generators but the batch has 2 samples"):
        sched.step(out, sched.timesteps[1], x, generator=[torch.Generator()] * 3)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator, a list of them or None, got list of"):
        sched.step(out, sched.timesteps[1], x, generator=[torch.Generator(), 5])


@pytest.mark.parametrize("name,config,kwargs", STOCHASTIC, ids=[c[0] for c in STOCHASTIC])
@pytest.mark.parametrize("as_list", [False, True], ids=["generator", "list"])
def test_generator_reused_for_a_second_run_matches_diffusers(name, config, kwargs, as_list):
    """One generator for several images in turn (a loop over prompts): diffusers draws noise at the last step too
    (Euler ancestral, SDE-DPM-Solver++, stochastic flow matching) and at a DDIM step of zero variance, where ours
    drew nothing. The first image matched; the second started from other noise (max difference 0.8 .. 300)."""
    mine, theirs = getattr(S, name)(**config), getattr(diffusers, name)(**config)

    def generator():
        return [torch.Generator().manual_seed(0)] if as_list else torch.Generator().manual_seed(0)

    gen_mine, gen_theirs = generator(), generator()
    first = gen_mine[0] if as_list else gen_mine
    first_theirs = gen_theirs[0] if as_list else gen_theirs
    for _ in range(2):
        for s in (mine, theirs):
            s.set_timesteps(3)
        x = torch.randn((1, *SHAPE[1:]), generator=first)
        expected = torch.randn((1, *SHAPE[1:]), generator=first_theirs)
        torch.testing.assert_close(x, expected, rtol=0, atol=0)
        for t in mine.timesteps:
            out = 0.3 * x
            expected = theirs.step(out, t, x, generator=gen_theirs, **kwargs).prev_sample
            x = mine.step(out, t, x, generator=gen_mine, backend="reference", **kwargs).prev_sample
            torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)


def test_variance_type_of_another_schedulers_config():
    """DPMSolverMultistepScheduler.from_config(a DDPM config naming variance_type "fixed_small") was a ValueError
    (diffusers ignores every variance type but the learned ones there); DDPMScheduler(variance_type=None), as in
    a DPM-Solver config, was one too (diffusers runs it as "fixed_small")."""
    ddpm_config = {"_class_name": "DDPMScheduler", "variance_type": "fixed_small", "clip_sample": False}
    dpm = S.DPMSolverMultistepScheduler.from_config(ddpm_config)
    assert dpm.config.variance_type == "fixed_small"
    with pytest.raises(ValueError, match="variance_type"):
        S.DPMSolverMultistepScheduler(variance_type="learned_range")
    mine, theirs = S.DDPMScheduler(variance_type=None), diffusers.DDPMScheduler(variance_type=None)
    small = S.DDPMScheduler(variance_type="fixed_small")
    x, out, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    for s in (mine, theirs, small):
        s.set_timesteps(5)
    t = mine.timesteps[1]
    got = mine.step(out, t, x, variance_noise=noise, backend="reference").prev_sample
    torch.testing.assert_close(got, small.step(out, t, x, variance_noise=noise).prev_sample, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(2)
    theirs_prev = theirs.step(out, t, x, generator=gen).prev_sample
    mine.set_timesteps(5)
    got = mine.step(out, t, x, generator=torch.Generator().manual_seed(2), backend="reference").prev_sample
    torch.testing.assert_close(got, theirs_prev, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in ALL if n != "FlowMatchEulerDiscreteScheduler"])
def test_trained_betas_must_cover_the_training_timesteps(name):
    """500 trained betas with num_train_timesteps 1000: DDPM / DDIM failed with "list index out of range" at
    step(); Euler and DPM-Solver clamped every timestep past 499 to the last sigma and sampled on a wrong
    schedule, silently."""
    betas = torch.linspace(1e-4, 0.02, 500).tolist()
    with pytest.raises(ValueError, match=r"trained_betas has shape \(500,\) but num_train_timesteps is 1000"):
        getattr(S, name)(trained_betas=betas)
    sched = getattr(S, name)(trained_betas=betas, num_train_timesteps=500)
    assert sched.alphas_cumprod.shape == (500,)


def _model():
    from genkernels.models import DiT, DiTConfig

    torch.manual_seed(0)
    return DiT(DiTConfig.tiny(num_classes=3), backend="reference").eval()


@pytest.mark.parametrize(
    "labels,error,match",
    [
        (torch.tensor(1), ValueError, r"labels must be a \(N,\) tensor of class labels, got shape \(\)"),
        ([0, 1], TypeError, r"labels must be a \(N,\) tensor of class labels, got list"),
        (torch.tensor([[0, 1]]), ValueError, r"labels must be a \(N,\) tensor of class labels, got shape \(1, 2\)"),
    ],
)
def test_sample_diffusion_labels(labels, error, match):
    """A 0-d tensor was an IndexError (tuple index out of range), a list an AttributeError, a (1, 2) tensor
    "labels must have shape (1,)" (one image asked for two labels)."""
    meta = {"objective": "eps", "schedule": train.Schedule().__dict__, "image_shape": [1, 8, 8]}
    with pytest.raises(error, match=match):
        train.sample_diffusion(_model(), meta, labels, sampler="ddim", steps=2)


@pytest.mark.parametrize("steps", [None, "10", 2.5, True, 0])
def test_sample_diffusion_steps(steps):
    """None and "10" were TypeErrors from a comparison ("'<' not supported"), 2.5 and True a complaint about
    num_inference_steps, an argument the caller never passed."""
    meta = {"objective": "eps", "schedule": train.Schedule().__dict__, "image_shape": [1, 8, 8]}
    with pytest.raises(ValueError, match=rf"steps must be an int >= 1, got {steps!r}"):
        train.sample_diffusion(_model(), meta, torch.tensor([0]), sampler="ddim", steps=steps)
