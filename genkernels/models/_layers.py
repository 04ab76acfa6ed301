"""Layers the models share: ResNet block, resamplers, and the PyTorch-layer twins of genkernels' layers.

Every model here can be built on genkernels' fused layers (the default) or, with
``torch_layers=True``, on plain PyTorch layers with the same parameter names: the model as it
runs without genkernels, the baseline of the model benchmarks. :func:`group_norm_layer` picks
the flavour of a normalization, :class:`TorchAttention` is the SDPA flavour of
:class:`genkernels.nn.Attention`, :func:`with_torch_layers` builds the PyTorch twin of a model
sharing its parameters and :func:`set_layers_backend` pins the backend of a model's genkernels ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn import Attention, GroupNorm, GroupNormSiLU


def is_index_tensor(t) -> bool:
    """Whether t is a tensor of integers of any width (not bool, floating-point or complex): class or token
    indices."""
    return isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_indices(name: str, t: torch.Tensor, limit: int) -> None:
    """Raise a ValueError naming ``name`` when an index tensor (labels, tokens) holds a value outside [0, limit).

    The values are read on the CPU only, and not under torch.compile: on a GPU the check would wait for the
    device every call, and reading a value while tracing is a graph break (an error with fullgraph=True); an
    embedding's own bounds check catches them there (a device-side assert; compiled on the CPU, an "index out of
    bounds" RuntimeError)."""
    if t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling():
        low, high = int(t.min()), int(t.max())
        if low < 0 or high >= limit:
            raise ValueError(f"{name} must be in [0, {limit}), got values {low} .. {high}")


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (then the layers cast floating inputs to their dtype)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


# What autocast casts: floating tensors other than float64, which it leaves alone.
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_input_dtype(name: str, t: torch.Tensor, param_dtype: torch.dtype) -> None:
    """Raise a TypeError naming both dtypes unless ``t`` has the parameters' dtype, or autocast is on for its
    device and casts it (float32, float16 or bfloat16; not float64 or integers). Without it torch fails deep
    inside the first layer ("mat1 and mat2 must have the same dtype", "Input type (c10::Half) and bias type
    (float) ...")."""
    if t.dtype == param_dtype or (t.dtype in _AUTOCAST_DTYPES and _autocast_enabled(t.device.type)):
        return
    if not t.is_floating_point():
        fix = f"{name} must be floating point ({name}.to({param_dtype}), images scaled to the model's range)"
    else:
        fix = f"convert one of them ({name}.to({param_dtype}) or model.to({t.dtype}))"
        if t.dtype in _AUTOCAST_DTYPES:
            fix += ", or run under torch.autocast"
    raise TypeError(f"{name} has dtype {t.dtype} but the model's parameters are {param_dtype}: {fix}")


class TorchGroupNormSiLU(torch.nn.GroupNorm):
    """torch.nn.GroupNorm followed by SiLU as two PyTorch ops: silu(group_norm(x)); (N, C, *) -> (N, C, *).

    Same constructor, parameters and state_dict keys as torch.nn.GroupNorm (and as
    genkernels.nn.GroupNormSiLU, which fuses the pair).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


class TorchAttention(Attention):
    """genkernels.nn.Attention's layer computed with ``F.scaled_dot_product_attention`` (PyTorch's SDPA).

    Same constructor arguments, parameters and state_dict keys as :class:`genkernels.nn.Attention`;
    ``backend`` is ignored (SDPA picks its own kernel). Only what the models call: no padding mask,
    not causal.
    """

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (B, L, query_dim), encoder_hidden_states (B, S, cross_attention_dim) or None
        (self-attention) -> (B, L, query_dim): to_out(softmax(q k^T / sqrt(dim_head)) v) per head."""
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = self._split_heads(self.to_q(hidden_states))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[1](self.to_out[0](o.transpose(1, 2).flatten(2)))


