"""The DiT backbone: shapes, adaLN-Zero start, ops path == PyTorch path, positions, training and sampling, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import genkernels
from genkernels import train
from genkernels.models import DiT, DiTConfig, UNet, UNetConfig
from genkernels.models._layers import with_torch_layers
from genkernels.models.diffusion import DiTBlock
from tests.criterion import assert_criterion


def _randomized(model: DiT, std: float = 0.3) -> DiT:
    """Nonzero adaLN modulations, output layer and label embeddings (they start at zero or near it), so the
    comparisons see every path of the network."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name or "final_layer.linear" in name:
                p.normal_(std=std)
        if model.class_embedding is not None:
            model.class_embedding.weight.normal_()
    return model


def _inputs(b: int = 2, c: int = 1, h: int = 8, w: int = 8):
    x = torch.randn(b, c, h, w)
    t = torch.rand(b) * 999
    labels = torch.arange(b) % 11
    return x, t, labels


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_output_shape_and_dtype(positions):
    model = DiT(DiTConfig.tiny(positions=positions), backend="reference")
    x = torch.randn(3, 1, 8, 8)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 9, 10]))
    assert out.shape == x.shape and out.dtype == x.dtype
    # The output layer starts at zero: the untrained model predicts 0 (loss at its trivial value).
    assert out.abs().max().item() == 0.0
    model64 = _randomized(model).double()
    out64 = model64(x.double(), 250.0, None)
    assert out64.dtype == torch.float64 and torch.isfinite(out64).all() and out64.abs().max() > 0


def test_rgb_rectangular_input_and_unpatchify():
    """Three channels, 8x12 (RoPE runs at any multiple of the patch): the output is the image its tokens
    describe, each token's p*p*C values landing in its own patch."""
    cfg = DiTConfig.tiny(in_channels=3, out_channels=3, num_classes=2, patch_size=4)
    model = DiT(cfg, backend="reference")
    # A final layer that writes the bias alone: token values = bias, whatever the input.
    bias = torch.randn(4 * 4 * 3)
    with torch.no_grad():
        model.final_layer.linear.bias.copy_(bias)
    out = model(torch.randn(2, 3, 8, 12), torch.tensor([1.5, 2.0]), torch.tensor([0, 2]))
    assert out.shape == (2, 3, 8, 12)
    # bias is (p, p, C) with C fastest: patch pixel (i, j) of channel c is bias[(i * p + j) * C + c].
    patch = bias.view(4, 4, 3).permute(2, 0, 1)
    torch.testing.assert_close(out, patch.repeat(1, 2, 3).expand(2, 3, 8, 12), rtol=0, atol=0)


@pytest.mark.parametrize("torch_layers", [False, True])
def test_adaln_zero_blocks_start_as_identity(torch_layers):
    model = DiT(DiTConfig.tiny(), backend="reference", torch_layers=torch_layers)
    with torch.no_grad():
        model.time_embedding[2].bias.normal_()  # a nonzero condition c: the zero modulation still gives gates 0
        c_act = torch.nn.functional.silu(
            model.condition(torch.tensor([3.0, 700.0]), torch.tensor([1, 10]), torch.float32)
        )
        tokens = torch.randn(2, 16, 32)
        rope = model.rope_tables(4, 4, tokens.device, tokens.dtype)
        for block in model.blocks:
            assert isinstance(block, DiTBlock)
            assert torch.equal(block(tokens, c_act, rope), tokens)
        assert torch.equal(model.final_layer(tokens, c_act), torch.zeros(2, 16, 4))


def _loss_and_grads(model: DiT, x, t, labels, weight):
    model.zero_grad(set_to_none=True)
    out = model(x, t, labels)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _skip_unless_runs(backend: str, device) -> None:
    """Skip when ``backend`` cannot run the DiT's ops on ``device`` here (the reason from genkernels.explain)."""
    x = torch.randn(2, 16, 32, device=device)
    q = torch.randn(2, 2, 16, 16, device=device)
    cos = torch.randn(16, 8, device=device)
    for name, args in (
        ("layer_norm_modulate", (x, None, None, x[:, 0], x[:, 0])),
        ("gated_residual", (x, x, x[:, 0])),
        ("gated_residual_layer_norm_modulate", (x, x, x[:, 0], None, None, x[:, 0], x[:, 0])),
        ("rope", (q, q, cos, cos)),
        ("gelu_tanh", (x,)),
        ("attention", (q, q, q)),
    ):
        reasons = genkernels.explain(name, *args)
        if backend not in reasons:
            pytest.skip(f"{name} has no {backend} backend")
        if reasons[backend] is not None:
            pytest.skip(f"{backend} cannot run {name} here: {reasons[backend]}")


