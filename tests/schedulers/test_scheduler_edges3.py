"""Schedulers against diffusers on custom schedules (``set_timesteps(timesteps=...)`` / ``sigmas=...``), the kinds
of timestep ``step`` takes, timesteps that are not in the schedule, and the errors each gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import genkernels.schedulers as S
from tests.criterion import assert_criterion
from tests.schedulers.test_diffusers_parity import SD, TABLES, _diffusers_step, _fixed_noise

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 4, 4)

# (scheduler, constructor keywords, set_timesteps keywords): every custom schedule diffusers' scheduler takes.
CUSTOM = [
    ("DDPMScheduler", dict(), dict(timesteps=[999, 800, 501, 200, 37, 0])),
    ("DDPMScheduler", dict(SD, prediction_type="v_prediction", clip_sample=False), dict(timesteps=[900, 899, 450, 3])),
    ("EulerDiscreteScheduler", dict(SD), dict(timesteps=[999, 700.5, 400, 120.25, 10])),
    ("EulerDiscreteScheduler", dict(final_sigmas_type="sigma_min", timestep_spacing="leading"), dict(timesteps=[9, 3])),
    ("EulerDiscreteScheduler", dict(SD), dict(sigmas=[14.6, 7.5, 3.1, 0.9, 0.2, 0.0])),
    ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True), dict(sigmas=[10.0, 2.0, 0.5, 0.03])),
    ("DPMSolverMultistepScheduler", dict(SD), dict(timesteps=[999, 750, 500, 300, 100, 20])),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), dict(timesteps=[980, 512, 1])),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), dict(timesteps=[1000.0, 750.0, 500.0, 250.0])),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), dict(sigmas=[1.0, 0.6, 0.3, 0.1])),
    (
        "FlowMatchEulerDiscreteScheduler",
        dict(shift=2.0),
        dict(num_inference_steps=3, sigmas=[1.0, 0.5, 0.2], timesteps=[990.0, 500.0, 210.0]),
    ),
    ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True), dict(timesteps=[900.0, 400.0], mu=0.7)),
]


def _custom_id(case) -> str:
    name, config, kwargs = case
    return name.replace("Scheduler", "") + "-" + "-".join(f"{k}={v}" for k, v in {**config, **kwargs}.items())


@pytest.mark.parametrize("case", CUSTOM, ids=[_custom_id(c) for c in CUSTOM])
def test_custom_schedule_matches_diffusers(case, monkeypatch):
    """set_timesteps(timesteps=...) / (sigmas=...) was a TypeError ("unexpected keyword argument"). Now the
    timesteps and sigmas are diffusers' bit for bit, and every step of the run meets the criterion."""
    name, config, kwargs = case
    mine = getattr(S, name)(**config)
    theirs, theirs64 = getattr(diffusers, name)(**config), getattr(diffusers, name)(**config)
    for s in (mine, theirs, theirs64):
        s.set_timesteps(**kwargs)
    torch.testing.assert_close(mine.timesteps, theirs.timesteps, rtol=0, atol=0)
    if name != "DDPMScheduler":
        torch.testing.assert_close(mine.sigmas, theirs.sigmas, rtol=0, atol=0)
    assert mine.num_inference_steps == len(mine.timesteps)
    assert float(mine.init_noise_sigma) == pytest.approx(float(getattr(theirs, "init_noise_sigma", 1.0)), rel=1e-6)
    for attr in TABLES:
        value = getattr(theirs64, attr, None)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(theirs64, attr, value.double())
    holder = {}
    _fixed_noise(monkeypatch, name, holder)
    x = torch.randn(SHAPE) * float(mine.init_noise_sigma)
    for i, t in enumerate(mine.timesteps):
        out, noise = torch.randn(SHAPE), torch.randn(SHAPE)
        holder["noise"] = noise
        if hasattr(theirs, "scale_model_input"):
            model_in = mine.scale_model_input(x, t)
            assert_criterion(model_in, theirs.scale_model_input(x, t), theirs64.scale_model_input(x.double(), t))
        extra = {} if name == "EulerDiscreteScheduler" else {"variance_noise": noise}
        result = mine.step(out, t, x, backend="reference", **extra)
        prev, x0 = _diffusers_step(theirs, name, out, t, x, noise, {})
        prev64, x0_64 = _diffusers_step(theirs64, name, out.double(), t, x.double(), noise.double(), {})
        assert_criterion(result.prev_sample, prev, prev64, name=f"prev_sample at step {i} (t={t.item()})")
        assert_criterion(result.pred_original_sample, x0.float(), x0_64, name=f"pred_original_sample at step {i}")
        x = result.prev_sample


