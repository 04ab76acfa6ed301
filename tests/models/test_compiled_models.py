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


def _tiny_image_gpt(**kwargs) -> ImageGPT:
    """A float64 ImageGPT of L = 4 tokens: no draw can flip between paths by rounding, and the steps trace fast."""
    torch.manual_seed(0)
    config = {"image_size": 2, "levels": 5, "num_classes": 3, "dim": 16, "depth": 2, "heads": 2, **kwargs}
    return _perturbed(ImageGPT(**config, backend="reference")).double().eval()


IMAGE_GPT_VARIANTS = [{}, {"torch_layers": True}, {"positions": "learned", "num_classes": 0}]


@pytest.mark.parametrize("kwargs", IMAGE_GPT_VARIANTS)
def test_image_gpt_sampling_compiles_with_and_without_the_cache(kwargs):
    """torch.compile(model.sample_tokens) with the KV cache crashed inside AOTAutograd ("incorrect out shape after
    application of ViewMeta sequence"): the projection into the cache's rows used an out= with gaps, which dynamo
    refuses, and the graph after that break returned views of two aliased inputs (the rows and the cache's buffer).
    Compiled, the cached and the uncached paths draw the eager tokens, token for token, seed after seed, with one
    graph break at most: the seeded draw of the uniforms (a labels tensor's range check, a read, is skipped when
    traced)."""
    model = _tiny_image_gpt(**kwargs)
    labels = None if model.config.num_classes == 0 else torch.tensor([2, 0, 1])
    sample = dict(labels=labels, temperature=0.8, top_k=3)
    compiled = torch.compile(model.sample_tokens, backend="aot_eager")
    for seed in (1, 2):
        want = model.sample_tokens(3, **sample, seed=seed)
        assert torch.equal(model.sample_tokens(3, **sample, seed=seed, use_cache=False), want)
        for use_cache in (True, False):
            assert torch.equal(compiled(3, **sample, seed=seed, use_cache=use_cache), want), (seed, use_cache)
    for use_cache in (True, False):
        explained = torch._dynamo.explain(model.sample_tokens)(3, **sample, seed=1, use_cache=use_cache)
        assert explained.graph_break_count <= 1, explained.break_reasons


@pytest.mark.parametrize("kwargs", IMAGE_GPT_VARIANTS)
def test_image_gpt_cached_decoding_step_traces_in_one_graph(kwargs):
    """The cause of the crash above: a cached decoding step (embedding, every layer with its cache, the logits and
    the draw into the tokens buffer) must trace without a graph break; the out= writes into strided views (the
    cache's rows, a column of the tokens) broke it. Compiled with fullgraph=True, the steps give the eager tokens."""
    from genkernels.models.transformer import _Decoder

    model = _tiny_image_gpt(**kwargs)
    decoder = _Decoder(model, None, 3, 0.8, 3, torch.device("cpu"), graphed=False)
    labels = torch.tensor([0, 2, 1]) % max(model.config.num_classes, 1)
    u = 1 - torch.rand(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = decoder.run(labels, u)
    decoder.tokens.zero_()
    for cache in decoder.caches:
        cache.reset()
    step = torch.compile(model._decode_step, fullgraph=True, backend="eager")
    with torch.no_grad():
        for t in range(model.config.seq_len):
            step(t, decoder)
    assert torch.equal(decoder.tokens, want)


def test_image_gpt_sample_with_fullgraph_names_the_seeded_draw():
    """The uniforms come from a seeded CPU torch.Generator, which dynamo cannot trace: fullgraph=True cannot hold,
    and the error names that draw (it said "an opaque object was created in the middle of the program")."""
    import inspect

    model = _tiny_image_gpt()
    takes_reason = "reason" in inspect.signature(torch.compiler.disable).parameters
    match = "seeded CPU torch.Generator" if takes_reason else "disable"
    with pytest.raises(torch._dynamo.exc.Unsupported, match=match):
        torch.compile(model.sample, fullgraph=True, backend="eager")(2, seed=0)
