"""Diffusion backbones built from genkernels layers: a class- or text-conditional UNet and a DiT.

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

:class:`DiT` is the diffusion transformer (Peebles and Xie's layout, on the adaLN, RoPE, gated-MLP
and attention ops); its doc gives the layout. It takes the UNet's call (x, t, labels), so the
training loop and the samplers run either backbone.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import ops
from .._checks import as_number, check_backend, is_finite_real, is_integer, positive_int
from ._config import ConfigIO
from ._layers import (
    Downsample,
    ResnetBlock,
    Upsample,
    attention_layer,
    check_indices,
    check_input_dtype,
    group_norm_layer,
    is_index_tensor,
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
        # Sizes are whole and flags real bools: int(16.7) or bool("False") would build another network than asked.
        self.block_out_channels = tuple(
            positive_int("every entry of block_out_channels", c) for c in self.block_out_channels
        )
        self.attention = tuple(_flag("every entry of attention", a) for a in self.attention)
        self.mid_attention = _flag("mid_attention", self.mid_attention)
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level")
        if len(self.attention) != len(self.block_out_channels):
            raise ValueError(
                f"attention must have one flag per level ({len(self.block_out_channels)} levels in "
                f"block_out_channels={self.block_out_channels}), got {self.attention}"
            )
        names = ("norm_num_groups", "heads", "layers_per_block", "sample_size", "in_channels", "out_channels")
        for name in (*names, "cross_attention_dim"):
            setattr(self, name, positive_int(name, getattr(self, name)))
        if not (is_finite_real(self.dropout) and 0 <= self.dropout <= 1):
            raise ValueError(f"dropout must be a number in [0, 1], got {self.dropout!r}")
        self.dropout = float(self.dropout)  # a config holds Python numbers only (to_json cannot write NumPy scalars)
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every level's channels, got {c}")
            if c % self.heads:
                raise ValueError(f"heads={self.heads} must divide every level's channels, got {c}")
        if not is_integer(self.num_classes) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        self.num_classes = int(self.num_classes)

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


def _flag(name: str, value) -> bool:
    """``value`` as a Python bool if it is a bool (or a NumPy bool), else a ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name} must be a bool, got {value!r}")


def _check_model_args(config, config_class: type, torch_layers) -> bool:
    """Raise a TypeError unless ``config`` is a ``config_class`` (a dict would fail deep inside the constructor), a
    ValueError unless ``torch_layers`` is a bool (any truthy value would build the other flavour); returns it."""
    if not isinstance(config, config_class):
        name = config_class.__name__
        raise TypeError(
            f"config must be a {name} ({name}.from_dict(d) makes one from a dict), got {type(config).__name__}"
        )
    return _flag("torch_layers", torch_layers)


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


