"""The bytes a forward moves outside its matrix products: a count of every op's tensor inputs and outputs.

A whole-model forward's time has two floors: its matrix products (linear layers, convolutions, the attention
matmuls) at the matmul rate, and everything else (norms, activations, residual adds, RoPE, casts, copies),
memory-bound, at the copy rate. ``count`` runs a forward on the meta device under a dispatch mode and adds up,
for every op that is neither a matrix product, attention nor a view, the bytes of its tensor inputs and
outputs: what that op reads and writes when it streams each tensor once, as elementwise kernels and
normalizations do. That is the second floor's numerator, per variant: PyTorch's layers launch one kernel a
``mul`` or ``add`` and move their intermediates through memory; the fused genkernels ops (counted as their
``torch.library`` ops, one each) move only their own inputs and outputs.

On the meta device nothing is computed, so counting the DiT-XL block takes well under a second on a CPU.
``F.scaled_dot_product_attention`` runs as ``aten._scaled_dot_product_efficient_attention`` during the count:
on the meta device the dispatcher would otherwise decompose it into the math path's matmuls and softmax (what
no GPU runs), and that op's output has the (B, L, H, D) memory order the GPU kernels return, so a
``transpose(1, 2).reshape`` after it is a view, as on the GPU.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..ops import gated_mlp

#: Matrix products: their time is bound by FLOPs (counted by torch.utils.flop_counter), not bytes.
MATMUL_OPS = frozenset(
    {
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "addbmm",
        "mv",
        "addmv",
        "dot",
        "matmul",
        "linear",
        "_addmm_activation",
        "convolution",
        "_convolution",
        "cudnn_convolution",
        "convolution_overrideable",
    }
)
#: Allocations: they reserve memory without reading or writing it.
ALLOC_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
#: Views the schema does not annotate as aliases.
VIEW_OPS = frozenset({"_unsafe_view", "_reshape_alias"})


def kind(func: Any) -> str:
    """The kind of an op overload (as a dispatch mode gets it): "view", "alloc", "matmul", "attention" or "other"."""
    namespace, _, name = func._schema.name.partition("::")
    if name in VIEW_OPS or any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
        return "view"
    if name in ALLOC_OPS:
        return "alloc"
    if name in MATMUL_OPS:
        return "matmul"
    if (namespace == "genkernels" and name == "attention") or "scaled_dot_product" in name:
        return "attention"
    if name in ("_flash_attention_forward", "_efficient_attention_forward"):
        return "attention"
    return "other"


@dataclass
class Traffic:
    """What a forward's ops moved: ``other_bytes`` read and written by the ops that are neither matrix products,
    attention, views nor allocations (``by_op``: the same by op name, ``calls``: how many calls each), and how
    many matrix-product and attention calls ran."""

    other_bytes: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    matmul_calls: int = 0
    attention_calls: int = 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.traffic = Traffic()
        self._bytes: collections.Counter[str] = collections.Counter()
        self._calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - the dispatch protocol
        out = func(*args, **(kwargs or {}))
        what = kind(func)
        if what == "matmul":
            self.traffic.matmul_calls += 1
        elif what == "attention":
            self.traffic.attention_calls += 1
        elif what == "other":
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            if not tensors:  # an op on no tensor (aten.promote_types: dtypes) launches nothing
                return out
            name = func._schema.name.replace("::", ".")
            self._bytes[name] += sum(_nbytes(t) for t in tensors)
            self._calls[name] += 1
        return out

    def finish(self) -> Traffic:
        self.traffic.by_op = dict(self._bytes)
        self.traffic.calls = dict(self._calls)
        self.traffic.other_bytes = sum(self._bytes.values())
        return self.traffic


def _sdpa_as_efficient(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):  # noqa: ANN001
    """F.scaled_dot_product_attention as one op on the meta device (see the module doc)."""
    if kwargs.get("enable_gqa") or (attn_mask is not None and attn_mask.dtype == torch.bool):
        raise ValueError("counting supports SDPA without GQA and without a boolean mask")
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, False, dropout_p, is_causal, scale=scale
    )[0]


@contextlib.contextmanager
def _patched(genkernels_ops: bool) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _sdpa_as_efficient))
        if genkernels_ops:  # the ops' torch.library path: one op a call, with its fake (meta) kernel
            stack.enter_context(mock.patch.object(torch.compiler, "is_compiling", lambda: True))
            # ... while linear_gelu_tanh still takes the matrix product's GELU epilogue, as eager calls on a GPU do
            stack.enter_context(mock.patch.object(gated_mlp, "_is_compiling", lambda: False))
        yield


def count(fn: Callable[[], Any], genkernels_ops: bool = False) -> Traffic:
    """Run ``fn`` (a forward on meta-device tensors) under the counter and return what its ops moved.

    ``genkernels_ops``: route genkernels ops through their ``torch.library`` ops (as under torch.compile), so
    that each is one op with its own inputs and outputs; otherwise they would not run on the meta device.
    ``linear_gelu_tanh`` still takes the path of an eager call on a GPU (one matrix product with the GELU in its
    epilogue), which under torch.compile it would not.
    """
    counter = _Counter()
    with torch.no_grad(), _patched(genkernels_ops), counter:
        fn()
    return counter.finish()
