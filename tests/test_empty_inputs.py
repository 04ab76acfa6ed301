"""Empty inputs: every op returns the empty result without a launch, and an explicitly requested backend
(argument, scope or GENKERNELS_BACKEND) that cannot run the call raises the UnsupportedError the same call
raises for non-empty inputs; auto never raises for them."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import genkernels
from genkernels import ops
from genkernels.cuda import coupling as cuda_coupling
from genkernels.nn import functional as GF
from genkernels.ops.schedule import StepCoeffs
from tests.op_inputs import skip_unsupported

CPU = torch.device("cpu")


def _t(*shape, device=CPU):
    return torch.randn(*shape, device=device)


# Each case builds a call with n in one dim (0: empty, 1: its non-empty twin) and returns (call, inputs,
# shapes): call(**kw) runs the op with kw (backend=...) added, inputs are the tensors to differentiate (none
# for the sampling ops) and shapes the outputs' shapes.
Case = Callable[[int, torch.device], tuple[Callable, list, list]]


def _bias_act(n, device):
    x, b = _t(n, 3, 2, device=device), _t(3, device=device)
    return lambda **kw: ops.bias_act(x, b, act="lrelu", **kw), [x, b], [(n, 3, 2)]


def _adaln_inputs(n, device):
    x, y = _t(n, 2, 8, device=device), _t(n, 2, 8, device=device)
    w, b, shift, scale, gate = _t(8, device=device), _t(8, device=device), *(_t(n, 8, device=device) for _ in range(3))
    return x, y, gate, w, b, shift, scale


def _layer_norm_modulate(n, device):
    x, _, _, w, b, shift, scale = _adaln_inputs(n, device)
    return lambda **kw: ops.layer_norm_modulate(x, w, b, shift, scale, **kw), [x, w, b, shift, scale], [(n, 2, 8)]


def _gated_residual(n, device):
    x, y, gate, *_ = _adaln_inputs(n, device)
    return lambda **kw: ops.gated_residual(x, y, gate, **kw), [x, y, gate], [(n, 2, 8)]


def _gated_residual_layer_norm_modulate(n, device):
    inputs = _adaln_inputs(n, device)
    return lambda **kw: ops.gated_residual_layer_norm_modulate(*inputs, **kw), list(inputs), [(n, 2, 8)] * 2


def _affine_coupling(n, device):
    x, h = _t(n, 4, 3, device=device), _t(n, 4, 3, device=device)
    return lambda **kw: ops.affine_coupling(x, h, **kw), [x, h], [(n, 4, 3), (n,)]


def _actnorm(n, device):
    x, log_scale, bias = _t(2, 4, n, device=device), _t(4, device=device), _t(4, device=device)
    return lambda **kw: ops.actnorm(x, log_scale, bias, **kw), [x, log_scale, bias], [(2, 4, n), (2,)]


def _gelu_tanh(n, device):
    x = _t(n, 8, device=device)
    return lambda **kw: ops.gelu_tanh(x, **kw), [x], [(n, 8)]


def _swiglu(n, device):
    x = _t(n, 8, device=device)
    return lambda **kw: ops.swiglu(x, **kw), [x], [(n, 4)]


def _linear_gelu_tanh(n, device):
    x, w, b = _t(n, 5, device=device), _t(6, 5, device=device), _t(6, device=device)
    return lambda **kw: ops.linear_gelu_tanh(x, w, b, **kw), [x, w, b], [(n, 6)]


def _group_norm(n, device):
    x, w, b = _t(2, 4, n, 3, device=device), _t(4, device=device), _t(4, device=device)
    return lambda **kw: ops.group_norm(x, 2, w, b, activation="silu", **kw), [x, w, b], [(2, 4, n, 3)]


def _demodulation_coefficients(n, device):
    weight, styles = _t(5, 3, 3, 3, device=device), _t(n, 3, device=device)
    return lambda **kw: ops.demodulation_coefficients(weight, styles, **kw), [weight, styles], [(n, 5)]


def _modconv_epilogue(n, device):
    y, dcoef = _t(n, 3, 2, 2, device=device), _t(n, 3, device=device)
    noise, bias = _t(n, 1, 2, 2, device=device), _t(3, device=device)

    def call(**kw):
        return ops.modconv_epilogue(y, dcoef, noise=noise, noise_strength=0.5, bias=bias, **kw)

    return call, [y, dcoef, bias], [(n, 3, 2, 2)]


def _reparameterize(n, device):
    mean, logvar = _t(n, 2, 3, device=device), _t(n, 2, 3, device=device)
    return lambda **kw: ops.reparameterize(mean, logvar, seed=1, **kw), [mean, logvar], [(n, 2, 3), (n,)]


def _reparameterize_moments(n, device):
    moments = _t(n, 4, 3, device=device)
    return lambda **kw: ops.reparameterize(moments=moments, seed=1, **kw), [moments], [(n, 2, 3), (n,)]


def _rope_inputs(n, device):
    cos, sin = ops.rope_frequencies(torch.arange(3, device=device), 8)
    return _t(n, 2, 3, 8, device=device), _t(n, 1, 3, 8, device=device), cos, sin


def _rope(n, device):
    q, k, cos, sin = _rope_inputs(n, device)
    return lambda **kw: ops.rope(q, k, cos, sin, **kw), [q, k], [(n, 2, 3, 8), (n, 1, 3, 8)]


def _rope_inplace(n, device):
    q, k, cos, sin = _rope_inputs(n, device)

    def call(**kw):
        with torch.no_grad():
            return ops.rope(q, k, cos, sin, inplace=True, **kw)

    return call, [], [(n, 2, 3, 8), (n, 1, 3, 8)]


def _rope_k_out(n, device):
    q, k, cos, sin = _rope_inputs(n, device)
    k_out = torch.empty_like(k)
    return lambda **kw: ops.rope(q, k, cos, sin, k_out=k_out, **kw), [], [(n, 2, 3, 8), (n, 1, 3, 8)]


def _schedule_step(n, device):
    sample, mo, x0_prev = _t(n, 2, 3, device=device), _t(2 * n, 2, 3, device=device), _t(n, 2, 3, device=device)
    coeffs = StepCoeffs(px=1.2, po=-0.6, ex=1.5, e0=-1.8, c0=0.9, ce=0.4, cn=0.3, cp=-0.1)

    def call(**kw):
        return ops.schedule_step(
            sample, mo, coeffs, guidance_scale=2.0, clip_sample=1.0, seed=1, x0_prev=x0_prev, return_x0=True, **kw
        )

    return call, [], [(n, 2, 3)] * 2


def _add_noise(n, device):
    x0, noise = _t(n, 2, 3, device=device), _t(n, 2, 3, device=device)
    return lambda **kw: ops.add_noise(x0, noise, 0.8, 0.6, **kw), [x0, noise], [(n, 2, 3)]


def _ddim_step(n, device):
    mo, sample = _t(n, 2, 3, device=device), _t(n, 2, 3, device=device)
    return lambda **kw: ops.ddim_step(mo, sample, 0.5, 0.7, eta=0.5, seed=1, **kw), [], [(n, 2, 3)]


def _flow_euler_step(n, device):
    mo, sample = _t(n, 2, 3, device=device), _t(n, 2, 3, device=device)
    return lambda **kw: ops.flow_euler_step(mo, sample, 0.8, 0.6, **kw), [], [(n, 2, 3)]


def _attention(n, device):
    q, k, v = _t(n, 2, 3, 8, device=device), _t(n, 1, 4, 8, device=device), _t(n, 1, 4, 8, device=device)
    return lambda **kw: ops.attention(q, k, v, causal=True, **kw), [q, k, v], [(n, 2, 3, 8)]


def _attention_without_keys(n, device):
    """No key (Lkv = 0): the queries get zeros without a launch; q itself is not empty."""
    q, k, v = _t(1, 2, 3, 8, device=device), _t(1, 2, n, 8, device=device), _t(1, 2, n, 8, device=device)
    return lambda **kw: ops.attention(q, k, v, **kw), [q, k, v], [(1, 2, 3, 8)]


def _scaled_dot_product_attention(n, device):
    q, k, v = _t(n, 2, 3, 8, device=device), _t(n, 2, 4, 8, device=device), _t(n, 2, 4, 8, device=device)
    return lambda **kw: GF.scaled_dot_product_attention(q, k, v, **kw), [q, k, v], [(n, 2, 3, 8)]


CASES: dict[str, Case] = {
    "bias_act": _bias_act,
    "layer_norm_modulate": _layer_norm_modulate,
    "gated_residual": _gated_residual,
    "gated_residual_layer_norm_modulate": _gated_residual_layer_norm_modulate,
    "affine_coupling": _affine_coupling,
    "actnorm": _actnorm,
    "gelu_tanh": _gelu_tanh,
    "swiglu": _swiglu,
    "linear_gelu_tanh": _linear_gelu_tanh,
    "group_norm": _group_norm,
    "demodulation_coefficients": _demodulation_coefficients,
    "modconv_epilogue": _modconv_epilogue,
    "reparameterize": _reparameterize,
    "reparameterize_moments": _reparameterize_moments,
    "rope": _rope,
    "rope_inplace": _rope_inplace,
    "rope_k_out": _rope_k_out,
    "schedule_step": _schedule_step,
    "add_noise": _add_noise,
    "ddim_step": _ddim_step,
    "flow_euler_step": _flow_euler_step,
    "attention": _attention,
    "attention_without_keys": _attention_without_keys,
    "scaled_dot_product_attention": _scaled_dot_product_attention,
}
DIFFERENTIABLE = [name for name, case in CASES.items() if case(0, CPU)[1]]


def _outputs(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def _refusal(call: Callable, **kw) -> str:
    """The message of the UnsupportedError that ``call(**kw)`` raises."""
    with pytest.raises(genkernels.UnsupportedError) as info:
        call(**kw)
    return str(info.value)


@pytest.fixture
def traced(monkeypatch):
    """Route the ops through their torch.library ops, as torch.compile does (genkernels.bench.traffic does
    the same): the backend is resolved where the op runs."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    yield
    monkeypatch.undo()
    # Dynamo builds its table of torch functions once, on first use: a table built while the stand-in was in
    # place would not hold the real is_compiling, and code compiled later that calls it would fail to trace.
    torch._dynamo.trace_rules.clear_lru_cache()


