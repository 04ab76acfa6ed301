"""Scaled dot-product attention, forward and backward, in Triton (the FlashAttention-2 algorithm).

Shapes. q: (B, Hq, Lq, D); k, v: (B, Hkv, Lkv, D) with Hq a multiple of Hkv: query head h reads kv
head h // (Hq / Hkv), by indexing (k and v are never repeated). Any B, H, L strides work (a
transposed view of a (B, L, H, D) tensor, k and v expanded along B with stride 0); the last
stride is 1. Head dims 1 to 256: tiles are padded to BLOCK_D = max(16, next_pow2(D)) columns by
masked loads inside the kernels, so nothing is copied to pad; the forward and (on sm_90) the backward's
dq and dk/dv kernels instead split a head dim that a power-of-two block and a narrower one cover in fewer
columns (40 = 32 + 16 with 8 masked, 72 and 80 = 64 + 16, 96 = 64 + 32: 83 to 100% of the
tensor-core columns useful instead of 56 to 75%), with two dots for each product over D and an
accumulator per block. float32 head dims beyond 128 are split 128 + the rest on every target and in all
three kernels, for precision (below). out has q's memory order (heads inner
where q's are: genkernels._layout.heads_like); the other outputs are contiguous. Row strides that
are not multiples of 16 elements (D = 40, 72) are passed with their largest power-of-two divisor
(ALIGN), so that loads are 16-byte vectors and the forward's key and value blocks are pipelined.

Forward, per query row i with allowed(i, j) = not key_padding_mask[b, j] and (not causal or
j <= i + Lkv - Lq) (causal is aligned bottom-right):

    s_ij = scale * q_i . k_j,   lse_i = log sum_{allowed j} exp(s_ij),   out_i = sum_j exp(s_ij - lse_i) v_j

computed by an online softmax over key blocks in float32, in base 2 (scale * log2(e) is folded
into one multiplier, so each score costs one exp2). A row with no allowed key keeps a running max
of -inf; the max used to shift is then 0 instead of -inf, so no -inf - -inf is formed, and the
row ends with out = 0 and lse = -inf.

Backward (recomputing p from q, k and lse, never storing it), with delta_i = sum_d dout_id out_id
= sum_j p_ij dp_ij:

    p_ij = exp(s_ij - lse_i) where allowed, else exactly 0;  dp_ij = dout_i . v_j
    ds_ij = p_ij (dp_ij - delta_i);  dq_i = scale sum_j ds_ij k_j
    dk_j = scale sum_{h in group} sum_i ds_ij q_i;   dv_j = sum_{h in group} sum_i p_ij dout_i

For 16-bit inputs delta is not taken from the rounded out alone: out was rounded to 8 or 11 bits,
and the error dout . (rounding of out) enters every ds of the row; on peaked rows it exceeds the
rounding of dq and dk themselves. A forward that will be differentiated therefore also writes
out's rounding residual (float32 out - rounded out, in the input dtype: one more output-sized
write and read), and delta is formed from out + residual, as from the float32 output. Four
kernels, none with atomics (results are bitwise reproducible):

- ``_attn_fwd_kernel``, grid (cdiv(Lq, BLOCK_M), B * Hq): a query block in registers, K and V
  blocks streamed. Traffic: q read once; k and v read once per query block (cdiv(Lq, BLOCK_M)
  times per query head, mostly from L2); out (2 or 4 bytes) and lse (4 bytes) written once per
  element (and the residual, when kept). FLOPs: 4 Lq Lkv D per (b, h) (two dots), about half of
  that when causal.
- ``_attn_bwd_delta_kernel``, grid (cdiv(Lq, BLOCK_M), B * Hq): delta from out (+ residual) and
  dout. Traffic: out, residual and dout read once, 4 bytes per row written; 2 Lq D FLOPs per (b, h).
- ``_attn_bwd_dq_kernel``, grid (cdiv(Lq, BLOCK_M), B * Hq): one query block's dq, looping over
  key blocks. Traffic: q, dout, lse and delta read once, dq written once; k and v read once per
  query block. FLOPs: 6 Lq Lkv D per query head (s, dp, dq dots).
- ``_attn_bwd_dkdv_kernel``, grid (cdiv(Lkv, BLOCK_N), B * Hkv): one key block's dk and dv in
  float32 registers, looping over the Hq / Hkv query heads of its group and their query blocks.
  Traffic: k and v read once, dk and dv written once; q, dout, lse, delta read once per key
  block. FLOPs: 8 Lq Lkv D per query head (s, dv, dp, dk dots).

The backward thus computes 14 Lq Lkv D per query head, 3.5 times the forward: s and dp are
computed in both backward kernels, so that neither needs atomics (a single-kernel backward that
adds dq with atomics computes 10 Lq Lkv D, but its sums depend on the order of the atomics).

Causal launches skip key (or query) blocks that the mask removes entirely, by their loop bounds.
In the forward and dq kernels, the remaining key blocks that cross the diagonal or the end of the keys
apply the masks and those fully inside do not: one loop over all of them tests each block at run time
(a launch with no such block, TAIL false, compiles without the test). Two loops in a row, the masked
blocks' after the others', made ptxas serialize every wgmma of those kernels on sm_90 (each product
waited for before the next one issued; tests/triton/test_compile.py reads ptxas's verdict). The dk/dv kernel
applies the causal mask to each visible query block: a second, unmasked copy of its loop pushed
it past 255 registers (sm_90, d128), and one compare-and-select per score is cheap next to its
four dots. The key padding mask is a (B, Lkv) uint8 view of the bool mask, read one key block
at a time.

Precision. All dots accumulate in float32. 16-bit inputs: p and ds are cast to the input dtype
before their dots, as the tensor cores take them. float32 inputs: dots are IEEE float32 (no
TF32), so float32 results meet the float32 test criterion. Such a dot is an FMA chain per element
(triton's lowering: acc = fma(a_k, b_k, acc), k in order), whose rounding grows with the chain: over a
head dim of 200 to 256 the scores' rounding, multiplied by |dp - delta| ~ sqrt(D) in ds, took dq and dk
past the criterion (the reference's sgemm sums K in blocks of 128); so a float32 product over the head dim
is two chains of at most 128 terms, added (``_dot2``, :data:`FP32_CHAIN`). The recomputed p sums to 1
over a row, as the reference's softmax does, only because the backward recomputes the forward's q . k bit
for bit: the same chains in the same order give the same bits in either orientation (q k^T, k q^T) and
any tiling; a score off by e makes the dominant p of a peaked row off by p e, where a normalized one is
off by p (1 - p) e. (Under the interpreter tl.dot is numpy's matmul, whose summation order depends on the
operands' roles and tile shapes: there the dk/dv kernel's scores differ from the forward's, by 2e-5 in a
200-term q . k, and its dk, dv at large head dims carry that; tests/ops/test_attention_edges.py gives the
interpreter the GPU's float32 dot for that check.)

Launch configurations come from :data:`CONFIGS` (see there); nothing is autotuned, so the same
shapes always give the same launches and the same bits.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from genkernels._layout import heads_like
from genkernels.triton._common import cdiv, interpreting, next_power_of_2, on_device, tl, triton, triton_unavailable

MAX_HEAD_DIM = 256
# CUDA's limit on a grid's y dimension, where every kernel puts its (batch, head) pairs: launches of more than
# MAX_GRID_Y // Hq batch entries are split along the batch (:func:`_batch_parts`), so that B * Hq beyond it
# (temporal attention over every pixel of a video latent: B = frames' pixels) launches, where one launch failed
# with "Triton Error [CUDA]: invalid argument".
MAX_GRID_Y = 65535
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

# tl.dot took ``allow_tf32`` before ``input_precision`` replaced it; both spell "no TF32".
_DOT_INPUT_PRECISION = triton is not None and "input_precision" in inspect.signature(tl.dot).parameters

# (arch, BLOCK_D, element bytes, kernel) -> (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_D is
# 64 for every head dim up to 64 (smaller tiles only lower register and shared-memory use).
# arch 90: sm_90 and sm_100 (227 KB of shared memory per block; on sm_90 tl.dot becomes wgmma with
# 4 or 8 warps). arch 80: sm_80 / sm_87 (163 KB, mma.sync). arch 86: every other GPU, with the
# 99 KB of sm_86 / sm_89 / sm_120 or more.
#
# Sizing, 16-bit inputs. Every kernel keeps one [rows, BLOCK_D] float32 accumulator per output
# (the forward's acc, dq; dk and dv) and pipelines num_stages blocks of the streamed operands
# through shared memory. Forward: q [BLOCK_M, BLOCK_D] and acc stay put, K and V stream: shared
# memory about (BLOCK_M + 2 num_stages BLOCK_N) BLOCK_D 2 bytes (d128 on sm_90, 128 / 64 / 3
# stages: 128 KB); acc is BLOCK_M BLOCK_D / (32 num_warps) registers a thread (64 at d128).
# dk/dv: k, v, dk, dv [BLOCK_N, BLOCK_D] stay put, q and dout stream; with four resident tiles
# it is the register-bound kernel, hence BLOCK_M 32 and BLOCK_N 128 only up to d64; at d256 the
# dk, dv tiles leave no room for a 64-row wgmma tile, so it runs 32 x 32 mma tiles. dq: q, dout,
# dq stay put and BLOCK_N is small. Each entry was compiled for its target (ptxas: no spills,
# at most 255 registers; see tests/triton/test_compile.py).
#
# float32 inputs: IEEE float32 dots have no tensor-core path; they become FMA loops whose
# operand slices live in registers, so tiles are kept to BLOCK_M BLOCK_N BLOCK_D <= 2^14 a warp;
# they are the same on every target (at most 67 KB of shared memory).
_FP32_CONFIGS = {
    (64, "fwd"): (64, 32, 8, 2),
    (128, "fwd"): (32, 32, 8, 2),
    (256, "fwd"): (32, 16, 8, 2),
    (64, "dkdv"): (16, 32, 8, 2),
    (128, "dkdv"): (16, 32, 8, 2),
    (256, "dkdv"): (16, 16, 8, 2),
    (64, "dq"): (32, 32, 4, 2),
    (128, "dq"): (32, 16, 8, 2),
    (256, "dq"): (16, 16, 8, 2),
}
CONFIGS: dict[tuple[int, int, int, str], tuple[int, int, int, int]] = {
    (90, 64, 2, "fwd"): (128, 128, 8, 3),
    (90, 128, 2, "fwd"): (128, 64, 8, 3),
    (90, 256, 2, "fwd"): (64, 32, 8, 2),
    (90, 64, 2, "dkdv"): (32, 128, 8, 3),
    (90, 128, 2, "dkdv"): (32, 64, 8, 2),
    (90, 256, 2, "dkdv"): (32, 32, 8, 2),
    (90, 64, 2, "dq"): (128, 32, 8, 3),
    (90, 128, 2, "dq"): (128, 32, 8, 2),
    (90, 256, 2, "dq"): (64, 16, 8, 2),
    (80, 64, 2, "fwd"): (64, 64, 4, 2),
    (80, 128, 2, "fwd"): (128, 32, 8, 2),
    (80, 256, 2, "fwd"): (64, 32, 8, 2),
    (80, 64, 2, "dkdv"): (16, 64, 8, 2),
    (80, 128, 2, "dkdv"): (32, 64, 8, 2),
    (80, 256, 2, "dkdv"): (32, 32, 8, 1),
    (80, 64, 2, "dq"): (64, 32, 8, 2),
    (80, 128, 2, "dq"): (64, 32, 4, 2),
    (80, 256, 2, "dq"): (64, 16, 8, 2),
    (86, 64, 2, "fwd"): (64, 64, 4, 2),
    (86, 128, 2, "fwd"): (64, 64, 4, 2),
    (86, 256, 2, "fwd"): (64, 32, 8, 1),
    (86, 64, 2, "dkdv"): (16, 64, 8, 2),
    (86, 128, 2, "dkdv"): (32, 64, 8, 1),
    (86, 256, 2, "dkdv"): (32, 32, 8, 1),
    (86, 64, 2, "dq"): (64, 32, 4, 2),
    (86, 128, 2, "dq"): (64, 32, 4, 1),
    (86, 256, 2, "dq"): (64, 16, 8, 1),
    **{(arch, block_d, 4, kernel): c for arch in (90, 80, 86) for (block_d, kernel), c in _FP32_CONFIGS.items()},
}
# The sm_90 16-bit forward without a key padding mask at head dims up to 72 (SD1.5's 40, SDXL's 64, DiT's 72 split
# 64 + 16), beyond decoding: one warpgroup on 128 query rows, key blocks of 64, three stages. Timed on an H200
# (triton 3.6, bf16, scripts/gpu_attention_sweep.py, once the wgmmas were no longer serialized) against CONFIGS'
# (128, 128, 8, 3): 0.446 against 0.563 ms at DiT-XL d72 (2, 16, 4096, 4096), 0.229 against 0.252 at SDXL d64
# (2, 10, 4096, 4096), 0.185 against 0.226 at SD1.5 d40 (2, 8, 4096, 4096). It takes 255 registers at d72 and
# spills 4 bytes at d80, which keeps CONFIGS' tiles, as do masked calls and decoding (not timed with it).
FWD_90_UNMASKED = (128, 64, 4, 3)
FWD_90_UNMASKED_MAX_D = 72
# The same forward, not causal, at head dims that take one unsplit block of 64 or 128 columns (57 to 64: SDXL's 64;
# 97 to 128: FLUX's and SD3's 128): one warpgroup on 64 query rows, key blocks of 64, three stages, so that blocks
# share an SM (d64: 56 KB of shared memory, 119 registers; d128: 112 KB, 214: two blocks). Timed on an H200 (the
# same sweep): 0.216 ms against 0.229 for FWD_90_UNMASKED at SDXL d64 (2, 10, 4096, 4096), 0.534 against 0.580 for
# CONFIGS' (128, 64, 8, 3) at FLUX d128 (1, 24, 4608, 4608), where 2 and 4 stages took 0.685 and 0.775 (4 stages:
# one block an SM). Registers under triton 3.6 (3.9: 117 and 218), no spill, ragged Lkv included. Causal and
# masked calls keep the tiles above (not timed with it); at d72 and d40 it was slower (0.495 against 0.446 ms and
# 0.210 against 0.185).
FWD_90_UNSPLIT = (64, 64, 4, 3)
# Under the interpreter every program runs serially on the CPU: small tiles, and unequal ones, as on
# the GPU (BLOCK_M > BLOCK_N for fwd and dq, BLOCK_M < BLOCK_N for dk/dv), so that the causal
# block bounds are exercised with tiles that do not line up.
# The decoding forward (at most DECODE_ROWS queries) gets 16-row tiles and 32-key blocks there, as on the GPU
# a query block smaller than its key block.
_INTERPRETER_CONFIGS = {"fwd": (32, 16, 4, 1), "dq": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "decode": (16, 32, 4, 1)}
# Decoding: a few queries (a KV cache's step: Lq = 1) against many keys. A CONFIGS query block would be
# almost all padding (Lq = 1 in a 128-row tile: 127 of every 128 rows of each dot wasted, and 8 warps for
# one row), so the forward runs queries up to DECODE_ROWS in 16-row tiles (the smallest dot) on 4 warps,
# with the key block and stages of the head dim's entry (sm_90, d64 and d128: 71,680 bytes of shared memory,
# 134 and 136 registers, as compiled by tests/triton/test_compile.py, which builds ImageGPT's decoding call).
DECODE_ROWS = 16
# The delta kernel is elementwise: rows per program, so that a thread of its 4 warps holds at
# most 16 elements of each of out, its residual and dout.
_DELTA_ELEMENTS = 2048
# The longest FMA chain of a float32 product over the head dim (:func:`_column_blocks`; why: "Precision" in the
# module docstring).
FP32_CHAIN = 128


# The most rows of a tile in any kernel (:func:`_rows64`).
_MAX_TILE_ROWS = max(
    max(c[:2]) for c in (*CONFIGS.values(), *_INTERPRETER_CONFIGS.values(), FWD_90_UNMASKED, FWD_90_UNSPLIT)
)

# Head counts and lengths vary from call to call and only bound loops and masks: compiling a
# kernel per value class (1, multiple of 16, other) would multiply the compiles for nothing. (Each
# kernel names exactly its own parameters: some triton versions reject unknown names.)
_SIZE_ARGS = ("hq", "hkv", "lq", "lkv")


# The CONFIGS arch class used where the device cannot be queried (CPU under the interpreter, or
# the compile check, which sets it to the target it compiles for).
FALLBACK_ARCH = 90


def _arch(device: torch.device) -> int:
    """The CONFIGS arch class of ``device`` (FALLBACK_ARCH when it is not a CUDA device)."""
    if device.type != "cuda":
        return FALLBACK_ARCH
    major, minor = torch.cuda.get_device_capability(device)
    if major in (9, 10):
        return 90
    return 80 if (major, minor) in ((8, 0), (8, 7)) else 86


def _one_loop(q: Tensor) -> bool:
    """Whether the forward and dq kernels walk the key blocks in one loop (a run-time test masks the blocks
    that Lkv's end or the causal diagonal cuts) or in two (the unmasked blocks, then the masked ones). One on
    the sm_90 class: two loops in a row made ptxas serialize every wgmma of the kernel. Two elsewhere, where
    tl.dot is mma.sync: on sm_80 the one loop took d64's masked forward from 255 registers to 168 and a 4-byte
    spill (ptxas of triton 3.6 and 3.9)."""
    return _arch(q.device) == 90


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def _head_split(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2) of the forward, dq and dk/dv kernels: the head dim as a power-of-two block and a
    second, narrower one (at least 16, the smallest dot) when the two cover it in fewer columns than one padded
    block (D = 40: 32 + 16; 72 and 80: 64 + 16; 96: 64 + 32), else (the padded block, 0)."""
    full = _block_d(head_dim)
    low = max(16, 1 << (head_dim.bit_length() - 1))
    if low >= head_dim:
        return full, 0
    tail = max(16, next_power_of_2(head_dim - low))
    return (low, tail) if low + tail < full else (full, 0)


def _backward_split(q: Tensor) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2) of the dq and dk/dv kernels: :func:`_head_split` on sm_90, where their split
    variants compile without spills (triton 3.6 and 3.9); elsewhere the padded block (on sm_80 the dk/dv
    kernel at D = 80 split spilled 40 bytes at 255 registers under triton 3.9, with CONFIGS' tiles)."""
    d = q.shape[-1]
    return _head_split(d) if _arch(q.device) == 90 else (_block_d(d), 0)


def _column_blocks(q: Tensor, backward: bool) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2) of the forward (``backward`` False) or of the dq and dk/dv kernels. float32 head dims
    beyond FP32_CHAIN: (FP32_CHAIN, the rest padded), on every target and in every kernel, so that each product
    over the head dim is two FMA chains of at most FP32_CHAIN terms (:func:`_dot2`), and the backward recomputes
    the forward's scores bit for bit. Otherwise :func:`_head_split` (forward) and :func:`_backward_split`."""
    d = q.shape[-1]
    if q.dtype == torch.float32 and d > FP32_CHAIN:
        return FP32_CHAIN, max(16, next_power_of_2(d - FP32_CHAIN))
    return _backward_split(q) if backward else _head_split(d)


