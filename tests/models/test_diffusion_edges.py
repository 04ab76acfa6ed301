"""Edge cases of the diffusion backbones' calls (UNet and DiT) that users pass and the main tests do not: each
test here failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genkernels.models import DiT, DiTConfig, UNet, UNetConfig

MODELS = [
    pytest.param(lambda: UNet(UNetConfig.tiny(), backend="reference"), id="unet"),
    pytest.param(lambda: DiT(DiTConfig.tiny(), backend="reference"), id="dit"),
]


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Nonzero weights everywhere (the output layers and the adaLN modulations start at zero): the output then
    depends on the labels and on t."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("make", MODELS)
def test_labels_of_any_integer_dtype(make):
    """int16 / uint8 labels (what a dataset of small class indices stores) were refused with "labels must be an
    integer tensor, got torch.int16": a message that contradicts itself. They are integers: the same output as
    int64 labels."""
    model = _randomized(make())
    x, labels = torch.randn(2, 1, 8, 8), torch.tensor([3, 10])
    expected = model(x, 7.0, labels)
    for dtype in (torch.int16, torch.uint8, torch.int8):
        torch.testing.assert_close(model(x, 7.0, labels.to(dtype)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("make", MODELS)
@pytest.mark.parametrize(
    "labels,error,match",
    [
        ([1, 2], TypeError, r"labels must be None or an integer tensor of shape \(2,\), got list"),
        (3, TypeError, r"labels must be None or an integer tensor of shape \(2,\), got int"),
        (np.array([1, 2]), TypeError, r"labels must be None or an integer tensor of shape \(2,\), got ndarray"),
        (torch.tensor([1.0, 2.0]), TypeError, r"labels must be an integer tensor .*got torch.float32"),
        (torch.tensor([True, False]), TypeError, r"labels must be an integer tensor .*got torch.bool"),
    ],
    ids=["list", "int", "ndarray", "float", "bool"],
)
def test_bad_labels_raise_a_clear_error(make, labels, error, match):
    """A list, an int or a NumPy array of labels crashed with "AttributeError: 'list' object has no attribute
    'shape'"; the error now names labels and what they must be."""
    with pytest.raises(error, match=match):
        make()(torch.randn(2, 1, 8, 8), 5, labels)


@pytest.mark.parametrize("make", MODELS)
@pytest.mark.parametrize("t", [True, np.bool_(False), torch.tensor([True, False])], ids=["bool", "np.bool_", "tensor"])
def test_bool_timesteps_are_refused(make, t):
    """t=True ran the model at t = 1 (bools are not numbers anywhere else in genkernels)."""
    with pytest.raises(TypeError, match=r"a 0-d tensor or shape \(1,\) or \(2,\) of timesteps, got bools"):
        make()(torch.randn(2, 1, 8, 8), t, None)


def test_unet_set_backend_refuses_an_unknown_backend():
    """UNet.set_backend("tritonn") was accepted (DiT.set_backend and every layer's constructor refuse it) and
    the model failed at its next call."""
    model = UNet(UNetConfig.tiny(), backend="reference")
    with pytest.raises(ValueError, match="backend must be one of .*got 'tritonn'"):
        model.set_backend("tritonn")
    assert model.norm_out.backend == "reference"
