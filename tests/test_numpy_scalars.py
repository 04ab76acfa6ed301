"""NumPy scalars wherever Python numbers are accepted: the same results as the equal Python number, Python
numbers only past the checks (in configs and at the kernel launchers), and bools and NaN refused as before."""

from __future__ import annotations

import dataclasses
import importlib
import json

import numpy as np
import pytest
import torch

import genkernels
from genkernels import nn, ops
from genkernels._checks import as_number, is_integer, is_real, nonnegative_float, positive_int
from genkernels.models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    DiT,
    DiTConfig,
    GANConfig,
    Generator,
    Glow,
    GlowConfig,
    ImageGPT,
    ImageGPTConfig,
    RealNVP2D,
    UNetConfig,
)
from genkernels.models.gan import update_ema
from genkernels.ops.schedule import StepCoeffs
from genkernels.schedulers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler


@pytest.fixture(autouse=True)
def _reference():
    with genkernels.backend("reference"):
        yield


def _py(value):
    """The Python number equal to a NumPy scalar."""
    return value.item()


def _python_numbers_only(obj) -> None:
    """Every number among a dataclass's fields (and in its tuples) is a Python int or float."""
    for field in dataclasses.fields(obj):
        values = getattr(obj, field.name)
        for value in values if isinstance(values, tuple) else (values,):
            if isinstance(value, np.generic):
                raise AssertionError(f"{type(obj).__name__}.{field.name} holds {value!r}")


