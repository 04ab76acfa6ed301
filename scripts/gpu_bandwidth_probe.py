"""How the timing method moves a memory-bound call's share of the copy bandwidth, and bias_act's forward tiles.

    python scripts/gpu_bandwidth_probe.py [OUT_FILE] [--rounds R] [--dry-run]

Each call below is timed three ways, on the same inputs and outputs:

- cold: the suite's method (genkernels.bench.core.time_ms: triton's do_bench, a 256 MiB L2 flush before each
  call, CUDA events around it, the median). The flush is a write, so the call starts with up to an L2's worth of
  the flush's dirty lines, which its own traffic evicts and DRAM writes back inside the timed window.
- clean: the same flush, then a read of the flush buffer, then the call: its inputs are out of L2 and no dirty
  line is left to write back, but its own writes may stay in L2 past the end (so it errs the other way).
- batch: many calls back to back, replayed from one CUDA graph, each on the next of several input sets and into
  an output of its own, the sets together larger than the L2 (so every call reads its inputs from DRAM), the
  graph's time over the calls. A call then pays the write-back of its own outputs, on average, and no launch gap.

The calls: copy_ of the bytes of each case (PyTorch's device-to-device copy), a triton copy of them (BLOCK
4096, 16-byte vectors: another kernel that moves the same bytes and nothing else), layer_norm_modulate at
DiT-XL (2, 4096, 1152) and FLUX (1, 4608, 3072) in bf16 (eager, torch.compile, triton, cuda), and bias + leaky
ReLU at the ANCHORS shape (32, 512, 64, 64) in bf16 (torch.compile, cuda, and the triton forward at several
BLOCK / num_warps). The copy rate is the suite's: a 1 GiB float32 copy_, cold. Rounds repeat every timing; the
tables give the median over rounds.

Without a GPU it says so and exits 0; --dry-run then calls every variant once on small CPU tensors (the triton
ones under the interpreter, TRITON_INTERPRET=1, which it sets) to check the script itself.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from collections.abc import Callable

if __name__ == "__main__" and "--dry-run" in sys.argv:  # before triton is imported: its kernels then interpret
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:  # the no-GPU message and the tests do without it
    triton = tl = None

OUT = sys.stdout
L2_SPAN = 256 * 2**20  # the input sets of a batch together: at least this many bytes (an H200's L2 is 50 MiB)
BIAS_ACT_TILES = ((1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8))


def _runs(backend: str) -> bool:
    """Whether ``backend`` is available here (the cuda one needs the built extension); says so when not, and its
    variants are left out rather than failing the run."""
    if backend != "cuda":
        return True
    from genkernels.cuda._common import extension_error

    reason = extension_error()
    if reason is not None:
        say(f"(cuda variants left out: extension not built: {reason})")
    return reason is None


def say(*args) -> None:
    print(*args, file=OUT, flush=True)


def cold_ms(fn: Callable[[], object]) -> float:
    from genkernels.bench.core import FULL_TIMING, time_ms

    return time_ms(fn, FULL_TIMING)


def clean_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of one call, CUDA events around it, after the suite's 256 MiB flush (a write) and then
    a read of the flush buffer: the call starts with its inputs out of L2 and no dirty lines there to write back
    (its own writes may stay in L2 past the end event, so this errs the other way from cold)."""
    from genkernels.bench.core import FULL_TIMING, _time_ms_events

    def clear(buffer: torch.Tensor) -> None:
        buffer.zero_()
        buffer.sum(dtype=torch.int32)

    return _time_ms_events(fn, FULL_TIMING, clear)


