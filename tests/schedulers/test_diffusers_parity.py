"""Each scheduler against diffusers' own, over whole timestep sequences, under the DESIGN.md criterion.

At every step all three runs get the same inputs: our sample (float32), a fresh model output and
fresh noise. ``ours`` is our scheduler on the reference backend in float32; ``ref`` is diffusers
in float32; ``ref64`` is diffusers on the float64 upcast of those inputs with its schedule
tables (alphas_cumprod, sigmas, ...) upcast to float64 too, so that its step coefficients are
computed in float64 from the same float32 tables ours start from. diffusers' schedulers that
cast the sample to float32 inside step (Euler, DPM-Solver, flow matching) lose nothing, since
the float64 sample is an upcast float32. Noise reaches diffusers through ``variance_noise``
where it has one, else by replacing its ``randn_tensor`` with the same tensor: both exact.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import genkernels.schedulers as ours_mod
from tests.criterion import assert_criterion

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 4, 8, 8)
STEPS = 10
MODULES = {
    "DDPMScheduler": "scheduling_ddpm",
    "DDIMScheduler": "scheduling_ddim",
    "EulerDiscreteScheduler": "scheduling_euler_discrete",
    "EulerAncestralDiscreteScheduler": "scheduling_euler_ancestral_discrete",
    "DPMSolverMultistepScheduler": "scheduling_dpmsolver_multistep",
    "FlowMatchEulerDiscreteScheduler": "scheduling_flow_match_euler_discrete",
}
TABLES = ("alphas_cumprod", "sigmas", "final_alpha_cumprod", "one", "alpha_t", "sigma_t", "lambda_t")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CASES = [
    # DDPM: clipping on by default; variance types; zero terminal SNR with v-prediction.
    ("DDPMScheduler", dict(), {}),
    ("DDPMScheduler", dict(SD, prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False), {}),
    (
        "DDPMScheduler",
        dict(
            beta_schedule="squaredcos_cap_v2",
            prediction_type="sample",
            timestep_spacing="linspace",
            clip_sample_range=1.5,
        ),
        {},
    ),
    ("DDPMScheduler", dict(steps_offset=1, variance_type="fixed_large", clip_sample=False), {}),
    (
        "DDPMScheduler",
        dict(SD, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
        {},
    ),
    # DDIM: clipping with the model's own eps (two passes) and with the clipped eps; eta.
    ("DDIMScheduler", dict(), {}),
    ("DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), {}),
    (
        "DDIMScheduler",
        dict(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False),
        dict(eta=1.0),
    ),
    (
        "DDIMScheduler",
        dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", timestep_spacing="linspace"),
        dict(eta=0.5),
    ),
    ("DDIMScheduler", dict(), dict(eta=0.3, use_clipped_model_output=True)),
    (
        "DDIMScheduler",
        dict(
            SD,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            clip_sample=False,
            timestep_spacing="trailing",
        ),
        {},
    ),
    # Euler
    ("EulerDiscreteScheduler", dict(), {}),
    ("EulerDiscreteScheduler", dict(SD, timestep_spacing="leading", steps_offset=1), {}),
    ("EulerDiscreteScheduler", dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"), {}),
    (
        "EulerDiscreteScheduler",
        dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", final_sigmas_type="sigma_min"),
        {},
    ),
    ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True), {}),
    (
        "EulerDiscreteScheduler",
        dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, prediction_type="v_prediction"),
        {},
    ),
    # Euler ancestral
    ("EulerAncestralDiscreteScheduler", dict(), {}),
    (
        "EulerAncestralDiscreteScheduler",
        dict(SD, prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1),
        {},
    ),
    ("EulerAncestralDiscreteScheduler", dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"), {}),
    # DPM-Solver++
    ("DPMSolverMultistepScheduler", dict(), {}),
    ("DPMSolverMultistepScheduler", dict(SD, timestep_spacing="leading", steps_offset=1), {}),
    ("DPMSolverMultistepScheduler", dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"), {}),
    ("DPMSolverMultistepScheduler", dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample"), {}),
    (
        "DPMSolverMultistepScheduler",
        dict(solver_type="heun", final_sigmas_type="sigma_min", lower_order_final=False),
        {},
    ),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), {}),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_type="heun"), {}),
    ("DPMSolverMultistepScheduler", dict(solver_order=1, euler_at_final=True), {}),
    ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True), {}),
    (
        "DPMSolverMultistepScheduler",
        dict(use_karras_sigmas=True, prediction_type="v_prediction", final_sigmas_type="sigma_min"),
        {},
    ),
    # Flow matching
    ("FlowMatchEulerDiscreteScheduler", dict(), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True), dict(mu=0.8)),
    (
        "FlowMatchEulerDiscreteScheduler",
        dict(use_dynamic_shifting=True, time_shift_type="linear", shift_terminal=0.1),
        dict(mu=1.2),
    ),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0, stochastic_sampling=True), {}),
]
SET_TIMESTEPS_KEYS = ("mu",)


def _case_id(case) -> str:
    name, config, extra = case
    return name.replace("Scheduler", "") + "-" + "-".join(f"{k}={v}" for k, v in {**config, **extra}.items())


def _build(name: str, config: dict, extra: dict):
    """(ours, diffusers float32, diffusers float64) with timesteps set."""
    set_kwargs = {k: extra[k] for k in SET_TIMESTEPS_KEYS if k in extra}
    mine = getattr(ours_mod, name)(**config)
    theirs = getattr(diffusers, name)(**config)
    theirs64 = getattr(diffusers, name)(**config)
    for s in (mine, theirs, theirs64):
        s.set_timesteps(STEPS, **set_kwargs)
    for attr in TABLES:
        value = getattr(theirs64, attr, None)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(theirs64, attr, value.double())
    return mine, theirs, theirs64


def _fixed_noise(monkeypatch, name: str, holder: dict) -> None:
    """diffusers' randn_tensor returns holder["noise"] in the dtype asked for."""
    module = importlib.import_module(f"diffusers.schedulers.{MODULES[name]}")

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(holder["noise"].shape)
        return holder["noise"].to(dtype or torch.float32)

    monkeypatch.setattr(module, "randn_tensor", randn_tensor)


