"""Device math shared by the Triton kernels: an exp accurate to about 1 ulp, and sigmoid and tanh built on it
without cancellation (bias_act, the MLP activations, coupling).

``tl.exp`` computes 2^(x log2 e) with x log2 e rounded first, which costs up to |x| ulp (16 ulp at
x = 20, the VAE's largest log-variance), and approximates 2^y to 2 ulp. The kernels whose results
are compared with torch's float32 exp (reparameterize, coupling, bias_act) use :func:`_exp` instead.

The helpers exist only when triton is installed (see genkernels.triton._common): kernel modules import
them inside their ``if triton is not None:`` block.
"""

from __future__ import annotations

from genkernels.triton._common import tl, triton

if triton is not None:

    @triton.jit
    def _exp(x):
        """exp(x) in float32 to about 1 ulp over the whole float range (denormals and 0 below about -87,
        inf above about 88.7, NaN kept). x = n ln2 + f with |f| <= ln2 / 2 (ln2 split in two so that
        n * LN2_HI is exact for |n| < 256), exp(f) by its degree-7 Taylor polynomial (remainder below 1e-8
        relative), times 2^n applied as two exact powers of two so that n may leave the exponent range
        of one factor."""
        x = tl.where(x < -175.0, -175.0, tl.where(x > 177.0, 177.0, x))  # comparisons keep NaN
        n = tl.floor(x * 1.4426950408889634 + 0.5)
        f = (x - n * 0.693145751953125) - n * 1.4286068203094173e-06
        p = f * (1.0 / 5040.0) + 1.0 / 720.0
        p = p * f + 1.0 / 120.0
        p = p * f + 1.0 / 24.0
        p = p * f + 1.0 / 6.0
        p = p * f + 0.5
        p = p * f + 1.0
        p = p * f + 1.0
        ni = n.to(tl.int32)
        lo = ni >> 1
        scale_lo = ((lo + 127) << 23).to(tl.float32, bitcast=True)
        scale_hi = ((ni - lo + 127) << 23).to(tl.float32, bitcast=True)
        return p * scale_lo * scale_hi

    @triton.jit
    def _sigmoid_pair(z):
        """(sigmoid(z), 1 - sigmoid(z)), each without cancellation or overflow: with e = exp(-|z|),
        1 / (1 + e) is the one on z's side and e / (1 + e) the other."""
        e = _exp(-tl.abs(z))
        p = 1.0 / (1.0 + e)
        q = e * p
        pos = z >= 0.0
        return tl.where(pos, p, q), tl.where(pos, q, p)

    @triton.jit
    def _tanh(z):
        """tanh(z): Cephes' tanhf polynomial for |z| < 0.625, else sign(z) (1 - t) / (1 + t), t = exp(-2|z|)."""
        a = tl.abs(z)
        t = _exp(-2.0 * a)
        big = (1.0 - t) / (1.0 + t)
        big = tl.where(z < 0.0, -big, big)
        zs = tl.where(a < 0.625, z, 0.0)  # the polynomial's branch only: no overflow elsewhere
        s = zs * zs
        p = -5.70498872745e-3 * s + 2.06390887954e-2
        p = p * s - 5.37397155531e-2
        p = p * s + 1.33314422036e-1
        p = p * s - 3.33332819422e-1
        small = p * s * zs + zs
        return tl.where(a < 0.625, small, big)
