"""Edges of the top-level API: explain(), backend scopes, GENKERNELS_BACKEND and info()."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import genkernels
from genkernels import _autograd, _registry


@pytest.fixture
def toy_op():
    """A throwaway op whose cuda backend refuses odd sizes."""
    name = "toy_edge_op_for_tests"
    _registry.register(name, "cuda", lambda n: "odd sizes are not supported" if n % 2 else None, "cuda-impl")
    _registry.register(name, "triton", lambda n: None, "triton-impl")
    _registry.register(name, "reference", lambda n: None, "reference-impl")
    yield name
    del _registry._OPS[name]
    _registry._GRAPH_ORDERS.pop(name, None)


@pytest.mark.parametrize("op", _registry.ops())
def test_explain_takes_the_ops_backend_argument(op):
    """explain() takes the op's own arguments, ``backend=`` included: it answers for every backend as without
    it, and refuses an unknown name as the op does (not with a TypeError from inside an op's wrapper)."""
    args, kwargs = _registry.probe(op, torch.device("cpu"))
    plain = genkernels.explain(op, *args, **kwargs)
    assert genkernels.explain(op, *args, **kwargs, backend="reference") == plain
    assert genkernels.explain(op, *args, **kwargs, backend=None) == plain
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'tritn'"):
        genkernels.explain(op, *args, **kwargs, backend="tritn")


def test_explain_of_an_unhashable_op_name_is_the_unknown_op_error():
    with pytest.raises(ValueError, match=r"unknown op \['group_norm'\]; registered ops: \["):
        genkernels.explain(["group_norm"], torch.randn(2, 8, 4, 4), 4)


def test_explain_lists_backends_in_the_order_auto_tries_them_inside_graph_mode(toy_op, monkeypatch):
    monkeypatch.delenv("GENKERNELS_BACKEND", raising=False)
    _registry.register_graph_order(toy_op, lambda n: ("reference",) if n >= 10 else None)
    assert list(genkernels.explain(toy_op, 10)) == ["cuda", "triton", "reference"]
    with genkernels.graph_mode():
        assert _registry.select(toy_op, 10).name == "reference"
        assert list(genkernels.explain(toy_op, 10)) == ["reference", "cuda", "triton"]
        assert list(genkernels.explain(toy_op, 2)) == ["cuda", "triton", "reference"]


def test_unsupported_error_names_where_the_backend_was_chosen(toy_op, monkeypatch):
    """A user who passed no backend= is told which block or variable forced the backend that cannot run."""
    monkeypatch.delenv("GENKERNELS_BACKEND", raising=False)
    with pytest.raises(genkernels.UnsupportedError) as argument:
        _registry.select(toy_op, 3, backend="cuda")
    assert "GENKERNELS_BACKEND" not in str(argument.value) and "genkernels.backend" not in str(argument.value)
    with genkernels.backend("cuda"), pytest.raises(genkernels.UnsupportedError, match=r"genkernels\.backend\('cuda'"):
        _registry.select(toy_op, 3)
    with genkernels.backend("cuda", ops=toy_op), pytest.raises(genkernels.UnsupportedError, match="ops="):
        _registry.check_explicit(toy_op, 3)
    monkeypatch.setenv("GENKERNELS_BACKEND", "cuda")
    with pytest.raises(genkernels.UnsupportedError, match="odd sizes.*GENKERNELS_BACKEND='cuda'"):
        _registry.select(toy_op, 3)
    _registry.register("toy_edge_ref_only_for_tests", "reference", lambda n: None, "reference-impl")
    try:
        with pytest.raises(genkernels.UnsupportedError, match="not registered.*GENKERNELS_BACKEND='cuda'"):
            _registry.check_explicit("toy_edge_ref_only_for_tests", 3)
    finally:
        del _registry._OPS["toy_edge_ref_only_for_tests"]


def test_info_says_which_backend_is_requested(monkeypatch):
    """info() reports the process-wide choice: a bad GENKERNELS_BACKEND (every op call would raise) shows there."""
    monkeypatch.delenv("GENKERNELS_BACKEND", raising=False)
    assert genkernels.info()["requested"].startswith("auto")
    monkeypatch.setenv("GENKERNELS_BACKEND", "reference")
    assert "GENKERNELS_BACKEND" in genkernels.info()["requested"]
    with genkernels.backend("triton"):
        assert genkernels.info()["requested"].startswith("triton")
    monkeypatch.setenv("GENKERNELS_BACKEND", "tritn")
    info = genkernels.info()
    assert "GENKERNELS_BACKEND must be one of" in info["requested"]
    assert "GENKERNELS_BACKEND must be one of" in str(info)


def test_forward_mode_ad_through_a_fast_backend_raises_rather_than_dropping_the_tangent(device):
    """Under forward-mode AD the kernels' Function must run through ``apply`` (which raises: no jvp), not be
    short-cut to its forward, whose output silently came back without a tangent (a zero derivative)."""
    x = torch.randn(2, 8, 4, 4, device=device)
    with fwAD.dual_level():
        assert _autograd.needs_graph((x,))
        with torch.no_grad():  # forward AD does not depend on grad mode
            assert _autograd.needs_graph((x,))
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(NotImplementedError, match="jvp"):
            genkernels.ops.group_norm(dual, 4, backend="triton")
        plain = genkernels.ops.group_norm(x, 4, backend="triton")  # no tangent: runs as outside
        assert fwAD.unpack_dual(plain).tangent is None
    assert not _autograd.needs_graph((x,))
