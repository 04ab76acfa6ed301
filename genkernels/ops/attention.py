"""Scaled dot-product attention: reference, validation, autograd, dispatch and torch.library ops.

For queries q (B, Hq, Lq, D), keys k and values v (B, Hkv, Lkv, D), query head h reading kv
head h // (Hq / Hkv) (grouped-query attention; Hkv = Hq is plain multi-head, Hkv = 1 multi-query):

    s[i, j]   = scale * q[i] . k[j]                         (scale defaults to 1 / sqrt(D))
    allowed   = key j is not padding, and (not causal or j <= i + Lkv - Lq)
    p[i, :]   = softmax of s[i, j] over the allowed j
    out[i]    = sum_j p[i, j] v[j]
    lse[i]    = log sum_{allowed j} exp(s[i, j])            (natural log, saved for the backward)

Causal masking is aligned to the bottom right, as in FlashAttention 2.1 and later: the last
query sees every key. With Lq = Lkv that is the usual lower-triangular mask; with Lq < Lkv
(decoding with a KV cache) the queries are the last Lq positions; with Lq > Lkv the first
Lq - Lkv queries see no key. A query row with no allowed key (all its keys padding, or
above the causal diagonal) outputs zeros and gets zero gradients.

Scores, softmax statistics and every dot product accumulate in float32 (float64 for float64
inputs) whatever the input dtype.
"""

from __future__ import annotations

import math

import torch

from .. import _autograd, _registry
from .._checks import is_finite_real
from .._layout import contiguous_or_none, heads_inner, heads_like
from ..cuda import attention as _cuda
from ..triton import attention as _triton

OP = "attention"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- validation


def _check(q, k, v, causal, scale, key_padding_mask) -> None:
    """Raise a clear error naming the argument for anything the op does not accept."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (B, H, L, D), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all tensors must be on one device")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: q, k and v must share one dtype")
    b, hq, _, d = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape (B, Hkv, Lkv, D), got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if k.shape[0] != b:
        raise ValueError(f"batch sizes differ: q has B={b}, k and v have B={k.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"head dims differ: q has D={d}, k and v have D={k.shape[3]}")
    hkv = k.shape[1]
    if hkv < 1 or hq % hkv:
        raise ValueError(
            f"the number of query heads (q.shape[1] = {hq}) must be a multiple of the number of key/value heads "
            f"(k.shape[1] = {hkv})"
        )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if scale is not None and not is_finite_real(scale):
        raise ValueError(f"scale must be None or a finite float, got {scale!r}")
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool torch.Tensor or None, got {type(m).__name__}")
        if m.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must have dtype torch.bool (True = padding, ignored), got {m.dtype}")
        if tuple(m.shape) != (b, k.shape[2]):
            raise ValueError(f"key_padding_mask must have shape (B, Lkv) = ({b}, {k.shape[2]}), got {tuple(m.shape)}")
        if m.device != q.device:
            raise ValueError(
                f"key_padding_mask is on {m.device} but q is on {q.device}: all tensors must be on one device"
            )


def _fast_not_supported(q) -> str | None:
    """Reasons shared by the triton and cuda backends (their own checks follow)."""
    if q.dtype not in _FAST_DTYPES:
        return f"q has dtype {q.dtype}; supported: float16, bfloat16, float32 (float64 runs on the reference only)"
    return None


def _default_scale(head_dim: int) -> float:
    """1 / sqrt(D); 1.0 for D = 0, whose out (B, Hq, Lq, 0) has no element for a scale to change."""
    return 1.0 / math.sqrt(head_dim) if head_dim else 1.0


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    """t with stride 1 along its last dimension (the one layout requirement of the fast kernels)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _in_q_order(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """out (B, Hq, Lq, D) in q's memory order (:func:`genkernels._layout.heads_like`), as the fast backends
    write it: copied into heads-inner memory where q's heads are inner and out's are not."""
    if heads_inner(q) and not heads_inner(out):
        return out.transpose(1, 2).contiguous().transpose(1, 2)
    return out


# --------------------------------------------------------------------------- reference


def _acc_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _allowed(q, k, causal, key_padding_mask) -> torch.Tensor | None:
    """Boolean (B or 1, 1, Lq, Lkv) mask of the (query, key) pairs that take part, or None for all."""
    lq, lkv = q.shape[2], k.shape[2]
    allowed = None
    if causal:
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lkv, device=q.device)[None, :]
        allowed = (j <= i + (lkv - lq))[None, None]
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]
        allowed = keep if allowed is None else allowed & keep
    return allowed


