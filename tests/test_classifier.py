"""The feature classifier: layers, training, saving/loading with checks, the shipped weights, and
the training script end to end."""
import os
import subprocess
import sys

import numpy as np
import pytest

import tinydiff as td
from tinydiff import data, nn
from tinydiff.gradcheck import gradcheck
from tinydiff.models import classifier as C
from tinydiff.models.classifier import Classifier, ClassifierWeightsError

from conftest import data_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quadrant_images(n, seed=0, size=16):
    """A separable toy task: the class (0-3) is the quadrant that is bright."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = (rng.random((n, size, size)) * 80).astype(np.uint8)
    h = size // 2
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, r * h:(r + 1) * h, q * h:(q + 1) * h] += 150
    return x, y


@pytest.fixture
def small_model():
    nn.manual_seed(0)
    return Classifier(channels=(4, 8, 8), feature_dim=16, dataset="mnist")


# -- layers ---------------------------------------------------------------------------------------

def test_shapes_on_every_backend(backend, small_model):
    m = small_model.to(backend)
    x = td.Tensor(backend.asarray(np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)))
    assert m.features(x).shape == (3, 16)
    assert m(x).shape == (3, 10)
    assert m(x).backend is backend


def test_cifar_shaped_classifier():
    m = Classifier(in_channels=3, image_size=32, channels=(4, 8, 8), feature_dim=16, dataset="cifar10")
    x = td.Tensor(np.zeros((2, 3, 32, 32), np.float32))
    assert m(x).shape == (2, 10) and m.fc.weight.shape == (16, 8 * 4 * 4) and m.dataset == "cifar-10"


def test_same_outputs_on_numpy_and_strict(small_model):
    x = np.random.default_rng(1).random((4, 1, 28, 28), dtype=np.float32)
    a = small_model(td.Tensor(x)).numpy()
    b = small_model.to("strict")(td.Tensor(td.get_backend("strict").asarray(x))).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("h", [6, 7])
def test_max_pool_matches_numpy_and_gradcheck(h):
    x = np.random.default_rng(2).normal(size=(2, 3, h, 5))
    got = C.max_pool2d(td.Tensor(x)).numpy()
    ho, wo = h // 2, 2
    ref = x[:, :, :ho * 2, :wo * 2].reshape(2, 3, ho, 2, wo, 2).max(axis=(3, 5))
    np.testing.assert_array_equal(got, ref)
    assert gradcheck(lambda t: C.max_pool2d(t), [td.Tensor(x, requires_grad=True)])


def test_cross_entropy_matches_numpy_and_gradcheck():
    rng = np.random.default_rng(3)
    logits, y = rng.normal(size=(5, 4)), rng.integers(0, 4, 5)
    got = C.cross_entropy(td.Tensor(logits), y).item()
    lse = np.log(np.exp(logits).sum(1))
    assert got == pytest.approx(np.mean(lse - logits[np.arange(5), y]), rel=1e-10)
    assert gradcheck(lambda t: C.cross_entropy(t, y), [td.Tensor(logits, requires_grad=True)])


# -- training ---------------------------------------------------------------------------------------

def test_fit_learns_a_separable_task():
    nn.manual_seed(0)
    model = Classifier(image_size=16, channels=(4, 8, 8), feature_dim=16, dataset="mnist")
    x, y = quadrant_images(512)
    before = C.accuracy(model, x, y)
    C.fit(model, x, y, epochs=2, batch_size=32, lr=1e-2, log=lambda s: None)
    after = C.accuracy(model, *quadrant_images(256, seed=1))   # held-out images
    assert after >= 0.95 and before < 0.6, (before, after)


# -- saving and loading ------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path, small_model):
    path = str(tmp_path / "clf.npz")
    sha = C.save_classifier(small_model, path, test_accuracy=0.5)
    assert sha == C.file_sha256(path) and len(sha) == 64
    loaded = C.load_classifier("mnist", path=path, sha256=sha)
    x = td.Tensor(np.random.default_rng(4).random((2, 1, 28, 28), dtype=np.float32))
    np.testing.assert_array_equal(loaded(x).numpy(), small_model(x).numpy())
    assert loaded.meta["test_accuracy"] == 0.5 and loaded.dataset == "mnist"
    assert not loaded.training


def test_checkpoint_for_another_data_set_is_refused(tmp_path, small_model):
    path = str(tmp_path / "clf.npz")
    C.save_classifier(small_model, path)
    with pytest.raises(ClassifierWeightsError, match="classifier for 'mnist', not 'fashion-mnist'"):
        C.load_classifier("fashion_mnist", path=path)


def test_corrupted_weights_are_refused(tmp_path, small_model):
    path = str(tmp_path / "clf.npz")
    sha = C.save_classifier(small_model, path)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ClassifierWeightsError, match="corrupted.*SHA-256"):
        C.load_classifier("mnist", path=path, sha256=sha)


def test_not_a_classifier_file(tmp_path, small_model):
    path = str(tmp_path / "plain.npz")
    small_model.save(path)                     # plain weights, no metadata
    with pytest.raises(ClassifierWeightsError, match="not a tinydiff classifier"):
        C.load_classifier("mnist", path=path)
    with pytest.raises(ClassifierWeightsError, match="no shipped classifier"):
        C.load_classifier("svhn")


def test_saving_needs_a_data_set(tmp_path):
    with pytest.raises(ClassifierWeightsError, match="dataset"):
        C.save_classifier(Classifier(channels=(2, 2, 2), feature_dim=4), str(tmp_path / "x.npz"))


# -- the shipped weights -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(C.SHIPPED_SHA256))
def test_shipped_weights_are_small_and_pass_their_checksum(name):
    path = C.shipped_weights_path(name)
    assert os.path.getsize(path) < 1 << 20
    assert C.file_sha256(path) == C.SHIPPED_SHA256[name]
    model = C.load_classifier(name)
    assert model.dataset == name and model.meta["test_accuracy"] >= {"mnist": 0.99, "fashion-mnist": 0.90, "cifar-10": 0.75}[name]


@pytest.mark.skipif(data_dir() is None, reason="real data sets not found")
@pytest.mark.parametrize("name, minimum", [("mnist", 0.985), ("fashion-mnist", 0.91), ("cifar-10", 0.75)])
def test_shipped_weights_accuracy_on_the_test_set(name, minimum):
    if name == "cifar-10" and not os.path.exists(os.path.join(data_dir(), "cifar-10", "cifar10.npz")):
        pytest.skip("cifar10.npz not found")
    x, y = data.load_dataset(name, "test", root=data_dir(), limit=2000, verbose=False)
    assert C.accuracy(C.load_classifier(name), x, y) >= minimum


# -- the training script --------------------------------------------------------------------------------

@pytest.mark.skipif(data_dir() is None, reason="real data sets not found")
def test_training_script_end_to_end(tmp_path):
    out = str(tmp_path / "clf.npz")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_classifier.py"),
                        "--dataset", "mnist", "--limit", "1024", "--test-limit", "500", "--epochs", "1",
                        "--batch-size", "32",
                        "--data-root", data_dir(), "--out", out],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "test accuracy" in r.stdout and "sha256" in r.stdout
    model = C.load_classifier("mnist", path=out)
    assert model.meta["recipe"]["train_images"] == 1024
    assert model.meta["test_accuracy"] > 0.4       # 32 steps on 1024 digits: far above chance
