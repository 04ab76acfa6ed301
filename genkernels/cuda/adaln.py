"""CUDA launchers for adaptive LayerNorm (csrc/adaln.cu): a thin wrapper over ``genkernels._C``.

Implements the fused backend interface of :mod:`genkernels.ops.adaln` (see its module docstring for the
formulas, the 2-D row views and what each function returns): layer_norm_modulate, gated_residual and
gated_residual_layer_norm_modulate, forward and backward. Every tensor is an (S, D) view with unit stride
along D and any row stride; the residual's y is read in x's dtype (one in another dtype is converted once:
fused_y_not_supported declines a y that x's dtype does not hold exactly); a modulation (shift, scale, gate)
has a row per token (S = R) or per sample (S = R // tokens), in x's dtype or float32; weight and bias are
contiguous (D,), both float32 or both in x's dtype.

A row of D <= 4096 elements lives in the registers of a group of 32 to 1024 threads (one 8-element vector a
thread, 16 bytes of fp16 / bf16 or two 16-byte accesses of float32, when D and every row stride are multiples
of 8 and every pointer is 16-byte aligned; else up to 4 single elements a thread); statistics are float32,
two exact passes over the row. The backward recomputes xhat from the saved mean and rstd and writes the input
gradient in one pass over the rows; dweight, dbias and the per-sample dshift, dscale and dgate are summed
from float32 per-block partials in a fixed order (deterministic, no atomics). Launches on torch's current
stream without synchronizing (CUDA-graph capturable).
"""

from __future__ import annotations

import torch
from torch import Tensor

from genkernels._adaln_interface import AdalnInterface

from ._common import MAX_BLOCKS, device_guard, dtype_code, kernels_unavailable, require_extension, stream_handle

# The longest row the kernels take (kAdalnMaxDim in csrc/include/genkernels/adaln.cuh).
MAX_DIM = 4096

_SYMBOLS = ("adaln_forward", "adaln_backward_workspace", "adaln_backward")
_ABSENT = (0, 0, 0, False)


def not_supported(x: Tensor) -> str | None:
    """Why the cuda backend cannot run an adaLN call on ``x`` (one line), or None when it can.

    x: the public (B, L, D) input; the op has checked its dtype (float32, float16, bfloat16), the shapes
    and the devices. What remains is the device, the extension, D (at most 4096) and the grid (at most
    2^31 - 1 blocks of up to 4 rows)."""
    reason = kernels_unavailable(x, "x", "adaln", _SYMBOLS)
    if reason is not None:
        return reason
    d = x.shape[-1]
    if d > MAX_DIM:
        return f"D = {d}: the cuda adaln kernels take rows of at most {MAX_DIM} elements"
    if x.numel() // max(d, 1) > MAX_BLOCKS:
        return f"{x.numel() // max(d, 1)} rows: more than 2^31 - 1 blocks"
    return None


def fused_y_not_supported(x: Tensor, y: Tensor) -> str | None:
    """Why the cuda backend cannot run the fused residual + norm on a branch output y in another dtype than x's, or
    None: its kernels read y in x's dtype, so a y that x's dtype holds exactly (a float16 or bfloat16 y with a
    float32 x) is converted once, and a wider one (a float32 y with a bfloat16 x) is declined rather than rounded
    before the residual add."""
    if torch.promote_types(x.dtype, y.dtype) != x.dtype:
        return (
            f"y is {y.dtype}, x {x.dtype}: the cuda adaln kernels read y in x's dtype, which would round y before "
            "the residual add"
        )
    return None


def _in_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The residual's y in x's dtype (the kernels' big-tensor dtype): a conversion where y has another (exact: the
    op sends no wider y, fused_y_not_supported)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _rows(t: Tensor | None, rows: int) -> tuple[int, int, int, bool]:
    """An (S, D) tensor as ``_C`` takes it: (address, row stride, dtype code, per token (S == R))."""
    if t is None:
        return _ABSENT
    return (t.data_ptr(), t.stride(0), dtype_code(t), t.shape[0] == rows)


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _problem(x: Tensor, tokens: int) -> dict:
    rows, dim = x.shape
    return {"rows": rows, "tokens": int(tokens), "dim": dim, "dtype": dtype_code(x), "device": x.device.index}


def _param_dtype(weight: Tensor | None, bias: Tensor | None) -> int:
    """The dtype code of weight and bias (one dtype for both; float32's when both are absent)."""
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise ValueError(f"weight and bias must share a dtype, got {weight.dtype} and {bias.dtype}")
    return dtype_code(weight if weight is not None else bias)


