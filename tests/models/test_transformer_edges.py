"""ImageGPT at the edges of its public arguments: what users pass to forward and sample."""

from __future__ import annotations

import pytest
import torch

from genkernels.models.transformer import ImageGPT
from tests.criterion import assert_criterion

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kwargs) -> ImageGPT:
    torch.manual_seed(kwargs.pop("seed", 0))
    kwargs = {"image_size": 2, "levels": 5, "num_classes": 3, "dim": 16, "depth": 1, "heads": 2, **kwargs}
    return ImageGPT(**kwargs, backend="reference").eval()


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("temperature", [1e-46, 1e-100, 5e-324])
def test_temperature_below_the_logits_dtype_range_is_greedy(temperature, top_k):
    """A positive temperature that rounds to zero in the draw's float32 arithmetic divided 0 by 0 at the best token:
    NaN probabilities, and the last token was drawn everywhere. Its limit is greedy decoding."""
    model = tiny()
    greedy = model.sample_tokens(3, temperature=0)
    assert torch.equal(model.sample_tokens(3, temperature=temperature, top_k=top_k, seed=1), greedy)
    logits = torch.randn(6, 5)
    u = 1 - torch.rand(6, dtype=torch.float64)
    assert torch.equal(model._draw(logits, u, temperature, top_k), logits.argmax(-1))


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_forward_and_sampling_under_autocast(positions):
    """Under torch.autocast the blocks' branches come out of their matrix products in bfloat16 while the residual
    stream stays float32: the fused residual-norm refused the pair ("y must have x's dtype"). The model now adds
    them as its PyTorch twin does (in the stream's dtype), within the criterion of the twin under autocast."""
    model = tiny(positions=positions, depth=2)
    twin = ImageGPT(model.config, torch_layers=True).eval()
    twin.load_state_dict(model.state_dict())
    tokens, labels = torch.randint(0, 5, (2, 4)), torch.tensor([0, 2])
    truth = ImageGPT(model.config, backend="reference").double().eval()
    truth.load_state_dict(model.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, want = model(tokens, labels), twin(tokens, labels)
        for use_cache in (True, False):  # the two paths round differently under autocast: no equality asked
            tokens_drawn = model.sample_tokens(3, seed=2, use_cache=use_cache)
            assert tokens_drawn.shape == (3, 4) and 0 <= tokens_drawn.min() and tokens_drawn.max() < 5
        model.train()
        model.loss(torch.rand(2, 1, 2, 2) * 2 - 1, labels).backward()
    assert_criterion(logits, want, truth(tokens, labels), "logits")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
def test_labels_must_be_an_integer_tensor(dtype):
    """A bool tensor was taken for classes 1 / 0 (while labels=True is refused) and a complex one crashed in
    torch.min ("min_all" not implemented): both are refused by name, by forward and by sample alike."""
    model = tiny()
    labels = torch.tensor([1, 0]).to(dtype)
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \(2,\)"):
        model(torch.zeros(2, 3, dtype=torch.long), labels)
    with pytest.raises(ValueError, match=r"labels must be None, an int or an integer tensor of shape \(2,\)"):
        model.sample(2, labels=labels)
    assert model.sample(2, labels=labels.to(torch.uint8) if dtype == torch.bool else 1, seed=0).shape == (2, 1, 2, 2)


def test_forward_names_tokens_that_are_not_a_tensor():
    """A nested list of tokens failed with "'list' object has no attribute 'dim'"."""
    with pytest.raises(TypeError, match=r"tokens must be an int64 torch.Tensor \(B, T\), got list"):
        tiny()([[0, 1]], torch.tensor([0]))


def test_graph_key_follows_cuda_autocast(monkeypatch):
    """Graphs captured under CUDA autocast replay its casts: a call outside autocast (or under another dtype) must
    not reuse them, so the decoder's key holds autocast's state."""
    from genkernels.models.transformer import _Decoder

    model = tiny()
    plain = _Decoder.key_of(model, 3, 1.0, None)
    assert plain == _Decoder.key_of(model, 3, 1.0, None)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    for dtype in (torch.bfloat16, torch.float16):
        monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type, dtype=dtype: dtype)
        key = _Decoder.key_of(model, 3, 1.0, None)
        assert key != plain and key[-1] == dtype


