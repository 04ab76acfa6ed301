"""Fused bias + activation (StyleGAN's bias_act): benchmark cases, goals and the CPU self-check.

The workload of shared/ANCHORS.md: a StyleGAN synthesis layer's bias + leaky ReLU, x (32, 512, 64,
64) with a bias (512,) along the channels, act="lrelu" with StyleGAN's defaults (alpha 0.2, gain
sqrt 2), bf16 and float32, forward and forward + backward (dx and dbias from a seeded dy).

The baseline is the formula as users write it, eager and under ``torch.compile``::

    y = F.leaky_relu(x + b.view(1, -1, 1, 1), 0.2) * sqrt(2)

genkernels runs it as one call of ``genkernels.ops.bias_act(x, b, act="lrelu", backend=...)``: one
pass forward (x read, y written), one fused pass backward (dy and x read, dx written; dbias a
per-channel sum of dx). The cuda backend's forward under autograd also writes the gradient codes,
2 bits an element, which its backward reads in place of x.

Forward + backward is also timed replayed from a CUDA graph, eager's (``eager + CUDA graph``) and each
backend's (``triton + CUDA graph``, ...): the forward and ``autograd.grad`` captured once on the case's inputs.
A plain call's time includes its CPU time where that exceeds what the L2 flush before it hides (the autograd
engine alone takes about 0.1 ms a call); the graphs measure the kernels. The goal takes the fastest genkernels
variant against the faster eager one.

Rate: GB/s counting the bytes that must move. Forward: x read, y written (2 tensors). Forward +
backward: those 2, dy read and dx written, and the gradient's dependence on x carried by 2 bits an
element, written and read back (4 tensors + 2 x n / 4 bytes: 4.25 tensors in bf16, 4.125 in float32;
a backward that reads x again moves 5; dbias's C floats are left out). The floor is those bytes at the
copy bandwidth measured in the same run (``floor ms``); the eager baseline moves more (it writes x + b,
then the activation, to memory and reads them back).

Correctness before timing, every variant on every output (y; dx and dbias) under the test
criterion: truth = the formula in float64, ref = the formula in the input dtype (dbias, a sum of
N * H * W terms, with the floor scaled by max(1, max|truth|) as the test suite scales it for
reductions).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ._elementwise import (
    GRAPH_SUFFIX,
    MemoryBoundCase,
    best_speedup_goal,
    build,
    case_rows,
    check_one,
    compiled,
    graph_variant,
    graph_variants,
    graphed,
    import_failed,
    records_by,
    self_check_dtypes,
    speedup_goal,
)
from .core import (
    COMPILE,
    DTYPE_NAMES,
    EAGER,
    CaseRecord,
    Expected,
    Goal,
    OpSummary,
    SelfCheck,
    SelfCheckTally,
    Variant,
    expected,
    expected_sum,
    genkernels_backends,
)

OP = "bias_act"
#: Share of a time budget (group_norm has 1, attention 2): four small cases, torch.compile's the slow part.
BUDGET_SHARE = 0.5
#: shared/ANCHORS.md's shape: (N, C, H, W) of x; the bias is (C,).
SHAPE = (32, 512, 64, 64)
WORKLOAD = "StyleGAN bias + leaky ReLU(0.2) * sqrt(2), batch 32 of 512x64x64"
ACT, ALPHA, GAIN = "lrelu", 0.2, math.sqrt(2.0)
MODES = ("fwd", "fwd+bwd")
#: Most important first: bf16 (how StyleGAN-family models train now), then float32.
DTYPES = (torch.bfloat16, torch.float32)
#: The goals, on the anchor's dtype (bf16): forward >= 3x eager and >= 1.0x torch.compile; forward + backward
#: >= 2.5x eager. float32 is reported without goals (its forward + backward at 2.5x eager would need more than
#: 95% of the copy bandwidth).
EAGER_GOAL, COMPILE_GOAL, BWD_EAGER_GOAL = 3.0, 1.0, 2.5
GOAL_DTYPES = (torch.bfloat16,)

TABLES = {"fwd": "bias + leaky ReLU, forward", "fwd+bwd": "bias + leaky ReLU, forward + backward"}
#: Forward + backward is also timed under CUDA graphs, eager and each genkernels backend alike (module doc).
EAGER_GRAPH = graphed(EAGER)


def variants_of(mode: str) -> list[str]:
    """A case's variants in report order: eager, torch.compile, each genkernels backend; forward + backward
    adds eager and each backend replayed from a CUDA graph."""
    if mode == "fwd":
        return [EAGER, COMPILE, *genkernels_backends()]
    return [EAGER, COMPILE, EAGER_GRAPH, *genkernels_backends(), *graph_variants()]


def tensors_moved(mode: str, dtype: torch.dtype) -> float:
    """Tensors of x's size that must move (module doc): 2 forward; forward + backward 4 plus the gradient codes,
    n / 4 bytes written and read back."""
    return 2.0 if mode == "fwd" else 4.0 + 2 * 0.25 / dtype.itemsize


RATE_NOTES = {
    "fwd": "GB/s (x read + y written: 2 tensors)",
    "fwd+bwd": "GB/s (forward's 2 tensors + dy read and dx written, and 2 bits an element of gradient codes "
    "written and read: 4.25 tensors in bf16, 4.125 in float32; dbias's C floats not counted)",
}
OUTPUTS = {"fwd": ("y",), "fwd+bwd": ("dx", "dbias")}


def eager_bias_act(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The baseline as users write it (StyleGAN's bias + lrelu in PyTorch), for NCHW x and a (C,) bias."""
    return F.leaky_relu(x + b.view(1, -1, 1, 1), ALPHA) * math.sqrt(2.0)


