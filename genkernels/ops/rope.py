"""Rotary position embedding (RoPE): reference, validation, dispatch, autograd and torch.library ops, and
the cos / sin tables for 1-D positions and 2-D axial image positions.

For q (B, H, L, Dh), k (B, Hk, L, Dh) and tables cos, sin (L, P) with 2P <= Dh, each channel pair
(x1, x2) of a row at position l is rotated by the angles of row l:

    o1 = x1 cos[l, j] - x2 sin[l, j],   o2 = x2 cos[l, j] + x1 sin[l, j]      (j = 0 .. P-1)

Pairs are (j, j + P) by default (the "rotate_half" convention of Llama / GPT-NeoX; with 2P = Dh that is
(j, j + Dh/2)), or (2j, 2j + 1) with ``interleaved=True`` (FLUX, the original RoFormer). Channels 2P .. Dh-1
pass through unchanged (partial rotary). The rotation is orthogonal, so the backward is the inverse
rotation (sin negated) of the incoming gradient, one fused pass again; and that map is linear, so it
differentiates to any order through the same kernel. Arithmetic is float32 (float64 for float64 q on the
reference). Tables that require grad (learned) get dcos = sum of g1 x1 + g2 x2 and dsin = sum of g2 x1 - g1 x2
over batch and heads, in torch operations beside the fused backward, on every backend.

Tables: ``rope_frequencies(positions, dim, base)`` gives angle[l, j] = positions[l] * base^(-2j / dim),
j < dim/2; ``rope_frequencies_2d(height, width, dim, base)`` the axial tables of row-major image patches:
pairs j < dim/4 turn with the patch's row index (frequencies of a dim/2-channel rope), pairs dim/4 ..
dim/2-1 with its column index.

Fused backend interface (genkernels.triton.rope and genkernels.cuda.rope implement it; dispatch tries triton,
then cuda, then the reference: neither fast backend has been measured on a GPU yet, so the order is not a
speed ranking):

    not_supported(q, k, cos, sin, interleaved) -> str | None
    rotate(q, k, cos, sin, interleaved, inverse, q_out, k_out) -> None
        q (B, H, L, Dh), k None or (B, Hk, L, Dh), each with a unit last stride and any other strides
        (float32 / float16 / bfloat16); q_out, k_out their shapes and dtypes with unit last strides, or
        the inputs themselves (in place); cos, sin (L, P) with unit last strides, any float dtype. Writes
        the rotation (by -angle when inverse) of q into q_out and of k into k_out, in one launch: q and k
        read once, the outputs written once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _autograd, _registry
from .._checks import is_finite_real, is_integer
from .._layout import heads_inner, heads_like
from ..cuda import rope as _cuda
from ..triton import rope as _triton

OP = "rope"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = "float32, float16, bfloat16 or float64"


# --------------------------------------------------------------------------- validation


def _check(q, k, cos, sin, inplace, interleaved) -> None:
    """Raise a clear error naming the argument for anything rope does not accept."""
    for name, t in (("q", q), ("k", k)):
        if name == "k" and t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor{' or None' if name == 'k' else ''}, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (B, H, L, Dh), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be {_DTYPE_NAMES}, got {t.dtype}")
    b, _, length, dh = q.shape
    if k is not None:
        if k.device != q.device:
            raise ValueError(f"k is on {k.device} but q is on {q.device}: use one device")
        if k.dtype != q.dtype:
            raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}: q and k must share one dtype")
        if k.shape[0] != b or k.shape[2] != length or k.shape[3] != dh:
            raise ValueError(f"k must have shape ({b}, Hk, {length}, {dh}) (q's B, L and Dh), got {tuple(k.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: use one device")
        if t.dim() != 2 or t.shape[0] != length or not 1 <= t.shape[1] <= dh // 2:
            raise ValueError(
                f"{name} must have shape ({length}, P) with 1 <= P <= {dh // 2} (q's L, at most Dh/2 pairs), "
                f"got {tuple(t.shape)}"
            )
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if inplace and torch.is_grad_enabled():
        for name, t in (("q", q), ("k", k)):
            if t is not None and t.requires_grad:
                raise RuntimeError(
                    f"rope(inplace=True) cannot overwrite {name}, which requires grad (autograd needs its "
                    "values): use inplace=False, or call it under torch.no_grad()"
                )
        for name, t in (("cos", cos), ("sin", sin)):
            if t.requires_grad:  # its gradient needs q's and k's old values, which the call overwrites
                raise RuntimeError(
                    f"rope(inplace=True) writes outside autograd and {name} requires grad (its gradient needs "
                    "the values inplace overwrites): use inplace=False, or call it under torch.no_grad()"
                )


def _reachable(d: int, dims: list[tuple[int, int, int]]) -> bool:
    """Whether d = sum_j c_j s_j for some integers lo_j <= c_j <= hi_j, dims = [(s_j, lo_j, hi_j)] by stride
    descending, each stride above the span its inner dims reach (so only c_j = floor or ceil of d / s_j can
    work: at most two branches a level). The caller checks that nesting."""
    if not dims:
        return d == 0
    (s, lo, hi), rest = dims[0], dims[1:]
    return any(lo <= c <= hi and _reachable(d - c * s, rest) for c in {d // s, -(-d // s)})


def _may_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two strided tensors may have an element in common: exact for views with one element size and
    the same strides (slices of one buffer, such as q and k of a fused qkv projection, whatever their shapes),
    otherwise True whenever their byte ranges meet."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def byte_range(t: Tensor) -> tuple[int, int]:
        last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st > 0)
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = byte_range(a), byte_range(b)
    if a1 <= b0 or b1 <= a0:
        return False
    size = a.element_size()
    if a.dim() != b.dim() or b.element_size() != size or a.stride() != b.stride() or (b0 - a0) % size:
        return True
    # Element offsets: b's minus a's = d = sum_j (i_j - i'_j) s_j, i_j < a.shape[j], i'_j < b.shape[j].
    dims = sorted(
        ((st, -(nb - 1), na - 1) for st, na, nb in zip(a.stride(), a.shape, b.shape) if max(na, nb) > 1),
        key=lambda t: -t[0],
    )
    for j, (st, _, _) in enumerate(dims):
        if st <= sum(max(-lo, hi) * inner for inner, lo, hi in dims[j + 1 :]):
            return True  # a layout that does not nest: too hard to decide here
    return _reachable((b0 - a0) // size, dims)


def _check_inplace(q: Tensor, k: Tensor | None) -> None:
    """inplace=True writes each element of q and k once from its own old value: none may be written twice."""
    if q.device.type == "meta" or torch.compiler.is_compiling():
        return  # no addresses: meta, or traced (``genkernels::rope_`` checks the tensors it runs on)
    for name, t in (("q", q), ("k", k)):
        if t is not None and torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(
                f"rope(inplace=True) cannot write {name}, whose elements overlap (strides {t.stride()}, an "
                "expanded view): use inplace=False"
            )
    if k is not None and _may_overlap(q, k):
        raise ValueError(
            "rope(inplace=True) needs q and k in separate memory (views of one qkv buffer that do not overlap "
            f"are fine); q (shape {tuple(q.shape)}, strides {q.stride()}) and k (shape {tuple(k.shape)}, strides "
            f"{k.stride()}) share elements: pass k=None to rotate one tensor, or use inplace=False"
        )


def _check_k_out(q: Tensor, k: Tensor | None, cos: Tensor, sin: Tensor, k_out, inplace: bool) -> None:
    """k_out: None, or where k's rotation goes (a KV cache's slot), checked against q, k and the tables."""
    if k_out is None:
        return
    if not isinstance(k_out, Tensor):
        raise TypeError(f"k_out must be a torch.Tensor or None, got {type(k_out).__name__}")
    if k is None:
        raise ValueError("k_out needs k (it receives k's rotation), got k=None")
    if inplace:
        raise ValueError("k_out and inplace=True exclude each other (inplace writes k's rotation into k)")
    if k_out.shape != k.shape or k_out.dtype != k.dtype or k_out.device != k.device:
        raise ValueError(
            f"k_out must match k ({tuple(k.shape)}, {k.dtype}, {k.device}), "
            f"got {tuple(k_out.shape)}, {k_out.dtype}, {k_out.device}"
        )
    if k_out.shape[-1] > 1 and k_out.stride(-1) != 1:
        raise ValueError(f"k_out must have a unit last stride (any other strides), got strides {k_out.stride()}")
    _check_k_out_memory(q, k, k_out)
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
            if t.requires_grad:
                raise RuntimeError(
                    f"rope(k_out=...) writes outside autograd and {name} requires grad: call it under "
                    "torch.no_grad(), or leave k_out None"
                )


def _check_k_out_memory(q: Tensor, k: Tensor, k_out: Tensor) -> None:
    """k_out shares no element with q or k (a slot of a buffer that also holds them is fine), nor with itself
    (an expanded view: two rows of k would land in one place). Not on the meta device (no addresses), nor while
    traced (``genkernels::rope_into`` checks the tensors it runs on)."""
    if k_out.device.type == "meta" or torch.compiler.is_compiling():
        return
    if torch._debug_has_internal_overlap(k_out) == 1:
        raise ValueError(
            f"k_out must not have overlapping elements (strides {k_out.stride()}, an expanded view): each of k's "
            "rows needs a place of its own"
        )
    for name, t in (("q", q), ("k", k)):
        if _may_overlap(k_out, t):
            raise ValueError(f"k_out must not share memory with {name} (for k's own memory use inplace=True)")


# --------------------------------------------------------------------------- reference


def _rotate_reference(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool = False) -> Tensor:
    """The rotation of x (B, H, L, Dh) by the (L, P) tables, in float32 (float64 for float64 x)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    pairs = cos.shape[-1]
    xf = x.to(acc)
    c, s = cos.to(acc), sin.to(acc)
    if inverse:
        s = -s
    rot = xf[..., : 2 * pairs]
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else (rot[..., :pairs], rot[..., pairs:])
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    out = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    if 2 * pairs < x.shape[-1]:
        out = torch.cat((out, xf[..., 2 * pairs :]), dim=-1)
    return out.to(x.dtype)


