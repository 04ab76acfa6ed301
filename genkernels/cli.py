"""The `genkernels` command: `info`, `bench [...]`, `train diffusion [...]`, `sample diffusion [...]`.

    genkernels train diffusion --data digits --steps 2000 --objective eps --out runs/digits
    genkernels sample diffusion --ckpt runs/digits/diffusion.safetensors --sampler ddim --steps 25 \\
        --guidance 3 --seed 0 --out grid.png

On CPU, train and sample run every GroupNorm and attention op on the "reference" backend unless
--backend says otherwise (the triton backend runs on CPU only under the slow Triton interpreter);
on CUDA the default is auto.
"""

from __future__ import annotations

import argparse
import math
import sys

FAMILIES = ("diffusion",)


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


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument(
        "--backend",
        choices=("auto", "reference", "triton", "cuda"),
        default=None,
        help="backend of every GroupNorm and attention op (default: reference on CPU, auto on CUDA)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_parser(sub) -> None:
    from .train import OBJECTIVES

    p = sub.add_parser("train", help="train a model (diffusion)", description="Train a generative model.")
    p.add_argument("family", choices=FAMILIES, help="model family")
    p.add_argument("--data", default="digits", help="'digits' (scikit-learn 8x8 digits) or a folder of images")
    p.add_argument("--image-size", type=_positive_int, default=32, help="folder images are resized to this (32)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="folder images: 1 grey or 3 RGB (3)")
    p.add_argument("--steps", type=_positive_int, default=2000, help="optimizer steps (2000)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (64)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (1e-3)")
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="eps",
        help="eps: predict the noise; v: v-prediction; flow: flow-matching velocity (eps)",
    )
    p.add_argument(
        "--label-dropout",
        type=_fraction,
        default=0.1,
        help="probability of training on the null label, for classifier-free guidance (0.1)",
    )
    p.add_argument("--ema-decay", type=_fraction, default=0.999, help="EMA decay of the sampled weights (0.999)")
    p.add_argument("--model", choices=("tiny", "small"), default="small", help="UNet size preset (small)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--save-every", type=int, default=500, help="also save every N steps (500; 0: only at the end)")
    p.add_argument("--out", required=True, help="output folder; the checkpoint is OUT/diffusion.safetensors")
    _add_runtime_args(p)


def _sample_parser(sub) -> None:
    from .train import SAMPLERS

    p = sub.add_parser("sample", help="sample a trained model into a PNG grid", description="Sample a PNG grid.")
    p.add_argument("family", choices=FAMILIES, help="model family")
    p.add_argument("--ckpt", required=True, help="checkpoint written by `genkernels train`")
    p.add_argument(
        "--sampler", choices=sorted(SAMPLERS), default=None, help="default: ddim for eps/v models, flow for flow models"
    )
    p.add_argument("--steps", type=_positive_int, default=25, help="sampling steps (25)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale; 1: none (3.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument(
        "--num", type=_positive_int, default=None, help="number of images (default: 4 per class, at least 16)"
    )
    p.add_argument(
        "--label",
        type=int,
        default=None,
        help="class of every image (default: cycle through the classes); -1: unconditional",
    )
    p.add_argument("--ncol", type=_positive_int, default=None, help="images per grid row (default: classes)")
    p.add_argument("--scale", type=_positive_int, default=None, help="pixel upscaling (default: to about 64 px)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--out", default="samples.png", help="PNG file to write (samples.png)")
    _add_runtime_args(p)


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


def _run_train(args) -> int:
    from . import data as data_mod
    from . import train

    device = _device(args.device)
    try:
        dataset = data_mod.load(args.data, args.image_size, args.channels)
    except (FileNotFoundError, ValueError) as e:
        raise CommandError(f"--data: {e}") from None
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


def _run_sample(args) -> int:
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `genkernels` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="genkernels", description="Fused GPU kernels for generative models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, built CUDA archs, and which backends can run here")
    sub.add_parser("bench", help="benchmark every kernel against eager PyTorch and torch.compile", add_help=False)
    _train_parser(sub)
    _sample_parser(sub)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from genkernels import bench

        return bench.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        import genkernels

        print(genkernels.info())
        return 0
    try:
        return _run_train(args) if args.command == "train" else _run_sample(args)
    except CommandError as e:
        print(f"genkernels {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
