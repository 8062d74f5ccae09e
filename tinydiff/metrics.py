"""Sample quality as numbers: Fréchet distance in a classifier's features, conditional accuracy,
class coverage and bits/dim.

Inception-based FID means little on 28x28 digits, so, as is usual for MNIST-like data, the
features come from a small classifier trained on the data set itself
(``tinydiff.models.classifier``; the trained weights ship with the package, so every user measures
with the same feature extractor).

    Fréchet distance  d^2 = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))

between Gaussians fitted to the two feature sets (means mu, covariances S).

**Comparability.** Every number here depends on the sample count (the Fréchet distance of a
finite sample is biased upwards, more so for fewer samples), on the classifier (its weights and
data set) and on the seed that picks the samples. Compare numbers only when all three are the
same, and print the reference points (``reference_distances``: train vs test is the floor a
perfect model would reach, test vs noise / blurred test are ceilings) measured with the same
count, classifier and seed beside every score.

Images may be given as (N, H, W) or (N, C, H, W), uint8 in [0, 255] or floats in [0, 1], on any
backend (or as Tensors); they are brought to the host, checked against the classifier's expected
shape, clipped to [0, 1] (as saving them as pictures would) and fed in batches under ``no_grad``.
Float images that are non-negative but reach above 1 + ``OVERSHOOT`` are refused, not clipped:
that is the signature of 0..255 pixels never divided by 255. A sampler's raw output (which
overshoots on both sides, a lot for an untrained model) is clipped as a picture would be.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.ndimage

from .backend import backend_of
from .tensor import Tensor, no_grad


class MetricError(ValueError):
    """Inputs a metric cannot be computed from (wrong shapes, too few samples, ...)."""


# how far above 1 non-negative float images may reach and still be clipped (a sampler's overshoot);
# beyond it they look like 0..255 pixels, a scale mistake that clipping would hide
OVERSHOOT = 0.5


# -- Fréchet distance between feature sets ------------------------------------------------------

def feature_statistics(features):
    """Mean and covariance (float64, on the host) of features of shape (N, D)."""
    f = _to_host(features).astype(np.float64)
    if f.ndim != 2:
        raise MetricError(f"features must have shape (N, D), got {f.shape}")
    n, d = f.shape
    if n < 2:
        raise MetricError(f"a covariance needs at least 2 samples, got {n}; use more samples "
                          f"(a few times the feature size {d} is advisable)")
    if not np.isfinite(f).all():
        raise MetricError("features contain NaN or inf; check the images fed to the classifier")
    if n <= d:
        warnings.warn(f"{n} samples for {d}-dimensional features: the covariance is singular and "
                      "the Fréchet distance is strongly biased upwards; use several times more "
                      "samples than feature dimensions", RuntimeWarning, stacklevel=3)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance_from_statistics(mu_a, cov_a, mu_b, cov_b, eps=1e-6):
    """d^2 = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)).

    The product S_a S_b is similar to a symmetric positive semi-definite matrix, so its square root
    is real in exact arithmetic. Numerically, scipy.linalg.sqrtm can fail or return garbage when
    the product is (near-)singular; then eps*I is added to both covariances and it is tried again.
    Small imaginary parts (round-off) are dropped; a large one means the covariances are not
    valid (not symmetric PSD) and is an error.
    """
    mu_a, mu_b = np.atleast_1d(mu_a).astype(np.float64), np.atleast_1d(mu_b).astype(np.float64)
    cov_a, cov_b = np.atleast_2d(cov_a).astype(np.float64), np.atleast_2d(cov_b).astype(np.float64)
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != mu_a.shape * 2:
        raise MetricError(f"statistics do not match: means {mu_a.shape} and {mu_b.shape}, "
                          f"covariances {cov_a.shape} and {cov_b.shape}")
    diff = mu_a - mu_b
    product = cov_a @ cov_b
    with warnings.catch_warnings():   # a singular product is handled just below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(product)
    if not _good_sqrt(covmean, product):
        # the usual guard for near-singular products: regularise and try again
        offset = eps * np.eye(cov_a.shape[0])
        product = (cov_a + offset) @ (cov_b + offset)
        covmean = scipy.linalg.sqrtm(product)
        if not np.isfinite(covmean).all():
            raise MetricError("the matrix square root of the covariance product is not finite even "
                              f"with eps={eps}; use more samples or a larger eps")
    if np.iscomplexobj(covmean):
        scale = max(1.0, float(np.abs(covmean.real).max()))
        imag = float(np.abs(covmean.imag).max())
        if imag > 1e-3 * scale:
            raise MetricError(f"the square root of the covariance product has an imaginary part "
                              f"of {imag:.3g} (real parts up to {scale:.3g}): the covariances are "
                              "not symmetric positive semi-definite")
        covmean = covmean.real
    d2 = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)
    return max(float(d2), 0.0)   # round-off can push a zero distance a hair below 0


def _good_sqrt(root, a, rtol=1e-5):
    """sqrtm's result is finite and squares back to ``a`` (relative Frobenius error)."""
    if not np.isfinite(root).all():
        return False
    norm = np.linalg.norm(a)
    return norm == 0 or np.linalg.norm(root @ root - a) <= rtol * norm


