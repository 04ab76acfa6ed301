"""ImageGPT sampling throughput with the KV cache: benchmark case, goal and the CPU self-check.

The workload: ``ImageGPT(image_size=16, channels=1, levels=16, num_classes=10, dim=512, depth=8, heads=8)``
(1-D RoPE, SwiGLU MLP, RMSNorm; about 25 M parameters) in bf16, seeded weights, sampling a batch of 64 images
of 16x16x1 = 256 tokens each (16,384 tokens per call): ``model.sample_tokens(64, seed=0)`` (classes 0 .. 9 in
turn, temperature 1), one token per step with the KV cache, so each step runs every layer with Lq = 1
against the cached keys. 16x16 rather than 32x32 keeps one call, and so the whole case, within the suite's
time budget (a sampling call is 256 dependent steps; the timer needs about ten calls per variant).

Variants, on the same weights:

- ``eager``: the model on PyTorch ops (``ImageGPT(config, torch_layers=True)``: F.scaled_dot_product_attention,
  the RMSNorm formula, F.silu, a rotate-half RoPE), sampling with the KV cache, launching every kernel from
  Python (``cuda_graph=False``);
- ``eager + CUDA graph``: the same with each decoding step replayed as a captured CUDA graph
  (``cuda_graph=True``), for reference: what the graphs alone buy PyTorch ops;
- ``genkernels``: the model on genkernels layers (RMSNorm and every residual add with the norm after it in
  one gated_residual_layer_norm_modulate call, q, k and v projected by one matrix product into the KV
  cache's rows and rotated there in place by rope, attention with Lq = 1, swiglu; auto backend), sampling
  with the KV cache, kernels launched from Python: a decoding step at batch 64 is 81 calls (33 matrix
  products, 8 attention, 40 others), the eager twin's 353 (counted on the meta device; the twin shares the
  stacked projection, the cache rows and the draw);
- ``genkernels + CUDA graph``: the same with the graphs, what ``sample`` does by default on a GPU;
- ``genkernels (no cache)``: the same model recomputing the whole prefix every step, for reference.

Correctness before timing. When a variant is built, its model's logits are checked under the test
criterion on the path its sampling takes, teacher-forced on 8 seeded sequences: with the cache, the logits
of every position decoded one token at a time through the KV cache; without it, one forward over the
sequence. Truth: the PyTorch-layer model in float32 (TF32 off); ref: the same in bf16; the bound 2 *
max|ref - truth| + 1e-2. A variant outside it fails and is not timed. Its first sampling call's tokens are
then the expected output of its timed calls (the same seed must give the same tokens: nothing may leak
from one call to the next). A genkernels variant that does not reproduce them fails; the PyTorch-op
baselines are timed anyway, with the difference in the check column (on an H200 the eager twin's second
call drew other tokens than its first at the same seed: its own kernels are not run to run deterministic,
and a baseline is timed as users run it). Tokens of different variants may differ: a logit rounded differently flips a
draw near a boundary, and the sequence diverges from there; the share of sequences identical to eager's is
reported (``params["sequences_equal_to_eager"]``), and so is the share of a graphed variant's sequences
identical to the same layers' ungraphed ones (``params["sequences_equal_without_graph"]``: the graphs replay
the same kernels on the same shapes, so 100% is expected).

Rate: TFLOP/s of the useful work of cached decoding, counted analytically: per token and layer the linear
layers' 2 * (multiply-adds), the attention's 4 * dim * (keys so far), the head; the floor is that at the
bf16 matmul rate measured in the run (decoding at batch 64 is far from it: launch latency and the KV
cache's reads bound it). The summary shows tokens/s = 64 * 256 / seconds per call.

Goal (the issue's): genkernels with the KV cache at least 2x eager's tokens/s, each side at its fastest: the
faster of the two genkernels cached variants against the faster of eager and eager + CUDA graph; each is
reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import _model
from ._elementwise import best_speedup_goal
from .core import (
    DTYPE_NAMES,
    EAGER,
    Case,
    CaseRecord,
    Expected,
    OpSummary,
    SelfCheck,
    Variant,
    compare,
    expected,
    first_call_s,
)

OP = "imagegpt"
#: Share of a time budget (group_norm has 1): one case, about ten sampling calls per variant.
BUDGET_SHARE = 0.5

GENKERNELS = "genkernels"
GK_GRAPH = "genkernels + CUDA graph"
EAGER_GRAPH = "eager + CUDA graph"
NO_CACHE = "genkernels (no cache)"
VARIANTS = (EAGER, EAGER_GRAPH, GENKERNELS, GK_GRAPH, NO_CACHE)
GK_VARIANTS = (GENKERNELS, GK_GRAPH, NO_CACHE)
#: Variants replaying CUDA graphs (GPU only), and the variant each must agree with token for token.
GRAPHED = {EAGER_GRAPH: EAGER, GK_GRAPH: GENKERNELS}
#: The variants the goal is taken on (the faster).
GOAL_VARIANTS = (GENKERNELS, GK_GRAPH)
EAGER_GOAL = 2.0

#: The benchmarked model (ImageGPT's arguments) and the tiny one of the CPU self-check.
CONFIGS = {
    "bench": dict(image_size=16, channels=1, levels=16, num_classes=10, dim=512, depth=8, heads=8),
    "tiny": dict(image_size=3, channels=1, levels=16, num_classes=10, dim=32, depth=2, heads=2),
}
BATCH = 64
#: Sequences of the teacher-forced logits check.
CHECK_BATCH = 8
SEED = 0


def build_models(config_name: str, device: torch.device, seed: int = SEED) -> tuple[Any, Any]:
    """(genkernels-layer ImageGPT, PyTorch-layer twin sharing its parameters and its RoPE tables), float32,
    seeded weights, eval mode, no grads.

    The twin comes from ``with_torch_layers``; it shares the RotaryEmbedding module too (its tables are
    non-persistent buffers, which the state_dict does not carry).
    """
    from genkernels.models._layers import with_torch_layers
    from genkernels.models.transformer import ImageGPT

    return _model.seeded_models(
        lambda: ImageGPT(**CONFIGS[config_name]), with_torch_layers, device, torch.float32, seed
    )


def check_tokens(model: Any, n: int, device: torch.device, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded tokens (n, L) uniform over the levels and labels (n,) = 0, 1, ... mod num_classes."""
    cfg = model.config
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    tokens = torch.randint(0, cfg.levels, (n, cfg.seq_len), generator=g)
    return tokens.to(device), (torch.arange(n) % cfg.num_classes).to(device)


