"""affine_coupling and actnorm: outputs, log-determinants and gradients of every backend against the
reference under the DESIGN.md criterion (scale modes, layouts, odd sizes, batch 0), exact inverses,
log-determinants against log|det J| from autograd, large inputs, errors, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch

import genkernels
from genkernels._layout import is_channels_last
from genkernels.ops import actnorm, affine_coupling
from genkernels.ops import coupling as CP
from tests.criterion import assert_criterion
from tests.op_inputs import skip_unsupported, to_layout

FAST = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["reference", *FAST]
# The Triton interpreter mishandles bfloat16: bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
SCALES = CP.SCALES


def _coupling_inputs(shape, scale, dtype, device, layout="contiguous", h_scale=1.0):
    x = torch.randn(shape, device=device)
    hshape = (shape[0], CP.h_channels(shape[1], scale), *shape[2:])
    h = torch.randn(hshape, device=device) * h_scale
    return to_layout(x.to(dtype), layout), to_layout(h.to(dtype), layout)


def _coupling_run(x, h, scale, backend, reverse=False, dy=None, dlogdet=None):
    x = x.detach().requires_grad_(dy is not None)
    h = h.detach().requires_grad_(dy is not None)
    y, logdet = affine_coupling(x, h, scale=scale, clamp=1.5, reverse=reverse, backend=backend)
    if dy is None:
        return y, logdet, ()
    grads = torch.autograd.grad((y.double() * dy).sum() + (logdet.double() * dlogdet).sum(), (x, h))
    return y, logdet, grads


def _check_coupling(backend, x, h, scale, reverse=False, grads=True):
    dy = torch.randn(x.shape, device=x.device, dtype=torch.float64) if grads else None
    dlogdet = torch.randn(x.shape[0], device=x.device, dtype=torch.float64) if grads else None
    y64, ld64, g64 = _coupling_run(x.double(), h.double(), scale, "reference", reverse, dy, dlogdet)
    yr, ldr, gr = _coupling_run(x, h, scale, "reference", reverse, dy, dlogdet)
    y, ld, g = _coupling_run(x, h, scale, backend, reverse, dy, dlogdet)
    assert_criterion(y, yr, y64, "y")
    assert ld.dtype == torch.float32
    assert_criterion(ld, ldr, ld64, "logdet", relative_floor=True)
    for name, out, ref, truth in zip(("dx", "dh"), g, gr, g64):
        assert_criterion(out, ref, truth, name)
    return y


# --------------------------------------------------------------------------- affine coupling vs the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", SCALES)
def test_coupling_scales_and_dtypes(backend, dtype, scale, device):
    x, h = _coupling_inputs((2, 6, 5, 7), scale, dtype, device)
    skip_unsupported(backend, CP.COUPLING_OP, x, h, scale=scale)
    _check_coupling(backend, x, h, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("reverse", [False, True])
def test_coupling_layouts(backend, layout, reverse, device):
    x, h = _coupling_inputs((2, 5, 4, 6), "sigmoid", torch.float16, device, layout)
    skip_unsupported(backend, CP.COUPLING_OP, x, h, scale="sigmoid", reverse=reverse)
    y = _check_coupling(backend, x, h, "sigmoid", reverse=reverse, grads=not reverse)
    if layout == "channels_last":
        assert is_channels_last(y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape", [(3, 2), (1, 2, 1, 1), (2, 3, 1, 1), (2, 5, 7, 3), (1, 7, 33), (2, 4, 3, 4, 5), (5, 9, 1, 9)], ids=str
)
@pytest.mark.parametrize("scale", ["softclamp_atan", "additive"])
def test_coupling_odd_shapes(backend, shape, scale, device):
    x, h = _coupling_inputs(shape, scale, torch.float32, device)
    skip_unsupported(backend, CP.COUPLING_OP, x, h, scale=scale)
    _check_coupling(backend, x, h, scale)
    _check_coupling(backend, x, h, scale, reverse=True, grads=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
def test_coupling_inverse(backend, scale, device):
    """inverse(forward(x)) == x to 1e-5 relative in float32, and the two log-dets cancel."""
    x, h = _coupling_inputs((2, 6, 8, 8), scale, torch.float32, device)
    skip_unsupported(backend, CP.COUPLING_OP, x, h, scale=scale)
    y, logdet = affine_coupling(x, h, scale=scale, backend=backend)
    back, inv_logdet = affine_coupling(y, h, scale=scale, reverse=True, backend=backend)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5 * x.abs().max().item())
    torch.testing.assert_close(inv_logdet, -logdet, rtol=1e-6, atol=1e-5)
    ca = x.shape[1] // 2
    assert torch.equal(y[:, :ca], x[:, :ca]), "the first half passes through unchanged"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
def test_coupling_logdet_is_log_abs_det_jacobian(backend, scale, device):
    """logdet == log|det dy/dx| with autograd's Jacobian (through the op's own backward)."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    x, h = _coupling_inputs((1, 3, 2, 2), scale, dtype, device)
    skip_unsupported(backend, CP.COUPLING_OP, x, h, scale=scale)
    jac = torch.autograd.functional.jacobian(lambda v: affine_coupling(v, h, scale=scale, backend=backend)[0], x)
    _, logabsdet = torch.linalg.slogdet(jac.reshape(x.numel(), x.numel()).double())
    logdet = affine_coupling(x, h, scale=scale, backend=backend)[1]
    torch.testing.assert_close(logdet.double(), logabsdet.view(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["sigmoid", "softclamp_tanh", "softclamp_atan"])
def test_coupling_large_h(backend, scale, device):
    """|h| up to 1e4: no NaN or inf in y, logdet or the gradients of the bounded scale modes."""
    x, h = _coupling_inputs((2, 4, 3, 3), scale, torch.float32, device, h_scale=1e4)
    skip_unsupported(backend, CP.COUPLING_OP, x, h, scale=scale)
    x.requires_grad_(True)
    h.requires_grad_(True)
    y, logdet = affine_coupling(x, h, scale=scale, backend=backend)
    dx, dh = torch.autograd.grad(y.sum() + logdet.sum(), (x, h))
    for name, t in (("y", y), ("logdet", logdet), ("dx", dx), ("dh", dh)):
        assert torch.isfinite(t).all(), name
    if scale != "sigmoid":  # s is within [exp(-clamp), exp(clamp)]: the inverse is finite too
        back, _ = affine_coupling(y.detach(), h.detach(), scale=scale, reverse=True, backend=backend)
        assert torch.isfinite(back).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3)], ids=str)
