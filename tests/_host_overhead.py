"""CPU time of the op layer around a kernel launch, on a machine without a GPU.

Runs the cuda backend's Python path of a few ops on small CPU tensors with ``genkernels._C`` stubbed out (every
launch a no-op, workspaces and plans dummies), so what it times is everything a call costs the CPU before
and after its kernels: validation, dispatch, autograd, allocation and the launcher. Each op is timed through
the autograd node (``Function.apply``) and through :func:`genkernels._autograd.apply`, which skips the node when
no graph is recorded, interleaved, the minimum of the repetitions. Then three calls a training step or a
model makes: layer_norm_modulate and bias_act forward + backward (``torch.autograd.grad``), and a tiny DiT
block's forward (its six genkernels ops among its matrix products, which run on the CPU):

    python -m tests._host_overhead [--calls N] [--reps R]

The stubs patch module attributes of this process only; nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch


class _StubExtension:
    """Stands for genkernels._C: every launcher a no-op; plans and workspace sizes dummies. A function is made
    on its first use and kept, so that a call costs what a plain Python call with its arguments costs."""

    def __getattr__(self, name: str) -> Callable[..., object]:
        if name.endswith("_plan"):
            fn = lambda *a, **k: (8, 256, True, 16, 1, 1, 1)  # noqa: E731
        elif name.endswith("_workspace"):
            fn = lambda *a, **k: 0  # noqa: E731
        elif name.endswith("_bytes"):  # a buffer size (bias_act's gradient codes)
            fn = lambda *a, **k: 16  # noqa: E731
        else:
            fn = lambda *a, **k: None  # noqa: E731
        setattr(self, name, fn)
        return fn


def _stub_cuda() -> None:
    """Point the cuda launchers at the stub and let the cuda backend take CPU tensors."""
    from genkernels import _registry
    from genkernels.cuda import _common, adaln, attention, bias_act, gated_mlp, group_norm, rope

    stub = _StubExtension()
    for module in (_common, adaln, attention, bias_act, gated_mlp, group_norm, rope):
        for attr, value in (
            ("require_extension", lambda: stub),
            ("device_guard", lambda device: contextlib.nullcontext()),
            ("stream_handle", lambda device: 0),
        ):
            if hasattr(module, attr):
                setattr(module, attr, value)
    for op in _registry.ops():
        for backend in _registry.backends_of(op):
            if backend.name == "cuda":  # a frozen dataclass: set past its __setattr__, in this process only
                object.__setattr__(backend, "not_supported", lambda *a, **k: None)


def _calls() -> dict[str, Callable[[], object]]:
    """The forward calls: one op each on small CPU tensors, the cuda backend pinned."""
    import genkernels

    ops = genkernels.ops
    x, y, shift, scale = torch.randn(2, 16, 64), torch.randn(2, 16, 64), torch.randn(2, 64), torch.randn(2, 64)
    image, bias = torch.randn(2, 8, 4, 4), torch.randn(8)
    # q, k, v as a DiT block's qkv projection leaves them: (B, H, L, Dh) views of one (B, L, 3, H, Dh) tensor.
    q, k, v = torch.randn(2, 16, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
    cos, sin = torch.randn(16, 8), torch.randn(16, 8)
    return {
        "layer_norm_modulate": lambda: ops.layer_norm_modulate(x, None, None, shift, scale, backend="cuda"),
        "gated_residual": lambda: ops.gated_residual(x, y, scale, backend="cuda"),
        "gated_residual_lnm": lambda: ops.gated_residual_layer_norm_modulate(
            x, y, scale, shift=shift, scale=scale, backend="cuda"
        ),
        "rope": lambda: ops.rope(q, k, cos, sin, backend="cuda"),
        "attention": lambda: ops.attention(q, k, v, backend="cuda"),
        "gelu_tanh": lambda: ops.gelu_tanh(x, backend="cuda"),
        "swiglu": lambda: ops.swiglu(x, backend="cuda"),
        "bias_act": lambda: ops.bias_act(image, bias, act="lrelu", backend="cuda"),
        "group_norm": lambda: ops.group_norm(image, 4, activation="silu", backend="cuda"),
    }


def _training_calls() -> dict[str, Callable[[], object]]:
    """Forward + backward calls (torch.autograd.grad), the cuda backend pinned, and a tiny DiT block's forward
    (its six genkernels ops and its torch ops; matrix products on small CPU tensors)."""
    import genkernels
    from genkernels.models.diffusion import DiTBlock

    ops = genkernels.ops
    x = torch.randn(2, 16, 64, requires_grad=True)
    shift, scale = torch.randn(2, 64, requires_grad=True), torch.randn(2, 64, requires_grad=True)
    image, bias = torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(8, requires_grad=True)
    dy, dimage = torch.randn(2, 16, 64), torch.randn(2, 8, 4, 4)
    block = DiTBlock(64, 4, 256, backend="cuda").requires_grad_(False)
    tokens, c_act = torch.randn(1, 4, 64), torch.randn(1, 64)
    cos, sin = torch.randn(4, 8), torch.randn(4, 8)
    grad = torch.autograd.grad
    return {
        "layer_norm_modulate fwd+bwd": lambda: grad(
            ops.layer_norm_modulate(x, None, None, shift, scale, backend="cuda"), (x, shift, scale), dy
        ),
        "bias_act fwd+bwd": lambda: grad(ops.bias_act(image, bias, act="lrelu", backend="cuda"), (image, bias), dimage),
        "DiT block (tiny) fwd": lambda: block(tokens, c_act, (cos, sin)),
    }


def _us_per_call(fn: Callable[[], object], calls: int) -> float:
    for _ in range(max(1, calls // 10)):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def measure(calls: int = 3000, reps: int = 5) -> dict[str, tuple[float, float]]:
    """{op: (us a call through Function.apply, us a call without the node)}, the minimum of ``reps``
    interleaved runs of ``calls`` calls each; then {case: (us a call, nan)} of the forward + backward calls."""
    from genkernels import _autograd

    _stub_cuda()
    direct = _autograd.apply
    results = {}
    try:
        for name, fn in _calls().items():
            through, without = [], []
            for _ in range(reps):
                _autograd.apply = lambda function, *args: function.apply(*args)
                through.append(_us_per_call(fn, calls))
                _autograd.apply = direct
                without.append(_us_per_call(fn, calls))
            results[name] = (min(through), min(without))
    finally:
        _autograd.apply = direct
    for name, fn in _training_calls().items():
        results[name] = (min(_us_per_call(fn, max(1, calls // 3)) for _ in range(reps)), float("nan"))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls a timed run")
    parser.add_argument("--reps", type=int, default=5, help="interleaved runs; the minimum is reported")
    args = parser.parse_args(argv)
    print(f"{'call':28} {'Function.apply us':>18} {'no node us':>11}", flush=True)
    for name, (through, without) in measure(args.calls, args.reps).items():
        print(f"{name:28} {through:18.1f} {without:11.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
