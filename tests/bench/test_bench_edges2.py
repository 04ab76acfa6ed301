"""The benchmark suite's figures: floors and ceilings taken from the run they report on."""

from __future__ import annotations

import pytest
import torch

from genkernels.bench import core, modconv


def test_modconv_floor_takes_the_runs_copy_rate():
    """modconv's summary floor (conv FLOPs at the matmul rate + the epilogue's bytes at the copy rate) takes the
    copy rate the run measured for its ceiling (the record's copy_gbs, the figure every GB/s in the report is a
    fraction of); the op measured a second one of its own, with a shorter timing, and used that."""
    case = modconv.cases(quick=True)[0]
    rec = core.record_of(case)
    rec.floor_ms = core.floor_ms(case.work, case.unit, 700.0)
    rec.copy_gbs = 4000.0
    rec.params["measured"] = {"copy_gbs": 3000.0}  # a figure other than the run's: not the one to use
    want = case.work / 700e12 * 1e3 + case.epilogue_bytes / 4000e9 * 1e3
    assert modconv.floor_ms(rec) == pytest.approx(want)
    rec.copy_gbs = None  # not measured (no GPU): no floor
    assert modconv.floor_ms(rec) is None


def test_group_norm_forward_backward_counts_the_backwards_read_of_x():
    """GroupNorm + SiLU forward + backward: the forward reads x and writes y, the backward reads dy and x again
    (it needs the normalized x and the pre-activation) and writes dx: 5 tensors of x's size, as the other ops
    count their backward's re-reads (adaln, reparam). The count was 4 (x once), a floor 20% under what must move
    and a rate 20% low."""
    from genkernels.bench import group_norm

    case = group_norm.GroupNormCase("VAE decoder", (1, 128, 512, 512), "NCHW", torch.bfloat16, "fwd+bwd")
    assert case.work == 5 * 128 * 512 * 512 * 2
    assert "5 tensors" in case.rate_note and "x read again" in case.rate_note
    fwd = group_norm.GroupNormCase("VAE decoder", (1, 128, 512, 512), "NCHW", torch.bfloat16, "fwd")
    assert fwd.work == 2 * 128 * 512 * 512 * 2
