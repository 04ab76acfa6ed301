"""Reparameterized sampling of a diagonal Gaussian and its KL to N(0, I): reference, validation,
canonical views, dispatch, autograd and torch.library ops.

For a posterior with mean and log-variance of one shape (B, *):

    lv      = clamp(logvar, -30, 20)
    std     = exp(lv / 2)
    z       = mean + std * eps                         (deterministic: z = mean)
    kl[b]   = 1/2 * sum over the non-batch dims of (mean^2 + exp(lv) - 1 - lv)

and the gradients, from z and kl together, with in = (-30 <= logvar <= 20) (torch.clamp's
gradient: it passes at the bounds):

    dmean   = dz + dkl[b] * mean
    dlogvar = in * (dz * eps * std / 2 + dkl[b] * (exp(lv) - 1) / 2)
    dnoise  = dz * std                                 (only for a given noise tensor that needs it)

Everything is computed in float32 (float64 for float64 inputs on the reference); the KL
accumulates in float32 whatever the input dtype.

Noise, strongest source first: an explicit ``noise`` tensor; a ``torch.Generator``; ``seed`` (with
``offset``); else a seed drawn from the default generator of mean's device (on a CUDA device a
one-element tensor drawn on the device, so the call stays capturable in a CUDA graph and replays
draw fresh noise; ``torch.manual_seed`` makes it reproducible). The fast backends draw eps in the
kernel from the Philox stream of genkernels.ops.schedule (element e of z in memory order is element
e of the stream keyed by (seed, offset)), and their backward draws it again instead of saving it.
The reference computes the same stream for a seed (``philox_normal``) and, like the scheduler
steps, draws from a generator with ``torch.randn`` on it, in mean's dtype (diffusers' sampling with
a generator).

Layouts. The kernels see canonical (B, R, K) views with unit stride along K and any batch and row
strides, so that both halves of a moments tensor (N, 2C, *) (diffusers' DiagonalGaussianDistribution
chunks it along dim 1) are read in place:

- channels first: a sample's non-batch elements form one unit-stride run: (B, 1, M), M = C * S,
  e.g. the halves of contiguous moments (batch stride 2M);
- channels last: (B, S, C) with row stride >= C, e.g. the halves of channels_last moments (row
  stride 2C); a dense channels_last tensor collapses to (B, 1, S * C).

z (and each gradient) is written dense in the same order: contiguous or channels_last like mean
(like moments). Anything else is copied once into the contiguous layout.

Fused backend interface (genkernels.triton.reparam and genkernels.cuda.reparam implement it; the
reference below does too). Canonical mean and logvar: (B, R, K), same shape and dtype (float32,
float16 or bfloat16), stride(2) == 1, B * R * K > 0.

    not_supported(mean, logvar, noise) -> str | None
    forward(mean, logvar, noise, seed, offset, deterministic, want_kl) -> (z, kl or None)
        noise: None or contiguous (B, R, K) in mean's dtype. seed: None (noise given, or
        deterministic), a Python int in [0, 2^63) or a one-element int64 tensor on mean's device
        (read by the kernel). Returns z contiguous (B, R, K) in mean's dtype, kl float32 (B,).
        One pass over mean and logvar; the KL from fixed per-(sample, chunk) partials merged in a
        fixed order (deterministic, no atomics); no host synchronization.
    backward(dz, dkl, mean, logvar, noise, seed, offset, deterministic, dmean, dlogvar) -> None
        dz: None (zero) or contiguous (B, R, K); dkl: None (zero) or float32 (B,). dmean, dlogvar:
        (B, R, K) outputs with stride(2) == 1, or None (not wanted); written once each. eps is
        drawn again from (seed, offset), bit-identical to the forward's, when noise is None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _autograd, _registry
from .._checks import is_integer
from .._layout import is_channels_last
from ..cuda import reparam as _cuda
from ..triton import reparam as _triton
from .schedule import philox_normal

OP = "reparameterize"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
_SEED_LIMIT = 2**63


# --------------------------------------------------------------------------- validation


def _check_input(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (B, *), got shape {tuple(t.shape)}")


def _check(mean, logvar, moments, noise, generator, seed, offset, return_kl, deterministic) -> tuple:
    """Raise a clear error naming the argument for anything the op does not accept; returns (mean, logvar,
    seed, offset): the two halves of moments as views when moments is given, seed and offset as Python ints."""
    if moments is not None:
        if mean is not None or logvar is not None:
            raise ValueError("pass either mean and logvar, or moments (mean and logvar stacked along dim 1), not both")
        _check_input("moments", moments)
        if moments.dim() < 2 or moments.shape[1] % 2:
            raise ValueError(
                "moments must be (N, 2C, *): mean and logvar stacked along dim 1, an even size there; got shape "
                f"{tuple(moments.shape)}"
            )
        mean, logvar = moments.chunk(2, dim=1)
    else:
        if mean is None or logvar is None:
            raise ValueError("pass mean and logvar (both), or moments=")
        _check_input("mean", mean)
        _check_input("logvar", logvar)
        if logvar.shape != mean.shape:
            raise ValueError(f"logvar must have mean's shape {tuple(mean.shape)}, got {tuple(logvar.shape)}")
        if logvar.dtype != mean.dtype:
            raise TypeError(f"logvar has dtype {logvar.dtype} but mean has {mean.dtype}: they must share one dtype")
        if logvar.device != mean.device:
            raise ValueError(f"logvar is on {logvar.device} but mean is on {mean.device}: use one device")
    if noise is not None:
        if not isinstance(noise, Tensor):
            raise TypeError(f"noise must be a torch.Tensor or None, got {type(noise).__name__}")
        if noise.shape != mean.shape:
            raise ValueError(f"noise must have the shape of mean {tuple(mean.shape)}, got {tuple(noise.shape)}")
        if noise.dtype != mean.dtype:
            raise TypeError(f"noise must have mean's dtype {mean.dtype}, got {noise.dtype}")
        if noise.device != mean.device:
            raise ValueError(f"noise is on {noise.device} but mean is on {mean.device}: use one device")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if seed is not None:
        if not is_integer(seed) or not 0 <= seed < _SEED_LIMIT:
            raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
        seed = int(seed)
    if not is_integer(offset) or not 0 <= offset < _SEED_LIMIT:
        raise ValueError(f"offset must be an int in [0, 2**63), got {offset!r}")
    offset = int(offset)
    for name, flag in (("return_kl", return_kl), ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    return mean, logvar, seed, offset


# --------------------------------------------------------------------------- canonical views


def _collapse(sizes, strides, start: int) -> tuple[int, int] | None:
    """(count, stride) when dims sizes[i:] (for i >= start) form one evenly strided run, ignoring
    size-1 dims; stride is that of the innermost non-trivial dim (1 when all are trivial)."""
    count, stride, expected = 1, None, None
    for size, st in zip(reversed(sizes[start:]), reversed(strides[start:])):
        if size == 1:
            continue
        if expected is not None and st != expected:
            return None
        stride = st if stride is None else stride
        count *= size
        expected = st * size
    return count, 1 if stride is None else stride


def _rows(t: Tensor, channels_last: bool) -> Tensor | None:
    """t (B, *) as a canonical (B, R, K) view with unit stride along K, in the given order, or None.

    channels first: (B, 1, M) when the non-batch elements are one unit-stride run; channels last
    (t is (B, C, *S)): (B, S, C) when channel stride is 1 and the spatial dims one run of stride >= C.
    """
    sizes, strides = tuple(t.shape), t.stride()
    b = sizes[0]
    if channels_last and t.dim() < 3:
        return None
    if t.numel() == 0:  # nothing to address, whatever the strides (torch calls every empty tensor contiguous)
        r, k = (math.prod(sizes[2:]), sizes[1]) if channels_last else (1, math.prod(sizes[1:]))
        return t.as_strided((b, r, k), (r * k, k, 1))
    if not channels_last:
        run = _collapse(sizes, strides, 1)
        if run is None or run[1] != 1:
            return None
        return t.as_strided((b, 1, run[0]), (strides[0], run[0], 1))
    c = sizes[1]
    if c > 1 and strides[1] != 1:
        return None
    run = _collapse(sizes, strides, 2)
    if run is None or (run[0] > 1 and run[1] < c):
        return None
    s, row = run
    return t.as_strided((b, s, c), (strides[0], row if s > 1 else c, 1))


@dataclass(frozen=True)
class _Canonical:
    """What the kernels see: canonical mean and logvar (and noise), and how z maps back.

    channels_last: z is written in mean's channels-last order (B, S, C) (else channels first);
    shape: the logical (B, *) shape of mean, z and each gradient.
    """

    mean: Tensor
    logvar: Tensor
    noise: Tensor | None
    channels_last: bool
    shape: tuple[int, ...]

    def dense(self, t: Tensor) -> Tensor:
        """A logical (B, *) tensor (noise, dz) as a contiguous (B, R, K) in z's order (copied only if needed)."""
        r, k = self.mean.shape[1:]
        if self.channels_last:
            perm = (0, *range(2, t.dim()), 1)
            return t.permute(perm).contiguous().view(t.shape[0], r, k)
        return t.contiguous().view(t.shape[0], r, k)

    def logical(self, t: Tensor) -> Tensor:
        """A contiguous (B, R, K) result (z, a gradient) as the logical (B, *) tensor, in z's layout."""
        if self.channels_last:
            b, c, spatial = self.shape[0], self.shape[1], self.shape[2:]
            return t.view(b, *spatial, c).permute(0, len(self.shape) - 1, *range(1, len(self.shape) - 1))
        return t.view(self.shape)

    def empty_logical(self) -> Tensor:
        """A new uninitialized logical tensor in z's layout (mean's dtype and device)."""
        return self.logical(torch.empty(self.mean.shape, dtype=self.mean.dtype, device=self.mean.device))


