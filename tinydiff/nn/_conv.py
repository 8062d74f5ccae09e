"""Convolution and transposed convolution as fused ops (im2col / col2im on a channels-last layout).

Layout. The public API is NCHW, as PyTorch's. Internally both ops work channels-last (NHWC):
the patch matrix ("im2col") has one row per output position and ``(kh, kw, c)`` along the row, so
that with the input in NHWC memory every patch row is a few contiguous runs of channels, and the
GEMM result (rows = positions, columns = output channels) *is* an NHWC array. The op returns it as
an NCHW-shaped view (``out.transpose(0, 3, 1, 2)``). The fused ops that follow a conv (group norm
+ swish) write channels-last outputs themselves, and NumPy's ufuncs keep the memory order of their
inputs, so on the CPU a chain conv -> elementwise -> conv does not copy between layouts. CuPy's
ufuncs do not: they allocate C-contiguous (here: NCHW) outputs whatever the inputs' order, so on a
GPU the activations after a plain elementwise op (an attention block's residual, the division by
std(t)) and the gradients flowing back through one are NCHW in memory. Every op accepts any layout
(an NCHW array is gathered the same way, with strided reads; ``_nchw_to_rows`` copies it once), so
this costs a copy, not a wrong result; the strict stand-in allocates C-contiguous outputs as CuPy
does, so the tests run that path.

Groups. Channels are split as ``c = g * C_g + c_g``; the patch matrix gets a leading group axis,
``(G, M, kh * kw * C_g)``, and one batched matmul does every group (G = 1 is the common case).

conv2d:            out[m, o]   = sum_{k, c} cols[m, (k, c)] Wm[(k, c), o]         (per group)
conv_transpose2d:  cols[m, (k, o)] = sum_c x[m, c] Wm[c, (k, o)]; out = col2im(cols)
The transposed convolution is the adjoint of the convolution's input gradient, so the two share
the gather (im2col) and scatter-add (col2im) steps with their roles swapped.

Blocking and threads. On NumPy the batch is processed in chunks of a few samples: gather the
chunk's patches (about 2 MB), GEMM, scatter; the patch matrix never exists whole, stays in cache
between the gather and the GEMM, and the backward pass re-gathers it (cheap) instead of keeping it
from the forward pass (memory). Chunks run on tinydiff's thread pool, each thread doing whole
chunks with single-threaded BLAS (see _parallel.py); the weight gradient is summed over the chunks'
GEMMs in chunk order. CuPy and the strict stand-in take the whole batch as one chunk (one large GEMM
suits a GPU).
"""
from __future__ import annotations

import numpy as np

from ..backend import backend_of
from ..tensor import Function
from ._parallel import for_chunks, get_num_threads, pooled

GEMM_CHUNK_BYTES = 2 << 20     # patch-matrix bytes per chunk on NumPy


