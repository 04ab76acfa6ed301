"""The one comparison every test uses (shared/DESIGN.md, "Numerics and correctness").

With ref64 the reference computed in float64 on upcast inputs and ref the reference in the
input dtype:

    max|out - ref64| <= 2 * max|ref - ref64| + floor(dtype)

floor: 1e-5 (float32), 1e-3 (float16), 1e-2 (bfloat16), 1e-12 (float64).

Reductions over the batch and space (parameter gradients such as dweight, dbias) grow with
the number of terms: a sum of magnitude 100 has a float32 unit in the last place of 7.6e-6,
so an absolute 1e-5 floor would demand the exact summation order of the reference. For those,
``relative_floor=True`` scales the floor by max(1, max|ref64|): the same relative tolerance
the floor grants to values of order one.
"""

from __future__ import annotations

import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def assert_criterion(
    out: torch.Tensor, ref: torch.Tensor, ref64: torch.Tensor, name: str = "output", relative_floor: bool = False
) -> None:
    """Fail unless out is as close to ref64 as the same-dtype reference is (see module doc)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != reference {ref.dtype}"
    if out.numel() == 0:
        return
    out64, ref_64 = out.detach().double().cpu(), ref.detach().double().cpu()
    truth = ref64.detach().double().cpu()
    assert torch.isfinite(out64).all(), f"{name}: non-finite values where the reference has none"
    err = (out64 - truth).abs().max().item()
    floor = FLOOR[out.dtype] * (max(1.0, truth.abs().max().item()) if relative_floor else 1.0)
    bound = 2 * (ref_64 - truth).abs().max().item() + floor
    assert err <= bound, f"{name}: max|out - ref64| = {err:.3g} > bound {bound:.3g} (dtype {out.dtype})"
