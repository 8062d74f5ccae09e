"""Samplers and likelihood, driven by exact scores so that the right answer is known.

Data N(mu, v I) has the exact score -(x - mu) / (v + std(t)^2) at every t, which is linear in x,
so every sampler here is a linear Gaussian recursion whose output mean and variance can be computed
exactly (EM), nearly exactly (PC) or in closed form (ODE). Each statistical check allows
5 standard errors for the sample count plus the computed discretisation bias; the samples are
pooled over dimensions, which are independent and identically distributed after subtracting mu.
"""
import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import gammaln

import tinydiff as td
from tinydiff.sampling import (_divergence, bits_per_dim, dequantize, euler_maruyama, log_likelihood,
                               model_score_fn, ode_likelihood, ode_sampler, predictor_corrector)
from tinydiff.sde import VESDE, gaussian_score
from tinydiff.testing import strict_cupy

SDE = VESDE(25.0)
MU, V = 0.5, 0.3
N, D = 4000, 8                       # 32000 pooled draws: 5 standard errors of a variance = 4 %


def _exact_marginal_at_T(backend, rng, shape):
    """x(T) ~ N(mu, v + std(T)^2): the true marginal, so only the discretisation remains."""
    return MU + rng.normal(shape, std=math.sqrt(V + SDE.prior_std ** 2))


def _reverse_moments(num_steps=500, eps=1e-3, corrector_snr=None, n_corrector=1, d=D):
    """Mean m and variance P of one coordinate of x - mu along the sampler, started from the exact
    marginal (m = 0, P = v + std(T)^2). Predictor (eq. 2 of docs/design.md) with V = v + std(t)^2:
        mean = mu + a (x - mu), a = 1 - g^2 dt / V;   P_mean = a^2 P,   P <- P_mean + g^2 dt.
    The Langevin corrector with step e: x - mu <- (1 - e / V)(x - mu) + sqrt(2 e) r. Its step
    e = 2 (snr sqrt(D) / mean ||s||)^2 uses the batch mean of ||s|| = ||x - mu|| / V, replaced here
    by its expectation sqrt(P) kappa_D / V (kappa_D = E chi_D); with N = 4000 samples that mean
    has a relative spread of about 0.4 %, whose effect on P averages out over the steps (checked
    against the empirical spread over seeds while writing this test)."""
    time_steps = np.linspace(SDE.T, eps, num_steps)
    dt = time_steps[0] - time_steps[1]
    kappa = math.sqrt(2) * math.exp(gammaln((d + 1) / 2) - gammaln(d / 2))
    p = V + SDE.prior_std ** 2
    for t in time_steps:
        var_t = V + SDE.marginal_std(float(t)) ** 2
        for _ in range(n_corrector if corrector_snr is not None else 0):
            e = 2 * (corrector_snr * math.sqrt(d) * var_t / (math.sqrt(p) * kappa)) ** 2
            p = (1 - e / var_t) ** 2 * p + 2 * e
        g2 = SDE.diffusion_coeff(float(t)) ** 2
        p_mean = (1 - g2 * dt / var_t) ** 2 * p
        p = p_mean + g2 * dt
    return p_mean


def _check_moments(samples, p_expected, bias_bound):
    """Sample mean and variance of x - mu against (0, p_expected) within 5 standard errors, and
    p_expected against the data variance v within the known bias bound."""
    y = np.asarray(samples, dtype=np.float64).reshape(-1) - MU
    n = y.size
    assert abs(p_expected - V) <= bias_bound * V                  # discretisation bias is small
    assert abs(y.mean()) < 5 * math.sqrt(p_expected / n), y.mean()
    se_var = p_expected * math.sqrt(2 / (n - 1))                 # Gaussian samples
    assert abs(y.var(ddof=1) - p_expected) < 5 * se_var, (y.var(ddof=1), p_expected, se_var)
    # hence also against N(mu, v) itself, with the bias added to the tolerance
    assert abs(y.var(ddof=1) - V) < 5 * se_var + abs(p_expected - V)


