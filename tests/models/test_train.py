"""Training and sampling the diffusion UNet on CPU: the loss falls, every sampler runs, checkpoints round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genkernels import data, train
from genkernels.models import UNet, UNetConfig


def _tiny_run(digits, objective, steps, out=None, seed=0):
    cfg = train.model_config_for(digits, "tiny")
    config = train.TrainConfig(steps=steps, batch_size=64, objective=objective, seed=seed)
    return train.train_diffusion(digits, cfg, config, out=out, progress=False)


def test_digits_dataset(digits):
    assert len(digits) == 1797 and digits.image_shape == (1, 8, 8) and digits.num_classes == 10
    assert digits.images.dtype == torch.float32
    assert digits.images.min().item() == -1.0 and digits.images.max().item() == 1.0
    assert sorted(digits.labels.unique().tolist()) == list(range(10))
    batches = digits.batches(64, torch.Generator().manual_seed(0))
    x, y = next(batches)
    assert x.shape == (64, 1, 8, 8) and y.shape == (64,)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in (("cats", 2), ("dogs", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    ds = data.image_folder(tmp_path, size=8, channels=3)
    assert ds.images.shape == (5, 3, 8, 8) and ds.class_names == ["cats", "dogs"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 1]
    assert -1.0 <= ds.images.min().item() and ds.images.max().item() <= 1.0
    grey = data.image_folder(tmp_path / "dogs", size=4, channels=1)
    assert grey.images.shape == (3, 1, 4, 4) and grey.class_names == ["dogs"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.image_folder(tmp_path / "missing", size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.image_folder(tmp_path / "empty", size=8)


def test_save_grid_size(tmp_path):
    from PIL import Image

    images = torch.rand(7, 3, 5, 4) * 2 - 1
    w, h = data.save_grid(images, tmp_path / "g.png", ncol=3, scale=2, pad=1)
    assert (w, h) == (3 * (4 * 2 + 1) + 1, 3 * (5 * 2 + 1) + 1)
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (w, h) and im.mode == "RGB"
        pixels = np.asarray(im)
    first = pixels[1:11, 1:9]
    assert (pixels[0] == 128).all() and (pixels[:, 0] == 128).all()  # grey gaps
    np.testing.assert_array_equal(first[::2, ::2], data.to_uint8(images[:1])[0])


def test_training_lowers_the_loss(digits):
    """80 steps of the tiny model, batch 64: the mean loss of the last 10 steps is well below the first 10."""
    result = _tiny_run(digits, "eps", 80)
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
    assert len(result.losses) == 80
    assert last < 0.5 * first, f"loss {first:.4f} (first 10 steps) -> {last:.4f} (last 10)"


@pytest.mark.parametrize("objective", ["v", "flow"])
def test_other_objectives_lower_the_loss(digits, objective):
    result = _tiny_run(digits, objective, 60)
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
    assert last < 0.8 * first, f"{objective}: loss {first:.4f} (first 10 steps) -> {last:.4f} (last 10)"


@pytest.fixture(scope="module")
def checkpoints(digits, tmp_path_factory):
    """Short eps and flow runs saved as checkpoints (enough to exercise sampling, not to draw digits)."""
    paths = {}
    for objective in ("eps", "flow"):
        out = tmp_path_factory.mktemp(objective)
        _tiny_run(digits, objective, 5, out=out)
        paths[objective] = out / "diffusion.safetensors"
    return paths


def test_checkpoint_round_trip(checkpoints, digits):
    model, meta = train.load_checkpoint(checkpoints["eps"])
    raw, _ = train.load_checkpoint(checkpoints["eps"], ema=False)
    assert meta["objective"] == "eps" and meta["step"] == 5 and meta["image_shape"] == [1, 8, 8]
    assert meta["class_names"] == digits.class_names
    assert model.config == train.model_config_for(digits, "tiny")
    ema_state, raw_state = model.state_dict(), raw.state_dict()
    assert ema_state.keys() == raw_state.keys()
    assert any(not torch.equal(ema_state[k], raw_state[k]) for k in ema_state)
    # save -> load gives back the same tensors exactly.
    again = checkpoints["eps"].parent / "again.safetensors"
    train.save_checkpoint(again, raw, model, meta)
    raw2, meta2 = train.load_checkpoint(again, ema=False)
    ema2, _ = train.load_checkpoint(again)
    assert meta2 == meta
    for k in raw_state:
        assert torch.equal(raw2.state_dict()[k], raw_state[k]) and torch.equal(ema2.state_dict()[k], ema_state[k])


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.read_metadata(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors checkpoint"):
        train.read_metadata(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a genkernels diffusion checkpoint"):
        train.read_metadata(tmp_path / "plain.safetensors")


SAMPLERS_BY_OBJECTIVE = [(s, "flow" if s == "flow" else "eps") for s in sorted(train.SAMPLERS)]


@pytest.mark.parametrize("sampler,objective", SAMPLERS_BY_OBJECTIVE)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_every_sampler_runs(checkpoints, sampler, objective, guidance):
    model, meta = train.load_checkpoint(checkpoints[objective])
    labels = torch.tensor([0, 3, 9, model.null_label])
    x = train.sample_diffusion(model, meta, labels, sampler=sampler, steps=3, guidance=guidance, seed=1)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    again = train.sample_diffusion(model, meta, labels, sampler=sampler, steps=3, guidance=guidance, seed=1)
    torch.testing.assert_close(again, x, rtol=0, atol=0)


def test_sampler_must_fit_the_objective(checkpoints):
    model, meta = train.load_checkpoint(checkpoints["eps"])
    with pytest.raises(ValueError, match="sampler 'flow' needs a model trained with objective flow.*'eps'"):
        train.sample_diffusion(model, meta, torch.tensor([1]), sampler="flow", steps=2)
    flow_model, flow_meta = train.load_checkpoint(checkpoints["flow"])
    with pytest.raises(ValueError, match="sampler 'ddim' needs a model trained with objective eps or v"):
        train.sample_diffusion(flow_model, flow_meta, torch.tensor([1]), sampler="ddim", steps=2)


def test_training_pair_targets():
    """The eps, v and flow pairs from their formulas (module doc of genkernels.train)."""
    schedule = train.Schedule()
    sched = train.make_noise_scheduler(schedule, "v")
    x0, noise = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    x_t, t, target = train.training_pair(x0, noise, "v", schedule, sched, torch.Generator().manual_seed(0))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)[t].float().view(4, 1, 1, 1)
    torch.testing.assert_close(x_t, ac.sqrt() * x0 + (1 - ac).sqrt() * noise)
    torch.testing.assert_close(target, ac.sqrt() * noise - (1 - ac).sqrt() * x0)
    x_u, t_u, v = train.training_pair(x0, noise, "flow", schedule, None, torch.Generator().manual_seed(0))
    u = (t_u / 1000).view(4, 1, 1, 1)
    torch.testing.assert_close(x_u, (1 - u) * x0 + u * noise)
    torch.testing.assert_close(v, noise - x0)


def test_config_errors(digits):
    with pytest.raises(ValueError, match="objective must be one of"):
        train.TrainConfig(objective="x0")
    with pytest.raises(ValueError, match="num_classes=3 but the data has 10 classes"):
        train.train_diffusion(digits, UNetConfig.tiny(num_classes=3), train.TrainConfig(steps=1), progress=False)
    assert isinstance(UNet(train.model_config_for(digits, "small")), UNet)


class _Oracle(torch.nn.Module):
    """The exact model for data that is one image per label: x0 = targets[label], whatever the input.

    Its output is the objective's target for that x0 at the input's noise level, so every sampler,
    run with it, must end at x0 exactly, and with guidance g at x0_null + g (x0_label - x0_null)
    (every target is linear in x0). Noise level of timestep t (fractional for Euler): VP sigma
    interpolated linearly in t as diffusers' Euler does; flow: u = t / T.
    """

    def __init__(self, targets: torch.Tensor, objective: str, schedule: train.Schedule) -> None:
        super().__init__()
        self.targets = torch.nn.Parameter(targets, requires_grad=False)
        self.objective, self.schedule = objective, schedule
        betas = torch.linspace(
            schedule.beta_start, schedule.beta_end, schedule.num_train_timesteps, dtype=torch.float64
        )
        abar = torch.cumprod(1 - betas, 0)
        self.train_sigmas = ((1 - abar) / abar).sqrt().numpy()

    @property
    def null_label(self) -> int:
        return self.targets.shape[0] - 1

    def forward(self, x, t, labels):
        x0 = self.targets[labels].double()
        t = float(t)
        if self.objective == "flow":
            u = t / self.schedule.num_train_timesteps
            return ((x.double() - x0) / u).float()
        sigma = float(np.interp(t, np.arange(len(self.train_sigmas)), self.train_sigmas))
        a, s = 1 / (1 + sigma**2) ** 0.5, sigma / (1 + sigma**2) ** 0.5
        eps = (x.double() - a * x0) / s
        return (eps if self.objective == "eps" else a * eps - s * x0).float()


@pytest.mark.parametrize("objective", ["eps", "v", "flow"])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_samplers_reach_the_exact_models_target(objective, guidance):
    """With the exact model every sampler lands on its x0: the loop's timesteps, input scaling and guidance."""
    schedule = train.Schedule()
    targets = torch.rand(4, 1, 4, 4) * 0.6 - 0.3  # labels 0-2 and the null label 3; guided targets stay in [-1, 1]
    oracle = _Oracle(targets, objective, schedule)
    meta = {"objective": objective, "schedule": schedule.__dict__, "image_shape": [1, 4, 4]}
    labels = torch.tensor([0, 1, 2, 2])
    want = targets[3] + guidance * (targets[labels] - targets[3])
    samplers = [s for s, (_, objectives) in train.SAMPLERS.items() if objective in objectives]
    for sampler in samplers:
        x = train.sample_diffusion(oracle, meta, labels, sampler=sampler, steps=4, guidance=guidance, seed=0)
        err = (x - want).abs().max().item()
        assert err < 2e-3, f"{sampler} ({objective}, guidance {guidance}): max error {err:.3g} from the target"


