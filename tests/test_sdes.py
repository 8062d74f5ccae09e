"""The SDE abstraction for every SDE (VE, VP, sub-VP): marginals, scores, the loss, the factory.

Statistical checks allow 5 standard errors computed from the sample count plus a discretisation
bias that is itself computed (the exact moments of the discrete recursion), as in test_sde.py.
"""
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, stats

import tinydiff as td
from tinydiff.sde import (SDES, VESDE, VPSDE, dsm_loss, gaussian_score, make_sde, point_mass_score,
                          sde_from_config, subVPSDE)

NAMES = ["ve", "vp", "subvp"]
times = st.floats(1e-3, 1.0)
seeds = st.integers(0, 2**32 - 1)


def _sde(name, **kw):
    return make_sde(name, **kw)


def _tensor(backend, a, requires_grad=False):
    return td.Tensor(backend.asarray(np.asarray(a)), requires_grad=requires_grad)


# -- the formulas, against their definitions --------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@given(t=times, beta_min=st.floats(0.0, 1.0), span=st.floats(0.5, 30.0))
def test_marginal_mean_and_variance_solve_the_moment_odes(name, t, beta_min, span):
    # For dx = a(t) x dt + g(t) dW: m(t) = exp(int_0^t a) and std(t)^2 = int_0^t
    # exp(2 int_s^t a) g(s)^2 ds (variation of constants for d var/dt = 2 a var + g^2), by quadrature
    sde = _sde(name) if name == "ve" else _sde(name, beta_min=beta_min, beta_max=beta_min + span)
    int_a = lambda lo, hi: integrate.quad(sde.drift_coeff, lo, hi, epsabs=1e-13)[0]  # noqa: E731
    assert sde.marginal_mean_coeff(t) == pytest.approx(math.exp(int_a(0.0, t)), rel=1e-9)
    var = integrate.quad(lambda s: math.exp(2 * int_a(s, t)) * sde.diffusion_coeff(s) ** 2, 0.0, t,
                         epsabs=1e-14, epsrel=1e-10)[0]
    assert sde.marginal_std(t) ** 2 == pytest.approx(var, rel=1e-7, abs=1e-14)


def test_the_papers_closed_forms():
    # Song et al. 2021 eq. 29 / 30 at the default betas, written out independently
    t, b0, b1 = 0.37, 0.1, 20.0
    big_b = b0 * t + 0.5 * t * t * (b1 - b0)
    vp, sub = VPSDE(), subVPSDE()
    assert vp.marginal_mean_coeff(t) == pytest.approx(math.exp(-0.25 * t * t * (b1 - b0) - 0.5 * t * b0))
    assert vp.marginal_std(t) == pytest.approx(math.sqrt(1 - math.exp(-big_b)))
    assert sub.marginal_std(t) == pytest.approx(1 - math.exp(-big_b))
    assert vp.diffusion_coeff(t) == pytest.approx(math.sqrt(b0 + t * (b1 - b0)))
    assert sub.diffusion_coeff(t) == pytest.approx(math.sqrt((b0 + t * (b1 - b0)) * (1 - math.exp(-2 * big_b))))
    assert vp.drift_coeff(t) == pytest.approx(-0.5 * (b0 + t * (b1 - b0)))
    assert VESDE(25.0).drift_coeff(t) == 0.0 and VESDE(25.0).marginal_mean_coeff(t) == 1.0


