"""The modulated-convolution ops (demodulation_coefficients, modconv_epilogue): outputs and every gradient of
each backend against the reference under the DESIGN.md criterion (dtypes, layouts, activations, optional
inputs, odd shapes), gradcheck of the reference, determinism, the torch.library ops under opcheck and
torch.compile, and errors."""

from __future__ import annotations

import importlib

import pytest
import torch

import genkernels
from genkernels.ops import demodulation_coefficients, modconv_epilogue
from tests.criterion import assert_criterion
from tests.op_inputs import skip_unsupported, to_layout

MC = importlib.import_module("genkernels.ops.modconv")
FAST = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["reference", *FAST]
# The Triton interpreter mishandles bfloat16: bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
LAYOUTS = ["contiguous", "channels_last"]


def _check_all(names, out, ref, truth, reductions=()):
    for name, o, r, t in zip(names, out, ref, truth):
        if t is None:
            assert o is None and r is None, f"{name}: a gradient where the reference has none"
            continue
        assert_criterion(o, r, t, name, relative_floor=name in reductions)


# --------------------------------------------------------------------------- demodulation_coefficients


def _demod_run(weight, styles, backend, eps=1e-8):
    """dcoef and the gradients of sum(dcoef * g) w.r.t. weight and styles."""
    weight = weight.detach().requires_grad_(True)
    styles = styles.detach().requires_grad_(True)
    dcoef = demodulation_coefficients(weight, styles, eps=eps, backend=backend)
    g = torch.randn(dcoef.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    dweight, dstyles = torch.autograd.grad(dcoef, (weight, styles), g.to(dcoef.device, dcoef.dtype))
    return [dcoef, dweight, dstyles]


def _demod_check(backend, weight, styles, eps=1e-8):
    out = _demod_run(weight, styles, backend, eps)
    ref = _demod_run(weight, styles, "reference", eps)
    truth = _demod_run(weight.double(), styles.double(), "reference", eps)
    # The weight gradient sums over the batch, the styles gradient over the outputs.
    _check_all(("dcoef", "dweight", "dstyles"), out, ref, truth, reductions=("dweight", "dstyles"))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wshape, n", [((6, 5, 3, 3), 3), ((7, 5, 1, 1), 2), ((9, 37), 1), ((40, 3, 3, 3), 33)])
def test_demod(backend, dtype, wshape, n, device):
    weight = (torch.randn(wshape, device=device) * 0.5).to(dtype)
    styles = torch.randn(n, wshape[1], device=device) + 1.0
    skip_unsupported(backend, MC.DEMOD_OP, weight, styles)
    _demod_check(backend, weight, styles)


@pytest.mark.parametrize("backend", FAST)
def test_demod_eps_and_styles_dtype(backend, device):
    """A large eps matters; half-precision styles are used in float32."""
    weight = torch.randn(4, 6, 3, 3, device=device) * 0.01
    styles = torch.randn(2, 6, device=device).half()
    skip_unsupported(backend, MC.DEMOD_OP, weight, styles)
    _demod_check(backend, weight, styles, eps=1e-3)


def test_demod_formula(device):
    weight = torch.randn(4, 3, 3, 3, device=device, dtype=torch.float64)
    styles = torch.randn(2, 3, device=device, dtype=torch.float64)
    modulated = weight[None] * styles[:, None, :, None, None]
    expected = (modulated.square().sum((2, 3, 4)) + 1e-8).rsqrt()
    torch.testing.assert_close(demodulation_coefficients(weight, styles), expected)
    # eps positional, as in demodulation_coefficients(weight, styles, eps=1e-8)'s signature
    wide = (modulated.square().sum((2, 3, 4)) + 0.5).rsqrt()
    torch.testing.assert_close(demodulation_coefficients(weight, styles, 0.5), wide)


# --------------------------------------------------------------------------- modconv_epilogue


def _epi_inputs(shape, dtype, device, layout="contiguous", noise="sample", strength="tensor", dcoef=True, bias=True):
    n, c, h, w = shape
    y = to_layout((torch.randn(shape, device=device) * 2.0).to(dtype), layout)
    d = torch.rand(n, c, device=device) + 0.5 if dcoef else None
    nz = None
    if noise is not None:
        nz = torch.randn(n if noise == "sample" else 1, 1, h, w, device=device)
    st = {"tensor": torch.tensor([0.7], device=device), "scalar": torch.tensor(0.6, device=device)}.get(strength)
    if strength == "float":
        st = 0.8
    b = torch.randn(c, device=device) if bias else None
    return y, d, nz, st, b


def _epi_run(y, dcoef, noise, strength, bias, backend, noise_grad=False, **kwargs):
    """out and the gradients of sum(out * g) w.r.t. y, dcoef, noise_strength, bias (and noise)."""
    leaves = {"y": y.detach().requires_grad_(True)}
    for name, t in (("dcoef", dcoef), ("noise_strength", strength), ("bias", bias)):
        if isinstance(t, torch.Tensor):
            leaves[name] = t.detach().requires_grad_(True)
    if noise is not None:
        noise = noise.detach().requires_grad_(noise_grad)
        if noise_grad:
            leaves["noise"] = noise
    out = modconv_epilogue(
        leaves["y"],
        leaves.get("dcoef"),
        noise=noise,
        noise_strength=leaves.get("noise_strength", strength),
        bias=leaves.get("bias"),
        backend=backend,
        **kwargs,
    )
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    grads = torch.autograd.grad(out, list(leaves.values()), g.to(out.device, out.dtype))
    found = dict(zip(leaves, grads))
    return [out] + [found.get(name) for name in ("y", "dcoef", "noise_strength", "bias", "noise")]


EPI_NAMES = ("out", "dy", "ddcoef", "dstrength", "dbias", "dnoise")
EPI_REDUCTIONS = ("ddcoef", "dstrength", "dbias", "dnoise")


def _epi_check(backend, y, dcoef, noise, strength, bias, noise_grad=False, **kwargs):
    out = _epi_run(y, dcoef, noise, strength, bias, backend, noise_grad, **kwargs)
    ref = _epi_run(y, dcoef, noise, strength, bias, "reference", noise_grad, **kwargs)

    def up(t):
        return t.double() if isinstance(t, torch.Tensor) else t

    truth = _epi_run(up(y), up(dcoef), up(noise), up(strength), up(bias), "reference", noise_grad, **kwargs)
    _check_all(EPI_NAMES, out, ref, truth, EPI_REDUCTIONS)
    if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
        assert out[0].is_contiguous(memory_format=torch.channels_last), "out lost y's channels_last layout"
        assert out[1].is_contiguous(memory_format=torch.channels_last), "dy lost y's channels_last layout"


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", MC.ACTS)
def test_epilogue_acts(backend, dtype, act, device):
    y, d, nz, st, b = _epi_inputs((2, 3, 1, 7), dtype, device)
    skip_unsupported(backend, MC.EPILOGUE_OP, y, d, noise=nz, bias=b, act=act)
    _epi_check(backend, y, d, nz, st, b, act=act)


# (noise, strength, dcoef, bias, clamp): every optional input present or absent.
OPTIONS = [
    ("sample", "tensor", True, True, None),
    ("shared", "scalar", True, True, 0.9),
    ("sample", "float", False, True, None),
    ("shared", None, True, False, 1.5),
    (None, None, True, True, 0.5),
    (None, None, False, False, None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(str(v) for v in o))
def test_epilogue_options_and_layouts(backend, layout, options, device):
    noise, strength, dcoef, bias, clamp = options
    y, d, nz, st, b = _epi_inputs((2, 5, 3, 4), torch.float16, device, layout, noise, strength, dcoef, bias)
    skip_unsupported(backend, MC.EPILOGUE_OP, y, d, noise=nz, bias=b, act="lrelu")
    _epi_check(backend, y, d, nz, st, b, act="lrelu", clamp=clamp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 3, 7, 1), (3, 17, 1, 1), (2, 40, 9, 8)], ids=str)
