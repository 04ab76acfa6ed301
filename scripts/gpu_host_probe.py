"""Where a call's CPU time goes on a GPU machine: host microseconds of eager ops, genkernels ops and autograd,
cProfile of the genkernels paths, Triton's launch cost against its compiled launcher alone, and a DiT-XL/2
sampling loop with plain calls against one replayed CUDA graph.

    python scripts/gpu_host_probe.py [OUT_FILE] [--sampling-only]

Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

OUT = sys.stdout
#: The checkout: `python scripts/gpu_host_probe.py` puts scripts/ on sys.path, not the checkout, whose tests
#: package the float32 breakdown imports (the installed package is genkernels alone).
ROOT = Path(__file__).resolve().parents[1]


def say(*args) -> None:
    print(*args, file=OUT, flush=True)


def section(name: str, fn) -> None:
    """Run one part of the probe; one that raises is reported and the parts after it still run."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the finding is the error; the other parts' figures still count
        say(f"\n## {name}: failed: {type(e).__name__}: {e}")


def host_us(fn, calls: int = 100) -> float:
    """Median CPU microseconds a call, the GPU kept busy (a long sleep kernel queued first)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(1e9))
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def profile(name: str, fn, calls: int = 300, top: int = 28) -> None:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    say(f"\n### cProfile {name} ({calls} calls)\n{s.getvalue()}")


def dit_float32_sources(dev) -> None:
    """tests/models/test_dit.py::test_inference_on_cuda_auto_backend[float32]'s error, with each op family in
    turn on the reference backend (and the GELU epilogue off): which one carries the error."""
    import copy
    import zlib

    from genkernels import _registry
    from genkernels.models import DiT, DiTConfig
    from genkernels.models._layers import with_torch_layers
    from genkernels.ops import gated_mlp

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.models.test_dit import _inputs, _randomized

    node = "tests/models/test_dit.py::test_inference_on_cuda_auto_backend[torch.float32]"
    torch.manual_seed(zlib.crc32(node.encode()))
    model = _randomized(DiT(DiTConfig.tiny(depth=3))).to(dev).requires_grad_(False)
    twin = with_torch_layers(model)
    x, t, labels = (v.to(dev) for v in _inputs(3))
    with torch.no_grad():
        ref64 = copy.deepcopy(twin).double()(x.double(), t.double(), labels).cpu()
        twin_err = (twin(x, t, labels).double().cpu() - ref64).abs().max().item()
    say(f"\n## tiny DiT float32 on CUDA: twin err {twin_err:.3g}, bound {2 * twin_err + 1e-5:.3g}")
    select, epilogue = _registry.select, gated_mlp.gelu_epilogue
    adaln = ("layer_norm_modulate", "gated_residual", "gated_residual_layer_norm_modulate")
    variants = {
        "default": (),
        "no GELU epilogue": ("epilogue",),
        "attention on reference": ("attention",),
        "adaln on reference": adaln,
        "rope on reference": ("rope",),
        "gelu_tanh on reference + no epilogue": ("gelu_tanh", "epilogue"),
    }
    for name, forced in variants.items():

        def forced_select(op, *args, backend=None, forced=forced, **kwargs):
            return select(op, *args, backend="reference" if op in forced else backend, **kwargs)

        _registry.select = forced_select
        if "epilogue" in forced:
            gated_mlp.gelu_epilogue = lambda *a, **k: False
        try:
            with torch.no_grad():
                err = (model(x, t, labels).double().cpu() - ref64).abs().max().item()
            say(f"  {err:.3g}  {name}")
        except Exception as e:
            say(f"  failed  {name}: {type(e).__name__}: {e}")
        finally:
            _registry.select, gated_mlp.gelu_epilogue = select, epilogue


def sampling_loops(dev, config=None, batch: int = 2, steps: int = 10, modes=("plain", "graph")) -> dict:
    """Wall milliseconds of ``genkernels.train.sample_diffusion`` on a DiT (default: DiT-XL/2 on 32 x 32 x 4
    latents, bf16 on a GPU), ``batch`` images with guidance (the model runs on 2 x batch), ddim, ``steps`` steps:
    the genkernels model and its PyTorch-layers twin, each with plain calls and replayed from a CUDA graph (the
    capture, three forwards, counted in). One untimed call of each first (compiles, autotuning). Returns
    {row: ms}; also printed."""
    from genkernels import train
    from genkernels.models import DiT, DiTConfig
    from genkernels.models._layers import with_torch_layers

    config = config or DiTConfig.dit_xl_2()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with torch.device(dev):  # initialized where it runs: 675 M parameters
        model = DiT(config).to(dtype).eval()
    models = {"genkernels": model, "PyTorch layers": with_torch_layers(model)}
    size = config.sample_size
    meta = {"objective": "eps", "schedule": train.Schedule().__dict__, "image_shape": [config.in_channels, size, size]}
    labels = torch.arange(batch) % max(1, config.num_classes)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = {}
    say(f"\n## sampling loop: DiT dim {config.dim} depth {config.depth}, {size}x{size}x{config.in_channels}, ")
    say(f"batch {batch} with guidance (model batch {2 * batch}), ddim {steps} steps, {dtype}: wall ms a call")
    for name, m in models.items():
        for mode in modes:

            def call(m=m, mode=mode):
                return train.sample_diffusion(
                    m, meta, labels, sampler="ddim", steps=steps, guidance=4.0, seed=0, cuda_graph=mode == "graph"
                )

            call()
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            times[f"{name}, {mode}"] = ms = (time.perf_counter() - t0) * 1e3
            say(f"  {ms:10.1f}  {name}, {mode} ({ms / steps:.2f} ms a step)")
    return times


def main() -> int:
    global OUT
    args = [a for a in sys.argv[1:] if a != "--sampling-only"]
    if args:
        OUT = open(args[0], "w")  # noqa: SIM115
    if not torch.cuda.is_available():
        say("gpu_host_probe: no CUDA GPU here")
        return 0
    if "--sampling-only" in sys.argv:
        say(f"gpu_host_probe: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        sampling_loops(torch.device("cuda"))
        return 0
    import triton
    from triton.runtime import jit

    import genkernels
    from genkernels import ops

    say(f"gpu_host_probe: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    dev = torch.device("cuda")
    F = torch.nn.functional

    x = torch.randn(2, 4096, 1152, device=dev, dtype=torch.bfloat16)
    shift = torch.randn(2, 1152, device=dev, dtype=torch.bfloat16)
    scale = torch.randn(2, 1152, device=dev, dtype=torch.bfloat16)
    small = torch.randn(64, device=dev)
    tiny = torch.randn(64, device=dev, requires_grad=True)
    tiny_dy = torch.randn(64, device=dev)

    class Ident(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return g

    from gpu_profile import bias_act_calls

    bias_act = bias_act_calls(dev)

    cases = {
        "torch.empty (64,)": lambda: torch.empty(64, device=dev),
        "small * 2 (one eager kernel)": lambda: small * 2,
        "F.layer_norm DiT-XL": lambda: F.layer_norm(x, (1152,), eps=1e-6),
        "eager layer_norm_modulate DiT-XL (4 ops)": lambda: (
            F.layer_norm(x, (1152,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        ),
        "ops.layer_norm_modulate triton": lambda: ops.layer_norm_modulate(
            x, None, None, shift, scale, backend="triton"
        ),
        "ops.layer_norm_modulate auto": lambda: ops.layer_norm_modulate(x, None, None, shift, scale),
        "ops.bias_act triton fwd": bias_act["bias_act fwd triton"],
        "autograd.grad tiny x*2": lambda: torch.autograd.grad(tiny * 2, tiny, tiny_dy),
        "autograd.grad tiny python Function": lambda: torch.autograd.grad(Ident.apply(tiny), tiny, tiny_dy),
        "eager bias_act fwd+bwd": bias_act["bias_act fwd_bwd eager"],
        "ops.bias_act triton fwd+bwd": bias_act["bias_act fwd_bwd triton"],
        "ops.bias_act cuda fwd+bwd": bias_act["bias_act fwd_bwd cuda"],
    }
    say("\n## host us a call (median of 100, GPU busy)")
    for name, fn in cases.items():
        try:
            say(f"  {host_us(fn):8.1f}  {name}")
        except Exception as e:
            say(f"  failed    {name}: {type(e).__name__}: {e}")

    # Triton's launch: the JIT path against the compiled kernel's launcher alone, same arguments.
    seen = {}
    original = jit.JITFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=warmup, **kwargs)
        seen[self.fn.__name__] = (self, kernel, args, kwargs, grid)
        return kernel

    jit.JITFunction.run = recording
    ops.layer_norm_modulate(x, None, None, shift, scale, backend="triton")
    bias_act["bias_act fwd triton"]()
    jit.JITFunction.run = original
    say("\n## triton launch: JITFunction.run vs CompiledKernel.run, us a call")
    for name, (fn, kernel, args, kwargs, grid) in seen.items():
        try:
            binder = fn.device_caches[torch.cuda.current_device()][4]
            bound, _, _ = binder(*args, **kwargs)
            values = list(bound.values())
            g = grid(bound) if callable(grid) else grid
            g = tuple(g) + (1,) * (3 - len(g))
            stream = torch.cuda.current_stream().cuda_stream

            def direct(kernel=kernel, g=g, stream=stream, values=values):
                kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, None, None, None, *values)

            def jitted(fn=fn, args=args, kwargs=kwargs, grid=grid):
                fn[grid](*args, **kwargs)

            def bind_only(binder=binder, args=args, kwargs=kwargs):
                binder(*args, **kwargs)

            say(
                f"  {name}: JIT {host_us(jitted):.1f}, binder alone {host_us(bind_only):.1f}, "
                f"compiled launcher {host_us(direct):.1f} ({len(values)} args)"
            )
        except Exception as e:
            say(f"  {name}: failed: {type(e).__name__}: {e}")

    section("tiny DiT float32 breakdown", lambda: dit_float32_sources(dev))
    section("sampling loop", lambda: sampling_loops(dev))
    profiles = (
        ("ops.layer_norm_modulate triton", cases["ops.layer_norm_modulate triton"], 300, 28),
        ("ops.bias_act triton fwd+bwd", cases["ops.bias_act triton fwd+bwd"], 100, 28),
        ("ops.bias_act cuda fwd+bwd", cases["ops.bias_act cuda fwd+bwd"], 100, 28),
        ("eager bias_act fwd+bwd", bias_act["bias_act fwd_bwd eager"], 100, 15),
    )
    for name, fn, calls, top in profiles:
        section(f"cProfile {name}", lambda name=name, fn=fn, calls=calls, top=top: profile(name, fn, calls, top))
    say(f"\ngenkernels {genkernels.__version__}: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
