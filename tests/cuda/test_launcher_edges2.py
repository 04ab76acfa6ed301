"""Every launcher of both fast backends launches on its tensors' device and on torch's current stream there, and
every CUDA launcher's arguments are those the C API takes.

No GPU runs the suite, so a launch on the wrong device (a tensor on cuda:1 while cuda:0 is current), on the
default stream instead of the current one (a ``torch.cuda.stream(s)`` block, CUDA graph capture), or with a
renamed, reordered or mistyped argument would surface only on a user's GPU. Here the launchers run on CPU
tensors with their device plumbing replaced by recorders:

- the CUDA launchers (genkernels.cuda.*) with ``genkernels._C`` replaced by a stand-in that binds each call to
  the parameter names of csrc/bindings.cpp (the source, so that a stale local build does not hide a change),
  checks that the call is made inside ``device_guard`` of the tensors' device with ``stream_handle`` of that
  device, and then calls the built function itself where its signature is the source's: pybind's conversions
  (int64, uint64, the stride tuples) and the C API's argument checks (null pointers, alignment, strides,
  sizes) run on what the launcher passes, up to the device selection, which fails without a GPU;
- the Triton launchers (genkernels.triton.*) with every ``@triton.jit`` kernel replaced by a recorder that
  checks that it is launched inside ``on_device`` of its tensors (triton launches on the current device and
  its current stream).

Skips without the extension (CUDA half) or triton (Triton half).
"""

from __future__ import annotations

import contextlib
import importlib
import re
from pathlib import Path

import pytest
import torch

from tests.cuda.test_launcher_bindings import _parameters
from tests.transformer_calls import TransformerCall, run_transformer_call

ROOT = Path(__file__).resolve().parents[2]
F16, F32 = torch.float16, torch.float32
# The stream handle the recorders hand out: the kernels must be given exactly it.
STREAM = 0x5EED
# What the built extension raises where it selects or queries the device (there is none here).
_NO_DEVICE = re.compile(r"(selecting|querying) CUDA device")


def _source_parameters() -> dict[str, list[str]]:
    """The parameter names of each function of genkernels._C, in order, as csrc/bindings.cpp declares them."""
    text = (ROOT / "csrc" / "bindings.cpp").read_text()
    names = {}
    for chunk in text.split("m.def(")[1:]:
        names[re.match(r'\s*"(\w+)"', chunk).group(1)] = re.findall(r'py::arg\("(\w+)"\)', chunk)
    return names


def _built_parameters(fn) -> list[str]:
    """The parameter names of a pybind11 function, from its docstring's signature line."""
    return [name for name, _ in _parameters(fn)]


class _Guard:
    """Records the device a launcher makes current (stands in for device_guard / on_device)."""

    def __init__(self):
        self.active: list[torch.device] = []

    @contextlib.contextmanager
    def __call__(self, device_or_tensor):
        device = device_or_tensor.device if isinstance(device_or_tensor, torch.Tensor) else device_or_tensor
        self.active.append(torch.device(device))
        try:
            yield
        finally:
            self.active.pop()

    def current(self) -> torch.device | None:
        return self.active[-1] if self.active else None


