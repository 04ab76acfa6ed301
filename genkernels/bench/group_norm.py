"""GroupNorm(32 groups) + SiLU: benchmark cases, goals and the CPU self-check.

Shapes are the Stable Diffusion UNet and VAE decoder activations of shared/ANCHORS.md, each
in NCHW and channels_last, bf16 and fp16, forward and forward + backward (gradients of x,
weight and bias, as in training). The baseline is what users write:
``F.silu(F.group_norm(x, 32, weight, bias))``, eager and under ``torch.compile``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ._elementwise import MemoryBoundCase, check_one, compiled, import_failed, self_check_dtypes
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
    first_call_s,
    genkernels_backends,
    geomean,
)

OP = "group_norm"
GROUPS = 32
EPS = 1e-5

#: (workload, (N, C, H, W)): shared/ANCHORS.md's GroupNorm table.
SHAPES: tuple[tuple[str, tuple[int, int, int, int]], ...] = (
    ("SD UNet", (2, 320, 64, 64)),
    ("SD UNet", (2, 1280, 16, 16)),
    ("VAE decoder", (1, 512, 128, 128)),
    ("VAE decoder", (1, 128, 512, 512)),
)
LAYOUTS = ("NCHW", "channels_last")
MODES = ("fwd", "fwd+bwd")
#: The shape whose forward must reach a fraction of copy bandwidth (the goals below).
BANDWIDTH_SHAPE = (1, 128, 512, 512)

TABLES = {"fwd": "forward", "fwd+bwd": "forward + backward"}
RATE_NOTES = {
    "fwd": "GB/s (x read + y written)",
    "fwd+bwd": "GB/s (x, dy read + y, dx written, and x read again by the backward: 5 tensors)",
}
#: Tensors of x's size that must move: forward x read, y written; the backward reads dy and x again (the
#: normalized x and the pre-activation are recomputed from it) and writes dx.
TENSORS_MOVED = {"fwd": 2, "fwd+bwd": 5}


def eager_group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The baseline as users write it: ``F.silu(F.group_norm(x, 32, weight, bias, 1e-5))``."""
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


def _genkernels_group_norm(backend: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    from genkernels.ops import group_norm

    return functools.partial(_call_group_norm, group_norm, backend)


def _call_group_norm(op: Callable[..., torch.Tensor], backend: str, x, weight, bias) -> torch.Tensor:
    return op(x, GROUPS, weight, bias, EPS, "silu", backend=backend)


def _explain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, str | None]:
    from genkernels import explain

    return explain(OP, x, GROUPS, weight, bias, EPS, "silu")


def _inputs(
    shape: Sequence[int],
    layout: str,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    scale: float = 2.0,
    offset: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, weight, bias, dy: seeded, so every run times and checks the same numbers.

    x has a nonzero mean so that a variance computed as E[x^2] - E[x]^2 would show its
    cancellation error; weight is near 1 and bias near 0, as in a trained network.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    c = shape[1]

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32)

    x = (randn(*shape) * scale + offset).to(dtype)
    dy = randn(*shape).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    weight = (1 + 0.1 * randn(c)).to(dtype)
    bias = (0.1 * randn(c)).to(dtype)
    return x, weight, bias, dy


