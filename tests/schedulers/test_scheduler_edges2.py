"""Schedulers against diffusers where a pipeline written for diffusers relies on them: configs converted with
from_config, ``order``, lists of generators and generators reused across runs, and configs that do not fit."""

from __future__ import annotations

import importlib
import re

import numpy as np
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


def test_list_of_generators_on_a_fast_backend_and_errors(device):
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    runs = {}
    for backend in ("reference", "triton"):
        sched = S.EulerAncestralDiscreteScheduler()
        sched.set_timesteps(4)
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]  # CPU generators, as diffusers' pipelines pass
        xd, outd = x.to(device), out.to(device)
        runs[backend] = sched.step(outd, sched.timesteps[1], xd, generator=gens, backend=backend).prev_sample
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


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("DDPMScheduler", "FlowMatchEulerDiscreteScheduler")])
def test_our_configs_list_the_options_left_at_their_defaults(name):
    """``X.from_config(ours.config)``, ours or diffusers' X: our configs did not list ``_use_default_values``, so
    every option counted as chosen. Euler, Euler ancestral and DPM-Solver made from our DDPM's config took its
    "leading" spacing (Euler: [801, 601, ...] instead of [999, 749.25, ...] and a third of the initial noise),
    where diffusers' own DDPM config gives X's defaults. Options passed explicitly still carry over."""
    mine_src = S.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    theirs_src = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert sorted(mine_src.config["_use_default_values"]) == sorted(theirs_src.config["_use_default_values"])
    expected = getattr(diffusers, name).from_config(theirs_src.config)
    built = [getattr(S, name).from_config(mine_src.config), getattr(diffusers, name).from_config(mine_src.config)]
    for s in (*built, expected):
        s.set_timesteps(5)
    for s in built:
        assert s.config.timestep_spacing == expected.config.timestep_spacing
        assert s.config.beta_schedule == "scaled_linear"
        torch.testing.assert_close(s.timesteps, expected.timesteps, rtol=0, atol=0)
        assert float(s.init_noise_sigma) == pytest.approx(float(expected.init_noise_sigma), rel=1e-6)
    # The scheduler made by from_config lists its own defaults in turn, as diffusers' does.
    assert sorted(built[0].config["_use_default_values"]) == sorted(expected.config["_use_default_values"])
    # An option passed explicitly, even at its default value, is the source's choice: it carries over.
    chosen = S.DDPMScheduler(timestep_spacing="leading", steps_offset=1)
    for cls in (getattr(S, name), getattr(diffusers, name)):
        config = cls.from_config(chosen.config).config
        assert (config.timestep_spacing, config.steps_offset) == ("leading", 1)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), "1"])
def test_clip_sample_range_is_checked_at_construction(name, value):
    """clip_sample_range 0 or below (or not a finite number) with clip_sample on was accepted by the constructor
    and from_config, and refused at the first step() as "clip_sample must be > 0", a name the user never wrote.
    With clipping off the value is unused, as in diffusers."""
    match = rf"{name}: clip_sample_range must be a finite float > 0 with clip_sample=True .* got {value!r}"
    with pytest.raises(ValueError, match=match):
        getattr(S, name)(clip_sample_range=value)
    with pytest.raises(ValueError, match=match):
        getattr(S, name).from_config({"clip_sample_range": value})
    assert repr(getattr(S, name)(clip_sample=False, clip_sample_range=value).config.clip_sample_range) == repr(value)


@pytest.mark.parametrize("seed", [2.5, -1, True, 2**63, None, "0"])
def test_sample_diffusion_seed(seed):
    """2.5, True, None and "0" were torch errors ("manual_seed expected a long, but got float"); -1 sampled, as
    seed 2^64 - 1 (torch wraps it), so seeds -1 and 2^64 - 1 gave the same images."""
    meta = {"objective": "eps", "schedule": train.Schedule().__dict__, "image_shape": [1, 8, 8]}
    with pytest.raises(ValueError, match=rf"seed must be an integer in \[0, 2\^63\), got {re.escape(repr(seed))}"):
        train.sample_diffusion(_model(), meta, torch.tensor([0]), sampler="ddim", steps=2, seed=seed)


@pytest.mark.parametrize("guidance", [float("nan"), float("inf"), "3", None])
def test_sample_diffusion_guidance(guidance):
    """NaN and inf reached the step as "guidance_scale must be a finite float"; None was a TypeError of the same
    check after the model had run. Now the argument the caller passed is named, before any work."""
    meta = {"objective": "eps", "schedule": train.Schedule().__dict__, "image_shape": [1, 8, 8]}
    with pytest.raises(ValueError, match=rf"guidance must be a finite float, got {re.escape(repr(guidance))}"):
        train.sample_diffusion(_model(), meta, torch.tensor([0]), sampler="ddim", steps=2, guidance=guidance)
    x = train.sample_diffusion(_model(), meta, torch.tensor([0]), sampler="ddim", steps=2, seed=np.int64(3))
    assert x.shape == (1, 1, 8, 8) and x.isfinite().all()


def test_step_output_by_field_name():
    """diffusers' outputs are dicts too (``out["prev_sample"]``); ours raised TypeError (tuple indices must be
    integers). A field that is None is no key, as in diffusers."""
    sched = S.DDIMScheduler()
    sched.set_timesteps(4)
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    result = sched.step(out, sched.timesteps[0], x)
    assert result["prev_sample"] is result.prev_sample and result["pred_original_sample"] is result[1]
    with pytest.raises(KeyError):
        S.SchedulerOutput(x)["pred_original_sample"]
    with pytest.raises(KeyError):
        result["sample"]


@pytest.mark.parametrize("eta", ["0.5", -0.5, float("nan"), None])
def test_ddim_eta_is_checked(eta):
    """A string eta was "'>' not supported between instances of 'str' and 'int'", None the same for NoneType."""
    sched = S.DDIMScheduler()
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match=rf"eta must be a finite float >= 0, got {re.escape(repr(eta))}"):
        sched.step(torch.randn(SHAPE), sched.timesteps[0], torch.randn(SHAPE), eta=eta)


def test_euler_ancestral_sample_prediction_is_the_implied_epsilon_step(monkeypatch):
    """diffusers' Euler ancestral raises NotImplementedError for prediction_type "sample"; ours runs it with
    x0 = model_output. That step must be diffusers' epsilon step on eps = (x - x0) / sigma."""
    mine = S.EulerAncestralDiscreteScheduler(prediction_type="sample")
    theirs = diffusers.EulerAncestralDiscreteScheduler()
    for s in (mine, theirs):
        s.set_timesteps(5)
    x = torch.randn(SHAPE) * mine.init_noise_sigma
    for i, t in enumerate(mine.timesteps[:3]):
        x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
        eps = (x - x0) / mine.sigmas[i]
        got = mine.step(x0, t, x, variance_noise=noise, backend="reference").prev_sample
        module = importlib.import_module("diffusers.schedulers.scheduling_euler_ancestral_discrete")
        monkeypatch.setattr(module, "randn_tensor", lambda *args, **kwargs: noise)
        expected = theirs.step(eps, t, x).prev_sample
        # float32 rounding of x (|x| up to about 50) and of eps, which divides by sigma
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
        x = expected