def _order_of(t: Tensor) -> bool:
    """True when t's natural canonical order is channels last."""
    return t.dim() >= 3 and _rows(t, False) is None and _rows(t, True) is not None


def _canonical(mean: Tensor, logvar: Tensor, noise: Tensor | None) -> _Canonical:
    """Canonical views of (mean, logvar): both in mean's order, each copied once only when its
    strides fit neither order (then contiguous); dense channels_last pairs collapse to (B, 1, S*C)."""
    channels_last = _order_of(mean)
    m = _rows(mean, channels_last)
    if m is None:  # neither order: one contiguous copy
        mean, channels_last = mean.contiguous(), False
        m = _rows(mean, False)
    lv = _rows(logvar, channels_last)
    if lv is None:
        if channels_last:
            perm = (0, *range(2, logvar.dim()), 1)
            inv = (0, logvar.dim() - 1, *range(1, logvar.dim() - 1))
            logvar = logvar.permute(perm).contiguous().permute(inv)
        else:
            logvar = logvar.contiguous()
        lv = _rows(logvar, channels_last)
    b, r, k = m.shape
    if r > 1 and m.stride(1) == k and lv.stride(1) == k:  # both dense rows: one run per sample
        m = m.as_strided((b, 1, r * k), (m.stride(0), r * k, 1))
        lv = lv.as_strided((b, 1, r * k), (lv.stride(0), r * k, 1))
    canon = _Canonical(m, lv, None, channels_last, tuple(mean.shape))
    if noise is None:
        return canon
    return _Canonical(m, lv, canon.dense(noise), channels_last, canon.shape)


