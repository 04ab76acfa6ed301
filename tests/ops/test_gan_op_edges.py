"""Edge cases of the GAN family's ops found by an adversarial review: a size-1 bias dim whose stride says
nothing (torch calls such a tensor contiguous whatever that stride is), and weights with no elements in
demodulation_coefficients."""

from __future__ import annotations

import importlib

import pytest
import torch

from genkernels.ops import bias_act, demodulation_coefficients
from tests.criterion import assert_criterion
from tests.op_inputs import skip_unsupported

BA = importlib.import_module("genkernels.ops.bias_act")
MC = importlib.import_module("genkernels.ops.modconv")
FAST = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def _size_one_dim(device: torch.device, case: str) -> tuple[torch.Tensor, int]:
    """(x, dim): x contiguous for torch, its size-1 ``dim`` with a stride that does not divide its numel."""
    if case == "as_strided":  # (4, 1, 3) with stride 7 on the size-1 dim
        x = torch.empty_strided((4, 1, 3), (3, 7, 1), device=device)
        x.copy_(torch.randn(4, 1, 3, device=device))
        return x, 1
    # A batch-1 slice of one channel: (1, 1, 6) with strides (30, 6, 1), bias along dim 0.
    return torch.randn(1, 5, 6, device=device)[:, 2:3], 0


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", ["as_strided", "slice"])
@pytest.mark.parametrize("act", ["lrelu", "silu"])
def test_bias_gradient_size_one_dim_any_stride(backend, case, act, device):
    """dbias (and dx, y) along a size-1 dim whose stride exceeds or does not divide x's numel: the fused
    backward tiled memory as rows of C * stride elements and summed none of them (dbias 0, no error)."""
    x, dim = _size_one_dim(device, case)
    assert x.is_contiguous() and x.shape[dim] == 1 and x.numel() % x.stride(dim)
    bias = torch.randn(1, device=device)
    skip_unsupported(backend, BA.OP, x, bias, act=act, dim=dim)
    dy = torch.randn(x.shape, device=device, dtype=torch.float64)
    results = []
    for xx, bb, be in ((x, bias, backend), (x, bias, "reference"), (x.double(), bias.double(), "reference")):
        xx, bb = xx.detach().requires_grad_(True), bb.detach().requires_grad_(True)
        y = bias_act(xx, bb, act=act, dim=dim, backend=be)
        results.append((y, *torch.autograd.grad(y, (xx, bb), dy.to(y.dtype))))
    for i, name in enumerate(("y", "dx", "dbias")):
        assert_criterion(results[0][i], results[1][i], results[2][i], name, relative_floor=name == "dbias")


@pytest.mark.parametrize("backend", ["reference", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("wshape", [(0, 5, 3, 3), (6, 0, 3, 3), (6, 0), (0, 5)], ids=str)
def test_demod_empty_weight(backend, wshape, device):
    """A weight with no output or no input channels: dcoef (N, O) (rsqrt(eps) without inputs) and zero
    gradients of the right shapes, instead of a reshape error."""
    weight = torch.randn(wshape, device=device, requires_grad=True)
    styles = torch.randn(3, wshape[1], device=device, requires_grad=True)
    eps = 1e-4
    dcoef = demodulation_coefficients(weight, styles, eps, backend=backend)
    assert dcoef.shape == (3, wshape[0]) and dcoef.dtype == torch.float32
    torch.testing.assert_close(dcoef, torch.full_like(dcoef, eps**-0.5))
    dw, ds = torch.autograd.grad(dcoef.sum(), (weight, styles), allow_unused=True, materialize_grads=True)
    assert dw.shape == weight.shape and ds.shape == styles.shape
    assert not dw.any() and not ds.any()
    ref = MC.demodulation_coefficients_reference(weight.detach(), styles.detach(), eps)
    torch.testing.assert_close(ref, dcoef.detach())


@pytest.mark.parametrize("case", ["as_strided", "slice"])
def test_cuda_launcher_size_one_dim_stride(case):
    """The cuda launcher's problem for the same tensors is one the extension plans (its host check, run here
    without a GPU, refused x.stride(dim): "n must be a multiple of channels * stride_c")."""
    try:
        import genkernels._C as ext
    except ImportError as e:
        pytest.skip(f"the CUDA extension is not built: {e}")
    from genkernels.cuda import bias_act as cba

    x, dim = _size_one_dim(torch.device("cpu"), case)
    problem = cba._problem(x, torch.zeros(1), "lrelu", 0.2, 1.0, None, dim)
    assert x.numel() % (problem["channels"] * problem["stride_c"]) == 0
    ext.bias_act_grad_bias_plan(16, 16, 16, dtype=0, device=0, **problem)
