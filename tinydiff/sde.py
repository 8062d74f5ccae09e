"""The noising SDE (eq. 1), its marginals, the denoising score-matching loss (eq. 5) and
closed-form scores (eq. 3), in the spirit of score_sde's ``sde_lib``. Equation numbers are those
of docs/design.md, which derives each of them.

Both SDEs here are drift-free, dx = g(t) dW for t in [0, T = 1]:

- ``VESDE(sigma)``: the variance-exploding SDE of eq. 1, g(t) = sigma^t, so
  std(t)^2 = int_0^t g(s)^2 ds = (sigma^(2t) - 1) / (2 ln sigma);
- ``BrownianSDE(sigma)``: constant noise strength g(t) = sigma, std(t)^2 = sigma^2 t (eq. 3).

Given x(0) = x0, x(t) ~ N(x0, std(t)^2 I). Every function takes ``t`` as a Python float, an array of
any backend (numpy / cupy / the strict stand-in; ``xp`` comes from the input, float32 stays
float32) or a Tensor, and returns the same kind.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import Generator, backend_of, get_backend
from .tensor import Tensor

# -- helpers that work on floats, arrays and Tensors --------------------------------------------


def _xp(a):
    return backend_of(a).xp


def _raw(a):
    return a.data if isinstance(a, Tensor) else a


def _batch_view(s, ndim):
    """A per-sample quantity of shape (N,) reshaped to (N, 1, ..., 1) to broadcast against a batch
    with ``ndim`` dimensions; scalars pass through."""
    if isinstance(s, (int, float)) or s.ndim == 0 or ndim <= 1:
        return s
    return s.reshape((-1,) + (1,) * (ndim - 1))


def _constant_like(c, x):
    """A constant (float or array, e.g. mu) on ``x``'s backend and in ``x``'s float dtype."""
    if isinstance(c, (int, float)):
        return c
    x = _raw(x)
    if isinstance(x, (int, float)):
        return c
    c = _raw(c)
    be = backend_of(x)
    if backend_of(c) is not be:
        c = be.asarray(backend_of(c).to_host(c))      # explicit host -> device copy
    return c.astype(x.dtype) if c.dtype != x.dtype else c


def _on_array(fn, t):
    """Evaluate ``fn`` (written for floats and arrays) on ``t``; a Tensor that needs no gradient is
    evaluated on its array and wrapped again."""
    if isinstance(t, Tensor):
        return Tensor(fn(t.data))
    return fn(t)


# -- SDEs ------------------------------------------------------------------------------------


class SDE:
    """A drift-free SDE dx = g(t) dW on [0, T] (what eq. 1 and eq. 2 need).

    Subclasses define ``diffusion_coeff(t)`` = g(t) and ``marginal_std(t)`` = std(t); the rest
    (perturbation, the prior, its log-density, one forward Euler step) follows from them.
    """

    T = 1.0

    def diffusion_coeff(self, t):
        raise NotImplementedError

    def marginal_std(self, t):
        raise NotImplementedError

    @property
    def prior_std(self):
        """std(T): the prior the samplers start from is N(0, std(T)^2 I)."""
        return float(self.marginal_std(self.T))

    def perturb(self, x0, t, z):
        """x(t) = x0 + std(t) z: a draw from the marginal p(x(t) | x(0) = x0) given z ~ N(0, I).
        ``t`` is a float or a per-sample array of shape (N,)."""
        std = self.marginal_std(t)
        return x0 + _batch_view(_constant_like(std, x0), _raw(x0).ndim) * z

    def forward_step(self, x, t, dt, z):
        """One Euler step of the forward SDE, eq. 1: x(t + dt) = x(t) + g(t) sqrt(dt) z."""
        g = self.diffusion_coeff(t)
        return x + _batch_view(_constant_like(g, x), _raw(x).ndim) * math.sqrt(dt) * z

    def prior_sample(self, shape, rng, dtype=np.float32):
        """A draw from the prior N(0, std(T)^2 I); ``rng`` is a tinydiff Generator and fixes the
        backend."""
        if not isinstance(rng, Generator):
            raise TypeError(f"prior_sample needs a tinydiff Generator (backend.default_rng(seed)), "
                            f"got {type(rng).__name__}")
        return rng.normal(tuple(shape), std=self.prior_std, dtype=dtype)

    def prior_logp(self, z):
        """log N(z; 0, std(T)^2 I) per sample: an array of shape (N,) on z's backend."""
        z = _raw(z)
        var = self.prior_std ** 2
        d = int(np.prod(z.shape[1:]))
        sq = (z * z).reshape(z.shape[0], -1).sum(axis=1)
        return -0.5 * d * math.log(2 * math.pi * var) - sq / (2 * var)

    def __repr__(self):
        return f"{type(self).__name__}(sigma={self.sigma})"


class VESDE(SDE):
    """The variance-exploding SDE of eq. 1: dx = sigma^t dW (sigma = 25 as in the reference)."""

    def __init__(self, sigma=25.0):
        sigma = float(sigma)
        if not sigma > 1.0:
            raise ValueError(f"VESDE needs sigma > 1 (std(t)^2 = (sigma^(2t) - 1) / (2 ln sigma)), "
                             f"got {sigma}")
        self.sigma = sigma
        self.log_sigma = math.log(sigma)

    def diffusion_coeff(self, t):
        """g(t) = sigma^t."""
        if isinstance(t, Tensor) and t.requires_grad:
            return self.sigma ** t
        return _on_array(lambda a: self.sigma ** a, t)

    def marginal_std(self, t):
        """std(t) = sqrt((sigma^(2t) - 1) / (2 ln sigma)), computed with expm1 so that it stays
        accurate in float32 near t = 0 (sigma^(2t) - 1 would cancel)."""
        c = 2.0 * self.log_sigma
        if isinstance(t, Tensor) and t.requires_grad:   # differentiable path
            return (((t * c).exp() - 1.0) / c).sqrt()

        def std(a):
            if isinstance(a, (int, float)):
                return math.sqrt(math.expm1(c * a) / c)
            xp = _xp(a)
            return xp.sqrt(xp.expm1(a * c) / c)
        return _on_array(std, t)


