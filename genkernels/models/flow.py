"""Normalizing flows on genkernels' flow layers: multi-scale Glow for images, RealNVP for 2-D points.

Glow (L levels of K steps), for x (N, C, H, W) with H and W divisible by 2 ** L:

    level i < L - 1:  squeeze -> K x step -> split: z_i = h[:, c/2:] leaves, h[:, :c/2] goes on;
                      z_i ~ N(mean, exp(log_std)^2) with (mean, log_std) = prior_i(h[:, :c/2])
    level L - 1:      squeeze -> K x step -> z_{L-1} = h ~ N(top_mean[c], exp(top_log_std[c])^2)

    squeeze  (N, c, h, w) -> (N, 4c, h/2, w/2): each 2x2 block of pixels becomes 4 channels (space to
             depth; channel 4 * k + 2 * i + j of the output holds pixel (i, j) of the block, channel k)
    step     ActNorm -> InvConv1x1 -> AffineCoupling (genkernels.nn)
    prior_i  a zero-initialized conv3x3 from the kept half to [mean; log_std] of the split-off half;
             top_mean and top_log_std are zero-initialized per-channel parameters: every prior starts
             as N(0, I) and is learned.

log p(x) = sum_i log N(z_i; mean_i, std_i) + sum of the steps' log-determinants (nats). The
bits/dim of images quantized to n_bins levels and dequantized with uniform noise is
(-log p(x) + D log n_bins) / (D log 2), see :meth:`Glow.bits_per_dim`.

Every ActNorm and coupling op goes through the genkernels registry; ``backend`` pins one backend for
all of them ("reference", "triton", "cuda"; None follows ``genkernels.backend(...)`` and the auto order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .._checks import check_backend as _check_backend
from .._checks import is_finite_real, is_integer, optional_seed
from .._checks import positive_int as _positive_int
from ..nn.flow import SCALES, ActNorm, AffineCoupling, InvConv1x1, zero_conv3x3
from ._config import ConfigIO
from ._layers import check_input_dtype

_LOG_2PI = math.log(2 * math.pi)


def _check_temperature(temperature) -> float:
    """temperature as a Python float: a finite number >= 0 (inf would draw mean + inf * std * eps: NaN)."""
    if not (is_finite_real(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: the prior means), got {temperature!r}")
    return float(temperature)


def _seeded(seed, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed`` (an int in [0, 2^63)), or None for seed None."""
    seed = optional_seed(seed)
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """sum over all but the batch dim of log N(z; mean, exp(log_std)^2) =
    -1/2 (log 2 pi + 2 log_std + ((z - mean) / exp(log_std))^2); (N,) in float32 (float64 for float64 z).
    mean and log_std broadcast against z."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    z, mean, log_std = z.to(acc), mean.to(acc), log_std.to(acc)
    density = -0.5 * (_LOG_2PI + 2 * log_std + ((z - mean) * torch.exp(-log_std)) ** 2)
    return density.expand_as(z).flatten(1).sum(1)


def squeeze2x2(x: torch.Tensor) -> torch.Tensor:
    """Space to depth: (N, C, H, W) -> (N, 4C, H/2, W/2), out[n, 4c + 2i + j, y, x] = x[n, c, 2y + i, 2x + j]."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze2x2(x: torch.Tensor) -> torch.Tensor:
    """Depth to space, the inverse of :func:`squeeze2x2`: (N, 4C, H, W) -> (N, C, 2H, 2W)."""
    n, c4, h, w = x.shape
    x = x.reshape(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c4 // 4, 2 * h, 2 * w)


@dataclass
class GlowConfig(ConfigIO):
    """Sizes of a :class:`Glow`. Presets: :meth:`tiny` (tests), :meth:`digits` (8x8 grey digits).

    Args:
        in_channels: image channels.
        levels: L, the number of squeezes; images must have H and W divisible by 2 ** L.
        steps_per_level: K, flow steps (ActNorm, InvConv1x1, AffineCoupling) per level.
        hidden_channels: width of every coupling's conditioner.
        scale: the couplings' scale function: "sigmoid" (Glow), "exp", "softclamp_tanh",
            "softclamp_atan" or "additive" (see genkernels.nn.AffineCoupling).
        clamp: bound of the soft-clamped scales.
        lu: LU-decomposed 1x1 convolutions.
        image_size: (H, W) (or one int for square images) that :meth:`Glow.sample` draws by default;
            any size divisible by 2 ** L runs through the model.
    """

    in_channels: int = 3
    levels: int = 3
    steps_per_level: int = 8
    hidden_channels: int = 128
    scale: str = "sigmoid"
    clamp: float = 2.0
    lu: bool = True
    image_size: int | tuple[int, int] = 32

    def __post_init__(self) -> None:
        for name in ("in_channels", "levels", "steps_per_level", "hidden_channels"):
            setattr(self, name, _positive_int(name, getattr(self, name)))
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        clamp = self.clamp
        if not (is_finite_real(clamp) and clamp > 0):
            raise ValueError(f"clamp must be a finite number > 0, got {clamp!r}")
        self.clamp = float(clamp)
        if not isinstance(self.lu, bool):
            raise ValueError(f"lu must be a bool, got {self.lu!r}")
        size = self.image_size
        if isinstance(size, (list, tuple)):
            if len(size) != 2:
                raise ValueError(f"image_size must be an int or an (H, W) pair, got {size!r}")
            size = tuple(_positive_int("image_size", s) for s in size)
        else:
            size = (_positive_int("image_size", size),) * 2
        multiple = 2**self.levels
        if size[0] % multiple or size[1] % multiple:
            raise ValueError(
                f"image_size must be divisible by 2 ** levels = {multiple} along H and W, got {self.image_size!r}"
            )
        self.image_size = size if size[0] != size[1] else size[0]

    @property
    def hw(self) -> tuple[int, int]:
        """image_size as an (H, W) pair."""
        size = self.image_size
        return size if isinstance(size, tuple) else (size, size)

    @classmethod
    def tiny(cls, **overrides) -> GlowConfig:
        """One channel, 2 levels of 2 steps, width 8, 4x4 images: for tests."""
        base = dict(in_channels=1, levels=2, steps_per_level=2, hidden_channels=8, image_size=4)
        return cls(**{**base, **overrides})

    @classmethod
    def digits(cls, **overrides) -> GlowConfig:
        """The 8x8 grey digits: 2 levels (8x8 -> 4x4x4 -> 2x2x8) of 8 steps, width 64 (about 0.15 M parameters)."""
        base = dict(in_channels=1, levels=2, steps_per_level=8, hidden_channels=64, image_size=8)
        return cls(**{**base, **overrides})


class FlowStep(torch.nn.Module):
    """One Glow step: ActNorm -> InvConv1x1 -> AffineCoupling; forward / inverse -> (out, logdet (N,))."""

    def __init__(self, channels: int, hidden_channels: int, scale: str, clamp: float, lu: bool, backend) -> None:
        super().__init__()
        self.actnorm = ActNorm(channels, backend=backend)
        self.invconv = InvConv1x1(channels, lu=lu)
        self.coupling = AffineCoupling(channels, hidden_channels, scale=scale, clamp=clamp, backend=backend)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C, H, W) -> (y (N, C, H, W), logdet (N,) = log |det dy/dx|): the sum of the ActNorm, 1x1
        convolution and coupling logdets, float32 (float64 for float64 x)."""
        x, logdet = self.actnorm(x)
        x, ld = self.invconv(x)
        logdet = logdet + ld
        x, ld = self.coupling(x)
        return x, logdet + ld

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y (N, C, H, W) -> (x (N, C, H, W), logdet (N,) = log |det dx/dy| = -(forward's logdet at x)):
        the coupling, 1x1 convolution and ActNorm undone in reverse order."""
        y, logdet = self.coupling.inverse(y)
        y, ld = self.invconv.inverse(y)
        logdet = logdet + ld
        y, ld = self.actnorm.inverse(y)
        return y, logdet + ld