# --------------------------------------------------------------------------- an explicit backend is asked


@pytest.mark.parametrize("name", CASES)
def test_explicit_argument_refuses_as_for_nonempty(name):
    """backend="cuda" on CPU tensors: the empty call raises the non-empty call's error, word for word."""
    expected = _refusal(CASES[name](1, CPU)[0], backend="cuda")
    assert "cuda" in expected
    assert _refusal(CASES[name](0, CPU)[0], backend="cuda") == expected


@pytest.mark.parametrize("name", CASES)
def test_explicit_scope_refuses_as_for_nonempty(name):
    with genkernels.backend("cuda"):
        expected = _refusal(CASES[name](1, CPU)[0])
        assert _refusal(CASES[name](0, CPU)[0]) == expected
    assert "chosen by a genkernels.backend('cuda') block" in expected


@pytest.mark.parametrize("name", CASES)
def test_explicit_environment_refuses_as_for_nonempty(name, monkeypatch):
    monkeypatch.setenv("GENKERNELS_BACKEND", "cuda")
    expected = _refusal(CASES[name](1, CPU)[0])
    assert _refusal(CASES[name](0, CPU)[0]) == expected
    assert "chosen by GENKERNELS_BACKEND='cuda'" in expected


@pytest.mark.parametrize("name", CASES)
def test_explicit_traced_refuses_as_for_nonempty(name, traced):
    """The torch.library ops (torch.compile's path) resolve the backend where they run: the same rule."""
    expected = _refusal(CASES[name](1, CPU)[0], backend="cuda")
    assert _refusal(CASES[name](0, CPU)[0], backend="cuda") == expected
    with genkernels.backend("cuda"):
        expected = _refusal(CASES[name](1, CPU)[0])
        assert _refusal(CASES[name](0, CPU)[0]) == expected


