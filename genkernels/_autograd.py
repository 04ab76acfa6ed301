"""Running an op's autograd.Function without its autograd node when no graph would be recorded.

``Function.apply`` costs a call about 10 us of CPU time (the node, its inputs' bookkeeping, the forward
run under no_grad) even when nothing requires a gradient, as in sampling. When grad mode is off or no
tensor argument requires grad (and no forward-mode AD is active), :func:`apply` runs the Function's
``forward`` directly with a context that drops what it would save: the same outputs, which require no grad
either way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import forward_ad

#: Whether torch keeps forward AD's current level where :func:`needs_graph` reads it (torch 2.4 to 2.13 do).
_FORWARD_LEVEL = hasattr(forward_ad, "_current_level")


class _NoGraph:
    """Stands for an autograd context where no graph is recorded: what a forward saves or marks is
    dropped; attributes it sets are kept on the object, unused."""

    def save_for_backward(self, *tensors: Any) -> None:
        """Nothing is saved: there is no backward."""

    def mark_non_differentiable(self, *tensors: Any) -> None:
        """Nothing to mark: no output requires grad."""

    def set_materialize_grads(self, value: bool) -> None:
        """Nothing to set: there is no backward."""


def records(ctx: Any) -> bool:
    """Whether a Function's forward got a real autograd context (a backward may follow), not :func:`apply`'s
    stand-in: what a forward that would save extra state for its backward asks first."""
    return not isinstance(ctx, _NoGraph)


def needs_graph(args: tuple) -> bool:
    """Whether autograd would record a node for a call with these arguments: grad mode is on and a tensor
    argument requires grad; or forward-mode AD is active (a ``forward_ad.dual_level`` block, in or out of
    grad mode), where ``Function.apply`` carries (or, without a jvp, refuses) the inputs' tangents that the
    bare forward would drop."""
    if _FORWARD_LEVEL and forward_ad._current_level >= 0:  # a module global: no cost worth measuring
        return True
    if not torch.is_grad_enabled():
        return False
    for a in args:  # a plain loop: this runs on every call of every op
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return True
    return False


def apply(function: type[torch.autograd.Function], *args: Any) -> Any:
    """``function.apply(*args)``, or, when no graph would be recorded (:func:`needs_graph`), its forward run
    directly (no autograd node). For Functions whose forward does not mark inputs dirty (no in-place
    outputs)."""
    if needs_graph(args):
        return function.apply(*args)
    return function.forward(_NoGraph(), *args)


def first_order_only(op: str, *, reference_too: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for the backward of an op's Function whose kernels are not themselves differentiable.

    Called with create_graph=True (grad mode is on inside a backward only then), the backward raises at once,
    naming ``op``, instead of returning gradients whose own gradient would be missing this op's terms.
    (``torch.autograd.function.once_differentiable`` defers its error to a node that ``torch.autograd.grad``
    with ``inputs=`` never visits: the second derivative came back silently short.) The message points to the
    reference backend, differentiable to any order, unless ``reference_too`` (the reference runs through the
    same Function)."""
    where = "on every backend" if reference_too else "on the fast backends"
    advice = (
        "differentiate it once only"
        if reference_too
        else "call the op with backend='reference' (differentiable to any order) for higher-order gradients"
    )

    def wrap(backward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(backward)
        def checked(ctx: Any, *grads: Any) -> Any:
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"genkernels.ops.{op}: the backward is first-order only {where}, so a gradient taken with "
                    f"create_graph=True (to be differentiated again) cannot be built through it; {advice}"
                )
            return backward(ctx, *grads)

        return checked

    return wrap
