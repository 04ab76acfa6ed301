"""Drop-in functions: torch.nn.functional's names, arguments and semantics on the fused ops.

``from genkernels.nn import functional as GF`` then ``GF.scaled_dot_product_attention(q, k, v, ...)``
wherever ``F.scaled_dot_product_attention(q, k, v, ...)`` was called.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _registry
from ..ops.attention import OP as ATTENTION_OP
from ..ops.attention import attention

__all__ = ["scaled_dot_product_attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# torch.nn.functional.scaled_dot_product_attention takes enable_gqa from torch 2.5 on.
_TORCH_HAS_ENABLE_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def _requested(backend: str | None) -> str:
    return _registry.requested(backend, ATTENTION_OP)


# torch._dynamo.assume_constant_result(_requested), spelled out because importing torch._dynamo
# costs a second at `import genkernels`: torch.compile cannot trace the scope's ContextVar, so a
# traced call reads the scope and environment once, when it is traced.
_requested._dynamo_marked_constant = True


class _Plan:
    """How a call maps onto genkernels.ops.attention: 4-D views and the op's arguments."""

    def __init__(self, q, k, v, kpm, causal):
        self.q, self.k, self.v, self.kpm, self.causal = q, k, v, kpm, causal


def _check_valid(query, key, value, attn_mask, enable_gqa) -> None:
    """Errors torch itself raises for these arguments (on every path, so both paths fail alike)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scaled_dot_product_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise RuntimeError(
                f"scaled_dot_product_attention: {name} must have at least 2 dimensions (N, ..., L, E), "
                f"got shape {tuple(t.shape)}"
            )
    if not query.dtype == key.dtype == value.dtype:
        raise RuntimeError(
            f"scaled_dot_product_attention: query, key and value must share one dtype, got query {query.dtype}, "
            f"key {key.dtype} and value {value.dtype}"
        )
    if query.dtype not in _DTYPES:
        raise RuntimeError(
            "scaled_dot_product_attention: query, key and value must be float16, bfloat16, float32 or float64, "
            f"got {query.dtype}"
        )
    if not query.device == key.device == value.device:
        raise RuntimeError(
            f"scaled_dot_product_attention: query, key and value must be on one device, got query {query.device}, "
            f"key {key.device} and value {value.device}"
        )
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError(
            f"scaled_dot_product_attention: query and key must have the same embedding size E (last dimension), "
            f"got query {tuple(query.shape)} and key {tuple(key.shape)}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise RuntimeError(
            f"scaled_dot_product_attention: key and value must have the same sequence length S (dimension -2), "
            f"got key {tuple(key.shape)} and value {tuple(value.shape)}"
        )
    if enable_gqa and min(query.dim(), key.dim(), value.dim()) >= 3:
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk == 0 or hv == 0 or hq % hk or hq % hv:
            raise RuntimeError(
                f"scaled_dot_product_attention: with enable_gqa=True the number of heads (dimension -3) of key "
                f"({hk}) and value ({hv}) must divide that of query ({hq})"
            )
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(
            f"scaled_dot_product_attention: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}"
        )
    if attn_mask is not None and attn_mask.device != query.device:
        raise RuntimeError(
            f"scaled_dot_product_attention: attn_mask is on {attn_mask.device} but query is on {query.device}"
        )


def _plan(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> _Plan | str:
    """The op's arguments computing exactly torch's result, or why the op cannot (a one-line reason)."""
    if dropout_p != 0.0:
        return f"dropout_p={dropout_p}; accepted: 0.0 (attention dropout is not fused)"
    if query.shape[-1] != value.shape[-1]:
        return (
            f"value's embedding size Ev={value.shape[-1]} differs from query's E={query.shape[-1]}; accepted: Ev == E"
        )
    if attn_mask is not None and is_causal:
        return "attn_mask is given together with is_causal=True; accepted: one of them"
    length, source = query.shape[-2], key.shape[-2]
    if is_causal and length != source:
        return (
            f"is_causal=True with L={length} queries and S={source} keys (torch aligns the causal mask to the top "
            "left); accepted: is_causal with L == S"
        )
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        return f"attn_mask has dtype {attn_mask.dtype}; accepted: None or a bool key padding mask"

    # At least 3-D, so that dimension -3 is the head dimension and the dimensions before it the batch.
    q, k, v = (t if t.dim() >= 3 else t.unsqueeze(0) for t in (query, key, value))
    batch = q.shape[:-3]
    try:
        if torch.broadcast_shapes(batch, k.shape[:-3], v.shape[:-3]) != batch:
            return (
                f"key {tuple(key.shape)} and value {tuple(value.shape)} broadcast the batch dimensions of query "
                f"{tuple(query.shape)} to a larger shape; accepted: key/value batch dimensions broadcastable to "
                "query's"
            )
    except RuntimeError:
        raise _shape_error(query, key, value) from None
    hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
    if hk != hv:
        return f"key has {hk} heads and value {hv}; accepted: the same number of heads"
    if hk != hq and not enable_gqa and hk != 1:
        if hq == 1:
            return f"query has 1 head and key/value {hk}; accepted: as many query heads as key/value heads, or more"
        raise _shape_error(query, key, value)
    k = k.expand(*batch, *k.shape[-3:])
    v = v.expand(*batch, *v.shape[-3:])
    nb = math.prod(batch)
    q = q.reshape(nb, hq, length, q.shape[-1])
    k = k.reshape(nb, hk, source, k.shape[-1])
    v = v.reshape(nb, hk, source, v.shape[-1])

    kpm = None
    if attn_mask is not None:
        full = (*batch, hq, length, source)
        try:
            if attn_mask.dim() > len(full) or torch.broadcast_shapes(attn_mask.shape, full) != full:
                raise RuntimeError
        except RuntimeError:
            raise RuntimeError(
                f"scaled_dot_product_attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                f"the attention weights {full} (N, ..., L, S)"
            ) from None
        if attn_mask.dim() >= 2 and attn_mask.shape[-2] > 1 and attn_mask.stride(-2) == 0:
            # Expanded along the queries (a padding mask (N, 1, 1, S) .expand(N, 1, L, S)): one row for all.
            attn_mask = attn_mask[..., :1, :]
        shape = (1,) * (len(full) - attn_mask.dim()) + tuple(attn_mask.shape)
        if shape[-2] != 1:
            return (
                f"attn_mask of shape {tuple(attn_mask.shape)} has a row per query (dimension -2); accepted: "
                f"None or a bool key padding mask, constant along dimension -2 (shape (N, 1, 1, S), (1, 1, 1, S), "
                f"(S,), ... with S = {source}, or one expanded to L rows with stride 0)"
            )
        keep = attn_mask.reshape(shape).expand(*batch, shape[-3], 1, source).reshape(nb, shape[-3], source)
        if shape[-3] == 1:
            keep = keep[:, 0]
        else:
            # A mask per head: each head becomes a batch entry of its own, with its kv head.
            keep = keep.reshape(nb * hq, source)
            q = q.reshape(nb * hq, 1, length, q.shape[-1])
            k, v = (_per_query_head(t, hq) for t in (k, v))
        kpm = (~keep).contiguous()
    return _Plan(q, k, v, kpm, bool(is_causal))


def _per_query_head(t: torch.Tensor, hq: int) -> torch.Tensor:
    """(B, Hkv, S, E) -> (B * Hq, 1, S, E): the kv head h // (Hq / Hkv) of each query head h."""
    b, hkv, s, e = t.shape
    return t[:, :, None].expand(b, hkv, hq // hkv, s, e).reshape(b * hq, 1, s, e)


def _shape_error(query, key, value) -> RuntimeError:
    return RuntimeError(
        f"scaled_dot_product_attention: the shapes of query {tuple(query.shape)}, key {tuple(key.shape)} and "
        f"value {tuple(value.shape)} do not broadcast (heads differ: pass enable_gqa=True for grouped-query "
        "attention)"
    )


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention on genkernels.ops.attention where it computes the same.

    out = softmax(query key^T * scale + bias) value, with bias 0 where attn_mask is True (or
    absent) and -inf where it is False; scale defaults to 1 / sqrt(E).

    Args:
        query: (N, ..., L, E); key: (N, ..., S, E); value: (N, ..., S, Ev). Any rank >= 2;
            dimension -3 is the head dimension, the dimensions before it the batch. key and
            value may broadcast over query's batch dimensions and have one head for all
            query heads, as in torch.
        attn_mask: None; or bool, True where a (query, key) pair takes part, or float, added
            to the scores; broadcastable to (N, ..., L, S).
        dropout_p: dropout probability on the attention weights (applied whether or not a
            module is training, as in torch).
        is_causal: query i sees key j iff j <= i (the top-left aligned lower triangle of an
            (L, S) matrix, as in torch).
        scale: multiplies the scores; default 1 / sqrt(E).
        enable_gqa: key/value with Hkv heads serve query's Hq heads (Hkv divides Hq): query
            head h reads kv head h // (Hq / Hkv).
        backend: "auto" / None, "reference", "triton" or "cuda" (see genkernels.backend).

    Returns (N, ..., L, Ev) in query's dtype. Dtypes float16, bfloat16, float32 (float64 on
    the reference backend), all three inputs alike.

    What runs on genkernels.ops.attention: Ev == E; attn_mask None or a bool key padding mask,
    one constant along the queries (shape (N, 1, 1, S), (1, 1, 1, S), (N, H, 1, S), (1, S),
    ..., or such a mask expanded to L rows with stride 0 along dimension -2; it becomes the
    op's key_padding_mask = ~attn_mask, a mask that differs between heads making each head a
    batch entry, at the cost of copying q, k and v); is_causal with L == S
    (where top-left and bottom-right alignment agree); dropout_p == 0. Anything else (dropout,
    a float mask, a bool mask with a row per query, is_causal with L != S, Ev != E,
    attn_mask together with is_causal) goes to torch's own scaled_dot_product_attention under
    the "auto" backend, and raises genkernels.UnsupportedError, naming the argument, under an
    explicit backend (under torch.compile, that choice follows the backend in force when the
    call is traced, and an explicit backend's error surfaces as a torch.compile error).

    Differences from torch, on the calls the op runs:
        - A query row whose keys are all masked out outputs zeros (and gets zero gradients).
          Recent torch versions give zeros on their math (CPU) path too; older ones, and some
          fused CUDA kernels, give NaN.
        - A 1-D (S,) mask is accepted under broadcasting rules (torch's CPU path rejects it).
        - Scores and softmax statistics accumulate in float32 for float16 and bfloat16 inputs.
        - Through the triton and cuda backends the result is differentiable once (a second
          derivative raises); torch's math path differentiates to any order.
    """
    _check_valid(query, key, value, attn_mask, enable_gqa)
    plan = _plan(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if isinstance(plan, str):
        want = _requested(backend)
        if want != "auto":
            raise _registry.UnsupportedError(
                f"scaled_dot_product_attention: backend {want!r} cannot run this call: {plan} "
                "(backend='auto' runs it with torch.nn.functional.scaled_dot_product_attention)"
            )
        return _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    out = attention(plan.q, plan.k, plan.v, causal=plan.causal, scale=scale, key_padding_mask=plan.kpm, backend=backend)
    return out.reshape(query.shape)


def _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> torch.Tensor:
    """torch's own scaled_dot_product_attention, with enable_gqa spelled out for torch < 2.5."""
    if enable_gqa and not _TORCH_HAS_ENABLE_GQA:
        groups = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    kwargs = {"enable_gqa": True} if enable_gqa and _TORCH_HAS_ENABLE_GQA else {}
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
    )
