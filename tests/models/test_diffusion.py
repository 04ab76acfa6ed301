"""The diffusion UNet: shapes, config, conditioning, and the same result on every backend."""

from __future__ import annotations

import copy

import pytest
import torch

import genkernels
from genkernels.models import UNet, UNetConfig
from genkernels.models.diffusion import timestep_embedding
from tests.criterion import assert_criterion


def _randomized(model: UNet) -> UNet:
    """Nonzero output layer (it starts at zero), so the comparison sees the whole network."""
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    torch.nn.init.normal_(model.conv_out.bias, std=0.1)
    return model


def test_output_shape_and_dtype():
    model = UNet(UNetConfig.tiny(), backend="reference")
    x = torch.randn(3, 1, 8, 8)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 9, 10]))
    assert out.shape == x.shape and out.dtype == x.dtype
    # conv_out starts at zero: the untrained model predicts 0 (loss at its trivial value).
    assert out.abs().max().item() == 0.0


def test_three_levels_rgb_and_fractional_timesteps():
    cfg = UNetConfig.tiny(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16),
        attention=(True, False, True),
        num_classes=2,
        layers_per_block=2,
    )
    model = _randomized(UNet(cfg, backend="reference"))
    x = torch.randn(2, 3, 16, 16)
    out = model(x, 123.5, torch.tensor([1, 2]))
    assert out.shape == (2, 3, 16, 16)
    assert torch.isfinite(out).all()


def test_labels_condition_the_output():
    model = _randomized(UNet(UNetConfig.tiny(), backend="reference"))
    torch.nn.init.normal_(model.class_embedding.weight)
    x = torch.randn(1, 1, 8, 8).expand(3, 1, 8, 8)
    out = model(x, torch.tensor(250), torch.tensor([3, 7, model.null_label]))
    assert model.null_label == 10
    assert (out[0] - out[1]).abs().max() > 1e-4
    assert (out[0] - out[2]).abs().max() > 1e-4
    # labels=None is the null label for the whole batch.
    torch.testing.assert_close(model(x[:1], 250), out[2:])


def test_text_context_replaces_labels():
    cfg = UNetConfig.tiny(num_classes=0)
    model = _randomized(UNet(cfg, backend="reference"))
    assert model.class_embedding is None
    ctx = torch.randn(2, 5, cfg.cross_attention_dim)
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), encoder_hidden_states=ctx)
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="num_classes=0"):
        model(torch.randn(2, 1, 8, 8), 1, torch.tensor([0, 1]))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_same_result_on_every_backend(backend, device):
    """Same weights: out on `backend` (float32) vs ref64 = the reference in float64, within the criterion."""
    model = _randomized(UNet(UNetConfig.tiny(), backend="reference")).to(device)
    torch.nn.init.normal_(model.class_embedding.weight)
    x = torch.randn(2, 1, 8, 8, device=device)
    t = torch.tensor([10.0, 900.0], device=device)
    labels = torch.tensor([4, 10], device=device)
    for name, args in (
        ("group_norm", (x.new_empty(2, 16, 8, 8), 4, None, None, 1e-5, "silu")),
        ("attention", (x.new_empty(2, 2, 16, 8),) * 3),
    ):
        reason = genkernels.explain(name, *args)[backend]
        if reason is not None:
            pytest.skip(f"{backend} cannot run {name} here: {reason}")
    with torch.no_grad():
        ref = model(x, t, labels)
        ref64 = copy.deepcopy(model).double()(x.double(), t.double(), labels)
        out = copy.deepcopy(model).set_backend(backend)(x, t, labels)
    assert_criterion(out, ref, ref64)


def test_set_backend_pins_every_op():
    model = UNet(UNetConfig.tiny())
    model.set_backend("reference")
    pinned = [m.backend for m in model.modules() if isinstance(m, (genkernels.nn.GroupNorm, genkernels.nn.Attention))]
    assert len(pinned) > 10 and set(pinned) == {"reference"}


def test_timestep_embedding():
    t = torch.tensor([0.0, 3.0])
    emb = timestep_embedding(t, 6)
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)])
    torch.testing.assert_close(emb, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1))
    assert timestep_embedding(t, 7).shape == (2, 7)


def test_config_json_round_trip_and_errors():
    cfg = UNetConfig.sd_like()
    assert UNetConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown UNetConfig keys"):
        UNetConfig.from_json('{"bogus": 1}')
    with pytest.raises(ValueError, match="one flag per level"):
        UNetConfig(block_out_channels=(32, 64), attention=(True,))
    with pytest.raises(ValueError, match="norm_num_groups=8 must divide"):
        UNetConfig(block_out_channels=(12, 64, 64))
    for name in ("heads", "norm_num_groups", "layers_per_block"):
        with pytest.raises(ValueError, match=f"{name} must be a positive int, got 0"):
            UNetConfig.tiny(**{name: 0})
    model = UNet(UNetConfig.tiny(), backend="reference")
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 1, 7, 7), 0)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        model(torch.randn(2, 1, 8, 8), 0, torch.tensor([1]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\), got values -1 .. 3"):
        model(torch.randn(2, 1, 8, 8), 0, torch.tensor([3, -1]))


def test_sd_like_size():
    """The SD-like preset has Stable Diffusion 1.x's UNet size (about 860 M parameters); built on meta, no memory."""
    with torch.device("meta"):
        model = UNet(UNetConfig.sd_like())
    n = sum(p.numel() for p in model.parameters())
    assert 0.8e9 < n < 0.9e9
    assert sum(isinstance(m, genkernels.nn.Attention) for m in model.modules()) == 2 * 16
