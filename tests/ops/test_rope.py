"""rope: outputs and gradients of every backend against the reference under the DESIGN.md criterion
(dtypes, head dims 40 / 72 / 128, odd L, grouped k, partial rotary, both pair conventions, the transposed
(B, L, H, Dh) views attention layers produce), in place without copies, the reference against an
independent complex-number formula, the tables, gradcheck, torch.library ops under opcheck and
torch.compile, and errors."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from genkernels.ops import rope, rope_frequencies, rope_frequencies_2d
from tests.criterion import assert_criterion
from tests.op_inputs import skip_unsupported

RP = importlib.import_module("genkernels.ops.rope")
FAST = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["reference", *FAST]
# The Triton interpreter mishandles bfloat16: bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
pytestmark = pytest.mark.usefixtures("one_thread")


def _make(shape, dtype, device, layout="contiguous", scale=2.0):
    """A (B, H, L, Dh) tensor in ``layout``: "contiguous", "bl" (a (B, L, H, Dh) tensor transposed), "qkv"
    (the k slot of a (B, L, 3, H, Dh) fused projection, viewed as (B, H, L, Dh): heads inner, not dense),
    "padded" (rows of a wider tensor: any row strides) or "last" (last stride 2: copied once)."""
    b, h, length, dh = shape
    x = torch.randn(shape, device=device) * scale
    if layout == "bl":
        return x.transpose(1, 2).contiguous().transpose(1, 2).to(dtype)
    if layout == "qkv":
        qkv = torch.randn(b, length, 3, h, dh, device=device) * scale
        qkv[:, :, 1] = x.transpose(1, 2)
        return qkv.to(dtype).permute(2, 0, 3, 1, 4)[1]
    if layout == "padded":
        return torch.cat([x, torch.zeros_like(x[..., :3])], dim=-1)[..., :dh].to(dtype)
    if layout == "last":
        return torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0].to(dtype)
    return x.to(dtype)


def _tables(length, pairs, device, offset=0):
    return rope_frequencies(torch.arange(offset, offset + length, device=device), 2 * pairs)


def _run(q, k, cos, sin, backend, interleaved, dq, dk):
    """(q_out, k_out, dq, dk) with the gradients of sum(q_out * dq) + sum(k_out * dk)."""
    q = q.detach().requires_grad_(True)
    k = k.detach().requires_grad_(True)
    qo, ko = rope(q, k, cos, sin, interleaved=interleaved, backend=backend)
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq.to(qo.dtype), dk.to(ko.dtype)))
    return qo, ko, gq, gk


def _check(backend, q, k, cos, sin, interleaved):
    dq = torch.randn(q.shape, device=q.device, dtype=torch.float64)
    dk = torch.randn(k.shape, device=q.device, dtype=torch.float64)
    out = _run(q, k, cos, sin, backend, interleaved, dq, dk)
    ref = _run(q, k, cos, sin, "reference", interleaved, dq, dk)
    truth = _run(q.double(), k.double(), cos.double(), sin.double(), "reference", interleaved, dq, dk)
    for name, o, r, t in zip(("q_out", "k_out", "dq", "dk"), out, ref, truth):
        assert_criterion(o, r, t, name)
    return out


# (B, H, Hk, L, Dh, pairs): head dims 40 / 72 / 128, odd L, L = 1, grouped k, partial rotary (pairs < Dh/2);
# head dims 12 and 6: rows whose strides are multiples of 4 and of 2 elements only (the triton kernel's VEC);
# P = 20 and 36 of the triton kernel's two pair blocks (16 + 4, 32 + 4), partial (72, 20) and whole.
CASES = [
    (1, 2, 1, 3, 72, 20),
    (2, 3, 1, 5, 40, 20),
    (1, 2, 2, 7, 72, 36),
    (2, 2, 1, 3, 128, 64),
    (1, 2, 1, 1, 72, 16),
    (2, 1, 1, 9, 40, 13),
    (2, 2, 1, 3, 12, 6),
    (1, 3, 1, 5, 6, 3),
]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("interleaved", [False, True])
def test_backends_dtypes_and_sizes(backend, dtype, case, interleaved, device):
    b, h, hk, length, dh, pairs = case
    q = _make((b, h, length, dh), dtype, device)
    k = _make((b, hk, length, dh), dtype, device)
    cos, sin = _tables(length, pairs, device, offset=3)
    skip_unsupported(backend, RP.OP, q, k, cos, sin)
    _check(backend, q, k, cos, sin, interleaved)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["bl", "qkv", "padded", "last"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_layouts(backend, layout, interleaved, device):
    q = _make((2, 3, 5, 40), torch.float16, device, layout)
    k = _make((2, 1 if layout != "qkv" else 3, 5, 40), torch.float16, device, layout)
    cos, sin = _tables(5, 16, device)
    skip_unsupported(backend, RP.OP, q, k, cos, sin)
    qo, ko, _, _ = _check(backend, q, k, cos, sin, interleaved)
    if layout == "bl":  # the output keeps the (B, L, H, Dh) memory order, ready for attention
        assert qo.stride() == q.stride() and ko.stride() == k.stride()
    if layout == "qkv":  # dense (B, L, H, Dh) memory: attention's output then merges its heads without a copy
        assert qo.stride() == ko.stride() == (5 * 3 * 40, 40, 3 * 40, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["bl", "padded", "last"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_inplace(backend, layout, interleaved, device):
    """In place equals out of place; the tensors keep their storage; the pass-through channels stay."""
    q = _make((2, 3, 5, 72), torch.float16, device, layout)
    k = _make((2, 1, 5, 72), torch.float16, device, layout)
    cos, sin = _tables(5, 20, device)
    skip_unsupported(backend, RP.OP, q, k, cos, sin)
    want_q, want_k = rope(q, k, cos, sin, interleaved=interleaved, backend=backend)
    ptrs, versions = (q.data_ptr(), k.data_ptr()), (q._version, k._version)
    out_q, out_k = rope(q, k, cos, sin, inplace=True, interleaved=interleaved, backend=backend)
    assert out_q is q and out_k is k
    assert (q.data_ptr(), k.data_ptr()) == ptrs
    assert q._version > versions[0] and k._version > versions[1]
    torch.testing.assert_close(q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(k, want_k, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_on_one_qkv_buffer(backend, device):
    """q and k as views of one fused (B, L, 3, H, Dh) projection share a storage but no element: rotated in
    place, they equal the out-of-place result and v's slot is untouched."""
    qkv = torch.randn(2, 5, 3, 3, 16, device=device)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    cos, sin = _tables(5, 8, device)
    skip_unsupported(backend, RP.OP, q, k, cos, sin)
    want_q, want_k = rope(q, k, cos, sin, backend=backend)
    v_before = v.clone()
    rope(q, k, cos, sin, inplace=True, backend=backend)
    torch.testing.assert_close(q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(k, want_k, rtol=0, atol=0)
    assert torch.equal(v, v_before)


@pytest.mark.parametrize(
    "views",
    [
        lambda x: (x, x),  # the same tensor: rotated twice
        lambda x: (x, x[:, :1]),  # k = q's first head
        lambda x: (x[:, :2], x[:, 1:]),  # overlapping head ranges
        lambda x: (x, x[:, :1].expand(2, 2, 3, 8)),  # k broadcast over q's heads
    ],
    ids=["same", "prefix", "overlap", "expanded-k"],
)
def test_inplace_refuses_shared_elements(views, device):
    """In place, every element is written once from its old value: q and k sharing elements (or an expanded view
    whose elements repeat) would be rotated twice, so the call is refused and nothing is written."""
    x = torch.randn(2, 3, 3, 8, device=device)
    q, k = views(x)
    before = x.clone()
    cos, sin = _tables(3, 4, device)
    with pytest.raises(ValueError, match="rope\\(inplace=True\\)"):
        rope(q, k, cos, sin, inplace=True)
    assert torch.equal(x, before)


def test_may_overlap_is_exact_on_views_of_one_buffer():
    """The overlap test against the element sets themselves, on slices of one buffer with shared strides."""
    buf = torch.zeros(2, 4, 3, 2, 5)
    flat = buf.view(-1)

    def elements(t):
        index = torch.as_strided(torch.arange(flat.numel()), t.shape, t.stride(), t.storage_offset())
        return set(index.flatten().tolist())

    views = [buf[:, :, i].transpose(1, 2) for i in range(3)] + [buf[:, :, 0, :1].transpose(1, 2)]
    views += [buf.view(2, -1)[:, a:b] for a, b in ((0, 10), (10, 20), (5, 15), (0, 1), (119, 120))]
    views += [flat[a::3][:n] for a, n in ((0, 7), (1, 7), (3, 4), (2, 9))]
    exact = 0
    for a in views:
        for b in views:
            shared = bool(elements(a) & elements(b))
            if a.stride() == b.stride():  # exact
                assert RP._may_overlap(a, b) == shared, (a.shape, a.stride(), b.shape, b.stride())
                exact += 1
            elif shared:  # other layouts: never a miss (disjoint ones may be reported as overlapping)
                assert RP._may_overlap(a, b), (a.shape, a.stride(), b.shape, b.stride())
    assert exact > len(views)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["qkv", "last"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_k_out_writes_a_cache_slot(backend, layout, interleaved, device):
    """k_out: k's rotation lands in a slot of a (B, Hk, max_len, Dh) cache (strided, no copy after), bit for bit
    what out of place returns; q's rotation as out of place; the rest of the cache untouched."""
    q = _make((2, 3, 4, 72), torch.float16, device, layout)
    k = _make((2, 1, 4, 72), torch.float16, device, layout)
    cos, sin = _tables(4, 20, device, offset=5)
    skip_unsupported(backend, RP.OP, q, k, cos, sin)
    want_q, want_k = rope(q, k, cos, sin, interleaved=interleaved, backend=backend)
    cache = torch.full((2, 1, 16, 72), 7.0, device=device, dtype=torch.float16)
    slot = cache[:, :, 5:9]
    version = cache._version
    got_q, got_k = rope(q, k, cos, sin, interleaved=interleaved, k_out=slot, backend=backend)
    assert got_k is slot and cache._version > version
    torch.testing.assert_close(got_q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(slot, want_k, rtol=0, atol=0)
    assert (cache[:, :, :5] == 7).all() and (cache[:, :, 9:] == 7).all()


def test_k_out_refusals(device):
    q = torch.randn(1, 2, 3, 8, device=device)
    k = torch.randn(1, 1, 3, 8, device=device)
    cos, sin = _tables(3, 4, device)
    for kwargs, error, match in (
        ({"k_out": [1.0]}, TypeError, "k_out must be a torch.Tensor or None"),
        ({"k_out": torch.empty_like(k), "inplace": True}, ValueError, "k_out and inplace=True exclude each other"),
        ({"k_out": torch.empty(1, 2, 3, 8, device=device)}, ValueError, r"k_out must match k \(\(1, 1, 3, 8\)"),
        ({"k_out": torch.empty(1, 1, 3, 16, device=device)[..., ::2]}, ValueError, "unit last stride"),
        ({"k_out": k[:, :, :]}, ValueError, "must not share memory with k"),
    ):
        with pytest.raises(error, match=match):
            rope(q, k, cos, sin, **kwargs)
    with pytest.raises(ValueError, match="k_out needs k"):
        rope(q, None, cos, sin, k_out=torch.empty_like(k))
    with pytest.raises(RuntimeError, match=r"k_out=\.\.\.\) writes outside autograd and q requires grad"):
        rope(q.requires_grad_(True), k, cos, sin, k_out=torch.empty_like(k))
    with torch.no_grad():  # allowed: nothing is recorded
        rope(q, k, cos, sin, k_out=torch.empty_like(k))


def test_inplace_refuses_tensors_that_need_grad(device):
    q = torch.randn(1, 2, 3, 8, device=device, requires_grad=True)
    k = torch.randn(1, 2, 3, 8, device=device)
    cos, sin = _tables(3, 4, device)
    with pytest.raises(RuntimeError, match="cannot overwrite q, which requires grad"):
        rope(q, k, cos, sin, inplace=True)
    with pytest.raises(RuntimeError, match="cannot overwrite k, which requires grad"):
        rope(k, q * 1, cos, sin, inplace=True)
    with torch.no_grad():  # allowed: no autograd graph records the values
        rope(q, None, cos, sin, inplace=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_k(backend, device):
    q = _make((1, 2, 6, 40), torch.float32, device, "bl")
    cos, sin = _tables(6, 20, device)
    skip_unsupported(backend, RP.OP, q, None, cos, sin)
    qo, ko = rope(q, None, cos, sin, backend=backend)
    want, _ = rope(q, q, cos, sin, backend="reference")
    assert ko is None
    torch.testing.assert_close(qo, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward(backend, device):
    """The backward is the inverse rotation, itself differentiable (the forward rotation again)."""
    q = torch.randn(1, 2, 5, 40, device=device)
    cos, sin = _tables(5, 20, device)
    skip_unsupported(backend, RP.OP, q, None, cos, sin)
    results = []
    dy64 = torch.randn(q.shape, device=device, dtype=torch.float64)
    for be, qq, cc, ss in ((backend, q, cos, sin), ("reference", q.double(), cos.double(), sin.double())):
        qq = qq.detach().requires_grad_(True)
        dy = dy64.to(qq.dtype).requires_grad_(True)
        (qo, _) = rope(qq, None, cc, ss, backend=be)
        (dq,) = torch.autograd.grad(qo, qq, dy, create_graph=True)
        (ddy,) = torch.autograd.grad((dq * dq.detach()).sum(), dy)
        results.append((dq, ddy))
    for a, t in zip(results[0], results[1]):
        torch.testing.assert_close(a.double(), t, atol=1e-5, rtol=1e-5)


def test_tables_that_need_grad_run_on_every_backend(device):
    q = torch.randn(1, 2, 4, 8, device=device)
    cos, sin = (t.requires_grad_(True) for t in _tables(4, 4, device))
    reasons = __import__("genkernels").explain(RP.OP, q, None, cos, sin)
    assert reasons["triton"] is None and reasons["reference"] is None
    qo, _ = rope(q, None, cos, sin)
    gc, gs = torch.autograd.grad(qo.sum(), (cos, sin))
    assert gc.shape == cos.shape and gs.shape == sin.shape


# --------------------------------------------------------------------------- the reference and the tables


def test_triton_pair_blocks():
    """A row's pairs are one power-of-two block, or two where they cover fewer lanes than next_pow2(P)."""
    from genkernels.triton.rope import _pair_blocks

    assert _pair_blocks(36) == (32, 4)  # DiT-XL: 36 lanes, where one block had 64
    assert _pair_blocks(20) == (16, 4) and _pair_blocks(40) == (32, 8) and _pair_blocks(3) == (2, 1)
    assert _pair_blocks(64) == (64, 0) and _pair_blocks(13) == (16, 0) and _pair_blocks(100) == (128, 0)
    for p in range(1, 300):
        hb, hb2 = _pair_blocks(p)
        assert hb + hb2 >= p and hb & (hb - 1) == 0 and hb2 & (hb2 - 1) == 0 and hb + hb2 <= 1 << (p - 1).bit_length()


def test_reference_is_the_complex_rotation():
    """Each pair (x1, x2) as x1 + i x2 is multiplied by exp(i angle), in both pair conventions."""
    q = torch.randn(2, 3, 5, 12, dtype=torch.float64)
    positions = torch.arange(5)
    cos, sin = rope_frequencies(positions, 8)
    angles = positions[:, None].double() * 10000.0 ** (-torch.arange(4).double() * 2 / 8)
    rot = torch.polar(torch.ones_like(angles), angles)
    for interleaved in (False, True):
        if interleaved:
            z = torch.complex(q[..., 0:8:2], q[..., 1:8:2]) * rot
            want = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
        else:
            z = torch.complex(q[..., :4], q[..., 4:8]) * rot
            want = torch.cat((z.real, z.imag), dim=-1)
        want = torch.cat((want, q[..., 8:]), dim=-1)
        out, _ = rope(q, None, cos.double(), sin.double(), interleaved=interleaved, backend="reference")
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)  # tables are float32


def test_reference_gradcheck():
    q = torch.randn(1, 2, 3, 10, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 3, 10, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double().requires_grad_(True) for t in _tables(3, 4, "cpu"))
    for interleaved in (False, True):
        fn = lambda q, k, c, s: rope(q, k, c, s, interleaved=interleaved, backend="reference")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, cos, sin))


def test_rope_frequencies():
    positions = torch.tensor([0, 1, 7, 4095])
    cos, sin = rope_frequencies(positions, 6, base=100.0)
    assert cos.shape == (4, 3) and cos.dtype == torch.float32
    angles = positions[:, None].double() * torch.tensor(
        [1.0, 100.0 ** (-2 / 6), 100.0 ** (-4 / 6)], dtype=torch.float64
    )
    torch.testing.assert_close(cos, torch.cos(angles).float(), atol=1e-7, rtol=0)
    torch.testing.assert_close(sin, torch.sin(angles).float(), atol=1e-7, rtol=0)
    c2, s2 = rope_frequencies(positions.float(), 6, base=100)
    torch.testing.assert_close((c2, s2), (cos, sin))
    # dtype=torch.float64: the float64 values, rounded once (not float32 tables widened).
    c64, s64 = rope_frequencies(positions, 6, base=100.0, dtype=torch.float64)
    assert c64.dtype == s64.dtype == torch.float64
    torch.testing.assert_close((c64, s64), (torch.cos(angles), torch.sin(angles)), atol=1e-15, rtol=0)


def test_rope_frequencies_2d():
    """Pairs j < dim/4 turn with the row, the others with the column, each as a dim/2 1-D rope."""
    h, w, dim = 3, 5, 16
    cos, sin = rope_frequencies_2d(h, w, dim, base=50.0)
    assert cos.shape == (h * w, dim // 2) and sin.shape == (h * w, dim // 2)
    rows, cols = torch.arange(h * w) // w, torch.arange(h * w) % w
    cr, sr = rope_frequencies(rows, dim // 2, 50.0)
    cc, sc = rope_frequencies(cols, dim // 2, 50.0)
    torch.testing.assert_close(cos, torch.cat((cr, cc), -1), rtol=0, atol=0)
    torch.testing.assert_close(sin, torch.cat((sr, sc), -1), rtol=0, atol=0)
    # Patch (r, c) with interleaved pairs: the first dim/2 channels see the row only.
    q = torch.randn(1, 1, h * w, dim, dtype=torch.float64)
    out, _ = rope(q, None, cos.double(), sin.double(), interleaved=True)
    same_row = [0, 1]  # patches (0, 0) and (0, 1)
    torch.testing.assert_close(
        out[0, 0, same_row, : dim // 2] - q[0, 0, same_row, : dim // 2], torch.zeros(2, dim // 2, dtype=torch.float64)
    )
    assert not torch.allclose(out[0, 0, 1, dim // 2 :], q[0, 0, 1, dim // 2 :])
    assert math.isclose(cos[w, 0].item(), math.cos(1.0), rel_tol=1e-6)  # patch (1, 0): row angle 1


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda q, c, s: rope(q[0], None, c, s), ValueError, r"q must have 4 dimensions"),
        (lambda q, c, s: rope(q.long(), None, c, s), TypeError, "q must be float32"),
        (lambda q, c, s: rope(q, q[:, :, :2], c, s), ValueError, r"k must have shape \(2, Hk, 3, 8\)"),
        (lambda q, c, s: rope(q, q.half(), c, s), TypeError, "k has dtype"),
        (lambda q, c, s: rope(q, q.to("meta"), c, s), ValueError, "k is on meta"),
        (lambda q, c, s: rope(q, None, c[:2], s[:2]), ValueError, r"cos must have shape \(3, P\)"),
        (lambda q, c, s: rope(q, None, torch.ones(3, 5), torch.ones(3, 5)), ValueError, "1 <= P <= 4"),
        (lambda q, c, s: rope(q, None, c, s[:, :2]), ValueError, "sin must have cos's shape"),
        (lambda q, c, s: rope(q, None, c.long(), s), TypeError, "cos must be a floating-point"),
        (lambda q, c, s: rope(q, None, c, s.to("meta")), ValueError, "sin is on meta"),
        (lambda q, c, s: rope(q, None, c, s, interleaved=1), TypeError, "interleaved must be a bool"),
        (lambda q, c, s: rope(q, None, c, s, backend="cuda"), Exception, "cuda"),
        (lambda q, c, s: rope_frequencies(torch.arange(3), 5), ValueError, "dim must be a positive int multiple of 2"),
        (lambda q, c, s: rope_frequencies(torch.zeros(2, 2), 4), ValueError, r"positions must have shape \(L,\)"),
        (lambda q, c, s: rope_frequencies([0, 1], 4), TypeError, "positions must be a torch.Tensor"),
        (lambda q, c, s: rope_frequencies(torch.arange(3), 4, base=1.0), ValueError, "base must be a finite"),
        (lambda q, c, s: rope_frequencies_2d(2, 3, 6), ValueError, "dim must be a positive int multiple of 4"),
        (lambda q, c, s: rope_frequencies_2d(0, 3, 8), ValueError, "height must be an int >= 1"),
        (lambda q, c, s: rope_frequencies(torch.arange(3), 4, dtype=torch.int32), TypeError, "floating torch.dtype"),
    ],
)
def test_bad_input(call, error, match):
    cos, sin = _tables(3, 4, "cpu")
    with pytest.raises(error, match=match):
        call(torch.randn(2, 2, 3, 8), cos, sin)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend, device):
    q = torch.randn(0, 2, 3, 8, device=device)
    cos, sin = _tables(3, 4, device)
    qo, ko = rope(q, q, cos, sin, backend=backend)
    assert qo.shape == q.shape and ko.shape == q.shape


# --------------------------------------------------------------------------- torch.library ops and compile


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_k", [True, False])
def test_opcheck(backend, with_k, device):
    q = _make((2, 3, 5, 40), torch.float32, device, "qkv").detach().requires_grad_(True)
    k = _make((2, 1, 5, 40), torch.float32, device, "padded").requires_grad_(True) if with_k else None
    cos, sin = _tables(5, 16, device)
    skip_unsupported(backend, RP.OP, q, k, cos, sin)
    for interleaved in (False, True):
        torch.library.opcheck(torch.ops.genkernels.rope.default, (q, k, cos, sin, interleaved, False, backend))
    qi = q.detach().clone()
    ki = None if k is None else k.detach().clone()
    torch.library.opcheck(torch.ops.genkernels.rope_.default, (qi, ki, cos, sin, True, backend))
    if k is not None:
        k_out = torch.empty(k.shape[0], k.shape[1], 9, k.shape[3], device=device)[:, :, 2:7]
        args = (q.detach(), k.detach(), cos, sin, k_out, False, backend)
        torch.library.opcheck(torch.ops.genkernels.rope_into.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, device):
    """Forward, backward and the in-place call trace without graph breaks and match the eager call."""
    torch._dynamo.reset()
    q = _make((1, 2, 5, 40), torch.float32, device, "bl")
    k = _make((1, 1, 5, 40), torch.float32, device, "bl")
    cos, sin = _tables(5, 16, device)
    skip_unsupported(backend, RP.OP, q, k, cos, sin)

    def fn(q, k):
        qo, ko = rope(q, k, cos, sin, backend=backend)
        return qo * 2 + 1, ko

    leaves = [t.detach().requires_grad_(True) for t in (q, k)]
    out = fn(*leaves)
    grads = torch.autograd.grad(sum((o * o).sum() for o in out), leaves)
    cleaves = [t.detach().requires_grad_(True) for t in (q, k)]
    cout = torch.compile(fn, fullgraph=True)(*cleaves)
    cgrads = torch.autograd.grad(sum((o * o).sum() for o in cout), cleaves)
    for a, b in zip((*cout, *cgrads), (*out, *grads)):
        torch.testing.assert_close(a, b)

    def fn_inplace(q, k):
        rope(q, k, cos, sin, inplace=True, interleaved=True, backend=backend)
        return q + 0, k + 0

    want = rope(q.clone(), k.clone(), cos, sin, interleaved=True, backend=backend)
    with torch.no_grad():
        qc, kc = q.clone(), k.clone()
        got = torch.compile(fn_inplace, fullgraph=True)(qc, kc)
    for a, b in zip((*got, qc, kc), (*want, *want)):
        torch.testing.assert_close(a, b)

    def fn_into(q, k, k_out):
        qo, _ = rope(q, k, cos, sin, k_out=k_out, backend=backend)
        return qo * 2

    with torch.no_grad():
        slot = torch.zeros(1, 1, 8, 40, device=device)[:, :, 1:6]
        got = torch.compile(fn_into, fullgraph=True)(q, k, slot)
        want = rope(q, k, cos, sin, backend=backend)
    torch.testing.assert_close(got, want[0] * 2)
    torch.testing.assert_close(slot, want[1])


def test_k_out_may_share_a_buffer_with_k_without_sharing_elements():
    """k_out is refused where it shares elements with q or k (the overlap test of inplace), not merely a storage:
    a slot of one buffer that also holds k receives k's rotation."""
    buf = torch.randn(2, 1, 1, 3, 8)
    q, k, k_out = torch.randn(1, 2, 3, 8), buf[0], buf[1]
    cos, sin = _tables(3, 4, "cpu")
    with torch.no_grad():
        _, got = rope(q, k, cos, sin, k_out=k_out)
    assert got.data_ptr() == k_out.data_ptr()
    torch.testing.assert_close(k_out, rope(q, k, cos, sin)[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="must not share memory with k"):
        rope(q, k, cos, sin, k_out=buf.view(-1)[4 : 4 + 24].view(1, 1, 3, 8))
