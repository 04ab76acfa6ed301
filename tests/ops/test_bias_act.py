"""bias_act: outputs, gradients and second-order gradients of every backend against the reference under
the DESIGN.md criterion (every activation, bias and clamp, layouts, dims, odd sizes), gradgradcheck of the
reference, defaults, large inputs and errors."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from genkernels.cuda import bias_act as cba
from genkernels.ops import bias_act
from tests.criterion import assert_criterion
from tests.op_inputs import skip_unsupported, to_layout

# The module, which genkernels.ops' function of the same name shadows as an attribute.
BA = importlib.import_module("genkernels.ops.bias_act")
FAST = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["reference", *FAST]
# The Triton interpreter mishandles bfloat16: bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
ACTS = BA.ACTS


def _inputs(shape, dtype, device, layout="contiguous", dim=1, scale=2.0):
    x = to_layout((torch.randn(shape, device=device) * scale).to(dtype), layout)
    return x, torch.randn(shape[dim], device=device)


def _run(x, bias, backend, order, **kwargs):
    """y and, for order >= 1, dx and dbias of sum(y * dy); for order 2 also the gradients of
    sum(dx * v) + sum(dbias * w) w.r.t. x, bias and dy (the double backward)."""
    torch.manual_seed(1234)
    dy = torch.randn(x.shape, device=x.device, dtype=torch.float64)
    v = torch.randn(x.shape, device=x.device, dtype=torch.float64)
    w = torch.randn(bias.shape, device=x.device, dtype=torch.float64)
    x = x.detach().requires_grad_(order > 0)
    bias = bias.detach().requires_grad_(order > 0)
    dy_leaf = dy.to(x.dtype).requires_grad_(order > 1)
    y = bias_act(x, bias, backend=backend, **kwargs)
    if order == 0:
        return [y]
    dx, db = torch.autograd.grad(y, (x, bias), dy_leaf, create_graph=order > 1)
    if order == 1:
        return [y, dx, db]
    second = torch.autograd.grad(
        (dx.double() * v).sum() + (db.double() * w).sum(), (x, bias, dy_leaf), allow_unused=True
    )
    second = [torch.zeros_like(t) if g is None else g for g, t in zip(second, (x, bias, dy_leaf))]
    return [y, dx, db, *second]


NAMES = ("y", "dx", "dbias", "ddx", "ddbias", "ddy")


def _check(backend, x, bias, order=1, **kwargs):
    out = _run(x, bias, backend, order, **kwargs)
    ref = _run(x, bias, "reference", order, **kwargs)
    truth = _run(x.double(), bias.double(), "reference", order, **kwargs)
    for name, o, r, t in zip(NAMES, out, ref, truth):
        if o.dtype == torch.float64 and x.dtype != torch.float64:
            # A float64 bias's gradients, computed in float32 (the op's arithmetic for such x) and returned in
            # the bias's dtype: judged at float32, the precision they are computed in.
            o, r = o.float(), r.float()
        # Sums over the batch and positions (dbias and its second-order terms) scale the floor.
        assert_criterion(o, r, t, name, relative_floor=name in ("dbias", "ddbias", "ddx", "ddy"))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_acts_and_dtypes(backend, dtype, act, device):
    x, bias = _inputs((2, 6, 5, 7), dtype, device)
    skip_unsupported(backend, BA.OP, x, bias, act=act)
    _check(backend, x, bias, act=act)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("clamp", [None, 0.7])
def test_layouts_and_clamp(backend, layout, clamp, device):
    x, bias = _inputs((2, 5, 4, 6), torch.float16, device, layout)
    skip_unsupported(backend, BA.OP, x, bias, act="lrelu")
    _check(backend, x, bias, act="lrelu", clamp=clamp)
    y = bias_act(x, bias, act="lrelu", clamp=clamp, backend=backend)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape, dim", [((3, 7), 1), ((2, 3, 9), -1), ((4, 5, 3), 0), ((1, 1, 1, 1), 1), ((33,), 0)])
def test_dims_and_odd_shapes(backend, shape, dim, device):
    x, bias = _inputs(shape, torch.float32, device, dim=dim)
    skip_unsupported(backend, BA.OP, x, bias, act="gelu", dim=dim)
    _check(backend, x, bias, act="gelu", dim=dim)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(37,), ()], ids=["1-D", "0-D"])
def test_no_bias_any_dim(backend, shape, device):
    """Without a bias, dim says nothing: a 1-D or 0-D x at the default dim=1 (or any int dim) runs."""
    x = torch.randn(shape, device=device, dtype=torch.float64 if backend == "reference" else torch.float32)
    x.requires_grad_(True)
    skip_unsupported(backend, BA.OP, x.detach(), None, act="lrelu", dim=0)
    for dim in (1, 5, -7):
        y = bias_act(x, act="lrelu", clamp=0.5, dim=dim, backend=backend)
        expected = (torch.nn.functional.leaky_relu(x, 0.2) * math.sqrt(2)).clamp(-0.5, 0.5)
        torch.testing.assert_close(y, expected)
        (dx,) = torch.autograd.grad(y.sum(), x)
        (dx_expected,) = torch.autograd.grad(expected.sum(), x)
        torch.testing.assert_close(dx, dx_expected)


# The triton backward's tiles for the bias gradient (genkernels.triton.bias_act._bias_grad_plan): one
# partial per tile (inner a multiple of 64), one per column (channels_last, a trailing dim, odd inner);
# and the call without dx (x needs no gradient).
TILE_CASES = [
    ((2, 3, 8, 8), "contiguous", 1, True),
    ((3, 2, 16, 12), "contiguous", 1, True),
    ((2, 5, 3, 7), "contiguous", 1, False),
    ((2, 96, 24, 24), "channels_last", 1, False),
    ((3, 5, 6), "contiguous", -1, False),
]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape, layout, dim, per_tile", TILE_CASES)
@pytest.mark.parametrize("need_dx", [True, False])
def test_bias_gradient_tiles(backend, shape, layout, dim, per_tile, need_dx, device):
    x, bias = _inputs(shape, torch.float16, device, layout, dim=dim)
    skip_unsupported(backend, BA.OP, x, bias, act="lrelu", dim=dim)
    if backend == "triton":
        from genkernels.triton.bias_act import _bias_grad_plan

        plan = _bias_grad_plan(x, dim % x.dim())
        assert plan["PER_TILE"] == per_tile
    _check_bias_gradient(backend, x, bias, dim, need_dx, device)


@pytest.mark.parametrize("load_tiles", [1, 4])
def test_bias_gradient_row_loads(load_tiles, device, monkeypatch):
    """triton, per-column partials (channels_last): two row tiles a program, loaded one at a time (two loads
    a program, summed in the loop) or together (one load of both)."""
    from genkernels.triton import bias_act as tba

    x, bias = _inputs((2, 96, 24, 24), torch.float16, device, "channels_last")
    skip_unsupported("triton", BA.OP, x, bias, act="lrelu")
    monkeypatch.setattr(tba, "LOAD_TILES", load_tiles)
    plan = tba._bias_grad_plan(x, 1)
    assert not plan["PER_TILE"] and plan["ROW_ITERS"] == (2 if load_tiles == 1 else 1)
    _check_bias_gradient("triton", x, bias, 1, True, device)


def _check_bias_gradient(backend, x, bias, dim, need_dx, device):
    """dx (when ``need_dx``) and dbias of bias_act(x, bias, act="lrelu") under the criterion."""
    dy = torch.randn(x.shape, device=device, dtype=torch.float64)
    grads = []
    for xx, bb, be in ((x, bias, backend), (x, bias, "reference"), (x.double(), bias.double(), "reference")):
        xx = xx.detach().requires_grad_(need_dx)
        bb = bb.detach().requires_grad_(True)
        y = bias_act(xx, bb, act="lrelu", dim=dim, backend=be)
        grads.append(torch.autograd.grad(y, (xx, bb) if need_dx else (bb,), dy.to(y.dtype)))
    for i, name in enumerate(("dx", "dbias") if need_dx else ("dbias",)):
        assert_criterion(grads[0][i], grads[1][i], grads[2][i], name, relative_floor=name == "dbias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype, bias_dtype", [(torch.float16, torch.float16), (torch.float32, torch.float64)])
def test_bias_dtypes(backend, x_dtype, bias_dtype, device):
    """A bias in its own dtype (read as it is by the triton kernels, cast to float32 for the cuda ones and
    for a float64 bias): outputs and gradients to second order, the bias's included, under the criterion,
    and dbias in the bias's dtype."""
    x, bias = _inputs((2, 4, 3, 5), x_dtype, device)
    bias = bias.to(bias_dtype)
    skip_unsupported(backend, BA.OP, x, bias, act="silu")
    _check(backend, x, bias, order=2, act="silu")
    leaf = bias.detach().requires_grad_(True)
    (db,) = torch.autograd.grad(bias_act(x, leaf, act="silu", backend=backend).sum(), leaf)
    assert db.dtype == bias_dtype


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (3, 2, 64, 64)])
def test_channel_uniform_tiles(backend, shape, device, monkeypatch):
    """Inner sizes that are multiples of the triton tiles (the NCHW layers from 64 x 64 up): the bias is one
    scalar a program, and the backward walks several row tiles a program (a partial row tile at the end
    of (3, 2, 64, 64)), the programs' floor lowered so that these small shapes take that path too."""
    x, bias = _inputs(shape, torch.float16, device)
    skip_unsupported(backend, BA.OP, x, bias, act="lrelu")
    if backend == "triton":
        from genkernels.triton import bias_act as tba

        monkeypatch.setattr(tba, "MIN_PROGRAMS", 1)
        _, args = tba._launch_args(x, bias, "lrelu", 0.2, 1.0, None, 1)
        assert args["UNIFORM_C"]
        plan = tba._bias_grad_plan(x, 1)  # TILE_ROW_ITERS tiles of one row, loaded at once
        assert plan["PER_TILE"] and plan["RB"] == tba.TILE_ROW_ITERS and plan["ROW_ITERS"] == 1
    _check(backend, x, bias, act="lrelu")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("act", ACTS)
