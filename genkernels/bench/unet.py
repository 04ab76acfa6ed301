"""One denoising step of the Stable-Diffusion-like UNet: benchmark case, goals and the CPU self-check.

The workload of shared/ANCHORS.md's UNet step: ``UNetConfig.sd_like()`` (about 0.86 G
parameters), bf16, batch 2 (the [uncond; cond] batch of classifier-free guidance), a 64x64
latent with 4 channels, a (2, 77, 768) text context, one timestep. Every variant runs the same
weights (seeded; the zero-initialized output convolution re-drawn so the output depends on the
whole network):

- ``eager``: the network on PyTorch's layers (torch.nn.GroupNorm + SiLU, SDPA), as it runs
  without genkernels (``UNet(config, torch_layers=True)``, sharing the weights);
- ``torch.compile``: that model under ``torch.compile`` (default mode). Its first call, the
  compile, is reported as first_call_s: about 50 s on an H200, most of this case's time;
- ``genkernels``: the UNet on genkernels layers (fused GroupNorm+SiLU, the attention op), auto
  backend, eager;
- ``genkernels + CUDA graph``: the same model captured once in a ``torch.cuda.CUDAGraph``
  (warm-up outside the capture, static input buffers); each timed call copies the latent, the
  timestep and the context into the static buffers and replays the graph.

Correctness before timing (shared/DESIGN.md's criterion, with the whole network as the
computation): truth is the PyTorch-layer model in float32 (TF32 off) on the bf16 inputs upcast,
ref is the same model in bf16 eager, and a variant passes when
``max|out - truth| <= 2 * max|ref - truth| + 1e-2``: as close to float32 as PyTorch's own bf16
run is, with the bf16 floor. The eager baseline is within by construction; torch.compile is a
baseline timed even outside it (it fuses and rounds differently), genkernels variants are strict.

The rate is TFLOP/s: the step's convolution, linear and attention-matmul FLOPs, counted once by
``torch.utils.flop_counter`` on the meta device (1.61 TFLOP), over the time; "% of matmul" is
that rate over the measured bf16 matmul rate. The numbers that matter are the milliseconds and
the speedups.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .core import (
    COMPILE,
    DTYPE_NAMES,
    EAGER,
    FLOOR,
    Case,
    CaseRecord,
    Check,
    Expected,
    Goal,
    OpSummary,
    SelfCheck,
    Variant,
    compare,
    expected,
    first_call_s,
)

OP = "unet"
#: Share of a time budget (group_norm has 1): one case, but torch.compile of the UNet takes about 50 s.
BUDGET_SHARE = 0.5
GENKERNELS = "genkernels"
GRAPH = "genkernels + CUDA graph"
VARIANTS = (EAGER, COMPILE, GENKERNELS, GRAPH)
GK_VARIANTS = (GENKERNELS, GRAPH)

BATCH, LATENT, CONTEXT_LEN = 2, 64, 77
#: A mid-schedule timestep (the training scale is [0, 1000)).
TIMESTEP = 500.0
SEED = 0
#: The issue's goals: the floor for resolving it, and parity with torch.compile without its compile time.
EAGER_GOAL, COMPILE_GOAL = 1.3, 1.0


# --------------------------------------------------------------------------- the model and its inputs


def _config(name: str) -> Any:
    from genkernels.models import UNetConfig

    return getattr(UNetConfig, name)(num_classes=0) if name == "tiny" else getattr(UNetConfig, name)()


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


def build_models(config: Any, device: torch.device, dtype: torch.dtype, seed: int = SEED) -> tuple[Any, Any]:
    """(genkernels-layer UNet, PyTorch-layer UNet sharing its parameters), seeded weights, eval mode.

    The output convolution, zero at initialization, is re-drawn with PyTorch's default init so
    that the output depends on every layer.
    """
    from genkernels.models import UNet
    from genkernels.models.diffusion import with_torch_layers

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        model = UNet(config)
        model.conv_out.reset_parameters()
    model = model.to(dtype).eval().requires_grad_(False)
    return model, with_torch_layers(model)


def make_inputs(
    config: Any, batch: int, size: int, context_len: int, dtype: torch.dtype, device: torch.device, seed: int = SEED
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """latent (B, in_channels, size, size) and context (B, context_len, cross_attention_dim): seeded
    standard normals in ``dtype``; t: (B,) float32, all TIMESTEP."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=g).to(device, dtype)
    ctx = torch.randn(batch, context_len, config.cross_attention_dim, generator=g).to(device, dtype)
    t = torch.full((batch,), TIMESTEP, device=device)
    return x, t, ctx