@torch.no_grad()
def decode_logits(model: Any, tokens: torch.Tensor, labels: torch.Tensor, use_cache: bool) -> torch.Tensor:
    """Teacher-forced logits (n, L, levels) of ``tokens`` (n, L) on the path sampling takes.

    With ``use_cache``, as ``ImageGPT.sample_tokens`` decodes: one token per step through the layers' KV
    caches (attention with Lq = 1); without, one forward over the sequence (what the uncached sampling
    computes at its last step, every earlier step being a prefix of it).
    """
    if not use_cache:
        return model(tokens, labels)
    n, length = tokens.shape
    caches = [block.attn.new_cache(n, length) for block in model.blocks]
    first = model.class_emb(labels)[:, None]
    out = []
    for t in range(length):
        x = first if t == 0 else model.tok_emb(tokens[:, t - 1 : t])
        out.append(model._logits(model._run(x, t, caches))[:, 0])
    return torch.stack(out, dim=1)


def sample(model: Any, n: int, use_cache: bool, seed: int = SEED, cuda_graph: bool = False) -> torch.Tensor:
    """``model.sample_tokens(n, seed=seed, use_cache=use_cache, cuda_graph=cuda_graph)``: (n, L) int64 tokens."""
    return model.sample_tokens(n, seed=seed, use_cache=use_cache, cuda_graph=cuda_graph)


