"""The UNet-step benchmark on CPU, and through it the whole-model benchmark it shares with the VAE decode
(``genkernels.bench._model``: the case, the summary, the speed goals and the self-check, tested once here;
the VAE's own parts in test_vae_bench.py)."""

from __future__ import annotations

import os

import pytest
import torch

from genkernels.bench import _model, core, unet, vae
from genkernels.bench._model import GENKERNELS, GRAPH, VARIANTS
from genkernels.models import UNet
from genkernels.models.diffusion import TorchAttention, TorchGroupNormSiLU, with_torch_layers
from genkernels.nn import Attention, GroupNorm

CPU = torch.device("cpu")


def test_torch_layers_compute_the_same_function():
    model, twin = unet.build_models(unet._config("tiny"), CPU, torch.float64)
    model.set_backend("reference")
    assert twin.torch_layers and not model.torch_layers
    assert twin.conv_out.weight is model.conv_out.weight  # shared, not copied
    kinds = {type(m) for m in twin.modules()}
    assert TorchGroupNormSiLU in kinds and TorchAttention in kinds and torch.nn.GroupNorm in kinds
    assert not any(isinstance(m, GroupNorm) for m in twin.modules())
    assert not any(isinstance(m, Attention) and not isinstance(m, TorchAttention) for m in twin.modules())
    args = unet.make_inputs(unet._config("tiny"), 2, 8, 5, torch.float64, CPU)
    out, out_twin = unet.step(model, *args), unet.step(twin, *args)
    assert out.abs().max() > 0.1  # the output layer was re-drawn: the whole network shows
    torch.testing.assert_close(out_twin, out, rtol=1e-12, atol=1e-12)
    # The construction option loads the genkernels model's state_dict unchanged (same names).
    built = UNet(model.config, torch_layers=True).double()
    built.load_state_dict(model.state_dict())
    assert built.state_dict().keys() == model.state_dict().keys()
    torch.testing.assert_close(unet.step(built, *args), out, rtol=1e-12, atol=1e-12)
    # In-place dtype changes of either model reach the other (shared parameters).
    model.float()
    assert twin.conv_in.weight.dtype == torch.float32
    twin.set_backend("triton")  # no genkernels op in it: nothing to pin, nothing raises
    assert with_torch_layers(model).training == model.training


def test_cases_and_flops():
    (case,) = unet.cases()
    (quick,) = unet.cases(quick=True)
    assert quick.label == case.label
    assert case.variant_names() == list(VARIANTS)
    assert VARIANTS == (core.EAGER, core.COMPILE, GENKERNELS, GRAPH, _model.EAGER_GRAPH, _model.COMPILE_GRAPH)
    assert case.params["latent"] == [4, 64, 64] and case.params["context"] == [77, 768]
    assert case.params["batch"] == 2 and case.params["dtype"] == "bf16" and case.params["config"] == "sd_like"
    assert case.unit == "TFLOP/s" and "TFLOP per step" in case.rate_note
    # SD 1.x at 64x64: about 0.8 TFLOP per sample in convolutions, linear layers and attention.
    assert 1.5e12 < case.work < 1.7e12
    one = unet.UNetCase("tiny", batch=1, size=8, context_len=5).work
    assert unet.UNetCase("tiny", batch=2, size=8, context_len=5).work == 2 * one > 0


# --------------------------------------------------------------------------- the shared whole-model benchmark


def test_case_end_to_end_on_cpu():
    """The tiny UNet in bf16 through prepare and the variants, without timing: the models share the weights,
    the criterion holds for eager and genkernels, the CUDA graph variant says why it cannot run, a wrong
    output fails, and nothing measures peak memory."""
    case = unet.UNetCase("tiny", batch=2, size=8, context_len=5, backend="reference")
    case.prepare(CPU)
    try:
        assert case._state["model_torch"].conv_out.weight is case._state["model"].conv_out.weight
        (exp,) = case.expected()
        assert exp.truth.dtype == torch.float32 and exp.bound > core.FLOOR[torch.bfloat16]
        for name in (core.EAGER, GENKERNELS):
            v = case.variant(name)
            assert v.skip is None and v.strict and v.first_call_s is not None
            assert core.compare(v.fn(), case.expected()).ok, name
        graph = case.variant(GRAPH)
        assert graph.fn is None and "CUDA" in graph.skip
        assert not core.compare([exp.truth + 2 * exp.bound], case.expected()).ok
        with pytest.raises(ValueError, match="unknown variant"):
            case.variant("cuda")
    finally:
        case.release()
    assert case.peaks == {} and "peak_memory_gib" not in case.params


