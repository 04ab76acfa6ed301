"""The fused sampler step (schedule_step) and add_noise: every backend against the reference under the
DESIGN.md criterion, the in-kernel Philox noise (reproducibility, the documented stream, statistics),
errors, opcheck and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import genkernels
from genkernels._layout import is_channels_last
from genkernels.ops import schedule as S
from genkernels.ops.schedule import StepCoeffs, add_noise, philox_normal, schedule_step
from tests.criterion import assert_criterion
from tests.op_inputs import skip_unsupported, to_layout

FAST = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["reference", *FAST]
# The Triton interpreter mishandles bfloat16: bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _ddim(alpha: float, alpha_prev: float, eta: float, prediction: str) -> StepCoeffs:
    """Coefficients of a DDIM step (eta > 0: with noise) for one prediction type."""
    a, s = math.sqrt(alpha), math.sqrt(1 - alpha)
    var = eta**2 * (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
    direction = math.sqrt(1 - alpha_prev - var)
    px, po = {"epsilon": (1 / a, -s / a), "v_prediction": (a, -s), "sample": (0.0, 1.0)}[prediction]
    return StepCoeffs(px=px, po=po, ex=1 / s, e0=-a / s, c0=math.sqrt(alpha_prev), ce=direction, cn=math.sqrt(var))


# Coefficient sets shaped like the samplers': each prediction type (DDIM with noise), Euler in sigma
# space, DPM-Solver++ 2M (previous x0) and flow-matching Euler (velocity).
COEFFS = {
    "epsilon": _ddim(0.3, 0.6, 1.0, "epsilon"),
    "v_prediction": _ddim(0.3, 0.6, 0.5, "v_prediction"),
    "sample": _ddim(0.5, 0.8, 1.0, "sample"),
    "euler": StepCoeffs(px=1.0, po=-2.5, cx=0.6, c0=0.4, cn=0.3),
    "dpmpp_2m": StepCoeffs(px=1.0, po=-0.8, cx=0.7, c0=0.45, cp=-0.15),
    # flow: x0 = x - sigma v, prev = x + (sigma_next - sigma) v, sigma = 0.7, sigma_next = 0.5
    "flow": StepCoeffs(px=1.0, po=-0.7, cx=1 - 0.2 / 0.7, c0=0.2 / 0.7),
}
GUIDANCE = {"unguided": (None, 0.0), "guided": (4.5, 0.0), "rescaled": (7.5, 0.7)}


def _inputs(shape, dtype, device, guided, layout="contiguous", scale=1.0):
    """sample, model_output ((2B, *) when guided), noise and x0_prev, fresh random values."""
    b = shape[0]
    mo_shape = (2 * b,) + tuple(shape[1:]) if guided else shape

    def make(s):
        return to_layout((torch.randn(s, device=device) * scale).to(dtype), layout)

    return make(shape), make(mo_shape), make(shape), make(shape)


def _per_sample(coeffs: StepCoeffs, b: int, device, names) -> StepCoeffs:
    """coeffs with the named fields turned into float32 (B,) tensors of nearby per-sample values."""
    fields = {}
    for name in S.COEFF_NAMES:
        value = getattr(coeffs, name)
        if name in names:
            value = value * (1 + 0.2 * torch.rand(b, device=device)) + 0.05 * torch.randn(b, device=device)
        fields[name] = value
    return StepCoeffs(**fields)


def _upcast(coeffs: StepCoeffs) -> StepCoeffs:
    return StepCoeffs(
        **{n: (v.double() if isinstance(v, torch.Tensor) else v) for n, v in zip(S.COEFF_NAMES, coeffs.values())}
    )


def _skip_unsupported(backend, sample, model_output, noise, x0_prev, coeffs, guidance_scale, rescale, clip):
    if backend == "reference":
        return
    # A noising step without given noise draws it in the kernel: the calls under test pass a seed or a generator.
    seed = 0 if noise is None and coeffs.uses("cn") else None
    skip_unsupported(
        backend,
        "schedule_step",
        sample,
        model_output,
        coeffs,
        guidance_scale=guidance_scale,
        guidance_rescale=rescale,
        clip_sample=clip,
        noise=noise,
        x0_prev=x0_prev,
        seed=seed,
    )


def _compare(backend, sample, model_output, coeffs, **kwargs):
    """prev and x0 of `backend` against the reference (sample's dtype) and the float64 reference."""
    noise, x0_prev = kwargs.get("noise"), kwargs.get("x0_prev")
    _skip_unsupported(
        backend,
        sample,
        model_output,
        noise,
        x0_prev,
        coeffs,
        kwargs.get("guidance_scale"),
        kwargs.get("guidance_rescale", 0.0),
        kwargs.get("clip_sample"),
    )
    prev, x0 = schedule_step(sample, model_output, coeffs, return_x0=True, backend=backend, **kwargs)
    ref, ref_x0 = schedule_step(sample, model_output, coeffs, return_x0=True, backend="reference", **kwargs)
    up = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    mo64 = None if model_output is None else model_output.double()
    ref64, x064 = schedule_step(sample.double(), mo64, _upcast(coeffs), return_x0=True, backend="reference", **up)
    assert is_channels_last(prev) == is_channels_last(sample), "prev must keep sample's memory layout"
    assert is_channels_last(x0) == is_channels_last(sample), "x0 must keep sample's memory layout"
    assert_criterion(x0, ref_x0, x064, "x0")
    assert_criterion(prev, ref, ref64, "prev")
    return prev


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("guidance", list(GUIDANCE))
@pytest.mark.parametrize("kind", list(COEFFS))
def test_coefficient_sets(backend, kind, guidance, device):
    """Every sampler-shaped coefficient set, unguided, guided and with guidance rescale."""
    g, phi = GUIDANCE[guidance]
    sample, mo, noise, x0_prev = _inputs((2, 3, 5, 4), torch.float32, device, g is not None)
    _compare(backend, sample, mo, COEFFS[kind], guidance_scale=g, guidance_rescale=phi, noise=noise, x0_prev=x0_prev)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("guidance", list(GUIDANCE))
def test_dtypes(backend, dtype, guidance, device):
    """Half-precision inputs (math in float32), clipping, and every input term of the update."""
    g, phi = GUIDANCE[guidance]
    sample, mo, noise, x0_prev = _inputs((2, 4, 6, 3), dtype, device, g is not None)
    coeffs = StepCoeffs(px=1.3, po=-0.9, ex=1.2, e0=-0.6, cx=0.3, c0=0.7, ce=0.35, cn=0.2, cp=-0.1)
    _compare(
        backend,
        sample,
        mo,
        coeffs,
        guidance_scale=g,
        guidance_rescale=phi,
        clip_sample=1.0,
        noise=noise,
        x0_prev=x0_prev,
    )


# Odd sizes: N not a multiple of the vector or block, N = 1, 2-D and 5-D, a 1-D (B,) sample.
SHAPES = [(3, 5, 7, 3), (2, 1, 1, 1), (3, 37), (1, 2, 3, 5, 2), (5,), (2, 3, 17, 31)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_shapes_and_layouts(backend, shape, layout, device):
    sample, mo, noise, x0_prev = _inputs(shape, torch.float32, device, True, layout)
    coeffs = _per_sample(COEFFS["epsilon"], shape[0], device, ("px", "po", "cn"))
    _compare(backend, sample, mo, coeffs, guidance_scale=3.0, clip_sample=1.5, noise=noise, x0_prev=x0_prev)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_layouts(backend, device):
    """Inputs in other layouts than sample's are copied into sample's; prev keeps sample's layout."""
    sample, mo, noise, x0_prev = _inputs((2, 6, 3, 5), torch.float32, device, True)
    sample = to_layout(sample, "channels_last")
    noise = to_layout(noise, "strided")
    coeffs = COEFFS["dpmpp_2m"]
    _compare(backend, sample, mo, coeffs, guidance_scale=2.0, noise=noise, x0_prev=x0_prev)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend, device):
    """A float16 model output and float32 noise with a float32 sample (each read in its own dtype)."""
    sample, mo, noise, x0_prev = _inputs((2, 3, 4, 6), torch.float32, device, True)
    _compare(backend, sample, mo.half(), COEFFS["epsilon"], guidance_scale=3.0, noise=noise, x0_prev=x0_prev.half())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("names", [S.COEFF_NAMES, ("cx", "cn"), ("po", "e0", "cp")], ids=["all", "cx-cn", "po-e0-cp"])
def test_per_sample_coefficients(backend, names, device):
    """Coefficients as float32 (B,) tensors, each sample its own timestep."""
    sample, mo, noise, x0_prev = _inputs((4, 3, 5, 5), torch.float32, device, False)
    coeffs = _per_sample(
        StepCoeffs(px=1.1, po=-0.5, ex=0.9, e0=-0.4, cx=0.2, c0=0.6, ce=0.3, cn=0.2, cp=0.1), 4, device, names
    )
    _compare(backend, sample, mo, coeffs, clip_sample=2.0, noise=noise, x0_prev=x0_prev)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_magnitudes(backend, device):
    """fp16 values near 1e4 and rescale statistics of outputs with a large mean (no cancellation)."""
    sample, mo, noise, _ = _inputs((2, 4, 8, 8), torch.float16, device, True, scale=3000.0)
    mo = (mo.float() + 2000.0).half()
    coeffs = StepCoeffs(px=0.5, po=-0.25, cx=0.5, c0=0.5, cn=1.0)
    _compare(backend, sample, mo, coeffs, guidance_scale=1.5, guidance_rescale=0.5, noise=noise)


@pytest.fixture
def small_tiles(monkeypatch):
    """Triton: many programs per sample and many statistics chunks, each looping over tiles."""
    from genkernels.triton import schedule as triton_schedule

    monkeypatch.setattr(triton_schedule, "MAX_BLOCK", 16)
    monkeypatch.setattr(triton_schedule, "STATS_BLOCK", 16)
    monkeypatch.setattr(triton_schedule, "MAX_STATS_CHUNKS", 3)


@pytest.mark.parametrize("backend", FAST)
def test_many_tiles(backend, device, small_tiles):
    sample, mo, noise, x0_prev = _inputs((3, 5, 7, 4), torch.float32, device, True)
    coeffs = _per_sample(COEFFS["v_prediction"], 3, device, ("c0",))
    _compare(backend, sample, mo, coeffs, guidance_scale=5.0, guidance_rescale=0.9, noise=noise)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clipping_keeps_nan(backend, dtype, device):
    """A NaN model output stays NaN through clip_sample, as in torch.clamp (the reference, diffusers): the triton
    and cuda kernels clamped it to -clip_sample with min / max, so a diverged model gave finite, wrong images.
    +-inf still clamps to the bounds."""
    sample, mo, _, _ = _inputs((2, 3, 4, 4), dtype, device, False)
    mo[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    coeffs = StepCoeffs(px=1.0, po=-0.5, cx=0.3, c0=0.7)
    _skip_unsupported(backend, sample, mo, None, None, coeffs, None, 0.0, 1.0)
    runs = [
        schedule_step(x, out, coeffs, clip_sample=1.0, return_x0=True, backend=b)
        for x, out, b in ((sample, mo, backend), (sample, mo, "reference"), (sample.double(), mo.double(), "reference"))
    ]
    for k, name in enumerate(("prev", "x0")):
        got, ref, ref64 = (run[k] for run in runs)
        nan = ref64.isnan()
        assert nan.sum() == 1 and nan[0, 0, 0, 0], name
        assert torch.equal(got.isnan(), nan), name
        assert_criterion(*(t.masked_fill(nan, 0.0) for t in (got, ref, ref64)), name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_model_output(backend, device):
    """model_output=None: out = 0 (a pure forward-process update)."""
    sample, _, noise, _ = _inputs((2, 3, 4, 4), torch.float32, device, False)
    _compare(backend, sample, None, StepCoeffs(px=0.3, cx=0.8, c0=0.5, cn=0.6), noise=noise)


def test_reference_formula(device):
    """The reference against the formula written out in float64 (guidance, rescale, clip, update)."""
    sample, mo, noise, x0_prev = (t.double() for t in _inputs((2, 3, 4, 5), torch.float32, device, True))
    c = StepCoeffs(px=1.3, po=-0.9, ex=1.2, e0=-0.6, cx=0.3, c0=0.7, ce=0.35, cn=0.2, cp=-0.1)
    prev, x0 = schedule_step(
        sample,
        mo,
        c,
        guidance_scale=6.0,
        guidance_rescale=0.6,
        clip_sample=1.0,
        noise=noise,
        x0_prev=x0_prev,
        return_x0=True,
        backend="reference",
    )
    u, cond = mo[:2], mo[2:]
    out = u + 6.0 * (cond - u)
    std_c = torch.stack([cond[i].std() for i in range(2)]).view(2, 1, 1, 1)
    std_o = torch.stack([out[i].std() for i in range(2)]).view(2, 1, 1, 1)
    out = 0.6 * out * std_c / std_o + 0.4 * out
    want_x0 = (1.3 * sample - 0.9 * out).clamp(-1, 1)
    eps = 1.2 * sample - 0.6 * want_x0
    want = 0.3 * sample + 0.7 * want_x0 + 0.35 * eps + 0.2 * noise - 0.1 * x0_prev
    torch.testing.assert_close(x0, want_x0)
    torch.testing.assert_close(prev, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 3)], ids=str)
def test_empty(backend, shape, device, monkeypatch):
    """Empty inputs give empty results without a kernel launch."""
    from genkernels.triton import schedule as triton_schedule

    def launched(*args, **kwargs):
        raise AssertionError("an empty step must not launch a kernel")

    monkeypatch.setattr(triton_schedule, "schedule_step", launched)
    sample, mo, _, _ = _inputs(shape, torch.float32, device, True)
    prev, x0 = schedule_step(sample, mo, COEFFS["euler"], guidance_scale=2.0, seed=1, return_x0=True, backend=backend)
    assert prev.shape == sample.shape and x0.shape == sample.shape


# --------------------------------------------------------------------------- noise drawn in the op


def _noisy_step(backend, sample, **kwargs):
    """A step whose prev is exactly 0.5 x + 1.5 noise, so the noise is (prev - 0.5 x) / 1.5."""
    return schedule_step(sample, None, StepCoeffs(cx=0.5, cn=1.5), backend=backend, **kwargs)


def _implied_noise(prev, sample):
    return (prev.double() - 0.5 * sample.double()) / 1.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_reproducible(backend, device):
    sample = torch.randn(2, 3, 5, 7, device=device)
    _skip_unsupported(backend, sample, None, None, None, StepCoeffs(cn=1.0), None, 0.0, None)
    a = _noisy_step(backend, sample, seed=1234, offset=7)
    assert torch.equal(a, _noisy_step(backend, sample, seed=1234, offset=7))
    for other in (dict(seed=1234, offset=8), dict(seed=1235, offset=7)):
        b = _noisy_step(backend, sample, **other)
        assert (a - b).abs().min() > 0, f"{other}: the noise must differ everywhere"


# N = 45: Philox groups of four straddle samples (one Philox per element); N = 36: each program
# starts a group (one Philox per four elements).
PHILOX_SHAPES = [(3, 5, 3, 3), (2, 4, 3, 3)]


def _check_stream(backend, sample, seed, offset):
    _skip_unsupported(backend, sample, None, None, None, StepCoeffs(cn=1.0), None, 0.0, None)
    prev = _noisy_step(backend, sample, seed=seed, offset=offset)
    assert is_channels_last(prev) == is_channels_last(sample)
    flat = _implied_noise(prev, sample)
    if is_channels_last(sample):
        flat = flat.permute(0, 2, 3, 1)
    expected = philox_normal(seed, offset, sample.numel(), sample.device).double()
    torch.testing.assert_close(flat.reshape(-1), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed,offset", [(0, 0), (2**40 + 77, 2**33 + 5), (2**63 - 1, 123)], ids=str)
@pytest.mark.parametrize("shape", PHILOX_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_philox_stream(backend, seed, offset, shape, layout, device):
    """The in-op noise is the documented stream (philox_normal) in memory order, on every backend."""
    _check_stream(backend, to_layout(torch.randn(shape, device=device), layout), seed, offset)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", [(2, 4, 6, 6), (2, 3, 7, 5)], ids=str)
def test_philox_stream_many_tiles(backend, shape, device, small_tiles):
    _check_stream(backend, torch.randn(shape, device=device), 31337, 9)


def test_philox_known_answer():
    """Philox4x32-10 on the published known-answer vectors (Salmon et al., Random123 kat_vectors)."""
    zeros = [torch.tensor([0]) for _ in range(4)]
    assert [int(w) for w in S._philox4x32_10(zeros, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = [torch.tensor([0xFFFFFFFF]) for _ in range(4)]
    got = S._philox4x32_10(ones, 0xFFFFFFFF | (0xFFFFFFFF << 32))
    assert [int(w) for w in got] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = [torch.tensor([w]) for w in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    got = S._philox4x32_10(pi, 0xA4093822 | (0x299F31D0 << 32))
    assert [int(w) for w in got] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_statistics(backend, device):
    """In-op noise is standard normal: mean, variance, a Kolmogorov-Smirnov test, no correlation."""
    sample = torch.randn(4, 2048, device=device)
    _skip_unsupported(backend, sample, None, None, None, StepCoeffs(cn=1.0), None, 0.0, None)
    z = _implied_noise(_noisy_step(backend, sample, seed=2024, offset=11), sample).flatten().cpu()
    n = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 4 * math.sqrt(2 / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 4 / math.sqrt(n)
    z2 = _implied_noise(_noisy_step(backend, sample, seed=2024, offset=12), sample).flatten().cpu()
    assert abs(torch.corrcoef(torch.stack([z, z2]))[0, 1].item()) < 4 / math.sqrt(n), "offsets are separate streams"


@pytest.mark.parametrize("backend", BACKENDS)
def test_generator_reproducible(backend, device):
    """A generator in the same state gives the same noise; the generator advances between calls."""
    sample = torch.randn(2, 3, 4, 5, device=device)
    _skip_unsupported(backend, sample, None, None, None, StepCoeffs(cn=1.0), None, 0.0, None)
    gen = torch.Generator(device="cpu").manual_seed(99)
    a = _noisy_step(backend, sample, generator=gen)
    b = _noisy_step(backend, sample, generator=gen)
    again = _noisy_step(backend, sample, generator=torch.Generator(device="cpu").manual_seed(99))
    assert torch.equal(a, again)
    assert (a - b).abs().min() > 0
    z = _implied_noise(a, sample).flatten().cpu()
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_noise_wins(backend, device):
    sample, _, noise, _ = _inputs((2, 3, 4, 4), torch.float32, device, False)
    _skip_unsupported(backend, sample, None, noise, None, StepCoeffs(cn=1.0), None, 0.0, None)
    with_seed = _noisy_step(backend, sample, noise=noise, seed=5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_implied_noise(with_seed, sample), noise.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_generator(backend):
    """A CUDA generator's seed stays on the device (read by the kernel): reproducible, standard normal."""
    sample = torch.randn(4, 4096, device="cuda")
    _skip_unsupported(backend, sample, None, None, None, StepCoeffs(cn=1.0), None, 0.0, None)
    a = _noisy_step(backend, sample, generator=torch.Generator(device="cuda").manual_seed(3))
    b = _noisy_step(backend, sample, generator=torch.Generator(device="cuda").manual_seed(3))
    assert torch.equal(a, b)
    assert stats.kstest(_implied_noise(a, sample).flatten().cpu().numpy(), "norm").pvalue > 1e-3


@pytest.mark.gpu
def test_fast_backends_share_the_stream():
    """triton and cuda draw the same in-kernel noise for the same seed and offset."""
    sample = torch.randn(3, 4, 17, 9, device="cuda")
    outs = []
    for backend in ("triton", "cuda"):
        _skip_unsupported(backend, sample, None, None, None, StepCoeffs(cn=1.0), None, 0.0, None)
        outs.append(_noisy_step(backend, sample, seed=77, offset=4))
    torch.testing.assert_close(outs[0], outs[1], atol=3e-5, rtol=3e-5)


@pytest.mark.gpu
def test_cuda_graph_capture():
    """No host synchronization inside the op: it records into a CUDA graph and replays correctly."""
    for backend in ("triton", "cuda"):
        sample, mo, noise, _ = _inputs((2, 4, 32, 32), torch.float16, "cuda", True)
        coeffs = COEFFS["epsilon"]
        _skip_unsupported(backend, sample, mo, None, None, coeffs, 7.5, 0.7, None)
        kwargs = dict(guidance_scale=7.5, guidance_rescale=0.7, seed=1, offset=2, backend=backend)
        schedule_step(sample, mo, coeffs, **kwargs)  # compile / warm up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            prev = schedule_step(sample, mo, coeffs, **kwargs)
        sample.copy_(torch.randn_like(sample))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(prev, schedule_step(sample, mo, coeffs, **kwargs))


# --------------------------------------------------------------------------- add_noise


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_sample", [False, True])
def test_add_noise(backend, dtype, per_sample, device):
    x0, _, noise, _ = _inputs((3, 2, 5, 3), dtype, device, False)
    alpha, sigma = 0.8, 0.6
    if per_sample:
        alpha, sigma = torch.rand(3, device=device), torch.rand(3, device=device)
    _skip_unsupported(backend, x0, None, noise, None, StepCoeffs(cx=alpha, cn=sigma), None, 0.0, None)
    out = add_noise(x0, noise, alpha, sigma, backend=backend)
    ref = add_noise(x0, noise, alpha, sigma, backend="reference")
    a64 = alpha.double() if per_sample else alpha
    s64 = sigma.double() if per_sample else sigma
    ref64 = add_noise(x0.double(), noise.double(), a64, s64, backend="reference")
    assert_criterion(out, ref, ref64, "x_t")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_add_noise_gradients(backend, per_sample, device):
    x0, _, noise, _ = _inputs((3, 2, 4, 3), torch.float32, device, False)
    alpha, sigma = 0.7, 0.5
    if per_sample:
        alpha, sigma = torch.rand(3, device=device), torch.rand(3, device=device)
        alpha.requires_grad_(True)
    _skip_unsupported(backend, x0, None, noise, None, StepCoeffs(cx=alpha, cn=sigma), None, 0.0, None)
    leaves = [x0.requires_grad_(True), noise.requires_grad_(True)] + ([alpha] if per_sample else [])
    dy = torch.randn_like(x0)
    grads = torch.autograd.grad(add_noise(x0, noise, alpha, sigma, backend=backend), leaves, dy)
    view = (lambda c: c.view(-1, 1, 1, 1)) if per_sample else (lambda c: c)
    expected = torch.autograd.grad(view(alpha) * x0 + view(sigma) * noise, leaves, dy)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_add_noise_gradcheck():
    x0, noise = torch.randn(2, 3, 2, dtype=torch.float64), torch.randn(2, 3, 2, dtype=torch.float64)
    alpha, sigma = torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    args = [t.requires_grad_(True) for t in (x0, noise, alpha, sigma)]
    assert torch.autograd.gradcheck(lambda *a: add_noise(*a, backend="reference"), args)


def test_add_noise_errors():
    with pytest.raises(ValueError, match=r"sigma must be a float or a \(2,\) tensor"):
        add_noise(torch.randn(2, 3), torch.randn(2, 3), 0.5, torch.ones(3))
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 3\)"):
        add_noise(torch.randn(2, 3), torch.randn(2, 4), 0.5, 0.5)
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        add_noise(torch.randn(2, 3), None, 0.5, 0.5)


# --------------------------------------------------------------------------- errors


def _args(**overrides):
    x = torch.randn(2, 3, 4)
    args = dict(sample=x, model_output=torch.randn(2, 3, 4), coeffs=StepCoeffs(px=1.0, po=-0.5, c0=1.0))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(coeffs=StepCoeffs(po=1.0, cn=0.5)), ValueError, "no noise source was given"),
        (dict(coeffs=StepCoeffs(po=1.0, cn=torch.zeros(2))), ValueError, "no noise source was given"),
        (dict(coeffs=StepCoeffs(po=1.0, cp=0.5)), ValueError, "x0_prev is None"),
        (dict(guidance_scale=3.0), ValueError, r"model_output must have shape \(4, 3, 4\), got \(2, 3, 4\)"),
        (dict(model_output=torch.randn(2, 3, 5)), ValueError, r"model_output must have shape \(2, 3, 4\)"),
        (dict(noise=torch.randn(2, 3)), ValueError, r"noise must have shape \(2, 3, 4\), got \(2, 3\)"),
        (dict(x0_prev=torch.randn(3, 3, 4)), ValueError, r"x0_prev must have shape \(2, 3, 4\)"),
        (dict(noise=torch.randn(2, 3, 4, device="meta")), ValueError, "noise is on meta but sample is on cpu"),
        (dict(model_output=torch.ones(2, 3, 4, dtype=torch.int32)), TypeError, "model_output must be float32.*int32"),
        (dict(sample=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, "sample must be float32.*int64"),
        (dict(sample=torch.tensor(1.0)), ValueError, r"batch dimension \(B, \*\), got shape \(\)"),
        (dict(sample=[1.0]), TypeError, "sample must be a torch.Tensor, got list"),
        (dict(coeffs=(1.0, 2.0)), TypeError, "coeffs must be a genkernels.ops.schedule.StepCoeffs"),
        (dict(coeffs=StepCoeffs(po=torch.ones(3))), ValueError, r"coeffs.po must be a float or a \(2,\) tensor"),
        (dict(coeffs=StepCoeffs(po=torch.ones(2, dtype=torch.float16))), TypeError, "coeffs.po must be a float32"),
        (dict(coeffs=StepCoeffs(po=torch.ones(2, device="meta"))), ValueError, "coeffs.po is on meta"),
        (dict(coeffs=StepCoeffs(po="1")), TypeError, "coeffs.po must be a finite float, got '1'"),
        (dict(coeffs=StepCoeffs(po=math.nan)), TypeError, "coeffs.po must be a finite float"),
        (dict(model_output=None), ValueError, "model_output is None .* coeffs.po is not 0.0"),
        (dict(guidance_rescale=0.5), ValueError, "guidance_rescale=0.5 needs guidance"),
        (dict(guidance_rescale=-1.0), ValueError, "guidance_rescale must be >= 0.0"),
        (dict(clip_sample=0.0), ValueError, "clip_sample must be > 0.0"),
        (dict(coeffs=StepCoeffs(po=1.0, cn=1.0), seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*63\)"),
        (dict(coeffs=StepCoeffs(po=1.0, cn=1.0), seed=1.5), ValueError, "seed must be an int"),
        (dict(offset=-3), ValueError, r"offset must be an int in \[0, 2\*\*63\), got -3"),
        (dict(coeffs=StepCoeffs(po=1.0, cn=1.0), generator=7), TypeError, "generator must be a torch.Generator"),
        (dict(backend="fast"), ValueError, "backend must be one of"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input(overrides, error, match):
    args = _args(**overrides)
    with pytest.raises(error, match=match):
        schedule_step(args.pop("sample"), args.pop("model_output"), args.pop("coeffs"), **args)


def test_explicit_backend_refuses_float64():
    """An explicit fast backend never falls back silently; auto runs float64 on the reference."""
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(genkernels.UnsupportedError, match="sample has dtype torch.float64"):
        schedule_step(x, x, StepCoeffs(px=1.0, po=1.0, c0=1.0), backend="triton")
    schedule_step(x, x, StepCoeffs(px=1.0, po=1.0, c0=1.0))


@pytest.mark.parametrize("needs_grad", ["sample", "model_output", "x0_prev", "coeffs"])
def test_inputs_that_require_grad_run_on_the_reference(needs_grad, device):
    """Sampling through the step with gradients (DRaFT / DDPO-style fine-tuning backpropagates through
    scheduler.step): the fast kernels have no backward, and auto ran triton (on a GPU: cuda) with the output
    silently detached, so the step's share of every gradient was 0. Auto now takes the reference (torch's
    autograd) and an explicit fast backend says why it cannot run."""
    x, out, x0_prev = (torch.randn(shape, device=device) for shape in ((2, 3, 4, 4), (4, 3, 4, 4), (2, 3, 4, 4)))
    c0 = torch.tensor([0.3, 0.4], device=device)
    inputs = {"sample": x, "model_output": out, "x0_prev": x0_prev, "coeffs": c0}
    inputs[needs_grad].requires_grad_(True)
    coeffs = StepCoeffs(px=1.2, po=-0.7, cx=0.5, c0=c0, cp=-0.2)
    args = dict(guidance_scale=3.0, guidance_rescale=0.5, x0_prev=x0_prev)
    weight = torch.randn(2, 3, 4, 4, device=device)
    prev = schedule_step(x, out, coeffs, **args)
    (grad,) = torch.autograd.grad((prev * weight).sum(), inputs[needs_grad])
    ref = schedule_step(x, out, coeffs, backend="reference", **args)
    (expected,) = torch.autograd.grad((ref * weight).sum(), inputs[needs_grad])
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    with pytest.raises(genkernels.UnsupportedError, match=f"{needs_grad}.* requires grad"):
        schedule_step(x, out, coeffs, backend="triton", **args)
    with torch.no_grad():  # sampling as usual: the fast backend runs
        assert not schedule_step(x, out, coeffs, backend="triton", **args).requires_grad


# --------------------------------------------------------------------------- torch.library op and compile


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("case", ["noise", "seed", "per-sample"])
def test_opcheck(backend, case, device):
    sample, mo, noise, x0_prev = _inputs((2, 3, 4, 5), torch.float32, device, True)
    coeffs = StepCoeffs(px=1.2, po=-0.5, ex=0.9, e0=-0.3, c0=0.8, ce=0.2, cn=0.3, cp=0.1)
    if case == "per-sample":
        coeffs = _per_sample(coeffs, 2, device, ("po", "cn"))
    _skip_unsupported(backend, sample, mo, noise, x0_prev, coeffs, 4.0, 0.5, 1.0)
    tensors, values, slots = S._pack_coeffs(coeffs)
    explicit = noise if case != "seed" else None
    args = (
        sample,
        mo,
        explicit,
        x0_prev,
        tensors,
        values,
        slots,
        True,
        4.0,
        0.5,
        True,
        1.0,
        None,
        case == "seed",
        42,
        3,
        True,
        backend,
    )
    torch.library.opcheck(torch.ops.genkernels.schedule_step.default, args)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_compile_fullgraph(backend, device):
    """A guided, rescaled, clipped step with per-sample coefficients traces without graph breaks."""
    torch._dynamo.reset()
    sample, mo, noise, x0_prev = _inputs((2, 3, 4, 5), torch.float32, device, True, "channels_last")
    coeffs = _per_sample(COEFFS["epsilon"], 2, device, ("px", "cn"))
    _skip_unsupported(backend, sample, mo, noise, x0_prev, coeffs, 5.0, 0.7, 1.0)

    def step(sample, mo, noise, x0_prev, px, cn):
        c = StepCoeffs(px=px, po=coeffs.po, ex=coeffs.ex, e0=coeffs.e0, c0=coeffs.c0, ce=coeffs.ce, cn=cn, cp=0.25)
        with_noise = schedule_step(
            sample,
            mo,
            c,
            guidance_scale=5.0,
            guidance_rescale=0.7,
            clip_sample=1.0,
            noise=noise,
            x0_prev=x0_prev,
            return_x0=True,
            backend=backend,
        )
        seeded = schedule_step(sample, mo, c, guidance_scale=5.0, seed=7, offset=2, x0_prev=x0_prev, backend=backend)
        return with_noise, seeded

    args = (sample, mo, noise, x0_prev, coeffs.px, coeffs.cn)
    (prev, x0), seeded = step(*args)
    (cprev, cx0), cseeded = torch.compile(step, fullgraph=True)(*args)
    torch.testing.assert_close(cprev, prev)
    torch.testing.assert_close(cx0, x0)
    torch.testing.assert_close(cseeded, seeded)
    assert is_channels_last(cprev)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_varying_seed_and_offset_do_not_recompile(backend, device):
    """A compiled sampling loop that passes a new seed or offset each step (seed=step) compiles at most twice
    (once static, once with the ints dynamic) and gives the eager noise; ints in the op's schema were
    specialized in the graph, a compilation per value, and past dynamo's recompile limit an error under
    fullgraph=True."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    sample, _, _, _ = _inputs((2, 3, 4, 5), torch.float32, device, False)
    coeffs = StepCoeffs(cx=0.5, cn=1.0)
    _skip_unsupported(backend, sample, None, None, None, coeffs, None, 0.0, None)

    def step(sample, seed, offset):
        return schedule_step(sample, None, coeffs, seed=seed, offset=offset, backend=backend)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for i in range(5):
        seed, offset = 100 + 7 * i, 3 * i
        torch.testing.assert_close(compiled(sample, seed, offset), step(sample, seed, offset), rtol=0, atol=0)
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 5 seeds"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_add_noise(backend, device):
    """add_noise (training) traces without graph breaks, gradients included."""
    torch._dynamo.reset()
    x0, _, noise, _ = _inputs((3, 2, 4, 4), torch.float32, device, False)
    alpha, sigma = torch.rand(3, device=device), torch.rand(3, device=device)
    _skip_unsupported(backend, x0, None, noise, None, StepCoeffs(cx=alpha, cn=sigma), None, 0.0, None)
    x0.requires_grad_(True)
    fn = torch.compile(lambda x0, noise, a, s: add_noise(x0, noise, a, s, backend=backend), fullgraph=True)
    out = fn(x0, noise, alpha, sigma)
    (grad,) = torch.autograd.grad(out.square().sum(), x0)
    want = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(grad, 2 * want * alpha.view(-1, 1, 1, 1))
