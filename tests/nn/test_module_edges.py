"""Edges of the drop-in modules (genkernels.nn): wrong inputs must fail clearly instead of computing
something else. CPU, reference backend."""

import copy
import math

import pytest
import torch

from genkernels.nn import CausalSelfAttention, KVCache, RotaryEmbedding
from genkernels.ops import rope_frequencies

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize(
    "shape",
    [(2, 4, 8, 4), (3, 2, 8, 8), (2, 2, 8, 4)],
    ids=["other_heads_same_width", "other_batch", "other_dim_head"],
)
def test_causal_attention_refuses_a_cache_of_another_shape(shape, grad):
    """A KVCache made for another layer or batch (4 heads of 4 where the layer has 2 of 8: the same row width)
    was accepted on the no-grad path, which then attended with the cache's head split: a silently wrong
    result; other mismatches failed inside a matrix product with a size message naming no argument."""
    layer = CausalSelfAttention(16, heads=2, backend="reference")
    x = torch.randn(2, 3, 16)
    cache = KVCache(*shape)
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=r"cache holds .* this layer and x need"):
        layer(x, cache=cache)
    assert cache.length == 0
    with pytest.raises(TypeError, match="cache must be None or a KVCache"):
        layer(x, cache=object())
    # A cache of the right shape still runs, and gives the uncached result.
    good = layer.new_cache(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, cache=good), layer(x))


def _exact_rope_tables(dim_head: int, max_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of p * base^(-2j / dim_head) in Python floats (float64 throughout)."""
    angles = [[p * base ** (-2.0 * j / dim_head) for j in range(dim_head // 2)] for p in range(max_len)]
    cos = torch.tensor([[math.cos(a) for a in row] for row in angles], dtype=torch.float64)
    sin = torch.tensor([[math.sin(a) for a in row] for row in angles], dtype=torch.float64)
    return cos, sin


@pytest.mark.parametrize("convert", ["double", "to"])
def test_rotary_embedding_converted_to_float64_has_float64_tables(convert):
    """The cos / sin buffers were float32 tables that .double() only widened: a float64 model rotated with errors
    of ~3e-8 instead of ~1e-16. Converted to float64 the module computes them again in float64; float32 (as made, or
    converted back), bfloat16 and the state_dict are as before, and device moves keep working."""
    rotary = RotaryEmbedding(8, 100, base=500.0)
    cos32, sin32 = rope_frequencies(torch.arange(100), 8, base=500.0)
    assert torch.equal(rotary.cos, cos32) and torch.equal(rotary.sin, sin32)  # unchanged as made
    assert rotary.state_dict() == {}
    bf16 = copy.deepcopy(rotary).to(torch.bfloat16)
    assert torch.equal(bf16.cos, cos32.to(torch.bfloat16)) and torch.equal(bf16.sin, sin32.to(torch.bfloat16))
    wide = rotary.double() if convert == "double" else rotary.to(torch.float64)
    assert wide is rotary and rotary.cos.dtype == rotary.sin.dtype == torch.float64
    cos, sin = _exact_rope_tables(8, 100, 500.0)
    assert (rotary.cos - cos).abs().max() < 1e-13 and (rotary.sin - sin).abs().max() < 1e-13
    assert rotary.state_dict() == {}
    torch.testing.assert_close(rotary(3, 4), (cos[3:7], sin[3:7]), rtol=0, atol=1e-13)
    moved = copy.deepcopy(rotary).to("meta")
    assert moved.cos.device.type == "meta" and moved.cos.dtype == torch.float64 and moved.cos.shape == (100, 4)
    rotary.float()  # back to float32: rope_frequencies' tables again
    assert torch.equal(rotary.cos, cos32) and torch.equal(rotary.sin, sin32)
