"""Invertible layers of normalizing flows (Glow, RealNVP) on the fused coupling ops.

Every layer maps x to y and back and reports the log-determinant of its Jacobian:

    forward(x) -> (y, logdet)      logdet[n] = log |det dy_n / dx_n|
    inverse(y) -> (x, logdet)      logdet[n] = log |det dx_n / dy_n| = -(the forward's)

logdet is (N,) float32 (float64 for float64 inputs), accumulated in float32 whatever the input dtype.

- :class:`AffineCoupling`: y_a = x_a, y_b = x_b * s(x_a) + t(x_a) on ``genkernels.ops.affine_coupling``
  (x_a the first C // 2 channels), with Glow's convolutional conditioner or one of the user's.
- :class:`ActNorm`: y = (x + bias) * exp(log_scale) per channel on ``genkernels.ops.actnorm``, with
  Glow's data-dependent initialization.
- :class:`InvConv1x1`: y = W x per position, W an invertible C x C matrix in LU form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import check_backend as _check_backend
from .._checks import is_finite_real, is_real
from .._checks import positive_int as _positive_int
from ..ops import actnorm, affine_coupling
from ..ops.coupling import SCALES


def _logdet_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_input(name: str, x: torch.Tensor, channels: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[1] != channels:
        raise ValueError(f"{name} must be (N, C, *spatial) with C = {channels}, got shape {tuple(x.shape)}")


def zero_conv3x3(in_channels: int, out_channels: int) -> torch.nn.Conv2d:
    """A 3x3 convolution (padding 1) with zero weight and bias: it outputs zeros until trained, so the
    flow layer it feeds starts as (nearly) the identity and priors start as N(0, I)."""
    conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
    torch.nn.init.zeros_(conv.weight)
    torch.nn.init.zeros_(conv.bias)
    return conv


class AffineCoupling(torch.nn.Module):
    """Affine coupling: y_a = x_a, y_b = x_b * s + t with (log s, t) from a network of x_a.

    With Ca = C // 2 and Cb = C - Ca, x_a = x[:, :Ca] and x_b = x[:, Ca:]; the conditioner maps x_a
    (N, Ca, *spatial) to h (N, 2 * Cb, *spatial) (additive: (N, Cb, *spatial)), h[:, :Cb] the scale
    pre-activation h_s and h[:, Cb:] the shift t (additive: t = h). log s as a function of h_s:

        "exp":            h_s                        "sigmoid":        logsigmoid(h_s + 2)
        "softclamp_tanh": clamp * tanh(h_s / clamp)  "softclamp_atan": 0.636 * clamp * atan(h_s / clamp)
        "additive":       0

    logdet[n] = sum over b-channels and positions of log s. The inverse recomputes h from y_a = x_a:
    x_b = (y_b - t) * exp(-log s). Both directions run on ``genkernels.ops.affine_coupling``.

    Args:
        channels: C >= 2.
        hidden_channels: width of the default conditioner, Glow's: conv3x3 (Ca -> hidden) -> ReLU ->
            conv1x1 (hidden -> hidden) -> ReLU -> conv3x3 (hidden -> 2 * Cb), the last zero-initialized
            (inputs (N, C, H, W)). None when ``conditioner`` is given.
        scale: one of "exp", "sigmoid" (Glow's, the default), "softclamp_tanh", "softclamp_atan", "additive".
        clamp: bound of the soft-clamped scales (> 0).
        backend: backend of the op ("reference", "triton", "cuda"; None: the scope or auto).
        conditioner: a module of the user's mapping x_a (N, Ca, *spatial) to h (N, 2 * Cb or Cb, *spatial),
            instead of the default.

    x and y: (N, C, *spatial), contiguous or channels_last, float32, float16 or bfloat16 (float64 on the
    reference backend); y in x's dtype and layout.
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int | None = None,
        scale: str = "sigmoid",
        clamp: float = 2.0,
        backend: str | None = None,
        *,
        conditioner: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        channels = _positive_int("channels", channels)
        if channels < 2:
            raise ValueError(f"channels must be >= 2 (one half conditions the other), got {channels}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        if not (is_finite_real(clamp) and clamp > 0):
            raise ValueError(f"clamp must be a finite number > 0, got {clamp!r}")
        self.channels = channels
        self.scale = scale
        self.clamp = float(clamp)
        self.backend = _check_backend(backend)
        ca = channels // 2
        cb = channels - ca
        self.split = ca
        h_channels = cb if scale == "additive" else 2 * cb
        if conditioner is not None:
            if hidden_channels is not None:
                raise ValueError(
                    f"give hidden_channels (the default conditioner's width) or conditioner, not both; got "
                    f"hidden_channels={hidden_channels!r}"
                )
            if not isinstance(conditioner, torch.nn.Module):
                raise TypeError(f"conditioner must be a torch.nn.Module, got {type(conditioner).__name__}")
            self.net = conditioner
        else:
            if hidden_channels is None:
                raise ValueError("hidden_channels (the conditioner's width) is required when no conditioner is given")
            hidden_channels = _positive_int("hidden_channels", hidden_channels)
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(ca, hidden_channels, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.Conv2d(hidden_channels, hidden_channels, 1),
                torch.nn.ReLU(),
                zero_conv3x3(hidden_channels, h_channels),
            )
        self.h_channels = h_channels
        self._default_net = conditioner is None

    def _conditioner(self, name: str, x: torch.Tensor) -> torch.Tensor:
        # Conv2d reads a 3-D input as one unbatched image: (N, Ca, L) would mix the samples silently.
        if self._default_net and x.dim() != 4:
            raise ValueError(
                f"{name} must be (N, C, H, W) for the default conditioner (2-D convolutions), got shape "
                f"{tuple(x.shape)}; pass conditioner= for other shapes"
            )
        x_a = x[:, : self.split]
        h = self.net(x_a)
        if h.shape[0] != x_a.shape[0] or h.shape[1] != self.h_channels or h.shape[2:] != x_a.shape[2:]:
            raise ValueError(
                f"the conditioner must map x_a {tuple(x_a.shape)} to "
                f"{(x_a.shape[0], self.h_channels, *x_a.shape[2:])}, got {tuple(h.shape)}"
            )
        return h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C, *spatial) -> (y in x's dtype and layout, logdet (N,) = sum log s)."""
        _check_input("x", x, self.channels)
        h = self._conditioner("x", x)
        return affine_coupling(x, h, scale=self.scale, clamp=self.clamp, backend=self.backend)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y (N, C, *spatial) -> (x, logdet (N,) = -sum log s), undoing :meth:`forward`.

        A differentiated inverse (gradient enabled and y or the conditioner's parameters requiring it)
        runs on the reference op: auto picks it, a pinned fast backend raises UnsupportedError (wrap
        sampling in ``torch.no_grad()``)."""
        _check_input("y", y, self.channels)
        h = self._conditioner("y", y)
        return affine_coupling(y, h, scale=self.scale, clamp=self.clamp, reverse=True, backend=self.backend)

    def extra_repr(self) -> str:
        extra = "" if self.backend is None else f", backend={self.backend!r}"
        return f"channels={self.channels}, scale={self.scale!r}, clamp={self.clamp}{extra}"


class ActNorm(torch.nn.Module):
    """Per-channel affine normalization: y = (x + bias[c]) * exp(log_scale[c]).

    logdet[n] = S * sum_c log_scale[c], S the number of positions (product of the spatial sizes).
    Inverse: x = y * exp(-log_scale[c]) - bias[c]. Both directions run on ``genkernels.ops.actnorm``.

    Data-dependent initialization (Glow's): the first :meth:`forward` in training mode sets, from
    its batch and without gradient, bias = -mean and log_scale = -log(std + eps) per channel (the
    mean and biased std over the batch and positions, in float32), so that batch comes out with
    zero mean and unit variance per channel. A channel without spread in that batch (std <= eps: a
    batch of one value per channel, such as one image whose squeezed channels are 1x1, or a constant
    channel) keeps log_scale = 0 (scale 1) and is only centred (bias = -mean): Glow's 1 / (std + eps)
    would there be ~1 / eps, a scale of a million that sends bits/dim to ~1e21. The persistent buffer
    ``initialized`` records the initialization, so a loaded state_dict is not initialized again.
    Eval-mode calls, :meth:`inverse` and empty batches (N = 0 or a spatial size 0: no statistics, NaN
    parameters) never initialize; the next non-empty training batch does.

    Args:
        channels: C.
        eps: added to the std before the log; a std at most eps counts as no spread (scale 1, above).
        backend: backend of the op ("reference", "triton", "cuda"; None: the scope or auto).

    x: (N, C, *spatial) or (N, C), contiguous or channels_last, float32, float16 or bfloat16 (float64
    on the reference backend); y in x's dtype and layout. log_scale and bias are float32 (C,).
    """

    def __init__(self, channels: int, eps: float = 1e-6, backend: str | None = None) -> None:
        super().__init__()
        self.channels = channels = _positive_int("channels", channels)
        if not (is_real(eps) and eps > 0):
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        self.eps = float(eps)
        self.backend = _check_backend(backend)
        self.log_scale = torch.nn.Parameter(torch.zeros(channels))
        self.bias = torch.nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        # Reading the buffer is a host-device sync, so it is read once (until the next state_dict load).
        self._known_initialized = False

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = False

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set bias = -mean and log_scale = -log(std + eps) per channel from the batch x (N, C, *spatial),
        log_scale = 0 where std <= eps, and mark the layer initialized (what the first training-mode
        forward does). x must hold at least one value per channel (else a ValueError)."""
        _check_input("x", x, self.channels)
        if x.numel() == 0:
            raise ValueError(f"cannot initialize from an empty batch (x of shape {tuple(x.shape)})")
        dims = [0, *range(2, x.dim())]
        x32 = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        var, mean = torch.var_mean(x32, dim=dims, correction=0)
        std = var.sqrt()
        # Scale 1 rather than an error for a channel without spread: the batch tells nothing about its
        # scale, and the identity is the neutral start that training then adjusts (a batch of one image,
        # or a channel the data never varies, is a legitimate run); 1 / (std + eps) would be ~1 / eps
        # there, a huge scale that silently wrecks the likelihood. torch.where keeps every other channel
        # bit-for-bit Glow's value, with no host sync.
        self.bias.copy_(-mean)
        self.log_scale.copy_(torch.where(std <= self.eps, 0.0, -torch.log(std + self.eps)))
        self.initialized.fill_(True)
        self._known_initialized = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C, *spatial) -> (y, logdet (N,) = S * sum(log_scale)); initializes on the first
        non-empty training-mode call (see the class doc)."""
        _check_input("x", x, self.channels)
        if self.training and not self._known_initialized and x.numel() > 0:
            if not bool(self.initialized):
                self.initialize(x)
            self._known_initialized = True
        return actnorm(x, self.log_scale, self.bias, backend=self.backend)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y (N, C, *spatial) -> (x = y * exp(-log_scale) - bias, logdet (N,) = -S * sum(log_scale)).
        Differentiated, it runs on the reference op (as :meth:`AffineCoupling.inverse`)."""
        _check_input("y", y, self.channels)
        return actnorm(y, self.log_scale, self.bias, reverse=True, backend=self.backend)

    def extra_repr(self) -> str:
        extra = "" if self.backend is None else f", backend={self.backend!r}"
        return f"{self.channels}, eps={self.eps}{extra}"


def _mix_channels(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[n, i, s] = sum_j weight[i, j] x[n, j, s] for x (N, C) or (N, C, *spatial) with up to 3 spatial dims."""
    if x.dim() == 2:
        return F.linear(x, weight)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}.get(x.dim())
    if conv is None:
        raise ValueError(f"x must have 2 to 5 dims ((N, C) or (N, C, *spatial)), got shape {tuple(x.shape)}")
    return conv(x, weight.view(*weight.shape, *([1] * (x.dim() - 2))))


class InvConv1x1(torch.nn.Module):
    """Invertible 1x1 convolution (Glow): y[n, :, s] = W x[n, :, s] at every position s.

    logdet[n] = S * log |det W|, S the number of positions; the inverse applies W^-1 (the C x C
    inverse computed in float64, then cast, without a host sync), logdet = -S * log |det W|.

    With ``lu=True`` (the default) W is kept in LU form, W = P @ (L + I) @ (U + diag(sign_s * exp(log_s))):
    P a fixed permutation (buffer ``perm``), L strictly lower and U strictly upper triangular (parameters
    ``lower`` and ``upper``, masked to their triangles), sign_s fixed (buffer) and log_s learned, so
    log |det W| = sum(log_s) costs O(C). With ``lu=False`` W is a plain parameter ``weight`` and
    log |det W| comes from ``torch.linalg.slogdet`` (in float64). The logdet accumulates in float32
    (float64 for float64 x) whatever the parameters' dtype. Either starts from a random orthogonal matrix
    drawn from torch's default generator (``torch.manual_seed`` makes it reproducible).

    x: (N, C) or (N, C, *spatial) with up to 3 spatial dims, any float dtype, contiguous or channels_last;
    W is cast to x's dtype.
    """

    def __init__(self, channels: int, lu: bool = True) -> None:
        super().__init__()
        self.channels = channels = _positive_int("channels", channels)
        if not isinstance(lu, bool):
            raise ValueError(f"lu must be a bool, got {lu!r}")
        self.lu = lu
        q, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
        if not lu:
            self.weight = torch.nn.Parameter(q.float())
            return
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.lower = torch.nn.Parameter(torch.tril(lower, -1).float())
        self.upper = torch.nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = torch.nn.Parameter(s.abs().log().float())
        # Masks keep L and U triangular whatever an optimizer does to the other entries.
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1), persistent=False)
        self.register_buffer("eye", torch.eye(channels), persistent=False)

    def weight_matrix(self) -> torch.Tensor:
        """W (C, C) in the parameters' dtype."""
        if not self.lu:
            return self.weight
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.perm @ lower @ upper

    def log_abs_det(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """log |det W|, a scalar of ``dtype`` (default: the parameters' dtype), summed in float32 (float64
        for float64) and rounded once."""
        param = self.log_s if self.lu else self.weight
        dtype = param.dtype if dtype is None else dtype
        if self.lu:
            return self.log_s.to(_logdet_dtype(self.log_s)).sum().to(dtype)
        return torch.linalg.slogdet(self.weight.double())[1].to(dtype)

    def _logdet(self, x: torch.Tensor, sign: float) -> torch.Tensor:
        # S * log |det W| from a float32 log |det W|: one rounded in half precision is off by S / 2 ulp.
        positions = math.prod(x.shape[2:])
        return (sign * positions * self.log_abs_det(_logdet_dtype(x))).expand(x.shape[0]).contiguous()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C, *spatial) -> (W x, logdet (N,) = S * log |det W|)."""
        _check_input("x", x, self.channels)
        return _mix_channels(x, self.weight_matrix().to(x.dtype)), self._logdet(x, 1.0)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y (N, C, *spatial) -> (W^-1 y, logdet (N,) = -S * log |det W|)."""
        _check_input("y", y, self.channels)
        # A float64 inverse of the small matrix keeps inverse(forward(x)) at the input dtype's precision. inv_ex:
        # torch.linalg.inv reads its error code on the host (a device sync per layer, and no CUDA graph capture);
        # a singular W (log |det W| = -inf) gives non-finite values instead of that error.
        w_inv = torch.linalg.inv_ex(self.weight_matrix().double()).inverse.to(y.dtype)
        return _mix_channels(y, w_inv), self._logdet(y, -1.0)

    def extra_repr(self) -> str:
        return f"{self.channels}, lu={self.lu}"


__all__ = ["SCALES", "ActNorm", "AffineCoupling", "InvConv1x1", "zero_conv3x3"]
