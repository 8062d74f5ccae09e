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


# -- classifier features: images in, numbers out ------------------------------------------------------

from conftest import data_dir  # noqa: E402

import tinydiff as td  # noqa: E402
from tinydiff import data, nn  # noqa: E402
from tinydiff.models import classifier as clf  # noqa: E402


@pytest.fixture(scope="module")
def untrained():
    nn.manual_seed(0)
    return clf.Classifier(channels=(4, 8, 8), feature_dim=8, dataset="mnist")


@pytest.fixture(scope="module")
def shipped():
    return clf.load_classifier("mnist")


@pytest.fixture(scope="module")
def digits():
    """600 real MNIST test digits when the data is here, else 600 synthetic stroke images."""
    if data_dir() is not None:
        x, y = data.load_dataset("mnist", "test", root=data_dir(), limit=600, verbose=False)
        return x, y
    rng = np.random.default_rng(0)
    x = np.zeros((600, 28, 28), np.uint8)
    y = rng.integers(0, 10, 600)
    for i, c in enumerate(y):                       # a bar whose angle depends on the class
        t = np.linspace(-9, 9, 40)
        a = np.pi * c / 10 + rng.normal(0, 0.05)
        r = np.clip(np.round(14 + t * np.sin(a)), 0, 27).astype(int)
        q = np.clip(np.round(14 + t * np.cos(a)), 0, 27).astype(int)
        x[i, r, q] = 255
    return x, y


def test_features_are_the_same_on_every_backend(backend, untrained, digits):
    x = digits[0][:20]
    ref = metrics.classifier_features(x, untrained)
    other = clf.Classifier(channels=(4, 8, 8), feature_dim=8, dataset="mnist")
    other.load_state_dict(untrained.state_dict())
    got = metrics.classifier_features(backend.asarray(x), other.to(backend), batch_size=7)
    assert got.shape == (20, 8) and isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_uint8_and_float_images_give_the_same_features(untrained, digits):
    x = digits[0][:10]
    a = metrics.classifier_features(x, untrained)
    b = metrics.classifier_features((x / 255.0).astype(np.float32)[:, None], untrained)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_frechet_classifier_distance_zero_for_itself_and_symmetric(shipped, digits):
    x = digits[0][:300]
    assert metrics.frechet_classifier_distance(x, x, shipped, 300) == pytest.approx(0, abs=1e-6)
    noisy = metrics.add_noise(x, 0.3)
    ab = metrics.frechet_classifier_distance(x, noisy, shipped, 300)
    ba = metrics.frechet_classifier_distance(noisy, x, shipped, 300)
    assert ab > 0 and ab == pytest.approx(ba, rel=1e-6)


def test_frechet_classifier_distance_grows_with_noise(shipped, digits):
    x = digits[0][:300]
    d = [metrics.frechet_classifier_distance(x, metrics.add_noise(x, s, seed=1), shipped, 300)
         for s in (0.0, 0.1, 0.2, 0.4, 0.8)]
    assert d[0] == pytest.approx(0, abs=1e-6)
    assert all(a < b for a, b in zip(d, d[1:])), d


def test_reference_points_are_ordered(shipped, digits):
    x = digits[0]
    ref = metrics.reference_distances(x[:300], x[300:], shipped, num_samples=300)
    # two halves of one set are far closer than a blurred copy or noise
    assert 5 * ref["train_vs_test"] < min(ref["test_vs_blurred"], ref["test_vs_noise"]), ref
    blurred = [metrics.frechet_classifier_distance(metrics.blur_images(x[300:], s), x[300:], shipped, 300)
               for s in (0.5, 1.0, 1.5)]
    assert blurred[0] < blurred[1] < blurred[2] and blurred[1] == pytest.approx(ref["test_vs_blurred"])


def test_conditional_accuracy_counts_the_asked_class(untrained, digits):
    x = digits[0][:50]
    pred = metrics.classifier_predict(x, untrained)
    assert metrics.conditional_accuracy(x, pred, untrained, 50) == 1.0
    assert metrics.conditional_accuracy(x, (pred + 1) % 10, untrained, 50) == 0.0
    half = pred.copy()
    half[:20] = (half[:20] + 1) % 10
    assert metrics.conditional_accuracy(x, half, untrained, 50) == pytest.approx(30 / 50)


def test_class_coverage_histogram_and_entropy(untrained, digits):
    x = digits[0][:64]
    cov = metrics.class_coverage(x, untrained, 64)
    pred = metrics.classifier_predict(x, untrained)
    np.testing.assert_array_equal(cov.histogram, np.bincount(pred, minlength=10))
    p = np.bincount(pred) / 64
    p = p[p > 0]
    assert cov.entropy_bits == pytest.approx(-(p * np.log2(p)).sum())
    assert cov.classes_covered == len(np.unique(pred)) and cov.max_entropy_bits == pytest.approx(np.log2(10))


def test_shipped_classifier_sees_balanced_classes_in_real_digits(shipped, digits):
    if data_dir() is None:
        pytest.skip("real data sets not found")
    x, y = digits
    cov = metrics.class_coverage(x, shipped, 600)
    assert cov.classes_covered == 10 and cov.normalized_entropy > 0.97
    assert metrics.conditional_accuracy(x, y, shipped, 600) > 0.97