def test_double_backward(backend, act, device):
    """The R1 penalty's path: gradients of a gradient, against the reference under the criterion."""
    x, bias = _inputs((2, 4, 3, 5), torch.float32, device)
    skip_unsupported(backend, BA.OP, x, bias, act=act)
    _check(backend, x, bias, order=2, act=act, clamp=1.5 if act in ("silu", "lrelu") else None)


@pytest.mark.parametrize("act", ACTS)
def test_reference_gradgradcheck(act):
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    x.data[x.data.abs() < 1e-3] = 0.5  # away from the kinks of relu and lrelu
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, b: bias_act(x, b, act=act, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, bias))
    assert torch.autograd.gradgradcheck(fn, (x, bias))


def test_defaults(device):
    x = torch.randn(2, 3, 4, device=device)
    torch.testing.assert_close(bias_act(x, act="lrelu"), torch.nn.functional.leaky_relu(x, 0.2) * math.sqrt(2))
    torch.testing.assert_close(bias_act(x, act="relu"), torch.relu(x) * math.sqrt(2))
    torch.testing.assert_close(bias_act(x, act="tanh"), torch.tanh(x))
    torch.testing.assert_close(bias_act(x), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
def test_large_inputs(backend, act, device):
    x, bias = _inputs((2, 4, 3, 3), torch.float32, device, scale=1e4)
    skip_unsupported(backend, BA.OP, x, bias, act=act)
    x.requires_grad_(True)
    y = bias_act(x, bias, act=act, clamp=256.0, backend=backend)
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x: bias_act(x, torch.zeros(4)), ValueError, r"bias must have shape \(3,\)"),
        (lambda x: bias_act(x, act="swish"), ValueError, "act must be one of"),
        (lambda x: bias_act(x, clamp=0.0), ValueError, "clamp must be None or a finite float > 0"),
        (lambda x: bias_act(x, clamp=-1.0), ValueError, "clamp must be None or a finite float > 0"),
        (lambda x: bias_act(x, torch.zeros(4), dim=3), ValueError, r"dim must be an int in \[-3, 3\)"),
        (lambda x: bias_act(x, dim=1.0), ValueError, "dim must be an int, got 1.0"),
        (lambda x: bias_act(x[0, 0, 0], torch.zeros(1), dim=0), ValueError, "x is 0-D"),
        (lambda x: bias_act(x.long()), TypeError, "x must be float32"),
        (lambda x: bias_act(x, torch.zeros(3, device="meta")), ValueError, "use one device"),
        (lambda x: bias_act(x, gain=float("nan")), ValueError, "gain must be a finite float"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 3, 4))


