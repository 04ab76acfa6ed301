"""Argument checks shared by the ops, layers and models (each check raises a ValueError naming the argument),
and the number predicates they build on.

Wherever a Python int or float is accepted, so are NumPy scalars (np.float32, np.int64, ...): they are
converted to the Python number before anything uses them, so kernels and JSON configs see Python numbers
only. Bools (Python's and NumPy's) are never numbers here.
"""

from __future__ import annotations

import math
import numbers

from . import _registry


def is_real(value) -> bool:
    """Whether ``value`` is a real number other than a bool: a Python int or float, a NumPy integer or
    floating scalar, or any other ``numbers.Real`` (NumPy registers its scalar types there; np.bool_ is not)."""
    cls = type(value)
    if cls is float or cls is int:  # the common case, checked first: some checks run on every op call
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value) -> bool:
    """Whether ``value`` is an integer other than a bool: a Python int or a NumPy integer scalar
    (``numbers.Integral``); an integral float such as 2.0 is not."""
    cls = type(value)
    if cls is int:
        return True
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_real(value) -> bool:
    """Whether ``value`` is a real number (:func:`is_real`) that is neither NaN nor infinite, nor an int too large
    for a float (what the kernels take it as)."""
    if type(value) is float:
        # inf - inf and NaN - NaN are NaN: a comparison, which torch.compile(dynamic=True) traces on a symbolic
        # float as a guard, where math.isfinite breaks the graph
        return value - value == 0.0
    if not is_real(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


def as_number(value):
    """``value`` as a Python int if it is an integer (:func:`is_integer`), as a Python float if it is another
    real number (:func:`is_real`), else unchanged (bools, None, tensors, strings): NumPy scalars become the
    Python numbers with the same value."""
    cls = type(value)
    if cls is float or cls is int or isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def positive_int(name: str, value) -> int:
    """``value`` as a Python int if it is an integer >= 1 (:func:`is_integer`), else a ValueError naming ``name``."""
    if type(value) is int and value >= 1:
        return value
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def optional_seed(seed) -> int | None:
    """None, or ``seed`` as a Python int if it is an integer in [0, 2^63) (what torch.Generator.manual_seed
    and the Philox ops take), else a ValueError."""
    if seed is None:
        return None
    if not is_integer(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be None or an int in [0, 2^63), got {seed!r}")
    return int(seed)


def nonnegative_float(name: str, value) -> float:
    """``value`` as a Python float if it is a finite real >= 0 (:func:`is_real`), else a ValueError naming ``name``."""
    if type(value) is float and value >= 0 and value != math.inf:  # NaN fails value >= 0
        return value
    if not (is_finite_real(value) and value >= 0):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


def check_backend(backend: str | None) -> str | None:
    """``backend`` if None or a known backend name (else the registry's error), for a layer to pin."""
    if backend is not None:
        _registry.requested(backend)
    return backend
