"""Edges of the diffusion UNet and the AutoencoderKL that a user hits and the main tests did not: inputs in a
dtype other than the parameters', conditioning given twice, configs that built another network than asked,
timesteps of a float64 model, empty spatial sizes, diffusers' older key names and the posterior's draw with a
generator at half precision. Each test failed before its fix, except the last (a guard)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genkernels.models import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian, UNet, UNetConfig
from genkernels.models._layers import with_torch_layers
from tests.criterion import assert_criterion

try:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
except ImportError:
    DiagonalGaussianDistribution = None


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Nonzero weights everywhere (the UNet's output layer starts at zero)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _unet() -> UNet:
    return _randomized(UNet(UNetConfig.tiny(), backend="reference"))


def _vae() -> AutoencoderKL:
    return _randomized(AutoencoderKL(AutoencoderKLConfig.tiny(), backend="reference"))


# --------------------------------------------------------------------------- dtypes of the inputs

CALLS = {
    "unet": (_unet, lambda m, x: m(x, 5), (2, 1, 8, 8)),
    "vae.encode": (_vae, lambda m, x: m.encode(x), (2, 3, 8, 8)),
    "vae.decode": (_vae, lambda m, z: m.decode(z), (2, 4, 4, 4)),
    "vae.forward": (_vae, lambda m, x: m(x), (2, 3, 8, 8)),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.uint8])
def test_input_dtype_other_than_the_parameters_is_named(call, dtype):
    """fp16 latents or uint8 images into a float32 model failed inside torch with "mat1 and mat2 must have the
    same dtype" (UNet) or "Input type (c10::Half) and bias type (float) should be the same" (VAE): now a
    TypeError naming both dtypes."""
    make, run, shape = CALLS[call]
    x = torch.randn(shape).to(dtype)
    name = "z" if call == "vae.decode" else "x"
    with pytest.raises(TypeError, match=rf"{name} has dtype {dtype} but the model's parameters are torch.float32"):
        run(make(), x)


@pytest.mark.parametrize("call", list(CALLS))
def test_autocast_and_meta_still_run(call):
    """Under autocast a float32 or float16 input runs a float32 model in bfloat16 (the layers cast); integer and
    float64 inputs are refused there too (autocast casts neither). A model on the meta device runs."""
    make, run, shape = CALLS[call]
    model = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, torch.randn(shape))
        run(model, torch.randn(shape).half())
        for dtype in (torch.uint8, torch.float64):
            with pytest.raises(TypeError, match=f"has dtype {dtype} but the model's parameters are torch.float32"):
                run(model, torch.randn(shape).to(dtype))
    assert out is not None
    with torch.device("meta"):
        meta = type(model)(model.config, backend="reference")
        run(meta, torch.empty(shape))


# --------------------------------------------------------------------------- UNet conditioning and config


def test_unet_refuses_labels_and_encoder_hidden_states_together():
    """encoder_hidden_states replaces the label embedding: given both, the labels were dropped silently (the
    output was that of the context alone)."""
    model = _unet()
    x, ctx = torch.randn(2, 1, 8, 8), torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="labels or encoder_hidden_states, not both"):
        model(x, 5, torch.tensor([1, 2]), encoder_hidden_states=ctx)


@pytest.mark.parametrize("flavour", ["genkernels", "torch"])
@pytest.mark.parametrize(
    "ctx,error,match",
    [
        (torch.ones(2, 3, 16, dtype=torch.long), TypeError, r"encoder_hidden_states must be floating point"),
        (torch.randn(2, 3, 15), ValueError, r"encoder_hidden_states must be \(B, S, 16\)"),
        (torch.randn(2, 16), ValueError, r"encoder_hidden_states must be \(B, S, 16\)"),
        (torch.randn(3, 1, 16), ValueError, r"encoder_hidden_states must be \(B, S, 16\) with B = 2"),
    ],
    ids=["int", "width", "2-d", "batch"],
)
def test_unet_checks_encoder_hidden_states(flavour, ctx, error, match):
    """Integer states were cast to floats and used; on the PyTorch-layer twin a wrong width or batch failed in
    a matmul ("mat1 and mat2 shapes cannot be multiplied")."""
    model = _unet()
    if flavour == "torch":
        model = with_torch_layers(model)
    with pytest.raises(error, match=match):
        model(torch.randn(2, 1, 8, 8), 5, encoder_hidden_states=ctx)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(attention=("False", "True")), "attention"),
        (dict(attention=(0, 1)), "attention"),
        (dict(mid_attention="no"), "mid_attention"),
        (dict(block_out_channels=(16.7, 32)), "block_out_channels"),
        (dict(block_out_channels=(-4, 32)), "block_out_channels"),
        (dict(in_channels=0), "in_channels"),
        (dict(out_channels=0), "out_channels"),
        (dict(sample_size=-3), "sample_size"),
        (dict(cross_attention_dim=16.5), "cross_attention_dim"),
        (dict(dropout=1.5), "dropout"),
        (dict(dropout=float("nan")), "dropout"),
    ],
)
def test_unet_config_refuses_what_would_build_another_network(overrides, match):
    """attention=("False", "True") built attention at both levels (any non-empty string is truthy),
    block_out_channels=(16.7, 32) built 16 channels, sample_size=-3 was kept; others failed deep in torch."""
    with pytest.raises(ValueError, match=match):
        UNetConfig.tiny(**overrides)


def test_unet_config_keeps_numpy_flags_and_sizes():
    cfg = UNetConfig.tiny(attention=(np.bool_(False), np.bool_(True)), block_out_channels=(np.int64(16), 32))
    assert cfg.attention == (False, True) and cfg.block_out_channels == (16, 32)
    assert all(type(a) is bool for a in cfg.attention) and all(type(c) is int for c in cfg.block_out_channels)


def test_float64_unet_embeds_timesteps_in_float64():
    """A float64 model (the ref64 of a comparison) embedded int or Python-float timesteps in float32: its output
    moved by ~5e-7 with the type of t."""
    model = _unet().double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    exact = model(x, torch.tensor([3.0, 777.0], dtype=torch.float64))
    assert torch.equal(model(x, torch.tensor([3, 777])), exact)
    assert torch.equal(model(x, 777.3), model(x, torch.tensor(777.3, dtype=torch.float64)))


# --------------------------------------------------------------------------- empty spatial sizes


@pytest.mark.parametrize(
    "call,shape",
    [("unet", (1, 1, 0, 8)), ("vae.encode", (1, 3, 8, 0)), ("vae.decode", (1, 4, 0, 4))],
)
def test_zero_height_or_width_is_refused(call, shape):
    """H or W = 0 failed in a convolution ("Kernel size can't be greater than actual input size")."""
    make, run, _ = CALLS[call]
    with pytest.raises(ValueError, match=r"H and W .*at least 1"):
        run(make(), torch.randn(shape))


@pytest.mark.parametrize("torch_layers", [False, True])
def test_vae_refuses_an_unknown_backend_when_set(torch_layers):
    """set_backend("trition") was accepted and failed at the next call; a torch_layers model built with it
    failed only when the posterior was sampled. Both now refuse the name at once, as the UNet does."""
    with pytest.raises(ValueError, match="backend must be one of"):
        AutoencoderKL(AutoencoderKLConfig.tiny(), backend="trition", torch_layers=torch_layers)
    model = AutoencoderKL(AutoencoderKLConfig.tiny(), torch_layers=torch_layers)
    with pytest.raises(ValueError, match="backend must be one of"):
        model.set_backend("trition")


# --------------------------------------------------------------------------- diffusers' state dicts


@pytest.mark.parametrize("torch_layers", [False, True])
def test_vae_loads_diffusers_deprecated_attention_names(torch_layers):
    """Older diffusers checkpoints (e.g. the SD 1.x VAE files) name the mid-block attention's projections
    query / key / value / proj_attn; diffusers renames them on load, ours failed with missing keys."""
    source = _vae()
    old = {}
    for key, value in source.state_dict().items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if ".attentions.0." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{legacy}.")
        old[key] = value
    assert any(".proj_attn." in k for k in old)
    model = AutoencoderKL(AutoencoderKLConfig.tiny(), backend="reference", torch_layers=torch_layers).eval()
    model.load_state_dict(old, strict=True)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x).sample, source(x).sample)


# --------------------------------------------------------------------------- the posterior's generator draw


@pytest.mark.skipif(DiagonalGaussianDistribution is None, reason="diffusers is not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_posterior_sample_with_a_generator_matches_diffusers_at_every_dtype(dtype):
    """diffusers draws randn in the moments' dtype, and on the CPU fp16's and bf16's randn are other streams
    than float32's for most sizes (200 draws here): a half-precision posterior sampled with a generator gave
    other latents than diffusers' (float64 was right already, by a special case in the VAE now removed)."""
    moments = torch.randn(2, 8, 5, 5).to(dtype)  # 200 draws: not a multiple of 16
    ours = DiagonalGaussian(moments, backend="reference").sample(generator=torch.Generator().manual_seed(7))
    theirs = DiagonalGaussianDistribution(moments).sample(generator=torch.Generator().manual_seed(7))
    eps = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(7), dtype=dtype).double()
    truth = moments[:, :4].double() + torch.exp(0.5 * moments[:, 4:].double()) * eps
    assert_criterion(ours, theirs, truth, "z")


# --------------------------------------------------------------------------- guard


def test_training_after_inference_mode():
    """Neither model keeps a cache built under torch.inference_mode() (the DiT's rope tables did): a training
    step after inference-mode sampling runs."""
    unet, vae = _unet().train(), _vae().train()
    x = torch.randn(2, 1, 8, 8)
    with torch.inference_mode():
        unet(x, 5, torch.tensor([1, 2]))
        vae(torch.randn(1, 3, 8, 8), sample_posterior=True, seed=1)
    unet(x, 5, torch.tensor([1, 2])).square().mean().backward()
    posterior = vae.encode(torch.randn(1, 3, 8, 8)).latent_dist
    (vae.decode(posterior.sample(seed=2)).sample.square().mean() + posterior.kl().mean()).backward()
    for model in (unet, vae):
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
