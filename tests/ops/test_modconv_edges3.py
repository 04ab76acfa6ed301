"""Edge cases of StyleGAN2's modulated convolution: ModulatedConv2d against StyleGAN2-ADA's modulated_conv2d
formulation (float16 headroom, grouped and shared paths, the eager twin), the demodulation op at its limits,
and EqualizedLinear."""

from __future__ import annotations

import copy

import pytest
import torch

from genkernels.nn import EqualizedLinear, ModulatedConv2d
from genkernels.ops import demodulation_coefficients

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["reference", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def _device(backend: str) -> torch.device:
    """Where ``backend`` runs: the fast backends on the GPU when there is one (triton takes CPU tensors only under
    TRITON_INTERPRET, which is set without a GPU), the reference on the CPU."""
    return torch.device("cuda" if backend != "reference" and torch.cuda.is_available() else "cpu")


def _layer_grads(layer, x, w, weights, call=None):
    """(out, grads of x, w and every parameter) of sum(layer(x, w) * weights), the layer run through ``call``
    (a compiled layer, say) when given."""
    x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = (layer if call is None else call)(x, w, "const")
    (out * weights.to(out.device, out.dtype)).sum().backward()
    return {"out": out, "x": x.grad, "w": w.grad, **{n: p.grad for n, p in layer.named_parameters()}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["shared", "grouped", "torch_layers"])
def test_fp16_large_styles_do_not_overflow(backend, path):
    """StyleGAN2-ADA's modulated_conv2d pre-normalizes weight and styles in float16 with demodulation, so that
    x * styles and the convolution keep within float16's range: activations near conv_clamp (256) and styles
    of a few hundred give x * s beyond 65504. Every path of the layer computes the float64 function there,
    output and gradients (within 1% of the largest value), instead of inf / NaN."""
    device = _device(backend)
    spec = dict(in_channels=8, out_channels=6, kernel_size=3, w_dim=4, resolution=5)
    layer = ModulatedConv2d(**spec, backend=backend, grouped=path == "grouped", torch_layers=path == "torch_layers")
    with torch.no_grad():
        layer.bias.normal_()
        layer.noise_strength.fill_(0.5)
        layer.affine.bias.fill_(300.0)
        layer.affine.bias[::2] = -200.0
    truth = copy.deepcopy(layer).double()
    truth.grouped, truth.torch_layers, truth.affine.torch_layers, truth.backend = False, True, True, "reference"
    x = torch.randn(3, 8, 5, 5) * 100
    w = torch.randn(3, 4)
    weights = torch.linspace(-1, 1, 3 * 6 * 25, dtype=torch.float64).view(3, 6, 5, 5)
    want = _layer_grads(truth, x.double(), w.double(), weights)
    got = _layer_grads(layer.half().to(device), x.half().to(device), w.half().to(device), weights)
    assert got["out"].dtype == torch.float16
    for name, t in want.items():
        g = got[name].detach().double().cpu()
        assert torch.isfinite(g).all(), f"{name}: non-finite values in float16"
        err = (g - t).abs().max().item()
        assert err <= 0.01 * t.abs().max().item(), f"{name}: max error {err:.3g}, largest value {t.abs().max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_demod_reference_under_autocast_is_float32(dtype):
    """The reference forms s^2 @ W2 with a matrix product, which autocast ran in float16 / bfloat16: styles of
    300 overflowed float16 (dcoef 0) and bfloat16 kept 3 digits. Under autocast dcoef and both gradients are
    the float32 ones."""
    weight, styles = torch.randn(6, 5, 3, 3) * 0.3, torch.randn(3, 5) * 100 + 300
    g = torch.randn(3, 6)

    def run(autocast):
        wl, sl = weight.clone().requires_grad_(True), styles.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            dcoef = demodulation_coefficients(wl, sl, backend="reference")
        return [dcoef, *torch.autograd.grad(dcoef, (wl, sl), g)]

    want, got = run(False), run(True)
    for name, o, r in zip(("dcoef", "dweight", "dstyles"), got, want):
        assert o.dtype == torch.float32, name
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-7 * r.abs().max().item(), msg=name)


@pytest.mark.parametrize("path", ["shared", "torch_layers"])
def test_fp16_autocast_large_styles_do_not_overflow(path):
    """Under a float16 autocast a float32 x reaches the convolution as float16 (x * s cast there): the layer
    takes the same float16 headroom as for a float16 x, and computes the float64 function (output within 1%
    of its largest value) instead of inf / NaN."""
    layer = ModulatedConv2d(8, 6, 3, 4, resolution=5, backend="reference", torch_layers=path == "torch_layers")
    with torch.no_grad():
        layer.noise_strength.fill_(0.5)
        layer.affine.bias.fill_(300.0)
    truth = copy.deepcopy(layer).double()
    x, w = torch.randn(3, 8, 5, 5) * 100, torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.float16):
        out = layer(x, w, "const")
    assert torch.isfinite(out).all()
    want = truth(x.double(), w.double(), "const")
    err = (out.double() - want).abs().max().item()
    assert err <= 0.01 * want.abs().max().item(), f"max error {err:.3g}, largest value {want.abs().max():.3g}"


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("path", ["shared", "grouped", "torch_layers"])
def test_zero_styles(backend, path):
    """Styles of zero (an all-zero affine): dcoef = rsqrt(eps), the convolution gives 0 and the output is the
    epilogue of noise and bias; the gradients (those of the affine are large, 1e4 = rsqrt(1e-8) times the
    usual) meet the criterion against the float64 eager formulation on every path."""
    from tests.criterion import assert_criterion

    layer = ModulatedConv2d(5, 4, 3, 3, resolution=4, act="tanh", backend=backend, grouped=path == "grouped")
    layer.torch_layers = layer.affine.torch_layers = path == "torch_layers"
    with torch.no_grad():
        layer.bias.normal_()
        layer.noise_strength.fill_(0.5)
        layer.affine.weight.zero_()
        layer.affine.bias.zero_()
    eager = copy.deepcopy(layer)
    eager.grouped, eager.torch_layers, eager.affine.torch_layers, eager.backend = False, True, True, "reference"
    x, w = torch.randn(2, 5, 4, 4), torch.randn(2, 3)
    weights = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    want = _layer_grads(copy.deepcopy(eager).double(), x.double(), w.double(), weights)
    device = _device(backend)
    x, w = x.to(device), w.to(device)
    ref = _layer_grads(eager.to(device), x, w, weights)
    got = _layer_grads(layer.to(device), x, w, weights)
    z = layer.noise_const * 0.5 + layer.bias.detach()[None, :, None, None]
    torch.testing.assert_close(got["out"].detach(), torch.tanh(z).expand(2, -1, -1, -1))
    for name, t in want.items():
        assert_criterion(got[name], ref[name], t, name, relative_floor=name != "out")


