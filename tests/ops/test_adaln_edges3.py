"""The adaLN ops with inputs shaped and typed as diffusers-style code passes them: modulations with a token dim of
1 (``shift[:, None]``, ``scale.unsqueeze(1)``) or a batch dim of 1, and a residual stream whose dtype differs from
the branch output's (autocast: x float32 outside the autocast regions, the attention / MLP output bfloat16)."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
import torch.nn.functional as F

import genkernels
from genkernels.ops import gated_residual, gated_residual_layer_norm_modulate, layer_norm_modulate
from tests.criterion import assert_criterion
from tests.op_inputs import skip_unsupported
from tests.ops.test_adaln import assert_compiled_matches_eager

A = importlib.import_module("genkernels.ops.adaln")
FAST = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["reference", *FAST]
# The Triton interpreter mishandles bfloat16: the narrow dtype on the CPU is float16, bfloat16 on the GPU.
HALF = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
B, L, D = 2, 3, 24

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(fn, tensors, cotangents):
    """Outputs of fn(*tensors) and the gradients of sum(out * cotangent) w.r.t. every tensor (None stays None)."""
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    live = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(outs, live, [c.to(o.dtype) for o, c in zip(outs, cotangents)]))
    return outs, [None if t is None else next(got) for t in leaves]


def _call(op, backend):
    """op as a function of its tensors alone: (x, shift, scale), (x, y, gate) or (x, y, gate, shift, scale)."""
    if op == "norm":
        return lambda x, shift, scale: layer_norm_modulate(x, None, None, shift, scale, backend=backend)
    if op == "gate":
        return lambda x, y, gate: gated_residual(x, y, gate, backend=backend)
    return lambda x, y, gate, shift, scale: gated_residual_layer_norm_modulate(
        x, y, gate, None, None, shift, scale, backend=backend
    )


def _inputs(op, mod_shape, device, dtype=torch.float32):
    """The op's tensors with every modulation (shift, scale, gate) of ``mod_shape``."""
    x = torch.randn(B, L, D, device=device).to(dtype)
    mods = [(torch.randn(mod_shape, device=device) * 0.5).to(dtype) for _ in range(3)]
    if op == "norm":
        return (x, mods[0], mods[1])
    y = torch.randn(B, L, D, device=device).to(dtype)
    return (x, y, mods[2]) if op == "gate" else (x, y, mods[2], mods[0], mods[1])


def _torch_formula(op, tensors):
    """What the op computes, written with torch's broadcasting (float64 in, float64 out)."""

    def norm(x, shift, scale):
        return F.layer_norm(x, (D,), eps=1e-6) * (1 + scale) + shift

    if op == "norm":
        return (norm(*tensors),)
    x, y, gate = tensors[:3]
    h = x + gate * y
    return (h,) if op == "gate" else (h, norm(h, *tensors[3:]))


def _skip(backend, op, tensors):
    if op == "norm":
        skip_unsupported(backend, A.NORM_OP, tensors[0])
    else:
        skip_unsupported(backend, A.GATE_OP if op == "gate" else A.FUSED_OP, *tensors[:2])


def _mod_positions(op):
    return (1, 2) if op == "norm" else (2,) if op == "gate" else (2, 3, 4)


