"""StyleGAN2's modulated conv block under pytest-benchmark: the cases of ``genkernels bench`` (see conftest.py).

pytest benchmarks/test_modconv.py -k "not bwd and (eager or triton)" --benchmark-json=modconv.json

Variant ids: eager (StyleGAN2's training formulation), eager-grouped (per-sample weights, one grouped conv),
torch.compile (of the faster of the two, picked by a short timing in the test), triton, cuda (the fused
demodulation and epilogue ops around conv2d), triton-grouped, cuda-grouped (the grouped formulation on the ops).
"""

from __future__ import annotations

from genkernels.bench import modconv

BENCH = modconv  # conftest.py parametrizes case x variant from it


def test_modconv(run_benchmark, case, variant: str) -> None:
    run_benchmark(case, variant)
