"""ImageGPT: an autoregressive transformer over quantized pixels, class-conditional, sampled with a KV cache.

Tokens. An image (C, H, W) in [-1, 1] becomes L = H * W * C tokens in raster order with the channels
interleaved (pixel (0, 0) channel 0, channel 1, ..., then pixel (0, 1) ...), each pixel value quantized to
``levels`` levels: token = round((x + 1) / 2 * (levels - 1)). Decoding maps token t to t / (levels - 1) in
[0, 1].

Sequence. Position 0 holds the class token (class_emb(label); with num_classes = 0 a single learned start
token), position p > 0 the embedding of pixel token p - 1; the output at position p predicts pixel token p.
Positions are either learned (pos_emb (L, dim) added to the inputs) or 1-D rotary (genkernels.ops.rope on
the queries and keys of every layer, positions 0 .. L - 1).

Blocks (pre-norm, ``depth`` of them), then the head:

    h = h + attn(rms_norm1(h))           causal self-attention, genkernels.ops.attention(causal=True)
    h = h + mlp(rms_norm2(h))            SwiGLU: fc2(silu(a) * b), [a; b] = fc1(h)   (genkernels.ops.swiglu)
    logits = head(rms_norm_out(h))       (B, T, levels)

RMSNorm is genkernels.ops.layer_norm_modulate(rms=True) with a learned weight and no modulation. Every
residual add is fused with the norm after it (rms_norm2, the next block's rms_norm1, rms_norm_out) in one
genkernels.ops.gated_residual_layer_norm_modulate call without a gate, which returns both the new h and
its norm: per block two kernels (and two passes over h) fewer than an add and a norm apart.
Training minimizes the next-token cross-entropy (:meth:`ImageGPT.loss`, nats per token).

Sampling (:meth:`ImageGPT.sample`) draws the L tokens one at a time. With the KV cache every layer keeps
its keys and values in a preallocated :class:`genkernels.nn.KVCache` (one (n, L, 3, heads, dim_head) buffer:
the projection of a step writes its query, key and value there in one matrix product) and each step feeds
one token, whose query attends (Lq = 1) to every cached key; without it each step recomputes the whole
prefix. All the
randomness is drawn up front from one torch.Generator (one uniform number per token), so both paths give
the same tokens for the same seed whenever their logits agree up to rounding.

CUDA graphs. Decoding a token is a few dozen small kernels (batch x 1 token through every layer), so on a
GPU the host's launches, not the GPU, set the pace. On CUDA, cached sampling therefore captures each of the
L decoding steps once as a ``torch.cuda.CUDAGraph`` (step t: the embedding of token t - 1, every layer with
the cache's first t + 1 positions, the logits and the draw, writing token t into a fixed tokens buffer),
all in one memory pool, and a call replays the L graphs in order: one launch a step. Each graph runs the
kernels of the uncaptured step t on the same shapes, so the tokens are the same. The graphs stay with the
model for the next call with the same batch size, temperature and top_k on the same parameters (their
addresses: in-place updates such as optimizer steps are seen, a reassigned parameter drops the graphs);
``cuda_graph=False`` decodes without them, and :meth:`ImageGPT.release_graphs` frees them. Capturing
decodes once uncaptured and then captures every step, so the graphs pay off over repeated calls; a
single call (``genkernels sample transformer``) is faster without them.

torch.compile. Compile the method: ``torch.compile(model.sample)`` (``torch.compile(model)`` and ``model.compile()``
compile forward, which training calls and sampling does not). The decoding steps, with or without the cache, trace
without a graph break and draw the eager tokens; the Python loop over the L steps unrolls into one graph, so
compiling takes longer the longer L. Two things stay out of the graph: the draw of the uniforms (a seeded CPU
torch.Generator, which dynamo cannot trace; one graph break, so ``fullgraph=True`` fails with an error that says so)
and the CUDA graphs above (captured and replayed eagerly, apart from dynamo: ``cuda_graph=None`` decodes without
them under torch.compile, leaving graphs to ``mode="reduce-overhead"``; ``cuda_graph=True`` runs its graphed
decoding eagerly).

``torch_layers=True`` builds the same network on plain PyTorch ops (F.scaled_dot_product_attention, the
RMSNorm formula, F.silu, a rotate-half RoPE) with the same parameter names: the eager baseline.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import _registry
from .._checks import as_number, is_finite_real, is_integer, is_real, optional_seed
from .._checks import check_backend as _check_backend
from .._checks import positive_int as _positive_int
from ..nn.transformer import CausalSelfAttention, KVCache, LayerNormModulate, RotaryEmbedding, SwiGLU
from ..ops.adaln import gated_residual_layer_norm_modulate
from ._config import ConfigIO
from ._layers import check_indices, is_index_tensor

POSITIONS = ("rope", "learned")


def _outside_graph(reason: str):
    """torch.compiler.disable as a decorator, with ``reason`` (dynamo's error under fullgraph=True shows it)
    where torch takes one."""

    def disable(fn):
        if "reason" in inspect.signature(torch.compiler.disable).parameters:
            return torch.compiler.disable(fn, reason=reason)
        return torch.compiler.disable(fn)

    return disable


@_outside_graph(
    "ImageGPT sampling draws its uniforms from a seeded CPU torch.Generator, which torch.compile cannot trace: "
    "compile sample without fullgraph=True (this draw is then a graph break)"
)
def _uniforms(n: int, length: int, seed: int | None) -> torch.Tensor:
    """1 - U[0, 1): (n, length) float64 uniforms in (0, 1] from a CPU torch.Generator seeded with ``seed`` (None:
    a random seed). Every uniform up front, on the CPU: the same numbers in the same order on every path and
    device."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return 1.0 - torch.rand(n, length, generator=gen, dtype=torch.float64)


def _residual_norm(h: torch.Tensor, branch: torch.Tensor, norm: LayerNormModulate) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + branch, norm(h + branch)) in one pass: genkernels.ops.gated_residual_layer_norm_modulate without a
    gate, with ``norm``'s weight, bias, eps, rms and backend. The branch is added in h's dtype, as h + branch
    promotes it in the PyTorch twin (under autocast it leaves its matrix product in the autocast dtype)."""
    return gated_residual_layer_norm_modulate(
        h, branch.to(h.dtype), None, norm.weight, norm.bias, eps=norm.eps, rms=norm.rms, backend=norm.backend
    )


def _default_mlp_hidden(dim: int) -> int:
    """8/3 dim rounded up to a multiple of 8: a SwiGLU MLP with the parameters of a 4 dim GELU MLP."""
    return -(-8 * dim // 24) * 8


@dataclass
class ImageGPTConfig(ConfigIO):
    """The sizes of an :class:`ImageGPT` (see its docstring); checks every field."""

    image_size: int = 8
    channels: int = 1
    levels: int = 16
    num_classes: int = 10
    dim: int = 128
    depth: int = 4
    heads: int = 4
    positions: str = "rope"
    mlp_hidden: int | None = None
    eps: float = 1e-6
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("image_size", "channels", "dim", "depth", "heads"):
            setattr(self, name, _positive_int(name, getattr(self, name)))
        if not is_integer(self.levels) or self.levels < 2:
            raise ValueError(f"levels must be an int >= 2, got {self.levels!r}")
        if not is_integer(self.num_classes) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: unconditional), got {self.num_classes!r}")
        self.levels, self.num_classes = int(self.levels), int(self.num_classes)
        if self.dim % self.heads:
            raise ValueError(f"heads must divide dim, got dim={self.dim}, heads={self.heads}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.positions == "rope" and (self.dim // self.heads) % 2:
            raise ValueError(f"rotary positions need an even head size dim // heads, got {self.dim // self.heads}")
        if self.mlp_hidden is None:
            self.mlp_hidden = _default_mlp_hidden(self.dim)
        self.mlp_hidden = _positive_int("mlp_hidden", self.mlp_hidden)
        for name, low in (("eps", 0), ("rope_base", 1)):  # rope_frequencies takes a base > 1, as the DiT's config
            value = getattr(self, name)
            if not (is_real(value) and low < value < math.inf):
                raise ValueError(f"{name} must be a finite number > {low}, got {value!r}")
            setattr(self, name, as_number(value))

    @property
    def seq_len(self) -> int:
        """L = image_size * image_size * channels: the pixel tokens of one image."""
        return self.image_size * self.image_size * self.channels

    @property
    def dim_head(self) -> int:
        return self.dim // self.heads


# --------------------------------------------------------------------------- the PyTorch twins of the layers


class TorchRMSNorm(LayerNormModulate):
    """:class:`genkernels.nn.LayerNormModulate` (rms=True, affine, no modulation) as PyTorch ops:
    x * rsqrt(mean(x^2) + eps) * weight, in float32, cast back to x's dtype."""

    def forward(self, x: torch.Tensor, shift=None, scale=None) -> torch.Tensor:
        """x (..., D) -> (..., D) in x's dtype: x * rsqrt(mean(x^2) + eps) * weight, in float32 for
        float16 / bfloat16 x. shift and scale are accepted for the parent's signature and ignored (no modulation).
        """
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(x32.dtype)
        return y.to(x.dtype)