class _Recorder(torch.nn.Module):
    """A model that predicts zeros and records the labels of every call (it checks none of them itself)."""

    def __init__(self, null_label: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.null_label = null_label
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, labels):
        self.seen.append(labels.clone())
        return torch.zeros_like(x)


def _meta(objective: str = "eps", **entries) -> dict:
    return {"objective": objective, "schedule": train.Schedule().__dict__, "image_shape": [1, 2, 2], **entries}


@pytest.mark.parametrize(
    "labels,error,match",
    [
        (torch.tensor([0, 11]), ValueError, r"labels must be class labels in \[0, 10\] \(10: the null label\), got 11"),
        (torch.tensor([-1, 3]), ValueError, r"labels must be class labels in \[0, 10\] .*got -1"),
        (torch.tensor([1.0]), TypeError, r"labels must be an integer tensor, got torch.float32"),
        (torch.tensor([True]), TypeError, r"labels must be an integer tensor, got torch.bool"),
    ],
)
def test_sample_checks_the_labels_before_the_model(labels, error, match):
    """Out-of-range labels reached the model: on a GPU its embedding fails with a device-side assert that ends
    the process's CUDA context (the models check label values on the CPU only)."""
    model = _Recorder(null_label=10)
    with pytest.raises(error, match=match):
        train.sample_diffusion(model, _meta(), labels, sampler="ddim", steps=2)
    assert model.seen == []


