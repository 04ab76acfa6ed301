"""Adaptive LayerNorm of diffusion transformers (adaLN): benchmark cases, goals and the CPU self-check.

Two ops, at the shapes of shared/ANCHORS.md and the issue, x (B, L, D) in bf16 with per-sample (B, D)
modulations in x's dtype (what a DiT block's ``modulation`` Linear gives), LayerNorm without affine,
eps 1e-6 (DiT's):

- ``layer_norm_modulate``: y = LN(x) * (1 + scale) + shift;
- ``gated_residual_layer_norm_modulate`` (the block's "residual add, then the next norm"): h = x + gate * y,
  out = LN(h) * (1 + scale) + shift, returning (h, out).

Workloads: DiT-XL (2, 4096, 1152) and FLUX (1, 4608, 3072); forward, and forward + backward (the gradients
of every input from seeded incoming gradients: dy for the norm; dh and dout for the fused pair, since h
continues as the residual stream).

The baselines are the formulas as users write them, eager and under ``torch.compile``::

    y = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    h = x + gate[:, None] * y;  out = F.layer_norm(h, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

genkernels runs one call of ``genkernels.ops.layer_norm_modulate`` / ``gated_residual_layer_norm_modulate``
per backend (triton, cuda): one pass forward, one fused pass backward.

Rate: GB/s counting the bytes that must move, in x's dtype; the (B, D) modulations and their gradients are
counted too (small next to the rows). layer_norm_modulate forward: x read, y written (2 row tensors) +
shift, scale read; forward + backward adds dy and x read, dx written (5 row tensors) + shift, scale read
again and dshift, dscale written (in float32 by the fused backward; counted in x's dtype). The fused pair
forward: x and y read, h and out written (4 row tensors) + gate, shift, scale; forward + backward adds dh,
dout, h and y read, dx and dy written (10 row tensors) + the three modulations read again and their three
gradients written. The floor is those bytes at the copy bandwidth measured in the same run.

Correctness before timing, every variant on every output under the test criterion: truth = the formula in
float64 on the inputs upcast, ref = the formula in the input dtype; the gradients of the (B, D) modulations,
sums over L tokens, with the floor scaled by max(1, max|truth|) as the test suite does for reductions.

Every variant is also timed replayed from a CUDA graph (``eager + CUDA graph``, ``torch.compile + CUDA graph``,
``triton + CUDA graph``, ...): the call (forward, or forward + ``autograd.grad``) captured once on the case's
inputs. A timed call follows an L2 flush, which hides a call's CPU time only up to the flush's (0.088 ms on an
H200); a genkernels call's CPU time can exceed it, and the plain call then times the CPU, not the kernel. The
graphs time the kernels on every side; the plain calls stay in the tables.

Goals (the issue's, on layer_norm_modulate, bf16 forward, each shape): at least 3x eager, at least 1.0x
torch.compile and at least 75% of the copy bandwidth, each side at its fastest: the fastest genkernels variant
(a backend, plain or replayed) against the faster of the baseline plain and replayed. The fused pair and the
forward + backward cases are reported without goals.
"""

from __future__ import annotations

import functools
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
    fmt,
    graph_variant,
    graph_variants,
    graphed,
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
    Goal,
    OpSummary,
    SelfCheck,
    SelfCheckTally,
    Variant,
    expected,
    expected_sum,
    genkernels_backends,
)

OP = "adaln"
#: Share of a time budget (group_norm has 1): eight small cases, torch.compile's compile the slow part.
BUDGET_SHARE = 0.5
EPS = 1e-6

NORM = "layer_norm_modulate"
FUSED = "gated_residual_layer_norm_modulate"
OPS = (NORM, FUSED)
MODES = ("fwd", "fwd+bwd")
#: (workload, (B, L, D)): shared/ANCHORS.md's adaptive LayerNorm rows.
SHAPES = (("DiT-XL", (2, 4096, 1152)), ("FLUX", (1, 4608, 3072)))
DTYPE = torch.bfloat16
#: The issue's goals on layer_norm_modulate, bf16 forward: >= 3x eager, >= 1.0x torch.compile, >= 75% copy BW.
EAGER_GOAL, COMPILE_GOAL, BANDWIDTH_GOAL = 3.0, 1.0, 75.0

