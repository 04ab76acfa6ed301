"""GroupNorm (+ SiLU): every backend against the reference under the DESIGN.md criterion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import genkernels
from genkernels._layout import is_channels_last
from genkernels.ops import group_norm, group_norm_reference
from tests.criterion import assert_criterion

FAST = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["reference", *FAST]
# The Triton interpreter mishandles bfloat16: bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]

# (shape, groups): odd channel counts, H*W = 1, 2-D, 3-D and 5-D inputs.
SHAPES = [
    ((2, 15, 4, 4), 3),  # 3 groups x 5 channels
    # H*W = 1, 4 values a group. (With 2, xhat is +-1 whatever x is, dx is eps-driven rounding noise in
    # every implementation, and comparing noise to noise fails the criterion by chance.)
    ((3, 8, 1, 1), 2),
    ((2, 6, 7), 2),  # 3-D
    ((2, 4, 3, 5, 2), 2),  # 5-D
    ((3, 6), 3),  # (N, C)
    ((2, 64, 9, 7), 32),  # many groups, odd spatial size
]
# Large groups take the split-reduction path of the fast backends: (1, 64, 64, 64) by size, the
# others when the `forced` knobs below shrink the single-pass limit and the L2 batches.
SPLIT_SHAPES = [((1, 64, 64, 64), 4), ((2, 12, 33, 31), 3), ((3, 10, 7, 5), 5)]
LAYOUTS = ["contiguous", "channels_last", "strided", "offset"]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and x.dim() >= 3:
        perm = (0, *range(2, x.dim()), 1)
        inv = (0, x.dim() - 1, *range(1, x.dim() - 1))
        return x.permute(perm).contiguous().permute(inv)
    if layout == "strided":  # the first half of a wider tensor: neither layout
        wide = torch.cat([x, torch.zeros_like(x)], dim=-1)
        return wide[..., : x.shape[-1]]
    if layout == "offset":  # contiguous, but the data pointer is not 16-byte aligned
        return torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view(x.shape).copy_(x)
    return x


def _inputs(shape, dtype, device, layout="contiguous", affine=(True, True), scale=1.0, offset=0.0):
    c = shape[1]
    x = (torch.randn(shape, device=device, dtype=torch.float32) * scale + offset).to(dtype)
    w = (torch.randn(c, device=device) * 0.5 + 1).to(dtype) if affine[0] else None
    b = torch.randn(c, device=device).to(dtype) if affine[1] else None
    return _layout(x, layout), w, b


def _skip_unsupported(backend, args):
    if backend == "reference":
        return
    reason = genkernels.explain("group_norm", *args)[backend]
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _run(backend, x, groups, w, b, act, dy=None):
    """Output and input gradients of group_norm on `backend` (reference in x's dtype if None)."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    if backend is None:
        y = group_norm_reference(leaves[0], groups, leaves[1], leaves[2], 1e-5, act)
    else:
        y = group_norm(leaves[0], groups, leaves[1], leaves[2], 1e-5, act, backend=backend)
    grads = [None, None, None]
    if dy is not None:
        grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy.to(y.dtype))
        grads = iter(grads)
        grads = [next(grads) if t is not None else None for t in leaves]
    return y, grads


