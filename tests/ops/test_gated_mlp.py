"""gated_mlp: gelu_tanh and swiglu outputs and gradients of every backend against the reference under the
DESIGN.md criterion (dtypes, layouts, dims, odd sizes, large inputs), gradcheck of the reference, the
formulas against torch's own, torch.library ops under opcheck and torch.compile, and errors."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import genkernels
from genkernels.ops import gelu_tanh, linear_gelu_tanh, swiglu
from tests.criterion import assert_criterion
from tests.op_inputs import skip_unsupported, to_layout

GM = importlib.import_module("genkernels.ops.gated_mlp")
FAST = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["reference", *FAST]
# The Triton interpreter mishandles bfloat16: bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(fn, x, backend, dy):
    """y = fn(x) and dx of sum(y * dy)."""
    x = x.detach().requires_grad_(True)
    y = fn(x, backend)
    (dx,) = torch.autograd.grad(y, x, dy.to(y.dtype))
    return y, dx


def _check(fn, x, backend, y_shape):
    dy = torch.randn(y_shape, device=x.device, dtype=torch.float64)
    out = _grads(fn, x, backend, dy)
    ref = _grads(fn, x, "reference", dy)
    truth = _grads(fn, x.double(), "reference", dy)
    for name, o, r, t in zip(("y", "dx"), out, ref, truth):
        assert_criterion(o, r, t, name)
    return out


def _gelu(x, backend):
    return gelu_tanh(x, backend=backend)


# --------------------------------------------------------------------------- gelu_tanh


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 72), (3, 1000), (1, 1, 1), (7,)])
def test_gelu_tanh_dtypes_and_shapes(backend, dtype, shape, device):
    x = (torch.randn(shape, device=device) * 3).to(dtype)
    skip_unsupported(backend, GM.GELU_OP, x)
    _check(_gelu, x, backend, shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_gelu_tanh_layouts(backend, layout, device):
    x = to_layout((torch.randn(2, 6, 3, 5, device=device) * 3).half(), layout)
    skip_unsupported(backend, GM.GELU_OP, x)
    y, _ = _check(_gelu, x, backend, x.shape)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", FAST)
def test_gelu_tanh_large_inputs(backend, device):
    """Values up to 1e4 (fp16 range) stay finite and accurate: the tails are x and 0."""
    x = torch.randn(4, 33, device=device) * 1e4
    x[0, :5] = torch.tensor([-20.0, -9.0, -4.0, 9.0, 20.0])
    skip_unsupported(backend, GM.GELU_OP, x)
    _check(_gelu, x, backend, x.shape)


def test_gelu_tanh_is_torchs_formula():
    x = torch.randn(64, dtype=torch.float64) * 4
    torch.testing.assert_close(gelu_tanh(x), F.gelu(x, approximate="tanh"), rtol=0, atol=0)
    u = (2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)
    torch.testing.assert_close(gelu_tanh(x), 0.5 * x * (1 + torch.tanh(u)))


def test_gelu_tanh_reference_gradcheck():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True) * 2
    assert torch.autograd.gradcheck(lambda t: gelu_tanh(t, backend="reference"), (x.detach().requires_grad_(),))


# --------------------------------------------------------------------------- swiglu


def _swiglu_fn(dim):
    return lambda x, backend: swiglu(x, dim=dim, backend=backend)


def _half_shape(shape, dim):
    out = list(shape)
    out[dim] //= 2
    return tuple(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, dim", [((2, 5, 144), -1), ((3, 2000), -1), ((1, 1, 2), 2), ((6, 7, 3), 0)])
def test_swiglu_dtypes_and_shapes(backend, dtype, shape, dim, device):
    x = (torch.randn(shape, device=device) * 3).to(dtype)
    skip_unsupported(backend, GM.SWIGLU_OP, x, dim=dim)
    y, _ = _check(_swiglu_fn(dim), x, backend, _half_shape(shape, dim))
    assert y.shape == _half_shape(shape, dim) and y.is_contiguous()


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("layout, dim", [("channels_last", 1), ("strided", -1), ("contiguous", 1)])
def test_swiglu_layouts_and_dims(backend, layout, dim, device):
    """A middle dim (several rows of 2 * M columns) and non-contiguous inputs (copied once)."""
    x = to_layout((torch.randn(2, 6, 3, 10, device=device) * 3).half(), layout)
    skip_unsupported(backend, GM.SWIGLU_OP, x, dim=dim)
    _check(_swiglu_fn(dim), x, backend, _half_shape(x.shape, dim))


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_large_inputs(backend, device):
    x = torch.randn(3, 66, device=device) * 1e4
    skip_unsupported(backend, GM.SWIGLU_OP, x)
    y, dx = _check(_swiglu_fn(-1), x, backend, (3, 33))
    assert torch.isfinite(dx).all()


def test_swiglu_is_silu_times_gate():
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(swiglu(x), F.silu(x[:, :5]) * x[:, 5:], rtol=0, atol=0)
    torch.testing.assert_close(swiglu(x, dim=0), F.silu(x[:2]) * x[2:], rtol=0, atol=0)


def test_swiglu_reference_gradcheck():
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    for dim in (-1, 1):
        assert torch.autograd.gradcheck(lambda t: swiglu(t, dim=dim, backend="reference"), (x,))
        assert torch.autograd.gradgradcheck(lambda t: swiglu(t, dim=dim, backend="reference"), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend, device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    assert swiglu(x, backend=backend).shape == (0, 4)
    assert gelu_tanh(x, backend=backend).shape == (0, 8)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x: swiglu(x[:, :5]), ValueError, r"x.shape\[dim\] must be even"),
        (lambda x: swiglu(x, dim=2), ValueError, "dim must be an int in"),
        (lambda x: swiglu(x, dim=True), ValueError, "dim must be an int in"),
        (lambda x: swiglu(x[0, 0]), ValueError, "at least one dimension"),
        (lambda x: swiglu(x.long()), TypeError, "x must be float32"),
        (lambda x: gelu_tanh(x.int()), TypeError, "x must be float32"),
        (lambda x: gelu_tanh([1.0]), TypeError, "x must be a torch.Tensor"),
        (lambda x: gelu_tanh(x, backend="cuda"), Exception, "cuda"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 8))


def _second_order(fn, x, backend, dy, v):
    """y, dx of sum(y * dy), and the gradients of sum(dx * v) w.r.t. x and dy (the double backward)."""
    x = x.detach().requires_grad_(True)
    dy = dy.to(x.dtype).requires_grad_(True)
    y = fn(x, backend)
    (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    ddx, ddy = torch.autograd.grad((dx.double() * v).sum(), (x, dy))
    return y, dx, ddx, ddy


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("op", ["gelu_tanh", "swiglu"])
def test_double_backward(backend, op, device):
    x = torch.randn(3, 2, 10, device=device) * 2
    skip_unsupported(backend, op, x)
    fn = _gelu if op == "gelu_tanh" else _swiglu_fn(-1)
    y_shape = x.shape if op == "gelu_tanh" else (3, 2, 5)
    dy = torch.randn(y_shape, device=device, dtype=torch.float64)
    v = torch.randn(x.shape, device=device, dtype=torch.float64)
    out = _second_order(fn, x, backend, dy, v)
    ref = _second_order(fn, x, "reference", dy, v)
    truth = _second_order(fn, x.double(), "reference", dy, v)
    for name, o, r, t in zip(("y", "dx", "ddx", "ddy"), out, ref, truth):
        assert_criterion(o, r, t, name, relative_floor=name in ("ddx", "ddy"))


def test_second_derivative_expressions():
    """The torch expressions of the second derivatives equal torch autograd's own, in float64."""
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    ddx = torch.randn(2, 6, dtype=torch.float64)
    (gx,) = torch.autograd.grad(gelu_tanh(x), x, dy, create_graph=True)
    want = torch.autograd.grad((gx * ddx).sum(), (x, dy))
    got = (GM._gelu_second(ddx, dy, x), GM._gelu_grad_reference(ddx, x))
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w)
    dy3 = dy[:, :3].detach().requires_grad_(True)
    (gx,) = torch.autograd.grad(swiglu(x), x, dy3, create_graph=True)
    want = torch.autograd.grad((gx * ddx).sum(), (x, dy3))
    ddy, dxx = GM._swiglu_second(ddx, dy3, x, 1, True, True)
    torch.testing.assert_close(dxx, want[0])
    torch.testing.assert_close(ddy, want[1])