def _step(model: Any, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=ctx)


@functools.lru_cache(maxsize=8)
def step_flops(config_name: str, batch: int, size: int, context_len: int) -> float:
    """FLOPs of one UNet call: convolutions, linear layers and attention matmuls (torch.utils.flop_counter,
    the PyTorch-layer model run on the meta device; elementwise work and normalizations not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from genkernels.models import UNet

    config = _config(config_name)
    meta = torch.device("meta")
    with meta:
        model = UNet(config, torch_layers=True)
    x, t, ctx = make_inputs(config, batch, size, context_len, torch.float32, meta)
    with FlopCounterMode(display=False) as counter:
        _step(model, x, t, ctx)
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------- the case


class UNetCase(Case):
    """One UNet step (a config, batch, latent size, context length and dtype); variants: see the module doc.

    ``backend`` pins the genkernels layers' backend (None: auto, what users get).
    """

    op = OP
    genkernels_variants = GK_VARIANTS
    unit = "TFLOP/s"
    table = "UNet denoising step"

    def __init__(
        self,
        config_name: str = "sd_like",
        batch: int = BATCH,
        size: int = LATENT,
        context_len: int = CONTEXT_LEN,
        dtype: torch.dtype = torch.bfloat16,
        backend: str | None = None,
    ):
        self.config_name, self.batch, self.size, self.context_len = config_name, batch, size, context_len
        self.dtype, self.backend = dtype, backend
        config = _config(config_name)
        self.label = (
            f"{config_name} UNet step, batch {batch}, {config.in_channels}x{size}x{size} latent, "
            f"{context_len}-token context, {DTYPE_NAMES[dtype]}"
        )
        self.params: dict[str, Any] = {
            "workload": "UNet step",
            "config": config_name,
            "batch": batch,
            "latent": [config.in_channels, size, size],
            "context": [context_len, config.cross_attention_dim],
            "dtype": DTYPE_NAMES[dtype],
            "timestep": TIMESTEP,
            "backend": backend or "auto",
        }
        self._state: dict[str, Any] = {}

    @functools.cached_property
    def work(self) -> float:  # type: ignore[override]
        """FLOPs per step (:func:`step_flops`), counted on first use."""
        return step_flops(self.config_name, self.batch, self.size, self.context_len)

    @property
    def rate_note(self) -> str:  # type: ignore[override]
        """What the rate counts."""
        return f"TFLOP/s (convolution, linear and attention-matmul FLOPs: {self.work / 1e12:.3g} TFLOP per step)"

    def variant_names(self) -> list[str]:
        """eager (PyTorch layers), torch.compile of it, genkernels layers eager, and under a CUDA graph."""
        return list(VARIANTS)

    def prepare(self, device: torch.device) -> None:
        """Weights, inputs, the reference (bf16 PyTorch-layer eager) and the float32 truth.

        The float32 model is built first for the truth, then converted in place to the case's dtype.
        """
        config = _config(self.config_name)
        model, model_torch = build_models(config, device, torch.float32)
        args = make_inputs(config, self.batch, self.size, self.context_len, self.dtype, device)
        model = model.to(self.dtype)  # in place: model_torch shares these parameters
        ref = _step(model_torch, *args)
        x, t, ctx = args
        with full_fp32():
            model.float()
            truth = _step(model_torch, x.float(), t, ctx.float())
            model.to(self.dtype)
        model.set_backend(self.backend)
        self._state = {
            "model": model,
            "model_torch": model_torch,
            "args": args,
            "expected": [expected("model output", ref, truth)],
        }

    def _fn(self, model: Any) -> Callable[[], tuple[torch.Tensor, ...]]:
        args = self._state["args"]
        return lambda: (_step(model, *args),)

    def variant(self, name: str) -> Variant:
        """Build one variant; torch.compile is compiled here and the CUDA graph captured here, their time
        recorded as first_call_s."""
        if name == EAGER:
            fn = self._fn(self._state["model_torch"])
            return Variant(EAGER, "baseline", fn, first_call_s=first_call_s(fn))
        if name == COMPILE:
            torch._dynamo.reset()  # a fresh compile, its cost reported
            fn = self._fn(torch.compile(self._state["model_torch"]))
            return Variant(COMPILE, "baseline", fn, first_call_s=first_call_s(fn), strict=False)
        if name == GENKERNELS:
            fn = self._fn(self._state["model"])
            return Variant(GENKERNELS, "genkernels", fn, first_call_s=first_call_s(fn))
        if name == GRAPH:
            x = self._state["args"][0]
            if x.device.type != "cuda":
                return Variant(GRAPH, "genkernels", skip=f"CUDA graphs need a CUDA device, inputs are on {x.device}")
            return self._graph_variant()
        raise ValueError(f"unknown variant {name!r}; variants: {VARIANTS}")

    def _graph_variant(self) -> Variant:
        model, args = self._state["model"], self._state["args"]
        static = [a.clone() for a in args]
        torch.cuda.synchronize()
        start = time.perf_counter()
        # Warm-up outside the capture, on a side stream (as torch.cuda.graphs' documentation does it):
        # kernels compile and autotune, allocations settle, then the capture records only launches.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                _step(model, *static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _step(model, *static)

        def fn() -> tuple[torch.Tensor, ...]:
            for buf, a in zip(static, args):
                buf.copy_(a)  # a sampler writes each step's latent into the graph's input
            graph.replay()
            return (out,)

        fn()
        torch.cuda.synchronize()
        self._state["graph"] = graph
        return Variant(GRAPH, "genkernels", fn, first_call_s=time.perf_counter() - start)

    def expected(self) -> list[Expected]:
        """The model output: float32 truth, bound from the bf16 PyTorch-layer eager run (module doc)."""
        return self._state["expected"]

    def release(self) -> None:
        """Drop the models, the graph, inputs and references."""
        self._state = {}
        torch._dynamo.reset()  # the compiled UNet holds its graphs and buffers


def cases(quick: bool = False) -> list[UNetCase]:
    """The SD-like step. ``quick`` runs the same case: the goals are stated on it, and torch.compile's
    compile, the bulk of its time, would cost about as much on a smaller UNet."""
    return [UNetCase()]


# --------------------------------------------------------------------------- summary and goals


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}x" if unit == "x" else f"{value:.2f}" if unit == "ms" else f"{value:.1f}"


def summarize(records: Sequence[CaseRecord]) -> OpSummary:
    """Per variant of the SD-like case: ms, speedup vs eager and vs torch.compile, first call (compile or
    capture) seconds; the goals on the faster genkernels variant (eager or CUDA graph)."""
    rec = next((r for r in records if r.op == OP and r.params.get("config") == "sd_like"), None)
    headers = ["variant", "ms", "vs eager", "vs torch.compile", "first call s"]
    rows = []
    for name in VARIANTS:
        res = None if rec is None else rec.result(name)
        ok = res is not None and res.status == "ok"
        if not ok:
            status = "not run" if res is None else res.status
            rows.append([name, status, "n/a", "n/a", _fmt(None if res is None else res.first_call_s, "s")])
            continue
        rows.append(
            [
                name,
                _fmt(res.ms, "ms"),
                "-" if name == EAGER else _fmt(res.vs_eager, "x"),
                "-" if name == COMPILE else _fmt(res.vs_compile, "x"),
                _fmt(res.first_call_s, "s"),
            ]
        )
    notes = [
        "SD-like UNet (UNetConfig.sd_like()), bf16, batch 2, 4x64x64 latent, 77-token context; same weights "
        "for every variant. first call s: torch.compile's compile, the CUDA graph's warm-up and capture.",
        "Correct before timed: float32 PyTorch-layer truth, bound 2 * (bf16 PyTorch-layer eager's error) + 1e-2.",
    ]
    return OpSummary(OP, headers, rows, goals(rec), notes)


def goals(rec: CaseRecord | None) -> list[Goal]:
    """The issue's two UNet goals on the faster of the genkernels variants that ran (see :func:`summarize`)."""
    ran = [] if rec is None else [r for name in GK_VARIANTS if (r := rec.result(name)) is not None and r.ms]
    best = min(ran, key=lambda r: r.ms) if ran else None
    both = ", ".join(f"{r.variant} {r.vs_eager:.2f}x" for r in ran if r.vs_eager is not None)
    out = []
    specs = [
        ("UNet step, genkernels vs eager", f">= {EAGER_GOAL}x (floor for resolving)", "vs_eager", EAGER_GOAL, EAGER),
        ("genkernels (best of eager / CUDA graphs) vs torch.compile", f">= {COMPILE_GOAL}x", "vs_compile",
         COMPILE_GOAL, COMPILE),
    ]  # fmt: skip
    for name, target, attr, threshold, baseline in specs:
        value = None if best is None else getattr(best, attr)
        if value is None:
            why = "no genkernels variant ran" if best is None else f"{baseline} did not run"
            out.append(Goal(name, target, f"unmeasured ({why})", None))
            continue
        shown = f"{value:.2f}x ({best.variant})"
        if attr == "vs_eager" and len(ran) > 1:
            shown += f"; vs eager: {both}"
        out.append(Goal(name, target, shown, value >= threshold))
    return out


