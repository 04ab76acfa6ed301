"""The SD VAE decode under pytest-benchmark: the case of ``genkernels bench`` (see conftest.py).

pytest benchmarks/test_vae.py -k "genkernels" --benchmark-json=vae.json

Variant ids: eager (PyTorch layers), torch.compile (of that model's decode; its compile, about 16 s, happens
in the test), genkernels (genkernels layers, auto backend), genkernels_CUDA-graph (the same, captured). Each
variant's peak memory lands in the benchmark's extra_info (``peak_memory_gib``).
"""

from __future__ import annotations

from genkernels.bench import vae

BENCH = vae  # conftest.py parametrizes case x variant from it


def test_vae(run_benchmark, case, variant: str) -> None:
    run_benchmark(case, variant)
