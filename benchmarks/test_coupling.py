"""Affine coupling, ActNorm and one Glow step under pytest-benchmark: the cases of ``genkernels bench`` (see
conftest.py).

pytest benchmarks/test_coupling.py -k "coupling and fp32 and fwd and not fwd_bwd" --benchmark-json=coupling.json

Case ids: ``coupling-64x32x64x64-fp32-fwd``, ``...-inv``, ``...-fwd_bwd``, ``actnorm-...``, ``glow_step-...``.
Variant ids: eager, torch.compile (of the eager formula), triton, cuda.
"""

from __future__ import annotations

import pytest

from genkernels.bench import coupling

CASES = coupling.cases()
VARIANTS = CASES[0].variant_names()


def _id(text: str) -> str:
    return text.replace("/", "-").replace(" ", "-").replace("+", "_")


@pytest.mark.parametrize("variant", VARIANTS, ids=[_id(v) for v in VARIANTS])
@pytest.mark.parametrize("case", CASES, ids=[_id(c.label) for c in CASES])
def test_coupling(run_benchmark, case, variant: str) -> None:
    run_benchmark(case, variant)
