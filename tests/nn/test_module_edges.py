"""Edges of the drop-in modules (genkernels.nn): wrong inputs must fail clearly instead of computing
something else. CPU, reference backend."""

import pytest
import torch

from genkernels.nn import CausalSelfAttention, KVCache

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
