"""genkernels: fused GPU kernels for generative models, as drop-in PyTorch layers.

import genkernels
y = genkernels.ops.group_norm(x, 32, weight, bias, activation="silu")   # fastest backend that can run
with genkernels.backend("triton"): ...                                 # force one backend in a block
with genkernels.backend("triton", ops=["rope"]): ...                   # ... for some ops alone
with genkernels.graph_mode(): ...                                      # auto's picks for a CUDA graph's capture
genkernels.explain("group_norm", x, 32)                                # why each backend can or cannot run
print(genkernels.info())                                               # versions, GPU, built archs, backends
genkernels.models, .schedulers, .train, .data, .bench                  # imported on first use
"""

__version__ = "0.1.0"

from . import nn, ops
from ._info import info
from ._registry import UnsupportedError, backend, explain, graph_mode

__all__ = ["UnsupportedError", "backend", "explain", "graph_mode", "info", "nn", "ops", "__version__"]

# Submodules imported on first use (``genkernels.models.ImageGPT`` after a bare ``import genkernels``): they
# pull in the model, training and data code that op users do not need at import.
_LAZY = ("bench", "data", "models", "schedulers", "train")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
