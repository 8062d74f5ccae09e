"""The SDE of eq. 1, the closed-form scores of eq. 3 and the denoising loss of eq. 5 (numbered as
in docs/design.md).

Statistical tests use a fixed seed and a tolerance of 5 standard errors computed from the sample
count (plus any known, computed discretisation bias), so they fail on a wrong formula and not by
chance (a 5-sigma miss has probability about 6e-7 per check).
"""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

import tinydiff as td
from tinydiff.sde import BrownianSDE, VESDE, dsm_loss, gaussian_score, point_mass_score

# the backend fixture is stateless, so sharing it across Hypothesis examples is safe
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])

sigmas = st.floats(1.5, 50.0)
times = st.floats(1e-3, 1.0)
seeds = st.integers(0, 2**32 - 1)


def _tensor(backend, a, requires_grad=False):
    return td.Tensor(backend.asarray(np.asarray(a)), requires_grad=requires_grad)


# -- marginal_std and diffusion_coeff ----------------------------------------------------------


@given(sigma=sigmas, t=times)
def test_marginal_variance_is_the_integral_of_g_squared(sigma, t):
    # std(t)^2 = int_0^t g(s)^2 ds (docs/design.md, the forward process), checked by quadrature
    sde = VESDE(sigma)
    integral, err = integrate.quad(lambda s: sde.diffusion_coeff(s) ** 2, 0.0, t)
    assert sde.marginal_std(t) ** 2 == pytest.approx(integral, rel=1e-9, abs=1e-12)
    assert sde.marginal_std(t) == pytest.approx(math.sqrt((sigma ** (2 * t) - 1) / (2 * math.log(sigma))),
                                                rel=1e-9)
    assert sde.diffusion_coeff(t) == pytest.approx(sigma ** t, rel=1e-12)
    b = BrownianSDE(sigma)
    assert b.marginal_std(t) ** 2 == pytest.approx(sigma ** 2 * t, rel=1e-12)


def test_floats_arrays_and_tensors_agree(backend):
    sde = VESDE(25.0)
    t_host = np.array([1e-5, 1e-3, 0.3, 1.0], dtype=np.float32)
    t = backend.asarray(t_host)
    std = sde.marginal_std(t)
    assert backend.owns(std) and std.dtype == np.float32          # xp from the input, float32 kept
    expect = [sde.marginal_std(float(s)) for s in t_host.astype(np.float64)]
    np.testing.assert_allclose(backend.to_host(std), expect, rtol=2e-6)   # expm1: accurate near 0
    g = sde.diffusion_coeff(t)
    assert backend.owns(g) and g.dtype == np.float32
    np.testing.assert_allclose(backend.to_host(g), 25.0 ** t_host.astype(np.float64), rtol=1e-6)
    std_t = sde.marginal_std(td.Tensor(t))
    assert isinstance(std_t, td.Tensor)
    np.testing.assert_allclose(std_t.numpy(), expect, rtol=2e-6)
    assert sde.marginal_std(0.0) == 0.0
    assert sde.prior_std == pytest.approx(math.sqrt(624 / (2 * math.log(25))))


def test_marginal_std_is_differentiable_in_t(backend):
    # d std / dt = g(t)^2 / (2 std(t)), since d std^2 / dt = g^2
    sde = VESDE(25.0)
    t = _tensor(backend, np.array([0.05, 0.4, 0.9]), requires_grad=True)
    assert td.gradcheck(sde.marginal_std, [t])
    (dstd,) = td.grad(sde.marginal_std(t).sum(), [t])
    th = np.array([0.05, 0.4, 0.9])
    expect = [sde.diffusion_coeff(s) ** 2 / (2 * sde.marginal_std(s)) for s in th]
    np.testing.assert_allclose(backend.to_host(dstd), expect, rtol=1e-10)


def test_constructor_errors():
    with pytest.raises(ValueError, match="sigma > 1"):
        VESDE(1.0)
    with pytest.raises(ValueError, match="sigma > 0"):
        BrownianSDE(0.0)


# -- eq. 3: closed-form scores against tinydiff's autograd --------------------------------------


def _log_normal(x, mean, var):
    """log N(x; mean, var I) per sample, written with Tensor ops (x a Tensor (N, D))."""
    d = x.shape[1]
    diff = x - mean
    return -0.5 * (diff * diff).sum(axis=1) / var - 0.5 * d * math.log(2 * math.pi * var)


