"""RoPE of q and k under pytest-benchmark: the cases of ``genkernels bench`` (see conftest.py).

pytest benchmarks/test_rope.py -k "FLUX and not fwd_bwd" --benchmark-json=rope.json

Cases: FLUX (1, 24, 4608, 128) and DiT-XL (2, 16, 4096, 72), bf16, 1-D positions, forward and forward +
backward. Variant ids: eager (the rotate_half formula), torch.compile (of it), triton, cuda (no RoPE kernel:
skipped with its reason).
"""

from __future__ import annotations

from genkernels.bench import rope

BENCH = rope  # conftest.py parametrizes case x variant from it


def test_rope(run_benchmark, case, variant: str) -> None:
    run_benchmark(case, variant)