class GlowLevel(torch.nn.Module):
    """Squeeze, K steps and (unless it is the last level) the split's prior."""

    def __init__(self, channels: int, cfg: GlowConfig, split: bool, backend) -> None:
        super().__init__()
        c = 4 * channels
        self.steps = torch.nn.ModuleList(
            FlowStep(c, cfg.hidden_channels, cfg.scale, cfg.clamp, cfg.lu, backend) for _ in range(cfg.steps_per_level)
        )
        self.prior = zero_conv3x3(c // 2, c) if split else None

    def split_prior(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log_std) of the split-off half given the kept half (N, c/2, h, w)."""
        return self.prior(kept).chunk(2, dim=1)


class Glow(torch.nn.Module):
    """Multi-scale Glow (see the module doc for the layout) on genkernels' flow layers.

    Args:
        in_channels, levels, steps_per_level, hidden_channels, scale: see :class:`GlowConfig`.
        backend: backend of every ActNorm and coupling op ("reference", "triton", "cuda"; None: the
            ``genkernels.backend(...)`` scope or auto). Change it with :meth:`set_backend`.
        clamp, lu, image_size: see :class:`GlowConfig`.

    ``Glow.from_config(GlowConfig.digits())`` builds one from a config; ``model.config`` is its config.
    Inputs (N, in_channels, H, W) with H and W divisible by 2 ** levels, contiguous or channels_last.
    """

    def __init__(
        self,
        in_channels: int,
        levels: int,
        steps_per_level: int,
        hidden_channels: int,
        scale: str = "sigmoid",
        backend: str | None = None,
        *,
        clamp: float = 2.0,
        lu: bool = True,
        image_size: int | tuple[int, int] = 32,
    ) -> None:
        super().__init__()
        cfg = GlowConfig(in_channels, levels, steps_per_level, hidden_channels, scale, clamp, lu, image_size)
        self.config = cfg
        self.backend = _check_backend(backend)
        blocks = []
        channels = cfg.in_channels
        for i in range(cfg.levels):
            last = i == cfg.levels - 1
            blocks.append(GlowLevel(channels, cfg, not last, backend))
            channels = 4 * channels if last else 2 * channels
        self.levels = torch.nn.ModuleList(blocks)
        self.top_mean = torch.nn.Parameter(torch.zeros(channels))
        self.top_log_std = torch.nn.Parameter(torch.zeros(channels))

    @classmethod
    def from_config(cls, config: GlowConfig | Mapping, backend: str | None = None) -> Glow:
        """A model (fresh weights) for ``config`` (a :class:`GlowConfig` or a mapping of its fields)."""
        if isinstance(config, Mapping):
            config = GlowConfig.from_dict(config)
        if not isinstance(config, GlowConfig):
            raise TypeError(f"config must be a GlowConfig or a mapping, got {type(config).__name__}")
        fields = config.to_dict()
        return cls(
            fields.pop("in_channels"),
            fields.pop("levels"),
            fields.pop("steps_per_level"),
            fields.pop("hidden_channels"),
            fields.pop("scale"),
            backend,
            **fields,
        )

    def set_backend(self, backend: str | None) -> Glow:
        """Pin every ActNorm and coupling op of the model to ``backend`` (None: scope / auto); returns self."""
        _check_backend(backend)
        for m in self.modules():
            if isinstance(m, (ActNorm, AffineCoupling)):
                m.backend = backend
        self.backend = backend
        return self

    def latent_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """(C, H, W) of each latent z_i for images of size height x width (ints; finest level first)."""
        height, width = self._check_size(height, width)
        shapes = []
        c, h, w = self.config.in_channels, height, width
        for i in range(len(self.levels)):
            c, h, w = 4 * c, h // 2, w // 2
            if i < len(self.levels) - 1:
                shapes.append((c // 2, h, w))
                c //= 2
            else:
                shapes.append((c, h, w))
        return shapes

    def _check_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) as Python ints, if both are positive multiples of 2 ** levels."""
        multiple = 2 ** len(self.levels)
        if not all(is_integer(v) and v >= 1 and v % multiple == 0 for v in (height, width)):
            raise ValueError(
                f"H and W must be positive multiples of 2 ** levels = {multiple}, got H={height!r}, W={width!r}"
            )
        return int(height), int(width)

    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must be (N, {self.config.in_channels}, H, W), got shape {tuple(x.shape)}")
        self._check_size(x.shape[2], x.shape[3])
        check_input_dtype("x", x, self.top_mean.dtype)

    def _encode(self, x: torch.Tensor, with_prior: bool):
        """(zs, logdet, log prior (N,) or None)."""
        self._check_x(x)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        logdet = torch.zeros(x.shape[0], dtype=acc, device=x.device)
        prior = torch.zeros_like(logdet) if with_prior else None
        zs = []
        h = x
        for level in self.levels:
            h = squeeze2x2(h)
            for step in level.steps:
                h, ld = step(h)
                logdet = logdet + ld
            if level.prior is None:
                zs.append(h)
                if with_prior:
                    shape = (1, -1, 1, 1)
                    prior = prior + gaussian_log_prob(h, self.top_mean.view(shape), self.top_log_std.view(shape))
            else:
                kept, z = h.chunk(2, dim=1)
                zs.append(z)
                if with_prior:
                    prior = prior + gaussian_log_prob(z, *level.split_prior(kept))
                h = kept
        return zs, logdet, prior

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (N, C, H, W) -> (zs, logdet): zs the L latents, finest first (shapes :meth:`latent_shapes`),
        logdet (N,) float32 (float64 for float64 x) the log |det dz/dx| of the whole flow."""
        zs, logdet, _ = self._encode(x, with_prior=False)
        return zs, logdet

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) (N,) in nats: the priors' log-densities of the latents plus the flow's logdet,
        float32 (float64 for float64 x). x is continuous (dequantized) data."""
        _, logdet, prior = self._encode(x, with_prior=True)
        return prior + logdet

    def bits_per_dim(self, x: torch.Tensor, n_bins: int = 256) -> torch.Tensor:
        """Bits per dimension (N,) of dequantized data x.

        Convention: the images were quantized to ``n_bins`` levels k and x = (k + u) / n_bins with
        u ~ U[0, 1)^D (x on a unit-width scale, [0, 1]; a shift such as x - 0.5 changes nothing), so the
        probability of the bin is about p(x) * n_bins^-D and

            bits/dim = -(log p(x) - D log n_bins) / (D log 2),   D = C * H * W.

        For data scaled otherwise, add D log(scale) to log p first.
        """
        n_bins = _positive_int("n_bins", n_bins)
        log_p = self.log_prob(x)  # checks x
        dims = math.prod(x.shape[1:])
        return -(log_p - dims * math.log(n_bins)) / (dims * math.log(2))

    def _top_prior(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.top_mean.view(1, -1, 1, 1), self.top_log_std.view(1, -1, 1, 1)

    def _decode(self, zs: Sequence[torch.Tensor | None], temperature: float, generator, n, shapes) -> torch.Tensor:
        """x from the latents; a latent given as None is drawn from its prior, mean + T * std * eps."""

        def draw(i: int, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
            if zs[i] is not None:
                return zs[i]
            shape = (n, *shapes[i])
            eps = torch.randn(shape, generator=generator, device=self.top_mean.device, dtype=self.top_mean.dtype)
            return mean + temperature * torch.exp(log_std) * eps if temperature else mean.expand(shape).clone()

        h = draw(len(self.levels) - 1, *self._top_prior())
        for i in reversed(range(len(self.levels))):
            level = self.levels[i]
            if level.prior is not None:
                h = torch.cat([h, draw(i, *level.split_prior(h))], dim=1)
            for step in reversed(level.steps):
                h, _ = step.inverse(h)
            h = unsqueeze2x2(h)
        return h

    def inverse(self, zs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The images x (N, C, H, W) of latents zs (as :meth:`forward` returns them): forward's inverse.
        Differentiated (gradient enabled and a latent or parameter requiring it), the couplings and ActNorms
        need the reference op (see genkernels.nn.AffineCoupling.inverse): auto picks it, a model pinned to a
        fast backend raises UnsupportedError; under ``torch.no_grad()`` they run on the model's backend."""
        if not isinstance(zs, (list, tuple)) or len(zs) != len(self.levels):
            got = f"{len(zs)} latents" if isinstance(zs, (list, tuple)) else type(zs).__name__
            raise ValueError(f"zs must be a list of {len(self.levels)} latents (one per level), got {got}")
        top = zs[-1]
        if not isinstance(top, torch.Tensor) or top.dim() != 4:
            raise ValueError(f"zs[-1] must be a (N, C, h, w) tensor, got {getattr(top, 'shape', type(top).__name__)}")
        multiple = 2 ** len(self.levels)
        shapes = self.latent_shapes(top.shape[2] * multiple, top.shape[3] * multiple)
        for i, (z, shape) in enumerate(zip(zs, shapes)):
            want = (top.shape[0], *shape)
            if not isinstance(z, torch.Tensor) or tuple(z.shape) != want:
                raise ValueError(f"zs[{i}] must have shape {want}, got {getattr(z, 'shape', type(z).__name__)}")
            check_input_dtype(f"zs[{i}]", z, self.top_mean.dtype)
        return self._decode(list(zs), 1.0, None, top.shape[0], shapes)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        seed: int | None = None,
        *,
        generator: torch.Generator | None = None,
        image_size: int | tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """n images (n, C, H, W) drawn from the model, without gradient.

        Each latent is mean + temperature * std * eps with its prior's (mean, std) (the split priors
        conditioned on the already decoded coarser latents); temperature, a finite number >= 0: 0 is
        the prior-mean path (every latent its prior's mean: one image whatever the seed).
        eps comes from ``generator``, else a generator seeded with ``seed`` (an int in [0, 2^63)), else
        the default one of the parameters' device. ``image_size`` (int or (H, W), positive multiples of
        2 ** levels) defaults to config.image_size.
        """
        n = _positive_int("n", n)
        temperature = _check_temperature(temperature)
        seeded = _seeded(seed, self.top_mean.device)
        if generator is None:
            generator = seeded
        if image_size is None:
            height, width = self.config.hw
        elif isinstance(image_size, (list, tuple)) and len(image_size) == 2:
            height, width = image_size
        elif is_integer(image_size):
            height = width = int(image_size)
        else:
            raise ValueError(f"image_size must be None, an int or an (H, W) pair, got {image_size!r}")
        shapes = self.latent_shapes(height, width)
        return self._decode([None] * len(self.levels), temperature, generator, n, shapes)


class RealNVP2D(torch.nn.Module):
    """RealNVP for 2-D points: ``layers`` x (ActNorm, affine coupling), swapping the two coordinates
    between couplings so each conditions on the other in turn; base N(0, I).

    Each coupling updates coordinate 1 from coordinate 0 through an MLP conditioner (Linear(1, hidden)
    -> ReLU -> Linear(hidden, hidden) -> ReLU -> Linear(hidden, 2), the last zero-initialized: the
    scale pre-activation and the shift), on ``genkernels.ops.affine_coupling`` with (N, 2) points.

    Args:
        hidden: the conditioners' width.
        layers: the number of couplings.
        scale, clamp: the couplings' scale function (default "softclamp_tanh": |log s| <= clamp).
        backend: backend of the ActNorm and coupling ops.
    """

    def __init__(
        self,
        hidden: int = 64,
        layers: int = 6,
        scale: str = "softclamp_tanh",
        clamp: float = 2.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        hidden, layers = _positive_int("hidden", hidden), _positive_int("layers", layers)
        self.backend = _check_backend(backend)
        self.norms = torch.nn.ModuleList(ActNorm(2, backend=backend) for _ in range(layers))
        self.couplings = torch.nn.ModuleList(
            AffineCoupling(2, scale=scale, clamp=clamp, backend=backend, conditioner=self._mlp(hidden, scale))
            for _ in range(layers)
        )

    @staticmethod
    def _mlp(hidden: int, scale: str) -> torch.nn.Sequential:
        last = torch.nn.Linear(hidden, 1 if scale == "additive" else 2)
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
        return torch.nn.Sequential(
            torch.nn.Linear(1, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), last
        )

    def set_backend(self, backend: str | None) -> RealNVP2D:
        """Pin every ActNorm and coupling op to ``backend`` (None: scope / auto); returns self."""
        _check_backend(backend)
        for m in self.modules():
            if isinstance(m, (ActNorm, AffineCoupling)):
                m.backend = backend
        self.backend = backend
        return self

    def _check_points(self, name: str, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != 2:
            raise ValueError(f"{name} must be (N, 2) points, got {getattr(x, 'shape', type(x).__name__)}")
        check_input_dtype(name, x, self.norms[0].log_scale.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Points x (N, 2) -> (z (N, 2), logdet (N,) float32)."""
        self._check_points("x", x)
        logdet = torch.zeros(x.shape[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        logdet = logdet.to(x.device)
        for norm, coupling in zip(self.norms, self.couplings):
            x, ld = norm(x)
            logdet = logdet + ld
            x, ld = coupling(x)
            logdet = logdet + ld
            x = x.flip(1)
        return x, logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Latents z (N, 2) -> points x (N, 2): forward's inverse."""
        self._check_points("z", z)
        for norm, coupling in zip(reversed(self.norms), reversed(self.couplings)):
            z, _ = coupling.inverse(z.flip(1))
            z, _ = norm.inverse(z)
        return z

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) (N,) in nats: log N(z; 0, I) + logdet."""
        z, logdet = self(x)
        return gaussian_log_prob(z, torch.zeros((), device=z.device), torch.zeros((), device=z.device)) + logdet

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, seed: int | None = None) -> torch.Tensor:
        """n points (n, 2): inverse(temperature * eps), eps ~ N(0, I) from ``seed`` (an int in [0, 2^63);
        None: the default generator); temperature a finite number >= 0 (0: inverse(0) for every point)."""
        n = _positive_int("n", n)
        temperature = _check_temperature(temperature)
        param = self.norms[0].log_scale
        generator = _seeded(seed, param.device)
        eps = torch.randn(n, 2, generator=generator, device=param.device, dtype=param.dtype)
        return self.inverse(temperature * eps)


__all__ = [
    "FlowStep",
    "Glow",
    "GlowConfig",
    "GlowLevel",
    "RealNVP2D",
    "gaussian_log_prob",
    "squeeze2x2",
    "unsqueeze2x2",
]
