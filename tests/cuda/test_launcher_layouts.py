"""The cuda launchers hand the kernels pointers that describe the tensors they were given, on every path into
them: the op's eager path and the ``genkernels::<op>`` torch.library op that torch.compile calls.

A kernel indexes each pointer it takes in one assumed layout (a float32 bias as a dense (C,) vector, ...). A
tensor that reaches a launcher with other strides is read wrongly on a GPU, without an error, unless the
launcher copies it or refuses it. No GPU runs the suite, so here the extension is replaced by a stand-in that
does what the kernel does on the CPU memory it is given: it reads every pointer in the layout the kernel
assumes (csrc/include/genkernels/*.cuh), computes the kernel's formula in float32 and writes the outputs
through their pointers. The op's results are then compared with its reference: a pointer that does not
describe its tensor gives other numbers, as on the GPU. Skips when the extension is not built.
"""

from __future__ import annotations

import ctypes
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from genkernels.cuda import modconv as cmc

M = importlib.import_module("genkernels.ops.modconv")

ALPHA, GAIN = 0.2, math.sqrt(2.0)


def _memory(address: int, numel: int) -> torch.Tensor:
    """The ``numel`` float32 elements at ``address`` (CPU memory) as a dense tensor aliasing them: what a kernel
    that indexes the pointer densely reads, and where it writes."""
    buffer = (ctypes.c_char * (4 * numel)).from_address(address)
    return torch.frombuffer(buffer, dtype=torch.float32, count=numel)


def _bind(fn, args: tuple, kwargs: dict) -> dict:
    """A call's arguments by the names of the real binding's parameters (from its pybind11 signature line)."""
    line = fn.__doc__.splitlines()[0]
    names = [part.split(":")[0].strip() for part in line[line.index("(") + 1 : line.rindex(") ->")].split(", ")]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    assert set(bound) == set(names), (sorted(set(names) - set(bound)), sorted(set(bound) - set(names)))
    return bound


class _EpilogueKernels:
    """Stands in for genkernels._C's modconv epilogue: the kernels' arithmetic (csrc/include/genkernels/modconv.cuh)
    for channels-first float32 y without noise, with every pointer read as the kernels index it: y, out, dout
    and dy dense (N, C, S), dcoef dense (N, C), bias dense (C,)."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def _z(self, a: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, c, s = a["n"], a["c"], a["s"]
        assert not a["channels_last"] and a["dtype"] == 0 and a["noise"] == 0 and a["act"] == cmc.ACTS["lrelu"]
        y = _memory(a["y"], n * c * s).view(n, c, s)
        dcoef = _memory(a["dcoef"], n * c).view(n, c, 1) if a["dcoef"] else torch.ones(n, c, 1)
        bias = _memory(a["bias"], c).view(1, c, 1) if a["bias"] else torch.zeros(1, c, 1)
        return y, dcoef, y * dcoef + bias

    def modconv_epilogue_forward(self, *args, **kwargs):
        a = _bind(self.real.modconv_epilogue_forward, args, kwargs)
        self.calls.append("modconv_epilogue_forward")
        _, _, z = self._z(a)
        _memory(a["out"], z.numel()).copy_((F.leaky_relu(z, a["alpha"]) * a["gain"]).reshape(-1))

    def modconv_epilogue_backward_workspace(self, *args, **kwargs):
        _bind(self.real.modconv_epilogue_backward_workspace, args, kwargs)
        return 0

    def modconv_epilogue_backward(self, *args, **kwargs):
        a = _bind(self.real.modconv_epilogue_backward, args, kwargs)
        self.calls.append("modconv_epilogue_backward")
        y, dcoef, z = self._z(a)
        g = _memory(a["dout"], z.numel()).view(z.shape) * a["gain"] * torch.where(z > 0, 1.0, a["alpha"])
        _memory(a["dy"], z.numel()).copy_((g * dcoef).reshape(-1))
        if a["ddcoef"]:
            _memory(a["ddcoef"], a["n"] * a["c"]).copy_((g * y).sum(2).reshape(-1))
        if a["dbias"]:
            _memory(a["dbias"], a["c"]).copy_(g.sum((0, 2)))


@pytest.fixture
def epilogue_kernels(monkeypatch):
    """The cuda epilogue launchers on CPU tensors, over :class:`_EpilogueKernels`: the registry takes the cuda
    backend (its device and extension checks pass), which launches on the stand-in."""
    try:
        import genkernels._C as ext
    except ImportError as e:
        pytest.skip(f"the CUDA extension is not built: {e}")
    kernels = _EpilogueKernels(ext)
    monkeypatch.setattr(cmc, "kernels_unavailable", lambda *args: None)
    monkeypatch.setattr(cmc, "require_extension", lambda: kernels)
    monkeypatch.setattr(cmc, "stream_handle", lambda device: 0)
    return kernels


def _strided_side_inputs(n: int, c: int) -> dict[str, torch.Tensor]:
    """float32 dcoef (N, C) and bias (C,) that are views with other strides: a transpose and a slice with a
    step. The traced call's float32 cast (``.to(float32)``) leaves such a float32 view as it is."""
    return {"dcoef": torch.rand(c, n).t() + 0.5, "bias": torch.randn(2 * c)[::2]}


