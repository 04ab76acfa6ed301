"""reparameterize: z, KL and both gradients of every backend against the reference under the DESIGN.md
criterion (supplied noise; layouts, moments, odd sizes, batch 0, the logvar clamp), the in-kernel
Philox noise (the documented stream, reproducibility, statistics), noise sources, errors, opcheck and
torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import genkernels
from genkernels._layout import is_channels_last
from genkernels.ops import reparam as R
from genkernels.ops import reparameterize
from genkernels.ops.schedule import philox_normal
from tests.criterion import assert_criterion
from tests.op_inputs import skip_unsupported, to_layout

FAST = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["reference", *FAST]
# The Triton interpreter mishandles bfloat16: bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _skip_unsupported(backend: str, first, logvar=None, noise=None) -> None:
    """Skip when ``backend`` cannot run on (mean, logvar), or on moments when logvar is None."""
    args = {"moments": first} if logvar is None else {"mean": first, "logvar": logvar}
    skip_unsupported(backend, R.OP, noise=noise, **args)


def _inputs(shape, dtype, device, layout="contiguous", scale=1.0, logvar_scale=2.0):
    """(first, logvar or None, noise): mean and logvar, or moments for the "moments*" layouts."""
    if layout.startswith("moments"):
        mshape = (shape[0], 2 * shape[1], *shape[2:])
        moments = torch.randn(mshape, device=device)
        moments[:, : shape[1]] *= scale
        moments[:, shape[1] :] *= logvar_scale
        moments = to_layout(moments.to(dtype), "channels_last" if layout == "moments_cl" else "contiguous")
        return moments, None, torch.randn(shape, device=device).to(dtype)
    mean = to_layout((torch.randn(shape, device=device) * scale).to(dtype), layout)
    logvar = to_layout((torch.randn(shape, device=device) * logvar_scale).to(dtype), layout)
    return mean, logvar, torch.randn(shape, device=device).to(dtype)


def _call(first, logvar, backend, **kwargs):
    if logvar is None:
        return reparameterize(moments=first, backend=backend, **kwargs)
    return reparameterize(first, logvar, backend=backend, **kwargs)


def _run(first, logvar, noise, backend, dz, dkl, deterministic=False):
    """z, kl and the gradients of sum(z * dz) + sum(kl * dkl) w.r.t. the inputs."""
    inputs = [t.detach().requires_grad_(True) for t in (first, logvar) if t is not None]
    z, kl = _call(*inputs, *([None] if logvar is None else []), backend, noise=noise, deterministic=deterministic)
    grads = torch.autograd.grad((z.double() * dz).sum() + (kl.double() * dkl).sum(), inputs)
    return z, kl, grads


def _check_against_reference(backend, first, logvar, noise, deterministic=False):
    device = first.device
    zshape = noise.shape
    dz = torch.randn(zshape, device=device, dtype=torch.float64)
    dkl = torch.randn(zshape[0], device=device, dtype=torch.float64)
    up = [None if t is None else t.double() for t in (first, logvar, noise)]
    z64, kl64, g64 = _run(*up, "reference", dz, dkl, deterministic)
    zr, klr, gr = _run(first, logvar, noise, "reference", dz, dkl, deterministic)
    z, kl, g = _run(first, logvar, noise, backend, dz, dkl, deterministic)
    assert_criterion(z, zr, z64, "z")
    assert kl.dtype == torch.float32
    assert_criterion(kl, klr, kl64, "kl", relative_floor=True)
    names = ("dmoments",) if logvar is None else ("dmean", "dlogvar")
    for name, out, ref, truth in zip(names, g, gr, g64):
        assert out.dtype == first.dtype
        assert_criterion(out, ref, truth, name, relative_floor=True)
    return z


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "moments", "moments_cl", "strided"])
def test_layouts_and_dtypes(backend, dtype, layout, device):
    first, logvar, noise = _inputs((2, 4, 5, 6), dtype, device, layout)
    _skip_unsupported(backend, first, logvar, noise)
    z = _check_against_reference(backend, first, logvar, noise)
    if layout in ("channels_last", "moments_cl"):
        assert is_channels_last(z), "z keeps the channels_last layout of its input"
    else:
        assert z.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape",
    [(3, 7), (1, 1, 1, 1), (2, 3, 1, 1), (3, 5, 7, 3), (1, 16, 33), (2, 3, 4, 5, 6), (5, 1, 9, 1)],
    ids=str,
)
@pytest.mark.parametrize("layout", ["contiguous", "moments_cl"])
def test_odd_shapes(backend, shape, layout, device):
    if layout == "moments_cl" and len(shape) < 2:
        pytest.skip("moments need a channel dim")
    first, logvar, noise = _inputs(shape, torch.float32, device, layout)
    _check_against_reference(backend, first, logvar, noise)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logvar_clamp(backend, device):
    """logvar outside [-30, 20] is clamped, and gets no gradient there (torch.clamp's)."""
    mean, logvar, noise = _inputs((2, 3, 4, 4), torch.float32, device)
    logvar = logvar * 20  # values around +-40
    logvar[0, 0, 0, :2] = torch.tensor([-30.0, 20.0])  # exactly at the bounds: the gradient passes
    _skip_unsupported(backend, mean, logvar, noise)
    _check_against_reference(backend, mean, logvar, noise)
    lv = logvar.detach().requires_grad_(True)
    z, kl = reparameterize(mean, lv, noise=noise, backend=backend)
    (g,) = torch.autograd.grad(kl.sum() + z.sum(), lv)
    outside = (logvar < -30) | (logvar > 20)
    assert outside.any() and (g[outside] == 0).all()
    assert (g[0, 0, 0, :2] != 0).all()
    assert torch.isfinite(z).all() and torch.isfinite(kl).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_magnitudes(backend, device):
    """fp16 means up to 1e4: the KL (mean^2 ~ 1e8 per element) accumulates in float32 without overflow."""
    first, logvar, noise = _inputs((2, 4, 6, 5), torch.float16, device, "moments", scale=3e3)
    _skip_unsupported(backend, first, None, noise)
    _check_against_reference(backend, first, logvar, noise)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "moments_cl"])
