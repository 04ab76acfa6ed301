"""What every Triton backend module shares: a guarded import of triton, the
"can triton run on this tensor" check, and cached device properties for launch heuristics.

``triton`` and ``tl`` are None when triton is not installed, so that importing a
``genkernels.triton.<op>`` module never fails; those modules define their kernels only
when ``triton is not None`` and report the import error through :func:`triton_unavailable`.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from genkernels._device import device_context

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: ImportError | None = None
except ImportError as error:  # triton is an optional dependency
    triton = None
    tl = None
    _IMPORT_ERROR = error

# Used when the device cannot be queried (CPU under the interpreter, or an old torch).
FALLBACK_SM_COUNT = 132
FALLBACK_L2_BYTES = 40 * 1024 * 1024


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set: kernels then run on the CPU, for tests.

    Triton reads the variable when a kernel is decorated, so it must be set before the
    kernel modules are imported; this reads it the same way (1/true/on/yes).
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_unavailable(x: torch.Tensor, name: str = "x") -> str | None:
    """A one-line reason why the triton backend cannot run on ``x`` (the op's argument ``name``), or None
    when it can.

    Triton needs to be importable and ``x`` on a CUDA device (ROCm devices also report
    "cuda"); with ``TRITON_INTERPRET=1`` CPU tensors are accepted too.
    """
    if triton is None:
        return f"triton is not installed (ImportError: {_IMPORT_ERROR})"
    if x.device.type == "cuda" or (x.device.type == "cpu" and interpreting()):
        return None
    return f"{name} is on {x.device.type}: the triton backend needs a CUDA tensor (or TRITON_INTERPRET=1 for testing)"


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    sm_count = getattr(props, "multi_processor_count", 0) or FALLBACK_SM_COUNT
    l2_bytes = getattr(props, "L2_cache_size", 0) or FALLBACK_L2_BYTES
    return sm_count, l2_bytes


def _properties(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return FALLBACK_SM_COUNT, FALLBACK_L2_BYTES
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_properties(index)


def sm_count(device: torch.device) -> int:
    """Number of streaming multiprocessors of ``device`` (132, an H100/H200, when unknown)."""
    return _properties(device)[0]


def l2_cache_bytes(device: torch.device) -> int:
    """L2 cache size of ``device`` in bytes (40 MiB when unknown)."""
    return _properties(device)[1]


def on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which ``x``'s CUDA device is current, since triton launches on the current device
    (:func:`genkernels._device.device_context`: a shared no-op when it already is)."""
    return device_context(x.device)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= max(n, 1)."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive integers."""
    return -(-a // b)
