"""Samplers for the reverse of an SDE dx = f(x, t) dt + g(t) dW (any of ``tinydiff.sde``: VE, VP,
sub-VP), and likelihoods along its probability-flow ODE. Each is written once against the SDE's
drift f(x, t) = a(t) x, diffusion g(t) and prior; none knows which SDE it runs.

Every sampler takes any ``score_fn(x, t)``: x an array (N, ...) and t an array (N,) on one backend,
returning the score as an array of x's shape. A trained model is wrapped with
``model_score_fn(model)``; the closed-form scores of ``tinydiff.sde`` work directly. Equation
numbers are those of docs/design.md.

- ``euler_maruyama``: the reverse SDE (Song et al. 2021 eq. 6) stepped backwards,
  x <- x - [f(x, t) - g^2 s] dt + g sqrt(dt) r, from t = T down to eps (eq. 2 when f = 0);
- ``predictor_corrector``: one Langevin corrector step (signal-to-noise ratio ``snr``) before each
  Euler-Maruyama predictor step, as in score_sde and Song's tutorial;
- ``ancestral_sampler``: DDPM's ancestral sampling (Ho et al. 2020, Algorithm 2) for the VP SDE;
- ``ode_sampler``: the probability-flow ODE dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t) (Song eq. 13),
  solved on the host by ``scipy.integrate.solve_ivp``;
- ``log_likelihood`` / ``bits_per_dim``: the same ODE run forward from the data, with the change of
  log-density given by the divergence of its drift (Skilling-Hutchinson estimator);
- ``heun_sampler`` / ``karras_sde_sampler`` (names "heun", "heun-sde"): Karras et al. 2022's
  few-step samplers on the same ODE in the noise level sigma (``tinydiff.karras``);
- ``dpm_sampler`` (names "dpm2m", "dpm2m-sde"): DPM-Solver++(2M) on the same grid, one score
  evaluation per noise level, for the ODE and for the reverse SDE (``tinydiff.karras``).

``sample(name, ...)`` runs any of them by name (``SAMPLERS``) and returns (x, nfe); every sampler
takes ``callback(i, t, x)``, called after each step with the time reached and the state there
(the last call gets the returned samples), to record a path from noise to data.

The SDE samplers draw all noise from a tinydiff Generator on the chosen backend and never copy
anything to the host inside their loops (time steps are Python floats), so on CuPy they queue
kernels without synchronising. The ODE functions need host arrays for scipy and convert explicitly
once per function evaluation.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np

from .backend import Generator, backend_of, get_backend
from .tensor import Tensor, grad, is_grad_enabled, no_grad


# -- plumbing ---------------------------------------------------------------------------------


def _setup(shape, rng, backend, x_init):
    """Resolve (backend, rng): the backend comes from ``backend``, else rng, else x_init, else numpy."""
    if rng is not None and not isinstance(rng, Generator):
        raise TypeError(f"rng must be a tinydiff Generator (get_backend(name).default_rng(seed)), "
                        f"got {type(rng).__name__}")
    if backend is not None:
        be = get_backend(backend)
    elif rng is not None:
        be = rng.backend
    elif x_init is not None:
        be = backend_of(x_init)
    else:
        be = get_backend("numpy")
    if rng is None:
        rng = be.default_rng()
    if rng.backend is not be:
        raise ValueError(f"rng lives on backend {rng.backend.name!r} but sampling was asked to run on "
                         f"{be.name!r}; pass rng=get_backend({be.name!r}).default_rng(seed)")
    if x_init is not None:
        if backend_of(x_init) is not be:
            raise ValueError(f"x_init lives on backend {backend_of(x_init).name!r}, not {be.name!r}")
        if tuple(x_init.shape) != tuple(shape):
            raise ValueError(f"x_init has shape {tuple(x_init.shape)} but shape={tuple(shape)}")
    return be, rng


def _check(name, sde, eps, num_steps=None, shape=None, rtol=None, atol=None, steps_hint=None):
    """Refuse arguments a sampler cannot honour, naming the argument (instead of a math domain
    error, an endless solve or NaN samples later); ``steps_hint`` says what num_steps means."""
    T = float(sde.T)
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.number)) \
            or not math.isfinite(eps) or not 0 < eps < T:
        raise ValueError(f"{name}: eps must lie in (0, T = {T:g}), got {eps!r}")
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(
            num_steps, (int, np.integer)) or num_steps < 2):
        raise ValueError(f"{name}: num_steps must be an integer >= 2"
                         f"{f' ({steps_hint})' if steps_hint else ''}, got {num_steps!r}")
    if shape is not None:
        shape = tuple(shape)
        if not shape or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1
                            for d in shape):
            raise ValueError(f"{name}: shape must be positive integers (N, ...), got {shape!r}")
    for what, tol in (("rtol", rtol), ("atol", atol)):
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float, np.number))
                                or not math.isfinite(tol) or tol <= 0):
            raise ValueError(f"{name}: {what} must be a finite number > 0 (e.g. 1e-5), got {tol!r}")


def _check_number(name, what, value, minimum, hint=None, allow_min=False, allow_inf=False):
    """Refuse a ``what`` that is not a real number > minimum (>= with allow_min; inf with
    allow_inf), in one line naming the argument, with ``hint`` on what to pass."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.number))
          and not math.isnan(value) and (allow_inf or math.isfinite(value))
          and (value >= minimum if allow_min else value > minimum))
    if not ok:
        bound = f"{'>=' if allow_min else '>'} {minimum:g}"
        raise ValueError(f"{name}: {what} must be a {'' if allow_inf else 'finite '}number {bound}"
                         f"{f' ({hint})' if hint else ''}, got {value!r}")


