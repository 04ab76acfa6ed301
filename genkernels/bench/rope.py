"""Rotary position embedding (RoPE) of queries and keys: benchmark cases, summary and the CPU self-check.

Workloads, q and k (B, H, L, Dh) in bf16 with 1-D position tables (positions 0 .. L-1, base 10000, every
channel rotated): FLUX attention (1, 24, 4608, 128) and DiT-XL (2, 16, 4096, 72); forward (q_out, k_out) and
forward + backward (dq, dk from seeded incoming gradients).

The baseline is the "rotate_half" formula as users write it (Llama / GPT-NeoX), eager and under
``torch.compile``, with the (L, Dh) tables cached in q's dtype outside the timing as those models do::

    rotate_half(t) = cat((-t[..., Dh/2:], t[..., :Dh/2]), -1)
    q_out = q * cos + rotate_half(q) * sin;  k_out = k * cos + rotate_half(k) * sin

genkernels runs ``genkernels.ops.rope(q, k, cos, sin, backend=...)`` with the op's (L, Dh/2) float32 tables
(the same angles): q and k in one launch, read once and written once; the backward is the inverse rotation
of the incoming gradients, one fused pass.

Rate: GB/s counting the bytes that must move: forward, q and k read and q_out, k_out written (4 tensors the
size of q) plus the two (L, Dh/2) float32 tables read; forward + backward adds dq_out and dk_out read, dq
and dk written (8 tensors) and the tables read again. The floor is those bytes at the copy bandwidth
measured in the same run. No goal in the issue: reported.

Correctness before timing, every variant on every output under the test criterion: truth = the formula in
float64 (inputs upcast, float64 tables), ref = the formula in the input dtype with the tables in it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._elementwise import (
    MemoryBoundCase,
    build,
    case_rows,
    check_one,
    compiled,
    import_failed,
    records_by,
    self_check_dtypes,
)
from .core import (
    COMPILE,
    DTYPE_NAMES,
    EAGER,
    CaseRecord,
    Expected,
    OpSummary,
    SelfCheck,
    SelfCheckTally,
    Variant,
    expected,
)

OP = "rope"
#: Share of a time budget (group_norm has 1): four small cases, torch.compile's compile the slow part.
BUDGET_SHARE = 0.5
BASE = 10000.0
MODES = ("fwd", "fwd+bwd")
#: (workload, (B, H, L, Dh)) of q and of k (as many key heads as query heads).
SHAPES = (("FLUX", (1, 24, 4608, 128)), ("DiT-XL", (2, 16, 4096, 72)))
DTYPE = torch.bfloat16
#: Tensors the size of q moved per call (q, k, their outputs; with the backward their gradients too).
TENSORS_MOVED = {"fwd": 4, "fwd+bwd": 8}
#: Times the two (L, Dh/2) float32 tables are read per call.
TABLE_READS = {"fwd": 1, "fwd+bwd": 2}
TABLES = {"fwd": "RoPE of q and k, forward", "fwd+bwd": "RoPE of q and k, forward + backward"}
RATE_NOTES = {
    "fwd": "GB/s (q, k read + q_out, k_out written: 4 tensors; the (L, Dh/2) float32 cos, sin read)",
    "fwd+bwd": "GB/s (forward's 4 + dq_out, dk_out read and dq, dk written: 8 tensors; cos, sin read twice)",
}
OUTPUTS = {"fwd": ("q_out", "k_out"), "fwd+bwd": ("dq", "dk")}
BASELINE = "q * cos + rotate_half(q) * sin (and k), (L, Dh) tables in q's dtype"


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    """cat((-t2, t1), -1) for t = [t1; t2] split in halves of its last dimension."""
    t1, t2 = t.chunk(2, dim=-1)
    return torch.cat((-t2, t1), dim=-1)


def eager_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline as users write it: (q * cos + rotate_half(q) * sin, the same for k), cos and sin (L, Dh)."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _genkernels(
    backend: str, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    from genkernels.ops import rope

    return rope(q, k, cos, sin, backend=backend)


def tables(length: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (cos, sin), each (L, Dh/2), of positions 0 .. L-1: angle[l, j] = l * base^(-2j / Dh)."""
    j = torch.arange(dim // 2, dtype=torch.float64)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * BASE ** (-2.0 * j / dim)[None, :]
    return torch.cos(angles).to(device), torch.sin(angles).to(device)


def full_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotate_half baseline's (L, Dh) tables cat((c, c), -1) in ``dtype`` from (L, Dh/2) ones."""
    return torch.cat((cos, cos), -1).to(dtype), torch.cat((sin, sin), -1).to(dtype)


def _inputs(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, dq_out, dk_out ~ N(0, 1), seeded, in ``dtype``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g).to(device, dtype) for _ in range(4))  # type: ignore[return-value]


