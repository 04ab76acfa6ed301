"""Multi-head attention layer on the fused op, with diffusers' Attention parameter names."""

from __future__ import annotations

import torch

from .._checks import check_backend, positive_int
from ..ops.attention import attention


class Attention(torch.nn.Module):
    """Multi-head self- or cross-attention: to_out(attention(to_q(x), to_k(c), to_v(c))).

    With inner = heads * dim_head and c the context (encoder_hidden_states, or x itself for
    self-attention):

        q = to_q(x), k = to_k(c), v = to_v(c)                       (B, L or S, inner)
        split heads: (B, L, inner) -> (B, heads, L, dim_head)        (transposed views, no copy)
        o = genkernels.ops.attention(q, k, v)                        softmax(q k^T / sqrt(dim_head)) v
        out = to_out(merged heads of o)                              (B, L, query_dim)

    Parameters and state_dict keys are those of diffusers' ``Attention`` for these constructor
    arguments: ``to_q``, ``to_k``, ``to_v`` (Linear, bias if ``bias``), ``to_out.0`` (Linear,
    bias if ``out_bias``) and ``to_out.1`` (Dropout, no parameters), so its weights load
    unchanged with ``load_state_dict``.

    Args:
        query_dim: channels of hidden_states (and of the output).
        cross_attention_dim: channels of encoder_hidden_states; None: query_dim.
        heads: number of attention heads.
        dim_head: channels per head.
        bias: bias in to_q, to_k and to_v.
        out_bias: bias in to_out.0.
        dropout: dropout probability on the output (to_out.1); the attention weights get none.
        backend: "reference", "triton", "cuda" or None (auto) for the attention op.
        device, dtype: for the parameters.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        bias: bool = False,
        out_bias: bool = True,
        dropout: float = 0.0,
        *,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        query_dim = positive_int("query_dim", query_dim)
        heads, dim_head = positive_int("heads", heads), positive_int("dim_head", dim_head)
        inner = heads * dim_head
        context_dim = (
            query_dim if cross_attention_dim is None else positive_int("cross_attention_dim", cross_attention_dim)
        )
        backend = check_backend(backend)
        self.query_dim, self.cross_attention_dim = query_dim, context_dim
        self.heads, self.dim_head, self.backend = heads, dim_head, backend
        self.to_q = torch.nn.Linear(query_dim, inner, bias=bias, **factory)
        self.to_k = torch.nn.Linear(context_dim, inner, bias=bias, **factory)
        self.to_v = torch.nn.Linear(context_dim, inner, bias=bias, **factory)
        self.to_out = torch.nn.ModuleList(
            [torch.nn.Linear(inner, query_dim, bias=out_bias, **factory), torch.nn.Dropout(dropout)]
        )

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, heads * dim_head) -> (B, heads, L, dim_head) as a view (the op reads any B, H, L strides)."""
        return t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Attend from hidden_states to encoder_hidden_states (cross) or to itself (self-attention).

        Args:
            hidden_states: (B, L, query_dim), or an image (B, query_dim, H, W), attended as its
                H * W pixels (B, H * W, query_dim) and returned as (B, query_dim, H, W).
            encoder_hidden_states: (B, S, cross_attention_dim) context for cross-attention;
                None: self-attention (S = L).
            key_padding_mask: optional bool (B, S), True where a context token is padding and
                must be ignored. A query with no key left outputs zeros before to_out. Keyword-only:
                diffusers' third argument, attention_mask, means the opposite (True: attend), so a
                positional mask is a TypeError rather than inverted. A float (additive) mask is a
                TypeError too (nothing runs it through torch): diffusers' additive (B, 1, S) mask of
                0 (attend) and -10000 (ignore) is ``key_padding_mask=mask[:, 0] < 0``.
            causal: query i sees key j iff j <= i + S - L (bottom-right aligned; the usual
                lower triangle for self-attention).

        Returns (B, L, query_dim) (or (B, query_dim, H, W) for image input) in the parameters'
        dtype.
        """
        if hidden_states.dim() not in (3, 4):
            raise ValueError(
                "hidden_states must be (B, L, query_dim) or (B, query_dim, H, W), got shape "
                f"{tuple(hidden_states.shape)}"
            )
        if hidden_states.shape[-1 if hidden_states.dim() == 3 else 1] != self.query_dim:
            raise ValueError(
                f"hidden_states must be (B, L, query_dim = {self.query_dim}) or (B, query_dim = {self.query_dim}, "
                f"H, W), got shape {tuple(hidden_states.shape)}"
            )
        if encoder_hidden_states is not None:
            if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[-1] != self.cross_attention_dim:
                raise ValueError(
                    f"encoder_hidden_states must be None or (B, S, cross_attention_dim = {self.cross_attention_dim}), "
                    f"got shape {tuple(encoder_hidden_states.shape)}"
                )
            if encoder_hidden_states.shape[0] != hidden_states.shape[0]:
                raise ValueError(
                    f"encoder_hidden_states has batch size {encoder_hidden_states.shape[0]} but hidden_states has "
                    f"{hidden_states.shape[0]}: they must be equal"
                )
        image_shape = None
        if hidden_states.dim() == 4:
            image_shape = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = self._split_heads(self.to_q(hidden_states))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        o = attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, backend=self.backend)
        out = self.to_out[1](self.to_out[0](o.transpose(1, 2).flatten(2)))
        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        return out

    def extra_repr(self) -> str:
        extra = "" if self.backend is None else f", backend={self.backend!r}"
        return (
            f"query_dim={self.query_dim}, cross_attention_dim={self.cross_attention_dim}, heads={self.heads}, "
            f"dim_head={self.dim_head}{extra}"
        )
