"""One forward of a whole model: eager PyTorch layers vs torch.compile vs genkernels, each plain and + CUDA graph.

What the whole-model benchmarks (``unet``: one SD-like UNet step, ``vae``: SD VAE decode) share: the
case, the summary table, the goals and the CPU self-check. A model's module subclasses
:class:`ModelCase` with its builder, inputs and call. Every variant runs the same weights:

- ``eager``: the model on PyTorch's layers (torch.nn.GroupNorm + SiLU, SDPA), as it runs without
  genkernels (the model's ``with_torch_layers`` twin, sharing the weights);
- ``torch.compile``: that model's forward under ``torch.compile`` (default mode). Its first call,
  the compile, is reported as first_call_s;
- ``genkernels``: the model on genkernels layers (fused GroupNorm+SiLU, the attention op), auto
  backend (or the case's), eager;
- ``genkernels + CUDA graph``: the same forward captured once in a ``torch.cuda.CUDAGraph``
  (warm-up outside the capture, static input buffers); each timed call copies the inputs into
  the static buffers and replays the graph;
- ``eager + CUDA graph`` and ``torch.compile + CUDA graph``: the baselines captured and replayed the
  same way (torch.compile's compiled function, compiled once for both), so that a model whose
  plain call waits for its CPU time is compared at its fastest on both sides. The goals take the
  fastest genkernels variant against the faster of each baseline's two.

Correctness before timing (shared/DESIGN.md's criterion, with the whole network as the
computation): truth is the PyTorch-layer model in float32 (TF32 off; float64 for a float32 case)
on the inputs upcast, ref is the same model in the case's dtype, and a variant passes when
``max|out - truth| <= 2 * max|ref - truth| + floor`` (1e-2 in bf16): as close to the truth as
PyTorch's own run is. The eager baseline is within by construction; torch.compile is a baseline
timed even outside it (it fuses and rounds differently), genkernels variants are strict.

Peak memory, for a case with ``measures_peak``: ``torch.cuda.max_memory_allocated`` over one call of
each variant after its first (statistics reset just before), in GiB, everything the process holds
then (the weights included); for the CUDA graph, the larger of its warm-up and capture's peak and
a replay's (the graph keeps what its capture allocated). The figures land in the case's
``params["peak_memory_gib"]`` (by variant), which its record shares, and in the summary.

The rate is TFLOP/s: the forward's convolution, linear and attention-matmul FLOPs, counted once by
``torch.utils.flop_counter`` on the meta device, over the time; "% of matmul" is that rate over the
measured bf16 matmul rate. The numbers that matter are the milliseconds and the speedups.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ._elementwise import best_speedup_goal
from .core import (
    COMPILE,
    DTYPE_NAMES,
    EAGER,
    FLOOR,
    Case,
    CaseRecord,
    Expected,
    Goal,
    OpSummary,
    SelfCheck,
    Variant,
    capture_graph,
    compare,
    expected,
    first_call_s,
)

GENKERNELS = "genkernels"
GRAPH = "genkernels + CUDA graph"
#: The baselines replayed from a CUDA graph too, so that each side is compared at its fastest.
EAGER_GRAPH = "eager + CUDA graph"
COMPILE_GRAPH = "torch.compile + CUDA graph"
VARIANTS = (EAGER, COMPILE, GENKERNELS, GRAPH, EAGER_GRAPH, COMPILE_GRAPH)
GK_VARIANTS = (GENKERNELS, GRAPH)
#: The order of a model whose torch.compile is its slowest step: the compile after everything else is measured.
#: In both orders the genkernels graph is the first captured: peaks are measured while no graph holds memory.
COMPILE_LAST = (EAGER, GENKERNELS, GRAPH, EAGER_GRAPH, COMPILE, COMPILE_GRAPH)
#: Each graphed variant and the plain one it captures.
GRAPHED = {GRAPH: GENKERNELS, EAGER_GRAPH: EAGER, COMPILE_GRAPH: COMPILE}
#: Parity with torch.compile, without its compile time: every whole model's second goal.
COMPILE_GOAL = 1.0
GIB = 2**30
PEAK_NOTE = (
    "peak GiB: torch.cuda.max_memory_allocated over one call (the weights included); for the genkernels CUDA "
    "graph, over its warm-up and capture too (the graph keeps that memory). Measured while no other CUDA graph "
    "holds memory: eager, genkernels and its graph (the first captured), and torch.compile where it runs "
    "before them; n/a for the variants run after."
)

Forward = Callable[..., torch.Tensor]
#: FLOPs by (case class, label): counting builds the model on the meta device (seconds for the UNet), and
#: each ``cases()`` makes new cases.
_FLOPS: dict[tuple[type, str], float] = {}


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """float32 math without TF32 (cuDNN convolutions use TF32 by default): the truth is computed inside."""
    b = torch.backends.cudnn
    matmul = torch.get_float32_matmul_precision()
    with b.flags(enabled=b.enabled, benchmark=b.benchmark, deterministic=b.deterministic, allow_tf32=False):
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(matmul)


def seeded_models(
    build: Callable[[], Any], twin: Callable[[Any], Any], device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[Any, Any]:
    """(``build()`` on ``device`` with the global RNG seeded, its ``twin(model)``), in ``dtype``, eval mode, no grads.

    The seed does not leak: the RNG state is restored afterwards.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        model = build()
    model = model.to(dtype).eval()
    paired = twin(model)  # may share parameters with model, and set their requires_grad again
    return model.requires_grad_(False), paired.requires_grad_(False)


