"""Fixtures the op tests share."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["default", "forced"])
def split_path(request, monkeypatch):
    """GroupNorm's fast backends as they are (`default`), or with every group on the split-reduction path in many
    L2 batches (`forced`: group ranges and images)."""
    if request.param == "forced":
        from genkernels.cuda import group_norm as cuda_gn
        from genkernels.triton import group_norm as triton_gn

        monkeypatch.setattr(triton_gn, "SINGLE_PASS_MAX_ELEMENTS", 64)
        monkeypatch.setattr(triton_gn, "L2_BATCH_BYTES", 2048)
        monkeypatch.setattr(cuda_gn, "L2_BUDGET_BYTES", 2048)
    return request.param
