"""Helpers the flow tests (tests/nn/test_flow.py, tests/models/test_flow.py) share: random parameters,
and log-determinants from autograd Jacobians to check the layers' own against."""

from __future__ import annotations

import torch


def perturb(module: torch.nn.Module, size: float) -> torch.nn.Module:
    """module with N(0, size^2) noise added to every parameter, in place (zero-initialized layers and
    priors would otherwise make the coupling's scale and shift constant and hide their paths)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(size * torch.randn_like(p))
    return module


def jacobian_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log |det d fn(x_n) / d x_n| per sample n (float64), from the full autograd Jacobian."""
    out = []
    for xn in x.split(1):
        jac = torch.autograd.functional.jacobian(lambda v: fn(v).flatten(), xn).reshape(xn.numel(), xn.numel())
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)
