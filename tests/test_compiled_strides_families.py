"""The traced path (torch.compile(fullgraph=True), which reaches the ``genkernels::<op>`` torch.library ops) of the
generative-family ops, reparameterize, affine_coupling / actnorm and the modulated-convolution epilogue, on the
strided inputs and parameter dtypes users produce: every normalization the eager path does before the kernels
(contiguous copies, dtype casts, output layouts) must happen on the registered ops' path too. Outputs and
gradients are checked against the float64 reference under the DESIGN.md criterion (tests/criterion.py)."""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.criterion import assert_criterion

CP = importlib.import_module("genkernels.ops.coupling")
MC = importlib.import_module("genkernels.ops.modconv")
RP = importlib.import_module("genkernels.ops.reparam")
BACKENDS = ["reference", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def _strided_like(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A random tensor of ``shape`` whose strides are its dims' in reverse (no dim dense): an upstream gradient
    as a transposing consumer hands it back."""
    return torch.randn(shape[::-1], dtype=dtype, device=device).permute(*reversed(range(len(shape))))


def _references(fn, inputs, upstream, dtype=torch.float32):
    """[(out, *grads) in ``dtype``, (out, *grads) in float64] of ``fn`` on the inputs cast to each dtype."""
    refs = []
    for dt in (dtype, torch.float64):
        leaves = [t.detach().to(dt).requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        refs.append((out, *torch.autograd.grad(out, leaves, upstream.to(dt))))
    return refs


@pytest.mark.parametrize("backend", BACKENDS)
def test_modconv_epilogue_strided_dcoef_and_bias(backend, device):
    """A float32 dcoef that is a transposed view and a bias that is a slice with a step are read as the (N, C) and
    (C,) tensors they are. The traced call cast them to float32, a no-op for float32 ones, and passed the views
    themselves to kernels that index them densely (the eager path makes them contiguous): wrong numbers, forward
    and backward, without an error."""
    torch._dynamo.reset()
    n, c, h, w = 2, 5, 3, 4
    y = torch.randn(n, c, h, w, device=device)
    dcoef = torch.rand(c, n, device=device).t() + 0.5
    bias = torch.randn(2 * c, device=device)[::2]
    noise = torch.randn(n, 1, h, w, device=device)
    strength = torch.tensor([0.7], device=device)

    def fn(y, dcoef, bias, strength):
        return MC.modconv_epilogue(y, dcoef, noise=noise, noise_strength=strength, bias=bias, backend=backend)

    def ref(y, dcoef, bias, strength):
        return MC.modconv_epilogue_reference(y, dcoef, noise=noise.to(y.dtype), noise_strength=strength, bias=bias)

    inputs = (y, dcoef, bias, strength)
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    assert not leaves[1].is_contiguous() and not leaves[2].is_contiguous()
    out = torch.compile(fn, fullgraph=True)(*leaves)
    dout = _strided_like(tuple(out.shape), out.dtype, device)
    got = (out, *torch.autograd.grad(out, leaves, dout))
    ref32, ref64 = _references(ref, inputs, dout)
    for i, name in enumerate(("out", "dy", "ddcoef", "dbias", "dstrength")):
        assert_criterion(got[i], ref32[i], ref64[i], name, relative_floor=i > 1)


def test_actnorm_float64_parameters_traced(device):
    """A float64 actnorm (the reference backend) keeps float64 log_scale and bias in float64 on the traced path, as
    the eager reference does: the registered forward and backward ops rounded them through float32, an error of
    1e-8 in y and dx where float64 allows 1e-12."""
    torch._dynamo.reset()
    f64 = torch.float64
    x = torch.randn(2, 5, 3, 4, dtype=f64, device=device)
    log_scale, bias = 0.3 * torch.randn(5, dtype=f64, device=device), torch.randn(5, dtype=f64, device=device)

    def fn(x, log_scale, bias):
        return CP.actnorm(x, log_scale, bias, backend="reference")[0]

    def ref(x, log_scale, bias):
        return (x + bias.view(1, -1, 1, 1)) * torch.exp(log_scale.view(1, -1, 1, 1))

    leaves = [t.detach().requires_grad_(True) for t in (x, log_scale, bias)]
    y = torch.compile(fn, fullgraph=True)(*leaves)
    dy = _strided_like(tuple(y.shape), f64, device)
    got = (y, *torch.autograd.grad(y, leaves, dy))
    want = _references(ref, (x, log_scale, bias), dy, dtype=f64)[1]
    for i, name in enumerate(("y", "dx", "dlog_scale", "dbias")):
        assert_criterion(got[i], want[i], want[i], name, relative_floor=i > 1)


def test_modconv_epilogue_float64_strength_traced(device):
    """A float64 epilogue (the reference backend) uses its noise strength, a float or a float64 tensor, in float64
    on the traced path, as the eager reference does: the traced call rounded it through float32 first."""
    torch._dynamo.reset()
    f64 = torch.float64
    y = torch.randn(2, 5, 3, 4, dtype=f64, device=device)
    noise = torch.randn(2, 1, 3, 4, dtype=f64, device=device)

    def fn(y, strength):
        return MC.modconv_epilogue(y, noise=noise, noise_strength=strength, act="linear", backend="reference")

    compiled = torch.compile(fn, fullgraph=True)
    for strength in (0.1, torch.tensor(0.3, dtype=f64, device=device) + 1e-9):
        out = compiled(y, strength)
        want = MC.modconv_epilogue_reference(y, noise=noise, noise_strength=strength, act="linear")
        assert_criterion(out, want, want, f"out with a {type(strength).__name__} strength")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reparameterize_moments_of_other_strides_backward(backend, device):
    """Moments that are dense but neither contiguous nor channels_last (a transposed view) are copied once to
    contiguous before the kernels, and so is their gradient's layout: the backward op's fake said dmoments had
    the moments' own strides while the op returned the copy's, and the compiled backward read it through the
    wrong strides (torch >= 2.6 stops at its stride check; older inductors do not check)."""
    torch._dynamo.reset()
    n, c, h, w = 2, 3, 4, 5
    moments = torch.randn(n, 2 * c, w, h, device=device).transpose(2, 3)
    noise = _strided_like((n, c, h, w), torch.float32, device)

    def fn(moments):
        return RP.reparameterize(moments=moments, noise=noise, backend=backend)

    leaf = moments.detach().requires_grad_(True)
    z, kl = torch.compile(fn, fullgraph=True)(leaf)
    dz, dkl = _strided_like(tuple(z.shape), z.dtype, device), torch.randn(1, device=device).expand(n)
    (dmoments,) = torch.autograd.grad((z, kl), [leaf], (dz, dkl))
    refs = []
    for dt in (torch.float32, torch.float64):
        m = moments.detach().to(dt).requires_grad_(True)
        mean, logvar = m.chunk(2, dim=1)
        lv = logvar.clamp(RP.LOGVAR_MIN, RP.LOGVAR_MAX)
        rz = mean + torch.exp(0.5 * lv) * noise.to(dt)
        rkl = 0.5 * (mean * mean + torch.exp(lv) - 1.0 - lv).flatten(1).sum(1)
        refs.append((rz, rkl, *torch.autograd.grad((rz, rkl), [m], (dz.to(dt), dkl.to(dt)))))
    for i, (got, name) in enumerate(((z, "z"), (kl, "kl"), (dmoments, "dmoments"))):
        assert_criterion(got, refs[0][i], refs[1][i], name, relative_floor=i == 1)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_coupling_channels_last_x_with_offset_h(backend, device):
    """The riskiest coupling layout: channels_last x with h an offset channel slice of a larger conditioner
    output (neither layout); h is matched to x's layout once, on both paths. (Gradients passed from outside the
    graph reach the backward op in y's own strides: the strided ones are in
    test_backward_ops_traced_on_strided_upstream_gradients.)"""
    torch._dynamo.reset()
    n, c, h, w = 2, 5, 3, 4
    cb = c - c // 2
    x = torch.randn(n, c, h, w, device=device).to(memory_format=torch.channels_last)
    cond = torch.randn(n, 2 * cb + 3, h, w, device=device)[:, 3:]

    def fn(x, cond):
        return CP.affine_coupling(x, cond, scale="sigmoid", backend=backend)

    leaves = [t.detach().requires_grad_(True) for t in (x, cond)]
    y, logdet = torch.compile(fn, fullgraph=True)(*leaves)
    assert y.is_contiguous(memory_format=torch.channels_last)
    dy, dlogdet = _strided_like(tuple(y.shape), y.dtype, device), torch.randn(2 * n, device=device)[::2]
    got = (y, logdet, *torch.autograd.grad((y, logdet), leaves, (dy, dlogdet)))
    refs = []
    for dt in (torch.float32, torch.float64):
        rl = [t.detach().to(dt).requires_grad_(True) for t in (x, cond)]
        ry, rld = CP.affine_coupling(*rl, scale="sigmoid", backend="reference")
        refs.append((ry, rld, *torch.autograd.grad((ry, rld), rl, (dy.to(dt), dlogdet.to(dt)))))
    for i, name in enumerate(("y", "logdet", "dx", "dh")):
        assert_criterion(got[i], refs[0][i], refs[1][i], name, relative_floor=i == 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_ops_traced_on_strided_upstream_gradients(backend, device):
    """The backward ops of reparameterize (dz and dkl), affine_coupling (dy and dlogdet), actnorm, the modconv
    epilogue and the demodulation coefficients, traced, handed strided upstream gradients: consumers inside the
    graph give them slices along H of a wider gradient (a cat, one of them into a channels_last x), slices with a
    step (a stack), transposed ones and expanded (stride 0) ones. A gradient passed to autograd.grad from outside
    the graph would not do: the compiled backward gives it the output's own strides first."""
    torch._dynamo.reset()
    n, c, h, w = 2, 5, 3, 4
    inputs = [
        torch.randn(n, 3, h, w, device=device),  # mean
        torch.randn(n, 3, h, w, device=device),  # logvar
        torch.randn(n, c, h, w, device=device).to(memory_format=torch.channels_last),  # coupling x
        torch.randn(n, CP.h_channels(c, "sigmoid"), h, w, device=device),  # coupling h
        torch.randn(n, c, h, w, device=device),  # actnorm x
        0.3 * torch.randn(c, device=device),  # log_scale
        torch.randn(c, device=device),  # actnorm bias
        torch.randn(n, c, h, w, device=device),  # epilogue y
        torch.rand(n, c, device=device) + 0.5,  # dcoef
        torch.randn(c, device=device),  # epilogue bias
        torch.tensor([0.7], device=device),  # noise strength
        torch.randn(c, 4, 3, 3, device=device),  # weight
        torch.randn(n, 4, device=device),  # styles
        torch.randn(n, 3, h, w, device=device),  # reparameterization noise
        torch.randn(n, 1, h, w, device=device),  # epilogue noise
    ]

    def block(ops, mean, logvar, xc, hc, xa, log_scale, bias_a, ye, dcoef, bias_e, strength, weight, styles, eps, nz):
        reparameterize, coupling, act_norm, epilogue, demod = ops
        z, kl = reparameterize(mean, logvar, noise=eps)
        yc, logdet = coupling(xc, hc, scale="sigmoid")
        ya, logdet_a = act_norm(xa, log_scale, bias_a)
        out = epilogue(ye, dcoef, noise=nz, noise_strength=strength, bias=bias_e)
        return (
            z.transpose(1, 3).contiguous(),  # dz: transposed
            kl.sum(),  # dkl: expanded
            torch.cat([yc, out], 2),  # coupling's dy (x channels_last) and the epilogue's dout: slices along H
            torch.stack([logdet, logdet_a], 1),  # dlogdet: a slice with a step
            ya.sum(3),  # actnorm's dy: expanded along W
            demod(weight, styles).t().contiguous(),  # demodulation's grad: transposed
        )

    def ours(*args):
        ops = (
            lambda *a, **kw: RP.reparameterize(*a, **kw, backend=backend),
            lambda *a, **kw: CP.affine_coupling(*a, **kw, backend=backend),
            lambda *a: CP.actnorm(*a, backend=backend),
            lambda *a, **kw: MC.modconv_epilogue(*a, **kw, backend=backend),
            lambda *a: MC.demodulation_coefficients(*a, backend=backend),
        )
        return block(ops, *args)

    def reference(*args):
        ops = (
            RP.reparameterize_reference,
            lambda *a, **kw: CP.affine_coupling(*a, **kw, backend="reference"),
            lambda *a: CP.actnorm(*a, backend="reference"),
            MC.modconv_epilogue_reference,
            MC.demodulation_coefficients_reference,
        )
        return block(ops, *args)

    n_leaves = len(inputs) - 2  # the noise tensors are constants
    leaves = [t.detach().requires_grad_(i < n_leaves) for i, t in enumerate(inputs)]
    assert leaves[2].is_contiguous(memory_format=torch.channels_last)
    got = torch.compile(ours, fullgraph=True)(*leaves)
    upstream = [torch.randn(t.shape, device=device) for t in got]
    grads = torch.autograd.grad(got, leaves[:n_leaves], upstream)
    refs = []
    for dt in (torch.float32, torch.float64):
        rl = [t.detach().to(dt).requires_grad_(i < n_leaves) for i, t in enumerate(inputs)]
        outs = reference(*rl)
        refs.append((*outs, *torch.autograd.grad(outs, rl[:n_leaves], [u.to(dt) for u in upstream])))
    outputs = ("z", "kl summed", "yc, out", "logdet, logdet_a", "ya summed over W", "dcoef")
    names = (*outputs, "dmean", "dlogvar", "dxc", "dhc", "dxa", "dlog_scale", "dbias_a", "dye", "ddcoef", "dbias_e")
    names = (*names, "dstrength", "dweight", "dstyles")
    sums = {"kl summed", "logdet, logdet_a", "ya summed over W", "dlog_scale", "dbias_a", "ddcoef", "dbias_e"}
    sums |= {"dstrength", "dweight", "dstyles"}
    assert len(names) == len(got) + len(grads)
    for i, (value, name) in enumerate(zip((*got, *grads), names)):
        assert_criterion(value, refs[0][i], refs[1][i], name, relative_floor=name in sums)
