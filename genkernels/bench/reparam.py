"""Reparameterized sampling + KL of a VAE posterior: benchmark cases, goals and the CPU self-check.

The workload of shared/ANCHORS.md: a training batch of 64 latents of 16 channels at 128x128 (a
16-channel VAE at 1024x1024), (64, 16, 128, 128), float32 and bf16, forward and forward +
backward (the gradients of mean and logvar from z and the KL together, as a VAE loss
``recon(z) + beta * kl`` produces them; here dz is a seeded standard normal and dkl = 1).

The baseline is the formula as diffusers' ``DiagonalGaussianDistribution`` computes it
(``sample()`` and ``kl()``), on separate mean and logvar tensors (diffusers chunks them out of
one moments tensor: views, no kernel), eager and under ``torch.compile``::

    logvar = clamp(logvar, -30, 20); std = exp(0.5 * logvar); var = exp(logvar)
    z      = mean + std * randn_like(mean)
    kl     = 0.5 * sum over (C, H, W) of (mean^2 + var - 1 - logvar)

genkernels runs it as one call of ``genkernels.ops.reparameterize(mean, logvar, seed=SEED,
backend=...)``: one pass, eps drawn in the kernel from the Philox stream of (seed, offset),
mean and logvar read once, z written once, the KL from per-chunk partials; its backward draws
eps again instead of reading it back.

Rate: GB/s counting the bytes that must move. Forward: mean and logvar read, z written (3
tensors; the KL's B floats are left out). Forward + backward: those 3, plus dz, mean and logvar
read and dmean, dlogvar written (8 tensors). The floor is those bytes at the copy bandwidth
measured in the same run (``floor ms``); the eager baseline moves more (it writes the noise and
each intermediate to memory and reads them back).

Correctness before timing, against the reference on the noise each side draws. A genkernels
variant draws eps from (SEED, OFFSET), which the reference computes too
(``genkernels.ops.schedule.philox_normal``): every output (z and kl; dmean and dlogvar) is
checked under the test criterion, truth = the formula in float64 on that eps, ref = the formula
in the input dtype (for kl, a sum, with the floor scaled by max(1, max|truth|) as the test suite
scales it for reductions). The baselines draw eps from torch's generator (torch.compile from inductor's
own Philox), which cannot be reproduced outside them: they are checked on the outputs that do
not depend on eps (kl; dmean). This is why :meth:`ReparamCase.expected` depends on the variant
built last (``core.run_variant`` and the pytest harness check each variant right after building it).
"""

from __future__ import annotations

import functools
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
    in_dtypes,
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
)

OP = "reparam"
#: Share of a time budget (group_norm has 1, attention 2): four small cases, torch.compile's the slow part.
BUDGET_SHARE = 0.5
#: shared/ANCHORS.md's shape: (B, C, H, W) of mean (and of logvar, z).
SHAPE = (64, 16, 128, 128)
WORKLOAD = "VAE posterior, batch 64 of 16x128x128 latents"
MODES = ("fwd", "fwd+bwd")
DTYPES = (torch.float32, torch.bfloat16)
#: The key and stream of the genkernels variants' in-kernel noise.
SEED, OFFSET = 2024, 0
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
#: The goals, per dtype and mode (forward; forward + backward): speedup vs eager and vs torch.compile.
EAGER_GOAL, COMPILE_GOAL = 3.0, 1.0

TABLES = {"fwd": "reparameterize + KL, forward", "fwd+bwd": "reparameterize + KL, forward + backward"}
TENSORS_MOVED = {"fwd": 3, "fwd+bwd": 8}
RATE_NOTES = {
    "fwd": "GB/s (mean, logvar read + z written: 3 tensors; the KL's B floats not counted)",
    "fwd+bwd": "GB/s (forward's 3 tensors + dz, mean, logvar read and dmean, dlogvar written: 8 tensors)",
}
OUTPUTS = {"fwd": ("z", "kl"), "fwd+bwd": ("dmean", "dlogvar")}
#: The outputs that do not depend on eps: all a baseline, whose noise is not reproducible, is checked on.
NOISE_FREE = {"fwd": ("kl",), "fwd+bwd": ("dmean",)}


