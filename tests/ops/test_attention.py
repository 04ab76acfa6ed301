"""Attention: every backend against the reference under the DESIGN.md criterion, outputs and dq, dk, dv."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import genkernels
from genkernels.ops import attention, attention_reference
from tests.criterion import assert_criterion

FAST = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["reference", *FAST]
# The Triton interpreter mishandles bfloat16: bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]

# (B, Hq, Hkv, Lq, Lkv, D): lengths 1, 17, 77, 128, 1000; every listed head dim; cross with
# Lq != Lkv both ways; GQA and MQA.
SHAPES = [
    (2, 2, 2, 17, 17, 64),
    (1, 2, 2, 1, 1, 32),
    (1, 2, 2, 1, 77, 40),  # one query (decoding) over 77 keys
    (2, 2, 2, 77, 17, 80),  # more queries than keys
    (1, 2, 2, 128, 77, 96),  # text cross-attention shape
    (1, 1, 1, 128, 128, 128),
    (1, 4, 2, 33, 48, 64),  # GQA, 2 query heads a kv head
    (2, 4, 1, 17, 30, 40),  # MQA
    (1, 1, 1, 200, 1000, 32),  # long keys: many key blocks, a ragged last one
]
# Beyond the diffusion head dims: small, odd and the largest accepted.
ODD_HEAD_DIMS = [8, 24, 72, 160, 256]


def _skip_unsupported(backend, q, k, v, grad=False, **kwargs):
    """Skip when ``backend`` cannot run this call; ``grad``: asked of inputs that require gradients, as a
    training call's are (the cuda backend is forward-only)."""
    if backend == "reference":
        return
    if grad:
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    reason = genkernels.explain("attention", q, k, v, **kwargs)[backend]
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _qkv(b, hq, hkv, lq, lkv, d, dtype, device, magnitude=1.0):
    q = (torch.randn(b, hq, lq, d, device=device) * magnitude).to(dtype)
    k = (torch.randn(b, hkv, lkv, d, device=device) * magnitude).to(dtype)
    v = torch.randn(b, hkv, lkv, d, device=device).to(dtype)
    return q, k, v