class _Extension:
    """Stands in for genkernels._C: a call binds to csrc/bindings.cpp's parameters (a TypeError naming the function
    otherwise), must be made inside the guard of ``device`` with the stream of ``device``, and is then passed to
    the built function (device None, a CPU tensor's index, as 0) where its signature is the source's."""

    def __init__(self, real, guard: _Guard, device: torch.device):
        self.real, self.guard, self.device = real, guard, device
        self.source = _source_parameters()
        self.calls: list[str] = []

    def __getattr__(self, name):
        names = self.source[name]
        real = getattr(self.real, name, None)
        built = None if real is None else _built_parameters(real)

        def call(*args, **kwargs):
            if len(args) > len(names):
                raise TypeError(f"{name}: {len(args)} positional arguments, bindings.cpp declares {len(names)}")
            bound = dict(zip(names, args))
            duplicate = sorted(set(bound) & set(kwargs))
            bound.update(kwargs)
            unknown = sorted(set(bound) - set(names))
            missing = [n for n in names if n not in bound and n not in ("codes", "dbias", "param_dtype")]
            if duplicate or unknown or missing:
                raise TypeError(f"{name}: duplicate {duplicate}, unknown {unknown}, missing {missing}")
            if "stream" in bound:
                assert bound["stream"] == STREAM, f"{name} launched on stream {bound['stream']:#x}, not the current one"
                assert self.guard.current() == self.device, (
                    f"{name} launched with {self.guard.current()} current, its tensors on {self.device}"
                )
            if "device" in bound:
                assert bound["device"] == self.device.index, f"{name}: device {bound['device']}"
                if bound["device"] is None:
                    bound["device"] = 0
            self.calls.append(name)
            if built != names:  # not built, or built from an older bindings.cpp: the source's names only
                return 1 << 12 if name.endswith("_workspace") else None
            try:
                return real(**bound)
            except RuntimeError as error:
                if not _NO_DEVICE.search(str(error)):
                    raise
                return 1 << 12 if name.endswith("_workspace") else None

        return call


CUDA_MODULES = ("adaln", "attention", "bias_act", "coupling", "gated_mlp", "group_norm", "modconv", "reparam")
CUDA_MODULES += ("rope", "schedule")


@pytest.fixture
def cuda_launchers(monkeypatch):
    """The genkernels.cuda modules by name, launching on :class:`_Extension` (which they also return as ``ext``)."""
    try:
        import genkernels._C as real
    except ImportError as e:
        pytest.skip(f"the CUDA extension is not built: {e}")
    guard = _Guard()
    ext = _Extension(real, guard, torch.device("cpu"))
    modules = {name: importlib.import_module(f"genkernels.cuda.{name}") for name in CUDA_MODULES}

    def stream_handle(device):
        assert torch.device(device) == ext.device, f"the stream of {device} asked for tensors on {ext.device}"
        return STREAM

    for module in modules.values():
        monkeypatch.setattr(module, "require_extension", lambda: ext)
        monkeypatch.setattr(module, "stream_handle", stream_handle)
        monkeypatch.setattr(module, "device_guard", guard)
    if hasattr(modules["schedule"], "extension"):
        monkeypatch.setattr(modules["schedule"], "extension", lambda: ext)
    return {**modules, "ext": ext}


class _KernelRecorder:
    """Stands in for one ``@triton.jit`` kernel: a launch ``kernel[grid](*args)`` is recorded with the device the
    launcher made current, and runs nothing."""

    def __init__(self, name: str, guard: _Guard, launches: list):
        self.name, self.guard, self.launches = name, guard, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, self.guard.current()))

        return launch


TRITON_MODULES = CUDA_MODULES


@pytest.fixture
def triton_launchers(monkeypatch):
    """The genkernels.triton modules by name, their kernels replaced by :class:`_KernelRecorder` (``launches``:
    (kernel, current device) pairs)."""
    pytest.importorskip("triton")
    from triton.runtime.jit import KernelInterface  # JITFunction, and InterpretedFunction under the interpreter

    guard, launches = _Guard(), []
    modules = {name: importlib.import_module(f"genkernels.triton.{name}") for name in TRITON_MODULES}
    for module in modules.values():
        if getattr(module, "triton", None) is None:
            pytest.skip("triton is too old or missing")
        monkeypatch.setattr(module, "on_device", guard)
        for attr, value in vars(module).copy().items():
            if isinstance(value, KernelInterface):
                monkeypatch.setattr(module, attr, _KernelRecorder(attr, guard, launches))
    return {**modules, "launches": launches}


# --------------------------------------------------------------------------- the calls (one interface, two backends)