def _same(a, b) -> None:
    """torch.equal on tensors, item by item in tuples and lists."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)


# --------------------------------------------------------------------------- the shared helpers


@pytest.mark.parametrize(
    "value, real, integer, converted",
    [
        (1.5, True, False, 1.5),
        (3, True, True, 3),
        (np.float16(0.5), True, False, 0.5),
        (np.float32(0.25), True, False, 0.25),
        (np.float64(2.0), True, False, 2.0),
        (np.int8(-3), True, True, -3),
        (np.int64(32), True, True, 32),
        (np.uint8(7), True, True, 7),
        (True, False, False, True),
        (np.bool_(True), False, False, np.bool_(True)),
        ("3", False, False, "3"),
        (None, False, False, None),
    ],
)
def test_helpers(value, real, integer, converted):
    assert is_real(value) is real
    assert is_integer(value) is integer
    out = as_number(value)
    assert out == converted and type(out) is type(converted)


def test_checks_return_python_numbers():
    assert type(positive_int("n", np.int64(4))) is int and positive_int("n", np.uint16(4)) == 4
    assert type(nonnegative_float("eps", np.float32(0.5))) is float and nonnegative_float("eps", np.int8(2)) == 2.0
    assert type(nonnegative_float("eps", np.float64(0.5))) is float
    for bad in (np.float64(2.0), 2.0, "2", np.bool_(True), True, torch.tensor(2)):
        with pytest.raises(ValueError, match="n must be a positive int"):
            positive_int("n", bad)
    for bad in (np.float32("nan"), np.float32("inf"), np.float32(-1), np.bool_(False), "1", torch.tensor(1.0)):
        with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
            nonnegative_float("eps", bad)


# --------------------------------------------------------------------------- ops


def test_group_norm():
    x = torch.randn(2, 4, 3, 3)
    _same(ops.group_norm(x, np.int64(2), eps=np.float32(0.25)), ops.group_norm(x, 2, eps=0.25))
    _same(nn.GroupNorm(np.int32(2), 4, eps=np.float16(0.5))(x), nn.GroupNorm(2, 4, eps=0.5)(x))


@pytest.mark.parametrize(
    "module, launcher, call, positions",
    [
        (
            "genkernels.triton.group_norm",
            "group_norm_forward",
            lambda x, groups, eps: ops.group_norm(x, groups, eps=eps, backend="triton"),
            (3, 4),
        ),
        (
            "genkernels.triton.schedule",
            "schedule_step",
            lambda x, seed, scale: ops.schedule_step(
                x, torch.cat([x, x]), StepCoeffs(px=scale, cn=scale), guidance_scale=scale, seed=seed, backend="triton"
            ),
            (4, 5, 8),
        ),
    ],
)
def test_launchers_get_python_numbers(monkeypatch, module, launcher, call, positions, device):
    """NumPy scalars reach the triton launchers as the equal Python numbers (and give the same results)."""
    target = importlib.import_module(module)
    original, seen = getattr(target, launcher), []

    def spy(*args):
        numbers = []
        for i in positions:
            numbers.extend(args[i].values() if isinstance(args[i], StepCoeffs) else [args[i]])
        seen.append(numbers)
        return original(*args)

    monkeypatch.setattr(target, launcher, spy)
    x = torch.randn(2, 4, 2, 2, device=device)
    out_np = call(x, np.int64(2), np.float32(0.5))
    out_py = call(x, 2, 0.5)
    _same(out_np, out_py)
    assert len(seen) == 2 and seen[0] == seen[1]
    assert [type(v) for v in seen[0]] == [type(v) for v in seen[1]] and all(type(v) in (int, float) for v in seen[0])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bias_act_and_layer_norm_modulate(backend, device):
    x, bias = torch.randn(2, 3, 4, 4, device=device), torch.randn(3, device=device)
    numpy_args = dict(alpha=np.float32(0.1), gain=np.float16(2.0), clamp=np.float32(0.5), dim=np.int64(1))
    _same(
        ops.bias_act(x, bias, act="lrelu", backend=backend, **numpy_args),
        ops.bias_act(x, bias, act="lrelu", backend=backend, **{k: _py(v) for k, v in numpy_args.items()}),
    )
    h, shift, scale = (torch.randn(*shape, device=device) for shape in ((2, 5, 8), (2, 8), (2, 8)))
    eps = np.float32(1e-3)
    _same(
        ops.layer_norm_modulate(h, None, None, shift, scale, eps=eps, backend=backend),
        ops.layer_norm_modulate(h, None, None, shift, scale, eps=_py(eps), backend=backend),
    )


def test_bias_act_launcher_gets_python_numbers(monkeypatch, device):
    """bias_act's NumPy alpha, gain and clamp reach the triton launcher as Python floats."""
    target = importlib.import_module("genkernels.triton.bias_act")
    original, seen = target._launch_args, []

    def spy(x, bias, act, alpha, gain, clamp, dim):
        seen.append((alpha, gain, clamp, dim))
        return original(x, bias, act, alpha, gain, clamp, dim)

    monkeypatch.setattr(target, "_launch_args", spy)
    x, bias = torch.randn(2, 3, 4, device=device), torch.randn(3, device=device)
    ops.bias_act(
        x, bias, act="lrelu", alpha=np.float32(0.25), gain=np.int64(2), clamp=np.float64(1.5), backend="triton"
    )
    assert seen == [(0.25, 2.0, 1.5, 1)] and all(type(v) in (int, float) for v in seen[0])


def test_swiglu_and_rope():
    x = torch.randn(3, 8)
    _same(ops.swiglu(x, dim=np.int64(-1)), ops.swiglu(x, dim=-1))
    positions = torch.arange(5)
    _same(ops.rope_frequencies(positions, np.int32(8), np.float32(100.0)), ops.rope_frequencies(positions, 8, 100.0))
    _same(
        ops.rope_frequencies_2d(np.int64(2), np.uint8(3), np.int64(8), base=np.float16(64.0)),
        ops.rope_frequencies_2d(2, 3, 8, base=64.0),
    )


def test_attention_scale():
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    scale = np.float32(0.3)
    _same(ops.attention(q, k, v, scale=scale), ops.attention(q, k, v, scale=_py(scale)))
    _same(
        nn.functional.scaled_dot_product_attention(q, k, v, scale=scale),
        nn.functional.scaled_dot_product_attention(q, k, v, scale=_py(scale)),
    )


