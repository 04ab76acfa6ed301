"""A class- or text-conditional diffusion UNet built from genkernels layers.

Layout (Stable Diffusion's UNet, on our own modules):

    t      -> sinusoidal(t, C0) -> Linear -> SiLU -> Linear                      temb (B, 4 * C0)
    labels -> Embedding(num_classes + 1, D)[labels] as one context token        ctx  (B, 1, D)
              (index num_classes is the null label, used for classifier-free guidance;
               a text encoder's (B, S, D) states can be given as ctx instead)
    x -> conv_in -> [level i: layers_per_block x (ResnetBlock, Transformer if attention[i]), Downsample]
      -> mid (ResnetBlock, Transformer, ResnetBlock)
      -> [level i reversed: (layers_per_block + 1) x (concat skip, ResnetBlock, Transformer), Upsample]
      -> GroupNorm+SiLU -> conv_out                                              (B, out_channels, H, W)

    ResnetBlock(x, temb) = conv2(drop(gns2(conv1(gns1(x)) + Linear(silu(temb))))) + shortcut(x)
                           with gns = genkernels.nn.GroupNormSiLU (GroupNorm and SiLU in one op)
    Transformer(x, ctx)  = x + proj_out(block(proj_in(GroupNorm(x))))  over the H * W pixels, where
                           block: h += Attention(LN(h)); h += Attention(LN(h), ctx); h += FF(LN(h))
                           with genkernels.nn.Attention (the fused attention op)

Every GroupNorm and attention call goes through the genkernels op registry; ``backend`` pins one
backend for all of them ("reference", "triton", "cuda"; None follows ``genkernels.backend(...)``
and the auto order). Same weights give the same output on every backend within the test criterion.

``UNet(config, torch_layers=True)`` builds the same network on plain PyTorch layers instead
(torch.nn.GroupNorm then SiLU, ``F.scaled_dot_product_attention``), with the same parameter
names: the model as it runs without genkernels, the baseline of the UNet benchmark.
:func:`with_torch_layers` makes that model from an existing one, sharing its parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._config import ConfigIO
from ._layers import (
    Downsample,
    ResnetBlock,
    Upsample,
    attention_layer,
    group_norm_layer,
    set_layers_backend,
)

# Re-exported: the UNet's PyTorch-layer flavour and twin, as the UNet benchmark imports them from here.
from ._layers import TorchAttention as TorchAttention
from ._layers import TorchGroupNormSiLU as TorchGroupNormSiLU
from ._layers import with_torch_layers as with_torch_layers


@dataclass
class UNetConfig(ConfigIO):
    """Sizes of a :class:`UNet`. Presets: :meth:`tiny` (tests), :meth:`digits`, :meth:`sd_like`.

    Args:
        sample_size: height and width of the input (square; informational, any H, W divisible by
            2 ** (levels - 1) runs).
        in_channels, out_channels: image (or latent) channels in and out.
        block_out_channels: channels of each resolution level, highest resolution first.
        layers_per_block: ResNet blocks per down level (up levels have one more, for the extra skip).
        attention: per level, whether its blocks carry a Transformer (self- and cross-attention).
        mid_attention: a Transformer between the two middle ResNet blocks.
        heads: attention heads at every level (dim_head = channels // heads).
        norm_num_groups: GroupNorm groups (must divide every level's channels).
        num_classes: class labels for conditioning; 0: no label embedding (text context only).
        cross_attention_dim: channels of the context tokens (label embedding or text states).
        dropout: in the ResNet blocks.
    """

    sample_size: int = 8
    in_channels: int = 1
    out_channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention: tuple[bool, ...] = (False, True, True)
    mid_attention: bool = True
    heads: int = 4
    norm_num_groups: int = 8
    num_classes: int = 10
    cross_attention_dim: int = 64
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.attention = tuple(bool(a) for a in self.attention)
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level")
        if len(self.attention) != len(self.block_out_channels):
            raise ValueError(
                f"attention must have one flag per level ({len(self.block_out_channels)} levels in "
                f"block_out_channels={self.block_out_channels}), got {self.attention}"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every level's channels, got {c}")
            if c % self.heads:
                raise ValueError(f"heads={self.heads} must divide every level's channels, got {c}")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")

    @classmethod
    def tiny(cls, **overrides) -> UNetConfig:
        """A few channels, two levels (8x8 and 4x4 for the digits), attention at the second: for tests."""
        base = dict(
            block_out_channels=(16, 32), attention=(False, True), heads=2, norm_num_groups=4, cross_attention_dim=16
        )
        return cls(**{**base, **overrides})

    @classmethod
    def digits(cls, **overrides) -> UNetConfig:
        """The default for the 8x8 digits: three levels (8, 4, 2), attention at 4x4 and 2x2 (about 1.7 M parameters)."""
        return cls(**overrides)

    @classmethod
    def sd_like(cls, **overrides) -> UNetConfig:
        """Stable Diffusion 1.x sizes: 64x64x4 latents, channels (320, 640, 1280, 1280), two blocks per
        level, attention at the first three levels, 8 heads, 768-channel context (about 0.9 G parameters)."""
        base = dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention=(True, True, True, False),
            heads=8,
            norm_num_groups=32,
            num_classes=0,
            cross_attention_dim=768,
        )
        return cls(**{**base, **overrides})


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    With half = dim // 2 and f_i = max_period ** (-i / half), i < half:
        emb[b] = [cos(t_b f_0), ..., cos(t_b f_{half-1}), sin(t_b f_0), ..., sin(t_b f_{half-1})]
    (zero-padded by one column when dim is odd). t: (B,) any real dtype; returns (B, dim) float32
    (float64 for float64 t).
    """
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class FeedForward(torch.nn.Module):
    """GEGLU feed-forward: proj_out(a * gelu(g)) with (a, g) = proj_in(x) split in two; (B, L, C) -> (B, L, C)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.proj_in = torch.nn.Linear(dim, 2 * inner)
        self.proj_out = torch.nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(g))


class Transformer(torch.nn.Module):
    """Spatial transformer: self-attention over the pixels, cross-attention to the context, feed-forward.

    x (B, C, H, W), context (B, S, cross_attention_dim) -> (B, C, H, W), residual around the whole.
    ``torch_layers``: PyTorch's GroupNorm and SDPA instead of genkernels' ops.
    """

    def __init__(
        self, channels: int, heads: int, context_dim: int, groups: int, backend: str | None, torch_layers: bool = False
    ) -> None:
        super().__init__()
        dim_head = channels // heads
        attention = attention_layer(torch_layers)
        self.norm = group_norm_layer(torch_layers, False, groups, channels, 1e-6, backend)
        self.proj_in = torch.nn.Linear(channels, channels)
        self.norm1 = torch.nn.LayerNorm(channels)
        self.attn1 = attention(channels, heads=heads, dim_head=dim_head, backend=backend)
        self.norm2 = torch.nn.LayerNorm(channels)
        self.attn2 = attention(
            channels, cross_attention_dim=context_dim, heads=heads, dim_head=dim_head, backend=backend
        )
        self.norm3 = torch.nn.LayerNorm(channels)
        self.ff = FeedForward(channels)
        self.proj_out = torch.nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H * W, C)
        tokens = self.proj_in(tokens)
        tokens = tokens + self.attn1(self.norm1(tokens))
        tokens = tokens + self.attn2(self.norm2(tokens), context)
        tokens = tokens + self.ff(self.norm3(tokens))
        out = self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class _Level(torch.nn.Module):
    """One resolution level: ResNet blocks, each optionally followed by a Transformer, then a resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.resnets = torch.nn.ModuleList()
        self.attentions = torch.nn.ModuleList()
        self.sampler: torch.nn.Module | None = None


class UNet(torch.nn.Module):
    """Conditional diffusion UNet (see the module doc for the layout).

    ``forward(x, t, labels)`` returns the model output (epsilon, v or flow velocity, whichever
    objective it was trained on) with x's shape.

    Args:
        config: a :class:`UNetConfig`.
        backend: backend for every GroupNorm and attention op ("reference", "triton", "cuda";
            None: the ``genkernels.backend(...)`` scope or auto). Change it later with
            :meth:`set_backend`.
        torch_layers: build it on PyTorch's layers instead (torch.nn.GroupNorm + SiLU,
            ``F.scaled_dot_product_attention``): the same function and the same parameter names,
            so either model loads the other's state_dict; ``backend`` has no effect then.
    """

    def __init__(self, config: UNetConfig, *, backend: str | None = None, torch_layers: bool = False) -> None:
        super().__init__()
        self.config = config
        self.torch_layers = torch_layers
        cfg = config
        ch = cfg.block_out_channels
        groups, temb_dim = cfg.norm_num_groups, 4 * ch[0]
        self.conv_in = torch.nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = torch.nn.Sequential(
            torch.nn.Linear(ch[0], temb_dim), torch.nn.SiLU(), torch.nn.Linear(temb_dim, temb_dim)
        )
        # One row more than classes: the last is the null label ("no class") for guidance.
        self.class_embedding = (
            torch.nn.Embedding(cfg.num_classes + 1, cfg.cross_attention_dim) if cfg.num_classes else None
        )

        def res(cin, cout):
            return ResnetBlock(cin, cout, temb_dim, groups, cfg.dropout, backend, torch_layers)

        def attn(c):
            return Transformer(c, cfg.heads, cfg.cross_attention_dim, groups, backend, torch_layers)

        self.down = torch.nn.ModuleList()
        skip_channels = [ch[0]]
        cin = ch[0]
        for i, cout in enumerate(ch):
            level = _Level()
            for _ in range(cfg.layers_per_block):
                level.resnets.append(res(cin, cout))
                if cfg.attention[i]:
                    level.attentions.append(attn(cout))
                cin = cout
                skip_channels.append(cout)
            if i < len(ch) - 1:
                level.sampler = Downsample(cout)
                skip_channels.append(cout)
            self.down.append(level)

        self.mid_res1 = res(ch[-1], ch[-1])
        self.mid_attn = attn(ch[-1]) if cfg.mid_attention else None
        self.mid_res2 = res(ch[-1], ch[-1])

        self.up = torch.nn.ModuleList()
        cin = ch[-1]
        for i in reversed(range(len(ch))):
            cout = ch[i]
            level = _Level()
            for _ in range(cfg.layers_per_block + 1):
                level.resnets.append(res(cin + skip_channels.pop(), cout))
                if cfg.attention[i]:
                    level.attentions.append(attn(cout))
                cin = cout
            if i > 0:
                level.sampler = Upsample(cout)
            self.up.append(level)

        self.norm_out = group_norm_layer(torch_layers, True, groups, ch[0], 1e-5, backend)
        self.conv_out = torch.nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        # A zero output layer starts the model at "predict 0", the loss at its trivial value: stable first steps.
        torch.nn.init.zeros_(self.conv_out.weight)
        torch.nn.init.zeros_(self.conv_out.bias)

    @property
    def null_label(self) -> int:
        """The label index meaning "no class" (classifier-free guidance's unconditional branch)."""
        return self.config.num_classes

    def set_backend(self, backend: str | None) -> UNet:
        """Pin every GroupNorm and attention op of the model to ``backend`` (None: scope / auto); returns self.

        No effect on a ``torch_layers`` model (its layers run PyTorch's own kernels).
        """
        set_layers_backend(self, backend)
        return self

    def context(self, labels: torch.Tensor | None, batch: int, device: torch.device, dtype: torch.dtype):
        """The (B, 1, cross_attention_dim) context token of ``labels`` (None: the null label for all)."""
        if self.class_embedding is None:
            raise ValueError("this UNet has num_classes=0: pass encoder_hidden_states instead of labels")
        if labels is None:
            labels = torch.full((batch,), self.null_label, device=device, dtype=torch.long)
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},) (one per sample), got {tuple(labels.shape)}")
        if labels.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        return self.class_embedding(labels.long()).to(dtype)[:, None, :]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Model output for noisy x at timestep t.

        Args:
            x: (B, in_channels, H, W), H and W divisible by 2 ** (levels - 1).
            t: timesteps on the training scale ([0, num_train_timesteps), fractional allowed),
                a number or a (B,) or 0-d tensor.
            labels: (B,) int class labels in [0, num_classes]; num_classes is the null label;
                None: all null.
            encoder_hidden_states: (B, S, cross_attention_dim) context that replaces the label
                embedding (text conditioning).

        Returns (B, out_channels, H, W) in x's dtype.
        """
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must be (B, {self.config.in_channels}, H, W), got shape {tuple(x.shape)}")
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"H and W must be divisible by {factor} (2 ** (levels - 1)), got {tuple(x.shape[2:])}")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a number, a 0-d tensor or shape ({b},), got shape {tuple(t.shape)}")
        if encoder_hidden_states is None:
            context = self.context(labels, b, x.device, x.dtype)
        else:
            context = encoder_hidden_states.to(x.dtype)
        temb = timestep_embedding(t, self.config.block_out_channels[0]).to(x.dtype)
        temb_act = F.silu(self.time_embedding(temb))

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for j, block in enumerate(level.resnets):
                h = block(h, temb_act)
                if len(level.attentions):
                    h = level.attentions[j](h, context)
                skips.append(h)
            if level.sampler is not None:
                h = level.sampler(h)
                skips.append(h)
        h = self.mid_res1(h, temb_act)
        if self.mid_attn is not None:
            h = self.mid_attn(h, context)
        h = self.mid_res2(h, temb_act)
        for level in self.up:
            for j, block in enumerate(level.resnets):
                h = block(torch.cat([h, skips.pop()], dim=1), temb_act)
                if len(level.attentions):
                    h = level.attentions[j](h, context)
            if level.sampler is not None:
                h = level.sampler(h)
        return self.conv_out(self.norm_out(h))