def test_guided_sampling_keeps_the_null_label_in_small_integer_dtypes():
    """uint8 labels of a model whose null label is 300: the unconditional half was filled with 300 as uint8, i.e.
    44, a class label, so "guidance" mixed two conditional predictions with no error."""
    model = _Recorder(null_label=300)
    labels = torch.tensor([1, 2], dtype=torch.uint8)
    train.sample_diffusion(model, _meta(), labels, sampler="ddim", steps=1, guidance=2.0)
    assert model.seen[0].tolist() == [300, 300, 1, 2]


def test_sample_steps_beyond_the_training_timesteps_name_steps():
    """The error named num_inference_steps, an argument of the scheduler the caller never passed."""
    meta = _meta(schedule=train.Schedule(num_train_timesteps=10).__dict__)
    with pytest.raises(ValueError, match=r"steps must be at most the 10 timesteps the model was trained on, got 11"):
        train.sample_diffusion(_Recorder(3), meta, torch.tensor([0]), sampler="ddim", steps=11)


@pytest.mark.parametrize(
    "entries,match",
    [
        ({"num_train_timesteps": 0}, r"num_train_timesteps must be >= 1, got 0"),
        ({"num_train_timesteps": 10.5}, r"num_train_timesteps must be an int >= 1, got 10.5"),
        ({"num_train_timesteps": True}, r"num_train_timesteps must be an int >= 1, got True"),
        ({"beta_schedule": "cosine"}, r"beta_schedule must be one of \('linear', .*got 'cosine'"),
        ({"beta_start": -1e-4}, r"beta_start must be a number in \(0, 1\), got -0.0001"),
        ({"beta_end": float("nan")}, r"beta_end must be a number in \(0, 1\), got nan"),
        ({"beta_end": 2.0}, r"beta_end must be a number in \(0, 1\), got 2.0"),
    ],
)
def test_schedule_refuses_values_it_cannot_train_with(entries, match):
    """All were accepted: T = 0 trained the flow objective at t = 0 for every noise level (u * T) with no error
    and failed only at sampling; betas outside (0, 1) gave NaN noise levels, a diverged run."""
    with pytest.raises(ValueError, match=match):
        train.Schedule(**entries)