def reparameterize_formula(
    mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """z = mean + exp(lv / 2) * eps and kl[b] = 0.5 * sum over non-batch dims of (mean^2 + exp(lv) - 1 - lv),
    lv = clamp(logvar, -30, 20), in the inputs' dtype, as diffusers' DiagonalGaussianDistribution writes it."""
    logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
    std = torch.exp(0.5 * logvar)
    var = torch.exp(logvar)
    z = mean + std * eps
    kl = 0.5 * torch.sum(torch.pow(mean, 2) + var - 1.0 - logvar, dim=tuple(range(1, mean.dim())))
    return z, kl


def eager_reparameterize(mean: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline as users run it: :func:`reparameterize_formula` with ``eps = torch.randn_like(mean)``."""
    return reparameterize_formula(mean, logvar, torch.randn_like(mean))


def _genkernels(backend: str, mean: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from genkernels.ops import reparameterize

    return reparameterize(mean, logvar, seed=SEED, offset=OFFSET, backend=backend)


def philox_noise(like: torch.Tensor, seed: int = SEED, offset: int = OFFSET) -> torch.Tensor:
    """The float32 eps a genkernels backend draws for ``like`` from (seed, offset): element e of the
    stream (``genkernels.ops.schedule.philox_normal``) at like's element e in memory order
    (contiguous or channels_last), as a tensor of like's shape."""
    from genkernels.ops.schedule import philox_normal

    flat = philox_normal(seed, offset, like.numel(), like.device)
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        n, c, h, w = like.shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(like.shape)


def _inputs(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int = 0, layout: str = "contiguous"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mean, logvar, dz: seeded. mean ~ N(0, 1); logvar ~ N(-1, 0.5^2) (std between about 0.2 and 2: a
    posterior narrower than the prior, as trained VAEs give, and z small enough that the float32 check
    measures the kernel, not the magnitude of std * eps); dz ~ N(0, 1)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn() -> torch.Tensor:
        t = torch.randn(tuple(shape), generator=g, device=device, dtype=torch.float32)
        return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t

    mean, logvar, dz = randn(), randn() * 0.5 - 1.0, randn()
    return mean.to(dtype), logvar.to(dtype), dz.to(dtype)


def _forward_backward(
    impl: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    mean: torch.Tensor,
    logvar: torch.Tensor,
    dz: torch.Tensor | None,
    dkl: dict[torch.dtype, torch.Tensor] | None,
) -> tuple[torch.Tensor, ...]:
    """(z, kl) without dz; else (dmean, dlogvar) of ``(z * dz).sum() + (kl * dkl).sum()``.

    autograd.grad with (dz, dkl) as the gradients of (z, kl): the backward of that loss without the
    sum kernels, and nothing accumulates into .grad between repetitions. dkl comes in each dtype kl
    may have (float32 from genkernels, the input dtype from the formula), so no cast is timed.
    """
    z, kl = impl(mean, logvar)
    if dz is None or dkl is None:
        return z, kl
    return torch.autograd.grad((z, kl), (mean, logvar), (dz, dkl[kl.dtype]))


def _expected(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor,
    dz: torch.Tensor | None,
    dkl: dict[torch.dtype, torch.Tensor] | None,
    truth_dtype: torch.dtype,
) -> list[Expected]:
    """The criterion's references on noise ``eps`` (float32): the formula in the input dtype (eps rounded
    to it), and on inputs upcast to truth_dtype."""

    def run(dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)

        noise = eps.to(dtype or mean.dtype)
        impl = functools.partial(_with_noise, noise)
        return _forward_backward(impl, cast(mean), cast(logvar), None if dz is None else cast(dz), dkl)

    # kl, a sum of 262,144 terms per sample (about 1.8e5), gets the reductions' criterion.
    names = OUTPUTS["fwd" if dz is None else "fwd+bwd"]
    return [(expected_sum if n == "kl" else expected)(n, r, t) for n, r, t in zip(names, run(None), run(truth_dtype))]


def _with_noise(eps: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reparameterize_formula(mean, logvar, eps)


def _dkl(
    batch: int, dtypes: Sequence[torch.dtype], device: torch.device, value: torch.Tensor | None = None
) -> dict[torch.dtype, torch.Tensor]:
    """The KL's incoming gradient (B,) in each dtype of ``dtypes``: ones (a loss with beta = 1), or ``value``."""
    base = torch.ones(batch, dtype=torch.float64) if value is None else value.double()
    return in_dtypes(base.to(device), dtypes)


class ReparamCase(MemoryBoundCase):
    """One (dtype, mode) of reparameterize + KL on :data:`SHAPE` (contiguous NCHW)."""

    op = OP

    def __init__(self, dtype: torch.dtype, mode: str, shape: tuple[int, ...] = SHAPE):
        super().__init__(shape, dtype, TENSORS_MOVED[mode])
        self.mode = mode
        self.label = f"{'x'.join(map(str, shape))} {DTYPE_NAMES[dtype]} {mode}"
        self.params: dict[str, Any] = {
            "workload": WORKLOAD,
            "shape": list(shape),
            "dtype": DTYPE_NAMES[dtype],
            "mode": mode,
            "seed": SEED,
            "tensors_moved": TENSORS_MOVED[mode],
            "baseline": "diffusers DiagonalGaussianDistribution.sample() + kl() on separate mean, logvar",
        }
        self.table = TABLES[mode]
        self.rate_note = RATE_NOTES[mode]

    def prepare(self, device: torch.device) -> None:
        """Seeded inputs, the genkernels noise (SEED, OFFSET) and the references (float64 truth)."""
        mean, logvar, dz = _inputs(self.shape, self.dtype, device)
        dkl = None
        if self.mode == "fwd":
            dz = None
        else:
            mean.requires_grad_(True)
            logvar.requires_grad_(True)
            dkl = _dkl(self.shape[0], (torch.float32, self.dtype, torch.float64), device)
        exp = _expected(mean, logvar, philox_noise(mean), dz, dkl, torch.float64)
        self._state = {"args": (mean, logvar, dz, dkl), "expected": exp, "checked": OUTPUTS[self.mode]}

    def _fn(self, impl: Callable[..., Any], outputs: Sequence[str]) -> Callable[[], tuple[torch.Tensor, ...]]:
        """The timed call; it returns the outputs named (all of them are computed either way)."""
        mean, logvar, dz, dkl = self._state["args"]
        keep = [OUTPUTS[self.mode].index(n) for n in outputs]

        def fn() -> tuple[torch.Tensor, ...]:
            out = _forward_backward(impl, mean, logvar, dz, dkl)
            return tuple(out[i] for i in keep)

        return fn

    def variant(self, name: str) -> Variant:
        """Build one variant and run it once (:func:`._elementwise.build`). Baselines are checked on the
        noise-free outputs only (module doc); a genkernels backend on every output."""
        if name == EAGER:
            impl, outputs = eager_reparameterize, NOISE_FREE[self.mode]
        elif name == COMPILE:
            impl, outputs = compiled(eager_reparameterize), NOISE_FREE[self.mode]
        else:
            impl, outputs = functools.partial(_genkernels, name), OUTPUTS[self.mode]
        self._state["checked"] = outputs
        return build(name, self._fn(impl, outputs))

    def expected(self) -> list[Expected]:
        """The references of the outputs the variant built last returns: all of them (genkernels: z, kl or
        dmean, dlogvar on the Philox noise), or the noise-free ones (baselines: kl or dmean)."""
        return [e for e in self._state["expected"] if e.name in self._state["checked"]]


def cases(quick: bool = False) -> list[ReparamCase]:
    """Forward float32 and bf16 (the goals), then forward + backward float32 and bf16; ``quick``: the forwards."""
    modes = MODES[:1] if quick else MODES
    return [ReparamCase(dtype, mode) for mode in modes for dtype in DTYPES]


# --------------------------------------------------------------------------- summary and goals


def summarize(records: Sequence[CaseRecord]) -> OpSummary:
    """Per case and variant: ms, the floor, speedups vs eager and vs torch.compile, % of copy bandwidth;
    and the goals per dtype and mode, each on the genkernels backend that does best."""
    by_case = records_by(records, OP, ("dtype", "mode"))
    headers = ["case", "floor ms", "variant", "ms", "vs eager", "vs torch.compile", "% copy BW"]
    rows = case_rows(by_case, [(DTYPE_NAMES[dtype], mode) for mode in MODES for dtype in DTYPES])
    notes = [
        f"{WORKLOAD} {SHAPE}; baseline: diffusers' DiagonalGaussianDistribution formula (sample() + kl()), eager and "
        "torch.compile; genkernels: ops.reparameterize with in-kernel Philox noise (seed given).",
        "floor ms: the bytes that must move (3 tensors forward, 8 forward + backward) at the copy bandwidth "
        "measured in this run; % copy BW = floor / ms.",
        "Goals per dtype and mode (forward, and forward + backward), each on the genkernels backend that does "
        "best; ANCHORS measured the forward.",
    ]
    return OpSummary(OP, headers, rows, _goals(by_case), notes)


def _goals(by_case: dict[tuple, CaseRecord]) -> list[Goal]:
    goals = []
    for mode in MODES:
        for dtype in DTYPES:
            rec = by_case.get((DTYPE_NAMES[dtype], mode))
            what = f"{DTYPE_NAMES[dtype]} {mode} {'x'.join(map(str, SHAPE))}, speedup"
            goals.append(speedup_goal(rec, f"{what} vs eager", EAGER, EAGER_GOAL))
            goals.append(speedup_goal(rec, f"{what} vs torch.compile", COMPILE, COMPILE_GOAL))
    return goals


# --------------------------------------------------------------------------- CPU self-check

#: Small shapes for the CPU check (the Triton interpreter is slow): a block-aligned one, odd sizes, and
#: channels_last (z in mean's layout, the noise in memory order).
SELF_CHECK_CASES: tuple[tuple[tuple[int, ...], str], ...] = (
    ((2, 4, 8, 8), "contiguous"),
    ((3, 5, 7, 3), "contiguous"),
    ((2, 6, 5, 5), "channels_last"),
)
#: The noise sources checked: the in-kernel Philox stream of a seed (and offset), and a noise tensor.
NOISE_SOURCES = ("seed", "noise")


def self_check(backend: str) -> SelfCheck:
    """Check one genkernels backend on CPU against float64 truth (the test criterion), forward (z, kl) and
    forward + backward (dmean, dlogvar), with in-kernel noise (the reference computes the same Philox
    stream) and with a supplied noise tensor.

    bf16 is left out for triton: the interpreter mishandles it (shared/DESIGN.md). Returns "ok",
    "failed" (wrong numbers, or an error other than UnsupportedError) or "skipped" (the backend's
    reason for not running on this machine).
    """
    try:
        from genkernels import UnsupportedError
        from genkernels.ops import reparameterize
    except Exception as e:  # noqa: BLE001 - the op module itself does not import
        return import_failed(OP, backend, "genkernels.ops.reparameterize", e)
    device = torch.device("cpu")
    dtypes = self_check_dtypes(backend)
    tally = SelfCheckTally(OP, backend)
    for dtype in dtypes:
        for shape, layout in SELF_CHECK_CASES:
            for mode in MODES:
                for source in NOISE_SOURCES:
                    label = f"{'x'.join(map(str, shape))} {layout} {DTYPE_NAMES[dtype]} {mode} {source}"
                    seed = tally.ran + len(tally.skips)
                    mean, logvar, dz = _inputs(shape, dtype, device, seed=seed, layout=layout)
                    # Two logvars below the clamp: its gradient must be cut there. (Above it, std = e^10 would
                    # make z overflow fp16 and scale every bound up; the op's own tests cover that side.)
                    logvar[0, 0, 0, 0] = logvar[-1, -1, -1, -1] = -40.0
                    dkl = None
                    if mode == "fwd":
                        dz = None
                    else:
                        mean.requires_grad_(True)
                        logvar.requires_grad_(True)
                        value = torch.rand(shape[0], generator=torch.Generator().manual_seed(seed)) + 0.5
                        dkl = _dkl(shape[0], (torch.float32, dtype, torch.float64), device, value)
                    if source == "seed":
                        eps = philox_noise(mean, seed=1000 + seed, offset=seed)
                        call: dict[str, Any] = {"seed": 1000 + seed, "offset": seed}
                    else:
                        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
                        if layout == "channels_last":
                            noise = noise.contiguous(memory_format=torch.channels_last)
                        eps, call = noise.float(), {"noise": noise}
                    impl = functools.partial(reparameterize, backend=backend, **call)
                    failure = check_one(
                        tally,
                        label,
                        functools.partial(_forward_backward, impl, mean, logvar, dz, dkl),
                        functools.partial(_expected, mean, logvar, eps, dz, dkl, torch.float64),
                        skip=(UnsupportedError,),
                    )
                    if failure is not None:
                        return failure
    return tally.result(dtypes, "fwd and fwd+bwd; Philox seed and supplied noise")
