"""The noising SDEs, their marginals, the denoising score-matching loss (eq. 5) and closed-form
scores (eq. 3), in the spirit of score_sde's ``sde_lib``. Plain equation numbers are those of
docs/design.md, which derives each of them; "Song eq. N" are those of Song et al. 2021,
"Score-based generative modeling through stochastic differential equations".

Every SDE here has a drift linear in x, on t in [0, T = 1]:

    dx = f(x, t) dt + g(t) dW,   f(x, t) = a(t) x,

so given x(0) = x0 the marginal is Gaussian, x(t) ~ N(m(t) x0, std(t)^2 I), with the mean
coefficient m(t) = exp(int_0^t a) and d std^2 / dt = 2 a std^2 + g^2 (Saerkkae & Solin 2019,
eq. 5.51 / Song eq. 33 and app. B). The SDEs:

- ``VESDE(sigma)``: variance exploding, eq. 1: a = 0, g(t) = sigma^t, m = 1,
  std(t)^2 = (sigma^(2t) - 1) / (2 ln sigma); prior N(0, std(1)^2 I);
- ``VPSDE(beta_min, beta_max)``: variance preserving, the continuous DDPM (Song eq. 11):
  beta(t) = beta_min + t (beta_max - beta_min), a = -beta / 2, g = sqrt(beta),
  m(t) = exp(-B(t) / 2), std(t)^2 = 1 - exp(-B(t)) with B(t) = int_0^t beta; prior N(0, I);
- ``subVPSDE(beta_min, beta_max)``: sub-VP (Song eq. 12): the same drift,
  g(t) = sqrt(beta(t) (1 - exp(-2 B(t)))), std(t) = 1 - exp(-B(t)) (always below VP's); prior N(0, I);
- ``BrownianSDE(sigma)``: constant noise strength g = sigma, std(t)^2 = sigma^2 t (eq. 3; for tests).

``sde.scaled_std(t)`` = std(t) / m(t) is the noise level sigma of Karras et al. 2022's scaled form
x(t) = m(t) (x0 + sigma(t) z), and ``sde.time_of_scaled_std(sigma)`` its exact inverse (closed forms
here, bisection in the base class); the few-step samplers of ``tinydiff.karras`` run on sigma.

``make_sde(name, **params)`` builds one by name ("ve", "vp", "subvp"); ``sde.config()`` is its
JSON-able description and ``sde_from_config`` rebuilds it (run configs and checkpoints).

Every function of t takes a Python float, an array of any backend (numpy / cupy / the strict
stand-in; ``xp`` comes from the input, float32 stays float32) or a Tensor, and returns the same kind.
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


class _FloatMath:
    exp, expm1, sqrt = staticmethod(math.exp), staticmethod(math.expm1), staticmethod(math.sqrt)


class _TensorMath:
    """Differentiable exp / expm1 / sqrt on Tensors (expm1 as exp - 1: only the gradient path)."""
    exp = staticmethod(lambda a: a.exp())
    expm1 = staticmethod(lambda a: a.exp() - 1.0)
    sqrt = staticmethod(lambda a: a.sqrt())


def _elementwise(formula, t):
    """``formula(M, t)`` for t a float, an array or a Tensor, M providing exp / expm1 / sqrt:
    math for floats, xp for arrays, Tensor methods (differentiable) for a Tensor that requires
    grad; a Tensor without grad is evaluated on its array (accurate expm1) and wrapped again."""
    if isinstance(t, Tensor) and t.requires_grad:
        return formula(_TensorMath, t)
    return _on_array(lambda a: formula(_FloatMath if isinstance(a, (int, float)) else _xp(a), a), t)


def _ones_like(t):
    """1 as a float, or an array / Tensor of ones shaped like t (m(t) of the drift-free SDEs)."""
    if isinstance(t, (int, float)):
        return 1.0
    if isinstance(t, Tensor):
        return Tensor(_xp(t.data).ones(t.shape, dtype=t.dtype))
    return _xp(t).ones(t.shape, dtype=t.dtype)


def _zeros_like(t):
    if isinstance(t, (int, float)):
        return 0.0
    if isinstance(t, Tensor):
        return Tensor(_xp(t.data).zeros(t.shape, dtype=t.dtype))
    return _xp(t).zeros(t.shape, dtype=t.dtype)


def _on_host_sigma(who, formula, sigma):
    """``formula(xp, sigma)`` for sigma a float or an array (numpy, or a device array whose own xp
    is used): the inverse schedules of ``time_of_scaled_std``. A float gives a float; host inputs
    are checked to be finite and >= 0 (a device array is not, to avoid a host sync)."""
    if isinstance(sigma, Tensor):
        raise TypeError(f"{who} takes a float or an array of noise levels, not a Tensor")
    scalar = isinstance(sigma, (int, float, np.number))
    if scalar or isinstance(sigma, (list, tuple, np.ndarray)):
        a = np.asarray(sigma, dtype=np.float64 if scalar or not np.issubdtype(
            np.asarray(sigma).dtype, np.floating) else None)
        if not (np.isfinite(a).all() and (a >= 0).all()):
            raise ValueError(f"{who}: sigma must be finite and >= 0, got {sigma!r}")
        out = formula(np, a)
        return float(out) if scalar else out
    return formula(_xp(sigma), sigma)


# -- SDEs ------------------------------------------------------------------------------------


class SDE:
    """dx = f(x, t) dt + g(t) dW on [0, T] with a linear drift f(x, t) = a(t) x.

    Subclasses define ``drift_coeff(t)`` = a(t), ``diffusion_coeff(t)`` = g(t),
    ``marginal_mean_coeff(t)`` = m(t), ``marginal_std(t)`` = std(t), ``prior_std`` and ``params()``;
    the rest (perturbation, the prior and its log-density, one forward Euler step, the reverse
    drift, the configuration) follows from them.
    """

    T = 1.0
    name = None          # the factory's name ("ve", "vp", "subvp")

    def drift_coeff(self, t):
        raise NotImplementedError

    def diffusion_coeff(self, t):
        raise NotImplementedError

    def marginal_mean_coeff(self, t):
        raise NotImplementedError

    def marginal_std(self, t):
        raise NotImplementedError

    def params(self):
        """The constructor's arguments as a dict of floats."""
        raise NotImplementedError

    @property
    def prior_std(self):
        """The prior the samplers start from is N(0, prior_std^2 I)."""
        raise NotImplementedError

    # what follows from the five above
    def scaled_std(self, t):
        """sigma(t) = std(t) / m(t): the noise level of Karras et al. 2022's scaled form
        x(t) = m(t) (x0 + sigma(t) z), so that x / m(t) is the data plus N(0, sigma(t)^2 I) noise
        (see docs/sampling.md). 0 at t = 0 and increasing in t for every SDE here."""
        return self.marginal_std(t) / self.marginal_mean_coeff(t)

    def time_of_scaled_std(self, sigma):
        """The exact inverse of ``scaled_std``: the t in [0, T] with sigma(t) = sigma (a float or an
        array). The SDEs here have closed forms; this base version bisects on [0, T] (host
        float64, to about 1e-16 relative) for any SDE whose sigma(t) increases, and refuses a
        sigma above sigma(T)."""
        def bisect(xp, s):
            s = np.asarray(s, dtype=np.float64)
            top = float(self.scaled_std(float(self.T)))
            if (s > top * (1 + 1e-12)).any():
                raise ValueError(f"time_of_scaled_std: sigma {float(s.max()):g} is above sigma(T) = "
                                 f"{top:g}, beyond the end of {type(self).__name__}'s time")
            lo, hi = np.zeros_like(s), np.full_like(s, float(self.T))
            for _ in range(64):                    # T / 2^64: far below 1e-10 of t = 1e-5
                mid = 0.5 * (lo + hi)
                below = np.asarray(self.scaled_std(mid)) < s
                lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
            return np.where(s == 0, 0.0, 0.5 * (lo + hi))
        return _on_host_sigma("time_of_scaled_std", bisect, sigma)

    def drift(self, x, t):
        """f(x, t) = a(t) x; ``t`` a float or a per-sample array (N,)."""
        return _batch_view(_constant_like(self.drift_coeff(t), x), _raw(x).ndim) * x

    def marginal_prob(self, x0, t):
        """(mean, std) of p(x(t) | x(0) = x0) = N(m(t) x0, std(t)^2 I) (score_sde's marginal_prob);
        the mean has x0's shape, std is per sample, shaped to broadcast against it."""
        ndim = _raw(x0).ndim
        m = _batch_view(_constant_like(self.marginal_mean_coeff(t), x0), ndim)
        return m * x0, _batch_view(_constant_like(self.marginal_std(t), x0), ndim)

    def perturb(self, x0, t, z):
        """x(t) = m(t) x0 + std(t) z: a draw from the marginal p(x(t) | x(0) = x0) given
        z ~ N(0, I). ``t`` is a float or a per-sample array of shape (N,)."""
        mean, std = self.marginal_prob(x0, t)
        return mean + std * z

    def forward_step(self, x, t, dt, z):
        """One Euler-Maruyama step of the forward SDE: x(t + dt) = x + f(x, t) dt + g(t) sqrt(dt) z
        (eq. 1 when f = 0)."""
        g = _batch_view(_constant_like(self.diffusion_coeff(t), x), _raw(x).ndim)
        return x + self.drift(x, t) * dt + g * math.sqrt(dt) * z

    def reverse_drift(self, x, t, score, probability_flow=False):
        """The drift of the reverse-time SDE, f(x, t) - g(t)^2 s(x, t) (Anderson 1982; Song eq. 6),
        or with ``probability_flow`` that of the probability-flow ODE, f(x, t) - 1/2 g(t)^2 s(x, t)
        (Song eq. 13). Time runs backwards: a step from t to t - dt adds -reverse_drift * dt."""
        c = 0.5 if probability_flow else 1.0
        g = _batch_view(_constant_like(self.diffusion_coeff(t), x), _raw(x).ndim)
        return self.drift(x, t) - (c * g ** 2) * score

    def prior_sample(self, shape, rng, dtype=np.float32):
        """A draw from the prior N(0, prior_std^2 I); ``rng`` is a tinydiff Generator and fixes the
        backend."""
        if not isinstance(rng, Generator):
            raise TypeError(f"prior_sample needs a tinydiff Generator (backend.default_rng(seed)), "
                            f"got {type(rng).__name__}")
        return rng.normal(tuple(shape), std=self.prior_std, dtype=dtype)

    def prior_logp(self, z):
        """log N(z; 0, prior_std^2 I) per sample: an array of shape (N,) on z's backend."""
        z = _raw(z)
        var = self.prior_std ** 2
        d = int(np.prod(z.shape[1:]))
        sq = (z * z).reshape(z.shape[0], -1).sum(axis=1)
        return -0.5 * d * math.log(2 * math.pi * var) - sq / (2 * var)

    def config(self):
        """A JSON-able description, e.g. {"sde": "vp", "beta_min": 0.1, "beta_max": 20.0};
        ``sde_from_config`` rebuilds the SDE from it."""
        return {"sde": self.name, **self.params()}

    def __eq__(self, other):
        return type(other) is type(self) and other.params() == self.params()

    def __hash__(self):
        return hash((type(self).__name__, tuple(sorted(self.params().items()))))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class VESDE(SDE):
    """The variance-exploding SDE of eq. 1: dx = sigma^t dW (sigma = 25 as in the reference)."""

    name = "ve"

    def __init__(self, sigma=25.0):
        sigma = float(sigma)
        if not sigma > 1.0 or not math.isfinite(sigma):
            raise ValueError(f"VESDE needs sigma > 1 (std(t)^2 = (sigma^(2t) - 1) / (2 ln sigma)), "
                             f"got {sigma}")
        self.sigma = sigma
        self.log_sigma = math.log(sigma)

    def params(self):
        return {"sigma": self.sigma}

    def drift_coeff(self, t):
        """a(t) = 0: the mean never moves."""
        return _zeros_like(t)

    def marginal_mean_coeff(self, t):
        """m(t) = 1."""
        return _ones_like(t)

    def diffusion_coeff(self, t):
        """g(t) = sigma^t."""
        if isinstance(t, Tensor) and t.requires_grad:
            return self.sigma ** t
        return _on_array(lambda a: self.sigma ** a, t)

    def marginal_std(self, t):
        """std(t) = sqrt((sigma^(2t) - 1) / (2 ln sigma)), computed with expm1 so that it stays
        accurate in float32 near t = 0 (sigma^(2t) - 1 would cancel)."""
        c = 2.0 * self.log_sigma
        return _elementwise(lambda M, a: M.sqrt(M.expm1(a * c) / c), t)

    @property
    def prior_std(self):
        """std(T): the prior is N(0, std(T)^2 I), the marginal of any data with std(T) >> its spread."""
        return float(self.marginal_std(self.T))

    def time_of_scaled_std(self, sigma):
        """m = 1, so sigma(t) = std(t) and sigma^2 = (s^(2t) - 1) / (2 ln s) (s = self.sigma) gives
        t = log1p(2 ln s sigma^2) / (2 ln s)."""
        c = 2.0 * self.log_sigma
        return _on_host_sigma("time_of_scaled_std", lambda xp, a: xp.log1p(c * (a * a)) / c, sigma)