# --------------------------------------------------------------------------- torch.library ops and compile


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("clamp", [None, 0.8])
def test_opcheck(backend, clamp, device):
    x, bias = _inputs((2, 5, 3, 4), torch.float32, device, "channels_last")
    skip_unsupported(backend, BA.OP, x, bias, act="silu")
    x.requires_grad_(True)
    bias.requires_grad_(True)
    args = ("silu", 0.2, 1.0, clamp is not None, clamp or 0.0, 1)
    torch.library.opcheck(torch.ops.genkernels.bias_act.default, (x, bias, *args, backend))
    dy = torch.randn_like(x).requires_grad_(True)
    for float32_out in (False, True):
        torch.library.opcheck(torch.ops.genkernels.bias_act_grad.default, (dy, x, bias, *args, float32_out, backend))
    for need_dz in (False, True):
        torch.library.opcheck(torch.ops.genkernels.bias_act_grad_bias.default, (dy, x, bias, *args, need_dz, backend))


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("act", ["lrelu", "silu"])
def test_traced_op_second_order(backend, act, device):
    """The genkernels::bias_act op (what torch.compile traces) differentiated twice, dbias from the fused
    genkernels::bias_act_grad_bias: the eager function's gradients of both orders under the criterion."""
    x, bias = _inputs((2, 4, 3, 5), torch.float32, device)
    skip_unsupported(backend, BA.OP, x, bias, act=act)
    torch.manual_seed(5)
    dy, v, w = torch.randn_like(x), torch.randn_like(x), torch.randn_like(bias)

    def grads(fn, x, bias):
        x, bias = x.detach().requires_grad_(True), bias.detach().requires_grad_(True)
        dx, db = torch.autograd.grad(fn(x, bias), (x, bias), dy.to(x.dtype), create_graph=True)
        second = torch.autograd.grad((dx * v.to(x.dtype)).sum() + (db * w.to(x.dtype)).sum(), (x, bias))
        return [dx, db, *second]

    args = (act, 0.2, 1.0 if act == "silu" else math.sqrt(2.0), False, 0.0, 1)
    op = lambda x, b: torch.ops.genkernels.bias_act(x, b, *args, backend)  # noqa: E731
    ref = lambda x, b: bias_act(x, b, act=act, backend="reference")  # noqa: E731
    out, want, truth = grads(op, x, bias), grads(ref, x, bias), grads(ref, x.double(), bias.double())
    for name, o, r, t in zip(("dx", "dbias", "ddx", "ddbias"), out, want, truth):
        assert_criterion(o, r, t, name, relative_floor=name != "dx")


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_compile_fullgraph(backend, device):
    """Forward and backward trace without graph breaks and match the eager call."""
    torch._dynamo.reset()
    x, bias = _inputs((2, 4, 3, 5), torch.float32, device, "channels_last")
    skip_unsupported(backend, BA.OP, x, bias, act="lrelu")

    def fn(x, bias):
        return bias_act(x, bias, act="lrelu", clamp=2.0, backend=backend)

    leaves = [t.detach().requires_grad_(True) for t in (x, bias)]
    y = fn(*leaves)
    grads = torch.autograd.grad((y * y).sum(), leaves)
    cleaves = [t.detach().requires_grad_(True) for t in (x, bias)]
    cy = torch.compile(fn, fullgraph=True)(*cleaves)
    cgrads = torch.autograd.grad((cy * cy).sum(), cleaves)
    torch.testing.assert_close(cy, y)
    for g, cg in zip(grads, cgrads):
        torch.testing.assert_close(cg, g)


