"""Edge cases of the norm ops and layers (group_norm, GroupNorm / GroupNormSiLU) that users pass and the main
tests do not: each test here failed before its fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import genkernels
from genkernels import ops
from genkernels.nn import GroupNorm, GroupNormSiLU
from genkernels.ops import group_norm
from tests.criterion import assert_criterion

BACKENDS = ["reference", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def _skip_unsupported(backend, *args):
    if backend != "reference":
        reason = genkernels.explain("group_norm", *args)[backend]
        if reason is not None:
            pytest.skip(f"{backend}: {reason}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_strided_weight_and_bias(backend, layout, device):
    """weight and bias as strided views (every other element of a parameter, a column of a (C, 2) table): the
    triton kernels read them as contiguous, so y and every gradient were wrong, silently."""
    c, groups = 12, 4
    x = torch.randn(2, c, 3, 5, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    wide_w = torch.randn(2 * c, device=device)
    table_b = torch.randn(c, 2, device=device)
    _skip_unsupported(backend, x, groups, wide_w[::2], table_b[:, 1], 1e-5, "silu")
    dy = torch.randn(x.shape, device=device)

    def run(x, wide_w, table_b, fn):
        leaves = [t.detach().requires_grad_(True) for t in (x, wide_w, table_b)]
        y = fn(leaves[0], leaves[1][::2], leaves[2][:, 1])
        return y, torch.autograd.grad(y, leaves, dy.to(y.dtype))

    def torch_gn(x, w, b):
        return F.silu(F.group_norm(x, groups, w, b, 1e-5))

    def ours(x, w, b):
        return group_norm(x, groups, w, b, activation="silu", backend=backend)

    out, grads = run(x, wide_w, table_b, ours)
    ref, ref_grads = run(x, wide_w, table_b, torch_gn)
    ref64, grads64 = run(x.double(), wide_w.double(), table_b.double(), torch_gn)
    assert_criterion(out, ref, ref64, "y")
    for name, g, r, r64 in zip(("dx", "dweight", "dbias"), grads, ref_grads, grads64):
        assert_criterion(g, r, r64, name, relative_floor=name != "dx")


@pytest.mark.parametrize("cls", [GroupNorm, GroupNormSiLU])
def test_group_norm_layer_refuses_an_unknown_backend_when_built(cls):
    """Every other genkernels layer (Attention, the flow and modconv layers, the DiT's) checks ``backend`` in its
    constructor; GroupNorm accepted a typo there and failed at the first forward, far from the mistake."""
    with pytest.raises(ValueError, match="backend must be one of .*got 'tritonn'"):
        cls(4, 12, backend="tritonn")
    with pytest.raises(ValueError, match="backend must be one of .*got 'tritonn'"):
        cls.from_torch(torch.nn.GroupNorm(4, 12), backend="tritonn")
    assert cls(4, 12, backend="reference").backend == "reference"


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
@pytest.mark.parametrize("name", ["layer_norm_modulate", "gated_residual", "gated_residual_layer_norm_modulate"])
def test_adaln_empty_sequence_with_per_sample_modulation(name, backend, device):
    """An empty sequence (L = 0) with the (B, D) modulations of its B = 2 samples, as eager calls: every backend
    crashed in the reference's broadcast ("The size of tensor a (2) must match the size of tensor b (0)"), while
    the traced ops ran it. Outputs of x's shape, zero gradients of every input's shape."""
    b, d = 2, 8
    x, y = (torch.randn(b, 0, d, device=device, requires_grad=True) for _ in range(2))
    gate, shift, scale = (torch.randn(b, d, device=device, requires_grad=True) for _ in range(3))
    if name == "layer_norm_modulate":
        outs, inputs = (ops.layer_norm_modulate(x, None, None, shift, scale, backend=backend),), [x, shift, scale]
    elif name == "gated_residual":
        outs, inputs = (ops.gated_residual(x, y, gate, backend=backend),), [x, y, gate]
    else:
        outs = ops.gated_residual_layer_norm_modulate(x, y, gate, None, None, shift, scale, backend=backend)
        inputs = [x, y, gate, shift, scale]
    assert all(t.shape == x.shape and t.dtype == x.dtype for t in outs)
    grads = torch.autograd.grad(sum(t.sum() for t in outs), inputs)
    for t, g in zip(inputs, grads):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_group_norm_without_affine_compiled_backward(backend, device):
    """Without weight and bias the backward op returned one empty tensor for both gradients, which a custom op's
    outputs may not share: a compiled GroupNorm(affine=False) failed in its backward ("may not alias")."""
    x = torch.randn(2, 8, 3, 3, device=device, requires_grad=True)
    ramp = torch.arange(x.numel(), device=device).view_as(x)
    f = torch.compile(lambda t: ops.group_norm(t, 4, activation="silu", backend=backend), fullgraph=True)
    (dx,) = torch.autograd.grad((f(x) * ramp).sum(), x)
    x64 = x.detach().double().requires_grad_()
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(x64, 4))
    (dx64,) = torch.autograd.grad((want * ramp).sum(), x64)
    (dx_ref,) = torch.autograd.grad((ops.group_norm(x, 4, activation="silu", backend="reference") * ramp).sum(), x)
    assert_criterion(dx, dx_ref, dx64, "dx")