def _batch_chunks(like, n, row_bytes):
    """[lo, hi) ranges over the batch: the whole batch off NumPy, else about GEMM_CHUNK_BYTES of
    patches each, their number a multiple of the thread count and their sizes within one sample
    of each other (so the threads get equal work). Sums over chunks are reproducible for a given
    number of threads."""
    if type(like) is not np.ndarray:
        return [(0, n)]
    threads = get_num_threads()
    k = max(1, -(-(n * row_bytes) // GEMM_CHUNK_BYTES))
    k = min(n, -(-k // threads) * threads)
    return [(n * i // k, n * (i + 1) // k) for i in range(k)]


def _windows(a, kernel, out_hw, stride, dilation, groups):
    """The patches of ``a`` (N, H, W, C), any strides, as a view (G, N, OH, OW, KH, KW, C_g):
    [g, n, i, j, ki, kj, c] = a[n, i*sh + ki*dh, j*sw + kj*dw, g*C_g + c]."""
    xp = backend_of(a).xp
    N, _, _, C = a.shape
    (KH, KW), (OH, OW), (sh, sw), (dh, dw) = kernel, out_hw, stride, dilation
    Cg = C // groups
    sN, sH, sW, sC = a.strides
    return xp.lib.stride_tricks.as_strided(
        a, shape=(groups, N, OH, OW, KH, KW, Cg),
        strides=(sC * Cg, sN, sH * sh, sW * sw, sH * dh, sW * dw, sC))


def _gather(windows, lo, hi):
    """im2col of samples [lo, hi): their patches as the GEMM operand (G, (hi-lo)*OH*OW, KH*KW*C_g)."""
    xp = backend_of(windows).xp
    G, _, OH, OW, KH, KW, Cg = windows.shape
    b = xp.empty((G, hi - lo) + windows.shape[2:], dtype=windows.dtype)
    if Cg * windows.itemsize >= 64 or type(windows) is not np.ndarray:
        # runs of >= 64 contiguous bytes, or a GPU (one strided-copy kernel whatever the
        # strides: a launch per tap would cost more than the copy): one copy
        b[...] = windows[:, lo:hi]
    else:                                   # NumPy, few channels: one copy per tap, rows inner
        for ki in range(KH):
            for kj in range(KW):
                b[:, :, :, :, ki, kj] = windows[:, lo:hi, :, :, ki, kj]
    return b.reshape(G, (hi - lo) * OH * OW, KH * KW * Cg)


def _scatter(cols, out, in_hw, kernel, stride, dilation):
    """col2im, the adjoint of ``_gather``: out (n, BH, BW, G, C_g) = the sum of the rows of cols
    (G, n*IH*IW, KH*KW*C_g) at their patch positions ((i, j), (ki, kj) -> i*sh + ki*dh, ...).
    The plain array version below; with TINYDIFF_FUSED=1 on a GPU one kernel (_fused_conv.py)."""
    from . import _fused_conv, _fused_norm
    how = _fused_norm.mode(out)
    if how is None:
        _scatter_reference(cols, out, in_hw, kernel, stride, dilation)
    else:
        _fused_conv.col2im(how, cols, out, in_hw, kernel, stride, dilation,
                           lambda: _scatter_reference(cols, out, in_hw, kernel, stride, dilation))


def _scatter_reference(cols, out, in_hw, kernel, stride, dilation):
    """col2im in plain array code: a zero fill (or two strips of it) and one add per tap."""
    n, G, Cg = out.shape[0], out.shape[3], out.shape[4]
    (IH, IW), (KH, KW), (sh, sw), (dh, dw) = in_hw, kernel, stride, dilation
    c = cols.reshape(G, n, IH, IW, KH, KW, Cg).transpose(1, 2, 3, 4, 5, 0, 6)   # a view
    # With no dilation and a kernel at least as large as the stride, the taps ki < sh, kj < sw
    # cover the positions below (sh*IH, sw*IW) exactly once each: write those instead of
    # zero-filling and adding, and zero only the strips beyond.
    first = (dh == 1 and dw == 1 and KH >= sh and KW >= sw)
    if first:
        out[:, sh * IH:].fill(0)
        out[:, :sh * IH, sw * IW:].fill(0)
    else:
        out.fill(0)
    for ki in range(KH):
        rows = slice(ki * dh, ki * dh + sh * (IH - 1) + 1, sh)
        for kj in range(KW):
            target = out[:, rows, kj * dw: kj * dw + sw * (IW - 1) + 1: sw]
            if first and ki < sh and kj < sw:
                target[...] = c[:, :, :, ki, kj]
            else:
                target += c[:, :, :, ki, kj]


def _matmul_into(a, b, out):
    """out[...] = a @ b; straight into ``out`` on NumPy (no temporary), by assignment elsewhere."""
    if type(out) is np.ndarray:
        np.matmul(a, b, out=out)
    else:
        out[...] = backend_of(a).xp.matmul(a, b)


def _sum_in_order(parts):
    """Sum of per-chunk arrays in chunk order (reproducible whatever the threads did)."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _weight_matrix(w, groups):
    """Conv weight (O, C_g, KH, KW) as the GEMM operand (G, KH*KW*C_g, O_g)."""
    O, Cg, KH, KW = w.shape
    Og = O // groups
    return (w.reshape(groups, Og, Cg, KH, KW).transpose(0, 3, 4, 2, 1)
             .reshape(groups, KH * KW * Cg, Og))


def _weight_from_matrix(wm, shape):
    """The inverse of ``_weight_matrix``: (G, KH*KW*C_g, O_g) -> (O, C_g, KH, KW)."""
    O, Cg, KH, KW = shape
    G, _, Og = wm.shape
    return wm.reshape(G, KH, KW, Cg, Og).transpose(0, 4, 3, 1, 2).reshape(O, Cg, KH, KW)


def _transposed_weight_matrix(w, groups):
    """Transposed-conv weight (C_in, O_g, KH, KW) as (G, C_g, KH*KW*O_g): rows are input channels."""
    Cin, Og, KH, KW = w.shape
    return w.reshape(groups, Cin // groups, Og, KH, KW).transpose(0, 1, 3, 4, 2).reshape(
        groups, Cin // groups, KH * KW * Og)


def _rows_to_nchw(y, n, hw):
    """GEMM output (G, M, O_g) -> an NCHW-shaped (N, G*O_g, H, W) view of NHWC memory."""
    G, _, Og = y.shape
    if G == 1:
        y = y.reshape(n, hw[0], hw[1], Og)
    else:
        y = y.transpose(1, 0, 2).reshape(n, hw[0], hw[1], G * Og)
    return y.transpose(0, 3, 1, 2)


def _nchw_to_rows(a, groups):
    """(N, C, H, W) -> (G, N*H*W, C_g); a view when ``a`` is channels-last in memory."""
    N, C, H, W = a.shape
    rows = a.transpose(0, 2, 3, 1).reshape(N * H * W, groups, C // groups)
    return rows.transpose(1, 0, 2)


class Conv2dFn(Function):
    """y = conv2d(x, w) + b. Saves the (padded) NHWC input and the weight matrix."""

    @pooled
    def forward(self, x, w, b=None, *, stride, padding, dilation, groups):
        xp = backend_of(x).xp
        N, C, H, W = x.shape
        O, Cg, KH, KW = w.shape
        (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
        OH = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
        OW = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
        a = x.transpose(0, 2, 3, 1)                       # NHWC view
        if ph or pw:
            padded = xp.zeros((N, H + 2 * ph, W + 2 * pw, C), dtype=x.dtype)
            padded[:, ph:ph + H, pw:pw + W] = a
            a = padded
        windows = _windows(a, (KH, KW), (OH, OW), (sh, sw), (dh, dw), groups)
        wm = _weight_matrix(w, groups)
        y = xp.empty((groups, N * OH * OW, O // groups), dtype=x.dtype)
        chunks = _batch_chunks(x, N, OH * OW * KH * KW * Cg * groups * x.itemsize)

        def work(lo, hi):
            _matmul_into(_gather(windows, lo, hi), wm, y[:, lo * OH * OW:hi * OH * OW])
        for_chunks(work, chunks, y, size=N * OH * OW * KH * KW * C)
        if b is not None:
            y += b.reshape(groups, 1, O // groups)
        self.geom = (N, C, H, W, KH, KW, OH, OW, ph, pw, sh, sw, dh, dw, groups, w.shape)
        self.a = a if self.needs_grad[1] else None
        self.wm = wm if self.needs_grad[0] else None
        return _rows_to_nchw(y, N, (OH, OW))

    @pooled
    def backward(self, g):
        xp = backend_of(g).xp
        N, C, H, W, KH, KW, OH, OW, ph, pw, sh, sw, dh, dw, groups, wshape = self.geom
        need_x, need_w = self.needs_grad[0], self.needs_grad[1]
        gm = _nchw_to_rows(g, groups)                     # (G, M, O_g)
        Cg = C // groups
        chunks = _batch_chunks(g, N, OH * OW * KH * KW * C * g.itemsize)
        index = {c: i for i, c in enumerate(chunks)}
        parts = [None] * len(chunks)
        if need_w:
            windows = _windows(self.a, (KH, KW), (OH, OW), (sh, sw), (dh, dw), groups)
        if need_x:
            wmT = self.wm.swapaxes(1, 2)
            gbuf = xp.empty((N, H + 2 * ph, W + 2 * pw, groups, Cg), dtype=g.dtype)

        def work(lo, hi):
            g_rows = gm[:, lo * OH * OW:hi * OH * OW]
            if need_w:
                parts[index[lo, hi]] = _gather(windows, lo, hi).swapaxes(1, 2) @ g_rows
            if need_x:
                _scatter(g_rows @ wmT, gbuf[lo:hi], (OH, OW), (KH, KW), (sh, sw), (dh, dw))
        for_chunks(work, chunks, g, size=N * OH * OW * KH * KW * C)
        if need_w:
            gwm = _sum_in_order(parts)
        gx = gw = gb = None
        if need_x:
            gx = gbuf.reshape(N, H + 2 * ph, W + 2 * pw, C)[:, ph:ph + H, pw:pw + W].transpose(0, 3, 1, 2)
        if need_w:
            gw = _weight_from_matrix(gwm, wshape)
        if len(self.needs_grad) > 2 and self.needs_grad[2]:
            gb = gm.sum(axis=1).reshape(-1)
        return (gx, gw, gb)[:len(self.needs_grad)]


class ConvTranspose2dFn(Function):
    """y = conv_transpose2d(x, w) + b, w of shape (C_in, C_out/G, KH, KW): a GEMM then col2im."""

    @pooled
    def forward(self, x, w, b=None, *, stride, padding, output_padding, dilation, groups):
        xp = backend_of(x).xp
        N, C, H, W = x.shape
        _, Og, KH, KW = w.shape
        (ph, pw), (sh, sw), (dh, dw), (oph, opw) = padding, stride, dilation, output_padding
        full_h, full_w = (H - 1) * sh + dh * (KH - 1) + 1, (W - 1) * sw + dw * (KW - 1) + 1
        OH, OW = full_h - 2 * ph + oph, full_w - 2 * pw + opw
        # the scatter buffer must hold rows [ph, ph + OH) of the output as well as every patch
        buf_h, buf_w = max(full_h, ph + OH), max(full_w, pw + OW)
        xm = _nchw_to_rows(x, groups)                      # (G, M, C_g)
        wm = _transposed_weight_matrix(w, groups)          # (G, C_g, KH*KW*O_g)
        out = xp.empty((N, buf_h, buf_w, groups, Og), dtype=x.dtype)
        chunks = _batch_chunks(x, N, H * W * KH * KW * Og * groups * x.itemsize)

        def work(lo, hi):
            cols = xp.matmul(xm[:, lo * H * W:hi * H * W], wm)
            _scatter(cols, out[lo:hi], (H, W), (KH, KW), (sh, sw), (dh, dw))
        for_chunks(work, chunks, out, size=N * H * W * KH * KW * Og * groups)
        y = out.reshape(N, buf_h, buf_w, groups * Og)[:, ph:ph + OH, pw:pw + OW]
        if b is not None:
            y += b
        self.geom = (N, C, H, W, KH, KW, OH, OW, ph, pw, sh, sw, dh, dw, groups, w.shape, full_h, full_w)
        self.xm = xm if self.needs_grad[1] else None
        self.wm = wm if self.needs_grad[0] else None
        return y.transpose(0, 3, 1, 2)

    @pooled
    def backward(self, g):
        N, C, H, W, KH, KW, OH, OW, ph, pw, sh, sw, dh, dw, groups, wshape, full_h, full_w = self.geom
        xp = backend_of(g).xp
        need_x, need_w = self.needs_grad[0], self.needs_grad[1]
        gx = gw = gb = None
        if need_x or need_w:
            a = g.transpose(0, 2, 3, 1)                   # NHWC view of the output gradient
            if ph or pw or OH < full_h or OW < full_w:
                # back to the coordinates of the scatter buffer (rows outside the output get 0)
                full = xp.zeros((N, full_h, full_w, a.shape[3]), dtype=g.dtype)
                hi_h, hi_w = min(OH, full_h - ph), min(OW, full_w - pw)
                full[:, ph:ph + hi_h, pw:pw + hi_w] = a[:, :hi_h, :hi_w]
                a = full
            windows = _windows(a, (KH, KW), (H, W), (sh, sw), (dh, dw), groups)
            Og = wshape[1]
            chunks = _batch_chunks(g, N, H * W * KH * KW * Og * groups * g.itemsize)
            index = {c: i for i, c in enumerate(chunks)}
            parts = [None] * len(chunks)
            if need_x:
                wmT = self.wm.swapaxes(1, 2)
                gxm = xp.empty((groups, N * H * W, C // groups), dtype=g.dtype)

            def work(lo, hi):
                cols = _gather(windows, lo, hi)              # (G, rows, KH*KW*O_g)
                rows = slice(lo * H * W, hi * H * W)
                if need_x:
                    _matmul_into(cols, wmT, gxm[:, rows])
                if need_w:
                    parts[index[lo, hi]] = self.xm[:, rows].swapaxes(1, 2) @ cols
            for_chunks(work, chunks, g, size=N * H * W * KH * KW * Og * groups)
            if need_w:
                gwm = _sum_in_order(parts)
            if need_x:
                gx = _rows_to_nchw(gxm, N, (H, W))
            if need_w:
                Cin = wshape[0]
                gw = (gwm.reshape(groups, Cin // groups, KH, KW, Og).transpose(0, 1, 4, 2, 3)
                      .reshape(wshape))
        if len(self.needs_grad) > 2 and self.needs_grad[2]:
            gb = g.sum(axis=(0, 2, 3))
        return (gx, gw, gb)[:len(self.needs_grad)]
