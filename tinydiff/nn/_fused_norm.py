"""Fused CuPy kernels for group norm (+ the time-embedding shift, + swish): OFF by default.

No GPU has run these kernels yet, so nothing uses them unless ``TINYDIFF_FUSED=1`` is set (the
same switch as the fused Adam and EMA, tinydiff/optim/fused.py). The plain array version of each
stage is the reference, in tinydiff/nn/_norm.py:

    forward   1. _forward_statistics   moments of every channel, then the per-(sample, group)
                                       mean, rstd and the y = x a + b coefficients
              2. _forward_output       y = [silu](x a + b), and 2 silu'(y) for the backward
    backward  3. _backward_statistics  sums of dL/dy and dL/dy x per channel, then P, Q, R of
                                       dx = dL/dy P + x Q + R, dL/dshift and sum dL/dy xhat
              4. _backward_output      dx

Where the reference launches about 40 kernels per pass (most of them on the small (N, C) arrays),
the fused path launches one per stage (plus the two sums over the batch of the weight and bias
gradients): a statistics kernel with one thread block per (sample, group), which reduces each
channel of the group over the S positions in shared memory and then lets one thread combine the
group, and an elementwise kernel for the output.

- on CuPy, with the switch on: those kernels;
- on the strict stand-in, with the switch on: the reference stages, each counted as one launch
  (``strict_cupy.one_launch``), so that benchmarks/launches.py shows what the kernels would cost;
- otherwise (NumPy, or the switch off): _norm.py runs the reference, chunk by chunk.

The kernels read the (N, S, C) row views with their strides (channels-last or plain), so no copy
is made. ``tests/test_fused.py`` compares them with the reference when a GPU is present.
"""
from __future__ import annotations

import numpy as np

_BLOCK = 256          # threads per (sample, group) block; a power of two (the tree reduction)

_COMMON = r"""
// sum of the two per-thread partial sums p1, p2 over the block, into red[0], red[blockDim.x]
__device__ void block_sum2(T* red, T p1, T p2) {
    red[threadIdx.x] = p1;
    red[blockDim.x + threadIdx.x] = p2;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) {
            red[threadIdx.x] += red[threadIdx.x + w];
            red[blockDim.x + threadIdx.x] += red[blockDim.x + threadIdx.x + w];
        }
        __syncthreads();
    }
}
"""

_FORWARD_STATS = _COMMON + r"""
extern "C" __global__ void tinydiff_gn_forward_stats(
        const T* x, long long sn, long long ss, long long sc, const T* shift, int has_shift,
        const T* weight, const T* bias, int has_affine, int S, int C, int G, T eps, T scale,
        T* a, T* b, T* rstd, T* smm, T* s1) {
    extern __shared__ __align__(8) unsigned char smem[];  // aligned for double
    T* red = (T*)smem;                     // 2 blockDim.x
    T* mean_c = red + 2 * blockDim.x;      // C/G
    T* within = mean_c + C / G;            // C/G
    const int n = blockIdx.x / G, g = blockIdx.x % G, cg = C / G;
    for (int k = 0; k < cg; ++k) {         // the moments of x - x[first position], per channel
        const int c = g * cg + k;
        const T* xc = x + n * sn + c * sc;
        const T x0 = xc[0];
        T p1 = 0, p2 = 0;
        for (long long s = threadIdx.x; s < S; s += blockDim.x) {
            T z = xc[s * ss] - x0;
            p1 += z;
            p2 += z * z;
        }
        block_sum2(red, p1, p2);
        if (threadIdx.x == 0) {
            T c1 = red[0], c2 = red[blockDim.x];
            mean_c[k] = x0 + c1 * ((T)1 / S);
            T w = c2 - c1 * c1 * ((T)1 / S);
            within[k] = w > 0 ? w : 0;
        }
        __syncthreads();
    }
    if (threadIdx.x != 0) return;
    T mu = 0;                              // the group: mean, variance, the coefficients
    for (int k = 0; k < cg; ++k)
        mu += mean_c[k] + (has_shift ? shift[n * C + g * cg + k] : (T)0);
    mu = mu / cg;
    T var = 0;
    for (int k = 0; k < cg; ++k) {
        T dev = mean_c[k] + (has_shift ? shift[n * C + g * cg + k] : (T)0) - mu;
        var += within[k] + S * dev * dev;
    }
    var = var * ((T)G / ((T)S * C));
    const T r = (T)1 / sqrt(var + eps);
    rstd[n * G + g] = r;
    for (int k = 0; k < cg; ++k) {
        const int c = g * cg + k;
        T m = (has_shift ? shift[n * C + c] : (T)0) - mu;
        T ac = r * (has_affine ? weight[c] : (T)1);
        smm[n * C + c] = m;
        a[n * C + c] = ac * scale;
        b[n * C + c] = (m * ac + (has_affine ? bias[c] : (T)0)) * scale;
        s1[n * C + c] = mean_c[k] * S;
    }
}
"""