def test_reparameterize_seed_and_offset():
    mean, logvar = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    _same(
        ops.reparameterize(mean, logvar, seed=np.int64(7), offset=np.uint16(2)),
        ops.reparameterize(mean, logvar, seed=7, offset=2),
    )


def test_coupling_and_modconv():
    x, h = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    clamp = np.float16(1.5)
    _same(
        ops.affine_coupling(x, h, scale="softclamp_tanh", clamp=clamp),
        ops.affine_coupling(x, h, scale="softclamp_tanh", clamp=1.5),
    )
    weight, styles = torch.randn(5, 4, 3, 3), torch.randn(2, 4)
    eps = np.float32(1e-4)
    _same(ops.demodulation_coefficients(weight, styles, eps), ops.demodulation_coefficients(weight, styles, _py(eps)))
    y, noise = torch.randn(2, 5, 3, 3), torch.randn(2, 1, 3, 3)
    _same(
        ops.modconv_epilogue(y, noise=noise, noise_strength=np.float32(0.5)),
        ops.modconv_epilogue(y, noise=noise, noise_strength=0.5),
    )


def test_schedule_step():
    x, out = torch.randn(2, 3, 4), torch.randn(4, 3, 4)
    kwargs = dict(guidance_scale=np.float32(2.5), guidance_rescale=np.float64(0.5), clip_sample=np.int64(1))
    coeffs = StepCoeffs(px=np.float32(0.75), po=np.float32(-0.5), c0=np.float16(0.5), cx=np.int8(1), cn=0.25)
    py_coeffs = StepCoeffs(**{name: as_number(value) for name, value in dataclasses.asdict(coeffs).items()})
    py_kwargs = {name: _py(value) for name, value in kwargs.items()}
    _same(
        ops.schedule_step(x, out, coeffs, seed=np.int64(3), offset=np.int32(1), return_x0=True, **kwargs),
        ops.schedule_step(x, out, py_coeffs, seed=3, offset=1, return_x0=True, **py_kwargs),
    )
    noise = torch.randn(2, 3, 4)
    _same(
        ops.add_noise(x, noise, np.float32(0.75), np.float32(0.5)),
        ops.add_noise(x, noise, 0.75, 0.5),
    )


def test_sampler_steps():
    x, out = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    a, a_prev, eta = np.float32(0.5), np.float32(0.75), np.float32(0.5)
    _same(
        ops.ddim_step(out, x, a, a_prev, eta=eta, seed=np.int64(5), return_x0=True),
        ops.ddim_step(out, x, _py(a), _py(a_prev), eta=_py(eta), seed=5, return_x0=True),
    )
    sigma, sigma_next = np.float32(2.0), np.float16(1.0)
    _same(
        ops.euler_ancestral_step(out, x, sigma, sigma_next, seed=np.uint32(1)),
        ops.euler_ancestral_step(out, x, _py(sigma), _py(sigma_next), seed=1),
    )
    _same(ops.flow_euler_step(out, x, sigma, sigma_next), ops.flow_euler_step(out, x, _py(sigma), _py(sigma_next)))


# --------------------------------------------------------------------------- schedulers


def test_ddim_scheduler():
    def run(n, beta_end, steps, eta, seed):
        scheduler = DDIMScheduler(num_train_timesteps=n, beta_end=beta_end)
        scheduler.set_timesteps(steps)
        t = scheduler.timesteps[1]
        return scheduler, scheduler.step(out, t, x, eta=eta, seed=seed, return_dict=False)

    torch.manual_seed(0)
    x, out = torch.randn(2, 3), torch.randn(2, 3)
    with_np, result_np = run(np.int64(50), np.float32(0.02), np.int64(5), np.float32(0.5), np.int64(3))
    with_py, result_py = run(50, _py(np.float32(0.02)), 5, 0.5, 3)
    _same(result_np, result_py)
    assert dict(with_np.config) == dict(with_py.config)
    assert not any(isinstance(v, np.generic) for v in with_np.config.values())


