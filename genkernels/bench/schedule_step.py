"""Fused sampler steps: benchmark cases, goals and the CPU self-check.

The workloads of shared/ANCHORS.md: a Stable Diffusion latent (2, 4, 128, 128) and a video
latent (1, 16, 32, 90, 160), float32 (and bf16), one mid-schedule step of each sampler with
classifier-free guidance at scale 7.5 (the model output is the batched [uncond; cond] tensor
(2B, ...), as pipelines produce it): DDIM (eta = 0, the ANCHORS case), DDPM, Euler,
Euler-ancestral and flow-matching Euler, and add_noise (the training-side op). The stochastic
steps take an explicit noise tensor on every side, so that the outputs can be compared;
DPM-Solver++ 2M takes the previous step's x0 in that slot (and writes this step's x0 for the
next, as the op returns it).

The baseline is each step as diffusers-style code writes it, a chain of small elementwise
kernels, eager and under ``torch.compile``; genkernels runs it as one call of the named op
(``genkernels.ops.ddim_step`` ...), one pass: each input read once, the previous sample written
once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

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
)

OP = "schedule_step"
#: Share of a time budget (group_norm has 1, attention 2): small cases, torch.compile's the slow part.
BUDGET_SHARE = 0.5
GUIDANCE = 7.5
#: alphas_cumprod at the step's timestep and at the previous one: a mid-schedule step; the same
#: step in sigma space (sigma = sqrt((1 - abar) / abar)); flow-matching sigmas.
ALPHA_T, ALPHA_PREV = 0.5, 0.6
SIGMA, SIGMA_NEXT = math.sqrt((1 - ALPHA_T) / ALPHA_T), math.sqrt((1 - ALPHA_PREV) / ALPHA_PREV)
FLOW_SIGMA, FLOW_SIGMA_NEXT = 0.6, 0.5
#: DPM-Solver++ 2M's previous sigma (the step before SIGMA).
SIGMA_PREV = 1.25

#: (workload, sample shape): shared/ANCHORS.md's step workloads.
SHAPES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("SD latent", (2, 4, 128, 128)),
    ("video latent", (1, 16, 32, 90, 160)),
)
SD_SHAPE, VIDEO_SHAPE = SHAPES[0][1], SHAPES[1][1]


def _guided(model_output: torch.Tensor) -> torch.Tensor:
    uncond, cond = model_output.chunk(2)
    return uncond + GUIDANCE * (cond - uncond)


def eager_ddim_cfg(model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """DDIM (eta = 0, epsilon) with guidance, as diffusers-style code writes it; noise unused."""
    eps = _guided(model_output)
    x0 = (sample - (1 - ALPHA_T) ** 0.5 * eps) / ALPHA_T**0.5
    return ALPHA_PREV**0.5 * x0 + (1 - ALPHA_PREV) ** 0.5 * eps


def eager_ddpm_cfg(model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """DDPM ancestral step (epsilon, fixed_small variance) with guidance: posterior mean plus std * noise."""
    eps = _guided(model_output)
    x0 = (sample - (1 - ALPHA_T) ** 0.5 * eps) / ALPHA_T**0.5
    alpha_step = ALPHA_T / ALPHA_PREV
    beta_step = 1 - alpha_step
    mean = (
        ALPHA_PREV**0.5 * beta_step / (1 - ALPHA_T) * x0 + alpha_step**0.5 * (1 - ALPHA_PREV) / (1 - ALPHA_T) * sample
    )
    return mean + ((1 - ALPHA_PREV) / (1 - ALPHA_T) * beta_step) ** 0.5 * noise


def eager_euler_cfg(model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Euler (sigma space, epsilon) with guidance; noise unused."""
    eps = _guided(model_output)
    x0 = sample - SIGMA * eps
    derivative = (sample - x0) / SIGMA
    return sample + derivative * (SIGMA_NEXT - SIGMA)


