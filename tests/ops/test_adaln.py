"""adaLN ops (layer_norm_modulate, gated_residual, gated_residual_layer_norm_modulate): outputs and every
gradient of each backend against the reference under the DESIGN.md criterion (LayerNorm / RMSNorm,
per-sample / per-token / absent modulations and gates, affine present / absent, odd D, L = 1, strided inputs,
large magnitudes), gradcheck of the reference, determinism, opcheck, torch.compile(fullgraph=True) and
errors."""

from __future__ import annotations

import importlib

import pytest
import torch

import genkernels
from genkernels.ops import gated_residual, gated_residual_layer_norm_modulate, layer_norm_modulate
from tests.criterion import assert_criterion
from tests.op_inputs import skip_unsupported

A = importlib.import_module("genkernels.ops.adaln")
FAST = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["reference", *FAST]
# The Triton interpreter mishandles bfloat16: bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
MODS = ["sample", "token", None]
# None: the plain residual x + y (a pre-norm transformer's residual add, fused with the next norm).
GATES = ["sample", "token", None]
# Gradients that are sums over rows: their floor scales with their magnitude (tests/criterion.py).
COLUMN_SUMS = {"dweight", "dbias"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _mod(kind, b, length, d, device, dtype=torch.float32):
    if kind is None:
        return None
    shape = (b, d) if kind == "sample" else (b, length, d)
    return (torch.randn(shape, device=device) * 0.5).to(dtype)


def _norm_inputs(shape, dtype, device, mods=("sample", "sample"), affine=True, rms=False, scale=1.0, offset=0.0):
    """(x, weight, bias, shift, scale): mods gives the kinds of shift and scale."""
    b, length, d = shape
    x = (torch.randn(shape, device=device) * scale + offset).to(dtype)
    weight = (torch.randn(d, device=device) * 0.5 + 1) if affine else None
    bias = torch.randn(d, device=device) if affine and not rms else None
    return x, weight, bias, _mod(mods[0], b, length, d, device), _mod(mods[1], b, length, d, device)


def _run(fn, tensors, cotangents, kwargs):
    """Outputs of fn(*tensors, **kwargs) and the gradients of sum(out * cotangent) w.r.t. every tensor
    (None for absent or unused ones)."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in tensors]
    outs = fn(*leaves, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    live = [t for t in leaves if t is not None]
    pairs = [(o, c.to(o.dtype)) for o, c in zip(outs, cotangents) if c is not None]
    grads = iter(torch.autograd.grad([o for o, _ in pairs], live, [c for _, c in pairs], allow_unused=True))
    return list(outs), [next(grads) if t is not None else None for t in leaves]


def _compare(fn, backend, tensors, names, out_names, kwargs, cotangents=None, column_sums=()):
    """The criterion on every output and gradient: backend vs the reference in the input dtype vs the
    reference in float64."""
    shape = tensors[0].shape
    if cotangents is None:
        cotangents = [torch.randn(shape, device=tensors[0].device, dtype=torch.float64) for _ in out_names]
    out, g = _run(fn, tensors, cotangents, {**kwargs, "backend": backend})
    ref, gref = _run(fn, tensors, cotangents, {**kwargs, "backend": "reference"})
    up = [None if t is None else t.double() for t in tensors]
    ref64, g64 = _run(fn, up, cotangents, {**kwargs, "backend": "reference"})
    for name, o, r, r64 in zip(out_names, out, ref, ref64):
        assert o.is_contiguous(), f"{name} must be contiguous"
        assert_criterion(o, r, r64, name)
    for name, o, r, r64 in zip(names, g, gref, g64):
        if r64 is None:
            continue
        assert o is not None, f"{name}: no gradient"
        assert o.dtype == tensors[names.index(name)].dtype, f"{name}: dtype {o.dtype}"
        assert_criterion(o, r, r64, name, relative_floor=name in column_sums)


NORM_NAMES = ("dx", "dweight", "dbias", "dshift", "dscale")
FUSED_NAMES = ("dx", "dy", "dgate", "dweight", "dbias", "dshift", "dscale")


def _sample_sums(*pairs):
    """Names of the modulation gradients that are sums over tokens (per-sample modulations)."""
    return {name for name, kind in pairs if kind == "sample"}


def _check_norm(backend, x, weight, bias, shift, scale, rms, mods=("sample", "sample")):
    skip_unsupported(backend, A.NORM_OP, x, weight, bias, shift, scale)
    _compare(
        layer_norm_modulate,
        backend,
        (x, weight, bias, shift, scale),
        NORM_NAMES,
        ("y",),
        {"rms": rms},
        column_sums=COLUMN_SUMS | _sample_sums(("dshift", mods[0]), ("dscale", mods[1])),
    )


def _fused_tensors(x, gate_kind, norm_rest, device):
    b, length, d = x.shape
    y = torch.randn(x.shape, device=device).to(x.dtype)
    return (x, y, _mod(gate_kind, b, length, d, device), *norm_rest)


def _check_fused(backend, tensors, rms, gate_kind, mods, cotangents=None):
    skip_unsupported(backend, A.FUSED_OP, *tensors)
    _compare(
        gated_residual_layer_norm_modulate,
        backend,
        tensors,
        FUSED_NAMES,
        ("h", "out"),
        {"rms": rms},
        cotangents=cotangents,
        column_sums=COLUMN_SUMS | _sample_sums(("dgate", gate_kind), ("dshift", mods[0]), ("dscale", mods[1])),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("mod", MODS, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_layer_norm_modulate(backend, dtype, rms, mod, affine, device):
    x, w, b, shift, scale = _norm_inputs((2, 5, 40), dtype, device, (mod, mod), affine, rms)
    _check_norm(backend, x, w, b, shift, scale, rms, (mod, mod))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("gate_kind", GATES, ids=str)
@pytest.mark.parametrize("mod", MODS, ids=str)
def test_gated_residual_layer_norm_modulate(backend, dtype, rms, gate_kind, mod, device):
    x, *rest = _norm_inputs((2, 5, 40), dtype, device, (mod, mod), True, rms)
    _check_fused(backend, _fused_tensors(x, gate_kind, rest, device), rms, gate_kind, (mod, mod))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate_kind", GATES, ids=str)
def test_gated_residual(backend, dtype, gate_kind, device):
    x = torch.randn(2, 5, 40, device=device).to(dtype)
    tensors = _fused_tensors(x, gate_kind, (), device)
    skip_unsupported(backend, A.GATE_OP, *tensors)
    _compare(
        gated_residual,
        backend,
        tensors,
        ("dx", "dy", "dgate"),
        ("out",),
        {},
        column_sums=_sample_sums(("dgate", gate_kind)),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "shape", [(2, 3, 72), (2, 1, 72), (1, 2, 1000), (3, 1, 1000), (2, 3, 96), (1, 2, 1100)], ids=str
)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_odd_sizes(backend, dtype, shape, rms, device):
    """D not a power of two and L = 1, through every op. Triton's forward takes 72 = 64 + 8 and 96 = 64 + 32 as
    two column blocks, 1100 as 1024 + 128 with a masked tail, and 1000 as one masked block of 1024."""
    x, w, b, shift, scale = _norm_inputs(shape, dtype, device, ("sample", "token"), True, rms)
    _check_norm(backend, x, w, b, shift, scale, rms, ("sample", "token"))
    _check_fused(backend, _fused_tensors(x, "sample", (w, b, shift, scale), device), rms, "sample", ("sample", "token"))


@pytest.fixture
def small_tiles(monkeypatch):
    """One row per tile and many chunks: the backward's partials are summed across programs."""
    from genkernels.triton import adaln as triton_adaln

    monkeypatch.setattr(triton_adaln, "FORWARD_TILE", 16)
    monkeypatch.setattr(triton_adaln, "BACKWARD_TILE", 16)
    monkeypatch.setattr(triton_adaln, "PROGRAMS_PER_SM", 1)


@pytest.mark.parametrize("mods", [("sample", "sample"), ("token", "sample"), (None, None)], ids=str)
def test_triton_many_chunks(mods, small_tiles, device):
    x, w, b, shift, scale = _norm_inputs((3, 7, 24), torch.float32, device, mods, True, False)
    _check_norm("triton", x, w, b, shift, scale, False, mods)
    tensors = _fused_tensors(x, "sample", (w, b, shift, scale), device)
    _check_fused("triton", tensors, False, "sample", mods)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_mixed_dtypes(backend, device):
    """Rows of a wider tensor (x[..., :D]), a transposed x (copied once), shift / scale / gate chunked
    from one (B, 6D) projection (row stride 6D) and modulations in other dtypes than x's."""
    b, length, d = 2, 4, 24
    x = torch.randn(b, length, 2 * d, device=device).half()[..., :d]
    mods = torch.randn(b, 6 * d, device=device).chunk(6, dim=-1)
    w = torch.randn(d, device=device, dtype=torch.float64)
    _check_norm(backend, x, w, None, mods[0], mods[1].double(), True)
    xt = torch.randn(length, b, d, device=device).half().transpose(0, 1)
    y = torch.randn(b, length, 3 * d, device=device).half()[..., d : 2 * d]
    tensors = (xt, y, mods[2], w.float(), None, mods[3].half(), mods[4])
    _check_fused(backend, tensors, True, "sample", ("sample", "sample"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["norm", "fused"])
def test_affine_in_x_dtype(backend, dtype, fused, device, monkeypatch):
    """weight and bias in x's dtype (a half-precision model's own norm parameters): the criterion on outputs and
    gradients (dweight and dbias in that dtype), and torch.library.opcheck on the traced op. The fast backends get
    them as they are, so a call launches no conversion of them; float32 ones too; a third dtype, or a pair of two
    dtypes, reaches them as float32."""
    x, w, b, shift, scale = _norm_inputs((2, 5, 40), dtype, device, mods=("sample", "token"))
    w, b = w.to(dtype), b.to(dtype)
    if fused:
        tensors = _fused_tensors(x, "sample", (w, b, shift, scale), device)
        _check_fused(backend, tensors, False, "sample", ("sample", "token"))
        traced = (torch.ops.genkernels.gated_residual_layer_norm_modulate.default, (*tensors, 1e-6, False, backend))
    else:
        _check_norm(backend, x, w, b, shift, scale, False, ("sample", "token"))
        traced = (torch.ops.genkernels.layer_norm_modulate.default, (x, w, b, shift, scale, 1e-6, False, backend))
    torch.library.opcheck(
        traced[0], tuple(t.detach().requires_grad_(True) if torch.is_tensor(t) else t for t in traced[1])
    )
    if backend == "reference":
        return
    impl = importlib.import_module(f"genkernels.{backend}.adaln")
    name = "gated_residual_layer_norm_modulate_forward" if fused else "layer_norm_modulate_forward"
    forward, seen = getattr(impl, name), []

    def spy(*args, **kwargs):
        seen.append(args[3:5] if fused else args[1:3])
        return forward(*args, **kwargs)

    monkeypatch.setattr(impl, name, spy)
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    pairs = [(w, b), (w.float(), b.float()), (w.to(other), b.to(other)), (w, b.float())]
    with torch.no_grad():
        for weight, bias in pairs:
            args = (*tensors[:3], weight, bias, shift, scale) if fused else (x, weight, bias, shift, scale)
            (gated_residual_layer_norm_modulate if fused else layer_norm_modulate)(*args, backend=backend)
    assert seen[0][0] is w and seen[0][1] is b
    assert seen[1][0] is pairs[1][0] and seen[1][1] is pairs[1][1]
    for got in seen[2:]:
        assert [t.dtype for t in got] == [torch.float32] * 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("scale,offset", [(3000.0, 0.0), (10.0, 1e4)], ids=["wide", "offset"])
def test_large_magnitudes(backend, rms, scale, offset, device):
    """float16 rows near 1e4: the float32 statistics must neither overflow nor cancel."""
    x, w, b, shift, sc = _norm_inputs((2, 3, 64), torch.float16, device, ("sample", "sample"), True, rms, scale, offset)
    _check_norm(backend, x, w, b, shift, sc, rms)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", ["h", "out"])
@pytest.mark.parametrize("gate_kind", ["token", None], ids=str)
def test_fused_one_output_used(backend, used, gate_kind, device):
    """Only h (or only out) feeds the loss: the other output's gradient is absent, not zero-filled."""
    x, *rest = _norm_inputs((2, 3, 40), torch.float32, device, ("sample", "token"))
    tensors = _fused_tensors(x, gate_kind, rest, device)
    cot = torch.randn(x.shape, device=device, dtype=torch.float64)
    cotangents = [cot, None] if used == "h" else [None, cot]
    _check_fused(backend, tensors, False, gate_kind, ("sample", "token"), cotangents)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gate_gradients_are_shared(backend, device):
    """Without a gate y's gradient is x's (the same values: h = x + y), and y is not kept for the backward."""
    x, w, _, _, _ = _norm_inputs((2, 3, 40), torch.float32, device, (None, None), rms=True)
    skip_unsupported(backend, A.FUSED_OP, x, x)
    x, y = x.requires_grad_(True), torch.randn_like(x, requires_grad=True)
    h, out = gated_residual_layer_norm_modulate(x, y, None, w, rms=True, backend=backend)
    dx, dy = torch.autograd.grad((h * 0.5).sum() + out.square().sum(), (x, y))
    assert torch.equal(dx, dy) and dx.abs().max() > 0
    dx, dy = torch.autograd.grad(gated_residual(x, y, backend=backend).square().sum(), (x, y))
    assert torch.equal(dx, dy)


def test_reference_gradcheck():
    """The reference formulas differentiate exactly (float64), every op and input."""
    b, length, d = 2, 3, 5
    x, w, bias, shift, scale = _norm_inputs((b, length, d), torch.float64, "cpu", ("sample", "token"))
    y = torch.randn(b, length, d, dtype=torch.float64)
    gate = torch.randn(b, d, dtype=torch.float64)
    args = [t.double().requires_grad_(True) for t in (x, w, bias, shift, scale, y, gate)]
    x, w, bias, shift, scale, y, gate = args
    assert torch.autograd.gradcheck(lambda *a: A.layer_norm_modulate_reference(*a[:5]), args[:5])
    assert torch.autograd.gradcheck(
        lambda *a: A.layer_norm_modulate_reference(a[0], a[1], None, a[2], a[3], rms=True), [x, w, shift, scale]
    )
    assert torch.autograd.gradcheck(A.gated_residual_reference, [x, y, gate])
    assert torch.autograd.gradcheck(
        lambda x, y, g, *r: A.gated_residual_layer_norm_modulate_reference(x, y, g, *r),
        [x, y, gate, w, bias, shift, scale],
    )


def test_reference_matches_torch_layer_norm():
    x, w, b, _, _ = _norm_inputs((2, 3, 16), torch.float32, "cpu")
    torch.testing.assert_close(
        layer_norm_modulate(x, w, b, eps=1e-5, backend="reference"),
        torch.nn.functional.layer_norm(x, (16,), w, b, 1e-5),
    )
    if hasattr(torch.nn.functional, "rms_norm"):
        torch.testing.assert_close(
            layer_norm_modulate(x, w, rms=True, eps=1e-5, backend="reference"),
            torch.nn.functional.rms_norm(x, (16,), w, 1e-5),
        )


@pytest.mark.parametrize("backend", FAST)
def test_deterministic(backend, device):
    """The column gradients come from partials summed in a fixed order: two runs agree bit for bit."""
    x, *rest = _norm_inputs((3, 9, 72), torch.float32, device, ("sample", "sample"))
    tensors = _fused_tensors(x, "sample", rest, device)
    skip_unsupported(backend, A.FUSED_OP, *tensors)
    cot = [torch.randn(x.shape, device=device) for _ in range(2)]
    first = _run(gated_residual_layer_norm_modulate, tensors, cot, {"backend": backend})
    second = _run(gated_residual_layer_norm_modulate, tensors, cot, {"backend": backend})
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert a is None or torch.equal(a, b)


@pytest.mark.parametrize("backend", FAST)
def test_double_backward_is_refused(backend, device):
    x, w, b, shift, scale = _norm_inputs((2, 3, 8), torch.float32, device)
    skip_unsupported(backend, A.NORM_OP, x, w, b, shift, scale)
    x.requires_grad_(True)
    y = layer_norm_modulate(x, w, b, shift, scale, backend=backend)
    with pytest.raises(RuntimeError, match=r"genkernels\.ops\.layer_norm_modulate: the backward is first-order only"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
def test_forward_without_statistics(backend, fused, device, monkeypatch):
    """A forward no backward follows (no grad needed) asks its backend for no row statistics: the interface's
    stats=False returns mean and rstd as None and the same outputs as stats=True (bit for bit, but for compiled
    triton: see below); the op's no-grad call passes stats=False and a recorded call stats=True, with equal
    outputs."""
    x, w, b, shift, scale = _norm_inputs((2, 5, 40), torch.float32, device, mods=("sample", "token"))
    y = torch.randn_like(x)
    gate = _mod("sample", 2, 5, 40, device)
    skip_unsupported(backend, A.FUSED_OP, x, y, gate, w, b, shift, scale)
    impl = A._ReferenceKernels if backend == "reference" else importlib.import_module(f"genkernels.{backend}.adaln")
    rows = [t.reshape(10, 40) if t is not None and t.dim() == 3 else t for t in (x, y, shift, scale)]
    x2, y2, shift2, scale2 = rows
    if fused:
        args = (x2, y2, gate, w, b, shift2, scale2, 5, 1e-6, False)
        name = "gated_residual_layer_norm_modulate_forward"
    else:
        args = (x2, w, b, shift2, scale2, 5, 1e-6, False)
        name = "layer_norm_modulate_forward"
    full, bare = getattr(impl, name)(*args, stats=True), getattr(impl, name)(*args, stats=False)
    assert full[-1] is not None and full[-2] is not None and bare[-1] is None and bare[-2] is None
    # Bit for bit where one code runs both: the reference, the interpreter, the cuda kernel (stats a runtime
    # flag). Compiled triton is two specializations (STATS a constexpr) that the compiler may schedule and
    # contract differently: equal within float32 rounding (an H200 gave 4.8e-7 at most, in 35 of 400 elements).
    exact = backend != "triton" or device.type != "cuda"
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-6}
    for got, want in zip(bare[:-2], full[:-2]):
        torch.testing.assert_close(got, want, **tol)
    if backend == "reference":  # the op runs the reference formulas directly, not through the interface
        return

    asked = []
    forward = getattr(impl, name)

    def spy(*a, **k):
        asked.append(a[-1])
        return forward(*a, **k)

    monkeypatch.setattr(impl, name, spy)
    op = gated_residual_layer_norm_modulate if fused else layer_norm_modulate
    call = (x, y, gate, w, b, shift, scale) if fused else (x, w, b, shift, scale)
    with torch.no_grad():
        plain = op(*call, backend=backend)
    recorded = op(*[t.detach().requires_grad_(True) for t in call], backend=backend)
    assert asked == [False, True]
    for got, want in zip(plain if fused else (plain,), recorded if fused else (recorded,)):
        torch.testing.assert_close(got, want.detach(), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend, device):
    x, w, b, shift, scale = _norm_inputs((0, 3, 8), torch.float32, device)
    w.requires_grad_(True)
    x.requires_grad_(True)
    h, out = gated_residual_layer_norm_modulate(x, torch.zeros_like(x), shift, w, b, shift, scale, backend=backend)
    assert h.shape == out.shape == x.shape
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and x.grad.shape == x.shape


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_opcheck(backend, device):
    x, w, b, shift, scale = _norm_inputs((2, 3, 8), torch.float32, device, ("sample", "token"))
    skip_unsupported(backend, A.NORM_OP, x)
    y = torch.randn_like(x)
    gate = torch.randn(2, 8, device=device)
    for t in (x, w, b, shift, scale, y, gate):
        t.requires_grad_(True)
    ops = torch.ops.genkernels
    torch.library.opcheck(ops.layer_norm_modulate.default, (x, w, b, shift, scale, 1e-6, False, backend))
    torch.library.opcheck(ops.layer_norm_modulate.default, (x, w, None, None, scale, 1e-6, True, backend))
    token_shift = torch.randn_like(x, requires_grad=True)  # its gradient is dy itself: never an alias
    torch.library.opcheck(ops.layer_norm_modulate.default, (x, None, b, token_shift, None, 1e-6, False, backend))
    torch.library.opcheck(ops.gated_residual.default, (x, y, gate, backend))
    torch.library.opcheck(ops.gated_residual.default, (x, y, None, backend))
    torch.library.opcheck(
        ops.gated_residual_layer_norm_modulate.default, (x, y, None, w, None, None, None, 1e-6, True, backend)
    )
    torch.library.opcheck(
        ops.gated_residual_layer_norm_modulate.default, (x, y, gate, w, None, token_shift, shift, 0.1, True, backend)
    )
    torch.library.opcheck(
        ops.gated_residual_layer_norm_modulate.default, (x, y, gate, w, b, shift, scale, 1e-6, False, backend)
    )


def _block(x, y, mods, w, token_shift):
    """A DiT-style chain: modulated norm, gated residual, then the fused pair (per-sample and per-token
    modulations), then the fused pair without a gate."""
    shift, scale, gate = mods.chunk(3, dim=-1)
    n = layer_norm_modulate(x, None, None, token_shift, scale)
    h = gated_residual(x, n * y, gate)
    h2, out = gated_residual_layer_norm_modulate(h, y, gate, w, None, shift, scale, rms=True)
    h3, out2 = gated_residual_layer_norm_modulate(h2, out, gate, w, None, token_shift, None)
    _, out3 = gated_residual_layer_norm_modulate(h3, out2, None, w, rms=True)  # a pre-norm residual + RMSNorm
    return (h2 * out).sum() + out2.square().sum() + (out3 * h).sum()


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_compile_fullgraph(backend, device):
    """The three ops trace without graph breaks and match eager, forward and backward."""
    torch._dynamo.reset()
    x = torch.randn(2, 3, 8, device=device)
    skip_unsupported(backend, A.NORM_OP, x)
    y = torch.randn(2, 3, 8, device=device)
    mods = torch.randn(2, 24, device=device, requires_grad=True)
    w = torch.randn(8, device=device, requires_grad=True)
    token_shift = torch.randn(2, 3, 8, device=device, requires_grad=True)
    assert_compiled_matches_eager(_block, (x, y), (mods, w, token_shift), backend)


def assert_compiled_matches_eager(block, inputs: tuple, params: tuple, backend: str) -> None:
    """block(*inputs, *params) compiled with fullgraph gives the eager value and gradients of ``params``, both
    under ``genkernels.backend(backend)``."""
    with genkernels.backend(backend):
        expected = block(*inputs, *params)
        grads = torch.autograd.grad(expected, params)
        got = torch.compile(block, fullgraph=True)(*inputs, *params)
        got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, grads):
        torch.testing.assert_close(a, b)


def test_cuda_refuses_with_reason(device):
    """Where the cuda kernels cannot run (CPU, extension not built), an explicit cuda backend raises with
    the reason instead of falling back."""
    x = torch.randn(1, 2, 4, device=device)
    reason = genkernels.explain(A.NORM_OP, x)["cuda"]
    if reason is None:
        pytest.skip("the cuda adaln kernels run here")
    with pytest.raises(genkernels.UnsupportedError, match="cuda"):
        layer_norm_modulate(x, backend="cuda")


X = torch.randn(2, 3, 4)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: layer_norm_modulate(torch.randn(3, 4)), ValueError, r"x must have shape \(B, L, D\), got \(3, 4\)"),
        (lambda: layer_norm_modulate(X.int()), TypeError, "x must be float32.*int32"),
        (lambda: layer_norm_modulate([1.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: layer_norm_modulate(X, torch.ones(5)), ValueError, r"weight must have shape \(4,\)"),
        (lambda: layer_norm_modulate(X, None, torch.ones(4, 1)), ValueError, r"bias must have shape \(4,\)"),
        (lambda: layer_norm_modulate(X, None, torch.ones(4), rms=True), ValueError, "bias must be None when rms=True"),
        (lambda: layer_norm_modulate(X, shift=torch.ones(2, 5)), ValueError, r"shift must have shape \(2, 4\)"),
        (lambda: layer_norm_modulate(X, scale=torch.ones(3, 3, 4)), ValueError, r"scale must have shape .*\(2, 3, 4\)"),
        (lambda: layer_norm_modulate(X, scale=torch.ones(2, 4).int()), TypeError, "scale must be float32.*int32"),
        (lambda: layer_norm_modulate(X, torch.ones(4, device="meta")), ValueError, "weight is on meta"),
        (lambda: layer_norm_modulate(X, eps=0.0), ValueError, "eps must be a finite float > 0, got 0.0"),
        (lambda: layer_norm_modulate(X, eps=-1e-6), ValueError, "eps must be a finite float > 0"),
        (lambda: layer_norm_modulate(X, rms=1), TypeError, "rms must be a bool"),
        (lambda: gated_residual(X, torch.ones(2, 3, 5), torch.ones(2, 4)), ValueError, "y must have x's shape"),
        (lambda: gated_residual(X, X.int(), torch.ones(2, 4)), TypeError, "y must be float32.*int32"),
        (lambda: gated_residual(X, X, torch.ones(4)), ValueError, r"gate must have shape \(2, 4\)"),
        (lambda: gated_residual(X, X, [1.0]), TypeError, "gate must be a torch.Tensor or None"),
        (lambda: gated_residual(X, X, torch.ones(2, 4, device="meta")), ValueError, "gate is on meta"),
        (
            lambda: gated_residual_layer_norm_modulate(X, X, torch.ones(2, 4), shift=torch.ones(2, 2, 4)),
            ValueError,
            "shift must have shape",
        ),
        (lambda: layer_norm_modulate(X, backend="nope"), ValueError, "backend must be one of"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


GPU_SHAPES = [(2, 256, 1152), (1, 128, 3072), (2, 64, 72), (2, 17, 1000), (4, 1, 1152)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("mod", ["sample", "token"])
def test_large_shapes_gpu(backend, dtype, shape, mod):
    """DiT / FLUX-like widths on the GPU: the launch heuristics at the sizes the benchmark times."""
    x, w, b, shift, scale = _norm_inputs(shape, dtype, "cuda", (mod, mod))
    _check_norm(backend, x, w, b, shift, scale, False, (mod, mod))
    _check_fused(backend, _fused_tensors(x, mod, (w, None, shift, scale), "cuda"), True, mod, (mod, mod))
    _check_fused(backend, _fused_tensors(x, None, (w, None, None, None), "cuda"), True, None, (None, None))


@pytest.mark.gpu
def test_cuda_graph_capture():
    """No host synchronization inside the ops: they record into a CUDA graph and replay correctly."""
    for backend in ("triton", "cuda"):
        x, w, b, shift, scale = _norm_inputs((2, 64, 72), torch.bfloat16, "cuda")
        try:
            skip_unsupported(backend, A.NORM_OP, x)
        except pytest.skip.Exception:
            continue
        layer_norm_modulate(x, w, b, shift, scale, backend=backend)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer_norm_modulate(x, w, b, shift, scale, backend=backend)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        up = [t.double() for t in (x, w, b, shift, scale)]
        assert_criterion(
            y,
            layer_norm_modulate(x, w, b, shift, scale, backend="reference"),
            layer_norm_modulate(*up, backend="reference"),
        )


def test_triton_forward_column_blocks():
    """A row is one power-of-two block, or two where they cover fewer columns than next_pow2(D)."""
    from genkernels.triton.adaln import _column_blocks

    assert _column_blocks(1152) == (1024, 128)  # DiT-XL: every column used (one block: 56%)
    assert _column_blocks(3072) == (2048, 1024)  # FLUX
    assert _column_blocks(72) == (64, 8)
    assert _column_blocks(1100) == (1024, 128)
    assert _column_blocks(4097) == (4096, 1)
    for d in (1, 2, 64, 1000, 1024, 200):
        assert _column_blocks(d)[1] == 0
    for d in range(1, 5000):
        block, block2 = _column_blocks(d)
        assert block + block2 >= d and block & (block - 1) == 0 and block2 & (block2 - 1) == 0


def test_eps_and_rms_positional():
    """layer_norm_modulate(x, weight, bias, shift, scale, eps, rms): eps and rms by position or by name."""
    x, w, b, shift, scale = _norm_inputs((2, 3, 8), torch.float64, "cpu")
    torch.testing.assert_close(
        layer_norm_modulate(x, w, None, shift, scale, 0.5, True),
        layer_norm_modulate(x, w, None, shift, scale, eps=0.5, rms=True),
    )
    h1, o1 = gated_residual_layer_norm_modulate(x, x, None, w, b, shift, scale, 0.25)
    h2, o2 = gated_residual_layer_norm_modulate(x, x, None, w, b, shift, scale, eps=0.25)
    torch.testing.assert_close((h1, o1), (h2, o2))
    assert not torch.allclose(o1, gated_residual_layer_norm_modulate(x, x, None, w, b, shift, scale)[1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("fused", [False, True], ids=["layer_norm_modulate", "gated_residual_layer_norm_modulate"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_cuda_graph_capture_benchmark_calls(backend, fused, backward):
    """The op (and with ``backward`` its autograd.grad) record into one CUDA graph, with no host synchronization,
    and a replay on new values of every input gives what the reference gives on them (the benchmark's
    "+ CUDA graph" variants): bf16 rows of DiT-XL's width with per-sample modulations."""
    device = torch.device("cuda")
    b, length, d = 2, 64, 1152
    x, _, _, shift, scale = _norm_inputs((b, length, d), torch.bfloat16, device)
    shift, scale = shift.to(torch.bfloat16), scale.to(torch.bfloat16)
    y, gate = torch.randn_like(x), (torch.randn(b, d, device=device) * 0.5).to(torch.bfloat16)
    inputs = (x, y, gate, shift, scale) if fused else (x, shift, scale)
    skip_unsupported(backend, A.FUSED_OP if fused else A.NORM_OP, *inputs[:-2], shift=shift, scale=scale)
    for t in inputs:
        t.requires_grad_(backward)
    cotangents = [torch.randn_like(x) for _ in range(2 if fused else 1)]

    def call(tensors, backend, cotangents):
        if fused:
            xt, yt, g, sh, sc = tensors
            outs = gated_residual_layer_norm_modulate(xt, yt, g, shift=sh, scale=sc, backend=backend)
        else:
            xt, sh, sc = tensors
            outs = (layer_norm_modulate(xt, shift=sh, scale=sc, backend=backend),)
        return (*outs, *torch.autograd.grad(outs, tensors, cotangents)) if backward else tuple(outs)

    call(inputs, backend, cotangents)  # compiles (triton), settles the allocator: the capture records launches only
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = call(inputs, backend, cotangents)
    with torch.no_grad():
        for t in (*inputs, *cotangents):
            t.copy_(torch.randn_like(t) * 0.5)
    graph.replay()
    torch.cuda.synchronize()

    def reference(dtype):
        tensors = tuple(t.detach().to(dtype or t.dtype).requires_grad_(backward) for t in inputs)
        return call(tensors, "reference", [c.to(dtype or c.dtype) for c in cotangents])

    names = ["h", "out"] if fused else ["y"]
    if backward:
        names += ["dx", "dy", "dgate", "dshift", "dscale"] if fused else ["dx", "dshift", "dscale"]
    for name, o, r, t in zip(names, outputs, reference(None), reference(torch.float64), strict=True):
        assert_criterion(o, r, t, name, relative_floor=name in ("dgate", "dshift", "dscale"))


def test_graph_order():
    """Inside genkernels.graph_mode auto takes triton first for CUDA tensors of at least GRAPH_TRITON_MIN_ELEMENTS
    elements (their kernels measured faster replayed from a graph), else the registration order (cuda first)."""
    from types import SimpleNamespace

    from genkernels.ops import adaln

    def x(numel, cuda=True):
        return SimpleNamespace(is_cuda=cuda, numel=lambda: numel)

    big = adaln.GRAPH_TRITON_MIN_ELEMENTS
    assert adaln._graph_order(x(big)) == ("triton",)
    assert adaln._graph_order(x(big - 1)) is None
    assert adaln._graph_order(x(big, cuda=False)) is None
    assert adaln._graph_order(torch.zeros(2, 3, 4)) is None  # a CPU tensor
    assert 2 * 4096 * 1152 >= big > 2 * 256 * 1152  # DiT-XL's 4096 tokens in, DiT-XL/2's 256 out


@pytest.mark.gpu
def test_graph_mode_dispatch():
    """graph_mode changes auto's pick for large CUDA tensors alone, and never an explicit backend's."""
    from genkernels import _registry
    from genkernels.ops import adaln

    big = torch.zeros(2, 4096, 1152, device="cuda", dtype=torch.bfloat16)
    small = torch.zeros(2, 256, 1152, device="cuda", dtype=torch.bfloat16)
    y, gate = torch.zeros_like(big), torch.zeros(2, 1152, device="cuda", dtype=torch.bfloat16)
    for op, args in ((adaln.NORM_OP, (big,)), (adaln.GATE_OP, (big, y, gate)), (adaln.FUSED_OP, (big, y, gate))):
        assert _registry.select(op, *args).name == "cuda"
        with genkernels.graph_mode():
            assert _registry.select(op, *args).name == "triton"
            assert _registry.select(op, small).name == "cuda"
            assert _registry.select(op, *args, backend="cuda").name == "cuda"
            with genkernels.backend("cuda", ops=adaln.OPS):
                assert _registry.select(op, *args).name == "cuda"
    out = genkernels.ops.layer_norm_modulate(big, shift=gate, scale=gate)
    with genkernels.graph_mode():
        torch.testing.assert_close(genkernels.ops.layer_norm_modulate(big, shift=gate, scale=gate), out)