def test_flow_match_and_dpm_schedulers():
    shift = np.float32(3.0)
    with_np, with_py = FlowMatchEulerDiscreteScheduler(shift=shift), FlowMatchEulerDiscreteScheduler(shift=3.0)
    _same(with_np.sigmas, with_py.sigmas)
    assert type(with_np.shift) is float and type(with_np.config.shift) is float
    dpm = DPMSolverMultistepScheduler(num_train_timesteps=np.int64(100), solver_order=np.int64(2))
    assert type(dpm.order) is int and len(dpm) == 100


# --------------------------------------------------------------------------- layers


def _build_twice(build, np_args, py_args):
    torch.manual_seed(0)
    with_np = build(*np_args)
    torch.manual_seed(0)
    with_py = build(*py_args)
    _same(list(with_np.state_dict().values()), list(with_py.state_dict().values()))
    return with_np, with_py


def test_flow_layers():
    x = torch.randn(2, 4, 3, 3)
    for build, np_args, py_args in [
        (lambda c, h, k: nn.AffineCoupling(c, h, clamp=k), (np.int64(4), np.int32(8), np.float32(1.5)), (4, 8, 1.5)),
        (lambda c, e: nn.ActNorm(c, eps=e), (np.int64(4), np.float32(0.5)), (4, 0.5)),
        (lambda c: nn.InvConv1x1(c), (np.int64(4),), (4,)),
    ]:
        with_np, with_py = _build_twice(build, np_args, py_args)
        assert type(with_np.channels) is int
        _same(with_np(x), with_py(x))


def test_modconv_layers():
    with_np, with_py = _build_twice(
        lambda i, o, m: nn.EqualizedLinear(i, o, act="lrelu", lr_mul=m),
        (np.int64(4), np.int64(3), np.float16(0.5)),
        (4, 3, 0.5),
    )
    assert type(with_np.lr_mul) is float
    z = torch.randn(2, 4)
    _same(with_np(z), with_py(z))
    with_np, with_py = _build_twice(
        lambda i, o, k, w, r, c: nn.ModulatedConv2d(i, o, k, w, resolution=r, conv_clamp=c),
        (np.int64(4), np.int64(3), np.int64(3), np.int64(2), np.int64(3), np.float32(0.5)),
        (4, 3, 3, 2, 3, 0.5),
    )
    assert [type(v) for v in (with_np.in_channels, with_np.kernel_size, with_np.resolution, with_np.conv_clamp)] == [
        int,
        int,
        int,
        float,
    ]
    x, w = torch.randn(2, 4, 3, 3), torch.randn(2, 2)
    _same(with_np(x, w, noise_mode="const"), with_py(x, w, noise_mode="const"))


def test_transformer_layers():
    x = torch.randn(2, 3, 8)
    for build, np_args, py_args in [
        (lambda d, e: nn.LayerNormModulate(d, e, elementwise_affine=True), (np.int64(8), np.float32(0.25)), (8, 0.25)),
        (lambda d, h: nn.SwiGLU(d, h), (np.int64(8), np.int32(6)), (8, 6)),
        (lambda d, h: nn.GeluMLP(d, h), (np.int64(8), np.int32(6)), (8, 6)),
        (lambda d, h: nn.CausalSelfAttention(d, h), (np.int64(8), np.int64(2)), (8, 2)),
    ]:
        with_np, with_py = _build_twice(build, np_args, py_args)
        _same(with_np(x), with_py(x))
    rotary = nn.RotaryEmbedding(np.int64(4), np.int64(6), base=np.float32(100.0))
    assert (type(rotary.dim_head), type(rotary.max_len), type(rotary.base)) == (int, int, float)
    _same(rotary(1, 3), nn.RotaryEmbedding(4, 6, base=100.0)(1, 3))
    cache = nn.KVCache(np.int64(2), np.int64(2), np.int64(5), np.int64(4))
    assert cache.k.shape == (2, 2, 5, 4) and type(cache.max_len) is int