def sampling_flops(config: dict[str, Any], batch: int) -> float:
    """Useful FLOPs of sampling ``batch`` sequences with the KV cache (see the module doc)."""
    from genkernels.models.transformer import ImageGPT

    with torch.device("meta"):
        model = ImageGPT(**config)
    length, dim, depth = model.config.seq_len, model.config.dim, model.config.depth
    macs = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = depth * 4 * dim * length * (length + 1) / 2  # position t attends to t + 1 keys
    return float(batch * (2 * macs * length + attention))


class SamplingCase(Case):
    """Sampling ``batch`` images from an ImageGPT config (see the module doc) in ``dtype``."""

    op = OP
    table = "ImageGPT sampling"
    unit = "TFLOP/s"
    genkernels_variants = GK_VARIANTS

    def __init__(
        self,
        config_name: str = "bench",
        batch: int = BATCH,
        dtype: torch.dtype = torch.bfloat16,
        backend: str | None = None,
        check_batch: int = CHECK_BATCH,
    ):
        cfg = CONFIGS[config_name]
        self.config_name, self.batch, self.dtype, self.backend = config_name, batch, dtype, backend
        self.check_batch = check_batch
        size, channels = cfg["image_size"], cfg["channels"]
        self.tokens_per_call = batch * size * size * channels
        self.work = sampling_flops(cfg, batch)
        self.rate_note = f"TFLOP/s (useful FLOPs of cached decoding: {self.work / 1e12:.3g} TFLOP per call)"
        self.label = (
            f"{config_name} ImageGPT sampling, batch {batch}, {size}x{size}x{channels} = "
            f"{size * size * channels} tokens each, dim {cfg['dim']}, depth {cfg['depth']}, {DTYPE_NAMES[dtype]}"
        )
        self.agreement: dict[str, float] = {}
        self.graph_agreement: dict[str, float] = {}
        self.params: dict[str, Any] = {
            "workload": "ImageGPT sampling",
            "config": config_name,
            "model": dict(cfg),
            "batch": batch,
            "tokens_per_call": self.tokens_per_call,
            "dtype": DTYPE_NAMES[dtype],
            "backend": backend or "auto",
            "seed": SEED,
            "sequences_equal_to_eager": self.agreement,
            "sequences_equal_without_graph": self.graph_agreement,
        }
        self._state: dict[str, Any] = {}

    def variant_names(self) -> list[str]:
        """eager (PyTorch layers, KV cache), with CUDA graphs, genkernels (KV cache), with CUDA graphs, genkernels
        without the cache."""
        return list(VARIANTS)

    def prepare(self, device: torch.device) -> None:
        """The models (shared weights), the check's tokens, and the truth and bound of both paths' logits."""
        model, twin = build_models(self.config_name, device)
        tokens, labels = check_tokens(model, self.check_batch, device)
        wide = torch.float64 if self.dtype == torch.float32 else torch.float32
        with _model.full_fp32():
            model.to(wide)
            truth = {c: decode_logits(twin, tokens, labels, c) for c in (True, False)}
        model.to(self.dtype)
        ref = {c: decode_logits(twin, tokens, labels, c) for c in (True, False)}
        for m in model.modules():  # pin every genkernels layer (ImageGPT has no set_backend)
            if hasattr(m, "backend"):
                m.backend = self.backend
        self._state = {
            "model": model,
            "model_torch": twin,
            "check": (tokens, labels),
            "logits": {c: expected("logits", ref[c], truth[c]) for c in (True, False)},
            "expected": {},
            "last": None,
        }

    def _check_logits(self, model: Any, use_cache: bool) -> None:
        tokens, labels = self._state["check"]
        check = compare([decode_logits(model, tokens, labels, use_cache)], [self._state["logits"][use_cache]])
        if not check.ok:
            path = "KV-cache decode" if use_cache else "forward"
            raise RuntimeError(f"wrong numbers: teacher-forced {path} logits: {check.detail}")

    def variant(self, name: str) -> Variant:
        """Check the variant's logits on its sampling path (a RuntimeError when outside the criterion), then its
        first sampling call (timed as first_call_s), whose tokens its timed calls must reproduce."""
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; variants: {VARIANTS}")
        s = self._state
        model = s["model_torch"] if name in (EAGER, EAGER_GRAPH) else s["model"]
        use_cache, graphed = name != NO_CACHE, name in GRAPHED
        role = "genkernels" if name in GK_VARIANTS else "baseline"
        if graphed and not next(model.parameters()).is_cuda:
            return Variant(name, role, skip="CUDA graphs need a CUDA device")
        self._check_logits(model, use_cache)
        out: list[torch.Tensor] = []

        def fn() -> tuple[torch.Tensor, ...]:
            return (sample(model, self.batch, use_cache, cuda_graph=graphed),)

        took = first_call_s(lambda: out.append(fn()[0]))
        tokens = out[0]
        s["expected"][name] = [Expected("tokens", tokens.double(), 0.5)]  # integers: equal
        s["last"] = name
        s.setdefault("tokens", {})[name] = tokens
        if name != EAGER and EAGER in s["tokens"]:
            self.agreement[name] = (tokens == s["tokens"][EAGER]).all(dim=1).float().mean().item()
        if graphed and GRAPHED[name] in s["tokens"]:
            plain = s["tokens"][GRAPHED[name]]
            self.graph_agreement[name] = (tokens == plain).all(dim=1).float().mean().item()
        # Reproducing the first call is required of genkernels; a baseline is timed as users run it.
        return Variant(name, role, fn, first_call_s=took, strict=role == "genkernels")

    def expected(self) -> list[Expected]:
        """The tokens of the variant built last (its first call's: the same seed gives the same tokens)."""
        return self._state["expected"][self._state["last"]]

    def release(self) -> None:
        """Drop the models (and their graphs), inputs and references (the agreement stays in params)."""
        for key in ("model", "model_torch"):
            if key in self._state:
                self._state[key].release_graphs()
        self._state = {}


