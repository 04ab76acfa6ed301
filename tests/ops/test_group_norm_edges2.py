"""Edge cases of group_norm beyond tests/ops/test_group_norm.py: groups of 2^31 elements or more in the triton
split path, and inputs users pass (NaN / inf, data far from zero) compared with torch.nn.functional.group_norm."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import genkernels
from genkernels.ops import group_norm, group_norm_reference
from tests.criterion import assert_criterion

triton_gn = pytest.importorskip("genkernels.triton.group_norm")


def _needs_triton(device):
    reason = genkernels.explain("group_norm", torch.randn(1, 2, 2, device=device), 1)["triton"]
    if reason is not None:
        pytest.skip(f"triton: {reason}")


# A group of 2^30 positions x 2 channels, channels last: Cg * S = 2^31 does not fit in int32. One program
# (the first split) of the split path's second pass runs on the first ROWS positions of a real tensor; the
# partials of all T splits are given, each a variance of 1 about the group's shift (x at position 0).
S_BIG, CG, BLOCK_S, TPP = 2**30, 2, 1024, 32
ROWS = BLOCK_S * TPP
T_BIG = S_BIG // ROWS


def _split_tiling():
    return dict(CHANNELS_LAST=True, SPAN=CG, BLOCK_S=BLOCK_S, BLOCK_C=CG, BLOCK_G=1, BLOCK_T=1024, num_warps=4)


def test_triton_forward_group_of_2_31_elements(device):
    """The split path divided by Cg * S computed in int32: for a group of 2^31 elements or more the count
    wrapped (negative here), and the variance with it: rstd and y came out NaN (beyond 2^32: wrong, finite)."""
    _needs_triton(device)
    x = torch.randn(ROWS, CG, device=device)
    y = torch.empty_like(x)
    part_mean = torch.zeros(T_BIG, device=device)
    part_m2 = torch.full((T_BIG,), float(ROWS * CG), device=device)  # M2 = count * var, var = 1
    mean, rstd = torch.empty(1, 1, device=device), torch.empty(1, 1, device=device)
    with triton_gn.on_device(x):
        triton_gn._fwd_apply_kernel[(1, 1)](
            x, y, x, x, part_mean, part_m2, mean, rstd,
            CG, S_BIG, 1, CG, 1, 0, 0, 1, 0, CG, 1, T_BIG, TPP, 1e-5,
            HAS_WEIGHT=False, HAS_BIAS=False, SILU=False, **_split_tiling(),
        )  # fmt: skip
    want_rstd = (1 + 1e-5) ** -0.5
    torch.testing.assert_close(rstd, torch.full_like(rstd, want_rstd))
    torch.testing.assert_close(mean, x[:1, :1])
    torch.testing.assert_close(y, (x - x[0, 0]) * want_rstd)


def test_triton_backward_group_of_2_31_elements(device):
    """The dx pass took mean_g(dxhat) and mean_g(dxhat * xhat) over Cg * S computed in int32: for a group of
    2^31 elements both changed sign, and dx was wrong with no NaN to show it."""
    _needs_triton(device)
    x, dy = torch.randn(ROWS, CG, device=device), torch.randn(ROWS, CG, device=device)
    dx = torch.empty_like(x)
    mean, rstd = torch.full((1, 1), 0.25, device=device), torch.full((1, 1), 2.0, device=device)
    # Per-channel totals of dz and dz * xhat over the whole group (all in split 0's row): group means 1 and -0.5.
    count = float(S_BIG * CG)
    sum_dz = torch.zeros(T_BIG, CG, device=device)
    sum_dz_xhat = torch.zeros(T_BIG, CG, device=device)
    sum_dz[0] = count * torch.tensor([0.25, 0.75], device=device)
    sum_dz_xhat[0] = count * torch.tensor([-0.5, 0.0], device=device)
    with triton_gn.on_device(x):
        triton_gn._bwd_dx_kernel[(1, 1)](
            dy, x, x, x, mean, rstd, sum_dz, sum_dz_xhat, dx,
            CG, S_BIG, 1, CG, 1, 0, 0, 1, 0, CG, 1, T_BIG, TPP,
            HAS_WEIGHT=False, HAS_BIAS=False, SILU=False, **_split_tiling(),
        )  # fmt: skip
    xhat = (x - 0.25) * 2.0
    torch.testing.assert_close(dx, 2.0 * (dy - 1.0 - xhat * -0.5))


BACKENDS = ["reference", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _skip_unsupported(backend, *args):
    if backend != "reference":
        reason = genkernels.explain("group_norm", *args)[backend]
        if reason is not None:
            pytest.skip(f"{backend}: {reason}")


def _torch_group_norm(x, groups, w, b, eps, act):
    """torch.nn.functional.group_norm (+ silu), bias without weight as torch's backward cannot take it."""
    if w is None and b is not None:
        y = F.group_norm(x, groups, None, None, eps) + b.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
    else:
        y = F.group_norm(x, groups, None if w is None else w.to(x.dtype), None if b is None else b.to(x.dtype), eps)
    return F.silu(y) if act == "silu" else y