class TorchSwiGLU(SwiGLU):
    """:class:`genkernels.nn.SwiGLU` as PyTorch ops: fc2(F.silu(a) * b)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim): fc2(F.silu(a) * b), [a; b] = fc1(x) split in halves."""
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


class TorchCausalSelfAttention(CausalSelfAttention):
    """:class:`genkernels.nn.CausalSelfAttention` on F.scaled_dot_product_attention and a rotate-half RoPE."""

    def _rotate(self, q, k, cos, sin):
        half = cos.shape[-1]
        c, s = cos.to(q.dtype), sin.to(q.dtype)  # once for both

        def rotate(t):
            a, b, rest = t[..., :half], t[..., half : 2 * half], t[..., 2 * half :]
            return torch.cat([a * c - b * s, b * c + a * s, rest], dim=-1)

        return rotate(q), rotate(k)

    def _rotate_into_slots(self, q, k, cos, sin):
        q, k_rotated = self._rotate(q, k, cos, sin)
        k.copy_(k_rotated)
        return q, k

    def _attend(self, q, k, v):
        lq, lkv = q.shape[2], k.shape[2]
        if lq == lkv:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if lq == 1:  # decoding: the newest query sees every key
            return F.scaled_dot_product_attention(q, k, v)
        # SDPA's is_causal aligns top-left; the cache needs bottom-right.
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lkv, device=q.device)[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=j <= i + (lkv - lq))


