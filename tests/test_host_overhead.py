"""tests._host_overhead, the CPU-cost probe of the op layer, runs (in its own process: its stubs patch modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_host_overhead_probe_runs():
    out = subprocess.run(
        [sys.executable, "-m", "tests._host_overhead", "--calls", "20", "--reps", "1"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert set(rows) == {"layer_norm_modulate", "gelu_tanh", "bias_act", "group_norm"}
    assert all(float(v) > 0 for values in rows.values() for v in values)
