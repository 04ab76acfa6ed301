"""The transformer layers (genkernels.nn.transformer) and ImageGPT: formulas, causality, the KV cache, the
PyTorch twin, and sampling with and without the cache giving the same tokens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genkernels.models._layers import with_torch_layers
from genkernels.models.transformer import ImageGPT, ImageGPTConfig
from genkernels.nn.transformer import (
    CausalSelfAttention,
    GeluMLP,
    KVCache,
    LayerNormModulate,
    RotaryEmbedding,
    SwiGLU,
)
from genkernels.ops import rope

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(dim=16, depth=2, heads=2)


def tiny(**kwargs) -> ImageGPT:
    torch.manual_seed(kwargs.pop("seed", 0))
    return ImageGPT(image_size=4, **{**SMALL, **kwargs}).double().eval()


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("rms", [False, True])
def test_layer_norm_modulate_formula(rms):
    torch.manual_seed(0)
    layer = LayerNormModulate(12, eps=1e-5, elementwise_affine=True, rms=rms).double()
    with torch.no_grad():
        layer.weight.normal_()
        if not rms:
            layer.bias.normal_()
    x = torch.randn(2, 5, 12, dtype=torch.float64) * 3 + 1
    shift, scale = torch.randn(2, 12, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)
    if rms:
        n = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.weight
    else:
        n = F.layer_norm(x, (12,), layer.weight, layer.bias, eps=1e-5)
    torch.testing.assert_close(layer(x), n)
    torch.testing.assert_close(layer(x, shift, scale), n * (1 + scale[:, None]) + shift[:, None])
    assert dict(layer.named_parameters()).keys() == ({"weight"} if rms else {"weight", "bias"})
    assert not list(LayerNormModulate(12).parameters())


def test_mlps_formulas():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    swiglu = SwiGLU(8, 6).double()
    a, b = swiglu.fc1(x).chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(x), swiglu.fc2(F.silu(a) * b))
    assert swiglu.fc1.weight.shape == (12, 8) and swiglu.fc1.bias is None
    gelu = GeluMLP(8, 6).double()
    torch.testing.assert_close(gelu(x), gelu.fc2(F.gelu(gelu.fc1(x), approximate="tanh")))


def test_kv_cache_appends_in_place():
    cache = KVCache(2, 3, 5, 4, dtype=torch.float64)
    buffer = cache.qkv
    # One buffer: per position a query slot, the key and the value; k and v are its (B, heads, max_len, dim_head)
    # views, a key row dim_head contiguous elements.
    assert buffer.shape == (2, 5, 3, 3, 4) and cache.max_len == 5
    assert cache.k.shape == cache.v.shape == (2, 3, 5, 4) and cache.k.stride() == (180, 4, 36, 1)
    assert cache.k.data_ptr() == buffer[:, :, 1].data_ptr() and cache.v.data_ptr() == buffer[:, :, 2].data_ptr()
    k1, v1 = torch.randn(2, 3, 2, 4, dtype=torch.float64), torch.randn(2, 3, 2, 4, dtype=torch.float64)
    k2, v2 = torch.randn(2, 3, 1, 4, dtype=torch.float64), torch.randn(2, 3, 1, 4, dtype=torch.float64)
    cache.append(k1, v1)
    k, v = cache.append(k2, v2)
    assert cache.length == 3 and cache.qkv is buffer and k.data_ptr() == cache.k.data_ptr()
    torch.testing.assert_close(k, torch.cat([k1, k2], 2), rtol=0, atol=0)
    torch.testing.assert_close(v, torch.cat([v1, v2], 2), rtol=0, atol=0)
    torch.testing.assert_close(buffer[:, :3, 1].transpose(1, 2), k, rtol=0, atol=0)
    assert not buffer[:, :, 0].any() and not buffer[:, 3:].any()  # query slots and later positions untouched
    with pytest.raises(ValueError, match="the cache holds 5 positions; appending 3 to 3"):
        cache.append(torch.zeros(2, 3, 3, 4), torch.zeros(2, 3, 3, 4))
    with pytest.raises(ValueError, match=r"k and v must be \(B, heads, l, dim_head\) = \(2, 3, l, 4\)"):
        cache.append(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4))
    with pytest.raises(ValueError, match="the cache holds 5 positions; appending 3 to 3"):
        cache.next_rows(3)
    rows = cache.next_rows(2)
    assert rows.shape == (2, 2, 3, 3, 4) and rows.data_ptr() == buffer[:, 3].data_ptr()
    # commit: the rows written in place are held, nothing copied (the version does not move).
    rows[:, :, 1], rows[:, :, 2] = 7.0, 8.0
    version = buffer._version
    k, v = cache.commit(2)
    assert cache.length == 5 and buffer._version == version and k.shape == v.shape == (2, 3, 5, 4)
    assert (k[:, :, 3:] == 7).all() and (v[:, :, 3:] == 8).all()
    torch.testing.assert_close(k[:, :, :3], torch.cat([k1, k2], 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="the cache holds 5 positions; appending 1 to 5"):
        cache.commit(1)
    cache.reset()
    assert cache.length == 0
    # A key written into its slot first (rope(..., k_out=slot), or a projection into next_rows) is not copied
    # again: the buffer's version (shared by its views) grows by one, the copy of v.
    k_slot, v_slot = cache.next_slots(2)
    assert k_slot.data_ptr() == cache.k.data_ptr() and v_slot.shape == (2, 3, 2, 4)
    k_slot.copy_(k1)
    version = buffer._version
    k, v = cache.append(k_slot, v1)
    assert buffer._version == version + 1
    torch.testing.assert_close(k, k1, rtol=0, atol=0)
    torch.testing.assert_close(v, v1, rtol=0, atol=0)
    with pytest.raises(ValueError, match="the cache holds 5 positions; appending 4 to 2"):
        cache.next_slots(4)
    # Keys and values that require grad are appended by autograd (the gradient reaches them through the cache).
    cache.reset()
    kg, vg = k1.clone().requires_grad_(), v1.clone().requires_grad_()
    k, v = cache.append(kg, vg)
    (k.sum() + 2 * v.sum()).backward()
    assert torch.equal(kg.grad, torch.ones_like(k1)) and torch.equal(vg.grad, torch.full_like(v1, 2.0))


@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("batch, bias, grad", [(2, False, True), (2, False, False), (1, True, False), (2, True, False)])
def test_causal_attention_cached_equals_full(rotary, batch, bias, grad):
    """Feeding a sequence in chunks through the cache gives the rows of one causal pass over all of it: with
    grad (projections apart, appended by copies) and without (one product of the stacked weights into the
    cache's rows: a matrix written in place for one token or one sequence, a product and a copy otherwise)."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, heads=2, bias=bias).double()
    x = torch.randn(batch, 7, 16, dtype=torch.float64)
    table = RotaryEmbedding(8, 7) if rotary else None
    full = layer(x, None if table is None else table(0, 7))
    # Causal: the first rows do not see the later ones.
    torch.testing.assert_close(layer(x[:, :3], None if table is None else table(0, 3)), full[:, :3])
    cache = layer.new_cache(batch, 7)
    parts = []
    with torch.set_grad_enabled(grad):
        for start, end in ((0, 3), (3, 4), (4, 5), (5, 7)):
            parts.append(layer(x[:, start:end], None if table is None else table(start, end - start), cache))
    assert parts[0].requires_grad == grad
    torch.testing.assert_close(torch.cat(parts, 1), full)
    # The cache holds the (rotated) keys and the values of all 7 positions.
    k = layer._split_heads(layer.to_k(x))
    if table is not None:
        k = rope(k, None, *table(0, 7))[0]
    torch.testing.assert_close(cache.k, k)
    torch.testing.assert_close(cache.v, layer._split_heads(layer.to_v(x)))
    with pytest.raises(ValueError, match="heads must divide dim"):
        CausalSelfAttention(10, heads=4)
    with pytest.raises(ValueError, match="positions 5 .. 7 are outside the table's 0 .. 6"):
        RotaryEmbedding(8, 7)(5, 3)


def test_stacked_projection():
    """to_q's, to_k's and to_v's weights and biases stacked, a copy; ``out`` is written in place."""
    layer = CausalSelfAttention(8, heads=2, bias=True).double()
    weight, bias = layer.stacked_projection()
    torch.testing.assert_close(weight, torch.cat([layer.to_q.weight, layer.to_k.weight, layer.to_v.weight]))
    torch.testing.assert_close(bias, torch.cat([layer.to_q.bias, layer.to_k.bias, layer.to_v.bias]))
    assert not weight.requires_grad and weight.data_ptr() != layer.to_q.weight.data_ptr()
    with torch.no_grad():
        layer.to_v.weight.add_(1.0)
    assert layer.stacked_projection(out=(weight, bias))[0] is weight
    torch.testing.assert_close(weight[16:], layer.to_v.weight, rtol=0, atol=0)
    assert CausalSelfAttention(8, heads=2).stacked_projection()[1] is None


# --------------------------------------------------------------------------- ImageGPT


def test_config_and_defaults():
    model = ImageGPT()
    cfg = model.config
    assert (cfg.image_size, cfg.channels, cfg.levels, cfg.num_classes) == (8, 1, 16, 10)
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.positions, cfg.mlp_hidden, cfg.seq_len) == (128, 4, 4, "rope", 344, 64)
    assert ImageGPTConfig.from_json(cfg.to_json()) == cfg
    twin = with_torch_layers(model)  # ImageGPT(config, torch_layers=True) sharing the parameters
    assert twin.torch_layers and twin.config == cfg and twin.head.weight is model.head.weight
    assert len(model.blocks) == 4 and model.pos_emb is None and model.class_emb.weight.shape == (10, 128)
    for kwargs, message in (
        (dict(levels=1), "levels must be an int >= 2"),
        (dict(num_classes=-1), "num_classes must be an int >= 0"),
        (dict(dim=30, heads=4), "heads must divide dim"),
        (dict(dim=12, heads=4), "rotary positions need an even head size"),
        (dict(positions="alibi"), "positions must be one of"),
        (dict(depth=0), "depth must be a positive int"),
    ):
        with pytest.raises(ValueError, match=message):
            ImageGPT(**kwargs)