# --------------------------------------------------------------------------- linear_gelu_tanh


def _linear_inputs(device, dtype, bias=True, hidden=40):
    x = torch.randn(2, 5, 72, device=device).to(dtype)
    w = (torch.randn(hidden, 72, device=device) / 72**0.5).to(dtype)
    b = torch.randn(hidden, device=device).to(dtype) if bias else None
    return x, w, b


def _linear_gelu(inputs, backend, grad):
    """y = linear_gelu_tanh(x, w, b) and, with ``grad``, the gradients of sum(y * dy) for x, w and b."""
    leaves = [t.detach().requires_grad_(grad) if t is not None else None for t in inputs]
    y = linear_gelu_tanh(*leaves, backend=backend)
    if not grad:
        return (y,)
    dy = torch.ones_like(y) + torch.arange(y.numel(), device=y.device).view(y.shape).to(y.dtype).sin()
    wrt = [t for t in leaves if t is not None]
    return (y, *torch.autograd.grad(y, wrt, dy))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gelu_tanh(backend, bias, device):
    """Outputs and gradients of x, weight and bias against the reference (F.linear, then gelu_tanh)."""
    inputs = _linear_inputs(device, torch.float32, bias)
    skip_unsupported(backend, GM.GELU_OP, inputs[0])
    out = _linear_gelu(inputs, backend, True)
    ref = _linear_gelu(inputs, "reference", True)
    truth = _linear_gelu([t.double() if t is not None else None for t in inputs], "reference", True)
    for name, o, r, t in zip(("y", "dx", "dweight", "dbias"), out, ref, truth):
        assert_criterion(o, r, t, name, relative_floor=name != "y")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_linear_gelu_tanh_cuda_epilogue(dtype):
    """On CUDA without autograd a 16-bit call is the cuBLASLt GELU epilogue (the tanh approximation, as
    gelu_tanh), a float32 one F.linear then gelu_tanh; either within the criterion of F.linear then gelu_tanh
    in float64; with autograd, the gradients path."""
    inputs = _linear_inputs("cuda", dtype, hidden=4608)
    assert GM.gelu_epilogue(*inputs) == (dtype != torch.float32)
    with torch.no_grad():
        out = _linear_gelu(inputs, None, False)
    ref = _linear_gelu(inputs, "reference", False)
    truth = _linear_gelu([t.double() for t in inputs], "reference", False)
    assert_criterion(out[0], ref[0], truth[0], "y")
    assert not GM.gelu_epilogue(*[t.requires_grad_(True) for t in inputs])


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops a call runs (inside a FakeTensorMode: fake CUDA tensors on a machine without one)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func._schema.name, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def test_linear_gelu_tanh_epilogue_dispatch():
    """Which path a call takes: on (fake) CUDA tensors without autograd in auto mode, one aten call,
    _addmm_activation(bias, x, weight.T, use_gelu=True), and nothing else that reads the (10, 4608) output;
    F.linear then gelu_tanh when a gradient is needed, a backend is asked for, there is no bias, the dtypes
    differ or are float32 or float64. On CPU never (its _addmm_activation applies the exact erf GELU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w, b = _linear_inputs("cuda", torch.bfloat16, hidden=4608)
        assert GM.gelu_epilogue(x, w, b)
        ops = _Ops()
        with torch.no_grad(), ops:
            y = linear_gelu_tanh(x, w.requires_grad_(True), b)
        names = [name for name, _, _ in ops.calls]
        assert names.count("aten::_addmm_activation") == 1
        ((args, kwargs),) = [(a, k) for name, a, k in ops.calls if name == "aten::_addmm_activation"]
        assert args[0] is b and args[1].shape == (10, 72) and args[2].shape == (72, 4608)
        assert kwargs.get("use_gelu") is True
        assert not any("gelu" in name or "genkernels" in name for name in names)
        assert y.shape == (2, 5, 4608) and y.dtype == torch.bfloat16 and y.is_cuda
        assert not GM.gelu_epilogue(x, w, b)  # w requires grad, autograd on
        with torch.no_grad():
            assert GM.gelu_epilogue(x, w, b)
        w.requires_grad_(False)
        assert not GM.gelu_epilogue(x, w, b, backend="triton")
        assert GM.gelu_epilogue(x, w, b, backend="auto")
        with genkernels.backend("cuda"):
            assert not GM.gelu_epilogue(x, w, b)
        assert not GM.gelu_epilogue(x, w, None)
        assert not GM.gelu_epilogue(x, w, b.float())
        assert not GM.gelu_epilogue(x.double(), w.double(), b.double())
        assert not GM.gelu_epilogue(x.float(), w.float(), b.float())  # float32: the accurate path
        assert not GM.gelu_epilogue(torch.empty(0, 72, device="cuda", dtype=torch.bfloat16), w, b)
    cpu = _linear_inputs("cpu", torch.float32)
    assert not GM.gelu_epilogue(*cpu)
    meta = [t.to("meta", torch.bfloat16) for t in cpu]
    assert GM.gelu_epilogue(*meta) and linear_gelu_tanh(*meta).shape == (2, 5, 40)


def test_linear_gelu_tanh_compiles_fullgraph_on_the_epilogue_device():
    """Under torch.compile the call traces without graph breaks on a device that takes the epilogue eagerly
    (meta here): the decision reads no backend scope at trace time, and the traced path is F.linear then the
    genkernels::gelu_tanh op."""
    torch._dynamo.reset()
    x, w, b = (t.to("meta") for t in _linear_inputs("cpu", torch.float32))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    y = torch.compile(linear_gelu_tanh, fullgraph=True, backend=backend)(x, w, b)
    assert y.shape == (2, 5, 40) and y.device.type == "meta"
    (gm,) = graphs
    targets = {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}
    assert "genkernels.gelu_tanh.default" in targets and not any("addmm_activation" in t for t in targets)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(2, 8), torch.randn(8), None), r"weight must be 2-D"),
        ((torch.randn(2, 7), torch.randn(4, 8), None), r"in_features = weight.shape\[1\] = 8 .* got shape \(2, 7\)"),
        ((torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)), r"bias must have shape \(4,\)"),
        ((torch.randn(2, 8), [1.0], None), "weight must be a torch.Tensor"),
    ],
)
def test_linear_gelu_tanh_bad_input(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        linear_gelu_tanh(*args)


# --------------------------------------------------------------------------- torch.library ops and compile


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    x = torch.randn(2, 4, 3, 6, device=device).to(memory_format=torch.channels_last).requires_grad_(True)
    skip_unsupported(backend, GM.GELU_OP, x)
    torch.library.opcheck(torch.ops.genkernels.gelu_tanh.default, (x, backend))
    dy = torch.randn_like(x).requires_grad_(True)
    torch.library.opcheck(torch.ops.genkernels.gelu_tanh_grad.default, (dy, x, backend))
    torch.library.opcheck(torch.ops.genkernels.swiglu.default, (x, 3, backend))
    torch.library.opcheck(torch.ops.genkernels.swiglu.default, (x, 1, backend))
    dy = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.genkernels.swiglu_grad.default, (dy, x, 3, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, device):
    """Forward and backward trace without graph breaks and match the eager call."""
    torch._dynamo.reset()
    x = torch.randn(2, 5, 12, device=device)
    skip_unsupported(backend, GM.SWIGLU_OP, x)

    def fn(x):
        return gelu_tanh(swiglu(x, backend=backend), backend=backend)

    leaf = x.detach().requires_grad_(True)
    y = fn(leaf)
    (grad,) = torch.autograd.grad((y * y).sum(), leaf)
    cleaf = x.detach().requires_grad_(True)
    cy = torch.compile(fn, fullgraph=True)(cleaf)
    (cgrad,) = torch.autograd.grad((cy * cy).sum(), cleaf)
    torch.testing.assert_close(cy, y)
    torch.testing.assert_close(cgrad, grad)
