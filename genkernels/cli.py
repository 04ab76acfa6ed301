"""The `genkernels` command: `info`, `bench [...]`, `train FAMILY [...]`, `sample FAMILY [...]`.

    genkernels train diffusion --data digits --steps 2000 --objective eps --out runs/digits
    genkernels sample diffusion --ckpt runs/digits/diffusion.safetensors --sampler ddim --steps 25 \\
        --guidance 3 --seed 0 --out grid.png
    genkernels train vae --data digits --steps 2000 --loss l2 --beta 0.05 --out runs/vae
    genkernels sample vae --ckpt runs/vae/vae.safetensors --num 20 --seed 0 --out vae.png

Each family has its own options (`genkernels train vae -h`); an option of another family is an
error naming the family it belongs to. On CPU, train and sample run every fused op on the
"reference" backend unless --backend says otherwise (the triton backend runs on CPU only under
the slow Triton interpreter); on CUDA the default is auto.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

FAMILIES = ("diffusion", "vae")


class CommandError(Exception):
    """A user error found after argument parsing (a bad checkpoint, a sampler that does not fit it...)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


def _nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _add_runtime_args(p: argparse.ArgumentParser, *, progress: bool = True) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument(
        "--backend",
        choices=("auto", "reference", "triton", "cuda"),
        default=None,
        help="backend of every fused op (default: reference on CPU, auto on CUDA)",
    )
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_train_args(p: argparse.ArgumentParser, checkpoint: str) -> None:
    """The options every family trains with: data, steps, batch, optimizer, size preset, seed, output."""
    p.add_argument("--data", default="digits", help="'digits' (scikit-learn 8x8 digits) or a folder of images")
    p.add_argument(
        "--image-size", type=_positive_int, default=None, help="folder images are resized to this (32; not for digits)"
    )
    p.add_argument(
        "--channels", type=int, choices=(1, 3), default=None, help="folder images: 1 grey or 3 RGB (3; not for digits)"
    )
    p.add_argument("--steps", type=_positive_int, default=2000, help="optimizer steps (2000)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (64)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (1e-3)")
    p.add_argument("--model", choices=("tiny", "small"), default="small", help="model size preset (small)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--save-every", type=int, default=500, help="also save every N steps (500; 0: only at the end)")
    p.add_argument("--out", required=True, help=f"output folder; the checkpoint is OUT/{checkpoint}")
    _add_runtime_args(p)


def _train_parser(sub) -> dict[str, argparse.ArgumentParser]:
    from .train import OBJECTIVES
    from .train_vae import LOSSES

    p = sub.add_parser("train", help=f"train a model ({', '.join(FAMILIES)})", description="Train a generative model.")
    families = p.add_subparsers(dest="family", required=True, title="model family")
    d = families.add_parser(
        "diffusion", help="class-conditional diffusion UNet", description="Train a class-conditional diffusion UNet."
    )
    d.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="eps",
        help="eps: predict the noise; v: v-prediction; flow: flow-matching velocity (eps)",
    )
    d.add_argument(
        "--label-dropout",
        type=_fraction,
        default=0.1,
        help="probability of training on the null label, for classifier-free guidance (0.1)",
    )
    d.add_argument("--ema-decay", type=_fraction, default=0.999, help="EMA decay of the sampled weights (0.999)")
    _add_train_args(d, "diffusion.safetensors")
    v = families.add_parser(
        "vae",
        help="variational autoencoder (AutoencoderKL)",
        description="Train an AutoencoderKL: reconstruction loss + beta * KL / pixel elements.",
    )
    v.add_argument("--loss", choices=LOSSES, default="l2", help="reconstruction loss (l2)")
    v.add_argument(
        "--beta",
        type=_nonnegative,
        default=0.05,
        help="KL weight; the per-sample KL is divided by the pixel elements C*H*W (0.05)",
    )
    _add_train_args(v, "vae.safetensors")
    return {"diffusion": d, "vae": v}


