"""GroupNorm(32) + SiLU under pytest-benchmark: the cases of ``genkernels bench`` (see conftest.py).

pytest benchmarks/test_group_norm.py -k "bf16 and NCHW and not bwd" --benchmark-json=gn.json
"""

from __future__ import annotations

import pytest

from genkernels.bench import group_norm

CASES = group_norm.cases()


@pytest.mark.parametrize("variant", CASES[0].variant_names())
@pytest.mark.parametrize("case", CASES, ids=[c.label.replace(" ", "-").replace("+", "_") for c in CASES])
def test_group_norm(run_benchmark, case, variant: str) -> None:
    run_benchmark(case, variant)
