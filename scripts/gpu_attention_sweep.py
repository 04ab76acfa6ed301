"""The triton attention kernels' tiles, timed on a GPU: which (BLOCK_M, BLOCK_N, num_warps, num_stages) is fastest.

    python scripts/gpu_attention_sweep.py [OUT_FILE] [--deadline-s S] [--shapes NAME,...] [--kernel fwd|dkdv|dq]

The kernels take their tiles from ``genkernels.triton.attention.CONFIGS`` (nothing is autotuned at run time).
This sweeps one kernel's at the shapes the goals are measured on: for each shape, every tile of the kernel's
grid below (the forward's: those that fit in shared memory), launched through ``ops.attention(...,
backend="triton")`` with that kernel's choice replaced, checked against SDPA (relative error under 2e-2 in bf16:
the output, or each of dq, dk, dv) and timed as the benchmark times (``genkernels.bench.core.time_ms``: median,
L2 flushed before each call), beside the current choice and SDPA's cuDNN and flash kernels. ``--kernel fwd``
(the default) times the forward; ``dkdv`` and ``dq`` time the backward (``torch.autograd.grad`` of one forward's
output: the delta, dq and dk/dv kernels, the other backward kernel on its own choice), counted as 2.5 times the
forward's FLOPs. Prints each shape's table fastest first, and writes it to OUT_FILE when given. A tile that does
not compile (out of registers or shared memory) is listed with its error. Stops starting new tiles after
``--deadline-s`` seconds (default 150): each tile compiles once, a few seconds.

Without a GPU it says so and exits 0; ``--dry-run`` runs the sweep's own path on the CPU under the triton
interpreter at a tiny shape with two tiles (what the tests run).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable

if __name__ == "__main__" and "--dry-run" in sys.argv:  # before triton is imported: its kernels then interpret
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

#: name: (batch, heads, tokens, head dim), bf16, self-attention without a mask.
SHAPES = {
    "DiT-XL d72": (2, 16, 4096, 72),
    "SDXL d64": (2, 10, 4096, 64),
    "FLUX d128": (1, 24, 4608, 128),
    "SD1.5 d40": (2, 8, 4096, 40),
}
# Likeliest first (a deadline cuts the tail). First the tiles that let blocks share an SM: one warpgroup (BLOCK_M
# 64 on 4 warps) in at most 255 registers and under 114 KB of shared memory runs two or three blocks an SM, whose
# softmax and tensor-core products then overlap (within a block they alternate: every wgmma waits at the softmax).
# At d72 on sm_90a (triton 3.6): (64, 128, 4, 2) 254 registers and 92 KB; (64, 64, 4, 3) 168 and 72 KB. Then
# wgmma's 64-row warpgroups two to a block (BLOCK_M 128 on 8 warps) with long key blocks, the current choice's
# family; BLOCK_N 32 and 2 stages come last.
_SHARED_SM = [(64, 128, 4, 2), (64, 64, 4, 3), (64, 64, 4, 2)]
GRID = _SHARED_SM + [t for t in itertools.product((128, 64), (128, 64, 32), (8, 4), (3, 4, 2)) if t not in _SHARED_SM]
# The backward kernels' grids. First the tiles that compile without spills for sm_90a (triton 3.6, compiled without
# a GPU as tests/triton/_compile_kernels.py does) at d64 and d72 (split 64 + 16), then the rest. The current
# choices are among them: dk/dv (32, 128, 8, 3) at d64, (32, 64, 8, 2) at d72 and d128; dq (128, 32, 8, 3) at d64,
# (128, 32, 8, 2) at d72 and d128. dk/dv keeps k, v, dk, dv [BLOCK_N, D] in place while q and dout stream in
# BLOCK_M rows: (64, 128, 8, 2) takes 229 registers at d64 (8 bytes spilled at d72), (32, 128, 8, 3) 173 / 216,
# (64, 64, 8, 3) 221 / 252; at d128 only BLOCK_N 64 on 8 warps is spill-free. dq keeps q, dout, dq [BLOCK_M, D]:
# (128, 64, 8, 3) takes 126 / 166 / 205 registers at d64 / d72 / d128.
_DKDV_CLEAN = [(64, 128, 8, 2), (32, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 3), (64, 64, 8, 2), (32, 64, 8, 3)]
_DKDV_CLEAN += [(32, 64, 8, 2)]
_DQ_CLEAN = [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3), (64, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 2)]
GRIDS = {
    "fwd": GRID,
    "dkdv": _DKDV_CLEAN + [t for t in itertools.product((32, 64), (64, 128), (8, 4), (3, 2)) if t not in _DKDV_CLEAN],
    "dq": _DQ_CLEAN + [t for t in itertools.product((128, 64), (64, 32), (8, 4), (3, 2)) if t not in _DQ_CLEAN],
}
#: The backward's FLOPs over the forward's (five matrix products of the forward's size against two).
BACKWARD_FLOPS = 2.5
SMEM_BYTES = 227 * 1024  # sm_90's shared memory a block
MAX_REL_ERR = 2e-2


def _smem(block_m: int, block_n: int, block_d: int, stages: int) -> int:
    """Shared memory of the forward's tiles, 2-byte elements: q, and num_stages blocks of k and of v."""
    return (block_m + 2 * stages * block_n) * block_d * 2


