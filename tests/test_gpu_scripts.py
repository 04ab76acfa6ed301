"""scripts/gpu_profile.py and scripts/gpu_host_probe.py, the GPU diagnostics: without a GPU each says so and
exits 0; the probe's float32 error breakdown runs its variants (every op family forced to the reference in
turn) and reports a number for each."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
@pytest.mark.parametrize("script", ["gpu_profile.py", "gpu_host_probe.py"])
def test_script_without_a_gpu(script, tmp_path):
    out = tmp_path / "out.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU" in out.read_text()


def test_float32_error_breakdown_runs(capsys, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_host_probe
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(gpu_host_probe, "OUT", sys.stdout)
    gpu_host_probe.dit_float32_sources(torch.device("cpu"))
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("## tiny DiT float32") for line in lines)
    rows = [line for line in lines if line.startswith("  ")]
    assert len(rows) == 6 and all(re.match(r"\s+\d", row) for row in rows), rows