@fixture_ok
@given(sigma=sigmas, t=times, seed=seeds)
def test_eq3_point_mass_score_is_the_gradient_of_the_log_density(backend, sigma, t, seed):
    # eq. 3: p(x, t) = N(x0, sigma^2 t I) for constant noise strength, score -(x - x0)/(sigma^2 t)
    r = np.random.default_rng(seed)
    x_host, x0_host = r.normal(0, 3, (3, 5)), r.normal(0, 3, (5,))
    x = _tensor(backend, x_host, requires_grad=True)
    x0 = backend.asarray(x0_host)
    (autograd,) = td.grad(_log_normal(x, x0, sigma ** 2 * t).sum(), [x])
    eq3 = -(x_host - x0_host) / (sigma ** 2 * t)
    np.testing.assert_allclose(backend.to_host(autograd), eq3, rtol=1e-10, atol=1e-12)
    # the generic point-mass score with constant noise strength is eq. 3, on arrays and Tensors
    score = point_mass_score(x0, BrownianSDE(sigma))
    tt = backend.asarray(np.full(3, t))
    np.testing.assert_allclose(backend.to_host(score(x.data, tt)), eq3, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(score(x, td.Tensor(tt)).numpy(), eq3, rtol=1e-10, atol=1e-12)


@fixture_ok
@given(sigma=sigmas, t=times, seed=seeds, v=st.floats(0.05, 4.0))
def test_ve_point_mass_and_gaussian_scores_are_gradients_of_the_marginals(backend, sigma, t, seed, v):
    sde = VESDE(sigma)
    var_t = sde.marginal_std(t) ** 2
    r = np.random.default_rng(seed)
    x_host, x0_host = r.normal(0, 3, (4, 3)), r.normal(0, 3, (3,))
    x = _tensor(backend, x_host, requires_grad=True)
    x0 = backend.asarray(x0_host)
    tt = backend.asarray(np.full(4, t))
    # point mass: p(x, t) = N(x0, std(t)^2 I)
    (autograd,) = td.grad(_log_normal(x, x0, var_t).sum(), [x])
    score = point_mass_score(x0, sde)(x.data, tt)
    np.testing.assert_allclose(backend.to_host(score), backend.to_host(autograd), rtol=1e-9, atol=1e-12)
    # Gaussian data N(mu, v I): p(x, t) = N(mu, (v + std(t)^2) I)
    x = _tensor(backend, x_host, requires_grad=True)
    (autograd,) = td.grad(_log_normal(x, x0, v + var_t).sum(), [x])
    score = gaussian_score(x0_host, v, sde)            # a host mu is moved to x's backend
    np.testing.assert_allclose(backend.to_host(score(x.data, tt)), backend.to_host(autograd),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(score(x, td.Tensor(tt)).numpy(), backend.to_host(autograd),
                               rtol=1e-9, atol=1e-12)


def test_gaussian_score_tensor_path_is_differentiable_in_x(backend):
    # the likelihood needs d score / dx through autograd: here it is -I / (v + std^2)
    sde = VESDE(25.0)
    x = _tensor(backend, np.random.default_rng(0).normal(size=(2, 3)), requires_grad=True)
    t = td.Tensor(backend.asarray(np.array([0.2, 0.7])))
    assert td.gradcheck(lambda x: gaussian_score(0.5, 0.3, sde)(x, t), [x])


# -- eq. 1: forward noising, step by step --------------------------------------------------------


def test_forward_euler_noising_matches_marginal_std(backend):
    # Simulate eq. 1 with n_steps Euler steps to time t and compare the sample variance with
    # std(t)^2. Euler's variance is exactly the left Riemann sum sum_k g(t_k)^2 dt, whose distance
    # from the integral is a known (computed) discretisation bias; the rest is sampling error:
    # the sample variance of n Gaussian draws has standard error var * sqrt(2 / (n - 1)).
    sde, t_end, n_steps, n = VESDE(25.0), 0.8, 200, 20000
    rng = backend.default_rng(0)
    x0 = backend.asarray(np.full((n,), 0.3))
    x, dt = x0, t_end / n_steps
    for k in range(n_steps):
        x = sde.forward_step(x, k * dt, dt, rng.normal((n,), dtype=np.float64))
    var_hat = float(backend.to_host(x - x0).var(ddof=1))
    riemann = sum(sde.diffusion_coeff(k * dt) ** 2 * dt for k in range(n_steps))
    target = sde.marginal_std(t_end) ** 2
    bias = abs(riemann - target)
    assert bias < 0.02 * target                       # the step count makes the bias small
    tol = 5 * riemann * math.sqrt(2 / (n - 1)) + bias
    assert abs(var_hat - target) < tol, (var_hat, target, tol)
    mean_hat = float(backend.to_host(x - x0).mean())
    assert abs(mean_hat) < 5 * math.sqrt(riemann / n)


def test_perturb_and_prior(backend):
    sde = VESDE(25.0)
    rng = backend.default_rng(1)
    x0 = backend.asarray(np.zeros((3, 2), dtype=np.float32))
    z = rng.normal((3, 2))
    t = backend.asarray(np.array([0.1, 0.5, 1.0], dtype=np.float32))
    xt = sde.perturb(x0, t, z)
    assert xt.dtype == np.float32
    np.testing.assert_allclose(backend.to_host(xt),
                               backend.to_host(z) * backend.to_host(sde.marginal_std(t))[:, None],
                               rtol=1e-6)
    # prior: N(0, std(1)^2 I), sample variance within 5 standard errors, and its log-density
    n = 40000
    prior = backend.to_host(sde.prior_sample((n,), rng)).astype(np.float64)
    assert abs(prior.var() - sde.prior_std ** 2) < 5 * sde.prior_std ** 2 * math.sqrt(2 / n)
    zz = np.random.default_rng(2).normal(0, 10, (4, 3))
    expect = stats.norm.logpdf(zz, scale=sde.prior_std).sum(axis=1)
    np.testing.assert_allclose(backend.to_host(sde.prior_logp(backend.asarray(zz))), expect, rtol=1e-12)
    with pytest.raises(TypeError, match="tinydiff Generator"):
        sde.prior_sample((2,), np.random.default_rng(0))


# -- eq. 5: the denoising score-matching loss ----------------------------------------------------


def _score_model(score_fn):
    """A closed-form score wrapped as a model: a callable on Tensors returning a Tensor."""
    return lambda x, t: score_fn(x, t)


@fixture_ok
@given(seed=seeds, t=st.floats(1e-5, 1.0), sigma=sigmas, dtype=st.sampled_from(["float32", "float64"]))
def test_dsm_loss_is_zero_for_the_exact_point_mass_score(backend, seed, t, sigma, dtype):
    # s(x0 + std z, t) std + z = -(std z) / std^2 * std + z = 0 for every t and noise draw.
    sde = VESDE(sigma)
    r = np.random.default_rng(seed)
    x0_host = r.uniform(0, 1, (1, 1, 4, 4)).astype(dtype)
    x0 = backend.asarray(np.repeat(x0_host, 3, axis=0))
    model = _score_model(point_mass_score(backend.asarray(x0_host), sde))
    rng = backend.default_rng(seed)
    loss_random_t = dsm_loss(model, x0, sde, rng).item()
    loss_fixed_t = dsm_loss(model, x0, sde, rng, t=backend.asarray(np.full(3, t, dtype))).item()
    # Rounding bound: x - x0 carries an absolute error of about ulp(|x0| + std |z|), so each pixel
    # of s std + z is off by about ulp * (|x0| + std |z|) / std; the smallest std used is std(1e-5).
    ulp = np.finfo(dtype).eps
    std_min = sde.marginal_std(1e-5)
    per_pixel = 4 * ulp * (1 + 6 * std_min) / std_min + 4 * ulp * 6
    bound = 16 * per_pixel ** 2
    assert 0 <= loss_random_t <= bound
    assert 0 <= loss_fixed_t <= bound


def _gaussian_loss_moments(v, sigma, d, eps):
    """Mean and variance of the per-sample eq. 5 loss for data N(mu, v I) under the exact score.

    With x0 = mu + w, w ~ N(0, v), x = x0 + std z and s = -(x - mu)/(v + std^2):
        s std + z = (v z - std w) / (v + std^2),
    a centred Gaussian of variance v (v + std^2) / (v + std^2)^2 = v / (v + std^2) =: r(t) per pixel.
    So given t the loss is r(t) chi^2_D: E[L | t] = D r(t), Var[L | t] = 2 D r(t)^2, and over
    t ~ U(eps, 1): E L = D E r, Var L = 2 D E[r^2] + D^2 Var r.
    E r has a closed form: with c = 2 ln sigma, std^2 = (e^{ct} - 1)/c, b = v c - 1,
        int r dt = int v c / (b + e^{ct}) dt = (v / b) [ln(e^{ct} / (b + e^{ct}))]  (b != 0).
    """
    sde = VESDE(sigma)
    r = lambda t: v / (v + sde.marginal_std(t) ** 2)  # noqa: E731
    c, b = 2 * math.log(sigma), v * 2 * math.log(sigma) - 1
    antider = lambda t: (v / b) * (c * t - math.log(b + math.exp(c * t)))  # noqa: E731
    mean_r = (antider(1.0) - antider(eps)) / (1 - eps)
    quad_r = integrate.quad(r, eps, 1.0, epsabs=1e-13, epsrel=1e-12)[0] / (1 - eps)
    assert mean_r == pytest.approx(quad_r, rel=1e-8)         # the closed form, checked once more
    mean_r2 = integrate.quad(lambda t: r(t) ** 2, eps, 1.0, epsabs=1e-13, epsrel=1e-12)[0] / (1 - eps)
    return d * mean_r, 2 * d * mean_r2 + d * d * (mean_r2 - mean_r ** 2)


@pytest.mark.parametrize("v", [0.05, 1.0])
def test_dsm_loss_expectation_for_gaussian_data(backend, v):
    sigma, d, n, eps = 25.0, 4, 40000, 1e-5
    sde = VESDE(sigma)
    rng = backend.default_rng(3)
    mu = backend.asarray(np.linspace(-1, 1, d))
    x0 = mu + rng.normal((n, d), std=math.sqrt(v), dtype=np.float64)
    loss = dsm_loss(_score_model(gaussian_score(mu, v, sde)), x0, sde, rng, eps=eps).item()
    mean, var = _gaussian_loss_moments(v, sigma, d, eps)
    se = math.sqrt(var / n)
    assert abs(loss - mean) < 5 * se, (loss, mean, se)
    # and it is not what a wrong score would give: the point-mass score at mu is far off
    wrong = dsm_loss(_score_model(point_mass_score(mu, sde)), x0, sde, rng, eps=eps).item()
    assert abs(wrong - mean) > 20 * se


def test_dsm_loss_gradient_reaches_the_model(backend):
    # a one-parameter "model" s = w * x: loss(w) is a quadratic; check backward against differences
    sde = VESDE(25.0)
    rng = backend.default_rng(0)
    x0 = backend.asarray(np.random.default_rng(1).uniform(0, 1, (5, 1, 3, 3)))
    t = rng.uniform((5,), low=1e-5, dtype=np.float64)
    z = rng.normal(x0.shape, dtype=np.float64)
    w = _tensor(backend, np.array(-0.3), requires_grad=True)
    assert td.gradcheck(lambda w: dsm_loss(lambda x, tt: x * w, x0, sde, t=t, z=z), [w])


def test_dsm_loss_labels_and_errors(backend):
    sde = VESDE(25.0)
    rng = backend.default_rng(0)
    x0 = rng.uniform((4, 1, 2, 2))
    labels = backend.asarray(np.array([0, 1, 2, 3]))
    seen = {}

    def conditional(x, t, y):
        seen["y"], seen["t"] = y, t
        return x * 0.0

    loss = dsm_loss(conditional, x0, sde, rng, labels=labels)
    assert seen["y"] is labels and isinstance(seen["t"], td.Tensor) and seen["t"].shape == (4,)
    ts = backend.to_host(seen["t"].data)
    assert ts.min() >= 1e-5 and ts.max() <= 1.0
    assert loss.shape == () and loss.item() > 0
    with pytest.raises(ValueError, match="shape"):
        dsm_loss(lambda x, t: x[:, :, :1], x0, sde, rng)
    with pytest.raises(TypeError, match="Tensor"):
        dsm_loss(lambda x, t: x.data, x0, sde, rng)
    other = "strict" if backend.name != "strict" else "numpy"
    with pytest.raises(ValueError, match="backend"):
        dsm_loss(lambda x, t: x, x0, sde, td.get_backend(other).default_rng(0))
    with pytest.raises(TypeError, match="floating point"):
        dsm_loss(lambda x, t: x, backend.asarray(np.zeros((2, 3), dtype=np.uint8)), sde, rng)