def _diffusers_step(sched, name, out, t, x, noise, step_kwargs):
    kwargs = dict(step_kwargs)
    kwargs.pop("mu", None)
    if name in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
        kwargs["variance_noise"] = noise
    result = sched.step(out, t, x, **kwargs)
    if name == "DPMSolverMultistepScheduler":
        return result.prev_sample, sched.model_outputs[-1]
    if name == "FlowMatchEulerDiscreteScheduler":
        sigma = sched.sigmas[sched.step_index - 1].to(x.dtype)
        return result.prev_sample, x - sigma * out
    return result.prev_sample, result.pred_original_sample


def _combine(out: torch.Tensor, g: float, phi: float) -> torch.Tensor:
    """Classifier-free guidance and guidance rescale, as diffusers' pipelines do them."""
    out_u, out_c = out.chunk(2)
    cfg = out_u + g * (out_c - out_u)
    if phi > 0:
        dims = list(range(1, cfg.dim()))
        rescaled = cfg * (out_c.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True))
        cfg = phi * rescaled + (1 - phi) * cfg
    return cfg


def _run_sequence(monkeypatch, name, config, extra, guidance=None, backend="reference", device="cpu"):
    """Ours (its step's tensors on ``device``) against diffusers' float32 and float64 steps on the CPU."""
    mine, theirs, theirs64 = _build(name, config, extra)
    assert torch.equal(mine.timesteps, theirs.timesteps), (mine.timesteps, theirs.timesteps)
    assert mine.timesteps.dtype == theirs.timesteps.dtype
    if hasattr(theirs, "sigmas") and name != "DDPMScheduler":
        assert torch.equal(mine.sigmas, theirs.sigmas)
    # diffusers' flow-matching scheduler has neither attribute: its pipelines start from unit noise.
    assert float(mine.init_noise_sigma) == pytest.approx(float(getattr(theirs, "init_noise_sigma", 1.0)), rel=1e-6)
    holder = {}
    _fixed_noise(monkeypatch, name, holder)
    step_kwargs = {k: v for k, v in extra.items() if k not in SET_TIMESTEPS_KEYS}
    x = torch.randn(SHAPE) * float(mine.init_noise_sigma)
    for i, t in enumerate(mine.timesteps):
        batch = 2 * SHAPE[0] if guidance else SHAPE[0]
        out = torch.randn((batch, *SHAPE[1:]))
        noise = torch.randn(SHAPE)
        holder["noise"] = noise
        model_in = mine.scale_model_input(x, t)
        if hasattr(theirs, "scale_model_input"):
            assert_criterion(model_in, theirs.scale_model_input(x, t), theirs64.scale_model_input(x.double(), t))
        else:
            assert model_in is x
        combined, combined64 = out, out.double()
        if guidance:
            combined, combined64 = _combine(out, *guidance), _combine(out.double(), *guidance)
        g = dict(guidance_scale=guidance[0], guidance_rescale=guidance[1]) if guidance else {}
        if name != "EulerDiscreteScheduler":  # the only deterministic step without a noise argument
            g["variance_noise"] = noise.to(device)
        result = mine.step(out.to(device), t, x.to(device), **step_kwargs, backend=backend, **g)
        prev, x0 = _diffusers_step(theirs, name, combined, t, x, noise, step_kwargs)
        prev64, x0_64 = _diffusers_step(theirs64, name, combined64, t, x.double(), noise.double(), step_kwargs)
        assert_criterion(result.prev_sample, prev, prev64, name=f"prev_sample at step {i} (t={t.item()})")
        assert_criterion(result.pred_original_sample, x0.float(), x0_64, name=f"pred_original_sample at step {i}")
        x = result.prev_sample.cpu()


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_step_sequence_matches_diffusers(case, monkeypatch):
    _run_sequence(monkeypatch, *case)


