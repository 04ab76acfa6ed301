"""CUDA launcher for the reparameterization trick (csrc/reparam.cu): a thin wrapper over ``genkernels._C``.

Implements the backend interface of :mod:`genkernels.ops.reparam` (see its module docstring for the
formula, the argument conventions and the Philox noise stream). The kernels take device addresses,
sizes, strides in elements, a dtype code and a stream; this module allocates z, kl and the scratch
memory of the KL partials with torch and launches on torch's current stream without synchronizing
(CUDA-graph capturable).

Tensors are canonical (B, R, K) views with unit stride along K: mean and logvar (and dmean and
dlogvar) with arbitrary non-negative batch and row strides, each its own (the two halves of a
moments tensor are read and written in place); z, noise and dz contiguous. One dtype throughout:
float32, float16 or bfloat16. The kernels move 16-byte vectors when K and the strides are
multiples of the vector width and the tensors 16-byte aligned, else single elements. The seed of the
in-kernel noise is a Python int or a one-element int64 tensor on mean's device, read by the kernel
(no host synchronization).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (
    address,
    device_guard,
    dtype_code,
    grid_unavailable,
    kernels_unavailable,
    require_extension,
    seed_args,
    stream_handle,
    u64,
    workspace,
)

_SYMBOLS = ("reparam_forward_workspace", "reparam_forward", "reparam_backward")


def not_supported(mean: Tensor, logvar: Tensor, noise: Tensor | None) -> str | None:
    """Why the cuda backend cannot run these tensors (one line), or None when it can.

    The op has validated shapes, dtypes and devices and canonicalized to (B, R, K) views; what
    remains is the device, the extension, and the grid size of csrc/reparam.cu.
    """
    reason = kernels_unavailable(mean, "mean", "reparameterize", _SYMBOLS)
    if reason is None:
        batch, rows, cols = mean.shape
        reason = grid_unavailable(batch, rows * cols)
    return reason


def _strides(t: Tensor | None) -> tuple[int, int]:
    """(batch, row) strides in elements of a (B, R, K) view; (0, 0) for None."""
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def _seed_args(seed, needed: bool, device: torch.device) -> tuple[int, Tensor | None]:
    """The kernel's (seed, seed tensor) (:func:`seed_args`) when the noise is drawn in the kernel, else (0, None)."""
    if not needed:
        return 0, None
    if seed is None:
        raise ValueError("seed: got None, but the noise is drawn in the kernel (no noise tensor, not deterministic)")
    return seed_args(seed, device)


def forward(
    mean: Tensor,
    logvar: Tensor,
    noise: Tensor | None,
    seed,
    offset: int,
    deterministic: bool,
    want_kl: bool,
) -> tuple[Tensor, Tensor | None]:
    """z = mean + exp(lv / 2) * eps and, when want_kl, kl[b] = 0.5 * sum_{r,k} (mean^2 + exp(lv) - 1 - lv).

    Per element, in float32: lv = clamp(logvar, -30, 20); eps is ``noise`` when given, else element
    (b*R + r)*K + k of the Philox stream keyed by (seed, offset), the seed a Python int in [0, 2**63)
    or a one-element int64 tensor on mean's device; deterministic: z = mean (noise and seed unused).
    mean, logvar: (B, R, K) views with stride(2) == 1, float32 / float16 / bfloat16; noise: None or
    (B, R, K) contiguous in mean's dtype. Returns z, a new contiguous (B, R, K) tensor in mean's
    dtype, and kl, float32 (B,) (None unless want_kl), summed in fixed chunks merged in a fixed order:
    the same bits on every run and every GPU. One pass over mean and logvar; no host synchronization.
    """
    ext = require_extension()
    batch, rows, cols = mean.shape
    device = mean.device
    z = torch.empty((batch, rows, cols), dtype=mean.dtype, device=device)
    kl = torch.empty(batch, dtype=torch.float32, device=device) if want_kl else None
    if z.numel() == 0:
        return z, None if kl is None else kl.zero_()
    if deterministic:
        noise = None
    seed_int, seed_tensor = _seed_args(seed, noise is None and not deterministic, device)
    problem = (batch, rows, cols, _strides(mean), _strides(logvar), dtype_code(mean), device.index)
    with device_guard(device):
        nbytes = ext.reparam_forward_workspace(*problem) if want_kl else 0
        scratch = workspace(nbytes, device)
        ext.reparam_forward(
            mean.data_ptr(),
            logvar.data_ptr(),
            address(noise),
            z.data_ptr(),
            address(kl),
            *problem,
            seed_int,
            address(seed_tensor),
            u64(offset),
            bool(deterministic),
            address(scratch),
            nbytes,
            stream_handle(device),
        )
    return z, kl


def backward(
    dz: Tensor | None,
    dkl: Tensor | None,
    mean: Tensor,
    logvar: Tensor,
    noise: Tensor | None,
    seed,
    offset: int,
    deterministic: bool,
    dmean: Tensor | None,
    dlogvar: Tensor | None,
) -> None:
    """Writes the gradients of :func:`forward` into dmean and dlogvar (each optional), in one pass.

    Per element, in float32, with in = (-30 <= logvar <= 20) (torch.clamp's gradient passes at the
    bounds) and std = exp(logvar / 2):
        dmean   = dz + dkl[b] * mean
        dlogvar = in ? 0.5 * dz * eps * std + 0.5 * dkl[b] * (exp(logvar) - 1) : 0
    (deterministic: no eps term). eps is ``noise``, else re-drawn in the kernel from (seed, offset),
    bit for bit the forward's. dz: None (zero) or (B, R, K) contiguous in mean's dtype; dkl: None
    (zero) or float32 (B,) contiguous; mean, logvar, noise, seed, offset, deterministic: as in the
    forward. dmean, dlogvar: None (not wanted) or (B, R, K) views with stride(2) == 1 in mean's dtype,
    possibly the two halves of one dmoments tensor; written completely, once. Reads dz, mean, logvar
    (and noise) once, each only when a wanted output needs it.
    """
    if dmean is None and dlogvar is None:
        return
    ext = require_extension()
    batch, rows, cols = mean.shape
    if mean.numel() == 0:
        return
    device = mean.device
    if deterministic:
        noise = None
    eps_needed = dlogvar is not None and dz is not None and noise is None and not deterministic
    seed_int, seed_tensor = _seed_args(seed, eps_needed, device)
    with device_guard(device):
        ext.reparam_backward(
            address(dz),
            address(dkl),
            mean.data_ptr(),
            logvar.data_ptr(),
            address(noise),
            address(dmean),
            address(dlogvar),
            batch,
            rows,
            cols,
            _strides(mean),
            _strides(logvar),
            _strides(dmean),
            _strides(dlogvar),
            dtype_code(mean),
            device.index,
            seed_int,
            address(seed_tensor),
            u64(offset),
            bool(deterministic),
            stream_handle(device),
        )
