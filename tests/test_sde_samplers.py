"""Every sampler and the likelihood on the VP and sub-VP SDEs (test_sampling.py covers VE), driven
by the exact score of Gaussian data N(mu, v I):

    s(x, t) = -(x - m(t) mu) / V(t),   V(t) = m(t)^2 v + std(t)^2,

which is linear in x, so each sampler is a linear Gaussian recursion whose output mean and variance
are computed exactly here (EM, ancestral), nearly exactly (PC) or in closed form (ODE). Each check
allows 5 standard errors for the sample count plus the computed discretisation bias.
"""
import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import gammaln

from tinydiff import train
from tinydiff.sampling import (_reverse_mean, ancestral_betas, ancestral_sampler, euler_maruyama,
                               ode_likelihood, ode_sampler, predictor_corrector)
from tinydiff.sde import VESDE, gaussian_score, make_sde

MU, V = 0.5, 0.3
N, D = 4000, 8                       # 32000 pooled draws: 5 standard errors of a variance = 4 %
NAMES = ["vp", "subvp"]


def _vp_only_on_strict(backend, name):
    """The long sampler runs: sub-VP on the CPU only (its code path on a device is VP's; the
    strict stand-in runs VP), to keep the suite's time down."""
    if name == "subvp" and backend.name == "strict":
        pytest.skip("the strict stand-in runs the VP case of the same code path")


def _var(sde, t):
    return sde.marginal_mean_coeff(t) ** 2 * V + sde.marginal_std(t) ** 2


def _exact_marginal_at_T(sde, rng, shape):
    """x(T) ~ N(m(T) mu, V(T)): the true marginal, so only the discretisation remains."""
    return sde.marginal_mean_coeff(sde.T) * MU + rng.normal(shape, std=math.sqrt(_var(sde, sde.T)))


def _em_moments(sde, num_steps=500, eps=1e-3, snr=None, d=D):
    """Mean M and variance P of one coordinate along Euler-Maruyama (with a Langevin corrector when
    snr is given), started from the exact marginal. With c = m(t) mu and the score -(x - c)/V:
        predictor  mean = (1 - a dt - g^2 dt / V) x + g^2 dt c / V,  then P <- P_mean + g^2 dt;
        corrector  x - c <- (1 - e / V)(x - c) + sqrt(2 e) r, e = 2 (snr sqrt(D) / mean ||s||)^2,
    where the batch mean of ||s|| = ||x - c|| / V is replaced by its expectation
    kappa_D sqrt(P + (M - c)^2) / V (kappa_D = E chi_D), as in test_sampling.py."""
    time_steps = np.linspace(sde.T, eps, num_steps)
    dt = time_steps[0] - time_steps[1]
    kappa = math.sqrt(2) * math.exp(gammaln((d + 1) / 2) - gammaln(d / 2))
    m, p = sde.marginal_mean_coeff(sde.T) * MU, _var(sde, sde.T)
    for t in map(float, time_steps):
        var_t, c = _var(sde, t), sde.marginal_mean_coeff(t) * MU
        if snr is not None:
            e = 2 * (snr * math.sqrt(d) * var_t / (math.sqrt(p + (m - c) ** 2) * kappa)) ** 2
            m, p = c + (1 - e / var_t) * (m - c), (1 - e / var_t) ** 2 * p + 2 * e
        a, g2 = sde.drift_coeff(t), sde.diffusion_coeff(t) ** 2
        alpha = 1 - a * dt - g2 * dt / var_t
        m, p_mean = alpha * m + g2 * dt * c / var_t, alpha ** 2 * p
        p = p_mean + g2 * dt
    return m, p_mean


def _ancestral_moments(sde, num_steps=1000, eps=1e-3):
    """The same for DDPM's step x <- (x + beta s) / sqrt(1 - beta) + sqrt(beta) r."""
    m, p = sde.marginal_mean_coeff(sde.T) * MU, _var(sde, sde.T)
    for t, beta in zip(*ancestral_betas(sde, num_steps, eps)):
        var_t, c = _var(sde, float(t)), sde.marginal_mean_coeff(float(t)) * MU
        alpha = (1 - beta / var_t) / math.sqrt(1 - beta)
        m, p_mean = alpha * m + beta * c / var_t / math.sqrt(1 - beta), alpha ** 2 * p
        p = p_mean + beta
    return m, p_mean


