"""Normalisation ops with hand-written backward passes: group norm and layer norm.

Both normalise over a set of m elements per row and then apply a per-channel affine map:

    xhat = (x - mean) * rstd,   rstd = 1 / sqrt(var + eps),   y = gamma * xhat + beta

and share the classical backward (with dxhat = dy * gamma, means over the same m elements):

    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    dgamma = sum(dy * xhat),   dbeta = sum(dy)     (over everything but the channel)
"""
from __future__ import annotations

import numpy as np

from ..backend import backend_of
from ..tensor import Function, is_grad_enabled
from ._parallel import for_batch_chunks, pooled


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


def _moments_to_affine(mean_c, within, shift, gamma, beta, groups, S, eps):
    """Per-sample statistics (small arrays) -> y = x a + b coefficients (n, G, C/G) and
    what the backward needs. mean_c: (n, C) channel means of x; within: (n, C) sums over the S
    positions of (x - mean_c)^2."""
    xp = backend_of(mean_c).xp
    C = mean_c.shape[1]
    centre = mean_c if shift is None else mean_c + shift                 # channel means of x+shift
    mu = _per_group(centre, groups).mean(axis=2, keepdims=True)         # (n, G, 1)
    dev = _per_group(centre, groups) - mu
    var = (_per_group(within, groups) + S * dev * dev).sum(axis=2, keepdims=True) * (groups / (S * C))
    rstd = 1.0 / xp.sqrt(var + eps)                                     # (n, G, 1)
    shift_minus_mu = (0.0 if shift is None else _per_group(shift, groups)) - mu
    a = rstd * gamma
    b = shift_minus_mu * a + beta
    return a, b, rstd, shift_minus_mu


def _backward_coefficients(sum_d, sum_dx, rstd, shift_minus_mu, gamma, groups, S):
    """From a = sum_s dL/dy and b = sum_s dL/dy x ((n, C) arrays): dx = dL/dy P + x Q + R with
    P, Q, R of shape (n, G, C/G), and sum_s dL/dy xhat (for the weight gradient)."""
    a_c, b_c = _per_group(sum_d, groups), _per_group(sum_dx, groups)
    xhat_term = b_c + shift_minus_mu * a_c                              # sum_s dL/dy (x + shift - mu)
    m = S * a_c.shape[2]
    m1 = (gamma * a_c).sum(axis=2, keepdims=True) * (1.0 / m)           # group mean of dxhat
    m2 = (gamma * rstd * xhat_term).sum(axis=2, keepdims=True) * (1.0 / m)   # ... of dxhat xhat
    p = rstd * gamma
    q = -rstd * rstd * m2
    r = -rstd * m1 + q * shift_minus_mu
    xp = backend_of(p).xp
    return p, xp.broadcast_to(q, p.shape), xp.broadcast_to(r, p.shape), rstd * xhat_term


POOL_MIN_ELEMENTS = 400_000   # smaller maps: per-chunk statistics cost more than a second thread saves


# The four stages of the op, in plain array code: the reference. NumPy runs them chunk by chunk
# (statistics, then output, per chunk of samples); with TINYDIFF_FUSED=1 a GPU runs each stage as
# one kernel of _fused_norm.py, and the strict stand-in runs these functions counted as one launch
# each (so a launch count shows what the kernels would cost).

SILU_SCALE = -1.0       # the array output stage takes -y's coefficients (the CUDA kernel: y / 2)


def _forward_statistics(vs, sq, shift, gamma, beta, G, S, eps, scale):
    """Stage 1: moments and coefficients of samples vs (n, S, C) (sq: scratch of vs's shape).
    Returns a, b ((n, 1, C), already times ``scale``), rstd (n, G, 1), shift - mu (n, G, C/G)
    and the channel sums s1 (n, C)."""
    xp = backend_of(vs).xp
    dt, (n, _, C) = vs.dtype, vs.shape
    ones = xp.ones((1, 1, S), dtype=dt)
    # moments of x - x[first position], per channel: a value of the channel itself, so the sums
    # of squares do not cancel catastrophically when |mean| >> std
    first = vs[:, :1, :]
    xp.subtract(vs, first, out=sq)
    c1 = xp.matmul(ones, sq)[:, 0].astype(dt, copy=False)
    sq *= sq
    c2 = xp.matmul(ones, sq)[:, 0].astype(dt, copy=False)
    first = first[:, 0, :].astype(dt, copy=False)
    mean_c = first + c1 * (1.0 / S)
    within = xp.maximum(c2 - c1 * c1 * (1.0 / S), 0.0)
    a, b, r, m = _moments_to_affine(mean_c, within, shift, gamma, beta, G, S, eps)
    a = (a * scale).reshape(n, 1, C).astype(dt, copy=False)
    b = (b * scale).reshape(n, 1, C).astype(dt, copy=False)
    return a, b, r, m, mean_c * S