@pytest.mark.parametrize("path", ["eager", "traced", "launcher"])
def test_modconv_epilogue_strided_side_inputs(epilogue_kernels, path):
    """A strided float32 dcoef and bias reached the cuda epilogue launchers as they are on the traced path (the
    registered ops ``genkernels::modconv_epilogue`` and its backward, which torch.compile calls with the graph's
    tensors), and the launchers refused them with a ValueError: a compiled model failed where the eager one ran.
    The launchers themselves ("launcher": called with the views) now hand the kernels dense copies, whatever
    their caller did. Outputs and gradients match the reference."""
    torch.manual_seed(0)
    n, c = 2, 6
    y = torch.randn(n, c, 3, 5)
    side = _strided_side_inputs(n, c)
    dout = torch.randn(n, c, 3, 5)
    leaves = [t.detach().requires_grad_(True) for t in (y, side["dcoef"], side["bias"])]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (y, side["dcoef"], side["bias"])]
    ref = M.modconv_epilogue_reference(ref_leaves[0], ref_leaves[1], bias=ref_leaves[2], act="lrelu")
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    if path == "eager":
        out = M.modconv_epilogue(leaves[0], leaves[1], bias=leaves[2], act="lrelu", backend="cuda")
        grads = torch.autograd.grad(out, leaves, dout)
    elif path == "traced":  # the calls the compiled graph makes, on the tensors it passes (the views themselves)
        y_, dcoef, bias = leaves
        flags = ("lrelu", ALPHA, GAIN, False, 0.0)
        out = torch.ops.genkernels.modconv_epilogue(y_, dcoef, None, None, bias, *flags, "cuda")
        grads = torch.ops.genkernels.modconv_epilogue_backward(
            dout, y_, dcoef, None, None, bias, *flags, True, True, False, False, "cuda"
        )[:3]
    else:
        y_, dcoef, bias = (t.detach() for t in leaves)
        out = cmc.epilogue_forward(y_, dcoef, None, None, bias, "lrelu", ALPHA, GAIN, None)
        grads = cmc.epilogue_backward(dout, y_, dcoef, None, None, bias, "lrelu", ALPHA, GAIN, None, True, True, False)[
            :3
        ]
    assert epilogue_kernels.calls == ["modconv_epilogue_forward", "modconv_epilogue_backward"]
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5, msg="out")
    for name, got, want in zip(("dy", "ddcoef", "dbias"), grads, ref_grads):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5, msg=name)


def test_modconv_epilogue_refuses_side_inputs_of_another_dtype(epilogue_kernels):
    """The kernels read dcoef, strength and bias as raw float32: another dtype is refused, naming the input."""
    y = torch.randn(2, 6, 3, 5)
    with pytest.raises(ValueError, match="bias32 must be a float32 tensor"):
        cmc.epilogue_forward(y, None, None, None, torch.randn(6, dtype=torch.float16), "lrelu", ALPHA, GAIN, None)