@pytest.mark.parametrize("name", NAMES)
def test_marginals_on_arrays_and_differentiable_tensors(backend, name):
    # arrays keep their backend and float32; a Tensor that requires grad gets autograd's d/dt, which
    # must satisfy the moment equations d var/dt = 2 a var + g^2 and dm/dt = a m
    sde = _sde(name)
    th = np.array([1e-5, 0.05, 0.4, 1.0])
    t32 = backend.asarray(th.astype(np.float32))
    for fn in (sde.marginal_std, sde.marginal_mean_coeff, sde.diffusion_coeff, sde.drift_coeff):
        out = fn(t32)
        assert backend.owns(out) and out.dtype == np.float32, fn
        np.testing.assert_allclose(backend.to_host(out), [fn(float(s)) for s in th], rtol=3e-6,
                                   err_msg=fn.__name__)
    tt = _tensor(backend, th[1:], requires_grad=True)
    (dvar,) = td.grad((sde.marginal_std(tt) ** 2).sum(), [tt])
    mt = sde.marginal_mean_coeff(tt)        # VE: constant ones, no graph (dm/dt = 0 = a m)
    dm = td.grad(mt.sum(), [tt])[0] if mt.requires_grad else backend.asarray(np.zeros(3))
    h = th[1:]
    a, g, m = (np.array([f(s) for s in h]) for f in (sde.drift_coeff, sde.diffusion_coeff,
                                                     sde.marginal_mean_coeff))
    var = np.array([sde.marginal_std(s) ** 2 for s in h])
    np.testing.assert_allclose(backend.to_host(dvar), 2 * a * var + g ** 2, rtol=1e-9)
    np.testing.assert_allclose(backend.to_host(dm), a * m, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_forward_simulation_matches_the_closed_form_marginal(backend, name):
    # Simulate the forward SDE with fine Euler-Maruyama steps from x0 and compare the sample mean
    # and variance with m(t) x0 and std(t)^2. The Euler recursion's own moments, M <- (1 + a dt) M
    # and P <- (1 + a dt)^2 P + g^2 dt, give the discretisation bias exactly; the rest is sampling
    # error: standard errors sqrt(P / n) for the mean and P sqrt(2 / (n - 1)) for the variance.
    sde, x0, t_end, n_steps, n = _sde(name), 2.0, 0.6, 400, 20000
    rng = backend.default_rng(0)
    x = backend.asarray(np.full((n,), x0))
    dt = t_end / n_steps
    mean_d, var_d = x0, 0.0
    for k in range(n_steps):
        x = sde.forward_step(x, k * dt, dt, rng.normal((n,), dtype=np.float64))
        a, g = sde.drift_coeff(k * dt), sde.diffusion_coeff(k * dt)
        mean_d, var_d = (1 + a * dt) * mean_d, (1 + a * dt) ** 2 * var_d + g * g * dt
    y = backend.to_host(x)
    mean, var = sde.marginal_mean_coeff(t_end) * x0, sde.marginal_std(t_end) ** 2
    bias_m, bias_v = abs(mean_d - mean), abs(var_d - var)
    assert bias_m < 0.02 * abs(x0) and bias_v < 0.02 * var     # the step count keeps them small
    assert abs(y.mean() - mean) < 5 * math.sqrt(var_d / n) + bias_m, (y.mean(), mean)
    assert abs(y.var(ddof=1) - var) < 5 * var_d * math.sqrt(2 / (n - 1)) + bias_v, (y.var(), var)


@pytest.mark.parametrize("name", NAMES)
def test_prior_samples_and_density(backend, name):
    sde = _sde(name)
    n = 40000
    prior = backend.to_host(sde.prior_sample((n,), backend.default_rng(1))).astype(np.float64)
    assert abs(prior.mean()) < 5 * sde.prior_std / math.sqrt(n)
    assert abs(prior.var() - sde.prior_std ** 2) < 5 * sde.prior_std ** 2 * math.sqrt(2 / n)
    zz = np.random.default_rng(2).normal(0, 2 * sde.prior_std, (4, 3))
    expect = stats.norm.logpdf(zz, scale=sde.prior_std).sum(axis=1)
    np.testing.assert_allclose(backend.to_host(sde.prior_logp(backend.asarray(zz))), expect, rtol=1e-12)
    # the prior is the forward marginal at T of data in [0, 1], up to a small mismatch:
    # variance m(T)^2 v + std(T)^2 against prior_std^2, and a mean m(T) x0 near 0 (VP, sub-VP)
    m_t, std_t = sde.marginal_mean_coeff(sde.T), sde.marginal_std(sde.T)
    assert abs(std_t ** 2 + m_t ** 2 * 0.25 - sde.prior_std ** 2) < 0.01 * sde.prior_std ** 2
    assert m_t == 1.0 if name == "ve" else m_t < 0.01


# -- scores against autograd, and the loss ------------------------------------------------------


def _log_normal(x, mean, var):
    d = x.shape[1]
    diff = x - mean
    return -0.5 * (diff * diff).sum(axis=1) / var - 0.5 * d * math.log(2 * math.pi * var)


@pytest.mark.parametrize("name", NAMES)
@given(t=times, seed=seeds, v=st.floats(0.05, 4.0))
def test_point_mass_and_gaussian_scores_are_gradients_of_the_marginals(backend, name, t, seed, v):
    sde = _sde(name)
    m, std2 = sde.marginal_mean_coeff(t), sde.marginal_std(t) ** 2
    r = np.random.default_rng(seed)
    x_host, x0_host = r.normal(0, 2, (4, 3)), r.normal(0, 2, (3,))
    x0 = backend.asarray(x0_host)
    tt = backend.asarray(np.full(4, t))
    # point mass x0: p(x, t) = N(m x0, std^2 I); Gaussian data N(mu, v): N(m mu, (m^2 v + std^2) I)
    for score, mean, var in ((point_mass_score(x0, sde), m * x0, std2),
                             (gaussian_score(x0_host, v, sde), m * x0, m * m * v + std2)):
        x = _tensor(backend, x_host, requires_grad=True)
        (autograd,) = td.grad(_log_normal(x, mean, var).sum(), [x])
        expect = backend.to_host(autograd)
        np.testing.assert_allclose(backend.to_host(score(x.data, tt)), expect, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(score(x, td.Tensor(tt)).numpy(), expect, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@given(seed=seeds, dtype=st.sampled_from(["float32", "float64"]))
def test_dsm_loss_is_zero_for_the_exact_point_mass_score(backend, name, seed, dtype):
    # x = m x0 + std z and s = -(x - m x0) / std^2 give s std + z = 0 up to rounding: x - m x0
    # carries an absolute error of about ulp(|m x0| + std |z|) (|m| <= 1), divided by std; the
    # smallest std used is std(1e-5) (1e-6 for sub-VP, so float32 is loose there, float64 tight)
    sde = _sde(name)
    r = np.random.default_rng(seed)
    x0_host = r.uniform(0, 1, (1, 1, 4, 4)).astype(dtype)
    x0 = backend.asarray(np.repeat(x0_host, 3, axis=0))
    score = point_mass_score(backend.asarray(x0_host), sde)
    loss = dsm_loss(lambda x, t: score(x, t), x0, sde, backend.default_rng(seed)).item()
    ulp, std_min = np.finfo(dtype).eps, sde.marginal_std(1e-5)
    per_pixel = 4 * ulp * (1 + 6 * std_min) / std_min + 4 * ulp * 6
    assert 0 <= loss <= 16 * per_pixel ** 2
    # and a wrong mean coefficient (the VE score, m = 1) is far from zero for VP / sub-VP: at
    # fixed times and noise its loss is the value written out by hand (random times near 0,
    # where m(t) ~ 1, could make it small by chance)
    if name != "ve":
        ve = VESDE(25.0)
        wrong = point_mass_score(backend.asarray(x0_host), ve)
        t = np.array([0.2, 0.5, 0.8])
        z = r.normal(size=x0.shape)
        got = dsm_loss(lambda x, tt: wrong(x, tt), x0, sde, t=backend.asarray(t.astype(dtype)),
                       z=backend.asarray(z.astype(dtype))).item()
        m, std = (np.asarray(f(t))[:, None, None, None] for f in (sde.marginal_mean_coeff,
                                                                   sde.marginal_std))
        x = m * x0_host.astype(np.float64) + std * z
        residual = -(x - x0_host) / np.asarray(ve.marginal_std(t))[:, None, None, None] ** 2 * std + z
        expected = (residual ** 2).sum(axis=(1, 2, 3)).mean()
        assert got == pytest.approx(expected, rel=1e-4) and expected > 1.0


@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_dsm_loss_uses_the_marginal_mean(backend, name):
    # with fixed t and z the loss's input is exactly m(t) x0 + std(t) z
    sde = _sde(name)
    x0 = backend.asarray(np.random.default_rng(0).uniform(0, 1, (3, 1, 2, 2)))
    t = backend.asarray(np.array([0.1, 0.5, 0.9]))
    z = backend.asarray(np.random.default_rng(1).normal(size=(3, 1, 2, 2)))
    seen = {}

    def model(x, tt):
        seen["x"] = x.data
        return x * 0.0

    dsm_loss(model, x0, sde, t=t, z=z)
    expect = sde.perturb(x0, t, z)
    m = backend.to_host(sde.marginal_mean_coeff(t))[:, None, None, None]
    s = backend.to_host(sde.marginal_std(t))[:, None, None, None]
    np.testing.assert_allclose(backend.to_host(seen["x"]), backend.to_host(expect), rtol=1e-12)
    np.testing.assert_allclose(backend.to_host(expect), m * backend.to_host(x0) + s * backend.to_host(z),
                               rtol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_reverse_drift(backend, name):
    # f(x, t) - g^2 s for the reverse SDE, f - 1/2 g^2 s for the probability-flow ODE
    sde = _sde(name)
    r = np.random.default_rng(0)
    x, s = backend.asarray(r.normal(size=(3, 2))), backend.asarray(r.normal(size=(3, 2)))
    for t in (0.3, backend.asarray(np.array([0.1, 0.3, 0.9]))):
        th = backend.to_host(t) if not isinstance(t, float) else np.full(3, t)
        a = np.array([sde.drift_coeff(float(u)) for u in th])[:, None]
        g2 = np.array([sde.diffusion_coeff(float(u)) ** 2 for u in th])[:, None]
        xh, sh = backend.to_host(x), backend.to_host(s)
        np.testing.assert_allclose(backend.to_host(sde.drift(x, t)), a * xh, rtol=1e-12)
        np.testing.assert_allclose(backend.to_host(sde.reverse_drift(x, t, s)), a * xh - g2 * sh,
                                   rtol=1e-12)
        np.testing.assert_allclose(backend.to_host(sde.reverse_drift(x, t, s, probability_flow=True)),
                                   a * xh - 0.5 * g2 * sh, rtol=1e-12)


# -- the factory and the configuration ------------------------------------------------------------


@pytest.mark.parametrize("name,params", [("ve", {}), ("ve", {"sigma": 50.0}), ("vp", {}),
                                         ("vp", {"beta_min": 0.05, "beta_max": 12.5}),
                                         ("subvp", {"beta_max": 10})])
def test_config_round_trip(name, params):
    sde = make_sde(name, **params)
    assert type(sde) is SDES[name]
    config = sde.config()
    assert config["sde"] == name and all(config[k] == float(v) for k, v in params.items())
    back = sde_from_config(json.loads(json.dumps(config)))
    assert back == sde and type(back) is type(sde) and back.config() == config
    # a run configuration holds other keys too; they are ignored
    assert sde_from_config({**config, "lr": 3e-3, "epochs": 4}) == sde
    assert repr(sde).startswith(type(sde).__name__ + "(")


def test_defaults_and_old_run_configs():
    assert make_sde("ve").config() == {"sde": "ve", "sigma": 25.0}
    assert make_sde("vp").config() == {"sde": "vp", "beta_min": 0.1, "beta_max": 20.0}
    assert make_sde("subvp").config() == {"sde": "subvp", "beta_min": 0.1, "beta_max": 20.0}
    # runs written before the VP SDEs recorded only sigma: they are VE
    assert sde_from_config({"sigma": 30.0, "lr": 1e-4}) == VESDE(30.0)
    assert make_sde("vp") != make_sde("subvp") and make_sde("vp") != make_sde("vp", beta_max=10)


def test_factory_errors():
    with pytest.raises(ValueError, match=r"sde must be one of 've', 'vp', 'subvp', got 'ddpm'"):
        make_sde("ddpm")
    with pytest.raises(ValueError, match=r"sde 'vp' takes beta_min, beta_max, got sigma=25"):
        make_sde("vp", sigma=25)
    with pytest.raises(ValueError, match=r"sde 've' takes sigma, got beta_max=20"):
        make_sde("ve", beta_max=20)
    with pytest.raises(ValueError, match="beta_max must be a number, got 'x'"):
        make_sde("subvp", beta_max="x")
    with pytest.raises(ValueError, match=r"0 <= beta_min <= beta_max.*beta_min=5.0, beta_max=1.0"):
        make_sde("vp", beta_min=5, beta_max=1)
    with pytest.raises(ValueError, match="beta_min=-0.1"):
        VPSDE(beta_min=-0.1)
    with pytest.raises(ValueError, match="beta_max=nan"):
        subVPSDE(beta_max=float("nan"))
    with pytest.raises(ValueError, match="sigma > 1"):
        make_sde("ve", sigma=0.5)
    with pytest.raises(ValueError, match="sde must be one of"):
        sde_from_config({"sde": "vpp"})
    with pytest.raises(TypeError, match="dict"):
        sde_from_config("vp")
    for msg in ("sde must be one of", "takes beta_min"):      # one line each
        try:
            make_sde("ddpm") if msg.startswith("sde") else make_sde("vp", sigma=1)
        except ValueError as e:
            assert "\n" not in str(e)