def test_euler_maruyama_samples_gaussian_data(backend):
    rng = backend.default_rng(0)
    x_init = _exact_marginal_at_T(backend, rng, (N, D))
    x = euler_maruyama(gaussian_score(MU, V, SDE), SDE, (N, D), rng=rng, x_init=x_init)
    assert backend.owns(x) and x.shape == (N, D) and x.dtype == np.float32
    # 500 steps: the exact discrete recursion ends at variance v (1 - 0.7 %)
    _check_moments(backend.to_host(x), _reverse_moments(), bias_bound=0.01)


def test_predictor_corrector_samples_gaussian_data(backend):
    rng = backend.default_rng(1)
    x_init = _exact_marginal_at_T(backend, rng, (N, D))
    x = predictor_corrector(gaussian_score(MU, V, SDE), SDE, (N, D), snr=0.16, rng=rng, x_init=x_init)
    assert backend.owns(x) and x.shape == (N, D)
    # unadjusted Langevin with snr 0.16 inflates the variance slightly: +1.5 % after 500 steps
    _check_moments(backend.to_host(x), _reverse_moments(corrector_snr=0.16), bias_bound=0.02)


def test_predictor_corrector_step_size_at_high_snr(backend):
    # a large snr makes the corrector's own (computed) variance inflation large, +9.5 % here, so a
    # wrong Langevin step size (e.g. 3 instead of 2 in its formula: +17.6 %) is many errors off
    rng = backend.default_rng(4)
    x_init = _exact_marginal_at_T(backend, rng, (N, D))
    x = predictor_corrector(gaussian_score(MU, V, SDE), SDE, (N, D), num_steps=100, snr=0.4,
                            n_corrector=2, rng=rng, x_init=x_init)
    _check_moments(backend.to_host(x), _reverse_moments(100, corrector_snr=0.4, n_corrector=2),
                   bias_bound=0.1)


def test_euler_maruyama_returns_the_noise_free_mean(backend):
    # with a zero score and x(T) = 0, two steps (t = 1, then t = eps = 0.9) give
    # mean_2 = x_1 = g(1) sqrt(dt) r: variance g(1)^2 dt = 62.5, without the last step's noise
    # (which would add g(0.9)^2 dt = 32.8)
    n, dt = 20000, 0.1
    x = euler_maruyama(lambda x, t: 0 * x, SDE, (n,), num_steps=2, eps=0.9, rng=backend.default_rng(5),
                       x_init=backend.asarray(np.zeros(n, dtype=np.float32)))
    expect = SDE.diffusion_coeff(1.0) ** 2 * dt
    var = float(backend.to_host(x).astype(np.float64).var())
    assert abs(var - expect) < 5 * expect * math.sqrt(2 / n), (var, expect)


def test_ode_sampler_is_the_exact_flow_map_for_gaussian_data(backend):
    # dx/dt = 1/2 g^2 (x - mu) / (v + std^2) and d std^2/dt = g^2 give
    # x(eps) - mu = (x(T) - mu) sqrt((v + std(eps)^2) / (v + std(T)^2)) for every sample.
    rng = backend.default_rng(2)
    x_init = _exact_marginal_at_T(backend, rng, (N, D))
    x, nfe = ode_sampler(gaussian_score(MU, V, SDE), SDE, (N, D), rng=rng, x_init=x_init)
    assert isinstance(nfe, int) and 10 < nfe < 1000
    assert backend.owns(x) and x.dtype == np.float32
    var_eps = V + SDE.marginal_std(1e-3) ** 2
    ratio = math.sqrt(var_eps / (V + SDE.prior_std ** 2))
    expect = MU + (backend.to_host(x_init).astype(np.float64) - MU) * ratio
    # rtol = atol = 1e-5: the solution is within a few times that (float32 state on the way)
    np.testing.assert_allclose(backend.to_host(x), expect, rtol=1e-4, atol=1e-4)
    # and so the samples are N(mu, v + std(eps)^2): the only bias is std(eps)^2 = 0.001
    _check_moments(backend.to_host(x), var_eps, bias_bound=0.005)