@pytest.mark.parametrize("name", ["grad_clip", "weight_decay"])
@pytest.mark.parametrize("value", [float("nan"), -1.0, float("inf")])
def test_train_config_checks_grad_clip_and_weight_decay(name, value):
    """grad_clip NaN or negative turned the clipping off with no error (``if grad_clip > 0``)."""
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0, got {value!r}"):
        train.TrainConfig(**{name: value})


def test_a_model_trained_without_label_dropout_refuses_guidance(digits):
    """label_dropout 0 never trains the null label, whose embedding stays at its initialization: guided (or
    unconditional) samples mixed in an untrained prediction with no error. The checkpoint now records the rate."""
    small = data.ImageDataset(digits.images[:8], digits.labels[:8], digits.class_names)
    cfg = train.model_config_for(small, "tiny")
    result = train.train_diffusion(
        small, cfg, train.TrainConfig(steps=1, batch_size=4, label_dropout=0.0), progress=False
    )
    assert result.metadata["label_dropout"] == 0.0
    model, meta = result.ema, result.metadata
    for guidance, labels in ((3.0, [1]), (0.0, [1]), (1.0, [1, model.null_label])):
        with pytest.raises(ValueError, match=r"trained with label_dropout 0: it never learned the unconditional"):
            train.sample_diffusion(model, meta, torch.tensor(labels), sampler="ddim", steps=1, guidance=guidance)
    x = train.sample_diffusion(model, meta, torch.tensor([1, 2]), sampler="ddim", steps=1, guidance=1.0)
    assert x.shape == (2, 1, 8, 8)


def test_train_config_checks_the_schedule_type():
    """A dict schedule (as the checkpoint metadata holds it) was an AttributeError at the first training step."""
    with pytest.raises(TypeError, match=r"schedule must be a genkernels.train.Schedule, got dict"):
        train.TrainConfig(schedule={"num_train_timesteps": 10})
