"""What every CUDA backend module shares: the guarded import of ``genkernels._C``, the "can the
extension run on this tensor" check, and the marshalling of torch objects into what ``_C``
takes (device addresses, dtype codes, stream handles, unsigned 64-bit ints and Philox seeds).

``_C`` is optional: a build without nvcc (or with ``GENKERNELS_NO_CUDA=1``) installs the package
without it, and :func:`cuda_unavailable` then says "extension not built (...)". Importing this
module never fails.
"""

from __future__ import annotations

import functools
import importlib
import re
from types import ModuleType

import torch

from genkernels._device import device_context

try:
    # import_module, not "from .. import _C": during package initialization the latter reports a
    # missing module as a "partially initialized module" (circular import) error.
    _C = importlib.import_module("genkernels._C")
    _IMPORT_ERROR: str | None = None
except ImportError as error:  # built without the CUDA extension, or it cannot load here
    _C = None
    _IMPORT_ERROR = str(error) or type(error).__name__

# Must match DtypeCode in csrc/include/genkernels/vec.cuh.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_U64 = (1 << 64) - 1

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def extension() -> ModuleType | None:
    """The ``genkernels._C`` module, or None when it is not built or does not load."""
    return _C


def extension_error() -> str | None:
    """Why ``genkernels._C`` is not available (the import error), or None when it is."""
    return _IMPORT_ERROR


def require_extension() -> ModuleType:
    """``genkernels._C``; raises RuntimeError when it is not available."""
    if _C is None:
        raise RuntimeError(f"genkernels._C: extension not built ({_IMPORT_ERROR})")
    return _C


@functools.lru_cache(maxsize=None)
def built_archs() -> tuple[str, ...]:
    """Targets compiled into ``_C``: 'sm_XY' (machine code) and 'compute_XY' (PTX); () without ``_C``."""
    return tuple(_C.built_archs()) if _C is not None else ()


def runs_on(capability: tuple[int, int], arch: str) -> bool:
    """Whether code compiled for ``arch`` ('sm_86', 'sm_90a', 'compute_90', ...) runs on a GPU of
    compute ``capability`` (major, minor).

    Machine code runs on its own major version at an equal or higher minor ('a' variants only on
    exactly their GPU); PTX is JIT-compiled by the driver for any GPU at least as new ('a' PTX
    only for its own GPU, 'f' PTX within its major version).
    """
    match = re.fullmatch(r"(sm|compute)_(\d+)([af]?)", arch)
    if match is None:
        return False
    kind, number, suffix = match.group(1), int(match.group(2)), match.group(3)
    arch_major, arch_minor = divmod(number, 10)
    major, minor = capability
    device = major * 10 + minor
    if suffix == "a":
        return device == number
    if kind == "compute" and suffix == "":
        return device >= number
    return major == arch_major and minor >= arch_minor


@functools.lru_cache(maxsize=None)
def _device_reason(index: int) -> str | None:
    """Why ``_C`` cannot run on CUDA device ``index`` (architecture, driver), or None. Cached."""
    capability = torch.cuda.get_device_capability(index)
    archs = built_archs()
    if not any(runs_on(capability, arch) for arch in archs):
        return (
            f"GPU sm_{capability[0]}{capability[1]} is not among the architectures genkernels._C was built for "
            f"({', '.join(archs)}); rebuild with GENKERNELS_CUDA_ARCHS={capability[0]}{capability[1]}"
        )
    problem = _C.runtime_error()
    if problem:
        return f"the CUDA {_C.cuda_version()} runtime in genkernels._C cannot run here: {problem}"
    return None


def cuda_unavailable(x: torch.Tensor) -> str | None:
    """A one-line reason why the cuda backend cannot run on ``x``, or None when it can.

    Checks that ``_C`` is built, that ``x`` is a CUDA tensor, and (once per device) that ``_C``
    holds code for the GPU's architecture and that its CUDA runtime works with the driver.
    """
    if _C is None:
        return f"extension not built ({_IMPORT_ERROR})"
    if x.device.type != "cuda":
        return f"x is on {x.device.type}: the cuda backend needs a CUDA tensor"
    return _device_reason(_device_index(x.device))


def kernels_unavailable(x: torch.Tensor, name: str, family: str, symbols: tuple[str, ...]) -> str | None:
    """A one-line reason why ``_C`` cannot run the ``family`` kernels (its functions ``symbols``) on
    ``x``, the input named ``name`` in the reason; None when it can."""
    if x.device.type != "cuda":
        return f"{name} is on {x.device.type}: the cuda backend needs CUDA tensors"
    reason = cuda_unavailable(x)
    if reason is not None:
        return reason
    missing = [symbol for symbol in symbols if not hasattr(_C, symbol)]
    if missing:
        return f"genkernels._C was built without the {family} kernels ({', '.join(missing)}): rebuild the extension"
    return None


# The chunked elementwise kernels launch one block per (sample, chunk of at least this many
# elements) in a 1-D grid of at most 2^31 - 1 blocks (csrc/reparam.cu, csrc/coupling.cu).
MIN_CHUNK = 2048
MAX_BLOCKS = 2**31 - 1


def grid_unavailable(samples: int, per_sample: int) -> str | None:
    """Why a chunked kernel's 1-D grid cannot hold ``samples`` samples of ``per_sample`` elements, or None."""
    if samples * -(-per_sample // MIN_CHUNK) > MAX_BLOCKS:
        return f"{samples} samples of {per_sample} elements need more than 2^31 - 1 blocks"
    return None


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def dtype_code(t: torch.Tensor | None) -> int:
    """The dtype code ``_C`` takes for ``t`` (float32 0, float16 1, bfloat16 2); 0 for None."""
    return 0 if t is None else DTYPE_CODES[t.dtype]


def address(t: torch.Tensor | None) -> int:
    """Device address of ``t``'s first element; 0 (nullptr) for None."""
    return 0 if t is None else t.data_ptr()


def stream_handle(device: torch.device) -> int:
    """The cudaStream_t value of the current torch stream on ``device`` (kernels are launched there)."""
    index = _device_index(device)
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


#: A context in which a device is torch's current CUDA device (a shared no-op when it already is).
device_guard = device_context


def workspace(nbytes: int, device: torch.device) -> torch.Tensor | None:
    """Scratch memory for a launcher (from torch's caching allocator, ordered on the current stream)."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None


def u64(value: int) -> int:
    """``value`` as the unsigned 64-bit int a kernel argument takes (modulo 2**64)."""
    return int(value) & _U64


def seed_args(seed: int | torch.Tensor, device: torch.device) -> tuple[int, torch.Tensor | None]:
    """The seed of the in-kernel Philox stream as ``_C`` takes it: (seed, None) for a Python int (as an
    unsigned 64-bit int), (0, a one-element int64 tensor on ``device``) for a tensor, which the kernel reads
    (no host synchronization)."""
    if isinstance(seed, torch.Tensor):
        return 0, seed.reshape(1).to(device=device, dtype=torch.int64).contiguous()
    return u64(seed), None
