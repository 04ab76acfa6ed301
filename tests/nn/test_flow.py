"""The flow layers (genkernels.nn.flow): exact inverses, log-determinants against autograd Jacobians,
ActNorm's data-dependent initialization, and argument checks. CPU, reference backend unless noted."""

import pytest
import torch

import genkernels
from genkernels.nn import ActNorm, AffineCoupling, InvConv1x1
from genkernels.ops.coupling import SCALES
from tests.flow_checks import jacobian_logdet, perturb

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_round_trip(module: torch.nn.Module, x: torch.Tensor) -> None:
    y, logdet = module(x)
    x_back, inv_logdet = module.inverse(y)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert logdet.shape == (x.shape[0],) and logdet.dtype == torch.float32
    assert (x_back - x).abs().max() <= 1e-5 * x.abs().max()
    torch.testing.assert_close(inv_logdet, -logdet, rtol=1e-6, atol=1e-5)


def layers(scale: str = "sigmoid") -> dict:
    return {
        "coupling": AffineCoupling(5, 8, scale=scale, backend="reference"),
        "actnorm": ActNorm(5, backend="reference"),
        "invconv_lu": InvConv1x1(5),
        "invconv_dense": InvConv1x1(5, lu=False),
    }


@pytest.mark.parametrize("scale", SCALES)
def test_coupling_round_trip_every_scale(scale):
    module = perturb(AffineCoupling(5, 8, scale=scale, clamp=1.5, backend="reference"), 0.1)
    assert_round_trip(module, 2 * torch.randn(3, 5, 4, 6))