def _forward(x, res, gate, weight, bias, shift, scale, tokens, eps, rms, norm, stats=True):
    """One forward launch; returns (h or None, out or None, mean or None, rstd or None)."""
    ext = require_extension()
    rows, dim = x.shape
    device = x.device
    res = _in_dtype(res, x.dtype)
    h = x.new_empty((rows, dim)) if res is not None else None
    out = x.new_empty((rows, dim)) if norm else None
    mean = x.new_empty((rows,), dtype=torch.float32) if norm and stats else None  # null: the kernel skips it
    rstd = x.new_empty((rows,), dtype=torch.float32) if norm and stats else None
    with device_guard(device):
        ext.adaln_forward(
            _rows(x, rows),
            _rows(res, rows),
            _rows(gate, rows),
            _address(weight),
            _address(bias),
            _rows(shift, rows),
            _rows(scale, rows),
            _rows(h, rows),
            _rows(out, rows),
            _address(mean),
            _address(rstd),
            eps=float(eps),
            rms=bool(rms),
            norm=norm,
            stream=stream_handle(device),
            param_dtype=_param_dtype(weight, bias),
            **_problem(x, tokens),
        )
    return h, out, mean, rstd


def _grad_target(t: Tensor | None, need: bool, rows: int, dim: int, device, elementwise: bool = True) -> Tensor | None:
    """The gradient of modulation ``t``: (R, D) in t's dtype when per token (None when ``elementwise`` is
    False: dshift, which the op takes from dy), float32 (S, D) per sample; None when not needed or absent."""
    if t is None or not need:
        return None
    if t.shape[0] == rows:
        return torch.empty((rows, dim), dtype=t.dtype, device=device) if elementwise else None
    return torch.empty((t.shape[0], dim), dtype=torch.float32, device=device)


def _backward(h, dout, dh, res, gate, weight, bias, shift, scale, mean, rstd, tokens, rms, norm, needs):
    """One backward launch (genkernels._adaln_interface's backward). needs: (dx, dres, dgate, dweight, dbias,
    dshift, dscale) booleans. Returns the gradients in that order (None where not needed or absent)."""
    need_dx, need_dres, need_dgate, need_dweight, need_dbias, need_dshift, need_dscale = needs
    rows, dim = dout.shape
    device = dout.device
    res_dtype = None if res is None else res.dtype
    res = _in_dtype(res, dout.dtype)
    dx = torch.empty((rows, dim), dtype=dout.dtype, device=device) if need_dx else None
    dres = torch.empty((rows, dim), dtype=dout.dtype, device=device) if need_dres and res is not None else None
    dgate = _grad_target(gate, need_dgate, rows, dim, device)
    dshift = _grad_target(shift, need_dshift, rows, dim, device, elementwise=False)
    dscale = _grad_target(scale, need_dscale, rows, dim, device)
    dweight = torch.empty(dim, dtype=torch.float32, device=device) if need_dweight and weight is not None else None
    dbias = torch.empty(dim, dtype=torch.float32, device=device) if need_dbias and bias is not None else None
    outputs = (dx, dres, dgate, dweight, dbias, dshift, dscale)
    if all(t is None for t in outputs):
        return outputs
    ext = require_extension()
    problem = _problem(dout, tokens)
    sums = [dweight, dbias] + [t for t in (dshift, dscale, dgate) if t is not None and t.shape[0] != rows]
    quantities = sum(t is not None for t in sums)
    with device_guard(device):
        nbytes = ext.adaln_backward_workspace(quantities=quantities, **problem) if quantities else 0
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None
        ext.adaln_backward(
            _rows(h, rows),
            _rows(dout, rows),
            _rows(dh, rows),
            _rows(res, rows),
            _rows(gate, rows),
            _address(weight),
            _address(bias),
            _rows(shift, rows),
            _rows(scale, rows),
            _address(mean),
            _address(rstd),
            _rows(dx, rows),
            _rows(dres, rows),
            _rows(dshift, rows),
            _rows(dscale, rows),
            _rows(dgate, rows),
            _address(dweight),
            _address(dbias),
            _address(workspace),
            nbytes,
            rms=bool(rms),
            norm=h is not None,
            stream=stream_handle(device),
            param_dtype=_param_dtype(weight, bias),
            **problem,
        )
    if dres is not None and dres.dtype != res_dtype:  # y in another dtype than x's: its gradient in y's
        outputs = (dx, dres.to(res_dtype), *outputs[2:])
    return outputs


# layer_norm_modulate_forward / _backward, gated_residual_forward / _backward and
# gated_residual_layer_norm_modulate_forward / _backward, over the two launches above.
AdalnInterface(_forward, _backward).bind(globals())
