"""Backend selection: auto, explicit per call, scoped, environment, and explain()."""

from __future__ import annotations

import pytest
import torch

import genkernels
from genkernels import _registry
from genkernels.ops import group_norm


@pytest.fixture
def toy_op():
    """A throwaway op whose first backend refuses odd sizes."""
    name = "toy_op_for_tests"
    _registry.register(name, "cuda", lambda n: "odd sizes are not supported" if n % 2 else None, "cuda-impl")
    _registry.register(name, "reference", lambda n: None, "reference-impl")
    yield name
    del _registry._OPS[name]


def test_auto_picks_first_that_can_run(toy_op):
    assert _registry.select(toy_op, 2).impl == "cuda-impl"
    assert _registry.select(toy_op, 3).impl == "reference-impl"


def test_explicit_backend_raises_with_reason(toy_op):
    with pytest.raises(genkernels.UnsupportedError, match="backend 'cuda' cannot run this call: odd sizes"):
        _registry.select(toy_op, 3, backend="cuda")
    with pytest.raises(genkernels.UnsupportedError, match="'triton' is not registered"):
        _registry.select(toy_op, 2, backend="triton")


def test_scope_and_environment(toy_op, monkeypatch):
    monkeypatch.setenv("GENKERNELS_BACKEND", "reference")
    assert _registry.select(toy_op, 2).impl == "reference-impl"
    with genkernels.backend("cuda"):  # the scope beats the environment
        assert _registry.select(toy_op, 2).impl == "cuda-impl"
        with pytest.raises(genkernels.UnsupportedError):
            _registry.select(toy_op, 3)
        assert _registry.select(toy_op, 3, backend="auto").impl == "reference-impl"  # the call beats the scope
    assert _registry.requested() == "reference"
    monkeypatch.setenv("GENKERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="GENKERNELS_BACKEND must be one of"):
        _registry.select(toy_op, 2)


def test_bad_names(toy_op):
    with pytest.raises(ValueError, match="backend must be one of"):
        _registry.select(toy_op, 2, backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        with genkernels.backend("gpu"):
            pass
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        genkernels.explain("nope")


def test_explain(toy_op):
    assert genkernels.explain(toy_op, 3) == {"cuda": "odd sizes are not supported", "reference": None}


def test_group_norm_explain_on_cpu():
    x = torch.randn(2, 8, 4, 4)
    reasons = genkernels.explain("group_norm", x, 4)
    assert list(reasons) == ["cuda", "triton", "reference"]
    assert reasons["reference"] is None
    if not torch.cuda.is_available():
        assert "cpu" in reasons["cuda"] or "not built" in reasons["cuda"]
        with pytest.raises(genkernels.UnsupportedError, match="backend 'cuda' cannot run"):
            group_norm(x, 4, backend="cuda")
    assert "float64" in genkernels.explain("group_norm", x.double(), 4)["triton"]


def test_auto_falls_back_to_reference():
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)  # only the reference runs float64
    y = group_norm(x, 4, activation="silu")
    torch.testing.assert_close(y, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4)))


def test_training_backend_follows_scope_and_environment(monkeypatch):
    """train_* / sample_* without a backend: a surrounding genkernels.backend block, then GENKERNELS_BACKEND, then
    the device's default (reference on CPU, auto on CUDA); an explicit backend wins over all of them."""
    from genkernels._training import backend_for

    monkeypatch.delenv("GENKERNELS_BACKEND", raising=False)
    assert backend_for("cpu", None) == "reference" and backend_for("cuda", None) == "auto"
    monkeypatch.setenv("GENKERNELS_BACKEND", "reference")
    assert backend_for("cuda", None) == "reference"
    with genkernels.backend("triton"):
        assert backend_for("cpu", None) == "triton" and backend_for("cpu", "cuda") == "cuda"
    monkeypatch.setenv("GENKERNELS_BACKEND", "auto")
    assert backend_for("cpu", None) == "reference"


def test_explain_without_the_op_arguments_names_the_op():
    with pytest.raises(TypeError, match=r"explain\('group_norm', \.\.\.\) takes the arguments of genkernels\.ops"):
        genkernels.explain("group_norm")


def test_check_explicit_raises_what_select_raises(toy_op, monkeypatch):
    for backend in ("cuda", "triton"):  # a reason, and a backend the op does not have
        with pytest.raises(genkernels.UnsupportedError) as selected:
            _registry.select(toy_op, 3, backend=backend)
        with pytest.raises(genkernels.UnsupportedError) as checked:
            _registry.check_explicit(toy_op, 3, backend=backend)
        assert str(checked.value) == str(selected.value)
    monkeypatch.setenv("GENKERNELS_BACKEND", "cuda")
    with pytest.raises(genkernels.UnsupportedError, match="odd sizes"):
        _registry.check_explicit(toy_op, 3)


def test_check_explicit_passes(toy_op):
    assert _registry.check_explicit(toy_op, 2, backend="cuda") is None
    assert _registry.check_explicit(toy_op, 3, backend="reference") is None
    assert _registry.check_explicit(toy_op, 3) is None  # auto: no backend is asked
    with genkernels.backend("cuda"):
        assert _registry.check_explicit(toy_op, 3, backend="auto") is None
    with pytest.raises(ValueError, match="backend must be one of"):
        _registry.check_explicit(toy_op, 2, backend="fastest")
