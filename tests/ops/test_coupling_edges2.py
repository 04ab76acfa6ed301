"""affine_coupling and actnorm at the edges of their numerics: log s of the soft clamps near h_s = 0 (a
zero-initialized conditioner's output), ActNorm's dlog_scale when |bias| is much larger than the spread of
x + bias (data-dependent initialization on inputs far from zero), and the reverse direction's log-det
against log|det J| of the inverse map."""

from __future__ import annotations

import pytest
import torch

from genkernels.ops import actnorm, affine_coupling
from genkernels.ops import coupling as CP
from tests.criterion import assert_criterion
from tests.op_inputs import skip_unsupported

FAST = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("backend", FAST)
def test_softclamp_tanh_small_h(backend, device):
    """log s = clamp tanh(h_s / clamp) to a few float32 ulp for |h_s| from 1e-9 to 1e4, and a log-det over
    16,384 positions of small h_s within the criterion. tanh z was (1 - e) / (1 + e) with e = exp(-2|z|),
    which cancels for small |z|: log s came out 0 below |h_s| ~ 1e-8 and off by about clamp * 3e-8 per
    element above, so the log-det of a 128 x 128 map with clamp 30 was off by 3.4e-5 to 5.2e-5 (seeds) against
    a 1e-5 bound."""
    mags = torch.logspace(-9, 4, 400, dtype=torch.float64, device=device)
    u = torch.cat([mags, -mags]).float()
    x = torch.ones(u.numel(), 2, 1, device=device)
    h = torch.stack([u, torch.zeros_like(u)], 1)[:, :, None]  # one sample per h_s: logdet[n] = log s(u[n])
    skip_unsupported(backend, CP.COUPLING_OP, x, h, scale="softclamp_tanh")
    log_s = affine_coupling(x, h, scale="softclamp_tanh", clamp=1.5, backend=backend)[1].double()
    truth = affine_coupling(x.double(), h.double(), scale="softclamp_tanh", clamp=1.5, backend="reference")[1]
    ulps = (log_s - truth).abs() / (torch.finfo(torch.float32).eps * truth.abs())
    assert ulps.max().item() <= 4, f"log s off by {ulps.max().item():.3g} ulp at h_s = {u[ulps.argmax()].item():.3g}"

    x = torch.randn(2, 2, 128, 128, device=device)
    h = torch.randn(2, 2, 128, 128, device=device) * 1e-3
    y, logdet = affine_coupling(x, h, scale="softclamp_tanh", clamp=30.0, backend=backend)
    yr, ldr = affine_coupling(x, h, scale="softclamp_tanh", clamp=30.0, backend="reference")
    y64, ld64 = affine_coupling(x.double(), h.double(), scale="softclamp_tanh", clamp=30.0, backend="reference")
    assert_criterion(y, yr, y64, "y")
    assert_criterion(logdet, ldr, ld64, "logdet", relative_floor=True)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_actnorm_dlog_scale_large_bias(backend, layout, device):
    """dlog_scale = exp(ls) sum dy (x + bias) within the criterion when x has mean 1000 and bias = -mean (as
    ActNorm's data-dependent initialization sets it). It was formed as exp(ls) (sum dy x + bias sum dy):
    two sums of order 1000 sum|dy| that cancel, off by 2e-3 against a 5e-4 bound."""
    x = torch.randn(4, 3, 16, 16, device=device) + 1000.0
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    ls, bias = 0.1 * torch.randn(3, device=device), -x.mean((0, 2, 3))
    skip_unsupported(backend, CP.ACTNORM_OP, x, ls, bias)
    dy = torch.randn(x.shape, dtype=torch.float64, device=device)

    def grads(x, ls, bias, backend):
        ls, bias = ls.detach().requires_grad_(True), bias.detach().requires_grad_(True)
        y, _ = actnorm(x, ls, bias, backend=backend)
        return torch.autograd.grad((y.double() * dy).sum(), (ls, bias))

    g64 = grads(x.double(), ls.double(), bias.double(), "reference")
    gr = grads(x, ls, bias, "reference")
    g = grads(x, ls, bias, backend)
    assert_criterion(g[0], gr[0], g64[0], "dlog_scale", relative_floor=True)
    assert_criterion(g[1], gr[1], g64[1], "dbias", relative_floor=True)


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("scale", CP.SCALES)
def test_reverse_logdet_is_log_abs_det_jacobian(backend, scale, device):
    """The reverse direction's logdet == log|det dx/dy| of the inverse map, the Jacobian taken by autograd in
    float64 on the reference (a differentiated reverse call runs there), and the fast backends' logdet of
    the same float32 call against it; also for an odd C (x_b the larger part)."""
    x = torch.randn(1, 3, 2, 2, device=device)
    h = torch.randn(1, CP.h_channels(3, scale), 2, 2, device=device)
    skip_unsupported(backend, CP.COUPLING_OP, x, h, scale=scale, reverse=True)
    x64, h64 = x.double(), h.double()
    jac = torch.autograd.functional.jacobian(
        lambda v: affine_coupling(v, h64, scale=scale, reverse=True, backend="reference")[0], x64
    )
    sign, logabsdet = torch.linalg.slogdet(jac.reshape(x.numel(), x.numel()))
    assert sign.item() == 1.0
    logdet = affine_coupling(x, h, scale=scale, reverse=True, backend=backend)[1]
    assert logdet.dtype == torch.float32
    torch.testing.assert_close(logdet.double(), logabsdet.view(1), rtol=1e-5, atol=1e-5)
