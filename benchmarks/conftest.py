"""The pytest-benchmark harness: ``pytest benchmarks/`` (run explicitly; the test suite is tests/).

Each test is one variant (eager, torch.compile, SDPA's backends, FlexAttention, a genkernels backend) of one case of
``genkernels.bench.<op>.cases()``. It checks the variant's output against the reference,
times it with CUDA events and L2 flushes (the median goes to ``benchmark.extra_info``, with
the rate (GB/s or TFLOP/s), its % of the copy or matmul ceiling, the speedups and the error),
then lets pytest-benchmark time the same call, synchronized, on the host. Without a CUDA GPU
every test is collected and skipped.

``genkernels bench`` runs the same cases with speedups, goals and the markdown / JSON / PNG
reports; this harness is for pytest-benchmark's own tooling (--benchmark-json, compare, ...).

A test module may name its op's bench module as ``BENCH``: its tests that take ``case`` and ``variant``
then run every case x variant (:func:`pytest_generate_tests`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda")
HERE = Path(__file__).parent.resolve()
NO_GPU = "no CUDA GPU: these benchmarks time GPU kernels (`genkernels bench` runs the CPU self-check)"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Leave benchmarks out of a run that did not name this folder (or a file in it), e.g. a bare ``pytest``."""
    for arg in config.args:
        asked = Path(str(arg).split("::")[0]).resolve()
        if asked == HERE or HERE in asked.parents:
            return None
    return True


def _id(text: str) -> str:
    return text.replace("/", "-").replace(" + ", "_").replace(",", "").replace(" ", "-")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``case`` and ``variant`` from the test module's ``BENCH``: each case with each of its own
    variants (ids: the label, then the variant)."""
    bench = getattr(metafunc.module, "BENCH", None)
    if bench is None or not {"case", "variant"} <= set(metafunc.fixturenames):
        return
    pairs = [(c, v) for c in bench.cases() for v in c.variant_names()]
    metafunc.parametrize(("case", "variant"), pairs, ids=[f"{_id(c.label)}-{_id(v)}" for c, v in pairs])


@pytest.fixture(scope="session", autouse=True)
def _needs_gpu() -> None:
    # Session scope: it must run before the session-scoped ceilings, which need the GPU.
    if not HAS_GPU:
        pytest.skip(NO_GPU)


@pytest.fixture(scope="session")
def ceilings(_needs_gpu):
    """Copy and matmul ceilings, measured once per session on this GPU."""
    from genkernels.bench.core import measure_ceilings

    return measure_ceilings()


@pytest.fixture
def run_benchmark(benchmark, ceilings) -> Callable:
    """``run_benchmark(case, variant)``: check, time and report one variant of one case (see module doc)."""
    from genkernels.bench.core import FULL_TIMING, Result, build_variant, floor_ms, measure

    def run(case, variant: str) -> None:
        case.prepare(DEVICE)
        try:
            v = build_variant(case, variant)
            result = v if isinstance(v, Result) else measure(case, v, FULL_TIMING, ceilings.of(case.unit))
            if result.status == "skipped":
                pytest.skip(result.reason)
            assert result.status == "ok", f"{case.label} / {variant}: {result.reason}"
            benchmark.group = f"{case.op} {case.label}"
            benchmark.extra_info.update(
                {k: val for k, val in dataclasses.asdict(result).items() if val is not None},
                case=case.label,
                unit=case.unit,
                work=case.work,
                rate_note=case.rate_note,
                ms_median_cuda_events=result.ms,
                ceiling=ceilings.of(case.unit),
                floor_ms=floor_ms(case.work, case.unit, ceilings.of(case.unit)),
                **case.params,
            )

            def synced() -> None:
                v.fn()
                torch.cuda.synchronize()  # pytest-benchmark reads a host clock: wait for the GPU

            benchmark.pedantic(synced, rounds=20, warmup_rounds=3, iterations=1)
        finally:
            case.release()
            torch.cuda.empty_cache()

    return run
