"""reparameterize at its edges: NaN inputs on every backend (torch.clamp keeps a NaN logvar, so z and the KL
are NaN as in diffusers' DiagonalGaussianDistribution), empty inputs of any strides (torch calls every empty
tensor contiguous), and a seed or offset that changes from call to call under torch.compile."""

from __future__ import annotations

import pytest
import torch

from genkernels.ops import reparameterize
from tests.op_inputs import skip_unsupported, to_layout

FAST = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["reference", *FAST]


def _diffusers(mean, logvar, noise):
    """z and kl as diffusers' DiagonalGaussianDistribution computes them (KL over every non-batch dim), float64."""
    mean, logvar, noise = mean.double(), logvar.double().clamp(-30.0, 20.0), noise.double()
    z = mean + torch.exp(0.5 * logvar) * noise
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=tuple(range(1, mean.dim())))
    return z, kl


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "moments"])
def test_nan_propagates(backend, dtype, layout, device):
    """A NaN logvar (a diverged encoder) gives a NaN z element and a NaN KL for its sample, and no gradient
    through the clamp (torch.clamp's); a NaN mean gives NaN z, KL and dmean. Finite samples stay finite."""
    shape = (3, 3, 4, 5)
    mean = torch.randn(shape, device=device)
    logvar = torch.randn(shape, device=device)
    noise = torch.randn(shape, device=device).to(dtype)
    logvar[0, 1, 2, 3] = float("nan")
    mean[1, 2, 0, 1] = float("nan")
    mean, logvar = mean.to(dtype), logvar.to(dtype)
    ref_z, ref_kl = _diffusers(mean, logvar, noise)
    nan_z = torch.isnan(ref_z).cpu()
    if layout == "moments":
        first = torch.cat([mean, logvar], dim=1).requires_grad_(True)
        args = {"moments": first}
    else:
        m = to_layout(mean, layout).requires_grad_(True)
        lv = to_layout(logvar, layout).requires_grad_(True)
        args = {"mean": m, "logvar": lv}
    skip_unsupported(backend, "reparameterize", noise=noise, **args)
    for source in ({"noise": noise}, {"seed": 11}):
        z, kl = reparameterize(**args, **source, backend=backend)
        assert torch.equal(torch.isnan(z).cpu(), nan_z), f"{source}: NaN elements of z"
        assert torch.equal(torch.isnan(kl).cpu(), torch.tensor([True, True, False])), f"{source}: NaN KL samples"
        if "noise" in source:
            fine = ~nan_z.to(device)
            torch.testing.assert_close(z[fine].double(), ref_z[fine], atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(kl[2].double(), ref_kl[2], atol=1e-3, rtol=1e-4)
    # dz = 1 everywhere, dkl = (0, 0, 1): the eps term of dlogvar meets the NaN logvar, the KL term the NaN mean.
    dkl = torch.tensor([0.0, 0.0, 1.0], device=device)
    grads = torch.autograd.grad([z, kl], list(args.values()), [torch.ones_like(z), dkl])
    ref_args = {k: v.detach().requires_grad_(True) for k, v in args.items()}
    ref_z, ref_kl = reparameterize(**ref_args, seed=11, backend="reference")
    ref_grads = torch.autograd.grad([ref_z, ref_kl], list(ref_args.values()), [torch.ones_like(ref_z), dkl])
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3, equal_nan=True)
    dlogvar = grads[-1].chunk(2, dim=1)[1] if layout == "moments" else grads[-1]
    assert dlogvar[0, 1, 2, 3] == 0, "no gradient through the clamp at a NaN logvar"
    assert torch.isfinite(dlogvar).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "moments",
    [
        torch.empty(0, 8, 3, 3).to(memory_format=torch.channels_last),  # batch 0 with channels_last strides
        torch.empty(2, 4, 0, 3),  # a size-0 spatial dim
        torch.empty(2, 4, 3, 0).to(memory_format=torch.channels_last),
        torch.empty(2, 6, 0, 2, 3),  # a video latent with no frames
    ],
    ids=["N0-cl", "H0", "W0-cl", "T0-5d"],
)
@pytest.mark.parametrize("split", [False, True], ids=["moments", "mean-logvar"])
def test_empty_of_any_strides(backend, moments, split, device):
    """Every empty tensor is contiguous to torch whatever its strides: each such input gives empty z, a zero
    KL per sample and empty gradients, without a launch, on every backend."""
    moments = moments.to(device).requires_grad_(True)
    args = dict(zip(("mean", "logvar"), moments.chunk(2, dim=1))) if split else {"moments": moments}
    skip_unsupported(backend, "reparameterize", **args)
    z, kl = reparameterize(**args, seed=3, backend=backend)
    zshape = (moments.shape[0], moments.shape[1] // 2, *moments.shape[2:])
    assert z.shape == zshape and kl.shape == (moments.shape[0],)
    assert (kl == 0).all()
    (g,) = torch.autograd.grad(z.sum() + kl.sum(), moments)
    assert g.shape == moments.shape


def test_compile_varying_seed_and_offset_do_not_recompile(device):
    """A compiled training step that passes a new seed (or offset) each step, e.g. seed=step, compiles at most
    twice (once static, once with the int dynamic), forward and backward, and gives the eager numbers; an int
    seed specialized in the graph recompiled at every step and failed once past dynamo's recompile limit
    under fullgraph=True."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    moments = torch.randn(2, 6, 3, 4, device=device)

    def step(moments, seed, offset):
        z, kl = reparameterize(moments=moments, seed=seed, offset=offset, backend="reference")
        return (z * z).sum() + kl.sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for i in range(5):
        seed, offset = 100 + 7 * i, 3 * i
        leaf = moments.clone().requires_grad_(True)
        loss = compiled(leaf, seed, offset)
        (g,) = torch.autograd.grad(loss, leaf)
        leaf_e = moments.clone().requires_grad_(True)
        loss_e = step(leaf_e, seed, offset)
        (g_e,) = torch.autograd.grad(loss_e, leaf_e)
        torch.testing.assert_close(loss, loss_e)
        torch.testing.assert_close(g, g_e)
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 5 seeds"
