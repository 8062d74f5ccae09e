"""Few-step samplers after Karras et al. 2022, "Elucidating the design space of diffusion-based
generative models" (EDM), for every SDE of ``tinydiff.sde``. The derivation is in
docs/sampling.md; in short:

Every SDE here has the kernel x(t) = m(t) x0 + std(t) z = m(t) (x0 + sigma(t) z) with
sigma(t) = std(t) / m(t) (``sde.scaled_std``, EDM's sigma). In the scaled variable
x_hat = x / m(t), the data is convolved with N(0, sigma^2 I), whatever the SDE, and the
probability-flow ODE (Song eq. 13) becomes

    d x_hat / d sigma = -sigma grad_{x_hat} log p(x_hat; sigma) = -sigma m(t) s(m(t) x_hat, t),

exactly, because g(t)^2 = m(t)^2 d sigma(t)^2 / dt holds for every linear SDE. The samplers step
that ODE in sigma on EDM's power-law grid (``karras_sigmas``) with Heun's method and ask the
score at t = ``sde.time_of_scaled_std(sigma)``, so a model trained on t works unchanged.

- ``heun_sampler``: EDM Algorithm 1, deterministic; 2 num_steps - 1 score evaluations, the last
  step an Euler step to sigma = 0 (which is the denoiser D(x; sigma_min));
- ``karras_sde_sampler``: EDM Algorithm 2, Heun with "churn" (noise added, then removed by the
  ODE step); the same count;
- ``heun_encode``: the deterministic ODE run the other way, from t = eps to T (data to noise).

Like the SDE samplers, the loops keep every coefficient as a host float, draw noise from the
tinydiff Generator, and never copy to the host.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import backend_of
from .sampling import _check, _check_number, _progress, _score, _setup

STEPS_HINT = ("the noise levels of the Karras schedule, each starting one step; "
              "2 num_steps - 1 score evaluations, e.g. 18")


def karras_sigmas(sde, num_steps, rho=7.0, eps=1e-3, sigma_min=None, sigma_max=None):
    """EDM's noise levels (Karras et al. 2022, sec. 3), host float64, num_steps + 1 values:

        sigma_i = (smax^(1/rho) + i / (N - 1) (smin^(1/rho) - smax^(1/rho)))^rho,  i < N,

    then sigma_N = 0. By default smax = sigma(T) (``sde.scaled_std(T)``, where the prior lives) and
    smin = sigma(eps); rho = 7 crowds the steps towards smin, rho = 1 is a linear grid. The times
    are ``sde.time_of_scaled_std(sigmas)`` (t = 0 for the final 0).
    """
    _check("karras_sigmas", sde, eps, num_steps, steps_hint=STEPS_HINT)
    _check_number("karras_sigmas", "rho", rho, 0.0, "e.g. 7 as EDM; 1 is a linear grid")
    top = float(sde.scaled_std(float(sde.T)))
    smax = top if sigma_max is None else sigma_max
    smin = float(sde.scaled_std(float(eps))) if sigma_min is None else sigma_min
    _check_number("karras_sigmas", "sigma_min", smin, 0.0)
    _check_number("karras_sigmas", "sigma_max", smax, 0.0)
    if not smin < smax <= top * (1 + 1e-12):
        raise ValueError(f"karras_sigmas: need 0 < sigma_min < sigma_max <= sigma(T) = {top:.6g} "
                         f"(the SDE's time ends at T), got sigma_min={smin!r}, sigma_max={smax!r}")
    ramp = np.linspace(0.0, 1.0, int(num_steps))
    lo, hi = float(smin) ** (1.0 / rho), float(smax) ** (1.0 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas[0], sigmas[-1] = smax, smin                   # exactly, not up to rounding
    return np.append(sigmas, 0.0)


def heun_nfe(num_steps, denoise=True):
    """Score evaluations per sample of ``heun_sampler`` / ``karras_sde_sampler``: two per step,
    except one for the final Euler step to sigma = 0 (2 num_steps - 1), or 2 (num_steps - 1)
    without it."""
    return int(2 * num_steps - 1 if denoise else 2 * (num_steps - 1))


def _churn(sigmas, num_steps, sde, S_churn, S_tmin, S_tmax):
    """EDM Algorithm 2's raised noise levels sigma_hat_i = sigma_i (1 + gamma_i) for the
    num_steps nonzero sigmas, with gamma_i = min(S_churn / num_steps, sqrt(2) - 1) where
    S_tmin <= sigma_i <= S_tmax, else 0, capped at sigma(T) so that the score is never asked
    about a time beyond T (where no model was trained)."""
    gamma = min(S_churn / num_steps, math.sqrt(2.0) - 1.0)
    top = float(sde.scaled_std(float(sde.T)))
    return np.array([min(s * (1 + gamma), max(top, s)) if S_tmin <= s <= S_tmax else s
                     for s in sigmas[:num_steps]])


class _Flow:
    """d x_hat / d sigma = -sigma m(t) s(m(t) x_hat, t) at t = t(sigma), on one backend."""

    def __init__(self, score_fn, sde, n, xp, dtype):
        self.score_fn, self.sde, self.n, self.xp, self.dtype = score_fn, sde, n, xp, dtype

    def __call__(self, x_hat, sigma, t):
        m = float(self.sde.marginal_mean_coeff(float(t)))
        t_batch = self.xp.full((self.n,), float(t), dtype=self.dtype)
        return (-float(sigma) * m) * _score(self.score_fn, x_hat * m, t_batch)


def _heun_path(flow, x_hat, sigmas, times, *, sde, rng=None, sigma_hats=None, S_noise=1.0,
               callback=None, progress=False, desc="Heun"):
    """Heun's method along sigmas[0] -> sigmas[-1] (either direction); a step that ends at
    sigma = 0 is an Euler step. With ``sigma_hats`` (Algorithm 2) each step first raises the noise
    from sigma_i to sigma_hat_i with fresh noise of variance S_noise^2 (sigma_hat^2 - sigma^2)."""
    steps = len(sigmas) - 1
    for i in _progress(range(steps), total=steps, enabled=progress, desc=desc):
        s_cur, t_cur, s_next, t_next = sigmas[i], times[i], sigmas[i + 1], times[i + 1]
        if sigma_hats is not None and sigma_hats[i] > s_cur:
            s_hat = float(sigma_hats[i])
            x_hat = x_hat + (S_noise * math.sqrt(s_hat ** 2 - s_cur ** 2)) * rng.normal(
                x_hat.shape, dtype=x_hat.dtype)
            s_cur, t_cur = s_hat, min(sde.time_of_scaled_std(s_hat), float(sde.T))
        h = float(s_next - s_cur)
        d = flow(x_hat, s_cur, t_cur)
        x_next = x_hat + h * d                                  # Euler
        if s_next != 0:                                         # Heun's correction
            x_next = x_hat + (0.5 * h) * (d + flow(x_next, s_next, t_next))
        x_hat = x_next
        if callback is not None:
            callback(i, float(t_next), x_hat * float(sde.marginal_mean_coeff(float(t_next))))
    return x_hat


def _start(score_fn, sde, shape, num_steps, rho, eps, rng, backend, x_init, dtype, denoise, name,
           sigma_max=None):
    """The schedule, its times and the starting x_hat. With ``sigma_max`` below sigma(T) the
    samples start at that noise level from x_hat ~ N(0, sigma_max^2 I), EDM's approximation of
    the marginal there (the data's own spread is small beside sigma_max); x_init is then the
    state at t(sigma_max)."""
    _check(name, sde, eps, num_steps, shape, steps_hint=STEPS_HINT)
    be, rng = _setup(shape, rng, backend, x_init)
    sigmas = karras_sigmas(sde, num_steps, rho, eps, sigma_max=sigma_max)
    if not denoise:
        sigmas = sigmas[:-1]
    times = np.asarray(sde.time_of_scaled_std(sigmas), dtype=np.float64)
    if sigma_max is None:
        times[0] = float(sde.T)                      # exactly, not up to rounding
    if not denoise:
        times[-1] = float(eps)
    m0 = float(sde.marginal_mean_coeff(float(times[0])))
    if x_init is not None:
        x_hat = x_init.astype(dtype) * (1.0 / m0)
    elif sigma_max is None:
        x_hat = sde.prior_sample(shape, rng, dtype=dtype) * (1.0 / m0)
    else:
        x_hat = rng.normal(shape, dtype=dtype) * float(sigma_max)
    return be, rng, sigmas, times, x_hat, _Flow(score_fn, sde, shape[0], be.xp, dtype)


def heun_sampler(score_fn, sde, shape, num_steps=18, rho=7.0, eps=1e-3, rng=None, backend=None,
                 progress=False, x_init=None, dtype=np.float32, callback=None, denoise=True,
                 sigma_max=None):
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1): Heun's method on the
    probability-flow ODE in sigma, over ``karras_sigmas(sde, num_steps, rho, eps)``.

    Args:
        score_fn: ``score_fn(x, t)`` -> array of x's shape (a closed-form score, or
            ``sampling.model_score_fn(model, labels, guidance)``: labels and guidance pass
            through it unchanged).
        sde: any SDE of tinydiff.sde.
        shape: (N, ...) of the samples.
        num_steps: noise levels sigma_max = sigma(T) > ... > sigma_min = sigma(eps) of the
            schedule, each the start of one step (an integer >= 2; EDM uses 18 for CIFAR-10).
        rho: the schedule's exponent (7).
        eps: the smallest positive noise level is sigma(eps).
        rng, backend, progress, dtype: as ``sampling.euler_maruyama`` (no noise is drawn unless
            x_init is None).
        x_init: start from this x at t = T (in the SDE's own variable) instead of a prior draw.
        callback: ``callback(i, t, x)`` after each step i (num_steps of them; num_steps - 1
            without denoise) with the time t it reached and the state x = m(t) x_hat there (in
            the SDE's variable, so VP frames stay at unit scale); the last call gets the output.
        denoise: True (EDM): the last step is an Euler step from sigma_min to sigma = 0, i.e. the
            denoiser D(x; sigma_min) = x_hat + sigma_min^2 grad log p, and the output is data at
            t = 0; False: stop at t = eps after num_steps - 1 Heun steps.
        sigma_max: start at this noise level instead of sigma(T), from N(0, sigma_max^2 I) (EDM's
            sigma_max; None: sigma(T) and the SDE's prior).
    Returns:
        The samples, an array of ``shape`` on the backend; score evaluations per sample:
        ``heun_nfe(num_steps, denoise)`` = 2 num_steps - 1 (2 num_steps - 2 without denoise).
    """
    _check_number("heun_sampler", "rho", rho, 0.0, "e.g. 7 as EDM; 1 is a linear grid")
    _, _, sigmas, times, x_hat, flow = _start(score_fn, sde, shape, num_steps, rho, eps, rng,
                                              backend, x_init, dtype, denoise, "heun_sampler",
                                              sigma_max)
    x_hat = _heun_path(flow, x_hat, sigmas, times, sde=sde, callback=callback, progress=progress)
    return x_hat * float(sde.marginal_mean_coeff(float(times[-1])))


def karras_sde_sampler(score_fn, sde, shape, num_steps=18, rho=7.0, eps=1e-3, S_churn=40.0,
                       S_tmin=0.05, S_tmax=50.0, S_noise=1.0, rng=None, backend=None,
                       progress=False, x_init=None, dtype=np.float32, callback=None, denoise=True,
                       sigma_max=None):
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2), "heun-sde": before each Heun
    step of ``heun_sampler``, raise the noise level from sigma_i to
    sigma_hat = sigma_i (1 + gamma_i) by adding N(0, S_noise^2 (sigma_hat^2 - sigma_i^2) I) to
    x_hat, then take the ODE step from sigma_hat to sigma_{i+1}. gamma_i = min(S_churn / N,
    sqrt(2) - 1) while S_tmin <= sigma_i <= S_tmax, else 0; sigma_hat is capped at sigma(T) (so
    the first step, at sigma(T), adds no noise, and no score is asked beyond t = T).

    S_churn = 0 is ``heun_sampler`` bit for bit. The defaults (S_churn 40, S_tmin 0.05,
    S_tmax 50) are EDM's stochastic-sampling settings for ImageNet-64, with S_noise = 1 (EDM's 1.003
    compensates a learned denoiser's over-smoothing; 1 is exact with an exact score); sigma is
    in the units of x / m(t) (data in [0, 1] here). Other arguments and the return as
    ``heun_sampler``; the same number of score evaluations, 2 num_steps - 1.
    """
    name = "karras_sde_sampler"
    _check_number(name, "rho", rho, 0.0, "e.g. 7 as EDM; 1 is a linear grid")
    _check_number(name, "S_churn", S_churn, 0.0, "0 is the deterministic heun", allow_min=True)
    _check_number(name, "S_tmin", S_tmin, 0.0, allow_min=True)
    _check_number(name, "S_tmax", S_tmax, 0.0, allow_min=True, allow_inf=True)
    _check_number(name, "S_noise", S_noise, 0.0, "1 for an exact score; EDM uses 1.003 to 1.007")
    if S_tmin > S_tmax:
        raise ValueError(f"{name}: S_tmin must be <= S_tmax (the churn acts on sigma in "
                         f"[S_tmin, S_tmax]), got S_tmin={S_tmin!r}, S_tmax={S_tmax!r}")
    _, rng, sigmas, times, x_hat, flow = _start(score_fn, sde, shape, num_steps, rho, eps, rng,
                                                backend, x_init, dtype, denoise, name, sigma_max)
    sigma_hats = _churn(sigmas, num_steps, sde, S_churn, S_tmin, S_tmax)
    x_hat = _heun_path(flow, x_hat, sigmas, times, sde=sde, rng=rng, sigma_hats=sigma_hats,
                       S_noise=S_noise, callback=callback, progress=progress, desc="Heun SDE")
    return x_hat * float(sde.marginal_mean_coeff(float(times[-1])))


def dpm_nfe(num_steps, denoise=True):
    """Score evaluations per sample of ``dpm_sampler``: one per noise level, num_steps (one less
    without the final step to sigma = 0)."""
    return int(num_steps if denoise else num_steps - 1)


def dpm_sampler(score_fn, sde, shape, num_steps=50, rho=7.0, eps=1e-3, stochastic=True,
                S_noise=1.0, rng=None, backend=None, progress=False, x_init=None,
                dtype=np.float32, callback=None, denoise=True, sigma_max=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: fast solver for guided sampling of
    diffusion probabilistic models", Algorithm 2), names "dpm2m" (``stochastic=False``, the
    probability-flow ODE) and "dpm2m-sde" (the reverse SDE, its SDE variant), on the Karras grid:
    a second-order multistep method with ONE score evaluation per noise level, so that 50 levels
    cost 50 evaluations where Heun's method gets 25
    (docs/sampling.md#dpm-solver2m-one-evaluation-per-noise-level).

    Both step the denoiser D(x_hat; sigma) = x_hat + sigma^2 grad log p (Tweedie's formula; here
    x_hat + sigma^2 m(t) s(m(t) x_hat, t)) in the scaled variable x_hat = x / m(t). Between
    sigma_i and sigma_{i+1}, with D held fixed, the ODE and the SDE have exact solutions:

        ODE: x_hat' = r x_hat + (1 - r) D,                            r = sigma_{i+1} / sigma_i
        SDE: x_hat' = r^2 x_hat + (1 - r^2) D + sigma_{i+1} sqrt(1 - r^2) z,   z ~ N(0, I)

    (the SDE's is the Gaussian posterior of x_hat(sigma_{i+1}) given x_hat(sigma_i) and x0 = D,
    which is why it needs no step-size limit). "2M" replaces D by a linear extrapolation in
    lambda = -ln sigma through this and the previous level's denoiser,
    D + (D - D_prev) / (2 r_h) with r_h = (lambda_i - lambda_{i-1}) / (lambda_{i+1} - lambda_i)
    (the first step, with no previous D, is first order). The step to sigma = 0 returns D.

    Args: as ``heun_sampler``; ``stochastic``: the SDE variant (fresh noise each step, drawn from
    ``rng``) or the ODE; ``S_noise`` scales that noise (1 exact). ``num_steps`` noise levels
    (>= 2), each one score evaluation: ``dpm_nfe(num_steps, denoise)``.
    """
    name = "dpm_sampler"
    _check_number(name, "rho", rho, 0.0, "e.g. 7 as EDM; 1 is a linear grid")
    _check_number(name, "S_noise", S_noise, 0.0, "1 for an exact score")
    _, rng, sigmas, times, x_hat, flow = _start(score_fn, sde, shape, num_steps, rho, eps, rng,
                                                backend, x_init, dtype, denoise, name, sigma_max)
    steps = len(sigmas) - 1
    d_prev, h_prev = None, None
    for i in _progress(range(steps), total=steps, enabled=progress,
                       desc="DPM++ 2M SDE" if stochastic else "DPM++ 2M"):
        s_cur, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = x_hat - s_cur * flow(x_hat, s_cur, times[i])        # D = x_hat + sigma^2 grad log p
        if s_next == 0.0:
            x_hat = d
        else:
            h = math.log(s_cur / s_next)
            d_used = d if d_prev is None else d + (0.5 * h / h_prev) * (d - d_prev)
            keep = (s_next / s_cur) ** (2 if stochastic else 1)   # r^2 (SDE) or r (ODE)
            x_hat *= keep                                 # x_hat is the sampler's own array
            x_hat += (1.0 - keep) * d_used
            if stochastic:
                x_hat += (S_noise * s_next * math.sqrt(1.0 - keep)) * rng.normal(
                    x_hat.shape, dtype=x_hat.dtype)
            d_prev, h_prev = d, h
        if callback is not None:
            callback(i, float(times[i + 1]),
                     x_hat * float(sde.marginal_mean_coeff(float(times[i + 1]))))
    return x_hat * float(sde.marginal_mean_coeff(float(times[-1])))