def _canonical_moments(moments: Tensor) -> tuple[Tensor, _Canonical]:
    """moments in a layout whose halves have canonical views (copied once when needed), and the views."""
    channels_last = is_channels_last(moments)
    if not (moments.is_contiguous() or channels_last):
        moments = moments.contiguous()
    mean, logvar = moments.chunk(2, dim=1)
    m, lv = _rows(mean, channels_last), _rows(logvar, channels_last)
    return moments, _Canonical(m, lv, None, channels_last, tuple(mean.shape))


# --------------------------------------------------------------------------- reference


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _eps(noise: Tensor | None, seed, offset: int, like: Tensor) -> Tensor:
    """eps for the canonical (B, R, K) ``like``: the noise, or the Philox stream of the seed (read on the host)."""
    if noise is not None:
        return noise.to(_acc(like))
    z = philox_normal(int(seed), offset, like.numel(), like.device)
    return z.view(like.shape).to(_acc(like))


def _reference_forward(mean, logvar, noise, seed, offset, deterministic, want_kl):
    """The formulas in eager PyTorch behind the backend interface (float32; float64 for float64)."""
    m = mean.to(_acc(mean))
    lv = logvar.to(m.dtype).clamp(LOGVAR_MIN, LOGVAR_MAX)
    z = m if deterministic else m + torch.exp(0.5 * lv) * _eps(noise, seed, offset, mean)
    kl = 0.5 * (m * m + torch.exp(lv) - 1.0 - lv).sum(dim=(1, 2)) if want_kl else None
    out = torch.empty(mean.shape, dtype=mean.dtype, device=mean.device)  # never an alias of mean
    return out.copy_(z), kl