def test_epilogue_odd_shapes(backend, layout, shape, device):
    y, d, nz, st, b = _epi_inputs(shape, torch.float32, device, layout)
    skip_unsupported(backend, MC.EPILOGUE_OP, y, d, noise=nz, bias=b, act="silu")
    _epi_check(backend, y, d, nz, st, b, act="silu", clamp=1.2)


def test_epilogue_strided_input_is_copied(device):
    y, d, nz, st, b = _epi_inputs((2, 3, 4, 5), torch.float32, device)
    strided = to_layout(y, "strided")
    skip_unsupported("triton", MC.EPILOGUE_OP, strided, d, noise=nz, bias=b, act="lrelu")
    _epi_check("triton", strided, d, nz, st, b, act="lrelu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_epilogue_noise_gradient(backend, device):
    """A noise tensor that requires grad: the fast backends refuse (auto runs the reference), and the
    reference's gradients meet the criterion."""
    y, d, nz, st, b = _epi_inputs((2, 4, 3, 3), torch.float32, device)
    nz.requires_grad_(True)
    reasons = genkernels.explain(MC.EPILOGUE_OP, y, d, noise=nz, bias=b, act="lrelu")
    if backend != "reference":
        assert "noise requires grad" in reasons[backend]
        with pytest.raises(genkernels.UnsupportedError, match="noise requires grad"):
            modconv_epilogue(y, d, noise=nz, bias=b, backend=backend)
        return
    for noise in (nz, nz[:1]):
        _epi_check("reference", y, d, noise.detach(), st, b, noise_grad=True, act="lrelu")
    _epi_check(None, y, d, nz.detach(), st, b, noise_grad=True, act="lrelu")


@pytest.mark.parametrize("backend", FAST)
def test_epilogue_double_backward(backend, device):
    """A create_graph backward on a fast backend runs the formulas in torch ops: differentiable again."""
    y, d, nz, st, b = _epi_inputs((2, 3, 2, 3), torch.float32, device)
    skip_unsupported(backend, MC.EPILOGUE_OP, y, d, noise=nz, bias=b, act="tanh")

    def second(be):
        yl, dl = y.detach().requires_grad_(True), d.detach().requires_grad_(True)
        out = modconv_epilogue(yl, dl, noise=nz, noise_strength=st, bias=b, act="tanh", backend=be)
        (gy,) = torch.autograd.grad(out.square().sum(), yl, create_graph=True)
        return torch.autograd.grad(gy.square().sum(), (yl, dl))

    for o, r in zip(second(backend), second("reference")):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)


