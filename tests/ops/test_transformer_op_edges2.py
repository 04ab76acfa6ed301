"""The transformer ops (rope, the adaLN ops, gelu_tanh, swiglu) and their layers at the edges users reach:
traced calls under a backend scope, learned rotary tables, mixed dtypes as autocast gives them."""

from __future__ import annotations

import importlib

import pytest
import torch

import genkernels
from genkernels.ops import rope, rope_frequencies
from tests.criterion import assert_criterion

RP = importlib.import_module("genkernels.ops.rope")
FAST = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
pytestmark = pytest.mark.usefixtures("one_thread")


def _rope_inputs(device, dtype=torch.float32):
    q = torch.randn(2, 3, 5, 12, device=device, dtype=dtype)
    k = torch.randn(2, 1, 5, 12, device=device, dtype=dtype)
    cos, sin = rope_frequencies(torch.arange(5, device=device), 8)  # partial rotary: 8 of 12 channels
    return q, k, cos, sin


def _counting(monkeypatch, backend):
    """Counts the rotations the ``backend`` module runs."""
    module = RP._triton if backend == "triton" else RP._cuda
    calls = []
    rotate = module.rotate

    def counted(*args):
        calls.append(1)
        return rotate(*args)

    monkeypatch.setattr(module, "rotate", counted)
    return calls


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("how", ["argument", "scope"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_learned_tables_run_on_the_requested_backend(backend, how, compiled, interleaved, device, monkeypatch):
    """cos and sin that require grad (learned rotary tables): traced in a ``genkernels.backend`` block, the call
    ran the reference with no word (an explicit backend argument raised; eager calls raised in both forms). The
    fast backends now take such tables: the fused rotation forward and backward, the tables' gradients as sums of
    the incoming gradient times the inputs, to the DESIGN criterion against the float64 reference."""
    torch._dynamo.reset()
    q, k, cos, sin = _rope_inputs(device)
    calls = _counting(monkeypatch, backend)

    def fn(q, k, cos, sin):
        qo, ko = rope(q, k, cos, sin, interleaved=interleaved, backend=backend if how == "argument" else None)
        return qo * qo.detach(), ko

    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, cos, sin)]
    run = torch.compile(fn, fullgraph=True) if compiled else fn
    if how == "scope":
        with genkernels.backend(backend):
            outs = run(*leaves)
    else:
        outs = run(*leaves)
    grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    assert len(calls) >= 2  # the forward and the backward rotation

    def reference(dtype):
        ls = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, cos, sin)]
        qo, ko = RP.rope_reference(*ls, interleaved=interleaved)
        o = (qo * qo.detach(), ko)
        return (*o, *torch.autograd.grad(o, ls, [torch.ones_like(t) for t in o]))

    want, truth = reference(torch.float32), reference(torch.float64)
    names = ("q_out", "k_out", "dq", "dk", "dcos", "dsin")
    for name, got, w, t in zip(names, (*outs, *grads), want, truth):
        assert_criterion(got, w, t, name, relative_floor=name in ("dcos", "dsin"))


@pytest.mark.parametrize("backend", FAST)
def test_rope_learned_tables_second_order(backend, device):
    """The second derivative through learned tables (a gradient penalty): the tables' gradient of the first
    gradient matches the float64 reference's, as do q's and the incoming gradient's."""
    q, k, cos, sin = _rope_inputs(device)
    dy = torch.randn(q.shape, device=device)

    def second(dtype, chosen):
        ls = [t.detach().to(dtype).requires_grad_(True) for t in (q, cos, sin, dy)]
        qo, _ = rope(ls[0], None, ls[1], ls[2], backend=chosen)
        first = torch.autograd.grad(qo, ls[:3], ls[3], create_graph=True)
        penalty = sum((g * g).sum() for g in first)
        return (*first, *torch.autograd.grad(penalty, ls))

    got, want, truth = (
        second(torch.float32, backend),
        second(torch.float32, "reference"),
        second(torch.float64, "reference"),
    )
    names = ("dq", "dcos", "dsin", "ddq", "ddcos", "ddsin", "dddy")
    for name, g, w, t in zip(names, got, want, truth):
        assert_criterion(g, w, t, name, relative_floor=True)


def test_rope_opcheck_with_learned_tables(device):
    """genkernels::rope's autograd formula with cos and sin that require grad (the traced path of learned tables)."""
    q, k, cos, sin = _rope_inputs(device)
    args = (q.requires_grad_(True), k, cos.requires_grad_(True), sin.requires_grad_(True), True, False, "")
    torch.library.opcheck(torch.ops.genkernels.rope.default, args)


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_modulate_layer_refuses_another_width(affine):
    """A LayerNormModulate(8) without affine normalized any last dim it was given (a (B, D, L) tensor passed for
    (B, L, D) came back normalized over L, no error); with affine the error named the weight. torch.nn.LayerNorm
    refuses both; now a ValueError names x, its shape and the layer's dim."""
    layer = genkernels.nn.LayerNormModulate(8, elementwise_affine=affine)
    with pytest.raises(
        ValueError, match=r"x has 5 channels in its last dim but this layer has dim=8, got shape \(2, 8, 5\)"
    ):
        layer(torch.randn(2, 8, 5))
    assert layer(torch.randn(2, 5, 8)).shape == (2, 5, 8)


def test_layer_norm_modulate_layer_refuses_infinite_eps():
    """eps=inf was accepted by the constructor and refused at the first call."""
    with pytest.raises(ValueError, match="eps must be a finite number > 0, got inf"):
        genkernels.nn.LayerNormModulate(8, eps=float("inf"))


@pytest.mark.parametrize("via", [torch.float16, torch.bfloat16])
def test_rotary_tables_recomputed_when_their_dtype_changes(via):
    """RotaryEmbedding converted to half precision and back (``model.half()`` for inference, then ``.float()``)
    kept the half-precision values widened: tables 2.4e-4 (float16) to 2e-3 (bfloat16) off, so every rotation of
    the float32 model after it. The tables are recomputed from the positions (in float64, rounded once) whenever
    their dtype changes."""
    rotary = genkernels.nn.RotaryEmbedding(16, 300)
    fresh = (rotary.cos.clone(), rotary.sin.clone())
    rotary.to(via)
    want = rope_frequencies(torch.arange(300), 16, dtype=via)
    torch.testing.assert_close((rotary.cos, rotary.sin), want, rtol=0, atol=0)
    rotary.float()
    torch.testing.assert_close((rotary.cos, rotary.sin), fresh, rtol=0, atol=0)


@pytest.mark.parametrize("start, length", [(2.5, 3), (0, 3.0), (True, 2)])
def test_rotary_forward_names_a_non_integer_position(start, length):
    """forward(2.5, 3) failed in Python's slicing ("slice indices must be integers"), naming neither argument."""
    rotary = genkernels.nn.RotaryEmbedding(8, 16)
    with pytest.raises(TypeError, match=r"start and length must be ints"):
        rotary(start, length)
