"""Scaled dot-product attention as one fused op, and multi-head self-attention over the spatial
positions of a feature map.

    attention(q, k, v) = softmax(q k^T / sqrt(d) + mask) v

Backward, with P the attention weights and g the output gradient:

    dv = P^T g,   dP = g v^T,   dS = P * (dP - rowsum(dP * P)),   dq = dS k / sqrt(d),   dk = dS^T q / sqrt(d)
"""
from __future__ import annotations

import math

from ..backend import backend_of
from ..tensor import Function, unbroadcast


class ScaledDotProductAttentionFn(Function):
    """q (..., L, d), k (..., S, d), v (..., S, d_v); leading axes broadcast. ``mask``: a boolean
    array (True = may attend) or an additive float array, broadcastable to (..., L, S)."""

    def forward(self, q, k, v, *, mask, scale):
        xp = backend_of(q).xp
        s = xp.matmul(q, k.swapaxes(-1, -2))
        s *= scale
        if mask is not None:
            if mask.dtype == bool:
                s = xp.where(mask, s, -xp.inf)
            else:
                s = s + mask
        s -= s.max(axis=-1, keepdims=True)        # shift: exp never overflows
        p = xp.exp(s, out=s)
        p /= p.sum(axis=-1, keepdims=True)
        self.q, self.k, self.v, self.p, self.scale = q, k, v, p, scale
        return xp.matmul(p, v)

    def backward(self, g):
        xp = backend_of(g).xp
        q, k, v, p, scale = self.q, self.k, self.v, self.p, self.scale
        gq = gk = gv = None
        if self.needs_grad[2]:
            gv = unbroadcast(xp.matmul(p.swapaxes(-1, -2), g), v.shape)
        if self.needs_grad[0] or self.needs_grad[1]:
            dp = xp.matmul(g, v.swapaxes(-1, -2))
            ds = dp - (dp * p).sum(axis=-1, keepdims=True)
            ds *= p
            ds *= scale
            if self.needs_grad[0]:
                gq = unbroadcast(xp.matmul(ds, k), q.shape)
            if self.needs_grad[1]:
                gk = unbroadcast(xp.matmul(ds.swapaxes(-1, -2), q), k.shape)
        return gq, gk, gv


def default_scale(d):
    return 1.0 / math.sqrt(d)