def test_fp16_layer_compiles_fullgraph():
    """The float16 layer (its headroom scaling included) traces in one graph, forward and backward, and computes
    the float64 function within 1% of the largest value."""
    torch._dynamo.reset()
    layer = ModulatedConv2d(4, 3, 3, 2, resolution=4, backend="reference")
    with torch.no_grad():
        layer.noise_strength.fill_(0.5)
    truth = copy.deepcopy(layer).double()
    x, w = torch.randn(2, 4, 4, 4), torch.randn(2, 2)
    weights = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    want = _layer_grads(truth, x.double(), w.double(), weights)
    layer.half()
    got = _layer_grads(layer, x.half(), w.half(), weights, torch.compile(layer, fullgraph=True))
    for name, t in want.items():
        err = (got[name].detach().double() - t).abs().max().item()
        assert err <= 0.01 * t.abs().max().item(), f"{name}: max error {err:.3g}, largest value {t.abs().max():.3g}"


def test_equalized_linear_refuses_integer_x_and_bad_bias_init():
    """An integer x was run with the weights cast to integers (all zeros for act='linear': a wrong result, no
    error); a bias_init that is not a finite number is refused by name."""
    fc = EqualizedLinear(4, 3)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        fc(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 4\) \(in_features last\), got \(2, 5\)"):
        fc(torch.ones(2, 5))
    for bad in (None, "1", float("nan"), float("inf")):
        with pytest.raises(ValueError, match="bias_init must be a finite number, got"):
            EqualizedLinear(4, 3, bias_init=bad)
    layer = ModulatedConv2d(3, 4, 3, 5)
    with pytest.raises(TypeError, match="w must be a floating-point tensor, got torch.int64"):
        layer(torch.randn(2, 3, 6, 6), torch.ones(2, 5, dtype=torch.int64))


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_demod_double_backward(backend):
    """A create_graph backward of the fused demodulation runs the formulas in torch ops: the second-order
    gradients of weight and styles (through both first-order gradients) are the reference's."""
    device = _device(backend)
    weight, styles = torch.randn(6, 5, 3, 3, device=device), torch.randn(3, 5, device=device) + 1
    c = torch.randn(3, 6, device=device)

    def second(be):
        wl, sl = weight.detach().requires_grad_(True), styles.detach().requires_grad_(True)
        dcoef = demodulation_coefficients(wl, sl, backend=be)
        gw, gs = torch.autograd.grad((dcoef * c).sum(), (wl, sl), create_graph=True)
        return torch.autograd.grad(gw.square().sum() + (gs * sl).sum(), (wl, sl))

    for o, r in zip(second(backend), second("reference")):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("path", ["shared", "grouped"])
def test_path_length_second_order(backend, path):
    """StyleGAN2's path-length regularization differentiates the layer twice (the gradient of sum(out * noise)
    with respect to w, with create_graph, then its squared norm): every parameter's gradient meets the
    criterion against the float64 eager formulation."""
    from tests.criterion import assert_criterion

    layer = ModulatedConv2d(5, 4, 3, 3, resolution=4, act="tanh", backend=backend, grouped=path == "grouped")
    with torch.no_grad():
        layer.bias.normal_()
        layer.noise_strength.fill_(0.5)
    eager = copy.deepcopy(layer)
    eager.grouped, eager.torch_layers, eager.affine.torch_layers, eager.backend = False, True, True, "reference"
    x, w = torch.randn(3, 5, 4, 4), torch.randn(3, 3)
    pl_noise = torch.randn(3, 4, 4, 4, dtype=torch.float64)

    def run(module, x, w):
        module.zero_grad(set_to_none=True)
        w = w.detach().requires_grad_(True)
        out = module(x, w, "const")
        (gw,) = torch.autograd.grad((out * pl_noise.to(out.device, out.dtype)).sum(), w, create_graph=True)
        gw.square().sum().backward()
        return {n: p.grad for n, p in module.named_parameters()}

    want = run(copy.deepcopy(eager).double(), x.double(), w.double())
    device = _device(backend)
    x, w = x.to(device), w.to(device)
    ref, got = run(eager.to(device), x, w), run(layer.to(device), x, w)
    for name, t in want.items():
        assert_criterion(got[name], ref[name], t, name, relative_floor=True)