def test_quantize_round_trip():
    model = ImageGPT(image_size=2, channels=3, levels=5, dim=8, depth=1, heads=2)
    tokens = torch.randint(0, 5, (3, 12))
    images = model.dequantize(tokens)
    assert images.shape == (3, 3, 2, 2) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(model.quantize(images * 2 - 1), tokens)
    # Raster order, channels interleaved: token 1 is pixel (0, 0)'s second channel, token 3 pixel (0, 1)'s first.
    assert images[0, 1, 0, 0] == tokens[0, 1] / 4 and images[0, 0, 0, 1] == tokens[0, 3] / 4
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 2, 2\)"):
        model.quantize(torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_forward_is_causal_and_loss_is_cross_entropy(positions):
    model = tiny(positions=positions)
    tokens = torch.randint(0, 16, (3, 16))
    labels = torch.tensor([0, 4, 9])
    logits = model(tokens, labels)
    assert logits.shape == (3, 16, 16) and logits.dtype == torch.float64
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 16
    other = model(changed, labels)
    torch.testing.assert_close(other[:, :6], logits[:, :6], rtol=0, atol=0)  # logits[:, i] sees tokens[:, :i]
    assert (other[:, 6:] - logits[:, 6:]).abs().amax() > 1e-6
    assert (model(tokens, torch.tensor([1, 4, 9]))[0] - logits[0]).abs().amax() > 1e-6  # the class token matters
    torch.testing.assert_close(model(tokens[:, :4], labels), logits[:, :4])
    images = model.dequantize(tokens) * 2 - 1
    loss = model.loss(images, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), tokens.flatten()))  # float64 model
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_torch_layers_twin_computes_the_same_function(positions):
    model = tiny(positions=positions)
    twin = ImageGPT(image_size=4, **SMALL, positions=positions, torch_layers=True).double().eval()
    assert twin.state_dict().keys() == model.state_dict().keys()
    twin.load_state_dict(model.state_dict())
    tokens, labels = torch.randint(0, 16, (2, 16)), torch.tensor([3, 7])
    torch.testing.assert_close(twin(tokens, labels), model(tokens, labels))
    torch.testing.assert_close(twin.sample_tokens(3, seed=5), model.sample_tokens(3, seed=5), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, sample",
    [
        (dict(), dict()),
        (dict(positions="learned"), dict(temperature=0.7, top_k=5)),
        (dict(num_classes=0), dict(temperature=1.3)),
        (dict(channels=3, levels=6, image_size=2), dict(labels=torch.tensor([2, 2, 0, 1]))),
    ],
)
@pytest.mark.parametrize("torch_layers", [False, True])
def test_sampling_with_and_without_cache_gives_the_same_tokens(kwargs, sample, torch_layers):
    """float64, so rounding cannot flip a draw between the two paths; the same seed, the same tokens."""
    torch.manual_seed(1)
    model = ImageGPT(**{"image_size": 4, **SMALL, **kwargs}, torch_layers=torch_layers).double().eval()
    cached = model.sample_tokens(4, seed=11, **sample)
    assert cached.shape == (4, model.config.seq_len)
    assert cached.min() >= 0 and cached.max() < model.config.levels
    assert torch.equal(model.sample_tokens(4, seed=11, use_cache=False, **sample), cached)
    assert torch.equal(model.sample_tokens(4, seed=11, **sample), cached)
    assert not torch.equal(model.sample_tokens(4, seed=12, **sample), cached)