def _config(q: Tensor, kernel: str, masked: bool = False, causal: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel`` ("fwd", "dkdv", "dq") for q (``masked``: with a
    key padding mask; ``causal``: the causal mask); the forward of at most DECODE_ROWS queries takes 16-row tiles
    on 4 warps (decoding); the sm_90 16-bit forward without a key padding mask takes FWD_90_UNSPLIT at an unsplit
    BLOCK_D of 64 or 128 when not causal, else FWD_90_UNMASKED up to head dim 72."""
    decode = kernel == "fwd" and q.shape[2] <= DECODE_ROWS
    if interpreting():
        return _INTERPRETER_CONFIGS["decode" if decode else kernel]
    arch, d = _arch(q.device), q.shape[-1]
    if kernel == "fwd" and not (decode or masked) and arch == 90 and q.element_size() == 2:
        if not causal and _head_split(d) in ((64, 0), (128, 0)):
            return FWD_90_UNSPLIT
        if d <= FWD_90_UNMASKED_MAX_D:
            return FWD_90_UNMASKED
    block = _config_block(d, arch, "decode" if decode else kernel, masked)
    block_m, block_n, num_warps, num_stages = CONFIGS[(arch, block, q.element_size(), kernel)]
    return (DECODE_ROWS, block_n, 4, num_stages) if decode else (block_m, block_n, num_warps, num_stages)


def _config_block(head_dim: int, arch: int, kernel: str, masked: bool) -> int:
    """The BLOCK_D class of CONFIGS whose tiles ``kernel`` ("fwd", "dkdv", "dq", or "decode": the forward of at
    most DECODE_ROWS queries) takes at ``head_dim``, where :func:`_config` does not take FWD_90_UNMASKED or
    FWD_90_UNSPLIT (the sm_90 16-bit forward without a key padding mask): the padded head dim (at least 64), except
    for the sm_90 forward without a key padding mask at head dims 65 to 80 (DiT's 72), split 64 + 16: its 80
    columns take d64's 128 x 128 tiles (half the key-block steps of the online softmax of d128's 128 x 64),
    which compile there without spills (225 to 232 registers, 143 KB of shared memory). The mask's extra live
    values spill 24 to 80 bytes on them, and so do 16-row decoding tiles with 128 keys at 80 (56 bytes, 4
    warps): those keep d128's key block."""
    if arch == 90 and kernel == "fwd" and not masked and _head_split(head_dim) == (64, 16):
        return 64
    return max(64, _block_d(head_dim))


def not_supported(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    key_padding_mask: Tensor | None,
    needs_grad: bool,
) -> str | None:
    """Why the triton backend cannot run this attention call, or None when it can.

    The op has validated shapes and devices; what remains is whether triton can run on q's
    device, the dtype and the head dim (the kernels pad D to a power of two up to 256). The
    backward runs wherever the forward does, so ``needs_grad`` changes nothing."""
    reason = triton_unavailable(q, "q")
    if reason is not None:
        if triton is None:
            return reason
        return f"q is on {q.device.type}: the triton backend needs a CUDA tensor (or TRITON_INTERPRET=1 for testing)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"q is {q.dtype}: the triton backend supports float16, bfloat16 and float32"
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim}: the triton backend supports head dims up to {MAX_HEAD_DIM}"
    if q.shape[1] > MAX_GRID_Y:
        return f"{q.shape[1]} query heads: the triton backend supports up to {MAX_GRID_Y} (programs along the grid's y)"
    return None


