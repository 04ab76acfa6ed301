"""Attention: inputs real users pass that the main suite does not cover (each test a defect found and fixed)."""

from __future__ import annotations

import pytest
import torch

import genkernels
from genkernels.nn import functional as GF
from genkernels.ops import attention, attention_reference
from tests.criterion import assert_criterion


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