def _outputs(fn, x, w, b, dy, wants, every_grad=False):
    """y and the gradients of the inputs marked in ``wants`` (x, weight, bias). ``every_grad``: compute the
    gradients of all three and keep the wanted ones (torch's CPU group_norm backward crashes, a segmentation
    fault, on a channels_last x when the gradient of x is not asked for)."""
    asked = (True,) * 3 if every_grad else wants
    leaves = [None if t is None else t.detach().clone().requires_grad_(r) for t, r in zip((x, w, b), asked)]
    y = fn(*leaves)
    inputs = [t for t in leaves if t is not None and t.requires_grad]
    grads = dict(zip(map(id, inputs), torch.autograd.grad(y, inputs, dy.to(y.dtype))))
    return [y, *(grads[id(t)] for t, want in zip(leaves, wants) if t is not None and want)]


# (name, shape, groups, weight / bias: "x" in x's dtype, "f32" float32, None; eps, activation, gradients wanted)
CASES = [
    ("groups-1", (2, 12, 3, 5), 1, "x", "x", 1e-5, "silu", (True, True, True)),
    ("groups-C", (2, 12, 3, 5), 12, "x", "x", 1e-5, "silu", (True, True, True)),
    ("C-7", (3, 7, 2, 5), 7, "x", "x", 1e-5, "silu", (True, True, True)),
    ("S-1", (5, 12, 1, 1), 3, "x", "x", 1e-5, "silu", (True, True, True)),
    ("2-D", (5, 12), 4, "x", "x", 1e-5, None, (True, True, True)),
    ("eps-0", (2, 12, 3, 5), 4, "x", "x", 0.0, "silu", (True, True, True)),
    ("weight-grad-only", (2, 12, 3, 5), 4, "x", "x", 1e-5, "silu", (False, True, False)),
    ("bias-grad-only", (2, 12, 3, 5), 4, "f32", "f32", 1e-5, None, (False, False, True)),
    ("no-weight", (2, 12, 3, 5), 4, None, "x", 1e-5, "silu", (True, False, True)),
    ("float32-params", (2, 12, 3, 5), 4, "f32", "f32", 1e-5, "silu", (True, True, True)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_torch(case, layout, dtype, backend, device):
    """Against torch.nn.functional.group_norm (+ silu) in x's dtype and in float64, outputs and gradients."""
    _, shape, groups, w_kind, b_kind, eps, act, wants = case
    x = torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        if x.dim() != 4:
            pytest.skip("channels_last needs 4-D x")
        x = x.to(memory_format=torch.channels_last)
    params = [None if k is None else torch.randn(shape[1], device=device).to(dtype if k == "x" else torch.float32)
              for k in (w_kind, b_kind)]  # fmt: skip
    w, b = params
    _skip_unsupported(backend, x, groups, w, b, eps, act)
    dy = torch.randn(shape, device=device)
    out = _outputs(lambda x, w, b: group_norm(x, groups, w, b, eps, act, backend=backend), x, w, b, dy, wants)
    torch_gn = lambda x, w, b: _torch_group_norm(x, groups, w, b, eps, act)  # noqa: E731
    ref = _outputs(torch_gn, x, w, b, dy, wants, every_grad=True)
    up = [None if t is None else t.double() for t in (x, w, b)]
    ref64 = _outputs(torch_gn, *up, dy.double(), wants, every_grad=True)
    for fmt in (torch.contiguous_format, torch.channels_last):  # y keeps x's layout (torch's CUDA kernel does not)
        assert out[0].is_contiguous(memory_format=fmt) == x.is_contiguous(memory_format=fmt), f"y: layout {fmt}"
    for i, (o, r, r64) in enumerate(zip(out, ref, ref64)):
        assert_criterion(o, r, r64, f"output {i}", relative_floor=i > 0)


@pytest.mark.parametrize("backend", ["reference", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_non_finite_input_poisons_its_group_only(activation, value, layout, backend, device, split_path):
    """A NaN or inf in x makes torch's whole (sample, group) non-finite, and nothing else: y, dx, and the
    dweight / dbias of that group's channels. The same elements are non-finite here."""
    x = torch.randn(2, 8, 4, 5, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x[1, 5, 1, 3] = value
    w, b = torch.randn(8, device=device), torch.randn(8, device=device)
    _skip_unsupported(backend, x, 4, w, b, 1e-5, activation)
    dy = torch.randn(x.shape, device=device)
    out = _outputs(lambda x, w, b: group_norm(x, 4, w, b, 1e-5, activation, backend=backend), x, w, b, dy, [True] * 3)
    want = _outputs(lambda x, w, b: _torch_group_norm(x, 4, w, b, 1e-5, activation), x, w, b, dy, [True] * 3)
    for name, o, r in zip(("y", "dx", "dweight", "dbias"), out, want):
        assert torch.equal(torch.isnan(o), torch.isnan(r)), f"{name}: NaN elements differ from torch's"
        assert torch.equal(torch.isfinite(o), torch.isfinite(r)), f"{name}: finite elements differ from torch's"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype,scale,offset", [(torch.float32, 1.0, 3e4), (torch.float16, 10.0, -1e4)], ids=str)
def test_data_far_from_zero(dtype, scale, offset, layout, backend, device, split_path):
    """Data far from zero with a small spread: a variance formed as E[x^2] - E[x]^2 would cancel (float32 keeps
    7 digits of 3e4^2); every path keeps torch's accuracy, the split path's partials included."""
    x = (torch.randn(3, 6, 5, 7, device=device) * scale + offset).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(6, device=device).to(dtype), torch.randn(6, device=device).to(dtype)
    _skip_unsupported(backend, x, 3, w, b, 1e-5, "silu")
    dy = torch.randn(x.shape, device=device)
    out = _outputs(lambda x, w, b: group_norm(x, 3, w, b, 1e-5, "silu", backend=backend), x, w, b, dy, [True] * 3)
    ref = _outputs(lambda x, w, b: group_norm_reference(x, 3, w, b, 1e-5, "silu"), x, w, b, dy, [True] * 3)
    up = [t.double() for t in (x, w, b)]
    ref64 = _outputs(lambda x, w, b: _torch_group_norm(x, 3, w, b, 1e-5, "silu"), *up, dy.double(), [True] * 3)
    for i, (o, r, r64) in enumerate(zip(out, ref, ref64)):
        assert_criterion(o, r, r64, f"output {i}", relative_floor=i > 0)


def test_compiled_backward_computes_only_the_gradients_needed(monkeypatch):
    """The traced backward op computed dx, dweight and dbias whatever was needed (a pass and a write of dx for an
    input that requires no grad, the first layer's, say); it now passes autograd's needs on, as the eager backward
    does, and the gradients it does compute are the eager ones."""
    gn = importlib.import_module("genkernels.ops.group_norm")
    calls = []
    select = gn._impl_for

    class Recording:
        def __init__(self, impl):
            self.impl = impl

        def group_norm_forward(self, *args):
            return self.impl.group_norm_forward(*args)

        def group_norm_backward(self, *args):
            calls.append(args[-3:])
            return self.impl.group_norm_backward(*args)

    monkeypatch.setattr(gn, "_impl_for", lambda *args: Recording(select(*args)))
    torch._dynamo.reset()
    x = torch.randn(2, 8, 3, 3)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8)

    def fn(x, w, b):
        return (gn.group_norm(x, 4, w, b, activation="silu", backend="reference") ** 2).sum()

    got = torch.autograd.grad(torch.compile(fn, backend="aot_eager", fullgraph=True)(x, w, b), (w,))
    assert calls == [(False, True, False)]
    want = torch.autograd.grad(fn(x, w, b), (w,))
    torch.testing.assert_close(got, want)