def _with_tiles(tiles: tuple[int, int, int, int] | None, fn: Callable[[], object], kernel: str = "fwd") -> object:
    """fn() with the triton ``kernel`` ("fwd", "dkdv" or "dq") on ``tiles`` (None: its own choice)."""
    import genkernels.triton.attention as tri

    if tiles is None:
        return fn()
    chosen = tri._config

    def config(q, which, masked=False, causal=False):
        return tiles if which == kernel else chosen(q, which, masked, causal)

    tri._config = config
    try:
        return fn()
    finally:
        tri._config = chosen


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def sweep(
    shape: tuple[int, int, int, int],
    device: torch.device,
    grid: list[tuple[int, int, int, int]],
    deadline: float,
    time_ms: Callable[[Callable[[], object]], float],
    kernel: str = "fwd",
) -> list[tuple[str, float | None, str]]:
    """Rows (variant, ms or None, note) of one shape: the current choice, SDPA's kernels, then each tile of
    ``kernel`` ("fwd": the forward timed; "dkdv" or "dq": the backward timed, that kernel's tiles swept)."""
    from genkernels import ops
    from genkernels.triton.attention import _head_split

    b, h, n, d = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backward = kernel != "fwd"
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    dout = torch.randn(b, h, n, d, device=device, dtype=dtype)
    F = torch.nn.functional
    ref_out = F.scaled_dot_product_attention(q, k, v)
    ref = torch.autograd.grad(ref_out, (q, k, v), dout) if backward else (ref_out.detach(),)
    ours = ops.attention(q, k, v, backend="triton") if backward else None  # the forward the backward reuses
    rows: list[tuple[str, float | None, str]] = []

    def add(name: str, tiles: tuple[int, int, int, int] | None) -> None:
        def call():
            if backward:
                return _with_tiles(tiles, lambda: torch.autograd.grad(ours, (q, k, v), dout, retain_graph=True), kernel)
            return (_with_tiles(tiles, lambda: ops.attention(q, k, v, backend="triton"), kernel),)

        try:
            err = max(_rel_err(got, want) for got, want in zip(call(), ref))
            if not err < MAX_REL_ERR:  # NaN fails too
                rows.append((name, None, f"WRONG: relative error {err:.3g}"))
                return
            rows.append((name, time_ms(call), f"err {err:.1e}"))
        except Exception as e:  # a tile that does not compile: say so, go on
            rows.append((name, None, f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"))

    add("triton, current choice", None)
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for label, sdp in (("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION), ("SDPA flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(sdp):
                    out = F.scaled_dot_product_attention(q, k, v)

                def sdpa(sdp=sdp, out=out):
                    if backward:  # the backward kernel was chosen with the forward's
                        return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
                    with sdpa_kernel(sdp):
                        return F.scaled_dot_product_attention(q, k, v)

                rows.append((label, time_ms(sdpa), ""))
            except Exception as e:  # a kernel SDPA does not have for this shape
                rows.append((label, None, f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"))
    block_d = sum(_head_split(d))
    for tiles in grid:
        block_m, block_n, _warps, stages = tiles
        if not backward and _smem(block_m, block_n, block_d, stages) > SMEM_BYTES:
            continue
        if time.monotonic() > deadline:
            rows.append((f"{tiles} and the rest", None, "not run: deadline"))
            break
        add(str(tiles), tiles)
    return rows


def _table(
    name: str, shape: tuple[int, int, int, int], rows: list[tuple[str, float | None, str]], kernel: str = "fwd"
) -> list[str]:
    b, h, n, d = shape
    flops = 4 * b * h * n * n * d * (1 if kernel == "fwd" else BACKWARD_FLOPS)
    what = "forward" if kernel == "fwd" else f"backward, {kernel} tiles swept"
    lines = [f"## {name}: {b} x {h} heads x {n} x {n}, head dim {d}; {what}", "", "| variant | ms | TFLOP/s | note |"]
    lines.append("| --- | --- | --- | --- |")
    for variant, ms, note in sorted(rows, key=lambda r: (r[1] is None, r[1] or 0.0)):
        rate = f"{flops / ms / 1e9:.0f}" if ms else "-"
        lines.append(f"| {variant} | {f'{ms:.4f}' if ms else '-'} | {rate} | {note} |")
    return lines + [""]


def _shape_names(text: str) -> list[str]:
    """--shapes: names of SHAPES, comma-separated, each once in the order given; an unknown one is refused before
    any work (a dry run included)."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in SHAPES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown shape(s) {unknown or [text]}; shapes: {', '.join(SHAPES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=None, help="also write the tables to this file")
    p.add_argument("--deadline-s", type=float, default=150.0, help="start no new tile after this many seconds")
    p.add_argument(
        "--shapes", type=_shape_names, default=list(SHAPES), help=f"comma-separated, of: {', '.join(SHAPES)}"
    )
    p.add_argument("--kernel", choices=tuple(GRIDS), default="fwd", help="the kernel whose tiles are swept")
    p.add_argument("--dry-run", action="store_true", help="the CPU path under the triton interpreter, tiny shape")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    start = time.monotonic()
    if args.dry_run:
        device = torch.device("cpu")
        shapes = {"tiny d72": (1, 2, 40, 72)}
        grid = [(32, 16, 4, 1), (16, 32, 4, 1)]

        def time_ms(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

    else:
        if not torch.cuda.is_available():
            print("gpu_attention_sweep: no CUDA GPU here, nothing to time")
            return 0
        from genkernels.bench.core import QUICK_TIMING
        from genkernels.bench.core import time_ms as bench_time_ms

        device = torch.device("cuda")
        shapes = {name: SHAPES[name] for name in args.shapes}
        grid = GRIDS[args.kernel]

        def time_ms(fn):  # as the benchmark times: median of CUDA-event times, L2 flushed before each call
            return bench_time_ms(fn, QUICK_TIMING)

    lines = [f"gpu_attention_sweep: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU dry run'}", ""]
    print(lines[0], flush=True)
    for i, (name, shape) in enumerate(shapes.items()):
        # An equal share each, in absolute time: what a shape leaves unused goes to the next.
        deadline = start + args.deadline_s * (i + 1) / len(shapes)
        table = _table(name, shape, sweep(shape, device, grid, deadline, time_ms, args.kernel), args.kernel)
        print("\n".join(table), flush=True)
        lines += table
        if args.out:  # after every shape: a run stopped by its time limit keeps the shapes it finished
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
