"""Fused sampler steps: benchmark cases, goals and the CPU self-check.

The workload of shared/ANCHORS.md: one DDIM step (eta = 0, epsilon prediction) with
classifier-free guidance at scale 7.5 on a Stable Diffusion latent (2, 4, 128, 128) and on a
video latent (1, 16, 32, 90, 160), float32 (and bf16). The model output is the batched
[uncond; cond] tensor (2B, ...), as pipelines produce it. The baseline is the step as
diffusers-style code writes it, a chain of small elementwise kernels, eager and under
``torch.compile``; genkernels runs it as one ``schedule_step`` call: the model output and the
sample read once, the previous sample written once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .core import (
    COMPILE,
    DTYPE_NAMES,
    EAGER,
    Case,
    CaseRecord,
    Expected,
    Goal,
    OpSummary,
    SelfCheck,
    SelfCheckTally,
    Variant,
    compare,
    expected,
    first_call_s,
    genkernels_backends,
    geomean,
)

OP = "schedule_step"
#: Share of a time budget (group_norm has 1, attention 2): four small cases, torch.compile's the slow part.
BUDGET_SHARE = 0.5
GUIDANCE = 7.5
#: alphas_cumprod at the step's timestep and at the previous one: a mid-schedule step.
ALPHA_T, ALPHA_PREV = 0.5, 0.6

#: (workload, sample shape): shared/ANCHORS.md's step workloads.
SHAPES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("SD latent", (2, 4, 128, 128)),
    ("video latent", (1, 16, 32, 90, 160)),
)
SD_SHAPE, VIDEO_SHAPE = SHAPES[0][1], SHAPES[1][1]
#: Tensors of the sample's size moved per step: the guided model output (two), the sample, prev.
TENSORS_MOVED = 4


def eager_ddim_cfg(model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The baseline as diffusers-style code writes it: guidance, x0 prediction, DDIM update (eta = 0)."""
    uncond, cond = model_output.chunk(2)
    eps = uncond + GUIDANCE * (cond - uncond)
    x0 = (sample - (1 - ALPHA_T) ** 0.5 * eps) / ALPHA_T**0.5
    return ALPHA_PREV**0.5 * x0 + (1 - ALPHA_PREV) ** 0.5 * eps


def ddim_coeffs() -> Any:
    """The step's StepCoeffs: x0 = (x - sqrt(1 - a) out) / sqrt(a), eps from x0,
    prev = sqrt(a') x0 + sqrt(1 - a') eps."""
    from genkernels.ops.schedule import StepCoeffs

    sa, sb = math.sqrt(ALPHA_T), math.sqrt(1 - ALPHA_T)
    return StepCoeffs(
        px=1 / sa, po=-sb / sa, ex=1 / sb, e0=-sa / sb, c0=math.sqrt(ALPHA_PREV), ce=math.sqrt(1 - ALPHA_PREV)
    )


