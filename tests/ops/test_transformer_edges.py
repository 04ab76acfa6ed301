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


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_out_refuses_overlapping_elements(backend, device):
    """k_out expanded over the batch (stride 0: two samples' rows in one place): the triton kernel wrote both
    rotations there and returned one sample's in every row (off by 2.6), the reference raised torch's copy error.
    Refused by name on every backend, as inplace=True refuses such a q or k."""
    q, k = torch.randn(2, 2, 3, 8, device=device), torch.randn(2, 1, 3, 8, device=device)
    cos, sin = rope_frequencies(torch.arange(3, device=device), 8)
    slot = torch.zeros(1, 1, 3, 8, device=device).expand(2, 1, 3, 8)
    with pytest.raises(ValueError, match=r"k_out must not have overlapping elements \(strides \(0, "):
        rope(q, k, cos, sin, k_out=slot, backend=backend)


@pytest.mark.parametrize("backend", ["reference", None])
@pytest.mark.parametrize("table", ["cos", "sin"])
@pytest.mark.parametrize("mode", ["inplace", "k_out"])
def test_tables_that_need_grad_are_refused_outside_autograd(backend, table, mode, device):
    """cos or sin requiring grad (learned rotary tables) with inplace=True: q and k were rotated under no_grad and
    came back without a grad_fn, the tables' gradient silently dropped (that gradient needs q's and k's old
    values, which inplace overwrites). With k_out the eager reference recorded a graph but the traced call failed
    in its backward (no autograd formula for genkernels::rope_into). Both refused, as for q and k that need grad."""
    q, k = torch.randn(1, 2, 3, 8, device=device), torch.randn(1, 2, 3, 8, device=device)
    tables = dict(zip(("cos", "sin"), rope_frequencies(torch.arange(3, device=device), 8)))
    tables[table].requires_grad_(True)
    kwargs = {"inplace": True} if mode == "inplace" else {"k_out": torch.empty_like(k)}
    with pytest.raises(RuntimeError, match=f"{table} requires grad"):
        rope(q, k, tables["cos"], tables["sin"], backend=backend, **kwargs)
    with torch.no_grad():  # outside autograd: runs
        got_q, _ = rope(q.clone(), k.clone(), tables["cos"], tables["sin"], backend=backend, **kwargs)
    assert_criterion(got_q, *(RP.rope_reference(t, None, tables["cos"], tables["sin"])[0] for t in (q, q.double())))
