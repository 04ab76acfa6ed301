"""Per-kernel GPU times of the cases that decide the GAN and transformer goals (a GPU run's second look).

    python scripts/gpu_profile.py [OUT_FILE]

For each case and backend: the CUDA kernels one call launches, each kernel's mean device time over
10 profiled calls (torch.profiler), and the host time a call takes with the GPU kept busy. Without a
GPU it says so and exits 0. Cases: bias_act lrelu bf16 (32, 512, 64, 64) forward and forward +
backward; layer_norm_modulate bf16 forward at DiT-XL (2, 4096, 1152) and FLUX (1, 4608, 3072); one
DiT-XL/2 block forward at L = 4096 (batch 2, bf16), genkernels (plain: adaLN on cuda, auto's choice, and on
triton; replayed from a CUDA graph: on triton, auto's choice in graph_mode, and on cuda) and its PyTorch-layer
twin, and its
attention alone (2 x 16 heads x 4096 x 4096, head dim 72) on each backend (triton on both its tiles) and each
SDPA kernel; one cached
ImageGPT decoding step (the imagegpt benchmark's model, batch 64), genkernels and its twin, plain and from
its CUDA graph. Last, whether a triton adaLN kernel can be compiled and loaded inside a CUDA graph capture.
"""

from __future__ import annotations

import sys
import time

import torch

import genkernels
from genkernels import ops