# --------------------------------------------------------------------------- gradient codes


class _XKernels(BA._ReferenceKernels):
    """The reference kernels without gradient codes: the backward reads x."""

    CODE_ACTS = ()


def test_gradient_codes_format():
    """2 bits an element in memory order, element e at bits 2 (e % 4) of byte e // 4 (bit 0 z > 0, bit 1 the
    clamp passes), 2 * ceil(n / 8) bytes; channels_last tensors in their own memory order; no codes for the
    smooth activations."""
    x = torch.tensor([[1.0, -1.0, 0.0, 3.0, -4.0]]).view(1, 1, 5)  # z = x (no bias)
    y, codes = BA._reference_forward_codes(x, None, "relu", 0.2, 1.0, 2.0, 1)
    # Codes 3 (z > 0, passes), 2, 2, 1 (3 > clamp 2: stopped), 2.
    assert codes.dtype == torch.uint8 and codes.tolist() == [3 | 2 << 2 | 2 << 4 | 1 << 6, 2]
    assert torch.equal(y, x.relu().clamp(max=2))
    _, unclamped = BA._reference_forward_codes(x, None, "relu", 0.2, 1.0, None, 1)
    assert unclamped.tolist() == [3 | 2 << 2 | 2 << 4 | 3 << 6, 2]
    nhwc = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1).expand(1, 2, 1, 3).contiguous(memory_format=torch.channels_last)
    _, codes = BA._reference_forward_codes(nhwc, None, "lrelu", 0.2, 1.0, None, 1)
    assert codes.tolist() == [3 | 2 << 2 | 3 << 4 | 2 << 6, 3 | 2 << 2]  # channels innermost: +, -, +, -, +, -
    assert BA._reference_forward_codes(x, None, "gelu", 0.2, 1.0, None, 1) is None


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", BA.CODE_ACTS)
@pytest.mark.parametrize("clamp", [None, 0.7])
def test_gradient_codes_autograd(act, clamp, layout):
    """With a backend that has codes, the forward keeps the codes and not x, and y, dx, dbias and the double
    backward (the R1 path: gradients of a penalty on dx and dbias with respect to x, the bias and dy) are bit
    for bit those of the backward from x."""
    torch.manual_seed(0)
    x = to_layout(torch.randn(2, 5, 3, 7, dtype=torch.float64), layout)
    x[0, 0, 0, :3] = -0.0  # z = 0 where the bias is 0 below
    bias = torch.randn(5, dtype=torch.float64)
    bias[0] = 0.0
    got = {}
    for impl in (BA._ReferenceKernels, _XKernels):
        xx, bb = x.clone().requires_grad_(), bias.clone().requires_grad_()
        y = BA._autograd.apply(BA._BiasActFunction, xx, bb, act, 0.2, 1.4, clamp, 1, impl)
        saved = y.grad_fn.saved_tensors[0]
        dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1)).requires_grad_()
        dx, db = torch.autograd.grad(y, (xx, bb), dy, create_graph=True)
        penalty = (dx**2).sum() + (db**3).sum()
        second = torch.autograd.grad(penalty, (xx, bb, dy), allow_unused=True)
        second = [torch.zeros_like(t) if g is None else g for g, t in zip(second, (x, bias, dy))]
        got[impl] = (y, dx, db, *second, saved)
    coded, plain = got[BA._ReferenceKernels], got[_XKernels]
    assert coded[-1].dtype == torch.uint8 and coded[-1].numel() == 2 * math.ceil(x.numel() / 8)
    assert plain[-1] is not None and plain[-1].shape == x.shape  # the backward from x keeps x
    for a, b in zip(coded[:-1], plain[:-1]):
        assert torch.equal(a, b)
    assert coded[5].abs().sum() > 0  # the gradient with respect to dy is not trivially zero
    assert coded[1].stride() == x.stride()


