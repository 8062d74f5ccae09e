"""Convolution and transposed convolution as fused ops (im2col / col2im on a channels-last layout).

Layout. The public API is NCHW, as PyTorch's. Internally both ops work channels-last (NHWC):
the patch matrix ("im2col") has one row per output position and ``(kh, kw, c)`` along the row, so
that with the input in NHWC memory every patch row is a few contiguous runs of channels, and the
GEMM result (rows = positions, columns = output channels) *is* an NHWC array. The op returns it as
an NCHW-shaped view (``out.transpose(0, 3, 1, 2)``), so a chain conv -> elementwise -> conv never
copies the activations between layouts; NumPy and CuPy ufuncs keep the memory order of their
inputs. Any input layout is accepted (a plain NCHW array is gathered the same way, just with
strided reads).

Groups. Channels are split as ``c = g * C_g + c_g``; the patch matrix gets a leading group axis,
``(G, M, kh * kw * C_g)``, and one batched matmul does every group (G = 1 is the common case).

conv2d:            out[m, o]   = sum_{k, c} cols[m, (k, c)] Wm[(k, c), o]         (per group)
conv_transpose2d:  cols[m, (k, o)] = sum_c x[m, c] Wm[c, (k, o)]; out = col2im(cols)
The transposed convolution is the adjoint of the convolution's input gradient, so the two share
``_im2col`` and ``_col2im`` with their roles swapped in forward and backward.
"""
from __future__ import annotations

from ..backend import backend_of
from ..tensor import Function
from ._parallel import for_batch_chunks


def _im2col(a, kernel, out_hw, stride, dilation, groups):
    """Patches of ``a`` (N, H, W, C), any strides, as a C-contiguous (G, N*OH*OW, KH*KW*C_g) array.

    Row m = (n, i, j) holds a[n, i*sh + ki*dh, j*sw + kj*dw, g*C_g + c] at column (ki, kj, c).
    """
    xp = backend_of(a).xp
    N, _, _, C = a.shape
    (KH, KW), (OH, OW), (sh, sw), (dh, dw) = kernel, out_hw, stride, dilation
    Cg = C // groups
    sN, sH, sW, sC = a.strides
    windows = xp.lib.stride_tricks.as_strided(
        a, shape=(groups, N, OH, OW, KH, KW, Cg),
        strides=(sC * Cg, sN, sH * sh, sW * sw, sH * dh, sW * dw, sC))
    cols = xp.empty((groups, N, OH, OW, KH, KW, Cg), dtype=a.dtype)

    def copy(lo, hi):
        cols[:, lo:hi] = windows[:, lo:hi]
    for_batch_chunks(copy, cols[0], N)
    return cols.reshape(groups, N * OH * OW, KH * KW * Cg)


def _col2im(cols, n, in_hw, kernel, buf_hw, stride, dilation):
    """The adjoint of ``_im2col``: scatter-add cols (G, N*IH*IW, KH*KW*C_g) into a new
    (N, BH, BW, G*C_g) buffer; row (n, i, j), column (ki, kj, c) lands at (i*sh + ki*dh, j*sw + kj*dw)."""
    xp = backend_of(cols).xp
    G, _, KC = cols.shape
    (IH, IW), (KH, KW), (BH, BW), (sh, sw), (dh, dw) = in_hw, kernel, buf_hw, stride, dilation
    Cg = KC // (KH * KW)
    out = xp.empty((n, BH, BW, G, Cg), dtype=cols.dtype)
    # (G, N, IH, IW, KH, KW, Cg) -> (N, IH, IW, KH, KW, G, Cg), a view
    c = cols.reshape(G, n, IH, IW, KH, KW, Cg).transpose(1, 2, 3, 4, 5, 0, 6)

    def scatter(lo, hi):
        o = out[lo:hi]
        o.fill(0)
        for ki in range(KH):
            rows = slice(ki * dh, ki * dh + sh * (IH - 1) + 1, sh)
            for kj in range(KW):
                o[:, rows, kj * dw: kj * dw + sw * (IW - 1) + 1: sw] += c[lo:hi, :, :, ki, kj]
    for_batch_chunks(scatter, out, n)
    return out.reshape(n, BH, BW, G * Cg)


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


def _channel_sum(g):
    """Sum of an (N, C, H, W) gradient over N, H, W (the bias gradient)."""
    return g.sum(axis=(0, 2, 3))


