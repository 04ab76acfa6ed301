"""What every op's benchmark shares: GPU timing, device ceilings, the correctness check, and the case runner.

An op's benchmark module defines :class:`Case` subclasses; :func:`run_case` takes one case,
builds its variants (eager, torch.compile, each genkernels backend ...), checks each
variant's output against the case's reference before timing it, and times what passed.
A variant that produced wrong numbers is reported as failed and never timed.
"""

from __future__ import annotations

import abc
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from genkernels._graphs import capture

EAGER = "eager"
COMPILE = "torch.compile"

#: The absolute part of the test criterion (shared/DESIGN.md, "Numerics and correctness").
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

#: Bigger than the L2 of any current GPU (H200: 60 MB), so zeroing it evicts everything a kernel left there.
_FLUSH_BYTES = 256 * 2**20


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """How long to warm up and to repeat, in milliseconds of GPU time (as triton.testing.do_bench takes them)."""

    warmup_ms: int = 25
    rep_ms: int = 100


FULL_TIMING = Timing()
QUICK_TIMING = Timing(warmup_ms=10, rep_ms=40)


def time_ms(fn: Callable[[], Any], timing: Timing = FULL_TIMING) -> float:
    """Median GPU time of ``fn()`` in milliseconds.

    CUDA events around each call, a warm-up first, the L2 cache flushed before every
    repetition (so each call reads its inputs from DRAM, as in a model), the median of the
    repetitions. Uses ``triton.testing.do_bench`` when triton is installed, else the same
    method written out here.
    """
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_ms_events(fn, timing)
    return float(do_bench(fn, warmup=timing.warmup_ms, rep=timing.rep_ms, return_mode="median"))


