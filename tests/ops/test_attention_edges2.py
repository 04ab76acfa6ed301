"""Attention: more inputs real users pass that the main suite does not cover (defects found and fixed, and torch's
is_causal convention checked)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import genkernels
import genkernels.triton.attention as triton_attention
from genkernels.nn import functional as GF
from genkernels.ops import attention, attention_reference
from tests.criterion import assert_criterion

_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel")


class _GridRecorder:
    """Stands for a triton kernel: records the grid of each launch, then launches the kernel."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("limit,launches", [(5, 3), (9, 2)])
def test_triton_splits_launches_beyond_grid_y(dtype, limit, launches, device, monkeypatch):
    """B * Hq beyond CUDA's 65535 programs along the grid's y (temporal attention over a video latent's pixels:
    B = 2 * 64 * 64, 16 heads) failed on the GPU with "Triton Error [CUDA]: invalid argument". The launches are
    now split along the batch; here the limit is lowered so that B * Hq = 12 needs three launches of one batch
    entry (limit 5) or two of two and one (limit 9), and every result must still be that of the reference."""
    monkeypatch.setattr(triton_attention, "MAX_GRID_Y", limit, raising=False)
    grids = []
    for name in _KERNELS:
        monkeypatch.setattr(triton_attention, name, _GridRecorder(getattr(triton_attention, name), grids))
    b, hq, hkv, lq, lkv, d = 3, 4, 2, 9, 11, 16
    q = torch.randn(b, lq, hq, d, device=device).to(dtype).transpose(1, 2)  # heads inner, as a layer makes it
    k = torch.randn(b, hkv, lkv, d, device=device).to(dtype)
    v = torch.randn(b, hkv, lkv, d, device=device).to(dtype)
    mask = torch.rand(b, lkv, device=device) < 0.3
    mask[1] = True  # one batch entry with every key padding: zeros, in its own launch
    dout = torch.randn(b, hq, lq, d, device=device)
    kwargs = {"causal": True, "key_padding_mask": mask}

    def run(backend, *inputs):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        out = attention(*leaves, backend=backend, **kwargs)
        return out, torch.autograd.grad(out, leaves, dout.to(out.dtype))

    out, grads = run("triton", q, k, v)
    ref, gref = run("reference", q, k, v)
    ref64, g64 = run("reference", q.double(), k.double(), v.double())
    for name, o, r, r64 in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *gref), (ref64, *g64)):
        assert_criterion(o, r, r64, name)
    assert len(grids) == 4 * launches, f"expected {launches} launches of each of the 4 kernels, got {grids}"
    assert max(grid[1] for grid in grids) <= limit, f"a launch has more than {limit} programs along y: {grids}"


def test_triton_refuses_more_query_heads_than_grid_y(monkeypatch, device):
    """Hq alone beyond the grid's y limit cannot be split along the batch: refused with the reason."""
    monkeypatch.setattr(triton_attention, "MAX_GRID_Y", 3, raising=False)
    q = torch.randn(1, 4, 5, 16, device=device)
    reason = genkernels.explain("attention", q, q, q)["triton"]
    assert reason is not None and "4 query heads" in reason and "up to 3" in reason


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_head_dim_zero_is_empty(backend, device):
    """Head dim 0 is an empty input (DESIGN.md: empty results without a launch), as torch's SDPA gives it: the op
    refused it with a ValueError (under "auto", where torch's SDPA returns an empty tensor), attention_reference
    and genkernels.explain raised ZeroDivisionError computing the default scale 1 / sqrt(0)."""
    q = torch.randn(2, 4, 5, 0, device=device, requires_grad=True)
    k = torch.randn(2, 2, 7, 0, device=device, requires_grad=True)
    v = torch.randn(2, 2, 7, 0, device=device, requires_grad=True)
    out = attention(q, k, v, causal=True, backend=backend)
    assert out.shape == (2, 4, 5, 0)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert [None if g is None else tuple(g.shape) for g in grads] in (
        [(2, 4, 5, 0), (2, 2, 7, 0), (2, 2, 7, 0)],
        [None, None, None],
    )
    assert attention_reference(q, k, v).shape == (2, 4, 5, 0)
    assert genkernels.explain("attention", q, k, v)["reference"] is None
    got = GF.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), backend=backend)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert got.shape == expected.shape == (2, 4, 5, 0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_functional_runs_a_padding_mask_expanded_along_the_queries(backend, device):
    """A key padding mask expanded to one row per query, (N, 1, 1, S).expand(N, 1, L, S) as model code builds
    it, is one row for all queries (stride 0 along dimension -2). It was refused under an explicit backend as a
    mask that "varies along the queries" (and sent to torch's SDPA under "auto"); it runs on the op."""
    q, k, v = (torch.randn(2, 3, n, 8, device=device) for n in (5, 7, 7))
    keep = torch.rand(2, 1, 1, 7, device=device) > 0.4
    keep[..., 0] = True
    mask = keep.expand(2, 1, 5, 7)
    out = GF.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    assert_criterion(out, ref, ref64)


def test_functional_names_a_mask_with_a_row_per_query():
    """A mask with its own row for each query is refused under an explicit backend with what is accepted."""
    q, k, v = (torch.randn(2, 3, n, 8) for n in (5, 7, 7))
    mask = torch.rand(2, 1, 5, 7) > 0.4
    with pytest.raises(genkernels.UnsupportedError, match=r"a row per query .* expanded to L rows with stride 0"):
        GF.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="triton")


@pytest.mark.parametrize("lq,lkv", [(5, 9), (9, 5)], ids=["Lq<Lkv", "Lq>Lkv"])
def test_functional_is_causal_with_unequal_lengths_is_torch_top_left(lq, lkv, device):
    """torch's is_causal is the top-left aligned mask (query i sees key j iff j <= i), the op's causal the
    bottom-right one: with Lq != Lkv "auto" gives exactly torch's result, and an explicit backend refuses."""
    q, k, v = (torch.randn(2, 3, n, 8, device=device) for n in (lq, lkv, lkv))
    got = GF.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    top_left = torch.ones(lq, lkv, dtype=torch.bool, device=device).tril()
    assert_criterion(
        got,
        F.scaled_dot_product_attention(q, k, v, attn_mask=top_left),
        F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=top_left),
    )
    with pytest.raises(genkernels.UnsupportedError, match="is_causal=True with L="):
        GF.scaled_dot_product_attention(q, k, v, is_causal=True, backend="reference")