def test_sampling_in_float32_matches_float64_cache_path():
    """The float32 model with the cache draws the float64 model's tokens (no draw near a CDF boundary here)."""
    torch.manual_seed(2)
    model = ImageGPT(image_size=4, **SMALL, backend="reference").eval()
    tokens32 = model.sample_tokens(4, seed=3)
    assert torch.equal(model.sample_tokens(4, seed=3, use_cache=False), tokens32)
    assert torch.equal(model.double().sample_tokens(4, seed=3), tokens32)


def test_cached_decoding_logits_match_the_full_forward():
    """What the cache path sampled, the full forward scores the same: greedy decoding picks each argmax."""
    model = tiny()
    labels = torch.tensor([0, 5])
    tokens = model.sample_tokens(2, labels, temperature=0)
    assert torch.equal(model(tokens, labels).argmax(-1), tokens)
    assert torch.equal(model.sample_tokens(2, labels, temperature=0, seed=9, use_cache=False), tokens)
    assert torch.equal(model.sample_tokens(2, labels, top_k=1, seed=4), tokens)  # top-1 is greedy
    # A temperature far below the logits' gaps is greedy too (scores divided by 1e-45 overflowed to all zeros).
    assert torch.equal(model.sample_tokens(2, labels, temperature=1e-45, seed=4), tokens)