@pytest.mark.parametrize(
    "positions,backend", [("rope", "reference"), ("learned", "reference"), ("rope", "triton"), ("rope", "cuda")]
)
def test_ops_path_equals_torch_layers(positions, backend, device):
    """Same weights: the genkernels-ops model (float32, on ``backend``) against the PyTorch-layer model in
    float64 (ref64) and float32 (ref), outputs and every parameter gradient within the DESIGN.md criterion."""
    if backend != "reference":
        _skip_unless_runs(backend, device)
    model = _randomized(DiT(DiTConfig.tiny(positions=positions, depth=3), backend=backend)).to(device)
    twin = with_torch_layers(model)
    assert twin.torch_layers and all(b.torch_layers for b in twin.blocks)
    x, t, labels = (v.to(device) for v in _inputs(3))
    weight = torch.randn(3, 1, 8, 8, device=device)
    out, grads = _loss_and_grads(model, x, t, labels, weight)
    ref, ref_grads = _loss_and_grads(twin, x, t, labels, weight)
    twin64 = copy.deepcopy(twin).double()
    ref64, ref64_grads = _loss_and_grads(twin64, x.double(), t.double(), labels, weight.double())
    assert out.abs().max() > 0.1
    assert_criterion(out, ref, ref64)
    assert grads.keys() == ref64_grads.keys()
    for name in grads:
        assert ref64_grads[name].abs().max() > 0, f"{name}: zero gradient, the comparison would see nothing"
        assert_criterion(grads[name], ref_grads[name], ref64_grads[name], name=name, relative_floor=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inference_on_cuda_auto_backend(dtype, monkeypatch):
    """The auto-backend model under no_grad on CUDA: in bfloat16 every block's fc1 + GELU is one cuBLASLt epilogue
    call (torch._addmm_activation, counted; float32 takes F.linear then gelu_tanh, the epilogue's GELU being
    less accurate than float32), and the output is within the criterion of the PyTorch-layer model."""
    calls = []
    addmm_activation = torch._addmm_activation

    def counted(*args, **kwargs):
        calls.append(kwargs.get("use_gelu"))
        return addmm_activation(*args, **kwargs)

    monkeypatch.setattr(torch, "_addmm_activation", counted)
    model = _randomized(DiT(DiTConfig.tiny(depth=3))).cuda().requires_grad_(False)
    twin = with_torch_layers(model)
    x, t, labels = (v.cuda() for v in _inputs(3))
    with torch.no_grad():
        out = model.to(dtype)(x.to(dtype), t, labels)
        ref = twin.to(dtype)(x.to(dtype), t, labels)
        ref64 = copy.deepcopy(twin).double()(x.double(), t.double(), labels)
    assert calls == ([] if dtype == torch.float32 else [True] * 3)
    assert out.abs().max() > 0.1
    assert_criterion(out, ref, ref64)


@pytest.mark.parametrize("depth", [1, 3])
def test_forward_fuses_each_gated_residual_with_the_next_norm(depth):
    """On the genkernels ops a forward runs one norm, then two gated_residual_layer_norm_modulate calls a block
    (the second fused with the next block's norm or the final layer's), and no gated residual apart: counted
    on the meta device, as each block on its own would run (a norm, the fused call, a gated residual) plus the
    final norm, depth calls more. The values match the PyTorch layers (test_ops_path_equals_torch_layers)."""
    from genkernels.bench import traffic

    cfg = DiTConfig.tiny(depth=depth)
    with torch.device("meta"):
        model = DiT(cfg)
    x = torch.empty(2, cfg.in_channels, 8, 8, device="meta")
    t, labels = torch.zeros(2, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")
    calls = traffic.count(lambda: model(x, t, labels), genkernels_ops=True).calls
    assert calls["genkernels.layer_norm_modulate"] == 1
    assert calls["genkernels.gated_residual_layer_norm_modulate"] == 2 * depth
    assert "genkernels.gated_residual" not in calls


def test_torch_layers_model_loads_the_ops_model_state():
    model = _randomized(DiT(DiTConfig.tiny()))
    eager = DiT(DiTConfig.tiny(), torch_layers=True)
    eager.load_state_dict(model.state_dict())
    assert model.state_dict().keys() == eager.state_dict().keys()
    x, t, labels = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(eager(x, t, labels), model.set_backend("reference")(x, t, labels))


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_positions_make_the_model_position_aware(positions):
    """Without positions a transformer over patches is permutation-equivariant: moving a patch of the input
    moves its output patch. With RoPE or learned positions the output changes otherwise too."""
    model = _randomized(DiT(DiTConfig.tiny(positions=positions, patch_size=4), backend="reference"))
    x, t, labels = _inputs(1)
    swapped = torch.cat([x[..., 4:], x[..., :4]], dim=-1)  # the two 8x4 patch columns exchanged
    with torch.no_grad():
        out, out_swapped = model(x, t, labels), model(swapped, t, labels)
        moved_back = torch.cat([out_swapped[..., 4:], out_swapped[..., :4]], dim=-1)
        assert (moved_back - out).abs().max() > 1e-3
        if positions == "learned":
            # Zero positions: the equivariance holds, so the difference above came from the positions.
            model.pos_embed.zero_()
            out, out_swapped = model(x, t, labels), model(swapped, t, labels)
            moved_back = torch.cat([out_swapped[..., 4:], out_swapped[..., :4]], dim=-1)
            torch.testing.assert_close(moved_back, out)


def test_rope_tables_and_position_parameters():
    rope = DiT(DiTConfig.tiny(), backend="reference")
    learned = DiT(DiTConfig.tiny(positions="learned"))
    assert rope.pos_embed is None and "pos_embed" not in rope.state_dict()
    assert learned.pos_embed.shape == (1, 16, 32)
    cos, sin = rope.rope_tables(2, 3, torch.device("cpu"), torch.float32)
    ref_cos, ref_sin = genkernels.ops.rope_frequencies_2d(2, 3, 16)
    assert cos.shape == (6, 8) and cos.dtype == torch.float32
    torch.testing.assert_close(cos, ref_cos.float()) and torch.testing.assert_close(sin, ref_sin.float())
    # RoPE runs at sizes other than sample_size; learned positions refuse them.
    assert rope(torch.randn(1, 1, 4, 12), 1.0).shape == (1, 1, 4, 12)
    with pytest.raises(ValueError, match="learned positions takes 8x8 inputs only"):
        learned(torch.randn(1, 1, 4, 12), 1.0)
    # A float64 model's tables are the float64 values (they were float32 tables widened: ~3e-8 off).
    cos64, sin64 = rope.double().rope_tables(2, 3, torch.device("cpu"), torch.float64)
    rows, cols = torch.arange(6) // 3, torch.arange(6) % 3
    inv_freq = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)  # the rope_frequencies of dim 8 per axis
    angles = torch.cat((rows[:, None] * inv_freq, cols[:, None] * inv_freq), -1)
    assert cos64.dtype == sin64.dtype == torch.float64
    torch.testing.assert_close((cos64, sin64), (torch.cos(angles), torch.sin(angles)), atol=1e-15, rtol=0)


def test_labels_condition_the_output():
    model = _randomized(DiT(DiTConfig.tiny(), backend="reference"))
    assert model.null_label == 10
    x = torch.randn(1, 1, 8, 8).expand(3, 1, 8, 8)
    with torch.no_grad():
        out = model(x, torch.tensor(250), torch.tensor([3, 7, 10]))
        assert (out[0] - out[1]).abs().max() > 1e-4 and (out[0] - out[2]).abs().max() > 1e-4
        torch.testing.assert_close(model(x[:1], 250), out[2:])  # labels=None: the null label
    uncond = DiT(DiTConfig.tiny(num_classes=0), backend="reference")
    assert uncond.class_embedding is None
    assert uncond(torch.randn(2, 1, 8, 8), 3.0).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="num_classes=0"):
        uncond(torch.randn(2, 1, 8, 8), 3.0, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\), got values 0 .. 11"):
        model(x[:2], 250, torch.tensor([0, 11]))  # 10 is the null label, 11 is none