@pytest.mark.parametrize("name", ["actnorm", "invconv_lu", "invconv_dense"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_round_trip(name, channels_last):
    module = perturb(layers()[name], 0.1)
    x = 2 * torch.randn(3, 5, 4, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert_round_trip(module, x)


def test_coupling_channels_last_matches_contiguous():
    module = perturb(AffineCoupling(4, 8, scale="softclamp_tanh", backend="reference"), 0.1)
    x = torch.randn(2, 4, 3, 5)
    y, logdet = module(x)
    y_cl, logdet_cl = module(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y)
    torch.testing.assert_close(logdet_cl, logdet)


@pytest.mark.parametrize("scale", SCALES)
def test_coupling_logdet_is_log_abs_det_jacobian(scale):
    module = perturb(AffineCoupling(3, 6, scale=scale, backend="reference"), 0.1).double()
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    y, logdet = module(x)
    assert logdet.dtype == torch.float64
    torch.testing.assert_close(logdet, jacobian_logdet(lambda v: module(v)[0], x))
    _, inv_logdet = module.inverse(y)
    torch.testing.assert_close(inv_logdet, jacobian_logdet(lambda v: module.inverse(v)[0], y))


@pytest.mark.parametrize("name", ["actnorm", "invconv_lu", "invconv_dense"])
def test_logdet_is_log_abs_det_jacobian(name):
    module = perturb(layers()[name], 0.1).double().eval()
    x = torch.randn(2, 5, 2, 3, dtype=torch.float64)
    y, logdet = module(x)
    torch.testing.assert_close(logdet, jacobian_logdet(lambda v: module(v)[0], x))
    _, inv_logdet = module.inverse(y)
    torch.testing.assert_close(inv_logdet, jacobian_logdet(lambda v: module.inverse(v)[0], y))


def test_flat_inputs():
    """(N, C) points: a batch of single positions (S = 1)."""
    x = torch.randn(6, 2)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    for module in (
        perturb(AffineCoupling(2, conditioner=net, scale="exp"), 0.1),
        perturb(ActNorm(2), 0.1),
        InvConv1x1(2),
    ):
        assert_round_trip(module, x)


def test_actnorm_initializes_from_first_training_batch():
    x = torch.randn(16, 3, 4, 4) * torch.tensor([0.5, 2.0, 7.0]).view(1, 3, 1, 1) + torch.tensor([1.0, -3.0, 0.0]).view(
        1, 3, 1, 1
    )
    norm = ActNorm(3, backend="reference")
    assert not norm.initialized
    y, logdet = norm(x)
    assert norm.initialized
    mean = y.mean(dim=(0, 2, 3))
    var = y.var(dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(logdet, torch.full((16,), 16 * norm.log_scale.sum().item()))
    assert norm.log_scale.requires_grad and norm.log_scale.grad is None
    # Later batches use the parameters as they are.
    before = [p.detach().clone() for p in norm.parameters()]
    norm(5 * torch.randn(4, 3, 4, 4))
    for p, q in zip(norm.parameters(), before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_actnorm_init_keeps_scale_1_for_channels_without_spread(dtype):
    """One value per channel (a batch of one 1x1 image) or a constant channel: std 0, where Glow's
    1 / (std + eps) would be a scale of 1e6. Such a channel is only centred (log_scale 0, bias -mean); the
    other channels get Glow's values exactly."""
    one = torch.tensor([[[[0.3]], [[-2.0]], [[5.0]]]], dtype=dtype)  # (1, 3, 1, 1)
    norm = ActNorm(3, backend="reference")
    y, logdet = norm(one)
    assert norm.initialized
    assert torch.equal(norm.log_scale.detach(), torch.zeros(3))
    torch.testing.assert_close(norm.bias.detach(), -one.flatten().float(), rtol=0, atol=0)
    torch.testing.assert_close(y, torch.zeros_like(one), rtol=0, atol=1e-6)
    assert torch.equal(logdet, torch.zeros(1, dtype=logdet.dtype))

    x = torch.randn(8, 3, 4, 4, dtype=dtype) * 3 + 1
    x[:, 1] = 0.7  # constant channel
    x[:, 2] = 0.7 + 1e-7 * torch.randn(8, 4, 4, dtype=dtype)  # spread below eps = 1e-6
    norm = ActNorm(3, backend="reference")
    norm.initialize(x)
    var, _ = torch.var_mean(x, dim=[0, 2, 3], correction=0)
    expected = -torch.log(var[0].sqrt() + norm.eps).float()
    assert torch.equal(norm.log_scale.detach(), torch.stack([expected, torch.tensor(0.0), torch.tensor(0.0)]))
    y, _ = norm(x)
    assert y.abs().max() < 20


def test_actnorm_no_init_in_eval_or_inverse():
    norm = ActNorm(3, backend="reference")
    x = torch.randn(4, 3, 2, 2) + 5
    norm.inverse(x)
    assert not norm.initialized
    norm.eval()
    y, _ = norm(x)
    assert not norm.initialized
    torch.testing.assert_close(y, x)


def test_actnorm_state_dict_round_trip():
    norm = ActNorm(3, backend="reference")
    norm(torch.randn(8, 3, 2, 2) * 3 + 1)
    state = norm.state_dict()
    assert set(state) == {"log_scale", "bias", "initialized"}
    loaded = ActNorm(3, backend="reference")
    loaded.load_state_dict(state)
    assert loaded.initialized
    x = torch.randn(5, 3, 2, 2)
    y_loaded, _ = loaded(x)  # training mode: a loaded, initialized layer must not initialize again
    torch.testing.assert_close(y_loaded, norm(x)[0])
    torch.testing.assert_close(loaded.bias, norm.bias)
    # Loading an uninitialized state re-arms the initialization.
    norm.load_state_dict(ActNorm(3).state_dict())
    norm(torch.randn(8, 3, 2, 2) * 3 + 1)
    assert norm.initialized and norm.bias.abs().sum() > 0


def test_invconv_starts_orthogonal_and_stays_triangular():
    conv = InvConv1x1(6)
    w = conv.weight_matrix()
    torch.testing.assert_close(w @ w.T, torch.eye(6), atol=1e-5, rtol=0)
    _, logdet = conv(torch.randn(2, 6, 3, 3))
    torch.testing.assert_close(logdet, torch.zeros(2), atol=1e-5, rtol=0)
    with torch.no_grad():  # entries outside the triangles do not enter the weight
        conv.lower.add_(torch.triu(torch.randn(6, 6)))
        conv.upper.add_(torch.tril(torch.randn(6, 6)))
    torch.testing.assert_close(conv.weight_matrix(), w)
    assert set(conv.state_dict()) == {"perm", "sign_s", "lower", "upper", "log_s"}
    torch.manual_seed(3)
    a = InvConv1x1(4).weight_matrix()
    torch.manual_seed(3)
    torch.testing.assert_close(InvConv1x1(4).weight_matrix(), a)


def test_gradients_reach_every_parameter():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    for module in (perturb(AffineCoupling(4, 8, backend="reference"), 0.1), perturb(ActNorm(4), 0.1), InvConv1x1(4)):
        y, logdet = module(x)
        (y.square().sum() + logdet.sum()).backward()
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bad_arguments():
    with pytest.raises(ValueError, match="channels must be >= 2"):
        AffineCoupling(1, 8)
    with pytest.raises(ValueError, match="scale must be one of"):
        AffineCoupling(4, 8, scale="tanh")
    with pytest.raises(ValueError, match="clamp must be"):
        AffineCoupling(4, 8, clamp=0.0)
    with pytest.raises(ValueError, match="hidden_channels .* is required"):
        AffineCoupling(4)
    with pytest.raises(ValueError, match="not both"):
        AffineCoupling(4, 8, conditioner=torch.nn.Identity())
    with pytest.raises(ValueError, match="hidden_channels must be a positive int"):
        AffineCoupling(4, 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        AffineCoupling(4, 8, backend="fast")
    with pytest.raises(ValueError, match="channels must be a positive int"):
        ActNorm(0)
    with pytest.raises(ValueError, match="lu must be a bool"):
        InvConv1x1(3, lu="yes")
    with pytest.raises(ValueError, match=r"x must be \(N, C, \*spatial\) with C = 4, got shape \(2, 3, 2, 2\)"):
        AffineCoupling(4, 8)(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="with C = 3"):
        ActNorm(3).inverse(torch.randn(2, 4))
    with pytest.raises(ValueError, match="with C = 3"):
        InvConv1x1(3)(torch.randn(3))
    with pytest.raises(ValueError, match="the conditioner must map"):
        AffineCoupling(4, conditioner=torch.nn.Identity())(torch.randn(2, 4, 2, 2))


def test_triton_coupling_module_matches_reference(device):
    """One small check of the coupling layer on the Triton backend (interpreter on CPU), values and gradients."""
    x = torch.randn(2, 4, 3, 5, device=device)
    reason = genkernels.explain("affine_coupling", x, torch.randn(2, 4, 3, 5, device=device))["triton"]
    if reason is not None:
        pytest.skip(f"triton backend cannot run here: {reason}")
    module = perturb(AffineCoupling(4, 6, backend="reference"), 0.1).to(device)
    results = []
    for backend in ("reference", "triton"):
        module.backend = backend
        xb = x.clone().requires_grad_()
        y, logdet = module(xb)
        with torch.no_grad():  # differentiated inverse calls run on the reference only
            x_back, _ = module.inverse(y)
        module.zero_grad()
        (y.square().sum() + logdet.sum()).backward()
        results.append((y, logdet, x_back, xb.grad, module.net[0].weight.grad.clone()))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_triton_actnorm_module_matches_reference(device):
    x = torch.randn(3, 5, 2, 3, device=device)
    reason = genkernels.explain("actnorm", x, torch.zeros(5, device=device), torch.zeros(5, device=device))["triton"]
    if reason is not None:
        pytest.skip(f"triton backend cannot run here: {reason}")
    norm = perturb(ActNorm(5), 0.1).eval().to(device)
    results = []
    for backend in ("reference", "triton"):
        norm.backend = backend
        xb = x.clone().requires_grad_()
        y, logdet = norm(xb)
        with torch.no_grad():
            x_back, _ = norm.inverse(y)
        norm.zero_grad()
        (y.square().sum() + logdet.sum()).backward()
        results.append((y, logdet, x_back, xb.grad, norm.log_scale.grad.clone(), norm.bias.grad.clone()))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 3, 2, 2), (2, 3, 0, 2), (0, 3)], ids=str)
def test_actnorm_empty_batch_does_not_initialize(shape):
    """An empty first training batch set bias = -mean and log_scale = -log(std + eps) of no data: NaN, marked
    initialized, so every later output was NaN. It now leaves the layer to the next non-empty batch; an
    explicit initialize() from it is a ValueError."""
    norm = ActNorm(3, backend="reference")
    y, logdet = norm(torch.randn(shape))
    assert y.shape == shape and logdet.shape == (shape[0],)
    assert not norm.initialized and torch.equal(norm.log_scale.detach(), torch.zeros(3))
    x = torch.randn(8, 3, 2, 2) * 3 + 1
    y, _ = norm(x)
    assert norm.initialized
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cannot initialize from an empty batch"):
        ActNorm(3).initialize(torch.randn(shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lu", [True, False])
def test_invconv_logdet_of_half_parameters_accumulates_in_float32(dtype, lu):
    """A half-precision InvConv1x1 summed log |det W| in its parameters' dtype and rounded it there before
    multiplying by the positions: S * round(log |det W|) was off by up to S / 2 ulp (0.07 nats at 16x16 in
    float16, 1 nat in bfloat16). The log-det now accumulates in float32, as DESIGN.md asks."""
    conv = perturb(InvConv1x1(8, lu=lu), 0.3).to(dtype)
    x = torch.randn(2, 8, 16, 16, dtype=dtype)
    _, logdet = conv(x)
    _, inv_logdet = conv.inverse(x)
    with torch.no_grad():
        if lu:
            truth = conv.log_s.double().sum()
        else:
            truth = torch.linalg.slogdet(conv.weight.double())[1]
    expected = (256 * truth).float().expand(2)
    assert logdet.dtype == torch.float32
    torch.testing.assert_close(logdet, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(inv_logdet, -expected, rtol=1e-6, atol=1e-5)
    assert conv.log_abs_det().dtype == dtype  # the public scalar keeps the parameters' dtype