def _timesteps(t, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """t (a number, a 0-d, (1,) or (batch,) tensor) as a (batch,) tensor on ``device`` (a 0-d or (1,) t
    broadcast over the batch, as diffusers' models do); NumPy scalars as Python's. For a float64 model
    (``dtype``, x's) t is float64, so that the embedding is computed in float64 (a Python float is not rounded
    through float32 first); else as torch.as_tensor makes it (float32 for a float). A bool is no timestep
    (True would run at t = 1) and a complex t has no order: TypeErrors."""
    t = as_number(t)
    wide = dtype == torch.float64
    if wide and isinstance(t, float):  # torch.as_tensor would round it to float32
        t = torch.tensor(t, dtype=torch.float64, device=device)
    t = torch.as_tensor(t, device=device)
    if t.dtype == torch.bool:  # True, np.bool_ or a bool tensor
        raise TypeError(f"t must be a number, a 0-d tensor or shape (1,) or ({batch},) of timesteps, got bools")
    if t.is_complex():
        raise TypeError(f"t must be real timesteps, got {t.dtype}")
    if wide:
        t = t.to(torch.float64)
    if t.dim() == 0 or t.shape == (1,):
        t = t.reshape(()).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a number, a 0-d tensor or shape (1,) or ({batch},), got shape {tuple(t.shape)}")
    return t


def _check_labels(labels, batch: int, limit: int) -> None:
    """Raise a clear error unless labels is a (batch,) tensor of integers (any integer dtype) in [0, limit)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be None or an integer tensor of shape ({batch},), got {type(labels).__name__}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},) (one per sample), got {tuple(labels.shape)}")
    if not is_index_tensor(labels):
        raise TypeError(f"labels must be an integer tensor (int64, int32, int16, uint8 ...), got {labels.dtype}")
    check_indices("labels", labels, limit)


def _check_context(context, labels, batch: int, width: int) -> None:
    """Raise a clear error unless the UNet's encoder_hidden_states is a floating (batch, S, width) tensor given
    without labels (it replaces their embedding: labels given too would be ignored)."""
    if labels is not None:
        raise ValueError(
            "pass labels or encoder_hidden_states, not both: the context replaces the label embedding (the labels "
            "would be ignored)"
        )
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"encoder_hidden_states must be None or a tensor, got {type(context).__name__}")
    if not context.is_floating_point():
        raise TypeError(f"encoder_hidden_states must be floating point, got {context.dtype}")
    if context.dim() != 3 or context.shape[0] != batch or context.shape[2] != width:
        raise ValueError(
            f"encoder_hidden_states must be (B, S, {width}) with B = {batch} (x's batch) and {width} = "
            f"cross_attention_dim, got shape {tuple(context.shape)}"
        )


class FeedForward(torch.nn.Module):
    """GEGLU feed-forward: proj_out(a * gelu(g)) with (a, g) = proj_in(x) split in two; (B, L, C) -> (B, L, C)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.proj_in = torch.nn.Linear(dim, 2 * inner)
        self.proj_out = torch.nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, C) -> (B, L, C): proj_out(a * gelu(g)), (a, g) = proj_in(x) split in two along channels."""
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
        """x (B, C, H, W), context (B, S, cross_attention_dim) -> (B, C, H, W): x + proj_out(block(proj_in(n)))
        with n = GroupNorm(x) as (B, H * W, C) tokens and block: h += attn1(LN(h)); h += attn2(LN(h), context);
        h += ff(LN(h))."""
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
        torch_layers = _check_model_args(config, UNetConfig, torch_layers)
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
        set_layers_backend(self, check_backend(backend))
        return self

    def context(self, labels: torch.Tensor | None, batch: int, device: torch.device, dtype: torch.dtype):
        """The (B, 1, cross_attention_dim) context token of ``labels`` (None: the null label for all)."""
        if self.class_embedding is None:
            raise ValueError("this UNet has num_classes=0: pass encoder_hidden_states instead of labels")
        if labels is None:
            labels = torch.full((batch,), self.null_label, device=device, dtype=torch.long)
        _check_labels(labels, batch, self.null_label + 1)
        return self.class_embedding(labels.to(device=device, dtype=torch.long)).to(dtype)[:, None, :]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Model output for noisy x at timestep t.

        Args:
            x: (B, in_channels, H, W), H and W positive and divisible by 2 ** (levels - 1); in the
                parameters' dtype (float32, float16 or bfloat16 under torch.autocast; otherwise a
                TypeError names both).
            t: timesteps on the training scale ([0, num_train_timesteps), fractional allowed),
                a number, or a 0-d, (1,) or (B,) tensor (one value broadcast over the batch). A float64
                model embeds them in float64.
            labels: (B,) int class labels in [0, num_classes] (on any device); num_classes is the null label;
                None: all null.
            encoder_hidden_states: (B, S, cross_attention_dim) floating-point context that replaces
                the label embedding (text conditioning); labels must then be None.

        Returns (B, out_channels, H, W) in x's dtype (under torch.autocast: the autocast dtype).
        """
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, H, W), got shape {tuple(x.shape)}")
        check_input_dtype("x", x, self.conv_in.weight.dtype)
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if x.shape[2] < 1 or x.shape[3] < 1 or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"H and W must be at least 1 and divisible by {factor} (2 ** (levels - 1)), got {tuple(x.shape[2:])}"
            )
        b = x.shape[0]
        t = _timesteps(t, b, x.device, x.dtype)
        if encoder_hidden_states is None:
            context = self.context(labels, b, x.device, x.dtype)
        else:
            _check_context(encoder_hidden_states, labels, b, cfg.cross_attention_dim)
            context = encoder_hidden_states.to(x.dtype)
        temb = timestep_embedding(t, cfg.block_out_channels[0]).to(x.dtype)
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


