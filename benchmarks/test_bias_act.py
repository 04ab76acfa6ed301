"""Bias + leaky ReLU (StyleGAN's bias_act) under pytest-benchmark: the cases of ``genkernels bench`` (see conftest.py).

pytest benchmarks/test_bias_act.py -k "bf16 and not fwd_bwd" --benchmark-json=bias_act.json

Variant ids: eager, torch.compile (of the eager formula), triton, cuda; forward + backward also eager, triton and
cuda replayed from a CUDA graph (eager_CUDA-graph, triton_CUDA-graph, cuda_CUDA-graph).
"""

from __future__ import annotations

from genkernels.bench import bias_act

BENCH = bias_act  # conftest.py parametrizes each case with its variants


def test_bias_act(run_benchmark, case, variant: str) -> None:
    run_benchmark(case, variant)
