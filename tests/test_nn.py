"""Drop-in modules: torch.nn.GroupNorm's constructor, parameters and state_dict keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import genkernels


@pytest.mark.parametrize("affine", [True, False])
def test_state_dict_round_trip(affine):
    theirs = torch.nn.GroupNorm(4, 12, eps=1e-6, affine=affine)
    if affine:
        torch.nn.init.normal_(theirs.weight)
        torch.nn.init.normal_(theirs.bias)
    for cls in (genkernels.nn.GroupNorm, genkernels.nn.GroupNormSiLU):
        ours = cls(4, 12, eps=1e-6, affine=affine)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict())
        back = torch.nn.GroupNorm(4, 12, eps=1e-6, affine=affine)
        back.load_state_dict(ours.state_dict())
        assert (ours.num_groups, ours.num_channels, ours.eps, ours.affine) == (4, 12, 1e-6, affine)


def test_forward_matches_torch():
    theirs = torch.nn.GroupNorm(4, 12)
    torch.nn.init.normal_(theirs.weight)
    torch.nn.init.normal_(theirs.bias)
    x = torch.randn(3, 12, 5, 5)
    gn = genkernels.nn.GroupNorm(4, 12, backend="reference")
    gn.load_state_dict(theirs.state_dict())
    gns = genkernels.nn.GroupNormSiLU(4, 12, backend="reference")
    gns.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(gn(x), theirs(x))
    torch.testing.assert_close(gns(x), F.silu(theirs(x)))


def test_from_torch_shares_parameters():
    theirs = torch.nn.GroupNorm(2, 6)
    ours = genkernels.nn.GroupNormSiLU.from_torch(theirs, backend="reference")
    assert ours.weight is theirs.weight
    x = torch.randn(2, 6, 3)
    torch.testing.assert_close(ours(x), F.silu(theirs(x)))
    assert "backend='reference'" in repr(ours)


def test_device_and_dtype_arguments():
    gn = genkernels.nn.GroupNormSiLU(2, 4, device="cpu", dtype=torch.float64)
    assert gn.weight.dtype == torch.float64
    y = gn(torch.randn(1, 4, 2, 2, dtype=torch.float64))
    assert y.dtype == torch.float64