def _padding_mask(b, lkv, device, kind):
    """A (B, Lkv) key padding mask: random, all but one key of a row, or every key of a row."""
    mask = torch.rand(b, lkv, device=device) < 0.3
    if kind == "all-but-one":
        mask[0] = True
        mask[0, lkv // 2] = False
    elif kind == "all":
        mask[0] = True
    return mask


def _run(backend, q, k, v, dout, **kwargs):
    """Output and (dq, dk, dv) of attention on `backend` (the reference in q's dtype if None)."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    if backend is None:
        out = attention_reference(*leaves, **kwargs)
    else:
        out = attention(*leaves, backend=backend, **kwargs)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype)) if dout is not None else (None, None, None)
    return out, grads


def _compare(backend, q, k, v, check_grads=True, **kwargs):
    if backend == "cuda":  # forward only: the cuda backend refuses calls that need gradients
        check_grads = False
    dout = torch.randn(q.shape, device=q.device) if check_grads else None
    with torch.set_grad_enabled(check_grads):
        out, gout = _run(backend, q, k, v, dout, **kwargs)
    ref, gref = _run(None, q, k, v, dout, **kwargs)
    ref64, g64 = _run(None, q.double(), k.double(), v.double(), None if dout is None else dout.double(), **kwargs)
    assert out.shape == q.shape
    assert_criterion(out, ref, ref64, "out")
    if check_grads:
        for name, o, r, r64 in zip(("dq", "dk", "dv"), gout, gref, g64):
            assert_criterion(o, r, r64, name)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_reference(backend, dtype, shape, causal, device):
    q, k, v = _qkv(*shape, dtype, device)
    _skip_unsupported(backend, q, k, v, causal=causal)
    _compare(backend, q, k, v, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "all-but-one", "all"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_padding_mask(backend, dtype, kind, causal, device):
    """Masked keys are ignored; a row whose keys are all padding outputs zeros with zero gradients."""
    q, k, v = _qkv(2, 2, 1, 21, 77, 40, dtype, device)
    mask = _padding_mask(2, 77, device, kind)
    _skip_unsupported(backend, q, k, v, causal=causal, key_padding_mask=mask)
    _compare(backend, q, k, v, causal=causal, key_padding_mask=mask)
    if kind == "all":
        out = attention(q, k, v, causal=causal, key_padding_mask=mask, backend=backend)
        assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", ODD_HEAD_DIMS)
def test_other_head_dims(backend, dtype, d, device):
    q, k, v = _qkv(1, 2, 2, 19, 23, d, dtype, device)
    _skip_unsupported(backend, q, k, v, causal=True)
    _compare(backend, q, k, v, causal=True)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("layout", ["bhld-view", "expanded", "d-strided"])
def test_strided_inputs(backend, layout, device):
    """(B, L, H, D) tensors viewed as (B, H, L, D), keys shared across the batch, a non-unit D stride."""
    b, h, lq, lkv, d = 2, 3, 19, 26, 40
    if layout == "bhld-view":
        q = torch.randn(b, lq, h, d, device=device).transpose(1, 2)
        k = torch.randn(b, lkv, h, d, device=device).transpose(1, 2)
        v = torch.randn(b, lkv, h, d, device=device).transpose(1, 2)
    elif layout == "expanded":
        q = torch.randn(b, h, lq, d, device=device)
        k = torch.randn(1, h, lkv, d, device=device).expand(b, -1, -1, -1)
        v = torch.randn(1, h, lkv, d, device=device).expand(b, -1, -1, -1)
    else:
        q = torch.randn(b, h, lq, 2 * d, device=device)[..., ::2]
        k = torch.randn(b, h, lkv, d, device=device)
        v = torch.randn(b, h, lkv, 2 * d, device=device)[..., 1::2]
    _skip_unsupported(backend, q, k, v)
    _compare(backend, q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [16, 40, 72])
@pytest.mark.parametrize("order", ["heads-inner", "contiguous", "d-strided"])
def test_output_follows_q_layout(backend, d, order, device):
    """out has q's memory order: heads inner where q's are (merging the heads is then a view, no copy), else
    contiguous; the values are those of contiguous inputs. d = 40 and 72: the forward's split head dims, whose
    strides are not multiples of 16 elements."""
    b, h, lq, lkv = 2, 3, 19, 26
    dtype = torch.float16 if backend == "cuda" else torch.float32
    q, k, v = _qkv(b, h, h, lq, lkv, d, dtype, device)
    if order == "heads-inner":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    elif order == "d-strided":
        q = torch.stack([q, q], -1).flatten(-2)[..., ::2]
    _skip_unsupported(backend, q, k, v)
    with torch.no_grad():
        out = attention(q, k, v, backend=backend)
        plain = attention(q.contiguous(), k.contiguous(), v.contiguous(), backend=backend)
    assert out.shape == q.shape
    if order == "heads-inner":
        assert out.stride() == (lq * h * d, d, h * d, 1)
        merged = out.transpose(1, 2).reshape(b, lq, h * d)
        assert merged.data_ptr() == out.data_ptr() and merged._base is not None
    else:
        assert out.is_contiguous()
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    _compare(backend, q, k, v)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)], ids=str)
def test_large_magnitudes(backend, dtype, device):
    """Scores with a standard deviation of 128: the running maximum must keep the exponentials in range.

    Forward only: with a one-hot softmax, dS is rounded to the input dtype before the dq and dk
    products (as in every FlashAttention backward), an error of the size of the output's own
    rounding, which the criterion's factor 2 does not cover there. Gradients are checked on
    peaked but realistic scores (standard deviation 4) below.
    """
    q, k, v = _qkv(1, 2, 2, 40, 50, 64, dtype, device, magnitude=4.0)
    _skip_unsupported(backend, q, k, v, scale=1.0)
    _compare(backend, q, k, v, check_grads=False, scale=1.0)
    q, k, v = _qkv(1, 2, 2, 40, 50, 64, dtype, device, magnitude=2.0)
    _compare(backend, q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 2, 5, 7, 16), (2, 2, 2, 0, 7, 16), (2, 2, 2, 5, 0, 16)], ids=str)
def test_empty(backend, shape, device):
    """Batch 0 or length 0: empty (or all-zero, when no key exists) results and gradients, no launch. An
    explicit backend still refuses what it would refuse for non-empty inputs (cuda: float32, gradients)."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(*shape, torch.float32, device))
    _skip_unsupported(backend, q, k, v, causal=True)
    out = attention(q, k, v, causal=True, backend=backend)
    assert out.shape == q.shape
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_reference_matches_torch_sdpa(device):
    q, k, v = _qkv(2, 4, 4, 9, 13, 16, torch.float64, device)
    torch.testing.assert_close(attention_reference(q, k, v), F.scaled_dot_product_attention(q, k, v))
    # bottom-right causal equals torch's top-left causal when Lq == Lkv
    q2 = torch.randn(2, 4, 13, 16, dtype=torch.float64, device=device)
    torch.testing.assert_close(
        attention_reference(q2, k, v, causal=True), F.scaled_dot_product_attention(q2, k, v, is_causal=True)
    )
    mask = _padding_mask(2, 13, device, "random")
    torch.testing.assert_close(
        attention_reference(q, k, v, key_padding_mask=mask, scale=0.3),
        F.scaled_dot_product_attention(q, k, v, attn_mask=~mask[:, None, None, :], scale=0.3),
    )


def test_causal_is_bottom_right():
    """With Lq < Lkv the queries are the last Lq positions; with Lq > Lkv the first rows see no key."""
    k = torch.randn(1, 1, 6, 8, dtype=torch.float64)
    v = torch.randn(1, 1, 6, 8, dtype=torch.float64)
    q = torch.randn(1, 1, 6, 8, dtype=torch.float64)
    full = attention(q, k, v, causal=True)
    torch.testing.assert_close(attention(q[:, :, 4:], k, v, causal=True), full[:, :, 4:])
    tall = attention(torch.randn(1, 1, 9, 8, dtype=torch.float64), k, v, causal=True)
    assert torch.equal(tall[:, :, :3], torch.zeros_like(tall[:, :, :3]))


def test_reference_double_backward_is_exact():
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 2, 1, 5, 6, 4, torch.float64, "cpu"))
    mask = torch.tensor([[False, True, False, False, True, False]])
    assert torch.autograd.gradgradcheck(
        lambda q, k, v: attention_reference(q, k, v, causal=True, key_padding_mask=mask), (q, k, v)
    )


