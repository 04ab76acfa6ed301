"""A Stable-Diffusion-style variational autoencoder (AutoencoderKL) built from genkernels layers.

Layout (diffusers' AutoencoderKL, on our own modules; L levels, channels ch[0..L-1]):

    encoder: x -> conv_in -> [level i: layers_per_block x ResnetBlock, Downsample (not at the last)]
               -> mid (ResnetBlock, Attention, ResnetBlock) -> GroupNorm+SiLU -> conv_out   (B, 2 * latent, h, w)
    quant_conv (1x1)                                                  moments = [mean; logvar] along channels
    posterior = DiagonalGaussian(moments);  z = mean + exp(logvar / 2) * eps   (genkernels.ops.reparameterize)
    post_quant_conv (1x1)
    decoder: z -> conv_in -> mid (ResnetBlock, Attention, ResnetBlock)
               -> [level i reversed: (layers_per_block + 1) x ResnetBlock, Upsample (not at the last)]
               -> GroupNorm+SiLU -> conv_out                                         (B, out_channels, H, W)

    ResnetBlock(x) = conv2(gns2(conv1(gns1(x)))) + shortcut(x), gns = genkernels.nn.GroupNormSiLU, eps 1e-6
    Downsample(x)  = conv3x3 stride 2 over x zero-padded by one row at the bottom and one column at the right
    Upsample(x)    = conv3x3(nearest 2x(x))
    Attention(x)   = x + to_out(softmax(q k^T / sqrt(C)) v), q, k, v = to_q, to_k, to_v(GroupNorm(x))
                     over the h * w pixels: one head of C channels (genkernels.nn.Attention)

with h = H / 2 ** (L - 1). Module names and state_dict keys are those of diffusers' AutoencoderKL
for the same config, so its weights load unchanged (``load_state_dict(diffusers_vae.state_dict())``).

Every GroupNorm, attention and reparameterize call goes through the genkernels op registry;
``backend`` pins one backend for all of them ("reference", "triton", "cuda"; None follows
``genkernels.backend(...)`` and the auto order). ``torch_layers=True`` builds the same network on
PyTorch's layers (torch.nn.GroupNorm then SiLU, ``F.scaled_dot_product_attention``) with the same
parameter names; :func:`with_torch_layers` makes that twin of an existing model sharing its parameters.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .._checks import check_backend, is_finite_real, is_integer
from .._checks import positive_int as _positive_int
from ..nn import Attention
from ..ops import reparameterize
from ._config import ConfigIO
from ._layers import (
    Downsample,
    ResnetBlock,
    TorchAttention,
    Upsample,
    check_input_dtype,
    group_norm_layer,
    set_layers_backend,
    with_torch_layers,
)

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
# diffusers builds every norm of the VAE (ResNet blocks, mid attention, output) with this eps.
NORM_EPS = 1e-6


def _block_types(name: str, value, expected: str, levels: int) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    types = tuple(value)
    if len(types) == 1:
        types = types * levels
    if len(types) != levels:
        raise ValueError(
            f"{name} must name one block type per level ({levels} levels in block_out_channels) or a single "
            f"type for all, got {len(types)}: {types}"
        )
    for t in types:
        if t != expected:
            raise ValueError(f"{name}: block type {t!r} is not supported; supported: {expected!r}")
    return types


def _float_tuple(name: str, value) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = [v for v in value]
    except TypeError:
        values = None
    if values is None or not all(is_finite_real(v) for v in values):
        raise ValueError(f"{name} must be None or a sequence of finite numbers, got {value!r}")
    return tuple(float(v) for v in values)


@dataclass
class AutoencoderKLConfig(ConfigIO):
    """Sizes of an :class:`AutoencoderKL`: the fields and defaults of diffusers' AutoencoderKL config.

    Presets: :meth:`tiny` (tests), :meth:`digits` (8x8 grey digits), :meth:`sd` (Stable Diffusion 1.x/2.x).

    Args:
        in_channels, out_channels: image channels in (encoder) and out (decoder).
        down_block_types, up_block_types: one block type per level; only "DownEncoderBlock2D" and
            "UpDecoderBlock2D" (ResNet blocks without attention) are supported. A single type is
            repeated for every level.
        block_out_channels: channels of each level, highest resolution first; the latent is
            2 ** (levels - 1) times smaller than the image along H and W.
        layers_per_block: ResNet blocks per encoder level (decoder levels have one more).
        act_fn: "silu" ("swish" is the same function): the only activation of the fused layers.
        latent_channels: channels of the latent z (the encoder outputs twice as many moments).
        norm_num_groups: GroupNorm groups; must divide every level's channels.
        sample_size: the image size the model was trained on (an int, or an (H, W) pair whose first
            entry is used), the default tile size of tiled decoding; any H, W divisible by
            2 ** (levels - 1) runs.
        scaling_factor, shift_factor: a diffusion model sees (z - shift_factor) * scaling_factor
            (informational here, as in diffusers).
        latents_mean, latents_std: optional per-channel latent statistics (informational).
        force_upcast: run the VAE in float32 in pipelines (informational).
        use_quant_conv, use_post_quant_conv: the 1x1 convolutions after the encoder / before the decoder.
        mid_block_add_attention: attention in the encoder's and decoder's mid blocks.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.block_out_channels, numbers.Integral):  # one int (a bool is refused below)
            self.block_out_channels = (self.block_out_channels,)
        self.block_out_channels = tuple(self.block_out_channels)
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level, got ()")
        self.block_out_channels = tuple(
            _positive_int("every entry of block_out_channels", c) for c in self.block_out_channels
        )
        levels = len(self.block_out_channels)
        self.down_block_types = _block_types("down_block_types", self.down_block_types, DOWN_BLOCK, levels)
        self.up_block_types = _block_types("up_block_types", self.up_block_types, UP_BLOCK, levels)
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            setattr(self, name, _positive_int(name, getattr(self, name)))
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(
                f"act_fn must be 'silu' (or its alias 'swish'), got {self.act_fn!r}: the fused GroupNorm+SiLU "
                "layers implement no other activation"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"norm_num_groups={self.norm_num_groups} must divide every level's channels, got "
                    f"block_out_channels={self.block_out_channels}"
                )
        if isinstance(self.sample_size, (list, tuple)):
            if len(self.sample_size) != 2:
                raise ValueError(f"sample_size must be an int or an (H, W) pair, got {self.sample_size!r}")
            self.sample_size = tuple(_positive_int("sample_size", s) for s in self.sample_size)
        else:
            self.sample_size = _positive_int("sample_size", self.sample_size)
        # A pipeline multiplies latents by these: NaN, inf or a bool would pass a float() conversion silently.
        if not (is_finite_real(self.scaling_factor) and self.scaling_factor != 0):
            raise ValueError(f"scaling_factor must be a finite nonzero number, got {self.scaling_factor!r}")
        if not (self.shift_factor is None or is_finite_real(self.shift_factor)):
            raise ValueError(f"shift_factor must be None or a finite number, got {self.shift_factor!r}")
        self.scaling_factor = float(self.scaling_factor)
        self.shift_factor = None if self.shift_factor is None else float(self.shift_factor)
        self.latents_mean = _float_tuple("latents_mean", self.latents_mean)
        self.latents_std = _float_tuple("latents_std", self.latents_std)
        for name in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")

    @property
    def downscale(self) -> int:
        """How many image pixels one latent pixel spans along H and W: 2 ** (levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def tiny(cls, **overrides) -> AutoencoderKLConfig:
        """Two levels of 8 and 16 channels, 4 groups, a 4-channel latent, RGB: for tests."""
        base = dict(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4, sample_size=16)
        return cls(**{**base, **overrides})

    @classmethod
    def digits(cls, **overrides) -> AutoencoderKLConfig:
        """The 8x8 grey digits: two levels of 32 and 64 channels, a 4x4x4 latent (about 0.66 M
        parameters; a few thousand steps train on a CPU in about a minute)."""
        base = dict(
            in_channels=1,
            out_channels=1,
            block_out_channels=(32, 64),
            norm_num_groups=8,
            latent_channels=4,
            sample_size=8,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def sd(cls, **overrides) -> AutoencoderKLConfig:
        """The Stable Diffusion 1.x / 2.x VAE: channels (128, 256, 512, 512), two blocks per level, 32
        groups, a 4-channel latent 8x smaller than the 512x512 image, scaling_factor 0.18215 (about 84 M
        parameters)."""
        base = dict(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        )
        return cls(**{**base, **overrides})

    @staticmethod
    def _skipped_key(key: str) -> bool:
        """diffusers' bookkeeping keys ("_class_name", "_diffusers_version", ...): a diffusers AutoencoderKL's
        ``config`` (a FrozenDict) or config.json reads as is."""
        return key.startswith("_")


class DiagonalGaussian:
    """The encoder's posterior N(mean, diag(exp(logvar))), with mean, logvar = moments split along channels.

    Args:
        moments: (B, 2C, *) (contiguous or channels_last): mean = moments[:, :C], logvar = moments[:, C:],
            read in place by every method.
        deterministic: a point mass at mean: std and var are zero, sample() returns mean and the KL is 0.
        backend: backend of the reparameterize op ("reference", "triton", "cuda"; None: scope / auto).

    All sampling and KL work runs on ``genkernels.ops.reparameterize`` (one fused pass).
    """

    def __init__(self, moments: torch.Tensor, deterministic: bool = False, backend: str | None = None) -> None:
        if moments.dim() < 2 or moments.shape[1] % 2:
            raise ValueError(f"moments must be (B, 2C, *) with an even channel count, got shape {tuple(moments.shape)}")
        self.moments = moments
        self.deterministic = deterministic
        self.backend = backend

    @property
    def parameters(self) -> torch.Tensor:
        """The moments tensor (diffusers' name for it)."""
        return self.moments

    @property
    def mean(self) -> torch.Tensor:
        """(B, C, *) view of the first half of the moments."""
        return self.moments[:, : self.moments.shape[1] // 2]

    @property
    def logvar(self) -> torch.Tensor:
        """(B, C, *) clamp(moments[:, C:], -30, 20): the log-variance as every sample and KL uses it."""
        return self.moments[:, self.moments.shape[1] // 2 :].clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        """exp(logvar / 2), (B, C, *); zeros when deterministic."""
        if self.deterministic:
            return torch.zeros_like(self.mean)
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        """exp(logvar), (B, C, *); zeros when deterministic."""
        if self.deterministic:
            return torch.zeros_like(self.mean)
        return torch.exp(self.logvar)

    def _acc(self) -> torch.dtype:
        """The dtype of the KL and NLL: float32, float64 for float64 moments."""
        return torch.float64 if self.moments.dtype == torch.float64 else torch.float32

    def _zero_kl(self) -> torch.Tensor:
        return torch.zeros(self.moments.shape[0], dtype=self._acc(), device=self.moments.device)

    def sample(
        self,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        offset: int = 0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z = mean + std * eps, (B, C, *) in the moments' dtype and layout (mean when deterministic).

        eps: ``noise`` (mean's shape and dtype) if given, else drawn with ``generator`` (on the reference
        backend torch.randn in the moments' dtype, as diffusers draws it; the fast backends draw a Philox
        seed with it), else from the Philox stream keyed by (``seed``, ``offset``), else from a seed of
        torch's default generator (see genkernels.ops.reparameterize). Differentiable in the moments (and
        in noise).
        """
        return reparameterize(
            moments=self.moments,
            noise=noise,
            seed=seed,
            offset=offset,
            generator=generator,
            return_kl=False,
            deterministic=self.deterministic,
            backend=self.backend,
        )

    def sample_with_kl(
        self,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        offset: int = 0,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, kl) in one pass: z as :meth:`sample`, kl as :meth:`kl`; the training step's two terms."""
        if self.deterministic:
            return self.sample(), self._zero_kl()
        return reparameterize(
            moments=self.moments,
            noise=noise,
            seed=seed,
            offset=offset,
            generator=generator,
            return_kl=True,
            backend=self.backend,
        )

    def mode(self) -> torch.Tensor:
        """The most likely z: mean, (B, C, *) (a view of the moments)."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(posterior || N(0, I)) per sample: 0.5 * sum over non-batch dims of (mean^2 + var - 1 - logvar);
        with ``other`` (a DiagonalGaussian of the same shape), KL(posterior || other):
        0.5 * sum((mean - m_o)^2 / var_o + var / var_o - 1 - logvar + logvar_o).

        (B,) float32 (float64 for float64 moments), summed over every non-batch dim like diffusers'
        ``kl()``; zeros when deterministic. Differentiable in the moments (the fused reparameterize op
        against N(0, I), PyTorch ops against ``other``).
        """
        if self.deterministic:
            return self._zero_kl()
        if other is None:
            return reparameterize(moments=self.moments, deterministic=True, backend=self.backend)[1]
        if not isinstance(other, DiagonalGaussian) or other.mean.shape != self.mean.shape:
            got = tuple(other.mean.shape) if isinstance(other, DiagonalGaussian) else type(other).__name__
            raise ValueError(f"other must be None or a DiagonalGaussian of shape {tuple(self.mean.shape)}, got {got}")
        acc = self._acc()
        mean, logvar = self.mean.to(acc), self.logvar.to(acc)
        mean_o, logvar_o = other.mean.to(acc), other.logvar.to(acc)
        terms = ((mean - mean_o).square() + logvar.exp()) / logvar_o.exp() - 1.0 - logvar + logvar_o
        return 0.5 * terms.flatten(1).sum(1)

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
        """The negative log-likelihood of ``sample`` (mean's shape) under the posterior, in nats:
        0.5 * sum over ``dims`` (None: every non-batch dim) of (log(2 pi) + logvar + (sample - mean)^2 / var).

        float32 (float64 for float64 moments), the batch dim kept; zeros when deterministic (a point mass)."""
        if sample.shape != self.mean.shape:
            raise ValueError(
                f"sample must have the posterior's shape {tuple(self.mean.shape)}, got {tuple(sample.shape)}"
            )
        if self.deterministic:
            return self._zero_kl()
        acc = self._acc()
        mean, logvar = self.mean.to(acc), self.logvar.to(acc)
        terms = math.log(2.0 * math.pi) + logvar + (sample.to(acc) - mean).square() / logvar.exp()
        return 0.5 * (terms.flatten(1).sum(1) if dims is None else terms.sum(dim=dims))


class _Output:
    """A result that also unpacks like diffusers' outputs: ``out[0]`` and ``out.to_tuple()``."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def __getitem__(self, index: int):
        return self.to_tuple()[index]


@dataclass
class AutoencoderKLOutput(_Output):
    """What :meth:`AutoencoderKL.encode` returns: the posterior of the batch."""

    latent_dist: DiagonalGaussian


@dataclass
class DecoderOutput(_Output):
    """What :meth:`AutoencoderKL.decode` and ``forward`` return: the decoded images (B, out_channels, H, W)."""

    sample: torch.Tensor


class MidBlockAttention(Attention):
    """Single-head self-attention over the pixels with its own GroupNorm and a residual connection.

    x (B, C, H, W) -> x + to_out(attention(to_q(n), to_k(n), to_v(n))), n = group_norm(x) as (B, H * W, C)
    tokens; one head of dim C (scale 1 / sqrt(C)), biases in to_q, to_k, to_v. Parameter names are
    diffusers' (``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out.0``); a state_dict with the names of
    older diffusers checkpoints (``query``, ``key``, ``value``, ``proj_attn``) loads too, renamed as
    diffusers renames them when it loads such a file.
    """

    torch_layers = False
    # Older diffusers checkpoints' names of the projections (diffusers' _fix_state_dict_keys_on_load).
    DEPRECATED_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

    def __init__(self, channels: int, groups: int, backend: str | None = None) -> None:
        super().__init__(channels, heads=1, dim_head=channels, bias=True, backend=backend)
        self.group_norm = group_norm_layer(self.torch_layers, False, groups, channels, NORM_EPS, backend)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Renamed in place before this module and its children read their keys (torch loads a copy).
        for old, new in self.DEPRECATED_NAMES.items():
            for suffix in ("weight", "bias"):
                key = f"{prefix}{old}.{suffix}"
                if key in state_dict and f"{prefix}{new}.{suffix}" not in state_dict:
                    state_dict[f"{prefix}{new}.{suffix}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W): x + single-head self-attention over the H * W group-normed pixels."""
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)
        out = super().forward(tokens)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class TorchMidBlockAttention(MidBlockAttention, TorchAttention):
    """:class:`MidBlockAttention` on PyTorch's layers (torch.nn.GroupNorm, SDPA); same parameters."""

    torch_layers = True


class DownEncoderBlock(torch.nn.Module):
    """An encoder level: ``resnets`` (ResNet blocks), then ``downsamplers.0`` (stride 2) unless the last level."""

    def __init__(self, cin: int, cout: int, layers: int, downsample: bool, groups: int, backend, torch_layers) -> None:
        super().__init__()
        self.resnets = torch.nn.ModuleList(
            ResnetBlock(cin if i == 0 else cout, cout, None, groups, 0.0, backend, torch_layers, eps=NORM_EPS)
            for i in range(layers)
        )
        self.downsamplers = torch.nn.ModuleList([Downsample(cout, padding=0)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, cin, H, W) -> (B, cout, H/2, W/2) ((B, cout, H, W) at the last level): ResNet blocks, then
        the stride-2 downsampler."""
        for block in self.resnets:
            x = block(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock(torch.nn.Module):
    """A decoder level: ``resnets`` (ResNet blocks), then ``upsamplers.0`` (nearest 2x + conv) unless the last."""

    def __init__(self, cin: int, cout: int, layers: int, upsample: bool, groups: int, backend, torch_layers) -> None:
        super().__init__()
        self.resnets = torch.nn.ModuleList(
            ResnetBlock(cin if i == 0 else cout, cout, None, groups, 0.0, backend, torch_layers, eps=NORM_EPS)
            for i in range(layers)
        )
        self.upsamplers = torch.nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, cin, H, W) -> (B, cout, 2H, 2W) ((B, cout, H, W) at the last level): ResNet blocks, then
        the nearest 2x + conv upsampler."""
        for block in self.resnets:
            x = block(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(torch.nn.Module):
    """resnets.0, attentions.0 (if any), resnets.1 at the lowest resolution; channels unchanged."""

    def __init__(self, channels: int, attention: bool, groups: int, backend, torch_layers) -> None:
        super().__init__()
        attn = TorchMidBlockAttention if torch_layers else MidBlockAttention
        self.attentions = torch.nn.ModuleList([attn(channels, groups, backend)] if attention else [])
        self.resnets = torch.nn.ModuleList(
            ResnetBlock(channels, channels, None, groups, 0.0, backend, torch_layers, eps=NORM_EPS) for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W): resnets.0, attentions.0 (if any), resnets.1."""
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(torch.nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H / 2^(L-1), W / 2^(L-1))."""

    def __init__(self, cfg: AutoencoderKLConfig, backend: str | None, torch_layers: bool) -> None:
        super().__init__()
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = torch.nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = torch.nn.ModuleList(
            DownEncoderBlock(
                ch[max(i - 1, 0)], cout, cfg.layers_per_block, i < len(ch) - 1, groups, backend, torch_layers
            )
            for i, cout in enumerate(ch)
        )
        self.mid_block = MidBlock(ch[-1], cfg.mid_block_add_attention, groups, backend, torch_layers)
        self.conv_norm_out = group_norm_layer(torch_layers, True, groups, ch[-1], NORM_EPS, backend)
        self.conv_out = torch.nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, H, W) -> (B, 2 * latent_channels, H / 2^(L-1), W / 2^(L-1)): conv_in, the down
        blocks, the mid block, GroupNorm+SiLU, conv_out (the model's quant_conv, if any, follows)."""
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(self.conv_norm_out(self.mid_block(h)))


class Decoder(torch.nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h * 2^(L-1), w * 2^(L-1))."""

    def __init__(self, cfg: AutoencoderKLConfig, backend: str | None, torch_layers: bool) -> None:
        super().__init__()
        ch, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = torch.nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], cfg.mid_block_add_attention, groups, backend, torch_layers)
        self.up_blocks = torch.nn.ModuleList(
            UpDecoderBlock(
                ch[max(i - 1, 0)], cout, cfg.layers_per_block + 1, i < len(ch) - 1, groups, backend, torch_layers
            )
            for i, cout in enumerate(ch)
        )
        self.conv_norm_out = group_norm_layer(torch_layers, True, groups, ch[-1], NORM_EPS, backend)
        self.conv_out = torch.nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_channels, h, w) -> (B, out_channels, h * 2^(L-1), w * 2^(L-1)): conv_in, the mid
        block, the up blocks, GroupNorm+SiLU, conv_out (the model's post_quant_conv, if any, precedes)."""
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(self.conv_norm_out(h))


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """b with its first ``extent`` slices along ``dim`` faded in from a's last ones by a linear ramp:
    b[k] <- a[-e + k] * (1 - k / e) + b[k] * (k / e), k < e = min(extent, a's and b's sizes along dim)."""
    e = min(a.shape[dim], b.shape[dim], extent)
    if e == 0:
        return b
    shape = [1] * b.dim()
    shape[dim] = e
    ramp = (torch.arange(e, dtype=torch.float64, device=b.device) / e).reshape(shape)
    head = a.narrow(dim, a.shape[dim] - e, e) * (1 - ramp).to(b.dtype) + b.narrow(dim, 0, e) * ramp.to(b.dtype)
    return torch.cat([head, b.narrow(dim, e, b.shape[dim] - e)], dim=dim)


def _stitch(tiles: list[list[torch.Tensor]], extent: int, keep: int) -> torch.Tensor:
    """One tensor from a grid of overlapping tiles (row-major, each tile's H and W along dims 2 and 3).

    Each tile, in row-major order, first fades in over its top ``extent`` rows from the (already
    blended) tile above, then over its left ``extent`` columns from the (already blended) tile to
    its left; then its top-left ``keep`` x ``keep`` corner is kept and the corners are concatenated.
    """
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(tiles[i - 1][j], tile, extent, 2)
            if j > 0:
                tile = _blend(row[j - 1], tile, extent, 3)
            row[j] = tile
    return torch.cat([torch.cat([t[:, :, :keep, :keep] for t in row], dim=3) for row in tiles], dim=2)


class AutoencoderKL(torch.nn.Module):
    """Stable-Diffusion-style KL autoencoder on genkernels layers (see the module doc for the layout).

    ``encode(x).latent_dist`` is the posterior (:class:`DiagonalGaussian`), ``decode(z).sample`` the
    image, ``forward(x)`` the reconstruction through the posterior mode (or a sample).

    Args:
        config: an :class:`AutoencoderKLConfig`, a mapping of its fields (e.g. a diffusers config),
            or None: the defaults, with ``config_kwargs`` applied (also applied over a given config).
        backend: backend for every GroupNorm, attention and reparameterize op ("reference", "triton",
            "cuda"; None: the ``genkernels.backend(...)`` scope or auto). Change it with :meth:`set_backend`.
        torch_layers: build it on PyTorch's layers instead (torch.nn.GroupNorm + SiLU,
            ``F.scaled_dot_product_attention``): the same function and parameter names, so either
            model loads the other's state_dict; ``backend`` then only applies to the posterior's
            reparameterize op (whose reference is eager PyTorch).

    Memory options, as diffusers': :meth:`enable_slicing` (one sample at a time) and
    :meth:`enable_tiling` (overlapping spatial tiles, blended). Inputs may be contiguous or channels_last.
    """

    def __init__(
        self,
        config: AutoencoderKLConfig | Mapping | None = None,
        *,
        backend: str | None = None,
        torch_layers: bool = False,
        **config_kwargs,
    ) -> None:
        super().__init__()
        if config is None:
            config = AutoencoderKLConfig(**config_kwargs)
        else:
            if isinstance(config, Mapping):
                config = AutoencoderKLConfig.from_dict(config)
            elif not isinstance(config, AutoencoderKLConfig):
                raise TypeError(
                    f"config must be an AutoencoderKLConfig, a mapping or None, got {type(config).__name__}"
                )
            if config_kwargs:
                config = dataclasses.replace(config, **config_kwargs)
        self.config = config
        self.torch_layers = torch_layers
        self.backend = backend = check_backend(backend)  # refused now, not at the first (posterior) call
        self.encoder = Encoder(config, backend, torch_layers)
        self.decoder = Decoder(config, backend, torch_layers)
        lat = config.latent_channels
        self.quant_conv = torch.nn.Conv2d(2 * lat, 2 * lat, 1) if config.use_quant_conv else None
        self.post_quant_conv = torch.nn.Conv2d(lat, lat, 1) if config.use_post_quant_conv else None
        self.use_slicing = False
        self.use_tiling = False
        self._set_tiles(None, 0.25)

    @classmethod
    def from_config(cls, config: AutoencoderKLConfig | Mapping, **kwargs) -> AutoencoderKL:
        """A model (fresh weights) for ``config``: an :class:`AutoencoderKLConfig` or a diffusers AutoencoderKL
        config (dict-like; "_" keys ignored). ``kwargs``: ``backend``, ``torch_layers`` and field overrides."""
        return cls(config, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device."""
        return self.encoder.conv_in.weight.device

    def set_backend(self, backend: str | None) -> AutoencoderKL:
        """Pin every GroupNorm, attention and reparameterize op of the model to ``backend`` (None: scope /
        auto); returns self. PyTorch layers of a ``torch_layers`` model are left alone. An unknown backend name
        is a ValueError here."""
        set_layers_backend(self, check_backend(backend))
        self.backend = backend
        return self

    # ------------------------------------------------------------------ memory options

    def enable_slicing(self) -> None:
        """Encode and decode a batch one sample at a time (peak activation memory of batch 1)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        """Encode and decode the whole batch at once (the default)."""
        self.use_slicing = False

    def _set_tiles(self, tile_sample_min_size: int | None, tile_overlap_factor: float, aligned: bool = False) -> None:
        size = self.config.sample_size if tile_sample_min_size is None else tile_sample_min_size
        size = size[0] if isinstance(size, tuple) else size
        if not is_integer(size) or size < self.config.downscale:
            raise ValueError(
                f"tile_sample_min_size must be an int >= {self.config.downscale} (2 ** (levels - 1)), got {size!r}"
            )
        size = int(size)
        latent = size // self.config.downscale
        overlap = float(tile_overlap_factor)
        if not 0.0 <= overlap < 1.0 or int(latent * (1 - overlap)) < 1:
            raise ValueError(
                f"tile_overlap_factor must be in [0, 1) and leave a step of at least one latent pixel of the "
                f"{latent}-pixel latent tile, got {tile_overlap_factor!r}"
            )
        if aligned:
            # Each tile's kept part must span as many image pixels as the step between tiles, in both
            # directions, or the stitched result has the wrong size (the formulas _tiled_decode / _encode use).
            down = self.config.downscale
            decode_ok = int(latent * (1 - overlap)) * down == size - int(size * overlap)
            encode_ok = int(size * (1 - overlap)) == (latent - int(latent * overlap)) * down
            if size % down or not (decode_ok and encode_ok):
                raise ValueError(
                    f"tile_sample_min_size={size} and tile_overlap_factor={overlap} do not tile evenly: the tile must "
                    f"be a multiple of 2 ** (levels - 1) = {down} and its step and overlap whole latent pixels (e.g. a "
                    f"multiple of {4 * down} with overlap 0.25)"
                )
        self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor = size, latent, overlap

    def enable_tiling(self, tile_sample_min_size: int | None = None, tile_overlap_factor: float = 0.25) -> None:
        """Decode (and encode) in overlapping spatial tiles, blended, when the input exceeds one tile.

        Image tiles are ``tile_sample_min_size`` pixels (default: config.sample_size), latent tiles
        tile_latent_min_size = tile_sample_min_size / 2 ** (levels - 1). Decoding steps through the
        latent by int((1 - tile_overlap_factor) * tile_latent_min_size) pixels, fades each decoded tile in
        over its top and left blend = int(tile_overlap_factor * tile_sample_min_size) pixels from its
        (already blended) neighbours with linear ramps, and keeps its first tile_sample_min_size - blend
        rows and columns (diffusers' tiled_decode); encoding does the same with the roles of the image
        and latent tiles swapped. Memory is that of one tile; the result differs slightly from untiled
        decoding (each tile sees only its own context). The tile size must be a multiple of 2 ** (levels - 1)
        and the steps and blends whole latent pixels (e.g. a multiple of 4 * 2 ** (levels - 1) with overlap
        0.25), else a ValueError: tiles that do not line up would stitch into an image of the wrong size.
        """
        self._set_tiles(tile_sample_min_size, tile_overlap_factor, aligned=True)
        self.use_tiling = True

    def disable_tiling(self) -> None:
        """Decode and encode the whole input at once (the default)."""
        self.use_tiling = False

    # ------------------------------------------------------------------ encode

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self._tiled_encode(x)
        h = self.encoder(x)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        step = int(self.tile_sample_min_size * (1 - self.tile_overlap_factor))
        extent = int(self.tile_latent_min_size * self.tile_overlap_factor)
        size = self.tile_sample_min_size
        tiles = []
        for i in range(0, x.shape[2], step):
            row = []
            for j in range(0, x.shape[3], step):
                h = self.encoder(x[:, :, i : i + size, j : j + size])
                row.append(h if self.quant_conv is None else self.quant_conv(h))
            tiles.append(row)
        return _stitch(tiles, extent, self.tile_latent_min_size - extent)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[DiagonalGaussian]:
        """The posterior of images x.

        Args:
            x: (B, in_channels, H, W), H and W positive and divisible by 2 ** (levels - 1), contiguous
                or channels_last, in the parameters' dtype (float32, float16 or bfloat16 under
                torch.autocast; otherwise a TypeError names both).
            return_dict: return an :class:`AutoencoderKLOutput` (``.latent_dist``), else a 1-tuple.

        Returns the :class:`DiagonalGaussian` over the (B, latent_channels, H / 2^(L-1), W / 2^(L-1))
        latent (moments in x's dtype), with the model's backend.
        """
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must be (B, {self.config.in_channels}, H, W), got shape {tuple(x.shape)}")
        check_input_dtype("x", x, self.encoder.conv_in.weight.dtype)
        down = self.config.downscale
        if x.shape[2] < 1 or x.shape[3] < 1:  # a 3x3 convolution fails on an empty image
            raise ValueError(f"x must have H and W at least 1, got H={x.shape[2]}, W={x.shape[3]}")
        if x.shape[2] % down or x.shape[3] % down:  # the stride-2 convolutions would drop the remainder
            raise ValueError(
                f"x must have H and W divisible by 2 ** (levels - 1) = {down}, got H={x.shape[2]}, W={x.shape[3]}"
            )
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode_moments(s) for s in x.split(1)])
        else:
            moments = self._encode_moments(x)
        posterior = DiagonalGaussian(moments, backend=self.backend)
        return AutoencoderKLOutput(posterior) if return_dict else (posterior,)

    # ------------------------------------------------------------------ decode

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def _decode_image(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self._tiled_decode(z)
        return self._decode_tile(z)

    def _tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        step = int(self.tile_latent_min_size * (1 - self.tile_overlap_factor))
        extent = int(self.tile_sample_min_size * self.tile_overlap_factor)
        size = self.tile_latent_min_size
        tiles = [
            [self._decode_tile(z[:, :, i : i + size, j : j + size]) for j in range(0, z.shape[3], step)]
            for i in range(0, z.shape[2], step)
        ]
        return _stitch(tiles, extent, self.tile_sample_min_size - extent)

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Images of latents z.

        Args:
            z: (B, latent_channels, h, w), h and w positive, contiguous or channels_last, in the
                parameters' dtype (float32, float16 or bfloat16 under torch.autocast; otherwise a
                TypeError names both); unscaled: divide a diffusion model's latent by
                config.scaling_factor first.
            return_dict: return a :class:`DecoderOutput` (``.sample``), else a 1-tuple.
            generator: unused (accepted as diffusers' decode does, for pipelines that pass one).

        Returns (B, out_channels, h * 2^(L-1), w * 2^(L-1)) in z's dtype.
        """
        if z.dim() != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"z must be (B, {self.config.latent_channels}, h, w), got shape {tuple(z.shape)}")
        check_input_dtype("z", z, self.decoder.conv_in.weight.dtype)
        if z.shape[2] < 1 or z.shape[3] < 1:
            raise ValueError(f"z must have H and W at least 1, got h={z.shape[2]}, w={z.shape[3]}")
        if self.use_slicing and z.shape[0] > 1:
            image = torch.cat([self._decode_image(s) for s in z.split(1)])
        else:
            image = self._decode_image(z)
        return DecoderOutput(image) if return_dict else (image,)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Reconstruction decode(z) of images ``sample`` (B, in_channels, H, W), z the posterior mode or,
        with ``sample_posterior``, a posterior sample drawn from ``generator`` or ``seed`` (see
        :meth:`DiagonalGaussian.sample`). Returns (B, out_channels, H, W) (a :class:`DecoderOutput`
        unless ``return_dict`` is False). The positional order is diffusers' (sample, sample_posterior,
        return_dict, generator); ``seed`` is keyword-only."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator, seed=seed) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)


__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "AutoencoderKLOutput",
    "DecoderOutput",
    "DiagonalGaussian",
    "with_torch_layers",
]