def _forward_backward(
    fn: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dy: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """(y,) without dy; else (dx, dweight, dbias) of y = fn(x, weight, bias) against dy.

    autograd.grad rather than backward(): nothing accumulates into .grad between repetitions,
    so each timed call does the same work.
    """
    y = fn(x, weight, bias)
    if dy is None:
        return (y,)
    return torch.autograd.grad(y, (x, weight, bias), dy)


def _expected(
    fn_ref: Callable[..., torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    dy: torch.Tensor | None,
    truth_dtype: torch.dtype,
) -> list[Expected]:
    """The criterion's references: ``fn_ref`` in the input dtype, and again on inputs upcast to truth_dtype."""
    ref = _forward_backward(fn_ref, x, weight, bias, dy)

    def up(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(truth_dtype).requires_grad_(t.requires_grad)

    truth = _forward_backward(fn_ref, up(x), up(weight), up(bias), None if dy is None else dy.to(truth_dtype))
    names = ("y",) if dy is None else ("dx", "dweight", "dbias")
    return [expected(n, r, t) for n, r, t in zip(names, ref, truth)]


class GroupNormCase(MemoryBoundCase):
    """One (shape, layout, dtype, mode) of GroupNorm(32) + SiLU with weight and bias."""

    op = OP

    def __init__(self, workload: str, shape: tuple[int, int, int, int], layout: str, dtype: torch.dtype, mode: str):
        super().__init__(shape, dtype, TENSORS_MOVED[mode])
        self.workload, self.layout, self.mode = workload, layout, mode
        short = "NCHW" if layout == "NCHW" else "NHWC"
        self.label = f"{'x'.join(map(str, shape))} {short} {DTYPE_NAMES[dtype]} {mode}"
        self.params: dict[str, Any] = {
            "workload": workload,
            "shape": list(shape),
            "groups": GROUPS,
            "layout": layout,
            "dtype": DTYPE_NAMES[dtype],
            "mode": mode,
        }
        self.table = TABLES[mode]
        self.rate_note = RATE_NOTES[mode]

    def prepare(self, device: torch.device) -> None:
        """Seeded inputs in the case's layout and dtype, and the references (float32 truth)."""
        x, weight, bias, dy = _inputs(self.shape, self.layout, self.dtype, device)
        if self.mode == "fwd":
            dy = None
        else:
            for t in (x, weight, bias):
                t.requires_grad_(True)
        # float32 truth (the tests use float64): at bf16/fp16 output precision the difference is far below
        # the bound, and it keeps the check quick and small on the (1, 128, 512, 512) case.
        exp = _expected(eager_group_norm_silu, x, weight, bias, dy, torch.float32)
        self._state = {"args": (x, weight, bias, dy), "expected": exp}

    def _fn(self, impl: Callable[..., torch.Tensor]) -> Callable[[], tuple[torch.Tensor, ...]]:
        x, weight, bias, dy = self._state["args"]
        return functools.partial(_forward_backward, impl, x, weight, bias, dy)

    def variant(self, name: str) -> Variant:
        """Build one variant; torch.compile is compiled here and its compile time recorded."""
        if name == EAGER:
            fn = self._fn(eager_group_norm_silu)
            return Variant(EAGER, "baseline", fn, first_call_s=first_call_s(fn))
        if name == COMPILE:
            fn = self._fn(compiled(eager_group_norm_silu))
            return Variant(COMPILE, "baseline", fn, first_call_s=first_call_s(fn))
        x, weight, bias, _ = self._state["args"]
        try:
            reasons = _explain(x, weight, bias)
        except Exception as e:  # noqa: BLE001 - genkernels' op missing or broken: every backend is skipped
            return Variant(name, "genkernels", skip=f"genkernels.explain failed: {type(e).__name__}: {e}")
        if name not in reasons:
            return Variant(name, "genkernels", skip=f"backend {name!r} is not registered for {OP}")
        if reasons[name] is not None:
            return Variant(name, "genkernels", skip=reasons[name])
        fn = self._fn(_genkernels_group_norm(name))
        return Variant(name, "genkernels", fn, first_call_s=first_call_s(fn))

    def expected(self) -> list[Expected]:
        """y (forward) or dx, dweight, dbias (forward + backward), float32 truth with the criterion's bounds."""
        return self._state["expected"]


def cases(quick: bool = False) -> list[GroupNormCase]:
    """Every case, most important first, so a time budget that runs out drops the least important.

    Order: bf16 forward, bf16 forward + backward (what the goals need), then fp16 likewise.
    ``quick`` keeps bf16 only.
    """
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)
    return [
        GroupNormCase(workload, shape, layout, dtype, mode)
        for dtype in dtypes
        for mode in MODES
        for workload, shape in SHAPES
        for layout in LAYOUTS
    ]


# --------------------------------------------------------------------------- summary and goals


def _select(records: Sequence[CaseRecord], dtype: str, mode: str) -> list[CaseRecord]:
    return [r for r in records if r.op == OP and r.params["dtype"] == dtype and r.params["mode"] == mode]


def _complete_geomean(records: Sequence[CaseRecord], variant: str, attr: str) -> tuple[float | None, int]:
    """Geomean of ``attr`` over records, None unless the variant ran every one of them; and how many ran."""
    vals = []
    for rec in records:
        res = rec.result(variant)
        if res is not None and getattr(res, attr) is not None:
            vals.append(getattr(res, attr))
    if not records or len(vals) < len(records):
        return None, len(vals)
    return geomean(vals), len(vals)


def summarize(records: Sequence[CaseRecord]) -> OpSummary:
    """Per backend: bf16 forward geomean speedups vs eager and torch.compile, % of copy bandwidth on
    (1, 128, 512, 512), bf16 forward + backward geomean vs eager; and the goals, measured on
    the fastest genkernels backend (highest bf16 forward geomean vs eager)."""
    fwd = _select(records, "bf16", "fwd")
    fwdbwd = _select(records, "bf16", "fwd+bwd")
    large = {r.params["layout"]: r for r in fwd if tuple(r.params["shape"]) == BANDWIDTH_SHAPE}

    def pct(variant: str, layout: str) -> float | None:
        res = large[layout].result(variant) if layout in large else None
        return None if res is None else res.pct_ceiling

    def cell(value: float | None, n: int, total: int, fmt: str) -> str:
        return fmt.format(value) if value is not None else f"n/a ({n} of {total} cases)"

    headers = [
        "variant",
        f"bf16 fwd vs eager (geomean of {len(fwd)})",
        "bf16 fwd vs torch.compile",
        f"% copy BW, bf16 fwd {'x'.join(map(str, BANDWIDTH_SHAPE))} NCHW",
        "same, channels_last",
        f"bf16 fwd+bwd vs eager (geomean of {len(fwdbwd)})",
    ]
    rows, per_backend = [], {}
    for variant in [COMPILE, *genkernels_backends()]:
        ge, n_ge = _complete_geomean(fwd, variant, "vs_eager")
        gc, n_gc = _complete_geomean(fwd, variant, "vs_compile")
        gb, n_gb = _complete_geomean(fwdbwd, variant, "vs_eager")
        p = {layout: pct(variant, layout) for layout in LAYOUTS}
        per_backend[variant] = (ge, gc, p, gb)
        rows.append(
            [
                variant,
                cell(ge, n_ge, len(fwd), "{:.2f}x"),
                "-" if variant == COMPILE else cell(gc, n_gc, len(fwd), "{:.2f}x"),
                *("n/a" if p[lay] is None else f"{p[lay]:.0f}%" for lay in LAYOUTS),
                cell(gb, n_gb, len(fwdbwd), "{:.2f}x"),
            ]
        )

    ranked = [b for b in genkernels_backends() if per_backend[b][0] is not None]
    best = max(ranked, key=lambda b: per_backend[b][0]) if ranked else None
    return OpSummary(
        OP,
        headers,
        rows,
        _goals(best, per_backend.get(best), len(fwd), len(fwdbwd)),
        notes=[
            (
                "Goals are measured on the fastest genkernels backend (highest bf16 forward geomean vs eager) "
                "that ran and passed every bf16 case; a backend that skipped or failed one has no geomean."
            ),
        ],
    )


def _goals(best: str | None, values: tuple | None, n_fwd: int, n_fwdbwd: int) -> list[Goal]:
    names = [
        (f"bf16 forward, geomean speedup vs eager ({n_fwd} cases)", ">= 3x", 3.0, "x"),
        (f"bf16 forward, geomean speedup vs torch.compile ({n_fwd} cases)", ">= 1.5x", 1.5, "x"),
        (f"bf16 forward {BANDWIDTH_SHAPE}, % of copy bandwidth (worse of NCHW, channels_last)", ">= 60%", 60.0, "%"),
        (f"bf16 forward + backward, geomean speedup vs eager ({n_fwdbwd} cases)", ">= 2x", 2.0, "x"),
    ]
    if best is None or values is None:
        return [Goal(n, t, "no genkernels backend ran every case", False) for n, t, _, _ in names]
    ge, gc, p, gb = values
    bw = None if any(p[lay] is None for lay in LAYOUTS) else min(p[lay] for lay in LAYOUTS)
    goals = []
    for (name, target, threshold, unit), value in zip(names, (ge, gc, bw, gb)):
        if value is None:
            goals.append(Goal(name, target, f"n/a ({best})", False))
        else:
            shown = f"{value:.2f}x" if unit == "x" else f"{value:.0f}%"
            goals.append(Goal(name, target, f"{shown} ({best})", value >= threshold))
    return goals


# --------------------------------------------------------------------------- CPU self-check

#: Small shapes for the CPU check (the Triton interpreter is slow): channels not a multiple of a
#: block, odd spatial sizes, H*W = 1, channels_last, and fp16 magnitudes near 1e4.
SELF_CHECK_CASES: tuple[tuple[tuple[int, int, int, int], str, float, float], ...] = (
    ((2, 64, 8, 8), "NCHW", 2.0, 0.5),
    ((2, 64, 8, 8), "channels_last", 2.0, 0.5),
    ((3, 96, 5, 7), "NCHW", 2.0, 0.5),
    ((3, 96, 5, 7), "channels_last", 2.0, 0.5),
    ((2, 64, 1, 1), "NCHW", 2.0, 0.5),
    ((2, 64, 4, 4), "NCHW", 1e3, 1e4),
)


def self_check(backend: str) -> SelfCheck:
    """Check one genkernels backend on CPU against float64 truth (the test criterion), forward and backward.

    bf16 is left out for triton: the interpreter mishandles it (shared/DESIGN.md). Returns
    "ok", "failed" (wrong numbers, or an error on inputs the backend said it accepts) or
    "skipped" (the backend's reason for not running on this machine).
    """
    device = torch.device("cpu")
    dtypes = self_check_dtypes(backend)
    try:
        impl = _genkernels_group_norm(backend)
    except Exception as e:  # noqa: BLE001 - the op module itself does not import
        return import_failed(OP, backend, "genkernels.ops.group_norm", e)
    tally = SelfCheckTally(OP, backend)
    for dtype in dtypes:
        for shape, layout, scale, offset in SELF_CHECK_CASES:
            if dtype == torch.bfloat16 and scale > 100:
                continue  # 1e4 is not representable closely enough in bf16 for the check to mean much
            for mode in MODES:
                label = f"{'x'.join(map(str, shape))} {layout} {DTYPE_NAMES[dtype]} {mode}"
                x, weight, bias, dy = _inputs(shape, layout, dtype, device, seed=tally.ran, scale=scale, offset=offset)
                reason = _explain(x, weight, bias).get(backend, f"backend {backend!r} is not registered")
                if reason is not None:
                    tally.skips.append(reason)
                    continue
                if mode == "fwd":
                    dy = None
                else:
                    for t in (x, weight, bias):
                        t.requires_grad_(True)
                # No skip: it said it could run these inputs.
                failure = check_one(
                    tally,
                    label,
                    functools.partial(_forward_backward, impl, x, weight, bias, dy),
                    functools.partial(_expected, eager_group_norm_silu, x, weight, bias, dy, torch.float64),
                )
                if failure is not None:
                    return failure
    return tally.result(dtypes)
