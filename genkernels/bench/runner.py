"""`genkernels bench`: run every op's cases on the GPU and write the reports, or the CPU self-check without one."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from . import report
from .core import (
    FULL_TIMING,
    QUICK_TIMING,
    CaseRecord,
    OpSummary,
    Timing,
    flush_ms,
    measure_ceilings,
    not_run,
    run_case,
)

#: Ops with a benchmark module genkernels/bench/<op>.py (see the package docstring for what it defines), in
#: run order: under a time budget the ops at the end are the first left out, so the whole-model cases, whose
#: torch.compile takes the longest (a DiT block, VAE decode about 16 s, the StyleGAN2 generator, the UNet about
#: 50 s), come last, the UNet last of all; ImageGPT's sampling (no torch.compile) comes just before them.
OPS = (
    "group_norm",
    "attention",
    "schedule_step",
    "reparam",
    "coupling",
    "bias_act",
    "adaln",
    "rope",
    "modconv",
    "imagegpt",
    "dit",
    "vae",
    "gan",
    "unet",
)


def op_module(op: str) -> ModuleType:
    """The benchmark module of ``op``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; benchmarked ops: {', '.join(OPS)}")
    return importlib.import_module(f"{__package__}.{op}")


def default_out_dir() -> Path:
    """$OUT when set (GPU machines collect that folder), else benchmarks/results."""
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("benchmarks") / "results"


def _versions() -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    import genkernels

    return {
        "genkernels": genkernels.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def _gpu_meta(quick: bool, timing: Timing) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 0)
    meta = _versions()
    try:
        import genkernels

        extension = genkernels.info()["extension"]
    except Exception as e:  # noqa: BLE001 - the report is still useful without it
        extension = f"unknown ({type(e).__name__}: {e})"
    meta.update(
        device=f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs"
        + (f", {l2 / 1e6:.0f} MB L2" if l2 else ""),
        extension=extension,
        timer="triton.testing.do_bench" if meta["triton"] != "not installed" else "CUDA events",
        warmup_ms=timing.warmup_ms,
        rep_ms=timing.rep_ms,
        flush_ms=round(flush_ms(), 4),
        quick=quick,
    )
    return meta


class _Progress:
    """A tqdm bar over the cases on a terminal; numbered lines when output goes to a file or tqdm is missing."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        # A bar redrawn with carriage returns garbles a log file (gpu_check.sh tees into one): numbered lines there.
        if tqdm is None or not sys.stderr.isatty():
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc=desc, unit="case", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
        self._done, self._total, self._start = 0, total, time.monotonic()

    def step(self, line: str) -> None:
        """Print a case's result line and advance."""
        self._done += 1
        if self._bar is None:
            print(f"[{self._done}/{self._total} {time.monotonic() - self._start:4.0f}s] {line}", flush=True)
        else:
            self._bar.write(line)
            self._bar.update()

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()


def op_budget(left_s: float, shares: Sequence[float]) -> float:
    """Seconds the first of ``shares``' ops may take of ``left_s``: its share among it and the ops after it."""
    return max(0.0, left_s) * shares[0] / sum(shares)


