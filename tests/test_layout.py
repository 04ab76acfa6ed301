"""The (N, C, S) view of image tensors that every image kernel uses, and the two memory orders of attention's
(B, H, L, D) tensors."""

import torch

from genkernels._layout import dense_layout, heads_inner, heads_like, image_layout, is_channels_last, match_layout


def test_layouts():
    x = torch.randn(2, 3, 4, 5)
    assert image_layout(x) == (2, 3, 20, 60, 20, 1)
    cl = x.to(memory_format=torch.channels_last)
    assert is_channels_last(cl) and dense_layout(cl) is cl
    assert image_layout(cl) == (2, 3, 20, 60, 1, 3)
    cl3 = torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d)
    assert image_layout(cl3) == (2, 3, 120, 360, 1, 3)
    strided = x[..., ::2]
    assert not is_channels_last(strided) and dense_layout(strided).is_contiguous()
    assert not is_channels_last(torch.randn(2, 1, 4, 4).to(memory_format=torch.channels_last))


def test_match_layout():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    t = torch.randn(2, 3, 4, 5)
    m = match_layout(t, x)
    assert is_channels_last(m) and torch.equal(m, t)
    assert match_layout(m, x) is m
    assert match_layout(m, t).is_contiguous()


def test_heads_like():
    """Heads inner (a (B, L, H, D) tensor, dense or a slot of a fused qkv, seen as (B, H, L, D)) gives dense
    heads-inner memory; anything else, and orders that do not show (H = 1, L = 1), give contiguous."""
    b, h, length, d = 2, 3, 5, 8
    qkv = torch.randn(b, length, 3, h, d).permute(2, 0, 3, 1, 4)
    for t in (torch.randn(b, length, h, d).transpose(1, 2), qkv[0]):
        assert heads_inner(t)
        out = heads_like(t)
        assert out.shape == t.shape and out.dtype == t.dtype
        assert out.stride() == (length * h * d, d, h * d, 1)
        merged = out.transpose(1, 2).reshape(b, length, h * d)
        assert merged.data_ptr() == out.data_ptr() and merged._base is not None
    assert heads_like(qkv[0], (b, h, 7, d), torch.float16).stride() == (7 * h * d, d, h * d, 1)
    for t in (torch.randn(b, h, length, d), torch.randn(b, length, 1, d).transpose(1, 2)):
        assert not heads_inner(t) and heads_like(t).is_contiguous()
    assert not heads_inner(torch.randn(b, 1, h, d).transpose(1, 2))
    assert not heads_inner(torch.randn(b, length, h))
