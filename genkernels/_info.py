"""`genkernels.info()`: what this installation is and what can run here."""

from __future__ import annotations

import platform
import sys

import torch

from . import _registry
from .cuda import _common as cuda_common


class Info(dict):
    """A dict of facts that prints as a readable report."""

    def __str__(self) -> str:
        lines = [
            f"genkernels {self['genkernels']}",
            f"python     {self['python']} ({self['platform']})",
            f"torch      {self['torch']} (CUDA {self['torch_cuda'] or 'none'})",
            f"triton     {self['triton'] or 'not installed'}",
            f"GPU        {self['gpu'] or 'none'}",
            f"_C         {self['extension']}",
            f"backend    {self['requested']}",
            "",
            f"backends on {self['probe_device']} (a typical call of each op; 'ok' = can run, else why not):",
        ]
        for op, reasons in self["backends"].items():
            lines.append(f"  {op}")
            for name, reason in reasons.items():
                lines.append(f"    {name:<10} {'ok' if reason is None else reason}")
        return "\n".join(lines)

    __repr__ = __str__


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None
    return triton.__version__


def _gpu() -> str | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    count = torch.cuda.device_count()
    return f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, " + (
        f"{props.total_memory / 2**30:.0f} GiB" + (f" (x{count})" if count > 1 else "")
    )


def _extension() -> str:
    ext = cuda_common.extension()
    if ext is None:
        return f"not built ({cuda_common.extension_error()})"
    return f"built for {', '.join(ext.built_archs())}, CUDA runtime {ext.cuda_version()} (static)"


def _requested() -> str:
    """The backend op calls without ``backend=`` ask for here, and what chose it (a bad GENKERNELS_BACKEND is
    reported, not raised: every such call would raise it)."""
    try:
        name = _registry.requested()
    except ValueError as e:
        return f"{e}: every op call without backend= raises this"
    if name == "auto":
        return "auto: each op runs the first backend below that can run the call"
    return f"{name} ({_registry._origin(None, '')}): op calls without backend= run it or raise UnsupportedError"


def info() -> Info:
    """Versions (genkernels, Python, torch, triton, CUDA), the GPU, the architectures `genkernels._C`
    was built for, the backend that op calls ask for (``requested``: auto, or what a ``genkernels.backend``
    block or GENKERNELS_BACKEND chose), and per op which backends can run a typical call here, with the reason
    when not.

    Prints as a report (``print(genkernels.info())``); it is also a dict for programs.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = {}
    for op in _registry.ops():
        args, kwargs = _registry.probe(op, device)
        backends[op] = _registry.explain(op, *args, **kwargs)
    return Info(
        genkernels=sys.modules["genkernels"].__version__,
        python=platform.python_version(),
        platform=f"{platform.system()} {platform.machine()}",
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        triton=_triton_version(),
        gpu=_gpu(),
        extension=_extension(),
        requested=_requested(),
        probe_device=str(device),
        backends=backends,
    )
