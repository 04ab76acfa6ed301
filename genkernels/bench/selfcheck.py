"""Without a GPU: check every backend that can run on this machine for correct numbers, on small shapes.

The reference runs in-process. Triton runs only under its interpreter, which must be switched
on (TRITON_INTERPRET=1) before triton is first imported; when this process was not started
that way, the triton check runs in a child process that is (``--self-check triton``) and
reports back one JSON line. The cuda backend reports why it cannot run here.

Statuses: "ok"; "failed": the backend accepted the inputs and gave wrong numbers or raised
(a bug: the exit status is 1); "error": the check could not finish (the child process died or timed
out, or the check itself raised), so nothing was verified: printed and reported, and the exit status stays
0 (a slow machine's timeout is not a wrong number); "skipped": the backend's own reason for not running here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import report
from .core import SelfCheck

#: Prefix of the child's result line, so stray output (warnings) cannot be mistaken for it.
_MARKER = "GENKERNELS_SELFCHECK "
#: The interpreter runs each Triton program serially in Python; the checks take well under this.
CHILD_TIMEOUT_S = 900


def _backends() -> list[str]:
    from genkernels._registry import BACKENDS

    return list(BACKENDS)


def _op_module(op: str):
    from .runner import op_module

    return op_module(op)


def _in_process(op: str, backend: str) -> SelfCheck:
    try:
        return _op_module(op).self_check(backend)
    except Exception as e:  # noqa: BLE001 - a crash in the harness itself is reported, not fatal
        return SelfCheck(op, backend, "error", f"self-check raised {type(e).__name__}: {e}")


def _triton(op: str, interpret: bool) -> SelfCheck:
    if importlib.util.find_spec("triton") is None:
        return SelfCheck(op, "triton", "skipped", "triton is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _in_process(op, "triton")
    if not interpret:
        return SelfCheck(op, "triton", "skipped", "TRITON_INTERPRET is not set and --no-interpret was given")
    cmd = [sys.executable, "-m", "genkernels.bench", "--self-check", "triton", "--ops", op]
    env = dict(os.environ, TRITON_INTERPRET="1")
    try:
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return SelfCheck(op, "triton", "error", f"the interpreter check did not finish within {CHILD_TIMEOUT_S} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARKER):
            for item in json.loads(line[len(_MARKER) :]):
                if item["op"] == op:
                    return SelfCheck(**item)
    tail = " ".join((proc.stderr or proc.stdout).split()[-60:])
    return SelfCheck(op, "triton", "error", f"child process exited {proc.returncode} without a result: {tail}")


def self_check_child(backend: str, ops: Sequence[str]) -> int:
    """Run ``backend``'s self-check for ``ops`` here and print the results as one marked JSON line."""
    checks = [_in_process(op, backend) for op in ops]
    print(_MARKER + json.dumps([dataclasses.asdict(c) for c in checks]), flush=True)
    return 1 if any(c.status == "failed" for c in checks) else 0


def run_cpu(out_dir: Path, ops: Sequence[str], meta: dict[str, Any], interpret: bool = True) -> int:
    """Say that no GPU is present, self-check every backend of ``ops``, print and write the table.

    Returns 1 when a backend produced wrong numbers (status "failed"), else 0; checks that could not finish
    ("error") are listed.
    """
    print(
        f"No CUDA GPU is present (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}): "
        "nothing can be timed here. Running the CPU correctness self-check of each backend instead "
        "(small shapes, against float64 truth with the test criterion).",
        flush=True,
    )
    checks: list[SelfCheck] = []
    for op in ops:
        for backend in _backends():
            print(f"  checking {op} / {backend} ...", flush=True)
            checks.append(_triton(op, interpret) if backend == "triton" else _in_process(op, backend))
    header = (
        f"# genkernels CPU self-check (no CUDA GPU)\n\ntorch {meta['torch']}, triton {meta['triton']}, "
        f"genkernels {meta['genkernels']}, Python {meta['python']}; {meta['date']}."
    )
    text = report.selfcheck_markdown(checks, header)
    print()
    print(text)
    for path in report.write_selfcheck(out_dir, checks, meta, header):
        print(f"wrote {path}")
    failed = [c for c in checks if c.status == "failed"]
    errors = [c for c in checks if c.status == "error"]
    if failed:
        print(f"{len(failed)} backend(s) produced wrong numbers: " + ", ".join(f"{c.op}/{c.backend}" for c in failed))
    if errors:
        print(f"{len(errors)} check(s) could not finish: " + ", ".join(f"{c.op}/{c.backend}" for c in errors))
    return 1 if failed else 0
