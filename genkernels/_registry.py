"""Backend registry and dispatch.

Every op keeps an ordered list of backends. A backend declares
``not_supported(*args, **kwargs) -> str | None`` (the reason it cannot run these
inputs, or None) and an implementation object the op module knows how to call.

Selection, strongest first:

1. ``backend=`` passed to the op call;
2. the ``with genkernels.backend(name):`` blocks around the call: a block naming no op replaces what
   the blocks around it chose; a block with ``ops=`` chooses for those ops alone, over the blocks
   around it;
3. the ``GENKERNELS_BACKEND`` environment variable;
4. ``"auto"``: the first backend in the op's order that has no reason. Inside :func:`graph_mode` (the warm-up
   and capture of a CUDA graph), an op with a graph order (:func:`register_graph_order`) may put other
   backends first for a call: those whose kernels are the faster ones once the call's CPU time is not paid.

An explicit backend (1-3) that cannot run a call raises :class:`UnsupportedError`
with its reason; it never falls back silently. Auto never fails where the
reference can run.

Empty inputs return empty results without a kernel launch, on every backend, but
an explicit backend is asked first (:func:`check_explicit`, with the arguments
:func:`select` would get): one that cannot run the call raises the same
UnsupportedError whether the batch is empty or not. Auto never raises for empty
inputs. A backend's ``not_supported`` must not refuse a call because its inputs
are empty: nothing is launched for them.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

BACKENDS = ("reference", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS


class UnsupportedError(RuntimeError):
    """An explicitly requested backend cannot run the given inputs."""


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``not_supported`` takes the op's arguments and returns None when this
    backend can run them, else a one-line reason. ``impl`` is whatever the op
    module calls (a module or a function); the registry never calls it.
    """

    name: str
    not_supported: Callable[..., str | None]
    impl: Any


_OPS: dict[str, list[Backend]] = {}
_GRAPH_ORDERS: dict[str, Callable[..., tuple[str, ...] | None]] = {}
_graphing: contextvars.ContextVar[bool] = contextvars.ContextVar("genkernels_graph_mode", default=False)
_PROBES: dict[str, Callable[[Any], tuple]] = {}
_CHECKS: dict[str, tuple[inspect.Signature, Callable[..., Any], tuple[str, ...]]] = {}


@dataclass(frozen=True)
class _Scope:
    """What the ``genkernels.backend`` blocks around a call chose: ``default`` for every op (None: none chose),
    ``per_op`` for single ops ((op name, backend) pairs), which beats ``default``."""

    default: str | None = None
    per_op: tuple[tuple[str, str], ...] = ()

    def choice(self, op: str | None) -> str | None:
        if op is not None:
            for name, chosen in self.per_op:
                if name == op:
                    return chosen
        return self.default


_scoped: contextvars.ContextVar[_Scope] = contextvars.ContextVar("genkernels_backend", default=_Scope())


def register(op: str, name: str, not_supported: Callable[..., str | None], impl: Any) -> None:
    """Append backend ``name`` to ``op``'s list (registration order is dispatch order)."""
    if name not in BACKENDS:
        raise ValueError(f"backend name must be one of {BACKENDS}, got {name!r}")
    backends = _OPS.setdefault(op, [])
    if any(b.name == name for b in backends):
        raise ValueError(f"backend {name!r} is already registered for op {op!r}")
    backends.append(Backend(name, not_supported, impl))


def register_graph_order(op: str, order: Callable[..., tuple[str, ...] | None]) -> None:
    """Give ``op`` an auto order for :func:`graph_mode`: ``order(*args, **kwargs)`` (the op's arguments, as
    ``not_supported`` takes them) returns the backend names auto tries first for that call, in that order (the
    others follow in registration order), or None for the registration order."""
    backends_of(op)  # a registered op: its ValueError otherwise
    _GRAPH_ORDERS[op] = order


@contextlib.contextmanager
def graph_mode() -> Iterator[None]:
    """Auto picks backends for a CUDA graph inside the block: put it around both the warm-up calls and the
    capture (so that what the capture records was compiled and loaded before it).

    A plain call pays its CPU time (Python, the launch) on top of its kernels; a replayed graph pays only the
    kernels. Auto's order comes from plain calls; an op whose kernels on another backend are faster when
    replayed registers a graph order (:func:`register_graph_order`), which auto follows inside this block:
    the adaLN ops take triton for tensors of at least ``genkernels.ops.adaln.GRAPH_TRITON_MIN_ELEMENTS``
    elements. An explicit backend (argument, ``backend(...)`` block, GENKERNELS_BACKEND) is not affected."""
    token = _graphing.set(True)
    try:
        yield
    finally:
        _graphing.reset(token)


def _auto_order(op: str, args: tuple, kwargs: dict) -> list[Backend]:
    """``op``'s backends in the order auto tries them for this call (:func:`graph_mode`'s, inside it)."""
    backends = backends_of(op)
    order = _GRAPH_ORDERS.get(op) if _graphing.get() else None
    first = order(*args, **kwargs) if order is not None else None
    if first:
        backends.sort(key=lambda b: first.index(b.name) if b.name in first else len(first))
    return backends