GUIDED = [
    ("DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), {}, (7.5, 0.0)),
    (
        "DDIMScheduler",
        dict(SD, prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing"),
        {},
        (5.0, 0.7),
    ),
    ("DDPMScheduler", dict(), {}, (3.0, 0.0)),
    ("EulerDiscreteScheduler", dict(SD), {}, (7.5, 0.5)),
    ("EulerAncestralDiscreteScheduler", dict(SD), {}, (4.0, 0.0)),
    ("DPMSolverMultistepScheduler", dict(SD), {}, (7.5, 0.0)),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), {}, (3.5, 0.3)),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", GUIDED, ids=[_case_id(c[:3]) + f"-g={c[3]}" for c in GUIDED])
def test_guided_step_matches_diffusers_on_combined_output(case, backend, device, monkeypatch):
    """step(guidance_scale=g) on [uncond; cond] equals diffusers' step on the guided (and rescaled) output.

    Also run on the triton backend (the interpreter on CPU): the schedulers are backend-agnostic.
    """
    name, config, extra, guidance = case
    _run_sequence(monkeypatch, name, config, extra, guidance=guidance, backend=backend, device=device)


TIMESTEP_CONFIGS = [
    dict(),
    dict(SD, timestep_spacing="leading", steps_offset=1),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"),
    dict(SD, timestep_spacing="linspace", use_karras_sigmas=True),
    dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True),
]


KARRAS = ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler")
TIMESTEP_CASES = [
    (name, config)
    for name in MODULES
    if name != "FlowMatchEulerDiscreteScheduler"
    for config in TIMESTEP_CONFIGS
    if "use_karras_sigmas" not in config or name in KARRAS
] + [
    ("FlowMatchEulerDiscreteScheduler", dict(shift=2.0)),
    ("FlowMatchEulerDiscreteScheduler", dict(shift_terminal=0.2)),
]