def bench_gpu(out_dir: Path, ops: Sequence[str], quick: bool = False, budget_s: float | None = None) -> int:
    """Time every case of ``ops`` on the current GPU and write bench.{json,md,png} into out_dir.

    Returns 1 when a variant failed (wrong numbers or an error), else 0; goals missed are
    reported, not an error. With ``budget_s``, cases not started within that many seconds
    of the call are reported as "not run" (cases come most important first). The budget is
    split between the ops in proportion to each module's ``BUDGET_SHARE`` (default 1), so the
    first op cannot spend it all; what an op leaves unused goes to the ops after it.
    """
    start = time.monotonic()
    timing = QUICK_TIMING if quick else FULL_TIMING
    meta = _gpu_meta(quick, timing)
    print(
        f"genkernels bench on {meta['device']}: torch {meta['torch']}, triton {meta['triton']}, "
        f"extension: {meta['extension']}",
        flush=True,
    )
    ceilings = measure_ceilings(timing)
    print(
        f"ceilings: copy {ceilings.copy_gbs:,.0f} GB/s (1 GiB, read + written), "
        f"bf16 matmul 8192^3 {ceilings.matmul_tflops:,.0f} TFLOP/s",
        flush=True,
    )
    modules = [op_module(op) for op in ops]
    op_cases = [m.cases(quick) for m in modules]
    shares = [float(getattr(m, "BUDGET_SHARE", 1.0)) for m in modules]
    device = torch.device("cuda")
    records: list[CaseRecord] = []

    def summaries() -> list[OpSummary]:
        return [m.summarize([r for r in records if r.op == m.OP]) for m in modules]

    progress = _Progress(sum(len(c) for c in op_cases), "bench")
    try:
        for i, (m, cases) in enumerate(zip(modules, op_cases)):
            deadline, why = None, ""
            if budget_s is not None:
                own = op_budget(budget_s - (time.monotonic() - start), shares[i:])
                deadline = time.monotonic() + own
                why = f"time budget spent ({m.OP}'s share: {own:.0f} s of the {budget_s:.0f} s budget)"
            for case in cases:
                if deadline is not None and time.monotonic() > deadline:
                    records.append(not_run(case, why))
                else:
                    records.append(run_case(case, device, timing, ceilings))
                    # Reports so far, so that a run killed by an outer time limit still leaves its cases.
                    report.write(out_dir, meta, ceilings, records, summaries(), with_chart=False)
                progress.step(report.one_line(records[-1]))
    finally:
        progress.close()
    meta["wall_s"] = round(time.monotonic() - start, 1)
    final = summaries()
    for line in report.write(out_dir, meta, ceilings, records, final):
        print(f"wrote {line}" if not line.startswith("no chart") else line)
    failed = [f"{rec.label} / {r.variant}: {r.reason}" for rec in records for r in rec.results if r.status == "failed"]
    skipped_budget = sum(1 for rec in records if rec.results and rec.results[0].status == "not run")
    print()
    print(report.summary_markdown(final))
    if skipped_budget:
        print(f"{skipped_budget} of {len(records)} cases not run: time budget of {budget_s:.0f} s spent.")
    if failed:
        print(f"{len(failed)} variant(s) FAILED:\n  " + "\n  ".join(failed))
        return 1
    return 0


def _out_dir_error(out: Path) -> str | None:
    """None when ``out`` is a folder the reports can be written into (created if missing), else why not."""
    if out.exists() and not out.is_dir():
        return "exists and is not a folder (reports go in one)"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the folder ({e.strerror or e})"
    if not os.access(out, os.W_OK | os.X_OK):
        return "the folder is not writable"
    return None


def run(
    out_dir: Path | str | None = None,
    ops: Sequence[str] | None = None,
    quick: bool = False,
    budget_s: float | None = None,
    interpret: bool = True,
) -> int:
    """Benchmark ``ops`` (default: all) into ``out_dir`` (default: :func:`default_out_dir`); the exit status
    (2, before any work, when ``out_dir`` is a file or cannot be created).

    Without a CUDA GPU, says so and runs the CPU correctness self-check of every backend
    instead (triton under TRITON_INTERPRET=1 unless ``interpret`` is False; ``quick`` and
    ``budget_s`` do not apply and are said to be ignored); then the status is 1 only when a backend
    produced wrong numbers (checks that could not finish are listed).
    """
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    why = _out_dir_error(out)  # before any work: the reports are written at the end
    if why:
        print(f"genkernels bench: error: --out {out}: {why}", file=sys.stderr)
        return 2
    ops = list(ops) if ops else list(OPS)
    for op in ops:
        op_module(op)  # unknown names fail before any work
    if not torch.cuda.is_available():
        from .selfcheck import run_cpu

        ignored = [flag for flag, given in (("--quick", quick), ("--budget-s", budget_s is not None)) if given]
        if ignored:
            print(f"{' and '.join(ignored)} ignored: there is no CUDA GPU here, and only timing uses them.", flush=True)
        return run_cpu(out, ops, _versions(), interpret=interpret)
    return bench_gpu(out, ops, quick=quick, budget_s=budget_s)