def test_samplers_start_from_the_prior(backend):
    # from the prior N(0, std(T)^2) (not the exact marginal) the ODE maps mu to
    # mu (1 - ratio): the known prior-mismatch bias, exactly reproduced
    rng = backend.default_rng(3)
    x, _ = ode_sampler(gaussian_score(MU, V, SDE), SDE, (N, D), rng=rng)
    ratio = math.sqrt((V + SDE.marginal_std(1e-3) ** 2) / (V + SDE.prior_std ** 2))
    mean_expected = MU * (1 - ratio)
    var_expected = SDE.prior_std ** 2 * ratio ** 2
    y = backend.to_host(x).astype(np.float64)
    assert abs(y.mean() - mean_expected) < 5 * math.sqrt(var_expected / y.size)
    assert abs(y.var() - var_expected) < 5 * var_expected * math.sqrt(2 / y.size)
    # EM from the prior with a seeded generator is reproducible
    a = euler_maruyama(gaussian_score(MU, V, SDE), SDE, (3, 2), num_steps=20, rng=backend.default_rng(7))
    b = euler_maruyama(gaussian_score(MU, V, SDE), SDE, (3, 2), num_steps=20, rng=backend.default_rng(7))
    np.testing.assert_array_equal(backend.to_host(a), backend.to_host(b))


@pytest.mark.parametrize("sampler", [euler_maruyama, predictor_corrector])
def test_sde_samplers_do_not_sync_with_the_host(sampler):
    # on the strict stand-in every device -> host transfer is counted; the loops must make none
    backend = td.get_backend("strict")
    before = strict_cupy.SYNCS["count"]
    x = sampler(gaussian_score(backend.asarray(np.full(4, MU)), V, SDE), SDE, (16, 4), num_steps=50,
                rng=backend.default_rng(0))
    assert strict_cupy.SYNCS["count"] == before
    assert np.isfinite(backend.to_host(x)).all()


def test_model_score_fn_runs_the_model_without_a_graph(backend):
    w = td.Tensor(backend.asarray(np.array(-2.0, dtype=np.float32)), requires_grad=True)
    labels = backend.asarray(np.arange(3))
    seen = {}

    def model(x, t, y=None):
        seen["y"] = y
        assert isinstance(x, td.Tensor) and isinstance(t, td.Tensor) and t.shape == (3,)
        out = x * w
        assert not out.requires_grad                  # no_grad: nothing recorded
        return out

    x = backend.asarray(np.ones((3, 2), dtype=np.float32))
    t = backend.asarray(np.full(3, 0.5, dtype=np.float32))
    s = model_score_fn(model)(x, t)
    assert backend.owns(s) and np.allclose(backend.to_host(s), -2.0) and seen["y"] is None
    model_score_fn(model, labels=labels)(x, t)
    assert seen["y"] is labels


def test_progress_bars_do_not_change_the_samples(backend):
    score = gaussian_score(MU, V, SDE)
    for sampler in (euler_maruyama, predictor_corrector):
        a = sampler(score, SDE, (3, 2), num_steps=4, rng=backend.default_rng(0), progress=True)
        b = sampler(score, SDE, (3, 2), num_steps=4, rng=backend.default_rng(0))
        np.testing.assert_array_equal(backend.to_host(a), backend.to_host(b))
    a, nfe_a = ode_sampler(score, SDE, (3, 2), rng=backend.default_rng(0), progress=True)
    b, nfe_b = ode_sampler(score, SDE, (3, 2), rng=backend.default_rng(0))
    np.testing.assert_array_equal(backend.to_host(a), backend.to_host(b))
    assert nfe_a == nfe_b


