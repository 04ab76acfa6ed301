"""The fused sampler step of diffusion schedulers: reference, validation, dispatch and torch.library op.

Every step of DDPM, DDIM, Euler (ancestral), DPM-Solver++ 2M and flow-matching Euler is, per
element and apart from guidance and clipping, linear in the sample x and the model output. With
per-sample coefficients (:class:`StepCoeffs`) computed on the host by the scheduler,

    out  = out_u + g * (out_c - out_u)            classifier-free guidance: model_output is the batched
                                                  [uncond; cond] (2B, *) tensor; unguided: out = model_output
    out  = phi * out * std(out_c) / std(out) + (1 - phi) * out
                                                  guidance rescale (phi > 0); std over all non-batch
                                                  elements of a sample, unbiased (N - 1), as torch's .std()
    x0   = px * x + po * out                      predicted clean sample
    x0   = clamp(x0, -clip, clip)                 when clip_sample is given
    eps  = ex * x + e0 * x0                       epsilon re-derived from the (clipped) x0
    prev = cx * x + c0 * x0 + ce * eps + cn * noise + cp * x0_prev

All arithmetic is float32 (float64 for float64 inputs on the reference). Noise is used iff cn is a
tensor or a nonzero float; x0_prev (DPM-Solver++ 2M's previous x0) iff cp is.

Noise sources, strongest first: an explicit ``noise`` tensor; a ``torch.Generator``; ``seed`` (with
``offset``). The fast backends draw noise in the kernel from the counter-based Philox stream below;
from a generator they first draw one int64 seed with ``torch.randint`` on the generator's device
(no synchronization: a CPU generator yields a host integer, a CUDA generator a one-element device
tensor that the kernel reads). The reference draws from a generator with ``torch.randn`` on it
(not the Philox stream), and for ``seed`` computes the same Philox stream as the kernels with
torch integer arithmetic (:func:`philox_normal`): every backend gives the same noise for the same
(seed, offset), up to float32 rounding of log, sin and cos, and the same numbers run to run.

Philox stream (csrc/include/genkernels/philox.cuh; the triton and cuda backends and the
reference draw it alike). Element e of the sample in memory order (its flat storage index,
0 <= e < B * N, for contiguous and channels_last tensors alike, so the two layouts give the
noise of a logical position from different elements of the stream) is lane e % 4 of group
q = e // 4. Group q runs Philox4x32-10 on the counter (lo32(q), hi32(q), lo32(offset),
hi32(offset)) with key (lo32(seed), hi32(seed)), giving words (r0, r1, r2, r3); with
u(r) = (2 * (r >> 9) + 1) / 2^24, lanes 0 and 1 are rho cos(theta), rho sin(theta) for
rho = sqrt(-2 ln u(r0)), theta = pi * (2 u(r1) - 1), and lanes 2 and 3 the same from (r2, r3).
Each offset is its own stream (it fills the high counter words): a sampler may pass its step
index as the offset. (This is not Triton's ``tl.randn`` stream, which keeps one normal per
Philox call with the offset added to the element index: four normals per call are cheaper in
the CUDA kernel, and both fast backends and the reference share one stream.)

Fused backend interface (genkernels.triton.schedule and genkernels.cuda.schedule implement it,
with exactly these arguments; the op module validates and normalizes everything first):

    not_supported(sample, model_output, noise, x0_prev, coeffs, guidance_scale, guidance_rescale,
                  clip_sample) -> str | None
    schedule_step(sample, model_output, noise, x0_prev, coeffs, guidance_scale, guidance_rescale,
                  clip_sample, seed, offset, return_x0) -> tuple[Tensor, Tensor | None]

- sample: (B, *) float32, float16 or bfloat16, dense: contiguous or channels_last (then N, the
  elements per sample, are addressed as one flat (B, N) view in memory order); numel > 0.
- model_output: None (out = 0; po is then 0.0), or (B, *) unguided, or (2B, *) = [uncond; cond]
  when guidance_scale is not None; same layout as sample; float32, float16 or bfloat16.
- noise, x0_prev: None or (B, *) in sample's layout, float32/float16/bfloat16. noise is passed
  only when it is used (cn nonzero) and given explicitly; x0_prev only when cp is nonzero.
- coeffs: a :class:`StepCoeffs` whose fields are Python floats or contiguous float32 (B,) tensors
  on sample's device.
- guidance_scale: float or None (unguided); guidance_rescale: float >= 0 (0: off, > 0 only when
  guided); clip_sample: float > 0 or None.
- seed: None (noise given or unused), a Python int in [0, 2^63), or a one-element int64 tensor on
  sample's device (read by the kernel: no host synchronization); offset: int >= 0.
- return_x0: also return the clipped x0.
- Returns (prev, x0 or None), each in sample's dtype, shape and layout. Reads every input element
  once (model_output twice with guidance rescale: a per-sample statistics pass first), writes prev
  (and x0) once, never synchronizes with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _autograd, _registry
from .._checks import is_finite_real, is_integer
from .._layout import dense_layout, is_channels_last, match_layout
from ..cuda import schedule as _cuda
from ..triton import schedule as _triton

OP = "schedule_step"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COEFF_NAMES = ("px", "po", "ex", "e0", "cx", "c0", "ce", "cn", "cp")
_SEED_LIMIT = 2**63


@dataclass(frozen=True)
class StepCoeffs:
    """Per-sample coefficients of the fused step (see the module docstring for the formula).

    Each is a Python float (the same for the whole batch: one timestep, the sampler case) or a
    float32 (B,) tensor on the sample's device (a timestep per sample, as in training).
    """

    px: float | Tensor = 0.0  # x0 = px * x + po * out
    po: float | Tensor = 0.0
    ex: float | Tensor = 0.0  # eps = ex * x + e0 * x0 (after clipping)
    e0: float | Tensor = 0.0
    cx: float | Tensor = 0.0  # prev = cx * x + c0 * x0 + ce * eps + cn * noise + cp * x0_prev
    c0: float | Tensor = 0.0
    ce: float | Tensor = 0.0
    cn: float | Tensor = 0.0
    cp: float | Tensor = 0.0

    def values(self) -> tuple:
        """The nine coefficients in the order of :data:`COEFF_NAMES`."""
        return tuple(getattr(self, name) for name in COEFF_NAMES)

    def uses(self, name: str) -> bool:
        """Whether coefficient ``name`` can be nonzero (a tensor, or a nonzero float)."""
        value = getattr(self, name)
        return isinstance(value, Tensor) or value != 0.0


# --------------------------------------------------------------------------- validation


def _check_tensor(name: str, t, sample: Tensor, shape: tuple) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != sample.device:
        raise ValueError(f"{name} is on {t.device} but sample is on {sample.device}: all tensors must be on one device")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _check_number(name: str, value, low: float | None = None, strict: bool = False) -> float:
    if not is_finite_real(value):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


def _check_coeffs(coeffs, sample: Tensor) -> StepCoeffs:
    """Validate coeffs; returns them with every float field a Python float."""
    if not isinstance(coeffs, StepCoeffs):
        raise TypeError(f"coeffs must be a genkernels.ops.schedule.StepCoeffs, got {type(coeffs).__name__}")
    b = sample.shape[0]
    fields = {}
    for name, value in zip(COEFF_NAMES, coeffs.values()):
        if isinstance(value, Tensor):
            if tuple(value.shape) != (b,):
                raise ValueError(
                    f"coeffs.{name} must be a float or a ({b},) tensor (one per sample), got shape {tuple(value.shape)}"
                )
            if value.device != sample.device:
                raise ValueError(f"coeffs.{name} is on {value.device} but sample is on {sample.device}")
            if value.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"coeffs.{name} must be a float32 tensor (float64: reference only), got {value.dtype}")
            fields[name] = value
        else:
            fields[name] = _check_number(f"coeffs.{name}", value)
    return StepCoeffs(**fields)


def _check(
    sample, model_output, coeffs, guidance_scale, guidance_rescale, clip_sample, noise, generator, seed, offset, x0_prev
) -> tuple[StepCoeffs, float | None, float, float | None, int | None, int]:
    """Raise a clear error naming the argument for anything the op does not accept.

    Returns the normalized (coeffs, guidance_scale, guidance_rescale, clip_sample, seed, offset), numbers as
    Python floats and ints."""
    if not isinstance(sample, Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    if sample.dim() < 1:
        raise ValueError(f"sample must have a batch dimension (B, *), got shape {tuple(sample.shape)}")
    if sample.dtype not in DTYPES:
        raise TypeError(f"sample must be float32, float16, bfloat16 or float64, got {sample.dtype}")
    shape = tuple(sample.shape)
    coeffs = _check_coeffs(coeffs, sample)
    if guidance_scale is not None:
        guidance_scale = _check_number("guidance_scale", guidance_scale)
    guidance_rescale = _check_number("guidance_rescale", guidance_rescale, 0.0)
    if guidance_rescale > 0 and guidance_scale is None:
        raise ValueError(f"guidance_rescale={guidance_rescale} needs guidance (guidance_scale is None)")
    if clip_sample is not None:
        clip_sample = _check_number("clip_sample", clip_sample, 0.0, strict=True)
    if model_output is None:
        if guidance_scale is not None:
            raise ValueError("guidance_scale is set but model_output is None")
        if coeffs.uses("po"):
            raise ValueError("model_output is None (out = 0) but coeffs.po is not 0.0")
    elif guidance_scale is not None:
        _check_tensor("model_output", model_output, sample, (2 * shape[0],) + shape[1:])
    else:
        _check_tensor("model_output", model_output, sample, shape)
    if noise is not None:
        _check_tensor("noise", noise, sample, shape)
    if x0_prev is not None:
        _check_tensor("x0_prev", x0_prev, sample, shape)
    elif coeffs.uses("cp"):
        raise ValueError("coeffs.cp is nonzero (a multistep update) but x0_prev is None: pass the previous x0")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if seed is not None:
        if not is_integer(seed) or not 0 <= seed < _SEED_LIMIT:
            raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
        seed = int(seed)
    if not is_integer(offset) or not 0 <= offset < _SEED_LIMIT:
        raise ValueError(f"offset must be an int in [0, 2**63), got {offset!r}")
    offset = int(offset)
    if coeffs.uses("cn") and noise is None and generator is None and seed is None:
        raise ValueError(
            "coeffs.cn is nonzero (the step adds noise) but no noise source was given: pass noise=, generator= or seed="
        )
    return coeffs, guidance_scale, guidance_rescale, clip_sample, seed, offset


def _fast_not_supported(sample, model_output, noise, x0_prev, coeffs) -> str | None:
    """Reasons shared by the triton and cuda backends (their own checks follow)."""
    for name, t in (("sample", sample), ("model_output", model_output), ("noise", noise), ("x0_prev", x0_prev)):
        if t is not None and t.dtype not in FAST_DTYPES:
            return f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16"
    for name, value in zip(COEFF_NAMES, coeffs.values()):
        if isinstance(value, Tensor) and value.dtype != torch.float32:
            return f"coeffs.{name} has dtype {value.dtype}; supported: float32"
    if torch.is_grad_enabled():
        # The kernels have no backward: their output would be silently detached from the graph.
        named = (("sample", sample), ("model_output", model_output), ("noise", noise), ("x0_prev", x0_prev))
        named += tuple((f"coeffs.{n}", v) for n, v in zip(COEFF_NAMES, coeffs.values()) if isinstance(v, Tensor))
        for name, t in named:
            if t is not None and t.requires_grad:
                return f"{name} requires grad and the fused step has no backward (the reference differentiates)"
    return None


# --------------------------------------------------------------------------- reference


_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _philox4x32_10(c: list[Tensor], seed: int) -> list[Tensor]:
    """Philox4x32-10 on int64 tensors holding 32-bit words (products wrap modulo 2^64, as in C)."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1, c2, c3 = c
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        p0, p1 = _PHILOX_M[0] * c0, _PHILOX_M[1] * c2
        c0, c1, c2, c3 = ((p1 >> 32) & _MASK32) ^ c1 ^ k0, p1 & _MASK32, ((p0 >> 32) & _MASK32) ^ c3 ^ k1, p0 & _MASK32
    return [c0, c1, c2, c3]