def test_draw_follows_the_softmax():
    """Inverse-transform sampling: frequencies match softmax(logits / T), masked outside the top k."""
    model = tiny()
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, 0.5]], dtype=torch.float64).expand(40000, 5)
    u = 1 - torch.rand(40000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for temperature, top_k in ((1.0, None), (0.5, 3)):
        scores = logits[0] / temperature
        if top_k is not None:
            scores = scores.masked_fill(scores < scores.topk(top_k).values[-1], -math.inf)
        probs = torch.softmax(scores, -1)
        counts = torch.bincount(model._draw(logits, u, temperature, top_k), minlength=5).double() / 40000
        assert (counts - probs).abs().max() < 0.01, (counts, probs)
        if top_k is not None:
            assert counts[probs == 0].sum() == 0
    # Token by token: the first index whose cumulative probability reaches u * total, the same on the path for
    # T = 1 without top_k (softmax straight from the logits) as on the general one; written into out when given.
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float64, torch.bfloat16):
        noisy = (3 * torch.randn(2000, 16, generator=g, dtype=torch.float64)).to(dtype)
        uu = 1 - torch.rand(2000, generator=g, dtype=torch.float64)
        wide = torch.promote_types(dtype, torch.float32)
        cdf = torch.softmax(noisy.to(wide), -1).cumsum(-1)
        want = (cdf < uu.to(wide)[:, None] * cdf[:, -1:]).sum(-1).clamp_max(15)
        fast = model._draw(noisy, uu, 1.0, None)
        assert torch.equal(fast, want) and torch.equal(model._draw(noisy, uu, 1.0, 16), want)
        out = torch.zeros(2000, 3, dtype=torch.long)
        model._draw(noisy, uu, 1.0, None, out=out[:, 1])
        model._draw(noisy, uu, 0, None, out=out[:, 2])
        assert torch.equal(out[:, 1], want) and torch.equal(out[:, 2], noisy.argmax(-1)) and not out[:, 0].any()


