"""Attention: inputs real users pass that the main suite does not cover (each test a defect found and fixed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import genkernels
from genkernels.nn import functional as GF
from genkernels.ops import attention, attention_reference
from genkernels.triton._common import interpreting
from tests.criterion import assert_criterion


def _gpu_float32_dot(monkeypatch):
    """Under the interpreter, make float32 ``tl.dot`` the GPU's: one FMA chain per element in k order.

    The interpreter's tl.dot is numpy's matmul, whose summation order depends on which operand is which and
    on the tile shapes; the forward (q k^T, 32 x 16 tiles) and the dk/dv kernel (k q^T, 16 x 32) then round a
    score differently, and p = exp(s - lse) loses the normalization the forward gave it (measured: 1.9e-5 of
    max|fwd - bwd| on a 200-term q . k, enough to put dk and dv at 5 to 10 times the float32 reference's
    error). On the GPU an IEEE float32 tl.dot is triton's FMA lowering, acc = fma(a_k, b_k, acc) for
    k = 0 .. K - 1, the same bits in either orientation and tiling. Nothing to do on a GPU."""
    if not interpreting():
        return
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def fma_chain_dot(self, a, b, acc, *args):
        result = create_dot(self, a, b, acc, *args)
        if a.data.dtype == np.float32 and b.data.dtype == np.float32:
            x, y = a.data.astype(np.float64), b.data.astype(np.float64)
            chain = np.broadcast_to(acc.data, result.data.shape).astype(np.float32)
            for i in range(x.shape[-1]):  # each product is exact in float64, then one rounding
                chain = (x[..., i : i + 1] * y[..., i : i + 1, :] + chain).astype(np.float32)
            result.data[...] = chain
        return result

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", fma_chain_dot)


@pytest.mark.parametrize("d", [200, 256])
def test_triton_float32_gradients_large_head_dims_peaked(d, device, monkeypatch):
    """float32 gradients at head dims beyond 128 with peaked scores (std about 5), GQA and ragged lengths.

    An IEEE float32 product over the head dim is one FMA chain; over 200 to 256 terms its rounding is about twice
    that of the reference's sgemm (which sums K in blocks of 128), and in ds = p (dp - delta) it is multiplied by
    |dp - delta| ~ sqrt(D): dq and dk were up to 2.3 times the bound (dv, which has no dp, was not). The
    kernels now sum the head dim's two column blocks as separate chains of at most 128 terms (float32 only)."""
    _gpu_float32_dot(monkeypatch)
    for _ in range(6):
        q, k, v = _qkv_peaked(d, device)
        dout = torch.randn(q.shape, device=device)
        kernel = lambda q, k, v: attention(q, k, v, scale=0.4, backend="triton")  # noqa: E731
        ref = lambda q, k, v: attention_reference(q, k, v, scale=0.4)  # noqa: E731
        _, grads = _outputs_and_grads(kernel, q, k, v, dout)
        _, gref = _outputs_and_grads(ref, q, k, v, dout)
        _, g64 = _outputs_and_grads(ref, q.double(), k.double(), v.double(), dout.double())
        for name, g, r, r64 in zip(("dq", "dk", "dv"), grads, gref, g64):
            assert_criterion(g, r, r64, name)


def _qkv_peaked(d, device):
    """(B, Hq, Hkv, Lq, Lkv) = (1, 3, 1, 31, 33) in float32: three query heads a kv head, lengths not multiples
    of 16; unit normal entries, so that scale 0.4 gives scores of std 0.4 sqrt(d) (5.7 to 6.4)."""
    q = torch.randn(1, 3, 31, d, device=device)
    k, v = (torch.randn(1, 1, 33, d, device=device) for _ in range(2))
    return q, k, v