# --------------------------------------------------------------------------- the model


class Block(torch.nn.Module):
    """Pre-norm transformer block: h + attn(norm1(h)), then + mlp(norm2(h)); (B, l, dim) -> (B, l, dim)."""

    def __init__(self, config: ImageGPTConfig, backend: str | None, torch_layers: bool) -> None:
        super().__init__()
        norm = TorchRMSNorm if torch_layers else LayerNormModulate
        attn = TorchCausalSelfAttention if torch_layers else CausalSelfAttention
        mlp = TorchSwiGLU if torch_layers else SwiGLU
        self.norm1 = norm(config.dim, config.eps, elementwise_affine=True, rms=True, backend=backend)
        self.attn = attn(config.dim, config.heads, backend=backend)
        self.norm2 = norm(config.dim, config.eps, elementwise_affine=True, rms=True, backend=backend)
        self.mlp = mlp(config.dim, config.mlp_hidden, backend=backend)

    def forward(self, h: torch.Tensor, rotary=None, cache: KVCache | None = None) -> torch.Tensor:
        """h (B, l, dim) -> (B, l, dim): h + attn(norm1(h)), then + mlp(norm2(h)).

        rotary: (cos, sin), each (l, dim_head / 2), of the l positions, or None; cache: the attention's
        :class:`KVCache`, to which this call's keys and values are appended (None: no cache).
        """
        h = h + self.attn(self.norm1(h), rotary, cache)
        return h + self.mlp(self.norm2(h))

    def forward_fused(
        self, h: torch.Tensor, n: torch.Tensor, rotary, cache: KVCache | None, next_norm: LayerNormModulate
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` with each residual add fused with the norm after it: given h and n = norm1(h), returns
        (h', next_norm(h')) with h' = forward(h); next_norm is the next block's norm1 or the model's norm_out.
        Two genkernels.ops.gated_residual_layer_norm_modulate calls (no gate) replace two adds and two norms."""
        h, n = _residual_norm(h, self.attn(n, rotary, cache), self.norm2)
        return _residual_norm(h, self.mlp(n), next_norm)


class ImageGPT(torch.nn.Module):
    """An autoregressive, class-conditional transformer over quantized pixels (see the module doc).

    Args:
        image_size: H = W of the images; or an :class:`ImageGPTConfig`, which then gives every size (the
            other size arguments are ignored).
        channels: C (1 grey, 3 RGB).
        levels: quantization levels per pixel value (the vocabulary), >= 2.
        num_classes: class tokens; 0: unconditional (one start token).
        dim: model width; depth: blocks; heads: attention heads (dim // heads channels each).
        backend: backend of every fused op (None: scope / environment / auto).
        torch_layers: the same network on plain PyTorch ops (same parameter names).
        positions: "rope" (1-D rotary in every layer) or "learned" (pos_emb added to the inputs).
        mlp_hidden: SwiGLU hidden size (None: 8/3 dim rounded up to a multiple of 8).
        eps: RMSNorm epsilon; rope_base: rotary frequency base.

    Parameters: tok_emb (levels, dim), class_emb (max(num_classes, 1), dim), pos_emb (L, dim) when
    learned, blocks.{i}.{norm1, attn, norm2, mlp}, norm_out, head (Linear(dim, levels), no bias).
    """

    def __init__(
        self,
        image_size: int | ImageGPTConfig = 8,
        channels: int = 1,
        levels: int = 16,
        num_classes: int = 10,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        backend: str | None = None,
        torch_layers: bool = False,
        *,
        positions: str = "rope",
        mlp_hidden: int | None = None,
        eps: float = 1e-6,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        if isinstance(image_size, ImageGPTConfig):  # ImageGPT(config, ...): what with_torch_layers calls
            cfg = image_size
        else:
            cfg = ImageGPTConfig(
                image_size, channels, levels, num_classes, dim, depth, heads, positions, mlp_hidden, eps, rope_base
            )
        if not isinstance(torch_layers, (bool, np.bool_)):  # any truthy value would build the other flavour
            raise ValueError(f"torch_layers must be a bool, got {torch_layers!r}")
        self.config, self.torch_layers = cfg, bool(torch_layers)
        self.backend = None if torch_layers else _check_backend(backend)
        self.tok_emb = torch.nn.Embedding(cfg.levels, cfg.dim)
        self.class_emb = torch.nn.Embedding(max(cfg.num_classes, 1), cfg.dim)
        if cfg.positions == "learned":
            self.pos_emb = torch.nn.Parameter(torch.zeros(cfg.seq_len, cfg.dim))
            self.rotary = None
        else:
            self.pos_emb = None
            self.rotary = RotaryEmbedding(cfg.dim_head, cfg.seq_len, cfg.rope_base)
        self.blocks = torch.nn.ModuleList(Block(cfg, self.backend, self.torch_layers) for _ in range(cfg.depth))
        norm = TorchRMSNorm if torch_layers else LayerNormModulate
        self.norm_out = norm(cfg.dim, cfg.eps, elementwise_affine=True, rms=True, backend=self.backend)
        self.head = torch.nn.Linear(cfg.dim, cfg.levels, bias=False)
        self._init_weights()
        self._decoder: _Decoder | None = None  # the captured sampling steps of the last graphed call

    @classmethod
    def from_config(cls, config: ImageGPTConfig, **kwargs) -> ImageGPT:
        """ImageGPT(config, **kwargs) (kwargs: backend, torch_layers)."""
        return cls(config, **kwargs)

    def _init_weights(self) -> None:
        """GPT-2's: N(0, 0.02) weights and embeddings, zero biases, residual projections scaled by
        1 / sqrt(2 depth) so the residual stream's variance does not grow with depth."""
        for m in self.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, torch.nn.Linear) and m.bias is not None:
                    torch.nn.init.zeros_(m.bias)
        for block in self.blocks:
            for proj in (block.attn.to_out[0], block.mlp.fc2):
                torch.nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.config.depth))
        if self.pos_emb is not None:
            torch.nn.init.normal_(self.pos_emb, std=0.02)

    # ----------------------------------------------------------------------- tokens <-> images

    def quantize(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] -> tokens (B, L) int64 in [0, levels): round((x + 1) / 2 * (levels - 1)),
        raster order, channels interleaved (values outside [-1, 1] clamp; NaN is refused, checked on CPU tensors,
        where it needs no synchronization, outside torch.compile, where reading a value would break the graph)."""
        cfg = self.config
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            what = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(
                f"images must be a floating-point tensor in [-1, 1], got {what} (8-bit images: x / 127.5 - 1)"
            )
        if images.dim() != 4 or tuple(images.shape[1:]) != shape:
            raise ValueError(f"images must be (B, {', '.join(map(str, shape))}), got shape {tuple(images.shape)}")
        if images.device.type == "cpu" and not torch.compiler.is_compiling() and torch.isnan(images).any():
            raise ValueError("images hold NaN")
        t = torch.round((images.float().clamp(-1, 1) + 1) * ((cfg.levels - 1) / 2)).long()
        return t.permute(0, 2, 3, 1).flatten(1)

    def dequantize(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L), any integer dtype -> images (B, C, H, W) float32 in [0, 1]: token / (levels - 1)."""
        cfg = self.config
        if not is_index_tensor(tokens) or tokens.dim() != 2 or tokens.shape[1] != cfg.seq_len:
            what = (
                f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            )
            raise ValueError(f"tokens must be an integer tensor (B, {cfg.seq_len}) (B, L = H * W * C), got {what}")
        images = tokens.reshape(-1, cfg.image_size, cfg.image_size, cfg.channels).permute(0, 3, 1, 2)
        return (images.float() / (cfg.levels - 1)).contiguous()

    # ----------------------------------------------------------------------- the network

    def _labels(self, labels, batch: int, device) -> torch.Tensor:
        """The class-token indices (batch,) for ``labels`` (None only without classes)."""
        classes = self.config.num_classes
        if classes == 0:
            if labels is not None:
                raise ValueError("labels must be None for an unconditional model (num_classes=0)")
            return torch.zeros(batch, dtype=torch.long, device=device)
        if labels is None:
            raise ValueError(f"labels (B,) in [0, {classes}) are required: the model is class-conditional")
        if not is_index_tensor(labels) or labels.shape != (batch,):
            raise ValueError(f"labels must be an integer tensor of shape ({batch},), got {labels!r}")
        check_indices("labels", labels, classes)
        return labels.to(device=device, dtype=torch.long)

    def _run(self, x: torch.Tensor, start: int, caches: list[KVCache] | None) -> torch.Tensor:
        """The blocks and the output norm on embedded inputs x (B, l, dim) at positions start .. start + l - 1
        -> norm_out(hidden) (B, l, dim). On genkernels layers every residual add is fused with the norm after
        it (:meth:`Block.forward_fused`); the PyTorch layers add and normalize apart."""
        length = x.shape[1]
        rotary = None
        if self.rotary is not None:
            rotary = self.rotary(start, length)
        else:
            x = x + self.pos_emb[start : start + length].to(x.dtype)
        if self.torch_layers:
            for i, block in enumerate(self.blocks):
                x = block(x, rotary, None if caches is None else caches[i])
            return self.norm_out(x)
        n = self.blocks[0].norm1(x)
        for i, block in enumerate(self.blocks):
            next_norm = self.blocks[i + 1].norm1 if i + 1 < len(self.blocks) else self.norm_out
            x, n = block.forward_fused(x, n, rotary, None if caches is None else caches[i], next_norm)
        return n

    def _logits(self, n: torch.Tensor) -> torch.Tensor:
        """The head on the output norm's result (:meth:`_run`'s)."""
        return self.head(n)

    def _inputs(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[class token, tok_emb(tokens)] (B, 1 + T, dim)."""
        return torch.cat([self.class_emb(labels)[:, None], self.tok_emb(tokens)], dim=1)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits: tokens (B, T) int64 in [0, levels), 1 <= T <= L; labels (B,) in [0, num_classes)
        (None when num_classes = 0) -> logits (B, T, levels) in the parameters' dtype, where logits[:, i]
        predicts tokens[:, i] from the class and tokens[:, :i]."""
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be an int64 torch.Tensor (B, T), got {type(tokens).__name__}")
        if tokens.dim() != 2 or not 1 <= tokens.shape[1] <= self.config.seq_len or tokens.dtype != torch.long:
            raise ValueError(
                f"tokens must be int64 (B, T) with 1 <= T <= L = {self.config.seq_len}, "
                f"got {tokens.dtype} {tuple(tokens.shape)}"
            )
        check_indices("tokens", tokens, self.config.levels)
        labels = self._labels(labels, tokens.shape[0], tokens.device)
        return self._logits(self._run(self._inputs(tokens[:, :-1], labels), 0, None))

    def loss(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy (nats per token; float32, float64 for a float64 model) of images
        (B, C, H, W) in [-1, 1] (genkernels.data's range) given their labels (B,) (None when num_classes = 0)."""
        tokens = self.quantize(images)
        logits = self(tokens, labels)
        wide = torch.promote_types(logits.dtype, torch.float32)
        return F.cross_entropy(logits.to(wide).flatten(0, 1), tokens.flatten())

    # ----------------------------------------------------------------------- sampling

    def _sample_labels(self, n: int, labels, device) -> torch.Tensor | None:
        """The class ids (n,) int64 on ``device`` of :meth:`sample`'s labels (None without classes). A tensor's
        values are range-checked outside torch.compile only (reading them there is a graph break; traced, a class
        out of range fails in the embedding instead)."""
        classes = self.config.num_classes
        if classes == 0:
            if labels is not None:
                raise ValueError("labels must be None for an unconditional model (num_classes=0)")
            return None
        if labels is None:
            return torch.arange(n, device=device) % classes
        if is_integer(labels):
            if not 0 <= labels < classes:
                raise ValueError(f"labels must be in [0, {classes}), got {int(labels)}")
            return torch.full((n,), int(labels), dtype=torch.long, device=device)
        if not is_index_tensor(labels) or labels.shape != (n,):
            raise ValueError(f"labels must be None, an int or an integer tensor of shape ({n},), got {labels!r}")
        if not torch.compiler.is_compiling():
            low, high = int(labels.min()), int(labels.max())  # n >= 1: not empty
            if low < 0 or high >= classes:
                raise ValueError(f"labels must be in [0, {classes}), got values {low} .. {high}")
        return labels.to(device=device, dtype=torch.long)

    def _draw(
        self,
        logits: torch.Tensor,
        u: torch.Tensor,
        temperature: float,
        top_k: int | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token per row of logits (n, levels) by inverse transform sampling with uniforms u (n,) in (0, 1]
        (into ``out`` (n,) int64 when given)."""
        if temperature == 0:
            index = logits.argmax(-1)
            return index if out is None else out.copy_(index)
        wide = torch.promote_types(logits.dtype, torch.float32)
        if temperature == 1 and top_k is None:
            p = torch.softmax(logits, -1, dtype=wide)  # the same numbers as the general path: softmax takes the max
        else:
            # Relative to the row's best score, so that a tiny temperature gives -inf, not inf - inf, at worst. A
            # temperature below wide's normal range could round to 0 there (0 / 0 = nan at the best score); at its
            # smallest normal number any score 1e-36 or more short of the best already has probability 0.
            scores = logits.to(wide)
            scores = (scores - scores.amax(-1, keepdim=True)) / max(temperature, torch.finfo(wide).tiny)
            if top_k is not None and top_k < scores.shape[-1]:
                kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            p = torch.softmax(scores, dim=-1)
        cdf = p.cumsum(-1)
        # The first token whose cumulative probability reaches u * total (the count of entries below it: cdf does
        # not decrease); zero-probability tokens never are (u > 0), and the clamp guards the last one against
        # rounding.
        index = torch.searchsorted(cdf, u.to(wide)[:, None] * cdf[:, -1:])[:, 0]
        if out is not None and torch.compiler.is_dynamo_compiling():  # dynamo refuses an out= with gaps
            return out.copy_(torch.clamp_max(index, cdf.shape[-1] - 1))
        return torch.clamp_max(index, cdf.shape[-1] - 1, out=out)

    @torch.no_grad()
    def sample_tokens(
        self,
        n: int,
        labels: torch.Tensor | int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        cuda_graph: bool | None = None,
    ) -> torch.Tensor:
        """Draw n token sequences (n, L) int64, one token at a time; the arguments are those of :meth:`sample`."""
        n = _positive_int("n", n)
        if not (is_finite_real(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
        temperature = as_number(temperature)
        if not isinstance(use_cache, bool):
            raise ValueError(f"use_cache must be True or False, got {use_cache!r}")
        seed = optional_seed(seed)
        levels, length = self.config.levels, self.config.seq_len
        if top_k is not None:
            if not is_integer(top_k) or not 1 <= top_k <= levels:
                raise ValueError(f"top_k must be None or an int in [1, levels={levels}], got {top_k!r}")
            top_k = int(top_k)
        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be None, True or False, got {cuda_graph!r}")
        param = self.head.weight
        device = param.device
        if cuda_graph and not (use_cache and device.type == "cuda"):
            raise ValueError(
                f"cuda_graph=True needs use_cache=True and a model on a CUDA device, got use_cache={use_cache} "
                f"on {device}"
            )
        labels = self._sample_labels(n, labels, device)
        u = _uniforms(n, length, seed)
        class_ids = torch.zeros(n, dtype=torch.long, device=device) if labels is None else labels
        if use_cache:
            if cuda_graph is None:  # traced, the steps are the compiler's to fuse (and graph: "reduce-overhead")
                cuda_graph = device.type == "cuda" and not torch.compiler.is_compiling()
            if cuda_graph:
                return self._sample_graphed(n, temperature, top_k, device, class_ids, u)
            return _Decoder(self, None, n, temperature, top_k, device, graphed=False).run(class_ids, u)
        u = u.to(device)
        first = self.class_emb(class_ids)[:, None]
        tokens = torch.zeros(n, length, dtype=torch.long, device=device)
        for t in range(length):
            n = self._run(torch.cat([first, self.tok_emb(tokens[:, :t])], dim=1), 0, None)
            tokens[:, t] = self._draw(self._logits(n[:, -1:])[:, 0], u[:, t], temperature, top_k)
        return tokens

    def _decode_step(self, t: int, d: _Decoder) -> None:
        """Cached decoding step t on the decoder's buffers: token t of every sequence into d.tokens[:, t]."""
        x = self.class_emb(d.class_ids)[:, None] if t == 0 else self.tok_emb(d.tokens[:, t - 1 : t])
        logits = self._logits(self._run(x, t, d.caches)[:, -1:])[:, 0]
        self._draw(logits, d.u[:, t], d.temperature, d.top_k, out=d.tokens[:, t])

    @_outside_graph(
        "ImageGPT's CUDA graphs are captured and replayed in eager mode: sample with cuda_graph=None or False to "
        "have torch.compile trace the decoding steps"
    )
    def _sample_graphed(self, n: int, temperature: float, top_k: int | None, device, class_ids, u) -> torch.Tensor:
        """Cached sampling on CUDA graphs: the kept graphs when they fit this call, else new ones (then kept).
        Outside torch.compile (dynamo would trace the steps while they are captured)."""
        key = _Decoder.key_of(self, n, temperature, top_k)
        if self._decoder is None or self._decoder.key != key:
            self._decoder = None  # the graphs of other arguments go before new ones are captured
            with torch.inference_mode(False):  # kept for later calls: normal tensors, writable outside the mode
                self._decoder = _Decoder(self, key, n, temperature, top_k, device, graphed=True)
        return self._decoder.run(class_ids, u)

    def release_graphs(self) -> None:
        """Free the CUDA graphs (and their memory) that cached sampling keeps for its next call."""
        self._decoder = None

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: torch.Tensor | int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        cuda_graph: bool | None = None,
    ) -> torch.Tensor:
        """Sample n images (n, C, H, W) float32 in [0, 1].

        Args:
            n: number of images.
            labels: the class of every image: (n,) integers, one int, or None (classes 0, 1, ... in turn;
                must be None when num_classes = 0). Out of range: a ValueError (under torch.compile, which cannot
                read a tensor's values, the embedding's index error).
            temperature: logits are divided by it; 0 takes the most likely token (greedy).
            top_k: sample among the k most likely tokens only (None: all); tokens tied with the k-th score are
                kept too, as in common top-k samplers.
            seed: seeds the one CPU torch.Generator all the randomness comes from (None: a random seed).
            use_cache: decode with the KV cache (one token per step, attention with Lq = 1); False
                recomputes the whole prefix every step. Both give the same tokens for the same seed,
                up to ties flipped by floating-point rounding.
            cuda_graph: replay the cached decoding steps as CUDA graphs captured on the first call (see
                the module docstring): None (default) on a CUDA device with use_cache (not under torch.compile),
                True to require it, False never. The same tokens as without graphs.

        Under torch.compile, compile this method itself (``torch.compile(model.sample)``, not fullgraph: the seeded
        draw of the uniforms is a graph break); see the module docstring.
        """
        return self.dequantize(self.sample_tokens(n, labels, temperature, top_k, seed, use_cache, cuda_graph))

    def extra_repr(self) -> str:
        extra = ", torch_layers=True" if self.torch_layers else ""
        if self.backend is not None:
            extra += f", backend={self.backend!r}"
        return f"{self.config}{extra}"


class _Decoder:
    """Cached decoding of n sequences on fixed buffers (class ids, uniforms, tokens, one KV cache per layer):
    the L steps of :meth:`ImageGPT._decode_step`, run directly or, ``graphed``, captured once as one CUDA
    graph each (all in one memory pool, replayed in the order they were captured) and replayed by every
    :meth:`run`."""

    def __init__(self, model: ImageGPT, key: tuple | None, n: int, temperature: float, top_k, device, graphed: bool):
        length = model.config.seq_len
        self.model, self.key, self.temperature, self.top_k = model, key, temperature, top_k
        self.class_ids = torch.zeros(n, dtype=torch.long, device=device)
        # The uniforms in the dtype the draw compares them in (the same numbers as casting float64 there).
        wide = torch.promote_types(model.head.weight.dtype, torch.float32)
        self.u = torch.ones(n, length, dtype=wide, device=device)
        self.tokens = torch.zeros(n, length, dtype=torch.long, device=device)
        self.caches = [block.attn.new_cache(n, length) for block in model.blocks]
        for block, cache in zip(model.blocks, self.caches):  # the stacked projections, refreshed by every later run
            cache.projection = block.attn.stacked_projection()
        self.stacked_now = True  # the projections above are the weights as they are: the first run keeps them
        self.graphs: list = []
        if graphed:
            self._capture(device)

    @staticmethod
    def key_of(model: ImageGPT, n: int, temperature: float, top_k) -> tuple:
        """What the graphs depend on: the arguments, the parameters' and buffers' addresses and dtypes, CUDA
        autocast's state (a graph captured under autocast runs its casts at every replay), and what chose the
        kernels it recorded: the backend every op asks for (``genkernels.backend`` blocks, GENKERNELS_BACKEND) and
        the float32 matmul precision."""
        tensors = [*model.parameters(), *model.buffers()]
        backends = tuple(_registry.requested(op=op) for op in _registry.ops())
        return (
            n,
            float(temperature),
            top_k,
            tuple((t.data_ptr(), t.dtype) for t in tensors),
            backends,
            torch.get_float32_matmul_precision(),
            _cuda_autocast(),
        )

    def _steps(self) -> None:
        for cache in self.caches:
            cache.reset()
        for t in range(self.model.config.seq_len):
            self.model._decode_step(t, self)

    def _capture(self, device) -> None:
        """Run the steps once uncaptured on a side stream (kernels compiled, workspaces allocated), then capture
        each step in its own graph on that stream (capture_begin / capture_end directly: torch.cuda.graph
        would empty the allocator's cache at every one of the L captures); both in ``genkernels.graph_mode()``."""
        current = torch.cuda.current_stream(device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream), _registry.graph_mode():
            self._steps()
            torch.cuda.synchronize(device)
            pool = torch.cuda.graph_pool_handle()
            for cache in self.caches:
                cache.reset()
            for t in range(self.model.config.seq_len):
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(pool=pool)
                try:
                    self.model._decode_step(t, self)
                finally:
                    graph.capture_end()
                self.graphs.append(graph)
        current.wait_stream(stream)

    def __deepcopy__(self, memo) -> None:
        return None  # a copied model decodes without graphs until it captures its own

    def __reduce__(self):
        return (_no_decoder, ())

    def run(self, class_ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The tokens (n, L) of the sequences of class_ids (n,) drawn with the uniforms u (n, L)."""
        with torch.no_grad():  # not the decorator: dynamo cannot inline a decorated method of an object it made
            self.class_ids.copy_(class_ids)
            self.u.copy_(u)
            if not self.stacked_now:  # the weights as they are now, where graphs read them
                for block, cache in zip(self.model.blocks, self.caches):
                    block.attn.stacked_projection(out=cache.projection)
            self.stacked_now = False
            if self.graphs:
                for graph in self.graphs:
                    graph.replay()
            else:
                self._steps()
            return self.tokens.clone()


def _cuda_autocast() -> torch.dtype | None:
    """The dtype CUDA autocast casts to in this context, or None when it is off."""
    if not torch.is_autocast_enabled("cuda"):
        return None
    get = getattr(torch, "get_autocast_dtype", None)  # torch >= 2.4; before, the GPU-only getter
    return get("cuda") if get is not None else torch.get_autocast_gpu_dtype()


def _no_decoder() -> None:
    """What a pickled model's decoder becomes: none (graphs are captured again on the first call)."""
    return None
