"""Sampling with the model replayed from a CUDA graph (sample_diffusion's cuda_graph, genkernels._graphs).

On a machine without a GPU the capture is stood in for by a graph whose replay runs the captured function
again on the static input buffers and writes the results into the outputs of the capture, as a CUDA graph's
replay rewrites them in place: what the sampling loop sees of a graph (static inputs, outputs rewritten at
every replay) is then the same as on a GPU, so a step that kept an output past the next replay shows. The
gpu-marked test captures for real.
"""

from __future__ import annotations

import pytest
import torch

from genkernels import _graphs, train
from genkernels.models import DiT, DiTConfig, UNet, UNetConfig
from tests.criterion import assert_criterion


def _tensors(out):
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


class _ReplayGraph:
    """A CUDA graph's behaviour on the CPU: replay() runs the captured function again and copies its outputs
    into the tensors the capture returned."""

    def __init__(self, fn, out) -> None:
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self) -> None:
        for kept, new in zip(_tensors(self.out), _tensors(self.fn())):
            kept.copy_(new)
        self.replays += 1


@pytest.fixture
def fake_graphs(monkeypatch):
    """CUDA graphs stood in for on the CPU; yields the list of graphs captured."""
    graphs = []

    def capture(fn, warmups=2):
        for _ in range(warmups):
            fn()
        out = fn()
        graphs.append(_ReplayGraph(fn, out))
        return graphs[-1], out

    monkeypatch.setattr(_graphs, "capture", capture)
    monkeypatch.setattr(_graphs, "available", lambda device: True)
    return graphs


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter drawn at random (the zero-initialized output layers included), so that outputs depend on
    every input."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model.eval()


def _model(backbone: str) -> torch.nn.Module:
    if backbone == "dit":
        return _randomized(DiT(DiTConfig.tiny(num_classes=3), backend="reference"))
    return _randomized(UNet(UNetConfig.tiny(num_classes=3), backend="reference"))


def _meta(objective: str) -> dict:
    return {"objective": objective, "schedule": train.Schedule().__dict__, "image_shape": [1, 8, 8]}


SAMPLERS = [(s, "flow" if s == "flow" else "eps") for s in sorted(train.SAMPLERS)]


@pytest.mark.parametrize("backbone", ["dit", "unet"])
@pytest.mark.parametrize("sampler,objective", SAMPLERS)
@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_graphed_sampling_equals_plain(fake_graphs, backbone, sampler, objective, guidance):
    """The same images with and without the graph, every sampler, with and without guidance; every step's model
    output from a replay."""
    model, labels, steps = _model(backbone), torch.tensor([0, 2, 3]), 4
    kwargs = dict(sampler=sampler, steps=steps, guidance=guidance, seed=3)
    plain = train.sample_diffusion(model, _meta(objective), labels, cuda_graph=False, **kwargs)
    assert not fake_graphs
    graphed = train.sample_diffusion(model, _meta(objective), labels, cuda_graph=True, **kwargs)
    assert len(fake_graphs) == 1 and fake_graphs[0].replays == steps  # every step from the graph
    torch.testing.assert_close(graphed, plain, rtol=0, atol=0)


def test_auto_captures_from_graph_min_steps(fake_graphs):
    model, meta, labels = _model("dit"), _meta("eps"), torch.tensor([1])
    train.sample_diffusion(model, meta, labels, sampler="ddim", steps=train.GRAPH_MIN_STEPS - 1)
    assert not fake_graphs
    train.sample_diffusion(model, meta, labels, sampler="ddim", steps=train.GRAPH_MIN_STEPS)
    assert len(fake_graphs) == 1 and fake_graphs[0].replays == train.GRAPH_MIN_STEPS