def _outputs_and_grads(fn, q, k, v, dout):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, dout.to(out.dtype))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", ["transposed", "expanded"])
def test_compiled_non_contiguous_key_padding_mask(backend, kind, device):
    """Under torch.compile the mask reaches the registered op with its own strides: a (Lkv, B) mask transposed,
    or one row expanded over the batch (stride 0), must mask the same keys as in eager, gradients too."""
    torch._dynamo.reset()
    b, h, lq, lkv, d = 3, 2, 5, 7, 16
    q, k, v = (torch.randn(b, h, n, d, device=device) for n in (lq, lkv, lkv))
    if kind == "transposed":
        mask = torch.rand(lkv, b, device=device) < 0.5
        mask[0] = False
        arg, make = mask, lambda m: m.t()
    else:
        mask = torch.rand(1, lkv, device=device) < 0.5
        mask[0, 0] = False
        arg, make = mask, lambda m: m.expand(b, lkv)
    full = make(arg).contiguous()
    compiled = torch.compile(
        lambda q, k, v, m: attention(q, k, v, key_padding_mask=make(m), backend=backend), fullgraph=True
    )
    dout = torch.randn(b, h, lq, d, device=device)
    out, grads = _outputs_and_grads(lambda q, k, v: compiled(q, k, v, arg), q, k, v, dout)
    ref, gref = _outputs_and_grads(lambda q, k, v: attention_reference(q, k, v, key_padding_mask=full), q, k, v, dout)
    ref64, g64 = _outputs_and_grads(
        lambda q, k, v: attention_reference(q, k, v, key_padding_mask=full), q.double(), k.double(), v.double(), dout
    )
    assert_criterion(out, ref, ref64, "out")
    for name, g, r, r64 in zip(("dq", "dk", "dv"), grads, gref, g64):
        assert_criterion(g, r, r64, name)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"heads": 0}, "heads must be a positive int, got 0"),
        ({"heads": 2.0}, r"heads must be a positive int, got 2\.0"),
        ({"dim_head": 0}, "dim_head must be a positive int, got 0"),
        ({"query_dim": -8}, "query_dim must be a positive int, got -8"),
        ({"cross_attention_dim": 0}, "cross_attention_dim must be a positive int, got 0"),
        ({"backend": "trition"}, "backend must be one of .* got 'trition'"),
    ],
    ids=["heads-0", "heads-float", "dim-head-0", "query-dim", "cross-dim", "backend"],
)
def test_module_refuses_bad_constructor_arguments(kwargs, match):
    """Sizes that cannot build the layer are named when it is built (heads=0 used to fail only at the first call,
    in the op, about q.shape[1]; heads=2.0 inside torch.empty), and so is a misspelt backend."""
    args = {"query_dim": 8, "heads": 2, "dim_head": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        genkernels.nn.Attention(**args)


@pytest.mark.parametrize(
    "hidden,context,match",
    [
        ((2, 9, 7), None, r"hidden_states must be \(B, L, query_dim = 8\) .* got shape \(2, 9, 7\)"),
        ((2, 7, 3, 3), None, r"hidden_states must be .* \(B, query_dim = 8, H, W\), got shape \(2, 7, 3, 3\)"),
        (
            (2, 9, 8),
            (2, 5, 8),
            r"encoder_hidden_states must be None or \(B, S, cross_attention_dim = 6\), got shape \(2, 5, 8\)",
        ),
        ((2, 9, 8), (3, 5, 6), r"encoder_hidden_states has batch size 3 but hidden_states has 2"),
    ],
    ids=["channels", "image-channels", "context-channels", "context-batch"],
)
def test_module_names_mismatched_inputs(hidden, context, match):
    """Inputs whose channels do not match the layer are named with the accepted shape (they used to reach a Linear
    and fail as 'mat1 and mat2 shapes cannot be multiplied'), and a context of another batch size is named as such
    (not as the op's q and k)."""
    attn = genkernels.nn.Attention(8, cross_attention_dim=6, heads=2, dim_head=4, backend="reference")
    with pytest.raises(ValueError, match=match):
        attn(torch.randn(hidden), None if context is None else torch.randn(context))


@pytest.mark.parametrize(
    "case,match",
    [
        (
            "key-dtype",
            r"query, key and value must share one dtype, got query torch.float32, key torch.float16 and value",
        ),
        ("value-device", r"query, key and value must be on one device, got query cpu, key cpu and value meta"),
        ("int", r"query, key and value must be float16, bfloat16, float32 or float64, got torch.int64"),
    ],
    ids=["key-dtype", "value-device", "int"],
)
@pytest.mark.parametrize("dropout_p", [0.0, 0.5], ids=["op", "torch"])
def test_functional_sdpa_mismatched_inputs_fail_as_torch(case, match, dropout_p):
    """genkernels.nn.functional.scaled_dot_product_attention is a drop-in: inputs torch refuses with a RuntimeError
    are refused with one on both of its paths, naming query, key and value (the calls the op runs used to raise the
    op's TypeError or ValueError about q and k, while the calls handed to torch raised torch's RuntimeError)."""
    q, k, v = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
    if case == "key-dtype":
        k = k.half()
    elif case == "value-device":
        v = v.to("meta")
    else:
        q, k, v = (t.long() for t in (q, k, v))
    with pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    with pytest.raises(RuntimeError, match=match):
        GF.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
