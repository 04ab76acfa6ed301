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
    # Names may hold spaces: the two figures are the last two fields (nan: no "without the node" figure).
    rows = {line.rsplit(None, 2)[0]: line.rsplit(None, 2)[1:] for line in out.splitlines()[1:]}
    ops = {"layer_norm_modulate", "gated_residual", "gated_residual_lnm", "rope", "attention", "gelu_tanh"}
    ops |= {"swiglu", "bias_act", "group_norm"}
    training = {"layer_norm_modulate fwd+bwd", "bias_act fwd+bwd", "DiT block (tiny) fwd"}
    assert set(rows) == ops | training
    assert all(float(v) > 0 for name in ops for v in rows[name])
    assert all(float(rows[name][0]) > 0 and rows[name][1] == "nan" for name in training)
