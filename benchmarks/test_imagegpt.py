"""ImageGPT sampling with the KV cache under pytest-benchmark: the case of ``genkernels bench`` (see conftest.py).

pytest benchmarks/test_imagegpt.py -k "eager or genkernels-" --benchmark-json=imagegpt.json

The case: 64 images of 16x16x1 (256 tokens each) from a dim-512, depth-8 ImageGPT in bf16. Variant ids: eager
(the PyTorch-op twin, KV cache), genkernels (KV cache), genkernels-(no-cache). One call samples the whole
batch (seconds): tokens/s = 64 * 256 / the call's time.
"""

from __future__ import annotations

from genkernels.bench import imagegpt

BENCH = imagegpt  # conftest.py parametrizes case x variant from it


def test_imagegpt(run_benchmark, case, variant: str) -> None:
    run_benchmark(case, variant)
