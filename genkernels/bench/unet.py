"""One denoising step of the Stable-Diffusion-like UNet: benchmark case, goals and the CPU self-check.

The workload of shared/ANCHORS.md's UNet step: ``UNetConfig.sd_like()`` (about 0.86 G
parameters), bf16, batch 2 (the [uncond; cond] batch of classifier-free guidance), a 64x64
latent with 4 channels, a (2, 77, 768) text context, one timestep. The weights are seeded, the
zero-initialized output convolution re-drawn so the output depends on the whole network.

The variants, the correctness criterion, the rate and the summary are the whole-model benchmark's
(``genkernels.bench._model``): PyTorch-layer eager (``UNet(config, torch_layers=True)``, sharing
the weights), its torch.compile (the compile, about 50 s on an H200, is most of this case's time),
genkernels layers eager and under a CUDA graph (each call copies the latent, the timestep and the
context into its static buffers). The step is 1.61 TFLOP.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _model
from .core import DTYPE_NAMES

OP = "unet"
#: Share of a time budget (group_norm has 1): one case, but torch.compile of the UNet takes about 50 s.
BUDGET_SHARE = 0.5

BATCH, LATENT, CONTEXT_LEN = 2, 64, 77
#: A mid-schedule timestep (the training scale is [0, 1000)).
TIMESTEP = 500.0
SEED = 0


def _config(name: str) -> Any:
    from genkernels.models import UNetConfig

    return getattr(UNetConfig, name)(num_classes=0) if name == "tiny" else getattr(UNetConfig, name)()


def build_models(config: Any, device: torch.device, dtype: torch.dtype, seed: int = SEED) -> tuple[Any, Any]:
    """(genkernels-layer UNet, PyTorch-layer UNet sharing its parameters), seeded weights, eval mode.

    The output convolution, zero at initialization, is re-drawn with PyTorch's default init so
    that the output depends on every layer.
    """
    from genkernels.models import UNet
    from genkernels.models.diffusion import with_torch_layers

    def build() -> UNet:
        model = UNet(config)
        model.conv_out.reset_parameters()
        return model

    return _model.seeded_models(build, with_torch_layers, device, dtype, seed)


def make_inputs(
    config: Any, batch: int, size: int, context_len: int, dtype: torch.dtype, device: torch.device, seed: int = SEED
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """latent (B, in_channels, size, size) and context (B, context_len, cross_attention_dim): seeded
    standard normals in ``dtype``; t: (B,) float32, all TIMESTEP."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=g).to(device, dtype)
    ctx = torch.randn(batch, context_len, config.cross_attention_dim, generator=g).to(device, dtype)
    t = torch.full((batch,), TIMESTEP, device=device)
    return x, t, ctx


def step(model: Any, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """One denoising step: the model's prediction at timestep ``t`` with text context ``ctx``."""
    return model(x, t, encoder_hidden_states=ctx)


class UNetCase(_model.ModelCase):
    """One UNet step (a config, batch, latent size, context length and dtype); see the module doc."""

    op = OP
    table = "UNet denoising step"
    workload, call, output, config = "UNet step", "step", "model output", "sd_like"
    #: The minimum speedup over eager.
    eager_goal = 1.3
    summary_note = "SD-like UNet (UNetConfig.sd_like()), bf16, batch 2, 4x64x64 latent, 77-token context"
    self_check_shape = {"batch": 2, "size": 8, "context_len": 5}
    forward = staticmethod(step)

    def __init__(
        self,
        config_name: str = "sd_like",
        batch: int = BATCH,
        size: int = LATENT,
        context_len: int = CONTEXT_LEN,
        dtype: torch.dtype = torch.bfloat16,
        backend: str | None = None,
    ):
        super().__init__(config_name, batch, size, dtype, backend)
        self.context_len = context_len
        config = _config(config_name)
        self.label = (
            f"{config_name} UNet step, batch {batch}, {config.in_channels}x{size}x{size} latent, "
            f"{context_len}-token context, {DTYPE_NAMES[dtype]}"
        )
        self.params = self._params(
            latent=[config.in_channels, size, size],
            context=[context_len, config.cross_attention_dim],
            timestep=TIMESTEP,
        )

    def models(self, device: torch.device) -> tuple[Any, Any]:
        """The seeded float32 UNet and its PyTorch-layer twin (:func:`build_models`)."""
        return build_models(_config(self.config_name), device, torch.float32)

    def inputs(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Latent, timestep and context (:func:`make_inputs`)."""
        return make_inputs(_config(self.config_name), self.batch, self.size, self.context_len, dtype, device)


def cases(quick: bool = False) -> list[UNetCase]:
    """The SD-like step. ``quick`` runs the same case: the goals are stated on it, and torch.compile's
    compile, the bulk of its time, would cost about as much on a smaller UNet."""
    return [UNetCase()]


#: The op's summary (the SD-like case's variants and its two goals) and its CPU self-check (the tiny
#: UNet, 16 and 32 channels and attention at the second level, in float32; triton under its interpreter runs
#: about 60 GroupNorm and attention launches, a few seconds): see ``_model.ModelCase``.
summarize, self_check = UNetCase.summarize, UNetCase.self_check