class BrownianSDE(SDE):
    """Constant noise strength, dx = sigma dW: std(t)^2 = sigma^2 t, the setting of eq. 3."""

    def __init__(self, sigma=1.0):
        sigma = float(sigma)
        if not sigma > 0.0:
            raise ValueError(f"BrownianSDE needs sigma > 0, got {sigma}")
        self.sigma = sigma

    def diffusion_coeff(self, t):
        if isinstance(t, (int, float)):
            return self.sigma
        if isinstance(t, Tensor):
            return Tensor(_xp(t.data).full(t.shape, self.sigma, dtype=t.dtype))
        return _xp(t).full(t.shape, self.sigma, dtype=t.dtype)

    def marginal_std(self, t):
        if isinstance(t, Tensor) and t.requires_grad:
            return (t * self.sigma ** 2).sqrt()

        def std(a):
            if isinstance(a, (int, float)):
                return self.sigma * math.sqrt(a)
            return self.sigma * _xp(a).sqrt(a)
        return _on_array(std, t)


# -- the training objective (eq. 5) ------------------------------------------------------------


def dsm_loss(model, x0, sde, rng=None, eps=1e-5, labels=None, t=None, z=None):
    """Denoising score matching, eq. 5:

        J = E_{t ~ U(eps, T), z ~ N(0, I)} || s(x0 + std(t) z, t) std(t) + z ||^2,

    summed over the pixels of each sample and averaged over the batch (as the reference does).

    Args:
        model: called as ``model(x, t)`` (or ``model(x, t, labels)`` when labels is given) with
            Tensors x of x0's shape and t of shape (N,); returns the score as a Tensor.
        x0: a batch of data, Tensor or array, on the model's backend.
        sde: the SDE (e.g. ``VESDE(25.0)``).
        rng: a tinydiff Generator on x0's backend (``backend.default_rng(seed)``); None draws from a
            fresh unseeded one.
        eps: the smallest time drawn (1e-5 as the reference: std(t) -> 0 makes the loss
            ill-conditioned).
        labels: class labels passed through to the model (conditional models).
        t, z: fixed times (N,) and noise (x0's shape) instead of random draws (for tests).
    Returns:
        A scalar Tensor.
    """
    x0 = _raw(x0)
    be = backend_of(x0)
    if not np.issubdtype(x0.dtype, np.floating):
        raise TypeError(f"dsm_loss: x0 must be floating point (e.g. images scaled to [0, 1]), got "
                        f"{x0.dtype}")
    n = x0.shape[0]
    if rng is None and (t is None or z is None):
        rng = be.default_rng()
    if rng is not None:
        if not isinstance(rng, Generator):
            raise TypeError(f"dsm_loss: rng must be a tinydiff Generator, got {type(rng).__name__}")
        if rng.backend is not be:
            raise ValueError(f"dsm_loss: rng lives on backend {rng.backend.name!r} but x0 on "
                             f"{be.name!r}; use get_backend({be.name!r}).default_rng(seed)")
    if t is None:
        t = rng.uniform((n,), low=eps, high=sde.T, dtype=x0.dtype)
    if z is None:
        z = rng.normal(x0.shape, dtype=x0.dtype)
    t, z = _constant_like(_raw(t), x0), _constant_like(_raw(z), x0)
    std = _batch_view(sde.marginal_std(t), x0.ndim)
    x = x0 + std * z
    args = (Tensor(x), Tensor(t)) if labels is None else (Tensor(x), Tensor(t), labels)
    score = model(*args)
    if not isinstance(score, Tensor):
        raise TypeError(f"dsm_loss: the model must return a Tensor, got {type(score).__name__}")
    if score.shape != x0.shape:
        raise ValueError(f"dsm_loss: the model returned shape {score.shape} for inputs of shape "
                         f"{x0.shape}; a score has the shape of its input")
    residual = score * std + z
    per_sample = (residual * residual).sum(axis=tuple(range(1, x0.ndim)))
    return per_sample.mean()


# -- closed-form scores (eq. 3 and the Gaussian marginal) ----------------------------------------


def point_mass_score(x0, sde):
    """The exact score when all data is one point x0: p(x, t) = N(x0, std(t)^2 I), so

        s(x, t) = -(x - x0) / std(t)^2,

    which for constant noise strength (``BrownianSDE(sigma)``, std(t)^2 = sigma^2 t) is eq. 3.
    ``x0`` broadcasts against one sample or a batch. The returned ``score_fn(x, t)`` works on
    arrays (for the samplers) and on Tensors (differentiable in x, for the likelihood)."""
    def score_fn(x, t):
        var = _batch_view(sde.marginal_std(t), _raw(x).ndim) ** 2
        return -(x - _constant_like(x0, x)) / _constant_like(var, x)
    return score_fn


def gaussian_score(mu, v, sde):
    """The exact score for Gaussian data N(mu, v I) (``v`` a scalar, or an array for a diagonal
    covariance): p(x, t) = N(mu, (v + std(t)^2) I), so s(x, t) = -(x - mu) / (v + std(t)^2).
    Works on arrays and on Tensors like ``point_mass_score``."""
    def score_fn(x, t):
        var = _batch_view(sde.marginal_std(t), _raw(x).ndim) ** 2
        return -(x - _constant_like(mu, x)) / (_constant_like(v, x) + _constant_like(var, x))
    return score_fn
