"""Attention under pytest-benchmark: the cases of ``genkernels bench`` (see conftest.py).

pytest benchmarks/test_attention.py -k "SDXL and bf16 and not fwd_bwd" --benchmark-json=attn.json

Variant ids: eager, SDPA-flash, SDPA-cuDNN, SDPA-mem-efficient, FlexAttention, triton, cuda.
"""

from __future__ import annotations

import pytest

from genkernels.bench import attention

CASES = attention.cases()
VARIANTS = CASES[0].variant_names()


def _id(text: str) -> str:
    return text.replace("/", "-").replace(" ", "-").replace("+", "_")


@pytest.mark.parametrize("variant", VARIANTS, ids=[_id(v) for v in VARIANTS])
@pytest.mark.parametrize("case", CASES, ids=[_id(c.label) for c in CASES])
def test_attention(run_benchmark, case, variant: str) -> None:
    run_benchmark(case, variant)
