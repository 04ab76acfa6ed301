"""One forward of the StyleGAN2 generator: benchmark case, peak memory, goal and the CPU self-check.

The workload: ``GANConfig.stylegan2(256)`` (config-f-like: 512 channels down to 128 at 256x256, z = w =
512, 8 mapping layers), bf16, batch 32: z (32, 512), a seeded standard normal, to images (32, 3, 256,
256), ``truncation_psi=1.0``, seeded weights. The zero-initialized noise strengths are set to 0.1 so
that the noise shows in the output. The noise is ``noise_mode="const"`` (each layer's fixed noise map):
every variant then computes the same function and is checked before it is timed; "random" would add
the same ``torch.randn`` draws (one small kernel per layer) to every variant.

The variants, the correctness criterion, the peak memory and the summary are the whole-model
benchmark's (``genkernels.bench._model``), on the same weights: PyTorch-layer eager
(``Generator(config, torch_layers=True)``: StyleGAN2's training formulation of the modulated conv, one
eager op at a time), genkernels layers eager (``genkernels.nn.ModulatedConv2d``: the fused demodulation
and epilogue ops, auto backend), the same under a CUDA graph (each call copies z into its static
buffer), and last, ``torch.compile`` of the PyTorch-layer forward: its compile is the slowest part of
this op, so everything else is measured before it starts. Peak memory is measured for every variant
and goes into the record's params ("peak_memory_gib", by variant).

The rate is TFLOP/s of the convolutions alone (``torch.utils.flop_counter`` on the meta device: the
modulated 3x3 and toRGB 1x1 convolutions; the mapping network's matmuls are left out); the floor is
those FLOPs at the bf16 matmul rate measured in the run.

Goal: genkernels (the faster of eager and CUDA graph) at least as fast as eager; the speedup vs
torch.compile and the peak memory are reported.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from . import _model
from .core import DTYPE_NAMES, CaseRecord, OpSummary, SelfCheck

OP = "gan"
#: Share of a time budget (group_norm has 1): one case; torch.compile of the generator is its bulk.
BUDGET_SHARE = 0.5

BATCH, RESOLUTION = 32, 256
SEED = 0
TRUNCATION_PSI = 1.0
NOISE_MODE = "const"
#: The noise strengths (zero at initialization) in the benchmarked generator.
NOISE_STRENGTH = 0.1

#: Convolution FLOPs by label: counting builds the generator on the meta device.
_CONV_FLOPS: dict[str, float] = {}


def _config(name: str, resolution: int) -> Any:
    from genkernels.models.gan import GANConfig

    return getattr(GANConfig, name)(resolution=resolution)


def build_models(config: Any, device: torch.device, dtype: torch.dtype, seed: int = SEED) -> tuple[Any, Any]:
    """(genkernels-layer Generator, PyTorch-layer twin sharing its parameters and buffers), seeded weights,
    every noise strength NOISE_STRENGTH, eval mode, no grads."""
    from genkernels.models._layers import with_torch_layers
    from genkernels.models.gan import Generator

    def build() -> Any:
        model = Generator(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("noise_strength"):
                    p.fill_(NOISE_STRENGTH)
        return model

    return _model.seeded_models(build, with_torch_layers, device, dtype, seed)


def make_z(config: Any, batch: int, dtype: torch.dtype, device: torch.device, seed: int = SEED) -> torch.Tensor:
    """A seeded standard normal z (batch, z_dim) in ``dtype``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(batch, config.z_dim, generator=g).to(device, dtype)


def generate(model: Any, z: torch.Tensor) -> torch.Tensor:
    """The images of latents ``z``: ``model(z, truncation_psi=1.0, noise_mode="const")``."""
    return model(z, truncation_psi=TRUNCATION_PSI, noise_mode=NOISE_MODE)