# --------------------------------------------------------------------------- model configs and models


@pytest.mark.parametrize(
    "config_class, numpy_fields",
    [
        (
            UNetConfig.tiny,
            dict(
                sample_size=np.int64(8),
                heads=np.int64(2),
                norm_num_groups=np.int32(4),
                num_classes=np.int64(3),
                cross_attention_dim=np.int64(16),
                dropout=np.float32(0.25),
            ),
        ),
        (
            DiTConfig.tiny,
            dict(
                dim=np.int64(32),
                heads=np.int64(2),
                mlp_ratio=np.float32(2.5),
                eps=np.float32(1e-6),
                rope_base=np.int64(100),
            ),
        ),
        (
            ImageGPTConfig,
            dict(image_size=np.int64(4), levels=np.int64(8), num_classes=np.uint8(2), eps=np.float32(1e-5)),
        ),
        (
            GANConfig.tiny,
            dict(resolution=np.int64(8), z_dim=np.int64(16), r1_gamma=np.float32(0.5), conv_clamp=np.int64(256)),
        ),
        (GlowConfig.tiny, dict(levels=np.int64(2), clamp=np.float16(1.5), image_size=(np.int64(4), np.int64(8)))),
        (
            AutoencoderKLConfig.tiny,
            dict(
                block_out_channels=np.int64(8),
                latent_channels=np.int64(2),
                norm_num_groups=np.int64(4),
                sample_size=np.int64(8),
            ),
        ),
    ],
)
def test_model_configs(config_class, numpy_fields):
    python_fields = {
        name: tuple(_py(v) for v in value) if isinstance(value, tuple) else _py(value)
        for name, value in numpy_fields.items()
    }
    with_np, with_py = config_class(**numpy_fields), config_class(**python_fields)
    _python_numbers_only(with_np)
    assert with_np.to_json() == with_py.to_json()
    assert json.loads(with_np.to_json()) == json.loads(with_py.to_json())


def test_dit_timestep():
    torch.manual_seed(0)
    model = DiT(DiTConfig.tiny(num_classes=0)).eval()
    for p in model.parameters():  # past adaLN-Zero's initialization, where the output does not depend on t
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 1, 8, 8)
    t = np.float64(517.3)  # a float64 tensor from torch.as_tensor, where Python's 517.3 gives float32
    _same(model(x, t), model(x, 517.3))
    _same(model(x, np.float32(3.5)), model(x, 3.5))


def test_image_gpt_sampling():
    torch.manual_seed(0)
    model = ImageGPT(ImageGPTConfig(image_size=2, levels=4, num_classes=3, dim=16, depth=1, heads=2)).eval()
    _same(
        model.sample_tokens(np.int64(2), np.int64(1), np.float32(0.5), np.int64(3), np.int64(9), use_cache=False),
        model.sample_tokens(2, 1, 0.5, 3, 9, use_cache=False),
    )


def test_flow_sampling():
    torch.manual_seed(0)
    _same(
        list(Glow(np.int64(1), np.int64(2), np.int32(2), np.int64(8), image_size=np.int64(4)).state_dict().values()),
        list((torch.manual_seed(0), Glow(1, 2, 2, 8, image_size=4))[1].state_dict().values()),
    )
    torch.manual_seed(0)
    glow = Glow.from_config(GlowConfig.tiny()).eval()
    _same(
        glow.sample(np.int64(2), np.float32(0.5), seed=np.int64(1), image_size=np.int64(4)),
        glow.sample(2, 0.5, seed=1, image_size=4),
    )
    torch.manual_seed(0)
    flow = RealNVP2D(np.int64(8), np.int64(2)).eval()
    _same(flow.sample(np.int64(3), np.float32(0.5), seed=1), flow.sample(3, 0.5, seed=1))