OPS = ["norm", "gate", "fused"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_per_sample_modulations_with_a_token_dim(backend, op, device, monkeypatch):
    """(B, 1, D) shift, scale and gate (diffusers' ``shift[:, None]``) were refused. They are the per-sample
    (B, D) case: the same bits as the (B, D) call, gradients of the (B, 1, D) shape (the (B, D) gradients), and
    the fast backends get the modulations as views of the caller's tensors (no copy)."""
    tensors = _inputs(op, (B, 1, D), device)
    _skip(backend, op, tensors)
    cot = [torch.randn(B, L, D, device=device) for _ in range(2)]
    flat = tuple(t[:, 0] if i in _mod_positions(op) else t for i, t in enumerate(tensors))
    outs, grads = _grads(_call(op, backend), tensors, cot)
    want, want_grads = _grads(_call(op, backend), flat, cot)
    for o, w in zip(outs, want):
        assert torch.equal(o, w)
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert g.shape == tensors[i].shape, (i, tuple(g.shape))
        assert torch.equal(g.reshape(w.shape), w), i
    if backend == "reference":  # the reference against torch's broadcasting, in float64
        up = tuple(t.double() for t in tensors)
        for o, w in zip(_grads(_call(op, backend), up, cot)[0], _torch_formula(op, up)):
            torch.testing.assert_close(o, w, rtol=1e-12, atol=1e-12)
        return
    impl = importlib.import_module(f"genkernels.{backend}.adaln")
    seen = []
    name = {
        "norm": "layer_norm_modulate_forward",
        "gate": "gated_residual_forward",
        "fused": "gated_residual_layer_norm_modulate_forward",
    }[op]
    forward = getattr(impl, name)

    def spy(*args, **kwargs):
        seen.append(args)
        return forward(*args, **kwargs)

    monkeypatch.setattr(impl, name, spy)
    with torch.no_grad():
        _call(op, backend)(*tensors)
    pointers = {t.data_ptr() for t in seen[0] if torch.is_tensor(t)}
    for i in _mod_positions(op):
        assert tensors[i].data_ptr() in pointers, f"modulation {i} reached the kernels as a copy"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mod_shape", [(1, D), (1, 1, D), (1, L, D), (B, 1, D)], ids=str)
def test_broadcast_modulations(backend, op, mod_shape, device):
    """Modulations with a batch dim of 1 (one for every sample) as torch broadcasts them, and (B, 1, D): the
    criterion against the float64 reference, each gradient summed to its modulation's own shape."""
    tensors = _inputs(op, mod_shape, device, torch.float16)
    _skip(backend, op, tensors)
    cot = [torch.randn(B, L, D, device=device) for _ in range(2)]
    outs, grads = _grads(_call(op, backend), tensors, cot)
    refs, ref_grads = _grads(_call(op, "reference"), tensors, cot)
    up = tuple(t.double() for t in tensors)
    refs64, ref_grads64 = _grads(lambda *t: _torch_formula(op, t), up, cot)
    for o, r, r64 in zip(outs, refs, refs64):
        assert_criterion(o, r, r64)
    for i, (g, r, r64) in enumerate(zip(grads, ref_grads, ref_grads64)):
        assert g.shape == tensors[i].shape and g.dtype == tensors[i].dtype, (i, tuple(g.shape), g.dtype)
        assert_criterion(g, r, r64, f"gradient {i}", relative_floor=i in _mod_positions(op))


@pytest.mark.parametrize(
    "shape", [(B, L, 1), (D,), (B * L, D), (B, 2, D), (3, D), (B, 1, 1), (1, 1, 1, D), (B, D, 1)], ids=str
)
def test_other_modulation_shapes_are_refused(shape):
    """Shapes that do not give one D-vector per sample or per token: a ValueError naming the argument, the shape
    given and the shapes accepted."""
    x = torch.randn(B, L, D)
    bad = torch.randn(shape)
    for call, name in (
        (lambda: layer_norm_modulate(x, shift=bad), "shift"),
        (lambda: layer_norm_modulate(x, scale=bad), "scale"),
        (lambda: gated_residual(x, x, bad), "gate"),
        (lambda: gated_residual_layer_norm_modulate(x, x, bad), "gate"),
    ):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"{name} must have shape ({B}, {D})"), message
        assert f"({B}, 1, {D})" in message and f"({B}, {L}, {D})" in message and "1 in place of B" in message
        assert f"got {tuple(shape)}" in message, message


# --------------------------------------------------------------------------- a residual stream in another dtype


def _mixed(x_dtype, y_dtype, gate_kind, device):
    x = torch.randn(B, L, D, device=device).to(x_dtype)
    y = (torch.randn(B, L, D, device=device) * 2).to(y_dtype)
    gate = {
        None: None,
        "sample": torch.randn(B, D, device=device).to(y_dtype),
        "token": torch.randn(B, L, D, device=device),
    }[gate_kind]
    return x, y, gate


def _check_mixed(fn, backend, tensors, out_dtypes, column_sums=()):
    cot = [torch.randn(B, L, D, device=tensors[0].device, dtype=torch.float64) for _ in out_dtypes]
    outs, grads = _grads(lambda *t: fn(*t, backend=backend), tensors, cot)
    refs, ref_grads = _grads(lambda *t: fn(*t, backend="reference"), tensors, cot)
    up = [None if t is None else t.double() for t in tensors]
    refs64, ref_grads64 = _grads(lambda *t: fn(*t, backend="reference"), up, cot)
    for o, r, r64, dtype in zip(outs, refs, refs64, out_dtypes):
        assert o.dtype == dtype, (o.dtype, dtype)
        assert_criterion(o, r, r64)
    for i, (t, g, r, r64) in enumerate(zip(tensors, grads, ref_grads, ref_grads64)):
        if t is None:
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, (i, g.dtype, tuple(g.shape))
        assert_criterion(g, r, r64, f"gradient {i}", relative_floor=i in column_sums)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("half", HALF, ids=str)