def _compare(backend, x, groups, w, b, act, check_grads=True):
    dy = torch.randn(x.shape, device=x.device) if check_grads else None
    out, gout = _run(backend, x, groups, w, b, act, dy)
    ref, gref = _run(None, x, groups, w, b, act, dy)
    up = [t.double() if t is not None else None for t in (x, w, b)]
    ref64, g64 = _run(None, up[0], groups, up[1], up[2], act, dy.double() if dy is not None else None)
    assert is_channels_last(out) == is_channels_last(x), "y must keep x's memory layout"
    assert_criterion(out, ref, ref64, "y")
    for name, o, r, r64 in zip(("dx", "dweight", "dbias"), gout, gref, g64):
        if r64 is not None:
            assert_criterion(o, r, r64, name, relative_floor=name != "dx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference(backend, dtype, shape, groups, layout, device):
    x, w, b = _inputs(shape, dtype, device, layout)
    _skip_unsupported(backend, (x, groups, w, b, 1e-5, "silu"))
    _compare(backend, x, groups, w, b, "silu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", SPLIT_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_groups(backend, dtype, shape, groups, layout, device, split_path):
    x, w, b = _inputs(shape, dtype, device, layout)
    _skip_unsupported(backend, (x, groups, w, b, 1e-5, "silu"))
    _compare(backend, x, groups, w, b, "silu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)], ids=str)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_affine_and_activation(backend, dtype, affine, activation, device):
    x, w, b = _inputs((2, 12, 5, 3), dtype, device, "channels_last", affine)
    _skip_unsupported(backend, (x, 4, w, b, 1e-5, activation))
    _compare(backend, x, 4, w, b, activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)], ids=str)
@pytest.mark.parametrize("scale,offset", [(3000.0, 0.0), (10.0, 1e4)], ids=["wide", "offset"])
def test_large_magnitudes(backend, dtype, scale, offset, device):
    """Half-precision inputs near 1e4: the statistics must neither overflow nor cancel."""
    x, w, b = _inputs((2, 16, 8, 8), dtype, device, "contiguous", scale=scale, offset=offset)
    _skip_unsupported(backend, (x, 4, w, b, 1e-5, "silu"))
    _compare(backend, x, 4, w, b, "silu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_weights_with_half_input(backend, device):
    """Mixed precision: parameters kept in float32, activations in float16."""
    x, w, b = _inputs((2, 8, 4, 4), torch.float16, device)
    w, b = w.float(), b.float()
    _skip_unsupported(backend, (x, 4, w, b, 1e-5, "silu"))
    _compare(backend, x, 4, w, b, "silu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 8, 4, 4), (2, 8, 0, 3)], ids=str)
def test_empty(backend, shape, device):
    x, w, b = _inputs(shape, torch.float32, device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = group_norm(x, 4, w, b, activation="silu", backend=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_matches_torch_group_norm(device):
    x, w, b = _inputs((2, 32, 6, 6), torch.float32, device)
    torch.testing.assert_close(group_norm_reference(x, 8, w, b, 1e-6), F.group_norm(x, 8, w, b, 1e-6))
    torch.testing.assert_close(group_norm_reference(x, 8, w, b, activation="silu"), F.silu(F.group_norm(x, 8, w, b)))


def test_reference_double_backward_is_exact():
    x, w, b = _inputs((2, 6, 3, 3), torch.float64, "cpu")
    args = [t.requires_grad_(True) for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda *a: group_norm_reference(a[0], 3, a[1], a[2], activation="silu"), args)


@pytest.mark.parametrize("backend", FAST)
def test_double_backward_is_refused(backend, device):
    """The fused backward is first-order only: asking for more raises instead of dropping terms."""
    x, w, b = _inputs((2, 6, 3, 4), torch.float32, device)
    _skip_unsupported(backend, (x, 3, w, b, 1e-5, "silu"))
    x.requires_grad_(True)
    y = group_norm(x, 3, w, b, activation="silu", backend=backend)
    with pytest.raises(RuntimeError, match=r"genkernels\.ops\.group_norm: the backward is first-order only"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_opcheck(backend, device):
    x, w, b = _inputs((2, 6, 3, 4), torch.float32, device)
    _skip_unsupported(backend, (x, 3, w, b, 1e-5, "silu"))
    x.requires_grad_(True)
    torch.library.opcheck(torch.ops.genkernels.group_norm.default, (x, w, b, 3, 1e-5, True, backend))


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_compile_fullgraph(backend, device):
    """A block of conv + GroupNormSiLU traces without graph breaks and matches eager, gradients too."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, padding=1), genkernels.nn.GroupNormSiLU(4, 8), torch.nn.Conv2d(8, 4, 1)
    ).to(device)
    x = torch.randn(2, 4, 6, 6, device=device)
    _skip_unsupported(backend, (x, 4, None, None, 1e-5, "silu"))
    with genkernels.backend(backend):
        expected = model(x)
        expected.sum().backward()
        grad = model[0].weight.grad.clone()
        model.zero_grad()
        compiled = torch.compile(model, fullgraph=True)
        got = compiled(x)
        got.sum().backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(model[0].weight.grad, grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_empty(backend, device):
    """Empty inputs under torch.compile return empty results (no kernel launch), gradients too."""
    torch._dynamo.reset()
    x = torch.randn(0, 8, 4, 4, device=device, requires_grad=True)
    w = torch.ones(8, device=device, requires_grad=True)
    with genkernels.backend(backend):
        y = torch.compile(lambda x, w: group_norm(x, 4, w, activation="silu"), fullgraph=True)(x, w)
        y.sum().backward()
    assert y.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: (torch.randn(2, 6, 4), 4, None, None), ValueError, "groups=4 must divide the number of channels C=6"),
        (lambda: (torch.randn(2, 6, 4), 3, torch.ones(5), None), ValueError, r"weight must have shape \(6,\)"),
        (lambda: (torch.randn(2, 6, 4), 3, None, torch.ones(6, 1)), ValueError, r"bias must have shape \(6,\)"),
        (lambda: (torch.randn(2, 6, 4), 3, torch.ones(6, device="meta"), None), ValueError, "weight is on meta"),
        (lambda: (torch.ones(2, 6, 4, dtype=torch.int32), 3, None, None), TypeError, "x must be float32.*int32"),
        (lambda: (torch.randn(6), 3, None, None), ValueError, r"at least 2 dimensions .* got shape \(6,\)"),
        (lambda: (torch.randn(2, 6, 4), 0, None, None), ValueError, "groups must be a positive int"),
        (lambda: ([1.0, 2.0], 1, None, None), TypeError, "x must be a torch.Tensor"),
    ],
    ids=["indivisible", "weight-shape", "bias-shape", "device", "int-dtype", "1-d", "zero-groups", "not-tensor"],
)
def test_bad_input(make, error, match):
    x, groups, w, b = make()
    with pytest.raises(error, match=match):
        group_norm(x, groups, w, b)


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -1e-5, True])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
        group_norm(torch.randn(2, 6, 4), 3, eps=eps)


def test_bad_activation():
    with pytest.raises(ValueError, match="activation must be None or 'silu', got 'relu'"):
        group_norm(torch.randn(2, 4, 3), 2, activation="relu")


GPU_SHAPES = [
    ((2, 320, 64, 64), 32),  # the benchmark shapes
    ((2, 1280, 16, 16), 32),
    ((1, 512, 128, 128), 32),
    ((1, 128, 512, 512), 32),
    ((1, 64, 256, 256), 4),  # groups too large for one block's shared memory
    ((1, 32, 257, 255), 2),  # large groups with odd S: the split path without vector loads
    ((2, 36, 17, 19), 6),  # odd S, C not a multiple of 8
    ((1, 2560, 4, 4), 32),  # wide channels
    ((1, 320, 35, 35), 32),  # fp32: the cuda fused kernel's shared memory just above the default 48 KB
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape,groups", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_shapes_gpu(backend, dtype, shape, groups, layout):
    """Realistic sizes on the GPU: the paths the benchmark times, and the tiling edge cases."""
    x, w, b = _inputs(shape, dtype, "cuda", layout)
    _skip_unsupported(backend, (x, groups, w, b, 1e-5, "silu"))
    _compare(backend, x, groups, w, b, "silu")


@pytest.mark.gpu
def test_cuda_graph_capture():
    """No host synchronization inside the op: it records into a CUDA graph and replays correctly."""
    for backend in ("triton", "cuda"):
        x, w, b = _inputs((2, 64, 16, 16), torch.float16, "cuda")
        _skip_unsupported(backend, (x, 32, w, b, 1e-5, "silu"))
        group_norm(x, 32, w, b, activation="silu", backend=backend)  # compile / warm up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = group_norm(x, 32, w, b, activation="silu", backend=backend)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert_criterion(
            y,
            group_norm_reference(x, 32, w, b, activation="silu"),
            group_norm_reference(x.double(), 32, w.double(), b.double(), activation="silu"),
        )


@pytest.mark.parametrize("cls", [genkernels.nn.GroupNorm, genkernels.nn.GroupNormSiLU])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_refuses_another_channel_count(cls, affine):
    """A layer built for 8 channels normalized a 12-channel input without affine parameters (4 groups of 3, not
    of 2: other numbers, no error); with them the error spoke of the weight's shape. Both now name the layer's
    num_channels and x's channels."""
    layer = cls(4, 8, affine=affine, backend="reference")
    with pytest.raises(ValueError, match=r"x has 12 channels \(dim 1\) but this layer has num_channels=8"):
        layer(torch.randn(2, 12, 3, 3))
