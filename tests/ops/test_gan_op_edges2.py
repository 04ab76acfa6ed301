"""Edge cases of the GAN family's ops: bias_act at non-finite inputs and gradients against torch's autograd of
the same composition (every backend and its kernels: forward, backward and double backward)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from genkernels.ops import bias_act

BA = importlib.import_module("genkernels.ops.bias_act")
NAN, INF = float("nan"), float("inf")


class _XKernels(BA._ReferenceKernels):
    """The reference kernels without gradient codes: the backward reads x."""

    CODE_ACTS = ()


def _torch_bias_act(x, bias, act, alpha, gain, clamp):
    """clamp(act(x + bias) * gain) in torch's own functions: the composition whose autograd is the specification."""
    z = x + bias.view(1, -1, 1)
    fn = {
        "linear": lambda t: t,
        "relu": F.relu,
        "lrelu": lambda t: F.leaky_relu(t, alpha),
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "silu": F.silu,
        "gelu": F.gelu,
    }[act]
    y = fn(z) * gain
    return y if clamp is None else y.clamp(-clamp, clamp)


# Each way of running the op: the public op on a fast backend (float32), the fast backends' autograd on the
# reference kernels from x or from the gradient codes (float64: the reference's own arithmetic), and the traced op.
WAYS = ["triton", pytest.param("cuda", marks=pytest.mark.gpu), "kernels", "codes", "traced-reference", "traced-triton"]


def _device(way: str) -> torch.device:
    """Where a way runs: the triton ways on the GPU when there is one (the interpreter runs them on the CPU)."""
    gpu = way == "cuda" or (way.endswith("triton") and torch.cuda.is_available())
    return torch.device("cuda" if gpu else "cpu")


def _runner(way, act, alpha, gain, clamp):
    """(fn(x, bias) -> y, dtype) for one way of running bias_act."""
    if way in ("triton", "cuda"):
        return (lambda x, b: bias_act(x, b, act=act, alpha=alpha, gain=gain, clamp=clamp, backend=way)), torch.float32
    if way in ("kernels", "codes"):
        impl = _XKernels if way == "kernels" else BA._ReferenceKernels
        args = (act, alpha, gain, clamp, 1, impl)
        return (lambda x, b: BA._autograd.apply(BA._BiasActFunction, x, b, *args)), torch.float64
    backend = way.split("-")[1]
    args = (act, alpha, gain, clamp is not None, clamp or 0.0, 1, backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    return (lambda x, b: torch.ops.genkernels.bias_act(x, b.float(), *args)), dtype


def _orders(fn, x, bias, dy, v, w):
    """[y, dx, dbias, then the gradients of sum(dx v) + sum(dbias w) in x, bias and dy]."""
    x, bias, dy = (t.detach().requires_grad_(True) for t in (x, bias, dy))
    y = fn(x, bias)
    dx, db = torch.autograd.grad(y, (x, bias), dy.to(y.dtype), create_graph=True)
    penalty = (dx.double() * v).sum() + (db.double() * w).sum()
    second = torch.autograd.grad(penalty, (x, bias, dy), allow_unused=True, materialize_grads=True)
    return [y, dx, db, *second]


def _assert_same(got, want, name):
    """NaN where torch has NaN, the same infinities, and the finite values close (float32 arithmetic)."""
    got, want = got.detach().double(), want.detach()
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN at {got.isnan().nonzero().tolist()}, torch at " + (
        f"{want.isnan().nonzero().tolist()}\n{got}\n{want}"
    )
    scale = max(1.0, want.nan_to_num(0, 0, 0).abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, equal_nan=True)


def _special_x(dtype):
    """(x (2, 4, 5), bias (4,)): random values with NaN, +inf and -inf in x, and z = x + bias = 0 exactly at
    a few elements."""
    x = torch.randn(2, 4, 5, dtype=torch.float64) * 2
    bias = torch.randn(4).double()  # exact in float32: the traced op reads a float32 bias
    x[0, 0, 0] = x[1, 2, 3] = NAN
    x[0, 1, 2] = INF
    x[1, 3, 0] = -INF
    for n, c, s in ((0, 2, 1), (1, 1, 4)):
        x[n, c, s] = -bias[c]
    return x.to(dtype), bias.to(dtype)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("clamp", [None, 0.8])
