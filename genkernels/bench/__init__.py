"""Benchmarks of genkernels' kernels against what users have now: eager PyTorch and torch.compile.

``genkernels bench`` (or ``python -m genkernels.bench``) times, in one process and side by side,
every case of every op: eager PyTorch, ``torch.compile`` of the same function (for attention:
SDPA with each of its backends and FlexAttention instead), and each genkernels backend that can
run it, after checking each one's output against a reference.
It reports milliseconds, the achieved rate (GB/s or TFLOP/s), its fraction of the device's
ceilings measured in the same run, speedups, and the op's goals (bench.md, bench.json,
bench.png). Without a GPU it runs a CPU correctness self-check of each backend instead.

Layout: ``core`` (timing, ceilings, correctness check, the case runner), ``report`` (markdown,
JSON, chart), ``runner`` (command line), ``selfcheck`` (the CPU path), and one module per op.
An op's module (``genkernels/bench/<op>.py``, listed in ``runner.OPS``) defines:

- ``OP``: the op's name;
- ``cases(quick: bool) -> list[core.Case]``: its cases, most important first;
- ``summarize(records: list[core.CaseRecord]) -> core.OpSummary``: summary table and goals;
- ``self_check(backend: str) -> core.SelfCheck``: a small CPU correctness check of one backend;
- optionally ``BUDGET_SHARE: float`` (default 1): its part of a ``--budget-s`` time budget.

A case may name a ``peer`` baseline (attention: SDPA's flash backend) that its goals are stated
against; every variant then gets a speedup vs the peer as well as vs eager.

The ops (``runner.OPS``, in run order): ``group_norm`` (GroupNorm + SiLU), ``attention``,
``schedule_step`` (fused sampler steps), ``reparam`` (a VAE posterior's reparameterized sample and
its KL), ``coupling`` (a normalizing flow's affine coupling and ActNorm, and one Glow step),
``bias_act`` (StyleGAN's fused bias + leaky ReLU, forward and forward + backward), ``adaln`` (a
diffusion transformer's adaptive LayerNorm: layer_norm_modulate and the gated residual + norm, at
DiT-XL and FLUX shapes), ``rope`` (rotary embedding of q and k), ``modconv`` (StyleGAN2's modulated
conv block: demodulation, convolution and the fused epilogue), ``imagegpt`` (ImageGPT sampling
throughput with the KV cache, tokens/s), and four whole-model ops, ``dit`` (one DiT-XL/2 block
forward), ``vae`` (Stable Diffusion VAE decode, with peak memory), ``gan`` (a StyleGAN2 generator
forward at 256x256) and ``unet`` (one SD-like UNet step), which share ``_model`` (eager PyTorch
layers, torch.compile, genkernels layers eager and in a CUDA graph, on the same weights).

Each variant is checked right after it is built (``core.run_variant``, and the pytest harness
likewise), so a case may answer ``expected()`` for the variant built last: ``reparam``'s baselines
draw noise that cannot be reproduced and are checked on the outputs that do not depend on it.
Measurements other than time are taken while building a variant and kept in the case's params,
which its record shares (``vae``: ``params["peak_memory_gib"]``).
"""

from .runner import OPS, main, run

__all__ = ["OPS", "main", "run"]