def frechet_distance(features_a, features_b, eps=1e-6):
    """Fréchet distance between Gaussians fitted to two feature sets of shapes (N_a, D), (N_b, D).

    Symmetric, zero for identical sets. Numbers are comparable only at the same sample counts
    and feature extractor (see the module docstring).
    """
    fa, fb = _to_host(features_a), _to_host(features_b)
    if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1]:
        raise MetricError(f"feature sets must be (N, D) with the same D, got {fa.shape} and {fb.shape}")
    return frechet_distance_from_statistics(*feature_statistics(fa), *feature_statistics(fb), eps=eps)


# -- images -> classifier features --------------------------------------------------------------

def _to_host(x):
    if isinstance(x, Tensor):
        return x.numpy()
    if isinstance(x, (np.ndarray, np.generic, list, tuple)):
        return np.asarray(x)
    return backend_of(x).to_host(x)


def prepare_images(images, image_shape=None, name="images", clip=True):
    """Images as float32 (N, C, H, W) on the host, in [0, 1].

    Accepts (N, H, W) (one channel) or (N, C, H, W); uint8 is scaled by 1/255, floats are taken to
    be in [0, 1] already (and clipped there when ``clip``). ``image_shape`` (C, H, W), when given,
    is what the classifier expects; anything else is a clear error.
    """
    x = _to_host(images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise MetricError(f"{name}: expected (N, H, W) or (N, C, H, W), got shape {x.shape}")
    if x.shape[0] == 0:
        raise MetricError(f"{name}: no images")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    else:
        raise MetricError(f"{name}: expected uint8 or float images, got dtype {x.dtype}")
    if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
        hint = ""
        if x.shape[-1] == image_shape[0] and x.shape[1] != image_shape[0]:
            hint = " (they look channels-last: transpose them to (N, C, H, W))"
        raise MetricError(f"{name}: shape {x.shape[1:]} per image (C, H, W), but the classifier "
                          f"expects {tuple(image_shape)}{hint}; use a classifier trained on this "
                          "data set")
    if not np.isfinite(x).all():
        raise MetricError(f"{name}: contain NaN or inf (a diverged sampler?)")
    lo, hi = float(x.min()), float(x.max())
    if lo >= -OVERSHOOT and hi > 1 + OVERSHOOT:
        raise MetricError(f"{name}: float images must lie in [0, 1], got values in [{lo:.4g}, "
                          f"{hi:.4g}]; divide 0..255 pixels by 255 (or pass them as uint8), or "
                          "np.clip a sampler's output to [0, 1] first")
    return np.clip(x, 0.0, 1.0) if clip else x


def select(images, num_samples, seed, labels=None, name="images"):
    """A seeded choice of ``num_samples`` items without replacement (the same subset for the same
    set, count and seed); all of them, in order, when the set has exactly ``num_samples``."""
    n = len(images)
    if num_samples is None:
        raise MetricError("num_samples is required: numbers are only comparable at a fixed count")
    if num_samples > n:
        raise MetricError(f"{name}: {num_samples} samples asked for, only {n} given")
    idx = np.arange(n) if num_samples == n else np.sort(
        np.random.default_rng(seed).permutation(n)[:num_samples])
    pick = _to_host(images)[idx]
    return pick if labels is None else (pick, _to_host(labels)[idx])


def _classifier_backend(classifier):
    p = next(iter(classifier.parameters()), None)
    return p.backend if p is not None else backend_of(np.zeros(0))


@no_grad()
def _batched(classifier, images, fn, batch_size, name):
    x = prepare_images(images, classifier.image_shape, name=name)
    backend = _classifier_backend(classifier)
    was_training = getattr(classifier, "training", False)
    classifier.eval()
    try:
        out = [backend.to_host(fn(Tensor(backend.asarray(x[i:i + batch_size]))).data)
               for i in range(0, len(x), batch_size)]
    finally:
        if was_training:
            classifier.train()
    return np.concatenate(out)


def classifier_features(images, classifier, batch_size=500, name="images"):
    """Penultimate-layer features (N, D) of the classifier, as float64 on the host."""
    return _batched(classifier, images, classifier.features, batch_size, name).astype(np.float64)


def classifier_predict(images, classifier, batch_size=500, name="images"):
    """Predicted class of each image (N,) int64."""
    return _batched(classifier, images, classifier, batch_size, name).argmax(axis=1)


def frechet_classifier_distance(images_a, images_b, classifier, num_samples, seed=0,
                                batch_size=500):
    """FID-like distance: Fréchet distance between the classifier's penultimate features of
    ``num_samples`` images drawn (with ``seed``) from each set.

    Only comparable at the same ``num_samples``, classifier and seed.
    """
    a = select(images_a, num_samples, seed, name="images_a")
    b = select(images_b, num_samples, seed + 1, name="images_b")  # independent of a's choice
    shape_a, shape_b = prepare_images(a[:1]).shape[1:], prepare_images(b[:1]).shape[1:]
    if shape_a != shape_b:
        raise MetricError(f"the two image sets differ in shape (C, H, W): {shape_a} and {shape_b}")
    return frechet_distance(classifier_features(a, classifier, batch_size, "images_a"),
                            classifier_features(b, classifier, batch_size, "images_b"))


# -- class-conditional and unconditional samples ------------------------------------------------

def conditional_accuracy(images, requested_labels, classifier, num_samples, seed=0, batch_size=500):
    """Fraction of class-conditional samples that the classifier assigns to the class asked for."""
    if len(images) != len(requested_labels):
        raise MetricError(f"{len(images)} images but {len(requested_labels)} requested labels")
    x, y = select(images, num_samples, seed, labels=requested_labels)
    pred = classifier_predict(x, classifier, batch_size)
    return float(np.mean(pred == np.asarray(y).astype(np.int64)))


@dataclass
class ClassCoverage:
    """How the predicted classes of unconditional samples spread over the classes."""
    histogram: np.ndarray      # counts per class
    entropy_bits: float        # entropy of the predicted-class distribution
    max_entropy_bits: float    # log2(num_classes): all classes equally often
    classes_covered: int       # classes predicted at least once

    @property
    def normalized_entropy(self):
        return self.entropy_bits / self.max_entropy_bits

    def __str__(self):
        return (f"{self.entropy_bits:.3f}/{self.max_entropy_bits:.3f} bits, "
                f"{self.classes_covered}/{len(self.histogram)} classes")


def class_coverage(images, classifier, num_samples, seed=0, batch_size=500):
    """Histogram and entropy of the classes predicted for unconditional samples (a model that
    drops classes has low entropy; the test set of a balanced data set is close to log2(K))."""
    pred = classifier_predict(select(images, num_samples, seed), classifier, batch_size)
    k = classifier.num_classes
    hist = np.bincount(pred, minlength=k)
    p = hist[hist > 0] / hist.sum()
    entropy = max(0.0, float(-(p * np.log2(p)).sum()))   # max(): no '-0.000' for a single class
    return ClassCoverage(hist, entropy, math.log2(k), int((hist > 0).sum()))


# -- reference points ---------------------------------------------------------------------------

def noise_images(like, seed=0):
    """Uniform noise in [0, 1] with the shape of ``like`` (the 'pure noise' ceiling)."""
    x = prepare_images(like)
    return np.random.default_rng(seed).random(x.shape, dtype=np.float32)


def blur_images(images, sigma=1.0):
    """Gaussian blur of each image over H and W (the 'blurred test set' ceiling)."""
    x = prepare_images(images)
    return scipy.ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="constant")