def test_sampler_argument_errors(backend):
    score = gaussian_score(MU, V, SDE)
    with pytest.raises(ValueError, match="num_steps"):
        euler_maruyama(score, SDE, (2, 2), num_steps=1, rng=backend.default_rng(0))
    with pytest.raises(TypeError, match="tinydiff Generator"):
        euler_maruyama(score, SDE, (2, 2), rng=np.random.default_rng(0))
    other = "strict" if backend.name != "strict" else "numpy"
    with pytest.raises(ValueError, match="backend"):
        predictor_corrector(score, SDE, (2, 2), rng=backend.default_rng(0), backend=other)
    with pytest.raises(ValueError, match="shape"):
        ode_sampler(score, SDE, (2, 2), x_init=backend.asarray(np.zeros((3, 2))))


# -- likelihood along the probability-flow ODE ---------------------------------------------------

EPS_LIK = 1e-5
TOL = 1e-7          # solver rtol = atol; |delta log p| ~ 10 nats here, so errors stay below 1e-5


def _full_cov_case(d=3, seed=0):
    """Gaussian data N(mu, S) with a full covariance S: the score -(S + std^2 I)^-1 (x - mu) has a
    non-diagonal Jacobian, so the trace estimator has real work to do."""
    r = np.random.default_rng(seed)
    a = r.normal(size=(d, d))
    return r.normal(size=d), a @ a.T / d + 0.2 * np.eye(d)


def _full_cov_score(backend, mu, cov):
    def score(x, t):               # x: Tensor (N, d), t: Tensor (N,) of one time (as in the ODE)
        var_t = SDE.marginal_std(float(backend.to_host(t.data)[0])) ** 2
        prec = np.linalg.inv(cov + var_t * np.eye(len(mu)))
        return -((x - backend.asarray(mu)) @ backend.asarray(prec))
    return score


def _exact_prior(mu, cov):
    return stats.multivariate_normal(mu, cov + SDE.prior_std ** 2 * np.eye(len(mu))).logpdf


@pytest.mark.parametrize("estimator", ["exact", "rademacher"])
def test_likelihood_of_isotropic_gaussian_data_is_analytic(backend, estimator):
    # for a diagonal Jacobian Rademacher probes are exact (e_i^2 = 1), so both are checked tightly
    n, d = 8, 3
    x = np.random.default_rng(0).normal(MU, math.sqrt(V), (n, d))
    prior = lambda z: stats.norm.logpdf(z, MU, math.sqrt(V + SDE.prior_std ** 2)).sum(1)  # noqa: E731
    res = ode_likelihood(gaussian_score(MU, V, SDE), backend.asarray(x), SDE, backend.default_rng(0),
                         eps=EPS_LIK, estimator=estimator, prior_logp=prior, rtol=TOL, atol=TOL)
    analytic = stats.norm.logpdf(x, MU, math.sqrt(V + SDE.marginal_std(EPS_LIK) ** 2)).sum(1)
    np.testing.assert_allclose(res.logp, analytic, rtol=0, atol=1e-5)
    # the ODE end point is the deterministic flow map of the sampler test, run forward
    ratio = math.sqrt((V + SDE.prior_std ** 2) / (V + SDE.marginal_std(EPS_LIK) ** 2))
    np.testing.assert_allclose(res.z, MU + (x - MU) * ratio, rtol=1e-5, atol=1e-5)
    # with the default prior N(0, std(T)^2 I) the error is exactly the prior mismatch at z
    default = log_likelihood(gaussian_score(MU, V, SDE), backend.asarray(x), SDE,
                             backend.default_rng(0), eps=EPS_LIK, estimator=estimator, rtol=TOL, atol=TOL)
    mismatch = SDE.prior_logp(res.z) - prior(res.z)
    np.testing.assert_allclose(default, analytic + mismatch, rtol=0, atol=1e-5)


def test_likelihood_with_a_full_covariance_is_analytic(backend):
    mu, cov = _full_cov_case()
    x = np.random.default_rng(1).multivariate_normal(mu, cov, size=6)
    res = ode_likelihood(_full_cov_score(backend, mu, cov), backend.asarray(x), SDE,
                         backend.default_rng(0), eps=EPS_LIK, estimator="exact",
                         prior_logp=_exact_prior(mu, cov), rtol=TOL, atol=TOL)
    analytic = stats.multivariate_normal(mu, cov + SDE.marginal_std(EPS_LIK) ** 2 * np.eye(3)).logpdf(x)
    np.testing.assert_allclose(res.logp, analytic, rtol=0, atol=1e-5)