def heun_encode(score_fn, sde, x, num_steps=18, rho=7.0, eps=1e-3, dtype=None, callback=None,
                progress=False):
    """The deterministic probability-flow ODE run forwards, data to noise: x at t = eps (e.g. the
    output of ``heun_sampler(..., denoise=False)``) to its latent at t = T, along the same
    schedule reversed (sigma_min -> sigma_max, num_steps - 1 Heun steps, 2 num_steps - 2 score
    evaluations). ``heun_sampler(..., x_init=heun_encode(...), denoise=False)`` with the same
    arguments returns x up to the discretisation error (O(h^2) globally). Returns an array of
    x's shape and backend."""
    _check("heun_encode", sde, eps, num_steps, tuple(x.shape), steps_hint=STEPS_HINT)
    _check_number("heun_encode", "rho", rho, 0.0, "e.g. 7 as EDM; 1 is a linear grid")
    xp = backend_of(x).xp
    dtype = np.dtype(dtype or x.dtype)
    sigmas = karras_sigmas(sde, num_steps, rho, eps)[-2::-1]          # sigma_min ... sigma_max
    times = np.asarray(sde.time_of_scaled_std(sigmas), dtype=np.float64)
    times[0], times[-1] = float(eps), float(sde.T)
    x_hat = x.astype(dtype) * (1.0 / float(sde.marginal_mean_coeff(float(eps))))
    flow = _Flow(score_fn, sde, x.shape[0], xp, dtype)
    x_hat = _heun_path(flow, x_hat, sigmas, times, sde=sde, callback=callback, progress=progress,
                       desc="Heun encode")
    return x_hat * float(sde.marginal_mean_coeff(float(sde.T)))
