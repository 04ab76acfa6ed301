"""The (N, C, S) view of image tensors that every image kernel uses."""

import torch

from genkernels._layout import dense_layout, image_layout, is_channels_last, match_layout


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