@pytest.mark.parametrize(
    "name,config", TIMESTEP_CASES, ids=[_case_id(c) for c in [(n, c, {}) for n, c in TIMESTEP_CASES]]
)
def test_timesteps_and_sigmas_match_diffusers_exactly(name, config):
    """Timesteps and sigmas agree bit for bit, for step counts that do and do not divide 1000."""
    for n in (1, 3, 7, 25, 50):
        mine, theirs = getattr(ours_mod, name)(**config), getattr(diffusers, name)(**config)
        mine.set_timesteps(n)
        theirs.set_timesteps(n)
        # Exact, dtype included (one flow step with a terminal shift is NaN in both: 0 / 0).
        torch.testing.assert_close(mine.timesteps, theirs.timesteps, rtol=0, atol=0, equal_nan=True)
        if name not in ("DDPMScheduler", "DDIMScheduler"):
            torch.testing.assert_close(mine.sigmas, theirs.sigmas, rtol=0, atol=0, equal_nan=True)


NOISE_CASES = [
    ("DDPMScheduler", dict(SD)),
    ("DDIMScheduler", dict(beta_schedule="squaredcos_cap_v2")),
    ("EulerDiscreteScheduler", dict(SD, timestep_spacing="leading", steps_offset=1)),
    ("EulerAncestralDiscreteScheduler", dict()),
    ("DPMSolverMultistepScheduler", dict(SD)),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
]


@pytest.mark.parametrize("name,config", NOISE_CASES, ids=[n for n, _ in NOISE_CASES])
def test_add_noise_matches_diffusers(name, config):
    mine, theirs, theirs64 = _build(name, config, {})
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    if name in ("DDPMScheduler", "DDIMScheduler"):
        t = torch.tensor([999, 3])
    else:
        t = mine.timesteps[torch.tensor([0, 7])]
    out = mine.add_noise(x0, noise, t)
    if name == "FlowMatchEulerDiscreteScheduler":
        ref, ref64 = theirs.scale_noise(x0, t, noise), theirs64.scale_noise(x0.double(), t, noise.double())
    else:
        ref, ref64 = theirs.add_noise(x0, noise, t), theirs64.add_noise(x0.double(), noise.double(), t)
    assert_criterion(out, ref, ref64, name="add_noise")


def test_from_config_takes_a_diffusers_config():
    """A diffusers config round-trips; keys of other schedulers (and _class_name) are ignored."""
    theirs = diffusers.DDIMScheduler(**SD, clip_sample=False, steps_offset=1, set_alpha_to_one=False)
    mine = ours_mod.DDIMScheduler.from_config(theirs.config)
    assert mine.config.beta_schedule == "scaled_linear" and mine.config.steps_offset == 1
    assert mine.config.set_alpha_to_one is False and mine.config.clip_sample is False
    euler = ours_mod.EulerDiscreteScheduler.from_config(theirs.config, prediction_type="v_prediction")
    assert euler.config.prediction_type == "v_prediction" and euler.config.beta_end == 0.012
    assert "clip_sample" not in euler.config
    back = diffusers.EulerDiscreteScheduler.from_config(dict(euler.config))
    for s in (euler, back):
        s.set_timesteps(7)
    assert torch.equal(euler.timesteps, back.timesteps)
    assert ours_mod.DPMSolverMultistepScheduler.from_config({"_class_name": "X", "algorithm_type": "deis"}).config[
        "algorithm_type"
    ] == ("dpmsolver++")


