"""What the memory-bound op benchmarks share (reparam, coupling, schedule_step, group_norm): the case base
(eager, torch.compile, each genkernels backend; the bytes that must move, timed in GB/s against the copy
bandwidth), building a variant, the per-case summary rows, the speedup goals on the best genkernels
backend, and the CPU self-check's dtypes and single check.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from .core import (
    COMPILE,
    EAGER,
    Case,
    CaseRecord,
    Expected,
    Goal,
    SelfCheck,
    SelfCheckTally,
    Variant,
    capture_graph,
    compare,
    first_call_s,
    genkernels_backends,
)


class CompiledBaselineCase(Case):
    """A case timed as eager, torch.compile of the same code, then each genkernels backend.

    Subclasses keep their inputs and references in ``self._state`` (set in ``__init__``, filled by
    ``prepare``); :meth:`release` drops it and dynamo's compiled code.
    """

    _state: dict[str, Any]

    def variant_names(self) -> list[str]:
        """eager, torch.compile, then each genkernels backend (triton, cuda)."""
        return [EAGER, COMPILE, *genkernels_backends()]

    def release(self) -> None:
        """Drop inputs, references and compiled code."""
        self._state = {}
        torch._dynamo.reset()


class MemoryBoundCase(CompiledBaselineCase):
    """A memory-bound case: its work is the bytes that must move, ``tensors_moved`` tensors the size of
    ``shape`` in ``dtype`` (fractions for tensors partly read), so its rate is GB/s and its floor that
    traffic at the copy bandwidth measured in the run."""

    unit = "GB/s"

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, tensors_moved: float):
        self.shape, self.dtype = tuple(shape), dtype
        self.work = float(tensors_moved * math.prod(shape) * dtype.itemsize)
        self._state = {}


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=False)`` after a dynamo reset: a fresh compile per case, so its cost is
    reported, and dynamo's per-function recompile limit (8 by default) cannot silently fall back to eager."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def build(name: str, fn: Callable[[], tuple[torch.Tensor, ...]]) -> Variant:
    """Run ``fn`` once (torch.compile compiles here, genkernels' kernels too) and wrap it as variant ``name``.

    eager is strict; torch.compile is timed even outside the criterion (users run it as it is). A genkernels
    backend that raises UnsupportedError is skipped with its reason, and must pass on every output.
    """
    if name in (EAGER, COMPILE):
        return Variant(name, "baseline", fn, first_call_s=first_call_s(fn), strict=name == EAGER)
    from genkernels import UnsupportedError

    try:
        took = first_call_s(fn)
    except UnsupportedError as e:
        return Variant(name, "genkernels", skip=" ".join(str(e).split()))
    return Variant(name, "genkernels", fn, first_call_s=took)


#: A variant replayed from a CUDA graph is named after the one it captures: "triton + CUDA graph".
GRAPH_SUFFIX = " + CUDA graph"


def graphed(name: str) -> str:
    """The name of ``name`` (eager, torch.compile or a backend) replayed from a CUDA graph."""
    return name + GRAPH_SUFFIX


def graph_variants() -> list[str]:
    """Each genkernels backend replayed from a CUDA graph."""
    return [graphed(b) for b in genkernels_backends()]


def graph_variant(name: str, fn: Callable[[], tuple[torch.Tensor, ...]], device: torch.device, keep: list) -> Variant:
    """Variant ``name`` (a :func:`graphed` name): ``fn`` captured once in a CUDA graph (warm-up calls, then
    the capture: its first call's time); each call replays it on the same inputs and returns the graph's
    outputs. The graph is appended to ``keep`` (a case's state, dropped with the case). A genkernels backend's
    refusal (UnsupportedError, raised by the first warm-up call) is a skip, as for the plain call; a baseline
    is strict only for eager, as :func:`build`'s."""
    base = name[: -len(GRAPH_SUFFIX)]
    role = "baseline" if base in (EAGER, COMPILE) else "genkernels"
    if device.type != "cuda":
        return Variant(name, role, skip=f"CUDA graphs need a CUDA device, inputs are on {device}")
    from genkernels import UnsupportedError

    torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        graph, out = capture_graph(fn)
    except UnsupportedError as e:
        if role == "baseline":
            raise
        return Variant(name, role, skip=" ".join(str(e).split()))

    def replay() -> tuple[torch.Tensor, ...]:
        graph.replay()
        return out

    replay()
    torch.cuda.synchronize()
    keep.append(graph)
    return Variant(name, role, replay, first_call_s=time.perf_counter() - start, strict=base != COMPILE)


def best_speedup_goal(
    rec: CaseRecord | None,
    name: str,
    ours: Sequence[str],
    baselines: Sequence[str],
    threshold: float,
    target: str | None = None,
    each: bool = False,
) -> Goal:
    """Goal ``name``: the fastest of the variants ``ours`` against the fastest of ``baselines`` (each a plain
    call or one replayed from a CUDA graph), at least ``threshold``; met, missed, or unmeasured with the reason
    (the case, every variant of ``ours`` or every baseline did not run; ``baselines[0]`` names the baseline
    and its status). The verdict names the variant, and the baseline where there is a choice of them; with
    ``each``, also every variant of ``ours`` that ran against that baseline, when more than one did. ``target``:
    the target's text (default ">= 1.0x" against torch.compile, else ">= {threshold}x")."""
    if target is None:
        target = f">= {threshold:.1f}x" if baselines[0] == COMPILE else f">= {threshold:g}x"

    def timed(names: Sequence[str]) -> list[tuple[float, str]]:
        return [(r.ms, r.variant) for n in names if rec is not None and (r := rec.result(n)) and r.ms]

    mine, base = timed(ours), timed(baselines)
    if rec is None or not mine or not base:
        first = None if rec is None else rec.result(baselines[0])
        why = (
            "the case did not run"
            if rec is None
            else "no genkernels variant ran"
            if not mine
            else f"{baselines[0]} did not run ({'not run' if first is None else first.status})"
        )
        return Goal(name, target, f"unmeasured ({why})", None)
    (mine_ms, mine_name), (base_ms, base_name) = min(mine), min(base)
    value = base_ms / mine_ms
    pair = mine_name if len(baselines) == 1 else f"{mine_name} vs {base_name}"
    shown = f"{value:.2f}x ({pair})"
    if each and len(mine) > 1:
        shown += f"; vs {base_name}: " + ", ".join(f"{n} {base_ms / ms:.2f}x" for ms, n in mine)
    return Goal(name, target, shown, value >= threshold)


def speedup_goal(rec: CaseRecord | None, name: str, baseline: str, threshold: float) -> Goal:
    """Goal ``name``: the speedup of the best genkernels backend on ``rec`` vs ``baseline`` (eager or
    torch.compile) at least ``threshold`` (:func:`best_speedup_goal` with one baseline)."""
    return best_speedup_goal(rec, name, genkernels_backends(), [baseline], threshold)


def in_dtypes(t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> dict[torch.dtype, torch.Tensor]:
    """``t`` cast to each dtype of ``dtypes``: an incoming gradient in each dtype its output may have, so
    that no cast is timed."""
    return {dt: t.to(dt) for dt in dict.fromkeys(dtypes)}


# --------------------------------------------------------------------------- summary and goals


def fmt(value: float | None, unit: str) -> str:
    """A summary cell: "n/a", a speedup ("x": 2.50x), a percentage ("%": 80%) or milliseconds (0.1234)."""
    if value is None:
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "%":
        return f"{value:.0f}%"
    return f"{value:.4f}"


def records_by(records: Sequence[CaseRecord], op: str, keys: Sequence[str]) -> dict[tuple, CaseRecord]:
    """Op ``op``'s records by the tuple of their params ``keys`` (e.g. ("dtype", "mode"))."""
    return {tuple(r.params[k] for k in keys): r for r in records if r.op == op}


def case_rows(
    by_case: dict[tuple, CaseRecord], order: Sequence[Hashable], variants: Sequence[str] | None = None
) -> list[list[str]]:
    """The per-case summary rows, cases in ``order`` (keys of ``by_case``; those without a record left out),
    each variant (default: eager, torch.compile, each genkernels backend) a row: case, floor ms, variant, ms
    (or its status), speedup vs eager, vs torch.compile, % of the ceiling."""
    rows = []
    for key in order:
        rec = by_case.get(key)
        if rec is None:
            continue
        for name in variants or [EAGER, COMPILE, *genkernels_backends()]:
            res = rec.result(name)
            if res is None or res.ms is None:
                status = "not run" if res is None else res.status
                rows.append([rec.label, fmt(rec.floor_ms, "ms"), name, status, "n/a", "n/a", "n/a"])
                continue
            rows.append(
                [
                    rec.label,
                    fmt(rec.floor_ms, "ms"),
                    name,
                    fmt(res.ms, "ms"),
                    "-" if name == EAGER else fmt(res.vs_eager, "x"),
                    "-" if name in (EAGER, COMPILE) else fmt(res.vs_compile, "x"),
                    fmt(res.pct_ceiling, "%"),
                ]
            )
    return rows


# --------------------------------------------------------------------------- CPU self-check


def self_check_dtypes(backend: str) -> tuple[torch.dtype, ...]:
    """The dtypes of a CPU self-check: float32, float16 and bf16; bf16 left out for triton, whose
    interpreter mishandles it (shared/DESIGN.md)."""
    if backend == "triton":
        return (torch.float32, torch.float16)
    return (torch.float32, torch.float16, torch.bfloat16)


def import_failed(op: str, backend: str, what: str, e: Exception) -> SelfCheck:
    """The self-check's outcome when the op module ``what`` does not import."""
    return SelfCheck(op, backend, "failed", f"cannot import {what}: {type(e).__name__}: {e}")


def check_one(
    tally: SelfCheckTally,
    label: str,
    call: Callable[[], Sequence[torch.Tensor]],
    expect: Callable[[], Sequence[Expected]],
    skip: tuple[type[Exception], ...] = (),
) -> SelfCheck | None:
    """One self-check: ``call()``'s outputs against ``expect()`` under the criterion, counted in ``tally``.

    An exception of a type in ``skip`` (the backend's UnsupportedError) is a skip, its message the reason;
    any other fails (the backend accepted these inputs). Returns the failed outcome, else None.
    """
    try:
        outputs = call()
    except skip as e:
        tally.skips.append(" ".join(str(e).split()))
        return None
    except Exception as e:  # noqa: BLE001 - it accepted these inputs
        return tally.failed(f"{label}: raised {type(e).__name__}: {e}")
    return tally.add(label, compare(outputs, expect()))
