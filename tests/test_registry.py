"""Backend selection: auto, explicit per call, scoped, environment, and explain()."""

from __future__ import annotations

import pytest
import torch

import genkernels
from genkernels import _registry
from genkernels.ops import group_norm
from genkernels.ops.rope import rope_frequencies
from genkernels.ops.schedule import StepCoeffs


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


@pytest.fixture
def toy_ops():
    """Two throwaway ops with a cuda, a triton and a reference backend each, every one able to run."""
    names = ("toy_a_for_tests", "toy_b_for_tests")
    for name in names:
        for backend in ("cuda", "triton", "reference"):
            _registry.register(name, backend, lambda *a, **k: None, f"{backend}-impl")
    yield names
    for name in names:
        del _registry._OPS[name]


def _chosen(*ops: str) -> tuple[str, ...]:
    return tuple(_registry.select(op).name for op in ops)


def test_scope_for_some_ops(toy_ops, monkeypatch):
    """backend(name, ops=...) chooses for those ops alone, over the blocks around it; a block naming no op
    replaces every choice around it; the call's own backend= beats both."""
    a, b = toy_ops
    monkeypatch.delenv("GENKERNELS_BACKEND", raising=False)
    with genkernels.backend("triton", ops=a):  # one name as a string
        assert _chosen(a, b) == ("triton", "cuda")
        assert _registry.requested(None) == "auto" and _registry.requested(None, a) == "triton"
        with genkernels.backend("reference", ops=[b]):  # adds to the outer block's choice
            assert _chosen(a, b) == ("triton", "reference")
            with genkernels.backend("cuda"):  # every op: replaces both
                assert _chosen(a, b) == ("cuda", "cuda")
            assert _chosen(a, b) == ("triton", "reference")
        with genkernels.backend("reference", ops=(a, b)):  # an inner choice for the same op wins
            assert _chosen(a, b) == ("reference", "reference")
        assert _registry.select(a, backend="cuda").name == "cuda"  # the call beats the scope
    assert _chosen(a, b) == ("cuda", "cuda")
    with genkernels.backend("reference"), genkernels.backend("triton", ops=b):  # on top of an every-op block
        assert _chosen(a, b) == ("reference", "triton")
    monkeypatch.setenv("GENKERNELS_BACKEND", "reference")  # the environment: below every block
    with genkernels.backend("triton", ops=a):
        assert _chosen(a, b) == ("triton", "reference")


def test_scope_for_some_ops_refuses_bad_names(toy_ops):
    with pytest.raises(ValueError, match=r"unknown op name\(s\) \['rope_', 3\]; registered ops: \["):
        with genkernels.backend("triton", ops=("rope_", 3, toy_ops[0])):
            pass
    with pytest.raises(ValueError, match="ops must name at least one op"):
        with genkernels.backend("triton", ops=()):
            pass
    with pytest.raises(ValueError, match="backend must be one of"):
        with genkernels.backend("fast", ops=toy_ops):
            pass


def test_graph_mode_order(toy_ops, monkeypatch):
    """Inside graph_mode auto follows an op's graph order (names first, the rest in registration order; a
    backend with a reason is passed over as outside); explicit choices and other ops are unaffected."""
    a, b = toy_ops
    monkeypatch.delenv("GENKERNELS_BACKEND", raising=False)
    _registry.register_graph_order(a, lambda n=0: ("reference", "triton") if n >= 10 else None)
    try:
        assert _registry.select(a, 10).name == "cuda"
        with genkernels.graph_mode():
            assert _registry.select(a, 10).name == "reference" and _registry.select(a, 3).name == "cuda"
            assert [x.name for x in _registry._auto_order(a, (10,), {})] == ["reference", "triton", "cuda"]
            assert _registry.select(b).name == "cuda"  # no graph order
            assert _registry.select(a, 10, backend="triton").name == "triton"
            with genkernels.backend("cuda", ops=a):
                assert _registry.select(a, 10).name == "cuda"
        assert _registry.select(a, 10).name == "cuda"  # the block restores auto's order
        assert [x.name for x in _registry.backends_of(a)] == ["cuda", "triton", "reference"]
    finally:
        del _registry._GRAPH_ORDERS[a]
    with pytest.raises(ValueError, match="unknown op"):
        _registry.register_graph_order("no_such_op", lambda *a: None)


def test_training_backend_follows_scope_and_environment(toy_ops, monkeypatch):
    """train_* / sample_* without a backend run in: a surrounding genkernels.backend block, else
    GENKERNELS_BACKEND, else the device's default (reference on CPU, auto on CUDA) for every op not chosen by
    name (a surrounding block's choices for single ops stay); an explicit backend wins over all of them."""
    from genkernels._training import backend_scope

    a, b = toy_ops

    def inside(device, backend=None):
        with backend_scope(device, backend):
            return _chosen(a, b)

    monkeypatch.delenv("GENKERNELS_BACKEND", raising=False)
    assert inside("cpu") == ("reference", "reference") and inside("cuda") == ("cuda", "cuda")
    with genkernels.backend("triton", ops=a):
        assert inside("cpu") == ("triton", "reference") and inside("cuda") == ("triton", "cuda")
        assert inside("cpu", "cuda") == ("cuda", "cuda")
    monkeypatch.setenv("GENKERNELS_BACKEND", "reference")
    assert inside("cuda") == ("reference", "reference")
    with genkernels.backend("triton"):
        assert inside("cpu") == ("triton", "triton") and inside("cpu", "cuda") == ("cuda", "cuda")
    monkeypatch.setenv("GENKERNELS_BACKEND", "auto")
    assert inside("cpu") == ("reference", "reference")
    assert _chosen(a, b) == ("cuda", "cuda")  # nothing left behind


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


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _rope_args():
    q = _t(1, 2, 4, 8)
    cos, sin = rope_frequencies(torch.arange(4), 8)
    return q, cos, sin


