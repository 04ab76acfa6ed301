"""Flow model edges (genkernels.models.flow): sampling arguments (temperature, seed, image_size), inputs in
a dtype the parameters do not have, empty batches in training mode, bits/dim of a non-tensor. CPU, reference
backend. Each case failed before its fix."""

import math

import pytest
import torch

from genkernels.models import Glow, GlowConfig, RealNVP2D
from genkernels.nn import ActNorm
from tests.flow_checks import perturb

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> Glow:
    model = Glow.from_config(GlowConfig.tiny(**overrides), backend="reference")
    model.log_prob(torch.rand(8, model.config.in_channels, *model.config.hw))
    return perturb(model, 0.05).eval()


@pytest.mark.parametrize("temperature", [math.inf, -math.inf, math.nan, -1.0])
@pytest.mark.parametrize("family", ["glow", "realnvp"])
def test_sample_refuses_temperature_not_finite_or_negative(family, temperature):
    """inf was accepted: every latent became mean + inf * std * eps, and the samples were all NaN."""
    model = tiny() if family == "glow" else RealNVP2D(8, 2, backend="reference")
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        model.sample(2, temperature=temperature, seed=0)


@pytest.mark.parametrize("family", ["glow", "realnvp"])
def test_sample_temperature_zero_is_deterministic_and_finite(family):
    model = tiny() if family == "glow" else perturb(RealNVP2D(8, 2, backend="reference"), 0.1).eval()
    a, b = model.sample(3, temperature=0, seed=1), model.sample(3, temperature=0.0, seed=2)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [True, 1.5, -1, 2**63, "3"])
@pytest.mark.parametrize("family", ["glow", "realnvp"])
def test_sample_refuses_bad_seeds(family, seed):
    """True and 1.5 failed inside torch (RuntimeError 'manual_seed expected a long'); -1 wrapped silently."""
    model = tiny() if family == "glow" else RealNVP2D(8, 2, backend="reference")
    with pytest.raises(ValueError, match=r"seed must be None or an int in \[0, 2\^63\)"):
        model.sample(2, seed=seed)


@pytest.mark.parametrize("family", ["glow", "realnvp"])
def test_sample_seed_reproducible_and_numpy_seed(family):
    np = pytest.importorskip("numpy")
    model = tiny() if family == "glow" else perturb(RealNVP2D(8, 2, backend="reference"), 0.1).eval()
    a = model.sample(2, seed=2**63 - 1)
    torch.testing.assert_close(model.sample(2, seed=np.int64(2**63 - 1)), a, rtol=0, atol=0)
    assert not torch.equal(model.sample(2, seed=0), model.sample(2, seed=1))


@pytest.mark.parametrize("image_size", [(4.0, 4.0), ("4", 4), (4, None), (True, 4), (0, 4)])
def test_sample_refuses_image_sizes_that_are_not_ints(image_size):
    """(4.0, 4.0) failed in torch.randn ('type must be tuple of ints'), ("4", 4) with 'not all arguments
    converted during string formatting'."""
    model = tiny()
    with pytest.raises(ValueError, match="H and W must be positive multiples of 2 \\*\\* levels = 4"):
        model.sample(1, image_size=image_size)
    with pytest.raises(ValueError, match="H and W must be positive multiples"):
        model.latent_shapes(*image_size)


def test_sample_numpy_image_size():
    np = pytest.importorskip("numpy")
    assert tiny().sample(1, image_size=(np.int64(4), np.int32(8))).shape == (1, 1, 4, 8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_glow_names_an_input_dtype_its_parameters_do_not_have(dtype):
    """A float64 x into a float32 Glow failed deep in the first coupling's conditioner ('Input type (double)
    and bias type (float) should be the same'), after the first ActNorm had initialized from it."""
    model = Glow.from_config(GlowConfig.tiny(), backend="reference")
    with pytest.raises(TypeError, match=f"x has dtype {dtype} but the model's parameters are torch.float32"):
        model.log_prob(torch.rand(2, 1, 4, 4, dtype=dtype))
    norms = [m for m in model.modules() if isinstance(m, ActNorm)]
    assert not any(bool(m.initialized) for m in norms), "a refused call initialized an ActNorm"
    zs, _ = tiny()(torch.rand(2, 1, 4, 4))
    with pytest.raises(TypeError, match=r"zs\[0\] has dtype torch.float64"):
        tiny().inverse([zs[0].double(), zs[1]])


def test_realnvp_names_an_input_dtype_its_parameters_do_not_have():
    """float64 points into a float32 RealNVP2D: 'mat1 and mat2 must have the same dtype', after the first
    ActNorm had initialized from the refused batch."""
    model = RealNVP2D(8, 2, backend="reference")
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the model's parameters are torch.float32"):
        model.log_prob(torch.randn(4, 2, dtype=torch.float64))
    assert not bool(model.norms[0].initialized)
    with pytest.raises(TypeError, match="z has dtype torch.float64"):
        model.inverse(torch.randn(4, 2, dtype=torch.float64))
    model.double()
    assert model.log_prob(torch.randn(4, 2, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("family", ["glow", "realnvp"])
def test_empty_batch_in_training_mode_leaves_actnorm_uninitialized(family):
    """A batch of 0 in training mode initialized every ActNorm from no data: NaN log_scale and bias, marked
    initialized, so every later log p(x) and sample was NaN."""
    if family == "glow":
        model = Glow.from_config(GlowConfig.tiny(), backend="reference").train()
        empty, batch = torch.rand(0, 1, 4, 4), torch.rand(8, 1, 4, 4)
    else:
        model = RealNVP2D(8, 2, backend="reference").train()
        empty, batch = torch.randn(0, 2), torch.randn(8, 2)
    assert model.log_prob(empty).shape == (0,)
    norms = [m for m in model.modules() if isinstance(m, ActNorm)]
    assert not any(bool(m.initialized) for m in norms)
    lp = model.log_prob(batch)
    assert all(bool(m.initialized) for m in norms) and torch.isfinite(lp).all()
    for m in norms:
        assert torch.isfinite(m.log_scale).all() and torch.isfinite(m.bias).all()
    assert torch.isfinite(model.eval().sample(2, seed=0)).all()


def test_bits_per_dim_refuses_a_non_tensor():
    """bits_per_dim read x.shape before checking x: AttributeError 'list' object has no attribute 'shape'."""
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        tiny().bits_per_dim([[0.5]])