# --------------------------------------------------------------------------- DiT

POSITIONS = ("rope", "learned")


@dataclass
class DiTConfig(ConfigIO):
    """Sizes of a :class:`DiT`. Presets: :meth:`tiny` (tests), :meth:`digits` (8x8 grey digits on CPU),
    :meth:`dit_xl_2` (DiT-XL/2 on 32x32x4 latents, for benchmarks).

    Args:
        sample_size: height and width of the input (square). With learned positions the model runs
            at this size only; with RoPE any H, W divisible by patch_size run.
        patch_size: p: the image is cut into (H / p) x (W / p) patches of p x p pixels, one token each.
        in_channels, out_channels: image (or latent) channels in and out.
        dim: token channels (DiT's hidden size).
        depth: number of adaLN-Zero transformer blocks.
        heads: attention heads (dim_head = dim // heads; RoPE needs dim_head divisible by 4: half
            of each head's channels rotate with the patch row, half with its column).
        mlp_ratio: the MLP's hidden channels are int(dim * mlp_ratio).
        num_classes: class labels for conditioning (plus one null label for classifier-free
            guidance); 0: unconditional.
        positions: "rope" (2-D axial rotary embedding of q and k in every attention) or "learned"
            (a (1, tokens, dim) table added to the patch tokens).
        rope_base: the RoPE frequency base.
        frequency_dim: channels of the sinusoidal timestep embedding fed to the timestep MLP.
        eps: of every LayerNorm (none has an affine: the modulation takes its place).
    """

    sample_size: int = 8
    patch_size: int = 2
    in_channels: int = 1
    out_channels: int = 1
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    positions: str = "rope"
    rope_base: float = 10000.0
    frequency_dim: int = 256
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("sample_size", "patch_size", "in_channels", "out_channels", "dim", "depth", "heads"):
            setattr(self, name, positive_int(name, getattr(self, name)))
        if self.sample_size % self.patch_size:
            raise ValueError(
                f"patch_size={self.patch_size} must divide sample_size={self.sample_size} "
                "(the image is cut into whole patches)"
            )
        if self.dim % self.heads:
            raise ValueError(f"heads={self.heads} must divide dim={self.dim}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.positions == "rope" and self.head_dim % 4:
            raise ValueError(
                f"positions='rope' needs dim_head = dim // heads divisible by 4 (half of each head rotates with "
                f"the patch row, half with its column, in pairs), got dim={self.dim}, heads={self.heads}: "
                f"dim_head={self.head_dim}"
            )
        if not (is_finite_real(self.mlp_ratio) and self.mlp_ratio > 0 and int(self.dim * self.mlp_ratio) >= 1):
            raise ValueError(
                f"mlp_ratio must be a positive number with int(dim * mlp_ratio) >= 1, got {self.mlp_ratio}"
            )
        if not is_integer(self.num_classes) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        if not is_integer(self.frequency_dim) or self.frequency_dim < 2:
            raise ValueError(f"frequency_dim must be an int >= 2, got {self.frequency_dim!r}")
        if not (is_finite_real(self.rope_base) and self.rope_base > 1):
            raise ValueError(f"rope_base must be a number > 1, got {self.rope_base}")
        if not (is_finite_real(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive number, got {self.eps}")
        for name in ("mlp_ratio", "num_classes", "frequency_dim", "rope_base", "eps"):
            setattr(self, name, as_number(getattr(self, name)))

    @property
    def head_dim(self) -> int:
        """Channels per attention head: dim // heads."""
        return self.dim // self.heads

    @property
    def mlp_hidden(self) -> int:
        """Hidden channels of each block's MLP: int(dim * mlp_ratio)."""
        return int(self.dim * self.mlp_ratio)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of patches of an H x W input; a ValueError when this model cannot take that size
        (patch_size not dividing it; with learned positions, any size but sample_size)."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"H and W must be divisible by patch_size={p}, got {height}x{width}")
        if self.positions == "learned" and (height, width) != (self.sample_size,) * 2:
            raise ValueError(
                f"a DiT with learned positions takes {self.sample_size}x{self.sample_size} inputs only "
                f"(sample_size), got {height}x{width}; positions='rope' runs at any size"
            )
        return height // p, width // p

    @classmethod
    def tiny(cls, **overrides) -> DiTConfig:
        """Two blocks of 32 channels, 2 heads, patches of 2 on 8x8 grey images: for tests."""
        base = dict(dim=32, depth=2, heads=2, frequency_dim=32)
        return cls(**{**base, **overrides})

    @classmethod
    def digits(cls, **overrides) -> DiTConfig:
        """The default for the 8x8 digits: 2x2 patches (16 tokens), dim 128, 6 blocks, 4 heads, RoPE
        (about 1.8 M parameters)."""
        return cls(**overrides)

    @classmethod
    def dit_xl_2(cls, **overrides) -> DiTConfig:
        """DiT-XL/2 sizes: 32x32x4 latents (256x256 images through the SD VAE), 2x2 patches (256 tokens),
        dim 1152, 28 blocks, 16 heads, MLP 4608, 1000 classes (about 675 M parameters)."""
        base = dict(sample_size=32, in_channels=4, out_channels=4, dim=1152, depth=28, heads=16, num_classes=1000)
        return cls(**{**base, **overrides})


def _modulate(n: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """n * (1 + scale) + shift with per-sample (B, D) shift and scale over (B, L, D) tokens (PyTorch ops)."""
    return n * (1 + scale[:, None]) + shift[:, None]


def _rope_rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """genkernels.ops.rope's rotation on PyTorch ops (the torch_layers flavour): the "rotate half"
    convention, channel i paired with i + Dh/2; t (B, H, L, Dh), cos and sin (L, Dh/2)."""
    half = cos.shape[-1]
    cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    a, b = t[..., :half], t[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class _OpsModule(torch.nn.Module):
    """A DiT layer: genkernels ops pinned to ``backend``, or PyTorch ops when ``torch_layers``."""

    def __init__(self, backend: str | None, torch_layers: bool) -> None:
        super().__init__()
        self.backend = check_backend(backend)
        self.torch_layers = torch_layers


class DiTAttention(_OpsModule):
    """Multi-head self-attention over the patch tokens with optional 2-D RoPE: proj(attention(rope(q), rope(k), v)).

    (q, k, v) = qkv(x) split in heads (B, heads, L, dim_head); with ``rope`` = (cos, sin), each (L, dim_head / 2),
    q and k are rotated by genkernels.ops.rope; then non-causal genkernels.ops.attention (scale
    1 / sqrt(dim_head)) and the output projection. x (B, L, dim) -> (B, L, dim).
    """

    def __init__(self, dim: int, heads: int, backend: str | None = None, torch_layers: bool = False) -> None:
        super().__init__(backend, torch_layers)
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, L, dim) -> (B, L, dim): self-attention over the L tokens, q and k rotated when ``rope`` is given.

        rope: (cos, sin), each (L, dim_head / 2), or None (no rotation).
        """
        b, length, dim = x.shape
        # (B, L, 3, heads, dim_head) -> three (B, heads, L, dim_head) views: no copy.
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.torch_layers:
            if rope is not None:
                q, k = _rope_rotate(q, *rope), _rope_rotate(k, *rope)
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            if rope is not None:
                q, k = ops.rope(q, k, *rope, backend=self.backend)
            o = ops.attention(q, k, v, backend=self.backend)
        return self.proj(o.transpose(1, 2).reshape(b, length, dim))


class DiTMlp(_OpsModule):
    """fc2(gelu_tanh(fc1(x))): (B, L, dim) -> (B, L, dim), hidden channels ``hidden``
    (fc1 and the GELU as genkernels.ops.linear_gelu_tanh: on CUDA without autograd, one matrix product with the
    bias and GELU in its epilogue; fc1 then F.gelu(approximate="tanh") when ``torch_layers``)."""

    def __init__(self, dim: int, hidden: int, backend: str | None = None, torch_layers: bool = False) -> None:
        super().__init__(backend, torch_layers)
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim) -> (B, L, dim): fc2(gelu_tanh(fc1(x)))."""
        if self.torch_layers:
            h = F.gelu(self.fc1(x), approximate="tanh")
        else:
            h = ops.linear_gelu_tanh(x, self.fc1.weight, self.fc1.bias, backend=self.backend)
        return self.fc2(h)


class DiTBlock(_OpsModule):
    """One adaLN-Zero transformer block: x (B, L, dim), c_act = silu(c) (B, dim) -> (B, L, dim).

        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = modulation(c_act)   6 x (B, dim)
        n    = LN(x) * (1 + scale_msa) + shift_msa            layer_norm_modulate (no affine)
        h    = x + gate_msa * attn(n, rope)                   \\ one op: gated_residual_layer_norm_modulate
        n    = LN(h) * (1 + scale_mlp) + shift_mlp            /
        out  = h + gate_mlp * mlp(n)                          gated_residual

    ``modulation`` is zero-initialized: every gate starts at 0, so the block starts as the identity.
    The branches are added in x's dtype (under autocast they leave their matrix products in the autocast dtype,
    while learned positions keep the residual stream in float32), as x + gate * branch promotes them.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_hidden: int,
        eps: float = 1e-6,
        backend: str | None = None,
        torch_layers: bool = False,
    ) -> None:
        super().__init__(backend, torch_layers)
        self.eps = eps
        self.modulation = torch.nn.Linear(dim, 6 * dim)
        self.attn = DiTAttention(dim, heads, backend, torch_layers)
        self.mlp = DiTMlp(dim, mlp_hidden, backend, torch_layers)
        torch.nn.init.zeros_(self.modulation.weight)
        torch.nn.init.zeros_(self.modulation.bias)

    def forward(
        self, x: torch.Tensor, c_act: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x (B, L, dim), c_act = silu(c) (B, dim) -> (B, L, dim): the gated attention and MLP of the class doc.

        rope: (cos, sin), each (L, dim_head / 2), for the attention's q and k, or None.
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c_act).chunk(6, dim=1)
        if self.torch_layers:
            norm = (x.shape[-1],)
            n = _modulate(F.layer_norm(x, norm, eps=self.eps), shift_msa, scale_msa)
            h = x + gate_msa[:, None] * self.attn(n, rope)
            n = _modulate(F.layer_norm(h, norm, eps=self.eps), shift_mlp, scale_mlp)
            return h + gate_mlp[:, None] * self.mlp(n)
        n = ops.layer_norm_modulate(x, shift=shift_msa, scale=scale_msa, eps=self.eps, backend=self.backend)
        h, n = self._attention_residual(x, n, rope, gate_msa, shift_mlp, scale_mlp)
        return ops.gated_residual(h, self.mlp(n), gate_mlp, backend=self.backend)

    def _attention_residual(self, x, n, rope, gate_msa, shift_mlp, scale_mlp) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, LN(h) * (1 + scale_mlp) + shift_mlp) with h = x + gate_msa * attn(n) in x's dtype: the attention's
        gated residual fused with the MLP's norm. Under autocast the attention's output is in the autocast dtype
        and the residual stream in x's; the op reads each in its own."""
        return ops.gated_residual_layer_norm_modulate(
            x, self.attn(n, rope), gate_msa, shift=shift_mlp, scale=scale_mlp, eps=self.eps, backend=self.backend
        )

    def forward_fused(
        self,
        x: torch.Tensor,
        n: torch.Tensor,
        mods: tuple[torch.Tensor, ...],
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        next_norm: tuple[torch.Tensor, torch.Tensor, float],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` (genkernels ops) with its last gated residual fused with the norm after the block.

        Given x (B, L, dim), n = LN(x) * (1 + scale_msa) + shift_msa (computed by the caller, fused with the
        previous block's last residual), mods = the six chunks of ``modulation(c_act)`` and next_norm = the
        (shift, scale, eps) of the norm that follows the block (the next block's first, or the final layer's),
        returns (out, LN(out) * (1 + scale) + shift) with out = forward(x, c_act, rope): two
        gated_residual_layer_norm_modulate calls, where forward runs a norm, that op and a gated residual.
        """
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        next_shift, next_scale, next_eps = next_norm
        h, n = self._attention_residual(x, n, rope, gate_msa, shift_mlp, scale_mlp)
        return ops.gated_residual_layer_norm_modulate(
            h, self.mlp(n), gate_mlp, shift=next_shift, scale=next_scale, eps=next_eps, backend=self.backend
        )


class DiTFinalLayer(_OpsModule):
    """linear(LN(x) * (1 + scale) + shift) with (shift, scale) = modulation(c_act): (B, L, dim) -> (B, L, out).

    Both ``modulation`` and ``linear`` are zero-initialized: the model starts at "predict 0".
    """

    def __init__(
        self, dim: int, out: int, eps: float = 1e-6, backend: str | None = None, torch_layers: bool = False
    ) -> None:
        super().__init__(backend, torch_layers)
        self.eps = eps
        self.modulation = torch.nn.Linear(dim, 2 * dim)
        self.linear = torch.nn.Linear(dim, out)
        for p in (self.modulation.weight, self.modulation.bias, self.linear.weight, self.linear.bias):
            torch.nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim), c_act = silu(c) (B, dim) -> (B, L, out): linear(LN(x) * (1 + scale) + shift)."""
        shift, scale = self.modulation(c_act).chunk(2, dim=1)
        if self.torch_layers:
            n = _modulate(F.layer_norm(x, (x.shape[-1],), eps=self.eps), shift, scale)
        else:
            n = ops.layer_norm_modulate(x, shift=shift, scale=scale, eps=self.eps, backend=self.backend)
        return self.linear(n)


class DiT(torch.nn.Module):
    """Class-conditional diffusion transformer with adaLN-Zero blocks (DiT).

    With p = patch_size, (h, w) = (H / p, W / p) and L = h * w tokens in row-major patch order:

        x      -> Conv2d(in_channels, dim, p, stride p) -> (B, L, dim) tokens   [+ pos_embed when learned]
        t      -> timestep_embedding(t, frequency_dim) -> Linear -> SiLU -> Linear            (B, dim)
        labels -> Embedding(num_classes + 1, dim)  (index num_classes: the null label)        (B, dim)
        c      =  time + label embeddings; c_act = silu(c), shared by every block's modulation
        tokens -> depth x DiTBlock(tokens, c_act, rope) -> DiTFinalLayer  (B, L, p * p * out_channels)
               -> unpatchify                                                  (B, out_channels, H, W)

    RoPE (positions="rope"): cos, sin = genkernels.ops.rope_frequencies_2d(h, w, dim_head, rope_base),
    applied to q and k in the "rotate half" convention (channel j paired with j + dim_head / 2): pairs
    j < dim_head / 4 turn with the patch row, the others with its column. The ops (layer_norm_modulate,
    gated_residual_layer_norm_modulate, gated_residual, rope, linear_gelu_tanh, attention) go through the
    genkernels registry; ``backend`` pins all of them.

    Args:
        config: a :class:`DiTConfig`.
        backend: backend of every op ("reference", "triton", "cuda"; None: the
            ``genkernels.backend(...)`` scope or auto). Change it later with :meth:`set_backend`.
        torch_layers: the same function on PyTorch ops (F.layer_norm and the modulation written
            out, F.scaled_dot_product_attention, F.gelu, the rotation written out), with the same
            parameter names: either model loads the other's state_dict. ``backend`` has no effect then.
    """

    def __init__(self, config: DiTConfig, *, backend: str | None = None, torch_layers: bool = False) -> None:
        super().__init__()
        torch_layers = _check_model_args(config, DiTConfig, torch_layers)
        self.config = config
        self.torch_layers = torch_layers
        cfg = config
        dim, p = cfg.dim, cfg.patch_size
        self.patch_embed = torch.nn.Conv2d(cfg.in_channels, dim, p, stride=p)
        self.time_embedding = torch.nn.Sequential(
            torch.nn.Linear(cfg.frequency_dim, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim)
        )
        # One row more than classes: the last is the null label ("no class") for guidance.
        self.class_embedding = torch.nn.Embedding(cfg.num_classes + 1, dim) if cfg.num_classes else None
        tokens = (cfg.sample_size // p) ** 2
        self.pos_embed = torch.nn.Parameter(torch.empty(1, tokens, dim)) if cfg.positions == "learned" else None
        self.blocks = torch.nn.ModuleList(
            DiTBlock(dim, cfg.heads, cfg.mlp_hidden, cfg.eps, backend, torch_layers) for _ in range(cfg.depth)
        )
        self.final_layer = DiTFinalLayer(dim, p * p * cfg.out_channels, cfg.eps, backend, torch_layers)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier-uniform linear and patch weights with zero biases; N(0, 0.02) embeddings; the adaLN
        modulations and the output layer stay zero (adaLN-Zero: every block starts as the identity)."""
        zero_init = {block.modulation for block in self.blocks} | {self.final_layer.modulation, self.final_layer.linear}
        for m in self.modules():
            if isinstance(m, torch.nn.Linear) and m not in zero_init:
                torch.nn.init.xavier_uniform_(m.weight)
                torch.nn.init.zeros_(m.bias)
        torch.nn.init.xavier_uniform_(self.patch_embed.weight.view(self.config.dim, -1))
        torch.nn.init.zeros_(self.patch_embed.bias)
        for linear in (self.time_embedding[0], self.time_embedding[2]):
            torch.nn.init.normal_(linear.weight, std=0.02)
        if self.class_embedding is not None:
            torch.nn.init.normal_(self.class_embedding.weight, std=0.02)
        if self.pos_embed is not None:
            torch.nn.init.normal_(self.pos_embed, std=0.02)

    @property
    def null_label(self) -> int:
        """The label index meaning "no class" (classifier-free guidance's unconditional branch)."""
        return self.config.num_classes

    def set_backend(self, backend: str | None) -> DiT:
        """Pin every op of the model to ``backend`` (None: scope / auto); returns self.

        No effect on a ``torch_layers`` model (its layers run PyTorch's own kernels).
        """
        check_backend(backend)
        for m in self.modules():
            if isinstance(m, _OpsModule):
                m.backend = backend
        return self

    def rope_tables(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype):
        """(cos, sin), each (rows * cols, dim_head / 2), of the 2-D axial RoPE of a rows x cols patch grid
        (float64 for a float64 model, else float32); cached per grid, device and dtype. Made as ordinary tensors
        even under torch.inference_mode() (inference tensors in the cache would fail every later training step
        in autograd)."""
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (rows, cols, device, table_dtype)
        if key not in self._rope_cache:
            eager_inference = not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()
            with torch.inference_mode(False) if eager_inference else contextlib.nullcontext():
                cfg = self.config
                cos, sin = ops.rope_frequencies_2d(rows, cols, cfg.head_dim, base=cfg.rope_base, dtype=table_dtype)
                self._rope_cache[key] = (cos.to(device), sin.to(device))
        return self._rope_cache[key]

    def condition(self, t: torch.Tensor, labels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """c = time embedding of t (B,) + label embedding of labels (B,) (None: the null label): (B, dim)."""
        b = t.shape[0]
        c = self.time_embedding(timestep_embedding(t, self.config.frequency_dim).to(dtype))
        if self.class_embedding is None:
            if labels is not None:
                raise ValueError("this DiT has num_classes=0 (unconditional): labels must be None")
            return c
        if labels is None:
            labels = torch.full((b,), self.null_label, device=t.device, dtype=torch.long)
        _check_labels(labels, b, self.null_label + 1)
        return c + self.class_embedding(labels.to(device=c.device, dtype=torch.long)).to(dtype)

    def _blocks_and_final(self, tokens: torch.Tensor, c_act: torch.Tensor, rope) -> torch.Tensor:
        """The blocks and the final layer on tokens (B, L, dim) -> (B, L, p * p * out_channels).

        On the genkernels ops every block's last gated residual is fused with the norm after it (the next
        block's first, or the final layer's): one gated_residual_layer_norm_modulate call where a gated
        residual and a norm would run apart (:meth:`DiTBlock.forward_fused`). The stack then runs one norm
        and two fused calls a block, 2 depth + 1 calls instead of 3 depth + 1, and a pass over the tokens
        fewer a block (a fused call's 4 instead of a gated residual's 3 and a norm's 2). The PyTorch layers
        run each block's own forward."""
        if self.torch_layers:
            for block in self.blocks:
                tokens = block(tokens, c_act, rope)
            return self.final_layer(tokens, c_act)
        final = self.final_layer
        mods = [block.modulation(c_act).chunk(6, dim=1) for block in self.blocks]
        final_shift, final_scale = final.modulation(c_act).chunk(2, dim=1)
        # (shift, scale, eps) of the norm that opens each block, then of the final layer's.
        norms = [(m[0], m[1], block.eps) for m, block in zip(mods, self.blocks)] + [
            (final_shift, final_scale, final.eps)
        ]
        shift, scale, eps = norms[0]
        first = self.blocks[0] if len(self.blocks) else final
        n = ops.layer_norm_modulate(tokens, shift=shift, scale=scale, eps=eps, backend=first.backend)
        for block, block_mods, next_norm in zip(self.blocks, mods, norms[1:]):
            tokens, n = block.forward_fused(tokens, n, block_mods, rope, next_norm)
        return final.linear(n)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Model output for noisy x at timestep t (the UNet's call).

        Args:
            x: (B, in_channels, H, W), H and W divisible by patch_size (with learned positions:
                H = W = sample_size); float32, float16, bfloat16 or float64, the parameters' dtype
                (float32, float16 or bfloat16 under torch.autocast; otherwise a TypeError names both).
            t: timesteps on the training scale ([0, num_train_timesteps), fractional allowed),
                a number, or a 0-d, (1,) or (B,) tensor (one value broadcast over the batch). A float64
                model embeds them in float64.
            labels: (B,) int class labels in [0, num_classes] (on any device); num_classes is the null label;
                None: all null (must be None when num_classes = 0).

        Returns (B, out_channels, H, W) in x's dtype (under torch.autocast: the autocast dtype).
        """
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, H, W), got shape {tuple(x.shape)}")
        check_input_dtype("x", x, self.patch_embed.weight.dtype)
        rows, cols = cfg.grid_size(x.shape[2], x.shape[3])
        b, p = x.shape[0], cfg.patch_size
        t = _timesteps(t, b, x.device, x.dtype)
        c_act = F.silu(self.condition(t, labels, x.dtype))

        # (B, dim, rows, cols) -> (B, L, dim), made contiguous once: every op reads whole token rows.
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2).contiguous()
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed
        rope = self.rope_tables(rows, cols, x.device, x.dtype) if cfg.positions == "rope" else None
        out = self._blocks_and_final(tokens, c_act, rope)  # (B, L, p * p * out_channels), channels fastest
        out = out.view(b, rows, cols, p, p, cfg.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, cfg.out_channels, rows * p, cols * p)