def _forward_output(vs, a, b, sq, os_, ds, silu):
    """Stage 2: os_ = [silu](y), y = vs a + b, and ds = 2 silu'(y) when ds is given; sq is
    scratch. For silu, a and b come negated (``SILU_SCALE``), so that vs a + b is z = -y and the
    exponential needs no extra pass. With e = exp(-y) and q = -(1 + e):

        silu(y) = y sigmoid(y) = z / q,    2 sigmoid(y) = -2 / q,
        2 silu'(y) = 2 sigmoid(y) (1 + y (1 - sigmoid(y))) = 2 sigmoid(y) (1 - (z + silu(y)))

    (y (1 - sigmoid) = y - silu computed as -(z + silu): no cancellation where it matters, and
    0 for large y). exp(-y) overflows to inf below y = -88 in float32, where the quotients give
    the right limits (silu -> -0, silu' -> 0), so that warning is silenced."""
    xp = backend_of(vs).xp
    if not silu:
        xp.multiply(vs, a, out=os_)
        os_ += b
        return
    z = xp.multiply(vs, a, out=sq)
    z += b                                                 # z = -y
    with np.errstate(over="ignore"):
        q = xp.exp(z, out=os_)
    xp.subtract(-1.0, q, out=q)                            # q = -(1 + exp(-y))
    if ds is not None:
        xp.divide(-2.0, q, out=ds)                         # 2 sigmoid(y)
    xp.divide(z, q, out=os_)                               # silu(y)
    if ds is not None:
        z += os_                                           # -y (1 - sigmoid(y))
        xp.subtract(1.0, z, out=z)
        ds *= z


def _backward_statistics(gs, dss, vs, ps, d, rstd, smm, s1, gamma, G, S, half, has_shift):
    """Stage 3: from the output gradient gs (n, S, C) (and dss = 2 silu', or None), leave
    d = 2 dL/dy (silu) or dL/dy in d and return P, Q, R (n, G, C/G) of dx = dL/dy P + x Q + R, the
    channel sums of dL/dy (n, C), sum_s dL/dy xhat (n, G, C/G) and dL/dshift (n, C) or None;
    ps is scratch."""
    xp = backend_of(gs).xp
    dt, (n, _, C) = vs.dtype, vs.shape
    ones = xp.ones((1, 1, S), dtype=dt)
    if dss is not None:
        xp.multiply(gs, dss, out=d)
    else:
        d[...] = gs
    xp.multiply(d, vs, out=ps)
    a = xp.matmul(ones, d)[:, 0].astype(dt, copy=False) * half
    b = xp.matmul(ones, ps)[:, 0].astype(dt, copy=False) * half
    p, q, r, w = _backward_coefficients(a, b, rstd, smm, gamma, G, S)
    gshift = None
    if has_shift:               # sum_s dx = P a + Q S1 + R S: no pass over the map
        gshift = (p * _per_group(a, G) + q * _per_group(s1, G) + r * S).reshape(n, C)
    return p, q, r, a, w, gshift


def _backward_output(vs, d, ps, p, q, r, half):
    """Stage 4: dx = dL/dy P + x Q + R into d (which holds 2 dL/dy or dL/dy); ps is scratch."""
    xp = backend_of(vs).xp
    dt, (n, _, C) = vs.dtype, vs.shape
    d *= (p * half).reshape(n, 1, C).astype(dt, copy=False)
    xp.multiply(vs, q.reshape(n, 1, C).astype(dt, copy=False), out=ps)
    d += ps
    d += r.reshape(n, 1, C).astype(dt, copy=False)