class Conv2dFn(Function):
    """y = conv2d(x, w) + b. Saves the patch matrix (for dW) and the weight matrix (for dx)."""

    def forward(self, x, w, b=None, *, stride, padding, dilation, groups):
        xp = backend_of(x).xp
        N, C, H, W = x.shape
        O, _, KH, KW = w.shape
        (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
        OH = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
        OW = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
        a = x.transpose(0, 2, 3, 1)                      # NHWC view
        if ph or pw:
            padded = xp.zeros((N, H + 2 * ph, W + 2 * pw, C), dtype=x.dtype)
            padded[:, ph:ph + H, pw:pw + W] = a
            a = padded
        cols = _im2col(a, (KH, KW), (OH, OW), (sh, sw), (dh, dw), groups)
        wm = _weight_matrix(w, groups)
        y = xp.matmul(cols, wm)                           # (G, M, O_g)
        if b is not None:
            y += b.reshape(groups, 1, O // groups)
        self.geom = (N, C, H, W, KH, KW, OH, OW, ph, pw, sh, sw, dh, dw, groups, w.shape)
        self.cols = cols if self.needs_grad[1] else None
        self.wm = wm if self.needs_grad[0] else None
        return _rows_to_nchw(y, N, (OH, OW))

    def backward(self, g):
        N, C, H, W, KH, KW, OH, OW, ph, pw, sh, sw, dh, dw, groups, wshape = self.geom
        gm = _nchw_to_rows(g, groups)                     # (G, M, O_g)
        gx = gw = gb = None
        if self.needs_grad[0]:
            dcols = gm @ self.wm.swapaxes(1, 2)           # (G, M, KH*KW*C_g)
            buf = _col2im(dcols, N, (OH, OW), (KH, KW), (H + 2 * ph, W + 2 * pw), (sh, sw), (dh, dw))
            gx = buf[:, ph:ph + H, pw:pw + W].transpose(0, 3, 1, 2)
        if self.needs_grad[1]:
            gw = _weight_from_matrix(self.cols.swapaxes(1, 2) @ gm, wshape)
        if len(self.needs_grad) > 2 and self.needs_grad[2]:
            gb = _channel_sum(g)
        return (gx, gw, gb)[:len(self.needs_grad)]


class ConvTranspose2dFn(Function):
    """y = conv_transpose2d(x, w) + b, w of shape (C_in, C_out/G, KH, KW): a GEMM then col2im."""

    def forward(self, x, w, b=None, *, stride, padding, output_padding, dilation, groups):
        N, C, H, W = x.shape
        _, Og, KH, KW = w.shape
        (ph, pw), (sh, sw), (dh, dw), (oph, opw) = padding, stride, dilation, output_padding
        full_h, full_w = (H - 1) * sh + dh * (KH - 1) + 1, (W - 1) * sw + dw * (KW - 1) + 1
        OH, OW = full_h - 2 * ph + oph, full_w - 2 * pw + opw
        # the scatter buffer must hold rows [ph, ph + OH) of the output as well as every patch
        buf_h, buf_w = max(full_h, ph + OH), max(full_w, pw + OW)
        xm = _nchw_to_rows(x, groups)                      # (G, M, C_g)
        # weight (C_in, O_g, KH, KW) -> (G, C_g, KH*KW*O_g): rows are input channels
        Cg = C // groups
        wm = w.reshape(groups, Cg, Og, KH, KW).transpose(0, 1, 3, 4, 2).reshape(groups, Cg, KH * KW * Og)
        cols = backend_of(x).xp.matmul(xm, wm)              # (G, M, KH*KW*O_g)
        buf = _col2im(cols, N, (H, W), (KH, KW), (buf_h, buf_w), (sh, sw), (dh, dw))
        y = buf[:, ph:ph + OH, pw:pw + OW]
        if b is not None:
            y += b
        self.geom = (N, C, H, W, KH, KW, OH, OW, ph, pw, sh, sw, dh, dw, groups, w.shape, full_h, full_w)
        self.xm = xm if self.needs_grad[1] else None
        self.wm = wm if self.needs_grad[0] else None
        return y.transpose(0, 3, 1, 2)

    def backward(self, g):
        N, C, H, W, KH, KW, OH, OW, ph, pw, sh, sw, dh, dw, groups, wshape, full_h, full_w = self.geom
        xp = backend_of(g).xp
        gx = gw = gb = None
        if self.needs_grad[0] or self.needs_grad[1]:
            a = g.transpose(0, 2, 3, 1)                   # NHWC view of the output gradient
            if ph or pw or OH < full_h or OW < full_w:
                # back to the coordinates of the scatter buffer (rows outside the output get 0)
                full = xp.zeros((N, full_h, full_w, a.shape[3]), dtype=g.dtype)
                hi_h, hi_w = min(OH, full_h - ph), min(OW, full_w - pw)
                full[:, ph:ph + hi_h, pw:pw + hi_w] = a[:, :hi_h, :hi_w]
                a = full
            cols = _im2col(a, (KH, KW), (H, W), (sh, sw), (dh, dw), groups)   # (G, M, KH*KW*O_g)
            if self.needs_grad[0]:
                gx = _rows_to_nchw(cols @ self.wm.swapaxes(1, 2), N, (H, W))
            if self.needs_grad[1]:
                Cin, Og = wshape[0], wshape[1]
                gw = ((self.xm.swapaxes(1, 2) @ cols)      # (G, C_g, KH*KW*O_g)
                      .reshape(groups, Cin // groups, KH, KW, Og).transpose(0, 1, 4, 2, 3)
                      .reshape(wshape))
        if len(self.needs_grad) > 2 and self.needs_grad[2]:
            gb = _channel_sum(g)
        return (gx, gw, gb)[:len(self.needs_grad)]
