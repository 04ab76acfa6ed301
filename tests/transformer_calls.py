"""The transformer family's backend calls (adaln, rope, gated_mlp), shared by the compile harness
(tests/triton/_compile_kernels.py, which compiles the Triton launches) and the CUDA bindings check
(tests/cuda/test_launcher_bindings.py, which passes the CUDA launchers' arguments to the extension): both
drive the backend modules' common interface with CPU tensors of the call's shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TransformerCall:
    """One call of the transformer family's backend kernels: ``kind`` "adaln" (layer_norm_modulate on rows
    (R, D) of ``tokens`` tokens per sample, forward and backward; with ``fused`` the gated residual + norm),
    "rope" (q and k (B, H, L, Dh) rotated by (L, P) tables, forward and inverse) or "mlp" (gelu_tanh on x,
    swiglu on x (R, 2 * D): forwards and gradients)."""

    label: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    tokens: int = 1
    rms: bool = False
    affine: bool = False
    per_token: bool = False
    fused: bool = False
    gated: bool = True  # fused: with a gate (else the plain residual x + y, and the backward without y)
    params_like_x: bool = False  # adaln affine: weight and bias in x's dtype (else float32)
    pairs: int = 0  # rope: rotated pairs P (0: Dh / 2)
    interleaved: bool = False
    workload: tuple[int, ...] = ()

    def __str__(self) -> str:
        text = f"{self.label} {self.kind} {tuple(self.shape)} {str(self.dtype)[6:]}"
        if self.kind == "adaln":
            text += " rms" if self.rms else " layernorm"
            text += (" affine" if self.affine else "") + (" in x's dtype" if self.params_like_x else "")
            text += " per-token" if self.per_token else " per-sample"
            text += (" fused" if self.gated else " fused ungated") if self.fused else ""
        if self.kind == "rope":
            text += f" P={self.pairs or self.shape[-1] // 2}" + (" interleaved" if self.interleaved else "")
        return text


def run_transformer_call(ad, rp, gm, call: TransformerCall) -> None:
    """The forward and backward launches of ``call`` (the Triton modules' backend interfaces)."""
    f32 = torch.float32
    if call.kind == "adaln":
        rows, d = call.shape
        x = torch.empty(call.shape, dtype=call.dtype)
        param = call.dtype if call.params_like_x else f32
        weight = torch.empty(d, dtype=param) if call.affine else None
        bias = torch.empty(d, dtype=param) if call.affine and not call.rms else None
        modulation = rows if call.per_token else rows // call.tokens
        shift, scale = (torch.empty(modulation, d, dtype=call.dtype) for _ in range(2))
        if call.fused:
            y = torch.empty_like(x)
            gate = torch.empty(modulation, d, dtype=call.dtype) if call.gated else None
            h, out, mean, rstd = ad.gated_residual_layer_norm_modulate_forward(
                x, y, gate, weight, bias, shift, scale, call.tokens, 1e-6, call.rms
            )
            # Without a gate the op launches the backward with neither y nor gate (y's gradient is x's).
            ad.gated_residual_layer_norm_modulate_backward(
                torch.empty_like(h), torch.empty_like(out), h, y if call.gated else None, gate, weight, bias, shift,
                scale, mean, rstd, call.tokens, call.rms, call.gated, call.gated, True, True, True, True,
            )  # fmt: skip
        else:
            out, mean, rstd = ad.layer_norm_modulate_forward(x, weight, bias, shift, scale, call.tokens, 1e-6, call.rms)
            ad.layer_norm_modulate_backward(
                torch.empty_like(out), x, weight, bias, shift, scale, mean, rstd, call.tokens, call.rms,
                True, True, True, True, True,
            )  # fmt: skip
    elif call.kind == "rope":
        q = torch.empty(call.shape, dtype=call.dtype)
        k = torch.empty(call.shape, dtype=call.dtype)
        pairs = call.pairs or call.shape[-1] // 2
        cos, sin = (torch.empty(call.shape[2], pairs, dtype=f32) for _ in range(2))
        for inverse in (False, True):
            rp.rotate(q, k, cos, sin, call.interleaved, inverse, torch.empty_like(q), torch.empty_like(k))
    elif call.kind == "mlp":
        x = torch.empty(call.shape, dtype=call.dtype)
        gm.gelu_tanh_grad(torch.empty_like(gm.gelu_tanh_forward(x)), x)
        x2 = torch.empty(call.shape[0], 2 * call.shape[1], dtype=call.dtype)
        gm.swiglu_grad(torch.empty_like(gm.swiglu_forward(x2, -1)), x2, -1)
    else:
        raise ValueError(call.kind)
