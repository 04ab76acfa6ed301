"""Noise schedulers with the diffusers interface, each step one fused genkernels kernel.

    from genkernels.schedulers import DDIMScheduler
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)   # a diffusers config dict works
    scheduler.set_timesteps(50, device="cuda")
    for t in scheduler.timesteps:
        out = unet(torch.cat([x, x]), t, ...)                         # [uncond; cond]
        x = scheduler.step(out, t, x, guidance_scale=7.5).prev_sample  # guidance fused into the step

Extra keyword arguments of ``step`` beyond diffusers': guidance_scale (model_output is then
[uncond; cond]), guidance_rescale, variance_noise, seed / offset (in-kernel Philox noise) and
backend. A stochastic step given no noise source (no variance_noise, generator or seed) draws from
torch's global RNG, as diffusers' does with generator=None. generator may be a list of generators,
one per sample, as in diffusers' pipelines (sample i's noise drawn with generator i). Where diffusers
draws noise that a step does not use (the last step of Euler ancestral, SDE-DPM-Solver++ and stochastic
flow matching; a DDIM step of zero variance), the generator is advanced by the same draw, so that one
generator reused for several images gives diffusers' images on the reference backend.

set_timesteps takes custom schedules where diffusers' scheduler does (DDPM and DPM-Solver++: timesteps;
Euler: timesteps or sigmas; flow matching: sigmas and / or timesteps), with diffusers' checks, and refuses
values diffusers would cast, clamp or wrap (fractional or out-of-range timesteps, negative sigmas).

``order`` is 1 for every scheduler, as in diffusers (timesteps per denoising step). from_config takes
its own defaults for the keys a diffusers config lists in ``_use_default_values``, as diffusers does.
"""

from ._base import SchedulerConfig, SchedulerOutput
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .flow_match import FlowMatchEulerDiscreteScheduler

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "SchedulerConfig",
    "SchedulerOutput",
]
