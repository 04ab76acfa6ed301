"""CUDA launcher for the fused sampler step (csrc/schedule.cu): a thin wrapper over ``genkernels._C``.

Implements the fused backend interface of :mod:`genkernels.ops.schedule` (see its module docstring
for the formula, the argument conventions and the Philox noise stream). The kernel takes device
addresses, sizes, a dtype code, the coefficients and a stream; this module allocates prev (and
x0) with torch in sample's layout, plus the scratch memory of the guidance-rescale statistics, and
launches on torch's current stream without synchronizing (CUDA-graph capturable).

Every tensor is seen as a dense (B, N) array in memory order: element (b, j) at b * N + j, for
contiguous and channels_last tensors alike (the batch dim is outermost in both); a guided model
output is (2B, N) = [uncond; cond]. Dtypes: float32, float16 or bfloat16, each input its own (prev
and x0 take sample's); with one dtype throughout and 16-byte aligned tensors and N a multiple of
the vector, the kernel moves 16-byte vectors, else single elements. Coefficients are
Python floats (kernel arguments) or contiguous float32 (B,) tensors (read per sample). The seed of
the in-kernel noise is a Python int or a one-element int64 tensor on sample's device, read by the
kernel (no host synchronization).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._layout import dense_layout, match_layout
from ._common import (
    address,
    cuda_unavailable,
    device_guard,
    dtype_code,
    extension,
    require_extension,
    seed_args,
    stream_handle,
    u64,
    workspace,
)


def not_supported(
    sample: Tensor,
    model_output: Tensor | None,
    noise: Tensor | None,
    x0_prev: Tensor | None,
    coeffs,
    guidance_scale: float | None,
    guidance_rescale: float,
    clip_sample: float | None,
) -> str | None:
    """Why the cuda backend cannot run this step (one line), or None when it can.

    The op has validated shapes, devices and the shared dtype rules (ops/schedule.py's
    _fast_not_supported runs first); what remains is the extension and the GPU.
    """
    if sample.device.type != "cuda":
        return f"sample is on {sample.device.type}: the cuda backend needs CUDA tensors"
    reason = cuda_unavailable(sample)
    if reason is not None:
        return reason
    if not hasattr(extension(), "schedule_step"):
        return "genkernels._C was built without the schedule_step kernel: rebuild the extension"
    return None


def schedule_step(
    sample: Tensor,
    model_output: Tensor | None,
    noise: Tensor | None,
    x0_prev: Tensor | None,
    coeffs,
    guidance_scale: float | None,
    guidance_rescale: float,
    clip_sample: float | None,
    seed,
    offset: int,
    return_x0: bool,
) -> tuple[Tensor, Tensor | None]:
    """One fused step: prev (and the clipped x0 when return_x0), each in sample's dtype, shape and layout.

    Per element of the flat (B, N) view, in float32 (each coefficient a float or its sample's entry):
        out  = model_output (0 when None); guided (guidance_scale not None), out = u + g (c - u) with
               u, c the two halves of the (2B, *) model output
        out *= phi * std(c) / std(out) + (1 - phi) per sample, when phi = guidance_rescale > 0
               (unbiased stds over the sample's N elements; a first statistics pass reads the model
               output once more)
        x0   = px x + po out, clamped to [-clip_sample, clip_sample] when clip_sample is not None
        eps  = ex x + e0 x0
        prev = cx x + c0 x0 + ce eps + cn noise + cp x0_prev
    noise: the tensor, else (seed not None) the Philox stream keyed by (seed, offset), else no
    noise term; x0_prev: no term when None. sample, model_output, noise, x0_prev: float32, float16
    or bfloat16 (each its own), contiguous or channels_last (others are copied once into sample's).
    """
    ext = require_extension()
    sample = dense_layout(sample)
    model_output, noise, x0_prev = (
        None if t is None else match_layout(t, sample) for t in (model_output, noise, x0_prev)
    )
    prev = torch.empty_like(sample)
    x0 = torch.empty_like(sample) if return_x0 else None
    batch = sample.shape[0]
    if sample.numel() == 0:
        return prev, x0
    n = sample.numel() // batch
    values, arrays = [], []
    for value in coeffs.values():  # px, po, ex, e0, cx, c0, ce, cn, cp: the order the kernel takes them in
        if isinstance(value, Tensor):
            value = value.to(device=sample.device, dtype=torch.float32).contiguous()
            arrays.append(value)
            values.append(0.0)
        else:
            arrays.append(None)
            values.append(float(value))
    guided = guidance_scale is not None
    rescale = guided and guidance_rescale > 0
    philox = noise is None and seed is not None
    seed_int, seed_tensor = seed_args(seed, sample.device) if philox else (0, None)
    codes = (dtype_code(sample), dtype_code(model_output), dtype_code(noise), dtype_code(x0_prev))
    problem = (batch, n, *codes, sample.device.index)
    with device_guard(sample.device):
        nbytes = ext.schedule_step_workspace(address(model_output), *problem, guided, rescale)
        scratch = workspace(nbytes, sample.device)
        ext.schedule_step(
            sample.data_ptr(),
            address(model_output),
            address(noise),
            address(x0_prev),
            prev.data_ptr(),
            address(x0),
            values,
            [address(a) for a in arrays],
            *problem,
            guided,
            float(guidance_scale) if guided else 0.0,
            rescale,
            float(guidance_rescale),
            clip_sample is not None,
            float(clip_sample) if clip_sample is not None else 0.0,
            philox,
            seed_int,
            address(seed_tensor),
            u64(offset),
            address(scratch),
            nbytes,
            stream_handle(sample.device),
        )
    return prev, x0
