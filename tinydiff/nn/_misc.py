"""Smaller fused ops: gelu, dropout, average pooling, nearest upsampling, embedding lookup."""
from __future__ import annotations

import math

import numpy as np

from ..backend import backend_of, get_backend
from ..tensor import Function

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def erf(x):
    """The error function on any backend, accurate to ~1e-15 in float64.

    NumPy: scipy.special.erf. Elsewhere (CuPy, the strict stand-in) only array arithmetic is used:
    for |x| < 2 the series erf(x) = 2/sqrt(pi) e^{-x^2} sum_n x (2x^2)^n / (2n+1)!! (all terms
    positive, no cancellation), for |x| >= 2 the continued fraction of erfc(x) (Abramowitz and
    Stegun 7.1.14), evaluated bottom-up at a fixed depth.
    """
    xp = backend_of(x).xp
    if xp is np:
        import scipy.special
        return scipy.special.erf(x).astype(x.dtype, copy=False)
    a = xp.abs(x)
    small = xp.minimum(a, 2.0)
    z = 2 * small * small
    term = small.copy()
    total = small.copy()
    for n in range(1, 40):
        term = term * z * (1.0 / (2 * n + 1))
        total += term
    series = total * xp.exp(-small * small) * (2.0 / math.sqrt(math.pi))
    big = xp.maximum(a, 2.0)
    f = big
    for j in range(60, 0, -1):
        f = big + (j / 2.0) / f
    tail = 1 - xp.exp(-big * big) * (1.0 / math.sqrt(math.pi)) / f
    return xp.sign(x) * xp.where(a < 2.0, series, tail)


class GeluFn(Function):
    """gelu(x) = x Phi(x) (exact, with erf) or, with ``approximate="tanh"``,
    x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as PyTorch."""

    float_only = True

    def forward(self, x, *, approximate):
        xp = backend_of(x).xp
        self.x, self.approximate = x, approximate
        if approximate == "tanh":
            self.t = xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
            return 0.5 * x * (1 + self.t)
        self.cdf = 0.5 * (1 + erf(x * _INV_SQRT_2))
        return x * self.cdf

    def backward(self, g):
        xp = backend_of(g).xp
        x = self.x
        if self.approximate == "tanh":
            t = self.t
            dinner = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
            return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dinner)
        pdf = xp.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return g * (self.cdf + x * pdf)


class DropoutFn(Function):
    """Zero each element with probability p, scale the rest by 1/(1-p) (inverted dropout)."""

    def forward(self, x, *, keep_scaled):
        self.mask = keep_scaled
        return x * keep_scaled

    def backward(self, g):
        return g * self.mask


_default_rngs = {}


def default_rng(backend):
    """A process-wide generator per backend (seed 0) for ops called without one."""
    if backend.name not in _default_rngs:
        _default_rngs[backend.name] = backend.default_rng(0)
    return _default_rngs[backend.name]


def dropout_mask(x, p, rng):
    """The scaled keep mask for ``x``: 1/(1-p) where kept, 0 where dropped, of x's dtype, laid
    out in memory as x is (drawn in x's axis order, then viewed in x's shape): the product with a
    channels-last activation then stays channels-last for the convolution after it, instead of
    a mixed-layout multiply (3x slower on NumPy) producing an NCHW array the conv must gather."""
    order = sorted(range(x.ndim), key=lambda i: -abs(x.strides[i]))   # outermost axis first
    u = rng.uniform(tuple(x.shape[i] for i in order), dtype=x.dtype)
    u = u.transpose(tuple(order.index(i) for i in range(x.ndim)))
    keep = (u >= p).astype(x.dtype)
    keep *= 1.0 / (1.0 - p)
    return keep