def _reference_backward(dz, dkl, mean, logvar, noise, seed, offset, deterministic, dmean, dlogvar):
    m = mean.to(_acc(mean))
    raw = logvar.to(m.dtype)
    lv = raw.clamp(LOGVAR_MIN, LOGVAR_MAX)
    dm = torch.zeros_like(m)
    dl = torch.zeros_like(m)
    if dz is not None:
        g = dz.to(m.dtype)
        dm = dm + g
        if not deterministic:
            dl = dl + 0.5 * g * _eps(noise, seed, offset, mean) * torch.exp(0.5 * lv)
    if dkl is not None:
        k = dkl.to(m.dtype).view(-1, 1, 1)
        dm = dm + k * m
        dl = dl + 0.5 * k * (torch.exp(lv) - 1.0)
    dl = torch.where((raw >= LOGVAR_MIN) & (raw <= LOGVAR_MAX), dl, torch.zeros_like(dl))
    if dmean is not None:
        dmean.copy_(dm)
    if dlogvar is not None:
        dlogvar.copy_(dl)


def _reference_not_supported(mean, logvar, noise) -> str | None:
    return None


class _ReferenceKernels:
    """The reference formulas behind the same interface as the fast backends."""

    not_supported = staticmethod(_reference_not_supported)
    forward = staticmethod(_reference_forward)
    backward = staticmethod(_reference_backward)


# --------------------------------------------------------------------------- registry


def _wrap(backend_not_supported):
    """A not_supported taking reparameterize's public arguments (as `genkernels.explain` passes them),
    or the op's own canonical views: shared reasons first, then the backend's."""

    def not_supported(mean=None, logvar=None, *, moments=None, noise=None, **_rest) -> str | None:
        if isinstance(mean, _Canonical):
            canon = mean
        elif moments is not None:
            canon = _canonical_moments(moments)[1]
        else:
            canon = _canonical(mean, logvar, noise)
        if canon.mean.dtype not in FAST_DTYPES:
            return f"mean has dtype {canon.mean.dtype}; supported: float32, float16, bfloat16"
        return backend_not_supported(canon.mean, canon.logvar, canon.noise)

    return not_supported


_registry.register(OP, "cuda", _wrap(_cuda.not_supported), _cuda)
_registry.register(OP, "triton", _wrap(_triton.not_supported), _triton)
_registry.register(OP, "reference", lambda *a, **k: None, _ReferenceKernels)