def _time_ms_events(fn: Callable[[], Any], timing: Timing, clear: Callable[[Any], Any] | None = None) -> float:
    """:func:`time_ms` written out: ``clear(buffer)`` on a 256 MiB buffer before every call (default: zero it,
    the L2 flush)."""
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    clear = clear or torch.Tensor.zero_
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        clear(flush)
        fn()
    end.record()
    torch.cuda.synchronize()
    # The estimate includes the flushes, so the counts below err on the side of fewer calls.
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(timing.warmup_ms / estimate_ms))):
        fn()
    n = max(1, int(timing.rep_ms / estimate_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        clear(flush)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def flush_ms(reps: int = 5) -> float:
    """Median GPU milliseconds of the L2 flush that precedes each timed call (256 MiB zeroed), CUDA events."""
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    flush.zero_()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        flush.zero_()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


#: Calls whose CPU time :func:`host_ms` takes the median of, and the GPU time above which a variant's host
#: time is not measured (its calls cost the run more, and the flush hides little of so long a call anyway).
HOST_CALLS = 10
HOST_MAX_MS = 5.0


def host_ms(fn: Callable[[], Any], calls: int = HOST_CALLS, sync: Callable[[], None] | None = None) -> float:
    """Median CPU milliseconds one call of ``fn`` takes to issue its work: ``calls`` calls in a row, none
    waited for (their GPU work queues), each timed with ``time.perf_counter``; ``sync`` (default: CUDA's)
    runs before and after.

    The GPU time of :func:`time_ms` hides the CPU's only up to the L2 flush that precedes each timed call:
    a call whose host time exceeds the flush's leaves the GPU waiting, and its ms then include that wait.
    A variant that synchronizes inside (a ``.item()``) also shows its GPU time here."""
    sync = sync or torch.cuda.synchronize
    sync()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    sync()
    return statistics.median(times) * 1e3


def first_call_s(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call of ``fn`` including the GPU work (compilation happens here)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


#: ``fn`` captured in a CUDA graph after warm-up calls, in ``genkernels.graph_mode()``: (graph, outputs).
capture_graph = capture


# --------------------------------------------------------------------------- ceilings


@dataclass(frozen=True)
class Ceilings:
    """What the device does at best, measured in the same run as the cases.

    copy_gbs: a device-to-device copy of 1 GiB of float32, counting bytes read + written.
    matmul_tflops: a bf16 (8192 x 8192) @ (8192 x 8192) product, 2 * 8192^3 FLOPs.
    """

    copy_gbs: float
    matmul_tflops: float

    def of(self, unit: str) -> float:
        """The ceiling a rate in ``unit`` ("GB/s" or "TFLOP/s") is a fraction of."""
        return {"GB/s": self.copy_gbs, "TFLOP/s": self.matmul_tflops}[unit]


def measure_ceilings(timing: Timing = FULL_TIMING) -> Ceilings:
    """Time the copy and matmul ceilings on the current CUDA device (see :class:`Ceilings`)."""
    ceilings = Ceilings(copy_gbs=_copy_gbs(timing), matmul_tflops=_matmul_tflops(timing))
    torch.cuda.empty_cache()  # their buffers (2.4 GB) are freed on return; hand them back before the cases
    return ceilings


def _copy_gbs(timing: Timing) -> float:
    moved = 2 * 2**30  # 1 GiB read, 1 GiB written
    return moved / (same_bytes_copy_ms(moved, timing) * 1e-3) / 1e9


def same_bytes_copy_ms(work: float, timing: Timing = FULL_TIMING) -> float:
    """Milliseconds of one ``copy_`` that reads ``work / 2`` bytes and writes as many, timed by :func:`time_ms`
    as every variant is (L2 flushed before each call, CUDA events around it).

    The floor is the bytes at the 1 GiB copy's rate; a call of tens of microseconds also pays its launch and
    ramp-up, which a 1 GiB copy spreads thin. A copy of the same bytes, measured the same way, is the fastest a
    single kernel that moves them is measured to run here: what a percentage of the copy bandwidth can reach."""
    src = torch.ones(max(1, int(work // 8)), dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), timing)


def _matmul_tflops(timing: Timing) -> float:
    n = 8192
    # Random data: zeros make the tensor cores draw less power and run faster than on real work.
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    c = torch.empty(n, n, dtype=torch.bfloat16, device="cuda")
    ms = time_ms(lambda: torch.mm(a, b, out=c), timing)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------- correctness


@dataclass(frozen=True)
class Check:
    """Outcome of comparing a variant's outputs with the case's reference (worst output first)."""

    ok: bool
    err: float
    bound: float
    detail: str = ""


@dataclass(frozen=True)
class Expected:
    """One reference output: ``truth`` computed in higher precision on upcast inputs, and the bound
    ``2 * max|ref - truth| + floor(dtype)`` where ``ref`` is the same computation in the input dtype."""

    name: str
    truth: torch.Tensor
    bound: float


def expected(name: str, ref: torch.Tensor, truth: torch.Tensor) -> Expected:
    """The criterion of shared/DESIGN.md for one output, with ``truth`` in float32 or float64."""
    floor = FLOOR[ref.dtype]
    if ref.numel() == 0:
        return Expected(name, truth.detach(), floor)
    spread = (ref.detach().to(truth.dtype) - truth).abs().max().item()
    return Expected(name, truth.detach(), 2 * spread + floor)


def expected_sum(name: str, ref: torch.Tensor, truth: torch.Tensor) -> Expected:
    """The criterion for a reduction, as the test suite applies it (tests/criterion.py, relative_floor): the
    floor scaled by max(1, max|truth|). A sum of 10^5 terms reaches 10^4 or more, where one float32 unit in
    the last place is 1e-3: an absolute 1e-5 floor would demand the reference's summation order."""
    exp = expected(name, ref, truth)
    scale = max(1.0, truth.detach().abs().max().item()) if truth.numel() else 1.0
    return Expected(name, exp.truth, exp.bound + FLOOR[ref.dtype] * (scale - 1.0))


def compare(outputs: Sequence[torch.Tensor], expect: Sequence[Expected]) -> Check:
    """Check each output against its :class:`Expected`: the first failure, else the output closest to its bound.

    NaN, a wrong shape or a wrong number of outputs fails.
    """
    if len(outputs) != len(expect):
        return Check(False, math.inf, 0.0, f"{len(outputs)} outputs, expected {len(expect)}")
    worst = Check(True, 0.0, 1.0)
    for out, exp in zip(outputs, expect):
        if out is None or tuple(out.shape) != tuple(exp.truth.shape):
            got = None if out is None else tuple(out.shape)
            return Check(False, math.inf, exp.bound, f"{exp.name}: shape {got}, expected {tuple(exp.truth.shape)}")
        if out.numel() == 0:
            continue
        err = (out.detach().to(exp.truth.dtype) - exp.truth).abs().max().item()
        if not err <= exp.bound:  # written so that NaN fails
            return Check(False, err, exp.bound, f"{exp.name}: max|out - ref| = {err:.3g} > bound {exp.bound:.3g}")
        if err / exp.bound >= worst.err / worst.bound:
            worst = Check(True, err, exp.bound, exp.name)
    return worst


# --------------------------------------------------------------------------- cases and results


@dataclass
class Variant:
    """One way of computing a case: a baseline (eager, torch.compile) or a genkernels backend.

    ``fn`` runs the whole timed computation and returns its outputs (compared with the
    case's reference). ``skip`` is why it cannot run here. ``first_call_s`` is the wall time
    of the first call (for torch.compile: the compile time), measured while building it.
    ``strict``: outside the criterion it fails and is not timed. A baseline that users run as
    it is (SDPA's kernels, eager math in bf16) may be non-strict: it is timed anyway, and its
    error and the bound it missed are reported with it.
    """

    name: str
    role: str  # "baseline" or "genkernels"
    fn: Callable[[], Sequence[torch.Tensor]] | None = None
    skip: str | None = None
    first_call_s: float | None = None
    strict: bool = True


class Case(abc.ABC):
    """One benchmark case of one op; subclasses say how to build inputs, variants and the reference.

    Attributes (set by the subclass): ``op``; ``label``, unique within the op; ``params``, JSON
    facts (shape, dtype, layout, ...); ``table``, the report table it belongs to (e.g.
    "forward"); ``unit``, "GB/s" or "TFLOP/s"; ``work``, bytes or FLOPs per call; ``rate_note``,
    what the rate counts (shown in the table header); ``peer``, optionally the baseline variant
    the op's goals are stated against (e.g. SDPA's flash backend for attention), which gets a
    speedup column of its own; ``genkernels_variants``, optionally the variants that are
    genkernels' own when they are not the backend names (e.g. a model with and without CUDA graphs).
    """

    op: str
    label: str
    params: dict[str, Any]
    table: str
    unit: str
    work: float
    rate_note: str
    peer: str | None = None

    @abc.abstractmethod
    def variant_names(self) -> list[str]:
        """The variants of this case in report order, the baselines first."""

    @abc.abstractmethod
    def prepare(self, device: torch.device) -> None:
        """Make the inputs and the reference outputs on ``device``."""

    @abc.abstractmethod
    def variant(self, name: str) -> Variant:
        """Build variant ``name`` (compiling it if needed); call after :meth:`prepare`."""

    @abc.abstractmethod
    def expected(self) -> list[Expected]:
        """The reference outputs the variants' outputs are compared with."""

    def release(self) -> None:
        """Drop the inputs and references (the runner calls this after the case)."""


@dataclass
class Result:
    """One variant of one case: status "ok", "failed" (wrong numbers or an error), "skipped" or "not run".

    ``reason``: why it failed, was skipped or not run; for "ok", a note (a non-strict baseline outside
    the criterion) or None.
    """

    variant: str
    role: str
    status: str
    reason: str | None = None
    ms: float | None = None
    rate: float | None = None
    pct_ceiling: float | None = None
    vs_eager: float | None = None
    vs_compile: float | None = None
    vs_peer: float | None = None
    first_call_s: float | None = None
    err: float | None = None
    bound: float | None = None
    host_ms: float | None = None


@dataclass
class CaseRecord:
    """All variants of one case, as reported (one JSON record).

    ``peer``: the case's peer variant (see :class:`Case`), or None. ``floor_ms``: the case's work
    at the device ceiling of its unit (work / ceiling), the time no variant can beat; a variant's
    % of the ceiling is this floor over its time. ``copy_gbs``: the copy rate measured in the run, for
    summaries whose floor also has a memory-bound part. ``copy_ms``: for a memory-bound case on a GPU, one
    ``copy_`` of the case's bytes (half read, half written) timed as the variants are (:func:`same_bytes_copy_ms`).
    """

    op: str
    label: str
    table: str
    params: dict[str, Any]
    unit: str
    work: float
    rate_note: str
    results: list[Result] = field(default_factory=list)
    peer: str | None = None
    floor_ms: float | None = None
    copy_gbs: float | None = None
    copy_ms: float | None = None

    def result(self, variant: str) -> Result | None:
        """The result of ``variant``, or None when the case has no such variant."""
        return next((r for r in self.results if r.variant == variant), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def record_of(case: Case) -> CaseRecord:
    """An empty record carrying the case's description."""
    return CaseRecord(
        case.op, case.label, case.table, dict(case.params), case.unit, case.work, case.rate_note, peer=case.peer
    )


def _role(case: Case, name: str) -> str:
    """A variant's role before it is built: the case's ``genkernels_variants`` (default: the backend names)."""
    return "genkernels" if name in getattr(case, "genkernels_variants", genkernels_backends()) else "baseline"


def build_variant(case: Case, name: str) -> Variant | Result:
    """Build one variant of a prepared case; a failed build becomes a "failed" :class:`Result`."""
    try:
        return case.variant(name)
    except Exception as e:  # noqa: BLE001 - a variant that cannot even be built is reported, not fatal
        return Result(name, _role(case, name), "failed", _err(e, "build"))


def measure(case: Case, v: Variant, timing: Timing, ceiling: float) -> Result:
    """Check a built variant against the case's reference and, only when correct, time it."""
    if v.skip is not None or v.fn is None:
        return Result(v.name, v.role, "skipped", v.skip or "no function")
    try:
        check = compare(v.fn(), case.expected())
    except Exception as e:  # noqa: BLE001 - a backend that raised on inputs it accepted has failed
        return Result(v.name, v.role, "failed", _err(e, "call"), first_call_s=v.first_call_s)
    note = None
    if not check.ok and not v.strict:
        note = f"outside the criterion, timed anyway (a baseline): {check.detail}"
    elif not check.ok:
        return Result(
            v.name,
            v.role,
            "failed",
            f"wrong numbers: {check.detail}",
            first_call_s=v.first_call_s,
            err=check.err,
            bound=check.bound,
        )
    ms = time_ms(v.fn, timing)
    host = host_ms(v.fn) if torch.cuda.is_available() and ms < HOST_MAX_MS else None
    rate = case.work / (ms * 1e-3) / (1e9 if case.unit == "GB/s" else 1e12)
    return Result(
        v.name,
        v.role,
        "ok",
        note,
        ms=ms,
        rate=rate,
        pct_ceiling=100 * rate / ceiling,
        first_call_s=v.first_call_s,
        err=check.err,
        bound=check.bound,
        host_ms=host,
    )


def run_variant(case: Case, name: str, timing: Timing, ceiling: float) -> Result:
    """Build, check and (when correct) time one variant of a prepared case."""
    v = build_variant(case, name)
    return v if isinstance(v, Result) else measure(case, v, timing, ceiling)


def _err(e: BaseException, when: str) -> str:
    text = " ".join(str(e).split())
    return f"{when} raised {type(e).__name__}: {text[:300]}"


def add_speedups(record: CaseRecord) -> None:
    """Fill vs_eager, vs_compile and vs_peer (time of the baseline / time of the variant) where both ran."""
    base = {"vs_eager": EAGER, "vs_compile": COMPILE, "vs_peer": record.peer}
    base = {attr: record.result(name) if name is not None else None for attr, name in base.items()}
    for r in record.results:
        if r.ms is None:
            continue
        for attr, b in base.items():
            if b is not None and b.ms is not None:
                setattr(r, attr, b.ms / r.ms)


def floor_ms(work: float, unit: str, ceiling: float) -> float:
    """Milliseconds ``work`` (bytes or FLOPs) takes at ``ceiling`` (GB/s or TFLOP/s)."""
    return work / (ceiling * (1e9 if unit == "GB/s" else 1e12)) * 1e3


def run_case(case: Case, device: torch.device, timing: Timing, ceilings: Ceilings) -> CaseRecord:
    """Prepare a case, run every variant (:func:`run_variant`), fill the speedups, free the memory."""
    record = record_of(case)
    ceiling = ceilings.of(case.unit)
    record.floor_ms = floor_ms(case.work, case.unit, ceiling)
    record.copy_gbs = ceilings.copy_gbs
    try:
        if case.unit == "GB/s" and device.type == "cuda":
            record.copy_ms = same_bytes_copy_ms(case.work, timing)
        case.prepare(device)
        for name in case.variant_names():
            record.results.append(run_variant(case, name, timing, ceiling))
    except Exception as e:  # noqa: BLE001 - one broken case (e.g. out of memory) must not end the run
        done = {r.variant for r in record.results}
        record.results += [
            Result(n, _role(case, n), "failed", _err(e, "case")) for n in case.variant_names() if n not in done
        ]
    finally:
        case.release()
        torch.cuda.empty_cache()
    add_speedups(record)
    return record


def not_run(case: Case, why: str) -> CaseRecord:
    """The record of a case left out (time budget), every variant marked "not run"."""
    record = record_of(case)
    record.results = [Result(n, _role(case, n), "not run", why) for n in case.variant_names()]
    return record


def geomean(values: Iterable[float]) -> float | None:
    """Geometric mean, or None for no values."""
    vals = list(values)
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def genkernels_backends() -> list[str]:
    """The genkernels backends a benchmark times: every registered backend name except the reference."""
    from genkernels._registry import BACKENDS

    return [b for b in BACKENDS if b != "reference"]


# --------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class Goal:
    """A performance target of the op, with the measured value (as shown) and whether it was met.

    ``passed``: True (met), False (missed) or None (unmeasured: what it needs did not run).
    """

    name: str
    target: str
    measured: str
    passed: bool | None


@dataclass
class OpSummary:
    """An op's summary table (headers and rows of strings), its goals and notes."""

    op: str
    headers: list[str]
    rows: list[list[str]]
    goals: list[Goal]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class SelfCheck:
    """Outcome of one backend's CPU correctness check: status "ok", "failed", "error" (the check could not
    finish) or "skipped", and why."""

    op: str
    backend: str
    status: str
    detail: str


@dataclass
class SelfCheckTally:
    """A backend's self-check as it runs: the checks passed, the skips and the closest call to its bound."""

    op: str
    backend: str
    ran: int = 0
    skips: list[str] = field(default_factory=list)
    worst: Check = field(default_factory=lambda: Check(True, 0.0, 1.0))

    def failed(self, detail: str) -> SelfCheck:
        """The outcome when a check failed or raised."""
        return SelfCheck(self.op, self.backend, "failed", detail)

    def add(self, label: str, check: Check) -> SelfCheck | None:
        """Count one check; the failed outcome if it missed its bound, else None."""
        if not check.ok:
            return self.failed(f"{label}: {check.detail}")
        self.ran += 1
        if check.err / check.bound > self.worst.err / self.worst.bound:
            self.worst = Check(True, check.err, check.bound, f"{label} {check.detail}")
        return None

    def result(self, dtypes: Sequence[torch.dtype], what: str = "fwd and fwd+bwd") -> SelfCheck:
        """The outcome: ok (the count and the closest call), or skipped with the first reason when nothing ran."""
        if self.ran == 0:
            return SelfCheck(self.op, self.backend, "skipped", self.skips[0] if self.skips else "no case ran")
        names = ", ".join(DTYPE_NAMES[d] for d in dtypes)
        detail = f"{self.ran} checks ({what}; {names}) within the criterion"
        w = self.worst
        detail += f"; closest: {w.detail} err {w.err:.2g} <= {w.bound:.2g}" if w.detail else ""
        if self.skips:
            detail += f"; {len(self.skips)} skipped: {self.skips[0]}"
        return SelfCheck(self.op, self.backend, "ok", detail)