def test_coupling_empty(backend, shape, device):
    x, h = _coupling_inputs(shape, "sigmoid", torch.float32, device)
    x.requires_grad_(True)
    y, logdet = affine_coupling(x, h, backend=backend)
    assert y.shape == shape and logdet.shape == (shape[0],) and (logdet == 0).all()
    (dx,) = torch.autograd.grad(y.sum() + logdet.sum(), x)
    assert dx.shape == shape


def test_coupling_reference_formula(device):
    """The reference against the formulas written out, for each scale."""
    x, h = _coupling_inputs((2, 5, 3), "exp", torch.float64, device)
    xa, xb, hs, t = x[:, :2], x[:, 2:], h[:, :3], h[:, 3:]
    logs = {
        "exp": hs,
        "sigmoid": torch.log(torch.sigmoid(hs + 2)),
        "softclamp_tanh": 2.0 * torch.tanh(hs / 2.0),
        "softclamp_atan": 0.636 * 2.0 * torch.atan(hs / 2.0),
    }
    for scale, ls in logs.items():
        y, logdet = affine_coupling(x, h, scale=scale, clamp=2.0, backend="reference")
        torch.testing.assert_close(y, torch.cat([xa, xb * ls.exp() + t], 1))
        torch.testing.assert_close(logdet, ls.sum((1, 2)))


@pytest.mark.parametrize("backend", FAST)
def test_differentiated_reverse_runs_on_the_reference(backend, device):
    x, h = _coupling_inputs((2, 4, 3, 3), "sigmoid", torch.float32, device)
    h.requires_grad_(True)
    reasons = genkernels.explain(CP.COUPLING_OP, x, h, scale="sigmoid", reverse=True)
    assert "reverse=True" in reasons[backend]
    with pytest.raises(genkernels.UnsupportedError, match="reverse=True"):
        affine_coupling(x, h, reverse=True, backend=backend)
    back, _ = affine_coupling(x, h, reverse=True)  # auto: the reference, differentiable
    (dh,) = torch.autograd.grad(back.sum(), h)
    assert torch.isfinite(dh).all()