# (scheduler, constructor keywords, set_timesteps keywords, message): refused by diffusers and by ours.
REFUSED = [
    ("DDPMScheduler", {}, dict(num_inference_steps=3, timesteps=[900, 500, 0]), "only one of"),
    ("DDPMScheduler", {}, dict(timesteps=[900, 900, 0]), "descending"),
    ("DDPMScheduler", {}, dict(timesteps=[0, 500]), "descending"),
    ("DDPMScheduler", {}, dict(timesteps=[1000, 500]), r"\[0, 1000\)"),
    ("EulerDiscreteScheduler", {}, dict(timesteps=[900, 500], sigmas=[1.0, 0.5, 0.0]), "only one of"),
    ("EulerDiscreteScheduler", {}, dict(num_inference_steps=2, sigmas=[1.0, 0.5, 0.0]), "only one of"),
    ("EulerDiscreteScheduler", {}, dict(), "got None: pass it, timesteps or sigmas"),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True), dict(timesteps=[900, 500]), "use_karras_sigmas"),
    ("DPMSolverMultistepScheduler", {}, dict(num_inference_steps=2, timesteps=[900, 500]), "only one of"),
    ("DPMSolverMultistepScheduler", {}, dict(), "got None: pass it or timesteps"),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True), dict(timesteps=[900, 500]), "use_karras_sigmas"),
    ("DPMSolverMultistepScheduler", {}, dict(num_inference_steps=4, mu=0.5), "mu"),
    ("FlowMatchEulerDiscreteScheduler", {}, dict(sigmas=[1.0, 0.5], timesteps=[1000.0]), "same length"),
    ("FlowMatchEulerDiscreteScheduler", {}, dict(num_inference_steps=3, timesteps=[1000.0, 500.0]), "3"),
]


@pytest.mark.parametrize("name,config,kwargs,message", REFUSED, ids=[f"{c[0]}-{c[3]}" for c in REFUSED])
def test_custom_schedule_validation_follows_diffusers(name, config, kwargs, message):
    with pytest.raises((ValueError, AssertionError)):
        getattr(diffusers, name)(**config).set_timesteps(**kwargs)
    with pytest.raises(ValueError, match=message):
        getattr(S, name)(**config).set_timesteps(**kwargs)


# diffusers accepts these and runs a wrong schedule (values cast, clamped or wrapped): ours refuses them.
STRICTER = [
    ("DDPMScheduler", dict(timesteps=[900.5, 400]), "integers"),  # diffusers truncates to 900
    ("DDPMScheduler", dict(timesteps=[500, -1]), r"\[0, 1000\)"),  # diffusers reads alphas_cumprod[-1]
    ("DDPMScheduler", dict(timesteps=[]), "at least one"),  # diffusers: IndexError
    ("DPMSolverMultistepScheduler", dict(timesteps=[999.7, 400]), "integers"),  # diffusers truncates to 999
    ("DPMSolverMultistepScheduler", dict(timesteps=[1200, 400]), r"\[0, 1000\)"),  # interpolation clamps at 999
    ("EulerDiscreteScheduler", dict(timesteps=[1500.0, 400.0]), r"\[0, 999\]"),  # interpolation clamps at 999
    ("EulerDiscreteScheduler", dict(timesteps=[float("nan"), 400.0]), r"\[0, 999\]"),
    ("EulerDiscreteScheduler", dict(sigmas=[3.0]), "at least 2 values"),  # no step at all
    ("EulerDiscreteScheduler", dict(sigmas=[3.0, -1.0, 0.0]), "finite and >= 0"),
    ("FlowMatchEulerDiscreteScheduler", dict(sigmas=[]), "at least one"),
]


