"""genkernels.nn.Attention: diffusers' parameter names, and the function it computes written out by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import genkernels
from tests.criterion import assert_criterion

BACKENDS = ["reference", "triton"]


def _module(backend, device, cross_attention_dim=None, bias=True, heads=2, dim_head=8, query_dim=12):
    return genkernels.nn.Attention(
        query_dim, cross_attention_dim, heads=heads, dim_head=dim_head, bias=bias, backend=backend
    ).to(device)


def _by_hand(attn, x, context=None, key_padding_mask=None, causal=False):
    """to_out(softmax(q k^T / sqrt(d) + masks) v) with q, k, v from attn's Linear weights, written out."""
    context = x if context is None else context

    def project(linear, t):
        y = t @ linear.weight.T
        return y if linear.bias is None else y + linear.bias

    b, length, _ = x.shape
    source = context.shape[1]

    def heads(t):
        return t.reshape(b, t.shape[1], attn.heads, attn.dim_head).permute(0, 2, 1, 3)

    q, k, v = heads(project(attn.to_q, x)), heads(project(attn.to_k, context)), heads(project(attn.to_v, context))
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.dim_head)
    allowed = torch.ones(b, 1, length, source, dtype=torch.bool, device=x.device)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    if causal:
        i = torch.arange(length, device=x.device)[:, None]
        j = torch.arange(source, device=x.device)[None, :]
        allowed = allowed & (j <= i + source - length)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    o = (weights @ v).permute(0, 2, 1, 3).reshape(b, length, attn.heads * attn.dim_head)
    return project(attn.to_out[0], o)