def _image(shape=(2, 8, 3, 5), dtype=F32, channels_last=False) -> torch.Tensor:
    x = torch.randn(shape, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _group_norm(m, channels_last):
    x = _image(channels_last=channels_last)
    w = torch.randn(8)
    y, mean, rstd = m["group_norm"].group_norm_forward(x, w, w, 4, 1e-5, True)
    m["group_norm"].group_norm_backward(torch.randn_like(x), x, w, w, mean, rstd, 4, True, True, True, True)


def _schedule(m, channels_last):
    from genkernels.ops.schedule import StepCoeffs

    x = _image(channels_last=channels_last)
    out = _image((4, 8, 3, 5), channels_last=channels_last)
    coeffs = StepCoeffs(px=1.0, po=torch.ones(2), cx=0.5, c0=0.3, cn=0.1)
    m["schedule"].schedule_step(x, out, None, None, coeffs, 2.0, 0.7, 1.0, 5, 3, True)
    m["schedule"].schedule_step(x, out, None, x, coeffs, 2.0, 0.0, None, torch.tensor([5]), 3, False)
    m["schedule"].schedule_step(x, out[:2], torch.randn_like(x), None, coeffs, None, 0.0, None, None, 0, False)


def _reparam(m, channels_last):
    moments = torch.randn(2, 6, 4)
    mean, logvar = moments[:, :3], moments[:, 3:]  # the halves of a moments tensor: batch stride 24
    z, kl = m["reparam"].forward(mean, logvar, None, 3, 0, False, True)
    dmoments = torch.empty_like(moments)
    m["reparam"].backward(z, kl, mean, logvar, None, 3, 0, False, dmoments[:, :3], dmoments[:, 3:])


def _coupling(m, channels_last):
    x, h = _image(channels_last=channels_last), _image(channels_last=channels_last)
    m["coupling"].coupling_forward(x, h, "exp", 1.0, False, True)
    m["coupling"].coupling_backward(torch.randn_like(x), torch.randn(2), x, h, "exp", 1.0, True, True)
    w = torch.randn(8)
    m["coupling"].actnorm_forward(x, w, w, False)
    m["coupling"].actnorm_backward(torch.randn_like(x), x, w, w, True)


def _modconv(m, channels_last):
    weight3, styles = torch.randn(4, 8, 9), torch.randn(2, 8)
    dcoef = m["modconv"].demod_forward(weight3, styles, 1e-8)
    m["modconv"].demod_backward(torch.randn_like(dcoef), dcoef, weight3, styles)
    y = _image(channels_last=channels_last)
    side = (torch.rand(2, 8) + 0.5, torch.randn(1, 1, 3, 5), torch.ones(1), torch.randn(8))
    m["modconv"].epilogue_forward(y, *side, "lrelu", 0.2, 1.4, 256.0)
    m["modconv"].epilogue_backward(torch.randn_like(y), y, *side, "lrelu", 0.2, 1.4, 256.0, True, True, True)


def _bias_act(m, channels_last):
    x = _image((2, 8, 64, 64), channels_last=channels_last)  # 65536 elements: the cuda backend writes codes
    bias = torch.randn(8)
    ba = m["bias_act"]
    ba.forward(x, bias, "lrelu", 0.2, 1.4, None, 1)
    ba.grad(torch.randn_like(x), x, bias, "gelu", 0.2, 1.4, 10.0, 1)
    ba.grad_bias(torch.randn_like(x), x, bias, "silu", 0.2, 1.4, None, 1)
    if hasattr(ba, "forward_codes"):
        y, codes = ba.forward_codes(x, bias, "lrelu", 0.2, 1.4, None, 1)
        ba.grad(torch.randn_like(x), None, bias, "lrelu", 0.2, 1.4, None, 1, None, codes)
        ba.grad_bias(torch.randn_like(x), None, bias, "lrelu", 0.2, 1.4, None, 1, True, codes)


def _attention(m, heads_inner):
    q = torch.randn(2, 5, 4, 16, dtype=F16).transpose(1, 2) if heads_inner else torch.randn(2, 4, 5, 16, dtype=F16)
    kv = torch.randn(2, 2, 7, 16, dtype=F16)
    mask = torch.zeros(7, 2, dtype=torch.bool).t()  # a transposed view: the launchers hand over a dense copy
    out, lse, _ = m["attention"].attention_forward(q, kv, kv, True, 0.25, mask)
    if hasattr(m["attention"], "attention_backward"):  # triton's (the cuda backend runs no backward)
        m["attention"].attention_backward(torch.randn_like(out), q, kv, kv, out, lse, True, 0.25, mask)


def _transformer(m, call):
    run_transformer_call(m["adaln"], m["rope"], m["gated_mlp"], call)


CASES = {
    "group_norm": _group_norm,
    "schedule": _schedule,
    "reparam": _reparam,
    "coupling": _coupling,
    "modconv": _modconv,
    "bias_act": _bias_act,
    "attention": _attention,
}
TRANSFORMER_CALLS = [
    TransformerCall("edges", "adaln", (6, 72), F16, 3, True, True, False, fused=True),
    TransformerCall("edges", "adaln", (6, 40), F32, 3, False, True, True),
    TransformerCall("edges", "rope", (2, 3, 5, 40), F16, pairs=16),
    TransformerCall("edges", "mlp", (3, 24), F32),
]
ALL = [(op, flag) for op in CASES for flag in (False, True)] + [("transformer", call) for call in TRANSFORMER_CALLS]


def _run(modules, op, flag):
    (_transformer if op == "transformer" else CASES[op])(modules, flag)


@pytest.mark.parametrize(("op", "flag"), ALL, ids=lambda v: str(v) if not isinstance(v, bool) else ("b" if v else "a"))
def test_cuda_launchers_launch_on_their_device_and_stream(cuda_launchers, op, flag):
    """Each call to genkernels._C binds to bindings.cpp, passes the tensors' device index and the current stream of
    that device, is made with that device current, and passes the built extension's own argument checks."""
    torch.manual_seed(0)
    _run(cuda_launchers, op, flag)
    assert cuda_launchers["ext"].calls, "no launch"


@pytest.mark.parametrize(("op", "flag"), ALL, ids=lambda v: str(v) if not isinstance(v, bool) else ("b" if v else "a"))
def test_triton_launchers_launch_on_their_device(triton_launchers, op, flag):
    """Every triton kernel is launched with its tensors' device current (triton launches on the current device,
    on torch's current stream there)."""
    torch.manual_seed(0)
    _run(triton_launchers, op, flag)
    launches = triton_launchers["launches"]
    assert launches, "no launch"
    outside = [name for name, device in launches if device != torch.device("cpu")]
    assert not outside, f"launched without their tensors' device current: {outside}"


def test_the_stand_in_refuses_a_wrong_call(cuda_launchers):
    """The check itself: an unknown or missing argument, a launch outside the guard and another stream fail."""
    ext = cuda_launchers["ext"]
    with pytest.raises(TypeError, match=r"gelu_tanh_forward: duplicate \[\], unknown \['nonsense'\]"):
        ext.gelu_tanh_forward(1, 0, None, 0, 0, STREAM, nonsense=1)
    with pytest.raises(TypeError, match="missing"):
        ext.gelu_tanh_forward(1, 0, None)
    with pytest.raises(AssertionError, match="current"):
        ext.gelu_tanh_forward(1, 0, None, 0, 0, STREAM)  # no guard entered
    with cuda_launchers["gated_mlp"].device_guard(torch.device("cpu")):
        with pytest.raises(AssertionError, match="stream"):
            ext.gelu_tanh_forward(1, 0, None, 0, 0, 0)
