"""The DiT, the UNet, ImageGPT and its training loop at the edges of their public arguments."""

from __future__ import annotations

import copy

import pytest
import torch

from genkernels.models import DiT, DiTConfig
from genkernels.models._layers import with_torch_layers
from tests.criterion import assert_criterion
from tests.models.test_dit import _inputs, _randomized

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_dit_under_autocast(positions, dtype):
    """Under torch.autocast the patch tokens come out of the convolution in the autocast dtype; the learned
    position table (float32) promotes the residual stream back to float32 while the attention and MLP branches stay
    in the autocast dtype. The fused gated residual refused the pair ("y must have x's dtype"), so a DiT with
    learned positions could not run under autocast at all. It now adds the branches in the stream's dtype, as its
    PyTorch twin (and DiT's own code) does, forward and backward."""
    model = _randomized(DiT(DiTConfig.tiny(positions=positions), backend="reference"))
    twin = with_torch_layers(model)
    x, t, labels = _inputs(2)
    ref64 = copy.deepcopy(twin).double()(x.double(), t.double(), labels)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x, t, labels)
        ref = twin(x, t, labels)
        out.float().square().sum().backward()
    assert_criterion(out, ref, ref64, "output")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "field,value",
    [("steps", 2.5), ("steps", True), ("batch_size", 3.5), ("batch_size", True), ("warmup", 1.5), ("save_every", 0.5)]
    + [("levels", 8.0), ("lr", True), ("grad_clip", None), ("weight_decay", "0.1")],
)
def test_transformer_train_config_refuses_non_integer_counts(field, value):
    """Counts took any number: warmup=1.5 ran a schedule whose second step had 4/3 of the peak learning rate,
    save_every=0.5 wrote the checkpoint at every step, steps=True trained one step and wrote true in the metadata,
    and a fractional steps or batch size failed deep in the loop. Every field now names itself and what it takes."""
    from genkernels.train_transformer import TransformerTrainConfig

    with pytest.raises(ValueError, match=f"{field} must be"):
        TransformerTrainConfig(**{"steps": 10, "batch_size": 4, field: value})


@pytest.mark.parametrize("shape", [(2, 8), (32,), (1, 2, 16)])
def test_imagegpt_dequantize_refuses_other_shapes(shape):
    """dequantize reshaped any tokens whose count L divides: tokens (2, 8) of a model with L = 16 came back as one
    image made of both rows, and a flat (B * L,) tensor as B images, with no error."""
    from genkernels.models.transformer import ImageGPT

    model = ImageGPT(image_size=4, dim=16, depth=1, heads=2, backend="reference")
    assert model.dequantize(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"tokens must be an integer tensor \(B, 16\)"):
        model.dequantize(torch.zeros(shape, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens must be an integer tensor \(B, 16\)"):
        model.dequantize(torch.zeros(2, 16))


def test_imagegpt_loss_of_a_float64_model_is_float64():
    """A float64 model's loss went through float32 (logits.float()): its value, and every gradient of a float64
    training step or gradcheck, was rounded to float32 (about 1e-7 off). It is now computed in float64; 16-bit
    models still get a float32 loss."""
    import torch.nn.functional as F

    from genkernels.models.transformer import ImageGPT

    torch.manual_seed(0)
    model = ImageGPT(image_size=2, levels=5, num_classes=3, dim=16, depth=1, heads=2, backend="reference").double()
    images, labels = torch.rand(3, 1, 2, 2, dtype=torch.float64) * 2 - 1, torch.tensor([0, 2, 1])
    loss = model.loss(images, labels)
    tokens = model.quantize(images)
    want = F.cross_entropy(model(tokens, labels).flatten(0, 1), tokens.flatten())
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-15)
    assert model.to(torch.bfloat16).loss(images.to(torch.bfloat16), labels).dtype == torch.float32


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_backbones_name_a_config_of_another_type(kind):
    """A dict (a diffusers-style config) or None failed deep inside the constructor with an AttributeError
    ("'dict' object has no attribute 'block_out_channels'"); the error now names the argument and the way from a
    dict."""
    from genkernels.models import UNet, UNetConfig

    model_class, config_class = (UNet, UNetConfig) if kind == "unet" else (DiT, DiTConfig)
    name = config_class.__name__
    for config in ({"sample_size": 8}, None):
        with pytest.raises(TypeError, match=rf"config must be a {name} \({name}.from_dict"):
            model_class(config)


@pytest.mark.parametrize("kind", ["unet", "dit", "imagegpt"])
@pytest.mark.parametrize("flag", ["no", 1])
def test_torch_layers_must_be_a_bool(kind, flag):
    """torch_layers="no" built the PyTorch-layer model (any truthy value did): another network than the one
    named. Only True or False is taken."""
    from genkernels.models import ImageGPT, UNet, UNetConfig

    make = {
        "unet": lambda: UNet(UNetConfig.tiny(), torch_layers=flag),
        "dit": lambda: DiT(DiTConfig.tiny(), torch_layers=flag),
        "imagegpt": lambda: ImageGPT(image_size=2, dim=16, depth=1, heads=2, torch_layers=flag),
    }[kind]
    with pytest.raises(ValueError, match=f"torch_layers must be a bool, got {flag!r}"):
        make()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_labels_on_the_cpu_for_a_cuda_model(kind):
    """Labels on the CPU for a model on CUDA (as a training loop's dataset gives them) failed inside the label
    embedding ("Expected all tensors to be on the same device"); they go to the model's device, as t does and as
    ImageGPT's labels do."""
    from genkernels.models import UNet, UNetConfig

    model = (UNet(UNetConfig.tiny()) if kind == "unet" else DiT(DiTConfig.tiny())).cuda().eval()
    size, channels = model.config.sample_size, model.config.in_channels
    x = torch.randn(2, channels, size, size, device="cuda")
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        got = model(x, 0.5, labels)
        want = model(x, 0.5, labels.cuda())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("base", [1.0, 0.5])
def test_imagegpt_config_refuses_a_rope_base_rope_cannot_take(base):
    """rope_frequencies takes a base > 1 (the DiT's config checks so): a base in (0, 1] passed ImageGPTConfig
    and failed later, building the model."""
    from genkernels.models import ImageGPTConfig

    with pytest.raises(ValueError, match=rf"rope_base must be a finite number > 1, got {base}"):
        ImageGPTConfig(rope_base=base)


@pytest.mark.parametrize("value", [[float("nan")], [float("inf"), 1.0], [True], "12"])
def test_vae_config_latent_statistics_must_be_finite_numbers(value):
    """latents_mean / latents_std took NaN, inf, bools and strings of digits through float()."""
    from genkernels.models.vae import AutoencoderKLConfig

    for name in ("latents_mean", "latents_std"):
        with pytest.raises(ValueError, match=f"{name} must be None or a sequence of finite numbers"):
            AutoencoderKLConfig(**{name: value})
    assert AutoencoderKLConfig(latents_mean=[0.5, 1], latents_std=None).latents_mean == (0.5, 1.0)