def _parse_ops(text: str) -> list[str]:
    ops = list(dict.fromkeys(o.strip() for o in text.split(",") if o.strip()))  # each op once, in the order given
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown op(s) {', '.join(unknown)}; benchmarked ops: {', '.join(OPS)}")
    if not ops:
        raise argparse.ArgumentTypeError(f"no op named in {text!r}; benchmarked ops: {', '.join(OPS)}")
    return ops


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    """The command line of `genkernels bench` / `python -m genkernels.bench`."""
    p = argparse.ArgumentParser(
        prog="genkernels bench",
        description="Time genkernels' backends against eager PyTorch and torch.compile on the GPU "
        "(markdown, JSON and PNG reports). Without a GPU, run the CPU correctness self-check instead.",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default: $OUT if set, else benchmarks/results)"
    )
    p.add_argument(
        "--ops", type=_parse_ops, default=None, help=f"comma-separated ops to run (default: all: {','.join(OPS)})"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="shorter timing and fewer cases: each op's first ones (bf16, or the forwards; "
        "schedule_step: float32 DDIM); goals that need the others show UNMEASURED",
    )
    p.add_argument(
        "--budget-s",
        type=_positive_seconds,
        default=None,
        help="start no new case after this many seconds; the rest are reported as not run",
    )
    p.add_argument(
        "--no-interpret",
        action="store_true",
        help="without a GPU, skip the triton self-check under TRITON_INTERPRET=1 (slow)",
    )
    from genkernels._registry import BACKENDS

    p.add_argument(
        "--self-check",
        metavar="BACKEND",
        choices=list(BACKENDS),
        default=None,
        help="only run the CPU self-check of BACKEND in this process and print it as JSON",
    )
    p.add_argument(
        "--redraw",
        metavar="BENCH_JSON",
        type=Path,
        default=None,
        help="draw the chart of a run's bench.json again, into bench.png beside it (or into --out); no timing",
    )
    return p


def _given(args: argparse.Namespace) -> list[tuple[str, bool]]:
    """Each option's flag and whether it was given."""
    return [
        ("--out", args.out is not None),
        ("--ops", args.ops is not None),
        ("--quick", args.quick),
        ("--budget-s", args.budget_s is not None),
        ("--no-interpret", args.no_interpret),
        ("--self-check", args.self_check is not None),
        ("--redraw", args.redraw is not None),
    ]


def main(argv: list[str] | None = None) -> int:
    """Entry point of `genkernels bench` and `python -m genkernels.bench`; returns the exit status."""
    p = parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    # The options --redraw and --self-check would ignore: an error rather than a silent no-op.
    for mode, uses in (("--redraw", ("--out",)), ("--self-check", ("--ops",))):
        given = [flag for flag, value in _given(args) if value]
        others = [flag for flag in given if flag not in (mode, *uses)]
        if mode in given and others:
            p.error(f"{mode} cannot be combined with {', '.join(others)}")
    if args.redraw is not None:
        png = (args.out if args.out is not None else args.redraw.parent) / report.CHART_NAME
        why = None if args.redraw.is_file() else "not a readable bench.json (no such file)"
        if why:
            print(f"genkernels bench: error: --redraw {args.redraw}: {why}", file=sys.stderr)
            return 2
        why = _out_dir_error(png.parent)
        if why:
            print(f"genkernels bench: error: --out {png.parent}: {why}", file=sys.stderr)
            return 2
        try:
            why = report.redraw(args.redraw, png)
        except (OSError, ValueError, KeyError, TypeError) as e:  # missing, not JSON, or not a bench.json
            why = f"not a readable bench.json ({type(e).__name__}: {e})"
            print(f"genkernels bench: error: --redraw {args.redraw}: {why}", file=sys.stderr)
            return 2
        print(f"no chart: {why}" if why else f"wrote {png}")
        return 1 if why else 0
    if args.self_check is not None:
        from .selfcheck import self_check_child

        return self_check_child(args.self_check, args.ops or list(OPS))
    return run(args.out, args.ops, quick=args.quick, budget_s=args.budget_s, interpret=not args.no_interpret)