@pytest.mark.parametrize("estimator", ["rademacher", "gaussian"])
def test_hutchinson_likelihood_is_unbiased_with_the_predicted_spread(backend, estimator):
    # With probes e fixed along the path, the estimated delta log p is e^T A e with
    # A = int_eps^T 1/2 g^2 (S + std^2 I)^-1 dt = 1/2 [log(S + std^2 I)]_eps^T (matrix log; all
    # terms commute), and the exact delta is tr A. So the error, averaged over K probes, has mean 0
    # and variance (2/K) sum_{i != j} A_ij^2 (Rademacher) or (2/K) sum_ij A_ij^2 (Gaussian).
    mu, cov = _full_cov_case(seed=2)
    n, k = 2000, 2
    x = np.random.default_rng(3).multivariate_normal(mu, cov, size=n)
    res = ode_likelihood(_full_cov_score(backend, mu, cov), backend.asarray(x), SDE,
                         backend.default_rng(4), eps=EPS_LIK, estimator=estimator, n_probes=k,
                         prior_logp=_exact_prior(mu, cov), rtol=TOL, atol=TOL)
    analytic = stats.multivariate_normal(mu, cov + SDE.marginal_std(EPS_LIK) ** 2 * np.eye(3)).logpdf(x)
    err = res.logp - analytic
    w, q = np.linalg.eigh(cov)
    log_ratio = np.log((w + SDE.prior_std ** 2) / (w + SDE.marginal_std(EPS_LIK) ** 2))
    a = 0.5 * (q * log_ratio) @ q.T
    off = a - np.diag(np.diag(a))
    var = 2 / k * ((off ** 2).sum() if estimator == "rademacher" else (a ** 2).sum())
    assert abs(err.mean()) < 5 * math.sqrt(var / n), (err.mean(), math.sqrt(var / n))
    # and the spread is the predicted one: the standard error of a sample variance is
    # sqrt((m4 - var^2) / n), with the fourth central moment m4 estimated from the same errors
    centred = err - err.mean()
    se_var = math.sqrt(((centred ** 4).mean() - err.var() ** 2) / n)
    assert abs(err.var() - var) < 5 * se_var, (err.var(), var, se_var)
    assert 5 * se_var < 0.4 * var            # so a wrong estimator (e.g. the other one) would fail


def test_divergence_of_a_nonlinear_score_matches_finite_differences(backend):
    # s(x) = tanh(x W1) W2: the exact trace from D VJPs equals the central-difference trace of the
    # Jacobian, and the mean of many probe estimates e^T J e converges to it (5 standard errors
    # of the probe sample)
    r = np.random.default_rng(0)
    n, d, k = 3, 4, 1000
    w1, w2 = r.normal(size=(d, 6)), r.normal(size=(6, d))
    x_host = r.normal(size=(n, d))
    score = lambda x: (x @ backend.asarray(w1)).tanh() @ backend.asarray(w2)  # noqa: E731
    xt = td.Tensor(backend.asarray(x_host), requires_grad=True)
    exact = backend.to_host(_divergence(score(xt), xt, [], "exact"))
    h, fd = 1e-6, np.zeros(n)
    f = lambda a: np.tanh(a @ w1) @ w2  # noqa: E731
    for i in range(d):
        e = np.zeros(d)
        e[i] = h
        fd += (f(x_host + e) - f(x_host - e))[:, i] / (2 * h)
    np.testing.assert_allclose(exact, fd, rtol=1e-6, atol=1e-8)
    rng = backend.default_rng(1)
    for kind in ("rademacher", "gaussian"):
        probes = [rng.normal((n, d), dtype=np.float64) if kind == "gaussian" else
                  (rng.integers(0, 2, (n, d)) * 2 - 1).astype(np.float64) for _ in range(k)]
        est = np.stack([backend.to_host(_divergence(score(xt), xt, [p], kind)) for p in probes])
        se = est.std(axis=0, ddof=1) / math.sqrt(k)
        assert (np.abs(est.mean(axis=0) - exact) < 5 * se).all(), (kind, est.mean(axis=0), exact, se)