def eager_euler_ancestral_cfg(model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Euler-ancestral (epsilon) with guidance: Euler down to sigma_down, plus sigma_up * noise."""
    sigma_up = (SIGMA_NEXT**2 * (SIGMA**2 - SIGMA_NEXT**2) / SIGMA**2) ** 0.5
    sigma_down = (SIGMA_NEXT**2 - sigma_up**2) ** 0.5
    eps = _guided(model_output)
    x0 = sample - SIGMA * eps
    derivative = (sample - x0) / SIGMA
    return sample + derivative * (sigma_down - SIGMA) + noise * sigma_up


def eager_dpmpp_2m_cfg(model_output: torch.Tensor, sample: torch.Tensor, x0_prev: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++ 2M (midpoint, epsilon) with guidance, in log-SNR form as diffusers writes it;
    the third input is the previous step's x0."""

    def alpha_sigma(s: float) -> tuple[float, float]:
        alpha = 1 / (s * s + 1) ** 0.5
        return alpha, s * alpha

    alpha_t, sigma_t = alpha_sigma(SIGMA)
    alpha_next, sigma_next = alpha_sigma(SIGMA_NEXT)
    lambda_prev, lambda_t, lambda_next = (-math.log(v) for v in (SIGMA_PREV, SIGMA, SIGMA_NEXT))
    h = lambda_next - lambda_t
    r0 = (lambda_t - lambda_prev) / h
    eps = _guided(model_output)
    x0 = (sample - sigma_t * eps) / alpha_t
    d1 = (x0 - x0_prev) / r0
    return (
        sigma_next / sigma_t * sample
        - alpha_next * (math.exp(-h) - 1.0) * x0
        - 0.5 * alpha_next * (math.exp(-h) - 1.0) * d1
    )


def eager_flow_euler_cfg(model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching Euler (velocity) with guidance; noise unused."""
    return sample + (FLOW_SIGMA_NEXT - FLOW_SIGMA) * _guided(model_output)


def eager_add_noise(model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0): sqrt(abar) * x0 + sqrt(1 - abar) * noise, x0 = sample; model_output unused."""
    return ALPHA_T**0.5 * sample + (1 - ALPHA_T) ** 0.5 * noise


def _ops():
    from genkernels import ops

    return ops


def _gk_ddim(backend, model_output, sample, noise):
    return _ops().ddim_step(model_output, sample, ALPHA_T, ALPHA_PREV, guidance_scale=GUIDANCE, backend=backend)


def _gk_ddpm(backend, model_output, sample, noise):
    return _ops().ddpm_step(
        model_output, sample, ALPHA_T, ALPHA_PREV, guidance_scale=GUIDANCE, noise=noise, backend=backend
    )


def _gk_euler(backend, model_output, sample, noise):
    return _ops().euler_step(model_output, sample, SIGMA, SIGMA_NEXT, guidance_scale=GUIDANCE, backend=backend)


def _gk_euler_ancestral(backend, model_output, sample, noise):
    return _ops().euler_ancestral_step(
        model_output, sample, SIGMA, SIGMA_NEXT, guidance_scale=GUIDANCE, noise=noise, backend=backend
    )


def _gk_dpmpp_2m(backend, model_output, sample, x0_prev):
    prev, _ = _ops().dpmpp_2m_step(
        model_output,
        sample,
        SIGMA,
        SIGMA_NEXT,
        x0_prev,
        SIGMA_PREV,
        guidance_scale=GUIDANCE,
        backend=backend,
    )
    return prev


def _gk_flow_euler(backend, model_output, sample, noise):
    return _ops().flow_euler_step(
        model_output, sample, FLOW_SIGMA, FLOW_SIGMA_NEXT, guidance_scale=GUIDANCE, backend=backend
    )


def _gk_add_noise(backend, model_output, sample, noise):
    return _ops().add_noise(sample, noise, ALPHA_T**0.5, (1 - ALPHA_T) ** 0.5, backend=backend)


@dataclass(frozen=True)
class Step:
    """One benchmarked step: its eager baseline, its genkernels call, and the sample-sized tensors it moves."""

    name: str
    eager: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    genkernels: Callable[..., torch.Tensor]
    tensors_moved: int  # guided model output (2) + sample + prev, + noise or x0_prev, + x0 (DPM-Solver++)
    guided: bool = True


STEPS: tuple[Step, ...] = (
    Step("DDIM", eager_ddim_cfg, _gk_ddim, 4),
    Step("DDPM", eager_ddpm_cfg, _gk_ddpm, 5),
    Step("Euler", eager_euler_cfg, _gk_euler, 4),
    Step("Euler-ancestral", eager_euler_ancestral_cfg, _gk_euler_ancestral, 5),
    Step("DPM-Solver++ 2M", eager_dpmpp_2m_cfg, _gk_dpmpp_2m, 6),  # + x0_prev read, x0 written
    Step("flow Euler", eager_flow_euler_cfg, _gk_flow_euler, 4),
    Step("add_noise", eager_add_noise, _gk_add_noise, 3, guided=False),
)


def ddim_coeffs() -> Any:
    """The DDIM step's StepCoeffs: x0 = (x - sqrt(1 - a) out) / sqrt(a), eps from x0,
    prev = sqrt(a') x0 + sqrt(1 - a') eps (what ddim_step computes for eta = 0)."""
    from genkernels.ops.schedule import StepCoeffs

    sa, sb = math.sqrt(ALPHA_T), math.sqrt(1 - ALPHA_T)
    return StepCoeffs(
        px=1 / sa, po=-sb / sa, ex=1 / sb, e0=-sa / sb, c0=math.sqrt(ALPHA_PREV), ce=math.sqrt(1 - ALPHA_PREV)
    )


def _explain(model_output: torch.Tensor, sample: torch.Tensor) -> dict[str, str | None]:
    """Each backend's reason not to run a step on these tensors (reasons depend on dtypes and devices only)."""
    from genkernels import explain

    return explain(OP, sample, model_output, ddim_coeffs(), guidance_scale=GUIDANCE)


def _inputs(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """model_output (2B, ...), sample and noise (B, ...), seeded standard normals."""
    g = torch.Generator(device=device).manual_seed(seed)
    model_output = torch.randn((2 * shape[0], *shape[1:]), generator=g, device=device).to(dtype)
    sample = torch.randn(tuple(shape), generator=g, device=device).to(dtype)
    noise = torch.randn(tuple(shape), generator=g, device=device).to(dtype)
    return model_output, sample, noise


def _expected(step: Step, args: Sequence[torch.Tensor], truth_dtype: torch.dtype) -> list[Expected]:
    """The criterion's reference: the eager step in the input dtype, and on inputs upcast to truth_dtype."""
    ref = step.eager(*args)
    truth = step.eager(*(t.to(truth_dtype) for t in args))
    return [expected("prev_sample", ref, truth)]


class StepCase(MemoryBoundCase):
    """One (step, workload, dtype): a guided sampler step (or add_noise) on a latent."""

    op = OP
    table = "sampler steps with classifier-free guidance"
    rate_note = "GB/s (each input read once, prev written once: 3 to 5 sample-sized tensors, see params)"

    def __init__(self, step: Step, workload: str, shape: tuple[int, ...], dtype: torch.dtype):
        super().__init__(shape, dtype, step.tensors_moved)
        self.step, self.workload = step, workload
        self.label = f"{step.name} {workload} {'x'.join(map(str, shape))} {DTYPE_NAMES[dtype]}"
        self.params: dict[str, Any] = {
            "step": step.name,
            "workload": workload,
            "shape": list(shape),
            "dtype": DTYPE_NAMES[dtype],
            "guidance": GUIDANCE if step.guided else None,
            "tensors_moved": step.tensors_moved,
        }

    def prepare(self, device: torch.device) -> None:
        """Seeded inputs and the reference (float64 truth: the tensors are small)."""
        args = _inputs(self.shape, self.dtype, device)
        self._state = {"args": args, "expected": _expected(self.step, args, torch.float64)}

    def _fn(self, impl: Callable[..., torch.Tensor]) -> Callable[[], tuple[torch.Tensor, ...]]:
        model_output, sample, noise = self._state["args"]
        return lambda: (impl(model_output, sample, noise),)

    def variant(self, name: str) -> Variant:
        """Build one variant; torch.compile is compiled here and its compile time recorded."""
        if name == EAGER:
            fn = self._fn(self.step.eager)
            return Variant(EAGER, "baseline", fn, first_call_s=first_call_s(fn))
        if name == COMPILE:
            fn = self._fn(compiled(self.step.eager))
            return Variant(COMPILE, "baseline", fn, first_call_s=first_call_s(fn))
        model_output, sample, _ = self._state["args"]
        try:
            reasons = _explain(model_output, sample)
        except Exception as e:  # noqa: BLE001 - genkernels' op missing or broken: every backend is skipped
            return Variant(name, "genkernels", skip=f"genkernels.explain failed: {type(e).__name__}: {e}")
        if name not in reasons:
            return Variant(name, "genkernels", skip=f"backend {name!r} is not registered for {OP}")
        if reasons[name] is not None:
            return Variant(name, "genkernels", skip=reasons[name])
        genkernels_step = self.step.genkernels
        fn = self._fn(lambda mo, x, n: genkernels_step(name, mo, x, n))
        return Variant(name, "genkernels", fn, first_call_s=first_call_s(fn))

    def expected(self) -> list[Expected]:
        """prev_sample, float64 truth with the criterion's bound."""
        return self._state["expected"]


def cases(quick: bool = False) -> list[StepCase]:
    """float32 (the ANCHORS figures) first, DDIM first, then bf16; ``quick``: float32 DDIM only."""
    if quick:
        return [StepCase(STEPS[0], workload, shape, torch.float32) for workload, shape in SHAPES]
    return [
        StepCase(step, workload, shape, dtype)
        for dtype in (torch.float32, torch.bfloat16)
        for step in STEPS
        for workload, shape in SHAPES
    ]


# --------------------------------------------------------------------------- summary and goals


def _result(records: Sequence[CaseRecord], step: str, shape: tuple[int, ...], variant: str) -> Any:
    for rec in records:
        params = rec.params
        if rec.op == OP and params["dtype"] == "fp32" and params["step"] == step and tuple(params["shape"]) == shape:
            return rec.result(variant)
    return None


def summarize(records: Sequence[CaseRecord]) -> OpSummary:
    """Per step and variant, on the float32 cases: speedups vs eager and torch.compile, % of copy
    bandwidth; and the goals, the worst step of the best genkernels backend."""
    headers = ["step", "variant"]
    for workload, _ in SHAPES:
        headers += [f"{workload} vs eager", f"{workload} vs torch.compile", f"{workload} % copy BW"]
    rows = []
    # values[variant][step][shape] = (vs eager, vs compile, % copy bandwidth)
    values: dict[str, dict[str, dict[tuple[int, ...], tuple]]] = {}
    for step in STEPS:
        for variant in [COMPILE, *genkernels_backends()]:
            row = [step.name, variant]
            for _, shape in SHAPES:
                res = _result(records, step.name, shape, variant)
                ve = None if res is None else res.vs_eager
                vc = None if res is None or variant == COMPILE else res.vs_compile
                bw = None if res is None else res.pct_ceiling
                values.setdefault(variant, {}).setdefault(step.name, {})[shape] = (ve, vc, bw)
                row += [
                    "n/a" if ve is None else f"{ve:.2f}x",
                    "-" if variant == COMPILE else "n/a" if vc is None else f"{vc:.2f}x",
                    "n/a" if bw is None else f"{bw:.0f}%",
                ]
            rows.append(row)
    return OpSummary(
        OP,
        headers,
        rows,
        _goals(values),
        notes=["float32 cases, as in ANCHORS; each goal is the worst step on the best genkernels backend."],
    )


def _goals(values: dict) -> list[Goal]:
    names = [
        ("fp32 SD latent, every step's speedup vs eager", ">= 4x", 4.0, "x", SD_SHAPE, 0),
        ("fp32 SD latent, every step's speedup vs torch.compile", ">= 1.0x", 1.0, "x", SD_SHAPE, 1),
        ("fp32 video latent, every step's speedup vs torch.compile", ">= 1.0x", 1.0, "x", VIDEO_SHAPE, 1),
        ("fp32 video latent, every step's % of copy bandwidth", ">= 80%", 80.0, "%", VIDEO_SHAPE, 2),
    ]
    goals = []
    for name, target, threshold, unit, shape, i in names:
        best = None  # (worst value over the steps, backend, step)
        for backend in genkernels_backends():
            per_step = [(values.get(backend, {}).get(st.name, {}).get(shape, (None,) * 3)[i], st.name) for st in STEPS]
            if any(v is None for v, _ in per_step):
                continue
            worst = min(per_step)
            if best is None or worst[0] > best[0]:
                best = (worst[0], backend, worst[1])
        if best is None:
            goals.append(Goal(name, target, "unmeasured (no genkernels backend ran every step)", None))
            continue
        shown = f"{best[0]:.2f}x" if unit == "x" else f"{best[0]:.0f}%"
        goals.append(Goal(name, target, f"{shown} ({best[1]}, worst: {best[2]})", best[0] >= threshold))
    return goals


# --------------------------------------------------------------------------- CPU self-check

SELF_CHECK_SHAPES: tuple[tuple[int, ...], ...] = ((2, 4, 8, 8), (1, 3, 5, 7, 3))


def self_check(backend: str) -> SelfCheck:
    """Check one genkernels backend on CPU: every step against its float64 eager formula (the test criterion)."""
    device = torch.device("cpu")
    dtypes = self_check_dtypes(backend)
    try:
        _ops()
    except Exception as e:  # noqa: BLE001 - the op modules themselves do not import
        return import_failed(OP, backend, "genkernels.ops", e)
    tally = SelfCheckTally(OP, backend)
    for dtype in dtypes:
        for shape in SELF_CHECK_SHAPES:
            for step in STEPS:
                label = f"{step.name} {'x'.join(map(str, shape))} {DTYPE_NAMES[dtype]}"
                args = _inputs(shape, dtype, device, seed=tally.ran)
                reason = _explain(args[0], args[1]).get(backend, f"backend {backend!r} is not registered")
                if reason is not None:
                    tally.skips.append(reason)
                    continue
                # No skip: it said it could run these inputs.
                failure = check_one(
                    tally,
                    label,
                    lambda st=step, a=args: (st.genkernels(backend, *a),),
                    lambda st=step, a=args: _expected(st, a, torch.float64),
                )
                if failure is not None:
                    return failure
    return tally.result(dtypes, "sampler steps")