def _expand_heads(t: torch.Tensor, hq: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hq, L, D): query head h reads kv head h // (Hq / Hkv)."""
    return t if t.shape[1] == hq else t.repeat_interleave(hq // t.shape[1], dim=1)


def _reference_scores(q, k, scale, causal, key_padding_mask):
    """Masked scores (-inf where not allowed) in the accumulation dtype, and the allowed mask."""
    acc = _acc_dtype(q)
    s = torch.matmul(q.to(acc), _expand_heads(k, q.shape[1]).to(acc).transpose(-1, -2)) * scale
    allowed = _allowed(q, k, causal, key_padding_mask)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s, allowed


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The specification: naive softmax(q k^T * scale) v in eager PyTorch, float32 inside (float64 for float64).

    Same arguments and semantics as :func:`attention` (no validation). It materializes the
    (B, Hq, Lq, Lkv) score matrix, is differentiable by autograd to any order, and returns out
    in q's dtype. Rows with no allowed key give zeros and zero gradients (no NaN).
    """
    scale = _default_scale(q.shape[-1]) if scale is None else float(scale)
    s, allowed = _reference_scores(q, k, scale, causal, key_padding_mask)
    if allowed is not None:
        # A row with no allowed key: softmax over finite stand-in scores, then zeroed, so that
        # neither the output nor any gradient sees the NaN of a softmax over -inf only.
        any_key = allowed.any(-1, keepdim=True)
        p = torch.softmax(torch.where(any_key, s, torch.zeros_like(s)), dim=-1) * any_key
    else:
        p = torch.softmax(s, dim=-1)
    out = torch.matmul(p, _expand_heads(v, q.shape[1]).to(s.dtype))
    return out.to(q.dtype)


def _keeps_residual(q: torch.Tensor, keep_residual: bool) -> bool:
    """Whether a forward keeps out's rounding residual: for a backward, with 16-bit inputs."""
    return keep_residual and q.dtype in (torch.float16, torch.bfloat16)


def _reference_forward(q, k, v, causal, scale, key_padding_mask, keep_residual=False):
    """(out, lse, out's rounding residual or None) by the reference formulas, behind the fast backends' interface."""
    s, _ = _reference_scores(q, k, scale, causal, key_padding_mask)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    out_acc = torch.matmul(p, _expand_heads(v, q.shape[1]).to(s.dtype))
    out = _in_q_order(out_acc.to(q.dtype), q)
    residual = (out_acc - out.to(s.dtype)).to(q.dtype).contiguous() if _keeps_residual(q, keep_residual) else None
    return out, lse.contiguous(), residual


def _group_sum(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, Hq, L, D) -> (B, Hkv, L, D): the sum over the query heads sharing each kv head."""
    b, hq, length, d = t.shape
    return t if hq == hkv else t.reshape(b, hkv, hq // hkv, length, d).sum(2)


def _reference_backward(dout, q, k, v, out, lse, causal, scale, key_padding_mask, out_residual=None):
    """The backward formulas the fused kernels implement (FlashAttention-2), in the accumulation dtype.

    p = exp(s - lse) (0 where not allowed), delta_i = dout_i . (out_i + out_residual_i), dP = dout v^T,
    dS = p (dP - delta), dq = scale dS k, dk = scale dS^T q, dv = p^T dout (dk, dv summed over
    the query heads of each kv head).
    """
    acc = _acc_dtype(q)
    hq, hkv = q.shape[1], k.shape[1]
    s, _ = _reference_scores(q, k, scale, causal, key_padding_mask)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(acc)[..., None])
    do = dout.to(acc)
    out_full = out.to(acc) if out_residual is None else out.to(acc) + out_residual.to(acc)
    delta = (do * out_full).sum(-1, keepdim=True)
    dp = torch.matmul(do, _expand_heads(v, hq).to(acc).transpose(-1, -2))
    ds = p * (dp - delta)
    dq = torch.matmul(ds, _expand_heads(k, hq).to(acc)) * scale
    dk = _group_sum(torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale, hkv)
    dv = _group_sum(torch.matmul(p.transpose(-1, -2), do), hkv)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


class _ReferenceKernels:
    """The reference formulas behind the same interface as the fast backends (used by the traced op)."""

    attention_forward = staticmethod(_reference_forward)
    attention_backward = staticmethod(_reference_backward)


# --------------------------------------------------------------------------- registry


def _public_args(q, k, v, causal=False, scale=None, key_padding_mask=None):
    scale = _default_scale(q.shape[-1]) if scale is None else float(scale)
    return q, k, v, causal, scale, key_padding_mask


def _wrap(backend_not_supported):
    """A not_supported taking the public arguments (as `genkernels.explain` passes them)."""

    def not_supported(*args, needs_grad: bool | None = None, **kwargs) -> str | None:
        q, k, v, causal, scale, key_padding_mask = _public_args(*args, **kwargs)
        reason = _fast_not_supported(q)
        if reason is not None:
            return reason
        if needs_grad is None:
            needs_grad = _needs_grad(q, k, v)
        return backend_not_supported(q, k, v, causal, scale, key_padding_mask, needs_grad)

    return not_supported


# Dispatch order: triton first. The one comparison on a GPU, the forward at head dim 72 on an H200, found the CUDA
# kernel slower (945 us against 602 us; README, run 5); triton also has the backward, and its kernels are exercised
# by the test suite on every machine, through the interpreter, while the CUDA kernel runs only on a GPU.
_registry.register(OP, "triton", _wrap(_triton.not_supported), _triton)
_registry.register(OP, "cuda", _wrap(_cuda.not_supported), _cuda)
_registry.register(OP, "reference", lambda *a, **k: None, _ReferenceKernels)


def _probe(device: torch.device) -> tuple:
    """Arguments of a typical call, for `genkernels.info()`."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, 2, 64, 64, device=device, dtype=dtype)
    return (q, q, q, {"causal": True})


_registry.register_probe(OP, _probe)


def _select(backend, q, k, v, causal, scale, key_padding_mask, needs_grad) -> _registry.Backend:
    """The backend that runs this call: for empty inputs (no query or no key) the reference, without a launch,
    once an explicit backend has said it can run the call."""
    args = (OP, q, k, v, causal, scale, key_padding_mask)
    if min(q.numel(), k.numel()) == 0:
        _registry.check_explicit(*args, needs_grad=needs_grad, backend=backend or None)
        return _registry.backends_of(OP)[-1]
    return _registry.select(*args, needs_grad=needs_grad, backend=backend or None)


# --------------------------------------------------------------------------- autograd (eager path)


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal, scale, needs_grad, impl):
        out, lse, residual = impl.attention_forward(q, k, v, causal, scale, key_padding_mask, needs_grad)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, residual)
        ctx.causal, ctx.scale, ctx.impl = causal, scale, impl
        return out

    @staticmethod
    @_autograd.first_order_only(OP)  # create_graph=True: an explicit error, never a silent zero
    def backward(ctx, dout):
        q, k, v, out, lse, key_padding_mask, residual = ctx.saved_tensors
        dq, dk, dv = ctx.impl.attention_backward(
            _last_dim_unit(dout), q, k, v, out, lse, ctx.causal, ctx.scale, key_padding_mask, residual
        )
        return dq, dk, dv, None, None, None, None, None