def _sample_parser(sub) -> dict[str, argparse.ArgumentParser]:
    from .train import SAMPLERS

    p = sub.add_parser("sample", help="sample a trained model into a PNG grid", description="Sample a PNG grid.")
    families = p.add_subparsers(dest="family", required=True, title="model family")
    d = families.add_parser(
        "diffusion", help="class-conditional diffusion UNet", description="Sample a diffusion UNet into a PNG grid."
    )
    d.add_argument("--ckpt", required=True, help="checkpoint written by `genkernels train diffusion`")
    d.add_argument(
        "--sampler", choices=sorted(SAMPLERS), default=None, help="default: ddim for eps/v models, flow for flow models"
    )
    d.add_argument("--steps", type=_positive_int, default=25, help="sampling steps (25)")
    d.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale; 1: none (3.0)")
    d.add_argument("--seed", type=int, default=0, help="random seed (0)")
    d.add_argument(
        "--num", type=_positive_int, default=None, help="number of images (default: 4 per class, at least 16)"
    )
    d.add_argument(
        "--label",
        type=int,
        default=None,
        help="class of every image (default: cycle through the classes); -1: unconditional",
    )
    d.add_argument("--ncol", type=_positive_int, default=None, help="images per grid row (default: classes)")
    d.add_argument("--scale", type=_positive_int, default=None, help="pixel upscaling (default: to about 64 px)")
    d.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    d.add_argument("--out", default="samples.png", help="PNG file to write (samples.png)")
    _add_runtime_args(d)
    v = families.add_parser(
        "vae",
        help="variational autoencoder (AutoencoderKL)",
        description="Write a PNG grid: data images above their reconstructions, then decodes of z ~ N(0, I).",
    )
    v.add_argument("--ckpt", required=True, help="checkpoint written by `genkernels train vae`")
    v.add_argument(
        "--data",
        default=None,
        help="images to reconstruct: 'digits' or a folder (default: the data the checkpoint was trained on)",
    )
    v.add_argument("--seed", type=int, default=0, help="random seed: which images, and the prior samples (0)")
    v.add_argument(
        "--num", type=_positive_int, default=20, help="images to reconstruct, and prior samples to draw (20)"
    )
    v.add_argument("--ncol", type=_positive_int, default=None, help="images per grid row (default: min(num, 10))")
    v.add_argument("--scale", type=_positive_int, default=None, help="pixel upscaling (default: to about 64 px)")
    v.add_argument("--out", default="samples.png", help="PNG file to write (samples.png)")
    _add_runtime_args(v, progress=False)
    return {"diffusion": d, "vae": v}


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
                f"`genkernels {command} {' / '.join(owners)}`"
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
    try:
        return data_mod.load(data, 32 if image_size is None else image_size, 3 if channels is None else channels)
    except (FileNotFoundError, ValueError) as e:
        raise CommandError(f"--data: {e}") from None


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CommandError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: this torch sees no CUDA GPU (torch {torch.__version__})")
    return device


def _run_train_diffusion(args) -> int:
    from . import train

    device = _device(args.device)
    dataset = _load_data(args.data, args.image_size, args.channels)
    try:
        model_config = train.model_config_for(dataset, args.model)
        config = train.TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            ema_decay=args.ema_decay,
            label_dropout=args.label_dropout,
            objective=args.objective,
            seed=args.seed,
        )
    except ValueError as e:
        raise CommandError(str(e)) from None
    result = train.train_diffusion(
        dataset,
        model_config,
        config,
        device=device,
        backend=args.backend,
        out=args.out,
        save_every=max(args.save_every, 0),
        progress=not args.no_progress,
    )
    losses = result.losses
    k = min(10, len(losses))
    print(
        f"trained {args.steps} steps ({args.objective}): loss {sum(losses[:k]) / k:.4f} (first {k}) -> "
        f"{sum(losses[-k:]) / k:.4f} (last {k}); checkpoint {args.out}/diffusion.safetensors"
    )
    return 0


