"""CUDA launchers for GroupNorm with optional fused SiLU: thin wrappers over ``genkernels._C``.

The kernels (csrc/group_norm.cu) take device addresses, sizes, dtype codes and a stream; this
module allocates the outputs and the scratch memory with torch on x's device, and launches on
torch's current stream without synchronizing (CUDA-graph capturable).

Layouts: x (N, C, *spatial) contiguous or channels-last dense (``torch.channels_last``,
``channels_last_3d`` and the same for other ranks) runs in place; y, dx keep x's layout. Other
strides are copied once to contiguous. weight and bias are (C,) in x's dtype or float32.
"""

from __future__ import annotations

import torch

from .._layout import dense_layout, image_layout, match_layout
from ._common import (
    DTYPE_CODES,
    address,
    cuda_unavailable,
    device_guard,
    dtype_code,
    require_extension,
    stream_handle,
    workspace,
)

# Bytes of L2 one batch of groups may occupy between the statistics and the normalize pass;
# 0 means half of the device's L2. Tests lower it to exercise the multi-batch path on small inputs.
L2_BUDGET_BYTES = 0


def not_supported(x, weight, bias, groups: int, eps: float, silu: bool) -> str | None:
    """Why the cuda backend cannot run this call (one line), or None when it can.

    The op module has already checked what the fast backends share (dtypes of x, weight, bias).
    """
    return cuda_unavailable(x)


def _problem(x: torch.Tensor, groups: int) -> tuple:
    """The (n, c, s, groups, channels_last, dtype, device, l2_budget) arguments of the _C launchers."""
    lay = image_layout(x)
    return (lay.n, lay.c, lay.s, groups, lay.channels_last, DTYPE_CODES[x.dtype], x.device.index, L2_BUDGET_BYTES)


def _param(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def group_norm_forward(
    x: torch.Tensor, weight, bias, groups: int, eps: float, silu: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = act((x - mean) * rstd * weight + bias) over groups of C/groups channels; act = SiLU or identity.

    Returns y (x's dtype, shape and layout) and the float32 (N, groups) mean and rstd =
    1/sqrt(var + eps) (biased variance), statistics computed in float32.
    """
    ext = require_extension()
    x = dense_layout(x)
    weight, bias = _param(weight), _param(bias)
    problem = _problem(x, groups)
    y = torch.empty_like(x)
    mean = torch.empty((x.shape[0], groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty((x.shape[0], groups), dtype=torch.float32, device=x.device)
    with device_guard(x.device):
        nbytes = ext.group_norm_forward_workspace(x.data_ptr(), y.data_ptr(), *problem)
        scratch = workspace(nbytes, x.device)
        ext.group_norm_forward(
            x.data_ptr(),
            address(weight),
            dtype_code(weight),
            address(bias),
            dtype_code(bias),
            y.data_ptr(),
            mean.data_ptr(),
            rstd.data_ptr(),
            address(scratch),
            nbytes,
            *problem,
            float(eps),
            bool(silu),
            stream_handle(x.device),
        )
    return y, mean, rstd


def group_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight,
    bias,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    groups: int,
    silu: bool,
    needs_dx: bool,
    needs_dweight: bool,
    needs_dbias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`group_norm_forward` given dy, from the saved float32 mean and rstd.

    With dz = dy * act'(z) and xhat = (x - mean) * rstd:
    dx = rstd * (dz*w - mean_g(dz*w) - xhat * mean_g(dz*w*xhat)) in x's dtype and layout,
    dweight[c] = sum_{n,s} dz * xhat and dbias[c] = sum_{n,s} dz, accumulated in float32 and
    returned in the parameter's dtype. A gradient not asked for (or of an absent parameter) is None.
    """
    ext = require_extension()
    x = dense_layout(x)
    dy = match_layout(dy, x)
    weight, bias = _param(weight), _param(bias)
    dx = torch.empty_like(x) if needs_dx else None
    dweight = torch.empty_like(weight) if needs_dweight and weight is not None else None
    dbias = torch.empty_like(bias) if needs_dbias and bias is not None else None
    if dx is None and dweight is None and dbias is None:
        return None, None, None
    mean = mean.to(torch.float32).contiguous()
    rstd = rstd.to(torch.float32).contiguous()
    problem = _problem(x, groups)
    with device_guard(x.device):
        nbytes = ext.group_norm_backward_workspace(dy.data_ptr(), x.data_ptr(), address(dx), *problem)
        scratch = workspace(nbytes, x.device)
        ext.group_norm_backward(
            dy.data_ptr(),
            x.data_ptr(),
            address(weight),
            dtype_code(weight),
            address(bias),
            dtype_code(bias),
            mean.data_ptr(),
            rstd.data_ptr(),
            address(dx),
            address(dweight),
            address(dbias),
            address(scratch),
            nbytes,
            *problem,
            bool(silu),
            stream_handle(x.device),
        )
    return dx, dweight, dbias