# --------------------------------------------------------------------------- torch.library ops (traced path)


# Explicit schemas: torch 2.4 cannot infer them from postponed (string) annotations.
@torch.library.custom_op(
    "genkernels::attention",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, float scale, bool needs_grad,"
    " str backend) -> (Tensor, Tensor, Tensor)",
)
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    needs_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, out's rounding residual); custom ops cannot return None: an empty residual is none."""
    q, k, v = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v)
    key_padding_mask = contiguous_or_none(key_padding_mask)
    impl = _select(backend, q, k, v, causal, scale, key_padding_mask, needs_grad).impl
    out, lse, residual = impl.attention_forward(q, k, v, causal, scale, key_padding_mask, needs_grad)
    return out, lse, q.new_empty((0,)) if residual is None else residual


@_attention_op.register_fake
def _(q, k, v, key_padding_mask, causal, scale, needs_grad, backend):
    residual = q.new_empty(q.shape if _keeps_residual(q, needs_grad) else (0,))
    return heads_like(_last_dim_unit(q)), q.new_empty(q.shape[:3], dtype=_acc_dtype(q)), residual


@torch.library.custom_op(
    "genkernels::attention_backward",
    mutates_args=(),
    schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor out_residual,"
    " Tensor? key_padding_mask, bool causal, float scale, str backend) -> (Tensor, Tensor, Tensor)",
)
def _attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    out_residual: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, dout = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v), _last_dim_unit(dout)
    key_padding_mask = contiguous_or_none(key_padding_mask)
    impl = _select(backend, q, k, v, causal, scale, key_padding_mask, True).impl
    residual = out_residual if out_residual.numel() else None
    return impl.attention_backward(dout, q, k, v, out, lse, causal, scale, key_padding_mask, residual)


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, out_residual, key_padding_mask, causal, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, _needs_grad_flag, backend = inputs
    out, lse, residual = output
    ctx.save_for_backward(q, k, v, out, lse, residual, key_padding_mask)
    ctx.args = (causal, scale, backend)