def test_set_backend_pins_every_op():
    model = DiT(DiTConfig.tiny()).set_backend("reference")
    pinned = [m.backend for m in model.modules() if hasattr(m, "backend")]
    assert len(pinned) == 1 + 2 * 3 and set(pinned) == {"reference"}
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("fastest")


def test_config_errors_and_json():
    cfg = DiTConfig.dit_xl_2(positions="learned")
    assert DiTConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown DiTConfig keys"):
        DiTConfig.from_json('{"bogus": 1}')
    with pytest.raises(ValueError, match="patch_size=3 must divide sample_size=8"):
        DiTConfig.tiny(patch_size=3)
    with pytest.raises(ValueError, match="heads=3 must divide dim=32"):
        DiTConfig.tiny(heads=3)
    with pytest.raises(ValueError, match="dim_head = dim // heads divisible by 4"):
        DiTConfig.tiny(dim=36, heads=2)  # dim_head 18: fine for learned positions, not for 2-D RoPE
    assert DiTConfig.tiny(dim=36, heads=2, positions="learned").head_dim == 18
    with pytest.raises(ValueError, match="positions must be one of"):
        DiTConfig.tiny(positions="sincos")
    for bad in (2.5, True, -1):
        with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
            DiTConfig.tiny(num_classes=bad)
    with pytest.raises(ValueError, match="depth must be a positive int"):
        DiTConfig.tiny(depth=0)
    model = DiT(DiTConfig.tiny(), backend="reference")
    with pytest.raises(ValueError, match="divisible by patch_size=2"):
        model(torch.randn(1, 1, 7, 8), 0)
    with pytest.raises(ValueError, match=r"x must be \(B, 1, H, W\)"):
        model(torch.randn(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        model(torch.randn(2, 1, 8, 8), 0, torch.tensor([1]))
    with pytest.raises(ValueError, match="t must be"):
        model(torch.randn(2, 1, 8, 8), torch.zeros(3))


def test_dit_xl_2_size():
    """DiT-XL/2 has about 675 M parameters; built on meta, no memory."""
    with torch.device("meta"):
        model = DiT(DiTConfig.dit_xl_2())
    n = sum(p.numel() for p in model.parameters())
    assert 670e6 < n < 680e6
    assert len(model.blocks) == 28 and model.blocks[0].mlp.fc1.out_features == 4608


# --------------------------------------------------------------------------- training and sampling


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    """Short eps and flow runs of the tiny DiT through genkernels.train, checkpoints written."""
    results = {}
    for objective in ("eps", "flow"):
        out = tmp_path_factory.mktemp(f"dit-{objective}")
        cfg = train.model_config_for(digits, "tiny", backbone="dit")
        config = train.TrainConfig(steps=40, batch_size=32, lr=2e-3, objective=objective, seed=0)
        result = train.train_diffusion(digits, cfg, config, out=out, progress=False)
        results[objective] = (result, out / "diffusion.safetensors")
    return results


@pytest.mark.parametrize("objective", ["eps", "flow"])
def test_training_lowers_the_loss(runs, objective):
    result, _ = runs[objective]
    assert isinstance(result.model, DiT) and isinstance(result.ema, DiT)
    assert len(result.losses) == 40 and np.isfinite(result.losses).all()
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
    assert last < 0.9 * first, f"{objective}: loss {first:.4f} (first 10 steps) -> {last:.4f} (last 10)"


@pytest.mark.parametrize("objective,sampler", [("eps", "ddim"), ("eps", "dpm++"), ("flow", "flow")])
def test_checkpoint_loads_back_as_a_dit_and_samples(runs, digits, objective, sampler):
    result, path = runs[objective]
    model, meta = train.load_checkpoint(path)
    raw, _ = train.load_checkpoint(path, ema=False)
    assert isinstance(model, DiT) and model.config == train.model_config_for(digits, "tiny", backbone="dit")
    assert meta["backbone"] == "dit" and meta["model"] == "diffusion-dit" and meta["objective"] == objective
    assert meta["step"] == 40 and train.read_metadata(path) == meta
    for k, v in result.ema.state_dict().items():
        assert torch.equal(model.state_dict()[k], v) and torch.equal(raw.state_dict()[k], result.model.state_dict()[k])
    labels = torch.tensor([0, 5, model.null_label])
    images = train.sample_diffusion(model, meta, labels, sampler=sampler, steps=3, guidance=2.0, seed=1)
    again = train.sample_diffusion(model, meta, labels, sampler=sampler, steps=3, guidance=2.0, seed=1)
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
    assert torch.equal(images, again)


def test_unet_checkpoints_still_load(tmp_path, digits):
    """A UNet checkpoint from before the DiT (no backbone key) loads as a UNet; a checkpoint whose backbone
    contradicts its model name is refused."""
    cfg = UNetConfig.tiny()
    unet = UNet(cfg)
    meta = train.run_metadata("diffusion-unet", cfg, digits, objective="eps", schedule=train.Schedule().__dict__)
    train.save_checkpoint(tmp_path / "old.safetensors", unet, None, meta)
    model, loaded = train.load_checkpoint(tmp_path / "old.safetensors", ema=False)
    assert isinstance(model, UNet) and model.config == cfg and "backbone" not in loaded
    train.save_checkpoint(tmp_path / "bad.safetensors", unet, None, {**meta, "backbone": "dit"})
    with pytest.raises(ValueError, match="backbone 'dit' does not fit model 'diffusion-unet'"):
        train.load_checkpoint(tmp_path / "bad.safetensors", ema=False)
    with pytest.raises(ValueError, match="not a diffusion checkpoint"):
        train.read_metadata(tmp_path / "old.safetensors", model="diffusion-dit")


def test_training_config_errors(digits):
    config = train.TrainConfig(steps=1, batch_size=4)
    with pytest.raises(ValueError, match="backbone must be one of"):
        train.model_config_for(digits, "tiny", backbone="vit")
    with pytest.raises(ValueError, match="learned positions takes 16x16 inputs only"):
        train.train_diffusion(digits, DiTConfig.tiny(sample_size=16, positions="learned"), config, progress=False)
    with pytest.raises(ValueError, match="divisible by patch_size=3"):
        train.train_diffusion(digits, DiTConfig.tiny(sample_size=6, patch_size=3), config, progress=False)
    with pytest.raises(TypeError, match="UNetConfig or a DiTConfig"):
        train.train_diffusion(digits, {"dim": 32}, config, progress=False)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_trains_after_sampling_under_inference_mode(backend, device):
    """A forward under torch.inference_mode() (sampling, as diffusers pipelines run it) cached its RoPE tables as
    inference tensors, and every later training step at that grid size failed in autograd ("Inference tensors
    cannot be saved for backward"). The tables are ordinary tensors now; the gradients match a fresh model's."""
    model = _randomized(DiT(DiTConfig.tiny(), backend=backend)).to(device)
    fresh = copy.deepcopy(model)
    x, t, labels = (v.to(device) for v in _inputs())
    with torch.inference_mode():
        sampled = model(x, t, labels)
    cos, sin = model.rope_tables(4, 4, x.device, x.dtype)
    assert not cos.is_inference() and not sin.is_inference()
    model(x, t, labels).square().sum().backward()
    fresh(x, t, labels).square().sum().backward()
    torch.testing.assert_close(sampled, fresh(x, t, labels).detach(), rtol=0, atol=0)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.uint8], ids=str)