# Per op: a call the op accepts, and one it refuses in its own argument checks; (args, kwargs) each.
_CALLS = {
    "actnorm": (
        ((_t(2, 3, 4, 4), torch.zeros(3), torch.zeros(3)), {}),
        ((_t(2, 3, 4, 4), torch.zeros(4), torch.zeros(3)), {}),
    ),
    "affine_coupling": (((_t(2, 4, 3, 3), _t(2, 4, 3, 3)), {}), ((_t(2, 4, 3, 3), _t(2, 4, 3, 3)), {"scale": "nope"})),
    "attention": (((_t(1, 2, 4, 8),) * 3, {"causal": True}), ((_t(1, 2, 4, 8), _t(1, 2, 4, 4), _t(1, 2, 4, 8)), {})),
    "bias_act": (((_t(2, 3, 4), torch.zeros(3)), {"act": "lrelu"}), ((_t(2, 3, 4), torch.zeros(3)), {"act": "nope"})),
    "demodulation_coefficients": (((_t(4, 3, 3, 3), _t(2, 3)), {}), ((_t(4, 3, 3, 3), _t(2, 5)), {})),
    "gated_residual": (((_t(2, 3, 8), _t(2, 3, 8), _t(2, 8)), {}), ((_t(2, 3, 8), _t(2, 3, 7)), {})),
    "gated_residual_layer_norm_modulate": (
        ((_t(2, 3, 8), _t(2, 3, 8), _t(2, 8), torch.ones(8)), {"rms": True}),
        ((_t(2, 3, 8), _t(2, 3, 8), None, None, None, _t(2, 7)), {}),
    ),
    "gelu_tanh": (((_t(2, 8),), {}), ((torch.ones(2, 8, dtype=torch.int32),), {})),
    "group_norm": (((_t(2, 8, 4, 4), 4), {"activation": "silu"}), ((_t(2, 8, 4, 4), 3), {})),
    "layer_norm_modulate": (((_t(2, 3, 8), torch.ones(8), torch.zeros(8)), {}), ((_t(2, 3, 8), torch.ones(7)), {})),
    "modconv_epilogue": (((_t(2, 4, 3, 3), _t(2, 4)), {"bias": torch.zeros(4)}), ((_t(2, 4, 3, 3),), {"act": "nope"})),
    "reparameterize": (((_t(2, 4, 3, 3), _t(2, 4, 3, 3)), {}), ((_t(2, 4, 3, 3), _t(2, 4, 3, 2)), {})),
    "rope": (
        (lambda q, cos, sin: ((q, q.clone(), cos, sin), {}))(*_rope_args()),
        (lambda q, cos, sin: ((q, None, cos, sin), {"k_out": q.clone()}))(*_rope_args()),
    ),
    "schedule_step": (((_t(2, 4), _t(2, 4), StepCoeffs(px=1.0, c0=1.0)), {}), ((_t(2, 4), _t(2, 4), (1.0, 0.0)), {})),
    "swiglu": (((_t(2, 8),), {"dim": -1}), ((_t(2, 7),), {})),
}


def test_every_op_has_a_check_and_test_calls():
    assert set(_registry.checked_ops()) == set(_registry.ops())
    assert set(_CALLS) == set(_registry.ops())


@pytest.mark.parametrize("op", sorted(_CALLS))
def test_explain_refuses_what_the_op_refuses(op):
    args, kwargs = _CALLS[op][1]
    with pytest.raises((ValueError, TypeError)) as from_op:
        getattr(genkernels.ops, op)(*args, **kwargs)
    with pytest.raises(from_op.type) as from_explain:
        genkernels.explain(op, *args, **kwargs)
    assert type(from_explain.value) is from_op.type
    assert str(from_explain.value) == str(from_op.value)


@pytest.mark.parametrize("op", sorted(_CALLS))
def test_explain_answers_for_a_call_the_op_accepts(op):
    args, kwargs = _CALLS[op][0]
    reasons = genkernels.explain(op, *args, **kwargs)
    assert list(reasons) == [b.name for b in _registry.backends_of(op)]
    assert reasons["reference"] is None
    getattr(genkernels.ops, op)(*args, **kwargs, backend="reference")


def test_register_check_refuses_names_the_op_does_not_take():
    def check(x, nope):
        pass

    with pytest.raises(ValueError, match="nope"):
        _registry.register_check("toy_op_for_tests", group_norm, check)
    assert "toy_op_for_tests" not in _registry.checked_ops()