def philox_normal(seed: int, offset: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """The first ``numel`` standard normals (float32) of the in-kernel stream keyed by (seed, offset).

    The stream of the module docstring (csrc/include/genkernels/philox.cuh), computed with torch
    integer arithmetic: element e is lane e % 4 of Philox4x32-10 on counter (lo32(e // 4),
    hi32(e // 4), lo32(offset), hi32(offset)), key (lo32(seed), hi32(seed)), through Box-Muller.
    The kernels' values agree to float32 rounding of the logarithm, sine and cosine.
    """
    e = torch.arange(numel, device=device, dtype=torch.int64)
    q = e >> 2
    words = [
        q & _MASK32,
        (q >> 32) & _MASK32,
        torch.full_like(q, offset & _MASK32),
        torch.full_like(q, (offset >> 32) & _MASK32),
    ]
    r0, r1, r2, r3 = _philox4x32_10(words, seed)
    high_pair = (e & 2) != 0
    ra, rb = torch.where(high_pair, r2, r0), torch.where(high_pair, r3, r1)

    def uniform(r: Tensor) -> Tensor:
        return ((r >> 9) * 2 + 1).to(torch.float32) * (1.0 / 16777216.0)

    rho = torch.sqrt(-2.0 * torch.log(uniform(ra)))
    theta = 3.14159265358979 * (2.0 * uniform(rb) - 1.0)
    return torch.where((e & 1) != 0, rho * torch.sin(theta), rho * torch.cos(theta))


def _in_memory_order(flat: Tensor, like: Tensor) -> Tensor:
    """flat (numel,) laid out in ``like``'s memory order, as a tensor of like's shape and layout."""
    if like.dim() >= 3 and is_channels_last(like):
        shape = (like.shape[0], *like.shape[2:], like.shape[1])
        return flat.view(shape).permute(0, like.dim() - 1, *range(1, like.dim() - 1))
    return flat.view(like.shape)


def _reference_noise(sample: Tensor, seed: int, offset: int) -> Tensor:
    """The in-kernel Philox noise for sample (in its memory order), computed with torch."""
    return _in_memory_order(philox_normal(seed, offset, sample.numel(), sample.device), sample)


def _per_sample(c, like: Tensor):
    """A coefficient broadcastable against (B, *): floats as they are, (B,) tensors as (B, 1, ...)."""
    if isinstance(c, Tensor):
        return c.to(like.dtype).view((-1,) + (1,) * (like.dim() - 1))
    return c


def _reference_step(
    sample, model_output, noise, x0_prev, coeffs, guidance_scale, guidance_rescale, clip_sample, seed, offset, return_x0
):
    """The formulas in eager PyTorch (float32, float64 for float64 samples), behind the backend interface.

    seed (when noise is None and cn is used): an int or a one-element tensor (read on the host).
    """
    acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
    x = sample.to(acc)
    px, po, ex, e0, cx, c0, ce, cn, cp = (_per_sample(c, x) for c in coeffs.values())
    if model_output is None:
        x0 = px * x
    else:
        out = model_output.to(acc)
        if guidance_scale is not None:
            out_u, out_c = out.chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
            if guidance_rescale > 0:
                dims = tuple(range(1, x.dim()))
                std_c = out_c.std(dim=dims, keepdim=True)  # unbiased, as diffusers' rescale_noise_cfg
                std_o = out.std(dim=dims, keepdim=True)
                out = guidance_rescale * out * (std_c / std_o) + (1 - guidance_rescale) * out
        x0 = px * x + po * out
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    eps = ex * x + e0 * x0
    prev = cx * x + c0 * x0 + ce * eps
    if coeffs.uses("cn"):
        if noise is None:
            noise = _reference_noise(sample, int(seed), offset)
        prev = prev + cn * noise.to(acc)
    if coeffs.uses("cp"):
        prev = prev + cp * x0_prev.to(acc)
    prev = match_layout(prev.to(sample.dtype), sample)
    return prev, (match_layout(x0.to(sample.dtype), sample) if return_x0 else None)


class _ReferenceKernels:
    """The reference formulas behind the same interface as the fast backends."""

    schedule_step = staticmethod(_reference_step)


# --------------------------------------------------------------------------- registry


def _wrap(backend_not_supported):
    """A not_supported taking schedule_step's public arguments (as `genkernels.explain` passes them):
    shared reasons first, then the backend's (over the backend interface's arguments)."""

    def not_supported(
        sample,
        model_output,
        coeffs,
        *,
        guidance_scale=None,
        guidance_rescale=0.0,
        clip_sample=None,
        noise=None,
        x0_prev=None,
        **_noise_source,
    ) -> str | None:
        reason = _fast_not_supported(sample, model_output, noise, x0_prev, coeffs)
        if reason is not None:
            return reason
        return backend_not_supported(
            sample, model_output, noise, x0_prev, coeffs, guidance_scale, guidance_rescale, clip_sample
        )

    return not_supported


_registry.register(OP, "cuda", _wrap(_cuda.not_supported), _cuda)
_registry.register(OP, "triton", _wrap(_triton.not_supported), _triton)
_registry.register(OP, "reference", lambda *a, **k: None, _ReferenceKernels)


def _probe(device: torch.device) -> tuple:
    """Arguments of a typical call (a DDIM step on an SD latent), for `genkernels.info()`."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.randn(1, 4, 64, 64, device=device, dtype=dtype)
    out = torch.randn(1, 4, 64, 64, device=device, dtype=dtype)
    coeffs = StepCoeffs(px=1.2, po=-0.6, ex=1.5, e0=-1.8, c0=0.9, ce=0.4)
    return (x, out, coeffs)


_registry.register_probe(OP, _probe)


# --------------------------------------------------------------------------- layouts and noise


def _normalize(sample, model_output, noise, x0_prev):
    """sample in a dense layout, every other tensor in the same one (each copied at most once)."""
    sample = dense_layout(sample)
    if sample.dim() >= 3 and is_channels_last(sample):
        return (sample, *(t if t is None else match_layout(t, sample) for t in (model_output, noise, x0_prev)))
    return (sample, *(t if t is None else t.contiguous() for t in (model_output, noise, x0_prev)))


def _fast_coeffs(coeffs: StepCoeffs) -> StepCoeffs:
    return StepCoeffs(
        **{n: v.contiguous() if isinstance(v, Tensor) else v for n, v in zip(COEFF_NAMES, coeffs.values())}
    )


def _seed_from_generator(generator: torch.Generator, sample: Tensor) -> int | Tensor:
    """One int64 seed drawn from the generator: a host int (CPU generator) or a device tensor (no sync)."""
    drawn = torch.randint(0, _SEED_LIMIT - 1, (1,), generator=generator, device=generator.device, dtype=torch.int64)
    if drawn.device.type == "cpu":
        return int(drawn)
    return drawn.to(sample.device)


# --------------------------------------------------------------------------- dispatch


def _select(
    backend: str | None, sample, model_output, noise, x0_prev, coeffs, guidance_scale, guidance_rescale, clip_sample
) -> _registry.Backend:
    """The backend that runs this step: for empty inputs the reference, without a launch, once an explicit
    backend has said it can run the call."""
    args = (OP, sample, model_output, coeffs)
    options = {
        "guidance_scale": guidance_scale,
        "guidance_rescale": guidance_rescale,
        "clip_sample": clip_sample,
        "noise": noise,
        "x0_prev": x0_prev,
        "backend": backend,
    }
    if sample.numel() == 0:
        _registry.check_explicit(*args, **options)
        return _registry.backends_of(OP)[-1]
    return _registry.select(*args, **options)


# --------------------------------------------------------------------------- torch.library op (traced path)


def _pack_coeffs(coeffs: StepCoeffs) -> tuple[list[Tensor], list[float], list[int]]:
    """Coefficients as (tensors, floats, slots): slot k is the index of coefficient k in tensors, or -1."""
    tensors, values, slots = [], [], []
    for value in coeffs.values():
        if isinstance(value, Tensor):
            slots.append(len(tensors))
            tensors.append(value)
            values.append(0.0)
        else:
            slots.append(-1)
            values.append(value)
    return tensors, values, slots


def _unpack_coeffs(tensors, values, slots) -> StepCoeffs:
    return StepCoeffs(**{n: (tensors[s] if s >= 0 else v) for n, v, s in zip(COEFF_NAMES, values, slots)})


# Explicit schema: torch 2.4 cannot infer it from postponed (string) annotations. Optional floats
# travel as (value, flag) pairs; x0 is an empty tensor when not asked for (ops cannot return None). seed and
# offset are SymInts: a compiled loop passing seed=step would recompile at every value of an int.
@torch.library.custom_op(
    "genkernels::schedule_step",
    mutates_args=(),
    schema="(Tensor sample, Tensor? model_output, Tensor? noise, Tensor? x0_prev, Tensor[] coeff_tensors,"
    " float[] coeff_values, int[] coeff_slots, bool guided, float guidance_scale, float guidance_rescale,"
    " bool clip, float clip_sample, Tensor? seed_tensor, bool has_seed, SymInt seed, SymInt offset, bool return_x0,"
    " str backend) -> (Tensor, Tensor)",
)
def _schedule_step_op(
    sample: Tensor,
    model_output: Tensor | None,
    noise: Tensor | None,
    x0_prev: Tensor | None,
    coeff_tensors: list[Tensor],
    coeff_values: list[float],
    coeff_slots: list[int],
    guided: bool,
    guidance_scale: float,
    guidance_rescale: float,
    clip: bool,
    clip_sample: float,
    seed_tensor: Tensor | None,
    has_seed: bool,
    seed: int,
    offset: int,
    return_x0: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    coeffs = _unpack_coeffs(coeff_tensors, coeff_values, coeff_slots)
    g = guidance_scale if guided else None
    c = clip_sample if clip else None
    sample, model_output, noise, x0_prev = _normalize(sample, model_output, noise, x0_prev)
    impl = _select(backend or None, sample, model_output, noise, x0_prev, coeffs, g, guidance_rescale, c).impl
    if impl is not _ReferenceKernels:
        coeffs = _fast_coeffs(coeffs)
    chosen_seed = None
    if noise is None and coeffs.uses("cn"):
        chosen_seed = seed_tensor if seed_tensor is not None else (seed if has_seed else None)
    prev, x0 = impl.schedule_step(
        sample, model_output, noise, x0_prev, coeffs, g, guidance_rescale, c, chosen_seed, offset, return_x0
    )
    return prev, (x0 if x0 is not None else sample.new_empty((0,)))


@_schedule_step_op.register_fake
def _(
    sample,
    model_output,
    noise,
    x0_prev,
    coeff_tensors,
    coeff_values,
    coeff_slots,
    guided,
    guidance_scale,
    guidance_rescale,
    clip,
    clip_sample,
    seed_tensor,
    has_seed,
    seed,
    offset,
    return_x0,
    backend,
):
    sample = dense_layout(sample)
    return torch.empty_like(sample), (torch.empty_like(sample) if return_x0 else sample.new_empty((0,)))


# --------------------------------------------------------------------------- public ops


def _run_eager(chosen, sample, model_output, noise, x0_prev, coeffs, step_args, generator, seed, offset, return_x0):
    """Run the chosen backend on normalized inputs, turning the noise source into what it takes."""
    step_seed = None
    if noise is None and coeffs.uses("cn"):
        if generator is not None and chosen.name == "reference":
            noise = torch.randn(sample.shape, generator=generator, device=generator.device, dtype=torch.float32)
            noise = noise.to(sample.device)
        elif generator is not None:
            step_seed = _seed_from_generator(generator, sample)
        else:
            step_seed = seed
    if chosen.name != "reference":
        coeffs = _fast_coeffs(coeffs)
    return chosen.impl.schedule_step(
        sample, model_output, noise, x0_prev, coeffs, *step_args, step_seed, offset, return_x0
    )


def _traced(
    sample,
    model_output,
    coeffs,
    guidance_scale,
    guidance_rescale,
    clip_sample,
    noise,
    generator,
    seed,
    offset,
    x0_prev,
    return_x0,
    backend,
):
    seed_tensor = None
    if noise is None and generator is not None and coeffs.uses("cn"):
        seed_tensor = torch.randint(
            0, _SEED_LIMIT - 1, (1,), generator=generator, device=generator.device, dtype=torch.int64
        ).to(sample.device)
    tensors, values, slots = _pack_coeffs(coeffs)
    return _schedule_step_op(
        sample,
        model_output,
        noise if coeffs.uses("cn") else None,
        x0_prev if coeffs.uses("cp") else None,
        tensors,
        values,
        slots,
        guidance_scale is not None,
        0.0 if guidance_scale is None else guidance_scale,
        guidance_rescale,
        clip_sample is not None,
        0.0 if clip_sample is None else clip_sample,
        seed_tensor,
        seed is not None,
        0 if seed is None else seed,
        offset,
        return_x0,
        backend or "",
    )


def schedule_step(
    sample: Tensor,
    model_output: Tensor | None,
    coeffs: StepCoeffs,
    *,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_sample: float | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    offset: int = 0,
    x0_prev: Tensor | None = None,
    return_x0: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """One fused sampler step: guidance, x0 prediction, clipping, epsilon and the update, in one pass.

        out  = out_u + g (out_c - out_u)   (guided; else out = model_output; None: out = 0)
        out  = phi * out * std(out_c) / std(out) + (1 - phi) * out     (phi = guidance_rescale > 0)
        x0   = clamp(px x + po out, -clip, clip)
        eps  = ex x + e0 x0
        prev = cx x + c0 x0 + ce eps + cn noise + cp x0_prev

    Args:
        sample: x, (B, *) float32, float16 or bfloat16 (float64: reference only). Contiguous and
            channels_last inputs run in place; other strides are copied once to contiguous.
        model_output: (B, *), or (2B, *) = [uncond; cond] along dim 0 when guidance_scale is not
            None, or None (out = 0; coeffs.po must then be 0). Any supported float dtype; other
            layouts than sample's are copied once into sample's.
        coeffs: :class:`StepCoeffs`, each a float or a float32 (B,) tensor on sample's device.
        guidance_scale: g, or None when model_output is not guided.
        guidance_rescale: phi in the rescale above (0: off); std is torch's unbiased std over all
            non-batch elements of a sample, as diffusers' ``rescale_noise_cfg``.
        clip_sample: clamp x0 to [-clip_sample, clip_sample], or None.
        noise: explicit (B, *) noise; wins over generator and seed. Needed (one of the three) iff
            coeffs.cn is a tensor or nonzero.
        generator: torch.Generator: the reference draws the noise with it; the fast backends draw
            one int64 seed with it (on its device, no host synchronization) for in-kernel Philox.
        seed, offset: key and stream of the in-kernel Philox noise (see the module docstring;
            the reference computes the same stream). Same seed and offset, same noise, run to run.
        x0_prev: (B, *) the previous step's x0 (DPM-Solver++ 2M); required iff coeffs.cp is used.
        return_x0: also return the clipped x0.
        backend: "auto" / None, "reference", "triton" or "cuda" (an explicit backend that cannot
            run the call raises UnsupportedError).

    Returns prev, or (prev, x0) with return_x0, in sample's dtype, shape and layout. All math in
    float32. The fused kernels have no backward: with grad enabled and an input (or a tensor
    coefficient) that requires grad, auto runs the reference, which torch's autograd differentiates
    (sampling with gradients, as fine-tuning through the sampler does), and an explicit fast backend
    raises UnsupportedError. See :func:`add_noise` for the training-side op.

    Under torch.compile the call goes through the ``genkernels::schedule_step`` op. Pass seed and
    offset (or noise) there: dynamo cannot trace a torch.Generator argument, so with fullgraph=True
    a generator is an error, and without it the seed draw is a graph break; the drawn seed then
    reaches every backend as a tensor (the reference reads it on the host, computing the Philox
    stream instead of drawing from the generator, a synchronization for a CUDA generator).
    """
    coeffs, guidance_scale, guidance_rescale, clip_sample, seed, offset = _check(
        sample,
        model_output,
        coeffs,
        guidance_scale,
        guidance_rescale,
        clip_sample,
        noise,
        generator,
        seed,
        offset,
        x0_prev,
    )
    if torch.compiler.is_compiling():
        prev, x0 = _traced(
            sample,
            model_output,
            coeffs,
            guidance_scale,
            guidance_rescale,
            clip_sample,
            noise,
            generator,
            seed,
            offset,
            x0_prev,
            return_x0,
            backend,
        )
        return (prev, x0) if return_x0 else prev
    # Inputs whose coefficient is zero are never read; the others are put in sample's layout once.
    noise = noise if coeffs.uses("cn") else None
    x0_prev = x0_prev if coeffs.uses("cp") else None
    sample, model_output, noise, x0_prev = _normalize(sample, model_output, noise, x0_prev)
    step_args = (guidance_scale, guidance_rescale, clip_sample)
    chosen = _select(backend, sample, model_output, noise, x0_prev, coeffs, *step_args)
    prev, x0 = _run_eager(
        chosen, sample, model_output, noise, x0_prev, coeffs, step_args, generator, seed, offset, return_x0
    )
    return (prev, x0) if return_x0 else prev


def schedule_step_reference(
    sample: Tensor,
    model_output: Tensor | None,
    coeffs: StepCoeffs,
    **kwargs,
) -> Tensor | tuple[Tensor, Tensor]:
    """The specification: :func:`schedule_step` on the reference backend (same arguments, no ``backend``)."""
    return schedule_step(sample, model_output, coeffs, backend="reference", **kwargs)


class _AddNoiseFunction(torch.autograd.Function):
    """alpha * x0 + sigma * noise through the fused step; gradients alpha * g, sigma * g (and, for
    tensor alpha / sigma that require them, the per-sample sums of g * x0, g * noise)."""

    @staticmethod
    def forward(ctx, x0, noise, alpha, sigma, backend):
        tensor_args = [t if isinstance(t, Tensor) else None for t in (x0, noise, alpha, sigma)]
        ctx.save_for_backward(*tensor_args)
        ctx.scalars = (alpha, sigma)
        coeffs = StepCoeffs(cx=alpha, cn=sigma)
        return schedule_step(x0, None, coeffs, noise=noise, backend=backend)

    @staticmethod
    def backward(ctx, grad):
        x0, noise, alpha_t, sigma_t = ctx.saved_tensors
        alpha = alpha_t if alpha_t is not None else ctx.scalars[0]
        sigma = sigma_t if sigma_t is not None else ctx.scalars[1]
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        g = grad.to(acc)
        dims = tuple(range(1, g.dim()))
        needs = ctx.needs_input_grad
        dx0 = (_per_sample(alpha, g) * g).to(x0.dtype) if needs[0] else None
        dnoise = (_per_sample(sigma, g) * g).to(noise.dtype) if needs[1] else None
        dalpha = (g * x0.to(acc)).sum(dims).to(alpha_t.dtype) if needs[2] else None
        dsigma = (g * noise.to(acc)).sum(dims).to(sigma_t.dtype) if needs[3] else None
        return dx0, dnoise, dalpha, dsigma, None


def add_noise(
    x0: Tensor,
    noise: Tensor,
    alpha: float | Tensor,
    sigma: float | Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """The forward process q(x_t | x_0): x_t = alpha * x0 + sigma * noise, in one pass.

    x0, noise: (B, *) float32, float16 or bfloat16 (float64: reference only), on one device;
    alpha, sigma: floats, or float32 (B,) tensors (a timestep per sample). Returns x_t in x0's
    dtype and layout, computed in float32. Differentiable in x0 and noise (and in tensor alpha,
    sigma); the forward runs the fused step (cx = alpha, cn = sigma), the backward is two scalings.
    """
    if not isinstance(noise, Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    # Validation (shapes, devices, dtypes of alpha and sigma) is the step's, with the names of this op.
    try:
        coeffs = _check(x0, None, StepCoeffs(cx=alpha, cn=sigma), None, 0.0, None, noise, None, None, 0, None)[0]
    except (TypeError, ValueError) as error:
        message = str(error).replace("coeffs.cx", "alpha").replace("coeffs.cn", "sigma").replace("sample", "x0")
        raise type(error)(message) from None
    alpha, sigma = coeffs.cx, coeffs.cn
    return _autograd.apply(_AddNoiseFunction, x0, noise, alpha, sigma, backend)


__all__ = ["COEFF_NAMES", "StepCoeffs", "add_noise", "philox_normal", "schedule_step", "schedule_step_reference"]


_registry.register_check(OP, schedule_step, _check)