def test_gradient_codes_graph_without_x():
    """The documented difference: the gradient from codes is not a function of x in autograd's graph, so with
    a dy that needs no grad it needs none under create_graph, where the one from x does (zero second order)."""
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    got = []
    for impl in (BA._ReferenceKernels, _XKernels):
        xx = x.clone().requires_grad_()
        y = BA._autograd.apply(BA._BiasActFunction, xx, None, "lrelu", 0.2, 1.4, None, 1, impl)
        (dx,) = torch.autograd.grad(y, xx, torch.ones_like(y), create_graph=True)
        got.append(dx)
    assert not got[0].requires_grad and torch.equal(got[0], got[1])
    assert torch.equal(torch.autograd.grad(got[1].sum(), xx)[0], torch.zeros_like(x))


def test_no_codes_without_a_graph(monkeypatch):
    """Under no_grad (no backward can follow) the forward writes no codes."""
    calls = []
    monkeypatch.setattr(BA._ReferenceKernels, "forward_codes", staticmethod(lambda *a: calls.append(a)))
    x, bias = torch.randn(2, 3, 4), torch.randn(3)
    with torch.no_grad():
        BA._autograd.apply(BA._BiasActFunction, x, bias, "lrelu", 0.2, 1.4, None, 1, BA._ReferenceKernels)
    assert calls == []
    BA._autograd.apply(BA._BiasActFunction, x.requires_grad_(), bias, "lrelu", 0.2, 1.4, None, 1, BA._ReferenceKernels)
    assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", BA.CODE_ACTS)
