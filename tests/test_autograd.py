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
def test_ops_give_the_same_outputs_with_and_without_the_node(requires_grad, device, monkeypatch):
    """The triton backend (interpreter) through both paths: the same values; a node only with requires_grad,
    and the ops go through _autograd.apply, which skips it exactly when no input requires grad."""
    skipped = []
    real = _autograd.apply

    def spy(function, *args):
        skipped.append(not _autograd.needs_graph(args))
        return real(function, *args)

    monkeypatch.setattr(_autograd, "apply", spy)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, device=device).requires_grad_(requires_grad)
    shift, scale = torch.randn(2, 16, device=device), torch.randn(2, 16, device=device)
    y = ops.layer_norm_modulate(x, None, None, shift, scale, backend="triton")
    assert (y.grad_fn is not None) == requires_grad
    ref = ops.layer_norm_modulate(x.detach(), None, None, shift, scale, backend="reference")
    x64, shift64, scale64 = x.detach().double(), shift.double(), scale.double()
    truth = ops.layer_norm_modulate(x64, None, None, shift64, scale64, backend="reference")
    assert_criterion(y.detach(), ref, truth, "y")
    g = ops.gelu_tanh(x, backend="triton")
    assert (g.grad_fn is not None) == requires_grad
    assert skipped == [not requires_grad] * 2  # the two triton calls (the reference ones take no Function)


# --------------------------------------------------------------------------- first-order-only backwards


def _t(*shape, device="cpu"):
    return torch.randn(*shape, device=device)


# Ops whose fast backward is not itself differentiable: (name, call(backend, *inputs), inputs, whether the
# reference backend is differentiable to any order). Tiny shapes for the Triton interpreter.
FIRST_ORDER = [
    ("layer_norm_modulate", lambda be, x, s: ops.layer_norm_modulate(x, None, None, s, s, backend=be), (2, 3, 8), True),
    ("gated_residual", lambda be, x, y: ops.gated_residual(x, y, y[:, 0], backend=be), (2, 3, 8), True),
    (
        "gated_residual_layer_norm_modulate",
        lambda be, x, y: ops.gated_residual_layer_norm_modulate(x, y, y[:, 0], backend=be)[1],
        (2, 3, 8),
        True,
    ),
    ("group_norm", lambda be, x, _: ops.group_norm(x, 2, activation="silu", backend=be), (2, 4, 3), True),
    ("attention", lambda be, q, k: ops.attention(q, k, k, backend=be), (1, 4, 2, 16), True),
    ("affine_coupling", lambda be, x, h: ops.affine_coupling(x, h, backend=be)[0], (2, 4, 3, 3), True),
    ("actnorm", lambda be, x, _: ops.actnorm(x, x[0, :, 0, 0] * 0.1, x[1, :, 0, 0], backend=be)[0], (2, 4, 3, 3), True),
    ("reparameterize", lambda be, m, lv: ops.reparameterize(m, lv * 0.3, seed=1, backend=be)[0], (2, 3, 4, 4), False),
]


@pytest.mark.parametrize("name, call, shape, reference_ok", FIRST_ORDER, ids=[c[0] for c in FIRST_ORDER])
def test_first_order_backwards_refuse_create_graph(name, call, shape, reference_ok, device):
    """A gradient built with create_graph=True through a first-order-only backward raises at once, naming the op.
    It used to come back without its second-order terms: torch.autograd.grad with ``inputs=`` skipped
    once_differentiable's deferred error (here: the penalty's gradient missed the op's share without a word).
    Without create_graph the same backward runs; where the reference is differentiable to any order it still is."""
    torch.manual_seed(0)
    a, b = (_t(*shape, device=device).requires_grad_(True) for _ in range(2))
    out = call("triton", a, b)
    (ga,) = torch.autograd.grad((out**3).sum(), a, retain_graph=True)  # first order: fine
    assert torch.isfinite(ga).all()
    with pytest.raises(RuntimeError, match=rf"genkernels\.ops\.{name}: the backward is first-order only"):
        torch.autograd.grad((out**3).sum(), a, create_graph=True)
    ref = call("reference", a, b)
    if reference_ok:
        (g,) = torch.autograd.grad((ref**3).sum(), a, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum() + a.sum(), a)
        assert torch.isfinite(gg).all() and not torch.allclose(gg, torch.ones_like(gg))  # the op's share is there
    else:
        with pytest.raises(RuntimeError, match="first-order only on every backend"):
            torch.autograd.grad((ref**3).sum(), a, create_graph=True)