def test_epilogue_formula(device):
    y, d, nz, st, b = _epi_inputs((2, 3, 4, 4), torch.float64, device)
    z = y * d[:, :, None, None] + nz * st + b[None, :, None, None]
    expected = torch.nn.functional.leaky_relu(z, 0.2) * 2**0.5
    torch.testing.assert_close(modconv_epilogue(y, d, noise=nz, noise_strength=st, bias=b), expected)
    expected = torch.nn.functional.silu(y + nz).clamp(-1, 1)
    torch.testing.assert_close(modconv_epilogue(y, noise=nz, act="silu", clamp=1.0), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, device):
    y, d, nz, st, b = _epi_inputs((0, 3, 2, 2), torch.float32, device, noise="shared")
    out = modconv_epilogue(y, d, noise=nz, noise_strength=st, bias=b, backend=backend)
    assert out.shape == y.shape
    assert demodulation_coefficients(torch.randn(4, 3, device=device), d, backend=backend).shape == (0, 4)


@pytest.mark.parametrize("backend", FAST)
def test_deterministic(backend, device):
    """Two runs give bit-identical outputs and gradients (partials summed in a fixed order, no atomics)."""
    y, d, nz, st, b = _epi_inputs((2, 16, 8, 8), torch.float32, device, "channels_last")
    skip_unsupported(backend, MC.EPILOGUE_OP, y, d, noise=nz, bias=b, act="lrelu")
    first = _epi_run(y, d, nz, st, b, backend)
    second = _epi_run(y, d, nz, st, b, backend)
    weight, styles = torch.randn(20, 16, 3, 3, device=device), torch.randn(3, 16, device=device)
    first += _demod_run(weight, styles, backend)
    second += _demod_run(weight, styles, backend)
    for a, c in zip(first, second):
        assert (a is None and c is None) or torch.equal(a, c)


# --------------------------------------------------------------------------- gradcheck of the reference


@pytest.mark.parametrize("act", MC.ACTS)
def test_reference_gradcheck(act):
    def away_from_kinks(t):
        t.data[t.data.abs() < 1e-2] = 0.5
        return t

    opts = {"dtype": torch.float64, "requires_grad": True}
    y = away_from_kinks(torch.randn(2, 3, 2, 3, **opts))
    d, nz = torch.rand(2, 3, **opts), torch.randn(1, 1, 2, 3, **opts)
    st, b = torch.tensor([0.5], **opts), torch.randn(3, **opts)

    def fn(y, d, nz, st, b):
        return modconv_epilogue(y, d, noise=nz, noise_strength=st, bias=b, act=act, backend="reference")

    assert torch.autograd.gradcheck(fn, (y, d, nz, st, b))
    if act == "lrelu":
        weight, styles = torch.randn(4, 3, 3, 3, **opts), torch.randn(2, 3, **opts)
        fn = lambda w, s: demodulation_coefficients(w, s, backend="reference")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (weight, styles))
        assert torch.autograd.gradcheck(fn, (torch.randn(5, 3, **opts), styles))