def peak_gib(fn: Callable[[], Any]) -> float:
    """``torch.cuda.max_memory_allocated`` over one call of ``fn`` (statistics reset just before), in GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def _call_forward(forward: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``forward(*inputs)`` without autograd."""
    with torch.no_grad():
        return forward(*inputs)


def _call(forward: Forward, model: Any, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    return _call_forward(functools.partial(forward, model), inputs)


# --------------------------------------------------------------------------- the case


class ModelCase(Case):
    """One forward of a whole model (a config, input shapes, a dtype); variants: see the module doc.

    A subclass sets ``op``, ``table``, ``workload`` (e.g. "UNet step": the report's and the goals' name),
    ``call`` (what one call is, e.g. "step"), ``output`` (the output's name in checks), ``config``
    (the summarized config), ``eager_goal`` (the speedup over eager to reach), ``measures_peak``,
    ``summary_note`` (the summarized case in words) and ``self_check_shape`` (the tiny case's arguments);
    its ``__init__`` sets ``label`` and ``params`` (:meth:`_params`). ``size`` is the latent's side;
    ``backend`` pins the genkernels layers' backend (None: auto, what users get).
    """

    genkernels_variants = GK_VARIANTS
    unit = "TFLOP/s"
    workload: str
    call: str
    output: str
    config: str
    eager_goal: float
    measures_peak = False
    summary_note: str
    self_check_shape: dict[str, int]

    def __init__(self, config_name: str, batch: int, size: int, dtype: torch.dtype, backend: str | None):
        self.config_name, self.batch, self.size, self.dtype, self.backend = config_name, batch, size, dtype, backend
        self.peaks: dict[str, float] = {}
        self._state: dict[str, Any] = {}

    def _params(self, **shapes: Any) -> dict[str, Any]:
        """The case's params: workload, config, batch, the model's ``shapes``, dtype, backend and, when it
        measures them, the peaks (``self.peaks`` itself: the record shares it and sees later peaks)."""
        params = {"workload": self.workload, "config": self.config_name, "batch": self.batch, **shapes}
        params.update(dtype=DTYPE_NAMES[self.dtype], backend=self.backend or "auto")
        if self.measures_peak:
            params["peak_memory_gib"] = self.peaks
        return params

    @staticmethod
    @abc.abstractmethod
    def forward(model: Any, *inputs: torch.Tensor) -> torch.Tensor:
        """The model's output on ``inputs`` (the callers choose the grad mode; torch.compile traces this)."""

    @abc.abstractmethod
    def models(self, device: torch.device) -> tuple[Any, Any]:
        """(genkernels-layer model, PyTorch-layer twin sharing its parameters) in float32, seeded weights."""

    @abc.abstractmethod
    def inputs(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The forward's inputs (seeded), floating ones in ``dtype``."""

    @functools.cached_property
    def work(self) -> float:  # type: ignore[override]
        """FLOPs per call, counted once per label by torch.utils.flop_counter: convolutions, linear layers and
        attention matmuls of the PyTorch-layer twin on the meta device (elementwise work and normalizations
        not counted)."""
        from torch.utils.flop_counter import FlopCounterMode

        key = (type(self), self.label)
        if key not in _FLOPS:
            meta = torch.device("meta")
            _, twin = self.models(meta)
            with FlopCounterMode(display=False) as counter:
                _call(self.forward, twin, self.inputs(meta, torch.float32))
            _FLOPS[key] = float(counter.get_total_flops())
        return _FLOPS[key]

    @property
    def rate_note(self) -> str:  # type: ignore[override]
        """What the rate counts."""
        return f"TFLOP/s (convolution, linear and attention-matmul FLOPs: {self.work / 1e12:.3g} TFLOP per {self.call})"

    def variant_names(self) -> list[str]:
        """eager (PyTorch layers), torch.compile of it, genkernels layers eager, and under a CUDA graph."""
        return list(VARIANTS)

    def prepare(self, device: torch.device) -> None:
        """Weights, inputs, the reference (the PyTorch-layer twin in the case's dtype) and the truth.

        The float32 models are converted in place (the twin shares the parameters) to the case's dtype
        for the reference and to the truth's dtype and back for the truth; both round trips are exact,
        so every run uses the same weights.
        """
        model, twin = self.models(device)
        inputs = self.inputs(device, self.dtype)
        model.to(self.dtype)
        ref = _call(self.forward, twin, inputs)
        wide = torch.float64 if self.dtype == torch.float32 else torch.float32
        with full_fp32():
            model.to(wide)
            truth = _call(self.forward, twin, [a.to(wide) for a in inputs])
        model.to(self.dtype).set_backend(self.backend)
        self._state = {
            "model": model,
            "model_torch": twin,
            "inputs": inputs,
            "expected": [expected(self.output, ref, truth)],
        }

    def _fn(self, forward: Callable[..., torch.Tensor]) -> Callable[[], tuple[torch.Tensor, ...]]:
        inputs = self._state["inputs"]

        def fn() -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                return (forward(*inputs),)

        return fn

    def _on_cuda(self) -> bool:
        return self._state["inputs"][0].device.type == "cuda"

    def _built(self, name: str, fn: Callable[[], tuple[torch.Tensor, ...]], strict: bool = True) -> Variant:
        """The variant after its first call (compiles, autotunes), with its peak memory if measured."""
        took = first_call_s(fn)
        if self.measures_peak and self._on_cuda() and not self._state.get("graphs"):  # no graph's pool held
            self.peaks[name] = peak_gib(fn)
        role = "genkernels" if name in GK_VARIANTS else "baseline"
        return Variant(name, role, fn, first_call_s=took, strict=strict)

    def _forward_of(self, name: str) -> Callable[..., torch.Tensor]:
        """What plain variant ``name`` calls on the inputs: the twin, its torch.compile (compiled once a case,
        on first use: its graphed variant reuses it) or the genkernels model."""
        if name == EAGER:
            return functools.partial(self.forward, self._state["model_torch"])
        if name == COMPILE:
            if "compiled" not in self._state:
                torch._dynamo.reset()  # a fresh compile, its cost reported
                self._state["compiled"] = torch.compile(functools.partial(self.forward, self._state["model_torch"]))
            return self._state["compiled"]
        return functools.partial(self.forward, self._state["model"])

    def variant(self, name: str) -> Variant:
        """Build one variant; torch.compile is compiled here and the CUDA graphs captured here, their time
        recorded as first_call_s."""
        if name in (EAGER, COMPILE, GENKERNELS):
            return self._built(name, self._fn(self._forward_of(name)), strict=name != COMPILE)
        if name in GRAPHED:
            if not self._on_cuda():
                device = self._state["inputs"][0].device
                role = "genkernels" if name in GK_VARIANTS else "baseline"
                return Variant(name, role, skip=f"CUDA graphs need a CUDA device, inputs are on {device}")
            return self._graph_variant(name)
        raise ValueError(f"unknown variant {name!r}; variants: {VARIANTS}")

    def _graph_variant(self, name: str) -> Variant:
        """``name`` (a key of :data:`GRAPHED`): its plain variant's forward captured once on static inputs."""
        forward, inputs = self._forward_of(GRAPHED[name]), self._state["inputs"]
        static = [a.clone() for a in inputs]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        graph, out = capture_graph(lambda: _call_forward(forward, static))

        def fn() -> tuple[torch.Tensor, ...]:
            for buf, a in zip(static, inputs):
                buf.copy_(a)  # a pipeline writes each call's inputs into the graph's
            graph.replay()
            return (out,)

        fn()
        torch.cuda.synchronize()
        took = time.perf_counter() - start
        if self.measures_peak and not self._state.get("graphs"):  # the first graph only: no other pool held
            capture_peak = torch.cuda.max_memory_allocated() / GIB
            self.peaks[name] = max(capture_peak, peak_gib(fn))
        self._state.setdefault("graphs", []).append(graph)
        role = "genkernels" if name in GK_VARIANTS else "baseline"
        return Variant(name, role, fn, first_call_s=took, strict=name != COMPILE_GRAPH)

    def expected(self) -> list[Expected]:
        """The model output: the truth, bound from the PyTorch-layer run in the case's dtype (module doc)."""
        return self._state["expected"]

    def release(self) -> None:
        """Drop the models, the graph, inputs and references (measured peaks stay in params)."""
        self._state = {}
        torch._dynamo.reset()  # the compiled model holds its graphs and buffers

    @classmethod
    def summarize(cls, records: Sequence[CaseRecord]) -> OpSummary:
        """The op's summary of the cases of this class: :func:`summarize`."""
        return summarize(records, cls)

    @classmethod
    def self_check(cls, backend: str) -> SelfCheck:
        """The op's CPU self-check of ``backend``: :func:`self_check` on the tiny config."""
        return self_check(cls("tiny", dtype=torch.float32, backend=backend, **cls.self_check_shape))


# --------------------------------------------------------------------------- summary and goals


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return {"x": f"{value:.2f}x", "ms": f"{value:.2f}", "GiB": f"{value:.2f}"}.get(unit, f"{value:.1f}")


def _peaks(rec: CaseRecord | None) -> dict[str, float]:
    return {} if rec is None else dict(rec.params.get("peak_memory_gib") or {})


def summarize(records: Sequence[CaseRecord], case: type[ModelCase]) -> OpSummary:
    """Per variant of ``case``'s summarized config: ms, speedup vs eager and vs torch.compile, peak memory
    (if measured), first call (compile or capture) seconds; the goals (:func:`goals`)."""
    rec = next((r for r in records if r.op == case.op and r.params.get("config") == case.config), None)
    peaks = _peaks(rec)
    peak_header = ["peak GiB"] if case.measures_peak else []
    headers = ["variant", "ms", "vs eager", "vs torch.compile", *peak_header, "first call s"]
    rows = []
    for name in VARIANTS:
        res = None if rec is None else rec.result(name)
        peak = [_fmt(peaks.get(name), "GiB")] if case.measures_peak else []
        if res is None or res.status != "ok":
            status = "not run" if res is None else res.status
            rows.append([name, status, "n/a", "n/a", *peak, _fmt(None if res is None else res.first_call_s, "s")])
            continue
        vs_eager = "-" if name == EAGER else _fmt(res.vs_eager, "x")
        vs_compile = "-" if name == COMPILE else _fmt(res.vs_compile, "x")
        rows.append([name, _fmt(res.ms, "ms"), vs_eager, vs_compile, *peak, _fmt(res.first_call_s, "s")])
    notes = [
        f"{case.summary_note}; same weights for every variant. first call s: torch.compile's compile, the CUDA "
        "graph's warm-up and capture.",
        "Correct before timed: float32 PyTorch-layer truth, bound 2 * (bf16 PyTorch-layer eager's error) + 1e-2.",
        "Goals: the fastest genkernels variant against the faster of a baseline plain and + CUDA graph (each side "
        "at its fastest); vs eager and vs torch.compile in the table compare with the plain baselines.",
    ]
    if case.measures_peak:
        notes.insert(1, PEAK_NOTE)
    return OpSummary(case.op, headers, rows, goals(rec, case), notes)


def goals(rec: CaseRecord | None, case: type[ModelCase]) -> list[Goal]:
    """``case``'s goals on the fastest genkernels variant that ran, each against the faster of a baseline plain
    and replayed from a CUDA graph: at least ``eager_goal`` times eager's speed, parity with torch.compile,
    and with ``measures_peak`` a peak no higher than eager's."""
    ran = [] if rec is None else [r for name in GK_VARIANTS if (r := rec.result(name)) is not None and r.ms]
    best = min(ran, key=lambda r: r.ms) if ran else None
    out = [
        best_speedup_goal(
            rec, f"{case.workload}, genkernels vs eager", GK_VARIANTS, (EAGER, EAGER_GRAPH), case.eager_goal,
            target=f">= {case.eager_goal}x (floor for resolving)", each=True,
        ),
        best_speedup_goal(
            rec, "genkernels (best of eager / CUDA graph) vs torch.compile", GK_VARIANTS, (COMPILE, COMPILE_GRAPH),
            COMPILE_GOAL, target=f">= {COMPILE_GOAL}x", each=True,
        ),
    ]  # fmt: skip
    if case.measures_peak:
        out.append(_peak_goal(rec, best))
    return out


def _peak_goal(rec: CaseRecord | None, best: Any) -> Goal:
    name, target = "peak memory of that genkernels variant", "<= eager's peak"
    peaks = _peaks(rec)
    eager_ran = rec is not None and (r := rec.result(EAGER)) is not None and r.ms is not None
    if best is None or best.variant not in peaks or EAGER not in peaks or not eager_ran:
        why = "no genkernels variant ran" if best is None else "no peak measured for it or for eager"
        return Goal(name, target, f"unmeasured ({why})", None)
    mine, eager = peaks[best.variant], peaks[EAGER]
    shown = f"{mine:.2f} GiB ({best.variant}) vs eager {eager:.2f} GiB"
    return Goal(name, target, shown, mine <= eager)


# --------------------------------------------------------------------------- CPU self-check


def self_check(case: ModelCase) -> SelfCheck:
    """``case`` (a tiny config in float32, its backend pinned) on CPU: the genkernels-layer model against
    the PyTorch-layer twin with the same weights, under the criterion (truth: the twin in float64; ref: it
    in float32; bound 2 * max|ref - truth| + 1e-5). "skipped" with the backend's reason when the backend
    cannot run these inputs here."""
    from genkernels import UnsupportedError

    op, backend = case.op, case.backend or "auto"
    try:
        case.prepare(torch.device("cpu"))
    except Exception as e:  # noqa: BLE001 - the model module itself is broken
        return SelfCheck(op, backend, "failed", f"cannot build the {case.workload} model: {type(e).__name__}: {e}")
    try:
        out = _call(case.forward, case._state["model"], case._state["inputs"])
    except UnsupportedError as e:
        return SelfCheck(op, backend, "skipped", str(e))
    except Exception as e:  # noqa: BLE001 - it accepted the inputs and then raised
        return SelfCheck(op, backend, "failed", f"raised {type(e).__name__}: {e}")
    check = compare([out], case.expected())
    size = f"{case.size}x{case.size}"
    what = f"{case.config_name} {case.workload}, {DTYPE_NAMES[case.dtype]}, batch {case.batch}, {size} latent"
    if not check.ok:
        return SelfCheck(op, backend, "failed", f"{what}: {check.detail}")
    detail = f"{what} vs PyTorch layers: err {check.err:.2g} <= bound {check.bound:.2g} (floor {FLOOR[case.dtype]:g})"
    return SelfCheck(op, backend, "ok", detail)
