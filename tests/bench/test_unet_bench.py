"""The UNet-step benchmark on CPU: the PyTorch-layer twin, the case, goals, reports and the self-check."""

from __future__ import annotations

import json
import os

import pytest
import torch

from genkernels.bench import core, report, unet
from genkernels.models import UNet
from genkernels.models.diffusion import TorchAttention, TorchGroupNormSiLU, with_torch_layers
from genkernels.nn import Attention, GroupNorm

CPU = torch.device("cpu")


def _tiny_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return unet.make_inputs(unet._config("tiny"), 2, 8, 5, dtype, CPU)


def test_torch_layers_compute_the_same_function():
    model, twin = unet.build_models(unet._config("tiny"), CPU, torch.float64)
    model.set_backend("reference")
    assert twin.torch_layers and not model.torch_layers
    assert twin.conv_out.weight is model.conv_out.weight  # shared, not copied
    kinds = {type(m) for m in twin.modules()}
    assert TorchGroupNormSiLU in kinds and TorchAttention in kinds and torch.nn.GroupNorm in kinds
    assert not any(isinstance(m, GroupNorm) for m in twin.modules())
    assert not any(isinstance(m, Attention) and not isinstance(m, TorchAttention) for m in twin.modules())
    args = _tiny_inputs(torch.float64)
    out, out_twin = unet._step(model, *args), unet._step(twin, *args)
    assert out.abs().max() > 0.1  # the output layer was re-drawn: the whole network shows
    torch.testing.assert_close(out_twin, out, rtol=1e-12, atol=1e-12)
    # The construction option loads the genkernels model's state_dict unchanged (same names).
    built = UNet(model.config, torch_layers=True).double()
    built.load_state_dict(model.state_dict())
    assert built.state_dict().keys() == model.state_dict().keys()
    torch.testing.assert_close(unet._step(built, *args), out, rtol=1e-12, atol=1e-12)
    # In-place dtype changes of either model reach the other (shared parameters).
    model.float()
    assert twin.conv_in.weight.dtype == torch.float32
    twin.set_backend("triton")  # no genkernels op in it: nothing to pin, nothing raises
    assert with_torch_layers(model).training == model.training


def test_cases_and_flops():
    (case,) = unet.cases()
    (quick,) = unet.cases(quick=True)
    assert quick.label == case.label
    assert case.variant_names() == [core.EAGER, core.COMPILE, unet.GENKERNELS, unet.GRAPH]
    assert case.params["latent"] == [4, 64, 64] and case.params["context"] == [77, 768]
    assert case.params["batch"] == 2 and case.params["dtype"] == "bf16" and case.params["config"] == "sd_like"
    assert case.unit == "TFLOP/s" and "TFLOP" in case.rate_note
    # SD 1.x at 64x64: about 0.8 TFLOP per sample in convolutions, linear layers and attention.
    assert 1.5e12 < case.work < 1.7e12
    one = unet.step_flops("tiny", 1, 8, 5)
    assert unet.step_flops("tiny", 2, 8, 5) == 2 * one > 0


def test_case_end_to_end_on_cpu():
    """The tiny UNet in bf16 through prepare and the variants, without timing: the criterion holds for
    eager and genkernels, the CUDA graph variant says why it cannot run, a wrong output fails."""
    case = unet.UNetCase("tiny", batch=2, size=8, context_len=5, backend="reference")
    case.prepare(CPU)
    try:
        (exp,) = case.expected()
        assert exp.truth.dtype == torch.float32 and exp.bound > core.FLOOR[torch.bfloat16]
        for name in (core.EAGER, unet.GENKERNELS):
            v = case.variant(name)
            assert v.skip is None and v.strict and v.first_call_s is not None
            assert core.compare(v.fn(), case.expected()).ok, name
        graph = case.variant(unet.GRAPH)
        assert graph.fn is None and "CUDA" in graph.skip
        assert not core.compare([exp.truth + 2 * exp.bound], case.expected()).ok
    finally:
        case.release()


def _record(ms: dict[str, float | None]) -> core.CaseRecord:
    rec = core.record_of(unet.cases()[0])
    for name in unet.VARIANTS:
        role = "genkernels" if name in unet.GK_VARIANTS else "baseline"
        value = ms.get(name)
        if value is None:
            rec.results.append(core.Result(name, role, "failed", "build raised RuntimeError: out of memory"))
        else:
            first = 50.0 if name == core.COMPILE else 1.0
            rec.results.append(core.Result(name, role, "ok", ms=value, first_call_s=first))
    core.add_speedups(rec)
    return rec


@pytest.mark.parametrize(
    ("ms", "passed", "best"),
    [
        ({core.EAGER: 36.0, core.COMPILE: 13.0, unet.GENKERNELS: 20.0, unet.GRAPH: 12.0}, [True, True], unet.GRAPH),
        ({core.EAGER: 36.0, core.COMPILE: 13.0, unet.GENKERNELS: 25.0, unet.GRAPH: 30.0}, [True, False], "genkernels"),
        ({core.EAGER: 36.0, core.COMPILE: 13.0, unet.GENKERNELS: 30.0, unet.GRAPH: 29.0}, [False, False], unet.GRAPH),
        ({core.EAGER: 36.0, unet.GENKERNELS: 20.0}, [True, None], "genkernels"),
        ({core.EAGER: 36.0, core.COMPILE: 13.0}, [None, None], None),
    ],
)
def test_goals(ms, passed, best):
    summary = unet.summarize([_record(ms)])
    assert [g.passed for g in summary.goals] == passed
    assert summary.goals[0].target.startswith(">= 1.3x") and summary.goals[1].target == ">= 1.0x"
    for goal in summary.goals:
        if goal.passed is None:
            assert goal.measured.startswith("unmeasured")
        else:
            assert f"({best})" in goal.measured
    rows = {r[0]: r for r in summary.rows}
    assert list(rows) == list(unet.VARIANTS)
    assert rows[core.EAGER][1] == "36.00" and rows[core.EAGER][2] == "-"
    if ms.get(core.COMPILE) is None:
        assert rows[core.COMPILE][1] == "failed"


def test_goals_without_a_record():
    summary = unet.summarize([])
    assert [g.passed for g in summary.goals] == [None, None]
    assert all(r[1] == "not run" for r in summary.rows)


def test_reports(tmp_path):
    rec = _record({core.EAGER: 36.0, core.COMPILE: 13.0, unet.GENKERNELS: 20.0, unet.GRAPH: 12.0})
    rec.floor_ms = core.floor_ms(rec.work, rec.unit, 700.0)
    meta = {"device": "test", "torch": torch.__version__}
    report.write(tmp_path, meta, core.Ceilings(3000.0, 700.0), [rec], [unet.summarize([rec])], with_chart=False)
    data = json.loads((tmp_path / report.JSON_NAME).read_text())
    assert data["cases"][0]["op"] == "unet" and data["cases"][0]["unit"] == "TFLOP/s"
    text = (tmp_path / report.MARKDOWN_NAME).read_text()
    assert "UNet denoising step" in text and "genkernels + CUDA graph" in text


def test_self_check_on_cpu():
    assert unet.self_check("reference").status == "ok"
    skipped = unet.self_check("cuda")
    assert skipped.status == "skipped" and "cuda" in skipped.detail


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="triton runs on CPU only under its interpreter")
def test_self_check_triton_interpreted():
    pytest.importorskip("triton")
    check = unet.self_check("triton")
    assert check.status == "ok", check.detail