def _probe(device: torch.device) -> tuple:
    """Arguments of a typical call (an SD VAE posterior, 64x64 latent), for `genkernels.info()`."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    moments = torch.randn(1, 8, 64, 64, device=device, dtype=dtype)
    return moments.chunk(2, dim=1)


_registry.register_probe(OP, _probe)


def _select(canon: _Canonical, backend: str | None):
    """The implementation that runs this call (the reference, without a launch, for empty inputs)."""
    if canon.mean.numel() == 0:  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(OP, canon, backend=backend)
        return _ReferenceKernels
    return _registry.select(OP, canon, backend=backend).impl


# --------------------------------------------------------------------------- shared forward / backward


def _run_forward(impl, canon: _Canonical, seed, offset: int, deterministic: bool, want_kl: bool):
    """(z logical, kl or None) from the chosen implementation."""
    z, kl = impl.forward(canon.mean, canon.logvar, canon.noise, seed, offset, deterministic, want_kl)
    return canon.logical(z), kl


def _run_backward(impl, canon, moments, dz, dkl, seed, offset, deterministic, need_mean, need_logvar):
    """(dmean, dlogvar) or, for moments, (dmoments, None): written in one pass by the implementation."""
    dz_c = None if dz is None else canon.dense(dz)
    acc = torch.float64 if canon.mean.dtype == torch.float64 else torch.float32
    dkl_c = None if dkl is None else dkl.to(acc).contiguous()  # kl.sum()'s gradient is an expanded (stride 0) one
    if moments is not None:
        dmoments = torch.empty_like(moments)  # same dense layout: its halves have canonical views
        dm, dl = (_rows(half, canon.channels_last) for half in dmoments.chunk(2, dim=1))
        b, r, k = canon.mean.shape
        if dm.shape != canon.mean.shape:  # canonical views of a dense pair collapse alike
            dm = dm.as_strided((b, r, k), (dm.stride(0), k, 1))
            dl = dl.as_strided((b, r, k), (dl.stride(0), k, 1))
        impl.backward(dz_c, dkl_c, canon.mean, canon.logvar, canon.noise, seed, offset, deterministic, dm, dl)
        return dmoments, None
    dm = torch.empty(canon.mean.shape, dtype=canon.mean.dtype, device=canon.mean.device) if need_mean else None
    dl = torch.empty(canon.mean.shape, dtype=canon.mean.dtype, device=canon.mean.device) if need_logvar else None
    impl.backward(dz_c, dkl_c, canon.mean, canon.logvar, canon.noise, seed, offset, deterministic, dm, dl)
    return (None if dm is None else canon.logical(dm)), (None if dl is None else canon.logical(dl))


def _noise_grad(dz: Tensor, logvar: Tensor) -> Tensor:
    """dnoise = dz * exp(clamp(logvar) / 2) (torch ops: a noise tensor rarely needs a gradient)."""
    acc = _acc(dz)
    std = torch.exp(0.5 * logvar.to(acc).clamp(LOGVAR_MIN, LOGVAR_MAX))
    return (dz.to(acc) * std).to(dz.dtype)


class _ReparameterizeFunction(torch.autograd.Function):
    """The eager path: forward and fused backward through the chosen implementation."""

    @staticmethod
    def forward(ctx, first, logvar, noise, seed_tensor, seed_int, offset, deterministic, want_kl, impl, moments_mode):
        if moments_mode:
            moments, canon = _canonical_moments(first)
        else:
            moments, canon = None, _canonical(first, logvar, noise)
        if noise is not None and moments_mode:
            canon = _Canonical(canon.mean, canon.logvar, canon.dense(noise), canon.channels_last, canon.shape)
        seed = seed_tensor if seed_tensor is not None else seed_int
        z, kl = _run_forward(impl, canon, seed, offset, deterministic, want_kl)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(moments if moments_mode else first, logvar, noise, seed_tensor)
        ctx.args = (seed_int, offset, deterministic, impl, moments_mode, want_kl)
        return (z, kl) if want_kl else z

    @staticmethod
    @_autograd.first_order_only(OP, reference_too=True)  # create_graph=True: an explicit error, never a silent zero
    def backward(ctx, dz, dkl=None):
        first, logvar, noise, seed_tensor = ctx.saved_tensors
        seed_int, offset, deterministic, impl, moments_mode, _ = ctx.args
        needs = ctx.needs_input_grad
        if moments_mode:
            moments, canon = _canonical_moments(first)
        else:
            moments, canon = None, _canonical(first, logvar, None)
        if noise is not None:
            canon = _Canonical(canon.mean, canon.logvar, canon.dense(noise), canon.channels_last, canon.shape)
        seed = seed_tensor if seed_tensor is not None else seed_int
        dfirst = dlogvar = dnoise = None
        if needs[0] or needs[1]:
            dfirst, dlogvar = _run_backward(
                impl, canon, moments, dz, dkl, seed, offset, deterministic, needs[0], needs[1]
            )
        if needs[2] and dz is not None:
            lv = first.chunk(2, dim=1)[1] if moments_mode else logvar
            dnoise = _noise_grad(dz, lv)
        return dfirst, dlogvar, dnoise, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- torch.library ops (traced path)


def _impl_for(backend: str, canon: _Canonical):
    return _select(canon, backend or None)


def _traced_canonical(first, logvar, noise):
    if logvar is None:
        moments, canon = _canonical_moments(first)
    else:
        moments, canon = None, _canonical(first, logvar, None)
    if noise is not None:
        canon = _Canonical(canon.mean, canon.logvar, canon.dense(noise), canon.channels_last, canon.shape)
    return moments, canon


# Explicit schemas: torch 2.4 cannot infer them from postponed (string) annotations. `first` is mean,
# or moments when logvar is None; kl is an empty tensor when not asked for (ops cannot return None). seed and
# offset are SymInt: a compiled step passing a new seed each call (seed=step) keeps one graph instead of
# specializing on every value (a recompile per step, an error past dynamo's limit under fullgraph).
@torch.library.custom_op(
    "genkernels::reparameterize",
    mutates_args=(),
    schema="(Tensor first, Tensor? logvar, Tensor? noise, Tensor? seed_tensor, SymInt seed, SymInt offset,"
    " bool deterministic, bool want_kl, str backend) -> (Tensor, Tensor)",
)
def _reparameterize_op(
    first: Tensor,
    logvar: Tensor | None,
    noise: Tensor | None,
    seed_tensor: Tensor | None,
    seed: int,
    offset: int,
    deterministic: bool,
    want_kl: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    _, canon = _traced_canonical(first, logvar, noise)
    impl = _impl_for(backend, canon)
    z, kl = _run_forward(impl, canon, seed_tensor if seed_tensor is not None else seed, offset, deterministic, want_kl)
    return z, (kl if kl is not None else first.new_empty((0,), dtype=torch.float32))


def _fake_outputs(first, logvar, want_kl):
    _, canon = _traced_canonical(first, logvar, None)
    z = canon.empty_logical()
    kl_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    return z, first.new_empty((first.shape[0],) if want_kl else (0,), dtype=kl_dtype)


@_reparameterize_op.register_fake
def _(first, logvar, noise, seed_tensor, seed, offset, deterministic, want_kl, backend):
    return _fake_outputs(first, logvar, want_kl)


@torch.library.custom_op(
    "genkernels::reparameterize_backward",
    mutates_args=(),
    schema="(Tensor? dz, Tensor? dkl, Tensor first, Tensor? logvar, Tensor? noise, Tensor? seed_tensor, SymInt seed,"
    " SymInt offset, bool deterministic, bool need_first, bool need_logvar, str backend) -> (Tensor, Tensor)",
)
def _reparameterize_backward_op(
    dz: Tensor | None,
    dkl: Tensor | None,
    first: Tensor,
    logvar: Tensor | None,
    noise: Tensor | None,
    seed_tensor: Tensor | None,
    seed: int,
    offset: int,
    deterministic: bool,
    need_first: bool,
    need_logvar: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(dmean, dlogvar), or (dmoments, empty) when logvar is None; an empty tensor for a gradient not needed."""
    moments, canon = _traced_canonical(first, logvar, noise)
    impl = _impl_for(backend, canon)
    seed_arg = seed_tensor if seed_tensor is not None else seed
    da, db = _run_backward(impl, canon, moments, dz, dkl, seed_arg, offset, deterministic, need_first, need_logvar)
    # Each absent gradient its own empty tensor: outputs of a custom op may not alias one another.
    return (da if da is not None else first.new_empty((0,))), (db if db is not None else first.new_empty((0,)))