def batch_ms(fns: list[Callable[[], object]], calls: int, reps: int = 10) -> float:
    """Milliseconds a call: ``calls`` calls cycling through ``fns`` (one per input set), captured in one CUDA
    graph with every output kept alive (each call writes memory of its own), replayed ``reps`` times, median."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:  # warm-up outside the capture: compiles, autotuning, lazy allocations
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    keep = []
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(calls):
            keep.append(fns[j % len(fns)]())
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph, keep
    torch.cuda.synchronize()
    return statistics.median(times)


if triton is not None:

    @triton.jit
    def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def triton_copy(x: torch.Tensor) -> torch.Tensor:
    """A copy of contiguous ``x`` by a triton kernel: BLOCK = 4096 elements a program on 8 warps."""
    y = torch.empty_like(x)
    _copy_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096, num_warps=8)
    return y


def compiled_fn(fn: Callable, device: torch.device) -> Callable:
    """``torch.compile(fn, dynamic=False)`` on a GPU (``fn`` itself in a dry run), as the suite compiles its
    baselines: one kernel specialized to the shape. Each group's formula is the same code object, which
    dynamo's automatic dynamic shapes would otherwise recompile for a second shape with symbolic sizes, so
    that FLUX's baseline would be a dynamic-shape kernel where DiT-XL's is not."""
    return torch.compile(fn, dynamic=False) if device.type == "cuda" else fn


def _sets(in_bytes: int, dry: bool) -> int:
    return 2 if dry else max(2, math.ceil(L2_SPAN / in_bytes))


def layer_norm_cases(shape, device, dry: bool) -> dict[str, tuple[int, list[Callable[[], object]]]]:
    """variant -> (bytes moved a call, one call per input set)."""
    from genkernels import ops

    b, length, d = shape
    row_bytes = b * length * d * 2
    sets = _sets(row_bytes, dry)
    g = torch.Generator().manual_seed(0)
    xs = [(torch.randn(b, length, d, generator=g) + torch.randn(b, length, 1, generator=g)) for _ in range(sets)]
    xs = [x.to(device, torch.bfloat16) for x in xs]
    shift = (0.5 * torch.randn(b, d, generator=g)).to(device, torch.bfloat16)
    scale = (0.5 * torch.randn(b, d, generator=g)).to(device, torch.bfloat16)
    moved = 2 * row_bytes + 2 * b * d * 2

    def eager(x):
        return F.layer_norm(x, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    compiled = compiled_fn(eager, device)
    variants = {
        "copy_": [(lambda x=x: torch.empty_like(x).copy_(x)) for x in xs],
        "triton copy": [(lambda x=x: triton_copy(x)) for x in xs],
        "eager": [(lambda x=x: eager(x)) for x in xs],
        "torch.compile": [(lambda x=x: compiled(x)) for x in xs],
    }
    backends = ("triton", "cuda") if device.type == "cuda" else ("reference",)
    backends = [b for b in backends if _runs(b)]
    for backend in backends:
        variants[backend] = [
            (lambda x=x, be=backend: ops.layer_norm_modulate(x, shift=shift, scale=scale, eps=1e-6, backend=be))
            for x in xs
        ]
    return {name: (2 * row_bytes if "copy" in name else moved, fns) for name, fns in variants.items()}


def bias_act_cases(shape, device, dry: bool) -> dict[str, tuple[int, list[Callable[[], object]]]]:
    """variant -> (bytes moved a call, one call per input set)."""
    from genkernels import ops

    n = math.prod(shape)
    sets = _sets(2 * n, dry)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(shape, generator=g).to(device, torch.bfloat16) for _ in range(sets)]
    bias = torch.randn(shape[1], generator=g).to(device, torch.bfloat16)

    def eager(x):
        return F.leaky_relu(x + bias.view(1, -1, 1, 1), 0.2) * math.sqrt(2)

    compiled = compiled_fn(eager, device)
    variants = {
        "copy_": [(lambda x=x: torch.empty_like(x).copy_(x)) for x in xs],
        "triton copy": [(lambda x=x: triton_copy(x)) for x in xs],
        "torch.compile": [(lambda x=x: compiled(x)) for x in xs],
    }
    if device.type == "cuda" and _runs("cuda"):
        variants["cuda"] = [(lambda x=x: ops.bias_act(x, bias, act="lrelu", backend="cuda")) for x in xs]
    variants["triton (default)"] = [(lambda x=x: ops.bias_act(x, bias, act="lrelu", backend="triton")) for x in xs]
    for block, warps in BIAS_ACT_TILES:
        variants[f"triton {block}/{warps}w"] = [
            (lambda x=x, bl=block, w=warps: _bias_act_tile(x, bias, bl, w)) for x in xs
        ]
    return {name: (4 * n, fns) for name, fns in variants.items()}


def _bias_act_tile(x: torch.Tensor, bias: torch.Tensor, block: int, warps: int) -> torch.Tensor:
    """The triton forward (lrelu, default gain) launched with BLOCK = ``block`` on ``warps`` warps."""
    from genkernels.triton import bias_act as tb
    from genkernels.triton._common import cdiv

    _, args = tb._launch_args(x, bias, "lrelu", 0.2, math.sqrt(2), None, 1)
    args.update(BLOCK=block, num_warps=warps, UNIFORM_C=args["stride_c"] % block == 0)
    y = torch.empty_like(x)
    with tb.on_device(x):
        tb._bias_act_forward_kernel[(cdiv(x.numel(), block),)](x, bias, y, **args)
    return y


def report(title: str, variants: dict, times: dict[str, dict[str, list[float]]], gbs: float) -> None:
    """One group's table: per variant and timing mode (``times[mode][variant]``: ms per round) the median of the
    rounds, as % of the copy rate ``gbs`` (GB/s) and against torch.compile's; then every round's times."""
    modes = list(times)
    sets, rounds = len(next(iter(variants.values()))[1]), len(next(iter(times[modes[0]].values())))
    say(f"## {title}\n\ninput sets: {sets}; rounds: {rounds}; ms: median over rounds\n")
    heads = ["variant", "MB a call"]
    for mode in modes:
        heads += [f"{mode} ms", f"{mode} % copy BW", f"{mode} vs compile"]
    say("| " + " | ".join(heads) + " |")
    say("|" + " --- |" * len(heads))
    for key, (moved, _) in variants.items():
        floor = moved / (gbs * 1e9) * 1e3
        cells = [f"{moved / 1e6:.1f}"]
        for mode in modes:
            ms, compiled = statistics.median(times[mode][key]), statistics.median(times[mode]["torch.compile"])
            cells += [f"{ms:.4f}", f"{100 * floor / ms:.0f}%", f"{compiled / ms:.3f}x"]
        say(f"| {key} | " + " | ".join(cells) + " |")
    for mode in modes:
        per = "; ".join(f"{k} {' '.join(f'{t:.4f}' for t in v)}" for k, v in times[mode].items())
        say(f"\n{mode} ms per round: {per}")
    say("")


def _rounds(text: str) -> int:
    """--rounds: an integer >= 1 (checked before any timing: the tables take the median over rounds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?")
    parser.add_argument("--rounds", type=_rounds, default=3, help="times each timing is repeated (>= 1; default 3)")
    parser.add_argument("--dry-run", action="store_true")
    opts = parser.parse_args(argv)
    if opts.out:
        OUT = open(opts.out, "w")  # noqa: SIM115 - closed at exit
    if not torch.cuda.is_available() and not opts.dry_run:
        say("no CUDA GPU: nothing to time (--dry-run checks the script on the CPU)")
        return 0
    dry = opts.dry_run
    device = torch.device("cpu" if dry else "cuda")
    small = {(2, 4096, 1152): (2, 64, 72), (1, 4608, 3072): (1, 32, 96), (32, 512, 64, 64): (2, 8, 16, 16)}

    def shape(s):
        return small[s] if dry else s

    groups = {
        "layer_norm_modulate DiT-XL (2, 4096, 1152)": layer_norm_cases(shape((2, 4096, 1152)), device, dry),
        "layer_norm_modulate FLUX (1, 4608, 3072)": layer_norm_cases(shape((1, 4608, 3072)), device, dry),
        "bias_act lrelu (32, 512, 64, 64)": bias_act_cases(shape((32, 512, 64, 64)), device, dry),
    }
    if dry:
        for title, variants in groups.items():
            for name, (_, fns) in variants.items():
                for fn in fns:
                    fn()
                say(f"dry run: {title}: {name}: {len(fns)} input sets called")
        return 0
    from genkernels.bench.core import FULL_TIMING, _copy_gbs

    name = torch.cuda.get_device_name()
    gbs = statistics.median(_copy_gbs(FULL_TIMING) for _ in range(3))
    say(f"# Cold, clean and batch timing, {name}, torch {torch.__version__}\n")
    say(f"copy rate (1 GiB float32 copy_, cold, median of 3): {gbs:,.0f} GB/s\n")
    timers = {
        "cold": lambda fns: cold_ms(fns[0]),
        "clean": lambda fns: clean_ms(fns[0]),
        "batch": lambda fns: batch_ms(fns, calls=max(16, 2 * len(fns))),
    }
    for title, variants in groups.items():
        times = {mode: {k: [] for k in variants} for mode in timers}
        for _ in range(opts.rounds):
            for key, (_, fns) in variants.items():
                for mode, timer in timers.items():
                    times[mode][key].append(timer(fns))
        report(title, variants, times, gbs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