def _check_moments(samples, m_expected, p_expected, bias_bound):
    """Sample mean and variance against the recursion's (m, p) within 5 standard errors, and (m, p)
    against the data's (mu, v) within the bias bound (relative to v)."""
    y = np.asarray(samples, dtype=np.float64).reshape(-1)
    n = y.size
    assert abs(p_expected - V) <= bias_bound * V, (p_expected, V)
    assert abs(m_expected - MU) <= bias_bound * V, (m_expected, MU)
    assert abs(y.mean() - m_expected) < 5 * math.sqrt(p_expected / n), (y.mean(), m_expected)
    se_var = p_expected * math.sqrt(2 / (n - 1))
    assert abs(y.var(ddof=1) - p_expected) < 5 * se_var, (y.var(ddof=1), p_expected, se_var)


@pytest.mark.parametrize("name", NAMES)
def test_euler_maruyama_samples_gaussian_data(backend, name):
    _vp_only_on_strict(backend, name)
    sde = make_sde(name)
    rng = backend.default_rng(0)
    x = euler_maruyama(gaussian_score(MU, V, sde), sde, (N, D), rng=rng,
                       x_init=_exact_marginal_at_T(sde, rng, (N, D)))
    assert backend.owns(x) and x.shape == (N, D) and x.dtype == np.float32
    _check_moments(backend.to_host(x), *_em_moments(sde), bias_bound=0.01)


@pytest.mark.parametrize("name", NAMES)
def test_predictor_corrector_samples_gaussian_data(backend, name):
    _vp_only_on_strict(backend, name)
    sde = make_sde(name)
    rng = backend.default_rng(1)
    x = predictor_corrector(gaussian_score(MU, V, sde), sde, (N, D), snr=0.16, rng=rng,
                            x_init=_exact_marginal_at_T(sde, rng, (N, D)))
    _check_moments(backend.to_host(x), *_em_moments(sde, snr=0.16), bias_bound=0.03)


def test_ancestral_sampler_samples_gaussian_data(backend):
    sde = make_sde("vp")
    rng = backend.default_rng(2)
    x = ancestral_sampler(gaussian_score(MU, V, sde), sde, (N, D), num_steps=500, rng=rng,
                          x_init=_exact_marginal_at_T(sde, rng, (N, D)))
    assert backend.owns(x) and x.shape == (N, D) and x.dtype == np.float32
    _check_moments(backend.to_host(x), *_ancestral_moments(sde, 500), bias_bound=0.01)
    # from the prior N(0, I) instead of the exact marginal, the mean m(T) mu = 0.003 is lost on
    # the way: a difference far below the sampling error here, so the same check passes
    x = ancestral_sampler(gaussian_score(MU, V, sde), sde, (N // 4, D), num_steps=500,
                          rng=backend.default_rng(3))
    _check_moments(backend.to_host(x), *_ancestral_moments(sde, 500), bias_bound=0.01)


def test_ancestral_betas_are_ddpms_chain():
    # the products of (1 - beta_k) over the grid are the SDE's m(t)^2 (alphabar of DDPM), and
    # beta_k = 1 - exp(-beta(t_k - dt/2) dt) (B's increment is exact at the midpoint of a linear beta)
    sde = make_sde("vp")
    ts, betas = ancestral_betas(sde, 1000, 1e-3)
    dt = ts[0] - ts[1]
    alphabar = np.cumprod([1 - b for b in betas[::-1]])[::-1]       # from the last step up to t_k
    end = max(ts[-1] - dt, 0.0)
    m2 = np.array([sde.marginal_mean_coeff(float(t)) ** 2 for t in ts]) / sde.marginal_mean_coeff(end) ** 2
    np.testing.assert_allclose(alphabar, m2, rtol=1e-10)
    np.testing.assert_allclose(betas[:-1], [-math.expm1(-sde.beta(t - dt / 2) * dt) for t in ts[:-1]],
                               rtol=1e-9)
    for other in (VESDE(25.0), make_sde("subvp")):
        with pytest.raises(ValueError, match="VP SDE"):
            ancestral_sampler(gaussian_score(MU, V, other), other, (2, 2))
        with pytest.raises(ValueError, match="VP SDE"):
            train.make_sample_fn(other, "ancestral")
    with pytest.raises(ValueError, match="num_steps"):
        ancestral_sampler(gaussian_score(MU, V, sde), sde, (2, 2), num_steps=1)


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
def test_reverse_step_is_the_reverse_drift(backend, name):
    # the samplers' step equals x - sde.reverse_drift(x, t, s) dt, and for VE eq. 2 of
    # docs/design.md bit for bit
    sde = make_sde(name)
    r = np.random.default_rng(0)
    x = backend.asarray(r.normal(size=(3, 4)).astype(np.float32))
    s = backend.asarray(r.normal(size=(3, 4)).astype(np.float32))
    t, dt = 0.4, 0.002
    got = backend.to_host(_reverse_mean(sde, x, s, t, dt))
    expect = backend.to_host(x) - backend.to_host(sde.reverse_drift(x, t, s)) * dt
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-6)
    if name == "ve":
        g = sde.diffusion_coeff(t)
        np.testing.assert_array_equal(got, backend.to_host(x + (g * g * dt) * s))


