"""One SD-like UNet denoising step under pytest-benchmark: the case of ``genkernels bench`` (see conftest.py).

pytest benchmarks/test_unet.py -k "genkernels" --benchmark-json=unet.json

Variant ids: eager (PyTorch layers), torch.compile (of that model; its compile, about 50 s, happens in
the test), genkernels (genkernels layers, auto backend), genkernels_CUDA-graph (the same, captured).
"""

from __future__ import annotations

from genkernels.bench import unet

BENCH = unet  # conftest.py parametrizes case x variant from it


def test_unet(run_benchmark, case, variant: str) -> None:
    run_benchmark(case, variant)
