"""Reparameterize + KL under pytest-benchmark: the cases of ``genkernels bench`` (see conftest.py).

pytest benchmarks/test_reparam.py -k "fp32 and not fwd_bwd" --benchmark-json=reparam.json

Variant ids: eager, torch.compile (of the eager formula), triton, cuda.
"""

from __future__ import annotations

import pytest

from genkernels.bench import reparam

CASES = reparam.cases()
VARIANTS = CASES[0].variant_names()


def _id(text: str) -> str:
    return text.replace("/", "-").replace(" ", "-").replace("+", "_")


@pytest.mark.parametrize("variant", VARIANTS, ids=[_id(v) for v in VARIANTS])
@pytest.mark.parametrize("case", CASES, ids=[_id(c.label) for c in CASES])
def test_reparam(run_benchmark, case, variant: str) -> None:
    run_benchmark(case, variant)
