"""Normalisation ops with hand-written backward passes: group norm and layer norm.

Both normalise over a set of m elements per row and then apply a per-channel affine map:

    xhat = (x - mean) * rstd,   rstd = 1 / sqrt(var + eps),   y = gamma * xhat + beta

and share the classical backward (with dxhat = dy * gamma, means over the same m elements):

    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    dgamma = sum(dy * xhat),   dbeta = sum(dy)     (over everything but the channel)
"""
from __future__ import annotations

from ..backend import backend_of
from ..tensor import Function


def _group_sum(per_channel, groups):
    """(N, C) -> (N, G): sum the channels of each group."""
    N, C = per_channel.shape
    return per_channel.reshape(N, groups, C // groups).sum(axis=2)


def _to_channels(per_group, channels, ndim):
    """(N, G) -> (N, C, 1, ...) broadcastable against an (N, C, *spatial) array."""
    N, G = per_group.shape
    xp = backend_of(per_group).xp
    c = xp.broadcast_to(per_group[:, :, None], (N, G, channels // G)).reshape(N, channels)
    return c.reshape((N, channels) + (1,) * (ndim - 2))


class GroupNormFn(Function):
    """GroupNorm over (C/G, *spatial) per sample and group; optional affine (weight, bias)."""

    def forward(self, x, weight=None, bias=None, *, num_groups, eps):
        N, C = x.shape[:2]
        G = num_groups
        axes = tuple(range(2, x.ndim))
        m = (C // G) * (x.size // (N * C))
        mean_c = _to_channels(_group_sum(x.sum(axis=axes), G) * (1.0 / m), C, x.ndim)
        xhat = x - mean_c                               # two-pass variance: no cancellation
        var = _group_sum((xhat * xhat).sum(axis=axes), G) * (1.0 / m)
        rstd = 1.0 / backend_of(x).xp.sqrt(var + eps)   # (N, G)
        rstd_c = _to_channels(rstd, C, x.ndim)
        xhat *= rstd_c
        self.xhat, self.rstd_c, self.groups, self.m = xhat, rstd_c, G, m
        shape = (1, C) + (1,) * (x.ndim - 2)
        self.weight = None if weight is None else weight.reshape(shape)
        y = xhat if weight is None else xhat * self.weight
        if bias is not None:
            y = y + bias.reshape(shape)
        return y

    def backward(self, g):
        xhat, G, m = self.xhat, self.groups, self.m
        C, ndim = xhat.shape[1], xhat.ndim
        axes = tuple(range(2, ndim))
        dxhat = g if self.weight is None else g * self.weight
        mean_d = _to_channels(_group_sum(dxhat.sum(axis=axes), G) * (1.0 / m), C, ndim)
        mean_dx = _to_channels(_group_sum((dxhat * xhat).sum(axis=axes), G) * (1.0 / m), C, ndim)
        gx = self.rstd_c * (dxhat - mean_d - xhat * mean_dx)
        grads = [gx]
        if len(self.needs_grad) > 1:
            grads.append((g * xhat).sum(axis=(0,) + axes) if self.needs_grad[1] else None)
        if len(self.needs_grad) > 2:
            grads.append(g.sum(axis=(0,) + axes) if self.needs_grad[2] else None)
        return tuple(grads)


class GroupNormSiluFn(Function):
    """silu(group_norm(x + shift[:, :, None, None])), one op: the "embedding add, GroupNorm, swish"
    block of the score network. Inputs: x (N, C, *spatial), then optionally shift (N, C), then
    weight and bias (C,) together or not at all.

    silu(y) = u + u tanh(u) with u = y / 2, so with t = tanh(u) the derivative is
    silu'(y) = (1 + t) / 2 + u (1 - t^2) / 2, and u = xhat (gamma / 2) + beta / 2 comes straight out
    of the normalisation (no separate y is formed).
    """

    def forward(self, x, *rest, num_groups, eps, has_shift):
        xp = backend_of(x).xp
        N, C = x.shape[:2]
        G, nd = num_groups, x.ndim
        axes = tuple(range(2, nd))
        bshape = (N, C) + (1,) * (nd - 2)
        shift, affine = (rest[0], rest[1:]) if has_shift else (None, rest)
        m = (C // G) * (x.size // (N * C))
        h = x + shift.reshape(bshape) if shift is not None else x
        mean_c = _to_channels(_group_sum(h.sum(axis=axes), G) * (1.0 / m), C, nd)
        xhat = h - mean_c                                   # a new buffer: normalise it in place
        sq = xhat * xhat
        var = _group_sum(sq.sum(axis=axes), G) * (1.0 / m)
        rstd = 1.0 / xp.sqrt(var + eps)                     # (N, G)
        xhat *= _to_channels(rstd, C, nd)
        half_w = (affine[0] * 0.5).reshape((1, C) + (1,) * (nd - 2)) if affine else 0.5
        u = xp.multiply(xhat, half_w, out=sq)               # reuse the squares' buffer
        if affine:
            u += (affine[1] * 0.5).reshape(half_w.shape)
        t = xp.tanh(u)
        y = t * u
        y += u
        self.xhat, self.u, self.t, self.rstd, self.groups, self.m = xhat, u, t, rstd, G, m
        self.half_w, self.has_shift, self.has_affine = half_w, has_shift, bool(affine)
        return y

    def backward(self, g):
        xp = backend_of(g).xp
        xhat, u, t, G, m = self.xhat, self.u, self.t, self.groups, self.m
        N, C, nd = xhat.shape[0], xhat.shape[1], xhat.ndim
        axes = tuple(range(2, nd))
        # d2y = 2 dL/dy = g (1 + t + u (1 - t^2)); the factor 1/2 is folded into half_w below
        d2y = t * t
        xp.subtract(1, d2y, out=d2y)
        d2y *= u
        d2y += t
        d2y += 1
        d2y *= g
        prod = d2y * xhat
        sum_dy = d2y.sum(axis=axes) * 0.5                   # (N, C): per-channel sums of dL/dy
        sum_dy_xhat = prod.sum(axis=axes) * 0.5
        w = self.half_w.reshape(1, C) * 2 if self.has_affine else 1.0
        # dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dy * w, means per group
        mean_d = _group_sum(sum_dy * w, G) * (1.0 / m)              # (N, G)
        mean_dx = _group_sum(sum_dy_xhat * w, G) * (1.0 / m)
        rstd = self.rstd
        shape = (N, C) + (1,) * (nd - 2)
        coef_dy = (_to_channels(rstd, C, 2) * self.half_w.reshape(1, C) if self.has_affine else
                   _to_channels(rstd * 0.5, C, 2)).reshape(shape)
        gx = d2y
        gx *= coef_dy
        xp.multiply(xhat, _to_channels(-rstd * mean_dx, C, nd), out=prod)
        gx += prod
        gx += _to_channels(-rstd * mean_d, C, nd)
        grads = [gx]
        if self.has_shift:
            grads.append(gx.sum(axis=axes) if self.needs_grad[1] else None)
        if self.has_affine:
            k = 2 if self.has_shift else 1
            grads.append(sum_dy_xhat.sum(axis=0) if self.needs_grad[k] else None)
            grads.append(sum_dy.sum(axis=0) if self.needs_grad[k + 1] else None)
        return tuple(grads)


class LayerNormFn(Function):
    """LayerNorm over the last ``k`` axes; weight and bias (if any) have the shape of those axes."""

    def forward(self, x, *affine, k, eps):
        xp = backend_of(x).xp
        axes = tuple(range(x.ndim - k, x.ndim))
        m = 1
        for a in axes:
            m *= x.shape[a]
        xhat = x - x.mean(axis=axes, keepdims=True)
        var = (xhat * xhat).sum(axis=axes, keepdims=True) * (1.0 / m)
        rstd = 1.0 / xp.sqrt(var + eps)
        xhat *= rstd
        self.xhat, self.rstd, self.axes, self.m = xhat, rstd, axes, m
        self.weight = affine[0] if affine else None
        if not affine:
            return xhat
        y = xhat * affine[0]
        y += affine[1]
        return y

    def backward(self, g):
        xhat, axes, m = self.xhat, self.axes, self.m
        dxhat = g if self.weight is None else g * self.weight
        mean_d = dxhat.sum(axis=axes, keepdims=True) * (1.0 / m)
        mean_dx = (dxhat * xhat).sum(axis=axes, keepdims=True) * (1.0 / m)
        gx = dxhat - mean_d
        gx -= xhat * mean_dx
        gx *= self.rstd
        if self.weight is None:
            return gx
        lead = tuple(range(g.ndim - len(axes)))
        gw = (g * xhat).sum(axis=lead) if self.needs_grad[1] else None
        gb = g.sum(axis=lead) if self.needs_grad[2] else None
        return gx, gw, gb
