"""Transformer layers on the fused ops: modulated norms, gated MLPs, rotary tables and causal attention
with a key/value cache.

    LayerNormModulate    y = norm(x) * (1 + scale) + shift          genkernels.ops.layer_norm_modulate
    SwiGLU               fc2(silu(a) * b), [a; b] = fc1(x)           genkernels.ops.swiglu
    GeluMLP              fc2(gelu_tanh(fc1(x)))                      genkernels.ops.linear_gelu_tanh
    RotaryEmbedding      cos / sin tables of 1-D positions           genkernels.ops.rope_frequencies
    KVCache              preallocated keys and values of one attention layer, written in place
    CausalSelfAttention  causal multi-head self-attention (optionally rotary, optionally cached)
                         on genkernels.ops.attention(causal=True) and genkernels.ops.rope
"""

from __future__ import annotations

import torch

from .._checks import check_backend, is_finite_real, is_integer, positive_int
from ..ops.adaln import layer_norm_modulate
from ..ops.attention import attention
from ..ops.gated_mlp import linear_gelu_tanh, swiglu
from ..ops.rope import rope, rope_frequencies
from .attention import Attention


class LayerNormModulate(torch.nn.Module):
    """LayerNorm (or RMSNorm) over the last dimension, then an optional per-sample modulation, in one op.

    With xhat = (x - mean) / sqrt(var + eps) (LayerNorm) or x / sqrt(mean(x^2) + eps) (``rms=True``),
    statistics in float32 over the last dimension D:

        y = (xhat * weight + bias) * (1 + scale) + shift

    weight (D,) (and bias (D,) unless ``rms``) exist only with ``elementwise_affine``; shift / scale are
    given per call (None: no modulation). A plain RMSNorm is ``LayerNormModulate(D, rms=True,
    elementwise_affine=True)`` called with x alone.

    Args:
        dim: D, the normalized (last) dimension.
        eps: added to the variance (mean square for RMSNorm).
        elementwise_affine: learn weight (ones) and, for LayerNorm, bias (zeros).
        rms: RMSNorm (no mean subtraction, no bias) instead of LayerNorm.
        backend: backend of the fused op (None: scope / environment / auto).
        device, dtype: of the parameters.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        elementwise_affine: bool = False,
        rms: bool = False,
        backend: str | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dim = positive_int("dim", dim)
        if not (is_finite_real(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        self.dim, self.eps, self.rms, self.elementwise_affine = dim, float(eps), bool(rms), bool(elementwise_affine)
        self.backend = check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.ones(dim, **factory))
            self.bias = None if rms else torch.nn.Parameter(torch.zeros(dim, **factory))
        else:
            self.weight = self.bias = None

    def forward(
        self, x: torch.Tensor, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, L, D) -> y (B, L, D) in x's dtype; shift / scale None, (B, D) or (B, 1, D) (per sample) or
        (B, L, D) (per token), 1 in place of B for one shared by every sample (as genkernels.ops.layer_norm_modulate
        takes them). D must be the layer's dim (a ValueError otherwise, with or without affine parameters)."""
        if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[-1] != self.dim:
            raise ValueError(
                f"x has {x.shape[-1]} channels in its last dim but this layer has dim={self.dim}, got shape "
                f"{tuple(x.shape)}"
            )
        return layer_norm_modulate(
            x, self.weight, self.bias, shift, scale, eps=self.eps, rms=self.rms, backend=self.backend
        )

    def extra_repr(self) -> str:
        extra = "" if self.backend is None else f", backend={self.backend!r}"
        return f"{self.dim}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, rms={self.rms}{extra}"


