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
torch's global RNG, as diffusers' does with generator=None.
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