def bias_act_calls(dev) -> dict:
    """The ANCHORS bias_act case (lrelu, bf16 (32, 512, 64, 64), bias (512,)) as {name: call}: eager and each
    fast backend, forward and forward + backward (x and the bias differentiated)."""
    x = torch.randn(32, 512, 64, 64, device=dev, dtype=torch.bfloat16)
    b = torch.randn(512, device=dev, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    xg, bg = x.detach().requires_grad_(True), b.detach().requires_grad_(True)

    def fwd(backend):
        return lambda: ops.bias_act(x, b, act="lrelu", backend=backend)

    def fwd_bwd(backend):
        def run():
            y = ops.bias_act(xg, bg, act="lrelu", backend=backend)
            torch.autograd.grad(y, (xg, bg), dy)

        return run

    def eager_fwd():
        return torch.nn.functional.leaky_relu(x + b.view(1, -1, 1, 1), 0.2) * 2**0.5

    def eager_fwd_bwd():
        y = torch.nn.functional.leaky_relu(xg + bg.view(1, -1, 1, 1), 0.2) * 2**0.5
        torch.autograd.grad(y, (xg, bg), dy)

    calls = {"bias_act fwd eager": eager_fwd, "bias_act fwd_bwd eager": eager_fwd_bwd}
    for be in ("cuda", "triton"):
        calls[f"bias_act fwd {be}"] = fwd(be)
        calls[f"bias_act fwd_bwd {be}"] = fwd_bwd(be)
    return calls


def _bias_act_cases(dev):
    yield from bias_act_calls(dev).items()


def _adaln_cases(dev):
    for name, (B, L, D) in (("DiT-XL", (2, 4096, 1152)), ("FLUX", (1, 4608, 3072))):
        x = torch.randn(B, L, D, device=dev, dtype=torch.bfloat16)
        shift = torch.randn(B, D, device=dev, dtype=torch.bfloat16)
        scale = torch.randn(B, D, device=dev, dtype=torch.bfloat16)

        def eager(x=x, shift=shift, scale=scale, D=D):
            n = torch.nn.functional.layer_norm(x, (D,), eps=1e-6)
            return n * (1 + scale[:, None]) + shift[:, None]

        yield f"layer_norm_modulate {name} eager", eager
        for be in ("cuda", "triton"):
            yield (
                f"layer_norm_modulate {name} {be}",
                lambda x=x, shift=shift, scale=scale, be=be: ops.layer_norm_modulate(
                    x, None, None, shift, scale, backend=be
                ),
            )


def _dit_cases(dev):
    """The DiT-XL/2 block at L = 4096 (the benchmark's shape): genkernels (auto) and the PyTorch-layer twin, then
    its attention alone (q, k, v (2, 16, 4096, 72) bf16) on genkernels' backends and on SDPA's kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from genkernels.bench import dit

    config = dit._config("dit_xl_2")
    with torch.no_grad():
        ours, twin = dit.build_models(config, dev, torch.bfloat16)
        inputs = dit.make_inputs(config, dit.BATCH, 64, torch.bfloat16, dev)

    def block(model):
        def run():
            with torch.no_grad():
                model(*inputs)

        return run

    yield "DiT-XL/2 block L=4096 genkernels", block(ours)
    yield "DiT-XL/2 block L=4096 genkernels, adaLN on triton", _adaln_on("triton", block(ours))
    if dev.type == "cuda":  # the adaLN kernels replayed: which backend's are faster in the block, without CPU time
        # Captured in graph_mode (bench.core.capture_graph): auto takes triton for the block's adaLN calls.
        yield "DiT-XL/2 block L=4096 genkernels CUDA graph (adaLN on triton: graph_mode)", _graphed(block(ours))
        yield "DiT-XL/2 block L=4096 genkernels CUDA graph, adaLN on cuda", _adaln_on("cuda", _graphed(block(ours)))
    yield "DiT-XL/2 block L=4096 PyTorch layers", block(twin)
    q, k, v = (
        torch.randn(dit.BATCH, config.heads, 4096, config.head_dim, device=dev, dtype=torch.bfloat16) for _ in range(3)
    )
    for be in ("cuda", "triton"):
        yield f"attention d{config.head_dim} L=4096 {be}", lambda be=be: ops.attention(q, k, v, backend=be)
    yield (
        f"attention d{config.head_dim} L=4096 triton, d128's 128 x 64 tiles",
        _with_d128_tiles(lambda: ops.attention(q, k, v, backend="triton")),
    )
    F = torch.nn.functional
    for name, kernel in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("cuDNN", SDPBackend.CUDNN_ATTENTION),
        ("mem-efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):

        def sdpa(kernel=kernel):
            with sdpa_kernel(kernel):
                return F.scaled_dot_product_attention(q, k, v)

        yield f"attention d{config.head_dim} L=4096 SDPA {name}", sdpa


def _adaln_on(name, fn):
    """fn with the three adaLN ops on backend ``name`` and every other op on auto (auto takes cuda for them: its
    call costs less CPU time, while run 5 measured the triton kernels 2 to 2.3x faster)."""
    from genkernels.ops.adaln import OPS

    def run():
        with genkernels.backend(name, ops=OPS):
            return fn()

    return run


def _graphed(fn):
    """fn captured in a CUDA graph at its first call (two warm-up calls first), then replayed."""
    from genkernels.bench.core import capture_graph

    graph = []

    def run():
        if not graph:
            graph.append(capture_graph(fn)[0])
        graph[0].replay()

    return run


def _capture_unwarmed_triton(dev):
    """Whether a triton adaLN kernel never launched before (a shape no case used) can be launched for the first
    time, compiled and loaded, inside a CUDA graph capture: what auto taking triton under capture would meet
    when a model is warmed up outside the capture on cuda. Last of all: a failed capture can leave the device
    unusable."""
    x = torch.randn(3, 37, 520, device=dev, dtype=torch.bfloat16)
    shift, scale = (torch.randn(3, 520, device=dev, dtype=torch.bfloat16) for _ in range(2))
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.layer_norm_modulate(x, None, None, shift, scale, backend="triton")
        graph.replay()
        torch.cuda.synchronize()
        want = ops.layer_norm_modulate(x, None, None, shift, scale, backend="reference")
        err = (out.float() - want.float()).abs().max().item()
        return f"ok: captured and replayed, max |out - reference| = {err:.3g}"
    except Exception as e:  # what the capture met is the finding
        return f"{type(e).__name__}: {e}"


def _with_d128_tiles(fn):
    """fn with the triton attention forward on the tiles of the padded head dim (at 72 and 80: d128's 128 x 64 on
    8 warps, which the forward took before d64's 128 x 128 and then FWD_90_UNMASKED), to time them side by side."""
    import genkernels.triton.attention as tri

    def run():
        chosen, max_d = tri._config_block, tri.FWD_90_UNMASKED_MAX_D
        tri._config_block = lambda head_dim, arch, kernel, masked: max(64, tri._block_d(head_dim))
        tri.FWD_90_UNMASKED_MAX_D = 0
        try:
            return fn()
        finally:
            tri._config_block, tri.FWD_90_UNMASKED_MAX_D = chosen, max_d

    return run


def _imagegpt_cases(dev):
    """One cached decoding step of the imagegpt benchmark's model (batch 64, bf16, step t = 128 of 256: every
    layer against 129 cached keys), genkernels (auto) and the PyTorch-layer twin, launched from Python and (on
    a GPU) replayed from the step's CUDA graph."""
    from genkernels.bench import imagegpt
    from genkernels.models.transformer import _Decoder

    ours, twin = imagegpt.build_models("bench", dev)
    t = ours.config.seq_len // 2
    for label, model in (("genkernels", ours), ("PyTorch layers", twin)):
        model.to(torch.bfloat16)
        for graphed in (False, True) if dev.type == "cuda" else (False,):
            decoder = _Decoder(model, None, imagegpt.BATCH, 1.0, None, dev, graphed=graphed)

            def step(model=model, decoder=decoder, graphed=graphed):
                if graphed:
                    decoder.graphs[t].replay()
                    return
                for cache in decoder.caches:  # step t again: the cache holds positions 0 .. t - 1
                    cache.length = t
                with torch.no_grad():
                    model._decode_step(t, decoder)

            yield f"ImageGPT decode step t={t} batch {imagegpt.BATCH} {label}{' CUDA graph' if graphed else ''}", step


def _profile(fn, reps=10):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        dt = getattr(ev, "device_time_total", None)
        if dt is None:
            dt = ev.cuda_time_total
        if dt > 0:
            rows.append((dt / reps, ev.count / reps, ev.key))
    rows.sort(reverse=True)
    # host time a call with the GPU busy: a long kernel first, then 50 calls queued behind it
    torch.cuda._sleep(int(2e8))
    t0 = time.perf_counter()
    for _ in range(50):
        fn()
    host_us = (time.perf_counter() - t0) / 50 * 1e6
    torch.cuda.synchronize()
    return rows, host_us


def main() -> int:
    out = open(sys.argv[1], "w") if len(sys.argv) > 1 else sys.stdout  # noqa: SIM115
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA GPU here, nothing to profile", file=out)
        return 0
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    print(f"gpu_profile: {name}, torch {torch.__version__}, genkernels {genkernels.__version__}", file=out)
    for cases in (_bias_act_cases(dev), _adaln_cases(dev), _dit_cases(dev), _imagegpt_cases(dev)):
        for name, fn in cases:
            try:
                rows, host_us = _profile(fn)
            except Exception as e:  # a backend that cannot run the case: say so, go on
                print(f"\n## {name}: {type(e).__name__}: {e}", file=out)
                continue
            total = sum(r[0] for r in rows)
            print(f"\n## {name}: kernels {total:.1f} us a call, host {host_us:.1f} us a call", file=out)
            for us, count, key in rows:
                print(f"  {us:9.1f} us  x{count:g}  {key[:110]}", file=out)
            out.flush()
    print(f"\n## triton adaLN launched first inside a CUDA graph capture: {_capture_unwarmed_triton(dev)}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
