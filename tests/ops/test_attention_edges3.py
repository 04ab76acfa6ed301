"""Attention: inputs real users pass that the other suites do not cover (a defect found and fixed, and the layer's mask
contract checked)."""

from __future__ import annotations

import pytest
import torch

import genkernels
import genkernels.triton.attention as triton_attention
from genkernels.ops import attention
from tests.criterion import assert_criterion


def _virtual_buffer(numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialized buffer of ``numel`` elements; on the CPU only the pages written are backed by memory."""
    try:
        return torch.empty(numel, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
        pytest.skip(f"cannot reserve {numel * torch.finfo(dtype).bits // 8 >> 30} GiB of address space: {error}")


@pytest.mark.parametrize("d", [32, 40], ids=["d32", "d40-split"])
def test_triton_row_offsets_past_int32(d, device):
    """Row strides of 2^24 elements or more (a (L, B, H, D) tensor seen as (B, H, L, D) with B * H * D >= 2^24:
    temporal attention over every pixel of a video latent) put row * stride past 2^31 inside a tile. The kernels
    formed those offsets in 32 bits, which wrapped: rows from 2^31 elements on were read (and their gradients
    computed) from 4 GiB before them, wrong numbers with no error. The kernels now form them in 64 bits where a
    stride needs it (ROWS64). Here q, k, v and dout share one buffer with row stride 2^28, so that row 8 is
    2^31 elements past row 0; the views start 2^31 elements into the buffer, so that the wrapped reads stay
    inside it (wrong values rather than a crash). Only the rows' pages are written: about 8 GiB of address
    space, a few MiB of memory on the CPU. d40 runs the kernels' split head dim (32 + 16 columns)."""
    stride, start, length = 2**28, 2**31, 9
    buffer = _virtual_buffer(start + (length - 1) * stride + 4 * d, torch.float16, device)
    for row in range(length):
        buffer[start + row * stride : start + row * stride + 4 * d] = torch.randn(4 * d, device=device)
    q, k, v, dout = (buffer.as_strided((1, 1, length, d), (0, 0, stride, 1), start + i * d) for i in range(4))
    assert triton_attention._rows64(q) and not triton_attention._rows64(torch.empty(2, 4096, 10, 64).transpose(1, 2))

    def run(backend, *inputs):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        out = attention(*leaves, backend=backend)
        return out, torch.autograd.grad(out, leaves, dout.to(out.dtype))

    out, grads = run("triton", q, k, v)
    dense = [t.contiguous() for t in (q, k, v)]
    ref, gref = run("reference", *dense)
    ref64, g64 = run("reference", *(t.double() for t in dense))
    for name, o, r, r64 in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *gref), (ref64, *g64)):
        assert_criterion(o, r, r64, name)


def test_module_refuses_an_additive_mask_and_takes_it_as_padding():
    """genkernels.nn.Attention takes a bool key padding mask only: a float (additive) mask, as diffusers passes one,
    is a TypeError naming key_padding_mask, the dtype given and the one accepted (never added to the scores or run
    through torch). Converted as the docstring says, it gives the result of the additive mask."""
    attn = genkernels.nn.Attention(12, 6, heads=3, dim_head=4, backend="reference")
    x, context = torch.randn(2, 5, 12), torch.randn(2, 4, 6)
    additive = torch.zeros(2, 1, 4)
    additive[0, 0, 1:] = -10000.0
    with pytest.raises(TypeError, match=r"key_padding_mask must have dtype torch.bool .* got torch.float32"):
        attn(x, context, key_padding_mask=additive[:, 0])
    out = attn(x, context, key_padding_mask=additive[:, 0] < 0)
    torch.testing.assert_close(out[0], attn(x[:1], context[:1, :1])[0])
    torch.testing.assert_close(out[1], attn(x[1:], context[1:])[0])