def test_unknown_backend_name_is_refused():
    call = _bias_act(0, CPU)[0]
    with pytest.raises(ValueError, match="backend must be one of"):
        call(backend="gpu")


# --------------------------------------------------------------------------- backends that run it


def _check_result(result, shapes, device) -> None:
    outputs = _outputs(result)
    assert [tuple(t.shape) for t in outputs] == [tuple(s) for s in shapes]
    for t in outputs:
        assert t.dtype == torch.float32 and t.device.type == device.type


@pytest.mark.parametrize("backend", ["reference", "triton", "auto", None])
@pytest.mark.parametrize("name", CASES)
def test_runs_empty(name, backend, device):
    call, _, shapes = CASES[name](0, device)
    _check_result(call(backend=backend), shapes, device)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", CASES)
def test_runs_empty_in_scope_and_environment(name, backend, device, monkeypatch):
    call, _, shapes = CASES[name](0, device)
    with genkernels.backend(backend):
        _check_result(call(), shapes, device)
    monkeypatch.setenv("GENKERNELS_BACKEND", backend)
    _check_result(call(), shapes, device)


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
@pytest.mark.parametrize("name", CASES)
def test_runs_empty_traced(name, backend, device, traced):
    call, _, shapes = CASES[name](0, device)
    _check_result(call(backend=backend), shapes, device)