def group_norm_layer(
    torch_layers: bool, silu: bool, groups: int, channels: int, eps: float, backend: str | None
) -> torch.nn.GroupNorm:
    """The GroupNorm (+ SiLU when ``silu``) layer of the chosen flavour: genkernels' fused op, or
    PyTorch's modules when ``torch_layers``. Either has torch.nn.GroupNorm's parameters and keys."""
    if torch_layers:
        return TorchGroupNormSiLU(groups, channels, eps=eps) if silu else torch.nn.GroupNorm(groups, channels, eps=eps)
    return (GroupNormSiLU if silu else GroupNorm)(groups, channels, eps=eps, backend=backend)


def attention_layer(torch_layers: bool) -> type[Attention]:
    """The attention class of the chosen flavour: genkernels.nn.Attention, or :class:`TorchAttention`."""
    return TorchAttention if torch_layers else Attention


class ResnetBlock(torch.nn.Module):
    """conv2(dropout(gns2(conv1(gns1(x)) [+ time_emb_proj(silu(temb))]))) + shortcut(x).

    (B, Cin, H, W) -> (B, Cout, H, W), any memory layout; gns = GroupNorm then SiLU (one fused op
    on genkernels layers). The timestep term exists only when ``temb_channels`` is given (the
    diffusion UNet); without it (the VAE) the block has no ``time_emb_proj``. shortcut is a 1x1
    convolution when Cin != Cout, else the identity. Parameter names are those of diffusers'
    ResnetBlock2D. ``torch_layers``: PyTorch's GroupNorm and SiLU instead of genkernels'.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int,
        dropout: float,
        backend: str | None,
        torch_layers: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = group_norm_layer(torch_layers, True, groups, in_channels, eps, backend)
        self.conv1 = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = None if temb_channels is None else torch.nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm_layer(torch_layers, True, groups, out_channels, eps, backend)
        self.dropout = torch.nn.Dropout(dropout)
        self.conv2 = torch.nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = torch.nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, Cin, H, W); temb_act = silu(temb) (B, temb_channels), activated once for all blocks
        (required when the block has a time_emb_proj, else unused)."""
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(torch.nn.Module):
    """Stride-2 3x3 convolution: (B, C, H, W) -> (B, C, H/2, W/2) for even H and W.

    ``padding=1``: symmetric zero padding of one pixel (the UNet). ``padding=0``: one zero row at
    the bottom and one zero column at the right only, then an unpadded convolution (the VAE
    encoder, as diffusers' Downsample2D with padding=0): the same output size for even H and W,
    but the window of output pixel (i, j) starts at input pixel (2i, 2j) rather than (2i-1, 2j-1).
    """

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"padding must be 0 (asymmetric, bottom/right) or 1 (symmetric), got {padding}")
        self.asymmetric = padding == 0
        self.conv = torch.nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(torch.nn.Module):
    """Nearest 2x upsampling then a 3x3 convolution: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def set_layers_backend(model: torch.nn.Module, backend: str | None) -> None:
    """Pin every genkernels GroupNorm and attention layer inside ``model`` to ``backend`` (None: scope /
    auto). PyTorch-flavour layers (:class:`TorchAttention`, torch.nn.GroupNorm) are left alone."""
    for m in model.modules():
        if isinstance(m, (GroupNorm, Attention)) and not isinstance(m, TorchAttention):
            m.backend = backend


def with_torch_layers(model: torch.nn.Module) -> torch.nn.Module:
    """The same network as ``model`` on PyTorch's layers (``type(model)(model.config, torch_layers=True)``),
    sharing ``model``'s parameters: no copy, and an update to one is seen by the other.

    Built on the meta device, then given ``model``'s parameter and buffer tensors
    (``load_state_dict(assign=True)``, and the non-persistent buffers, which the state_dict does not
    carry), so it takes no time or memory of its own; same device, dtype and train/eval mode as
    ``model``. Works for any model class here whose constructor takes ``(config, torch_layers=...)``.
    """
    with torch.device("meta"):
        twin = type(model)(model.config, torch_layers=True)
    state = model.state_dict(keep_vars=True)
    twin.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (tables such as rotary cos / sin) are not in the state_dict: share them too, or
    # the twin would keep them on the meta device.
    for name, buffer in model.named_buffers():
        if name not in state:
            owner, _, attr = name.rpartition(".")
            twin.get_submodule(owner).register_buffer(attr, buffer, persistent=False)
    return twin.train(model.training)