def _genkernels_step(backend: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from genkernels.ops.schedule import schedule_step

    return functools.partial(_call_step, schedule_step, ddim_coeffs(), backend)


def _call_step(op: Callable[..., torch.Tensor], coeffs: Any, backend: str, model_output, sample) -> torch.Tensor:
    return op(sample, model_output, coeffs, guidance_scale=GUIDANCE, backend=backend)


def _explain(model_output: torch.Tensor, sample: torch.Tensor) -> dict[str, str | None]:
    from genkernels import explain

    return explain(OP, sample, model_output, ddim_coeffs(), guidance_scale=GUIDANCE)


def _inputs(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """model_output (2B, ...) and sample (B, ...), seeded standard normals."""
    g = torch.Generator(device=device).manual_seed(seed)
    model_output = torch.randn((2 * shape[0], *shape[1:]), generator=g, device=device).to(dtype)
    sample = torch.randn(tuple(shape), generator=g, device=device).to(dtype)
    return model_output, sample


def _expected(model_output: torch.Tensor, sample: torch.Tensor, truth_dtype: torch.dtype) -> list[Expected]:
    """The criterion's reference: the eager step in the input dtype, and on inputs upcast to truth_dtype."""
    ref = eager_ddim_cfg(model_output, sample)
    truth = eager_ddim_cfg(model_output.to(truth_dtype), sample.to(truth_dtype))
    return [expected("prev_sample", ref, truth)]


class StepCase(Case):
    """One (workload, dtype) of the guided DDIM step."""

    op = OP
    unit = "GB/s"
    table = "DDIM step with classifier-free guidance"
    rate_note = "GB/s (guided model output and sample read, prev written: 4 sample-sized tensors)"

    def __init__(self, workload: str, shape: tuple[int, ...], dtype: torch.dtype):
        self.workload, self.shape, self.dtype = workload, shape, dtype
        self.label = f"{workload} {'x'.join(map(str, shape))} {DTYPE_NAMES[dtype]}"
        self.params: dict[str, Any] = {
            "workload": workload,
            "shape": list(shape),
            "dtype": DTYPE_NAMES[dtype],
            "guidance": GUIDANCE,
        }
        self.work = float(TENSORS_MOVED * math.prod(shape) * torch.finfo(dtype).bits // 8)
        self._state: dict[str, Any] = {}

    def variant_names(self) -> list[str]:
        """eager, torch.compile, then each genkernels backend."""
        return [EAGER, COMPILE, *genkernels_backends()]

    def prepare(self, device: torch.device) -> None:
        """Seeded inputs and the reference (float64 truth: the tensors are small)."""
        model_output, sample = _inputs(self.shape, self.dtype, device)
        self._state = {"args": (model_output, sample), "expected": _expected(model_output, sample, torch.float64)}

    def _fn(self, impl: Callable[..., torch.Tensor]) -> Callable[[], tuple[torch.Tensor, ...]]:
        model_output, sample = self._state["args"]
        return lambda: (impl(model_output, sample),)

    def variant(self, name: str) -> Variant:
        """Build one variant; torch.compile is compiled here and its compile time recorded."""
        if name == EAGER:
            fn = self._fn(eager_ddim_cfg)
            return Variant(EAGER, "baseline", fn, first_call_s=first_call_s(fn))
        if name == COMPILE:
            torch._dynamo.reset()  # a fresh compile per case, its cost reported
            fn = self._fn(torch.compile(eager_ddim_cfg, dynamic=False))
            return Variant(COMPILE, "baseline", fn, first_call_s=first_call_s(fn))
        model_output, sample = self._state["args"]
        try:
            reasons = _explain(model_output, sample)
        except Exception as e:  # noqa: BLE001 - genkernels' op missing or broken: every backend is skipped
            return Variant(name, "genkernels", skip=f"genkernels.explain failed: {type(e).__name__}: {e}")
        if name not in reasons:
            return Variant(name, "genkernels", skip=f"backend {name!r} is not registered for {OP}")
        if reasons[name] is not None:
            return Variant(name, "genkernels", skip=reasons[name])
        fn = self._fn(_genkernels_step(name))
        return Variant(name, "genkernels", fn, first_call_s=first_call_s(fn))

    def expected(self) -> list[Expected]:
        """prev_sample, float64 truth with the criterion's bound."""
        return self._state["expected"]

    def release(self) -> None:
        """Drop inputs and references."""
        self._state = {}


def cases(quick: bool = False) -> list[StepCase]:
    """float32 (the ANCHORS figures) first, then bf16; ``quick`` keeps float32."""
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    return [StepCase(workload, shape, dtype) for dtype in dtypes for workload, shape in SHAPES]


# --------------------------------------------------------------------------- summary and goals


def _result(records: Sequence[CaseRecord], shape: tuple[int, ...], variant: str) -> Any:
    for rec in records:
        if rec.op == OP and rec.params["dtype"] == "fp32" and tuple(rec.params["shape"]) == shape:
            return rec.result(variant)
    return None


def summarize(records: Sequence[CaseRecord]) -> OpSummary:
    """Per variant, on the float32 cases: speedup vs eager and vs torch.compile, % of copy bandwidth;
    and the issue's goals, on the genkernels backend with the best geomean speedup vs eager."""
    headers = ["variant"]
    for workload, shape in SHAPES:
        headers += [f"{workload} vs eager", f"{workload} vs torch.compile", f"{workload} % copy BW"]
    rows, values = [], {}
    for variant in [COMPILE, *genkernels_backends()]:
        row, vals = [variant], {}
        for _, shape in SHAPES:
            res = _result(records, shape, variant)
            ve = None if res is None else res.vs_eager
            vc = None if res is None or variant == COMPILE else res.vs_compile
            bw = None if res is None else res.pct_ceiling
            vals[shape] = (ve, vc, bw)
            row += [
                "n/a" if ve is None else f"{ve:.2f}x",
                "-" if variant == COMPILE else "n/a" if vc is None else f"{vc:.2f}x",
                "n/a" if bw is None else f"{bw:.0f}%",
            ]
        rows.append(row)
        values[variant] = vals
    ranked = [b for b in genkernels_backends() if all(values[b][s][0] is not None for _, s in SHAPES)]
    best = max(ranked, key=lambda b: geomean(values[b][s][0] for _, s in SHAPES)) if ranked else None
    return OpSummary(OP, headers, rows, _goals(best, values.get(best)), notes=["float32 cases, as in ANCHORS."])


def _goals(best: str | None, vals: dict | None) -> list[Goal]:
    names = [
        ("fp32 SD latent step, speedup vs eager", ">= 4x", 4.0, "x", SD_SHAPE, 0),
        ("fp32 SD latent step, speedup vs torch.compile", ">= 1.0x", 1.0, "x", SD_SHAPE, 1),
        ("fp32 video latent step, speedup vs torch.compile", ">= 1.0x", 1.0, "x", VIDEO_SHAPE, 1),
        ("fp32 video latent step, % of copy bandwidth", ">= 80%", 80.0, "%", VIDEO_SHAPE, 2),
    ]
    goals = []
    for name, target, threshold, unit, shape, i in names:
        value = None if vals is None else vals[shape][i]
        if value is None:
            goals.append(Goal(name, target, "unmeasured (no genkernels backend ran every case)", None))
            continue
        shown = f"{value:.2f}x" if unit == "x" else f"{value:.0f}%"
        goals.append(Goal(name, target, f"{shown} ({best})", value >= threshold))
    return goals


# --------------------------------------------------------------------------- CPU self-check

SELF_CHECK_SHAPES: tuple[tuple[int, ...], ...] = ((2, 4, 8, 8), (1, 3, 5, 7, 3))


def self_check(backend: str) -> SelfCheck:
    """Check one genkernels backend on CPU against the float64 eager step (the test criterion)."""
    device = torch.device("cpu")
    dtypes = (torch.float32, torch.float16) if backend == "triton" else (torch.float32, torch.float16, torch.bfloat16)
    try:
        impl = _genkernels_step(backend)
    except Exception as e:  # noqa: BLE001 - the op module itself does not import
        return SelfCheck(OP, backend, "failed", f"cannot import genkernels.ops.schedule: {type(e).__name__}: {e}")
    tally = SelfCheckTally(OP, backend)
    for dtype in dtypes:
        for shape in SELF_CHECK_SHAPES:
            label = f"{'x'.join(map(str, shape))} {DTYPE_NAMES[dtype]}"
            model_output, sample = _inputs(shape, dtype, device, seed=tally.ran)
            reason = _explain(model_output, sample).get(backend, f"backend {backend!r} is not registered")
            if reason is not None:
                tally.skips.append(reason)
                continue
            try:
                check = compare((impl(model_output, sample),), _expected(model_output, sample, torch.float64))
            except Exception as e:  # noqa: BLE001 - it said it could run these inputs
                return tally.failed(f"{label}: raised {type(e).__name__}: {e}")
            failure = tally.add(label, check)
            if failure is not None:
                return failure
    return tally.result(dtypes, "guided DDIM step")