_ADALN_CALLS = {
    "layer_norm_modulate": lambda x, y, gate, w, shift, scale, **kw: ops.layer_norm_modulate(
        x, w, None, shift, scale, **kw
    ),
    "gated_residual": lambda x, y, gate, w, shift, scale, **kw: ops.gated_residual(x, y, gate, **kw),
    "gated_residual_layer_norm_modulate": lambda x, y, gate, w, shift, scale, **kw: (
        ops.gated_residual_layer_norm_modulate(x, y, gate, w, None, shift, scale, **kw)
    ),
}


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
@pytest.mark.parametrize("shape", [(0, 2, 8), (2, 0, 8)], ids=["B=0", "L=0"])
@pytest.mark.parametrize("name", list(_ADALN_CALLS))
def test_adaln_traced_empty_batch_or_sequence(name, shape, backend, traced, device):
    """The adaLN ops' torch.library ops (what torch.compile runs) on no rows: an empty batch, or an empty
    sequence with per-sample modulations of B = 2; outputs of x's shape and zero gradients of every input's."""
    b, _, d = shape
    x, y = (torch.randn(shape, device=device, requires_grad=True) for _ in range(2))
    gate, shift, scale = (torch.randn(b, d, device=device, requires_grad=True) for _ in range(3))
    w = torch.randn(d, device=device, requires_grad=True)
    out = _ADALN_CALLS[name](x, y, gate, w, shift, scale, backend=backend)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(t.shape == shape for t in outs)
    inputs = [x, y, gate, w, shift, scale]
    grads = torch.autograd.grad(sum(t.float().sum() for t in outs), inputs, allow_unused=True)
    used = [(t, g) for t, g in zip(inputs, grads) if g is not None]
    assert len(used) == {"layer_norm_modulate": 4, "gated_residual": 3}.get(name, 6)
    for t, g in used:
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t))


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_empty_gradients(name, backend, device):
    """Gradients reach every differentiable input, with its shape, and are zero (nothing depends on them)."""
    call, inputs, _ = CASES[name](0, device)
    for t in inputs:
        t.requires_grad_(True)
    total = sum(t.float().sum() for t in _outputs(call(backend=backend)))
    for t, g in zip(inputs, torch.autograd.grad(total, inputs)):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t))


# --------------------------------------------------------------------------- the backends accept empty inputs


def test_cuda_coupling_not_supported_accepts_an_empty_batch(monkeypatch):
    """The grid check of the cuda coupling kernels sizes a sample without indexing one (there is none)."""
    monkeypatch.setattr(cuda_coupling, "kernels_unavailable", lambda *args: None)
    x = torch.randn(0, 4, 3, 3)
    assert cuda_coupling.coupling_not_supported(x, torch.randn(0, 4, 3, 3), "sigmoid", False) is None
    assert cuda_coupling.actnorm_not_supported(x, torch.zeros(4), torch.zeros(4), False) is None
    x = torch.randn(2, 4, 3, 3)  # unchanged for non-empty inputs
    assert cuda_coupling.coupling_not_supported(x, torch.randn(2, 4, 3, 3), "sigmoid", False) is None
    assert "scale 'nope'" in cuda_coupling.coupling_not_supported(x, x, "nope", False)


@pytest.mark.gpu
def test_cuda_runs_empty_batch_of_coupling():
    x = torch.randn(1, 4, 3, 3, device="cuda")
    skip_unsupported("cuda", "affine_coupling", x, x, scale="sigmoid")
    empty = x[:0]
    y, logdet = ops.affine_coupling(empty, empty, backend="cuda")
    assert y.shape == empty.shape and logdet.shape == (0,)
    y, logdet = ops.actnorm(empty, torch.zeros(4, device="cuda"), torch.zeros(4, device="cuda"), backend="cuda")
    assert y.shape == empty.shape and logdet.shape == (0,)


@pytest.mark.gpu
def test_cuda_runs_empty_attention_of_any_strides():
    """An empty view is never read: no stride or alignment is asked of it."""
    q = torch.randn(1, 2, 4, 64, device="cuda", dtype=torch.float16)
    skip_unsupported("cuda", "attention", q, q, q)
    empty = torch.empty(0, device="cuda", dtype=torch.float16).as_strided((2, 2, 0, 64), (129, 64, 64, 1))
    out = ops.attention(empty, empty, empty, backend="cuda")
    assert out.shape == empty.shape