# --------------------------------------------------------------------------- torch.library ops and compile


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_opcheck(backend, device):
    y, d, nz, st, b = _epi_inputs((2, 3, 3, 4), torch.float32, device, "channels_last")
    skip_unsupported(backend, MC.EPILOGUE_OP, y, d, noise=nz, bias=b, act="silu")
    for t in (y, d, st, b):
        t.requires_grad_(True)
    args = ("silu", 0.2, 1.0, True, 1.5)
    torch.library.opcheck(torch.ops.genkernels.modconv_epilogue.default, (y, d, nz, st, b, *args, backend))
    # The backward ops are first order (no autograd formula of their own): checked on plain tensors.
    dout = torch.randn_like(y)
    plain = [t.detach() for t in (y, d, nz, st, b)]
    backward_op = torch.ops.genkernels.modconv_epilogue_backward.default
    for flags in ((True, True, True, False), (False, False, False, True)):
        if flags[3] and backend != "reference":
            # Only the reference computes the noise gradient: a fast backend named explicitly refuses it on
            # the traced path too (as on the eager one), and auto runs the reference.
            with pytest.raises(genkernels.UnsupportedError, match="noise requires grad"):
                backward_op(dout, *plain, *args, *flags, backend)
            torch.library.opcheck(backward_op, (dout, *plain, *args, *flags, ""))
            continue
        torch.library.opcheck(backward_op, (dout, *plain, *args, *flags, backend))
    weight = torch.randn(4, 3, 9, device=device, requires_grad=True)
    styles = torch.randn(2, 3, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.genkernels.demodulation_coefficients.default, (weight, styles, 1e-8, backend))
    dcoef = torch.rand(2, 4, device=device)
    torch.library.opcheck(
        torch.ops.genkernels.demodulation_coefficients_backward.default,
        (dcoef, dcoef, weight.detach(), styles.detach(), backend),
    )


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_compile_fullgraph(backend, device):
    """Both ops, forward and backward, trace without graph breaks and match the eager call."""
    torch._dynamo.reset()
    y, _, nz, st, b = _epi_inputs((2, 4, 3, 3), torch.float32, device, "channels_last")
    weight, styles = torch.randn(4, 5, 3, 3, device=device), torch.randn(2, 5, device=device)
    skip_unsupported(backend, MC.EPILOGUE_OP, y, None, noise=nz, bias=b, act="lrelu")
    skip_unsupported(backend, MC.DEMOD_OP, weight, styles)

    def fn(y, weight, styles, st, b):
        d = demodulation_coefficients(weight, styles, backend=backend)
        return modconv_epilogue(y, d, noise=nz, noise_strength=st, bias=b, clamp=2.0, backend=backend)

    def run(f):
        leaves = [t.detach().requires_grad_(True) for t in (y, weight, styles, st, b)]
        out = f(*leaves)
        return [out, *torch.autograd.grad((out * out).sum(), leaves)]

    eager = run(fn)
    compiled = run(torch.compile(fn, fullgraph=True))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda w, s, y: demodulation_coefficients(w[0], s), ValueError, r"weight must have shape \(O, I, kh, kw\)"),
        (lambda w, s, y: demodulation_coefficients(w, s[:, :2]), ValueError, r"styles must have shape \(N, 3\)"),
        (lambda w, s, y: demodulation_coefficients(w, s, eps=0.0), ValueError, "eps must be a finite float > 0"),
        (lambda w, s, y: demodulation_coefficients(w.long(), s), TypeError, "weight must be float32"),
        (lambda w, s, y: demodulation_coefficients(w, s.to("meta")), ValueError, "use one device"),
        (lambda w, s, y: modconv_epilogue(y[0]), ValueError, r"y must have shape \(N, C, H, W\)"),
        (lambda w, s, y: modconv_epilogue(y, s), ValueError, r"dcoef must have shape \(2, 4\)"),
        (lambda w, s, y: modconv_epilogue(y, noise=y), ValueError, r"noise must have shape \(2, 1, 5, 6\)"),
        (lambda w, s, y: modconv_epilogue(y, bias=s[0]), ValueError, r"bias must have shape \(4,\)"),
        (lambda w, s, y: modconv_epilogue(y, noise_strength=s), ValueError, "noise_strength must be a float"),
        (lambda w, s, y: modconv_epilogue(y, act="swish"), ValueError, "act must be one of"),
        (lambda w, s, y: modconv_epilogue(y, clamp=0.0), ValueError, "clamp must be None or a finite float > 0"),
        (lambda w, s, y: modconv_epilogue(y.int()), TypeError, "y must be float32"),
        (lambda w, s, y: modconv_epilogue(y, bias=torch.zeros(4, device="meta")), ValueError, "use one device"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(4, 3, 3, 3), torch.randn(2, 3), torch.randn(2, 4, 5, 6))


def test_float64_is_reference_only():
    y = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    assert "float64" in genkernels.explain(MC.EPILOGUE_OP, y)["triton"]
    with pytest.raises(genkernels.UnsupportedError, match="dtype torch.float64"):
        modconv_epilogue(y, backend="triton")
    assert "float64" in genkernels.explain(MC.DEMOD_OP, torch.randn(2, 2, dtype=torch.float64), y[0, 0])["triton"]
