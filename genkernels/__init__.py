"""genkernels: fused GPU kernels for generative models, as drop-in PyTorch layers.

import genkernels
y = genkernels.ops.group_norm(x, 32, weight, bias, activation="silu")   # fastest backend that can run
with genkernels.backend("triton"): ...                                 # force one backend in a block
with genkernels.backend("triton", ops=["rope"]): ...                   # ... for some ops alone
with genkernels.graph_mode(): ...                                      # auto's picks for a CUDA graph's capture
genkernels.explain("group_norm", x, 32)                                # why each backend can or cannot run
print(genkernels.info())                                               # versions, GPU, built archs, backends
"""

__version__ = "0.1.0"

from . import nn, ops
from ._info import info
from ._registry import UnsupportedError, backend, explain, graph_mode

__all__ = ["UnsupportedError", "backend", "explain", "graph_mode", "info", "nn", "ops", "__version__"]
