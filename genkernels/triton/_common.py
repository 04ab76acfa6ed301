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
import re

import torch

from genkernels._device import device_context

#: The oldest triton the kernels are written for. torch 2.4 and 2.5 pin triton 3.0 and 3.1: with those the
#: triton backend reports this and the other backends run.
MIN_TRITON = (3, 2)


def too_old(version: str) -> str | None:
    """Why triton ``version`` cannot run the kernels (older than :data:`MIN_TRITON`), or None (a version string
    that does not start with major.minor is taken as new enough)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match[1]), int(match[2])) >= MIN_TRITON:
        return None
    return f"triton {version} is older than {'.'.join(map(str, MIN_TRITON))}, which the kernels need"


try:
    import triton
    import triton.language as tl

    _UNAVAILABLE: str | None = too_old(triton.__version__)
    if _UNAVAILABLE is not None:  # its kernels are not even defined: old versions may fail on their syntax
        triton = tl = None
except ImportError as error:  # triton is an optional dependency
    triton = None
    tl = None
    _UNAVAILABLE = f"triton is not installed (ImportError: {error})"

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
        return _UNAVAILABLE
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
