"""Adaptive LayerNorm (DiT's adaLN) under pytest-benchmark: the cases of ``genkernels bench`` (see conftest.py).

pytest benchmarks/test_adaln.py -k "layer_norm_modulate and not fwd_bwd" --benchmark-json=adaln.json

Cases: layer_norm_modulate and gated_residual_layer_norm_modulate at DiT-XL (2, 4096, 1152) and FLUX (1, 4608,
3072), bf16, forward and forward + backward. Variant ids: eager, torch.compile (of the eager formula), triton,
cuda.
"""

from __future__ import annotations

from genkernels.bench import adaln

BENCH = adaln  # conftest.py parametrizes case x variant from it


def test_adaln(run_benchmark, case, variant: str) -> None:
    run_benchmark(case, variant)
