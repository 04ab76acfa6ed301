"""`genkernels info` and genkernels.info()."""

import subprocess
import sys

import torch

import genkernels


def test_info_reports_versions_and_backends():
    info = genkernels.info()
    assert info["genkernels"] == genkernels.__version__
    assert info["torch"] == torch.__version__
    assert set(info["backends"]["group_norm"]) == {"reference", "triton", "cuda"}
    assert info["backends"]["group_norm"]["reference"] is None
    text = str(info)
    assert "group_norm" in text and "_C" in text and "torch" in text


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "genkernels", "info"], capture_output=True, text=True, check=True)
    assert "genkernels " + genkernels.__version__ in out.stdout
    assert "group_norm" in out.stdout