def test_deterministic(backend, layout, device):
    first, logvar, noise = _inputs((2, 3, 4, 5), torch.float32, device, layout)
    _check_against_reference(backend, first, logvar, noise, deterministic=True)
    mean = first.chunk(2, dim=1)[0] if logvar is None else first
    z, _ = _call(first, logvar, backend, deterministic=True)
    assert torch.equal(z, mean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_only_and_z_only_gradients(backend, device):
    """A gradient through kl alone, or z alone (the other output unused), is the formula's."""
    mean, logvar, noise = _inputs((2, 3, 4, 5), torch.float32, device)
    m, lv = mean.requires_grad_(True), logvar.requires_grad_(True)
    z, kl = reparameterize(m, lv, noise=noise, backend=backend)
    dm, dlv = torch.autograd.grad(kl.sum(), (m, lv))
    torch.testing.assert_close(dm, mean.detach())
    torch.testing.assert_close(dlv, 0.5 * (logvar.detach().exp() - 1))
    z = reparameterize(m, lv, noise=noise, return_kl=False, backend=backend)
    dm, dlv = torch.autograd.grad(z.sum(), (m, lv))
    torch.testing.assert_close(dm, torch.ones_like(mean))
    torch.testing.assert_close(dlv, 0.5 * noise * (0.5 * logvar.detach()).exp())


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_gradient(backend, device):
    mean, logvar, noise = _inputs((2, 3, 4), torch.float32, device)
    n = noise.requires_grad_(True)
    z = reparameterize(mean, logvar, noise=n, return_kl=False, backend=backend)
    (g,) = torch.autograd.grad(z.sum(), n)
    torch.testing.assert_close(g, (0.5 * logvar).exp())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3), (3, 2, 0)], ids=str)
def test_empty(backend, shape, device):
    mean = torch.randn(shape, device=device, requires_grad=True)
    logvar = torch.randn(shape, device=device, requires_grad=True)
    z, kl = reparameterize(mean, logvar, seed=1, backend=backend)
    assert z.shape == shape and kl.shape == (shape[0],)
    assert (kl == 0).all()
    dm, dlv = torch.autograd.grad((z.sum() + kl.sum()), (mean, logvar))
    assert dm.shape == shape and dlv.shape == shape


# --------------------------------------------------------------------------- in-kernel noise


def _implied_noise(z, mean, logvar):
    return ((z.double() - mean.double()) / torch.exp(0.5 * logvar.double().clamp(-30, 20))).cpu()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "moments", "moments_cl"])
