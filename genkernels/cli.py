"""The `genkernels` command: `info`, `bench [...]`, `train FAMILY [...]`, `sample FAMILY [...]`.

    genkernels train diffusion --data digits --steps 2000 --objective eps --out runs/digits
    genkernels train diffusion --backbone dit --data digits --steps 2000 --objective flow --out runs/dit
    genkernels sample diffusion --ckpt runs/digits/diffusion.safetensors --sampler ddim --steps 25 \\
        --guidance 3 --seed 0 --out grid.png
    genkernels train vae --data digits --steps 2000 --loss l2 --beta 0.05 --out runs/vae
    genkernels sample vae --ckpt runs/vae/vae.safetensors --num 20 --seed 0 --out vae.png
    genkernels train flow --data digits --steps 2000 --out runs/flow
    genkernels sample flow --ckpt runs/flow/flow.safetensors --temperature 0.7 --num 64 --seed 0 --out flow.png
    genkernels train gan --data digits --image-size 16 --steps 2000 --out runs/gan
    genkernels sample gan --ckpt runs/gan/gan.safetensors --truncation 0.7 --num 64 --seed 0 --out gan.png
    genkernels train transformer --data digits --steps 2000 --out runs/transformer
    genkernels sample transformer --ckpt runs/transformer/transformer.safetensors --num 40 --seed 0 \\
        --temperature 1.0 --top-k 8 --out transformer.png

Each family has its own options (`genkernels train vae -h`); an option of another family is an
error naming the family it belongs to. On CPU, train and sample run every fused op on the
"reference" backend unless --backend (or GENKERNELS_BACKEND) says otherwise (the triton backend runs
on CPU only under the slow Triton interpreter); on CUDA the default is auto.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from contextlib import contextmanager
from pathlib import Path

FAMILIES = ("diffusion", "vae", "flow", "gan", "transformer")


class CommandError(Exception):
    """A user error found after argument parsing (a bad checkpoint, a sampler that does not fit it...)."""


def _checked(parse, ok, expected: str):
    """An argparse type: ``parse(text)``, refused ("expected EXPECTED, got ...") unless ``ok(value)``."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return convert


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_fraction = _checked(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
_open_fraction = _checked(float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)")
_nonnegative = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
_seed = _checked(int, lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)")
_finite = _checked(float, math.isfinite, "a finite number")


def _bins(text: str) -> int:
    from .train_flow import MAX_BINS

    return _checked(int, lambda v: 2 <= v <= MAX_BINS, f"an integer in [2, {MAX_BINS}]")(text)


# --------------------------------------------------------------------------- each family's options


def _option(*flags: str, **kwargs) -> tuple[tuple[str, ...], dict]:
    """One add_argument call of a family's option table."""
    return flags, kwargs


FAMILY_HELP = {
    "diffusion": "class-conditional diffusion model (UNet or DiT backbone)",
    "vae": "variational autoencoder (AutoencoderKL)",
    "flow": "normalizing flow (Glow)",
    "gan": "StyleGAN2-style GAN (modulated convolutions, R1-regularized ResNet discriminator)",
    "transformer": "autoregressive image transformer over quantized pixels (ImageGPT, KV-cache sampling)",
}
_SEED = _option("--seed", type=_seed, default=0, help="random seed (0)")
_SCALE = _option("--scale", type=_positive_int, default=None, help="pixel upscaling (default: to about 64 px)")
_PNG_OUT = _option(
    "--out",
    default="samples.png",
    help="image file to write, its folder created (samples.png); an existing file is replaced (the grid is "
    "reproducible from the checkpoint, seed and options), and the run says so",
)


def _runtime_options(*, progress: bool = True) -> list:
    options = [
        _option("--device", default=None, help="torch device (default: cuda when available, else cpu)"),
        _option(
            "--backend",
            choices=("auto", "reference", "triton", "cuda"),
            default=None,
            help="backend of every fused op (default: GENKERNELS_BACKEND if set, else reference on CPU, auto on CUDA)",
        ),
    ]
    if progress:
        options.append(_option("--no-progress", action="store_true", help="no progress bar"))
    return options


def _train_options(checkpoint: str) -> list:
    """The options every family trains with: data, steps, batch, optimizer, size preset, seed, output."""
    return [
        _option("--data", default="digits", help="'digits' (scikit-learn 8x8 digits) or a folder of images"),
        _option(
            "--image-size",
            type=_positive_int,
            default=None,
            help="folder images are resized to this (32; not for digits)",
        ),
        _option(
            "--channels",
            type=int,
            choices=(1, 3),
            default=None,
            help="folder images: 1 grey or 3 RGB (3; not for digits)",
        ),
        _option("--steps", type=_positive_int, default=2000, help="optimizer steps (2000)"),
        _option(
            "--batch-size",
            type=_positive_int,
            default=64,
            help="images per step, at most the training images; an epoch's last N %% batch-size are dropped (64)",
        ),
        _option("--lr", type=float, default=1e-3, help="AdamW learning rate (1e-3)"),
        _option("--model", choices=("tiny", "small"), default="small", help="model size preset (small)"),
        _SEED,
        _option(
            "--save-every", type=_nonnegative_int, default=500, help="also save every N steps (500; 0: only at the end)"
        ),
        _option("--out", required=True, help=f"output folder (created); the checkpoint is OUT/{checkpoint}"),
        _option(
            "--overwrite",
            action="store_true",
            help=f"replace an OUT/{checkpoint} of an earlier run (default: refuse, exit status 2, before any work)",
        ),
        *_runtime_options(),
    ]


def _gan_train_options() -> list:
    """The common training options with the GAN's defaults: --image-size also resizes the digits (to a power
    of 2), Adam at 2e-3 and a batch of 32."""
    replaced = {
        "--image-size": _option(
            "--image-size",
            type=_positive_int,
            default=None,
            help="images (digits included) are resized to this: the GAN's resolution, a power of 2 in [8, 256] (16)",
        ),
        "--batch-size": _option(
            "--batch-size",
            type=_positive_int,
            default=32,
            help="images per step, at most the training images; an epoch's last N %% batch-size are dropped (32)",
        ),
        "--lr": _option("--lr", type=float, default=2e-3, help="Adam learning rate of G; D's is adjusted (2e-3)"),
    }
    return [replaced.get(flags[0], (flags, kwargs)) for flags, kwargs in _train_options("gan.safetensors")]


def _levels(text: str) -> int:
    return _checked(int, lambda v: 2 <= v <= 65536, "an integer in [2, 65536]")(text)


def _transformer_train_options() -> list:
    """The common training options with the transformer's help for --lr (AdamW, warm-up, cosine decay)."""
    replaced = {
        "--lr": _option(
            "--lr",
            type=float,
            default=1e-3,
            help="peak AdamW learning rate: linear warm-up, then a cosine decay to a tenth (1e-3)",
        ),
    }
    return [replaced.get(flags[0], (flags, kwargs)) for flags, kwargs in _train_options("transformer.safetensors")]


def _train_families() -> dict[str, tuple[str, list]]:
    """family -> (description, options) of `genkernels train FAMILY`."""
    from .models.transformer import POSITIONS
    from .train import BACKBONES, OBJECTIVES
    from .train_vae import LOSSES

    return {
        "diffusion": (
            "Train a class-conditional diffusion model (UNet or DiT backbone).",
            [
                _option(
                    "--backbone",
                    choices=tuple(BACKBONES),
                    default="unet",
                    help="unet: the UNet; dit: the diffusion transformer, adaLN-Zero blocks with 2-D RoPE; "
                    "--model picks its size (tiny, small: DiTConfig.digits) (unet)",
                ),
                _option(
                    "--objective",
                    choices=OBJECTIVES,
                    default="eps",
                    help="eps: predict the noise; v: v-prediction; flow: flow-matching velocity (eps)",
                ),
                _option(
                    "--label-dropout",
                    type=_fraction,
                    default=0.1,
                    help="probability of training on the null label, for classifier-free guidance (0.1)",
                ),
                _option("--ema-decay", type=_fraction, default=0.999, help="EMA decay of the sampled weights (0.999)"),
                *_train_options("diffusion.safetensors"),
            ],
        ),
        "vae": (
            "Train an AutoencoderKL: reconstruction loss + beta * KL / pixel elements.",
            [
                _option("--loss", choices=LOSSES, default="l2", help="reconstruction loss (l2)"),
                _option(
                    "--beta",
                    type=_nonnegative,
                    default=0.05,
                    help="KL weight; the per-sample KL is divided by the pixel elements C*H*W (0.05)",
                ),
                *_train_options("vae.safetensors"),
            ],
        ),
        "flow": (
            "Train a Glow by maximum likelihood with uniform dequantization; reports bits/dim.",
            [
                _option(
                    "--n-bins",
                    type=_bins,
                    default=None,
                    help="levels per pixel (default: the levels the data takes: 17 for digits, 256 for 8-bit images)",
                ),
                _option(
                    "--heldout",
                    type=_open_fraction,
                    default=0.1,
                    help="fraction of the images held out for bits/dim (0.1)",
                ),
                _option(
                    "--eval-every",
                    type=_nonnegative_int,
                    default=250,
                    help="held-out bits/dim every N steps (250; 0: only at the start and the end)",
                ),
                *_train_options("flow.safetensors"),
            ],
        ),
        "gan": (
            "Train a StyleGAN2-style GAN: non-saturating logistic losses, lazy R1, an EMA of the generator.",
            [
                _option(
                    "--r1-gamma",
                    type=_nonnegative,
                    default=None,
                    help="R1 weight gamma: gamma / 2 * ||grad_x D(x)||^2 (default: the model preset's; small: 0.05)",
                ),
                _option(
                    "--r1-interval",
                    type=_positive_int,
                    default=None,
                    help="lazy R1: one R1 step every N steps (default: the preset's, 16)",
                ),
                _option(
                    "--ema-beta",
                    type=_fraction,
                    default=None,
                    help="EMA decay of the sampled generator G_ema (default: the preset's; small: 0.99)",
                ),
                *_gan_train_options(),
            ],
        ),
        "transformer": (
            "Train a class-conditional autoregressive transformer by next-token cross-entropy over quantized "
            "pixels; reports nats per token.",
            [
                _option("--levels", type=_levels, default=16, help="quantization levels per pixel value (16)"),
                _option("--positions", choices=POSITIONS, default="rope", help="1-D rotary or learned (rope)"),
                _option(
                    "--warmup",
                    type=_nonnegative_int,
                    default=None,
                    help="learning-rate warm-up steps, at most --steps (100, or --steps when fewer)",
                ),
                _option("--grad-clip", type=_nonnegative, default=1.0, help="gradient norm clip; 0: none (1.0)"),
                *_transformer_train_options(),
            ],
        ),
    }


def _ckpt(family: str):
    return _option("--ckpt", required=True, help=f"checkpoint written by `genkernels train {family}`")


def _ncol(default: str):
    return _option("--ncol", type=_positive_int, default=None, help=f"images per grid row (default: {default})")


def _sample_families() -> dict[str, tuple[str, list]]:
    """family -> (description, options) of `genkernels sample FAMILY`."""
    from .train import SAMPLERS

    return {
        "diffusion": (
            "Sample a diffusion model (the checkpoint's UNet or DiT) into a PNG grid.",
            [
                _ckpt("diffusion"),
                _option(
                    "--sampler",
                    choices=sorted(SAMPLERS),
                    default=None,
                    help="default: ddim for eps/v models, flow for flow models",
                ),
                _option("--steps", type=_positive_int, default=25, help="sampling steps (25)"),
                _option(
                    "--guidance",
                    type=_finite,
                    default=None,
                    help="classifier-free guidance scale; 1: none (default 3.0; 1 for a model trained with "
                    "--label-dropout 0, which never learned the unconditional prediction)",
                ),
                _SEED,
                _option(
                    "--num",
                    type=_positive_int,
                    default=None,
                    help="number of images (default: 4 per class, at least 16)",
                ),
                _option(
                    "--label",
                    type=int,
                    default=None,
                    help="class of every image (default: cycle through the classes); -1: unconditional",
                ),
                _ncol("classes, or ceil(sqrt(num)) with --label or one class"),
                _SCALE,
                _option("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights"),
                _option(
                    "--no-cuda-graph",
                    action="store_true",
                    help="call the model plainly at every step (default on a GPU from 8 steps: one CUDA graph "
                    "replayed)",
                ),
                _PNG_OUT,
                *_runtime_options(),
            ],
        ),
        "vae": (
            "Write a PNG grid: data images above their reconstructions, then decodes of z ~ N(0, I).",
            [
                _ckpt("vae"),
                _option(
                    "--data",
                    default=None,
                    help="images to reconstruct: 'digits' or a folder (default: the data the checkpoint was "
                    "trained on)",
                ),
                _option("--seed", type=_seed, default=0, help="random seed: which images, and the prior samples (0)"),
                _option(
                    "--num",
                    type=_positive_int,
                    default=20,
                    help="images to reconstruct, and prior samples to draw (20)",
                ),
                _ncol("min(num, 10)"),
                _SCALE,
                _PNG_OUT,
                *_runtime_options(progress=False),
            ],
        ),
        "flow": (
            "Write a PNG grid of samples of a Glow at a temperature.",
            [
                _ckpt("flow"),
                _option(
                    "--temperature",
                    type=_nonnegative,
                    default=0.7,
                    help="standard deviation of the latent z ~ N(0, T^2 I); below 1 trades diversity for cleaner "
                    "samples (0.7)",
                ),
                _option("--num", type=_positive_int, default=64, help="number of samples (64)"),
                _SEED,
                _ncol("ceil(sqrt(num))"),
                _SCALE,
                _PNG_OUT,
                *_runtime_options(progress=False),
            ],
        ),
        "gan": (
            "Write a PNG grid of samples of the EMA generator, with the truncation trick.",
            [
                _ckpt("gan"),
                _option(
                    "--truncation",
                    type=float,
                    default=1.0,
                    help="truncation psi: w = w_avg + psi (w - w_avg); below 1 trades diversity for typical "
                    "samples, 0 gives the mean image (1.0)",
                ),
                _option("--num", type=_positive_int, default=64, help="number of samples (64)"),
                _SEED,
                _ncol("ceil(sqrt(num))"),
                _SCALE,
                _option("--raw-weights", action="store_true", help="use the raw generator instead of G_ema"),
                _PNG_OUT,
                *_runtime_options(progress=False),
            ],
        ),
        "transformer": (
            "Write a PNG grid of samples of an autoregressive transformer, decoded token by token.",
            [
                _ckpt("transformer"),
                _option(
                    "--num",
                    type=_positive_int,
                    default=None,
                    help="number of samples (default: 4 per class, at least 16)",
                ),
                _SEED,
                _option(
                    "--temperature",
                    type=_nonnegative,
                    default=1.0,
                    help="logits are divided by it; below 1 gives cleaner, less diverse samples; 0: greedy (1.0)",
                ),
                _option(
                    "--top-k",
                    type=_positive_int,
                    default=None,
                    help="sample among the K most likely levels only (default: all)",
                ),
                _option(
                    "--label",
                    type=int,
                    default=None,
                    help="class of every image (default: cycle through the classes)",
                ),
                _option(
                    "--no-cache",
                    action="store_true",
                    help="recompute the whole prefix every step instead of decoding with the KV cache",
                ),
                _ncol("classes, or ceil(sqrt(num))"),
                _SCALE,
                _PNG_OUT,
                *_runtime_options(progress=False),
            ],
        ),
    }


def _family_parsers(sub, command: str, families: dict[str, tuple[str, list]], **kwargs) -> dict:
    """`genkernels COMMAND FAMILY` for every family of the table; returns family -> its parser."""
    p = sub.add_parser(command, **kwargs)
    sub_families = p.add_subparsers(dest="family", required=True, title="model family")
    parsers = {}
    for family, (description, options) in families.items():
        parsers[family] = sub_families.add_parser(family, help=FAMILY_HELP[family], description=description)
        for flags, option_kwargs in options:
            parsers[family].add_argument(*flags, **option_kwargs)
    return parsers


def _check_foreign_options(parsers: dict[str, argparse.ArgumentParser], family: str, command: str, rest) -> None:
    """Exit with status 2 naming the family an unrecognized option belongs to (``--objective`` given to vae)."""
    for token in rest:
        if not token.startswith("--"):
            continue
        option = token.split("=", 1)[0]
        owners = [f for f, p in parsers.items() if f != family and option in p._option_string_actions]
        if owners:
            parsers[family].error(
                f"argument {option}: not an option of `genkernels {command} {family}`; it applies to "
                + " or ".join(f"`genkernels {command} {owner}`" for owner in owners)
            )


def _load_data(data: str, image_size: int | None, channels: int | None):
    """The data set of --data; --image-size and --channels only apply to a folder."""
    from . import data as data_mod

    if data == "digits":
        given = [name for name, value in (("--image-size", image_size), ("--channels", channels)) if value is not None]
        if given:
            raise CommandError(
                f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to an image folder; "
                "--data digits is always 1 x 8 x 8 (drop the option or pass a folder)"
            )
    with _user_errors("--data: ", (FileNotFoundError, ValueError)):
        return data_mod.load(data, 32 if image_size is None else image_size, 3 if channels is None else channels)


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with _user_errors("--device: ", (RuntimeError,)):
        device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise CommandError(f"--device {name}: training and sampling run on cpu or cuda[:N], got a {device.type} device")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: this torch sees no CUDA GPU (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CommandError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_out(command: str, family: str, out: str, overwrite: bool = False) -> None:
    """--out before any work: train writes a folder (created) and refuses to replace the checkpoint of an earlier
    run there unless --overwrite; sample writes an image file whose extension PIL writes, in a folder that exists
    or can be created (it is, when the grid is saved), replacing a file of that name (main says so)."""
    from pathlib import Path

    path = Path(out)
    if command == "train":
        if not out.strip():  # an unset shell variable, most likely: not the current folder
            raise CommandError(f"--out must name a folder, got {out!r}")
        if path.exists() and not path.is_dir():
            raise CommandError(f"--out {out}: exists and is not a folder (train writes its checkpoints into a folder)")
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not path.exists() and not parent.is_dir():
            raise CommandError(f"--out {out}: {parent} is a file, so the output folder cannot be created")
        from ._training import checkpoint_path

        with _user_errors(f"--out {out}: ", (FileExistsError,)):
            checkpoint_path(path, family, overwrite, option="--overwrite")
        return
    from PIL import Image

    if path.is_dir():
        raise CommandError(f"--out {out}: is a folder; give the image file to write, e.g. {path / 'samples.png'}")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt not in Image.SAVE:
        raise CommandError(f"--out {out}: the file name must end in an image extension such as .png or .jpg")
    # Some formats PIL lists as writable take other modes only (XBM: 1-bit) or need a plugin (HDF5): a grey
    # or RGB grid would fail at the end, after the sampling.
    for mode in ("L", "RGB"):
        try:
            Image.new(mode, (1, 1)).save(io.BytesIO(), format=fmt)
        except (OSError, ValueError, KeyError):
            raise CommandError(
                f"--out {out}: PIL cannot write grey and RGB images as {fmt} here; use .png or .jpg"
            ) from None
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CommandError(f"--out {out}: {parent} is a file, so the image's folder cannot be created")


def _backend_source(option: str | None) -> tuple[str | None, str]:
    """(the backend this run asks for, how it was asked): --backend, else GENKERNELS_BACKEND, else (None, '')."""
    import os

    if option is not None:
        return option, f"--backend {option}"
    env = os.environ.get("GENKERNELS_BACKEND")
    return (env, f"GENKERNELS_BACKEND={env}") if env else (None, "")


def _check_backend(backend: tuple[str | None, str], device) -> None:
    """A backend (from --backend or GENKERNELS_BACKEND) that is unknown, or triton / cuda where no such kernel
    can run: a CommandError before any work (data, model, training)."""
    import os

    from ._registry import _CHOICES

    name, source = backend
    if name is not None and name not in _CHOICES:
        raise CommandError(f"{source}: not a backend; choose {', '.join(_CHOICES)}")
    if name == "cuda" and device.type != "cuda":
        raise CommandError(f"{source}: the cuda backend runs on a CUDA device; this run is on {device}")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise CommandError(
            f"{source}: the triton backend runs on a CUDA device, or on {device} under the Triton interpreter "
            "(TRITON_INTERPRET=1, slow); without a backend the reference runs here"
        )


def _load_model(load, *args, **kwargs):
    """``load(*args, **kwargs)`` of a checkpoint whose metadata was read: weights that do not fit the model its
    metadata describes are a CommandError about --ckpt."""
    with _user_errors("--ckpt: its weights do not fit the model its metadata describes: ", (RuntimeError, KeyError)):
        return load(*args, **kwargs)


@contextmanager
def _user_errors(prefix: str = "", errors: tuple = (ValueError,)):
    """Turn ``errors`` raised inside into a CommandError, its message after ``prefix``."""
    try:
        yield
    except errors as e:
        raise CommandError(f"{prefix}{e}") from None


def _read_checkpoint(read, path: str) -> dict:
    """The metadata ``read(path)`` gives; a missing or foreign checkpoint is a CommandError about --ckpt."""
    with _user_errors("--ckpt: ", (FileNotFoundError, ValueError)):
        return read(path)


def _ends(values) -> tuple[float, float, int]:
    """(mean of the first k, mean of the last k, k) of a run's per-step values, k = min(10, len(values) // 2)
    (at least 1): the two windows do not overlap, so a short run's report shows the change its steps made
    rather than the same mean twice."""
    k = max(1, min(10, len(values) // 2))
    return sum(values[:k]) / k, sum(values[-k:]) / k, k


def _run_train_diffusion(args) -> int:
    from . import train

    device = _device(args.device)
    dataset = _load_data(args.data, args.image_size, args.channels)
    _, h, w = dataset.image_shape
    with _user_errors(f"--backbone {args.backbone} (--model {args.model}) on {h}x{w} images: "):
        model_config = train.model_config_for(dataset, args.model, backbone=args.backbone)
    with _user_errors():
        config = train.TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            ema_decay=args.ema_decay,
            label_dropout=args.label_dropout,
            objective=args.objective,
            seed=args.seed,
        )
        _check_batch_size(args.batch_size, len(dataset))
    result = train.train_diffusion(
        dataset,
        model_config,
        config,
        device=device,
        backend=args.backend,
        out=args.out,
        save_every=args.save_every,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    first, last, k = _ends(result.losses)
    print(
        f"trained {args.steps} steps ({args.backbone}, {args.objective}): loss {first:.4f} (first {k}) -> "
        f"{last:.4f} (last {k}); checkpoint {Path(args.out) / 'diffusion.safetensors'}"
    )
    return 0


def _run_sample_diffusion(args) -> int:
    import torch

    from . import data as data_mod
    from . import train

    device = _device(args.device)
    meta = _read_checkpoint(train.read_metadata, args.ckpt)
    objective = meta["objective"]
    sampler = args.sampler or ("flow" if objective == "flow" else "ddim")
    with _user_errors("--sampler: "):
        train.check_sampler(sampler, objective)
    trained_steps = meta["schedule"]["num_train_timesteps"]
    if args.steps > trained_steps:
        raise CommandError(
            f"--steps must be at most the {trained_steps} timesteps the model was trained on, got {args.steps}"
        )
    classes = meta["config"]["num_classes"]
    if args.label is not None and not -1 <= args.label < classes:
        raise CommandError(
            f"--label must be in [-1, {classes - 1}] (this model has {classes} classes), got {args.label}"
        )
    # A model trained with --label-dropout 0 never saw the null label: guidance and unconditional samples
    # would mix in its untrained prediction (train.sample_diffusion refuses them).
    conditional_only = meta.get("label_dropout") == 0
    guidance = args.guidance if args.guidance is not None else 1.0 if conditional_only else 3.0
    if conditional_only and (guidance != 1.0 or args.label == -1):
        what = f"--guidance {guidance:g}" if guidance != 1.0 else "--label -1 (unconditional samples)"
        raise CommandError(
            f"{what}: this model was trained with --label-dropout 0 and never learned the unconditional "
            "prediction; sample with --guidance 1 and class labels, or train with --label-dropout > 0"
        )
    with _user_errors("--ckpt: ", (ValueError,)):  # a checkpoint without EMA weights, say
        model, meta = _load_model(train.load_checkpoint, args.ckpt, ema=not args.raw_weights, device=device)
    num = args.num or max(16, 4 * classes)
    if args.label is None:
        labels = torch.arange(num) % classes
    else:
        labels = torch.full((num,), classes if args.label == -1 else args.label)
    images = train.sample_diffusion(
        model,
        meta,
        labels,
        sampler=sampler,
        steps=args.steps,
        guidance=guidance,
        seed=args.seed,
        backend=args.backend,
        progress=not args.no_progress,
        cuda_graph=False if args.no_cuda_graph else None,
    )
    height = images.shape[-2]
    ncol = args.ncol or (classes if args.label is None and classes > 1 else math.ceil(math.sqrt(num)))
    scale = args.scale or max(1, 64 // height)
    width, grid_height = data_mod.save_grid(images, args.out, ncol=ncol, scale=scale)
    print(
        f"wrote {num} samples ({sampler}, {args.steps} steps, guidance {guidance}) to {args.out} "
        f"({width}x{grid_height})"
    )
    return 0


def _check_batch_size(batch_size: int, images: int, held_out: int = 0) -> None:
    """--batch-size against the training images (``held_out`` more set aside): a ValueError, not a smaller batch
    (genkernels._training.check_batch_size says why)."""
    from ._training import check_batch_size

    check_batch_size(batch_size, images, "--batch-size", held_out)


def _data_source(data: str, dataset) -> dict:
    """How `sample vae` loads the training data again (stored in the checkpoint)."""
    if data == "digits":
        return {"data": "digits"}
    c, h, _ = dataset.image_shape
    return {"data": str(Path(data).resolve()), "image_size": h, "channels": c}


def _train(args, config_class, train_fn, checks, load=None, **options):
    """Train a family whose config takes the common options (vae, flow, gan, transformer) on the data of --data.

    ``checks``: functions of the data set that raise ValueError for data the family cannot train
    on, called before training starts (and before anything is written); the last of them checks
    --batch-size against the data (:func:`_check_batch_size`). ``load``: the data set of ``args``
    (None: :func:`_load_data`, which takes --image-size and --channels for a folder only).
    """
    device = _device(args.device)
    dataset = _load_data(args.data, args.image_size, args.channels) if load is None else load(args)
    with _user_errors():
        config = config_class(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            model=args.model,
            seed=args.seed,
            save_every=args.save_every,
            device=str(device),
            backend=args.backend,
            **options,
        )
        for check in checks:
            check(dataset)
    return train_fn(
        dataset,
        config,
        args.out,
        progress=not args.no_progress,
        data_source=_data_source(args.data, dataset),
        overwrite=args.overwrite,
    )


def _run_train_vae(args) -> int:
    from . import train_vae

    # A non-square folder fails in model_config_for, before training.
    checks = [
        lambda dataset: train_vae.model_config_for(dataset, args.model),
        lambda dataset: _check_batch_size(args.batch_size, len(dataset)),
    ]
    result = _train(args, train_vae.VAETrainConfig, train_vae.train_vae, checks, loss=args.loss, beta=args.beta)
    first, last, k = _ends(result.losses)
    print(
        f"trained {args.steps} steps ({args.loss}, beta {args.beta:g}): loss {first:.4f} (first {k}) -> "
        f"{last:.4f} (last {k}); reconstruction {_ends(result.reconstruction)[1]:.4f}, "
        f"KL {_ends(result.kl)[1]:.2f} nats per sample; checkpoint {Path(args.out) / train_vae.CHECKPOINT_NAME}"
    )
    return 0


def _run_sample_vae(args) -> int:
    from . import data as data_mod
    from . import train_vae

    device = _device(args.device)
    meta = _read_checkpoint(train_vae.read_vae_metadata, args.ckpt)
    c, h, _ = meta["image_shape"]
    if args.data is not None:
        source = {"data": args.data, "image_size": h, "channels": c}
    elif meta.get("data"):
        source = meta["data"]
    else:
        raise CommandError("--data: the checkpoint does not say which data it was trained on; pass --data digits|PATH")
    with _user_errors("--data: ", (FileNotFoundError, ValueError)):
        dataset = data_mod.load(source["data"], source.get("image_size"), source.get("channels", 3))
    if dataset.image_shape[0] != c:
        raise CommandError(f"--data: the images have {dataset.image_shape[0]} channels, the model takes {c}")
    if tuple(dataset.image_shape) != tuple(meta["image_shape"]):
        raise CommandError(
            f"--data: the images are {'x'.join(map(str, dataset.image_shape))}, the model was trained on "
            f"{'x'.join(map(str, meta['image_shape']))} (its prior samples have that size)"
        )
    if args.num > len(dataset):
        raise CommandError(f"--num must be at most the data's {len(dataset)} images, got {args.num}")
    model, meta = _load_model(train_vae.load_vae, args.ckpt, device=device)
    result = train_vae.sample_vae(
        model, dataset, args.num, args.seed, args.out, ncol=args.ncol, scale=args.scale, backend=args.backend
    )
    width, height = result.size
    print(
        f"wrote {args.num} images with their reconstructions and {args.num} prior samples to {args.out} "
        f"({width}x{height})"
    )
    return 0


def _run_train_flow(args) -> int:
    from . import train_flow

    # A non-square or odd-sized folder, or one too small to hold images out, fails here, before training.
    checks = [
        lambda dataset: train_flow.model_config_for(dataset, args.model),
        lambda dataset: _check_batch_size(
            args.batch_size, *map(len, train_flow.split(dataset, args.heldout, args.seed))
        ),
    ]
    result = _train(
        args,
        train_flow.FlowTrainConfig,
        train_flow.train_flow,
        checks,
        n_bins=args.n_bins,
        heldout=args.heldout,
        eval_every=args.eval_every,
    )
    first, last = result.history[0], result.history[-1]
    print(
        f"trained {args.steps} steps ({result.metadata['n_bins']} bins): held-out bits/dim {first['heldout']:.3f} "
        f"(step {first['step']}) -> {last['heldout']:.3f} (step {last['step']}); training bits/dim "
        f"{last['train']:.3f}; checkpoint {Path(args.out) / train_flow.CHECKPOINT_NAME}"
    )
    return 0


def _run_sample_flow(args) -> int:
    from . import train_flow

    device = _device(args.device)
    meta = _read_checkpoint(train_flow.read_flow_metadata, args.ckpt)
    model, meta = _load_model(train_flow.load_flow, args.ckpt, device=device)
    result = train_flow.sample_flow(
        model,
        args.num,
        args.temperature,
        args.seed,
        args.out,
        n_bins=meta["n_bins"],
        ncol=args.ncol,
        scale=args.scale,
        backend=args.backend,
    )
    width, height = result.size
    print(f"wrote {args.num} samples (temperature {args.temperature:g}) to {args.out} ({width}x{height})")
    return 0


def _load_gan_data(args):
    """The GAN's data set of --data: --image-size (a power of 2 in [8, 256]) resizes the digits too."""
    from . import train_gan

    if args.image_size is not None:
        with _user_errors("--image-size: "):
            train_gan.GANConfig(resolution=args.image_size)
    if args.data == "digits" and args.channels is not None:
        raise CommandError("--channels applies to an image folder; --data digits is grey (drop the option)")
    with _user_errors("--data: ", (FileNotFoundError, ValueError)):
        return train_gan.load_dataset(args.data, args.image_size, args.channels)


def _run_train_gan(args) -> int:
    from . import train_gan

    # A non-square folder fails in model_config_for, before training.
    checks = [
        lambda dataset: train_gan.model_config_for(dataset, args.model),
        lambda dataset: _check_batch_size(args.batch_size, len(dataset)),
    ]
    result = _train(
        args,
        train_gan.GANTrainConfig,
        train_gan.train_gan,
        checks,
        load=_load_gan_data,
        r1_gamma=args.r1_gamma,
        r1_interval=args.r1_interval,
        ema_beta=args.ema_beta,
    )
    d_first, d_last, k = _ends(result.d_losses)
    g_first, g_last, _ = _ends(result.g_losses)
    print(
        f"trained {args.steps} steps: D loss {d_first:.4f} -> {d_last:.4f}, "
        f"G loss {g_first:.4f} -> {g_last:.4f} (mean of the first / last {k}); "
        f"R1 penalty {result.r1[0][1]:.4g} -> {result.r1[-1][1]:.4g}; "
        f"checkpoint {Path(args.out) / train_gan.CHECKPOINT_NAME}"
    )
    return 0


def _run_sample_gan(args) -> int:
    from . import train_gan

    device = _device(args.device)
    _read_checkpoint(train_gan.read_gan_metadata, args.ckpt)
    if not math.isfinite(args.truncation):
        raise CommandError(f"--truncation must be a finite number, got {args.truncation}")
    generator, _ = _load_model(train_gan.load_gan, args.ckpt, device=device, ema=not args.raw_weights)
    result = train_gan.sample_gan(
        generator,
        args.num,
        args.seed,
        args.out,
        truncation=args.truncation,
        ncol=args.ncol,
        scale=args.scale,
        backend=args.backend,
    )
    width, height = result.size
    print(f"wrote {args.num} samples (truncation {args.truncation:g}) to {args.out} ({width}x{height})")
    return 0


def _run_train_transformer(args) -> int:
    from . import train_transformer

    if args.warmup is not None and args.warmup > args.steps:  # the learning rate would never reach --lr
        raise CommandError(
            f"--warmup must be at most --steps (the learning rate reaches --lr when the warm-up ends), got "
            f"--warmup {args.warmup} with --steps {args.steps}"
        )
    # A non-square folder fails in model_config_for, before training.
    checks = [
        lambda dataset: train_transformer.model_config_for(dataset, args.model, args.levels, args.positions),
        lambda dataset: _check_batch_size(args.batch_size, len(dataset)),
    ]
    result = _train(
        args,
        train_transformer.TransformerTrainConfig,
        train_transformer.train_transformer,
        checks,
        levels=args.levels,
        positions=args.positions,
        warmup=args.warmup,
        grad_clip=args.grad_clip,
    )
    first, last, k = _ends(result.losses)
    print(
        f"trained {args.steps} steps ({args.levels} levels, {args.positions} positions): loss {first:.4f} "
        f"(first {k}) -> {last:.4f} (last {k}) nats per token ({last / math.log(2):.3f} bits); "
        f"checkpoint {Path(args.out) / train_transformer.CHECKPOINT_NAME}"
    )
    return 0


def _run_sample_transformer(args) -> int:
    from . import train_transformer

    device = _device(args.device)
    meta = _read_checkpoint(train_transformer.read_transformer_metadata, args.ckpt)
    classes, levels = meta["config"]["num_classes"], meta["config"]["levels"]
    if args.label is not None and not 0 <= args.label < max(classes, 1):
        accepted = f"in [0, {classes - 1}]" if classes else "absent: the model is unconditional"
        raise CommandError(f"--label must be {accepted} (this model has {classes} classes), got {args.label}")
    if args.top_k is not None and args.top_k > levels:
        raise CommandError(f"--top-k must be at most the model's {levels} levels, got {args.top_k}")
    model, _ = _load_model(train_transformer.load_transformer, args.ckpt, device=device)
    num = args.num or max(16, 4 * classes)
    result = train_transformer.sample_transformer(
        model,
        num,
        args.seed,
        args.out,
        labels=args.label,
        temperature=args.temperature,
        top_k=args.top_k,
        use_cache=not args.no_cache,
        ncol=args.ncol,
        scale=args.scale,
        backend=args.backend,
    )
    width, height = result.size
    top_k = "" if args.top_k is None else f", top-k {args.top_k}"
    print(
        f"wrote {num} samples (temperature {args.temperature:g}{top_k}"
        f"{', no cache' if args.no_cache else ''}) to {args.out} ({width}x{height})"
    )
    return 0


RUNNERS = {
    ("train", "diffusion"): _run_train_diffusion,
    ("train", "vae"): _run_train_vae,
    ("train", "flow"): _run_train_flow,
    ("sample", "diffusion"): _run_sample_diffusion,
    ("sample", "vae"): _run_sample_vae,
    ("sample", "flow"): _run_sample_flow,
    ("train", "gan"): _run_train_gan,
    ("sample", "gan"): _run_sample_gan,
    ("train", "transformer"): _run_train_transformer,
    ("sample", "transformer"): _run_sample_transformer,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `genkernels` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="genkernels", description="Fused GPU kernels for generative models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, built CUDA archs, and which backends can run here")
    sub.add_parser("bench", help="benchmark every kernel against eager PyTorch and torch.compile", add_help=False)
    family_parsers = {
        "train": _family_parsers(
            sub,
            "train",
            _train_families(),
            help=f"train a model ({', '.join(FAMILIES)})",
            description="Train a generative model.",
        ),
        "sample": _family_parsers(
            sub,
            "sample",
            _sample_families(),
            help="sample a trained model into a PNG grid",
            description="Sample a PNG grid.",
        ),
    }
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from genkernels import bench

        return bench.main(rest)
    if args.command in family_parsers:
        _check_foreign_options(family_parsers[args.command], args.family, args.command, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        import genkernels

        print(genkernels.info())
        return 0
    from ._registry import UnsupportedError

    backend = _backend_source(args.backend)
    try:
        _check_out(args.command, args.family, args.out, getattr(args, "overwrite", False))
        _check_backend(backend, _device(args.device))
        replaces = args.command == "sample" and Path(args.out).exists()
        status = RUNNERS[args.command, args.family](args)
        if replaces and status == 0:
            print(f"(replaced the file that was at {args.out})")
        return status
    except CommandError as e:
        print(f"genkernels {args.command} {args.family}: error: {e}", file=sys.stderr)
        return 2
    except UnsupportedError as e:  # an explicit backend that cannot run one of the model's calls
        print(f"genkernels {args.command} {args.family}: error: {backend[1]}: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a diverged training run (TrainLoop.update: the step and a lower --lr)
        print(f"genkernels {args.command} {args.family}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
