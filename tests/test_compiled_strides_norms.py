"""The traced path (torch.compile(fullgraph=True), which reaches the ``genkernels::<op>`` torch.library ops) of the
norm ops, the adaLN family and group_norm, on the strided inputs users produce: every normalization the eager path
does before the kernels (the (R, D) row views or copies, contiguous and float32 weight / bias / modulations, the
dense image layout) must happen on the registered ops' path too, forward and backward, or the kernels read strided
tensors as dense ones and give wrong numbers without an error. Outputs and gradients are checked against the
float64 reference under the DESIGN.md criterion (tests/criterion.py)."""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.criterion import assert_criterion

A = importlib.import_module("genkernels.ops.adaln")
GN = importlib.import_module("genkernels.ops.group_norm")
BACKENDS = ["reference", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]

# Gradients that are sums over rows (per-sample modulations sum a sample's tokens): their floor scales with them.
COLUMN_SUMS = ("dweight", "dbias", "dshift", "dscale", "dgate", "dtgate")

pytestmark = pytest.mark.usefixtures("one_thread")


def _strided_like(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A random tensor of ``shape`` whose strides are its dims' in reverse (no dim dense): an upstream gradient
    as a transposing consumer hands it back."""
    return torch.randn(shape[::-1], dtype=dtype, device=device).permute(*reversed(range(len(shape))))


def _check(got, leaves, inputs, ref_fn, upstream, names):
    """Compare outputs ``got`` and their gradients to ``ref_fn`` on the inputs in their own dtypes and in
    float64 (the gradients of parameters and modulations, sums over rows, with the relative floor)."""
    grads = torch.autograd.grad(got, leaves, upstream)
    refs = []
    for up in (False, True):
        rl = [t.detach().to(torch.float64 if up else t.dtype).requires_grad_(True) for t in inputs]
        outs = ref_fn(*rl)
        refs.append((*outs, *torch.autograd.grad(outs, rl, [u.to(o.dtype) for u, o in zip(upstream, outs)])))
    assert len(names) == len(got) + len(grads)
    for i, (value, name) in enumerate(zip((*got, *grads), names)):
        assert_criterion(value, refs[0][i], refs[1][i], name, relative_floor=name.startswith(COLUMN_SUMS))


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaln_ops_traced_on_strided_inputs(backend, device):
    """The three adaLN ops, traced, on a transposed x, a slice along L of a strided batch, a slice with a step,
    an offset slice, expanded (stride 0) x and modulations ((B, D) and (B, L, D)), a transposed (B, D) scale, a
    strided weight and an expanded bias, bfloat16 / float16 modulations for float32 x; and, backward, incoming
    gradients that are slices along L of a wider gradient or expanded ones (the backward ops' dy, dout, dh)."""
    torch._dynamo.reset()
    b, length, d = 2, 3, 12
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    inputs = [
        torch.randn(length, b, d, device=device).transpose(0, 1),  # x: transposed
        torch.randn(2 * b, length + 2, d, device=device)[::2, 1 : length + 1],  # y: L slice of a strided batch
        torch.randn(b, length, 2 * d, device=device)[..., ::2],  # x2: a step along D (copied)
        torch.randn(b, length, d + 3, device=device)[..., 3:],  # y2: offset rows
        torch.randn(1, 1, d, device=device).expand(b, length, d),  # x3: expanded, row stride 0
        torch.randn(2 * d, device=device)[::2],  # weight: a step
        torch.randn(1, device=device).expand(d),  # bias: expanded
        torch.randn(b, 1, d, device=device, dtype=bf16).expand(b, length, d),  # per-token shift, bf16
        torch.randn(d, b, device=device).t(),  # per-sample scale: transposed
        torch.randn(1, d, device=device, dtype=f16).expand(b, d),  # per-sample gate: expanded, float16
        torch.randn(length, b, d, device=device).transpose(0, 1),  # per-token gate: transposed
    ]

    def block(ln, gr, fused, x, y, x2, y2, x3, w, bias, shift, scale, gate, tgate):
        out = ln(x, w, bias, shift, scale)
        res = gr(x2, y2, tgate)
        h, out2 = fused(x3, y, gate, w, bias, scale, shift)
        # Consumers inside the graph hand the backward ops gradients that are slices along L of a wider
        # tensor and expanded ones (the compiled backward gives the upstream gradients of the graph's outputs
        # the outputs' own strides first).
        return torch.cat([out, res, out2], 1), h.sum(1)

    def ours(*args):
        return block(
            lambda *a: A.layer_norm_modulate(*a, backend=backend),
            lambda *a: A.gated_residual(*a, backend=backend),
            lambda *a: A.gated_residual_layer_norm_modulate(*a, backend=backend),
            *args,
        )

    def reference(*args):
        return block(
            A.layer_norm_modulate_reference,
            A.gated_residual_reference,
            A.gated_residual_layer_norm_modulate_reference,
            *args,
        )

    leaves = [t.detach().requires_grad_(True) for t in inputs]
    got = torch.compile(ours, fullgraph=True)(*leaves)
    upstream = (_strided_like((b, 3 * length, d), f32, device), torch.randn(b, 2 * d, device=device)[:, 1::2])
    outputs = ("out, res, out2", "h summed over L")
    grads = ("dx", "dy", "dx2", "dy2", "dx3", "dweight", "dbias", "dshift", "dscale", "dgate", "dtgate")
    _check(got, leaves, inputs, reference, upstream, (*outputs, *grads))


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_silu_traced_on_strided_inputs(backend, device):
    """group_norm with SiLU, traced, on channels_last and channels_last_3d x (run in place) and on a transposed
    and an expanded x (copied once), with a strided weight and an expanded bias, and a dy in neither of x's
    layouts."""
    torch._dynamo.reset()
    groups = 3

    # A transposing consumer inside the graph hands the backward op a transposed dy (the compiled backward gives
    # the upstream gradient of a graph output that output's own strides first).
    def fn(x, weight, bias):
        return (GN.group_norm(x, groups, weight, bias, activation="silu", backend=backend).transpose(1, -1),)

    def reference(x, weight, bias):
        return (GN.group_norm_reference(x, groups, weight, bias, activation="silu").transpose(1, -1),)

    compiled = torch.compile(fn, fullgraph=True)
    n, c = 2, 6
    weight, bias = torch.randn(2 * c, device=device)[::2], torch.randn(1, device=device).expand(c)
    cases = {
        "channels_last": torch.randn(n, c, 3, 5, device=device).to(memory_format=torch.channels_last),
        "channels_last_3d": torch.randn(n, c, 2, 3, 2, device=device).to(memory_format=torch.channels_last_3d),
        "transposed": torch.randn(n, c, 5, 3, device=device).transpose(2, 3),
        "expanded": torch.randn(1, c, 3, 5, device=device).expand(n, c, 3, 5),
    }
    for i, (name, x) in enumerate(cases.items()):
        inputs = (x, weight, bias)
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        got = compiled(*leaves)
        shape = tuple(got[0].shape)
        dy = _strided_like(shape, x.dtype, device) if i % 2 == 0 else torch.randn(1, device=device).expand(shape)
        _check(got, leaves, inputs, reference, (dy,), (f"{name}: y", "dx", "dweight", "dbias"))
