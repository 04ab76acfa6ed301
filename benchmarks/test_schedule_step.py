"""The fused sampler step under pytest-benchmark: the cases of ``genkernels bench`` (see conftest.py).

pytest benchmarks/test_schedule_step.py -k "SD and fp32" --benchmark-json=step.json

Variant ids: eager, torch.compile, triton, cuda.
"""

from __future__ import annotations

import pytest

from genkernels.bench import schedule_step

CASES = schedule_step.cases()
VARIANTS = CASES[0].variant_names()


def _id(text: str) -> str:
    return text.replace("/", "-").replace(" ", "-").replace("+", "_")


@pytest.mark.parametrize("variant", VARIANTS, ids=[_id(v) for v in VARIANTS])
@pytest.mark.parametrize("case", CASES, ids=[_id(c.label) for c in CASES])
def test_schedule_step(run_benchmark, case, variant: str) -> None:
    run_benchmark(case, variant)