def test_gan_truncation_and_ema():
    torch.manual_seed(0)
    generator = Generator(GANConfig.tiny()).eval()
    z = torch.randn(2, generator.config.z_dim)
    _same(generator.mapping(z, 0.5, np.int64(2)), generator.mapping(z, 0.5, 2))
    ema_np, ema_py = Generator(GANConfig.tiny()), Generator(GANConfig.tiny())
    ema_py.load_state_dict(ema_np.state_dict())
    update_ema(ema_np, generator, np.float32(0.5))
    update_ema(ema_py, generator, 0.5)
    _same(list(ema_np.state_dict().values()), list(ema_py.state_dict().values()))


def test_vae_tiling():
    model = AutoencoderKL(AutoencoderKLConfig.tiny())
    model.enable_tiling(np.int64(8), np.float32(0.25))
    assert (type(model.tile_sample_min_size), type(model.tile_latent_min_size)) == (int, int)
    assert model.tile_sample_min_size == 8 and model.tile_overlap_factor == 0.25


# --------------------------------------------------------------------------- training configs and sampling


def test_train_configs():
    from genkernels.train import Schedule, TrainConfig
    from genkernels.train_flow import FlowTrainConfig
    from genkernels.train_gan import GANTrainConfig
    from genkernels.train_transformer import TransformerTrainConfig
    from genkernels.train_vae import VAETrainConfig

    common = dict(steps=np.int64(3), batch_size=np.int32(2), lr=np.float32(0.5), seed=np.int64(1))
    for config_class, extra in [
        (TrainConfig, dict(ema_decay=np.float32(0.5), grad_clip=np.float16(1.0))),
        (FlowTrainConfig, dict(n_bins=np.int64(17), heldout=np.float32(0.25), weight_decay=np.float32(0.0))),
        (GANTrainConfig, dict(r1_gamma=np.float32(0.5), r1_interval=np.int64(4))),
        (TransformerTrainConfig, dict(warmup=np.int64(1), levels=np.int64(4), weight_decay=np.float32(0.25))),
        (VAETrainConfig, dict(beta=np.float32(0.25), grad_clip=np.float32(0.5))),
    ]:
        fields = {**common, **extra}
        with_np, with_py = config_class(**fields), config_class(**{k: _py(v) for k, v in fields.items()})
        _python_numbers_only(with_np)
        assert with_np == with_py
    schedule = Schedule(num_train_timesteps=np.int64(10), beta_start=np.float32(0.25))
    assert json.dumps(schedule.__dict__) == json.dumps(Schedule(10, beta_start=0.25).__dict__)


def test_sample_gan(tmp_path):
    from genkernels.train_gan import sample_gan

    torch.manual_seed(0)
    generator = Generator(GANConfig.tiny()).eval()
    with_np = sample_gan(generator, np.int64(2), 1, tmp_path / "np.png", truncation=np.float32(0.5))
    with_py = sample_gan(generator, 2, 1, tmp_path / "py.png", truncation=0.5)
    _same(with_np.images, with_py.images)


# --------------------------------------------------------------------------- still refused


def _conv_clamp_config(value):
    return GANConfig.tiny(conv_clamp=value)


def _image_gpt():
    torch.manual_seed(0)
    return ImageGPT(ImageGPTConfig(image_size=2, levels=4, num_classes=0, dim=16, depth=1, heads=2))


