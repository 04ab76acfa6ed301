"""Calls replayed from a CUDA graph: one launch for all of a function's kernels.

A plain call of a model pays its CPU time on top of its kernels: Python, dispatch and one launch per kernel,
tens of microseconds per op. Where the kernels are short (small batches, small images) the GPU waits for the
CPU, and a model built on genkernels ops then runs no faster than eager PyTorch, or slower. A replayed CUDA
graph pays the kernels only. :class:`GraphedCall` captures a function once on static input buffers and replays
it for every later call with inputs of the same shapes and dtypes (copied into those buffers), returning copies
of the outputs, so that a caller may keep them across calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._device import device_context


def capture(fn: Callable[[], Any], warmups: int = 2) -> tuple[Any, Any]:
    """``fn`` captured in a ``torch.cuda.CUDAGraph`` on the current CUDA device: ``warmups`` calls on a side
    stream first (as torch.cuda.graphs' documentation does it: kernels compile, allocations settle, and the
    capture then records launches only), then one call under capture, both in ``genkernels.graph_mode()``
    (auto's choices for a graph; explicit backends keep theirs). Returns the graph and that call's outputs,
    which every ``graph.replay()`` rewrites in place. ``fn`` must not synchronize with the host, and its kernels
    must run on the current device (:class:`GraphedCall` makes its inputs' device current).

    The capture stream is made here, on the current device: torch.cuda.graph's shared default stream lives on
    whichever device was current at its first use, and a capture on another device's stream would record none
    of ``fn``'s kernels (they would run once, uncaptured, and never at a replay)."""
    from genkernels import graph_mode

    with graph_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmups):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
            out = fn()
    return graph, out


def available(device: torch.device) -> bool:
    """Whether calls on ``device`` can be captured in a CUDA graph (a CUDA device)."""
    return device.type == "cuda"


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


class GraphedCall:
    """``fn(*inputs)`` replayed from one CUDA graph.

    Built from example inputs (tensors): they are copied into static buffers and ``fn`` is captured on those
    (:func:`capture`: warm-up calls, then one captured call). Each call copies its inputs into the buffers,
    replays the graph and returns a copy of the outputs (a tensor, or a tuple of tensors as ``fn`` returns
    them): the graph rewrites its own outputs at every replay. Inputs must have the example's shapes, dtypes
    and devices (ValueError otherwise); anything else ``fn`` reads (parameters, tensors it closes over) is read
    at the address it had at capture, so in-place updates are seen and reassigned tensors are not.

    Args:
        fn: the function; it must not synchronize with the host (no ``.item()``, no data-dependent shapes).
        example: the inputs of the capture, one tensor per argument of ``fn``.
        warmups: uncaptured calls before the capture.
    """

    def __init__(self, fn: Callable[..., Any], example: Sequence[torch.Tensor], warmups: int = 2) -> None:
        if isinstance(example, torch.Tensor):  # it would iterate as its rows, taken as that many inputs
            raise TypeError(
                f"example must be a sequence of tensors (one per argument of fn), got a Tensor {_describe(example)}"
            )
        if not all(isinstance(t, torch.Tensor) for t in example):
            raise TypeError(f"example must hold tensors only, got {[type(t).__name__ for t in example]}")
        self.static = [t.detach().clone() for t in example]
        device = next((t.device for t in self.static if t.device.type == "cuda"), None)
        with device_context(device) if device is not None else contextlib.nullcontext():  # the inputs' GPU current
            self.graph, self._out = capture(lambda: fn(*self.static), warmups)
        if not (isinstance(self._out, torch.Tensor) or all(isinstance(t, torch.Tensor) for t in self._out)):
            raise TypeError(f"fn must return a tensor or a tuple of tensors, got {type(self._out).__name__}")

    def __call__(self, *inputs: torch.Tensor) -> Any:
        """The outputs of ``fn(*inputs)`` (copies), from one replay of the graph."""
        if len(inputs) != len(self.static):
            raise ValueError(f"the graph was captured with {len(self.static)} inputs, got {len(inputs)}")
        for i, (buf, t) in enumerate(zip(self.static, inputs)):
            if t.shape != buf.shape or t.dtype != buf.dtype or t.device != buf.device:
                raise ValueError(f"input {i} must be {_describe(buf)} as at capture, got {_describe(t)}")
        for buf, t in zip(self.static, inputs):
            if t.data_ptr() != buf.data_ptr():
                buf.copy_(t)
        self.graph.replay()
        if isinstance(self._out, torch.Tensor):
            return self._out.clone()
        return tuple(t.clone() for t in self._out)