def add_noise(images, std, seed=0):
    """Images plus Gaussian noise of the given std, clipped to [0, 1] (a controlled degradation)."""
    x = prepare_images(images)
    return np.clip(x + std * np.random.default_rng(seed).standard_normal(x.shape, dtype=np.float32),
                   0.0, 1.0)


def reference_distances(train_images, test_images, classifier, num_samples, seed=0,
                        blur_sigma=1.0, batch_size=500):
    """The Fréchet distances every score should be printed beside, measured with the same code,
    count, classifier and seed:

    - ``train_vs_test``: the floor (a perfect model's samples are another draw from the data);
    - ``test_vs_blurred``: test against a copy blurred with a Gaussian of ``blur_sigma`` pixels
      (a visibly worse 'model': digits that are all there but soft);
    - ``test_vs_noise``: test against uniform noise (a model that learned nothing).
    The two ceilings are not ordered: noise images sit in a tight cluster of features, so a
    strong blur can score worse than noise.
    """
    test = select(test_images, num_samples, seed + 1, name="test_images")
    fd = lambda a, b: frechet_classifier_distance(a, b, classifier, num_samples, seed, batch_size)  # noqa: E731
    return {"train_vs_test": fd(train_images, test),
            "test_vs_blurred": fd(blur_images(test, blur_sigma), test),
            "test_vs_noise": fd(noise_images(test, seed), test)}


