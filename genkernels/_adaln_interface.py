"""The fused adaLN backend interface over a backend's two launches (shared by genkernels.triton.adaln and
genkernels.cuda.adaln).

The interface (six functions; tensors, dtypes and what each returns are described in the docstring of
:mod:`genkernels.ops.adaln`) maps onto one forward and one backward launch that every backend provides:

    forward(x, res, gate, weight, bias, shift, scale, tokens, eps, rms, norm, stats=True) -> (h, out, mean, rstd)
        res, gate: the gated residual's y and gate (res None: no residual, h is None; gate None with a res:
        h = x + y); res may have another dtype than x (h is in x's dtype, dres in res's); norm: normalize and
        modulate (else out, mean and rstd are None); stats: with norm, also write mean and rstd (else they are
        None: a forward no backward follows neither allocates nor writes them). x and res read once; h and out
        written once.
    backward(v, dout, dh, res, gate, weight, bias, shift, scale, mean, rstd, tokens, rms, norm, needs)
        -> (dx, dres, dgate, dweight, dbias, dshift, dscale)
        v: the normalized rows (x, or the fused op's h; None without norm); dout: the gradient of the
        norm's output (of the residual's out without norm); needs: seven booleans in the order of the
        results. A gradient of an absent input is None whatever needs asks; so is a per-token dshift
        (it is dout). With a residual, dx is always returned (it feeds dres and dgate).

This module holds the six functions once, so the backends differ only in their launches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

Launch = Callable[..., Any]


class AdalnInterface:
    """The six interface functions of :mod:`genkernels.ops.adaln` over ``forward`` and ``backward`` (see the
    module docstring). A backend module binds them as its module-level functions."""

    def __init__(self, forward: Launch, backward: Launch) -> None:
        self._forward = forward
        self._backward = backward

    def layer_norm_modulate_forward(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        shift: Tensor | None,
        scale: Tensor | None,
        tokens: int,
        eps: float,
        rms: bool,
        stats: bool = True,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(y, mean, rstd): y = (xhat * weight + bias) * (1 + scale) + shift of x (R, D), xhat LayerNorm (RMSNorm
        when ``rms``), a new contiguous tensor in x's dtype; mean, rstd float32 (R,) (mean 0 with rms), None
        without ``stats`` (no backward to follow). Reads x once, writes y once; never synchronizes with the
        host."""
        _, y, mean, rstd = self._forward(x, None, None, weight, bias, shift, scale, tokens, eps, rms, True, stats)
        return y, mean, rstd

    def layer_norm_modulate_backward(
        self,
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        shift: Tensor | None,
        scale: Tensor | None,
        mean: Tensor,
        rstd: Tensor,
        tokens: int,
        rms: bool,
        need_dx: bool,
        need_dweight: bool,
        need_dbias: bool,
        need_dshift: bool,
        need_dscale: bool,
    ) -> tuple[Tensor | None, ...]:
        """(dx, dweight, dbias, dshift, dscale) of :meth:`layer_norm_modulate_forward` given dy (R, D), in one
        pass (xhat recomputed from x, mean and rstd). dx in x's dtype; dweight, dbias float32 (D,); dshift
        float32 (S, D) per sample, None per token (it is dy); dscale float32 (S, D) per sample, (R, D) in
        scale's dtype per token. None where not asked for or the input is absent."""
        needs = (need_dx, False, False, need_dweight, need_dbias, need_dshift, need_dscale)
        dx, _, _, dweight, dbias, dshift, dscale = self._backward(
            x, dy, None, None, None, weight, bias, shift, scale, mean, rstd, tokens, rms, True, needs
        )
        return dx, dweight, dbias, dshift, dscale

    def gated_residual_forward(self, x: Tensor, y: Tensor, gate: Tensor | None, tokens: int) -> Tensor:
        """out = x + gate * y (x + y when gate is None) of rows (R, D), in float32 then rounded to x's dtype, a
        new contiguous tensor. One pass: x, y read once, out written once."""
        out, _, _, _ = self._forward(x, y, gate, None, None, None, None, tokens, 1.0, False, False)
        return out

    def gated_residual_backward(
        self, dout: Tensor, y: Tensor, gate: Tensor, tokens: int, need_dy: bool, need_dgate: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """(dy, dgate) of :meth:`gated_residual_forward` with a gate (x's gradient is dout itself; without a gate
        so is y's, and the op takes it without a launch): dy = dout * gate in y's dtype (dout in x's); dgate = dout * y,
        float32 (S, D) summed over each sample's tokens for a per-sample gate, else (R, D) in gate's dtype. None
        where not needed. One pass over dout and y."""
        needs = (False, need_dy, need_dgate, False, False, False, False)
        _, dy, dgate, *_ = self._backward(
            None, dout, None, y, gate, None, None, None, None, None, None, tokens, False, False, needs
        )
        return dy, dgate

    def gated_residual_layer_norm_modulate_forward(
        self,
        x: Tensor,
        y: Tensor,
        gate: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        shift: Tensor | None,
        scale: Tensor | None,
        tokens: int,
        eps: float,
        rms: bool,
        stats: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(h, out, mean, rstd): h = x + gate * y (x + y when gate is None; x's dtype) and
        out = layer_norm_modulate(h), in one pass (x, y
        read once; h, out written once, new contiguous tensors); the statistics (float32 (R,)) are those of
        the rounded h, None without ``stats``."""
        return self._forward(x, y, gate, weight, bias, shift, scale, tokens, eps, rms, True, stats)

    def gated_residual_layer_norm_modulate_backward(
        self,
        dh: Tensor | None,
        dout: Tensor,
        h: Tensor,
        y: Tensor | None,
        gate: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        shift: Tensor | None,
        scale: Tensor | None,
        mean: Tensor,
        rstd: Tensor,
        tokens: int,
        rms: bool,
        need_dy: bool,
        need_dgate: bool,
        need_dweight: bool,
        need_dbias: bool,
        need_dshift: bool,
        need_dscale: bool,
    ) -> tuple[Tensor | None, ...]:
        """(dx, dy, dgate, dweight, dbias, dshift, dscale) of the fused forward in one pass: dx = dh + the norm's
        input gradient (x's dtype, always), dy = dx * gate, dgate = dx * y; the others as
        :meth:`layer_norm_modulate_backward` gives them. dh: None (h's gradient is zero) or (R, D). Without a
        gate, y and gate are None and need_dy, need_dgate False (y's gradient is dx: the op takes it). Reads
        dout, h, y (and dh) once; writes dx and dy once."""
        needs = (True, need_dy, need_dgate, need_dweight, need_dbias, need_dshift, need_dscale)
        return self._backward(h, dout, dh, y, gate, weight, bias, shift, scale, mean, rstd, tokens, rms, True, needs)

    def bind(self, namespace: dict[str, Any]) -> None:
        """Put the six functions into a backend module's ``namespace`` (its ``globals()``)."""
        for name in INTERFACE:
            namespace[name] = getattr(self, name)


#: The interface's function names, as the registry's callers use them.
INTERFACE = (
    "layer_norm_modulate_forward",
    "layer_norm_modulate_backward",
    "gated_residual_forward",
    "gated_residual_backward",
    "gated_residual_layer_norm_modulate_forward",
    "gated_residual_layer_norm_modulate_backward",
)