@pytest.mark.parametrize("name", NAMES)
def test_ode_sampler_is_the_exact_flow_map_for_gaussian_data(backend, name):
    # the probability-flow ODE of a linear Gaussian case is the affine map between the marginals:
    # x(eps) - m(eps) mu = (x(T) - m(T) mu) sqrt(V(eps) / V(T)), sample by sample
    sde = make_sde(name)
    rng = backend.default_rng(2)
    x_init = _exact_marginal_at_T(sde, rng, (N, D))
    x, nfe = ode_sampler(gaussian_score(MU, V, sde), sde, (N, D), rng=rng, x_init=x_init)
    assert isinstance(nfe, int) and 10 < nfe < 1000
    eps = 1e-3
    ratio = math.sqrt(_var(sde, eps) / _var(sde, sde.T))
    m_eps, m_t = sde.marginal_mean_coeff(eps) * MU, sde.marginal_mean_coeff(sde.T) * MU
    expect = m_eps + (backend.to_host(x_init).astype(np.float64) - m_t) * ratio
    np.testing.assert_allclose(backend.to_host(x), expect, rtol=1e-4, atol=1e-4)
    _check_moments(backend.to_host(x), m_eps, _var(sde, eps), bias_bound=0.005)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("estimator", ["exact", "rademacher"])
def test_likelihood_of_gaussian_data_is_analytic(backend, name, estimator):
    # log p_eps(x) = log N(x; m(eps) mu, V(eps)) when the prior is the exact marginal at T; the ODE
    # drift's divergence now includes a(t) D from f = a(t) x
    sde = make_sde(name)
    eps, tol, n, d = 1e-5, 1e-7, 8, 3
    x = np.random.default_rng(0).normal(MU, math.sqrt(V), (n, d))
    m_t = sde.marginal_mean_coeff(sde.T)
    prior = lambda z: stats.norm.logpdf(z, m_t * MU, math.sqrt(_var(sde, sde.T))).sum(1)  # noqa: E731
    res = ode_likelihood(gaussian_score(MU, V, sde), backend.asarray(x), sde, backend.default_rng(0),
                         eps=eps, estimator=estimator, prior_logp=prior, rtol=tol, atol=tol)
    analytic = stats.norm.logpdf(x, sde.marginal_mean_coeff(eps) * MU, math.sqrt(_var(sde, eps))).sum(1)
    np.testing.assert_allclose(res.logp, analytic, rtol=0, atol=1e-5)
    # with the default prior N(0, I) the error is exactly the prior mismatch at the end point
    default = ode_likelihood(gaussian_score(MU, V, sde), backend.asarray(x), sde, backend.default_rng(0),
                             eps=eps, estimator=estimator, rtol=tol, atol=tol)
    np.testing.assert_allclose(default.logp, analytic + sde.prior_logp(res.z) - prior(res.z),
                               rtol=0, atol=1e-5)
    assert np.abs(default.logp - analytic).max() < 0.05     # the VP prior N(0, I) is close


@pytest.mark.parametrize("sampler", ["em", "pc", "ode", "ancestral"])
def test_make_sample_fn_runs_every_sampler_on_vp(sampler):
    # the per-epoch sample function with a closed-form "model": shapes and determinism per seed
    import tinydiff as td
    sde = make_sde("vp")

    class Model:
        backend = td.get_backend("numpy")

        def __call__(self, x, t):
            return gaussian_score(MU, V, sde)(x, t)

    fn = train.make_sample_fn(sde, sampler, 20, (3, 1, 2, 2))
    a, b = fn(Model(), 5), fn(Model(), 5)
    assert a.shape == (3, 1, 2, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