def cases(quick: bool = False) -> list[SamplingCase]:
    """The one sampling case; ``quick`` runs it too (the goal is stated on it)."""
    return [SamplingCase()]


# --------------------------------------------------------------------------- summary and goal


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return {"x": f"{value:.2f}x", "ms": f"{value:.1f}", "tok/s": f"{value:,.0f}", "%": f"{value:.0f}%"}.get(
        unit, f"{value:.1f}"
    )


def summarize(records: Sequence[CaseRecord]) -> OpSummary:
    """Per variant: ms per sampling call, tokens/s, speedup vs eager, sequences equal to eager's and (graphed
    variants) to the same layers without graphs, first call s; the goal: genkernels with the KV cache (the
    faster of with and without CUDA graphs) >= 2x eager's tokens/s."""
    rec = next((r for r in records if r.op == OP), None)
    tokens = rec.params["tokens_per_call"] if rec else BATCH * 256
    agreement = dict(rec.params.get("sequences_equal_to_eager") or {}) if rec else {}
    graph_agreement = dict(rec.params.get("sequences_equal_without_graph") or {}) if rec else {}
    headers = [
        "variant",
        "ms per call",
        "tokens/s",
        "vs eager",
        "sequences = eager's",
        "= without graph",
        "first call s",
    ]
    rows = []
    for name in VARIANTS:
        res = None if rec is None else rec.result(name)
        same = "-" if name == EAGER else _fmt(100 * agreement[name] if name in agreement else None, "%")
        plain = "-"
        if name in GRAPHED:
            plain = _fmt(100 * graph_agreement[name] if name in graph_agreement else None, "%")
        first = _fmt(None if res is None else res.first_call_s, "s")
        if res is None or res.ms is None:
            status = "not run" if res is None else res.status
            rows.append([name, status, "n/a", "n/a", same, plain, first])
            continue
        vs = "-" if name == EAGER else _fmt(res.vs_eager, "x")
        rate = tokens / (res.ms * 1e-3)
        rows.append([name, _fmt(res.ms, "ms"), _fmt(rate, "tok/s"), vs, same, plain, first])
    # Each side at its fastest: genkernels' faster variant against the faster of eager and eager + CUDA graph.
    name = "ImageGPT KV-cache sampling, genkernels vs eager tokens/s"
    goal = best_speedup_goal(rec, name, GOAL_VARIANTS, (EAGER, EAGER_GRAPH), EAGER_GOAL)
    cfg = CONFIGS["bench"]
    notes = [
        f"ImageGPT(image_size={cfg['image_size']}, channels=1, levels=16, num_classes=10, dim={cfg['dim']}, "
        f"depth={cfg['depth']}, heads={cfg['heads']}), bf16, seeded weights; sample_tokens({BATCH}, seed={SEED}): "
        f"{BATCH} images x {cfg['image_size'] ** 2} tokens per call, one token per step. eager: the PyTorch-op twin "
        "(torch_layers=True) with the KV cache, kernels launched from Python; genkernels: genkernels layers with "
        "the KV cache; + CUDA graph: each decoding step replayed as a CUDA graph captured on the first call (its "
        "first call s includes the capture); no cache: genkernels layers recomputing the prefix every step.",
        "Correct before timed: teacher-forced logits on each variant's sampling path within 2 * (bf16 PyTorch-op "
        "error) + 1e-2 of the float32 truth; each genkernels timed call reproduces its first call's tokens (the "
        "baselines are timed even where they do not: the check column says so). sequences = "
        "eager's: the share of sampled sequences identical to eager's (a logit rounded differently flips a draw "
        "near a boundary, and the sequence diverges from there).",
        f"Goal (the issue's): genkernels with the KV cache >= {EAGER_GOAL:g}x eager's tokens/s, each side at its "
        "fastest: the faster of genkernels and genkernels + CUDA graph against the faster of eager and eager + CUDA "
        "graph (vs eager in the table compares with plain eager). = without graph: the share of a graphed "
        "variant's sequences identical to the same layers' without graphs.",
    ]
    return OpSummary(OP, headers, rows, [goal], notes)