@pytest.mark.parametrize("wide_x", [True, False], ids=["x_float32", "y_float32"])
@pytest.mark.parametrize("gate_kind", ["sample", "token", None], ids=str)
def test_gated_residual_promotes(backend, half, wide_x, gate_kind, device):
    """gated_residual(x, y, gate) with y in another dtype than x (autocast's float32 stream and bfloat16 branch)
    raised a TypeError; torch's x + gate * y promotes. out is in torch.result_type(x, y) (the gate, like shift and
    scale, does not widen it), every gradient in its input's own dtype, to the criterion."""
    x_dtype, y_dtype = (torch.float32, half) if wide_x else (half, torch.float32)
    tensors = _mixed(x_dtype, y_dtype, gate_kind, device)
    skip_unsupported(backend, A.GATE_OP, *tensors)
    _check_mixed(gated_residual, backend, tensors, [torch.float32], column_sums=(2,) if gate_kind == "sample" else ())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_residual_of_two_half_dtypes_is_float32(backend, device):
    """float16 x and bfloat16 y: out in float32 (torch.result_type), exactly x + gate * y of the two."""
    x = torch.randn(B, L, D, device=device).half()
    y = torch.randn(B, L, D, device=device).bfloat16()
    gate = torch.randn(B, 1, D, device=device)
    skip_unsupported(backend, A.GATE_OP, x, y, gate)
    out = gated_residual(x, y, gate, backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float() + gate * y.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("half", HALF, ids=str)
@pytest.mark.parametrize("wide_x", [True, False], ids=["x_float32", "y_float32"])
@pytest.mark.parametrize("gate_kind", ["sample", None], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_fused_keeps_the_residual_dtype(backend, half, wide_x, gate_kind, rms, device):
    """The fused residual + norm with y in another dtype: h (the residual stream) and out stay in x's dtype (h is
    x + gate * y computed in float32 and rounded once to x's dtype), every gradient in its input's own dtype."""
    x_dtype, y_dtype = (torch.float32, half) if wide_x else (half, torch.float32)
    x, y, gate = _mixed(x_dtype, y_dtype, gate_kind, device)
    w = torch.randn(D, device=device) * 0.5 + 1
    shift, scale = torch.randn(B, 1, D, device=device), torch.randn(B, L, D, device=device)
    tensors = (x, y, gate, w, None, shift, scale)
    skip_unsupported(backend, A.FUSED_OP, *tensors)
    _check_mixed(
        lambda *t, backend: gated_residual_layer_norm_modulate(*t, rms=rms, backend=backend),
        backend,
        tensors,
        [x_dtype, x_dtype],
        column_sums=(2, 3, 5),
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_traced_ops_take_broadcast_and_mixed_inputs(backend, device):
    """torch.compile(fullgraph=True) of a block with (B, 1, D) and (1, D) modulations and a float32 stream with a
    half branch matches eager, forward and backward; the traced ops pass torch.library.opcheck."""
    torch._dynamo.reset()
    x = torch.randn(B, L, D, device=device)
    skip_unsupported(backend, A.NORM_OP, x)
    branch = torch.randn(B, L, D, device=device).half()
    mods = torch.randn(B, 3 * D, device=device, requires_grad=True)
    table = torch.randn(1, D, device=device, requires_grad=True)

    def block(x, branch, mods, table):
        shift, scale, gate = mods[:, None].chunk(3, dim=-1)
        n = layer_norm_modulate(x, None, None, shift, scale)
        h = gated_residual(n, branch, gate)
        h2, out = gated_residual_layer_norm_modulate(h, branch, table, None, None, table, scale)
        return (h2 * out).sum() + h.square().sum()

    assert_compiled_matches_eager(block, (x, branch), (mods, table), backend)
    ops = torch.ops.genkernels
    y, gate = branch.detach().requires_grad_(True), torch.randn(B, D, device=device, requires_grad=True)
    x.requires_grad_(True)
    torch.library.opcheck(ops.gated_residual.default, (x, y, gate, backend))
    torch.library.opcheck(ops.gated_residual.default, (x, y, None, backend))
    torch.library.opcheck(
        ops.gated_residual_layer_norm_modulate.default, (x, y, gate, None, None, gate, None, 1e-6, False, backend)
    )
    torch.library.opcheck(
        ops.gated_residual_layer_norm_modulate.default, (x, y, None, None, None, None, gate, 1e-6, True, backend)
    )


def test_fused_cuda_declines_a_wider_branch():
    """The cuda kernels read y in x's dtype: a narrower y is converted to it exactly, a wider one (float32 y with a
    bfloat16 stream) would be rounded first, so the cuda backend says why and auto runs another."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    x = torch.randn(B, L, D, device="cuda").bfloat16()
    y = torch.randn(B, L, D, device="cuda")
    reason = genkernels.explain(A.FUSED_OP, x, y)["cuda"]
    if genkernels.explain(A.FUSED_OP, x, x)["cuda"] is not None:
        pytest.skip("the cuda adaln kernels do not run here")
    assert reason is not None and "y" in reason and "float32" in reason
    assert genkernels.explain(A.GATE_OP, x, y)["cuda"] is None
    with pytest.raises(genkernels.UnsupportedError, match=re.escape(reason)):
        gated_residual_layer_norm_modulate(x, y, backend="cuda")


def test_y_in_float64_takes_the_reference(device):
    """A float64 y with a float32 x: the fast backends say why (their kernels take float32, float16 and bfloat16);
    auto runs the reference; gated_residual gives float64 (torch.result_type), the fused op h in x's dtype."""
    x = torch.randn(B, L, D, device=device)
    y = torch.randn(B, L, D, device=device, dtype=torch.float64)
    reasons = genkernels.explain(A.FUSED_OP, x, y)
    assert "y has dtype torch.float64" in reasons["triton"] and "y has dtype torch.float64" in reasons["cuda"]
    assert gated_residual(x, y).dtype == torch.float64
    h, out = gated_residual_layer_norm_modulate(x, y)
    assert h.dtype == out.dtype == torch.float32
    torch.testing.assert_close(h, (x.double() + y).float())


def test_triton_writes_dy_in_y_dtype(device):
    """The triton backward writes y's gradient in y's own dtype (no float32 tensor converted afterwards)."""
    from genkernels.triton import adaln as triton_adaln

    x = torch.randn(B * L, D, device=device)
    if triton_adaln.not_supported(x.view(B, L, D)) is not None:
        pytest.skip("triton does not run here")
    y = torch.randn(B * L, D, device=device).half()
    gate = torch.randn(B, D, device=device)
    dy, dgate = triton_adaln.gated_residual_backward(x, y, gate, L, True, True)
    assert dy.dtype == torch.float16 and dgate.dtype == torch.float32
    torch.testing.assert_close(dy, (x.view(B, L, D) * gate[:, None]).view(B * L, D).half())


class _Recorder:
    """Stands in for genkernels._C in the cuda launchers: records each call's arguments, launches nothing."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return 0

        return call


def test_cuda_launchers_read_y_in_x_dtype(monkeypatch):
    """The cuda kernels read y in x's dtype: the launchers pass a narrower y converted (exactly) to it, return y's
    gradient in y's own dtype, and fused_y_not_supported names a wider y (which would be rounded)."""
    from genkernels.cuda import adaln as cad

    pytest.importorskip("genkernels._C", reason="the CUDA extension is not built")
    recorder = _Recorder()
    monkeypatch.setattr(cad, "require_extension", lambda: recorder)
    monkeypatch.setattr(cad, "stream_handle", lambda device: 0)
    x = torch.randn(B * L, D)
    y = torch.randn(B * L, D).bfloat16()
    gate = torch.randn(B, D)
    cad.gated_residual_forward(x, y, gate, L)
    dy, _ = cad.gated_residual_backward(x, y, gate, L, True, True)
    (_, forward, _), (_, backward, _) = [c for c in recorder.calls if c[0] != "adaln_backward_workspace"]
    assert forward[1][2] == forward[0][2] == 0, "y must reach the forward kernel in x's dtype (float32)"
    assert backward[3][2] == backward[1][2] == 0, "y must reach the backward kernel in dout's dtype (float32)"
    assert backward[12][2] == 0 and dy.dtype == torch.bfloat16 and dy.shape == y.shape
    assert cad.fused_y_not_supported(x, y) is None
    reason = cad.fused_y_not_supported(x.bfloat16(), y.float())
    assert "y is torch.float32" in reason and "x torch.bfloat16" in reason
    assert cad.fused_y_not_supported(x.half(), y) is not None  # float16 does not hold bfloat16's range
