"""The traced path (torch.compile(fullgraph=True), which reaches the ``genkernels::<op>`` torch.library ops)
on the strided inputs users produce: every normalization the eager path does before the kernels (contiguous
copies, dtype casts, layouts) must happen on the registered op's path too, or the kernels read strided
tensors as dense ones and give wrong numbers without an error. Outputs and gradients are checked against the
float64 reference under the DESIGN.md criterion (tests/criterion.py)."""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.criterion import assert_criterion

BA = importlib.import_module("genkernels.ops.bias_act")
BACKENDS = ["reference", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def _strided_like(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A random tensor of ``shape`` whose strides are its dims' in reverse (no dim dense): an upstream gradient
    as a transposing consumer hands it back."""
    return torch.randn(shape[::-1], dtype=dtype, device=device).permute(*reversed(range(len(shape))))


def _check_traced(got, leaves, inputs, ref_fn, upstream, names):
    """Compare outputs ``got`` and their gradients in ``leaves`` (the first inputs) to ``ref_fn`` on the inputs in
    their own dtypes and in float64 (gradients named d<bias> with the relative floor: sums over rows)."""
    grads = torch.autograd.grad(got, leaves, upstream)
    refs = []
    for dtype in (None, torch.float64):
        rl = [t.detach().to(dtype or t.dtype).requires_grad_(i < len(leaves)) for i, t in enumerate(inputs)]
        outs = ref_fn(*rl)
        up = [u.to(o.dtype) for u, o in zip(upstream, outs)]
        refs.append((*outs, *torch.autograd.grad(outs, rl[: len(leaves)], up)))
    assert len(names) == len(got) + len(grads)
    for i, (value, name) in enumerate(zip((*got, *grads), names)):
        assert_criterion(value, refs[0][i], refs[1][i], name, relative_floor=name.startswith("dbias"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_act_strided_bias(backend, device):
    """A float32 bias that is a strided view (a slice with a step, an expand()) is read as the (C,) vector it is:
    the traced call casts the bias to float32, a no-op for a float32 one, and so once passed the view itself to
    kernels that index it densely (the eager path makes it contiguous)."""
    torch._dynamo.reset()
    x = torch.randn(2, 6, 3, 5, device=device)
    biases = {
        "step": torch.randn(12, device=device)[::2],
        "expand": torch.randn(1, device=device).expand(6),
    }

    def fn(x, bias):
        return BA.bias_act(x, bias, act="silu", clamp=2.5, backend=backend)

    compiled = torch.compile(fn, fullgraph=True)
    for name, bias in biases.items():
        leaves = [t.detach().requires_grad_(True) for t in (x, bias)]
        y = compiled(*leaves)
        dy = _strided_like(tuple(y.shape), y.dtype, device)
        dx, db = torch.autograd.grad(y, leaves, dy)
        refs = []
        for dtype in (torch.float32, torch.float64):
            rl = [t.detach().to(dtype).requires_grad_(True) for t in (x, bias)]
            ry = BA.bias_act_reference(*rl, act="silu", clamp=2.5)
            refs.append((ry, *torch.autograd.grad(ry, rl, dy.to(dtype))))
        (ry, rdx, rdb), (ry64, rdx64, rdb64) = refs
        assert_criterion(y, ry, ry64, f"{name}: y")
        assert_criterion(dx, rdx, rdx64, f"{name}: dx")
        assert_criterion(db, rdb, rdb64, f"{name}: dbias", relative_floor=True)


def test_rope_traced_refuses_overlapping_writes(device):
    """The memory checks of rope's in-place and k_out calls run on the traced path too, as the graph runs (a trace
    has no addresses): q and k that share elements (or an expanded q) would be rotated twice, and a k_out that
    shares q's memory is written while q is read. Traced, these once ran without an error: the check was skipped
    on the claim that the compiler tracks aliasing, yet the op receives the aliased tensors themselves."""
    rope_op = importlib.import_module("genkernels.ops.rope")
    b, h, length, dh = 2, 3, 6, 8
    cos, sin = rope_op.rope_frequencies(torch.arange(length, device=device), dh)

    def same_buffer(buf):
        rope_op.rope(buf, buf, cos, sin, inplace=True, backend="reference")
        return buf

    def expanded(base):
        rope_op.rope(base.expand(b, h, length, dh), None, cos, sin, inplace=True, backend="reference")
        return base

    def into_q(q, k):
        return rope_op.rope(q, k, cos, sin, k_out=q, backend="reference")[0]

    torch._dynamo.reset()
    buf = torch.randn(b, h, length, dh, device=device)
    before = buf.clone()
    with pytest.raises(ValueError, match="separate memory"):
        torch.compile(same_buffer, fullgraph=True)(buf)
    assert torch.equal(buf, before), "rotated before refusing"
    with pytest.raises(ValueError, match="overlap"):
        torch.compile(expanded, fullgraph=True)(torch.randn(b, 1, length, dh, device=device))
    with pytest.raises(ValueError, match="k_out must not share memory with q"):
        torch.compile(into_q, fullgraph=True)(torch.randn_like(buf), torch.randn_like(buf))


def test_rope_traced_table_gradients(device):
    """Tables that require grad get their gradients on the traced path too, as in the eager call: a compiled call
    once left cos and sin without a gradient, and no error."""
    rope_op = importlib.import_module("genkernels.ops.rope")
    torch._dynamo.reset()
    buf = torch.randn(2, 6, 3, 3, 8, device=device)  # a fused (B, L, 3, H, Dh) qkv projection
    q, k = buf[:, :, 0].transpose(1, 2), buf[:, :, 1].transpose(1, 2)
    cos, sin = rope_op.rope_frequencies(torch.arange(6, device=device), 8)

    def fn(q, k, cos, sin):
        return rope_op.rope(q, k, cos, sin)

    tables = [t.detach().requires_grad_(True) for t in (cos, sin)]
    qo, ko = torch.compile(fn, fullgraph=True)(q, k, *tables)
    grads = [_strided_like(tuple(t.shape), t.dtype, device) for t in (qo, ko)]
    dcos, dsin = torch.autograd.grad((qo, ko), tables, grads, allow_unused=True)
    assert dcos is not None and dsin is not None, "the compiled call gave cos and sin no gradient"
    refs = []
    for dtype in (torch.float32, torch.float64):
        rt = [t.detach().to(dtype).requires_grad_(True) for t in (cos, sin)]
        out = rope_op.rope_reference(q.to(dtype), k.to(dtype), *rt)
        refs.append(torch.autograd.grad(out, rt, [g.to(dtype) for g in grads]))
    for name, got, ref, ref64 in zip(("dcos", "dsin"), (dcos, dsin), *refs):
        assert_criterion(got, ref, ref64, name, relative_floor=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_ops_traced_on_strided_upstream_gradients(backend, device):
    """The backward ops of bias_act (``genkernels::bias_act_grad_bias`` with a bias that requires grad,
    ``genkernels::bias_act_grad`` without one), rope, gelu_tanh and swiglu, traced, handed strided upstream
    gradients: consumers inside the graph give the ops slices along H of a wider gradient (a cat, one of them in a
    channels_last layout), a transposed one and expanded (stride 0) ones. A gradient passed to autograd.grad from
    outside the graph would not do: the compiled backward gives it the output's own strides first."""
    torch._dynamo.reset()
    rope_op = importlib.import_module("genkernels.ops.rope")
    gm = importlib.import_module("genkernels.ops.gated_mlp")
    length, dh = 6, 8
    cos, sin = rope_op.rope_frequencies(torch.arange(length, device=device), dh)
    inputs = [
        torch.randn(2, 6, 3, 5, device=device).to(memory_format=torch.channels_last),  # x: bias_act with a bias
        torch.randn(6, device=device),  # bias
        torch.randn(2, 6, 3, 5, device=device),  # x2: bias_act without a bias
        torch.randn(2, 3, length, dh, device=device),  # q
        torch.randn(2, 3, length, dh, device=device),  # k
        torch.randn(2, 5, 7, device=device),  # g: gelu_tanh
        torch.randn(2, 5, 10, device=device),  # s: swiglu along the last dim
        cos,
        sin,
    ]

    def block(bias_act, rope, gelu, swiglu, x, bias, x2, q, k, g, s, cos, sin):
        y = bias_act(x, bias, act="silu", clamp=2.5)
        y2 = bias_act(x2, None, act="lrelu")
        qo, ko = rope(q, k, cos, sin)
        return (
            torch.cat([y, y2], 2),  # dy of each: a slice along H of the wider gradient
            qo.transpose(1, 2).contiguous(),  # dqo: transposed
            ko.sum(2),  # dko: expanded along L
            gelu(g).sum(1),  # dy: expanded along L
            swiglu(s).transpose(0, 2).contiguous(),  # dy: transposed
        )

    def ours(*args):
        return block(
            lambda *a, **kw: BA.bias_act(*a, **kw, backend=backend),
            lambda *a: rope_op.rope(*a, backend=backend),
            lambda t: gm.gelu_tanh(t, backend=backend),
            lambda t: gm.swiglu(t, backend=backend),
            *args,
        )

    def reference(*args):
        return block(BA.bias_act_reference, rope_op.rope_reference, gm.gelu_tanh_reference, gm.swiglu_reference, *args)

    leaves = [t.detach().requires_grad_(i < 7) for i, t in enumerate(inputs)]
    got = torch.compile(ours, fullgraph=True)(*leaves)
    upstream = [torch.randn(t.shape, device=device) for t in got]
    names = ("y, y2", "qo", "ko", "gelu", "swiglu", "dx", "dbias", "dx2", "dq", "dk", "dg", "ds")
    _check_traced(got, leaves[:7], inputs, reference, upstream, names)
