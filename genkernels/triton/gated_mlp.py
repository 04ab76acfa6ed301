"""The MLP activations of transformer blocks (see genkernels.ops.gated_mlp for the formulas and the
interface) in Triton: gelu_tanh and swiglu, each a forward and a fused gradient kernel.

gelu_tanh: x is dense (contiguous or channels_last) and y, dy, dx share its strides, so every tensor is
walked as one flat run of numel elements in memory order, BLOCK = 2,048 per program (smaller tensors:
one program of next_pow2(numel)), loads and stores in 16-byte vectors. The tanh terms come from one
sigmoid, s = sigmoid(2u): 0.5 (1 + tanh u) = s and 1 - tanh^2 u = 4 s (1 - s), s and 1 - s each from the
accurate _math helper (exp(-|2u|) through an exact range reduction), so nothing cancels where tanh is
near +-1 and an element costs one exp and one division (SASS a thread of 8 bf16 elements on sm_90: the
forward 351, the gradient 433, against 431 and 570 from tanh and its own exp).
Memory traffic: forward x read, y written; gradient dy and x read, dx written.

swiglu: x contiguous, viewed as (R, 2, M) with R the product of the dims before ``dim`` and M = (the
size of ``dim`` / 2) * (the product of the dims after it): a = x[:, 0], b = x[:, 1], y (R, M). A program
covers ROWS rows by BLOCK columns (ROWS * BLOCK ~ 2,048) on a grid (ceil(R / ROWS), ceil(M / BLOCK)): no
division per element, and a, b, y each contiguous along a row. silu(a) = a sigmoid(a) with the sigmoid
from exp(-|a|) (no overflow). Memory traffic: forward x read once, y written once; gradient dy and x read
once, dx = [da; db] written once.

Arithmetic is float32. Offsets are 64-bit when a tensor has more than 2^31 - 2 * BLOCK elements.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genkernels.triton._common import cdiv, next_power_of_2, on_device, tl, triton, triton_unavailable

MAX_BLOCK = 2048
MAX_PROGRAMS = 2**31 - 1
MAX_GRID_Y = 65535
_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_32 = 2**31 - 2 * MAX_BLOCK


def _common_reason(x: Tensor) -> str | None:
    reason = triton_unavailable(x)
    if reason is not None:
        return reason
    if x.dtype not in _FAST_DTYPES:
        return f"x has dtype {x.dtype}; supported: float32, float16, bfloat16"
    return None


def gelu_tanh_not_supported(x: Tensor) -> str | None:
    """Why the triton backend cannot run gelu_tanh on x, or None when it can."""
    reason = _common_reason(x)
    if reason is None and cdiv(x.numel(), MAX_BLOCK) > MAX_PROGRAMS:
        return f"{x.numel()} elements: more than {MAX_PROGRAMS} programs of {MAX_BLOCK}"
    return reason


def swiglu_not_supported(x: Tensor, dim: int) -> str | None:
    """Why the triton backend cannot run swiglu on x along dim, or None when it can."""
    reason = _common_reason(x)
    if reason is not None:
        return reason
    rows, cols = _swiglu_view(x, dim)
    rb, block = _swiglu_tile(rows, cols)
    if cdiv(cols, block) > MAX_GRID_Y:
        return f"{cols} columns per half: more than {MAX_GRID_Y} programs of {block} along the grid's y"
    if cdiv(rows, rb) > MAX_PROGRAMS:
        return f"{rows} rows: more than {MAX_PROGRAMS} programs of {rb}"
    return None


# --------------------------------------------------------------------------- gelu_tanh


def _flat_launch(x: Tensor) -> tuple[tuple[int], dict]:
    n = x.numel()
    block = min(MAX_BLOCK, next_power_of_2(n))
    return (cdiv(n, block),), {
        "N": n,
        "INDEX_64": n > _INDEX_32,
        "BLOCK": block,
        "num_warps": min(8, max(1, block // 256)),
    }


def gelu_tanh_forward(x: Tensor) -> Tensor:
    """y = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) in one pass over memory order.

    x: dense (contiguous or channels_last), float32, float16 or bfloat16, numel > 0. Returns y, a new
    tensor with x's shape, strides and dtype. Never synchronizes with the host."""
    y = torch.empty_like(x)
    grid, args = _flat_launch(x)
    with on_device(x):
        _gelu_tanh_forward_kernel[grid](x, y, **args)
    return y


def gelu_tanh_grad(dy: Tensor, x: Tensor) -> Tensor:
    """dx = dy * gelu_tanh'(x) in one pass over memory order; dy has x's shape, strides and dtype.
    Returns dx like x."""
    dx = torch.empty_like(x)
    grid, args = _flat_launch(x)
    with on_device(x):
        _gelu_tanh_grad_kernel[grid](dy, x, dx, **args)
    return dx


# --------------------------------------------------------------------------- swiglu


def _swiglu_view(x: Tensor, dim: int) -> tuple[int, int]:
    """(R, M): x contiguous is (R, 2, M) in memory, the halves of ``dim`` being its middle axis."""
    rows = 1
    for s in x.shape[:dim]:
        rows *= s
    return rows, x.numel() // max(rows * 2, 1)