@pytest.mark.parametrize(
    "name,bad",
    [
        ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}),
        ("DPMSolverMultistepScheduler", {"solver_order": 3}),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
        ("DDIMScheduler", {"thresholding": True}),
        ("DDPMScheduler", {"variance_type": "learned_range"}),
        ("DDPMScheduler", {"beta_schedule": "sigmoid"}),
        ("FlowMatchEulerDiscreteScheduler", {"invert_sigmas": True}),
    ],
)
def test_unsupported_config_values_are_rejected(name, bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        getattr(ours_mod, name).from_config(bad)


@pytest.mark.parametrize("spacing", ["linspace", "trailing", "leading"])
def test_dpm_solver_runs_as_many_steps_as_timesteps(spacing):
    """DPM-Solver++ at every trained timestep: linspace then repeats timesteps (steps of no length, which
    divided by zero), "leading" would put every step at 0 and is refused with the largest count it spaces;
    a step past the schedule's end says so (an IndexError before)."""
    sched = ours_mod.DPMSolverMultistepScheduler(timestep_spacing=spacing)
    steps = 1000
    if spacing == "leading":
        with pytest.raises(ValueError, match="num_inference_steps must be below 1000 with timestep_spacing='leading'"):
            sched.set_timesteps(steps)
        steps = 999
    sched.set_timesteps(steps)
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        x = sched.step(0.1 * x, t, x).prev_sample
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match=f"all {steps} steps of the schedule have run"):
        sched.step(0.1 * x, sched.timesteps[-1], x)


def test_return_dict_false_gives_diffusers_tuples():
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    for name, length in (("DDIMScheduler", 2), ("EulerDiscreteScheduler", 2), ("DPMSolverMultistepScheduler", 1)):
        sched = getattr(ours_mod, name)()
        sched.set_timesteps(4)
        result = sched.step(out, sched.timesteps[0], x, return_dict=False)
        assert isinstance(result, tuple) and len(result) == length


def test_seeded_noise_is_reproducible_and_fresh_each_step():
    """seed= draws in-kernel Philox noise: the same run twice is identical, and each step draws anew."""

    def run():
        sched = ours_mod.EulerAncestralDiscreteScheduler()
        sched.set_timesteps(3)
        x, zero = torch.zeros(SHAPE), torch.zeros(SHAPE)
        samples = []
        for t in sched.timesteps[:2]:
            # A zero epsilon makes x0 = x: each step adds sigma_up * noise to the sample.
            x = sched.step(zero, t, x, seed=1234, backend="reference").prev_sample
            samples.append(x)
        return samples

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    draw1, draw2 = first[0].flatten(), (first[1] - first[0]).flatten()
    assert abs(torch.corrcoef(torch.stack([draw1, draw2]))[0, 1]) < 0.3


@pytest.mark.parametrize("name", ["DDPMScheduler", "EulerAncestralDiscreteScheduler"])
def test_identical_generators_give_diffusers_noise(name):
    """On the reference backend a CPU generator draws torch.randn of the sample's shape, as diffusers does."""
    mine, theirs = getattr(ours_mod, name)(), getattr(diffusers, name)()
    for s in (mine, theirs):
        s.set_timesteps(STEPS)
    gen_mine, gen_theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE)
    for t in mine.timesteps:
        out = torch.randn(SHAPE)
        prev = mine.step(out, t, x, generator=gen_mine, backend="reference").prev_sample
        expected = theirs.step(out, t, x, generator=gen_theirs).prev_sample
        torch.testing.assert_close(prev, expected, rtol=1e-5, atol=1e-5)
        x = prev


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_device_timesteps_follow_the_step_counter(name):
    """A timestep that lives on a device is never read on the host: the step counter gives the schedule position.

    (A "meta" tensor stands in for a GPU tensor here: reading it would fail.)
    """
    runs = []
    for on_device in (False, True):
        torch.manual_seed(0)
        sched = getattr(ours_mod, name)()
        sched.set_timesteps(5)
        x = torch.randn(SHAPE)
        for t in sched.timesteps:
            out = torch.randn(SHAPE)
            t = t.to("meta") if on_device else t
            sched.scale_model_input(x, t)  # must not read t either
            x = sched.step(out, t, x, backend="reference").prev_sample
        runs.append(x)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_add_noise_at_begin_index_matches_diffusers(name):
    """With set_begin_index (img2img), add_noise uses the begin step's sigma for every sample, as diffusers."""
    mine, theirs, theirs64 = _build(name, dict(SD), {})
    for s in (mine, theirs, theirs64):
        s.set_begin_index(4)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = mine.timesteps[4:5].repeat(SHAPE[0])
    ref64 = theirs64.add_noise(x0.double(), noise.double(), t)
    assert_criterion(mine.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), ref64, name="add_noise")
