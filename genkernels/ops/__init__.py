"""The fused ops. Each takes ``backend=`` ("auto", "reference", "triton", "cuda"); see genkernels.backend."""

from .attention import attention, attention_reference
from .bias_act import bias_act, bias_act_reference
from .coupling import actnorm, affine_coupling
from .group_norm import group_norm, group_norm_reference
from .modconv import demodulation_coefficients, modconv_epilogue
from .reparam import reparameterize, reparameterize_reference
from .sampler_steps import (
    ddim_step,
    ddpm_step,
    dpmpp_2m_step,
    euler_ancestral_step,
    euler_step,
    flow_euler_step,
)
from .schedule import StepCoeffs, add_noise, schedule_step, schedule_step_reference

__all__ = [
    "StepCoeffs",
    "actnorm",
    "affine_coupling",
    "add_noise",
    "attention",
    "attention_reference",
    "bias_act",
    "bias_act_reference",
    "ddim_step",
    "ddpm_step",
    "demodulation_coefficients",
    "dpmpp_2m_step",
    "euler_ancestral_step",
    "euler_step",
    "flow_euler_step",
    "group_norm",
    "group_norm_reference",
    "modconv_epilogue",
    "reparameterize",
    "reparameterize_reference",
    "schedule_step",
    "schedule_step_reference",
]