def test_likelihood_needs_autograd(backend):
    x = backend.asarray(np.zeros((2, 2)))
    with td.no_grad():
        with pytest.raises(RuntimeError, match="autograd"):
            log_likelihood(gaussian_score(MU, V, SDE), x, SDE)
    with pytest.raises(ValueError, match="estimator"):
        log_likelihood(gaussian_score(MU, V, SDE), x, SDE, estimator="hutch")
    with pytest.raises(TypeError, match="Generator"):
        log_likelihood(gaussian_score(MU, V, SDE), x, SDE, np.random.default_rng(0))


def test_dequantize_fills_each_pixel_cell(backend):
    k = np.arange(256, dtype=np.float32).repeat(20)
    y = backend.to_host(dequantize(backend.asarray(k / 255), backend.default_rng(0)))
    assert ((y >= k / 256 - 1e-6) & (y < (k + 1) / 256 + 1e-6)).all()
    frac = y * 256 - k
    assert abs(frac.mean() - 0.5) < 5 * math.sqrt(1 / 12 / frac.size)


def test_bits_per_dim_bounds_the_discrete_likelihood(backend):
    # Pixels k in {0..255}^D quantise Gaussian data in [0, 1]; the exact discrete log-probability
    # is a product of normal-CDF differences over the cells [k/256, (k+1)/256). The dequantised
    # bpd is an upper bound (Jensen), tight for a density that is smooth on the scale of a cell:
    # the gap is about Var_u(log p)/2 <= (1/256)^2 / 12 * |grad log p|^2 / 2 nats, below 1e-3 bits
    # per dimension here. Averaging m dequantisation draws per image gives the standard error.
    mu, v, d, n, m = 0.5, 0.01, 4, 4, 64
    r = np.random.default_rng(5)
    k = np.clip(np.floor(r.normal(mu, math.sqrt(v), (n, d)) * 256), 0, 255)
    x = np.repeat(k / 255, m, axis=0).astype(np.float64)
    var_eps = v + SDE.marginal_std(EPS_LIK) ** 2
    prior = lambda z: stats.norm.logpdf(z, mu, math.sqrt(v + SDE.prior_std ** 2)).sum(1)  # noqa: E731
    bpd = bits_per_dim(gaussian_score(mu, v, SDE), backend.asarray(x), SDE, backend.default_rng(6),
                       eps=EPS_LIK, prior_logp=prior, rtol=TOL, atol=TOL).reshape(n, m)
    sd = math.sqrt(var_eps)
    cell = stats.norm.cdf((k + 1) / 256, mu, sd) - stats.norm.cdf(k / 256, mu, sd)
    discrete = -np.log2(cell).sum(1) / d
    mean, se = bpd.mean(1), bpd.std(1, ddof=1) / math.sqrt(m)
    assert (discrete <= mean + 5 * se).all(), (discrete, mean, se)
    assert (mean - discrete < 5 * se + 1e-3).all(), (discrete, mean, se)
    # without dequantisation the same formula is -log2 p(y) / D + 8 of the given y
    y = backend.to_host(dequantize(backend.asarray(x[:2]), backend.default_rng(7)))
    plain = bits_per_dim(gaussian_score(mu, v, SDE), backend.asarray(y), SDE, backend.default_rng(8),
                         dequantize_data=False, eps=EPS_LIK, prior_logp=prior, rtol=TOL, atol=TOL)
    expect = -stats.norm.logpdf(y, mu, sd).sum(1) / (d * math.log(2)) + 8
    np.testing.assert_allclose(plain, expect, rtol=0, atol=1e-5)