def _backward(ctx, dout, _dlse, _dresidual):
    q, k, v, out, lse, residual, key_padding_mask = ctx.saved_tensors
    causal, scale, backend = ctx.args
    dq, dk, dv = _attention_backward_op(dout, q, k, v, out, lse, residual, key_padding_mask, causal, scale, backend)
    return dq, dk, dv, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public op


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Fused scaled dot-product attention: out = softmax(q k^T * scale, masked) v.

    Args:
        q: (B, Hq, Lq, D) queries.
        k, v: (B, Hkv, Lkv, D) keys and values; Hq must be a multiple of Hkv (grouped-query
            attention: query head h reads kv head h // (Hq / Hkv)). Lkv may differ from Lq
            (cross-attention, e.g. 4096 image tokens over 77 text tokens).
        causal: mask key j for query i unless j <= i + Lkv - Lq (bottom-right aligned: the last
            query sees every key; with Lq > Lkv the first Lq - Lkv queries see none).
        scale: multiplies the scores; default 1 / sqrt(D).
        key_padding_mask: optional bool (B, Lkv), True where a key is padding and must be ignored
            (as in torch.nn.MultiheadAttention). A query with no key left outputs zeros.
        backend: "auto" / None (the first backend that can run the call), "reference", "triton"
            or "cuda". An explicit backend that cannot run the call raises UnsupportedError.

    Dtypes: float16 and bfloat16 on every backend; float32 on the reference and triton (IEEE
    float32 dot products, no TF32); float64 on the reference. q, k and v share one dtype and
    device. Any strides work (the (B, L, H, D) -> (B, H, L, D) transposed views that
    attention layers make run in place); a tensor whose last dimension is not contiguous is
    copied once. Empty inputs (B, Hq, Lq, Lkv or D of 0) launch nothing: out is empty, or zeros
    where only Lkv is 0 (no key to attend to).

    Returns out (B, Hq, Lq, D) in q's dtype and memory order: where q's heads are inner to its
    positions (a (B, Lq, Hq, D) tensor viewed through ``.transpose(1, 2)``, as a linear layer's output
    split in heads is), so are out's, and ``out.transpose(1, 2).reshape(B, Lq, Hq * D)`` merges the
    heads without a copy (as scaled_dot_product_attention's flash backend returns it); else out is
    contiguous. Differentiable in q, k and v: the
    fast backends save the float32 log-sum-exp of each row (and, for 16-bit inputs, out's
    rounding residual, so that the backward's delta = dout . out is that of the float32 output)
    and recompute the scores in a fused, deterministic backward (no atomics), first order only;
    the reference differentiates to any order. The cuda backend runs the forward only: calls
    that need gradients go to triton.
    """
    _check(q, k, v, causal, scale, key_padding_mask)
    scale = _default_scale(q.shape[-1]) if scale is None else float(scale)
    needs_grad = _needs_grad(q, k, v)
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v, key_padding_mask, causal, scale, needs_grad, backend or "")[0]
    q, k, v = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v)
    chosen = _select(backend, q, k, v, causal, scale, key_padding_mask, needs_grad)
    if chosen.name == "reference":  # empty inputs too: no launch, and autograd still gives zero gradients
        return _in_q_order(attention_reference(q, k, v, causal, scale, key_padding_mask), q)
    return _autograd.apply(
        _AttentionFunction, q, k, v, contiguous_or_none(key_padding_mask), causal, scale, needs_grad, chosen.impl
    )


_registry.register_check(OP, attention, _check)
