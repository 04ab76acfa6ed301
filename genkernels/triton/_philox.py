"""Device helpers that draw the in-kernel Philox normals, shared by the Triton kernels that need noise.

The stream is that of csrc/include/genkernels/philox.cuh (and of genkernels.ops.schedule.philox_normal,
its torch form), so that the triton and cuda backends draw the same numbers for the same (seed, offset):
element e (a flat int64 index) is lane e % 4 of group q = e // 4, and group q runs Philox4x32-10
(``tl.philox``) on the counter (lo32(q), hi32(q), lo32(offset), hi32(offset)) with key (lo32(seed),
hi32(seed)). Its words (r0, r1, r2, r3) give, by Box-Muller, lanes 0, 1 from (r0, r1) and lanes 2, 3
from (r2, r3): u(r) = (2 * (r >> 9) + 1) / 2^24, rho = sqrt(-2 ln u(ra)), theta = pi * (2 u(rb) - 1),
lane 0 (2) = rho cos(theta), lane 1 (3) = rho sin(theta).

Two ways to draw: :func:`_philox_normal` for any elements (each runs its group's Philox and keeps its
own lane), and :func:`_philox_normal_groups` for a block that starts a group (one Philox per group of
four elements, four times less work). Both compute each value with the same operations, so a value
depends only on (seed, offset, e), not on the way it was drawn.

The helpers exist only when triton is installed (see genkernels.triton._common): kernel modules import
them inside their ``if triton is not None:`` block.
"""

from __future__ import annotations

from genkernels.triton._common import tl, triton

if triton is not None:

    @triton.jit
    def _uniform(r):
        """u(r) = (2 * (r >> 9) + 1) / 2^24: exact in float32, in (0, 1)."""
        return (((r >> 9) << 1) | 1).to(tl.float32) * (1.0 / 16777216.0)

    @triton.jit
    def _philox_words(seed, offset_lo, offset_hi, q):
        """Philox4x32-10 of groups q (int64): counter (lo32(q), hi32(q), lo32(offset), hi32(offset))."""
        zero = (q * 0).to(tl.uint32)
        return tl.philox(
            seed,
            q.to(tl.uint32),
            (q >> 32).to(tl.uint32),
            zero + offset_lo.to(tl.uint32),
            zero + offset_hi.to(tl.uint32),
        )

    @triton.jit
    def _cos_sin(theta):
        """cos(theta) and sin(theta) for |theta| <= pi, float32, within 2e-7 (ulp-accurate in practice) and
        with no slow path: tl.cos and tl.sin are libdevice's, whose Payne-Hanek reduction for huge arguments
        (never taken here) keeps a 28-byte array in local memory with some ptxas versions (CUDA 12.8's,
        triton 3.6's: 32 bytes of stack in every kernel drawing noise). theta = k pi/2 + r with the integer
        k = round(2 theta / pi) in [-2, 2] and |r| <= pi/4 (pi/2 split in three parts short enough that k
        times each is exact, as in Cephes' sinf), then Cephes' minimax polynomials of cos and sin on r,
        rotated by the quadrant k mod 4."""
        k = tl.floor(theta * 0.6366197723675814 + 0.5)
        r = ((theta - k * 1.5703125) - k * 4.837512969970703125e-4) - k * 7.54978995489188216e-8
        r2 = r * r
        cos_r = ((2.443315711809948e-5 * r2 - 1.388731625493765e-3) * r2 + 4.166664568298827e-2) * r2 * r2
        cos_r = cos_r - 0.5 * r2 + 1.0
        sin_r = ((-1.9515295891e-4 * r2 + 8.3321608736e-3) * r2 - 1.6666654611e-1) * r2 * r + r
        q = k.to(tl.int32) & 3  # cos, sin of k pi/2 + r: (c, s), (-s, c), (-c, -s), (s, -c) for q = 0 .. 3
        odd = (q & 1) != 0
        cos = tl.where(odd, sin_r, cos_r)
        sin = tl.where(odd, cos_r, sin_r)
        return tl.where((q == 1) | (q == 2), -cos, cos), tl.where(q >= 2, -sin, sin)

    @triton.jit
    def _box_muller(ra, rb):
        """Two standard normals from two words: rho cos(theta), rho sin(theta)."""
        rho = tl.sqrt(-2.0 * tl.log(_uniform(ra)))
        cos, sin = _cos_sin(3.14159265358979 * (2.0 * _uniform(rb) - 1.0))
        return rho * cos, rho * sin

    @triton.jit
    def _philox_normal(seed, offset_lo, offset_hi, e):
        """The standard normal of each flat element e (int64) of the (seed, offset) stream: every element
        runs its group's Philox block and keeps its own lane (any alignment)."""
        r0, r1, r2, r3 = _philox_words(seed, offset_lo, offset_hi, e >> 2)
        lane = (e & 3).to(tl.int32)
        high_pair = lane >= 2
        z_cos, z_sin = _box_muller(tl.where(high_pair, r2, r0), tl.where(high_pair, r3, r1))
        return tl.where((lane & 1) != 0, z_sin, z_cos)

    @triton.jit
    def _philox_normal_groups(seed, offset_lo, offset_hi, e0, BLOCK: tl.constexpr):
        """The normals of the BLOCK elements e0 .. e0 + BLOCK - 1, e0 a multiple of 4: one Philox
        block per group of four elements, its four lanes interleaved back into element order."""
        r0, r1, r2, r3 = _philox_words(seed, offset_lo, offset_hi, (e0 >> 2) + tl.arange(0, BLOCK // 4))
        z0, z1 = _box_muller(r0, r1)
        z2, z3 = _box_muller(r2, r3)
        # join(join(z0, z2), join(z1, z3))[q, a, k] = z[2a + k], at q * 4 + 2a + k once flattened.
        return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK])