def test_quantize_refuses_integer_and_nan_images():
    """uint8 images in 0..255 all clamped to the top level, and NaN became an out-of-range token that loss()
    reported as "tokens must be in [0, levels)"."""
    model = tiny()
    with pytest.raises(TypeError, match=r"images must be a floating-point tensor in \[-1, 1\], got torch.uint8"):
        model.quantize(torch.full((2, 1, 2, 2), 200, dtype=torch.uint8))
    images = torch.zeros(2, 1, 2, 2)
    images[1, 0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="images hold NaN"):
        model.loss(images, torch.tensor([0, 1]))
    assert torch.equal(
        model.quantize(torch.tensor([-1.0, -0.5, 0.5, 1.0]).view(1, 1, 2, 2)), torch.tensor([[0, 1, 3, 4]])
    )


@pytest.mark.parametrize("cuda_graph", [1, 0, 1.0])
def test_cuda_graph_must_be_a_bool(cuda_graph):
    """cuda_graph=1 passed the check (1 == True) and then failed as "cuda_graph=True needs ..." (and, on a GPU, 0 and 1
    stood for False and True) while use_cache=1 is refused: both flags take True, False (and None) only."""
    with pytest.raises(ValueError, match=rf"cuda_graph must be None, True or False, got {cuda_graph!r}"):
        tiny().sample(2, cuda_graph=cuda_graph)