def _batch_parts(batch: int, heads: int, *tensors: Tensor):
    """(entries, views) of each launch: the tensors (batch-first) themselves when batch * heads programs fit the
    grid's y (MAX_GRID_Y, one program per (batch entry, head)), else consecutive slices of at most
    MAX_GRID_Y // heads entries. Sliced along B, every tensor keeps its strides, and the kernels index lse,
    delta, the residual, the mask and the gradients from the slice's start: each launch computes its entries."""
    if batch * heads <= MAX_GRID_Y:
        yield batch, tensors
        return
    step = MAX_GRID_Y // heads
    for start in range(0, batch, step):
        stop = min(start + step, batch)
        yield stop - start, tuple(t[start:stop] for t in tensors)


def _align(*tensors: Tensor) -> int:
    """ALIGN of the kernels: the widest vector (in elements, at most 16 bytes) that every row of the tensors
    starts on, i.e. the largest power of two dividing all their B, H and L strides. Passed as a constexpr
    and rebuilt in the kernels as (stride // ALIGN) * ALIGN, it lets loads use 16-byte vectors (and the
    forward's key and value blocks go through cp.async pipelining) where triton would otherwise prove
    nothing: it specializes a stride only when it is a multiple of 16 elements, and head dims such as 40
    and 72 are not (their loads were 2-byte scalars: sm_90 SASS of the bf16 forward, LDG.E.U16). 1 when
    every stride is a multiple of 16 elements: triton's own specialization covers those, and the rebuilt
    strides cost registers (the d128 forward spilled at 255 with them)."""
    strides = [s for t in tensors for s in t.stride()[:-1]]
    if all(s % 16 == 0 for s in strides):
        return 1
    align = 16 // tensors[0].element_size()
    for stride in strides:
        while align > 1 and stride % align:
            align //= 2
    return align


def _rows64(*tensors: Tensor) -> bool:
    """ROWS64 of the kernels: whether an element offset inside a tile, row * the row (L) stride + column, can pass
    2^31 - 1 for one of the tensors (tiles of at most _MAX_TILE_ROWS rows and 2 * MAX_HEAD_DIM columns). The
    kernels form those offsets in 32 bits otherwise (fewer registers); a row stride of 2^24 elements or more (a
    (L, B, H, D) tensor seen as (B, H, L, D) with B * H * D >= 2^24: temporal attention over a video latent's
    pixels) made them wrap, and the kernels read and wrote the wrong rows."""
    return any((_MAX_TILE_ROWS - 1) * t.stride(2) + 2 * MAX_HEAD_DIM > 2**31 - 1 for t in tensors)


def _mask_arg(key_padding_mask: Tensor | None, q: Tensor) -> Tensor:
    """The key padding mask as uint8 (same bytes as bool), or q as a never-read placeholder."""
    return key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q


def _bh_strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    key_padding_mask: Tensor | None,
    keep_residual: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """softmax(scale * q k^T + mask) v and its row log-sum-exp, in one pass over the keys.

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lkv, D), Hq % Hkv == 0; fp16, bf16 or fp32, one dtype;
    stride(-1) == 1, other strides arbitrary. key_padding_mask: None or contiguous bool
    (B, Lkv), True for keys to ignore. causal: key j allowed for query i iff j <= i + Lkv - Lq.
    Returns out (B, Hq, Lq, D) in q's dtype and memory order (genkernels._layout.heads_like: heads
    inner where q's are; 0 for rows with no allowed key), lse (B, Hq, Lq) contiguous float32,
    natural log (-inf for those rows), and, for 16-bit inputs with keep_residual, the rounding
    residual of out (float32 out - out, contiguous in q's dtype; else None), which lets the
    backward form delta = dout . out from the float32 output.
    """
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    out = heads_like(q)
    lse = torch.empty((b, hq, lq), device=q.device, dtype=torch.float32)
    keep = keep_residual and q.element_size() < 4
    residual = torch.empty((b, hq, lq, d), device=q.device, dtype=q.dtype) if keep else None
    block_m, block_n, num_warps, num_stages = _config(q, "fwd", key_padding_mask is not None, causal)
    block_d, block_d2 = _column_blocks(q, backward=False)
    mask = _mask_arg(key_padding_mask, q)
    res = out if residual is None else residual
    align = _align(q, k, v, out)
    with on_device(q):
        for entries, (q_, k_, v_, mask_, out_, lse_, res_) in _batch_parts(b, hq, q, k, v, mask, out, lse, res):
            _attn_fwd_kernel[(cdiv(lq, block_m), entries * hq)](
                q_,
                k_,
                v_,
                mask_,
                out_,
                lse_,
                res_,
                *_bh_strides(q),
                *_bh_strides(k),
                *_bh_strides(v),
                *_bh_strides(out),
                hq,
                hq // hkv,
                lq,
                lkv,
                scale * _LOG2E,
                CAUSAL=causal,
                HAS_MASK=key_padding_mask is not None,
                TAIL=causal or lkv % block_n != 0,
                ONE_LOOP=_one_loop(q),
                HAS_RESIDUAL=residual is not None,
                HEAD_DIM=d,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                BLOCK_D=block_d,
                BLOCK_D2=block_d2,
                INPUT_PRECISION=_DOT_INPUT_PRECISION,
                ALIGN=align,
                ROWS64=_rows64(q, k, v),
                num_warps=num_warps,
                num_stages=num_stages,
            )
    return out, lse, residual


def attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    key_padding_mask: Tensor | None,
    out_residual: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of :func:`attention_forward` given dout = dL/dout.

    dout: like out (any B, H, L strides, stride(-1) == 1); out, lse, out_residual: the forward's
    results (with a 16-bit out, delta = dout . out is exact only with the residual: without it,
    out's rounding enters every ds of the row, beyond the rounding of dq itself on peaked rows);
    q, k, v, causal, scale, key_padding_mask: the forward's arguments. Returns dq contiguous in
    q's shape and dtype, dk and dv contiguous in k's shape and dtype (summed over the query heads
    that share a kv head). Rows with no allowed key get zero gradients. Deterministic.
    """
    b, hq, lq, d = q.shape
    hkv, lkv = k.shape[1], k.shape[2]
    dq = torch.empty((b, hq, lq, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((b, hkv, lkv, d), device=q.device, dtype=k.dtype)
    dv = torch.empty((b, hkv, lkv, d), device=q.device, dtype=v.dtype)
    delta = torch.empty((b, hq, lq), device=q.device, dtype=torch.float32)
    block_d = _block_d(d)
    split_d, split_d2 = _column_blocks(q, backward=True)
    mask = _mask_arg(key_padding_mask, q)
    common = dict(
        CAUSAL=causal,
        HAS_MASK=key_padding_mask is not None,
        HEAD_DIM=d,
        BLOCK_D=split_d,
        BLOCK_D2=split_d2,
        INPUT_PRECISION=_DOT_INPUT_PRECISION,
        ALIGN=_align(q, k, v, dout),
        ROWS64=_rows64(q, k, v, dout),
    )
    sizes = (hq, hkv, lq, lkv, scale, scale * _LOG2E)
    strides = (*_bh_strides(q), *_bh_strides(k), *_bh_strides(v), *_bh_strides(dout))
    res = out if out_residual is None else out_residual
    block_rows = 16 if interpreting() else max(16, min(64, _DELTA_ELEMENTS // block_d))
    align_delta = _align(out, dout)
    dq_config, dkdv_config = _config(q, "dq"), _config(q, "dkdv")
    parts = _batch_parts(b, hq, q, k, v, dout, out, res, lse, delta, mask, dq, dk, dv)
    with on_device(q):
        for entries, (q_, k_, v_, dout_, out_, res_, lse_, delta_, mask_, dq_, dk_, dv_) in parts:
            _attn_bwd_delta_kernel[(cdiv(lq, block_rows), entries * hq)](
                out_,
                res_,
                dout_,
                delta_,
                *_bh_strides(out),
                *_bh_strides(dout),
                hq,
                lq,
                HAS_RESIDUAL=out_residual is not None,
                HEAD_DIM=d,
                BLOCK_M=block_rows,
                BLOCK_D=block_d,
                ALIGN=align_delta,
                ROWS64=_rows64(out, dout),
                num_warps=4,
            )
            block_m, block_n, num_warps, num_stages = dq_config
            _attn_bwd_dq_kernel[(cdiv(lq, block_m), entries * hq)](
                q_,
                k_,
                v_,
                dout_,
                lse_,
                delta_,
                mask_,
                dq_,
                *strides,
                *sizes,
                TAIL=causal or lkv % block_n != 0,
                ONE_LOOP=_one_loop(q),
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                num_warps=num_warps,
                num_stages=num_stages,
                **common,
            )
            block_m, block_n, num_warps, num_stages = dkdv_config
            _attn_bwd_dkdv_kernel[(cdiv(lkv, block_n), entries * hkv)](
                q_,
                k_,
                v_,
                dout_,
                lse_,
                delta_,
                mask_,
                dk_,
                dv_,
                *strides,
                *sizes,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                num_warps=num_warps,
                num_stages=num_stages,
                **common,
            )
    return dq, dk, dv


if triton is not None:  # the kernels exist only where triton imports; not_supported says why not

    @triton.jit
    def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
        """acc + a @ b in float32 (acc updated in place by the tensor cores); float32 operands in
        IEEE float32, never TF32."""
        if INPUT_PRECISION:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, allow_tf32=False)

    @triton.jit
    def _dot2(a, b, a2, b2, INPUT_PRECISION: tl.constexpr):
        """a @ b + a2 @ b2 in float32: a product over the head dim in its two column blocks. 16-bit operands
        chain the second dot onto the first's accumulator (the tensor cores add in place). float32 operands are
        FMA loops, one chain per element, whose rounding grows with its length: each block is its own chain
        and the two are added (at most FP32_CHAIN terms a chain, :func:`_column_blocks`)."""
        if a.dtype == tl.float32:
            return _dot(a, b, None, INPUT_PRECISION) + _dot(a2, b2, None, INPUT_PRECISION)
        else:
            return _dot(a2, b2, _dot(a, b, None, INPUT_PRECISION), INPUT_PRECISION)

    @triton.jit
    def _load_rows(
        base,
        row0,
        rows,
        stride,
        ROWS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        CHECK_ROWS: tl.constexpr,
        TRANSPOSED: tl.constexpr,
    ):
        """Rows row0 .. row0 + ROWS of a (rows, HEAD_DIM) matrix with row stride ``stride``, as a
        [ROWS, BLOCK_D] tile ([BLOCK_D, ROWS] when TRANSPOSED), zero beyond HEAD_DIM and, when
        CHECK_ROWS, beyond ``rows``. The block's start is added in 64 bits, the offsets inside
        the tile in the stride's type (int32 unless the launcher asked for ROWS64: :func:`_rows64`)."""
        r = tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK_D)
        base = base + tl.cast(row0, tl.int64) * stride
        if TRANSPOSED:
            ptrs = base + r[None, :] * stride + c[:, None]
            mask = (c < HEAD_DIM)[:, None] & ((row0 + r < rows) | (not CHECK_ROWS))[None, :]
        else:
            ptrs = base + r[:, None] * stride + c[None, :]
            mask = ((row0 + r < rows) | (not CHECK_ROWS))[:, None] & (c < HEAD_DIM)[None, :]
        if CHECK_ROWS or HEAD_DIM < BLOCK_D:
            return tl.load(ptrs, mask=mask, other=0.0)
        else:
            return tl.load(ptrs)

    @triton.jit
    def _aligned3(s0, s1, s2, ALIGN: tl.constexpr, ROWS64: tl.constexpr):
        """The three strides as multiples of ALIGN that the compiler can see: (s // ALIGN) * ALIGN, which is s
        itself (the launcher checked: :func:`_align`); tl.multiple_of does not take on a scalar argument. With
        ROWS64 (:func:`_rows64`), the row stride s2 as int64, so that the offsets inside a tile (row * s2) are
        formed in 64 bits (the batch and head strides multiply int64 indices already)."""
        if ROWS64:
            s2 = tl.cast(s2, tl.int64)
        if ALIGN > 1:
            return (s0 // ALIGN) * ALIGN, (s1 // ALIGN) * ALIGN, (s2 // ALIGN) * ALIGN
        else:
            return s0, s1, s2

    @triton.jit
    def _load_cols(
        base,
        row0,
        rows,
        stride,
        ROWS: tl.constexpr,
        COL0: tl.constexpr,
        BLOCK_C: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        CHECK_ROWS: tl.constexpr,
    ):
        """Columns COL0 .. COL0 + BLOCK_C of rows row0 .. row0 + ROWS of a (rows, HEAD_DIM) matrix, as a
        [ROWS, BLOCK_C] tile, zero beyond HEAD_DIM and, when CHECK_ROWS, beyond ``rows``."""
        r = tl.arange(0, ROWS)
        c = COL0 + tl.arange(0, BLOCK_C)
        ptrs = base + tl.cast(row0, tl.int64) * stride + r[:, None] * stride + c[None, :]
        if CHECK_ROWS or COL0 + BLOCK_C > HEAD_DIM:
            mask = ((row0 + r < rows) | (not CHECK_ROWS))[:, None] & (c < HEAD_DIM)[None, :]
            return tl.load(ptrs, mask=mask, other=0.0)
        else:
            return tl.load(ptrs)

    @triton.jit
    def _load_cols_t(
        base,
        row0,
        rows,
        stride,
        ROWS: tl.constexpr,
        COL0: tl.constexpr,
        BLOCK_C: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        """:func:`_load_cols` transposed: columns COL0 .. COL0 + BLOCK_C of rows row0 .. row0 + ROWS as a
        [BLOCK_C, ROWS] tile, zero beyond HEAD_DIM and beyond ``rows``."""
        r = tl.arange(0, ROWS)
        c = COL0 + tl.arange(0, BLOCK_C)
        ptrs = base + tl.cast(row0, tl.int64) * stride + r[None, :] * stride + c[:, None]
        mask = (c < HEAD_DIM)[:, None] & (row0 + r < rows)[None, :]
        return tl.load(ptrs, mask=mask, other=0.0)

    @triton.jit
    def _kept_keys(mask_row, offs_n, lkv, HAS_MASK: tl.constexpr):
        """True for the keys offs_n [BLOCK_N] the padding mask keeps (all when there is none)."""
        if HAS_MASK:
            return tl.load(mask_row + offs_n, mask=offs_n < lkv, other=1) == 0
        else:
            return offs_n >= 0

    @triton.jit
    def _allowed(
        mask_row,
        offs_m,
        n0,
        lq,
        lkv,
        CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr,
        MASKED: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """[BLOCK_M, BLOCK_N] True where query offs_m may see key n0 + j: the key is not padding and, in a
        MASKED block, inside Lkv and (causal) on or below the bottom-right-aligned diagonal."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        allowed = _kept_keys(mask_row, offs_n, lkv, HAS_MASK)[None, :]
        if MASKED:
            allowed = allowed & _inside(offs_m, offs_n, lq, lkv, CAUSAL)
        return allowed

    @triton.jit
    def _inside(offs_m, offs_n, lq, lkv, CAUSAL: tl.constexpr):
        """[BLOCK_M, BLOCK_N] (or [1, BLOCK_N] when not causal) True where key offs_n is inside Lkv and (causal)
        on or below query offs_m's bottom-right-aligned diagonal."""
        inside = (offs_n < lkv)[None, :]
        if CAUSAL:
            inside = inside & (offs_n[None, :] <= offs_m[:, None] + (lkv - lq))
        return inside

    @triton.jit
    def _key_blocks(m0, lq, lkv, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """For queries m0 .. m0 + BLOCK_M: the end of the key blocks every row may fully see
        (inside Lkv, below the diagonal: no mask needed), and the end of all key blocks any row
        sees (causal launches skip the blocks above the diagonal)."""
        if CAUSAL:
            diag = lkv - lq
            # Row m0 sees keys j <= m0 + diag; the last row, j <= m0 + BLOCK_M - 1 + diag.
            full_end = tl.maximum(tl.minimum(lkv, m0 + diag + 1), 0) // BLOCK_N * BLOCK_N
            end = tl.maximum(tl.minimum(lkv, m0 + BLOCK_M + diag), 0)
        else:
            full_end = lkv // BLOCK_N * BLOCK_N
            end = lkv
        return full_end, end

    @triton.jit
    def _fwd_key_loop(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        mask_row,
        stride_kl,
        stride_vl,
        offs_m,
        start,
        end,
        full_end,
        lq,
        lkv,
        scale_log2,
        CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr,
        TAIL: tl.constexpr,
        MASKED: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Online softmax over the key blocks [start, end): running max m_i and sum l_i (base 2) and the
        unnormalized output acc. :func:`_masked` applies the masks: to every block (MASKED), or (TAIL) to the
        blocks from full_end on, tested at run time, so that one loop can walk them all (:func:`_one_loop`)."""
        for n0 in range(start, end, BLOCK_N):
            k = _load_rows(k_base, n0, lkv, stride_kl, BLOCK_N, HEAD_DIM, BLOCK_D, TAIL or MASKED, False)
            s = _dot(q, tl.trans(k), None, INPUT_PRECISION) * scale_log2
            s = _masked(
                s, float("-inf"), mask_row, offs_m, n0, full_end, lq, lkv, CAUSAL, HAS_MASK, TAIL, MASKED, BLOCK_N,
                BLOCK_D,
            )  # fmt: skip
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
            v = _load_rows(v_base, n0, lkv, stride_vl, BLOCK_N, HEAD_DIM, BLOCK_D, TAIL or MASKED, False)
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], INPUT_PRECISION)
        return acc, m_i, l_i

    @triton.jit
    def _masked(
        x,
        fill,
        mask_row,
        offs_m,
        n0,
        full_end,
        lq,
        lkv,
        CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr,
        TAIL: tl.constexpr,
        MASKED: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """x [BLOCK_M, BLOCK_N] of the key block at n0 (scores, or probabilities), ``fill`` where the query may
        not see the key: padding keys (HAS_MASK), and in a MASKED block, or with TAIL in a block from full_end
        on (a launch with blocks that Lkv's end or the causal diagonal cuts; the test is at run time, uniform
        over the program), the keys past Lkv and above the diagonal. At BLOCK_D 256 (key blocks of 16 and 32)
        TAIL selects in every block instead of branching: around the branch ptxas serialized the wgmmas."""
        if MASKED:
            x = tl.where(_allowed(mask_row, offs_m, n0, lq, lkv, CAUSAL, HAS_MASK, True, BLOCK_N), x, fill)
        elif TAIL and BLOCK_D >= 256:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            inside = _inside(offs_m, offs_n, lq, lkv, CAUSAL) | (n0 < full_end)
            allowed = _kept_keys(mask_row, offs_n, lkv, HAS_MASK)[None, :] & inside
            x = tl.where(allowed, x, fill)
        elif TAIL:
            if n0 >= full_end:
                x = tl.where(_allowed(mask_row, offs_m, n0, lq, lkv, CAUSAL, HAS_MASK, True, BLOCK_N), x, fill)
            else:
                if HAS_MASK:
                    x = tl.where(_allowed(mask_row, offs_m, n0, lq, lkv, CAUSAL, HAS_MASK, False, BLOCK_N), x, fill)
        else:
            if HAS_MASK:
                x = tl.where(_allowed(mask_row, offs_m, n0, lq, lkv, CAUSAL, HAS_MASK, False, BLOCK_N), x, fill)
        return x

    @triton.jit
    def _softmax_step(s, m_i, l_i):
        """One key block of the online softmax on its (masked) scores s [BLOCK_M, BLOCK_N] (base 2): (p,
        alpha, the new running max, the new running sum)."""
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no allowed key yet has m_new = -inf: shift it by 0 instead, so
        # that its p = exp2(-inf) = 0 and alpha = exp2(-inf) = 0 rather than NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - shift)
        p = tl.math.exp2(s - shift[:, None])
        return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)

    @triton.jit
    def _fwd_key_loop_split(
        acc,
        acc2,
        m_i,
        l_i,
        q,
        q2,
        k_base,
        v_base,
        mask_row,
        stride_kl,
        stride_vl,
        offs_m,
        start,
        end,
        full_end,
        lq,
        lkv,
        scale_log2,
        CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr,
        TAIL: tl.constexpr,
        MASKED: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_D2: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """:func:`_fwd_key_loop` with the head dim in two column blocks, [0, BLOCK_D) and [BLOCK_D,
        BLOCK_D + BLOCK_D2): two dots add up each score (:func:`_dot2`), and each block has its own
        accumulator."""
        for n0 in range(start, end, BLOCK_N):
            k = _load_cols(k_base, n0, lkv, stride_kl, BLOCK_N, 0, BLOCK_D, HEAD_DIM, TAIL or MASKED)
            k2 = _load_cols(k_base, n0, lkv, stride_kl, BLOCK_N, BLOCK_D, BLOCK_D2, HEAD_DIM, TAIL or MASKED)
            s = _dot2(q, tl.trans(k), q2, tl.trans(k2), INPUT_PRECISION) * scale_log2
            s = _masked(
                s, float("-inf"), mask_row, offs_m, n0, full_end, lq, lkv, CAUSAL, HAS_MASK, TAIL, MASKED, BLOCK_N,
                BLOCK_D,
            )  # fmt: skip
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
            v = _load_cols(v_base, n0, lkv, stride_vl, BLOCK_N, 0, BLOCK_D, HEAD_DIM, TAIL or MASKED)
            v2 = _load_cols(v_base, n0, lkv, stride_vl, BLOCK_N, BLOCK_D, BLOCK_D2, HEAD_DIM, TAIL or MASKED)
            p = p.to(v.dtype)
            acc = _dot(p, v, acc * alpha[:, None], INPUT_PRECISION)
            acc2 = _dot(p, v2, acc2 * alpha[:, None], INPUT_PRECISION)
        return acc, acc2, m_i, l_i

    @triton.jit
    def _store_out(
        out_ptr,
        res_ptr,
        acc,
        l_i,
        seen,
        out_rows,
        rows,
        row_ok,
        HAS_RESIDUAL: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        COL0: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """out = acc / l_i for columns COL0 .. COL0 + BLOCK_C of the rows, row r at out_ptr + out_rows[r] (and its
        rounding residual, contiguous: row r at res_ptr + rows[r] * HEAD_DIM)."""
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        d = COL0 + tl.arange(0, BLOCK_C)
        store_mask = row_ok[:, None] & (d < HEAD_DIM)[None, :]
        rounded = out.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + out_rows[:, None] + d[None, :], rounded, mask=store_mask)
        if HAS_RESIDUAL:
            residual = (out - rounded.to(tl.float32)).to(res_ptr.dtype.element_ty)
            tl.store(res_ptr + rows[:, None] * HEAD_DIM + d[None, :], residual, mask=store_mask)

    @triton.jit
    def _out_rows(b, h, offs_m, stride_ob, stride_oh, stride_ol, ALIGN: tl.constexpr):
        """Element offsets of out's rows (b, h, offs_m), int64, with the strides rebuilt as multiples of ALIGN
        (:func:`_aligned3`) so that the stores stay 16-byte vectors in either memory order."""
        stride_ob, stride_oh, stride_ol = _aligned3(stride_ob, stride_oh, stride_ol, ALIGN, False)
        return b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m.to(tl.int64) * stride_ol

    @triton.jit(do_not_specialize=("hq", "group", "lq", "lkv"))
    def _attn_fwd_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        mask_ptr,
        out_ptr,
        lse_ptr,
        res_ptr,
        stride_qb,
        stride_qh,
        stride_ql,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_vb,
        stride_vh,
        stride_vl,
        stride_ob,
        stride_oh,
        stride_ol,
        hq,
        group,
        lq,
        lkv,
        scale_log2,
        CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr,
        TAIL: tl.constexpr,
        ONE_LOOP: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_D2: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        ALIGN: tl.constexpr,
        ROWS64: tl.constexpr,
    ):
        """Attention output and lse of BLOCK_M queries of one (b, h); grid (cdiv(Lq, BLOCK_M), B * Hq).
        With HAS_RESIDUAL, also out's rounding residual (float32 out - rounded out). BLOCK_D2 > 0: the
        head dim in two column blocks, BLOCK_D then BLOCK_D2 (:func:`_column_blocks`).

        Memory traffic: the q block read once, k and v of the visible key blocks read once per
        program, the out block (and its residual) and its lse written once."""
        stride_qb, stride_qh, stride_ql = _aligned3(stride_qb, stride_qh, stride_ql, ALIGN, ROWS64)
        stride_kb, stride_kh, stride_kl = _aligned3(stride_kb, stride_kh, stride_kl, ALIGN, ROWS64)
        stride_vb, stride_vh, stride_vl = _aligned3(stride_vb, stride_vh, stride_vl, ALIGN, ROWS64)
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // hq
        h = bh % hq
        kvh = h // group
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
        mask_row = mask_ptr + b.to(tl.int64) * lkv
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        full_end, end = _key_blocks(m0, lq, lkv, CAUSAL, BLOCK_M, BLOCK_N)
        if BLOCK_D2 == 0:
            q = _load_rows(q_base, m0, lq, stride_ql, BLOCK_M, HEAD_DIM, BLOCK_D, True, False)
            if ONE_LOOP:
                acc, m_i, l_i = _fwd_key_loop(
                    acc, m_i, l_i, q, k_base, v_base, mask_row, stride_kl, stride_vl, offs_m, 0, end, full_end,
                    lq, lkv, scale_log2, CAUSAL, HAS_MASK, TAIL, False, HEAD_DIM, BLOCK_N, BLOCK_D, INPUT_PRECISION,
                )  # fmt: skip
            else:
                acc, m_i, l_i = _fwd_key_loop(
                    acc, m_i, l_i, q, k_base, v_base, mask_row, stride_kl, stride_vl, offs_m, 0, full_end, full_end,
                    lq, lkv, scale_log2, CAUSAL, HAS_MASK, False, False, HEAD_DIM, BLOCK_N, BLOCK_D, INPUT_PRECISION,
                )  # fmt: skip
                acc, m_i, l_i = _fwd_key_loop(
                    acc, m_i, l_i, q, k_base, v_base, mask_row, stride_kl, stride_vl, offs_m, full_end, end, full_end,
                    lq, lkv, scale_log2, CAUSAL, HAS_MASK, False, True, HEAD_DIM, BLOCK_N, BLOCK_D, INPUT_PRECISION,
                )  # fmt: skip
            # The output rows' offsets, formed after the loops so that they are not live through them.
            rows = bh.to(tl.int64) * lq + offs_m
            out_rows = _out_rows(b, h, offs_m, stride_ob, stride_oh, stride_ol, ALIGN)
            row_ok = offs_m < lq
            seen = l_i > 0.0
            _store_out(out_ptr, res_ptr, acc, l_i, seen, out_rows, rows, row_ok, HAS_RESIDUAL, HEAD_DIM, 0, BLOCK_D)
        else:
            q = _load_cols(q_base, m0, lq, stride_ql, BLOCK_M, 0, BLOCK_D, HEAD_DIM, True)
            q2 = _load_cols(q_base, m0, lq, stride_ql, BLOCK_M, BLOCK_D, BLOCK_D2, HEAD_DIM, True)
            acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
            if ONE_LOOP:
                acc, acc2, m_i, l_i = _fwd_key_loop_split(
                    acc, acc2, m_i, l_i, q, q2, k_base, v_base, mask_row, stride_kl, stride_vl, offs_m, 0, end,
                    full_end, lq, lkv, scale_log2, CAUSAL, HAS_MASK, TAIL, False,
                    HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, INPUT_PRECISION,
                )  # fmt: skip
            else:
                acc, acc2, m_i, l_i = _fwd_key_loop_split(
                    acc, acc2, m_i, l_i, q, q2, k_base, v_base, mask_row, stride_kl, stride_vl, offs_m, 0, full_end,
                    full_end, lq, lkv, scale_log2, CAUSAL, HAS_MASK, False, False,
                    HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, INPUT_PRECISION,
                )  # fmt: skip
                acc, acc2, m_i, l_i = _fwd_key_loop_split(
                    acc, acc2, m_i, l_i, q, q2, k_base, v_base, mask_row, stride_kl, stride_vl, offs_m, full_end,
                    end, full_end, lq, lkv, scale_log2, CAUSAL, HAS_MASK, False, True,
                    HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, INPUT_PRECISION,
                )  # fmt: skip
            rows = bh.to(tl.int64) * lq + offs_m
            out_rows = _out_rows(b, h, offs_m, stride_ob, stride_oh, stride_ol, ALIGN)
            row_ok = offs_m < lq
            seen = l_i > 0.0
            _store_out(out_ptr, res_ptr, acc, l_i, seen, out_rows, rows, row_ok, HAS_RESIDUAL, HEAD_DIM, 0, BLOCK_D)
            _store_out(
                out_ptr, res_ptr, acc2, l_i, seen, out_rows, rows, row_ok, HAS_RESIDUAL, HEAD_DIM, BLOCK_D, BLOCK_D2
            )
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + rows, lse, mask=row_ok)

    @triton.jit(do_not_specialize=("hq", "lq"))
    def _attn_bwd_delta_kernel(
        out_ptr,
        res_ptr,
        dout_ptr,
        delta_ptr,
        stride_ob,
        stride_oh,
        stride_ol,
        stride_db,
        stride_dh,
        stride_dl,
        hq,
        lq,
        HAS_RESIDUAL: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ALIGN: tl.constexpr,
        ROWS64: tl.constexpr,
    ):
        """delta[b, h, i] = sum_d dout * out in float32, out + residual when HAS_RESIDUAL (the
        contiguous (B, Hq, Lq, D) rounding residual of a 16-bit out); grid (cdiv(Lq, BLOCK_M), B * Hq).

        Memory traffic: out (and its residual) and dout read once, 4 bytes per row written."""
        stride_ob, stride_oh, stride_ol = _aligned3(stride_ob, stride_oh, stride_ol, ALIGN, ROWS64)
        stride_db, stride_dh, stride_dl = _aligned3(stride_db, stride_dh, stride_dl, ALIGN, ROWS64)
        m0 = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b = bh // hq
        h = bh % hq
        o_base = out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        do_base = dout_ptr + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
        o = _load_rows(o_base, m0, lq, stride_ol, BLOCK_M, HEAD_DIM, BLOCK_D, True, False)
        do = _load_rows(do_base, m0, lq, stride_dl, BLOCK_M, HEAD_DIM, BLOCK_D, True, False)
        o = o.to(tl.float32)
        if HAS_RESIDUAL:
            r_base = res_ptr + bh.to(tl.int64) * lq * HEAD_DIM
            o += _load_rows(r_base, m0, lq, HEAD_DIM, BLOCK_M, HEAD_DIM, BLOCK_D, True, False).to(tl.float32)
        delta = tl.sum(o * do.to(tl.float32), axis=1)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        tl.store(delta_ptr + bh.to(tl.int64) * lq + offs_m, delta, mask=offs_m < lq)

    @triton.jit
    def _dkdv_query_loop(
        dk,
        dv,
        k,
        v,
        keep,
        q_base,
        do_base,
        lse_row,
        delta_row,
        stride_ql,
        stride_dl,
        offs_n,
        start,
        end,
        lq,
        lkv,
        scale_log2,
        CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Add to dk, dv [BLOCK_N, BLOCK_D] the terms of query blocks [start, end) of one head,
        in the transposed orientation (scores [BLOCK_N, BLOCK_M]), so that no tile is transposed
        in registers.

        Query rows past Lq need no mask: q and dout load as 0 there and lse, delta as 0, so p is
        1, ds is 0, and both terms they add are exactly 0."""
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < lq
            q_t = _load_rows(q_base, m0, lq, stride_ql, BLOCK_M, HEAD_DIM, BLOCK_D, True, True)
            lse2 = tl.load(lse_row + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
            s_t = _dot(k, q_t, None, INPUT_PRECISION) * scale_log2
            p_t = _probs_t(s_t, lse2, keep, offs_n, offs_m, lq, lkv, CAUSAL, HAS_MASK)
            do = _load_rows(do_base, m0, lq, stride_dl, BLOCK_M, HEAD_DIM, BLOCK_D, True, False)
            dv = _dot(p_t.to(do.dtype), do, dv, INPUT_PRECISION)
            dp_t = _dot(v, tl.trans(do), None, INPUT_PRECISION)
            delta = tl.load(delta_row + offs_m, mask=row_ok, other=0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = _dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, INPUT_PRECISION)
        return dk, dv

    @triton.jit
    def _probs_t(s_t, lse2, keep, offs_n, offs_m, lq, lkv, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
        """p^T = exp2(s^T - lse) [BLOCK_N, BLOCK_M] of one query block from its transposed scores (base 2),
        exactly 0 where key offs_n is not allowed for query offs_m."""
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if HAS_MASK or CAUSAL:
            allowed = keep[:, None]
            if CAUSAL:
                allowed = allowed & (offs_n[:, None] <= offs_m[None, :] + (lkv - lq))
            # Exactly 0, not exp2(-inf - lse): a row with no allowed key has lse = -inf.
            p_t = tl.where(allowed, p_t, 0.0)
        return p_t

    @triton.jit
    def _dkdv_query_loop_split(
        dk,
        dk2,
        dv,
        dv2,
        k,
        k2,
        v,
        v2,
        keep,
        q_base,
        do_base,
        lse_row,
        delta_row,
        stride_ql,
        stride_dl,
        offs_n,
        start,
        end,
        lq,
        lkv,
        scale_log2,
        CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_D2: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """:func:`_dkdv_query_loop` with the head dim in two column blocks (BLOCK_D, then BLOCK_D2:
        :func:`_column_blocks`): the scores and dp sum two dots (:func:`_dot2`), dk and dv are two accumulators
        each."""
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < lq
            q_t = _load_cols_t(q_base, m0, lq, stride_ql, BLOCK_M, 0, BLOCK_D, HEAD_DIM)
            q2_t = _load_cols_t(q_base, m0, lq, stride_ql, BLOCK_M, BLOCK_D, BLOCK_D2, HEAD_DIM)
            lse2 = tl.load(lse_row + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
            s_t = _dot2(k, q_t, k2, q2_t, INPUT_PRECISION) * scale_log2
            p_t = _probs_t(s_t, lse2, keep, offs_n, offs_m, lq, lkv, CAUSAL, HAS_MASK)
            do = _load_cols(do_base, m0, lq, stride_dl, BLOCK_M, 0, BLOCK_D, HEAD_DIM, True)
            do2 = _load_cols(do_base, m0, lq, stride_dl, BLOCK_M, BLOCK_D, BLOCK_D2, HEAD_DIM, True)
            pc = p_t.to(do.dtype)
            dv = _dot(pc, do, dv, INPUT_PRECISION)
            dv2 = _dot(pc, do2, dv2, INPUT_PRECISION)
            dp_t = _dot2(v, tl.trans(do), v2, tl.trans(do2), INPUT_PRECISION)
            delta = tl.load(delta_row + offs_m, mask=row_ok, other=0.0)
            ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)
            dk = _dot(ds_t, tl.trans(q_t), dk, INPUT_PRECISION)
            dk2 = _dot(ds_t, tl.trans(q2_t), dk2, INPUT_PRECISION)
        return dk, dk2, dv, dv2

    @triton.jit
    def _query_head(q_ptr, dout_ptr, lse_ptr, delta_ptr, b, h, hq, lq, stride_qb, stride_qh, stride_db, stride_dh):
        """(q, dout, lse, delta) row bases of query head h of batch b."""
        bh = b * hq + h
        q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = dout_ptr + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
        return q_base, do_base, lse_ptr + bh.to(tl.int64) * lq, delta_ptr + bh.to(tl.int64) * lq

    @triton.jit
    def _store_cols(ptr, tile, rows, row_ok, HEAD_DIM: tl.constexpr, COL0: tl.constexpr, BLOCK_C: tl.constexpr):
        """tile [ROWS, BLOCK_C] into columns COL0 .. COL0 + BLOCK_C of contiguous (., HEAD_DIM) rows ``rows``."""
        d = COL0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (d < HEAD_DIM)[None, :]
        tl.store(ptr + rows[:, None] * HEAD_DIM + d[None, :], tile.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=_SIZE_ARGS)
    def _attn_bwd_dkdv_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        dout_ptr,
        lse_ptr,
        delta_ptr,
        mask_ptr,
        dk_ptr,
        dv_ptr,
        stride_qb,
        stride_qh,
        stride_ql,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_vb,
        stride_vh,
        stride_vl,
        stride_db,
        stride_dh,
        stride_dl,
        hq,
        hkv,
        lq,
        lkv,
        scale,
        scale_log2,
        CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_D2: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        ALIGN: tl.constexpr,
        ROWS64: tl.constexpr,
    ):
        """dk, dv of BLOCK_N keys of one (b, kv head), summed over the query heads of its group
        in registers; grid (cdiv(Lkv, BLOCK_N), B * Hkv). BLOCK_D2 > 0: the head dim in two column
        blocks, as the forward's.

        Memory traffic: the k, v blocks read once, the dk, dv blocks written once; q, dout, lse
        and delta of the group's visible query blocks read once per program."""
        stride_qb, stride_qh, stride_ql = _aligned3(stride_qb, stride_qh, stride_ql, ALIGN, ROWS64)
        stride_kb, stride_kh, stride_kl = _aligned3(stride_kb, stride_kh, stride_kl, ALIGN, ROWS64)
        stride_vb, stride_vh, stride_vl = _aligned3(stride_vb, stride_vh, stride_vl, ALIGN, ROWS64)
        stride_db, stride_dh, stride_dl = _aligned3(stride_db, stride_dh, stride_dl, ALIGN, ROWS64)
        pid_n = tl.program_id(0)
        bkv = tl.program_id(1)
        b = bkv // hkv
        kvh = bkv % hkv
        group = hq // hkv
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
        keep = _kept_keys(mask_ptr + b.to(tl.int64) * lkv, offs_n, lkv, HAS_MASK)
        if CAUSAL:
            diag = lkv - lq
            # Query i sees key n0 iff i >= n0 - diag: the query blocks before are skipped.
            start = tl.maximum(n0 - diag, 0) // BLOCK_M * BLOCK_M
        else:
            start = 0
        # Keys past Lkv load as 0; their dk, dv rows are never stored, so they need no mask.
        if BLOCK_D2 == 0:
            k = _load_rows(k_base, n0, lkv, stride_kl, BLOCK_N, HEAD_DIM, BLOCK_D, True, False)
            v = _load_rows(v_base, n0, lkv, stride_vl, BLOCK_N, HEAD_DIM, BLOCK_D, True, False)
            dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for g in range(group):
                q_base, do_base, lse_row, delta_row = _query_head(
                    q_ptr, dout_ptr, lse_ptr, delta_ptr, b, kvh * group + g, hq, lq, stride_qb, stride_qh, stride_db,
                    stride_dh,
                )  # fmt: skip
                dk, dv = _dkdv_query_loop(
                    dk, dv, k, v, keep, q_base, do_base, lse_row, delta_row, stride_ql, stride_dl, offs_n,
                    start, lq, lq, lkv, scale_log2,
                    CAUSAL, HAS_MASK, HEAD_DIM, BLOCK_M, BLOCK_D, INPUT_PRECISION,
                )  # fmt: skip
            rows = bkv.to(tl.int64) * lkv + offs_n
            row_ok = offs_n < lkv
            _store_cols(dk_ptr, dk * scale, rows, row_ok, HEAD_DIM, 0, BLOCK_D)
            _store_cols(dv_ptr, dv, rows, row_ok, HEAD_DIM, 0, BLOCK_D)
        else:
            k = _load_cols(k_base, n0, lkv, stride_kl, BLOCK_N, 0, BLOCK_D, HEAD_DIM, True)
            k2 = _load_cols(k_base, n0, lkv, stride_kl, BLOCK_N, BLOCK_D, BLOCK_D2, HEAD_DIM, True)
            v = _load_cols(v_base, n0, lkv, stride_vl, BLOCK_N, 0, BLOCK_D, HEAD_DIM, True)
            v2 = _load_cols(v_base, n0, lkv, stride_vl, BLOCK_N, BLOCK_D, BLOCK_D2, HEAD_DIM, True)
            dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dk2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
            dv2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
            for g in range(group):
                q_base, do_base, lse_row, delta_row = _query_head(
                    q_ptr, dout_ptr, lse_ptr, delta_ptr, b, kvh * group + g, hq, lq, stride_qb, stride_qh, stride_db,
                    stride_dh,
                )  # fmt: skip
                dk, dk2, dv, dv2 = _dkdv_query_loop_split(
                    dk, dk2, dv, dv2, k, k2, v, v2, keep, q_base, do_base, lse_row, delta_row, stride_ql,
                    stride_dl, offs_n, start, lq, lq, lkv, scale_log2,
                    CAUSAL, HAS_MASK, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_D2, INPUT_PRECISION,
                )  # fmt: skip
            rows = bkv.to(tl.int64) * lkv + offs_n
            row_ok = offs_n < lkv
            _store_cols(dk_ptr, dk * scale, rows, row_ok, HEAD_DIM, 0, BLOCK_D)
            _store_cols(dk_ptr, dk2 * scale, rows, row_ok, HEAD_DIM, BLOCK_D, BLOCK_D2)
            _store_cols(dv_ptr, dv, rows, row_ok, HEAD_DIM, 0, BLOCK_D)
            _store_cols(dv_ptr, dv2, rows, row_ok, HEAD_DIM, BLOCK_D, BLOCK_D2)

    @triton.jit
    def _dq_key_loop(
        dq,
        delta,
        q,
        do,
        lse2,
        k_base,
        v_base,
        mask_row,
        stride_kl,
        stride_vl,
        offs_m,
        start,
        end,
        full_end,
        lq,
        lkv,
        scale_log2,
        CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr,
        TAIL: tl.constexpr,
        MASKED: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Over the key blocks [start, end): add to dq [BLOCK_M, BLOCK_D] (unscaled) the terms ds k,
        ds = p (dp - delta); masks as the forward's (:func:`_fwd_key_loop`)."""
        for n0 in range(start, end, BLOCK_N):
            k = _load_rows(k_base, n0, lkv, stride_kl, BLOCK_N, HEAD_DIM, BLOCK_D, TAIL or MASKED, False)
            s = _dot(q, tl.trans(k), None, INPUT_PRECISION) * scale_log2
            p = _probs(
                s, lse2, mask_row, offs_m, n0, full_end, lq, lkv, CAUSAL, HAS_MASK, TAIL, MASKED, BLOCK_N, BLOCK_D
            )
            v = _load_rows(v_base, n0, lkv, stride_vl, BLOCK_N, HEAD_DIM, BLOCK_D, TAIL or MASKED, False)
            dp = _dot(do, tl.trans(v), None, INPUT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq = _dot(ds.to(k.dtype), k, dq, INPUT_PRECISION)
        return dq

    @triton.jit
    def _probs(
        s,
        lse2,
        mask_row,
        offs_m,
        n0,
        full_end,
        lq,
        lkv,
        CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr,
        TAIL: tl.constexpr,
        MASKED: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """p = exp2(s - lse) [BLOCK_M, BLOCK_N] of key block n0 from its scores (base 2), exactly 0 where a key
        is not allowed (:func:`_masked`). Exactly 0, not exp2(-inf - lse): a row with no allowed key has lse =
        -inf."""
        p = tl.math.exp2(s - lse2[:, None])
        return _masked(
            p, 0.0, mask_row, offs_m, n0, full_end, lq, lkv, CAUSAL, HAS_MASK, TAIL, MASKED, BLOCK_N, BLOCK_D
        )

    @triton.jit
    def _dq_key_loop_split(
        dq,
        dq2,
        delta,
        q,
        q2,
        do,
        do2,
        lse2,
        k_base,
        v_base,
        mask_row,
        stride_kl,
        stride_vl,
        offs_m,
        start,
        end,
        full_end,
        lq,
        lkv,
        scale_log2,
        CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr,
        TAIL: tl.constexpr,
        MASKED: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_D2: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """:func:`_dq_key_loop` with the head dim in two column blocks (BLOCK_D, then BLOCK_D2): the scores
        and dp sum two dots (:func:`_dot2`), dq is two accumulators."""
        for n0 in range(start, end, BLOCK_N):
            k = _load_cols(k_base, n0, lkv, stride_kl, BLOCK_N, 0, BLOCK_D, HEAD_DIM, TAIL or MASKED)
            k2 = _load_cols(k_base, n0, lkv, stride_kl, BLOCK_N, BLOCK_D, BLOCK_D2, HEAD_DIM, TAIL or MASKED)
            s = _dot2(q, tl.trans(k), q2, tl.trans(k2), INPUT_PRECISION) * scale_log2
            p = _probs(
                s, lse2, mask_row, offs_m, n0, full_end, lq, lkv, CAUSAL, HAS_MASK, TAIL, MASKED, BLOCK_N, BLOCK_D
            )
            v = _load_cols(v_base, n0, lkv, stride_vl, BLOCK_N, 0, BLOCK_D, HEAD_DIM, TAIL or MASKED)
            v2 = _load_cols(v_base, n0, lkv, stride_vl, BLOCK_N, BLOCK_D, BLOCK_D2, HEAD_DIM, TAIL or MASKED)
            dp = _dot2(do, tl.trans(v), do2, tl.trans(v2), INPUT_PRECISION)
            ds = (p * (dp - delta[:, None])).to(k.dtype)
            dq = _dot(ds, k, dq, INPUT_PRECISION)
            dq2 = _dot(ds, k2, dq2, INPUT_PRECISION)
        return dq, dq2

    @triton.jit(do_not_specialize=_SIZE_ARGS)
    def _attn_bwd_dq_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        dout_ptr,
        lse_ptr,
        delta_ptr,
        mask_ptr,
        dq_ptr,
        stride_qb,
        stride_qh,
        stride_ql,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_vb,
        stride_vh,
        stride_vl,
        stride_db,
        stride_dh,
        stride_dl,
        hq,
        hkv,
        lq,
        lkv,
        scale,
        scale_log2,
        CAUSAL: tl.constexpr,
        HAS_MASK: tl.constexpr,
        TAIL: tl.constexpr,
        ONE_LOOP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_D2: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        ALIGN: tl.constexpr,
        ROWS64: tl.constexpr,
    ):
        """dq of BLOCK_M queries of one (b, h); grid (cdiv(Lq, BLOCK_M), B * Hq). BLOCK_D2 > 0: the head dim
        in two column blocks, as the forward's.

        Memory traffic: q, dout, lse and delta of the block read once, the dq block written once;
        k and v of the visible key blocks read once."""
        stride_qb, stride_qh, stride_ql = _aligned3(stride_qb, stride_qh, stride_ql, ALIGN, ROWS64)
        stride_kb, stride_kh, stride_kl = _aligned3(stride_kb, stride_kh, stride_kl, ALIGN, ROWS64)
        stride_vb, stride_vh, stride_vl = _aligned3(stride_vb, stride_vh, stride_vl, ALIGN, ROWS64)
        stride_db, stride_dh, stride_dl = _aligned3(stride_db, stride_dh, stride_dl, ALIGN, ROWS64)
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // hq
        h = bh % hq
        kvh = h // (hq // hkv)
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < lq
        q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = dout_ptr + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
        k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
        rows = bh.to(tl.int64) * lq + offs_m
        # Rows past Lq load lse 0 (finite), so their scores stay finite; they are not stored.
        lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        full_end, end = _key_blocks(m0, lq, lkv, CAUSAL, BLOCK_M, BLOCK_N)
        mask_row = mask_ptr + b.to(tl.int64) * lkv
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        if BLOCK_D2 == 0:
            q = _load_rows(q_base, m0, lq, stride_ql, BLOCK_M, HEAD_DIM, BLOCK_D, True, False)
            do = _load_rows(do_base, m0, lq, stride_dl, BLOCK_M, HEAD_DIM, BLOCK_D, True, False)
            dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            if ONE_LOOP:
                dq = _dq_key_loop(
                    dq, delta, q, do, lse2, k_base, v_base, mask_row, stride_kl, stride_vl, offs_m, 0, end, full_end,
                    lq, lkv, scale_log2, CAUSAL, HAS_MASK, TAIL, False, HEAD_DIM, BLOCK_N, BLOCK_D, INPUT_PRECISION,
                )  # fmt: skip
            else:
                dq = _dq_key_loop(
                    dq, delta, q, do, lse2, k_base, v_base, mask_row, stride_kl, stride_vl, offs_m, 0, full_end,
                    full_end, lq, lkv, scale_log2, CAUSAL, HAS_MASK, False, False,
                    HEAD_DIM, BLOCK_N, BLOCK_D, INPUT_PRECISION,
                )  # fmt: skip
                dq = _dq_key_loop(
                    dq, delta, q, do, lse2, k_base, v_base, mask_row, stride_kl, stride_vl, offs_m, full_end, end,
                    full_end, lq, lkv, scale_log2, CAUSAL, HAS_MASK, False, True,
                    HEAD_DIM, BLOCK_N, BLOCK_D, INPUT_PRECISION,
                )  # fmt: skip
            _store_cols(dq_ptr, dq * scale, rows, row_ok, HEAD_DIM, 0, BLOCK_D)
        else:
            q = _load_cols(q_base, m0, lq, stride_ql, BLOCK_M, 0, BLOCK_D, HEAD_DIM, True)
            q2 = _load_cols(q_base, m0, lq, stride_ql, BLOCK_M, BLOCK_D, BLOCK_D2, HEAD_DIM, True)
            do = _load_cols(do_base, m0, lq, stride_dl, BLOCK_M, 0, BLOCK_D, HEAD_DIM, True)
            do2 = _load_cols(do_base, m0, lq, stride_dl, BLOCK_M, BLOCK_D, BLOCK_D2, HEAD_DIM, True)
            dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            dq2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
            if ONE_LOOP:
                dq, dq2 = _dq_key_loop_split(
                    dq, dq2, delta, q, q2, do, do2, lse2, k_base, v_base, mask_row, stride_kl, stride_vl, offs_m,
                    0, end, full_end, lq, lkv, scale_log2,
                    CAUSAL, HAS_MASK, TAIL, False, HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, INPUT_PRECISION,
                )  # fmt: skip
            else:
                dq, dq2 = _dq_key_loop_split(
                    dq, dq2, delta, q, q2, do, do2, lse2, k_base, v_base, mask_row, stride_kl, stride_vl, offs_m,
                    0, full_end, full_end, lq, lkv, scale_log2,
                    CAUSAL, HAS_MASK, False, False, HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, INPUT_PRECISION,
                )  # fmt: skip
                dq, dq2 = _dq_key_loop_split(
                    dq, dq2, delta, q, q2, do, do2, lse2, k_base, v_base, mask_row, stride_kl, stride_vl, offs_m,
                    full_end, end, full_end, lq, lkv, scale_log2,
                    CAUSAL, HAS_MASK, False, True, HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, INPUT_PRECISION,
                )  # fmt: skip
            _store_cols(dq_ptr, dq * scale, rows, row_ok, HEAD_DIM, 0, BLOCK_D)
            _store_cols(dq_ptr, dq2 * scale, rows, row_ok, HEAD_DIM, BLOCK_D, BLOCK_D2)