def model_record(case: _model.ModelCase, ms: dict[str, float | None]) -> core.CaseRecord:
    """``case``'s record with an "ok" result of ``ms[name]`` milliseconds per variant, "failed" where None."""
    rec = core.record_of(case)
    for name in VARIANTS:
        role = "genkernels" if name in _model.GK_VARIANTS else "baseline"
        if ms.get(name) is None:
            rec.results.append(core.Result(name, role, "failed", "build raised RuntimeError: out of memory"))
        else:
            first = 50.0 if name == core.COMPILE else 1.0
            rec.results.append(core.Result(name, role, "ok", ms=ms[name], first_call_s=first))
    core.add_speedups(rec)
    return rec


@pytest.mark.parametrize(
    ("ms", "passed", "best"),
    [
        ({core.EAGER: 36.0, core.COMPILE: 13.0, GENKERNELS: 20.0, GRAPH: 12.0}, [True, True], GRAPH),
        ({core.EAGER: 36.0, core.COMPILE: 13.0, GENKERNELS: 25.0, GRAPH: 30.0}, [True, False], GENKERNELS),
        ({core.EAGER: 36.0, core.COMPILE: 13.0, GENKERNELS: 30.0, GRAPH: 29.0}, [False, False], GRAPH),
        ({core.EAGER: 36.0, GENKERNELS: 20.0}, [True, None], GENKERNELS),
        ({core.EAGER: 36.0, core.COMPILE: 13.0}, [None, None], None),
    ],
)
def test_goals_and_summary(ms, passed, best):
    summary = unet.summarize([model_record(unet.cases()[0], ms)])
    assert [g.passed for g in summary.goals] == passed
    assert [g.target for g in summary.goals] == [">= 1.3x (floor for resolving)", ">= 1.0x"]
    assert summary.goals[0].name == "UNet step, genkernels vs eager"
    for goal in summary.goals:
        if goal.passed is None:
            assert goal.measured.startswith("unmeasured")
        else:
            assert f"({best} vs " in goal.measured
    assert ("; vs eager: " in summary.goals[0].measured) == (GRAPH in ms and summary.goals[0].passed is not None)
    assert summary.headers == ["variant", "ms", "vs eager", "vs torch.compile", "first call s"]
    rows = {r[0]: r for r in summary.rows}
    assert list(rows) == list(VARIANTS)
    assert rows[core.EAGER][1:] == ["36.00", "-", _fmt_x(36.0, ms.get(core.COMPILE)), "1.0"]
    if ms.get(core.COMPILE) is None:
        assert rows[core.COMPILE][1:] == ["failed", "n/a", "n/a", "n/a"]


def _fmt_x(mine: float, other: float | None) -> str:
    return "n/a" if other is None else f"{other / mine:.2f}x"


@pytest.mark.parametrize(("module", "what"), [(unet, "tiny UNet step"), (vae, "tiny VAE decode")])
def test_self_check_on_cpu(module, what):
    check = module.self_check("reference")
    assert check.status == "ok" and check.detail.startswith(f"{what}, fp32, batch 2, 8x8 latent vs"), check.detail
    skipped = module.self_check("cuda")
    assert skipped.status == "skipped" and "cuda" in skipped.detail


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="triton runs on CPU only under its interpreter")
@pytest.mark.parametrize("module", [unet, vae])
def test_self_check_triton_interpreted(module):
    pytest.importorskip("triton")
    check = module.self_check("triton")
    assert check.status == "ok", check.detail


def test_summary_without_a_record():
    summary = unet.summarize([])
    assert [g.passed for g in summary.goals] == [None, None]
    assert all(r[1:] == ["not run", "n/a", "n/a", "n/a"] for r in summary.rows)