class AvgPool2dFn(Function):
    """Mean over kH x kW windows (zero padding; divisor = window size, or the count of real
    elements with ``count_include_pad=False``)."""

    def forward(self, x, *, kernel, stride, padding, count_include_pad):
        xp = backend_of(x).xp
        N, C, H, W = x.shape
        (KH, KW), (sh, sw), (ph, pw) = kernel, stride, padding
        Hp, Wp = H + 2 * ph, W + 2 * pw
        OH, OW = (Hp - KH) // sh + 1, (Wp - KW) // sw + 1
        a = x
        if ph or pw:
            a = xp.zeros((N, C, Hp, Wp), dtype=x.dtype)
            a[:, :, ph:ph + H, pw:pw + W] = x
        out = xp.zeros((N, C, OH, OW), dtype=x.dtype)
        for ki in range(KH):
            for kj in range(KW):
                out += a[:, :, ki:ki + sh * (OH - 1) + 1:sh, kj:kj + sw * (OW - 1) + 1:sw]
        if count_include_pad or not (ph or pw):
            inv = 1.0 / (KH * KW)
        else:   # per output position: how many window elements are inside the input
            rows = np.clip(np.arange(OH) * sh - ph + KH, 0, H) - np.clip(np.arange(OH) * sh - ph, 0, H)
            cols = np.clip(np.arange(OW) * sw - pw + KW, 0, W) - np.clip(np.arange(OW) * sw - pw, 0, W)
            inv = get_backend(backend_of(x)).asarray((1.0 / np.outer(rows, cols)).astype(x.dtype))
        out *= inv
        self.geom, self.inv = (N, C, H, W, KH, KW, sh, sw, ph, pw, OH, OW), inv
        return out

    def backward(self, g):
        xp = backend_of(g).xp
        N, C, H, W, KH, KW, sh, sw, ph, pw, OH, OW = self.geom
        gs = g * self.inv
        gx = xp.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=g.dtype)
        for ki in range(KH):
            for kj in range(KW):
                gx[:, :, ki:ki + sh * (OH - 1) + 1:sh, kj:kj + sw * (OW - 1) + 1:sw] += gs
        return gx[:, :, ph:ph + H, pw:pw + W]


def nearest_index(in_size, out_size, scale):
    """PyTorch's nearest source index for each output index (float32 arithmetic, as ATen)."""
    if out_size == in_size:
        return np.arange(out_size)
    s = np.float32(1.0 / scale) if scale else np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * s).astype(np.int64)
    return np.minimum(idx, in_size - 1)


class UpsampleNearestFn(Function):
    """out[..., i, j] = x[..., rows[i], cols[j]] over the last two axes. The backward sums the
    gradient of every copy: with one-hot matrices R (OH, H), Cm (OW, W): gx = R^T g Cm."""

    def forward(self, x, *, rows, cols):
        backend = backend_of(x)
        xp = backend.xp
        H, W = x.shape[-2:]
        fh, fw = len(rows) // H, len(cols) // W
        if (np.array_equal(rows, np.arange(len(rows)) // max(fh, 1)) and len(rows) == fh * H and
                np.array_equal(cols, np.arange(len(cols)) // max(fw, 1)) and len(cols) == fw * W):
            self.factors = (fh, fw)     # integer upscaling: repeat, and sum blocks in backward
            out = xp.broadcast_to(x[..., :, None, :, None], x.shape[:-2] + (H, fh, W, fw))
            return out.reshape(x.shape[:-2] + (H * fh, W * fw))
        self.factors = None
        r = np.zeros((len(rows), H), dtype=x.dtype)
        r[np.arange(len(rows)), rows] = 1
        c = np.zeros((len(cols), W), dtype=x.dtype)
        c[np.arange(len(cols)), cols] = 1
        self.r, self.c = backend.asarray(r), backend.asarray(c)
        return x[..., backend.asarray(rows)[:, None], backend.asarray(cols)[None, :]]

    def backward(self, g):
        xp = backend_of(g).xp
        if self.factors is not None:
            fh, fw = self.factors
            lead, (OH, OW) = g.shape[:-2], g.shape[-2:]
            return g.reshape(lead + (OH // fh, fh, OW // fw, fw)).sum(axis=(-3, -1))
        return xp.matmul(xp.matmul(self.r.T, g), self.c)


class EmbeddingFn(Function):
    """weight[idx]; the backward scatter-adds rows (an index may repeat). With ``check`` (device
    indices, which CuPy's gather would wrap around silently) the rows of out-of-range indices are
    NaN: (idx as uint64) >= n catches negative ones too, with no host sync."""

    def forward(self, weight, *, idx, check=False):
        self.idx, self.shape = idx, weight.shape
        out = weight[idx]
        if check:
            xp = backend_of(weight).xp
            bad = idx.astype(np.uint64) >= weight.shape[0]
            nan, zero = out.dtype.type(np.nan), out.dtype.type(0)
            out += xp.where(bad, nan, zero)[..., None]
        return out

    def backward(self, g):
        xp = backend_of(g).xp
        gw = xp.zeros(self.shape, dtype=g.dtype)
        xp.add.at(gw, self.idx.reshape(-1), g.reshape(-1, self.shape[1]))
        return gw
