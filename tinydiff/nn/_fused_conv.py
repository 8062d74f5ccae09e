"""A fused CuPy kernel for col2im (the scatter of the transposed convolution's forward pass and
of the convolution's backward): OFF by default, like every fused kernel here (TINYDIFF_FUSED=1;
tinydiff/optim/fused.py). No GPU has run it yet.

The reference, ``_conv._scatter_reference``, zero-fills the output and adds the KH x KW taps one
strided slice at a time: KH KW + 1 launches. The kernel computes each output element as the sum
of the taps that land on it, in the same (ki, kj) order, in one launch. On the strict stand-in,
with the switch on, the reference runs counted as one launch (``strict_cupy.one_launch``).
``tests/test_fused.py`` compares kernel and reference when a GPU is present.
"""
from __future__ import annotations

import numpy as np

# out (n, BH, BW, G, Cg), C-contiguous, element i; cols (G, n, IH, IW, KH, KW, Cg), C-contiguous
_COL2IM = ("raw T cols, int32 n, int32 BH, int32 BW, int32 G, int32 Cg, int32 IH, int32 IW, "
           "int32 KH, int32 KW, int32 sh, int32 sw, int32 dh, int32 dw", "T out", """
    const int c = i % Cg; long long t = i / Cg;
    const int g = t % G; t /= G;
    const int x = t % BW; t /= BW;
    const int y = t % BH; const int b = t / BH;
    T acc = 0;
    for (int ki = 0; ki < KH; ++ki) {
        const int yy = y - ki * dh;
        if (yy < 0 || yy % sh) continue;
        const int ii = yy / sh;
        if (ii >= IH) continue;
        for (int kj = 0; kj < KW; ++kj) {
            const int xx = x - kj * dw;
            if (xx < 0 || xx % sw) continue;
            const int jj = xx / sw;
            if (jj >= IW) continue;
            acc += cols[((((((long long)g * n + b) * IH + ii) * IW + jj) * KH + ki) * KW + kj)
                        * Cg + c];
        }
    }
    out = acc;""")

_kernels = {}


def col2im(how, cols, out, in_hw, kernel, stride, dilation, reference):
    """out (n, BH, BW, G, C_g) = col2im of cols (G, n*IH*IW, KH*KW*C_g): the kernel ("kernel"),
    or ``reference()`` counted as one launch ("counted")."""
    if how == "kernel":
        import cupy
        if "col2im" not in _kernels:
            _kernels["col2im"] = cupy.ElementwiseKernel(*_COL2IM, "tinydiff_col2im")
        n, BH, BW, G, Cg = out.shape
        (IH, IW), (KH, KW), (sh, sw), (dh, dw) = in_hw, kernel, stride, dilation
        args = [np.int32(v) for v in (n, BH, BW, G, Cg, IH, IW, KH, KW, sh, sw, dh, dw)]
        _kernels["col2im"](cupy.ascontiguousarray(cols), *args, out)
        return
    from ..testing import strict_cupy
    with strict_cupy.one_launch("col2im"):
        reference()
