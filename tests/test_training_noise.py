"""The distribution of training noise levels (sde.TrainingNoise): the log-normal of Karras et al.
follows its stated law, the weighted loss keeps the exact score's zero, bad settings are refused;
and the run pictures that go with long runs (gradient norm beside the loss, real images beneath
the samples)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from tinydiff import experiments as E
from tinydiff import plot
from tinydiff.sde import TrainingNoise, dsm_loss, make_sde, point_mass_score

NAMES = ["ve", "vp", "subvp"]


@pytest.mark.parametrize("name", NAMES)
def test_lognormal_levels_follow_the_clipped_log_normal(backend, name):
    # ln sigma(t) of the drawn times must be N(p_mean, p_std^2) clipped to [ln sigma(eps),
    # ln sigma(T)]: a Kolmogorov-Smirnov test against that law's CDF (a point mass at each clip).
    sde, eps, n = make_sde(name), 1e-5, 20000
    noise = TrainingNoise("lognormal", p_mean=-1.2, p_std=1.2)
    t = noise.times(sde, n, backend.default_rng(0), np.float64, eps)
    t = backend.to_host(t)
    assert t.shape == (n,) and np.all(t >= eps * (1 - 1e-9)) and np.all(t <= sde.T * (1 + 1e-9))
    log_sigma = np.log(sde.scaled_std(t))
    lo, hi = math.log(sde.scaled_std(eps)), math.log(sde.scaled_std(sde.T))
    law = stats.norm(-1.2, 1.2)
    inside = log_sigma[(log_sigma > lo + 1e-9) & (log_sigma < hi - 1e-9)]
    # inside the clip range the law is the normal restricted to it
    cdf = lambda v: (law.cdf(v) - law.cdf(lo)) / (law.cdf(hi) - law.cdf(lo))  # noqa: E731
    assert stats.kstest(inside, cdf).pvalue > 1e-3
    # and the mass clipped to each end matches the normal's tails (5 standard errors)
    for frac, p in ((np.mean(log_sigma <= lo + 1e-9), law.cdf(lo)),
                    (np.mean(log_sigma >= hi - 1e-9), law.sf(hi))):
        assert abs(frac - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1.0 / n


def test_uniform_levels_are_eq5_and_differ_from_lognormal(backend):
    sde = make_sde("ve")
    t = backend.to_host(TrainingNoise().times(sde, 20000, backend.default_rng(1), np.float64, 1e-5))
    assert stats.kstest(t, stats.uniform(1e-5, 1 - 1e-5).cdf).pvalue > 1e-3
    t2 = backend.to_host(TrainingNoise("lognormal").times(sde, 20000, backend.default_rng(1),
                                                           np.float64, 1e-5))
    assert stats.kstest(t2, stats.uniform(1e-5, 1 - 1e-5).cdf).pvalue < 1e-6
    # most uniform VE draws sit far above the data scale; the log-normal's mostly below sigma = 1
    assert np.mean(sde.scaled_std(t) > 0.7) > 0.5 > np.mean(sde.scaled_std(t2) > 1.0)


@pytest.mark.parametrize("name", NAMES)
def test_the_mixture_with_uniform_times_follows_its_law(backend, name):
    # --p-uniform f: each draw is uniform in t with probability f, else the clipped log-normal.
    # The CDF of t is then f (t - eps) / (T - eps) + (1 - f) P(sigma(t') <= sigma(t)): a
    # Kolmogorov-Smirnov test against it (continuous: the clip masses sit at eps and T, where
    # the uniform part has no atom, so the test runs on the draws strictly inside).
    sde, eps, n, f = make_sde(name), 1e-5, 20000, 0.3
    noise = TrainingNoise("lognormal", p_mean=-1.2, p_std=1.2, p_uniform=f)
    t = backend.to_host(noise.times(sde, n, backend.default_rng(3), np.float64, eps))
    assert t.shape == (n,) and np.all(t >= eps * (1 - 1e-9)) and np.all(t <= sde.T * (1 + 1e-9))
    law = stats.norm(-1.2, 1.2)
    lo, hi = math.log(sde.scaled_std(eps)), math.log(sde.scaled_std(sde.T))

    def cdf(v):       # of t, for eps < v < T
        ls = np.log(sde.scaled_std(v))
        return f * (v - eps) / (sde.T - eps) + (1 - f) * law.cdf(np.clip(ls, lo, hi))

    inside = (t > eps * (1 + 1e-6)) & (t < sde.T * (1 - 1e-9))
    c_lo, c_hi = cdf(eps * (1 + 1e-6)), cdf(sde.T * (1 - 1e-9))
    assert stats.kstest(t[inside], lambda v: (cdf(v) - c_lo) / (c_hi - c_lo)).pvalue > 1e-3
    # the fraction of large noise levels: the mixture's, not the log-normal's alone
    big = np.mean(sde.scaled_std(t) > 3.0)
    expected = f * np.mean(sde.scaled_std(np.linspace(eps, sde.T, 100001)) > 3.0) \
        + (1 - f) * law.sf(math.log(3.0))
    assert abs(big - expected) <= 5 * math.sqrt(expected * (1 - expected) / n)


def test_p_uniform_zero_is_the_log_normal_bit_for_bit(backend):
    sde = make_sde("ve")
    a = TrainingNoise("lognormal").times(sde, 500, backend.default_rng(4), np.float32)
    b = TrainingNoise("lognormal", p_uniform=0.0).times(sde, 500, backend.default_rng(4), np.float32)
    assert np.array_equal(backend.to_host(a), backend.to_host(b))


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31), name=st.sampled_from(NAMES),
       weighting=st.sampled_from(["none", "edm"]), dist=st.sampled_from(["uniform", "lognormal"]))
def test_the_weighted_loss_of_the_exact_point_mass_score_is_still_zero(backend, seed, name,
                                                                      weighting, dist):
    sde = make_sde(name)
    x0_host = np.random.default_rng(seed).uniform(0, 1, (1, 1, 4, 4))
    x0 = backend.asarray(np.repeat(x0_host, 5, axis=0))
    score = point_mass_score(backend.asarray(x0_host), sde)
    noise = TrainingNoise(dist, weighting=weighting, sigma_data=0.5,
                          p_uniform=0.5 if dist == "lognormal" else 0.0)
    loss = dsm_loss(lambda x, t: score(x, t), x0, sde, backend.default_rng(seed), noise=noise).item()
    assert 0 <= loss <= 1e-12


def test_edm_weight_is_one_plus_sigma_squared_over_sigma_data_squared(backend):
    # with a score that is off by a constant c per pixel the residual is c std: weighting it must
    # multiply each sample's loss by exactly 1 + sigma^2 / sigma_data^2
    sde = make_sde("vp")
    x0 = backend.asarray(np.zeros((3, 1, 2, 2)))
    t = backend.asarray(np.array([0.05, 0.4, 0.9]))
    z = backend.asarray(np.zeros((3, 1, 2, 2)))
    score = point_mass_score(backend.asarray(np.zeros((1, 1, 2, 2))), sde)
    off = lambda x, tt: score(x, tt) + 0.3  # noqa: E731
    plain = dsm_loss(off, x0, sde, t=t, z=z).item()
    weighted = dsm_loss(off, x0, sde, t=t, z=z, noise=TrainingNoise(weighting="edm",
                                                                     sigma_data=0.25)).item()
    th = np.array([0.05, 0.4, 0.9])
    per = 4 * 0.09 * sde.marginal_std(th) ** 2
    assert plain == pytest.approx(per.mean(), rel=1e-10)
    assert weighted == pytest.approx((per * (1 + sde.scaled_std(th) ** 2 / 0.0625)).mean(), rel=1e-10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(distribution="gamma"), "noise distribution"),
    (dict(weighting="snr"), "loss weighting"),
    (dict(p_std=0.0), "p_std > 0"),
    (dict(p_mean=float("nan")), "finite p_mean"),
    (dict(sigma_data=-1.0), "sigma_data"),
    (dict(distribution="lognormal", p_uniform=1.5), "p_uniform is a fraction"),
    (dict(p_uniform=0.2), "needs the lognormal"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainingNoise(**kwargs)


def test_the_run_config_builds_its_training_noise():
    config = E.resolve_config({"noise": "lognormal", "p_mean": -1.0, "loss_weight": "edm",
                               "p_uniform": 0.25})
    noise = E.build_training_noise(config)
    assert (noise.distribution, noise.p_mean, noise.p_std, noise.weighting, noise.p_uniform) == \
        ("lognormal", -1.0, 1.2, "edm", 0.25)
    # the fast recipe (the default preset's) trains on log-normal levels, unweighted; the
    # tutorial's recipe and the conditional one on eq. 5 of docs/design.md as written
    fast = E.build_training_noise(E.resolve_config({}))
    assert (fast.distribution, fast.p_mean, fast.p_std, fast.weighting) == \
        ("lognormal", -1.2, 1.2, "none")
    for recipe in ("reference", "cond"):
        assert repr(E.build_training_noise(E.resolve_config({"recipe": recipe}))) == "TrainingNoise()"


# -- pictures of long runs ------------------------------------------------------------------------


def test_the_loss_plot_draws_the_gradient_norm_beside_the_loss(tmp_path):
    from matplotlib.image import imread
    steps = np.abs(np.random.default_rng(0).normal(size=300)) + 1
    norms = steps * 3
    norms[150] = np.nan                       # a skipped step is marked, not fatal
    one = imread(plot.plot_losses(str(tmp_path / "a.png"), [2.0, 1.5], steps))
    two = imread(plot.plot_losses(str(tmp_path / "b.png"), [2.0, 1.5], steps, grad_norms=norms))
    assert two.shape[1] > one.shape[1] * 1.3          # a third panel


def test_real_images_sit_beneath_the_samples_row_for_row(tmp_path):
    from matplotlib.image import imread
    gen = np.zeros((20, 1, 4, 4), np.float32)          # black samples
    labels = np.arange(20) % 10
    train = np.stack([np.full((1, 4, 4), c / 10, np.float32) for c in range(10)] * 3)
    train_labels = np.tile(np.arange(10), 3)
    real = E.real_examples(train, train_labels, labels, seed=0)
    # each real image is of the class its sample was asked for: its grey level says which
    assert np.allclose(real[:, 0, 0, 0], labels / 10)
    path = plot.save_image_grid(gen, str(tmp_path / "g.png"), nrow=10, real=real, upscale=1)
    grid = imread(path)[..., 0]
    alone = imread(plot.save_image_grid(gen, str(tmp_path / "h.png"), nrow=10, upscale=1))[..., 0]
    assert grid.shape[0] == 2 * alone.shape[0] + 6 and grid.shape[1] == alone.shape[1]
    assert np.allclose(grid[:alone.shape[0]], alone)             # the samples unchanged on top
    # the bottom half shows the class grey levels of the real images in the grid's order
    bottom = grid[alone.shape[0] + 6:]
    assert bottom[2 + 1, 2 + 1] == pytest.approx(0.0, abs=1 / 255)           # class 0
    assert bottom[2 + 1, 2 + 6 * 9 + 1] == pytest.approx(0.9, abs=1 / 255)   # class 9
    unconditional = E.real_examples(train, None, None, n=7, seed=0)
    assert unconditional.shape == (7, 1, 4, 4)
    with pytest.raises(ValueError, match="channels"):
        plot.save_image_grid(gen, str(tmp_path / "x.png"), real=np.zeros((4, 3, 4, 4)))


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_default():
    from tinydiff.checkpoint import config_differences
    old = {"lr": 3e-3, "epochs": 4}                      # written before "noise" existed
    now = {"lr": 3e-3, "epochs": 4, "noise": "uniform", "per_class": 4}
    assert config_differences(old, now, defaults=E.DEFAULTS) == []
    changed = {**now, "noise": "lognormal"}
    assert config_differences(old, changed, defaults=E.DEFAULTS) == \
        ["noise: checkpoint 'uniform', now 'lognormal'"]
    assert config_differences(old, now) == ["noise: checkpoint None, now 'uniform'"]