@pytest.mark.parametrize(("layout", "clamp"), [("contiguous", None), ("channels_last", 0.7)])
def test_cuda_gradient_codes(act, dtype, layout, clamp):
    """The cuda backend on a tensor large enough for gradient codes: autograd keeps the codes, not x, and
    outputs, gradients and the double backward meet the criterion against the reference."""
    x, bias = _inputs((2, 16, 48, 48), dtype, torch.device("cuda"), layout)
    assert x.numel() >= cba.CODES_MIN_NUMEL
    y = bias_act(x.detach().requires_grad_(), bias, act=act, clamp=clamp, backend="cuda")
    saved = y.grad_fn.saved_tensors[0]
    assert saved.dtype == torch.uint8 and saved.numel() == 2 * math.ceil(x.numel() / 8)
    _check("cuda", x, bias, order=2, act=act, clamp=clamp)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_forward_backward(backend):
    """Forward and autograd.grad record into one CUDA graph (no host synchronization in the op or its
    backward, gradient codes and the bias gradient's finishing pass included) and a replay on new values of
    x, bias and dy gives what the reference gives on them (the benchmark's "+ CUDA graph" variants)."""
    x, bias = _inputs((2, 16, 48, 48), torch.bfloat16, torch.device("cuda"))
    skip_unsupported(backend, BA.OP, x, bias, act="lrelu")
    x.requires_grad_(True)
    bias = bias.to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn_like(x)

    def step():
        y = bias_act(x, bias, act="lrelu", backend=backend)
        return (y, *torch.autograd.grad(y, (x, bias), dy))

    step()  # compiles (triton), settles the allocator: the capture then records launches only
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    with torch.no_grad():
        for t in (x, bias, dy):
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()

    def reference(dtype):
        xr, br = (t.detach().to(dtype).requires_grad_(True) for t in (x, bias))
        y = bias_act(xr, br, act="lrelu", backend="reference")
        return (y, *torch.autograd.grad(y, (xr, br), dy.to(dtype)))

    for name, o, r, t in zip(("y", "dx", "dbias"), outputs, reference(None), reference(torch.float64)):
        assert_criterion(o, r, t, name, relative_floor=name == "dbias")
