"""genkernels.bench.traffic: which ops count as what, and the bytes a forward moves outside its matrix products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genkernels import ops
from genkernels.bench import traffic

META = torch.device("meta")
aten = torch.ops.aten


@pytest.mark.parametrize(
    ("op", "kind"),
    [
        (aten.view.default, "view"),
        (aten.transpose.int, "view"),
        (aten.permute.default, "view"),
        (aten._unsafe_view.default, "view"),
        (aten.empty_like.default, "alloc"),
        (aten.addmm.default, "matmul"),
        (aten.bmm.default, "matmul"),
        (aten.convolution.default, "matmul"),
        (aten._scaled_dot_product_efficient_attention.default, "attention"),
        (aten._scaled_dot_product_flash_attention.default, "attention"),
        (torch.ops.genkernels.attention.default, "attention"),
        (aten.add.Tensor, "other"),
        (aten.add_.Tensor, "other"),
        (aten.native_layer_norm.default, "other"),
        (aten.clone.default, "other"),
        (torch.ops.genkernels.layer_norm_modulate.default, "other"),
    ],
)
def test_kinds(op, kind):
    assert traffic.kind(op) == kind


def test_elementwise_views_and_matmuls():
    """x + y reads two tensors and writes one; views, matmuls and allocations move nothing counted; an in-place
    add reads both and writes self."""
    x, y = (torch.empty(4, 8, device=META) for _ in range(2))
    w = torch.empty(8, 16, device=META)

    def fn():
        z = x + y  # 3 x 128 bytes
        z.view(2, 16).t()[:3].unsqueeze(0)  # views: nothing
        z.t().reshape(-1)  # a transposed tensor flattened: a copy, 2 x 128
        z.add_(y)  # self read and written, y read: 3 x 128
        torch.empty_like(z)
        return z @ w  # a matrix product: not counted

    got = traffic.count(fn)
    assert got.other_bytes == 8 * 4 * 8 * 4
    assert got.by_op == {"aten.add": 3 * 128, "aten.clone": 2 * 128, "aten.add_": 3 * 128}
    assert got.calls == {"aten.add": 1, "aten.clone": 1, "aten.add_": 1}
    assert got.matmul_calls == 1 and got.attention_calls == 0


def test_attention_is_one_op_in_the_gpu_layout():
    """SDPA counts as one attention call, and its output comes in (B, L, H, D) order as on a GPU, so the
    transpose + reshape that merges the heads is a view; the patches are undone afterwards."""
    q = torch.empty(2, 4, 16, 8, device=META, dtype=torch.bfloat16)
    sdpa = F.scaled_dot_product_attention

    def fn():
        return F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(2, 16, 32)

    got = traffic.count(fn)
    assert got.attention_calls == 1 and got.other_bytes == 0 and got.by_op == {}
    assert F.scaled_dot_product_attention is sdpa and not torch.compiler.is_compiling()


def test_genkernels_ops_count_as_one_op_each():
    """With genkernels_ops, a fused op is its torch.library op: its inputs and outputs once (layer_norm_modulate
    also writes the float32 row statistics its backward reads)."""
    b, length, d = 2, 16, 64
    x = torch.empty(b, length, d, device=META, dtype=torch.bfloat16)
    shift, scale = (torch.empty(b, d, device=META, dtype=torch.bfloat16) for _ in range(2))
    got = traffic.count(lambda: ops.layer_norm_modulate(x, shift=shift, scale=scale), genkernels_ops=True)
    rows = b * length * d * 2
    assert got.by_op == {"genkernels.layer_norm_modulate": 2 * rows + 2 * b * d * 2 + 2 * b * length * 4}
    assert not torch.compiler.is_compiling()