def _check_module(attn, x, context=None, **kwargs):
    """attn's output vs the hand-written computation: ref in float32, ref64 with float64 weights and inputs."""
    out = attn(x, context, **kwargs)
    attn64 = copy.deepcopy(attn).double()
    ref = _by_hand(attn, x, context, **kwargs)
    ref64 = _by_hand(attn64, x.double(), None if context is None else context.double(), **kwargs)
    assert_criterion(out, ref, ref64)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention(backend, bias, causal, device):
    attn = _module(backend, device, bias=bias)
    x = torch.randn(2, 7, 12, device=device)
    _check_module(attn, x, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_cross_attention(backend, masked, device):
    attn = _module(backend, device, cross_attention_dim=6, heads=3, dim_head=4)
    x = torch.randn(2, 5, 12, device=device)
    context = torch.randn(2, 9, 6, device=device)
    mask = None
    if masked:
        mask = torch.rand(2, 9, device=device) > 0.5
        mask[:, 0] = False  # every query keeps a key
    _check_module(attn, x, context, key_padding_mask=mask)


def test_state_dict_keys():
    """diffusers' Attention names, so its checkpoints load unchanged."""
    attn = genkernels.nn.Attention(32, 16, heads=4, dim_head=8)
    assert list(attn.state_dict()) == ["to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"]
    shapes = {name: tuple(t.shape) for name, t in attn.state_dict().items()}
    assert shapes == {
        "to_q.weight": (32, 32),
        "to_k.weight": (32, 16),
        "to_v.weight": (32, 16),
        "to_out.0.weight": (32, 32),
        "to_out.0.bias": (32,),
    }
    biased = genkernels.nn.Attention(32, heads=4, dim_head=8, bias=True, out_bias=False)
    assert list(biased.state_dict()) == [
        "to_q.weight",
        "to_q.bias",
        "to_k.weight",
        "to_k.bias",
        "to_v.weight",
        "to_v.bias",
        "to_out.0.weight",
    ]
    assert isinstance(biased.to_out[1], torch.nn.Dropout)


def test_load_state_dict_round_trip():
    source = genkernels.nn.Attention(12, 6, heads=2, dim_head=8, bias=True, backend="reference")
    target = genkernels.nn.Attention(12, 6, heads=2, dim_head=8, bias=True, backend="reference")
    target.load_state_dict(source.state_dict())
    x, context = torch.randn(1, 4, 12), torch.randn(1, 3, 6)
    torch.testing.assert_close(target(x, context), source(x, context), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_image_input_round_trip(backend, channels_last, device):
    """(B, C, H, W) attends over its H * W pixels and comes back as (B, C, H, W)."""
    attn = _module(backend, device, query_dim=8)
    image = torch.randn(2, 8, 3, 5, device=device)
    if channels_last:
        image = image.to(memory_format=torch.channels_last)
    out = attn(image)
    assert out.shape == image.shape
    tokens = image.flatten(2).transpose(1, 2)
    expected = attn(tokens).transpose(1, 2).reshape(image.shape)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    ref = _by_hand(attn, tokens).transpose(1, 2).reshape(image.shape)
    ref64 = _by_hand(copy.deepcopy(attn).double(), tokens.double()).transpose(1, 2).reshape(image.shape)
    assert_criterion(out, ref, ref64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_every_projection(backend, device):
    """Every parameter and the inputs get the hand-written computation's gradients."""
    attn = _module(backend, device, cross_attention_dim=6)
    x = torch.randn(2, 5, 12, device=device, requires_grad=True)
    context = torch.randn(2, 4, 6, device=device, requires_grad=True)
    dout = torch.randn(2, 5, 12, device=device)

    def grads(module, dtype, forward):
        module = copy.deepcopy(module).to(dtype)
        xs = [t.detach().to(dtype).requires_grad_(True) for t in (x, context)]
        forward(module, *xs).backward(dout.to(dtype))
        return {name: p.grad for name, p in module.named_parameters()} | {"x": xs[0].grad, "context": xs[1].grad}

    got = grads(attn, torch.float32, lambda m, a, c: m(a, c))
    ref = grads(attn, torch.float32, _by_hand)
    ref64 = grads(attn, torch.float64, _by_hand)
    assert set(got) == {
        "to_q.weight",
        "to_q.bias",
        "to_k.weight",
        "to_k.bias",
        "to_v.weight",
        "to_v.bias",
        "to_out.0.weight",
        "to_out.0.bias",
        "x",
        "context",
    }
    for name, g in got.items():
        assert g is not None, f"no gradient for {name}"
        assert g.abs().max() > 0, f"zero gradient for {name}"
        assert_criterion(g, ref[name], ref64[name], name=name, relative_floor=True)


def test_output_dropout():
    """to_out.1 drops outputs in training, is the identity in eval; the attention weights get no dropout."""
    attn = genkernels.nn.Attention(8, heads=2, dim_head=4, dropout=0.5, backend="reference")
    x = torch.randn(1, 16, 8)
    attn.eval()
    torch.testing.assert_close(attn(x), _by_hand(attn, x))
    attn.train()
    assert (attn(x) == 0).any()


def test_invalid_shapes():
    attn = genkernels.nn.Attention(8, heads=2, dim_head=4)
    with pytest.raises(ValueError, match="hidden_states must be"):
        attn(torch.randn(5, 8))
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        attn(torch.randn(1, 5, 8), torch.randn(5, 8))


def test_repr_names_the_backend():
    assert "backend='triton'" in repr(genkernels.nn.Attention(8, backend="triton"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, device):
    """The module traces without graph breaks (through genkernels::attention) and matches eager, gradients too."""
    torch._dynamo.reset()
    attn = _module(backend, device, cross_attention_dim=6)
    x = torch.randn(2, 5, 12, device=device)
    context = torch.randn(2, 4, 6, device=device)
    mask = torch.zeros(2, 4, dtype=torch.bool, device=device)
    mask[1, 2:] = True
    expected = attn(x, context, key_padding_mask=mask)
    expected.sum().backward()
    grads = {name: p.grad.clone() for name, p in attn.named_parameters()}
    attn.zero_grad()
    got = torch.compile(attn, fullgraph=True)(x, context, key_padding_mask=mask)
    got.sum().backward()
    torch.testing.assert_close(got, expected)
    for name, p in attn.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], msg=name)


def test_heads_are_views_of_the_projections(monkeypatch):
    """q, k, v reach the op as (B, heads, L, dim_head) transposed views of the Linear outputs (no copy)."""
    import genkernels.nn.attention as module

    attn = genkernels.nn.Attention(12, 6, heads=3, dim_head=4, backend="reference")
    projections, seen = {}, {}
    for name in ("to_q", "to_k", "to_v"):
        getattr(attn, name).register_forward_hook(lambda m, i, out, name=name: projections.__setitem__(name, out))
    real = module.attention

    def spy(q, k, v, **kwargs):
        seen.update(to_q=q, to_k=k, to_v=v)
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(module, "attention", spy)
    attn(torch.randn(2, 5, 12), torch.randn(2, 7, 6))
    for name, t in seen.items():
        b, length, _ = projections[name].shape
        assert t.shape == (b, 3, length, 4)
        assert t.data_ptr() == projections[name].data_ptr()
        assert t.stride() == (length * 12, 4, 12, 1)


def test_mask_and_causal_are_keyword_only():
    """diffusers' Attention takes attention_mask (True: attend) third; ours is key_padding_mask (True: ignore).
    A mask passed by position would be inverted silently, so it is a TypeError; by keyword it works."""
    attn = genkernels.nn.Attention(12, 6, heads=3, dim_head=4, backend="reference")
    x, context = torch.randn(2, 5, 12), torch.randn(2, 4, 6)
    keep = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match="positional arguments but 4 were given"):
        attn(x, context, keep)
    with pytest.raises(TypeError, match="positional arguments but 5 were given"):
        attn(x, None, None, True)
    padding = ~keep
    padding[:, 3] = True
    out = attn(x, context, key_padding_mask=padding)
    assert torch.equal(out, attn(x, context[:, :3]))
