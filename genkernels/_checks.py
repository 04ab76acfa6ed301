"""Argument checks shared by the layers and models: each raises a ValueError naming the argument."""

from __future__ import annotations

import math

from . import _registry


def positive_int(name: str, value) -> int:
    """``value`` if it is an int >= 1 (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def nonnegative_float(name: str, value) -> float:
    """``value`` as a float if it is a finite real >= 0 (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


def check_backend(backend: str | None) -> str | None:
    """``backend`` if None or a known backend name (else the registry's error), for a layer to pin."""
    if backend is not None:
        _registry.requested(backend)
    return backend
