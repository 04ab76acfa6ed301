"""Attention: benchmark cases, goals and the CPU self-check.

Shapes are the attention workloads of shared/ANCHORS.md (Stable Diffusion 1.5 self and cross
attention, SDXL, DiT / FLUX, a long sequence, causal language-model attention), in bf16 and
fp16, forward and forward + backward (dq, dk, dv, as in training). q, k, v are contiguous
(B, H, L, D) tensors, as ``scaled_dot_product_attention`` takes them.

Side by side in each case: the eager math users write (``softmax(q k^T * scale) v`` in the
input dtype), ``scaled_dot_product_attention`` with each of its backends forced (flash, cuDNN,
memory-efficient), FlexAttention under ``torch.compile``, and each genkernels backend. Speedups
are stated against SDPA's flash backend (the case's peer) and against eager; the floor of a
case is its FLOPs at the bf16 matmul rate measured in the same run. ``torch.compile`` of the
eager math is not a variant: inductor rewrites that pattern into scaled_dot_product_attention,
timed here backend by backend, and a compile per case would crowd FlexAttention's out of a
short run's time budget.

Correctness, before any timing: every variant's output is compared with a float32 reference
(``genkernels.ops.attention_reference`` on float32-upcast inputs, computed a few heads at a
time so the score matrices stay small) under the test criterion of shared/DESIGN.md:
``max|out - truth| <= 2 * max|round(truth) - truth| + floor(dtype)``, where round(truth) is the
reference in the input dtype (the reference computes in float32 and rounds its outputs, so
rounding the float32 truth gives it exactly) and floor is 1e-2 (bf16) or 1e-3 (fp16). The
tests use float64 truth; float32 differs from it by ~1e-6 here, far below the floors.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .core import (
    DTYPE_NAMES,
    EAGER,
    Case,
    CaseRecord,
    Expected,
    Goal,
    OpSummary,
    Result,
    SelfCheck,
    SelfCheckTally,
    Variant,
    compare,
    expected,
    first_call_s,
    genkernels_backends,
    geomean,
)
from .report import fmt_ms

OP = "attention"
#: The runner splits a time budget between ops in proportion to this: attention's cases are heavy
#: (FlexAttention compiles per case) and it has more of them worth seeing in a short run.
BUDGET_SHARE = 2.0

FLASH = "SDPA flash"
CUDNN = "SDPA cuDNN"
EFFICIENT = "SDPA mem-efficient"
FLEX = "FlexAttention"
#: The SDPA variants and the torch.nn.attention.SDPBackend member each one forces.
SDPA_BACKENDS = {FLASH: "FLASH_ATTENTION", CUDNN: "CUDNN_ATTENTION", EFFICIENT: "EFFICIENT_ATTENTION"}
BASELINES = (EAGER, FLASH, CUDNN, EFFICIENT, FLEX)


@dataclass(frozen=True)
class Shape:
    """One attention workload: batch, heads, query and key lengths, head dim, causal or not; ``goal``: whether
    the attention goals take it (False: reported only)."""

    workload: str
    b: int
    h: int
    lq: int
    lkv: int
    d: int
    causal: bool = False
    goal: bool = True

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        """(B, H, Lq, Lkv, D)."""
        return (self.b, self.h, self.lq, self.lkv, self.d)


#: shared/ANCHORS.md's attention table, most important first (a time budget drops the last); first, reported
#: without goals, the self-attention of one DiT-XL/2 block at 4096 tokens (heads of 72: the dit benchmark's
#: block, whose goal depends on it; a head dim the forward splits as 64 + 16).
SHAPES: tuple[Shape, ...] = (
    Shape("DiT-XL self", 2, 16, 4096, 4096, 72, goal=False),
    Shape("DiT/FLUX", 1, 24, 4608, 4608, 128),
    Shape("SDXL self", 2, 10, 4096, 4096, 64),
    Shape("SD1.5 self", 2, 8, 4096, 4096, 40),
    Shape("causal LM", 4, 16, 4096, 4096, 128, causal=True),
    Shape("SD1.5 cross", 2, 8, 4096, 77, 40),
    Shape("long", 1, 16, 16384, 16384, 64),
)
MODES = ("fwd", "fwd+bwd")
TABLES = {"fwd": "forward", "fwd+bwd": "forward + backward"}
RATE_NOTES = {
    "fwd": "TFLOP/s (4·B·H·Lq·Lkv·D, halved when causal)",
    "fwd+bwd": "TFLOP/s (3.5x the forward's FLOPs)",
}
#: The backward recomputes the scores and does four more matmuls of the forward's size (FlashAttention-2's count).
FWD_BWD_FACTOR = 3.5
#: Eager math materializes the (B, H, Lq, Lkv) score matrix several times over (scores, probabilities, their
#: gradients); past this size per matrix it is left out (the long case: 8.6 GB in bf16).
EAGER_MAX_SCORE_BYTES = 4 * 2**30
#: The float32 reference is computed on this many bytes of scores at a time (at least one head).
REFERENCE_CHUNK_BYTES = 2**30


def attention_flops(b: int, h: int, lq: int, lkv: int, d: int, causal: bool, mode: str) -> float:
    """FLOPs of one call: 4·B·H·Lq·Lkv·D (two matmuls of 2·Lq·Lkv·D each per head), halved when causal
    (half the score matrix is masked), times 3.5 for forward + backward."""
    flops = 4.0 * b * h * lq * lkv * d
    if causal:
        flops /= 2
    return flops * (FWD_BWD_FACTOR if mode == "fwd+bwd" else 1.0)


def causal_mask(lq: int, lkv: int, device: torch.device) -> torch.Tensor:
    """Bool (Lq, Lkv), True where query i may NOT see key j: j > i + (Lkv - Lq) (bottom-right alignment)."""
    return torch.ones(lq, lkv, dtype=torch.bool, device=device).triu(lkv - lq + 1)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The baseline as users write it, in the input dtype: ``softmax(q @ k^T * scale) @ v``.

    q: (B, H, Lq, D), k and v: (B, H, Lkv, D); mask: None or bool (Lq, Lkv), True where a score
    is masked out (filled with -inf before the softmax). Returns (B, H, Lq, D) in q's dtype.
    """
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _forward_backward(
    fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """(out,) without dout; else (dq, dk, dv) of out = fn(q, k, v) against dout.

    autograd.grad rather than backward(): nothing accumulates into .grad between repetitions.
    """
    out = fn(q, k, v)
    if dout is None:
        return (out,)
    return torch.autograd.grad(out, (q, k, v), dout)


def _inputs(
    shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v, dout: seeded standard normal, q and k times ``scale`` (the scores' spread grows as its square),
    so every run times and checks the same numbers."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(length: int, times: float = 1.0) -> torch.Tensor:
        x = torch.randn(shape.b, shape.h, length, shape.d, generator=g, device=device, dtype=torch.float32)
        return (x * times).to(dtype)

    return randn(shape.lq, scale), randn(shape.lkv, scale), randn(shape.lkv), randn(shape.lq)


@contextlib.contextmanager
def _exact_float32() -> Iterator[None]:
    """float32 matmuls in full precision (no TF32) inside the block, whatever the process set."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def reference_truth(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor | None,
    causal: bool,
    scale: float,
    truth_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, ...]:
    """``genkernels.ops.attention_reference`` on inputs upcast to ``truth_dtype``: (out,) or (dq, dk, dv).

    Computed per batch entry and a few heads at a time (each head's attention is independent),
    so no score matrix exceeds REFERENCE_CHUNK_BYTES: the long case's full float32 scores would
    take 17 GB, several times over with autograd.
    """
    from genkernels.ops.attention import attention_reference

    b, h, lq, _ = q.shape
    lkv = k.shape[2]
    heads = max(1, min(h, REFERENCE_CHUNK_BYTES // (lq * lkv * torch.finfo(truth_dtype).bits // 8)))
    names = ("out",) if dout is None else ("dq", "dk", "dv")
    result = {n: torch.empty(t.shape, dtype=truth_dtype, device=t.device) for n, t in zip(names, (q, k, v))}
    with _exact_float32():
        for bi in range(b):
            for h0 in range(0, h, heads):
                part = (slice(bi, bi + 1), slice(h0, h0 + heads))
                qs, ks, vs = (t[part].detach().to(truth_dtype).requires_grad_(dout is not None) for t in (q, k, v))
                if dout is None:
                    with torch.no_grad():
                        result["out"][part] = attention_reference(qs, ks, vs, causal=causal, scale=scale)
                    continue
                out = attention_reference(qs, ks, vs, causal=causal, scale=scale)
                grads = torch.autograd.grad(out, (qs, ks, vs), dout[part].to(truth_dtype))
                for n, g in zip(names, grads):
                    result[n][part] = g
    return tuple(result[n] for n in names)


def _expected(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor | None, causal: bool, scale: float
) -> list[Expected]:
    """The criterion's references from the float32 truth (see the module docstring for why rounding it is ``ref``)."""
    truth = reference_truth(q, k, v, dout, causal, scale)
    names = ("out",) if dout is None else ("dq", "dk", "dv")
    return [expected(n, t.to(q.dtype), t) for n, t in zip(names, truth)]


def _sdpa_backend(name: str) -> Any:
    """The SDPBackend member variant ``name`` forces; raises ImportError / AttributeError where torch lacks it."""
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, SDPA_BACKENDS[name])


def _sdpa(backend: Any, causal: bool, scale: float, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import sdpa_kernel

    # Inside the timed call: the context costs microseconds against milliseconds of kernel, and the
    # backward's kernel is the one the forward chose, so forward + backward is forced as well.
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _genkernels(backend: str, causal: bool, scale: float, q, k, v) -> torch.Tensor:
    from genkernels.ops.attention import attention

    return attention(q, k, v, causal=causal, scale=scale, backend=backend)


def _reason(e: BaseException, caught: Sequence[warnings.WarningMessage] = ()) -> str:
    """An exception (and the warnings that explain it, as SDPA gives them) as one line."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    notes = [" ".join(str(w.message).split()) for w in caught]
    return "; ".join([text[:300], *(n[:200] for n in notes[:3])])


class AttentionCase(Case):
    """One (shape, dtype, mode) of attention: forward, or forward + backward (dq, dk, dv)."""

    op = OP
    unit = "TFLOP/s"
    peer = FLASH

    def __init__(self, shape: Shape, dtype: torch.dtype, mode: str):
        if shape.causal and shape.lq != shape.lkv:
            # SDPA's is_causal aligns the mask top-left, genkernels bottom-right: they agree only when square.
            raise ValueError(f"causal cases must have Lq == Lkv, got {shape}")
        self.shape, self.dtype, self.mode = shape, dtype, mode
        dims = "x".join(map(str, shape.dims))
        self.label = f"{shape.workload} {dims}{' causal' if shape.causal else ''} {DTYPE_NAMES[dtype]} {mode}"
        self.params: dict[str, Any] = {
            "workload": shape.workload,
            "shape": list(shape.dims),
            "causal": shape.causal,
            "dtype": DTYPE_NAMES[dtype],
            "mode": mode,
            "goal": shape.goal,
        }
        self.table = TABLES[mode]
        self.rate_note = RATE_NOTES[mode]
        self.work = attention_flops(*shape.dims, shape.causal, mode)
        self.scale = 1.0 / math.sqrt(shape.d)
        self._state: dict[str, Any] = {}

    def variant_names(self) -> list[str]:
        """Eager math, SDPA flash, cuDNN and memory-efficient, FlexAttention, then each genkernels backend."""
        return [*BASELINES, *genkernels_backends()]

    def score_bytes(self) -> int:
        """Bytes of one (B, H, Lq, Lkv) score matrix in the case's dtype (what eager math materializes)."""
        s = self.shape
        return s.b * s.h * s.lq * s.lkv * torch.finfo(self.dtype).bits // 8

    def prepare(self, device: torch.device) -> None:
        """Seeded inputs (requiring grad for forward + backward) and the float32 references."""
        q, k, v, dout = _inputs(self.shape, self.dtype, device)
        if self.mode == "fwd":
            dout = None
        else:
            for t in (q, k, v):
                t.requires_grad_(True)
        exp = _expected(q, k, v, dout, self.shape.causal, self.scale)
        self._state = {"args": (q, k, v, dout), "expected": exp, "device": device}

    def _fn(self, impl: Callable[..., torch.Tensor]) -> Callable[[], tuple[torch.Tensor, ...]]:
        q, k, v, dout = self._state["args"]
        return functools.partial(_forward_backward, impl, q, k, v, dout)

    def variant(self, name: str) -> Variant:
        """Build one variant and run it once (FlexAttention compiles here: the first call's time).

        A baseline that cannot run here is skipped with its error as the reason; a genkernels
        backend is skipped only with its UnsupportedError reason (anything else it raises fails).
        Baselines are non-strict: users run them as they are, so one outside the test criterion
        (bf16 eager math can be) is timed anyway with its error shown; genkernels must pass.
        """
        if name in genkernels_backends():
            return self._genkernels_variant(name)
        role = "baseline"
        causal, scale = self.shape.causal, self.scale
        if name == EAGER:
            if self.score_bytes() > EAGER_MAX_SCORE_BYTES:
                gb = self.score_bytes() / 1e9
                limit = EAGER_MAX_SCORE_BYTES / 1e9
                return Variant(
                    name, role, skip=f"one score matrix would take {gb:.1f} GB (eager runs up to {limit:.1f})"
                )
            mask = causal_mask(self.shape.lq, self.shape.lkv, self._state["device"]) if causal else None
            impl = functools.partial(_eager, scale, mask)
        elif name in SDPA_BACKENDS:
            try:
                backend = _sdpa_backend(name)
            except (ImportError, AttributeError) as e:
                return Variant(name, role, skip=f"torch {torch.__version__} cannot force it: {_reason(e)}")
            impl = functools.partial(_sdpa, backend, causal, scale)
        elif name == FLEX:
            built = self._flex()
            if isinstance(built, str):
                return Variant(name, role, skip=built)
            impl = built
        else:
            raise ValueError(f"unknown variant {name!r}")
        fn = self._fn(impl)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                took = first_call_s(fn)
            except Exception as e:  # noqa: BLE001 - a baseline that does not run on this shape or machine is skipped
                return Variant(name, role, skip=_reason(e, caught))
        return Variant(name, role, fn, first_call_s=took, strict=False)

    def _flex(self) -> Callable[..., torch.Tensor] | str:
        """Compiled FlexAttention (the causal block mask built here, outside the timing), or why not."""
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            return f"FlexAttention needs torch >= 2.5 (this is torch {torch.__version__}): {e}"
        # A fresh compile per case: its cost is reported, and dynamo's recompile limit would otherwise
        # send later shapes to the uncompiled path, which materializes the scores.
        torch._dynamo.reset()
        block_mask = None
        if self.shape.causal:
            offset = self.shape.lkv - self.shape.lq

            def visible(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx + offset

            try:
                block_mask = create_block_mask(
                    visible, None, None, self.shape.lq, self.shape.lkv, device=self._state["device"]
                )
            except Exception as e:  # noqa: BLE001 - reported as the reason FlexAttention did not run
                return f"create_block_mask raised {_reason(e)}"
        compiled = torch.compile(flex_attention, dynamic=False)
        return functools.partial(_flex_call, compiled, block_mask, self.scale)

    def _genkernels_variant(self, name: str) -> Variant:
        from genkernels import UnsupportedError

        fn = self._fn(functools.partial(_genkernels, name, self.shape.causal, self.scale))
        try:
            took = first_call_s(fn)
        except UnsupportedError as e:
            return Variant(name, "genkernels", skip=" ".join(str(e).split()))
        return Variant(name, "genkernels", fn, first_call_s=took)

    def expected(self) -> list[Expected]:
        """out (forward) or dq, dk, dv (forward + backward): float32 truth with the criterion's bounds."""
        return self._state["expected"]

    def release(self) -> None:
        """Drop inputs and references."""
        self._state = {}


def _eager(scale: float, mask: torch.Tensor | None, q, k, v) -> torch.Tensor:
    return eager_attention(q, k, v, scale, mask)


def _flex_call(compiled: Callable[..., torch.Tensor], block_mask: Any, scale: float, q, k, v) -> torch.Tensor:
    return compiled(q, k, v, block_mask=block_mask, scale=scale)


def cases(quick: bool = False) -> list[AttentionCase]:
    """Every case, most important first, so a time budget that runs out drops the least important.

    Order: bf16 (what the goals need), then fp16; within each, SHAPES' order, each shape's forward
    followed by its forward + backward, so that a short run (scripts/gpu_check.sh) times the
    backward on the main workloads too rather than only forwards. ``quick`` keeps bf16 only.
    """
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)
    return [AttentionCase(shape, dtype, mode) for dtype in dtypes for shape in SHAPES for mode in MODES]


# --------------------------------------------------------------------------- summary and goals


def _select(records: Sequence[CaseRecord], dtype: str, mode: str) -> list[CaseRecord]:
    return [r for r in records if r.op == OP and r.params["dtype"] == dtype and r.params["mode"] == mode]


def best_genkernels(record: CaseRecord) -> Result | None:
    """The fastest genkernels backend that ran (and passed the check) on this case, or None."""
    ran = [r for r in record.results if r.role == "genkernels" and r.ms is not None]
    return min(ran, key=lambda r: r.ms) if ran else None


def _ratio(record: CaseRecord, variant: str, baseline: str) -> float | None:
    """Time of ``baseline`` / time of ``variant`` on one case, where both ran."""
    a, b = record.result(variant), record.result(baseline)
    if a is None or b is None or a.ms is None or b.ms is None:
        return None
    return b.ms / a.ms


def _cell(record: CaseRecord, variant: str) -> str:
    r = record.result(variant)
    if r is None:
        return "-"
    if r.ms is None:
        return {"failed": "FAILED", "not run": "not run"}.get(r.status, r.status)
    text = f"{r.rate:,.0f} ({r.pct_ceiling:.0f}%)" if r.rate >= 100 else f"{r.rate:.1f} ({r.pct_ceiling:.1f}%)"
    if r.role == "genkernels" and r.vs_peer is not None:
        text += f", {r.vs_peer:.2f}x flash"
    return text + (" *" if r.reason else "")


def _aggregate(records: Sequence[CaseRecord], variant: str) -> str:
    """Geomean and worst case of ``variant``'s speedup vs SDPA flash over records, where it ran on all."""
    vals = [x for x in (_ratio(rec, variant, FLASH) for rec in records) if x is not None]
    if not records:
        return "-"
    if len(vals) < len(records):
        return f"n/a ({len(vals)} of {len(records)} cases)"
    return f"{geomean(vals):.2f}x ({min(vals):.2f}x)"


def summarize(records: Sequence[CaseRecord]) -> OpSummary:
    """bf16 TFLOP/s of every variant per case (% of the matmul rate = floor / time), their geomean and worst
    speedups vs SDPA flash, and the goals, measured on the faster genkernels backend of each case."""
    fwd, fwdbwd = _select(records, "bf16", "fwd"), _select(records, "bf16", "fwd+bwd")
    variants = [r.variant for r in records[0].results] if records else [*BASELINES, *genkernels_backends()]
    headers = ["bf16 case", "floor ms", *variants]
    rows = [[_short_label(rec), fmt_ms(rec.floor_ms)] + [_cell(rec, v) for v in variants] for rec in fwd + fwdbwd]
    # Geomeans and goals take the ANCHORS cases; a case with goal False is in the table only.
    fwd = [r for r in fwd if r.params.get("goal", True)]
    fwdbwd = [r for r in fwdbwd if r.params.get("goal", True)]
    for name, recs in (("forward", fwd), ("forward + backward", fwdbwd)):
        if recs:
            rows.append([f"{name}: vs SDPA flash, geomean (worst)", ""] + [_aggregate(recs, v) for v in variants])
    goals = [
        _goal(f"bf16 forward vs SDPA flash, every case ({len(fwd)})", ">= 1.2x", 1.2, fwd, FLASH),
        _goal(f"bf16 forward vs FlexAttention (compiled), every case ({len(fwd)})", ">= 1.0x", 1.0, fwd, FLEX),
        _goal(f"bf16 forward + backward vs SDPA flash, every case ({len(fwdbwd)})", ">= 1.1x", 1.1, fwdbwd, FLASH),
        _goal(f"standing target: bf16 forward vs SDPA cuDNN ({len(fwd)})", ">= 1.0x (parity)", 1.0, fwd, CUDNN),
        _goal(
            f"standing target: bf16 forward + backward vs SDPA cuDNN ({len(fwdbwd)})",
            ">= 1.0x (parity)",
            1.0,
            fwdbwd,
            CUDNN,
        ),
    ]
    return OpSummary(
        OP,
        headers,
        rows,
        goals,
        notes=[
            (
                "Cells: TFLOP/s (% of the bf16 matmul rate measured in this run, which is also the case's floor "
                "over its time); for genkernels, the speedup vs SDPA flash. floor ms: the case's FLOPs at that "
                "matmul rate. * a baseline outside the test criterion (timed anyway; see its case table)."
            ),
            (
                "Goals are measured per case on the faster genkernels backend that ran and passed the check; a "
                "case where none did leaves the goal UNMEASURED (unless another case already MISSes it). Cases "
                "where the baseline itself did not run are left out of that goal and named."
            ),
        ],
    )


def _short_label(rec: CaseRecord) -> str:
    p = rec.params
    return f"{p['workload']} {'x'.join(map(str, p['shape']))}{' causal' if p['causal'] else ''} {p['mode']}"


def _goal(name: str, target: str, threshold: float, records: Sequence[CaseRecord], baseline: str) -> Goal:
    """Met when genkernels' best backend is >= threshold times faster than ``baseline`` on every case."""
    measured: list[tuple[float, str]] = []
    unmeasured, no_baseline = [], []
    for rec in records:
        best = best_genkernels(rec)
        if best is None:
            unmeasured.append(rec.label)
            continue
        ratio = _ratio(rec, best.variant, baseline)
        if ratio is None:
            no_baseline.append(rec.label)
        else:
            measured.append((ratio, f"{rec.params['workload']} {rec.params['mode']}, {best.variant}"))
    if not measured:
        why = "no case" if not records else f"no genkernels backend ran and passed ({len(unmeasured)} cases)"
        if records and not unmeasured:
            why = f"{baseline} did not run"
        return Goal(name, target, f"unmeasured: {why}", None)
    worst = min(measured)
    shown = f"worst {worst[0]:.2f}x ({worst[1]}); {len(measured)} of {len(records)} cases"
    if unmeasured:
        shown += f"; no genkernels backend ran and passed on {len(unmeasured)}"
    if no_baseline:
        shown += f"; {baseline} did not run on {len(no_baseline)}: {', '.join(no_baseline)}"
    if worst[0] < threshold:
        return Goal(name, target, shown, False)
    return Goal(name, target, shown, None if unmeasured else True)


# --------------------------------------------------------------------------- CPU self-check

#: Small shapes for the CPU check (the Triton interpreter is slow), with the inputs' standard deviation:
#: lengths not a multiple of a block, the SD head dim 40, causal with Lq < Lkv (bottom-right alignment),
#: a short key sequence (cross attention), and scores of standard deviation 16 (a peaked softmax: the
#: running maximum must be subtracted before exp).
SELF_CHECK_SHAPES: tuple[tuple[Shape, float], ...] = (
    (Shape("self", 1, 2, 17, 17, 16), 1.0),
    (Shape("causal, Lq < Lkv", 1, 2, 13, 29, 40, causal=True), 1.0),
    (Shape("cross", 2, 1, 24, 7, 32), 1.0),
    (Shape("large scores", 1, 1, 20, 20, 16), 4.0),
)


def _self_check_expected(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor | None, causal: bool, scale: float
) -> list[Expected]:
    """The test criterion exactly: float64 truth, and the reference run in the input dtype."""
    from genkernels.ops.attention import attention_reference

    def run(dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
        def cast(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            return (t if dtype is None else t.to(dtype)).requires_grad_(dout is not None)

        ins = [cast(t) for t in (q, k, v)]
        do = None if dout is None else dout if dtype is None else dout.to(dtype)
        return _forward_backward(functools.partial(attention_reference, causal=causal, scale=scale), *ins, do)

    names = ("out",) if dout is None else ("dq", "dk", "dv")
    return [expected(n, r, t) for n, r, t in zip(names, run(None), run(torch.float64))]


def self_check(backend: str) -> SelfCheck:
    """Check one genkernels backend on CPU against float64 truth (the test criterion), forward and backward.

    bf16 is left out for triton: the interpreter mishandles it (shared/DESIGN.md). Returns
    "ok", "failed" (wrong numbers, or an error other than UnsupportedError) or "skipped" (the
    backend's reason for not running on this machine).
    """
    try:
        from genkernels import UnsupportedError
        from genkernels.ops.attention import attention  # noqa: F401 - without the op nothing below means much
    except Exception as e:  # noqa: BLE001 - the op module itself does not import
        return SelfCheck(OP, backend, "failed", f"cannot import genkernels.ops.attention: {type(e).__name__}: {e}")
    device = torch.device("cpu")
    dtypes = (torch.float32, torch.float16) if backend == "triton" else (torch.float32, torch.float16, torch.bfloat16)
    tally = SelfCheckTally(OP, backend)
    for dtype in dtypes:
        for shape, std in SELF_CHECK_SHAPES:
            scale = 1.0 / math.sqrt(shape.d)
            for mode in MODES:
                label = f"{shape.workload} {'x'.join(map(str, shape.dims))} {DTYPE_NAMES[dtype]} {mode}"
                q, k, v, dout = _inputs(shape, dtype, device, seed=tally.ran + len(tally.skips), scale=std)
                if mode == "fwd":
                    dout = None
                else:
                    for t in (q, k, v):
                        t.requires_grad_(True)
                impl = functools.partial(_genkernels, backend, shape.causal, scale)
                try:
                    outputs = _forward_backward(impl, q, k, v, dout)
                except UnsupportedError as e:
                    tally.skips.append(" ".join(str(e).split()))
                    continue
                except Exception as e:  # noqa: BLE001 - it accepted these inputs
                    return tally.failed(f"{label}: raised {type(e).__name__}: {e}")
                failure = tally.add(label, compare(outputs, _self_check_expected(q, k, v, dout, shape.causal, scale)))
                if failure is not None:
                    return failure
    return tally.result(dtypes)