def register_probe(op: str, make_args: Callable[[Any], tuple]) -> None:
    """Give ``op`` a typical call's arguments on a device, so `genkernels.info()` can say what runs here.

    ``make_args(device)`` returns the call's positional arguments, then, as a last item, a dict of its keyword
    arguments where it has any. The call must be one the op accepts: :func:`explain` checks it.
    """
    _PROBES[op] = make_args


def register_check(op: str, public: Callable, check: Callable) -> None:
    """Give ``op`` its own argument checks, so that :func:`explain` refuses what the op refuses.

    ``public`` is the op's public function (``genkernels.ops.<op>``); ``check`` takes a subset of
    ``public``'s parameters, by the same names, and raises the error the op raises (ValueError or
    TypeError, with the op's message) for arguments the op refuses. Its return value is ignored.
    """
    signature = inspect.signature(public)
    names = tuple(inspect.signature(check).parameters)
    unknown = [name for name in names if name not in signature.parameters]
    if unknown:
        raise ValueError(f"the check of op {op!r} takes {unknown}, which {public.__name__} does not")
    _CHECKS[op] = (signature, check, names)


def checked_ops() -> list[str]:
    """Names of the ops that have a check (see :func:`register_check`)."""
    return sorted(_CHECKS)


def probe(op: str, device: Any) -> tuple[tuple, dict[str, Any]]:
    """Positional and keyword arguments of a typical ``op`` call on ``device`` (see :func:`register_probe`)."""
    args = _PROBES[op](device)
    if args and isinstance(args[-1], dict):
        return tuple(args[:-1]), dict(args[-1])
    return tuple(args), {}


def ops() -> list[str]:
    """Names of the registered ops."""
    return sorted(_OPS)


def backends_of(op: str) -> list[Backend]:
    """The backends of ``op`` in dispatch order."""
    try:
        return list(_OPS[op])
    except (KeyError, TypeError):  # TypeError: an unhashable name (a list), unknown all the same
        raise ValueError(f"unknown op {op!r}; registered ops: {ops()}") from None


