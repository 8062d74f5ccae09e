"""A small CNN classifier whose penultimate features define tinydiff's Fréchet distance.

    x (C, H, W) in [0, 1] -> [conv 3x3 -> ReLU -> max-pool 2] x 3 -> flatten
      -> Linear(., feature_dim)            <- ``features(x)``: the penultimate layer (128-d)
      -> ReLU -> Linear(feature_dim, num_classes)   <- logits

The features are taken *before* the last ReLU: a ReLU output has dead units (constant zero
features), which make the covariance singular. Trained weights for MNIST and Fashion-MNIST ship
in ``tinydiff/weights/`` (made by ``examples/train_classifier.py``); ``load_classifier`` checks
their SHA-256 and the data set they were trained on, so every user measures with the same
feature extractor and nobody scores digits with a clothing classifier by accident.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time

import numpy as np

from .. import nn
from ..backend import get_backend
from ..tensor import Tensor, no_grad

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")

# SHA-256 of the shipped weight files; examples/train_classifier.py prints the new value when it
# re-creates one (paste it here after checking the accuracy it reports).
SHIPPED_SHA256 = {
    "mnist": "fb622b59bace891efc995a9eea1b30247474f6ba9269a0b5008e5021a70fe16f",
    "fashion-mnist": "30af7b224f63d08a2af6e7073e404a9a2cc55cdfc39883e4196f694a0ec65799",
    "cifar-10": "59ccd0d1ab755d906c1dea6103ab3fbb1be57d952c893c28bd2d227f64d49daf",
}

_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "cifar10": "cifar-10", "cifar_10": "cifar-10"}


class ClassifierWeightsError(ValueError):
    """A classifier checkpoint that is missing, corrupted, or for another data set."""


def canonical_dataset(name):
    """'mnist', 'fashion-mnist' or 'cifar-10' (the names tinydiff.data uses)."""
    key = str(name).lower()
    return _ALIASES.get(key, key)


def shipped_weights_path(dataset):
    return os.path.join(WEIGHTS_DIR, f"classifier_{canonical_dataset(dataset).replace('-', '_')}.npz")


def max_pool2d(x, size=2):
    """Max over non-overlapping size x size windows (a trailing odd row/column is dropped, as
    PyTorch's floor mode); built from reshape and max, so its backward comes for free."""
    n, c, h, w = x.shape
    ho, wo = h // size, w // size
    if (h, w) != (ho * size, wo * size):
        x = x[:, :, :ho * size, :wo * size]
    return x.reshape(n, c, ho, size, wo, size).max(axis=(3, 5))


class Classifier(nn.Module):
    """Small CNN: 3 conv blocks, a feature layer, a linear head. ``dataset`` is metadata that is
    saved with the weights and checked when they are loaded."""

    def __init__(self, in_channels=1, image_size=28, num_classes=10, channels=(32, 64, 64),
                 feature_dim=128, dataset=None):
        super().__init__()
        self.image_shape = (in_channels, image_size, image_size)
        self.num_classes, self.feature_dim = num_classes, feature_dim
        self.channels = tuple(channels)
        self.dataset = None if dataset is None else canonical_dataset(dataset)
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.conv3 = nn.Conv2d(channels[1], channels[2], 3, padding=1)
        side = image_size // 8                       # three 2x2 pools, floor mode: 28 -> 3, 32 -> 4
        self.fc = nn.Linear(channels[2] * side * side, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def config(self):
        return {"in_channels": self.image_shape[0], "image_size": self.image_shape[1],
                "num_classes": self.num_classes, "channels": list(self.channels),
                "feature_dim": self.feature_dim, "dataset": self.dataset}

    def features(self, x):
        """Penultimate features (N, feature_dim) of images x (N, C, H, W) in [0, 1]."""
        h = (x - 0.5) * 2.0                         # centre the input: faster, steadier training
        for conv in (self.conv1, self.conv2, self.conv3):
            h = max_pool2d(conv(h).relu())
        return self.fc(h.reshape(h.shape[0], -1))

    def forward(self, x):
        return self.head(self.features(x).relu())


# -- training and evaluation -----------------------------------------------------------------------

def cross_entropy(logits, labels):
    """Mean negative log-likelihood of integer labels (N,) under logits (N, K)."""
    xp = logits.backend.xp
    n, k = logits.shape
    onehot = (labels.reshape(n, 1) == xp.arange(k).reshape(1, k)).astype(logits.dtype)
    return -(logits.log_softmax(axis=1) * Tensor(onehot)).sum() * (1.0 / n)


@no_grad()
def predict(model, images, batch_size=500):
    """Predicted classes (host int64) of uint8 or [0, 1]-float images, in batches."""
    from ..metrics import classifier_predict
    return classifier_predict(images, model, batch_size)


def accuracy(model, images, labels, batch_size=500):
    return float(np.mean(predict(model, images, batch_size) == np.asarray(labels).astype(np.int64)))


def fit(model, images, labels, epochs, batch_size=128, lr=1e-3, weight_decay=0.0, seed=0,
        backend="numpy", log=print, log_every=100):
    """Train with Adam(W) and a cosine learning-rate decay to zero; one seed fixes the data order.

    images uint8 (N, H, W) or (N, C, H, W) on the host; labels (N,). Returns the last loss.
    """
    from .. import optim
    from ..data import batches, num_batches
    backend = get_backend(backend)
    model.to(backend).train()
    opt = optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    total = epochs * num_batches(len(images), batch_size, drop_last=True)
    step, start, loss_value = 0, time.perf_counter(), float("nan")
    for epoch in range(epochs):
        for x, y in batches(images, batch_size, rng, backend, labels=labels, drop_last=True):
            opt.lr = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = cross_entropy(model(Tensor(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % log_every == 0 or step == total:
                loss_value = loss.item()
                log(f"epoch {epoch + 1}/{epochs} step {step}/{total} loss {loss_value:.4f} "
                    f"lr {opt.lr:.2e} {time.perf_counter() - start:.0f}s")
    model.eval()
    return loss_value


# -- saving and loading with checks ----------------------------------------------------------------

def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_classifier(model, path, **info):
    """Write the weights (float32) and a JSON ``__meta__`` entry (architecture, data set, any
    ``info`` such as the recipe and test accuracy) to an .npz; returns the file's SHA-256."""
    if model.dataset is None:
        raise ClassifierWeightsError("set model.dataset before saving: the loader checks it")
    meta = {"format": "tinydiff-classifier-1", **model.config(), **info}
    arrays = {k: v.astype(np.float32) for k, v in model.state_dict().items()}
    with open(path, "wb") as f:
        np.savez(f, __meta__=np.array(json.dumps(meta)), **arrays)
    return file_sha256(path)


def read_meta(path):
    with np.load(path, allow_pickle=False) as data:
        if "__meta__" not in data.files:
            raise ClassifierWeightsError(f"{path} is not a tinydiff classifier checkpoint (no "
                                         "__meta__ entry); make one with examples/train_classifier.py")
        return json.loads(str(data["__meta__"]))


def load_classifier(dataset=None, path=None, backend="numpy", sha256=None):
    """A trained Classifier in eval mode.

    ``load_classifier("mnist")`` loads the shipped weights and checks their SHA-256.
    ``load_classifier("mnist", path=...)`` loads your own file and checks that it was trained on
    MNIST (and its SHA-256 when ``sha256`` is given). Any mismatch is a ClassifierWeightsError.
    """
    if dataset is None and path is None:
        raise ClassifierWeightsError("name the data set (e.g. 'mnist') or give a path")
    want = None if dataset is None else canonical_dataset(dataset)
    if path is None:
        if want not in SHIPPED_SHA256:
            raise ClassifierWeightsError(
                f"no shipped classifier for {dataset!r} (shipped: {sorted(SHIPPED_SHA256)}); train "
                "one with examples/train_classifier.py and pass path=")
        path, sha256 = shipped_weights_path(want), SHIPPED_SHA256[want]
        if not os.path.exists(path) or sha256 is None:
            raise ClassifierWeightsError(f"the shipped weights {path} are missing; re-create them "
                                         f"with `python3 examples/train_classifier.py --dataset {want}`")
    if not os.path.exists(path):
        raise ClassifierWeightsError(f"no classifier checkpoint at {path}")
    if sha256 is not None:
        got = file_sha256(path)
        if got != sha256:
            raise ClassifierWeightsError(
                f"{path} is corrupted or not the expected file: SHA-256 {got}, expected {sha256}. "
                "Reinstall tinydiff, or re-create the file with examples/train_classifier.py")
    meta = read_meta(path)
    if want is not None and meta.get("dataset") != want:
        raise ClassifierWeightsError(
            f"{path} is a classifier for {meta.get('dataset')!r}, not {want!r}: Fréchet distances "
            "are only meaningful in the features of a classifier trained on the same data set")
    model = Classifier(meta["in_channels"], meta["image_size"], meta["num_classes"],
                       meta["channels"], meta["feature_dim"], meta["dataset"])
    with np.load(path, allow_pickle=False) as data:
        model.load_state_dict({k: data[k] for k in data.files if k != "__meta__"})
    model.meta = meta
    return model.to(backend).eval()