_BACKWARD_STATS = _COMMON + r"""
extern "C" __global__ void tinydiff_gn_backward_stats(
        const T* gy, long long gn, long long gs, long long gc,
        const T* ds, long long dn, long long dss, long long dc, int has_silu,
        const T* x, long long sn, long long ss, long long sc,
        const T* rstd, const T* smm, const T* s1, const T* gamma, int S, int C, int G, T half,
        int has_shift, T* p, T* q, T* r, T* sum_d, T* wterm, T* gshift) {
    extern __shared__ __align__(8) unsigned char smem[];  // aligned for double
    T* red = (T*)smem;                     // 2 blockDim.x
    T* ca = red + 2 * blockDim.x;          // C/G: sum_s dL/dy
    T* cb = ca + C / G;                    // C/G: sum_s dL/dy x
    const int n = blockIdx.x / G, g = blockIdx.x % G, cg = C / G;
    for (int k = 0; k < cg; ++k) {
        const int c = g * cg + k;
        T p1 = 0, p2 = 0;
        for (long long s = threadIdx.x; s < S; s += blockDim.x) {
            T d = gy[n * gn + s * gs + c * gc];
            if (has_silu) d = d * ds[n * dn + s * dss + c * dc];
            p1 += d;
            p2 += d * x[n * sn + s * ss + c * sc];
        }
        block_sum2(red, p1, p2);
        if (threadIdx.x == 0) { ca[k] = red[0] * half; cb[k] = red[blockDim.x] * half; }
        __syncthreads();
    }
    if (threadIdx.x != 0) return;
    const T rs = rstd[n * G + g];
    const T m = (T)S * cg;
    T m1 = 0, m2 = 0;
    for (int k = 0; k < cg; ++k) {
        const int c = g * cg + k;
        T xhat_term = cb[k] + smm[n * C + c] * ca[k];
        m1 += gamma[c] * ca[k];
        m2 += gamma[c] * rs * xhat_term;
    }
    m1 = m1 * ((T)1 / m);
    m2 = m2 * ((T)1 / m);
    const T qq = -rs * rs * m2;
    for (int k = 0; k < cg; ++k) {
        const int c = g * cg + k;
        T pc = rs * gamma[c];
        T rc = -rs * m1 + qq * smm[n * C + c];
        p[n * C + c] = pc;
        q[n * C + c] = qq;
        r[n * C + c] = rc;
        sum_d[n * C + c] = ca[k];
        wterm[n * C + c] = rs * (cb[k] + smm[n * C + c] * ca[k]);
        if (has_shift) gshift[n * C + c] = pc * ca[k] + qq * s1[n * C + c] + rc * S;
    }
}
"""

# the output stages, elementwise with a, b (n, 1, C) broadcast over the positions
_FORWARD_OUT = ("T x, T a, T b, int32 silu, int32 want_ds", "T y, T ds", """
    T u = x * a; u = u + b;
    if (!silu) { y = u; }
    else {
        T t = tanh(u);
        if (want_ds) { T d = t * t; d = 1 - d; d = d * u; d = d + t; d = d + 1; ds = d; }
        t = t * u; t = t + u; y = t;
    }""")
_BACKWARD_OUT = ("T gy, T ds, T x, T p, T q, T r, T half, int32 silu", "T dx", """
    T d = gy;
    if (silu) d = d * ds;
    d = d * (p * half); T t = x * q; d = d + t; d = d + r; dx = d;""")

_kernels = {}


def mode(array):
    """"kernel" (CuPy, switched on), "counted" (the strict stand-in, switched on) or None."""
    from ..optim import fused            # the one switch (TINYDIFF_FUSED) for every fused kernel
    return fused.mode(array)


