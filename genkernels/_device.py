"""The current-CUDA-device context every launcher enters: kernels launch on the current device, so a call on
another GPU makes that device current around its launch."""

from __future__ import annotations

import contextlib

import torch

_CURRENT = contextlib.nullcontext()


def device_context(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which ``device`` is torch's current CUDA device: one shared no-op object (nothing entered)
    when it already is, or when ``device`` is not a CUDA device. A launch pays this on every call, so the
    common case costs one device query."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _CURRENT
    return torch.cuda.device(device)