def _run_sample_diffusion(args) -> int:
    import torch

    from . import data as data_mod
    from . import train

    device = _device(args.device)
    try:
        meta = train.read_metadata(args.ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise CommandError(f"--ckpt: {e}") from None
    objective = meta["objective"]
    sampler = args.sampler or ("flow" if objective == "flow" else "ddim")
    try:
        train.check_sampler(sampler, objective)
    except ValueError as e:
        raise CommandError(f"--sampler: {e}") from None
    model, meta = train.load_checkpoint(args.ckpt, ema=not args.raw_weights, device=device)
    classes = model.config.num_classes
    if args.label is not None and not -1 <= args.label < classes:
        raise CommandError(
            f"--label must be in [-1, {classes - 1}] (this model has {classes} classes), got {args.label}"
        )
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
        guidance=args.guidance,
        seed=args.seed,
        backend=args.backend,
        progress=not args.no_progress,
    )
    height = images.shape[-2]
    ncol = args.ncol or (classes if args.label is None and classes > 1 else math.ceil(math.sqrt(num)))
    scale = args.scale or max(1, 64 // height)
    width, grid_height = data_mod.save_grid(images, args.out, ncol=ncol, scale=scale)
    print(
        f"wrote {num} samples ({sampler}, {args.steps} steps, guidance {args.guidance}) to {args.out} "
        f"({width}x{grid_height})"
    )
    return 0


def _data_source(data: str, dataset) -> dict:
    """How `sample vae` loads the training data again (stored in the checkpoint)."""
    if data == "digits":
        return {"data": "digits"}
    c, h, _ = dataset.image_shape
    return {"data": str(Path(data).resolve()), "image_size": h, "channels": c}


def _run_train_vae(args) -> int:
    from . import train_vae

    device = _device(args.device)
    dataset = _load_data(args.data, args.image_size, args.channels)
    try:
        config = train_vae.VAETrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            loss=args.loss,
            beta=args.beta,
            model=args.model,
            seed=args.seed,
            save_every=max(args.save_every, 0),
            device=str(device),
            backend=args.backend,
        )
        train_vae.model_config_for(dataset, args.model)  # a non-square folder fails here, before training
    except ValueError as e:
        raise CommandError(str(e)) from None
    result = train_vae.train_vae(
        dataset, config, args.out, progress=not args.no_progress, data_source=_data_source(args.data, dataset)
    )
    k = min(10, len(result.losses))

    def first(values):
        return sum(values[:k]) / k

    def last(values):
        return sum(values[-k:]) / k

    print(
        f"trained {args.steps} steps ({args.loss}, beta {args.beta:g}): loss {first(result.losses):.4f} (first {k}) -> "
        f"{last(result.losses):.4f} (last {k}); reconstruction {last(result.reconstruction):.4f}, "
        f"KL {last(result.kl):.2f} nats per sample; checkpoint {args.out}/{train_vae.CHECKPOINT_NAME}"
    )
    return 0


def _run_sample_vae(args) -> int:
    from . import data as data_mod
    from . import train_vae

    device = _device(args.device)
    try:
        meta = train_vae.read_vae_metadata(args.ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise CommandError(f"--ckpt: {e}") from None
    c, h, _ = meta["image_shape"]
    if args.data is not None:
        source = {"data": args.data, "image_size": h, "channels": c}
    elif meta.get("data"):
        source = meta["data"]
    else:
        raise CommandError("--data: the checkpoint does not say which data it was trained on; pass --data digits|PATH")
    try:
        dataset = data_mod.load(source["data"], source.get("image_size"), source.get("channels", 3))
    except (FileNotFoundError, ValueError) as e:
        raise CommandError(f"--data: {e}") from None
    if dataset.image_shape[0] != c:
        raise CommandError(f"--data: the images have {dataset.image_shape[0]} channels, the model takes {c}")
    if args.num > len(dataset):
        raise CommandError(f"--num must be at most the data's {len(dataset)} images, got {args.num}")
    model, meta = train_vae.load_vae(args.ckpt, device=device)
    result = train_vae.sample_vae(
        model, dataset, args.num, args.seed, args.out, ncol=args.ncol, scale=args.scale, backend=args.backend
    )
    width, height = result.size
    print(
        f"wrote {args.num} images with their reconstructions and {args.num} prior samples to {args.out} "
        f"({width}x{height})"
    )
    return 0


RUNNERS = {
    ("train", "diffusion"): _run_train_diffusion,
    ("train", "vae"): _run_train_vae,
    ("sample", "diffusion"): _run_sample_diffusion,
    ("sample", "vae"): _run_sample_vae,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `genkernels` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="genkernels", description="Fused GPU kernels for generative models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, built CUDA archs, and which backends can run here")
    sub.add_parser("bench", help="benchmark every kernel against eager PyTorch and torch.compile", add_help=False)
    family_parsers = {"train": _train_parser(sub), "sample": _sample_parser(sub)}
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
    try:
        return RUNNERS[args.command, args.family](args)
    except CommandError as e:
        print(f"genkernels {args.command} {args.family}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