@_reparameterize_backward_op.register_fake
def _(dz, dkl, first, logvar, noise, seed_tensor, seed, offset, deterministic, need_first, need_logvar, backend):
    if logvar is None:  # dmoments is laid out like the moments the kernels read (a dense copy of other strides)
        return torch.empty_like(_canonical_moments(first)[0]), first.new_empty((0,))
    z, _ = _fake_outputs(first, logvar, False)
    return (torch.empty_like(z) if need_first else first.new_empty((0,))), (
        torch.empty_like(z) if need_logvar else first.new_empty((0,))
    )


def _setup_context(ctx, inputs, output):
    first, logvar, noise, seed_tensor, seed, offset, deterministic, want_kl, backend = inputs
    ctx.save_for_backward(first, logvar, noise, seed_tensor)
    ctx.args = (seed, offset, deterministic, backend)
    ctx.needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])


def _backward(ctx, dz, dkl):
    first, logvar, noise, seed_tensor = ctx.saved_tensors
    seed, offset, deterministic, backend = ctx.args
    need_first, need_logvar, need_noise = ctx.needs
    if dkl is not None and dkl.numel() == 0:
        dkl = None
    da, db = _reparameterize_backward_op(
        dz, dkl, first, logvar, noise, seed_tensor, seed, offset, deterministic, need_first, need_logvar, backend
    )
    dnoise = None
    if need_noise and dz is not None:
        dnoise = _noise_grad(dz, logvar if logvar is not None else first.chunk(2, dim=1)[1])
    return (da if need_first else None), (db if need_logvar and logvar is not None else None), dnoise, *(None,) * 6


