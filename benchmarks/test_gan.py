"""One StyleGAN2 generator forward under pytest-benchmark: the case of ``genkernels bench`` (see conftest.py).

pytest benchmarks/test_gan.py -k "genkernels" --benchmark-json=gan.json

Variant ids: eager (PyTorch layers), genkernels (genkernels layers, auto backend), genkernels_CUDA-graph (the same,
captured), torch.compile (of the PyTorch-layer forward; its compile, about 20 s, happens in the test). Each variant's
peak memory lands in the benchmark's extra_info (``peak_memory_gib``).
"""

from __future__ import annotations

from genkernels.bench import gan

BENCH = gan  # conftest.py parametrizes case x variant from it


def test_gan(run_benchmark, case, variant: str) -> None:
    run_benchmark(case, variant)