def _score(score_fn, x, t):
    out = score_fn(x, t)
    out = out.data if isinstance(out, Tensor) else out
    if tuple(getattr(out, "shape", ())) != tuple(x.shape):   # broadcasting would hide the bug
        raise ValueError(f"score_fn returned shape {tuple(getattr(out, 'shape', ()))} for x of "
                         f"shape {tuple(x.shape)}; it must return the score with x's shape")
    return out


def _per_sample(a, ndim):
    return a.reshape((-1,) + (1,) * (ndim - 1))


def _reverse_mean(sde, x, s, t, dt):
    """x - [f(x, t) - g(t)^2 s] dt = x - sde.reverse_drift(x, t, s) dt: one Euler step of the reverse
    SDE from t to t - dt without its noise, with host-float coefficients (t is one float for the
    batch), so it queues no host sync. For the VE SDE (f = 0) it is eq. 2's drift, bit for bit."""
    g = sde.diffusion_coeff(t)
    mean = x + (g * g * dt) * s
    a = sde.drift_coeff(t)               # f(x, t) = a(t) x
    return mean - (a * dt) * x if a else mean


def _progress(iterable=None, total=None, enabled=False, desc=None):
    """A tqdm bar when asked for (and installed), else the iterable unchanged."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("progress=True needs tqdm (pip install tqdm); continuing without a bar")
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def model_score_fn(model, labels=None, guidance=0.0):
    """Adapt a score model (``model(x: Tensor, t: Tensor[, labels]) -> Tensor``) to the
    ``score_fn(x, t) -> array`` convention of the samplers; evaluated under ``no_grad``.

    Args:
        model: an unconditional model, or a class-conditional one (with ``null_label``).
        labels: None (unconditional), an int (every sample), or an int array (N,) of classes.
        guidance: the classifier-free guidance weight w (see ``guided_score_fn``); 0 is plain
            conditional sampling and needs no extra forward pass.
    """
    def cond_score(x, t, y):
        with no_grad():
            out = model(Tensor(x), Tensor(t)) if y is None else model(Tensor(x), Tensor(t), y)
        return out.data if isinstance(out, Tensor) else out

    w = _guidance_weight(guidance)
    if labels is None:
        if w != 0.0:
            raise ValueError(f"guidance={guidance} needs labels: classifier-free guidance pushes "
                             "towards a class; pass labels= (or guidance=0)")
        return lambda x, t: cond_score(x, t, None)
    if w == 0.0:   # plain conditional: the labels go to the model as they are
        return lambda x, t: cond_score(x, t, labels)
    null = getattr(model, "null_label", None)
    if null is None:
        raise ValueError(f"guidance needs a class-conditional model with a 'no label' token, but "
                         f"{type(model).__name__} has no null_label; sample it with guidance=0")
    return guided_score_fn(cond_score, labels, guidance, null)


def _guidance_weight(w):
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise TypeError(f"guidance must be a number, got {type(w).__name__}") from None
    if not math.isfinite(w):
        raise ValueError(f"guidance must be a finite number, got {w}")
    return w


def guided_score_fn(cond_score_fn, labels, guidance, null_label):
    """Classifier-free guidance (Ho & Salimans 2022) of a conditional score:

        s_w(x, t, y) = (1 + w) s(x, t, y) - w s(x, t)

    where s(x, t) = s(x, t, null_label) is the same network asked without a label (it learned
    both through label dropout). w = 0 returns the conditional score itself, bit for bit; w > 0
    pushes samples towards their class. The two terms come from one batched call on 2N inputs
    [x; x] with labels [y; null], not two calls.

    Args:
        cond_score_fn: ``cond_score_fn(x, t, y)`` -> array of x's shape (y: int array (N,)).
        labels: an int or an int array (N,) (host or on x's backend).
        guidance: w, a finite number.
        null_label: the label meaning "no label".
    Returns:
        ``score_fn(x, t)`` for the samplers.
    """
    w = _guidance_weight(guidance)
    if isinstance(labels, Tensor):
        labels = labels.data
    cache = {}

    def batch_labels(x):
        # the labels on x's backend, once: (N,) for w = 0, [y; null] (2N,) otherwise
        key = (backend_of(x).name, x.shape[0])
        if key not in cache:
            be, n = backend_of(x), x.shape[0]
            if isinstance(labels, (int, np.integer)):
                y = be.xp.full((n,), int(labels), dtype=np.int64)
            else:
                y = labels if be.owns(labels) else be.asarray(backend_of(labels).to_host(labels))
                if tuple(y.shape) != (n,):
                    raise ValueError(f"labels must have shape ({n},) for a batch of {n}, got "
                                     f"{tuple(y.shape)}")
                y = y.astype(np.int64, copy=False)
            cache[key] = y if w == 0.0 else be.xp.concatenate(
                [y, be.xp.full((n,), int(null_label), dtype=np.int64)])
        return cache[key]

    def score_fn(x, t):
        y = batch_labels(x)
        if w == 0.0:
            return _raw(cond_score_fn(x, t, y))
        xp, n = backend_of(x).xp, x.shape[0]
        s = _raw(cond_score_fn(xp.concatenate([x, x]), xp.concatenate([t, t]), y))
        return (1.0 + w) * s[:n] - w * s[n:]
    return score_fn


def conditional_score_model(model, labels):
    """``score_model(x, t)`` with the labels bound, for the likelihood functions (which need a
    differentiable Tensor-in, Tensor-out score): ``bits_per_dim(conditional_score_model(m, y),
    ...)`` is the conditional bits/dim log p(x | y)."""
    def score_model(x, t):
        return model(x, t, labels)
    return score_model


def _raw(a):
    return a.data if isinstance(a, Tensor) else a


SAMPLERS = ("em", "pc", "ode", "ancestral", "heun", "heun-sde", "dpm2m", "dpm2m-sde")


def sample(sampler, score_fn, sde, shape, num_steps=500, eps=1e-3, rtol=1e-5, rng=None,
           backend=None, progress=False, callback=None, **options):
    """Run the sampler named ``sampler`` (one of ``SAMPLERS``); returns (x, nfe).

    nfe is the number of score evaluations per sample: num_steps for "em" and "ancestral",
    2 num_steps for "pc" (one corrector step per predictor step), the solver's count for "ode"
    (num_steps is ignored there; rtol = atol = ``rtol``), and 2 num_steps - 1 for "heun" and
    "heun-sde", where num_steps is the number of noise levels of the Karras schedule (18 is
    EDM's choice: 35 evaluations), num_steps for "dpm2m" and "dpm2m-sde" (one per noise level of
    the same schedule). A guided score_fn counts one batched call as one evaluation.
    ``callback(i, t, x)`` is called after each step (see the samplers); other keyword arguments
    go to the sampler itself (e.g. ``snr`` for "pc", ``rho`` or ``S_churn`` for "heun-sde").
    """
    kw = dict(eps=eps, rng=rng, backend=backend, progress=progress, callback=callback, **options)
    if sampler == "em":
        return euler_maruyama(score_fn, sde, shape, num_steps=num_steps, **kw), num_steps
    if sampler == "pc":
        return predictor_corrector(score_fn, sde, shape, num_steps=num_steps, **kw), 2 * num_steps
    if sampler == "ancestral":
        return ancestral_sampler(score_fn, sde, shape, num_steps=num_steps, **kw), num_steps
    if sampler == "ode":
        return ode_sampler(score_fn, sde, shape, rtol=rtol, atol=rtol, **kw)
    if sampler in ("heun", "heun-sde"):
        run = heun_sampler if sampler == "heun" else karras_sde_sampler
        x = run(score_fn, sde, shape, num_steps=num_steps, **kw)
        return x, heun_nfe(num_steps, options.get("denoise", True))
    if sampler in ("dpm2m", "dpm2m-sde"):
        x = dpm_sampler(score_fn, sde, shape, num_steps=num_steps,
                        stochastic=sampler == "dpm2m-sde", **kw)
        return x, dpm_nfe(num_steps, options.get("denoise", True))
    raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}, got {sampler!r}")


# -- SDE samplers -----------------------------------------------------------------------------


def euler_maruyama(score_fn, sde, shape, num_steps=500, eps=1e-3, rng=None, backend=None,
                   progress=False, x_init=None, dtype=np.float32, callback=None):
    """Euler-Maruyama on the reverse SDE, from t = T to t = eps in ``num_steps`` equal steps:

        x <- x - [f(x, t) - g(t)^2 s(x, t)] dt + g(t) sqrt(dt) r       (eq. 2 when f = 0)

    Args:
        score_fn: ``score_fn(x, t)`` -> array of x's shape.
        sde: the SDE (e.g. ``VESDE(25.0)``, ``make_sde("vp")``).
        shape: (N, ...) of the samples.
        num_steps: number of time points in linspace(T, eps, num_steps); each takes one step of
            size dt = (T - eps) / (num_steps - 1) (the reference uses 500).
        eps: the last time point (1e-3 as in the reference).
        rng: a tinydiff Generator; it fixes the backend when ``backend`` is None.
        backend: "numpy", "cupy" or "strict" (default: rng's backend, else numpy).
        progress: show a tqdm bar.
        x_init: start from this array instead of a prior draw N(0, prior_std^2 I).
        dtype: float dtype of the samples.
        callback: ``callback(i, t, x)`` after step i = 0 .. num_steps - 1, with the time it
            reached, t = t_i - dt (eps - dt after the last, below 0 when dt > eps), and the state
            x there on the backend; the last call gets the returned mean.
    Returns:
        The noise-free mean x - [f - g^2 s] dt of the last step, an array of ``shape`` on the
        backend (as the reference tutorial returns).
    """
    _check("euler_maruyama", sde, eps, num_steps, shape)
    be, rng = _setup(shape, rng, backend, x_init)
    xp = be.xp
    x = sde.prior_sample(shape, rng, dtype=dtype) if x_init is None else x_init.astype(dtype)
    time_steps = np.linspace(sde.T, eps, num_steps)          # host floats: no device syncs
    dt = float(time_steps[0] - time_steps[1])
    mean = x
    for i, t in enumerate(_progress(time_steps, enabled=progress, desc="Euler-Maruyama")):
        t = float(t)
        g = sde.diffusion_coeff(t)
        t_batch = xp.full((shape[0],), t, dtype=dtype)
        mean = _reverse_mean(sde, x, _score(score_fn, x, t_batch), t, dt)      # drift
        x = mean + (g * math.sqrt(dt)) * rng.normal(shape, dtype=dtype)       # noise
        _frame(callback, i, num_steps, t - dt, x, mean)
    return mean


def _frame(callback, i, num_steps, t, x, mean):
    """The trajectory hook of the SDE samplers: the state after step i, the noise-free mean
    (what the sampler returns) after the last."""
    if callback is not None:
        callback(i, t, mean if i == num_steps - 1 else x)


def predictor_corrector(score_fn, sde, shape, num_steps=500, snr=0.16, n_corrector=1, eps=1e-3,
                        rng=None, backend=None, progress=False, x_init=None, dtype=np.float32,
                        callback=None):
    """Predictor-corrector sampling: at each time point, ``n_corrector`` Langevin MCMC steps at
    fixed t (the corrector), then one Euler-Maruyama step (the predictor, eq. 2).

    The Langevin step size follows score_sde / Song's tutorial: with the score s and D the number
    of dimensions per sample,

        step = 2 (snr * sqrt(D) / mean_over_batch ||s||)^2,   x <- x + step s + sqrt(2 step) r,

    so the ratio of the score step to the noise is ``snr`` (0.16 in the reference). The step size
    stays on the device (a 0-d array): no host sync. Other arguments (``callback`` too: once
    per predictor step) as ``euler_maruyama``. Returns the noise-free mean of the last predictor
    step.
    """
    _check("predictor_corrector", sde, eps, num_steps, shape)
    if not (isinstance(snr, (int, float, np.number)) and math.isfinite(snr) and snr > 0):
        raise ValueError(f"predictor_corrector: snr must be a finite number > 0, got {snr!r}")
    if isinstance(n_corrector, bool) or not isinstance(n_corrector, (int, np.integer)) \
            or n_corrector < 0:
        raise ValueError(f"predictor_corrector: n_corrector must be an integer >= 0, got "
                         f"{n_corrector!r}")
    be, rng = _setup(shape, rng, backend, x_init)
    xp = be.xp
    x = sde.prior_sample(shape, rng, dtype=dtype) if x_init is None else x_init.astype(dtype)
    n = shape[0]
    noise_norm = math.sqrt(int(np.prod(shape[1:])))
    time_steps = np.linspace(sde.T, eps, num_steps)
    dt = float(time_steps[0] - time_steps[1])
    mean = x
    for i, t in enumerate(_progress(time_steps, enabled=progress, desc="predictor-corrector")):
        t = float(t)
        t_batch = xp.full((n,), t, dtype=dtype)
        for _ in range(n_corrector):                     # corrector: Langevin dynamics at time t
            s = _score(score_fn, x, t_batch)
            grad_norm = xp.sqrt((s * s).reshape(n, -1).sum(axis=1)).mean()
            # A zero score gives Langevin nothing to follow: the step is 0 (x unchanged) instead
            # of inf * 0 = NaN. Decided on the device, so there is still no host sync.
            safe = xp.where(grad_norm > 0, grad_norm, 1)
            step = xp.where(grad_norm > 0, 2 * (snr * noise_norm / safe) ** 2, 0)
            x = x + step * s + xp.sqrt(2 * step) * rng.normal(shape, dtype=dtype)
        g = sde.diffusion_coeff(t)                       # predictor: Euler-Maruyama
        mean = _reverse_mean(sde, x, _score(score_fn, x, t_batch), t, dt)
        x = mean + (g * math.sqrt(dt)) * rng.normal(shape, dtype=dtype)
        _frame(callback, i, num_steps, t - dt, x, mean)
    return mean


def ancestral_betas(sde, num_steps=1000, eps=1e-3):
    """(time points, beta_k) of DDPM's chain on the VP SDE's grid linspace(T, eps, num_steps): the
    step at t_k covers [t_k - dt, t_k] (the last one ends at max(eps - dt, 0)), with

        beta_k = 1 - m(t_k)^2 / m(t_k - dt)^2 = 1 - exp(-(B(t_k) - B(t_k - dt))),

    so that the discrete forward chain x_k = sqrt(1 - beta_k) x_{k-1} + sqrt(beta_k) z has the
    SDE's marginals at the grid points (Song et al. 2021 app. B: beta_k ~ beta(t_k) dt)."""
    if getattr(sde, "name", None) != "vp":
        raise ValueError(f"ancestral sampling is DDPM's sampler for the VP SDE (sde='vp'); got "
                         f"{sde!r}; use euler_maruyama, predictor_corrector or ode_sampler")
    time_steps = np.linspace(sde.T, eps, num_steps)
    dt = float(time_steps[0] - time_steps[1])
    big_b = sde.integrated_beta
    betas = [-math.expm1(-(big_b(float(t)) - big_b(max(float(t) - dt, 0.0)))) for t in time_steps]
    return time_steps, betas


def ancestral_sampler(score_fn, sde, shape, num_steps=1000, eps=1e-3, rng=None, backend=None,
                      progress=False, x_init=None, dtype=np.float32, callback=None):
    """DDPM's ancestral sampling (Ho et al. 2020, Algorithm 2; score_sde's
    AncestralSamplingPredictor) for the VP SDE, with beta_k from ``ancestral_betas``:

        x <- (x + beta_k s(x, t_k)) / sqrt(1 - beta_k) + sqrt(beta_k) r,

    which is DDPM's x_{k-1} = (x_k - beta_k / sqrt(1 - alphabar_k) eps(x_k)) / sqrt(alpha_k)
    + sigma_k z with sigma_k^2 = beta_k, since the score is s = -eps / sqrt(1 - alphabar_k).
    ``num_steps`` defaults to DDPM's 1000; other arguments as ``euler_maruyama`` (the step at
    t_k reaches max(t_k - dt, 0), the time ``callback`` gets). Returns the noise-free mean of the
    last step.
    """
    _check("ancestral_sampler", sde, eps, num_steps, shape)
    time_steps, betas = ancestral_betas(sde, num_steps, eps)
    be, rng = _setup(shape, rng, backend, x_init)
    xp = be.xp
    x = sde.prior_sample(shape, rng, dtype=dtype) if x_init is None else x_init.astype(dtype)
    mean = x
    dt = float(time_steps[0] - time_steps[1])
    steps = list(zip(time_steps, betas))
    for i, (t, beta) in enumerate(_progress(steps, enabled=progress, desc="ancestral")):
        t_batch = xp.full((shape[0],), float(t), dtype=dtype)
        mean = (x + beta * _score(score_fn, x, t_batch)) * (1.0 / math.sqrt(1.0 - beta))
        x = mean + math.sqrt(beta) * rng.normal(shape, dtype=dtype)
        _frame(callback, i, num_steps, max(float(t) - dt, 0.0), x, mean)
    return mean


# -- the probability-flow ODE -------------------------------------------------------------------


def ode_sampler(score_fn, sde, shape, rtol=1e-5, atol=1e-5, method="RK45", eps=1e-3, rng=None,
                backend=None, progress=False, x_init=None, dtype=np.float32, callback=None):
    """Sample by solving the probability-flow ODE dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t) (Song eq. 13;
    ``sde.reverse_drift(..., probability_flow=True)``) from T down to eps
    with ``scipy.integrate.solve_ivp`` (the state lives on the host in float64; each evaluation
    copies x to the backend and the score back, explicitly). ``callback(i, t, x)`` is called
    after the solve, once per step the solver accepted (solve_ivp keeps them all), with x on the
    backend; the last call gets the returned samples.

    Returns:
        (samples, nfe): the solution at t = eps as an array of ``shape`` and ``dtype`` on the
        backend, and the number of score evaluations the solver used.
    """
    from scipy import integrate

    _check("ode_sampler", sde, eps, shape=shape, rtol=rtol, atol=atol)
    be, rng = _setup(shape, rng, backend, x_init)
    x = sde.prior_sample(shape, rng, dtype=dtype) if x_init is None else x_init
    n = shape[0]
    bar = _progress(total=None, enabled=progress, desc="ODE evaluations")

    def drift(t, state):
        xs = be.asarray(state.reshape(shape), dtype=dtype)          # host -> device
        t_batch = be.xp.full((n,), t, dtype=dtype)
        s = be.to_host(_score(score_fn, xs, t_batch))                 # device -> host
        if not np.isfinite(s).all():   # else the solver shrinks its step for ever
            raise FloatingPointError(f"ode_sampler: the score is NaN or inf at t = {float(t):.4g}; "
                                     "check the model (a diverged checkpoint?) or score_fn")
        if bar is not None:
            bar.update(1)
        return sde.reverse_drift(state, float(t), s.reshape(-1).astype(np.float64),
                                 probability_flow=True)

    res = integrate.solve_ivp(drift, (sde.T, eps), be.to_host(x).reshape(-1).astype(np.float64),
                              rtol=rtol, atol=atol, method=method)
    if bar is not None:
        bar.close()
    if not res.success:
        raise RuntimeError(f"ode_sampler: solve_ivp failed ({res.message}) after {res.nfev} "
                           f"evaluations; try method='RK23' or looser rtol/atol")
    if callback is not None:
        for i in range(1, len(res.t)):
            callback(i - 1, float(res.t[i]), be.asarray(res.y[:, i].reshape(shape), dtype=dtype))
    return be.asarray(res.y[:, -1].reshape(shape), dtype=dtype), int(res.nfev)


class Likelihood(NamedTuple):
    """What ``ode_likelihood`` returns; all host NumPy float64 arrays of shape (N,) except z."""
    logp: np.ndarray        # log p_0(x) in nats per sample = prior_logp + delta_logp
    prior_logp: np.ndarray  # log p_T(z) under the prior
    delta_logp: np.ndarray  # int_eps^T div F(x(t), t) dt, F = f - 1/2 g^2 s
    z: np.ndarray           # the ODE's end point x(T), shape of x
    nfe: int                # number of drift-and-divergence evaluations


def _divergence(out, xt, probes, estimator):
    """Per-sample div_x of the score (the trace of its Jacobian) from VJPs w.r.t. the input.

    Skilling-Hutchinson: for probes e with E[e e^T] = I, E[e^T J e] = tr J; e^T J e is
    sum(e * (J^T e)), and J^T e is one reverse pass (tinydiff.grad with grad_output = e).
    Rademacher probes (+-1) are exact when J is diagonal; ``estimator="exact"`` sums the D
    diagonal entries with D basis vectors (for small D)."""
    xp = backend_of(xt.data).xp
    n = xt.shape[0]
    if estimator == "exact":
        d = int(np.prod(xt.shape[1:]))
        div = xp.zeros((n,), dtype=xt.dtype)
        for i in range(d):
            e = xp.zeros((n, d), dtype=xt.dtype)
            e[:, i] = 1
            (vjp,) = grad(out, [xt], e.reshape(xt.shape), retain_graph=i < d - 1)
            div = div + vjp.reshape(n, d)[:, i]
        return div
    div = 0
    for k, e in enumerate(probes):
        (vjp,) = grad(out, [xt], e, retain_graph=k < len(probes) - 1)
        div = div + (vjp * e).reshape(n, -1).sum(axis=1)
    return div / len(probes)


def ode_likelihood(score_model, x, sde, rng=None, eps=1e-5, rtol=1e-5, atol=1e-5, method="RK45",
                   estimator="rademacher", n_probes=1, prior_logp=None, dtype=None, progress=False):
    """log p_0(x) along the probability-flow ODE (FFJORD / Song et al. 2021, app. D).

    With the ODE's drift F(x, t) = f(x, t) - 1/2 g(t)^2 s(x, t) (Song eq. 13), the instantaneous
    change of variables gives d log p_t(x(t)) / dt = -div F, so integrating x and the log-density
    forward from t = eps:

        log p_eps(x) = log p_T(x(T)) + int_eps^T div F(x(t), t) dt.

    With f = a(t) x, div F = a(t) D - 1/2 g^2 div s (D = dimensions per sample); div s is estimated
    with the Skilling-Hutchinson trace estimator: the probes
    are drawn once per sample and kept along the whole path (so the integral is an unbiased
    estimate), and ``n_probes`` of them are averaged.

    Args:
        score_model: ``score_model(x: Tensor, t: Tensor) -> Tensor``, differentiable in x (a model
            in eval mode, or a closed-form score of tinydiff.sde). Must run with autograd on.
        x: data, array or Tensor (N, ...), on the backend the model runs on.
        rng: tinydiff Generator for the probes (on x's backend).
        eps: start time (1e-5 as the reference).
        estimator: "rademacher", "gaussian" or "exact" (D VJPs per evaluation; small D only).
        n_probes: probes averaged per evaluation.
        prior_logp: log-density at T, a function of host arrays (N, ...) -> (N,);
            default ``sde.prior_logp`` (N(0, prior_std^2 I)).
        dtype: dtype the model sees (default x's).
    Returns:
        A ``Likelihood`` (logp in nats per sample, prior_logp, delta_logp, z, nfe).
    """
    from scipy import integrate

    if not is_grad_enabled():
        raise RuntimeError("ode_likelihood needs autograd (a VJP w.r.t. the input); call it outside "
                           "tinydiff.no_grad()")
    if estimator not in ("rademacher", "gaussian", "exact"):
        raise ValueError(f"estimator must be 'rademacher', 'gaussian' or 'exact', got {estimator!r}")
    x = x.data if isinstance(x, Tensor) else x
    _check("ode_likelihood", sde, eps, rtol=rtol, atol=atol)
    be = backend_of(x)
    xp = be.xp
    if not bool(xp.isfinite(x).all()):
        raise ValueError("ode_likelihood: x contains NaN or inf; pass finite images")
    dtype = np.dtype(dtype or x.dtype)
    shape, n = tuple(x.shape), x.shape[0]
    d = int(np.prod(shape[1:]))
    if rng is None:
        rng = be.default_rng()
    if not isinstance(rng, Generator):
        raise TypeError(f"rng must be a tinydiff Generator, got {type(rng).__name__}")
    if rng.backend is not be:
        raise ValueError(f"rng lives on backend {rng.backend.name!r} but x on {be.name!r}; use "
                         f"get_backend({be.name!r}).default_rng(seed)")
    probes = []
    if estimator != "exact":
        for _ in range(n_probes):
            if estimator == "gaussian":
                probes.append(rng.normal(shape, dtype=dtype))
            else:
                probes.append((rng.integers(0, 2, shape) * 2 - 1).astype(dtype))
    bar = _progress(total=None, enabled=progress, desc="likelihood ODE evaluations")

    def drift_and_div(t, state):
        xt = Tensor(be.asarray(state[:-n].reshape(shape), dtype=dtype), requires_grad=True)
        tt = Tensor(xp.full((n,), t, dtype=dtype))
        out = score_model(xt, tt)
        if tuple(out.shape) != shape:
            raise ValueError(f"ode_likelihood: the score model returned shape {tuple(out.shape)} "
                             f"for x of shape {shape}; it must return x's shape")
        s = be.to_host(out.data).reshape(-1).astype(np.float64)
        if not np.isfinite(s).all():
            raise FloatingPointError(f"ode_likelihood: the score is NaN or inf at t = "
                                     f"{float(t):.4g}; check the model")
        div = be.to_host(_divergence(out, xt, probes, estimator)).astype(np.float64)
        if bar is not None:
            bar.update(1)
        half_g2 = 0.5 * sde.diffusion_coeff(float(t)) ** 2
        a = sde.drift_coeff(float(t))                 # div of f = a(t) x is a(t) D
        return np.concatenate([sde.reverse_drift(state[:-n], float(t), s, probability_flow=True),
                               a * d - half_g2 * div])

    init = np.concatenate([be.to_host(x).reshape(-1).astype(np.float64), np.zeros(n)])
    res = integrate.solve_ivp(drift_and_div, (eps, sde.T), init, rtol=rtol, atol=atol, method=method)
    if bar is not None:
        bar.close()
    if not res.success:
        raise RuntimeError(f"ode_likelihood: solve_ivp failed ({res.message}) after {res.nfev} "
                           "evaluations")
    z = res.y[:-n, -1].reshape(shape)
    delta = res.y[-n:, -1]
    prior = np.asarray((prior_logp or sde.prior_logp)(z), dtype=np.float64)
    return Likelihood(prior + delta, prior, delta, z, int(res.nfev))


def log_likelihood(score_model, x, sde, rng=None, **kwargs):
    """log p(x) in nats per sample (host float64 array (N,)); see ``ode_likelihood``."""
    return ode_likelihood(score_model, x, sde, rng, **kwargs).logp


def dequantize(x, rng, bins=256):
    """Uniform dequantisation of pixels stored as k / (bins - 1) in [0, 1] (what tinydiff.data
    gives): y = (k + u) / bins with u ~ U(0, 1), so y is continuous in [0, 1)."""
    x = x.data if isinstance(x, Tensor) else x
    u = rng.uniform(x.shape, dtype=x.dtype)
    return (x * (bins - 1) + u) / bins


def bits_per_dim(score_model, x, sde, rng=None, dequantize_data=True, **kwargs):
    """Bits per dimension of images x in [0, 1] (pixels k / 255), host float64 array (N,).

    The model's density p lives on y in [0, 1]^D. Uniform dequantisation y = (k + u) / 256 turns
    the 256 pixel values into cells of volume 256^-D, and Jensen's inequality gives the bound

        -log2 P(k) / D <= E_u[-log2 p(y)] / D + log2(256) = -log p(y) / (D ln 2) + 8,

    the "+ 8" being the change of variables from [0, 256) to [0, 1] (Song et al.'s convention).
    With ``dequantize_data=False``, x is taken as already dequantised y.
    Keyword arguments go to ``ode_likelihood``.
    """
    raw = x.data if isinstance(x, Tensor) else x
    be = backend_of(raw)
    if not np.issubdtype(raw.dtype, np.floating):
        raise ValueError(f"bits_per_dim: x must be float images in [0, 1], got dtype {raw.dtype} "
                         "(divide uint8 pixels by 255)")
    lo, hi = (float(v) for v in be.to_host(be.xp.stack([raw.min(), raw.max()])))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("bits_per_dim: x contains NaN or inf; pass finite images in [0, 1]")
    if lo < -1e-6 or hi > 1 + 1e-6:   # the +8 bits assume [0, 1]; 0..255 gives ~170 bits/dim
        raise ValueError(f"bits_per_dim: x must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]"
                         + ("; divide 0..255 pixels by 255" if hi > 1.5 else ""))
    rng = be.default_rng() if rng is None else rng
    y = dequantize(raw, rng) if dequantize_data else raw
    d = int(np.prod(raw.shape[1:]))
    logp = log_likelihood(score_model, y, sde, rng, **kwargs)
    return -logp / (d * math.log(2)) + 8.0


# the few-step samplers live in their own module and use the plumbing above
from .karras import (dpm_nfe, dpm_sampler, heun_encode, heun_nfe, heun_sampler,  # noqa: E402,F401
                     karras_sde_sampler, karras_sigmas)
