"""Bias + leaky ReLU (StyleGAN's bias_act) under pytest-benchmark: the cases of ``genkernels bench`` (see conftest.py).

pytest benchmarks/test_bias_act.py -k "bf16 and not fwd_bwd" --benchmark-json=bias_act.json

Variant ids: eager, torch.compile (of the eager formula), triton, cuda.
"""

from __future__ import annotations

import pytest

from genkernels.bench import bias_act

CASES = bias_act.cases()
VARIANTS = CASES[0].variant_names()


def _id(text: str) -> str:
    return text.replace("/", "-").replace(" ", "-").replace("+", "_")


@pytest.mark.parametrize("variant", VARIANTS, ids=[_id(v) for v in VARIANTS])
@pytest.mark.parametrize("case", CASES, ids=[_id(c.label) for c in CASES])
def test_bias_act(run_benchmark, case, variant: str) -> None:
    run_benchmark(case, variant)
