"""The models under torch.compile(fullgraph=True) on the CPU, as the README promises: a compiled call must
trace in one graph and compute what the eager model does (tests/criterion.py, a float64 eager model as the
truth), gradients included.

The compiler backends here are dynamo's "eager" (trace only) and "aot_eager" (trace and autograd, run by
eager ops): what breaks a graph or a backward shows there, without the minutes inductor's code generation
would take on a CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from genkernels.models import DiT, DiTConfig, GANConfig, Generator, ImageGPT, UNet, UNetConfig
from tests.criterion import assert_criterion


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test traces its own code: no compiled frame of another test is reused, none is left behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter moved by N(0, 0.05^2) (zero-initialized layers would hide their paths)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _forward_backward(model: torch.nn.Module, call, inputs: tuple, dtype: torch.dtype):
    """(output, gradients of every parameter and floating input) of sum(call(model, *inputs) * weights)."""
    inputs = tuple(x.to(dtype).requires_grad_(True) if x.is_floating_point() else x for x in inputs)
    model.zero_grad(set_to_none=True)
    out = call(model, *inputs)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads.update({f"input {i}": x.grad for i, x in enumerate(inputs) if x.is_floating_point() and x.grad is not None})
    return out, grads


def _check_compiled(model: torch.nn.Module, call, inputs: tuple) -> None:
    """call(model, *inputs) compiled with fullgraph=True (float32) against the eager float32 and float64 models:
    the output and every gradient."""
    ref64, grads64 = _forward_backward(copy.deepcopy(model).double(), call, inputs, torch.float64)
    ref, grads = _forward_backward(copy.deepcopy(model), call, inputs, torch.float32)
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    out, compiled_grads = _forward_backward(model, compiled, inputs, torch.float32)
    assert_criterion(out, ref, ref64)
    assert compiled_grads.keys() == grads64.keys()
    for name, g in compiled_grads.items():
        assert g is not None, f"no gradient reached {name}"
        assert_criterion(g, grads[name], grads64[name], name, relative_floor=not name.startswith("input"))


def test_dit_with_labels_compiles_in_one_graph_forward_and_backward():
    """Labels were checked against the class count by reading their min and max on CPU tensors: a value read
    while tracing, so fullgraph=True failed on the CPU."""
    model = _perturbed(DiT(DiTConfig.tiny(), backend="reference"))
    x, t, labels = torch.randn(2, 1, 4, 4), torch.tensor([3.0, 500.0]), torch.tensor([1, 10])
    _check_compiled(model, lambda m, x: m(x, t, labels), (x,))


def test_unet_with_labels_compiles_in_one_graph():
    """The UNet's labels pass the same check (its context token); forward only (the DiT test covers autograd)."""
    model = _perturbed(UNet(UNetConfig.tiny(), backend="reference")).eval()
    x, t, labels = torch.randn(2, 1, 4, 4), torch.tensor([3.0, 500.0]), torch.tensor([1, 10])
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True, backend="eager")(x, t, labels)
        ref = model(x, t, labels)
        ref64 = copy.deepcopy(model).double()(x.double(), t, labels)
    assert_criterion(out, ref, ref64)


def test_image_gpt_loss_compiles_in_one_graph_forward_and_backward():
    """loss() checked the images for NaN and the tokens and labels against their ranges by reading values on the
    CPU: three graph breaks, so fullgraph=True failed."""
    model = _perturbed(ImageGPT(image_size=4, dim=16, depth=2, heads=2, backend="reference"))
    images, labels = torch.rand(2, 1, 4, 4) * 2 - 1, torch.tensor([1, 7])
    _check_compiled(model, lambda m, images: m.loss(images, labels), (images,))


def test_generator_compiles_again_for_another_truncation_psi():
    """A second psi makes dynamo trace psi as a symbol, which math.isfinite (the finiteness check) cannot read:
    the second call of a compiled generator with fullgraph=True failed."""
    model = _perturbed(Generator(GANConfig.tiny(8), backend="reference")).eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    z = torch.randn(2, 8)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        for psi in (0.7, 0.5, 1.0):
            out = compiled(z, psi, None, "const")
            assert_criterion(out, model(z, psi, None, "const"), model64(z.double(), psi, None, "const"), f"psi={psi}")
    with pytest.raises(ValueError, match="truncation_psi must be a finite number"):
        model(z, float("nan"))
