"""KVCache and CausalSelfAttention at their edges: the layer against a float64 eager causal attention with rope (with
and without the cache), autograd through a cache fed in several calls and reused after reset, autocast, caches of
another dtype or device, and the cache's counts. CPU: the reference backend, and triton under the interpreter."""

from __future__ import annotations

import math

import pytest
import torch

from genkernels.nn import CausalSelfAttention, KVCache
from genkernels.ops import rope_frequencies
from tests.criterion import assert_criterion

pytestmark = pytest.mark.usefixtures("one_thread")


def _eager(layer: CausalSelfAttention, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """Causal attention with rotate-half rope on the first 2 P channels of every head (P = cos.shape[-1]), in x's
    dtype, from the layer's weights: the specification."""
    weight = {name: getattr(layer, name).weight.to(x.dtype) for name in ("to_q", "to_k", "to_v")}
    heads, dim_head = layer.heads, layer.dim_head
    q, k, v = (
        (x @ weight[name].T).unflatten(-1, (heads, dim_head)).transpose(1, 2) for name in ("to_q", "to_k", "to_v")
    )
    half, c, s = cos.shape[-1], cos.to(x.dtype), sin.to(x.dtype)

    def rotate(t):
        a, b, rest = t[..., :half], t[..., half : 2 * half], t[..., 2 * half :]
        return torch.cat([a * c - b * s, b * c + a * s, rest], -1)

    q, k = rotate(q), rotate(k)
    length = x.shape[1]
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim_head)
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), -math.inf)
    o = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    return o @ layer.to_out[0].weight.to(x.dtype).T


@pytest.mark.parametrize("length", [1, 2, 13])
@pytest.mark.parametrize("pairs", [4, 1], ids=["full_rotary", "partial_rotary"])
def test_layer_and_its_cache_against_float64_causal_attention(length, pairs):
    """The full-sequence layer (training) and the cache fed one token at a time with the tables of each token's
    position (p, not p - 1 nor 0) give a float64 eager causal attention with rope; three heads of 8 in a dim of 20
    (heads * dim_head != dim), a cache exactly as long as the sequence."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(20, heads=3, dim_head=8, backend="reference")
    x = torch.randn(2, length, 20)
    cos, sin = rope_frequencies(torch.arange(length), 2 * pairs)
    want = _eager(layer, x.double(), cos.double(), sin.double())
    ref = _eager(layer, x, cos, sin)
    assert_criterion(layer(x, (cos, sin)), ref, want, "full sequence")
    for grad in (False, True):
        cache = layer.new_cache(2, length)
        with torch.set_grad_enabled(grad):
            steps = [layer(x[:, p : p + 1], (cos[p : p + 1], sin[p : p + 1]), cache) for p in range(length)]
        assert cache.length == length
        assert_criterion(torch.cat(steps, 1), ref, want, f"cached, grad={grad}")
        with pytest.raises(ValueError, match=f"the cache holds {length} positions; appending 1 to {length}"):
            layer(x[:, :1], (cos[:1], sin[:1]), cache)
        assert cache.length == length


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backward_through_a_cache_fed_in_several_calls(backend, device):
    """With grad, the keys and values a call appended were read by its attention as views of the cache's buffer,
    which the next call's append wrote in place: the backward of the triton (and CUDA) attention, which saves its
    inputs, failed ("modified by an inplace operation"). The gradient is the full sequence's."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, heads=2, backend=backend).to(device)
    cos, sin = (t.to(device) for t in rope_frequencies(torch.arange(5), 8))
    x = torch.randn(2, 5, 16, device=device, requires_grad=True)
    cache = layer.new_cache(2, 5)
    out = torch.cat([layer(x[:, a:b], (cos[a:b], sin[a:b]), cache) for a, b in ((0, 2), (2, 3), (3, 5))], 1)
    grad, weight_grad = torch.autograd.grad(out.square().sum(), (x, layer.to_k.weight))
    full = layer(x, (cos, sin))
    want, want_weight = torch.autograd.grad(full.square().sum(), (x, layer.to_k.weight))
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(grad, want)
    torch.testing.assert_close(weight_grad, want_weight)


def test_a_reset_cache_forgets_the_autograd_history():
    """A cache reset and fed again in the next training step kept the previous step's autograd graph in its buffer:
    that step's backward failed ("backward through the graph a second time"), and the graph (and the activations it
    holds) was never freed. Each step's gradient is that of the full sequence."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, heads=2, backend="reference")
    cache = layer.new_cache(2, 4)
    for _ in range(3):
        x = torch.randn(2, 4, 16, requires_grad=True)
        cache.reset()
        out = torch.cat([layer(x[:, :3], None, cache), layer(x[:, 3:], None, cache)], 1)
        (grad,) = torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(grad, torch.autograd.grad(layer(x).sum(), x)[0])
    cache.reset()
    assert cache.qkv.grad_fn is None


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["x_fp32", "x_bf16"])
def test_cached_call_under_autocast(grad, batch, dtype):
    """Under autocast with grad the queries came out of to_q in bfloat16 while the cache held float32 keys: the
    attention refused the pair ("q, k and v must share one dtype"); without grad a bfloat16 x (an autocast model's
    activations) into the float32 layer failed in the product written into the cache ("Expected out tensor to have
    dtype c10::BFloat16") for one token or one sequence. The cached calls run as the uncached layer does, within
    bfloat16's criterion of the float64 layer."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, heads=2, backend="reference")
    cos, sin = rope_frequencies(torch.arange(4), 8)
    x = torch.randn(batch, 4, 16).to(dtype)
    cache = layer.new_cache(batch, 4)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        steps = [layer(x[:, a:b], (cos[a:b], sin[a:b]), cache) for a, b in ((0, 2), (2, 3), (3, 4))]
        ref = layer(x, (cos, sin))
    out = torch.cat(steps, 1)
    assert out.dtype == ref.dtype == torch.bfloat16 and out.requires_grad == grad
    assert_criterion(out, ref, _eager(layer, x.double(), cos.double(), sin.double()), "autocast")


def test_a_cache_of_another_dtype_or_device_is_refused():
    """A cache made for another dtype or device than the layer's failed inside a matrix product ("expected m1 and m2
    to have the same dtype", "Expected out tensor to have dtype float") or, on another device, wrote nowhere: the
    layer names the cache, what it holds and what it needs."""
    layer = CausalSelfAttention(16, heads=2, backend="reference")
    x = torch.randn(2, 3, 16)
    for grad in (False, True):
        for length in (1, 3):
            for kwargs in (dict(dtype=torch.float64), dict(dtype=torch.float16), dict(device="meta")):
                cache = KVCache(2, 2, 4, 8, **kwargs)
                with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=r"cache holds .* on .* this layer"):
                    layer(x[:, :length], None, cache)
                assert cache.length == 0


def test_counts_must_be_non_negative_ints():
    """A negative count moved the cache's length backwards (commit(-1) on an empty cache: length -1, and the views
    of "every position held" then dropped the last one)."""
    cache = KVCache(1, 2, 4, 8)
    for method in (cache.next_rows, cache.next_slots, cache.commit):
        for count in (-1, 1.5):
            with pytest.raises(ValueError, match=rf"count must be an int >= 0, got {count!r}"):
                method(count)
    assert cache.length == 0
    assert cache.commit(0)[0].shape == (1, 2, 0, 8)