def _kernel(name, dtype):
    key = (name, np.dtype(dtype).name)
    if key not in _kernels:
        import cupy
        ctype = {"float32": "float", "float64": "double"}[key[1]]
        if name in ("forward_stats", "backward_stats"):
            code = (_FORWARD_STATS if name == "forward_stats" else _BACKWARD_STATS)
            _kernels[key] = cupy.RawKernel(f"typedef {ctype} T;\n" + code, f"tinydiff_gn_{name}")
        else:
            params, out, body = _FORWARD_OUT if name == "forward_out" else _BACKWARD_OUT
            _kernels[key] = cupy.ElementwiseKernel(params, out, body, f"tinydiff_gn_{name}")
    return _kernels[key]


def _strides(a):
    return tuple(np.int64(s // a.itemsize) for s in a.strides)


def forward(how, v, scratch, out, dsilu, shift, weight, bias, gamma, beta, G, S, eps, scale, silu):
    """Stages 1 and 2 over the whole batch (v: the (N, S, C) rows of x; out, dsilu: the rows the
    output and 2 silu' go to). Returns a, b, rstd (N, G, 1), shift - mu (N, G, C/G), s1 (N, C)."""
    from ._norm import _forward_output, _forward_statistics
    N, _, C = v.shape
    if how == "kernel":
        import cupy
        dt = v.dtype
        a, b, smm, s1 = (cupy.empty((N, C), dtype=dt) for _ in range(4))
        rstd = cupy.empty((N, G, 1), dtype=dt)
        f = dt.type
        shift, weight, bias = (None if a_ is None else cupy.ascontiguousarray(a_)
                               for a_ in (shift, weight, bias))
        _kernel("forward_stats", dt)(
            (N * G,), (_BLOCK,),
            (v, *_strides(v), v if shift is None else shift, np.int32(shift is not None),
             v if weight is None else weight, v if bias is None else bias,
             np.int32(weight is not None), np.int32(S), np.int32(C), np.int32(G), f(eps),
             f(scale), a, b, rstd, smm, s1),
            shared_mem=(2 * _BLOCK + 2 * (C // G)) * dt.itemsize)
        a, b = a.reshape(N, 1, C), b.reshape(N, 1, C)
        _kernel("forward_out", dt)(v, a, b, np.int32(silu), np.int32(dsilu is not None), out,
                                   scratch if dsilu is None else dsilu)
        return a, b, rstd, smm.reshape(N, G, C // G), s1
    from ..testing import strict_cupy
    with strict_cupy.one_launch("group_norm_statistics"):
        a, b, rstd, smm, s1 = _forward_statistics(v, scratch, shift, gamma, beta, G, S, eps, scale)
    with strict_cupy.one_launch("group_norm_output"):
        _forward_output(v, a, b, scratch, out, dsilu, silu)
    return a, b, rstd, smm, s1


def backward(how, gv, dsilu, v, prod, gx, rstd, smm, s1, gamma, G, S, half, has_shift, has_affine):
    """Stages 3 and 4 over the whole batch, dx into the rows gx. Returns the channel sums of
    dL/dy (N, C), sum_s dL/dy xhat (N, G, C/G) and dL/dshift (N, C) or None."""
    from ._norm import _backward_output, _backward_statistics
    N, _, C = v.shape
    if how == "kernel":
        import cupy
        dt = v.dtype
        p, q, r, sum_d, wterm, gshift = (cupy.empty((N, C), dtype=dt) for _ in range(6))
        silu = dsilu is not None
        gamma = cupy.ascontiguousarray(gamma)
        _kernel("backward_stats", dt)(
            (N * G,), (_BLOCK,),
            (gv, *_strides(gv), dsilu if silu else gv, *_strides(dsilu if silu else gv),
             np.int32(silu), v, *_strides(v), rstd, smm, s1, gamma, np.int32(S), np.int32(C),
             np.int32(G), dt.type(half), np.int32(has_shift), p, q, r, sum_d, wterm, gshift),
            shared_mem=(2 * _BLOCK + 2 * (C // G)) * dt.itemsize)
        _kernel("backward_out", dt)(gv, dsilu if silu else gv, v, p.reshape(N, 1, C),
                                    q.reshape(N, 1, C), r.reshape(N, 1, C), dt.type(half),
                                    np.int32(silu), gx)
        return sum_d, wterm.reshape(N, G, C // G), gshift if has_shift else None
    from ..testing import strict_cupy
    with strict_cupy.one_launch("group_norm_backward_statistics"):
        p, q, r, a, w, gshift = _backward_statistics(gv, dsilu, v, prod, gx, rstd, smm, s1,
                                                     gamma, G, S, half, has_shift)
    with strict_cupy.one_launch("group_norm_backward_output"):
        _backward_output(v, gx, prod, p, q, r, half)
    return a, w, gshift