# --------------------------------------------------------------------------- actnorm


def _actnorm_inputs(shape, dtype, device, layout="contiguous"):
    x = to_layout(torch.randn(shape, device=device).to(dtype), layout)
    c = shape[1]
    return x, 0.5 * torch.randn(c, device=device), torch.randn(c, device=device)


def _actnorm_run(x, ls, b, backend, reverse=False, dy=None, dlogdet=None):
    x, ls, b = (t.detach().requires_grad_(dy is not None) for t in (x, ls, b))
    y, logdet = actnorm(x, ls, b, reverse=reverse, backend=backend)
    if dy is None:
        return y, logdet, ()
    loss = (y.double() * dy).sum() + (logdet.double() * dlogdet).sum()
    return y, logdet, torch.autograd.grad(loss, (x, ls, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (3, 5), (1, 3, 1, 1), (2, 4, 3, 5, 2)], ids=str)
def test_actnorm(backend, dtype, layout, shape, device):
    x, ls, b = _actnorm_inputs(shape, dtype, device, layout)
    skip_unsupported(backend, CP.ACTNORM_OP, x, ls, b)
    dy = torch.randn(shape, device=device, dtype=torch.float64)
    dlogdet = torch.randn(shape[0], device=device, dtype=torch.float64)
    y64, ld64, g64 = _actnorm_run(x.double(), ls.double(), b.double(), "reference", False, dy, dlogdet)
    yr, ldr, gr = _actnorm_run(x, ls, b, "reference", False, dy, dlogdet)
    y, ld, g = _actnorm_run(x, ls, b, backend, False, dy, dlogdet)
    assert_criterion(y, yr, y64, "y")
    assert_criterion(ld, ldr, ld64, "logdet", relative_floor=True)
    assert_criterion(g[0], gr[0], g64[0], "dx")
    # Per-channel sums over the batch and the positions: the floor scales with their magnitude.
    assert_criterion(g[1], gr[1], g64[1], "dlog_scale", relative_floor=True)
    assert_criterion(g[2], gr[2], g64[2], "dbias", relative_floor=True)
    if is_channels_last(x):
        assert is_channels_last(y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_actnorm_inverse_and_logdet(backend, device):
    x, ls, b = _actnorm_inputs((2, 3, 4, 5), torch.float32, device)
    skip_unsupported(backend, CP.ACTNORM_OP, x, ls, b)
    y, logdet = actnorm(x, ls, b, backend=backend)
    back, inv = actnorm(y, ls, b, reverse=True, backend=backend)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5 * x.abs().max().item())
    torch.testing.assert_close(inv, -logdet)
    torch.testing.assert_close(logdet, torch.full((2,), 20 * ls.sum().item(), device=device))
    assert logdet.stride() == (1,)  # a real (N,) tensor: accumulating in place works
    logdet += inv
    small, ls2, b2 = _actnorm_inputs((1, 3, 2, 2), torch.float64 if backend == "reference" else torch.float32, device)
    jac = torch.autograd.functional.jacobian(lambda v: actnorm(v, ls2.to(v.dtype), b2, backend=backend)[0], small)
    _, logabsdet = torch.linalg.slogdet(jac.reshape(12, 12).double())
    torch.testing.assert_close(actnorm(small, ls2.to(small.dtype), b2, backend=backend)[1].double(), logabsdet.view(1))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, h: affine_coupling(x[:, :1], h), ValueError, "at least 2 channels"),
        (lambda x, h: affine_coupling(x, h[:, :3]), ValueError, r"h must have shape \(2, 4, 3, 3\)"),
        (lambda x, h: affine_coupling(x, h, scale="additive"), ValueError, "the shift t"),
        (lambda x, h: affine_coupling(x, h, scale="softplus"), ValueError, "scale must be one of"),
        (lambda x, h: affine_coupling(x, h, clamp=0.0), ValueError, "clamp must be a finite float > 0"),
        (lambda x, h: affine_coupling(x.long(), h), TypeError, "x must be float32"),
        (lambda x, h: affine_coupling(x, h.half()), TypeError, "share one dtype"),
        (lambda x, h: affine_coupling(x, h.to("meta")), ValueError, "use one device"),
        (lambda x, h: affine_coupling(x[0, 0, 0], h), ValueError, r"x must be \(N, C, \*\)"),
        (lambda x, h: affine_coupling(x, h, reverse=1), TypeError, "reverse must be a bool"),
        (lambda x, h: actnorm(x, torch.zeros(3), torch.zeros(4)), ValueError, r"log_scale must have shape \(4,\)"),
        (lambda x, h: actnorm(x, torch.zeros(4), torch.zeros(4).long()), TypeError, "bias must be float32"),
        (lambda x, h: actnorm(x, torch.zeros(4), torch.zeros(4, device="meta")), ValueError, "use one device"),
        (lambda x, h: affine_coupling(x, h, backend="fast"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(call, error, match):
    x, h = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    with pytest.raises(error, match=match):
        call(x, h)


def test_explicit_backend_refuses_float64():
    x, h = _coupling_inputs((2, 4, 3), "exp", torch.float64, "cpu")
    with pytest.raises(genkernels.UnsupportedError, match="float64"):
        affine_coupling(x, h, backend="triton")
    affine_coupling(x, h)  # auto: the reference runs float64


# --------------------------------------------------------------------------- torch.library ops and compile


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("scale", ["sigmoid", "additive"])
def test_opcheck(backend, scale, device):
    x, h = _coupling_inputs((2, 5, 3, 4), scale, torch.float32, device, "channels_last")
    skip_unsupported(backend, CP.COUPLING_OP, x, h, scale=scale)
    x.requires_grad_(True)
    h.requires_grad_(True)
    torch.library.opcheck(torch.ops.genkernels.affine_coupling.default, (x, h, scale, 1.5, False, backend))
    torch.library.opcheck(
        torch.ops.genkernels.affine_coupling.default, (x.detach(), h.detach(), scale, 1.5, True, backend)
    )
    xa, ls, b = _actnorm_inputs((2, 5, 3, 4), torch.float32, device)
    for t in (xa, ls, b):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.genkernels.actnorm.default, (xa, ls, b, False, backend))


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_compile_fullgraph(backend, device):
    """ActNorm then a coupling, forward and backward, and the inverse, trace without graph breaks."""
    torch._dynamo.reset()
    x, h = _coupling_inputs((2, 4, 3, 5), "sigmoid", torch.float32, device, "channels_last")
    _, ls, b = _actnorm_inputs((2, 4, 3, 5), torch.float32, device)
    skip_unsupported(backend, CP.COUPLING_OP, x, h, scale="sigmoid")

    def step(x, h, ls, b):
        a, ld_a = actnorm(x, ls, b, backend=backend)
        y, ld_c = affine_coupling(a, h, backend=backend)
        back, _ = affine_coupling(y.detach(), h.detach(), reverse=True, backend=backend)
        return (y * y).sum() + (ld_a + ld_c).sum(), back

    leaves = [t.detach().requires_grad_(True) for t in (x, h, ls, b)]
    loss, back = step(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    cleaves = [t.detach().requires_grad_(True) for t in (x, h, ls, b)]
    closs, cback = torch.compile(step, fullgraph=True)(*cleaves)
    cgrads = torch.autograd.grad(closs, cleaves)
    torch.testing.assert_close(closs, loss)
    torch.testing.assert_close(cback, back)
    for g, cg in zip(grads, cgrads):
        torch.testing.assert_close(cg, g)


@pytest.mark.parametrize("layout", ["strided", "channels_last_h"])
def test_cuda_reasons_ignore_layouts_the_op_arranges(layout, monkeypatch):
    """The op copies a strided x once and brings h to x's layout before a backend runs, yet the cuda backend
    answered genkernels.explain with 'h is not dense in x's layout' / 'x is not dense' for such inputs (auto
    then ran cuda anyway, and the strided GPU tests skipped themselves). With the device and the extension
    taken as available, the reason is now None, as the triton backend's."""
    monkeypatch.setattr(CP._cuda, "kernels_unavailable", lambda *args: None)
    x, h = _coupling_inputs(
        (2, 4, 3, 5), "sigmoid", torch.float32, "cpu", "strided" if layout == "strided" else "contiguous"
    )
    if layout == "channels_last_h":
        h = to_layout(h, "channels_last")
    assert genkernels.explain(CP.COUPLING_OP, x, h)["cuda"] is None
    assert genkernels.explain(CP.ACTNORM_OP, x, torch.zeros(4), torch.zeros(4))["cuda"] is None