def test_selection_is_seeded_and_sized(digits):
    x, y = digits
    a, b = metrics.select(x, 50, seed=3), metrics.select(x, 50, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, metrics.select(x, 50, seed=4))
    np.testing.assert_array_equal(metrics.select(x, len(x), seed=9), x)


def test_bits_per_dim_wraps_the_likelihood_ode():
    # a closed-form Gaussian score model on 2x2 images; the wrapper must equal a direct call
    from tinydiff import sampling
    from tinydiff.sde import VESDE
    sde, mu, v = VESDE(25.0), 0.5, 0.05

    def score_model(x, t):
        var = v + sde.marginal_std(t.data) ** 2
        return (x - mu) * td.Tensor(-1.0 / var.reshape(-1, 1, 1, 1))

    imgs = np.random.default_rng(0).integers(0, 256, (6, 2, 2)).astype(np.uint8)
    mean, err = metrics.bits_per_dim_on_test_set(score_model, sde, imgs, 4, seed=1, batch_size=4)
    x = metrics.prepare_images(metrics.select(imgs, 4, 1))
    direct = sampling.bits_per_dim(score_model, x, sde, td.get_backend("numpy").default_rng(1))
    assert mean == pytest.approx(direct.mean(), rel=1e-10)
    assert err == pytest.approx(direct.std(ddof=1) / 2, rel=1e-10)


# -- bad image input ---------------------------------------------------------------------------------

def test_wrong_image_size_or_channels_is_a_clear_error(untrained, digits):
    x = digits[0][:10]
    with pytest.raises(MetricError, match=r"expects \(1, 28, 28\)"):
        metrics.classifier_features(np.zeros((10, 32, 32), np.uint8), untrained)
    with pytest.raises(MetricError, match=r"expects \(1, 28, 28\)"):
        metrics.classifier_features(np.zeros((10, 3, 28, 28), np.float32), untrained)
    with pytest.raises(MetricError, match="channels-last"):
        metrics.classifier_features(np.zeros((10, 28, 28, 1), np.float32), untrained)
    with pytest.raises(MetricError, match="differ in shape"):
        metrics.frechet_classifier_distance(x, np.zeros((10, 1, 32, 32), np.float32), untrained, 10)
    with pytest.raises(MetricError, match="expected"):
        metrics.classifier_features(np.zeros((10, 28), np.uint8), untrained)


def test_too_few_images_is_a_clear_error(untrained, digits):
    x = digits[0][:10]
    with pytest.raises(MetricError, match="at least 2 samples"):
        metrics.frechet_classifier_distance(x, x, untrained, 1)
    with pytest.raises(MetricError, match="20 samples asked for, only 10"):
        metrics.frechet_classifier_distance(x, x, untrained, 20)
    with pytest.raises(MetricError, match="10 images but 9"):
        metrics.conditional_accuracy(x, np.zeros(9, int), untrained, 9)


def test_non_finite_samples_are_a_clear_error(untrained):
    x = np.zeros((4, 1, 28, 28), np.float32)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(MetricError, match="NaN"):
        metrics.classifier_features(x, untrained)


# -- benchmarks/quality.py on a tiny checkpoint --------------------------------------------------------

@pytest.mark.skipif(data_dir() is None, reason="real data sets not found")
def test_quality_benchmark_prints_a_row_for_a_tiny_checkpoint(tmp_path, capsys):
    import importlib.util
    import os

    from tinydiff import optim, train
    from tinydiff.models import ScoreNet
    from tinydiff.sde import VESDE

    sde = VESDE(25.0)
    nn.manual_seed(0)
    model = ScoreNet(sde.marginal_std, channels=(4, 8, 8, 8), embed_dim=16)
    images = np.random.default_rng(0).integers(0, 256, (32, 28, 28)).astype(np.uint8)
    config = {"sigma": 25.0, "channels": "4,8,8,8", "embed_dim": 16, "dataset": "mnist"}
    train.Trainer(model, optim.Adam(model.parameters(), lr=1e-3), train.score_matching_loss(sde),
                  images, out_dir=str(tmp_path), epochs=1, batch_size=16, config=config,
                  progress=False).fit()
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "quality.py")
    spec = importlib.util.spec_from_file_location("quality", path)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    common = [str(tmp_path / "checkpoint.npz"), "--samples", "20", "--batch", "10", "--data", data_dir()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)    # 20 samples < 128 feature dimensions
        capsys.readouterr()
        assert quality.main(common + ["--sampler", "pc", "--steps", "3", "--bpd", "2", "--header",
                                      "--no-progress"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert quality.main(common + ["--sampler", "ode", "--rtol", "1e-2", "--no-progress"]) == 0
        ode = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| data set | model | sampler | steps (NFE) | guidance")
    row = [c.strip() for c in out[2].strip("|").split("|")]
    assert row[0] == "mnist" and row[2] == "pc" and row[3] == "3 (6)" and row[4] == "–"
    assert row[5].startswith("20 ") and "bits" in row[7] and "(n=2)" in row[8]
    fd, floor = (float(v.strip("()")) for v in row[6].split())
    assert fd > floor > 0 and float(row[8].split()[0]) > 0
    ode_row = [c.strip() for c in ode[0].strip("|").split("|")]
    assert ode_row[2] == "ode" and ode_row[3].startswith("rtol 0.01 (") and ode_row[8] == "–"