def test_sample_images_and_errors():
    model = tiny()
    images = model.sample(3, labels=2, seed=0)
    assert images.shape == (3, 1, 4, 4) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(model.quantize(images * 2 - 1), model.sample_tokens(3, labels=2, seed=0))
    for kwargs, message in (
        (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
        (dict(temperature=True), "temperature must be a finite number >= 0"),
        (dict(use_cache="no"), "use_cache must be True or False, got 'no'"),
        (dict(seed=2**70), r"seed must be None or an int in \[0, 2\^63\)"),
        (dict(top_k=17), r"top_k must be None or an int in \[1, levels=16\]"),
        (dict(labels=10), r"labels must be in \[0, 10\)"),
        (dict(labels=torch.zeros(2, dtype=torch.long)), r"integer tensor of shape \(3,\)"),
    ):
        with pytest.raises(ValueError, match=message):
            model.sample(3, **kwargs)
    with pytest.raises(ValueError, match="n must be a positive int"):
        model.sample(0)
    with pytest.raises(ValueError, match="labels .* are required"):
        model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens must be int64 \(B, T\) with 1 <= T <= L = 16"):
        model(torch.zeros(1, 17, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\), got values 1 .. 20"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.tensor([1, 20]))
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 16\), got values 0 .. 16"):
        model(torch.tensor([[0, 16]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="labels must be None for an unconditional model"):
        tiny(num_classes=0).sample(2, labels=1)


def test_triton_backend_matches_the_reference(device):
    """The model on the Triton kernels (interpreted on CPU, compiled on a GPU): the reference's logits,
    gradients and cached greedy decoding (rope on head-split views, attention with Lq = 1 on strided cache
    views)."""
    torch.manual_seed(0)
    ref = ImageGPT(image_size=2, dim=16, depth=1, heads=2, backend="reference").to(device)
    tri = ImageGPT(image_size=2, dim=16, depth=1, heads=2, backend="triton").to(device)
    tri.load_state_dict(ref.state_dict())
    images = (torch.rand(2, 1, 2, 2) * 2 - 1).to(device)
    labels = torch.tensor([1, 2], device=device)
    losses = [m.loss(images, labels) for m in (ref, tri)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(ref.named_parameters(), tri.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    ref.eval(), tri.eval()
    assert torch.equal(tri.sample_tokens(2, labels, temperature=0), ref.sample_tokens(2, labels, temperature=0))


# --------------------------------------------------------------------------- CUDA-graph decoding


def test_decode_step_fuses_residual_adds_with_norms():
    """A cached decoding step of the benchmark's model (depth 8, batch 64), counted on the meta device: on
    genkernels layers every residual add is one gated_residual_layer_norm_modulate call with the RMSNorm after
    it (two a block, no separate add); on both, each layer's q, k and v are one matrix product written into the
    KV cache's rows (four products a layer), rope rotates q and k there in place (genkernels: nothing copied; the
    PyTorch twin copies its rotated keys back), and the draw writes its token without a copy: 81 calls a step
    against the PyTorch-layer twin's 353; the README and the imagegpt benchmark quote these counts."""
    from genkernels.bench import traffic
    from genkernels.bench.imagegpt import CONFIGS
    from genkernels.models.transformer import _Decoder

    totals = {}
    for torch_layers in (False, True):
        with torch.device("meta"):
            model = ImageGPT(**CONFIGS["bench"], torch_layers=torch_layers).to(torch.bfloat16)
        decoder = _Decoder(model, None, 64, 1.0, None, torch.device("meta"), graphed=False)
        with torch.no_grad():  # as sample_tokens decodes
            for t in range(3):
                model._decode_step(t, decoder)
        counted = traffic.count(lambda: model._decode_step(3, decoder), genkernels_ops=not torch_layers)
        totals[torch_layers] = counted.matmul_calls + counted.attention_calls + sum(counted.calls.values())
        depth = model.config.depth
        assert counted.matmul_calls == 4 * depth + 1 and counted.attention_calls == depth
        if not torch_layers:
            assert counted.calls["genkernels.gated_residual_layer_norm_modulate"] == 2 * depth
            assert counted.calls["genkernels.layer_norm_modulate"] == 1  # the first block's norm1
            assert "aten.add" not in counted.calls
            assert counted.calls["genkernels.rope_"] == depth
            assert "aten.copy_" not in counted.calls
        else:
            assert counted.calls["aten.copy_"] == depth  # the rotated keys into their slots
        assert "aten.promote_types" not in counted.calls  # no tensor: no launch
    assert totals == {False: 81, True: 353}


def test_decoder_buffers_and_copies():
    """The decoder that CUDA graphs replay, run without capture on its fixed buffers: the cached path's
    tokens, call after call (the buffers reset between calls); a copy or pickle of a model keeps no graphs;
    cuda_graph=True off a GPU, or without the cache, is refused with the argument named."""
    import copy
    import io

    from genkernels.models.transformer import _Decoder

    model = tiny()
    want = model.sample_tokens(3, seed=5, cuda_graph=False)
    key = _Decoder.key_of(model, 3, 1.0, None)
    decoder = _Decoder(model, key, 3, 1.0, None, torch.device("cpu"), graphed=False)
    labels = torch.arange(3) % 10
    u = 1.0 - torch.rand(3, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for _ in range(2):
        assert torch.equal(decoder.run(labels, u), want)
    model._decoder = decoder  # as a graphed call leaves it
    assert copy.deepcopy(model)._decoder is None
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False)._decoder is None
    model.release_graphs()
    assert model._decoder is None
    assert key != _Decoder.key_of(model.float(), 3, 1.0, None)  # new parameter tensors: new graphs
    with pytest.raises(ValueError, match="cuda_graph=True needs use_cache=True and a model on a CUDA device"):
        model.sample(2, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph must be None, True or False, got 'yes'"):
        model.sample(2, cuda_graph="yes")


def test_decoder_reads_the_weights_of_each_call():
    """A kept decoder (what CUDA graphs replay) stacks the attention projections again at every run after its
    first: weights changed in place since the last run, even through ``.data`` (which autograd's version counter
    does not see), give the tokens a new decoder draws. A decoder of one call stacks them once."""
    from genkernels.models.transformer import _Decoder

    model, other = tiny(), tiny(seed=1)
    decoder = _Decoder(model, None, 3, 1.0, None, torch.device("cpu"), graphed=False)
    labels = torch.arange(3) % 10
    u = 1.0 - torch.rand(3, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    before = decoder.run(labels, u)
    stacked = []
    spy = CausalSelfAttention.stacked_projection

    def counting(self, *args, **kwargs):
        stacked.append(self)
        return spy(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:  # a decoder of one call stacks each layer's projections once
        mp.setattr(CausalSelfAttention, "stacked_projection", counting)
        model.sample_tokens(3, seed=5, cuda_graph=False)
    assert stacked == [block.attn for block in model.blocks]
    for p, q in zip(model.parameters(), other.parameters()):
        p.data.copy_(q.data)
    want = model.sample_tokens(3, seed=5, cuda_graph=False)  # a new decoder
    assert not torch.equal(want, before)  # the weights changed the tokens
    assert torch.equal(decoder.run(labels, u), want)


@pytest.mark.gpu
@pytest.mark.parametrize("torch_layers", [False, True])
def test_cuda_graph_sampling_gives_the_same_tokens(torch_layers):
    """On a GPU: sampling replaying the captured steps draws the tokens of sampling without graphs, the graphs
    are kept for the next call with the same arguments and recaptured for new ones."""
    torch.manual_seed(3)
    model = ImageGPT(image_size=4, **SMALL, torch_layers=torch_layers).cuda().eval()
    for kwargs in (dict(), dict(temperature=0.8, top_k=4)):
        kept = model._decoder
        plain = model.sample_tokens(5, seed=7, cuda_graph=False, **kwargs)
        assert model._decoder is kept  # a call without graphs leaves the kept ones alone
        graphed = model.sample_tokens(5, seed=7, cuda_graph=True, **kwargs)
        decoder = model._decoder
        assert decoder is not None and len(decoder.graphs) == model.config.seq_len
        assert torch.equal(graphed, plain)
        assert torch.equal(model.sample_tokens(5, seed=7, **kwargs), plain)  # the default on CUDA: graphed
        assert model._decoder is decoder
        assert not torch.equal(model.sample_tokens(5, seed=8, **kwargs), plain)
    model.release_graphs()
    assert model._decoder is None