# --------------------------------------------------------------------------- CPU self-check

#: The tiny config (16 and 32 channels, attention at the second level), on CPU: a few hundred ms a run.
SELF_CHECK_SHAPE = {"batch": 2, "size": 8, "context_len": 5}


def self_check(backend: str) -> SelfCheck:
    """The tiny UNet on CPU in float32: the genkernels-layer model pinned to ``backend`` against the
    PyTorch-layer model with the same weights, under the criterion (truth: the PyTorch-layer model in
    float64; ref: it in float32; bound 2 * max|ref - truth| + 1e-5).

    Triton runs under the interpreter (the whole network: about 60 GroupNorm and attention launches,
    a few seconds). "skipped" with the backend's reason when it cannot run these inputs here.
    """
    from genkernels import UnsupportedError

    config = _config("tiny")
    device = torch.device("cpu")
    try:
        model, model_torch = build_models(config, device, torch.float32)
    except Exception as e:  # noqa: BLE001 - the model module itself is broken
        return SelfCheck(OP, backend, "failed", f"cannot build the UNet: {type(e).__name__}: {e}")
    args = make_inputs(config, dtype=torch.float32, device=device, **SELF_CHECK_SHAPE)
    ref = _step(model_torch, *args)
    model.double()  # in place, shared with model_torch: the float32 weights upcast
    truth = _step(model_torch, *(a.double() for a in args))
    model.float().set_backend(backend)
    exp = expected("model output", ref, truth)
    try:
        out = _step(model, *args)
    except UnsupportedError as e:
        return SelfCheck(OP, backend, "skipped", str(e))
    except Exception as e:  # noqa: BLE001 - it accepted the inputs and then raised
        return SelfCheck(OP, backend, "failed", f"raised {type(e).__name__}: {e}")
    check: Check = compare([out], [exp])
    shape = SELF_CHECK_SHAPE
    what = f"tiny UNet step, fp32, batch {shape['batch']}, {shape['size']}x{shape['size']}"
    if not check.ok:
        return SelfCheck(OP, backend, "failed", f"{what}: {check.detail}")
    detail = (
        f"{what} vs PyTorch layers: err {check.err:.2g} <= bound {check.bound:.2g} (floor {FLOOR[torch.float32]:g})"
    )
    return SelfCheck(OP, backend, "ok", detail)