@pytest.mark.parametrize("name,kwargs,message", STRICTER, ids=[f"{c[0]}-{c[1]}" for c in STRICTER])
def test_custom_schedules_diffusers_would_misread_are_refused(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(S, name)().set_timesteps(**kwargs)


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerAncestralDiscreteScheduler"])
def test_schedulers_without_custom_timesteps_in_diffusers_refuse_them_too(name):
    for mod in (diffusers, S):
        with pytest.raises(TypeError, match="timesteps"):
            getattr(mod, name)().set_timesteps(timesteps=[900, 500])


def test_ddpm_custom_timesteps_step_to_the_next_listed_one():
    """The step from t goes to the next custom timestep (not t - 1, as with no schedule), as diffusers'."""
    sched = S.DDPMScheduler()
    sched.set_timesteps(timesteps=[900, 450, 7])
    assert sched.custom_timesteps
    assert [sched.previous_timestep(t) for t in (900, 450, 7)] == [450, 7, -1]
    sched.set_timesteps(4)
    assert not sched.custom_timesteps


# Each kind of timestep, as the Euler and flow-matching steps of diffusers take it: python ints (bool included)
# and CPU int32 / int64 tensors are refused as indices; NumPy integers and floats are looked up as values.
KINDS = {
    "int": lambda t: int(t),
    "bool": lambda t: True,
    "tensor-int64": lambda t: torch.tensor(int(t)),
    "tensor-int32": lambda t: torch.tensor(int(t), dtype=torch.int32),
    "tensor-int64-(1,)": lambda t: torch.tensor([int(t)]),
    "np.int64": lambda t: np.int64(int(t)),
    "np.int32": lambda t: np.int32(int(t)),
    "np.float32": lambda t: np.float32(t),
    "float": lambda t: float(t),
    "tensor-float32": lambda t: torch.tensor(float(t)),
    "tensor-float64": lambda t: torch.tensor(float(t), dtype=torch.float64),
}
REFUSED_KINDS = ("int", "bool", "tensor-int64", "tensor-int32", "tensor-int64-(1,)")
SIGMA_SCHEDULERS = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", SIGMA_SCHEDULERS)
def test_sigma_schedulers_take_the_timestep_kinds_diffusers_takes(name, kind):
    """Trailing spacing gives whole-number timesteps (999, 749, ...), so that every kind can name one. A NumPy
    integer is a value of the schedule in diffusers too (it is not a Python int): the second timestep, not the
    second index."""
    config = {} if name == "FlowMatchEulerDiscreteScheduler" else {"timestep_spacing": "trailing"}
    mine, theirs = getattr(S, name)(**config), getattr(diffusers, name)(**config)
    if name != "FlowMatchEulerDiscreteScheduler":
        for s in (mine, theirs):
            s.set_timesteps(4)
    else:
        for s in (mine, theirs):
            s.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    t = KINDS[kind](mine.timesteps[1])
    noise = {} if name == "EulerDiscreteScheduler" else {"variance_noise": torch.randn(SHAPE)}
    if kind in REFUSED_KINDS:
        with pytest.raises(ValueError, match="integer indices"):
            theirs.step(out, t, x)
        with pytest.raises(ValueError, match="not an integer index.*one of scheduler.timesteps"):
            mine.step(out, t, x, **noise)
        return
    theirs.step(out, t, x, generator=torch.Generator().manual_seed(0))
    mine.step(out, t, x, **noise)
    assert mine.step_index == theirs.step_index == 2


def test_sigma_schedulers_refuse_every_integer_tensor():
    """An integer tensor of another dtype or device is an index as much as an int64 CPU one: refused whatever its
    dtype (diffusers looks an int16 / uint8 tensor, or one on a GPU, up as a value)."""
    sched = S.EulerDiscreteScheduler(timestep_spacing="trailing")
    sched.set_timesteps(4)
    x = torch.randn(SHAPE)
    kinds = (torch.tensor(749, dtype=torch.int16), torch.tensor(1, dtype=torch.uint8), torch.tensor(749, device="meta"))
    for t in kinds:
        with pytest.raises(ValueError, match="not an integer index"):
            sched.step(x, t, x)


def test_dpm_solver_half_precision_timestep_is_compared_as_diffusers_compares_it():
    """A bfloat16 timestep (749 rounds to 748) matches the int64 schedule compared in bfloat16, as torch's ``==``
    does in diffusers: it was looked up as 748.0 on the host, found nowhere, and run as the last step."""
    mine, theirs = S.DPMSolverMultistepScheduler(), diffusers.DPMSolverMultistepScheduler()
    for s in (mine, theirs):
        s.set_timesteps(4)
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    t = mine.timesteps[1].to(torch.bfloat16)
    theirs.step(out, t, x)
    mine.step(out, t, x)
    assert mine.step_index == theirs.step_index == 2


@pytest.mark.parametrize("name", SIGMA_SCHEDULERS)
def test_a_timestep_not_in_the_schedule_gets_a_short_error(name):
    """Before set_timesteps the schedule is every training timestep: the error printed all 1000 of them."""
    sched = getattr(S, name)()
    x = torch.randn(SHAPE)
    noise = {} if name == "EulerDiscreteScheduler" else {"variance_noise": torch.randn(SHAPE)}
    with pytest.raises(ValueError) as info:
        sched.step(x, 0.5, x, **noise)
    message = str(info.value)
    assert len(message) < 400, message
    assert "0.5" in message and "1000 values" in message and "set_timesteps" in message
    sched.set_timesteps(50)
    with pytest.raises(ValueError, match=r"\(50 values, from .* down to .*\)") as info:
        sched.add_noise(x, torch.randn(SHAPE), torch.tensor([0.5, 0.5]))
    assert len(str(info.value)) < 400


def test_ddpm_previous_timestep_error_is_short():
    sched = S.DDPMScheduler()
    sched.set_timesteps(500)
    expected = r"timestep 3 is not in this scheduler's timesteps \[998, 996, 994, \.\.\., 2, 0\] \(500 values"
    with pytest.raises(ValueError, match=expected):
        sched.previous_timestep(3)


def test_dpm_solver_add_noise_compares_float_timesteps_as_diffusers():
    """999.6 was cast to int64 (999) and took the first step's sigma; diffusers compares 999.6 with the int64
    schedule as a float, finds it nowhere, and takes the last step's (its rule for timesteps not in the schedule)."""
    mine, theirs = S.DPMSolverMultistepScheduler(**SD), diffusers.DPMSolverMultistepScheduler(**SD)
    for s in (mine, theirs):
        s.set_timesteps(10)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([999.6, 999.0])
    got = mine.add_noise(x0, noise, t)
    torch.testing.assert_close(got, theirs.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    last = mine.add_noise(x0, noise, mine.timesteps[[-1, 0]])
    torch.testing.assert_close(got, last, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("bad", [-1, 5, 2.7, "1"])
def test_set_begin_index_is_checked(name, bad):
    """-1 started an Euler run at the final sigma (0: the model input unscaled, no denoising) and 2.7 at index 2,
    silently; 5 failed at the first step with a message about finished runs."""
    sched = getattr(S, name)()
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match=rf"begin_index must be an int in \[0, 4\].*got {bad!r}"):
        sched.set_begin_index(bad)
    sched.set_begin_index(np.int64(4))  # img2img at strength 0: no step left
    sched.set_begin_index(2)
    assert sched.begin_index == 2