def _swiglu_tile(rows: int, cols: int) -> tuple[int, int]:
    block = min(MAX_BLOCK, next_power_of_2(cols))
    return min(MAX_BLOCK // block, next_power_of_2(rows)), block


def _swiglu_launch(x: Tensor, dim: int) -> tuple[tuple[int, int], dict]:
    rows, cols = _swiglu_view(x, dim)
    rb, block = _swiglu_tile(rows, cols)
    return (cdiv(rows, rb), cdiv(cols, block)), {
        "R": rows,
        "M": cols,
        "INDEX_64": x.numel() > _INDEX_32,
        "ROWS": rb,
        "BLOCK": block,
        "num_warps": min(8, max(1, rb * block // 256)),
    }


def swiglu_forward(x: Tensor, dim: int) -> Tensor:
    """y = silu(a) * b with (a, b) the halves of x along dim, in one pass.

    x: contiguous, float32, float16 or bfloat16, numel > 0, x.shape[dim] even; dim in [0, x.dim()).
    Returns y, contiguous, x's shape with dim halved, x's dtype. Never synchronizes with the host."""
    shape = list(x.shape)
    shape[dim] //= 2
    y = torch.empty(shape, device=x.device, dtype=x.dtype)
    grid, args = _swiglu_launch(x, dim)
    with on_device(x):
        _swiglu_forward_kernel[grid](x, y, **args)
    return y


def swiglu_grad(dy: Tensor, x: Tensor, dim: int) -> Tensor:
    """dx = [dy * b * silu'(a); dy * silu(a)] in one pass; dy contiguous with y's shape and x's dtype.
    Returns dx, contiguous like x."""
    dx = torch.empty_like(x)
    grid, args = _swiglu_launch(x, dim)
    with on_device(x):
        _swiglu_grad_kernel[grid](dy, x, dx, **args)
    return dx


if triton is not None:
    from genkernels.triton._math import _sigmoid_pair

    @triton.jit
    def _sigmoid_pair_for(z, x_ptr):
        """(sigmoid(z), 1 - sigmoid(z)) for a kernel reading x_ptr: through the accurate exp (:func:`_sigmoid_pair`)
        for float32 tensors; for float16 / bfloat16 ones through the hardware exp2 (tl.exp), whose error, about
        |z| float32 ulp, lies far below their rounding, in a third of the instructions. Neither cancels nor
        overflows: e = exp(-|z|) <= 1."""
        if x_ptr.dtype.element_ty == tl.float32:
            s, sc = _sigmoid_pair(z)
        else:
            e = tl.exp(-tl.abs(z))
            p = 1.0 / (1.0 + e)
            q = e * p
            pos = z >= 0.0
            s, sc = tl.where(pos, p, q), tl.where(pos, q, p)
        return s, sc

    @triton.jit
    def _flat_offsets(N, INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        if INDEX_64:
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
        return offs, offs < N

    @triton.jit
    def _gelu_tanh_forward_kernel(x_ptr, y_ptr, N, INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
        """y of BLOCK consecutive elements; grid (ceil(N / BLOCK),). Memory traffic: x read, y written once."""
        offs, mask = _flat_offsets(N, INDEX_64, BLOCK)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) (x + kappa x^3), as torch
        s, _ = _sigmoid_pair_for(2.0 * u, x_ptr)  # 0.5 (1 + tanh u) = sigmoid(2u): one exp, no cancellation
        tl.store(y_ptr + offs, (x * s).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gelu_tanh_grad_kernel(dy_ptr, x_ptr, dx_ptr, N, INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
        """dx of BLOCK consecutive elements; grid (ceil(N / BLOCK),).

        gelu_tanh'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2 / pi) (1 + 3 * 0.044715 x^2), torch's
        formula, with s = sigmoid(2u): 0.5 (1 + tanh u) = s and 1 - tanh^2 u = 4 s (1 - s) (one exp a
        element). Memory traffic: dy and x read once, dx written once."""
        offs, mask = _flat_offsets(N, INDEX_64, BLOCK)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = x * x
        u = 0.7978845608028654 * (x + 0.044715 * x2 * x)
        s, sc = _sigmoid_pair_for(2.0 * u, x_ptr)
        d = s + 2.0 * x * s * sc * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x2)
        tl.store(dx_ptr + offs, (dy * d).to(dx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_tile_offsets(R, M, INDEX_64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """(a offsets, y offsets, mask) of this program's ROWS x BLOCK tile; b is at a + M."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        if INDEX_64:
            rows = rows.to(tl.int64)
        mask = (rows < R)[:, None] & (cols < M)[None, :]
        a_offs = (rows * M * 2)[:, None] + cols[None, :]
        y_offs = (rows * M)[:, None] + cols[None, :]
        return a_offs, y_offs, mask

    @triton.jit
    def _swiglu_forward_kernel(x_ptr, y_ptr, R, M, INDEX_64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """y = silu(a) * b of a ROWS x BLOCK tile of the (R, M) output; grid (ceil(R / ROWS), ceil(M / BLOCK)).

        Memory traffic: a and b read once, y written once."""
        a_offs, y_offs, mask = _swiglu_tile_offsets(R, M, INDEX_64, ROWS, BLOCK)
        a = tl.load(x_ptr + a_offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(x_ptr + a_offs + M, mask=mask, other=0.0).to(tl.float32)
        s, _ = _sigmoid_pair_for(a, x_ptr)
        tl.store(y_ptr + y_offs, (a * s * b).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_grad_kernel(
        dy_ptr, x_ptr, dx_ptr, R, M, INDEX_64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr
    ):
        """da = dy b silu'(a), db = dy silu(a) of a ROWS x BLOCK tile, silu'(a) = s (1 + a (1 - s));
        grid as the forward's. Memory traffic: dy, a, b read once, da and db written once."""
        a_offs, y_offs, mask = _swiglu_tile_offsets(R, M, INDEX_64, ROWS, BLOCK)
        a = tl.load(x_ptr + a_offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(x_ptr + a_offs + M, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + y_offs, mask=mask, other=0.0).to(tl.float32)
        s, sc = _sigmoid_pair_for(a, x_ptr)
        tl.store(dx_ptr + a_offs, (dy * b * s * (1.0 + a * sc)).to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + a_offs + M, (dy * a * s).to(dx_ptr.dtype.element_ty), mask=mask)
