"""genkernels.nn.functional.scaled_dot_product_attention against torch.nn.functional's.

What maps onto genkernels.ops.attention is held to the criterion against torch's SDPA in
float64; what does not must give torch's own result under "auto" and raise UnsupportedError,
naming the argument, under an explicit backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import genkernels
from genkernels.nn import functional as GF
from tests.criterion import assert_criterion

BACKENDS = ["reference", "triton"]
DTYPES = [torch.float32, torch.float16]


def _qkv(q_shape, kv_shape, dtype, device, v_last=None):
    q = torch.randn(q_shape, device=device, dtype=dtype)
    k = torch.randn(kv_shape, device=device, dtype=dtype)
    v = torch.randn(kv_shape[:-1] + (v_last or kv_shape[-1],), device=device, dtype=dtype)
    return q, k, v


def _keep_mask(shape, device):
    """A random bool mask (True = take part) leaving every query at least its first key."""
    mask = torch.rand(shape, device=device) > 0.4
    mask[..., 0] = True
    return mask


def _check_against_torch(q, k, v, backend, **kwargs):
    """Ours under `backend` vs torch's SDPA: ref in q's dtype, ref64 on float64-upcast inputs."""
    out = GF.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
    ref = F.scaled_dot_product_attention(q, k, v, **kwargs)
    ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kwargs)
    assert_criterion(out, ref, ref64)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "q_shape,kv_shape",
    [((2, 3, 5, 8), (2, 3, 7, 8)), ((1, 2, 17, 16), (1, 2, 17, 16)), ((2, 1, 1, 4), (2, 1, 3, 4))],
)
def test_no_mask(backend, dtype, q_shape, kv_shape, device):
    q, k, v = _qkv(q_shape, kv_shape, dtype, device)
    _check_against_torch(q, k, v, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 7), (1, 1, 1, 7), (1, 7), (2, 1, 1, 1), (2, 3, 1, 7), (3, 1, 7)])
def test_key_padding_mask(backend, dtype, mask_shape, device):
    """Bool masks constant along the queries: per batch, shared, 1-D, per batch over all keys, per head."""
    q, k, v = _qkv((2, 3, 5, 8), (2, 3, 7, 8), dtype, device)
    mask = _keep_mask(mask_shape, device)
    _check_against_torch(q, k, v, backend, attn_mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_mask(backend, device):
    """A (S,) mask broadcasts like (1, S) (torch's CPU path rejects 1-D masks; broadcasting defines them)."""
    q, k, v = _qkv((2, 3, 5, 8), (2, 3, 7, 8), torch.float32, device)
    mask = _keep_mask((7,), device)
    out = GF.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None])
    ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask[None])
    assert_criterion(out, ref, ref64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 6, 19])
def test_is_causal_square(backend, length, device):
    q, k, v = _qkv((2, 2, length, 8), (2, 2, length, 8), torch.float32, device)
    _check_against_torch(q, k, v, backend, is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hkv", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_query(backend, dtype, hkv, masked, device):
    q, k, v = _qkv((2, 4, 5, 8), (2, hkv, 6, 8), dtype, device)
    mask = _keep_mask((2, 1, 1, 6), device) if masked else None
    _check_against_torch(q, k, v, backend, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_query_mask_per_head(backend, device):
    """A mask that differs between query heads sharing one kv head."""
    q, k, v = _qkv((2, 4, 5, 8), (2, 2, 6, 8), torch.float32, device)
    _check_against_torch(q, k, v, backend, attn_mask=_keep_mask((2, 4, 1, 6), device), enable_gqa=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_kv_head_broadcasts_without_gqa(backend, device):
    """torch broadcasts one kv head over every query head even without enable_gqa."""
    q, k, v = _qkv((2, 3, 5, 8), (2, 1, 6, 8), torch.float32, device)
    _check_against_torch(q, k, v, backend)


def test_heads_differ_without_gqa_raises():
    q, k, v = _qkv((2, 4, 5, 8), (2, 2, 6, 8), torch.float32, "cpu")
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError, match="enable_gqa=True"):
        GF.scaled_dot_product_attention(q, k, v)
    q3 = torch.randn(2, 3, 5, 8)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q3, k, v, enable_gqa=True)
    with pytest.raises(RuntimeError, match="must divide that of query"):
        GF.scaled_dot_product_attention(q3, k, v, enable_gqa=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "q_shape,kv_shape,mask_shape",
    [
        ((3, 5, 8), (3, 6, 8), None),  # (N, L, E)
        ((3, 5, 8), (3, 6, 8), (3, 1, 6)),  # per-sample key padding
        ((5, 8), (6, 8), (1, 6)),  # (L, E)
        ((2, 2, 3, 5, 8), (2, 2, 3, 6, 8), (2, 1, 1, 1, 6)),  # (N, T, H, L, E)
        ((2, 3, 5, 8), (3, 6, 8), None),  # key/value broadcast over the batch
    ],
)
def test_other_ranks(backend, q_shape, kv_shape, mask_shape, device):
    q, k, v = _qkv(q_shape, kv_shape, torch.float32, device)
    mask = None if mask_shape is None else _keep_mask(mask_shape, device)
    _check_against_torch(q, k, v, backend, attn_mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale(backend, device):
    q, k, v = _qkv((2, 2, 5, 8), (2, 2, 7, 8), torch.float32, device)
    _check_against_torch(q, k, v, backend, scale=0.3, attn_mask=_keep_mask((2, 1, 1, 7), device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_views(backend, device):
    """(B, L, H, E) projections viewed as (B, H, L, E), as attention layers pass them."""
    q = torch.randn(2, 5, 3, 8, device=device).transpose(1, 2)
    k = torch.randn(2, 7, 3, 8, device=device).transpose(1, 2)
    v = torch.randn(2, 7, 3, 8, device=device).transpose(1, 2)
    _check_against_torch(q, k, v, backend, attn_mask=_keep_mask((2, 1, 1, 7), device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"mask": (2, 1, 1, 6)}, {"enable_gqa": True}])
def test_gradients(backend, kwargs, device):
    """dq, dk, dv against torch's SDPA differentiated in float64."""
    kwargs = dict(kwargs)
    if "mask" in kwargs:
        kwargs["attn_mask"] = _keep_mask(kwargs.pop("mask"), device)
    hkv = 1 if kwargs.get("enable_gqa") else 2
    q, k, v = _qkv((2, 2, 6, 8), (2, hkv, 6, 8), torch.float32, device)
    dout = torch.randn(2, 2, 6, 8, device=device)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        fn(*leaves, **kwargs).backward(dout.to(dtype))
        return [t.grad for t in leaves]

    got = grads(lambda *a, **kw: GF.scaled_dot_product_attention(*a, backend=backend, **kw), torch.float32)
    ref = grads(F.scaled_dot_product_attention, torch.float32)
    ref64 = grads(F.scaled_dot_product_attention, torch.float64)
    for name, g, r, r64 in zip(("dq", "dk", "dv"), got, ref, ref64):
        assert_criterion(g, r, r64, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 5), (2, 1, 1, 1)])
def test_fully_masked_rows_give_zeros(backend, mask_shape, device):
    """A query whose keys are all masked out outputs zeros (documented; older torch gives NaN)."""
    q, k, v = _qkv((2, 2, 4, 8), (2, 2, 5, 8), torch.float32, device)
    mask = _keep_mask(mask_shape, device)
    mask[1] = False
    out = GF.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_criterion(
        out[0],
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[0],
        F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)[0],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, device):
    q, k, v = _qkv((0, 2, 5, 8), (0, 2, 7, 8), torch.float32, device)
    out = GF.scaled_dot_product_attention(q, k, v, backend=backend)
    assert out.shape == F.scaled_dot_product_attention(q, k, v).shape