class GroupNormActFn(Function):
    """[silu](group_norm(x + shift[:, :, None, None])) in one op; shift (N, C) optional, weight and
    bias (C,) together or not at all. GroupNorm alone is the same op with ``silu=False``.

    Statistics come from per-(sample, channel) moments of z = x - x_0 (x_0: the channel's value at
    the first position, so that z has a mean of the order of its spread), S1 = sum_s z and
    S2 = sum_s z^2 (GEMMs with a ones vector), combined on the small (N, C) arrays; the shift
    enters analytically, with mean_c = x_0 + S1 / S:

        mu_g  = mean_{c in g} (mean_c + shift_c)
        var_g = (1/m) sum_{c in g} [(S2_c - S1_c^2 / S) + S (mean_c + shift_c - mu_g)^2]

    Then y = x A_c + B_c with A_c = rstd_g gamma_c, B_c = (shift_c - mu_g) A_c + beta_c: no centred
    copy of x is kept.

    silu(y) = y / (1 + exp(-y)), and 2 silu'(y) is computed in the forward pass (only when a
    gradient will be needed; ``_forward_output``) and saved instead of y and sigmoid(y): one array
    kept instead of two. (The CUDA kernel of _fused_norm.py uses tanh(y / 2) instead: on NumPy
    exp is the faster ufunc; both give the same 2 silu'.)

    Backward, with D = dL/dy, a_c = sum_s D, b_c = sum_s D x:
        dx = D P_c + x Q_g + R_c,   P = rstd gamma,   Q = -rstd^2 M2,   R = -rstd M1 - rstd^2 M2 (shift - mu)
    where M1 = mean_g(gamma a) / S and M2 = mean_g(gamma rstd (b + (shift - mu) a)) / S are the group
    means of dxhat and dxhat * xhat; dshift = sum_s dx = P a + Q S1 + R S needs no pass at all.

    The statistics are per sample, so on NumPy each chunk of samples is finished (moments,
    coefficients, output) independently, and the chunks run on the thread pool. The four stages
    (statistics and output, forward and backward) are the functions above.
    """

    @pooled
    def forward(self, x, *rest, num_groups, eps, has_shift, silu):
        from . import _fused_norm
        xp = backend_of(x).xp
        N, C = x.shape[:2]
        G, dt = num_groups, x.dtype
        shift, affine = (rest[0], rest[1:]) if has_shift else (None, rest)
        shift = None if shift is None else shift.astype(dt, copy=False)
        v = _rows(x)                                           # (N, S, C)
        S = v.shape[1]
        weight = affine[0].astype(dt, copy=False) if affine else None
        gamma = (weight if affine else xp.ones((C,), dtype=dt)).reshape(1, G, C // G)
        beta = affine[1].astype(dt, copy=False).reshape(1, G, C // G) if affine else 0.0
        need_grad = is_grad_enabled() and any(self.needs_grad)
        out_full, out = _new_rows(x)
        scratch = xp.empty(v.shape, dtype=dt)                  # x^2, then z = -y
        dsilu = xp.empty(v.shape, dtype=dt) if (silu and need_grad) else None
        how = _fused_norm.mode(x)
        # the output stage's coefficients: -y for the array code, y / 2 for the CUDA kernel
        scale = (0.5 if how == "kernel" else SILU_SCALE) if silu else 1.0
        if how is None:
            s1 = xp.empty((N, C), dtype=dt)
            rstd = xp.empty((N, G, 1), dtype=dt)
            smm = xp.empty((N, G, C // G), dtype=dt)

            def chunk(lo, hi):
                a, b, r, m, s = _forward_statistics(v[lo:hi], scratch[lo:hi],
                                                    None if shift is None else shift[lo:hi],
                                                    gamma, beta, G, S, eps, scale)
                s1[lo:hi], rstd[lo:hi], smm[lo:hi] = s, r, m
                _forward_output(v[lo:hi], a, b, scratch[lo:hi], out[lo:hi],
                                None if dsilu is None else dsilu[lo:hi], silu)
            for_batch_chunks(chunk, v, min_size=POOL_MIN_ELEMENTS)
        else:
            a, b, rstd, smm, s1 = _fused_norm.forward(
                how, v, scratch, out, dsilu, shift, weight,
                affine[1].astype(dt, copy=False) if affine else None, gamma, beta, G, S, eps,
                scale, silu)
        if need_grad:
            self.saved = (x, dsilu, rstd, smm, s1, gamma, G, S, has_shift, bool(affine), silu)
        return out_full

    @pooled
    def backward(self, g):
        from . import _fused_norm
        xp = backend_of(g).xp
        x, dsilu, rstd, smm, s1, gamma, G, S, has_shift, has_affine, silu = self.saved
        N, C = x.shape[:2]
        dt = x.dtype
        v, gv = _rows(x), _rows(g)
        gx_full, gx = _new_rows(x)
        prod = xp.empty(v.shape, dtype=dt)
        half = 0.5 if silu else 1.0
        how = _fused_norm.mode(x)
        if how is None:
            sum_d = xp.empty((N, C), dtype=dt)
            wterm = xp.empty((N, G, C // G), dtype=dt)
            gshift = xp.empty((N, C), dtype=dt) if has_shift else None

            def chunk(lo, hi):
                p, q, r, a, w, gs = _backward_statistics(
                    gv[lo:hi], None if dsilu is None else dsilu[lo:hi], v[lo:hi], prod[lo:hi],
                    gx[lo:hi], rstd[lo:hi], smm[lo:hi], s1[lo:hi], gamma, G, S, half, has_shift)
                sum_d[lo:hi], wterm[lo:hi] = a, w
                if has_shift:
                    gshift[lo:hi] = gs
                _backward_output(v[lo:hi], gx[lo:hi], prod[lo:hi], p, q, r, half)
            for_batch_chunks(chunk, v, min_size=POOL_MIN_ELEMENTS)
        else:
            sum_d, wterm, gshift = _fused_norm.backward(how, gv, dsilu, v, prod, gx, rstd, smm,
                                                        s1, gamma, G, S, half, has_shift, has_affine)

        grads = [gx_full]
        if has_shift:
            grads.append(gshift.astype(dt, copy=False) if self.needs_grad[1] else None)
        if has_affine:
            k = 2 if has_shift else 1
            grads.append(wterm.reshape(N, C).sum(axis=0).astype(dt, copy=False) if self.needs_grad[k] else None)
            grads.append(sum_d.sum(axis=0).astype(dt, copy=False) if self.needs_grad[k + 1] else None)
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
