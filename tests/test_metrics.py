"""tinydiff.metrics: the Fréchet distance against closed forms, its properties, the classifier-based
metrics on real or synthetic images, and clear errors for bad input."""
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinydiff import metrics
from tinydiff.metrics import MetricError


def _direct_frechet(mu_a, cov_a, mu_b, cov_b):
    """Independent NumPy computation: tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)),
    the square root of a symmetric PSD matrix, via eigendecompositions (no sqrtm)."""
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    diff = mu_a - mu_b
    return diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()


def _random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d) + (1e-3 * np.eye(d) if rank is None else 0)


# -- closed forms ---------------------------------------------------------------------------------

@given(st.integers(1, 16), st.integers(0, 2**31 - 1))
def test_matches_closed_form_for_diagonal_gaussians(d, seed):
    # N(mu_a, diag v_a) vs N(mu_b, diag v_b): d^2 = ||mu_a - mu_b||^2 + sum (sqrt v_a - sqrt v_b)^2
    rng = np.random.default_rng(seed)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    v_a, v_b = rng.uniform(0.01, 4, d), rng.uniform(0.01, 4, d)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(v_a) - np.sqrt(v_b)) ** 2)
    got = metrics.frechet_distance_from_statistics(mu_a, np.diag(v_a), mu_b, np.diag(v_b))
    assert got == pytest.approx(expected, rel=1e-8, abs=1e-10)


@given(st.integers(2, 24), st.integers(0, 2**31 - 1))
def test_matches_direct_numpy_computation_for_full_covariances(d, seed):
    rng = np.random.default_rng(seed)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    cov_a, cov_b = _random_cov(rng, d), _random_cov(rng, d)
    got = metrics.frechet_distance_from_statistics(mu_a, cov_a, mu_b, cov_b)
    assert got == pytest.approx(_direct_frechet(mu_a, cov_a, mu_b, cov_b), rel=1e-6, abs=1e-8)


def test_sample_estimate_converges_to_the_closed_form():
    rng = np.random.default_rng(0)
    d = 4
    mu_a, mu_b = np.zeros(d), np.array([1.0, 0, -0.5, 0])
    v_a, v_b = np.array([1.0, 2, 0.5, 1]), np.array([0.25, 2, 2, 1])
    xa = mu_a + np.sqrt(v_a) * rng.standard_normal((200_000, d))
    xb = mu_b + np.sqrt(v_b) * rng.standard_normal((200_000, d))
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(v_a) - np.sqrt(v_b)) ** 2)
    assert metrics.frechet_distance(xa, xb) == pytest.approx(expected, abs=0.02)


def test_sample_statistics_are_mean_and_unbiased_covariance():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(50, 3))
    mu, cov = metrics.feature_statistics(f)
    np.testing.assert_allclose(mu, f.sum(0) / 50)
    np.testing.assert_allclose(cov, (f - mu).T @ (f - mu) / 49)


# -- properties -----------------------------------------------------------------------------------

@settings(max_examples=25)
@given(st.integers(3, 40), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_zero_for_itself_and_symmetric(n, d, seed):
    rng = np.random.default_rng(seed)
    fa = rng.normal(size=(n, d)) * rng.uniform(0.1, 3, d)
    fb = rng.normal(size=(n + 3, d)) + 0.3
    with warnings.catch_warnings():      # n <= d: the singular-covariance warning
        warnings.simplefilter("ignore", RuntimeWarning)
        assert metrics.frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-6 * d)
        ab, ba = metrics.frechet_distance(fa, fb), metrics.frechet_distance(fb, fa)
    assert ab == pytest.approx(ba, rel=1e-6, abs=1e-8)
    assert ab > 0


def test_grows_with_feature_noise():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(2000, 8)) @ rng.normal(size=(8, 8))
    z = rng.normal(size=f.shape)
    d = [metrics.frechet_distance(f, f + s * z) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert d[0] == pytest.approx(0, abs=1e-8)
    assert all(a < b for a, b in zip(d, d[1:])), d


def test_singular_covariances_are_handled_by_the_guard():
    # rank-deficient covariances (fewer samples than dimensions, or a constant feature)
    rng = np.random.default_rng(3)
    cov_a, cov_b = _random_cov(rng, 20, rank=5), _random_cov(rng, 20, rank=5)
    mu = np.zeros(20)
    got = metrics.frechet_distance_from_statistics(mu, cov_a, mu, cov_b)
    assert np.isfinite(got)
    assert got == pytest.approx(_direct_frechet(mu, cov_a, mu, cov_b), rel=1e-3, abs=1e-4)
    f = rng.normal(size=(30, 4))
    f[:, 2] = 1.0   # a dead feature: zero variance
    assert metrics.frechet_distance(f, f) == pytest.approx(0, abs=1e-6)


def test_guard_retries_with_eps_when_sqrtm_fails(monkeypatch):
    # sqrtm failing on a near-singular product (NaNs, as older SciPy returned) -> retry with eps*I
    real_sqrtm, calls = metrics.scipy.linalg.sqrtm, []

    def flaky_sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", flaky_sqrtm)
    v_a, v_b = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    got = metrics.frechet_distance_from_statistics(np.zeros(2), np.diag(v_a), np.ones(2), np.diag(v_b))
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], np.diag((v_a + 1e-6) * (v_b + 1e-6)))
    assert got == pytest.approx(2 + np.sum((np.sqrt(v_a) - np.sqrt(v_b)) ** 2), rel=1e-5)


def test_warns_when_fewer_samples_than_dimensions():
    f = np.random.default_rng(4).normal(size=(10, 16))
    with pytest.warns(RuntimeWarning, match="singular"):
        metrics.frechet_distance(f, f + 1)


# -- bad input ------------------------------------------------------------------------------------

def test_too_few_samples_for_a_covariance():
    f = np.ones((1, 3))
    with pytest.raises(MetricError, match="at least 2 samples"):
        metrics.frechet_distance(f, np.ones((5, 3)))


def test_mismatched_feature_sizes():
    with pytest.raises(MetricError, match="same D"):
        metrics.frechet_distance(np.ones((5, 3)), np.ones((5, 4)))


def test_invalid_covariance_is_an_error():
    bad = np.array([[1.0, 0.0], [0.0, -1.0]])      # not PSD: sqrt has a large imaginary part
    with pytest.raises(MetricError, match="positive semi-definite"):
        metrics.frechet_distance_from_statistics(np.zeros(2), bad, np.zeros(2), np.eye(2))


def test_non_finite_features():
    f = np.ones((5, 2))
    f[0, 0] = np.nan
    with pytest.raises(MetricError, match="NaN"):
        metrics.frechet_distance(f, np.ones((5, 2)))