def _check_choice(name: str, source: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{source} must be one of {_CHOICES}, got {name!r}")
    return name


def requested(backend: str | None = None, op: str | None = None) -> str:
    """The backend a call of ``op`` asks for: the argument, else the scope (its choice for ``op``, else its
    choice for every op; ``op`` None: the latter alone), else the environment, else auto."""
    if backend is not None:
        return _check_choice(backend, "backend")
    scoped = _scoped.get().choice(op)
    if scoped is not None:
        return scoped
    env = os.environ.get("GENKERNELS_BACKEND")
    if env:
        return _check_choice(env, "GENKERNELS_BACKEND")
    return "auto"


@contextlib.contextmanager
def backend(name: str, ops: str | Iterable[str] | None = None) -> Iterator[None]:
    """Use backend ``name`` ("auto", "reference", "triton" or "cuda") for the op calls inside the block.

    ``ops`` None: for every op, replacing whatever the blocks around this one chose. ``ops`` an op name or
    names (:func:`ops` lists them): for those ops only; the other ops keep what the blocks around chose
    (or auto)::

        with genkernels.backend("triton", ops=("layer_norm_modulate", "gated_residual_layer_norm_modulate")):
            model(x)   # the adaLN ops on triton, everything else on auto

    The choice is held in a ``contextvars.ContextVar``: asyncio tasks created inside the block see it, but a
    thread started inside it does not (like ``torch.no_grad``; it gets GENKERNELS_BACKEND or auto): enter the
    block in the thread, or run the thread's work through ``contextvars.copy_context().run``.

    An eager call's backward runs on the backend its forward ran on. A call traced by ``torch.compile`` chooses
    again when its backward runs, where that runs: a ``backward()`` after the block, or autograd's own thread
    on a GPU, sees GENKERNELS_BACKEND or auto, not the block. To hold compiled backwards to one backend, pass
    ``backend=`` to the op (or the layer) or set GENKERNELS_BACKEND.
    """
    name = _check_choice(name, "backend")
    outer = _scoped.get()
    if ops is None:
        scope = _Scope(name)
    else:
        chosen = _op_names(ops)
        kept = tuple((op, b) for op, b in outer.per_op if op not in chosen)
        scope = _Scope(outer.default, kept + tuple((op, name) for op in chosen))
    token = _scoped.set(scope)
    try:
        yield
    finally:
        _scoped.reset(token)


@contextlib.contextmanager
def fallback(name: str) -> Iterator[None]:
    """Use backend ``name`` for every op that no surrounding block chose a backend for by name: the choices
    for single ops (``backend(..., ops=...)``) around this block stay. What training and sampling enter
    for their device's default (reference on CPU)."""
    outer = _scoped.get()
    token = _scoped.set(_Scope(_check_choice(name, "backend"), outer.per_op))
    try:
        yield
    finally:
        _scoped.reset(token)


def _op_names(ops: str | Iterable[str]) -> tuple[str, ...]:
    """``ops`` (one name or several) as a tuple of registered op names; a ValueError names any unknown one."""
    names = (ops,) if isinstance(ops, str) else tuple(ops)
    if not names:
        raise ValueError("ops must name at least one op (None: every op)")
    unknown = [n for n in names if not isinstance(n, str) or n not in _OPS]
    if unknown:
        raise ValueError(f"ops: unknown op name(s) {unknown}; registered ops: {sorted(_OPS)}")
    return names


def _origin(backend: str | None, op: str) -> str:
    """Where the explicit backend of a call of ``op`` came from, for its UnsupportedError: nothing for the
    call's own argument, else the ``genkernels.backend`` block or the environment variable (a user who passed
    no ``backend=`` is told what forced it)."""
    if backend is not None:
        return ""
    scope = _scoped.get()
    for name, chosen in scope.per_op:
        if name == op:
            return f"chosen by a genkernels.backend({chosen!r}, ops=...) block around the call"
    if scope.default is not None:
        return f"chosen by a genkernels.backend({scope.default!r}) block around the call"
    return f"chosen by GENKERNELS_BACKEND={os.environ.get('GENKERNELS_BACKEND')!r}"


def _explicit(op: str, want: str, args: tuple, kwargs: dict, backend: str | None) -> Backend:
    """Backend ``want`` (not "auto"; ``backend`` the call's own argument) of ``op``; raises UnsupportedError
    when it is not registered or has a reason not to run ``op(*args, **kwargs)``."""
    candidates = backends_of(op)
    for b in candidates:
        if b.name == want:
            reason = b.not_supported(*args, **kwargs)
            if reason is None:
                return b
            problem = f"cannot run this call: {reason}"
            break
    else:
        problem = f"is not registered; available: {[b.name for b in candidates]}"
    origin = _origin(backend, op)
    raise UnsupportedError(f"{op}: backend {want!r} {problem}" + (f" (the backend was {origin})" if origin else ""))


def select(op: str, *args: Any, backend: str | None = None, **kwargs: Any) -> Backend:
    """The backend that runs ``op(*args, **kwargs)``.

    Raises UnsupportedError when an explicitly requested backend has a reason
    not to run, or (auto) when no backend can.
    """
    want = requested(backend, op)
    if want != "auto":
        return _explicit(op, want, args, kwargs, backend)
    candidates = _auto_order(op, args, kwargs)
    reasons = []
    for b in candidates:
        reason = b.not_supported(*args, **kwargs)
        if reason is None:
            return b
        reasons.append(f"{b.name}: {reason}")
    raise UnsupportedError(f"{op}: no backend can run this call ({'; '.join(reasons)})")


def check_explicit(op: str, *args: Any, backend: str | None = None, **kwargs: Any) -> None:
    """The check an op makes before it returns the result of empty inputs without a launch.

    Takes what :func:`select` takes. When the requested backend is explicit (not "auto"), raises the
    UnsupportedError that ``select`` raises for these arguments (the backend is not registered, or its
    ``not_supported`` has a reason); under auto it only validates the backend name.
    """
    want = requested(backend, op)
    if want != "auto":
        _explicit(op, want, args, kwargs, backend)


def explain(op: str, *args: Any, **kwargs: Any) -> dict[str, str | None]:
    """For each backend of ``op`` in the order auto tries them for this call (:func:`graph_mode`'s order inside
    it), why it cannot run these arguments (None: it can).

    ``args`` and ``kwargs`` are the op's own (``genkernels.ops.<op>``'s). They are first checked as the op
    checks them (:func:`register_check`): arguments the op itself refuses (a group count that does not
    divide the channels, mismatched shapes, an unknown ``backend=`` name) raise the op's own error, ValueError
    or TypeError, instead of an answer. A ``backend=`` argument changes nothing else: every backend is
    answered for. ``op`` is a registered op (:func:`ops` lists them); the ops composed of others
    (``linear_gelu_tanh``, the sampler steps, ``add_noise``) are not.

    >>> genkernels.explain("group_norm", x, 32)   # doctest: +SKIP
    {'cuda': 'extension not built (...)', 'triton': None, 'reference': None}
    """
    backends_of(op)  # a registered op: its ValueError otherwise
    checked = _CHECKS.get(op)
    if checked is not None:
        signature, check, names = checked
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"explain({op!r}, ...) takes the arguments of genkernels.ops.{op}: {e}") from None
        bound.apply_defaults()
        check(**{name: bound.arguments[name] for name in names})
        if "backend" in signature.parameters and "backend" in kwargs:  # the op's own choice, not a backend input
            chosen = kwargs.pop("backend")
            if chosen is not None:
                _check_choice(chosen, "backend")
    try:
        return {b.name: b.not_supported(*args, **kwargs) for b in _auto_order(op, args, kwargs)}
    except TypeError as e:
        raise TypeError(f"explain({op!r}, ...) takes the arguments of genkernels.ops.{op}: {e}") from None
