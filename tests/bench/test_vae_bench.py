"""The VAE-decode benchmark on CPU: the case, its FLOPs on the meta device, the peak-memory column and goal,
reports. The whole-model machinery it shares with the UNet step (``genkernels.bench._model``)
is tested in test_unet_bench.py."""

from __future__ import annotations

import json

import pytest
import torch

from genkernels.bench import _model, core, report, runner, vae
from genkernels.bench._model import GENKERNELS, GRAPH, VARIANTS

from .test_unet_bench import model_record

CPU = torch.device("cpu")


def test_registered_in_the_runner():
    """Both VAE-family ops run, the whole-model ones last (their compile is the longest), the UNet last of all."""
    assert runner.OPS[-5:] == ("imagegpt", "dit", "vae", "gan", "unet") and "reparam" in runner.OPS
    assert runner.op_module("vae") is vae and vae.OP == "vae" and vae.BUDGET_SHARE == 0.5
    assert runner.op_module("reparam").OP == "reparam" and runner.op_module("reparam").BUDGET_SHARE == 0.5


def test_case_and_flops():
    (case,) = vae.cases()
    (quick,) = vae.cases(quick=True)
    assert quick.label == case.label
    assert case.variant_names() == list(VARIANTS)
    assert case.params["latent"] == [4, 64, 64] and case.params["image"] == [3, 512, 512]
    assert case.params["batch"] == 1 and case.params["dtype"] == "bf16" and case.params["config"] == "sd"
    assert case.unit == "TFLOP/s" and "TFLOP per decode" in case.rate_note
    # SD VAE decoder at 512x512: about 2.5 TFLOP, most of it in the 3x3 convolutions at 256 and 512 pixels.
    assert 2.3e12 < case.work < 2.7e12
    one = vae.VAEDecodeCase("tiny", batch=1, size=8).work
    assert vae.VAEDecodeCase("tiny", batch=2, size=8).work == 2 * one > 0


def test_case_on_cpu():
    """The tiny VAE's decode in bf16 passes the criterion, the models share the weights, and the record sees
    the peaks measured later (none off the GPU)."""
    case = vae.VAEDecodeCase("tiny", batch=2, size=8, backend="reference")
    rec = core.record_of(case)
    case.prepare(CPU)
    try:
        assert case._state["model_torch"].decoder.conv_out.weight is case._state["model"].decoder.conv_out.weight
        (exp,) = case.expected()
        assert exp.name == "image" and exp.truth.shape == (2, 3, 16, 16) and exp.truth.std() > 0.05
        assert core.compare(case.variant(GENKERNELS).fn(), case.expected()).ok
    finally:
        case.release()
    assert case.peaks == {} and rec.params["peak_memory_gib"] is case.peaks


def _record(ms: dict[str, float | None], peaks: dict[str, float]) -> core.CaseRecord:
    (case,) = vae.cases()
    case.peaks.update(peaks)
    return model_record(case, ms)


PEAKS = {core.EAGER: 0.88, core.COMPILE: 0.75, GENKERNELS: 0.7, GRAPH: 0.8}
FAST = {core.EAGER: 25.6, core.COMPILE: 7.4, GENKERNELS: 9.0, GRAPH: 7.0}


@pytest.mark.parametrize(
    ("ms", "peaks", "passed", "best"),
    [
        (FAST, PEAKS, [True, True, True], GRAPH),
        (FAST, {**PEAKS, GRAPH: 0.9}, [True, True, False], GRAPH),
        ({core.EAGER: 25.6, core.COMPILE: 7.4, GENKERNELS: 12.0}, PEAKS, [True, False, True], GENKERNELS),
        ({core.EAGER: 25.6, core.COMPILE: 7.4, GENKERNELS: 20.0}, PEAKS, [False, False, True], GENKERNELS),
        ({core.EAGER: 25.6, core.COMPILE: 7.4}, PEAKS, [None, None, None], None),
        ({core.EAGER: 25.6, GENKERNELS: 12.0}, {}, [True, None, None], GENKERNELS),
    ],
)
def test_goals_with_peak_memory(ms, peaks, passed, best):
    summary = vae.summarize([_record(ms, peaks)])
    assert [g.passed for g in summary.goals] == passed
    assert [g.target for g in summary.goals] == [">= 1.5x (floor for resolving)", ">= 1.0x", "<= eager's peak"]
    peak = summary.goals[2]
    assert peak.measured.startswith("unmeasured") if peak.passed is None else f"GiB ({best}) vs eager" in peak.measured
    assert summary.headers[4] == "peak GiB" and len(summary.notes) == 4
    assert any("each side at its fastest" in n for n in summary.notes)
    rows = {r[0]: r for r in summary.rows}
    assert rows[core.EAGER][4] == (f"{peaks[core.EAGER]:.2f}" if peaks else "n/a")
    assert all(len(r) == 6 for r in summary.rows)


def test_summary_without_a_record():
    summary = vae.summarize([])
    assert [g.passed for g in summary.goals] == [None, None, None]
    assert all(r[1:] == ["not run", "n/a", "n/a", "n/a", "n/a"] for r in summary.rows)


def test_reports(tmp_path):
    rec = _record(FAST, PEAKS)
    rec.floor_ms = core.floor_ms(rec.work, rec.unit, 700.0)
    meta = {"device": "test", "torch": torch.__version__}
    report.write(tmp_path, meta, core.Ceilings(3000.0, 700.0), [rec], [vae.summarize([rec])], with_chart=False)
    data = json.loads((tmp_path / report.JSON_NAME).read_text())
    assert data["cases"][0]["op"] == "vae" and data["cases"][0]["params"]["peak_memory_gib"] == PEAKS
    text = (tmp_path / report.MARKDOWN_NAME).read_text()
    assert "VAE decode" in text and "peak GiB" in text and "0.88 GiB" in text


def test_run_case_on_cpu(monkeypatch):
    """core.run_case on the tiny VAE, the GPU timer and torch.compile's compile stubbed out: no peak off the GPU."""
    monkeypatch.setattr(core, "time_ms", lambda fn, timing=None: 2.0)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    case = vae.VAEDecodeCase("tiny", batch=1, size=4, dtype=torch.float32, backend="reference")
    rec = core.run_case(case, CPU, core.QUICK_TIMING, core.Ceilings(1.0, 1.0))
    assert {r.variant: r.status for r in rec.results} == dict(
        zip(VARIANTS, ["ok", "ok", "ok", "skipped", "skipped", "skipped"])
    )
    assert rec.result(GENKERNELS).vs_compile == 1.0 and rec.params["peak_memory_gib"] == {}
    assert [g.passed for g in _model.goals(rec, vae.VAEDecodeCase)] == [False, True, None]
