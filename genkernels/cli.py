"""The `genkernels` command: `genkernels info`, `genkernels bench [...]`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `genkernels` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="genkernels", description="Fused GPU kernels for generative models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, built CUDA archs, and which backends can run here")
    sub.add_parser("bench", help="benchmark every kernel against eager PyTorch and torch.compile", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        import genkernels

        print(genkernels.info())
        return 0
    from genkernels import bench

    return bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