#: Row tensors (B, L, D) and modulation tensors (B, D) moved per call, by (op, mode).
ROWS_MOVED = {(NORM, "fwd"): 2, (NORM, "fwd+bwd"): 5, (FUSED, "fwd"): 4, (FUSED, "fwd+bwd"): 10}
MODS_MOVED = {(NORM, "fwd"): 2, (NORM, "fwd+bwd"): 6, (FUSED, "fwd"): 3, (FUSED, "fwd+bwd"): 9}
RATE_NOTES = {
    (NORM, "fwd"): "GB/s (x read + y written: 2 row tensors; shift, scale read)",
    (NORM, "fwd+bwd"): "GB/s (forward's 2 + dy, x read and dx written: 5 row tensors; shift, scale read twice, "
    "dshift, dscale written)",
    (FUSED, "fwd"): "GB/s (x, y read + h, out written: 4 row tensors; gate, shift, scale read)",
    (FUSED, "fwd+bwd"): "GB/s (forward's 4 + dh, dout, h, y read and dx, dy written: 10 row tensors; the 3 "
    "modulations read twice, their 3 gradients written)",
}
TABLES = {
    (NORM, "fwd"): "adaLN: layer_norm_modulate, forward",
    (NORM, "fwd+bwd"): "adaLN: layer_norm_modulate, forward + backward",
    (FUSED, "fwd"): "adaLN: gated residual + layer_norm_modulate, forward",
    (FUSED, "fwd+bwd"): "adaLN: gated residual + layer_norm_modulate, forward + backward",
}
#: The inputs of each op, in call order, and which are (B, D) modulations.
INPUTS = {NORM: ("x", "shift", "scale"), FUSED: ("x", "y", "gate", "shift", "scale")}
MODULATIONS = ("gate", "shift", "scale")
BASELINES = {
    NORM: "F.layer_norm(x, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]",
    FUSED: "h = x + gate[:, None] * y; out = F.layer_norm(h, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]",
}


#: Every case is also timed replayed from CUDA graphs: eager's, torch.compile's and each backend's (module doc).
EAGER_GRAPH, COMPILE_GRAPH = graphed(EAGER), graphed(COMPILE)


def variants_of() -> list[str]:
    """A case's variants in report order: eager, torch.compile, both replayed from a CUDA graph, each genkernels
    backend, then each backend replayed from a CUDA graph."""
    return [EAGER, COMPILE, EAGER_GRAPH, COMPILE_GRAPH, *genkernels_backends(), *graph_variants()]


def _ours() -> list[str]:
    """genkernels' variants: each backend, plain and replayed from a CUDA graph."""
    return [*genkernels_backends(), *graph_variants()]


def _modulate(n: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return n * (1 + scale[:, None]) + shift[:, None]


def eager_layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor]:
    """The baseline as users write it: (F.layer_norm(x) * (1 + scale[:, None]) + shift[:, None],) for x (B, L, D)
    and (B, D) shift, scale."""
    return (_modulate(F.layer_norm(x, (x.shape[-1],), eps=EPS), shift, scale),)


