"""One DiT-XL/2 block forward under pytest-benchmark: the cases of ``genkernels bench`` (see conftest.py).

pytest benchmarks/test_dit.py -k "4096 and genkernels" --benchmark-json=dit.json

Cases: 4096 and 256 tokens, batch 2, bf16. Variant ids: eager (PyTorch layers), genkernels (genkernels layers,
auto backend), genkernels_CUDA-graph (the same, captured), torch.compile (of the PyTorch-layer block; its
compile happens in the test).
"""

from __future__ import annotations

from genkernels.bench import dit

BENCH = dit  # conftest.py parametrizes case x variant from it


def test_dit(run_benchmark, case, variant: str) -> None:
    run_benchmark(case, variant)
