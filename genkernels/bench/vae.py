"""Stable Diffusion VAE decode: benchmark case, peak memory, goals and the CPU self-check.

The workload of shared/ANCHORS.md's VAE row: ``AutoencoderKLConfig.sd()`` (the SD 1.x / 2.x VAE,
about 84 M parameters; the whole model is built, as pipelines hold it, and only ``decode`` runs),
bf16, one 4x64x64 latent (a seeded standard normal) decoded to a 3x512x512 image, seeded weights.

The variants, the correctness criterion, the peak memory, the rate and the summary are the
whole-model benchmark's (``genkernels.bench._model``): PyTorch-layer eager (``with_torch_layers``,
sharing the weights), torch.compile of its decode (the compile: about 16 s on an H200), genkernels
layers eager and under a CUDA graph (each call copies the latent into its static buffer). Peak
memory is measured for every variant (the weights are about 0.16 GiB in bf16), as shared/ANCHORS.md
reports it, and goes into each record's params ("peak_memory_gib", by variant).
"""

from __future__ import annotations

from typing import Any

import torch

from . import _model
from .core import DTYPE_NAMES

OP = "vae"
#: Share of a time budget (group_norm has 1): one case, torch.compile of the decoder (about 16 s) its bulk.
BUDGET_SHARE = 0.5

BATCH, LATENT = 1, 64
SEED = 0


def _config(name: str) -> Any:
    from genkernels.models.vae import AutoencoderKLConfig

    return getattr(AutoencoderKLConfig, name)()


def build_models(config: Any, device: torch.device, dtype: torch.dtype, seed: int = SEED) -> tuple[Any, Any]:
    """(genkernels-layer AutoencoderKL, PyTorch-layer twin sharing its parameters), seeded weights, eval mode."""
    from genkernels.models.vae import AutoencoderKL, with_torch_layers

    return _model.seeded_models(lambda: AutoencoderKL(config), with_torch_layers, device, dtype, seed)


def make_latent(
    config: Any, batch: int, size: int, dtype: torch.dtype, device: torch.device, seed: int = SEED
) -> torch.Tensor:
    """A seeded standard normal latent (batch, latent_channels, size, size) in ``dtype``: what decode
    receives once a diffusion model's latent is divided by the scaling factor."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(batch, config.latent_channels, size, size, generator=g).to(device, dtype)


def decode(model: Any, z: torch.Tensor) -> torch.Tensor:
    """The image decoded from latent ``z`` (a tensor, no output object: what torch.compile traces)."""
    return model.decode(z, return_dict=False)[0]


class VAEDecodeCase(_model.ModelCase):
    """One VAE decode (a config, batch, latent size and dtype); see the module doc. ``params["peak_memory_gib"]``
    is ``self.peaks``, filled as each variant is built on a CUDA device; the case's record shares the dict."""

    op = OP
    table = "VAE decode"
    workload, call, output, config = "VAE decode", "decode", "image", "sd"
    #: At least 1.5x eager (the minimum), and peak memory no higher than eager's.
    eager_goal, measures_peak = 1.5, True
    summary_note = "SD VAE (AutoencoderKLConfig.sd()), decode only, bf16, one 4x64x64 latent to 3x512x512"
    self_check_shape = {"batch": 2, "size": 8}
    forward = staticmethod(decode)

    def __init__(
        self,
        config_name: str = "sd",
        batch: int = BATCH,
        size: int = LATENT,
        dtype: torch.dtype = torch.bfloat16,
        backend: str | None = None,
    ):
        super().__init__(config_name, batch, size, dtype, backend)
        config = _config(config_name)
        image = size * config.downscale
        self.label = (
            f"{config_name} VAE decode, batch {batch}, {config.latent_channels}x{size}x{size} latent to "
            f"{config.out_channels}x{image}x{image}, {DTYPE_NAMES[dtype]}"
        )
        self.params = self._params(
            latent=[config.latent_channels, size, size], image=[config.out_channels, image, image]
        )

    def models(self, device: torch.device) -> tuple[Any, Any]:
        """The seeded float32 AutoencoderKL and its PyTorch-layer twin (:func:`build_models`)."""
        return build_models(_config(self.config_name), device, torch.float32)

    def inputs(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The latent (:func:`make_latent`)."""
        return (make_latent(_config(self.config_name), self.batch, self.size, dtype, device),)


def cases(quick: bool = False) -> list[VAEDecodeCase]:
    """The SD VAE decode. ``quick`` runs the same case: the goals are stated on it, and torch.compile's
    compile, the bulk of its time, would cost about as much on a smaller model."""
    return [VAEDecodeCase()]


#: The op's summary (the SD case's variants with their peak memory, and the three goals) and its CPU
#: self-check (the tiny VAE's decode, 8 and 16 channels and mid-block attention, in float32; triton under
#: its interpreter): see ``_model.ModelCase``.
summarize, self_check = VAEDecodeCase.summarize, VAEDecodeCase.self_check