def _genkernels(backend: str, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from genkernels.ops import bias_act

    return bias_act(x, b, act=ACT, backend=backend)


def _inputs(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int = 0, layout: str = "contiguous"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, bias (C,), dy: seeded. x ~ N(0, 1), bias ~ N(0, 0.5^2) (some channels mostly negative), dy ~ N(0, 1)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(s: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(s), generator=g, device=device, dtype=torch.float32)

    x, b, dy = randn(shape), randn(shape[1:2]) * 0.5, randn(shape)
    if layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return x.to(dtype), b.to(dtype), dy.to(dtype)


def _forward_backward(
    impl: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    b: torch.Tensor,
    dy: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """(y,) without dy; else (dx, dbias) of ``(y * dy).sum()``: autograd.grad with dy as y's gradient (the
    backward without a sum kernel, and nothing accumulates into .grad between repetitions)."""
    y = impl(x, b)
    if dy is None:
        return (y,)
    return torch.autograd.grad(y, (x, b), dy)


def _expected(x: torch.Tensor, b: torch.Tensor, dy: torch.Tensor | None, truth_dtype: torch.dtype) -> list[Expected]:
    """The criterion's references: the formula in the input dtype, and on inputs upcast to truth_dtype."""

    def run(dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)

        with torch.no_grad() if dy is None else torch.enable_grad():
            return _forward_backward(eager_bias_act, cast(x), cast(b), None if dy is None else cast(dy))

    names = OUTPUTS["fwd" if dy is None else "fwd+bwd"]
    return [
        (expected_sum if n == "dbias" else expected)(n, r, t) for n, r, t in zip(names, run(None), run(truth_dtype))
    ]


class BiasActCase(MemoryBoundCase):
    """One (dtype, mode) of bias + lrelu on :data:`SHAPE` (contiguous NCHW, bias (C,) in x's dtype)."""

    op = OP

    def __init__(self, dtype: torch.dtype, mode: str, shape: tuple[int, ...] = SHAPE):
        super().__init__(shape, dtype, tensors_moved(mode, dtype))
        self.mode = mode
        self.label = f"{'x'.join(map(str, shape))} {DTYPE_NAMES[dtype]} {mode}"
        self.params: dict[str, Any] = {
            "workload": WORKLOAD,
            "shape": list(shape),
            "bias": [shape[1]],
            "dtype": DTYPE_NAMES[dtype],
            "mode": mode,
            "act": ACT,
            "alpha": ALPHA,
            "gain": GAIN,
            "tensors_moved": tensors_moved(mode, dtype),
            "baseline": "F.leaky_relu(x + b.view(1, -1, 1, 1), 0.2) * sqrt(2)",
        }
        self.table = TABLES[mode]
        self.rate_note = RATE_NOTES[mode]
        self.genkernels_variants = genkernels_backends() + (graph_variants() if mode == "fwd+bwd" else [])

    def variant_names(self) -> list[str]:
        """:func:`variants_of` the case's mode."""
        return variants_of(self.mode)

    def prepare(self, device: torch.device) -> None:
        """Seeded inputs and the references (float64 truth)."""
        x, b, dy = _inputs(self.shape, self.dtype, device)
        if self.mode == "fwd":
            dy = None
        else:
            x.requires_grad_(True)
            b.requires_grad_(True)
        self._state = {"args": (x, b, dy), "expected": _expected(x, b, dy, torch.float64)}

    def _fn(self, impl: Callable[..., torch.Tensor]) -> Callable[[], tuple[torch.Tensor, ...]]:
        x, b, dy = self._state["args"]
        return functools.partial(_forward_backward, impl, x, b, dy)

    def variant(self, name: str) -> Variant:
        """Build one variant and run it once (:func:`._elementwise.build`); each is checked on every output.
        A graph variant is captured here (its warm-up and capture are its first call's time)."""
        if name.endswith(GRAPH_SUFFIX):
            return self._graph_variant(name)
        if name == EAGER:
            impl = eager_bias_act
        elif name == COMPILE:
            impl = compiled(eager_bias_act)
        else:
            impl = functools.partial(_genkernels, name)
        return build(name, self._fn(impl))

    def _graph_variant(self, name: str) -> Variant:
        """``name`` (eager or a backend, + CUDA graph): the forward + backward captured once; each call replays
        it on the same inputs and returns the graph's dx and dbias."""
        base = name[: -len(GRAPH_SUFFIX)]
        impl = eager_bias_act if base == EAGER else functools.partial(_genkernels, base)
        return graph_variant(name, self._fn(impl), self._state["args"][0].device, self._state.setdefault("graphs", []))

    def expected(self) -> list[Expected]:
        """y (forward), or dx and dbias (forward + backward)."""
        return self._state["expected"]


def cases(quick: bool = False) -> list[BiasActCase]:
    """Forward bf16 and float32 (the anchor's), then forward + backward bf16 and float32; ``quick``: the forwards."""
    modes = MODES[:1] if quick else MODES
    return [BiasActCase(dtype, mode) for mode in modes for dtype in DTYPES]


# --------------------------------------------------------------------------- summary and goals


def summarize(records: Sequence[CaseRecord]) -> OpSummary:
    """Per case and variant: ms, the floor, speedups vs eager and vs torch.compile, % of copy bandwidth;
    and the goals per dtype and mode, each on the genkernels backend that does best."""
    by_case = records_by(records, OP, ("dtype", "mode"))
    headers = ["case", "floor ms", "variant", "ms", "vs eager", "vs torch.compile", "% copy BW"]
    rows = [
        row for mode in MODES for row in case_rows(by_case, [(DTYPE_NAMES[d], mode) for d in DTYPES], variants_of(mode))
    ]
    notes = [
        f"{WORKLOAD} {SHAPE}, bias ({SHAPE[1]},); baseline: F.leaky_relu(x + b.view(1, -1, 1, 1), 0.2) * sqrt(2), "
        "eager and torch.compile; genkernels: ops.bias_act(x, b, act='lrelu').",
        "floor ms: the bytes that must move (2 tensors forward; forward + backward 4 and 2 bits an element of "
        "gradient codes written and read, 4.25 tensors in bf16, 4.125 in float32) at the copy bandwidth measured "
        "in this run; % copy BW = floor / ms.",
        f"Goals on bf16 (the ANCHORS case), each on the genkernels backend that does best: forward >= "
        f"{EAGER_GOAL:g}x eager and >= {COMPILE_GOAL:.1f}x torch.compile; forward + backward >= {BWD_EAGER_GOAL:g}x "
        "eager, the fastest genkernels variant against the faster eager one, each with and without a CUDA graph. "
        "float32 is reported without goals. ANCHORS measured the bf16 forward (0.313 ms eager, 0.068 ms "
        "torch.compile on an H200).",
        "+ CUDA graph: forward + backward (autograd.grad) captured once and replayed, eager's and each backend's: "
        "what the kernels take when no call waits for its CPU time (the autograd engine's included; eager's "
        "kernels take longer than its CPU time, genkernels' fewer, faster kernels less). vs eager compares with "
        "plain eager.",
    ]
    return OpSummary(OP, headers, rows, _goals(by_case), notes)


def _goals(by_case: dict[tuple, CaseRecord]) -> list[Goal]:
    """bf16: forward vs eager and vs torch.compile; then forward + backward vs eager."""
    goals = []
    for mode in MODES:
        for dtype in GOAL_DTYPES:
            rec = by_case.get((DTYPE_NAMES[dtype], mode))
            what = f"{DTYPE_NAMES[dtype]} {mode} {'x'.join(map(str, SHAPE))}, speedup"
            if mode == "fwd":
                goals.append(speedup_goal(rec, f"{what} vs eager", EAGER, EAGER_GOAL))
                goals.append(speedup_goal(rec, f"{what} vs torch.compile", COMPILE, COMPILE_GOAL))
            else:
                # The fastest genkernels variant against the faster eager one, each plain or replayed from a graph.
                ours, eager = genkernels_backends() + graph_variants(), [EAGER, EAGER_GRAPH]
                name = f"{what} vs eager (with or without CUDA graphs)"
                goals.append(best_speedup_goal(rec, name, ours, eager, BWD_EAGER_GOAL))
    return goals


# --------------------------------------------------------------------------- CPU self-check

#: Small shapes for the CPU check (the Triton interpreter is slow): a block-aligned one, odd sizes, and
#: channels_last (y and dx in x's layout).
SELF_CHECK_CASES: tuple[tuple[tuple[int, ...], str], ...] = (
    ((2, 4, 8, 8), "contiguous"),
    ((3, 5, 7, 3), "contiguous"),
    ((2, 6, 5, 5), "channels_last"),
)


def self_check(backend: str) -> SelfCheck:
    """Check one genkernels backend on CPU against float64 truth (the test criterion): bias + lrelu with
    StyleGAN's defaults, forward (y) and forward + backward (dx, dbias), on small shapes.

    bf16 is left out for triton: the interpreter mishandles it (shared/DESIGN.md). Returns "ok",
    "failed" (wrong numbers, or an error other than UnsupportedError) or "skipped" (the backend's
    reason for not running: cuda has no bias_act kernel yet).
    """
    try:
        from genkernels import UnsupportedError
        from genkernels.ops import bias_act
    except Exception as e:  # noqa: BLE001 - the op module itself does not import
        return import_failed(OP, backend, "genkernels.ops.bias_act", e)
    device = torch.device("cpu")
    dtypes = self_check_dtypes(backend)
    tally = SelfCheckTally(OP, backend)
    impl = functools.partial(_call, bias_act, backend)
    for dtype in dtypes:
        for shape, layout in SELF_CHECK_CASES:
            for mode in MODES:
                label = f"{'x'.join(map(str, shape))} {layout} {DTYPE_NAMES[dtype]} {mode}"
                seed = tally.ran + len(tally.skips)
                x, b, dy = _inputs(shape, dtype, device, seed=seed, layout=layout)
                x[0, 0, 0, 0] = -b[0].item()  # one z exactly 0: lrelu's kink (the gradient there is alpha)
                if mode == "fwd":
                    dy = None
                else:
                    x.requires_grad_(True)
                    b.requires_grad_(True)
                failure = check_one(
                    tally,
                    label,
                    functools.partial(_forward_backward, impl, x, b, dy),
                    functools.partial(_expected, x, b, dy, torch.float64),
                    skip=(UnsupportedError,),
                )
                if failure is not None:
                    return failure
    return tally.result(dtypes, "fwd and fwd+bwd; lrelu, alpha 0.2, gain sqrt 2, bias (C,)")


def _call(op: Callable[..., torch.Tensor], backend: str, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return op(x, b, act=ACT, backend=backend)