# -- likelihood -----------------------------------------------------------------------------------

def bits_per_dim_on_test_set(score_model, sde, test_images, num_samples, seed=0, batch_size=100,
                      backend="numpy", labels=None, **kwargs):
    """Mean bits/dim of ``num_samples`` test images under the model (probability-flow ODE,
    ``tinydiff.sampling.bits_per_dim`` on uniformly dequantised data). Returns (mean, std error).
    With the test ``labels`` (a class-conditional model), the bits/dim of log p(x | y).

    Only comparable at the same count and seed (the seed picks the images, the dequantisation
    noise and the Hutchinson probes).
    """
    from . import sampling
    from .backend import get_backend
    b = get_backend(backend)
    if labels is None:
        x = select(test_images, num_samples, seed, name="test_images")
    else:
        x, labels = select(test_images, num_samples, seed, labels=labels, name="test_images")
    if _to_host(x).dtype != np.uint8:
        raise MetricError("bits/dim needs the test images as uint8 (the 256 levels are what the "
                          "dequantisation and the +8 bits assume)")
    rng = b.default_rng(seed)
    values = []
    for i in range(0, len(x), batch_size):
        xb = b.asarray(prepare_images(x[i:i + batch_size]))
        model = score_model if labels is None else sampling.conditional_score_model(
            score_model, b.asarray(np.asarray(labels[i:i + batch_size], np.int64)))
        bpd = sampling.bits_per_dim(model, xb, sde, rng, **kwargs)
        values.append(np.atleast_1d(_to_host(bpd)).astype(np.float64))
    v = np.concatenate(values)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