@pytest.mark.parametrize("act", BA.ACTS)
def test_nonfinite_x_matches_torch_autograd(way, act, clamp):
    """Where z = x + bias is NaN or infinite, y, dx, dbias and the double backward are torch's autograd of
    clamp(act(z) * gain): relu passes the gradient at NaN (threshold_backward stops it where relu(z) <= 0, false
    for NaN; the kernels gave 0), and with a clamp an activation whose derivative is NaN there keeps dz NaN
    (torch multiplies the clamp's zero gradient by it; the kernels gave 0)."""
    alpha, gain = 0.2, BA.DEFAULT_GAIN.get(act, 1.0)
    fn, dtype = _runner(way, act, alpha, gain, clamp)
    if way == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = _device(way)
    x, bias = _special_x(dtype)
    g = torch.Generator().manual_seed(3)
    dy, v = (torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(bias.shape, generator=g, dtype=torch.float64)
    got = _orders(fn, *(t.to(device) for t in (x, bias, dy, v, w)))
    want = _orders(lambda x, b: _torch_bias_act(x, b, act, alpha, gain, clamp), x.double(), bias.double(), dy, v, w)
    for name, o, t in zip(("y", "dx", "dbias", "ddx", "ddbias", "ddy"), got, want):
        _assert_same(o.cpu(), t, name)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("clamp", [None, 0.8])
@pytest.mark.parametrize("act", ["relu", "lrelu", "linear", "silu"])
def test_nonfinite_dy_matches_torch_autograd(way, act, clamp):
    """A NaN or infinite incoming gradient: relu's derivative is a select (0 where z <= 0, whatever dy), so dx
    and dbias stay finite there as in torch (the kernels multiplied dy by 0, giving NaN); elsewhere NaN spreads
    as in torch."""
    alpha, gain = 0.2, BA.DEFAULT_GAIN.get(act, 1.0)
    fn, dtype = _runner(way, act, alpha, gain, clamp)
    if way == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = _device(way)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    x[:, 0] = -x[:, 0].abs() - 0.5  # channel 0: z < 0 (the bias is 0 there)
    x[0, 1, 1] = 0.0  # z = 0
    x, bias = x.to(dtype), torch.cat([torch.zeros(1), torch.randn(3)]).to(dtype)
    bias[1] = 0.0
    dy = torch.randn(x.shape, dtype=torch.float64)
    dy[0, 0, 1], dy[1, 0, 3], dy[0, 1, 1] = NAN, INF, -INF
    xx, bb, dd = x.to(device).requires_grad_(True), bias.to(device).requires_grad_(True), dy.to(device)
    y = fn(xx, bb)
    got = (y, *torch.autograd.grad(y, (xx, bb), dd.to(y.dtype)))
    xr, br = x.double().requires_grad_(True), bias.double().requires_grad_(True)
    yr = _torch_bias_act(xr, br, act, alpha, gain, clamp)
    want = (yr, *torch.autograd.grad(yr, (xr, br), dy))
    for name, o, t in zip(("y", "dx", "dbias"), got, want):
        _assert_same(o.cpu(), t.detach(), name)


def test_relu_gradient_code_at_nan():
    """The gradient code's slope bit of relu is set at a NaN z (the gradient passes, as torch's), lrelu's clear
    (alpha, as torch's leaky_relu_backward: z > 0 is false)."""
    x = torch.tensor([NAN, 1.0, -1.0, 0.0]).view(1, 1, 4)
    _, relu = BA._reference_forward_codes(x, None, "relu", 0.2, 1.0, None, 1)
    _, lrelu = BA._reference_forward_codes(x, None, "lrelu", 0.2, 1.0, None, 1)
    assert relu.tolist() == [3 | 3 << 2 | 2 << 4 | 2 << 6, 0]
    assert lrelu.tolist() == [2 | 3 << 2 | 2 << 4 | 2 << 6, 0]
    assert math.isnan(bias_act(x, act="relu", backend="reference").view(-1)[0])


@pytest.mark.parametrize("backend", ["reference", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("grouped", [False, True])
def test_fp16_upsampling_clamped_modulated_conv(backend, grouped):
    """ModulatedConv2d in float16 with up=True and a clamp that bites, grouped or not: the output and every
    gradient within 1% (of the largest value) of the float64 eager formulation, the loss weighting no element
    within 0.01 of the clamp or of lrelu's kink. There the gradient jumps, and float16's rounding of the
    convolution's output moves an element across: one such element gives an x gradient some 5% off, on every
    path alike (the float16 eager formulation too; float32 is 1e-7 off)."""
    from genkernels.nn import ModulatedConv2d

    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = _device(backend)  # triton on the GPU when there is one
    spec = dict(in_channels=6, out_channels=5, kernel_size=3, w_dim=4, up=True, resolution=8, conv_clamp=0.5)
    layer = ModulatedConv2d(**spec, grouped=grouped, backend=backend)
    with torch.no_grad():
        layer.bias.normal_()
        layer.noise_strength.fill_(0.7)
        layer.affine.bias.add_(torch.randn_like(layer.affine.bias) * 0.3)
    truth = ModulatedConv2d(**spec, torch_layers=True).double()
    truth.load_state_dict(layer.state_dict())
    x, w = torch.randn(3, 6, 4, 4) * 2, torch.randn(3, 4)
    truth.conv_clamp = None
    with torch.no_grad():
        unclamped = truth(x.double(), w.double(), "const")
    truth.conv_clamp = spec["conv_clamp"]
    weights = torch.linspace(-1, 1, unclamped.numel(), dtype=torch.float64).view_as(unclamped)
    weights[((unclamped.abs() - 0.5).abs() < 0.01) | (unclamped.abs() < 0.01)] = 0.0

    def run(module, x, w):
        x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        out = module(x, w, "const")
        (out * weights.to(out.device, out.dtype)).sum().backward()
        return {"out": out, "x": x.grad, "w": w.grad, **{n: p.grad for n, p in module.named_parameters()}}

    got = run(layer.to(device), x.half().to(device), w.half().to(device))
    want = run(truth, x.double(), w.double())
    assert got["out"].dtype == torch.float16 and (want["out"].abs() >= 0.5).float().mean() > 0.2  # the clamp bites
    for name, t in want.items():
        err = (got[name].detach().double().cpu() - t).abs().max().item()
        assert err <= 0.01 * t.abs().max().item(), f"{name}: max error {err:.3g}, largest value {t.abs().max():.3g}"
