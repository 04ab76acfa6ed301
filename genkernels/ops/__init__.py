"""The fused ops. Each takes ``backend=`` ("auto", "reference", "triton", "cuda"); see genkernels.backend."""

from .adaln import (
    gated_residual,
    gated_residual_layer_norm_modulate,
    gated_residual_layer_norm_modulate_reference,
    gated_residual_reference,
    layer_norm_modulate,
    layer_norm_modulate_reference,
)
from .attention import attention, attention_reference
from .bias_act import bias_act, bias_act_reference
from .coupling import actnorm, affine_coupling
from .gated_mlp import gelu_tanh, gelu_tanh_reference, linear_gelu_tanh, swiglu, swiglu_reference
from .group_norm import group_norm, group_norm_reference
from .modconv import demodulation_coefficients, modconv_epilogue
from .reparam import reparameterize, reparameterize_reference
from .rope import rope, rope_frequencies, rope_frequencies_2d, rope_reference
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
    "gated_residual",
    "gated_residual_layer_norm_modulate",
    "gated_residual_layer_norm_modulate_reference",
    "gated_residual_reference",
    "gelu_tanh",
    "gelu_tanh_reference",
    "group_norm",
    "group_norm_reference",
    "layer_norm_modulate",
    "layer_norm_modulate_reference",
    "linear_gelu_tanh",
    "modconv_epilogue",
    "reparameterize",
    "reparameterize_reference",
    "rope",
    "rope_frequencies",
    "rope_frequencies_2d",
    "rope_reference",
    "schedule_step",
    "schedule_step_reference",
    "swiglu",
    "swiglu_reference",
]