def _forward_backward(
    impl: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    grads: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, ...]:
    """(q_out, k_out) without ``grads``; else (dq, dk) by autograd.grad with ``grads`` as the outputs' gradients."""
    outs = impl(q, k, cos, sin)
    if grads is None:
        return tuple(outs)
    return torch.autograd.grad(outs, (q, k), grads)


def _expected(
    q: torch.Tensor, k: torch.Tensor, cos64: torch.Tensor, sin64: torch.Tensor, grads, truth_dtype: torch.dtype
) -> list[Expected]:
    """The criterion's references: the formula in the input dtype (tables in it too), and in ``truth_dtype``."""

    def run(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dtype).requires_grad_(t.requires_grad)

        g = None if grads is None else tuple(cast(t) for t in grads)
        with torch.no_grad() if grads is None else torch.enable_grad():
            return _forward_backward(eager_rope, cast(q), cast(k), *full_tables(cos64, sin64, dtype), g)

    names = OUTPUTS["fwd" if grads is None else "fwd+bwd"]
    return [expected(n, r, t) for n, r, t in zip(names, run(q.dtype), run(truth_dtype))]


class RopeCase(MemoryBoundCase):
    """One (workload, mode): q and k (B, H, L, Dh) in bf16, 1-D position tables, every channel rotated."""

    op = OP

    def __init__(self, workload: str, shape: Sequence[int], mode: str, dtype: torch.dtype = DTYPE):
        super().__init__(shape, dtype, TENSORS_MOVED[mode])
        length, dim = shape[2], shape[3]
        self.work += TABLE_READS[mode] * 2 * length * (dim // 2) * 4  # the float32 tables
        self.workload, self.mode = workload, mode
        self.label = f"{workload} {'x'.join(map(str, shape))} {DTYPE_NAMES[dtype]} {mode}"
        self.params: dict[str, Any] = {
            "workload": workload,
            "shape": list(shape),
            "tables": [length, dim // 2],
            "dtype": DTYPE_NAMES[dtype],
            "mode": mode,
            "base": BASE,
            "tensors_moved": TENSORS_MOVED[mode],
            "baseline": BASELINE,
        }
        self.table = TABLES[mode]
        self.rate_note = RATE_NOTES[mode]

    def prepare(self, device: torch.device) -> None:
        """Seeded inputs, the tables (float32 for genkernels, (L, Dh) in bf16 for the baseline) and the
        references (float64 truth)."""
        q, k, dqo, dko = _inputs(self.shape, self.dtype, device)
        grads = None if self.mode == "fwd" else (dqo, dko)
        if grads is not None:
            q.requires_grad_(True)
            k.requires_grad_(True)
        cos64, sin64 = tables(self.shape[2], self.shape[3], device)
        self._state = {
            "q": q,
            "k": k,
            "grads": grads,
            "tables": (cos64.float(), sin64.float()),
            "full_tables": full_tables(cos64, sin64, self.dtype),
            "expected": _expected(q, k, cos64, sin64, grads, torch.float64),
        }

    def variant(self, name: str) -> Variant:
        """Build one variant and run it once (:func:`._elementwise.build`); each is checked on every output."""
        s = self._state
        if name in (EAGER, COMPILE):
            impl, tabs = (eager_rope if name == EAGER else compiled(eager_rope)), s["full_tables"]
        else:
            impl, tabs = functools.partial(_genkernels, name), s["tables"]
        return build(name, functools.partial(_forward_backward, impl, s["q"], s["k"], *tabs, s["grads"]))

    def expected(self) -> list[Expected]:
        """(q_out, k_out) forward; (dq, dk) with forward + backward."""
        return self._state["expected"]


def cases(quick: bool = False) -> list[RopeCase]:
    """The forwards (FLUX, then DiT-XL), then the forwards + backwards; ``quick``: the forwards."""
    modes = MODES[:1] if quick else MODES
    return [RopeCase(w, shape, mode) for mode in modes for w, shape in SHAPES]


def summarize(records: Sequence[CaseRecord]) -> OpSummary:
    """Per case and variant: ms, the floor, speedups vs eager and vs torch.compile, % of copy bandwidth. No goals
    (the issue states none for RoPE)."""
    by_case = records_by(records, OP, ("workload", "mode"))
    headers = ["case", "floor ms", "variant", "ms", "vs eager", "vs torch.compile", "% copy BW"]
    rows = case_rows(by_case, [(w, mode) for mode in MODES for w, _ in SHAPES])
    notes = [
        "q and k (B, H, L, Dh): " + ", ".join(f"{w} {s}" for w, s in SHAPES) + "; bf16; 1-D positions 0 .. L-1, "
        "base 10000, every channel rotated (rotate_half pairs (j, j + Dh/2)).",
        f"Baseline, eager and torch.compile: {BASELINE}. genkernels: ops.rope(q, k, cos, sin) with (L, Dh/2) "
        "float32 tables, per backend.",
        "floor ms: the bytes that must move (4 tensors the size of q forward, 8 forward + backward, and the float32 "
        "tables) at the copy bandwidth measured in this run; % copy BW = floor / ms. No goal: reported.",
    ]
    return OpSummary(OP, headers, rows, [], notes)


# --------------------------------------------------------------------------- CPU self-check

#: Small (B, H, L, Dh) for the CPU check: the DiT head size 72 (not a power of 2), L = 1, a longer L.
SELF_CHECK_SHAPES: tuple[tuple[int, int, int, int], ...] = ((1, 2, 5, 72), (2, 3, 1, 16), (1, 1, 33, 8))


def self_check(backend: str) -> SelfCheck:
    """Check one genkernels backend on CPU against float64 truth (the test criterion): the rotation of q and k,
    forward and forward + backward, on small shapes (bf16 left out for triton, as its interpreter mishandles
    it). "skipped" with the backend's reason where it cannot run (cuda without the built extension, say)."""
    try:
        from genkernels import UnsupportedError
        from genkernels.ops import rope  # noqa: F401 - the op module must import
    except Exception as e:  # noqa: BLE001 - the op module itself does not import
        return import_failed(OP, backend, "genkernels.ops.rope", e)
    device = torch.device("cpu")
    dtypes = self_check_dtypes(backend)
    tally = SelfCheckTally(OP, backend)
    impl = functools.partial(_genkernels, backend)
    for dtype in dtypes:
        for shape in SELF_CHECK_SHAPES:
            cos64, sin64 = tables(shape[2], shape[3], device)
            for mode in MODES:
                label = f"{'x'.join(map(str, shape))} {DTYPE_NAMES[dtype]} {mode}"
                q, k, dqo, dko = _inputs(shape, dtype, device, seed=tally.ran + len(tally.skips))
                grads = None if mode == "fwd" else (dqo, dko)
                if grads is not None:
                    q.requires_grad_(True)
                    k.requires_grad_(True)
                failure = check_one(
                    tally,
                    label,
                    functools.partial(_forward_backward, impl, q, k, cos64.float(), sin64.float(), grads),
                    functools.partial(_expected, q, k, cos64, sin64, grads, torch.float64),
                    skip=(UnsupportedError,),
                )
                if failure is not None:
                    return failure
    return tally.result(dtypes, "fwd and fwd+bwd; q and k, 1-D positions")


def work_bytes(mode: str, shape: Sequence[int], dtype: torch.dtype = DTYPE) -> float:
    """Bytes one call moves (see the module doc)."""
    length, dim = shape[2], shape[3]
    return float(TENSORS_MOVED[mode] * math.prod(shape) * dtype.itemsize + TABLE_READS[mode] * 2 * length * dim * 2)