_X = torch.randn(2, 4, 2, 2)
_NAN, _TRUE = (np.float32("nan"), float("nan")), (np.bool_(True), True)
REFUSED = [
    ("group_norm eps", lambda v: ops.group_norm(_X, 2, eps=v), _NAN),
    ("bias_act alpha", lambda v: ops.bias_act(_X, act="lrelu", alpha=v), _NAN),
    ("bias_act dim", lambda v: ops.bias_act(_X, torch.zeros(4), dim=v), _TRUE),
    ("layer_norm_modulate eps", lambda v: ops.layer_norm_modulate(_X[0], None, None, None, None, eps=v), _NAN),
    ("group_norm groups", lambda v: ops.group_norm(_X, v), _TRUE),
    ("group_norm groups float", lambda v: ops.group_norm(_X, v), (np.float64(2.0), 2.0)),
    (
        "schedule_step guidance",
        lambda v: ops.schedule_step(_X, torch.cat([_X, _X]), StepCoeffs(), guidance_scale=v),
        _NAN,
    ),
    ("schedule_step seed", lambda v: ops.schedule_step(_X, _X, StepCoeffs(), seed=v), _TRUE),
    ("attention scale", lambda v: ops.attention(_X, _X, _X, scale=v), _NAN),
    ("reparameterize offset", lambda v: ops.reparameterize(_X, _X, offset=v), _TRUE),
    ("affine_coupling clamp", lambda v: ops.affine_coupling(_X, _X, scale="exp", clamp=v), _NAN),
    ("rope_frequencies dim", lambda v: ops.rope_frequencies(torch.arange(3), v), _TRUE),
    ("ddim_step eta", lambda v: ops.ddim_step(_X, _X, 0.5, 0.75, eta=v), _NAN),
    ("DDIMScheduler", lambda v: DDIMScheduler(num_train_timesteps=v), _TRUE),
    ("AffineCoupling clamp", lambda v: nn.AffineCoupling(4, 8, clamp=v), _NAN),
    ("EqualizedLinear lr_mul", lambda v: nn.EqualizedLinear(4, 3, lr_mul=v), _NAN),
    ("KVCache batch", lambda v: nn.KVCache(v, 2, 5, 4), _TRUE),
    ("RotaryEmbedding dim_head", lambda v: nn.RotaryEmbedding(v, 6), _TRUE),
    ("UNetConfig heads", lambda v: UNetConfig.tiny(heads=v), _TRUE),
    ("DiTConfig eps", lambda v: DiTConfig.tiny(eps=v), _NAN),
    ("DiTConfig dim", lambda v: DiTConfig.tiny(dim=v), _TRUE),
    ("ImageGPTConfig levels", lambda v: ImageGPTConfig(levels=v), _TRUE),
    ("ImageGPTConfig eps", lambda v: ImageGPTConfig(eps=v), _NAN),
    ("GANConfig resolution", lambda v: GANConfig.tiny(resolution=v), _TRUE),
    ("GANConfig conv_clamp", _conv_clamp_config, _NAN),
    ("GlowConfig clamp", lambda v: GlowConfig.tiny(clamp=v), _NAN),
    ("AutoencoderKLConfig latent_channels", lambda v: AutoencoderKLConfig.tiny(latent_channels=v), _TRUE),
    ("ImageGPT temperature", lambda v: _image_gpt().sample_tokens(1, temperature=v), _NAN),
    ("ImageGPT top_k", lambda v: _image_gpt().sample_tokens(1, top_k=v), _TRUE),
]


@pytest.mark.parametrize("call, values", [pytest.param(c, v, id=name) for name, c, v in REFUSED])
def test_refused_as_before(call, values):
    """The NumPy value is refused with the error the equal Python value gets (the value's repr aside)."""
    numpy_value, python_value = values
    with pytest.raises((TypeError, ValueError)) as python_error:
        call(python_value)
    with pytest.raises(type(python_error.value)) as numpy_error:
        call(numpy_value)
    expected = str(python_error.value)
    assert str(numpy_error.value) in (expected, expected.replace(f"{python_value!r}", f"{numpy_value!r}"))
