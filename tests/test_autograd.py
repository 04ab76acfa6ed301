"""genkernels._autograd: an op's Function runs without an autograd node when no graph would be recorded."""

from __future__ import annotations

import pytest
import torch

from genkernels import _autograd, ops
from tests.criterion import assert_criterion


class _Scale(torch.autograd.Function):
    calls: list[bool] = []  # per forward: whether it ran without an autograd node

    @staticmethod
    def forward(ctx, x, factor):
        _Scale.calls.append(isinstance(ctx, _autograd._NoGraph))
        ctx.save_for_backward(x)
        ctx.set_materialize_grads(False)
        ctx.factor = factor
        return x * factor

    @staticmethod
    def backward(ctx, dy):
        return dy * ctx.factor, None


def test_apply_skips_the_node_only_when_no_graph_is_recorded():
    x = torch.randn(5)
    _Scale.calls.clear()
    y = _autograd.apply(_Scale, x, 3.0)
    assert y.grad_fn is None and torch.equal(y, x * 3) and _Scale.calls == [True]

    leaf = x.clone().requires_grad_(True)
    y = _autograd.apply(_Scale, leaf, 3.0)
    assert y.grad_fn is not None and _Scale.calls == [True, False]  # the Function's node: gradients flow
    (g,) = torch.autograd.grad(y.sum(), leaf)
    assert torch.equal(g, torch.full_like(x, 3.0))
    with torch.no_grad():
        assert _autograd.apply(_Scale, leaf, 3.0).grad_fn is None
    assert _Scale.calls == [True, False, True]
    assert not _autograd.needs_graph((x, 3.0)) and _autograd.needs_graph((leaf,))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_ops_give_the_same_outputs_with_and_without_the_node(requires_grad, monkeypatch):
    """The triton backend (interpreter) through both paths: the same values; a node only with requires_grad,
    and the ops go through _autograd.apply, which skips it exactly when no input requires grad."""
    skipped = []
    real = _autograd.apply

    def spy(function, *args):
        skipped.append(not _autograd.needs_graph(args))
        return real(function, *args)

    monkeypatch.setattr(_autograd, "apply", spy)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16).requires_grad_(requires_grad)
    shift, scale = torch.randn(2, 16), torch.randn(2, 16)
    y = ops.layer_norm_modulate(x, None, None, shift, scale, backend="triton")
    assert (y.grad_fn is not None) == requires_grad
    ref = ops.layer_norm_modulate(x.detach(), None, None, shift, scale, backend="reference")
    x64, shift64, scale64 = x.detach().double(), shift.double(), scale.double()
    truth = ops.layer_norm_modulate(x64, None, None, shift64, scale64, backend="reference")
    assert_criterion(y.detach(), ref, truth, "y")
    g = ops.gelu_tanh(x, backend="triton")
    assert (g.grad_fn is not None) == requires_grad
    assert skipped == [not requires_grad] * 2  # the two triton calls (the reference ones take no Function)