@pytest.mark.parametrize("backend", FAST)
def test_double_backward_is_refused(backend, device):
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 2, 2, 8, 8, 16, torch.float32, device))
    _skip_unsupported(backend, q, k, v)
    out = attention(q, k, v, backend=backend)
    with pytest.raises(RuntimeError, match=r"genkernels\.ops\.attention: the backward is first-order only"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, device):
    """The backward has no atomics: two runs give bitwise-identical gradients."""
    q, k, v = _qkv(1, 4, 2, 40, 45, 32, torch.float16, device)
    _skip_unsupported(backend, q, k, v, grad=True, causal=True)
    dout = torch.randn(q.shape, device=device)
    first = _run(backend, q, k, v, dout, causal=True)
    second = _run(backend, q, k, v, dout, causal=True)
    for a, b in zip((first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b)


def test_cuda_reports_what_it_cannot_run():
    q, k, v = _qkv(1, 2, 2, 8, 8, 16, torch.float32, "cpu")
    reasons = genkernels.explain("attention", q, k, v)
    assert reasons["reference"] is None
    assert reasons["cuda"]
    q.requires_grad_(True)
    with pytest.raises(genkernels.UnsupportedError, match="attention: backend 'cuda' cannot run this call"):
        attention(q, k, v, backend="cuda")
    assert "float64" in genkernels.explain("attention", q.double(), k.double(), v.double())["triton"]


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("order", ["contiguous", "heads-inner"])
def test_opcheck(backend, order, device):
    """The registered op and its fake agree (shapes, dtypes and strides: out in q's memory order)."""
    q, k, v = _qkv(1, 2, 1, 9, 12, 16, torch.float32, device)
    if order == "heads-inner":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    _skip_unsupported(backend, q, k, v)
    mask = _padding_mask(1, 12, device, "random")
    q.requires_grad_(backend != "cuda")
    torch.library.opcheck(
        torch.ops.genkernels.attention.default, (q, k, v, mask, True, 0.25, backend != "cuda", backend)
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_fullgraph(backend, device):
    """Projections + attention trace without graph breaks and match eager, gradients too."""
    torch._dynamo.reset()
    proj = torch.nn.Linear(32, 96).to(device)
    mask = _padding_mask(2, 10, device, "random")

    def block(x):
        q, k, v = proj(x).view(2, 10, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return attention(q, k, v, causal=True, key_padding_mask=mask).sum(1)

    x = torch.randn(2, 10, 32, device=device)
    with genkernels.backend(backend):
        expected = block(x)
        expected.square().sum().backward()
        grad = proj.weight.grad.clone()
        proj.zero_grad()
        got = torch.compile(block, fullgraph=True)(x)
        got.square().sum().backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(proj.weight.grad, grad)


def _bad(q=(2, 4, 8, 16), k=(2, 2, 6, 16), v=None, mask=None, **kwargs):
    t = [torch.randn(s) if isinstance(s, tuple) else s for s in (q, k, v if v is not None else k)]
    return (t[0], t[1], t[2]), {"key_padding_mask": mask, **kwargs}


@pytest.mark.parametrize(
    "args,error,match",
    [
        (_bad(k=(2, 2, 6, 8)), ValueError, "head dims differ: q has D=16, k and v have D=8"),
        (_bad(k=(3, 2, 6, 16)), ValueError, "batch sizes differ: q has B=2, k and v have B=3"),
        (_bad(k=(2, 3, 6, 16)), ValueError, r"query heads \(q.shape\[1\] = 4\) must be a multiple .* = 3\)"),
        (_bad(v=(2, 2, 7, 16)), ValueError, "k and v must have the same shape"),
        (_bad(mask=torch.zeros(2, 7, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape .*\(2, 6\)"),
        (_bad(mask=torch.zeros(2, 6)), TypeError, "key_padding_mask must have dtype torch.bool"),
        (_bad(k=torch.randn(2, 2, 6, 16, device="meta")), ValueError, "k is on meta but q is on cpu"),
        (_bad(q=(2, 8, 16)), ValueError, r"q must have 4 dimensions \(B, H, L, D\)"),
        (_bad(k=torch.randn(2, 2, 6, 16).half()), TypeError, "q, k and v must share one dtype"),
        (_bad(q=torch.ones(2, 4, 8, 16, dtype=torch.int64)), TypeError, "q must be float16, .* got torch.int64"),
        (_bad(scale=math.inf), ValueError, "scale must be None or a finite float"),
        (_bad(causal=1), TypeError, "causal must be a bool"),
    ],
    ids=[
        *("head-dim", "batch", "gqa", "k-v", "mask-shape", "mask-dtype"),
        *("device", "3-d", "dtype", "int", "scale", "causal"),
    ],
)
def test_bad_input(args, error, match):
    (q, k, v), kwargs = args
    with pytest.raises(error, match=match):
        attention(q, k, v, **kwargs)


# (B, Hq, Hkv, Lq, Lkv, D, causal): the benchmark's workloads, scaled down in batch and heads.
GPU_SHAPES = [
    (1, 2, 2, 4096, 4096, 40, False),
    (2, 2, 2, 4096, 77, 40, False),
    (1, 2, 2, 4096, 4096, 64, False),
    (1, 2, 2, 4608, 4608, 128, False),
    (1, 2, 2, 4096, 4096, 72, False),  # DiT-XL's heads (forward and, on sm_90, backward split 64 + 16)
    (1, 2, 2, 2048, 2048, 128, True),
    (1, 8, 2, 1000, 1000, 80, True),
    (3, 2, 1, 513, 1025, 96, True),
    (1, 2, 2, 300, 300, 256, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_large_shapes_gpu(backend, dtype, shape):
    *dims, causal = shape
    q, k, v = _qkv(*dims, dtype, "cuda")
    _skip_unsupported(backend, q, k, v, causal=causal)
    _compare(backend, q, k, v, causal=causal)


@pytest.mark.gpu
def test_cuda_graph_capture():
    """No host synchronization inside the op: it records into a CUDA graph and replays correctly."""
    for backend in ("triton", "cuda"):
        q, k, v = _qkv(2, 4, 4, 256, 77, 64, torch.float16, "cuda")
        mask = _padding_mask(2, 77, "cuda", "random")
        _skip_unsupported(backend, q, k, v, key_padding_mask=mask)
        attention(q, k, v, key_padding_mask=mask, backend=backend)  # compile / warm up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = attention(q, k, v, key_padding_mask=mask, backend=backend)
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        assert_criterion(
            out,
            attention_reference(q, k, v, key_padding_mask=mask),
            attention_reference(q.double(), k.double(), v.double(), key_padding_mask=mask),
        )


def test_triton_head_split():
    """The triton column blocks (forward, dq and dk/dv kernels): a power of two and a narrower block where the
    two cover the head dim in fewer columns than one padded block (the other tests run every split listed here,
    gradients included)."""
    from genkernels.triton.attention import _head_split

    split = {d: _head_split(d) for d in (8, 24, 32, 40, 64, 72, 80, 96, 100, 128, 160, 256)}
    assert split == {
        8: (16, 0),
        24: (32, 0),
        32: (32, 0),
        40: (32, 16),
        64: (64, 0),
        72: (64, 16),
        80: (64, 16),
        96: (64, 32),
        100: (128, 0),
        128: (128, 0),
        160: (128, 32),
        256: (256, 0),
    }


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("d", [40, 72])
def test_triton_backward_split_by_arch(arch, d, monkeypatch):
    """The dq and dk/dv kernels split the head dim on sm_90 and pad it elsewhere: both paths against the
    reference, gradients included (CPU tensors take FALLBACK_ARCH's configuration)."""
    from genkernels.triton import attention as triton_attention

    monkeypatch.setattr(triton_attention, "FALLBACK_ARCH", arch)
    q, k, v = _qkv(1, 2, 1, 19, 23, d, torch.float16, torch.device("cpu"))
    want = triton_attention._head_split(d) if arch == 90 else (64 if d == 40 else 128, 0)
    assert triton_attention._backward_split(q) == want
    _skip_unsupported("triton", q, k, v)
    _compare("triton", q, k, v, causal=True)


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_float32_column_blocks(arch, monkeypatch):
    """float32 head dims beyond 128 take two column blocks of at most 128 in the forward and in both backward
    kernels on every target (each product over D two FMA chains, added; the backward recomputes the forward's
    scores with the same chains); 16-bit and narrower float32 calls keep their splits."""
    from genkernels.triton import attention as triton_attention

    monkeypatch.setattr(triton_attention, "FALLBACK_ARCH", arch)

    def blocks(d, dtype, backward):
        return triton_attention._column_blocks(torch.empty(1, 1, 1, d, dtype=dtype), backward)

    for d, want in {129: (128, 16), 160: (128, 32), 200: (128, 128), 256: (128, 128)}.items():
        assert blocks(d, torch.float32, False) == blocks(d, torch.float32, True) == want
    for d in (40, 72, 128, 160, 256):
        q = torch.empty(1, 1, 1, d, dtype=torch.float16)
        assert blocks(d, torch.float16, False) == triton_attention._head_split(d)
        assert blocks(d, torch.float16, True) == triton_attention._backward_split(q)
    assert blocks(40, torch.float32, False) == triton_attention._head_split(40)


class _LaunchSpy:
    """Stands for a triton kernel: records each launch's keyword arguments, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("case", ["causal", "ragged", "mask", "even"])
@pytest.mark.parametrize("d", [32, 40, 256])
def test_triton_key_loops_by_arch(arch, case, d, monkeypatch):
    """The forward and dq kernels walk the key blocks in one loop on sm_90 (the blocks that Lkv's end or the
    causal diagonal cut, TAIL, masked by a run-time test; on sm_90 two loops made ptxas serialize every wgmma)
    and in two loops elsewhere (the unmasked blocks, then the masked ones): each against the reference,
    gradients included, with a padding mask, with tail blocks (causal, Lkv not a multiple of BLOCK_N) and
    without (CPU tensors take FALLBACK_ARCH's choice; BLOCK_N is 16 under the interpreter). At head dim 256
    (BLOCK_D 256) the tail blocks are masked by selects in every block rather than a branch."""
    from genkernels.triton import attention as triton_attention

    monkeypatch.setattr(triton_attention, "FALLBACK_ARCH", arch)
    spies = {name: _LaunchSpy(getattr(triton_attention, name)) for name in ("_attn_fwd_kernel", "_attn_bwd_dq_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(triton_attention, name, spy)
    lkv = {"causal": 37, "ragged": 45, "mask": 48, "even": 64}[case]
    q, k, v = _qkv(1, 2, 1, 37 if case == "causal" else 19, lkv, d, torch.float16, torch.device("cpu"))
    kwargs = {"causal": case == "causal"}
    if case == "mask":
        kwargs["key_padding_mask"] = _padding_mask(1, lkv, torch.device("cpu"), "random")
    _skip_unsupported("triton", q, k, v, **kwargs)
    _compare("triton", q, k, v, **kwargs)
    launches = [launch for spy in spies.values() for launch in spy.launches]
    assert len(launches) == 2, "one forward and one dq launch"
    for launch in launches:
        assert launch["ONE_LOOP"] is (arch == 90)
        assert launch["TAIL"] is (case in ("causal", "ragged"))
        assert launch["HAS_MASK"] is (case == "mask")


def test_triton_forward_tiles(monkeypatch):
    """The sm_90 16-bit forward without a key padding mask takes FWD_90_UNSPLIT at unsplit head dims of 64 and
    128 columns when not causal, else FWD_90_UNMASKED up to head dim 72 (each timed faster on an H200); d80 (it
    spills there), d96 (split 64 + 32), causal d128, masked calls, decoding, float32 and other GPUs keep
    CONFIGS'."""
    from genkernels.triton import attention as ta

    monkeypatch.setattr(ta, "interpreting", lambda: False)
    monkeypatch.setattr(ta, "FALLBACK_ARCH", 90)

    def q(d, lq=128, dtype=torch.bfloat16):
        return torch.empty(1, 1, lq, d, dtype=dtype)

    for d in (40, 48, 72):
        assert ta._config(q(d), "fwd") == ta.FWD_90_UNMASKED
        assert ta._config(q(d, dtype=torch.float16), "fwd", causal=True) == ta.FWD_90_UNMASKED
    for d in (60, 64, 100, 112, 128):
        assert ta._config(q(d), "fwd") == ta.FWD_90_UNSPLIT
        assert ta._config(q(d, dtype=torch.float16), "fwd") == ta.FWD_90_UNSPLIT
    assert ta._config(q(64), "fwd", causal=True) == ta.FWD_90_UNMASKED != ta.FWD_90_UNSPLIT
    d64, d128 = ta.CONFIGS[(90, 64, 2, "fwd")], ta.CONFIGS[(90, 128, 2, "fwd")]
    assert ta._config(q(80), "fwd") == d64 not in (ta.FWD_90_UNMASKED, ta.FWD_90_UNSPLIT)
    assert ta._config(q(64), "fwd", masked=True) == d64
    assert ta._config(q(64, lq=1), "fwd") == (ta.DECODE_ROWS, d64[1], 4, d64[3])
    assert ta._config(q(64, dtype=torch.float32), "fwd") == ta.CONFIGS[(90, 64, 4, "fwd")]
    assert ta._config(q(64), "dq") == ta.CONFIGS[(90, 64, 2, "dq")]
    assert d128 != ta.FWD_90_UNSPLIT
    assert ta._config(q(128), "fwd", causal=True) == d128
    assert ta._config(q(128), "fwd", masked=True) == d128
    assert ta._config(q(96), "fwd") == d128
    assert ta._config(q(128, lq=1), "fwd") == (ta.DECODE_ROWS, d128[1], 4, d128[3])
    assert ta._config(q(128, dtype=torch.float32), "fwd") == ta.CONFIGS[(90, 128, 4, "fwd")]
    assert ta._config(q(128), "dkdv") == ta.CONFIGS[(90, 128, 2, "dkdv")]
    monkeypatch.setattr(ta, "FALLBACK_ARCH", 80)
    assert ta._config(q(64), "fwd") == ta.CONFIGS[(80, 64, 2, "fwd")]
    assert ta._config(q(128), "fwd") == ta.CONFIGS[(80, 128, 2, "fwd")]