class GeneratorCase(_model.ModelCase):
    """One generator forward (a config, batch, resolution and dtype); see the module doc. ``size`` is the
    output resolution. torch.compile is the last variant (:meth:`variant_names`)."""

    op = OP
    table = "StyleGAN2 generator forward"
    workload, call, output, config = "generator forward", "forward", "images", "stylegan2"
    #: No speed goal beyond parity with eager; torch.compile's ratio and the peak memory are reported.
    eager_goal, measures_peak = 1.0, True
    summary_note = "StyleGAN2 generator (GANConfig.stylegan2(256)), bf16, batch 32, z to 3x256x256, noise 'const'"
    self_check_shape = {"batch": 2, "size": 8}
    forward = staticmethod(generate)

    def __init__(
        self,
        config_name: str = "stylegan2",
        batch: int = BATCH,
        size: int = RESOLUTION,
        dtype: torch.dtype = torch.bfloat16,
        backend: str | None = None,
    ):
        super().__init__(config_name, batch, size, dtype, backend)
        config = _config(config_name, size)
        self.label = (
            f"{config_name} generator, batch {batch}, z {config.z_dim} to {config.img_channels}x{size}x{size}, "
            f"{DTYPE_NAMES[dtype]}"
        )
        self.params = self._params(
            z=[config.z_dim],
            image=[config.img_channels, size, size],
            truncation_psi=TRUNCATION_PSI,
            noise_mode=NOISE_MODE,
            noise_strength=NOISE_STRENGTH,
        )

    def variant_names(self) -> list[str]:
        """:data:`._model.COMPILE_LAST`: torch.compile, the slowest step, after everything else is measured."""
        return list(_model.COMPILE_LAST)

    def models(self, device: torch.device) -> tuple[Any, Any]:
        """The seeded float32 Generator and its PyTorch-layer twin (:func:`build_models`)."""
        return build_models(_config(self.config_name, self.size), device, torch.float32)

    def inputs(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """z (:func:`make_z`)."""
        return (make_z(_config(self.config_name, self.size), self.batch, dtype, device),)

    @functools.cached_property
    def work(self) -> float:  # type: ignore[override]
        """FLOPs per forward of the convolutions alone, counted once per label by torch.utils.flop_counter on the
        PyTorch-layer twin on the meta device."""
        from torch.utils.flop_counter import FlopCounterMode

        if self.label not in _CONV_FLOPS:
            meta = torch.device("meta")
            _, twin = self.models(meta)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                self.forward(twin, *self.inputs(meta, torch.float32))
            counts = counter.get_flop_counts().get("Global", {})
            _CONV_FLOPS[self.label] = float(sum(n for op, n in counts.items() if "convolution" in str(op)))
        return _CONV_FLOPS[self.label]

    @property
    def rate_note(self) -> str:  # type: ignore[override]
        """What the rate counts."""
        return f"TFLOP/s (convolution FLOPs: {self.work / 1e12:.3g} TFLOP per {self.call})"


def cases(quick: bool = False) -> list[GeneratorCase]:
    """The stylegan2 256x256 forward. ``quick`` runs the same case: torch.compile's compile, the bulk of its
    time, would cost about as much on a smaller generator."""
    return [GeneratorCase()]


def summarize(records: Sequence[CaseRecord]) -> OpSummary:
    """The whole-model summary (ms, speedups vs eager and torch.compile, peak memory, first call s) with one
    goal: genkernels' best variant >= 1.0x eager (the compile ratio and the peak are reported, not goals)."""
    summary = _model.summarize(records, GeneratorCase)
    summary.goals = summary.goals[:1]
    summary.notes.append(
        "Rate and floor: the convolutions' FLOPs (torch.utils.flop_counter) at the bf16 matmul rate measured in "
        "this run. Goal: genkernels >= 1.0x eager; the speedup vs torch.compile and the peak memory are reported."
    )
    return summary


def self_check(backend: str) -> SelfCheck:
    """The CPU self-check of ``backend``: the tiny generator (GANConfig.tiny(8), batch 2) in float32 on genkernels
    layers against its PyTorch-layer twin with the same weights, under the criterion (float64 truth)."""
    check = GeneratorCase.self_check(backend)
    size = GeneratorCase.self_check_shape["size"]
    detail = check.detail.replace(f"{size}x{size} latent", f"{size}x{size} image")
    return SelfCheck(check.op, check.backend, check.status, detail)
