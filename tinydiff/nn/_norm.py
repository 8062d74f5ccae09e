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
from ._parallel import for_batch_chunks


def _rows(a):
    """(N, C, *spatial) -> an (N, S, C) array (S = prod(spatial)): a view when ``a`` is stored
    channels-last or plain C-contiguous (then with strides), a copy otherwise."""
    N, C = a.shape[:2]
    m = backend_of(a).xp.moveaxis(a, 1, -1)
    if m.flags.c_contiguous:
        return m.reshape(N, -1, C)
    return a.reshape(N, C, -1).transpose(0, 2, 1)


def _new_rows(like):
    """A new channels-last array shaped like ``like``: (the (N, C, *spatial) view, its (N, S, C) rows)."""
    xp = backend_of(like).xp
    N, C = like.shape[:2]
    rows = xp.empty((N, like.size // (N * C), C), dtype=like.dtype)
    return xp.moveaxis(rows.reshape((N,) + like.shape[2:] + (C,)), -1, 1), rows


def _per_group(a, groups):
    """(N, C) -> (N, G, C/G)."""
    N, C = a.shape
    return a.reshape(N, groups, C // groups)


class GroupNormActFn(Function):
    """[silu](group_norm(x + shift[:, :, None, None])) in one op; shift (N, C) optional, weight and
    bias (C,) together or not at all. GroupNorm alone is the same op with ``silu=False``.

    Statistics come from per-(sample, channel) moments S1 = sum_s x, S2 = sum_s x^2 (two GEMM
    reductions), combined in float64 on the small (N, C) arrays; the shift enters analytically:

        mu_g  = mean_{c in g} (S1_c / S + shift_c)
        var_g = (1/m) sum_{c in g} [(S2_c - S1_c^2 / S) + S (S1_c / S + shift_c - mu_g)^2]

    (only the within-channel variance S2 - S1^2/S is a difference of large numbers, as in PyTorch's
    channels-last kernel). Then y = x A_c + B_c with A_c = rstd_g gamma_c, B_c = (shift_c - mu_g)
    A_c + beta_c: two passes over the data, no centred copy.

    silu(y) = u + u tanh(u) with u = y / 2 (no overflow), so with t = tanh(u):
    2 silu'(y) = 1 + t + u (1 - t^2).

    Backward, with D = dL/dy, a_c = sum_s D, b_c = sum_s D x (two more GEMM reductions):
        dx = D P_c + x Q_g + R_c,   P = rstd gamma,   Q = -rstd^2 M2,   R = -rstd M1 - rstd^2 M2 (shift - mu)
    where M1 = mean_g(gamma a) / S and M2 = mean_g(gamma rstd (b + (shift - mu) a)) / S are the group
    means of dxhat and dxhat * xhat; dshift = sum_s dx = P a + Q S1 + R S needs no pass at all.
    """

    def forward(self, x, *rest, num_groups, eps, has_shift, silu):
        xp = backend_of(x).xp
        N, C = x.shape[:2]
        G, dt, f64 = num_groups, x.dtype, xp.float64
        shift, affine = (rest[0], rest[1:]) if has_shift else (None, rest)
        v = _rows(x)                                           # (N, S, C)
        S = v.shape[1]
        ones = xp.ones((1, 1, S), dtype=dt)
        s1, s2 = xp.empty((N, C), dtype=dt), xp.empty((N, C), dtype=dt)
        sq = xp.empty(v.shape, dtype=dt)                       # x^2, later reused for u

        def moments(lo, hi):
            vs = v[lo:hi]
            xp.multiply(vs, vs, out=sq[lo:hi])
            s1[lo:hi] = xp.matmul(ones, vs)[:, 0]
            s2[lo:hi] = xp.matmul(ones, sq[lo:hi])[:, 0]
        for_batch_chunks(moments, v)

        s1, s2 = s1.astype(f64), s2.astype(f64)
        mean_c = s1 * (1.0 / S)
        centre = mean_c if shift is None else mean_c + shift.astype(f64)     # channel means of x+shift
        mu = _per_group(centre, G).mean(axis=2, keepdims=True)              # (N, G, 1)
        within = xp.maximum(s2 - s1 * mean_c, 0.0)                         # S * channel variance
        dev = _per_group(centre, G) - mu
        var = (_per_group(within, G) + S * dev * dev).sum(axis=2, keepdims=True) * (1.0 / (S * C // G))
        rstd = 1.0 / xp.sqrt(var + eps)                                     # (N, G, 1)
        gamma = (affine[0].astype(f64) if affine else xp.ones((C,), dtype=f64)).reshape(1, G, C // G)
        beta = affine[1].astype(f64).reshape(1, G, C // G) if affine else 0.0
        shift_minus_mu = (0.0 if shift is None else _per_group(shift.astype(f64), G)) - mu
        a = rstd * gamma                                                    # y = x a + b
        b = shift_minus_mu * a + beta                                       # (N, G, C/G)
        self.saved = (x, rstd, shift_minus_mu, s1, gamma, G, S, has_shift, bool(affine), silu)
        out_full, out = _new_rows(x)
        scale = 0.5 if silu else 1.0                                        # silu works on u = y/2
        a = (a * scale).reshape(N, 1, C).astype(dt)
        b = (b * scale).reshape(N, 1, C).astype(dt)
        u, t = sq, (xp.empty(v.shape, dtype=dt) if silu else None)

        def normalise(lo, hi):
            us = xp.multiply(v[lo:hi], a[lo:hi], out=u[lo:hi] if silu else out[lo:hi])
            us += b[lo:hi]
            if silu:
                ts = xp.tanh(us, out=t[lo:hi])
                o = xp.multiply(ts, us, out=out[lo:hi])
                o += us
        for_batch_chunks(normalise, v)
        if silu:
            self.u, self.t = u, t
        return out_full

    def backward(self, g):
        xp = backend_of(g).xp
        x, rstd, shift_minus_mu, s1, gamma, G, S, has_shift, has_affine, silu = self.saved
        N, C = x.shape[:2]
        dt, f64 = x.dtype, xp.float64
        v, gv = _rows(x), _rows(g)
        ones = xp.ones((1, 1, S), dtype=dt)
        d = xp.empty(v.shape, dtype=dt)         # 2 dL/dy (silu) or dL/dy, then dx in place
        prod = xp.empty(v.shape, dtype=dt)
        sum_d, sum_dx = xp.empty((N, C), dtype=dt), xp.empty((N, C), dtype=dt)
        t, u = (self.t, self.u) if silu else (None, None)

        def gather(lo, hi):
            ds = d[lo:hi]
            if silu:   # 2 silu'(y) = 1 + t + u (1 - t^2)
                ts = t[lo:hi]
                xp.multiply(ts, ts, out=ds)
                xp.subtract(1, ds, out=ds)
                ds *= u[lo:hi]
                ds += ts
                ds += 1
                ds *= gv[lo:hi]
            else:
                ds[...] = gv[lo:hi]
            ps = xp.multiply(ds, v[lo:hi], out=prod[lo:hi])
            sum_d[lo:hi] = xp.matmul(ones, ds)[:, 0]
            sum_dx[lo:hi] = xp.matmul(ones, ps)[:, 0]
        for_batch_chunks(gather, v)

        half = 0.5 if silu else 1.0
        a_c = _per_group(sum_d.astype(f64) * half, G)                      # sum_s dL/dy
        b_c = _per_group(sum_dx.astype(f64) * half, G)                     # sum_s dL/dy x
        xhat_term = b_c + shift_minus_mu * a_c                              # sum_s dL/dy (x + shift - mu)
        m = S * (C // G)
        m1 = (gamma * a_c).sum(axis=2, keepdims=True) * (1.0 / m)
        m2 = (gamma * rstd * xhat_term).sum(axis=2, keepdims=True) * (1.0 / m)
        p = rstd * gamma                                                    # (N, G, C/G)
        q = xp.broadcast_to(-rstd * rstd * m2, p.shape)
        r = xp.broadcast_to(-rstd * m1 + q * shift_minus_mu, p.shape)
        pd = (p * half).reshape(N, 1, C).astype(dt)
        qd, rd = q.reshape(N, 1, C).astype(dt), r.reshape(N, 1, C).astype(dt)

        def scatter(lo, hi):   # dx = dL/dy P + x Q + R
            gx = d[lo:hi]
            gx *= pd[lo:hi]
            ps = xp.multiply(v[lo:hi], qd[lo:hi], out=prod[lo:hi])
            gx += ps
            gx += rd[lo:hi]
        for_batch_chunks(scatter, v)

        spatial = x.shape[2:]
        grads = [xp.moveaxis(d.reshape((N,) + spatial + (C,)), -1, 1)]
        if has_shift:
            gshift = (p * a_c + q * _per_group(s1, G) + r * S).reshape(N, C)
            grads.append(gshift.astype(dt) if self.needs_grad[1] else None)
        if has_affine:
            k = 2 if has_shift else 1
            grads.append((rstd * xhat_term).reshape(N, C).sum(axis=0).astype(dt)
                         if self.needs_grad[k] else None)
            grads.append(a_c.reshape(N, C).sum(axis=0).astype(dt) if self.needs_grad[k + 1] else None)
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