def test_input_dtype_other_than_the_parameters_is_named(dtype):
    """x in another dtype than the model (float16 latents into a float32 DiT, uint8 images) failed deep inside
    the timestep MLP with "mat1 and mat2 must have the same dtype, but got Half and Float". Named now; under
    autocast, where the layers cast, the call runs as before."""
    model = DiT(DiTConfig.tiny(), backend="reference")
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(TypeError, match=f"x has dtype {dtype} but the model's parameters are torch.float32"):
        model(x.to(dtype), 1.0)
    with torch.device("meta"):  # a device autocast does not know
        meta_model = DiT(DiTConfig.tiny())
    with pytest.raises(TypeError, match=f"x has dtype {dtype} but"):
        meta_model(x.to("meta", dtype), 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x.bfloat16(), 1.0).shape == x.shape


@pytest.mark.parametrize("model_class", ["dit", "unet"])
def test_timesteps_broadcast_round_and_refuse_as_diffusers(model_class):
    """t of shape (1,) broadcasts over the batch as in diffusers' models (it was refused); a float64 model embeds a
    Python float t in float64 (the DiT rounded it through float32 first: another output than the same t as a
    float64 tensor); complex t is refused (its imaginary part was dropped with a warning)."""
    if model_class == "dit":
        model = _randomized(DiT(DiTConfig.tiny(), backend="reference")).double()
    else:
        model = UNet(UNetConfig.tiny(), backend="reference").double()
    x = torch.randn(2, model.config.in_channels, 8, 8, dtype=torch.float64)
    labels = torch.tensor([1, 2])
    t = 123.456789
    want = model(x, torch.tensor(t, dtype=torch.float64), labels)
    torch.testing.assert_close(model(x, t, labels), want, rtol=0, atol=0)
    torch.testing.assert_close(model(x, torch.tensor([t], dtype=torch.float64), labels), want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="real timesteps"):
        model(x, torch.tensor([1 + 2j, 3 + 0j]), labels)
    with pytest.raises(ValueError, match=r"shape \(1,\) or \(2,\), got shape \(3,\)"):
        model(x, torch.ones(3), labels)
