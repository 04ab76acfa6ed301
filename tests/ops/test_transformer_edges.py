"""rope and linear_gelu_tanh at the edges of their public arguments: what users pass."""

from __future__ import annotations

import importlib

import pytest
import torch

from genkernels.ops import linear_gelu_tanh, rope, rope_frequencies
from tests.criterion import assert_criterion
from tests.op_inputs import skip_unsupported

RP = importlib.import_module("genkernels.ops.rope")
BACKENDS = ["reference", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("into", [False, True], ids=["out", "k_out"])
def test_partial_rotary_k_passes_through_when_q_has_no_heads(backend, into, device):
    """q with no heads (nothing to rotate) beside a k that has some: the Triton launcher took an empty q's output,
    at the same (null) address as q, for the in-place call and left k's pass-through channels unwritten."""
    q = torch.randn(2, 0, 3, 12, device=device)
    k = torch.randn(2, 2, 3, 12, device=device)
    cos, sin = rope_frequencies(torch.arange(3, device=device), 4)
    skip_unsupported(backend, RP.OP, q, k, cos, sin)
    k_out = torch.full_like(k, 7.0) if into else None
    with torch.no_grad():
        got_q, got_k = rope(q, k, cos, sin, k_out=k_out, backend=backend)
    _, want = RP.rope_reference(q, k, cos, sin)
    _, truth = RP.rope_reference(q.double(), k.double(), cos.double(), sin.double())
    assert got_q.shape == q.shape
    assert_criterion(got_k, want, truth, "k_out")


@pytest.mark.parametrize("which", ["x", "weight"])
def test_linear_gelu_tanh_names_a_missing_tensor(which):
    """None for x or weight (a layer without its weight, say) failed with "'NoneType' object has no attribute
    'dim'": only bias may be None."""
    args = {"x": torch.randn(3, 4), "weight": torch.randn(5, 4), "bias": torch.randn(5)}
    args[which] = None
    with pytest.raises(TypeError, match=f"{which} must be a torch.Tensor, got NoneType"):
        linear_gelu_tanh(**args)