def eager_gated_residual_layer_norm_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline as users write it: h = x + gate[:, None] * y, then (h, the modulated LayerNorm of h)."""
    h = x + gate[:, None] * y
    return h, _modulate(F.layer_norm(h, (h.shape[-1],), eps=EPS), shift, scale)


EAGER_FORMULAS: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
    NORM: eager_layer_norm_modulate,
    FUSED: eager_gated_residual_layer_norm_modulate,
}


def _genkernels(op: str, backend: str, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    from genkernels import ops

    if op == NORM:
        x, shift, scale = args
        return (ops.layer_norm_modulate(x, shift=shift, scale=scale, eps=EPS, backend=backend),)
    x, y, gate, shift, scale = args
    return tuple(ops.gated_residual_layer_norm_modulate(x, y, gate, shift=shift, scale=scale, eps=EPS, backend=backend))


def _inputs(
    op: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(inputs in :data:`INPUTS` order, incoming gradients one per output), seeded, in ``dtype``.

    Rows ~ N(0, 1) with a per-row offset (the mean matters to LayerNorm); shift ~ N(0, 0.5^2), scale and
    gate ~ N(0, 0.5^2) (adaLN's modulations near the identity); the incoming gradients ~ N(0, 1).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, length, d = shape

    def randn(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, dtype=torch.float32)

    args = []
    for name in INPUTS[op]:
        if name in MODULATIONS:
            args.append(randn(b, d) * 0.5)
        else:
            args.append(randn(b, length, d) + randn(b, length, 1))
    grads = [randn(b, length, d) for _ in range(1 if op == NORM else 2)]
    return [a.to(device, dtype) for a in args], [t.to(device, dtype) for t in grads]


def _forward_backward(
    impl: Callable[..., tuple[torch.Tensor, ...]], args: Sequence[torch.Tensor], grads: Sequence[torch.Tensor] | None
) -> tuple[torch.Tensor, ...]:
    """The outputs without ``grads``; else the gradients of every input (autograd.grad with ``grads`` as the
    outputs' gradients: no sum kernel, nothing accumulates in .grad between repetitions)."""
    outs = impl(*args)
    if grads is None:
        return tuple(outs)
    return torch.autograd.grad(outs, tuple(args), tuple(grads))


def _output_names(op: str, mode: str) -> tuple[str, ...]:
    if mode == "fwd":
        return ("y",) if op == NORM else ("h", "out")
    return tuple(f"d{n}" for n in INPUTS[op])


def _expected(
    op: str, args: Sequence[torch.Tensor], grads: Sequence[torch.Tensor] | None, truth_dtype: torch.dtype
) -> list[Expected]:
    """The criterion's references: the formula in the input dtype, and on inputs upcast to ``truth_dtype``."""

    def run(dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)

        with torch.no_grad() if grads is None else torch.enable_grad():
            g = None if grads is None else [cast(t) for t in grads]
            return _forward_backward(EAGER_FORMULAS[op], [cast(a) for a in args], g)

    names = _output_names(op, "fwd" if grads is None else "fwd+bwd")
    sums = {f"d{m}" for m in MODULATIONS}  # (B, D) gradients: sums over the L tokens
    return [(expected_sum if n in sums else expected)(n, r, t) for n, r, t in zip(names, run(None), run(truth_dtype))]


class AdaLNCase(MemoryBoundCase):
    """One (op, workload, mode) in bf16: x (B, L, D), per-sample (B, D) modulations, no affine, eps 1e-6."""

    op = OP

    def __init__(self, which: str, workload: str, shape: Sequence[int], mode: str, dtype: torch.dtype = DTYPE):
        b, length, d = shape
        rows, mods = ROWS_MOVED[which, mode], MODS_MOVED[which, mode]
        super().__init__(shape, dtype, rows + mods / length)
        self.which, self.workload, self.mode = which, workload, mode
        self.label = f"{which} {workload} {'x'.join(map(str, shape))} {DTYPE_NAMES[dtype]} {mode}"
        self.params: dict[str, Any] = {
            "workload": workload,
            "kernel": which,
            "shape": list(shape),
            "modulation": [b, d],
            "dtype": DTYPE_NAMES[dtype],
            "mode": mode,
            "eps": EPS,
            "row_tensors_moved": rows,
            "modulation_tensors_moved": mods,
            "baseline": BASELINES[which],
        }
        self.table = TABLES[which, mode]
        self.rate_note = RATE_NOTES[which, mode]
        self.genkernels_variants = _ours()

    def variant_names(self) -> list[str]:
        """:func:`variants_of`."""
        return variants_of()

    def prepare(self, device: torch.device) -> None:
        """Seeded inputs and the references (float64 truth)."""
        args, grads = _inputs(self.which, self.shape, self.dtype, device)
        if self.mode == "fwd":
            grads = None
        else:
            for a in args:
                a.requires_grad_(True)
        self._state = {"args": args, "grads": grads, "expected": _expected(self.which, args, grads, torch.float64)}

    def _impl(self, name: str) -> Callable[..., tuple[torch.Tensor, ...]]:
        """What variant ``name`` (without its graph suffix) calls: the formula, its torch.compile (one compile a
        case, kept for the graphed variant) or a genkernels backend."""
        if name == EAGER:
            return EAGER_FORMULAS[self.which]
        if name == COMPILE:
            if "compiled" not in self._state:
                self._state["compiled"] = compiled(EAGER_FORMULAS[self.which])
            return self._state["compiled"]
        return functools.partial(_genkernels, self.which, name)

    def variant(self, name: str) -> Variant:
        """Build one variant and run it once (:func:`._elementwise.build`); each is checked on every output.
        A graphed variant is captured here (:func:`._elementwise.graph_variant`)."""
        state = self._state
        if name.endswith(GRAPH_SUFFIX):
            fn = functools.partial(
                _forward_backward, self._impl(name[: -len(GRAPH_SUFFIX)]), state["args"], state["grads"]
            )
            return graph_variant(name, fn, state["args"][0].device, state.setdefault("graphs", []))
        return build(name, functools.partial(_forward_backward, self._impl(name), state["args"], state["grads"]))

    def expected(self) -> list[Expected]:
        """y (or h, out) forward; the gradients of every input with forward + backward."""
        return self._state["expected"]


def cases(quick: bool = False) -> list[AdaLNCase]:
    """layer_norm_modulate forward at DiT-XL then FLUX (the goals), the fused pair's forwards, then the forwards +
    backwards in the same order; ``quick``: the forwards."""
    modes = MODES[:1] if quick else MODES
    return [AdaLNCase(which, w, shape, mode) for mode in modes for which in OPS for w, shape in SHAPES]


# --------------------------------------------------------------------------- summary and goals


def bandwidth_goal(rec: CaseRecord | None, name: str, threshold: float) -> Goal:
    """Goal ``name``: the best genkernels variant's % of the copy bandwidth on ``rec`` (a backend, plain or
    replayed from a CUDA graph) at least ``threshold``."""
    target = f">= {threshold:g}% of copy BW"
    ran = [] if rec is None else [r for b in _ours() if (r := rec.result(b)) and r.pct_ceiling]
    if not ran:
        why = "the case did not run" if rec is None else "no genkernels backend ran"
        return Goal(name, target, f"unmeasured ({why})", None)
    best = max(ran, key=lambda r: r.pct_ceiling)
    measured = f"{fmt(best.pct_ceiling, '%')} ({best.variant})"
    if rec.copy_ms and rec.floor_ms:  # what one copy of the same bytes reaches, timed the same way
        measured += f"; a copy of the same bytes: {fmt(100 * rec.floor_ms / rec.copy_ms, '%')}"
    return Goal(name, target, measured, best.pct_ceiling >= threshold)


def _order() -> list[tuple[str, str, str]]:
    return [(which, w, mode) for mode in MODES for which in OPS for w, _ in SHAPES]


def summarize(records: Sequence[CaseRecord]) -> OpSummary:
    """Per case and variant: ms, the floor, speedups vs eager and vs torch.compile, % of copy bandwidth; the
    goals on layer_norm_modulate's bf16 forwards, each on the genkernels backend that does best."""
    by_case = records_by(records, OP, ("kernel", "workload", "mode"))
    headers = ["case", "floor ms", "variant", "ms", "vs eager", "vs torch.compile", "% copy BW"]
    rows = case_rows(by_case, _order(), variants_of())
    goals = []
    for workload, shape in SHAPES:
        rec = by_case.get((NORM, workload, "fwd"))
        what = f"{NORM} bf16 fwd {workload} {'x'.join(map(str, shape))}"
        # Each side at its fastest: a plain call or one replayed from a CUDA graph.
        goals.append(best_speedup_goal(rec, f"{what}, speedup vs eager", _ours(), [EAGER, EAGER_GRAPH], EAGER_GOAL))
        goals.append(
            best_speedup_goal(rec, f"{what}, speedup vs torch.compile", _ours(), [COMPILE, COMPILE_GRAPH], COMPILE_GOAL)
        )
        goals.append(bandwidth_goal(rec, f"{what}, bandwidth", BANDWIDTH_GOAL))
    notes = [
        "Shapes (B, L, D): " + ", ".join(f"{w} {s}" for w, s in SHAPES) + "; bf16; per-sample (B, D) shift, "
        "scale, gate in bf16; LayerNorm without affine, eps 1e-6.",
        f"Baselines, eager and torch.compile: {BASELINES[NORM]}; and {BASELINES[FUSED]}. genkernels: "
        "ops.layer_norm_modulate / ops.gated_residual_layer_norm_modulate per backend.",
        "floor ms: the bytes that must move (see each table's rate note; the (B, D) modulations and their "
        "gradients included) at the copy bandwidth measured in this run; % copy BW = floor / ms. The bandwidth "
        "goals also give the % a copy_ of the same bytes (half read, half written) reaches, timed the same way: "
        "the most one kernel moving them is measured to reach.",
        f"Goals (the issue's) on {NORM}, bf16 forward, each shape: >= {EAGER_GOAL:g}x eager, "
        f">= {COMPILE_GOAL:.1f}x torch.compile, >= {BANDWIDTH_GOAL:g}% of copy BW, each side at its fastest: the "
        "fastest genkernels variant against the faster of eager and eager + CUDA graph (of torch.compile and "
        "torch.compile + CUDA graph). The fused pair and the forward + backward cases are reported without goals. "
        "ANCHORS (H200): eager 0.080 / 0.104 ms, torch.compile 0.037 / 0.041 ms (DiT-XL / FLUX forward).",
        "+ CUDA graph: the call (forward, or forward + autograd.grad) captured once and replayed, for every "
        "variant alike: what its kernels take when no call waits for its CPU time. A timed call follows a 256 MiB "
        "L2 flush, which hides a call's CPU time only up to the flush's; a genkernels call's CPU time (the host ms "
        "column) can exceed it. vs eager and vs torch.compile compare with the plain baselines.",
    ]
    return OpSummary(OP, headers, rows, goals, notes)


# --------------------------------------------------------------------------- CPU self-check

#: Small (B, L, D) for the CPU check (the Triton interpreter is slow): odd D, L = 1, a D over one block of 64.
SELF_CHECK_SHAPES: tuple[tuple[int, int, int], ...] = ((2, 5, 72), (3, 1, 40), (1, 3, 130))


def self_check(backend: str) -> SelfCheck:
    """Check one genkernels backend on CPU against float64 truth (the test criterion): both ops with per-sample
    modulations, forward (the outputs) and forward + backward (every input's gradient), on small shapes.

    bf16 is left out for triton (the interpreter mishandles it). "skipped" with the backend's reason where it
    cannot run here (cuda without a GPU); "failed" on wrong numbers or an error other than UnsupportedError.
    """
    try:
        from genkernels import UnsupportedError
        from genkernels.ops import adaln  # noqa: F401 - the op module must import
    except Exception as e:  # noqa: BLE001 - the op module itself does not import
        return import_failed(OP, backend, "genkernels.ops.adaln", e)
    device = torch.device("cpu")
    dtypes = self_check_dtypes(backend)
    tally = SelfCheckTally(OP, backend)
    for dtype in dtypes:
        for shape in SELF_CHECK_SHAPES:
            for which in OPS:
                for mode in MODES:
                    label = f"{which} {'x'.join(map(str, shape))} {DTYPE_NAMES[dtype]} {mode}"
                    args, grads = _inputs(which, shape, dtype, device, seed=tally.ran + len(tally.skips))
                    if mode == "fwd":
                        grads = None
                    else:
                        for a in args:
                            a.requires_grad_(True)
                    impl = functools.partial(_genkernels, which, backend)
                    failure = check_one(
                        tally,
                        label,
                        functools.partial(_forward_backward, impl, args, grads),
                        functools.partial(_expected, which, args, grads, torch.float64),
                        skip=(UnsupportedError,),
                    )
                    if failure is not None:
                        return failure
    return tally.result(dtypes, f"fwd and fwd+bwd of {NORM} and {FUSED}; (B, D) modulations")


def work_bytes(which: str, mode: str, shape: Sequence[int], dtype: torch.dtype = DTYPE) -> float:
    """Bytes one call moves (see the module doc): row tensors (B, L, D) and (B, D) modulations in ``dtype``."""
    b, length, d = shape
    return float((ROWS_MOVED[which, mode] * b * length * d + MODS_MOVED[which, mode] * b * d) * dtype.itemsize)