@pytest.mark.parametrize("convert", [lambda m: m.double(), lambda m: m.to(torch.float64)], ids=["double", "to"])
def test_float64_model_rotates_with_float64_tables(convert):
    """A float64 ImageGPT rotated its queries and keys with float32 tables widened to float64 (errors of ~3e-8 in cos
    and sin, where float64 rounding is ~1e-16); converted, it holds the tables computed in float64, and the cached
    and uncached paths still draw the same tokens."""
    model = convert(tiny(image_size=4))
    cfg = model.config
    j = torch.arange(cfg.dim_head // 2, dtype=torch.float64)
    angles = torch.arange(cfg.seq_len, dtype=torch.float64)[:, None] * cfg.rope_base ** (-2 * j / cfg.dim_head)
    assert model.rotary.cos.dtype == model.rotary.sin.dtype == torch.float64
    assert (model.rotary.cos - angles.cos()).abs().max() < 1e-14
    assert (model.rotary.sin - angles.sin()).abs().max() < 1e-14
    cached = model.sample_tokens(3, seed=4)
    assert torch.equal(model.sample_tokens(3, seed=4, use_cache=False), cached)


def test_graph_key_follows_backend_choice_and_matmul_precision(monkeypatch):
    """Kept graphs replay the kernels chosen when they were captured: a call inside ``genkernels.backend(...)``
    (or with GENKERNELS_BACKEND set) after one on auto replayed auto's kernels, and a call after
    ``torch.set_float32_matmul_precision`` the products of the old precision. The key holds both."""
    import genkernels
    from genkernels.models.transformer import _Decoder

    model = tiny()
    plain = _Decoder.key_of(model, 3, 1.0, None)
    keys = {plain}
    for name, ops in (("reference", None), ("triton", None), ("reference", "attention")):
        with genkernels.backend(name, ops=ops):
            key = _Decoder.key_of(model, 3, 1.0, None)
            assert key == _Decoder.key_of(model, 3, 1.0, None)
        keys.add(key)
    monkeypatch.setenv("GENKERNELS_BACKEND", "cuda")
    keys.add(_Decoder.key_of(model, 3, 1.0, None))
    monkeypatch.delenv("GENKERNELS_BACKEND")
    assert _Decoder.key_of(model, 3, 1.0, None) == plain
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high" if precision == "highest" else "highest")
        keys.add(_Decoder.key_of(model, 3, 1.0, None))
    finally:
        torch.set_float32_matmul_precision(precision)
    assert len(keys) == 6


class _ReplayStep:
    """A captured decoding step's CUDA graph on the CPU: replay() runs step t again on the decoder's buffers, with
    the backend choices of the capture (its contextvars), as a graph replays the kernels it recorded."""

    def __init__(self, decoder, t: int, context) -> None:
        self.decoder, self.t, self.context = decoder, t, context

    def replay(self) -> None:
        if self.t == 0:
            for cache in self.decoder.caches:
                cache.reset()
        self.context.run(self.decoder.model._decode_step, self.t, self.decoder)


@pytest.fixture
def fake_graphs(monkeypatch):
    """ImageGPT's graphed sampling on the CPU: the capture makes one _ReplayStep a step; yields the decoders made."""
    import contextvars

    from genkernels.models.transformer import _Decoder

    made = []

    def capture(self, device) -> None:
        context = contextvars.copy_context()
        self.graphs = [_ReplayStep(self, t, context) for t in range(self.model.config.seq_len)]
        made.append(self)

    monkeypatch.setattr(_Decoder, "_capture", capture)
    return made


def _graphed(model, n, labels, seed, temperature=1.0, top_k=None):
    """What sample_tokens does on a CUDA device with the cache and graphs, on the CPU (fake_graphs)."""
    from genkernels.models.transformer import _uniforms

    return model._sample_graphed(
        n, temperature, top_k, torch.device("cpu"), labels, _uniforms(n, model.config.seq_len, seed)
    )


def test_kept_graphs_serve_only_the_arguments_they_were_captured_for(fake_graphs):
    """Graphed sampling keeps its graphs for the next call with the same batch size, temperature, top_k and backend
    choice, captures new ones for other arguments (tokens of a plain call every time) and again after
    release_graphs."""
    import genkernels

    model = tiny(image_size=2)
    calls = [
        (3, dict()),
        (3, dict()),
        (2, dict()),
        (2, dict(temperature=0.5)),
        (2, dict(temperature=0.5, top_k=2)),
        (2, dict(temperature=0.5, top_k=2)),
        (3, dict()),
    ]
    for n, kwargs in calls:
        labels = torch.arange(n) % 3
        want = model.sample_tokens(n, labels, seed=n, cuda_graph=False, **kwargs)
        assert torch.equal(_graphed(model, n, labels, n, **kwargs), want)
    assert len(fake_graphs) == 5 and model._decoder is fake_graphs[-1]
    with genkernels.backend("reference", ops="attention"):  # auto's graphs replay auto's kernels: new ones
        assert torch.equal(_graphed(model, 3, torch.arange(3), 1), model.sample_tokens(3, seed=1, cuda_graph=False))
    assert len(fake_graphs) == 6
    model.release_graphs()
    assert model._decoder is None
    assert torch.equal(_graphed(model, 3, torch.arange(3), 1), model.sample_tokens(3, seed=1, cuda_graph=False))
    assert len(fake_graphs) == 7 and model._decoder is fake_graphs[-1]


def test_kept_graphs_captured_in_inference_mode_replay_outside_it(fake_graphs):
    """The decoder that CUDA graphs replay is kept for the next call: made by a call inside torch.inference_mode(),
    its buffers were inference tensors, and the next call outside it failed writing them ("Inplace update to
    inference tensor outside InferenceMode"). It replays in and out of inference mode, with the tokens of a plain
    call."""
    model = tiny(image_size=2)
    labels = torch.tensor([0, 1, 2])
    want = model.sample_tokens(3, labels, seed=5, cuda_graph=False)
    with torch.inference_mode():
        assert torch.equal(_graphed(model, 3, labels, 5), want)
    assert torch.equal(_graphed(model, 3, labels, 5), want)
    with torch.inference_mode():
        assert torch.equal(_graphed(model, 3, labels, 5), want)
    assert len(fake_graphs) == 1


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_rows_tokens_do_not_depend_on_the_batch(use_cache):
    """Row i of a call is drawn with the i-th row of the seeded uniforms and the i-th default label: the first rows
    of a call for 5 sequences are a call for fewer, at every temperature and top_k."""
    model = tiny(image_size=2, levels=7)
    for kwargs in (dict(), dict(temperature=0.7, top_k=3)):
        five = model.sample_tokens(5, seed=9, use_cache=use_cache, **kwargs)
        for n in (1, 2):
            assert torch.equal(model.sample_tokens(n, seed=9, use_cache=use_cache, **kwargs), five[:n])
        assert not torch.equal(five[0], five[3]) or not torch.equal(five[1], five[4])