class VPSDE(SDE):
    """The variance-preserving SDE, the continuous limit of DDPM (Song eq. 11, app. B):

        dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW,   beta(t) = beta_min + t (beta_max - beta_min).

    With B(t) = int_0^t beta = beta_min t + 1/2 t^2 (beta_max - beta_min) the marginal is
    N(exp(-B/2) x0, (1 - exp(-B)) I) (Song eq. 29); DDPM's discrete beta_i are beta(t_i) dt.
    """

    name = "vp"

    def __init__(self, beta_min=0.1, beta_max=20.0):
        self.beta_min, self.beta_max = _check_betas(type(self).__name__, beta_min, beta_max)

    def params(self):
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}

    def beta(self, t):
        """beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t):
        """B(t) = int_0^t beta(s) ds = beta_min t + 1/2 t^2 (beta_max - beta_min)."""
        return t * self.beta_min + (t * t) * (0.5 * (self.beta_max - self.beta_min))

    def drift_coeff(self, t):
        """a(t) = -beta(t) / 2."""
        return self.beta(t) * -0.5

    def diffusion_coeff(self, t):
        """g(t) = sqrt(beta(t))."""
        return _elementwise(lambda M, a: M.sqrt(self.beta(a)), t)

    def marginal_mean_coeff(self, t):
        """m(t) = exp(-B(t) / 2)."""
        return _elementwise(lambda M, a: M.exp(self.integrated_beta(a) * -0.5), t)

    def marginal_std(self, t):
        """std(t) = sqrt(1 - exp(-B(t))), with expm1 for accuracy near t = 0."""
        return _elementwise(lambda M, a: M.sqrt(-M.expm1(self.integrated_beta(a) * -1.0)), t)

    @property
    def prior_std(self):
        """1: the prior is N(0, I) (std(1)^2 = 1 - exp(-B(1)) = 0.99996 by default, m(1) = 0.0066)."""
        return 1.0

    def time_of_integrated_beta(self, big_b):
        """The t >= 0 with B(t) = big_b: the positive root of (beta_max - beta_min) t^2 / 2
        + beta_min t - B = 0, written 2 B / (beta_min + sqrt(beta_min^2 + 2 (beta_max - beta_min) B))
        so that it neither cancels for small B nor divides by zero when beta_max = beta_min."""
        scalar = isinstance(big_b, (int, float, np.number))
        xp = np if scalar or isinstance(big_b, np.ndarray) else _xp(big_b)
        d = self.beta_max - self.beta_min
        root = self.beta_min + xp.sqrt(self.beta_min ** 2 + (2.0 * d) * big_b)
        t = xp.where(big_b > 0, (2.0 * big_b) / xp.where(root > 0, root, 1.0), 0.0)
        return float(t) if scalar else t

    def _integrated_beta_of_scaled_std(self, xp, sigma):
        """VP: sigma^2 = std^2 / m^2 = (1 - exp(-B)) / exp(-B) = exp(B) - 1, so B = log1p(sigma^2)."""
        return xp.log1p(sigma * sigma)

    def time_of_scaled_std(self, sigma):
        """Closed form: B from sigma (``_integrated_beta_of_scaled_std``), then t from B
        (``time_of_integrated_beta``)."""
        return _on_host_sigma("time_of_scaled_std", lambda xp, a: self.time_of_integrated_beta(
            self._integrated_beta_of_scaled_std(xp, a)), sigma)


class subVPSDE(VPSDE):
    """The sub-VP SDE (Song eq. 12), VP's drift with a smaller noise:

        dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 B(t)))) dW,

    whose marginal is N(exp(-B/2) x0, (1 - exp(-B))^2 I) (Song eq. 30): its variance is below VP's
    at every t (Song et al. report their best likelihoods with it).
    """

    name = "subvp"

    def diffusion_coeff(self, t):
        """g(t) = sqrt(beta(t) (1 - exp(-2 B(t))))."""
        return _elementwise(
            lambda M, a: M.sqrt(self.beta(a) * -M.expm1(self.integrated_beta(a) * -2.0)), t)

    def marginal_std(self, t):
        """std(t) = 1 - exp(-B(t)) (not its square root)."""
        return _elementwise(lambda M, a: -M.expm1(self.integrated_beta(a) * -1.0), t)

    def _integrated_beta_of_scaled_std(self, xp, sigma):
        """sub-VP: sigma = (1 - exp(-B)) / exp(-B/2) = 2 sinh(B / 2), so B = 2 asinh(sigma / 2)."""
        return 2.0 * xp.arcsinh(0.5 * sigma)


class BrownianSDE(SDE):
    """Constant noise strength, dx = sigma dW: std(t)^2 = sigma^2 t, the setting of eq. 3."""

    name = "brownian"

    def __init__(self, sigma=1.0):
        sigma = float(sigma)
        if not sigma > 0.0 or not math.isfinite(sigma):
            raise ValueError(f"BrownianSDE needs sigma > 0, got {sigma}")
        self.sigma = sigma

    def params(self):
        return {"sigma": self.sigma}

    def drift_coeff(self, t):
        return _zeros_like(t)

    def marginal_mean_coeff(self, t):
        return _ones_like(t)

    def diffusion_coeff(self, t):
        if isinstance(t, (int, float)):
            return self.sigma
        if isinstance(t, Tensor):
            return Tensor(_xp(t.data).full(t.shape, self.sigma, dtype=t.dtype))
        return _xp(t).full(t.shape, self.sigma, dtype=t.dtype)

    def marginal_std(self, t):
        return _elementwise(lambda M, a: M.sqrt(a * self.sigma ** 2), t)

    @property
    def prior_std(self):
        return float(self.marginal_std(self.T))

    def time_of_scaled_std(self, sigma):
        """sigma(t) = std(t) = s sqrt(t) (s = self.sigma), so t = (sigma / s)^2."""
        return _on_host_sigma("time_of_scaled_std", lambda xp, a: (a / self.sigma) ** 2, sigma)


def _check_betas(who, beta_min, beta_max):
    beta_min, beta_max = float(beta_min), float(beta_max)
    if not (math.isfinite(beta_min) and math.isfinite(beta_max) and 0 <= beta_min <= beta_max
            and beta_max > 0):
        raise ValueError(f"{who} needs 0 <= beta_min <= beta_max and beta_max > 0 (finite), got "
                         f"beta_min={beta_min}, beta_max={beta_max}")
    return beta_min, beta_max


# -- the factory and configurations ------------------------------------------------------------

SDES = {"ve": VESDE, "vp": VPSDE, "subvp": subVPSDE}
SDE_PARAMS = {"ve": ("sigma",), "vp": ("beta_min", "beta_max"), "subvp": ("beta_min", "beta_max")}


def make_sde(name, **params):
    """The SDE called ``name`` ("ve", "vp" or "subvp") with its parameters (defaults: sigma = 25;
    beta_min = 0.1, beta_max = 20), e.g. ``make_sde("vp", beta_max=20.0)``."""
    if name not in SDES:
        raise ValueError(f"sde must be one of {', '.join(map(repr, SDES))}, got {name!r}")
    unknown = sorted(set(params) - set(SDE_PARAMS[name]))
    if unknown:
        raise ValueError(f"sde {name!r} takes {', '.join(SDE_PARAMS[name])}, got "
                         f"{', '.join(f'{k}={params[k]!r}' for k in unknown)}")
    for k, v in params.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise ValueError(f"sde {name!r}: {k} must be a number, got {v!r}")
    return SDES[name](**params)


def sde_from_config(config):
    """Rebuild an SDE from ``sde.config()`` or from a run configuration that holds one: the name
    under "sde" (absent: "ve", what every run recorded before the VP SDEs existed) and that SDE's
    parameters from the keys of the same names (absent: the defaults); other keys are ignored."""
    if not isinstance(config, dict):
        raise TypeError(f"sde_from_config needs a dict such as {{'sde': 'vp', 'beta_min': 0.1, "
                        f"'beta_max': 20.0}}, got {type(config).__name__}")
    name = config.get("sde", "ve")
    if name not in SDES:
        raise ValueError(f"sde must be one of {', '.join(map(repr, SDES))}, got {name!r}")
    return make_sde(name, **{k: config[k] for k in SDE_PARAMS[name] if config.get(k) is not None})


# -- the training objective (eq. 5) ------------------------------------------------------------


NOISE_DISTRIBUTIONS = ("uniform", "lognormal")
LOSS_WEIGHTINGS = ("none", "edm")


class TrainingNoise:
    """Which noise levels the loss trains on, and how much each counts.

    ``distribution``:
        "uniform": t ~ U(eps, T), eq. 5 as written (docs/design.md#eq-5).
        "lognormal": the scaled noise level sigma = std(t) / m(t) (the std of the noise relative
            to the signal) is drawn log-normally, ln sigma ~ N(p_mean, p_std^2), clipped to the
            SDE's range [sigma(eps), sigma(T)], and t = sigma^-1 of it (Karras et al. 2022).
            Under the VE SDE of eq. 1 uniform times put most draws at sigma far above the
            data's scale (half of them above sigma = 0.7 for sigma_max = 25); the log-normal
            puts them where samples are decided.
    ``p_uniform`` (log-normal only): the fraction of draws taken uniformly in t instead, a
        mixture: the log-normal alone almost never trains near sigma(T), where every sample
        starts (P(sigma > 3) is 3 % for N(-1.2, 1.2^2)), and a sample that goes wrong there does
        not recover (docs/training.md).
    ``weighting``:
        "none": each draw's residual || s std + z ||^2 counts the same (lambda(t) = std(t)^2).
        "edm": multiplied by (sigma^2 + sigma_data^2) / sigma_data^2, which makes the loss
            Karras et al.'s lambda(sigma) || D(x; sigma) - x0 ||^2 in the denoiser D(x) = x +
            sigma^2 grad log p: our residual is (D - x0) / sigma, and their lambda(sigma) =
            (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.

    ``TrainingNoise()`` (uniform, none) is eq. 5 exactly.
    """

    def __init__(self, distribution="uniform", p_mean=-1.2, p_std=1.2, weighting="none",
                 sigma_data=0.5, p_uniform=0.0):
        if distribution not in NOISE_DISTRIBUTIONS:
            raise ValueError(f"noise distribution must be one of {', '.join(NOISE_DISTRIBUTIONS)}, "
                             f"got {distribution!r}")
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got "
                             f"{weighting!r}")
        if not (math.isfinite(p_mean) and math.isfinite(p_std) and p_std > 0):
            raise ValueError(f"the log-normal needs a finite p_mean and p_std > 0, got {p_mean}, "
                             f"{p_std}")
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        if not 0.0 <= p_uniform <= 1.0:
            raise ValueError(f"p_uniform is a fraction of the draws in [0, 1], got {p_uniform}")
        if p_uniform > 0 and distribution != "lognormal":
            raise ValueError("p_uniform mixes uniform times into the log-normal: it needs the "
                             f"lognormal distribution, not {distribution!r}")
        self.distribution, self.weighting = distribution, weighting
        self.p_mean, self.p_std, self.sigma_data = float(p_mean), float(p_std), float(sigma_data)
        self.p_uniform = float(p_uniform)

    def times(self, sde, n, rng, dtype, eps=1e-5):
        """n training times on rng's backend (no host round trip)."""
        if self.distribution == "uniform":
            return rng.uniform((n,), low=eps, high=sde.T, dtype=dtype)
        xp = rng.backend.xp
        lo, hi = (math.log(float(sde.scaled_std(s))) for s in (eps, sde.T))
        log_sigma = xp.clip(rng.normal((n,), mean=self.p_mean, std=self.p_std, dtype=dtype), lo, hi)
        t = sde.time_of_scaled_std(xp.exp(log_sigma)).astype(dtype, copy=False)
        if self.p_uniform > 0:       # the mixture: each draw uniform in t with prob. p_uniform
            uniform = rng.uniform((n,), low=eps, high=sde.T, dtype=dtype)
            t = xp.where(rng.uniform((n,), dtype=dtype) < self.p_uniform, uniform, t)
        return t

    def weights(self, sde, t):
        """Per-sample loss weights (N,) or None for unweighted."""
        if self.weighting == "none":
            return None
        sigma = sde.scaled_std(t)
        return 1.0 + (sigma * sigma) / (self.sigma_data ** 2)

    def __repr__(self):
        if self.distribution == "uniform" and self.weighting == "none":
            return "TrainingNoise()"
        mix = f", p_uniform={self.p_uniform:g}" if self.p_uniform else ""
        return (f"TrainingNoise({self.distribution!r}, p_mean={self.p_mean:g}, p_std={self.p_std:g}, "
                f"weighting={self.weighting!r}, sigma_data={self.sigma_data:g}{mix})")


def dsm_loss(model, x0, sde, rng=None, eps=1e-5, labels=None, t=None, z=None, noise=None):
    """Denoising score matching, eq. 5 for any SDE here:

        J = E_{t ~ U(eps, T), z ~ N(0, I)} || s(m(t) x0 + std(t) z, t) std(t) + z ||^2,

    summed over the pixels of each sample and averaged over the batch (as the reference does).
    The score of p(x(t) | x0) at x(t) = m x0 + std z is -z / std (Vincent 2011; Song eq. 7 with
    lambda(t) = std(t)^2), so the target of s std is -z at unit scale for every SDE.

    Args:
        model: called as ``model(x, t)`` (or ``model(x, t, labels)`` when labels is given) with
            Tensors x of x0's shape and t of shape (N,); returns the score as a Tensor.
        x0: a batch of data, Tensor or array, on the model's backend.
        sde: the SDE (e.g. ``VESDE(25.0)``, ``make_sde("vp")``).
        rng: a tinydiff Generator on x0's backend (``backend.default_rng(seed)``); None draws from a
            fresh unseeded one.
        eps: the smallest time drawn (1e-5 as the reference: std(t) -> 0 makes the loss
            ill-conditioned).
        labels: class labels passed through to the model (conditional models).
        t, z: fixed times (N,) and noise (x0's shape) instead of random draws (for tests).
        noise: a ``TrainingNoise`` (which times are drawn, how each is weighted); None is eq. 5
            as written (uniform times, unweighted).
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
    noise = noise or _EQ5
    if t is None:
        t = noise.times(sde, n, rng, x0.dtype, eps)
    if z is None:
        z = rng.normal(x0.shape, dtype=x0.dtype)
    t, z = _constant_like(_raw(t), x0), _constant_like(_raw(z), x0)
    mean, std = sde.marginal_prob(x0, t)
    x = mean + std * z
    args = (Tensor(x), Tensor(t)) if labels is None else (Tensor(x), Tensor(t), labels)
    score = model(*args)
    if not isinstance(score, Tensor):
        raise TypeError(f"dsm_loss: the model must return a Tensor, got {type(score).__name__}")
    if score.shape != x0.shape:
        raise ValueError(f"dsm_loss: the model returned shape {score.shape} for inputs of shape "
                         f"{x0.shape}; a score has the shape of its input")
    residual = score * std + z
    per_sample = (residual * residual).sum(axis=tuple(range(1, x0.ndim)))
    w = noise.weights(sde, t)
    if w is not None:
        per_sample = per_sample * _constant_like(w, x0)
    return per_sample.mean()


_EQ5 = TrainingNoise()


# -- closed-form scores (eq. 3 and the Gaussian marginal) ----------------------------------------


def point_mass_score(x0, sde):
    """The exact score when all data is one point x0: p(x, t) = N(m(t) x0, std(t)^2 I), so

        s(x, t) = -(x - m(t) x0) / std(t)^2,

    which for constant noise strength (``BrownianSDE(sigma)``, std(t)^2 = sigma^2 t) is eq. 3.
    ``x0`` broadcasts against one sample or a batch. The returned ``score_fn(x, t)`` works on
    arrays (for the samplers) and on Tensors (differentiable in x, for the likelihood)."""
    def score_fn(x, t):
        ndim = _raw(x).ndim
        m = _constant_like(_batch_view(sde.marginal_mean_coeff(t), ndim), x)
        var = _batch_view(sde.marginal_std(t), ndim) ** 2
        return -(x - m * _constant_like(x0, x)) / _constant_like(var, x)
    return score_fn


def gaussian_score(mu, v, sde):
    """The exact score for Gaussian data N(mu, v I) (``v`` a scalar, or an array for a diagonal
    covariance): x(t) = m x0 + std z is Gaussian with p(x, t) = N(m mu, (m^2 v + std^2) I), so

        s(x, t) = -(x - m(t) mu) / (m(t)^2 v + std(t)^2).

    Works on arrays and on Tensors like ``point_mass_score``."""
    def score_fn(x, t):
        ndim = _raw(x).ndim
        m = _constant_like(_batch_view(sde.marginal_mean_coeff(t), ndim), x)
        var = _constant_like(_batch_view(sde.marginal_std(t), ndim) ** 2, x)
        return -(x - m * _constant_like(mu, x)) / ((m * m) * _constant_like(v, x) + var)
    return score_fn