# --------------------------------------------------------------------------- CPU self-check


def self_check(backend: str) -> SelfCheck:
    """The CPU self-check of ``backend``: the tiny ImageGPT (3x3 grey images: 9 tokens, dim 32, 2 blocks) in float32
    on genkernels layers against its PyTorch-op twin with the same weights: teacher-forced logits through the KV
    cache and through the forward under the criterion (float64 truth), and sampling with and without the cache
    giving the same tokens at the same seed."""
    from genkernels import UnsupportedError

    case = SamplingCase("tiny", batch=2, dtype=torch.float32, backend=backend, check_batch=2)
    try:
        case.prepare(torch.device("cpu"))
    except Exception as e:  # noqa: BLE001 - the model module itself is broken
        return SelfCheck(OP, backend, "failed", f"cannot build the tiny ImageGPT: {type(e).__name__}: {e}")
    try:
        model = case._state["model"]
        tokens, labels = case._state["check"]
        checks = {c: compare([decode_logits(model, tokens, labels, c)], [case._state["logits"][c]]) for c in (1, 0)}
        with_cache, without = sample(model, 2, True), sample(model, 2, False)
    except UnsupportedError as e:
        return SelfCheck(OP, backend, "skipped", str(e))
    except Exception as e:  # noqa: BLE001 - it accepted the inputs and then raised
        return SelfCheck(OP, backend, "failed", f"raised {type(e).__name__}: {e}")
    finally:
        case.release()
    what = "tiny ImageGPT (3x3x1 images, 9 tokens), fp32, batch 2"
    for use_cache, check in checks.items():
        if not check.ok:
            path = "KV-cache decode" if use_cache else "forward"
            return SelfCheck(OP, backend, "failed", f"{what}: teacher-forced {path} logits: {check.detail}")
    if not torch.equal(with_cache, without):
        return SelfCheck(OP, backend, "failed", f"{what}: sampling with and without the KV cache gave other tokens")
    worst = max(checks.values(), key=lambda c: c.err / c.bound)
    detail = (
        f"{what} vs PyTorch ops: teacher-forced logits (KV-cache decode and forward) err {worst.err:.2g} <= bound "
        f"{worst.bound:.2g}; sampling with and without the cache: the same tokens"
    )
    return SelfCheck(OP, backend, "ok", detail)