def _like(out: Tensor, x: Tensor) -> Tensor:
    """out (x's shape) in the memory order the fast backends give it (:func:`_out_like`); differentiable."""
    if x.is_contiguous() or out.numel() == 0:
        return out
    return _out_like(x).copy_(out)


def rope_reference(
    q: Tensor, k: Tensor | None, cos: Tensor, sin: Tensor, *, interleaved: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The specification in eager PyTorch (out of place; differentiable in q, k, cos and sin, to any order)."""
    _check(q, k, cos, sin, False, interleaved)
    qo = _like(_rotate_reference(q, cos, sin, interleaved), q)
    ko = None if k is None else _like(_rotate_reference(k, cos, sin, interleaved), k)
    return qo, ko


class _ReferenceKernels:
    """The reference formulas behind the fast backends' interface (in-place calls and the traced op use it)."""

    @staticmethod
    def rotate(q, k, cos, sin, interleaved, inverse, q_out, k_out) -> None:
        q_out.copy_(_rotate_reference(q, cos, sin, interleaved, inverse))
        if k is not None:
            k_out.copy_(_rotate_reference(k, cos, sin, interleaved, inverse))


# --------------------------------------------------------------------------- tables


def rope_frequencies(
    positions: Tensor, dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos and sin tables of 1-D positions: angle[l, j] = positions[l] * base^(-2j / dim), j < dim/2.

    Args:
        positions: (L,) integer or floating-point positions (token indices, possibly offset for a cache).
        dim: the rotated channels (even, >= 2): Dh for full rotary, less for partial rotary.
        base: the frequency base (10000 in Llama / RoFormer).
        dtype: the tables' floating dtype (float32; float64 for a float64 model).

    Returns (cos, sin), (L, dim/2) each in ``dtype`` on positions' device, computed in float64 and rounded
    once (large positions keep their angles exact to the dtype's rounding)."""
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions must be a torch.Tensor of shape (L,), got {type(positions).__name__}")
    if positions.dim() != 1:
        raise ValueError(f"positions must have shape (L,), got {tuple(positions.shape)}")
    if positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer or floating-point tensor, got {positions.dtype}")
    dim, base = _check_dim_base(dim, base, 2)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    j = torch.arange(dim // 2, device=positions.device, dtype=torch.float64)
    inv_freq = torch.pow(torch.tensor(base, dtype=torch.float64, device=positions.device), -2.0 * j / dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def rope_frequencies_2d(
    height: int, width: int, dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos and sin tables of axial 2-D positions for a height x width grid of image patches, row-major
    (patch l = row * width + col).

    Pairs j < dim/4 turn with the row index and pairs dim/4 .. dim/2-1 with the column index, each half
    with the frequencies of :func:`rope_frequencies` for dim/2 channels. With ``rope(..., interleaved=True)``
    the first dim/2 channels rotate with the row and the other dim/2 with the column; without it pair j is
    channels (j, j + dim/2).

    Args:
        height, width: the patch grid (>= 1 each).
        dim: the rotated channels, a multiple of 4.
        base: the frequency base.
        dtype: the tables' floating dtype (as in :func:`rope_frequencies`).

    Returns (cos, sin), (height * width, dim/2) each in ``dtype``, on the CPU (move them with ``.to(device)``)."""
    for name, v in (("height", height), ("width", width)):
        if not is_integer(v) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    height, width = int(height), int(width)
    dim, base = _check_dim_base(dim, base, 4)
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    cr, sr = rope_frequencies(rows, dim // 2, base, dtype)
    cc, sc = rope_frequencies(cols, dim // 2, base, dtype)
    return torch.cat((cr, cc), dim=-1), torch.cat((sr, sc), dim=-1)


def _check_dim_base(dim, base, multiple: int) -> tuple[int, float]:
    """(dim, base) as a Python int and float, or a ValueError naming the argument."""
    if not is_integer(dim) or dim < multiple or dim % multiple:
        raise ValueError(f"dim must be a positive int multiple of {multiple}, got {dim!r}")
    if not (is_finite_real(base) and base > 1):
        raise ValueError(f"base must be a finite float > 1, got {base!r}")
    return int(dim), float(base)


# --------------------------------------------------------------------------- registry


def _fast_not_supported(backend_not_supported):
    """A not_supported taking rope's public arguments (as `genkernels.explain` passes them)."""

    def not_supported(q, k=None, cos=None, sin=None, interleaved=False, **_rest) -> str | None:
        return backend_not_supported(q, k, cos, sin, interleaved)

    return not_supported


_registry.register(OP, "triton", _fast_not_supported(_triton.not_supported), _triton)
_registry.register(OP, "cuda", _fast_not_supported(_cuda.not_supported), _cuda)
_registry.register(OP, "reference", lambda *a, **k: None, _ReferenceKernels)


def _probe(device: torch.device) -> tuple:
    """Arguments of a typical call (a transformer block's q and k), for `genkernels.info()`."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    q = torch.randn(2, 4, 16, 64, device=device, dtype=dtype)
    cos, sin = rope_frequencies(torch.arange(16, device=device), 64)
    return q, torch.randn_like(q), cos, sin


_registry.register_probe(OP, _probe)


# --------------------------------------------------------------------------- fused apply and autograd


def _unit_last(t: Tensor | None) -> Tensor | None:
    """t itself when its last stride is 1 (or it has one channel), else a contiguous copy."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1:
        return t
    return t.contiguous()


def _out_like(t: Tensor | None) -> Tensor | None:
    """A new tensor for the rotation of t: t's strides where t is dense (torch.empty_like); else, for a
    (B, H, L, Dh) view with its heads inner (the q or k of a fused qkv projection), dense (B, L, H, Dh)
    memory (genkernels._layout.heads_like: the attention output then merges its heads without a copy);
    else contiguous."""
    if t is None:
        return None
    return heads_like(t) if heads_inner(t) else torch.empty_like(t)


def _apply(impl, q, k, cos, sin, interleaved: bool, inverse: bool) -> tuple[Tensor, Tensor | None]:
    """The out-of-place rotation through a backend (outputs laid out by :func:`_out_like`)."""
    q, k, cos, sin = _unit_last(q), _unit_last(k), _unit_last(cos), _unit_last(sin)
    qo, ko = _out_like(q), _out_like(k)
    if q.numel() or (k is not None and k.numel()):
        impl.rotate(q, k, cos, sin, interleaved, inverse, qo, ko)
    return qo, ko


def _apply_inplace(impl, q, k, cos, sin, interleaved: bool) -> None:
    """Rotate q and k in place; a tensor whose last stride is not 1 goes through a contiguous copy."""
    wq, wk = _unit_last(q), _unit_last(k)
    if wq.numel() or (wk is not None and wk.numel()):
        impl.rotate(wq, wk, _unit_last(cos), _unit_last(sin), interleaved, False, wq, wk)
    if wq is not q:
        q.copy_(wq)
    if wk is not k:
        k.copy_(wk)


def _table_grads(
    xs: tuple, grads: tuple, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor]:
    """The gradients of cos and sin (learned tables) from the rotated inputs xs and their outputs' incoming
    gradients: with the pairs (x1, x2) and (g1, g2), dcos[l, j] = sum over batch and heads of g1 x1 + g2 x2 and
    dsin[l, j] = sum of g2 x1 - g1 x2 (negated for the inverse rotation). In float32 (float64 for float64
    inputs), in torch operations (differentiable to any order); the tables' dtypes."""
    pairs = cos.shape[-1]
    acc = torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32
    dcos = torch.zeros(cos.shape, dtype=acc, device=cos.device)
    dsin = torch.zeros(sin.shape, dtype=acc, device=sin.device)
    for x, g in zip(xs, grads):
        if x is None or g is None:
            continue
        x, g = x[..., : 2 * pairs].to(acc), g[..., : 2 * pairs].to(acc)
        (x1, x2), (g1, g2) = ((t[..., 0::2], t[..., 1::2]) if interleaved else t.split(pairs, -1) for t in (x, g))
        dcos = dcos + (g1 * x1 + g2 * x2).sum((0, 1))
        dsin = dsin + (g2 * x1 - g1 * x2).sum((0, 1))
    return dcos.to(cos.dtype), (-dsin if inverse else dsin).to(sin.dtype)


class _RopeFunction(torch.autograd.Function):
    """(q_out, k_out) = the rotation of (q, k) (by -angle when inverse); its backward is this function with
    the opposite direction, so it differentiates to any order. Tables that require grad (learned) get their
    gradients from :func:`_table_grads` (q and k are then kept for the backward)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, interleaved, inverse, impl):
        tables = cos.requires_grad or sin.requires_grad
        ctx.save_for_backward(cos, sin, *((q, k) if tables else ()))
        ctx.args = (interleaved, inverse, impl, k is not None)
        return _apply(impl, q, k, cos, sin, interleaved, inverse)

    @staticmethod
    def backward(ctx, dqo, dko):
        cos, sin, *inputs = ctx.saved_tensors
        interleaved, inverse, impl, has_k = ctx.args
        dko = dko if has_k else None
        dq, dk = _RopeFunction.apply(dqo, dko, cos, sin, interleaved, not inverse, impl)
        dcos = dsin = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dcos, dsin = _table_grads(tuple(inputs), (dqo, dko), cos, sin, interleaved, inverse)
        return dq, dk, dcos, dsin, None, None, None


# --------------------------------------------------------------------------- torch.library ops (traced path)


def _impl_for(backend: str, q, k, cos, sin, interleaved):
    if q.numel() == 0 and (k is None or k.numel() == 0):  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(OP, q, k, cos, sin, interleaved, backend=backend or None)
        return _ReferenceKernels
    return _registry.select(OP, q, k, cos, sin, interleaved, backend=backend or None).impl


# k is optional; without it the second output is an empty placeholder (a custom op returns tensors only).
@torch.library.custom_op(
    "genkernels::rope",
    mutates_args=(),
    schema="(Tensor q, Tensor? k, Tensor cos, Tensor sin, bool interleaved, bool inverse, str backend)"
    " -> (Tensor, Tensor)",
)
def _rope_op(
    q: Tensor, k: Tensor | None, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool, backend: str
) -> tuple[Tensor, Tensor]:
    impl = _impl_for(backend, q, k, cos, sin, interleaved)
    qo, ko = _apply(impl, q, k, cos, sin, interleaved, inverse)
    return qo, (ko if ko is not None else q.new_empty((0,)))


@_rope_op.register_fake
def _(q, k, cos, sin, interleaved, inverse, backend):
    qo, ko = _out_like(_unit_last(q)), _out_like(_unit_last(k))
    return qo, (ko if ko is not None else q.new_empty((0,)))


def _op_setup(ctx, inputs, output):
    q, k, cos, sin, interleaved, inverse, backend = inputs
    ctx.save_for_backward(cos, sin, *((q, k) if cos.requires_grad or sin.requires_grad else ()))
    ctx.args = (interleaved, inverse, backend, k is not None)


def _op_backward(ctx, dqo, dko):
    cos, sin, *inputs = ctx.saved_tensors
    interleaved, inverse, backend, has_k = ctx.args
    dko = dko if has_k else None
    dq, dk = _rope_op(dqo, dko, cos, sin, interleaved, not inverse, backend)
    dcos = dsin = None
    if inputs:
        dcos, dsin = _table_grads(tuple(inputs), (dqo, dko), cos, sin, interleaved, inverse)
    return dq, (dk if has_k else None), dcos, dsin, None, None, None


_rope_op.register_autograd(_op_backward, setup_context=_op_setup)


@torch.library.custom_op(
    "genkernels::rope_",
    mutates_args=("q", "k"),
    schema="(Tensor(a!) q, Tensor(b!)? k, Tensor cos, Tensor sin, bool interleaved, str backend) -> ()",
)
def _rope_inplace_op(q: Tensor, k: Tensor | None, cos: Tensor, sin: Tensor, interleaved: bool, backend: str) -> None:
    _check_inplace(q, k)  # the traced call's tensors, as the graph runs (a trace has no addresses)
    _apply_inplace(_impl_for(backend, q, k, cos, sin, interleaved), q, k, cos, sin, interleaved)


@_rope_inplace_op.register_fake
def _(q, k, cos, sin, interleaved, backend):
    return None


def _rotate_into(impl, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, k_out: Tensor, interleaved: bool) -> Tensor:
    """q's rotation in a new tensor (laid out by :func:`_out_like`) and k's written into k_out, one launch."""
    q, k, cos, sin = _unit_last(q), _unit_last(k), _unit_last(cos), _unit_last(sin)
    qo = _out_like(q)
    if q.numel() or k.numel():
        impl.rotate(q, k, cos, sin, interleaved, False, qo, k_out)
    return qo


@torch.library.custom_op(
    "genkernels::rope_into",
    mutates_args=("k_out",),
    schema="(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor(a!) k_out, bool interleaved, str backend) -> Tensor",
)
def _rope_into_op(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, k_out: Tensor, interleaved: bool, backend: str
) -> Tensor:
    _check_k_out_memory(q, k, k_out)  # the traced call's tensors, as the graph runs (a trace has no addresses)
    return _rotate_into(_impl_for(backend, q, k, cos, sin, interleaved), q, k, cos, sin, k_out, interleaved)


@_rope_into_op.register_fake
def _(q, k, cos, sin, k_out, interleaved, backend):
    return _out_like(_unit_last(q))


# --------------------------------------------------------------------------- public op


def rope(
    q: Tensor,
    k: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    *,
    inplace: bool = False,
    interleaved: bool = False,
    k_out: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Rotary position embedding of queries and keys, both in one pass.

    Args:
        q: (B, H, L, Dh) float32, float16 or bfloat16 (float64: reference only). Any strides with a unit
            last stride run without copies, so the (B, L, H, Dh) projections viewed as (B, H, L, Dh) by
            ``.transpose(1, 2)`` (and slices of a fused qkv tensor) are read where they lie; a tensor whose
            last stride is not 1 is copied once.
        k: None or (B, Hk, L, Dh) (Hk may differ from H: grouped-query attention), q's dtype and device.
        cos, sin: (L, P) tables (see :func:`rope_frequencies`, :func:`rope_frequencies_2d`), any float
            dtype, 1 <= P <= Dh/2: the first 2P channels rotate, the rest pass through (partial rotary).
        inplace: write the results into q and k (returned as they are). Refused, with an error, for a q,
            k, cos or sin that requires grad while grad mode is on: autograd would need the overwritten values,
            and for q and k that share elements (or an expanded view): those would be rotated twice. Views of
            one fused qkv buffer that do not overlap are fine.
        interleaved: pairs (2j, 2j + 1) (FLUX, RoFormer) instead of (j, j + P) (rotate_half: Llama, NeoX).
        k_out: None, or a tensor of k's shape, dtype and device with a unit last stride (any other strides,
            no memory shared with q or k, no element of its own twice) that receives k's rotation in the same
            launch: a KV cache's slot, with no copy after. Outside autograd only (refused while q, k, cos or sin
            requires grad with grad mode on).
            The result's k is then k_out. Under torch.compile the call goes through ``genkernels::rope_into``.
        backend: "auto" / None, "reference", "triton" or "cuda".

    Returns (q_out, k_out) in q's dtype and shapes (k_out None without k); out of place they keep q's and
    k's strides where those are dense; views with their heads inner (q and k split from one qkv projection)
    get dense heads-inner memory, (B, L, H, Dh) viewed as (B, H, L, Dh), so that attention's output follows
    suit and merges its heads without a copy; anything else is contiguous. Differentiable in q, k, cos and sin (to
    any order): the backward is the inverse rotation of the incoming gradients, one fused pass; tables that require
    grad (learned) get their gradients as sums over batch and heads, in torch operations, on every backend (q and
    k are then kept for the backward). Under torch.compile the call goes through ``genkernels::rope`` (or the
    mutating ``genkernels::rope_``).
    """
    _check(q, k, cos, sin, inplace, interleaved)
    _check_k_out(q, k, cos, sin, k_out, inplace)
    if inplace:
        _check_inplace(q, k)
    if k_out is not None:
        return _rope_into(q, k, cos, sin, k_out, interleaved, backend)
    if torch.compiler.is_compiling():
        if inplace:
            _rope_inplace_op(q, k, cos, sin, interleaved, backend or "")
            return q, k
        qo, ko = _rope_op(q, k, cos, sin, interleaved, False, backend or "")
        return qo, (ko if k is not None else None)
    if q.numel() == 0 and (k is None or k.numel() == 0):  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(OP, q, k, cos, sin, interleaved, backend=backend)
        chosen = _registry.backends_of(OP)[-1]
    else:
        chosen = _registry.select(OP, q, k, cos, sin, interleaved, backend=backend)
    if inplace:
        with torch.no_grad():
            _apply_inplace(chosen.impl, q, k, cos, sin, interleaved)
        for t in (q, k):
            if t is not None and not t.is_inference():  # a kernel's writes do not bump the version counter
                torch.autograd.graph.increment_version(t)
        return q, k
    if chosen.name == "reference":
        return rope_reference(q, k, cos, sin, interleaved=interleaved)
    return _autograd.apply(_RopeFunction, q, k, cos, sin, interleaved, False, chosen.impl)


def _rope_into(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, k_out: Tensor, interleaved: bool, backend):
    """rope(..., k_out=k_out): q's rotation in a new tensor, k's written into k_out, in one launch (traced:
    the ``genkernels::rope_into`` op, which mutates k_out)."""
    if torch.compiler.is_compiling():
        return _rope_into_op(q, k, cos, sin, k_out, interleaved, backend or ""), k_out
    if q.numel() == 0 and k.numel() == 0:  # empty: no launch, after an explicit backend's check
        _registry.check_explicit(OP, q, k, cos, sin, interleaved, backend=backend)
        impl = _ReferenceKernels
    else:
        impl = _registry.select(OP, q, k, cos, sin, interleaved, backend=backend).impl
    qo = _rotate_into(impl, q, k, cos, sin, k_out, interleaved)
    if not k_out.is_inference():  # a kernel's writes do not bump the version counter
        torch.autograd.graph.increment_version(k_out)
    return qo, k_out


__all__ = ["rope", "rope_frequencies", "rope_frequencies_2d", "rope_reference"]


def _check_call(q, k, cos, sin, inplace, interleaved, k_out) -> None:
    """rope's argument checks, in the order it runs them."""
    _check(q, k, cos, sin, inplace, interleaved)
    _check_k_out(q, k, cos, sin, k_out, inplace)
    if inplace:
        _check_inplace(q, k)


_registry.register_check(OP, rope, _check_call)