def test_auto_is_plain_on_cpu(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("captured on the CPU")

    monkeypatch.setattr(_graphs, "capture", refuse)
    model = _model("dit")
    x = train.sample_diffusion(model, _meta("eps"), torch.tensor([1]), sampler="ddim", steps=train.GRAPH_MIN_STEPS)
    assert x.shape == (1, 1, 8, 8) and torch.isfinite(x).all()


def test_cuda_graph_argument_errors():
    model, meta, labels = _model("dit"), _meta("eps"), torch.tensor([1])
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device, got one on cpu"):
        train.sample_diffusion(model, meta, labels, sampler="ddim", steps=2, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph must be None, True or False, got 'yes'"):
        train.sample_diffusion(model, meta, labels, sampler="ddim", steps=2, cuda_graph="yes")


def test_failed_capture(monkeypatch):
    """Auto: a warning naming the error, then the plain loop's images; cuda_graph=True: the error itself."""

    def fail(fn, warmups=2):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(_graphs, "capture", fail)
    monkeypatch.setattr(_graphs, "available", lambda device: True)
    model, meta, labels = _model("unet"), _meta("eps"), torch.tensor([0, 1])
    kwargs = dict(sampler="dpm++", steps=train.GRAPH_MIN_STEPS, seed=5)
    plain = train.sample_diffusion(model, meta, labels, cuda_graph=False, **kwargs)
    with pytest.warns(RuntimeWarning, match="could not be captured in a CUDA graph .*stream is capturing"):
        auto = train.sample_diffusion(model, meta, labels, **kwargs)
    torch.testing.assert_close(auto, plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="stream is capturing"):
        train.sample_diffusion(model, meta, labels, cuda_graph=True, **kwargs)


def test_graphed_call(fake_graphs):
    calls = []

    def fn(a, b):
        calls.append(1)
        return a * b, a + b

    example = (torch.ones(3), torch.full((3,), 2.0))
    call = _graphs.GraphedCall(fn, example)
    assert len(calls) == 3  # two warm-up calls and the captured one
    first = call(torch.arange(3.0), torch.full((3,), 3.0))
    second = call(torch.ones(3), torch.ones(3))
    torch.testing.assert_close(first, (torch.tensor([0.0, 3.0, 6.0]), torch.tensor([3.0, 4.0, 5.0])))
    torch.testing.assert_close(second, (torch.ones(3), torch.full((3,), 2.0)))  # first kept: copies
    with pytest.raises(ValueError, match=r"input 1 must be \(3,\) torch.float32 on cpu as at capture, got \(4,\)"):
        call(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="input 0 must be .* got \\(3,\\) torch.float64"):
        call(torch.ones(3, dtype=torch.float64), torch.ones(3))
    with pytest.raises(ValueError, match="captured with 2 inputs, got 1"):
        call(torch.ones(3))
    with pytest.raises(TypeError, match="example must hold tensors only"):
        _graphs.GraphedCall(fn, (torch.ones(3), 2.0))
    with pytest.raises(TypeError, match="fn must return a tensor or a tuple of tensors, got dict"):
        _graphs.GraphedCall(lambda a: {"a": a}, (torch.ones(3),))


@pytest.mark.gpu
@pytest.mark.parametrize("backbone", ["dit", "unet"])
@pytest.mark.parametrize("sampler,objective", [("dpm++", "eps"), ("flow", "flow")])
def test_cuda_graph_sampling_on_gpu(backbone, sampler, objective):
    """A real capture: the images of the graphed loop against the plain loop's, on the default backends (the
    graph's auto choices may take other kernels than the plain calls': the criterion, float32)."""
    model = _model(backbone).cuda()
    model.set_backend(None)
    labels = torch.tensor([0, 2, 3])
    kwargs = dict(sampler=sampler, steps=train.GRAPH_MIN_STEPS, guidance=2.0, seed=7)
    plain = train.sample_diffusion(model, _meta(objective), labels, cuda_graph=False, **kwargs)
    graphed = train.sample_diffusion(model, _meta(objective), labels, cuda_graph=True, **kwargs)
    reference = train.sample_diffusion(model.double(), _meta(objective), labels, cuda_graph=False, **kwargs)
    assert_criterion(graphed, plain, reference)