# --------------------------------------------------------------------------- what the op cannot run


def _fall_through_cases(device):
    """(name in the error, arguments) of calls that go to torch's own SDPA."""
    q, k, v = _qkv((2, 2, 5, 8), (2, 2, 7, 8), torch.float32, device)
    qs, ks, vs = _qkv((2, 2, 5, 8), (2, 2, 5, 8), torch.float32, device)
    return [
        ("dropout_p", (q, k, v), {"dropout_p": 0.3}),
        ("attn_mask", (q, k, v), {"attn_mask": torch.randn(2, 1, 5, 7, device=device)}),
        ("attn_mask", (q, k, v), {"attn_mask": _keep_mask((2, 1, 5, 7), device)}),
        ("is_causal", (q, k, v), {"is_causal": True}),
        ("is_causal", (qs, ks, vs), {"is_causal": True, "attn_mask": _keep_mask((1, 5), device)}),
        ("Ev", _qkv((2, 2, 5, 8), (2, 2, 7, 8), torch.float32, device, v_last=6), {}),
    ]


@pytest.mark.parametrize("case", range(6))
def test_fall_through_under_auto_is_torch(case, device):
    """Under "auto" the calls the op cannot run give exactly torch's result (dropout: same seed, same mask)."""
    _, args, kwargs = _fall_through_cases(device)[case]
    torch.manual_seed(1234)
    got = GF.scaled_dot_product_attention(*args, **kwargs)
    torch.manual_seed(1234)
    expected = F.scaled_dot_product_attention(*args, **kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("case", range(6))
def test_fall_through_raises_under_explicit_backend(case, device):
    name, args, kwargs = _fall_through_cases(device)[case]
    with pytest.raises(genkernels.UnsupportedError, match=f"backend 'triton' cannot run this call: .*{name}"):
        GF.scaled_dot_product_attention(*args, backend="triton", **kwargs)
    with genkernels.backend("reference"), pytest.raises(genkernels.UnsupportedError, match=name):
        GF.scaled_dot_product_attention(*args, **kwargs)


def test_dropout_is_random():
    """The fall-through really applies dropout (torch's functional form ignores training mode)."""
    q, k, v = _qkv((1, 1, 16, 8), (1, 1, 16, 8), torch.float32, "cpu")
    a = GF.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    b = GF.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, device):
    """The drop-in traces without graph breaks (it reaches the op's torch.library registration)."""
    torch._dynamo.reset()
    q, k, v = _qkv((2, 2, 5, 8), (2, 2, 7, 8), torch.float32, device)
    mask = _keep_mask((2, 1, 1, 7), device)

    def fn(q, k, v, mask):
        return GF.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)

    expected = fn(q, k, v, mask)
    got = torch.compile(fn, fullgraph=True)(q, k, v, mask)
    torch.testing.assert_close(got, expected)


def test_compile_fall_through(device):
    """Under "auto", a traced call the op cannot run is torch's SDPA, without graph breaks."""
    torch._dynamo.reset()
    q, k, v = _qkv((2, 2, 5, 8), (2, 2, 7, 8), torch.float32, device)
    bias = torch.randn(2, 1, 5, 7, device=device)

    def fn(q, k, v, bias):
        return GF.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    got = torch.compile(fn, fullgraph=True)(q, k, v, bias)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