class SwiGLU(torch.nn.Module):
    """Gated MLP: fc2(silu(a) * b) with [a; b] = fc1(x) split in halves along the last dimension.

    fc1: Linear(dim, 2 * hidden), fc2: Linear(hidden, dim), bias in both only with ``bias``. The gate
    silu(a) * b is one genkernels.ops.swiglu call (one read of fc1's output, one write).
    (..., dim) -> (..., dim).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        bias: bool = False,
        backend: str | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dim, hidden = positive_int("dim", dim), positive_int("hidden", hidden)
        self.backend = check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        self.fc1 = torch.nn.Linear(dim, 2 * hidden, bias=bias, **factory)
        self.fc2 = torch.nn.Linear(hidden, dim, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        return self.fc2(swiglu(self.fc1(x), backend=self.backend))


class GeluMLP(torch.nn.Module):
    """fc2(gelu_tanh(fc1(x))): the ViT / DiT MLP, with the tanh-approximated GELU as one fused op.

    fc1: Linear(dim, hidden), fc2: Linear(hidden, dim), both with bias. (..., dim) -> (..., dim).
    fc1 and the GELU run as genkernels.ops.linear_gelu_tanh (fc1's weight and bias; hooks on fc1 do not
    run): on CUDA without autograd, one matrix product with the bias and GELU in its epilogue.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        backend: str | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dim, hidden = positive_int("dim", dim), positive_int("hidden", hidden)
        self.backend = check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        self.fc1 = torch.nn.Linear(dim, hidden, **factory)
        self.fc2 = torch.nn.Linear(hidden, dim, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        return self.fc2(linear_gelu_tanh(x, self.fc1.weight, self.fc1.bias, backend=self.backend))


class RotaryEmbedding(torch.nn.Module):
    """The cos / sin tables of 1-D rotary position embeddings for positions 0 .. max_len - 1.

    cos, sin: (max_len, dim_head / 2) buffers (not saved in the state_dict: they follow from the arguments):
    the cos and sin of genkernels.ops.rope_frequencies' angles, computed in float64 and rounded once to the
    buffers' dtype; float32 (rope_frequencies' tables) when made. Converting the module to another dtype
    (``.double()``, ``.half()``, ``.to(torch.bfloat16)``) computes them again in that dtype, so that a float64
    model rotates with float64 tables rather than float32 values widened, and a model taken to half precision and
    back gets its float32 tables again; moving it to a device moves them as any buffer. ``forward(start, length)``
    gives the rows of positions start .. start + length - 1, in the shape genkernels.ops.rope takes.
    """

    def __init__(self, dim_head: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        max_len = positive_int("max_len", max_len)
        if not is_integer(dim_head) or dim_head < 2 or dim_head % 2:
            raise ValueError(f"dim_head must be an even int >= 2 for rotary embeddings, got {dim_head!r}")
        dim_head = int(dim_head)
        self.dim_head, self.max_len, self.base = dim_head, max_len, float(base)
        cos, sin = rope_frequencies(torch.arange(max_len), dim_head, base=self.base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse: bool = True):
        before = self.cos.dtype
        super()._apply(fn, recurse)
        if self.cos.dtype != before:  # converted values (widened, or rounded twice): the new dtype's own instead
            positions = torch.arange(self.max_len, device=self.cos.device)
            self.cos, self.sin = rope_frequencies(positions, self.dim_head, self.base, self.cos.dtype)
        return self

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of positions start .. start + length - 1, each (length, dim_head / 2)."""
        if not (is_integer(start) and is_integer(length)):
            raise TypeError(f"start and length must be ints, got start={start!r}, length={length!r}")
        if start < 0 or length < 0 or start + length > self.max_len:
            raise ValueError(
                f"positions {start} .. {start + length - 1} are outside the table's 0 .. {self.max_len - 1}"
            )
        return self.cos[start : start + length], self.sin[start : start + length]

    def extra_repr(self) -> str:
        return f"dim_head={self.dim_head}, max_len={self.max_len}, base={self.base}"


def _slots(rows: torch.Tensor, i: int) -> torch.Tensor:
    """Slot ``i`` (0 query, 1 key, 2 value) of a KV cache's rows (B, l, 3, heads, dim_head), as the attention
    takes it: a view (B, heads, l, dim_head)."""
    return rows[:, :, i].transpose(1, 2)


class KVCache:
    """The keys and values one attention layer has seen, in one preallocated buffer written in place.

    ``qkv`` (B, max_len, 3, heads, dim_head) holds, for every position, a query slot, the key and the value:
    :class:`CausalSelfAttention` projects a step's queries, keys and values with one matrix product straight
    into the positions' rows (the query slot is scratch it then reads; the keys are rotated in place there).
    ``k`` and ``v`` are (B, heads, max_len, dim_head) views of it (strides (max_len * 3 * heads * dim_head,
    dim_head, 3 * heads * dim_head, 1): a key row is dim_head contiguous elements). The query slots make the
    buffer 1.5 times the keys' and values' size.

    :meth:`append` writes the new keys / values in place after the ``length`` already held and returns
    views of everything held so far; nothing is reallocated while decoding (so the tensors' addresses
    stay fixed, as CUDA graphs need). Keys and values that require grad are appended by autograd: the gradient
    reaches them through the cache, across calls, and :meth:`reset` drops that history.

    ``projection``: None, or (weight, bias) of the layer's three projections stacked
    (:meth:`CausalSelfAttention.stacked_projection`), set by a decoder that keeps them up to date itself (ImageGPT's
    refreshes them before every sampling call); None: the layer stacks its weights at every cached call.

    Args:
        batch, heads, max_len, dim_head: the cache shape.
        device, dtype: those of the keys and values it will hold.
    """

    def __init__(
        self,
        batch: int,
        heads: int,
        max_len: int,
        dim_head: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        batch, heads, max_len, dim_head = (
            positive_int(name, value)
            for name, value in (("batch", batch), ("heads", heads), ("max_len", max_len), ("dim_head", dim_head))
        )
        self.qkv = torch.zeros(batch, max_len, 3, heads, dim_head, device=device, dtype=dtype)
        self.length = 0
        self.projection: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def k(self) -> torch.Tensor:
        """Every key slot, (B, heads, max_len, dim_head), a view of ``qkv``."""
        return _slots(self.qkv, 1)

    @property
    def v(self) -> torch.Tensor:
        """Every value slot, (B, heads, max_len, dim_head), a view of ``qkv``."""
        return _slots(self.qkv, 2)

    @property
    def max_len(self) -> int:
        """The positions the cache can hold."""
        return self.qkv.shape[1]

    def _end(self, count: int) -> int:
        if not is_integer(count) or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        end = self.length + int(count)
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; appending {count} to {self.length}")
        return end

    def next_slots(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (B, heads, count, dim_head) of the keys and values at positions length .. length + count - 1, to be
        written in place (for example ``rope(q, k, cos, sin, k_out=k_slot)``) and then passed to
        :meth:`append`, which copies nothing for a tensor that is already its slot."""
        end = self._end(count)
        return self.k[:, :, self.length : end], self.v[:, :, self.length : end]

    def next_rows(self, count: int) -> torch.Tensor:
        """The view (B, count, 3, heads, dim_head) of ``qkv`` at positions length .. length + count - 1: where one
        projection writes those positions' queries, keys and values (then :meth:`commit`)."""
        return self.qkv[:, self.length : self._end(count)]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, heads, l, dim_head) at positions length .. length + l - 1; returns the views
        (B, heads, length + l, dim_head) of every key and value held (length grows by l). A k or v that is
        already its slot (:meth:`next_slots`, :meth:`next_rows`) is not copied. When autograd records the cache
        (grad enabled, and this or an earlier append given a k or v that requires grad), copies of them instead:
        the next append writes the buffer in place, and an op that saved the views for its backward (the
        attention) would find them changed."""
        batch, _, _, heads, dim_head = self.qkv.shape
        if k.shape != v.shape or k.shape[:2] != (batch, heads) or k.shape[3] != dim_head:
            raise ValueError(
                f"k and v must be (B, heads, l, dim_head) = ({batch}, {heads}, l, {dim_head}), got k "
                f"{tuple(k.shape)} and v {tuple(v.shape)}"
            )
        count = k.shape[2]
        end = self._end(count)
        for i, t in enumerate((k, v)):
            slot = _slots(self.qkv[:, self.length : end], 1 + i)  # taken after the previous copy (autograd)
            if t.data_ptr() != slot.data_ptr() or t.stride() != slot.stride():
                slot.copy_(t)
        k, v = self.commit(count)
        if torch.is_grad_enabled() and self.qkv.requires_grad:
            return k.clone(), v.clone()
        return k, v

    def commit(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``count`` positions after ``length``, written in place through :meth:`next_rows`, are now held:
        length grows by count; returns the views (B, heads, length, dim_head) of every key and value held.
        :meth:`append` without its checks and copies, for a caller that wrote the rows itself."""
        held = self.qkv[:, : self._end(count)]
        self.length += count
        return _slots(held, 1), _slots(held, 2)

    def reset(self) -> None:
        """Forget every position (the tensors are kept and overwritten by the next appends), and the autograd
        history of earlier appends (the buffer is detached: same memory, no graph)."""
        self.length = 0
        if self.qkv.requires_grad:
            self.qkv = self.qkv.detach()


class CausalSelfAttention(Attention):
    """Causal multi-head self-attention: token i attends to tokens 0 .. i, with rotary positions and a
    key/value cache as options.

    With inner = heads * dim_head, on x (B, l, dim) holding positions p0 .. p0 + l - 1:

        q, k, v = to_q(x), to_k(x), to_v(x)  split in heads        (B, heads, l, dim_head)
        q, k = rope(q, k, cos, sin)                                 when ``rotary`` tables are given
        k, v = cache.append(k, v)                                   with a cache: every key so far (p0 + l)
        o = genkernels.ops.attention(q, k, v, causal=True)          bottom-right aligned: the l queries are
                                                                    the last l positions, so a single query
                                                                    (decoding) sees every cached key
        out = to_out(merged heads of o)                             (B, l, dim)

    With a cache and nothing to differentiate (grad mode off, or no parameter nor x requiring grad), the three
    projections are one matrix product of the stacked weights (:meth:`stacked_projection`) writing q, k and v
    straight into the cache's rows (:meth:`KVCache.next_rows`), and rope rotates q and k there in place: a
    decoding step's attention is three launches (the product, rope, attention) where the three projections, the
    rotation and the copies of k and v into the cache would take six.

    Parameters are those of :class:`genkernels.nn.Attention` (to_q, to_k, to_v, to_out.0).

    Args:
        dim: channels of x and of the output.
        heads: attention heads.
        dim_head: channels per head (None: dim // heads, which must then divide dim).
        bias: bias in to_q / to_k / to_v; out_bias: bias in to_out.0.
        backend: backend of the attention and rope ops (None: scope / environment / auto).
        device, dtype: of the parameters.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int | None = None,
        bias: bool = False,
        out_bias: bool = False,
        *,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dim, heads = positive_int("dim", dim), positive_int("heads", heads)
        if dim_head is None:
            if dim % heads:
                raise ValueError(f"heads must divide dim when dim_head is None, got dim={dim}, heads={heads}")
            dim_head = dim // heads
        dim_head = positive_int("dim_head", dim_head)
        super().__init__(
            dim,
            heads=heads,
            dim_head=dim_head,
            bias=bias,
            out_bias=out_bias,
            backend=check_backend(backend),
            device=device,
            dtype=dtype,
        )

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_len`` tokens, on the parameters'
        device and dtype."""
        w = self.to_k.weight
        return KVCache(batch, self.heads, max_len, self.dim_head, device=w.device, dtype=w.dtype)

    def stacked_projection(
        self, out: tuple[torch.Tensor, torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (3 inner, dim), bias (3 inner,) or None): to_q's, to_k's and to_v's stacked, a copy (written
        into ``out``'s tensors when given, in place); one matrix product with them gives [q | k | v]."""
        layers = (self.to_q, self.to_k, self.to_v)
        with torch.no_grad():
            weight = torch.cat([m.weight for m in layers], out=None if out is None else out[0])
            bias = None
            if self.to_q.bias is not None:
                bias = torch.cat([m.bias for m in layers], out=None if out is None else out[1])
        return weight, bias

    def _check_cache(self, x: torch.Tensor, cache: KVCache) -> None:
        # A cache of another head split with the same row width (heads * dim_head) would be read silently.
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be None or a KVCache (new_cache), got {type(cache).__name__}")
        batch, _, _, heads, dim_head = cache.qkv.shape
        if (batch, heads, dim_head) != (x.shape[0], self.heads, self.dim_head):
            raise ValueError(
                f"cache holds (batch, heads, dim_head) = ({batch}, {heads}, {dim_head}) but this layer and x need "
                f"({x.shape[0]}, {self.heads}, {self.dim_head}): make it with new_cache(batch, max_len)"
            )
        w = self.to_k.weight
        if (cache.qkv.dtype, cache.qkv.device) != (w.dtype, w.device):
            raise ValueError(
                f"cache holds {cache.qkv.dtype} on {cache.qkv.device} but this layer's parameters are {w.dtype} on "
                f"{w.device}: make it with new_cache(batch, max_len)"
            )

    def _needs_grad(self, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        projections = (self.to_q, self.to_k, self.to_v)
        return x.requires_grad or any(p.requires_grad for m in projections for p in m.parameters())

    def _rotate(self, q, k, cos, sin):
        """(q, k) rotated, out of place (differentiable)."""
        return rope(q, k, cos, sin, backend=self.backend)

    def _rotate_into_slots(self, q, k, cos, sin):
        """(q, k) rotated, k's rotation in k's own memory (its slot in a cache's rows; outside autograd): here both
        in place, one launch."""
        return rope(q, k, cos, sin, inplace=True, backend=self.backend)

    def _project_into_cache(self, x: torch.Tensor, rotary, cache: KVCache):
        """Rotated q, and every cached key and value with this call's appended: one matrix product into the cache's
        rows, rope in place there, nothing copied (outside autograd)."""
        length = x.shape[1]
        rows = cache.next_rows(length)  # (B, l, 3, heads, dim_head)
        weight, bias = cache.projection if cache.projection is not None else self.stacked_projection()
        _linear_into(x, weight, bias, rows.flatten(2))
        q = _slots(rows, 0)
        if rotary is not None:
            q, _ = self._rotate_into_slots(q, _slots(rows, 1), *rotary)
        k, v = cache.commit(length)
        return q, k, v

    def _attend(self, q, k, v):
        return attention(q, k, v, causal=True, backend=self.backend)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Attend causally over x (B, l, dim) (and the cache's earlier positions); returns (B, l, dim).

        Args:
            x: the tokens at positions p0 .. p0 + l - 1, p0 = cache.length (0 without a cache).
            rotary: (cos, sin) (l, dim_head / 2) of those positions (:class:`RotaryEmbedding`), or None.
            cache: a :class:`KVCache` (:meth:`new_cache`); this call's keys and values are appended to it.
        """
        if x.dim() != 3 or x.shape[-1] != self.query_dim:
            raise ValueError(f"x must be (B, l, dim={self.query_dim}), got shape {tuple(x.shape)}")
        if cache is not None:
            self._check_cache(x, cache)
        if cache is not None and not self._needs_grad(x):
            q, k, v = self._project_into_cache(x, rotary, cache)
        else:
            q = self._split_heads(self.to_q(x))
            k = self._split_heads(self.to_k(x))
            v = self._split_heads(self.to_v(x))
            if rotary is not None:
                q, k = self._rotate(q, k, *rotary)
            if cache is not None:
                k, v = cache.append(k, v)
                q = q.to(k.dtype)  # under autocast q leaves to_q in the autocast dtype: attend as without grad
        o = self._attend(q, k, v)
        return self.to_out[1](self.to_out[0](o.transpose(1, 2).flatten(2)))


def _linear_into(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out (B, l, n) = x (B, l, k) @ weight.T (+ bias), out a view with a unit last stride: one matrix product
    written where out lies when it is one matrix (l = 1 or B = 1: rows at a fixed stride, which cuBLAS writes
    directly) of x in out's dtype, else the product and a copy (so that an x of another dtype, an autocast
    model's activations, is multiplied as F.linear would and stored in out's dtype). Traced by dynamo, always the
    product and a copy (the compiler fuses them): dynamo refuses an ``out=`` with gaps, and that graph break inside
    a cached step left a graph returning views of two aliased inputs (the rows and the cache's buffer), which
    AOTAutograd failed to rebuild ("incorrect out shape after application of ViewMeta sequence")."""
    if (x.shape[1] == 1 or x.shape[0] == 1) and x.dtype == out.dtype and not torch.compiler.is_dynamo_compiling():
        x2, out2 = (x[:, 0], out[:, 0]) if x.shape[1] == 1 else (x[0], out[0])
        if bias is None:
            torch.mm(x2, weight.t(), out=out2)
        else:
            torch.addmm(bias, x2, weight.t(), out=out2)
    else:
        out.copy_(torch.nn.functional.linear(x, weight, bias))
