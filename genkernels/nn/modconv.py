"""StyleGAN2's modulated convolution on the fused modconv ops, and the equalized-learning-rate linear layer.

:class:`ModulatedConv2d` computes, for x (N, I, H, W) and a latent w (N, w_dim):

    s        = affine(w)                                   styles (N, I), bias initialized to 1
    W'       = weight / sqrt(I * k * k)                    equalized learning rate: weight ~ N(0, 1)
    dcoef    = rsqrt(sum_{i,k} (W'[o,i,k] s[n,i])^2 + 1e-8)   (N, O), only with demodulate
    y        = conv2d(up(x * s), W')                       up: 2x bilinear upsampling when up=True
    out      = clamp(act(y * dcoef + noise * noise_strength + bias) * gain)

which is conv2d(x, W' * s * dcoef) per sample (StyleGAN2's modulated convolution), computed with one
convolution shared by the whole batch: the modulation moves onto the input channels (x * s) and the
demodulation onto the output channels (y * dcoef), and the epilogue (demodulation, noise, bias,
activation, gain, clamp) is one ``genkernels.ops.modconv_epilogue`` pass over y. The coefficients come
from ``genkernels.ops.demodulation_coefficients`` (one fused reduction, no (N, O, I, k, k) tensor).

As in StyleGAN2-ADA, the styles are computed in float32 (float64 for float64 x) whatever x's dtype, and a
float16 convolution with demodulation runs on styles and weight pre-scaled by powers of two (the scale goes
into dcoef), so that x * s stays within float16's range: the same function, without overflow.

``up=True`` upsamples x 2x bilinearly (align_corners=False) before the convolution; StyleGAN2 uses a
transposed convolution with a FIR filter instead, which is a different (sharper) resampling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import check_backend as _check_backend
from .._checks import is_finite_real
from .._checks import positive_int as _positive_int
from ..ops import bias_act, demodulation_coefficients, modconv_epilogue
from ..ops.bias_act import ACTS, DEFAULT_ALPHA, DEFAULT_GAIN, _act

NOISE_MODES = ("random", "const", "none")
DEMOD_EPS = 1e-8


def _power_of_two_above(m: torch.Tensor) -> torch.Tensor:
    """2^e > m elementwise for finite m > 0 (1 for 0, inf or NaN), in float32: an exact divisor."""
    return torch.exp2(torch.frexp(m.float()).exponent.float())


def _convolves_in_float16(x: torch.Tensor) -> bool:
    """Whether F.conv2d runs on float16 for this x: x is float16, or float32 under a float16 autocast of its
    device (which casts the convolution's inputs)."""
    if x.dtype == torch.float16:
        return True
    device = x.device.type
    return (
        x.dtype == torch.float32
        and device in ("cpu", "cuda")
        and torch.is_autocast_enabled(device)
        and torch.get_autocast_dtype(device) == torch.float16
    )


class EqualizedLinear(torch.nn.Module):
    """A fully connected layer with an equalized learning rate: y = act(x @ (W * g).T + b * lr_mul) * gain.

    W (out, in) is stored as N(0, 1) / lr_mul and scaled at run time by g = lr_mul / sqrt(in), so every
    weight learns at the same rate whatever the fan-in (and ``lr_mul`` times slower than the optimizer's
    rate: StyleGAN's mapping network uses 0.01). The bias is stored as ``bias_init / lr_mul``.

    Args:
        in_features, out_features: sizes.
        act: "linear" (a plain affine map) or any activation of ``genkernels.ops.bias_act``; with an
            activation the bias and activation run as one ``bias_act`` call (default gain sqrt(2) for lrelu).
        bias_init: the bias's initial value (1 for StyleGAN's style affines).
        lr_mul: learning-rate multiplier (> 0).
        torch_layers: run bias and activation in plain eager PyTorch (same function and parameter names).
        backend: backend of ``bias_act`` (None: the ``genkernels.backend(...)`` scope or auto).

    x: (..., in_features) float (as F.linear takes it); returns (..., out_features) in x's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        act: str = "linear",
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        torch_layers: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        in_features = _positive_int("in_features", in_features)
        out_features = _positive_int("out_features", out_features)
        if act not in ACTS:
            raise ValueError(f"act must be one of {ACTS}, got {act!r}")
        if not (is_finite_real(lr_mul) and lr_mul > 0):
            raise ValueError(f"lr_mul must be a finite number > 0, got {lr_mul!r}")
        if not is_finite_real(bias_init):
            raise ValueError(f"bias_init must be a finite number, got {bias_init!r}")
        lr_mul = float(lr_mul)
        self.act, self.lr_mul, self.torch_layers = act, lr_mul, bool(torch_layers)
        self.backend = _check_backend(backend)
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = torch.nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul))
        self.weight_gain = lr_mul / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in x's dtype: act(x @ (W * g).T + b * lr_mul) * gain."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"x must be a floating-point tensor, got {got}")
        if x.dim() == 0 or x.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"x must be (..., {self.weight.shape[1]}) (in_features last), got {tuple(x.shape)}")
        weight = (self.weight * self.weight_gain).to(x.dtype)
        bias = (self.bias * self.lr_mul).to(x.dtype)
        if self.act == "linear":
            return F.linear(x, weight, bias)
        y = F.linear(x, weight)
        if self.torch_layers:
            return _act(y + bias, self.act, DEFAULT_ALPHA) * DEFAULT_GAIN.get(self.act, 1.0)
        return bias_act(y, bias, act=self.act, dim=-1, backend=self.backend)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, act={self.act}, lr_mul={self.lr_mul:g}"


class ModulatedConv2d(torch.nn.Module):
    """StyleGAN2's modulated convolution (see the module doc for the formula), a drop-in layer.

    Args:
        in_channels (I), out_channels (O): channels.
        kernel_size (k): odd; the convolution pads k // 2 ("same" size).
        w_dim: size of the latent w the styles are computed from.
        demodulate: divide each output channel by the norm of its modulated weight (StyleGAN2's
            synthesis layers); False for toRGB layers.
        up: upsample x 2x (bilinear) before the convolution: out is (N, O, 2H, 2W).
        act: the activation, any of ``genkernels.ops.bias_act``'s (lrelu: alpha 0.2, gain sqrt(2);
            linear: gain 1).
        use_noise: add per-pixel noise (N, 1, H_out, W_out) scaled by the learned ``noise_strength``
            (initialized to 0).
        resolution: H_out = W_out of the output; with use_noise, a fixed noise map ``noise_const``
            (1, 1, res, res) is kept as a buffer for ``noise_mode="const"``.
        conv_clamp: clamp the output to [-conv_clamp, conv_clamp] (None: no clamp).
        grouped: compute it as StyleGAN2's inference path does: per-sample weights W' * s * dcoef and one
            grouped convolution (groups = N), then the epilogue without dcoef. The same function (an empty
            batch takes the shared convolution).
        torch_layers: the same function in plain eager PyTorch (materialized modulated weight for dcoef,
            x * s, conv, y * dcoef + noise * strength, + bias, activation, gain, clamp), with the same
            parameter names: the eager baseline of the benchmarks.
        backend: backend of the fused ops (None: the ``genkernels.backend(...)`` scope or auto).

    Parameters: ``affine`` (:class:`EqualizedLinear` w_dim -> I, bias 1), ``weight`` (O, I, k, k) ~ N(0, 1),
    ``bias`` (O,) zeros, ``noise_strength`` () zero when use_noise; buffer ``noise_const`` (1, 1, res, res)
    when use_noise and resolution is given.

    A StyleGAN2 toRGB layer is ``ModulatedConv2d(C, img_channels, 1, w_dim, demodulate=False,
    act="linear", use_noise=False)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        w_dim: int,
        *,
        demodulate: bool = True,
        up: bool = False,
        act: str = "lrelu",
        use_noise: bool = True,
        resolution: int | None = None,
        conv_clamp: float | None = None,
        grouped: bool = False,
        torch_layers: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        in_channels, out_channels, kernel_size, w_dim = (
            _positive_int(name, value)
            for name, value in (
                ("in_channels", in_channels),
                ("out_channels", out_channels),
                ("kernel_size", kernel_size),
                ("w_dim", w_dim),
            )
        )
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the convolution keeps the size), got {kernel_size}")
        if act not in ACTS:
            raise ValueError(f"act must be one of {ACTS}, got {act!r}")
        if resolution is not None:
            resolution = _positive_int("resolution", resolution)
        if conv_clamp is not None and not (is_finite_real(conv_clamp) and conv_clamp > 0):
            raise ValueError(f"conv_clamp must be None or a finite number > 0, got {conv_clamp!r}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.demodulate, self.up, self.act = bool(demodulate), bool(up), act
        self.use_noise, self.resolution = bool(use_noise), resolution
        self.conv_clamp = None if conv_clamp is None else float(conv_clamp)
        self.grouped, self.torch_layers = bool(grouped), bool(torch_layers)
        self.backend = _check_backend(backend)
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0, torch_layers=torch_layers, backend=backend)
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = torch.nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        if self.use_noise:
            self.noise_strength = torch.nn.Parameter(torch.zeros(()))
            if resolution is not None:
                self.register_buffer("noise_const", torch.randn(1, 1, resolution, resolution))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, demodulate={self.demodulate}, "
            f"up={self.up}, act={self.act}, use_noise={self.use_noise}, resolution={self.resolution}"
        )

    def _noise(self, x: torch.Tensor, size: tuple[int, int], noise_mode: str) -> torch.Tensor | None:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if not self.use_noise or noise_mode == "none":
            return None
        if noise_mode == "random":
            return torch.randn(x.shape[0], 1, *size, device=x.device, dtype=x.dtype)
        if not hasattr(self, "noise_const"):
            raise ValueError("noise_mode='const' needs the layer's noise_const buffer: build it with resolution=")
        if tuple(self.noise_const.shape[-2:]) != size:
            raise ValueError(
                f"noise_mode='const': the output is {size[0]}x{size[1]} but noise_const is "
                f"{self.noise_const.shape[-2]}x{self.noise_const.shape[-1]} (resolution={self.resolution})"
            )
        return self.noise_const.to(x.dtype)

    def _check_inputs(self, x: torch.Tensor, w: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be (N, {self.in_channels}, H, W), got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        w_dim = self.affine.weight.shape[1]
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or tuple(w.shape) != (x.shape[0], w_dim):
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"w must be (N, w_dim) = ({x.shape[0]}, {w_dim}), got {shape}")
        if not w.is_floating_point():
            raise TypeError(f"w must be a floating-point tensor, got {w.dtype}")

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        """out (N, O, H_out, W_out) in x's dtype (H_out = 2H with up, else H) from x (N, I, H, W) and w (N, w_dim).

        noise_mode: "random" (fresh torch.randn (N, 1, H_out, W_out) on x's device), "const" (the layer's
        ``noise_const``), "none" (no noise). Layers without noise ignore it.
        """
        self._check_inputs(x, w)
        n = x.shape[0]
        # Styles in float32 (float64 for float64 x) whatever x's dtype, as StyleGAN2-ADA keeps them: their
        # gradient sums two large terms that cancel (the modulation's and the demodulation's).
        styles = self.affine(w.to(torch.promote_types(x.dtype, torch.float32)))  # (N, I)
        weight = self.weight * self.weight_gain
        size = (x.shape[2] * 2, x.shape[3] * 2) if self.up else (x.shape[2], x.shape[3])
        noise = self._noise(x, size, noise_mode)
        strength = self.noise_strength if noise is not None else None
        pad = self.kernel_size // 2
        if self.torch_layers:
            return self._eager(x, styles, weight, noise, strength, pad)
        dcoef = (
            demodulation_coefficients(weight, styles, eps=DEMOD_EPS, backend=self.backend) if self.demodulate else None
        )
        if self.grouped and n > 0:  # no samples, no groups: an empty batch takes the shared convolution
            wmod = weight[None] * styles[:, None, :, None, None]  # (N, O, I, k, k)
            if dcoef is not None:
                wmod = wmod * dcoef[:, :, None, None, None].to(wmod.dtype)
            xg = self._upsample(x.reshape(1, n * self.in_channels, *x.shape[2:]))
            wg = wmod.reshape(n * self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)
            y = F.conv2d(xg, wg.to(x.dtype), padding=pad, groups=n).reshape(n, self.out_channels, *size)
            dcoef = None
        else:
            styles, weight, scale = self._headroom(x, styles, weight)
            if scale is not None:
                dcoef = dcoef * scale
            xs = self._upsample(x * styles.to(x.dtype)[:, :, None, None])
            y = F.conv2d(xs, weight.to(x.dtype), padding=pad)
        return modconv_epilogue(
            y,
            dcoef,
            noise=noise,
            noise_strength=strength,
            bias=self.bias,
            act=self.act,
            clamp=self.conv_clamp,
            backend=self.backend,
        )

    def _headroom(self, x: torch.Tensor, styles: torch.Tensor, weight: torch.Tensor):
        """(styles, weight, scale) for the shared convolution. Where it runs in float16 (float16 x, or float32 x
        under a float16 autocast) with demodulation, StyleGAN2-ADA pre-normalizes weight and styles so that
        x * s and the convolution stay within float16's range; here the styles are divided by a power of two
        above each sample's max |s| and the weight by one above each output channel's max |self.weight|, and
        scale (N, O), the product of the two, multiplies dcoef. The same function: dcoef comes from the
        unscaled styles and weight, and a power of two divides exactly. Otherwise (styles, weight, None)."""
        if not self.demodulate or not _convolves_in_float16(x):
            return styles, weight, None
        s_scale = _power_of_two_above(styles.detach().abs().amax(1))  # (N,)
        w_scale = _power_of_two_above(self.weight.detach().abs().amax((1, 2, 3)))  # (O,)
        scale = s_scale[:, None] * w_scale[None, :]
        return styles / s_scale[:, None], weight / w_scale.to(weight.dtype)[:, None, None, None], scale

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False) if self.up else x

    def _eager(self, x, styles, weight, noise, strength, pad) -> torch.Tensor:
        """The torch_layers path: StyleGAN2's formulation, one eager PyTorch op at a time."""
        if self.demodulate:
            wmod = weight[None] * styles[:, None, :, None, None]  # (N, O, I, k, k)
            dcoef = (wmod.square().sum(dim=[2, 3, 4]) + DEMOD_EPS).rsqrt()
        styles, weight, scale = self._headroom(x, styles, weight)
        y = F.conv2d(self._upsample(x * styles.to(x.dtype)[:, :, None, None]), weight.to(x.dtype), padding=pad)
        if self.demodulate:
            dcoef = dcoef if scale is None else dcoef * scale
            y = y * dcoef[:, :, None, None].to(y.dtype)
        if noise is not None:
            y = y + noise * strength.to(y.dtype)
        y = y + self.bias.to(y.dtype)[None, :, None, None]
        y = _act(y, self.act, DEFAULT_ALPHA) * DEFAULT_GAIN.get(self.act, 1.0)
        if self.conv_clamp is not None:
            y = y.clamp(-self.conv_clamp, self.conv_clamp)
        return y
