"""The transformer family's CUDA launchers (genkernels.cuda.adaln, .rope, .gated_mlp, .attention) call the
extension's functions with the arguments those take.

No GPU runs the suite, and these launchers have not run on one, so a renamed, missing or extra argument
would surface only there. Here each launcher runs on CPU tensors with the extension replaced by a stand-in
that binds every call to the real function's signature (read from its pybind11 docstring: the parameter
names, and which have defaults) and launches nothing. The calls are those of the compile harness's small
cases (tests/transformer_calls.py): every op, LayerNorm and RMSNorm, per-sample and per-token modulation,
the fused residual with and without a gate, partial and interleaved rope; and attention's forward on a
heads-outer and a heads-inner q. bias_act's launcher is checked by its own test
(tests/cuda/test_bias_act_bindings.py). Skips when the extension is not built.
"""

from __future__ import annotations

import pytest
import torch

from genkernels.cuda import adaln as cad
from genkernels.cuda import attention as cat
from genkernels.cuda import gated_mlp as cgm
from genkernels.cuda import rope as cro
from tests.transformer_calls import TransformerCall, run_transformer_call


def _parameters(fn) -> list[tuple[str, bool]]:
    """(name, has a default) of each parameter of a pybind11 function, from its docstring's signature line."""
    line = fn.__doc__.splitlines()[0]
    inner = line[line.index("(") + 1 : line.rindex(") ->")]
    parts, depth, current = [], 0, ""
    for ch in inner:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [(p.split(":")[0].split("=")[0].strip(), "=" in p) for p in map(str.strip, parts) if p not in ("", "*", "/")]


class _Bound:
    """Stands in for genkernels._C: a call is bound to the real function's parameters (a TypeError naming the
    function when it does not bind), recorded, and answered with 0 instead of running."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        params = _parameters(getattr(self.real, name))
        names = [n for n, _ in params]

        def call(*args, **kwargs):
            if len(args) > len(names):
                raise TypeError(f"{name}: {len(args)} positional arguments, the binding takes {len(names)}")
            unknown = sorted(set(kwargs) - set(names[len(args) :]))
            missing = [n for n, default in params[len(args) :] if not default and n not in kwargs]
            if unknown or missing:
                raise TypeError(f"{name}: unknown arguments {unknown}, missing {missing}")
            self.calls.append(name)
            return 0

        return call


@pytest.fixture
def bound(monkeypatch):
    try:
        import genkernels._C as ext
    except ImportError as e:
        pytest.skip(f"the CUDA extension is not built: {e}")
    stand_in = _Bound(ext)
    for module in (cad, cro, cgm, cat):
        monkeypatch.setattr(module, "require_extension", lambda: stand_in)
        monkeypatch.setattr(module, "stream_handle", lambda device: 0)
    return stand_in


F16, F32 = torch.float16, torch.float32
CALLS = [
    *(
        TransformerCall("paths", "adaln", (6, d), F16, 3, rms, affine, per_token, fused)
        for rms, affine, per_token, d in ((True, True, False, 72), (False, True, True, 1000), (True, False, True, 40))
        for fused in (False, True)
    ),
    TransformerCall("paths", "adaln", (6, 72), F16, 3, True, True, fused=True, gated=False, params_like_x=True),
    TransformerCall("paths", "rope", (2, 3, 5, 72), F32, pairs=20),
    TransformerCall("paths", "rope", (2, 3, 5, 40), F16, interleaved=True),
    TransformerCall("paths", "mlp", (3, 1000), F32),
]


@pytest.mark.parametrize("call", CALLS, ids=str)
def test_launchers_bind_to_the_extension(bound, call):
    run_transformer_call(cad, cro, cgm, call)
    want = {"adaln": {"adaln_forward", "adaln_backward"}, "rope": {"rope_rotate"}}.get(
        call.kind, {"gelu_tanh_forward", "gelu_tanh_grad", "swiglu_forward", "swiglu_grad"}
    )
    assert want <= set(bound.calls), bound.calls


@pytest.mark.parametrize("heads_inner", [False, True])
def test_attention_launcher_binds_to_the_extension(bound, heads_inner):
    """out comes back in q's memory order (a (B, L, H, D) tensor seen as (B, H, L, D) when q is one)."""
    q = torch.empty(2, 5, 3, 16, dtype=F16).transpose(1, 2) if heads_inner else torch.empty(2, 3, 5, 16, dtype=F16)
    kv = torch.empty(2, 1, 7, 16, dtype=F16)
    out = cat.attention_forward(q, kv, kv, True, 0.25, None)[0]
    assert bound.calls == ["attention_forward"] and out.shape == q.shape and out.stride() == q.stride()


def test_attention_binding_refuses_unaligned_out_strides():
    """The extension checks out's strides (16-byte stores) before touching a device, naming out."""
    ext = pytest.importorskip("genkernels._C", reason="the CUDA extension is not built")
    strides = {"q_strides": (8, 8, 8), "k_strides": (8, 8, 8), "v_strides": (8, 8, 8), "out_strides": (8, 16, 12)}
    sizes = {"batch": 1, "heads_q": 1, "heads_kv": 1, "len_q": 1, "len_kv": 1, "head_dim": 8}
    with pytest.raises(ValueError, match=r"out has batch, head and row strides \(8, 16, 12\)"):
        ext.attention_forward(
            16, 16, 16, 0, 16, 4, **sizes, **strides, dtype=1, device=0, scale=1.0, causal=False, stream=0
        )


def test_the_stand_in_refuses_a_wrong_call(bound):
    """The check itself: an unknown keyword, a missing argument and too many positional ones are refused."""
    with pytest.raises(TypeError, match=r"rope_rotate: unknown arguments \['nonsense'\]"):
        bound.rope_rotate(nonsense=1)
    with pytest.raises(TypeError, match="missing"):
        bound.rope_rotate()
    with pytest.raises(TypeError, match="positional arguments"):
        bound.rope_rotate(*range(100))
