"""A StyleGAN2-style generator and a residual discriminator on genkernels layers, and their losses.

Generator (resolution R = 2 ** L, ch(r) = min(channel_base // r, channel_max) channels at r x r):

    mapping:    w = fc_{m-1}(... fc_0(z / sqrt(mean(z^2) + 1e-8)))    equalized-lr FC layers with the
                learning-rate multiplier mapping_lr_mul, each bias + lrelu one genkernels.ops.bias_act;
                w_avg tracks the mean w (EMA, beta 0.995, updated by calls in training mode, or as
                update_w_avg says: train_gan moves it once per step, in the D phase, as StyleGAN3 does);
                truncation: w' = w_avg + psi (w - w_avg) for the first ``truncation_cutoff`` layers (all: None)
    synthesis:  x = const (ch(4), 4, 4), rgb = 0
                block r = 4, 8, ..., R:  x = conv1(conv0(x, ws[2b]), ws[2b + 1])   conv0 upsamples 2x (not at 4x4)
                                         rgb = up2x(rgb) + torgb(x, ws[2b + 2])   (up2x: none at 4x4)
                with conv0 / conv1 genkernels.nn.ModulatedConv2d 3x3 (demodulated, noise, lrelu) and torgb a
                1x1 ModulatedConv2d (no demodulation, no noise, linear). up2x is bilinear. num_ws = 2 L - 1:
                the toRGB of block b shares its w with conv0 of block b + 1 (as StyleGAN2's blocks do).
    output:     rgb (N, img_channels, R, R), about [-1, 1] (no final squashing, as StyleGAN2).
    layout:     on CUDA both networks run channels_last (the generator's images come back channels_last),
                elsewhere contiguous: the same values either way.

Discriminator (ResNet, StyleGAN2's "resnet" architecture):

    x = lrelu(fromrgb(img))                                   1x1 conv img_channels -> ch(R)
    block r = R, R / 2, ..., 8:   y = down(conv1(conv0(x))),   skip = conv1x1(down(x))  (no bias, linear)
                                  x = (y + skip) / sqrt(2)      conv 3x3 + lrelu; down = 2x2 average pooling,
                                                                 taken before conv1's bias + lrelu
    epilogue at 4x4:  mbstd (1 feature map: the std over groups of mbstd_group samples, averaged over
                      channels and pixels) -> conv 3x3 (ch(4) + 1 -> ch(4)) -> fc (ch(4) * 16 -> ch(4)) -> out (1)

Every conv and FC has an equalized learning rate (weights N(0, 1), scaled 1 / sqrt(fan-in) at run time);
every bias + activation is one ``genkernels.ops.bias_act`` call (so the R1 penalty's double backward
runs through the fused op). ``torch_layers=True`` builds either network in plain eager PyTorch (same
function, same parameter names).

Losses (non-saturating logistic, :func:`generator_loss`, :func:`discriminator_loss`), the lazy R1 penalty
(:func:`r1_penalty`) and the EMA of the generator's weights (:func:`update_ema`) are below.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._checks import check_backend as _check_backend
from .._checks import is_finite_real, is_integer, is_real
from .._checks import positive_int as _positive_int
from ..nn.modconv import NOISE_MODES, EqualizedLinear, ModulatedConv2d
from ..ops import bias_act
from ..ops.bias_act import DEFAULT_ALPHA, DEFAULT_GAIN, _act
from ._config import ConfigIO

MIN_RESOLUTION, MAX_RESOLUTION = 8, 256
W_AVG_BETA = 0.995


def _number(name: str, value, low: float, high: float = math.inf, *, open_low: bool = False) -> float:
    ok = is_finite_real(value) and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if open_low else '>='} {low}" + ("" if high == math.inf else f" and <= {high}")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


@dataclass
class GANConfig(ConfigIO):
    """Sizes and training constants of a :class:`Generator` / :class:`Discriminator` pair.

    Presets: :meth:`tiny` (tests), :meth:`digits` (grey 16x16 digits, trains on a CPU in minutes),
    :meth:`stylegan2` (StyleGAN2 config-f-like sizes).

    Args:
        resolution: output size R (R x R), a power of 2 in [8, 256].
        img_channels: image channels (1 grey, 3 RGB).
        z_dim, w_dim: sizes of the input latent z and the intermediate latent w.
        mapping_layers: FC layers of the mapping network (>= 1).
        channel_base, channel_max: ch(r) = min(channel_base // r, channel_max) channels at r x r (>= 1).
        mapping_lr_mul: learning-rate multiplier of the mapping network (StyleGAN's 0.01).
        conv_clamp: clamp every synthesis conv output to [-conv_clamp, conv_clamp] (None: no clamp).
        r1_gamma: weight of the R1 penalty gamma / 2 * ||grad_x D(x)||^2 (>= 0).
        r1_interval: lazy regularization: the R1 step runs every this many D steps, scaled by it.
        ema_beta: decay of the generator's weight EMA (G_ema), in [0, 1).
        mbstd_group: group size of the minibatch standard deviation layer (the largest divisor of the
            batch up to it is used).
    """

    resolution: int = 32
    img_channels: int = 3
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    channel_base: int = 32768
    channel_max: int = 512
    mapping_lr_mul: float = 0.01
    conv_clamp: float | None = None
    r1_gamma: float = 10.0
    r1_interval: int = 16
    ema_beta: float = 0.999
    mbstd_group: int = 4

    def __post_init__(self) -> None:
        res = self.resolution
        if not is_integer(res) or not MIN_RESOLUTION <= res <= MAX_RESOLUTION or res & (res - 1):
            raise ValueError(
                f"resolution must be a power of 2 from {MIN_RESOLUTION} to {MAX_RESOLUTION} "
                f"(8, 16, 32, 64, 128, 256), got {res!r}"
            )
        self.resolution = int(res)
        for name in ("img_channels", "z_dim", "w_dim", "mapping_layers", "channel_base", "channel_max"):
            setattr(self, name, _positive_int(name, getattr(self, name)))
        self.r1_interval = _positive_int("r1_interval", self.r1_interval)
        self.mbstd_group = _positive_int("mbstd_group", self.mbstd_group)
        self.mapping_lr_mul = _number("mapping_lr_mul", self.mapping_lr_mul, 0.0, open_low=True)
        if self.conv_clamp is not None:
            self.conv_clamp = _number("conv_clamp", self.conv_clamp, 0.0, open_low=True)
        self.r1_gamma = _number("r1_gamma", self.r1_gamma, 0.0)
        self.ema_beta = _number("ema_beta", self.ema_beta, 0.0, 1.0)
        if self.ema_beta == 1.0:
            raise ValueError("ema_beta must be in [0, 1) (1 would never update G_ema), got 1.0")

    @property
    def resolutions(self) -> list[int]:
        """The block resolutions of the generator: 4, 8, ..., resolution."""
        return [2**i for i in range(2, int(math.log2(self.resolution)) + 1)]

    @property
    def num_ws(self) -> int:
        """How many w vectors the synthesis network takes: two convs per block plus the last toRGB."""
        return 2 * len(self.resolutions) + 1

    def channels(self, res: int) -> int:
        """ch(res) = min(channel_base // res, channel_max), at least 1."""
        return max(1, min(self.channel_base // res, self.channel_max))

    @classmethod
    def tiny(cls, resolution: int = 8, **overrides) -> GANConfig:
        """A few thousand parameters: tests."""
        base = dict(img_channels=1, z_dim=8, w_dim=8, mapping_layers=2, channel_base=64, channel_max=8, r1_gamma=0.1)
        return cls(resolution=resolution, **{**base, **overrides})

    @classmethod
    def digits(cls, resolution: int = 16, **overrides) -> GANConfig:
        """Grey digits at 16x16 (or 32x32): 64 channels down to 32, z = w = 64, 2 mapping layers."""
        base = dict(
            img_channels=1,
            z_dim=64,
            w_dim=64,
            mapping_layers=2,
            channel_base=512,
            channel_max=64,
            r1_gamma=0.05,
            r1_interval=16,
            ema_beta=0.99,
        )
        return cls(resolution=resolution, **{**base, **overrides})

    @classmethod
    def stylegan2(cls, resolution: int = 256, **overrides) -> GANConfig:
        """StyleGAN2 config-f-like: ch = min(32768 / r, 512), z = w = 512, 8 mapping layers, RGB."""
        base = dict(img_channels=3, z_dim=512, w_dim=512, mapping_layers=8, channel_base=32768, channel_max=512)
        return cls(resolution=resolution, **{**base, **overrides})


def _as_config(config) -> GANConfig:
    if config is None:
        return GANConfig()
    if isinstance(config, GANConfig):
        return config
    return GANConfig.from_dict(config)


def _pin_backend(model: torch.nn.Module, backend: str | None) -> None:
    _check_backend(backend)
    for m in model.modules():
        if hasattr(m, "backend") and m is not model:
            m.backend = backend
    model.backend = backend


def _layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last on CUDA (cuDNN's fast convolution layout), contiguous elsewhere."""
    return torch.channels_last if x.is_cuda else torch.contiguous_format


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x / sqrt(mean(x^2 over dim 1) + eps): pixel norm of the latent z (N, z_dim)."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


# --------------------------------------------------------------------------- generator


class MappingNetwork(torch.nn.Module):
    """z (N, z_dim) -> ws (N, num_ws, w_dim): pixel norm, ``mapping_layers`` lrelu FC layers, truncation.

    Buffer ``w_avg`` (w_dim,): the running mean of w, w_avg <- lerp(mean_n w, w_avg, 0.995) at every call in
    training mode (or as ``update_w_avg`` says); the truncation trick pulls w towards it. It stays float32 when
    the module is converted to float16 or bfloat16.
    """

    def __init__(self, config: GANConfig, torch_layers: bool = False, backend: str | None = None) -> None:
        super().__init__()
        self.num_ws, self.z_dim = config.num_ws, config.z_dim
        dims = [config.z_dim] + [config.w_dim] * config.mapping_layers
        self.fcs = torch.nn.ModuleList(
            EqualizedLinear(
                dims[i],
                dims[i + 1],
                act="lrelu",
                lr_mul=config.mapping_lr_mul,
                torch_layers=torch_layers,
                backend=backend,
            )
            for i in range(config.mapping_layers)
        )
        self.register_buffer("w_avg", torch.zeros(config.w_dim))

    def _apply(self, fn, recurse: bool = True):
        """Module conversions, except that w_avg stays in float32 (or float64) when the module goes to float16 or
        bfloat16: a 0.005 EMA step is below their rounding, so a half-precision w_avg would stop moving."""
        before = self.w_avg
        super()._apply(fn, recurse)
        if self.w_avg.dtype in (torch.float16, torch.bfloat16) and before.dtype not in (torch.float16, torch.bfloat16):
            self.w_avg = before.to(self.w_avg.device)
        return self

    def forward(
        self,
        z: torch.Tensor,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        *,
        update_w_avg: bool | None = None,
    ) -> torch.Tensor:
        """ws (N, num_ws, w_dim) in z's dtype: the same w for every layer, truncated for the first
        ``truncation_cutoff`` (None: all) as w_avg + psi (w - w_avg); psi a finite number or a one-element
        tensor (not checked for NaN: that would read it on the host).

        update_w_avg: move w_avg towards this batch's mean w before truncating (True), leave it (False), or
        do so in training mode only (None). A training step whose generator runs twice (D and G phases)
        updates it in one of them, or w_avg would decay twice as fast.
        """
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must be (N, z_dim) = (N, {self.z_dim}), got {tuple(z.shape)}")
        if not z.is_floating_point():
            raise TypeError(f"z must be a floating-point tensor, got {z.dtype}")
        if update_w_avg is None:
            update_w_avg = self.training
        elif not isinstance(update_w_avg, bool):
            raise TypeError(f"update_w_avg must be None, True or False, got {update_w_avg!r}")
        if isinstance(truncation_psi, torch.Tensor):
            if truncation_psi.numel() != 1:  # several values broadcast along w's features, or fail on bool()
                raise ValueError(
                    "truncation_psi must be a finite number or a one-element tensor, got a tensor of shape "
                    f"{tuple(truncation_psi.shape)}"
                )
            truncation_psi = truncation_psi.reshape(())
        else:
            # NaN / inf would make every image NaN, silently. psi - psi is 0 exactly when psi is finite; unlike
            # math.isfinite, torch.compile can trace it when it holds psi as a symbol (a psi that changed since
            # the first compiled call).
            if not (is_real(truncation_psi) and truncation_psi - truncation_psi == 0):
                raise ValueError(f"truncation_psi must be a finite number, got {truncation_psi!r}")
            truncation_psi = float(truncation_psi)
        if truncation_cutoff is not None:
            if not is_integer(truncation_cutoff) or truncation_cutoff < 0:
                raise ValueError(
                    f"truncation_cutoff must be None or an int >= 0 (layers to truncate), got {truncation_cutoff!r}"
                )
            truncation_cutoff = int(truncation_cutoff)
        x = normalize_2nd_moment(z)
        for fc in self.fcs:
            x = fc(x)
        if update_w_avg and x.shape[0] > 0:  # the mean of no w is NaN: an empty batch leaves w_avg as it is
            with torch.no_grad():
                self.w_avg.copy_(x.detach().to(self.w_avg.dtype).mean(dim=0).lerp(self.w_avg, W_AVG_BETA))
        ws = x[:, None, :].repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            avg = self.w_avg.to(ws.dtype)
            ws[:, :cutoff] = avg.lerp(ws[:, :cutoff], truncation_psi)
        return ws


class SynthesisBlock(torch.nn.Module):
    """One resolution of the synthesis network: two modulated 3x3 convs (the first upsamples, except at 4x4)
    and a toRGB whose output is added to the upsampled RGB of the blocks before."""

    def __init__(self, config: GANConfig, res: int, torch_layers: bool, grouped: bool, backend: str | None) -> None:
        super().__init__()
        self.res = res
        cin = config.channels(max(res // 2, 4))
        cout = config.channels(res)
        common = dict(
            resolution=res, conv_clamp=config.conv_clamp, torch_layers=torch_layers, grouped=grouped, backend=backend
        )
        if res == 4:
            self.const = torch.nn.Parameter(torch.randn(cout, 4, 4))
        self.conv0 = ModulatedConv2d(cin, cout, 3, config.w_dim, up=res > 4, **common)
        self.conv1 = ModulatedConv2d(cout, cout, 3, config.w_dim, **common)
        self.torgb = ModulatedConv2d(
            cout,
            config.img_channels,
            1,
            config.w_dim,
            demodulate=False,
            act="linear",
            use_noise=False,
            torch_layers=torch_layers,
            grouped=grouped,
            backend=backend,
        )

    def forward(self, x, rgb, ws: torch.Tensor, noise_mode: str):
        """(x, rgb) of this block from the previous block's (None, None at 4x4); ws (N, 3, w_dim)."""
        if self.res == 4:
            x = self.const.to(ws.dtype)[None].expand(ws.shape[0], -1, -1, -1)
            # On CUDA the network runs channels_last (cuDNN's fast convolution layout for fp16 / bf16, and
            # what torch.compile picks): the modulation, upsampling and fused epilogue all keep the layout.
            x = x.contiguous(memory_format=_layout(x))
        x = self.conv0(x, ws[:, 0], noise_mode)
        x = self.conv1(x, ws[:, 1], noise_mode)
        y = self.torgb(x, ws[:, 2])
        if rgb is not None:
            y = y + F.interpolate(rgb, scale_factor=2.0, mode="bilinear", align_corners=False)
        return x, y


class SynthesisNetwork(torch.nn.Module):
    """ws (N, num_ws, w_dim) -> images (N, img_channels, R, R); see the module doc."""

    def __init__(
        self, config: GANConfig, torch_layers: bool = False, grouped: bool = False, backend: str | None = None
    ) -> None:
        super().__init__()
        self.num_ws = config.num_ws
        self.blocks = torch.nn.ModuleList(
            SynthesisBlock(config, res, torch_layers, grouped, backend) for res in config.resolutions
        )

    def forward(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        """ws (N, num_ws, w_dim) -> images (N, img_channels, R, R) in ws's dtype; block b takes ws[:, 2b : 2b + 3].

        noise_mode: "random", "const" or "none" (see :meth:`Generator.forward`).
        """
        if ws.dim() != 3 or ws.shape[1] != self.num_ws:
            raise ValueError(f"ws must be (N, {self.num_ws}, w_dim), got {tuple(ws.shape)}")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        x = rgb = None
        for i, block in enumerate(self.blocks):
            x, rgb = block(x, rgb, ws[:, 2 * i : 2 * i + 3], noise_mode)
        return rgb


class Generator(torch.nn.Module):
    """StyleGAN2-style generator: z (N, z_dim) -> images (N, img_channels, R, R), about [-1, 1].

    Args:
        config: a :class:`GANConfig` (or a mapping of its fields; None: the defaults).
        torch_layers: the same network in plain eager PyTorch (same parameter names): the eager baseline.
        backend: backend of every fused op ("reference", "triton", "cuda"; None: the
            ``genkernels.backend(...)`` scope or auto). Change it with :meth:`set_backend`.
        grouped: modulated convs as one grouped convolution per layer (StyleGAN2's inference path); the
            same function.

    Sub-modules ``mapping`` (:class:`MappingNetwork`) and ``synthesis`` (:class:`SynthesisNetwork`).
    """

    def __init__(
        self,
        config: GANConfig | Mapping | None = None,
        torch_layers: bool = False,
        backend: str | None = None,
        *,
        grouped: bool = False,
    ) -> None:
        super().__init__()
        self.config = _as_config(config)
        self.torch_layers = bool(torch_layers)
        self.backend = _check_backend(backend)
        self.mapping = MappingNetwork(self.config, torch_layers, backend)
        self.synthesis = SynthesisNetwork(self.config, torch_layers, grouped, backend)

    def set_backend(self, backend: str | None) -> Generator:
        """Pin every fused op of the generator to ``backend`` (None: scope / auto); returns self."""
        _pin_backend(self, backend)
        return self

    def forward(
        self,
        z: torch.Tensor,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        noise_mode: str = "random",
        *,
        update_w_avg: bool | None = None,
    ) -> torch.Tensor:
        """images = synthesis(mapping(z, truncation_psi, truncation_cutoff, update_w_avg=...), noise_mode).

        z: (N, z_dim) float; returns (N, img_channels, R, R) in z's dtype. noise_mode: "random" (fresh
        torch.randn noise), "const" (each layer's fixed noise map: the same z gives the same image), "none".
        update_w_avg: see :meth:`MappingNetwork.forward` (None: in training mode).
        """
        ws = self.mapping(z, truncation_psi, truncation_cutoff, update_w_avg=update_w_avg)
        return self.synthesis(ws, noise_mode)


# --------------------------------------------------------------------------- discriminator


class EqualizedConv2d(torch.nn.Module):
    """y = act(down(conv2d(x, W / sqrt(I k k))) + b) * gain: an equalized-lr convolution, bias + activation
    in one ``bias_act`` (down: optional 2x2 average pooling before the bias). Weight (O, I, k, k) ~ N(0, 1)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        *,
        act: str = "lrelu",
        bias: bool = True,
        down: bool = False,
        torch_layers: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.act, self.down, self.torch_layers, self.backend = act, down, torch_layers, backend
        self.weight = torch.nn.Parameter(torch.randn(cout, cin, kernel_size, kernel_size))
        self.bias = torch.nn.Parameter(torch.zeros(cout)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(cin * kernel_size * kernel_size)
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, I, H, W) -> (N, O, H, W) ((N, O, H/2, W/2) with ``down``) in x's dtype:
        act(down(conv2d(x, W / sqrt(I k k))) + b) * gain."""
        y = F.conv2d(x, (self.weight * self.weight_gain).to(x.dtype), padding=self.padding)
        if self.down:
            y = F.avg_pool2d(y, 2)
        if self.bias is None and self.act == "linear":
            return y
        bias = None if self.bias is None else self.bias.to(y.dtype)
        if self.torch_layers:
            z = y if bias is None else y + bias[None, :, None, None]
            return _act(z, self.act, DEFAULT_ALPHA) * DEFAULT_GAIN.get(self.act, 1.0)
        return bias_act(y, bias, act=self.act, backend=self.backend)


class DiscriminatorBlock(torch.nn.Module):
    """(x + skip) / sqrt(2) at half the resolution: x = down(conv1(conv0(x))), skip = conv1x1(down(x))."""

    def __init__(self, cin: int, cout: int, torch_layers: bool, backend: str | None) -> None:
        super().__init__()
        kw = dict(torch_layers=torch_layers, backend=backend)
        self.conv0 = EqualizedConv2d(cin, cin, 3, **kw)
        self.conv1 = EqualizedConv2d(cin, cout, 3, down=True, **kw)
        self.skip = EqualizedConv2d(cin, cout, 1, act="linear", bias=False, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, cin, H, W) -> (N, cout, H/2, W/2): (down(conv1(conv0(x))) + conv1x1(down(x))) / sqrt(2)."""
        skip = self.skip(F.avg_pool2d(x, 2))
        return (self.conv1(self.conv0(x)) + skip) * (1.0 / math.sqrt(2.0))


def minibatch_stddev(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (N, C, H, W) with one more channel: the standard deviation of each feature over a group of G samples
    (G the largest divisor of N up to group_size; sample n is in group n mod (N / G)), averaged over
    channels and pixels, broadcast over the group's samples and the pixels. Computed in float32.
    group_size: a positive int (ValueError otherwise)."""
    group_size = _positive_int("group_size", group_size)
    n, c, h, w = x.shape
    if n == 0:
        return torch.cat([x, x[:, :1]], dim=1)  # no samples: no statistics, the extra channel is empty too
    g = max(d for d in range(1, min(group_size, n) + 1) if n % d == 0)
    y = x.float().reshape(g, n // g, c, h, w)
    y = (y - y.mean(dim=0)).square().mean(dim=0)  # (N / G, C, H, W) variance over the group
    y = (y + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (N / G,)
    y = y.reshape(1, n // g, 1, 1, 1).expand(g, -1, 1, h, w).reshape(n, 1, h, w)
    return torch.cat([x, y.to(x.dtype)], dim=1)


class Discriminator(torch.nn.Module):
    """ResNet discriminator: images (N, img_channels, R, R) -> logits (N, 1); see the module doc.

    Args: as :class:`Generator` (config, torch_layers, backend).
    """

    def __init__(
        self, config: GANConfig | Mapping | None = None, torch_layers: bool = False, backend: str | None = None
    ) -> None:
        super().__init__()
        self.config = cfg = _as_config(config)
        self.torch_layers = bool(torch_layers)
        self.backend = _check_backend(backend)
        kw = dict(torch_layers=torch_layers, backend=backend)
        res = cfg.resolution
        self.fromrgb = EqualizedConv2d(cfg.img_channels, cfg.channels(res), 1, **kw)
        self.blocks = torch.nn.ModuleList(
            DiscriminatorBlock(cfg.channels(r), cfg.channels(r // 2), torch_layers, backend)
            for r in reversed(cfg.resolutions[1:])
        )
        c4 = cfg.channels(4)
        self.conv = EqualizedConv2d(c4 + 1, c4, 3, **kw)
        self.fc = EqualizedLinear(c4 * 16, c4, act="lrelu", **kw)
        self.out = EqualizedLinear(c4, 1, **kw)

    def set_backend(self, backend: str | None) -> Discriminator:
        """Pin every fused op of the discriminator to ``backend`` (None: scope / auto); returns self."""
        _pin_backend(self, backend)
        return self

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """logits (N, 1) in img's dtype; img (N, img_channels, R, R) (N >= 1)."""
        cfg = self.config
        shape = (cfg.img_channels, cfg.resolution, cfg.resolution)
        if img.dim() != 4 or tuple(img.shape[1:]) != shape:
            raise ValueError(f"img must be (N, {', '.join(map(str, shape))}), got {tuple(img.shape)}")
        x = self.fromrgb(img.contiguous(memory_format=_layout(img)))
        for block in self.blocks:
            x = block(x)
        x = self.conv(minibatch_stddev(x, cfg.mbstd_group))
        return self.out(self.fc(x.flatten(1)))


# --------------------------------------------------------------------------- losses, R1, EMA


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic loss of G: mean softplus(-D(G(z))), float32 0-d."""
    return F.softplus(-fake_logits.float()).mean()


def discriminator_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """Logistic loss of D: mean softplus(D(G(z))) + mean softplus(-D(x)), float32 0-d."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def r1_penalty(discriminator: torch.nn.Module, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||grad_x D(x)||^2 per sample (N,) float32, the logits D(x) (N, 1)), differentiable (create_graph).

    The R1 loss of a lazy step is ``gamma / 2 * penalty.mean() * r1_interval``; its backward is a double
    backward through D (the fused bias_act ops included).
    """
    real = real.detach().requires_grad_(True)
    logits = discriminator(real)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.float().square().flatten(1).sum(dim=1), logits


def r1_loss(discriminator: torch.nn.Module, real: torch.Tensor, gamma: float, interval: int = 1) -> torch.Tensor:
    """The lazy R1 regularizer: gamma / 2 * mean_n ||grad_x D(x_n)||^2 * interval (float32 0-d); gamma a finite
    number >= 0, interval a positive int (ValueError otherwise)."""
    gamma = _number("gamma", gamma, 0.0)
    interval = _positive_int("interval", interval)
    penalty, _ = r1_penalty(discriminator, real)
    return penalty.mean() * (gamma / 2 * interval)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * model for every parameter; buffers (w_avg, noise maps) are copied.
    beta in [0, 1]; ema and model must have the same parameters and buffers (names and shapes)."""
    if not (is_real(beta) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    beta = float(beta)
    pairs = {"parameters": (list(ema.parameters()), list(model.parameters()))}
    pairs["buffers"] = (list(ema.buffers()), list(model.buffers()))
    for kind, (ours, theirs) in pairs.items():  # checked before anything is written (a step's cost: shapes only)
        if len(ours) != len(theirs) or any(a.shape != b.shape for a, b in zip(ours, theirs)):
            raise ValueError(
                f"ema and model must have the same {kind}: {len(ours)} vs {len(theirs)} tensors, or shapes differ"
            )
    for p_ema, p in zip(*pairs["parameters"]):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - beta)
    for b_ema, b in zip(*pairs["buffers"]):
        b_ema.copy_(b)


def ema_copy(generator: Generator) -> Generator:
    """A frozen copy of ``generator`` (eval mode, no gradients) to track with :func:`update_ema`."""
    ema = copy.deepcopy(generator).eval()
    ema.requires_grad_(False)
    return ema