def test_philox_stream(backend, layout, device):
    """eps of element e of z in memory order is element e of the documented (seed, offset) stream."""
    first, logvar, _ = _inputs((2, 3, 5, 7), torch.float32, device, layout)
    mean, lv = first.chunk(2, dim=1) if logvar is None else (first, logvar)
    _skip_unsupported(backend, first, logvar)
    z, _ = _call(first, logvar, backend, seed=12345, offset=6)
    eps = _implied_noise(z, mean, lv)
    stream = philox_normal(12345, 6, z.numel()).double()
    order = (0, 2, 3, 1) if is_channels_last(z) else (0, 1, 2, 3)
    torch.testing.assert_close(eps.permute(order).flatten(), stream, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_reproducible(backend, device):
    mean, logvar, _ = _inputs((3, 4, 6), torch.float32, device)
    _skip_unsupported(backend, mean, logvar)
    a, _ = reparameterize(mean, logvar, seed=5, backend=backend)
    b, _ = reparameterize(mean, logvar, seed=5, backend=backend)
    c, _ = reparameterize(mean, logvar, seed=5, offset=1, backend=backend)
    assert torch.equal(a, b)
    assert (a - c).abs().min() > 0
    torch.manual_seed(3)
    d, _ = reparameterize(mean, logvar, backend=backend)
    torch.manual_seed(3)
    e, _ = reparameterize(mean, logvar, backend=backend)
    f, _ = reparameterize(mean, logvar, backend=backend)
    assert torch.equal(d, e), "the default seed follows torch.manual_seed"
    assert (e - f).abs().min() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_statistics(backend, device):
    """In-op noise is standard normal: mean, variance, a Kolmogorov-Smirnov test, no correlation."""
    mean = torch.zeros(4, 4096, device=device)
    logvar = torch.zeros_like(mean)
    _skip_unsupported(backend, mean, logvar)
    z, kl = reparameterize(mean, logvar, seed=2024, offset=3, backend=backend)
    assert (kl == 0).all()
    z = z.flatten().double().cpu()
    n = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 4 * math.sqrt(2 / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 4 / math.sqrt(n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_draws_the_same_noise(backend, device):
    """The backward draws eps again from (seed, offset): dlogvar = dz * eps * std / 2 with the forward's eps."""
    mean, logvar, _ = _inputs((2, 3, 9, 5), torch.float32, device, "channels_last")
    _skip_unsupported(backend, mean, logvar)
    lv = logvar.detach().requires_grad_(True)
    z = reparameterize(mean, lv, seed=77, offset=2, return_kl=False, backend=backend)
    (g,) = torch.autograd.grad(z.sum(), lv)
    eps = (z.detach().double() - mean.double()) / torch.exp(0.5 * logvar.double())
    torch.testing.assert_close(g.double(), 0.5 * eps * torch.exp(0.5 * logvar.double()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generator(backend, device):
    """A generator in the same state gives the same z; the generator advances between calls."""
    mean, logvar, _ = _inputs((2, 3, 4, 5), torch.float32, device)
    _skip_unsupported(backend, mean, logvar)
    a, _ = reparameterize(mean, logvar, generator=torch.Generator().manual_seed(9), backend=backend)
    gen = torch.Generator().manual_seed(9)
    b, _ = reparameterize(mean, logvar, generator=gen, backend=backend)
    c, _ = reparameterize(mean, logvar, generator=gen, backend=backend)
    assert torch.equal(a, b) and (b - c).abs().min() > 0


def test_reference_generator_draws_like_torch(device):
    """The reference draws eps with torch.randn on the generator (as diffusers' posterior sample does)."""
    mean, logvar, _ = _inputs((2, 3, 4, 5), torch.float32, device)
    z, _ = reparameterize(mean, logvar, generator=torch.Generator().manual_seed(4), backend="reference")
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(4)).to(device)
    torch.testing.assert_close(z, mean + torch.exp(0.5 * logvar) * eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_noise_wins(backend, device):
    mean, logvar, noise = _inputs((2, 3, 4), torch.float32, device)
    _skip_unsupported(backend, mean, logvar, noise)
    z, _ = reparameterize(mean, logvar, noise=noise, seed=3, generator=torch.Generator(), backend=backend)
    torch.testing.assert_close(z, mean + torch.exp(0.5 * logvar) * noise)


@pytest.mark.gpu
def test_fast_backends_share_the_stream():
    mean, logvar, _ = _inputs((3, 4, 17, 9), torch.float16, "cuda", "moments_cl")
    outs = []
    for backend in ("triton", "cuda"):
        _skip_unsupported(backend, mean)
        outs.append(reparameterize(moments=mean, seed=77, offset=4, backend=backend))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_graph_capture():
    """No host synchronization: the call (default seed from the CUDA generator included) records into a
    CUDA graph, and each replay draws fresh noise."""
    for backend in ("triton", "cuda"):
        moments = torch.randn(2, 8, 32, 32, device="cuda", dtype=torch.float16)
        _skip_unsupported(backend, moments)
        reparameterize(moments=moments, backend=backend)  # compile / warm up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            z, kl = reparameterize(moments=moments, backend=backend)
        graph.replay()
        first = z.clone()
        graph.replay()
        torch.cuda.synchronize()
        assert (first - z).abs().max() > 0, "replays draw fresh noise"
        torch.testing.assert_close(kl, reparameterize(moments=moments, deterministic=True, backend=backend)[1])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, lv: reparameterize(m, lv[:, :2]), ValueError, "logvar must have mean's shape"),
        (lambda m, lv: reparameterize(moments=torch.randn(2, 5, 3)), ValueError, "even size"),
        (lambda m, lv: reparameterize(moments=torch.randn(4)), ValueError, r"\(N, 2C, \*\)"),
        (lambda m, lv: reparameterize(m.long(), lv.long()), TypeError, "mean must be float32"),
        (lambda m, lv: reparameterize(m, lv.half()), TypeError, "share one dtype"),
        (lambda m, lv: reparameterize(m, lv.to("meta")), ValueError, "use one device"),
        (lambda m, lv: reparameterize(m, lv, moments=m), ValueError, "not both"),
        (lambda m, lv: reparameterize(m), ValueError, "pass mean and logvar"),
        (lambda m, lv: reparameterize(m, lv, noise=m.half()), TypeError, "noise must have mean's dtype"),
        (lambda m, lv: reparameterize(m, lv, noise=m[:1]), ValueError, "noise must have the shape"),
        (lambda m, lv: reparameterize(m, lv, seed=-1), ValueError, "seed must be an int"),
        (lambda m, lv: reparameterize(m, lv, offset=1.5), ValueError, "offset must be an int"),
        (lambda m, lv: reparameterize(m, lv, generator=3), TypeError, "generator must be"),
        (lambda m, lv: reparameterize(m, lv, return_kl=1), TypeError, "return_kl must be a bool"),
        (lambda m, lv: reparameterize(m, lv, backend="fast"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(call, error, match):
    mean, logvar = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(error, match=match):
        call(mean, logvar)


def test_explicit_backend_refuses():
    mean, logvar = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(genkernels.UnsupportedError, match="float64"):
        reparameterize(mean, logvar, seed=1, backend="triton")
    if not torch.cuda.is_available():
        with pytest.raises(genkernels.UnsupportedError, match="cuda"):
            reparameterize(mean.float(), logvar.float(), seed=1, backend="cuda")
    reparameterize(mean, logvar, seed=1)  # auto: the reference runs float64


# --------------------------------------------------------------------------- torch.library op and compile


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("case", ["noise", "seed", "moments", "deterministic"])
def test_opcheck(backend, case, device):
    first, logvar, noise = _inputs(
        (2, 3, 4, 5), torch.float32, device, "moments_cl" if case == "moments" else "contiguous"
    )
    _skip_unsupported(backend, first, logvar)
    first.requires_grad_(True)
    if logvar is not None:
        logvar.requires_grad_(True)
    explicit = noise if case == "noise" else None
    args = (first, logvar, explicit, None, 42, 3, case == "deterministic", True, backend)
    torch.library.opcheck(torch.ops.genkernels.reparameterize.default, args)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_compile_fullgraph(backend, device):
    """Forward and backward trace without graph breaks, moments and separate inputs alike."""
    torch._dynamo.reset()
    moments, _, noise = _inputs((2, 3, 4, 5), torch.float32, device, "moments_cl")
    _skip_unsupported(backend, moments)

    def fn(moments, noise):
        z, kl = reparameterize(moments=moments, noise=noise, backend=backend)
        mean, logvar = moments.chunk(2, dim=1)
        z2, kl2 = reparameterize(mean, logvar, seed=3, backend=backend)
        return (z * z2).sum() + kl.sum() + kl2.sum(), z

    leaf = moments.detach().requires_grad_(True)
    loss, z = fn(leaf, noise)
    (g,) = torch.autograd.grad(loss, leaf)
    leaf_c = moments.detach().requires_grad_(True)
    closs, cz = torch.compile(fn, fullgraph=True)(leaf_c, noise)
    (cg,) = torch.autograd.grad(closs, leaf_c)
    torch.testing.assert_close(cz, z)
    torch.testing.assert_close(closs, loss)
    torch.testing.assert_close(cg, g)
    assert is_channels_last(cz)
