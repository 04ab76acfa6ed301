"""One SD-like UNet denoising step under pytest-benchmark: the case of ``genkernels bench`` (see conftest.py).

pytest benchmarks/test_unet.py -k "genkernels" --benchmark-json=unet.json

Variant ids: eager (PyTorch layers), torch.compile (of that model; its compile, about 50 s, happens in
the test), genkernels (genkernels layers, auto backend), genkernels_CUDA-graph (the same, captured).
"""

from __future__ import annotations

import pytest

from genkernels.bench import unet

CASES = unet.cases()
VARIANTS = CASES[0].variant_names()


def _id(text: str) -> str:
    return text.replace("/", "-").replace(" + ", "_").replace(",", "").replace(" ", "-")


@pytest.mark.parametrize("variant", VARIANTS, ids=[_id(v) for v in VARIANTS])
@pytest.mark.parametrize("case", CASES, ids=[_id(c.label) for c in CASES])
def test_unet(run_benchmark, case, variant: str) -> None:
    run_benchmark(case, variant)