_reparameterize_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public op


def _seed_from(generator: torch.Generator | None, device: torch.device) -> int | Tensor:
    """One int64 seed from generator (or the default generator of ``device``): a host int from a CPU
    generator, a one-element device tensor from a CUDA one (drawn on the device: no host sync)."""
    if generator is None:
        gen_device = device if device.type == "cuda" else torch.device("cpu")
        drawn = torch.randint(0, _SEED_LIMIT - 1, (1,), device=gen_device, dtype=torch.int64)
    else:
        drawn = torch.randint(0, _SEED_LIMIT - 1, (1,), generator=generator, device=generator.device, dtype=torch.int64)
    if drawn.device.type == "cpu" and not torch.compiler.is_compiling():
        return int(drawn)
    return drawn.to(device)


def reparameterize(
    mean: Tensor | None = None,
    logvar: Tensor | None = None,
    *,
    moments: Tensor | None = None,
    noise: Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    generator: torch.Generator | None = None,
    return_kl: bool = True,
    deterministic: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """A sample of N(mean, exp(logvar)) by reparameterization, and its KL to N(0, I), in one pass.

        lv    = clamp(logvar, -30, 20);  std = exp(lv / 2)
        z     = mean + std * eps                       (deterministic=True: z = mean)
        kl[b] = 1/2 * sum over non-batch dims of (mean^2 + exp(lv) - 1 - lv)

    Args:
        mean, logvar: (B, *) of one shape, dtype and device: float32, float16 or bfloat16
            (float64: reference only). Any strides: contiguous, channels_last and views that keep
            a unit-stride innermost run (e.g. halves of a moments tensor) are read in place,
            anything else is copied once.
        moments: instead of mean and logvar, one (N, 2C, *) tensor holding mean = moments[:, :C]
            and logvar = moments[:, C:] (diffusers' DiagonalGaussianDistribution), read in place.
        noise: eps given explicitly, mean's shape and dtype.
        seed, offset: key and stream of the in-kernel Philox eps (genkernels.ops.schedule's
            stream; every backend draws the same numbers for the same seed and offset). Element e
            of z in memory order takes number e of the stream, so the same seed gives other
            samples for a channels_last input than for a contiguous one. Ignored when noise or a
            generator is given.
        generator: a torch.Generator: the fast backends draw one int64 seed with it (on its device,
            no host synchronization); the reference draws eps with ``torch.randn`` on it in mean's
            dtype (diffusers' DiagonalGaussianDistribution.sample).
            Without noise, generator and seed, the seed comes from the default generator of
            mean's device (capturable in a CUDA graph; reproducible under torch.manual_seed).
        return_kl: also return kl.
        deterministic: z = mean (the posterior mode); kl as usual (diffusers' deterministic
            DiagonalGaussianDistribution reports kl = 0 instead).
        backend: "auto" / None, "reference", "triton" or "cuda" (an explicit backend that cannot
            run the call raises UnsupportedError).

    Returns z, in mean's dtype, shape and layout (contiguous, or channels_last when mean or
    moments is), and with return_kl the float32 (B,) kl (float64 for float64 inputs): a sum over
    every non-batch dim, also for 5-D video latents (diffusers' DiagonalGaussianDistribution.kl
    sums dims 1, 2, 3 only). A NaN in mean or logvar gives NaN in z and in its sample's kl.
    Differentiable in mean and logvar (or moments) through one fused backward pass that draws eps
    again instead of storing it, and in a given noise tensor; first order only, on every backend (a
    gradient taken with create_graph=True raises).

    Under torch.compile the call goes through the ``genkernels::reparameterize`` op; pass seed (or
    noise) or nothing there: dynamo cannot trace a torch.Generator argument.
    """
    mean, logvar, seed, offset = _check(mean, logvar, moments, noise, generator, seed, offset, return_kl, deterministic)
    moments_mode = moments is not None
    first = moments if moments_mode else mean
    lv_arg = None if moments_mode else logvar
    needs_noise = not deterministic and noise is None
    if torch.compiler.is_compiling():
        seed_tensor = None
        if needs_noise and (seed is None or generator is not None):  # a generator outranks a seed
            seed_tensor = _seed_from(generator, mean.device)
        z, kl = _reparameterize_op(
            first,
            lv_arg,
            None if deterministic else noise,
            seed_tensor,
            0 if seed is None else seed,
            offset,
            deterministic,
            return_kl,
            backend or "",
        )
        return (z, kl) if return_kl else z
    if moments_mode:
        canon = _canonical_moments(moments)[1]
    else:
        canon = _canonical(mean, logvar, None)
    impl = _select(canon, backend)
    seed_int, seed_tensor = 0, None
    if deterministic:
        noise = None
    elif noise is None:
        if generator is not None and impl is _ReferenceKernels:
            # In mean's dtype, as diffusers' posterior draws it: on the CPU, fp16's, bf16's and float64's randn
            # are other streams than float32's (for most sizes), so a float32 draw would give other numbers.
            drawn = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
            noise = drawn.to(mean.device)
        elif seed is not None and generator is None:  # a generator outranks a seed (as on the reference)
            seed_int = seed
        else:
            drawn = _seed_from(generator, mean.device)
            seed_int, seed_tensor = (0, drawn) if isinstance(drawn, Tensor) else (drawn, None)
    return _autograd.apply(
        _ReparameterizeFunction,
        first,
        lv_arg,
        noise,
        seed_tensor,
        seed_int,
        offset,
        deterministic,
        return_kl,
        impl,
        moments_mode,
    )


def reparameterize_reference(
    mean: Tensor | None = None, logvar: Tensor | None = None, **kwargs
) -> Tensor | tuple[Tensor, Tensor]:
    """The specification: :func:`reparameterize` on the reference backend (same arguments, no ``backend``)."""
    return reparameterize(mean, logvar, backend="reference", **kwargs)


__all__ = ["LOGVAR_MIN", "LOGVAR_MAX", "reparameterize", "reparameterize_reference"]


_registry.register_check(OP, reparameterize, _check)
