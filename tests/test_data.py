"""Data loading (IDX parsing, checksums, local search order, download) and the batch iterator.

Most tests write tiny data files into tmp_path and point the loaders at them; the download path
is tested with a monkeypatched urlopen that serves bytes from memory, so nothing reaches the
network. Tests on the real data sets use data_dir() and are skipped when it is absent.
"""
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error

import numpy as np
import pytest
from hypothesis import given, strategies as st

from tinydiff import data
from conftest import data_dir


def write_idx(path, array, compress=True):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.int32): 0x0C,
             np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(payload)
    return path


def md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Empty data and cache folders, and a urlopen that fails loudly if anything tries the net."""
    monkeypatch.setenv("TINYDIFF_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("TINYDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TINYDIFF_OFFLINE", raising=False)

    def no_network(url, timeout=None):
        raise AssertionError(f"test tried to reach the network: {url}")
    monkeypatch.setattr(data, "urlopen", no_network)
    return tmp_path


def make_fake_mnist(folder, monkeypatch, n=(12, 5), dataset="mnist", seed=0):
    """Tiny MNIST-format files in folder/<dataset>/, registered with their own MD5s."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for split, count in zip(("train", "test"), n):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        image_file, label_file = data._IDX_FILES[split]
        for name, arr in ((image_file, images), (label_file, labels)):
            path = write_idx(os.path.join(folder, name), arr)
            monkeypatch.setitem(data.DATASETS[dataset]["md5"], name, md5(path))
        arrays[split] = (images, labels)
    return arrays


# -- IDX parsing -------------------------------------------------------------------------------

@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
       dtype=st.sampled_from([np.uint8, np.int16, np.int32, np.float32]),
       compress=st.booleans())
def test_read_idx_round_trip(tmp_path_factory, shape, dtype, compress):
    arr = (np.arange(int(np.prod(shape))) % 251).astype(dtype).reshape(shape)
    path = str(tmp_path_factory.mktemp("idx") / ("a.idx.gz" if compress else "a.idx"))
    write_idx(path, arr, compress)
    out = data.read_idx(path)
    assert out.shape == arr.shape and out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)


def test_read_idx_truncated_gzip_names_the_file(tmp_path):
    path = write_idx(str(tmp_path / "x.gz"), np.zeros((10, 28, 28), np.uint8) + 7)
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])
    with pytest.raises(data.DataError, match="x.gz.*(corrupt|truncated)"):
        data.read_idx(path)


def test_read_idx_short_payload_and_bad_magic(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = str(tmp_path / "short.gz")
    raw = bytes([0, 0, 8, 3]) + np.asarray(arr.shape, ">u4").tobytes() + arr.tobytes()[:-5]
    with gzip.open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(data.DataError, match=r"short.gz.*header says shape \(2, 3, 4\)"):
        data.read_idx(path)
    with gzip.open(path, "wb") as f:
        f.write(b"PK\x03\x04 not an idx file")
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.read_idx(path)


# -- local search order and checksums ----------------------------------------------------------

def test_load_from_env_folder(isolated, monkeypatch, capsys):
    arrays = make_fake_mnist(str(isolated / "data" / "mnist"), monkeypatch)
    for split in ("train", "test"):
        images, labels = data.load_mnist(split)
        np.testing.assert_array_equal(images, arrays[split][0])
        np.testing.assert_array_equal(labels, arrays[split][1])
    assert str(isolated / "data" / "mnist") in capsys.readouterr().err   # says where it came from


def test_cache_is_used_when_env_folder_lacks_the_files(isolated, monkeypatch):
    arrays = make_fake_mnist(str(isolated / "cache" / "fashion-mnist"), monkeypatch,
                             dataset="fashion-mnist", seed=3)
    images, labels = data.load_fashion_mnist("test", verbose=False)
    np.testing.assert_array_equal(images, arrays["test"][0])
    # and an explicit root wins over both
    other = make_fake_mnist(str(isolated / "mine" / "fashion-mnist"), monkeypatch,
                            dataset="fashion-mnist", seed=4)
    images, _ = data.load_fashion_mnist("test", root=str(isolated / "mine"), verbose=False)
    np.testing.assert_array_equal(images, other["test"][0])


def test_corrupt_file_error_names_file_and_expected_md5(isolated, monkeypatch):
    folder = isolated / "data" / "mnist"
    make_fake_mnist(str(folder), monkeypatch)
    path = folder / "t10k-images-idx3-ubyte.gz"
    expected = data.DATASETS["mnist"]["md5"]["t10k-images-idx3-ubyte.gz"]
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(data.DataError) as err:
        data.load_mnist("test")
    assert str(path) in str(err.value) and expected in str(err.value)
    path.write_bytes(bytes(blob[:100]))   # truncated: same clear error
    with pytest.raises(data.DataError, match=expected):
        data.load_mnist("test")


def test_missing_file_offline_lists_where_it_looked(isolated, monkeypatch):
    monkeypatch.setenv("TINYDIFF_OFFLINE", "1")
    with pytest.raises(data.DataError) as err:
        data.load_mnist("train")
    msg = str(err.value)
    assert str(isolated / "data" / "mnist") in msg and str(isolated / "cache" / "mnist") in msg
    assert "TINYDIFF_DATA" in msg


# -- download (monkeypatched urlopen) ----------------------------------------------------------

class FakeResponse(io.BytesIO):
    def __init__(self, payload):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def test_download_tries_mirrors_and_verifies(isolated, monkeypatch, capsys):
    good = write_idx(str(isolated / "good.gz"), np.arange(10, dtype=np.uint8))
    good_bytes = open(good, "rb").read()
    monkeypatch.setitem(data.DATASETS["mnist"]["md5"], "t10k-labels-idx1-ubyte.gz", md5(good))
    mirrors = data.DATASETS["mnist"]["mirrors"]
    served = {mirrors[0]: None, mirrors[1]: good_bytes[:-3] + b"xyz", mirrors[2]: good_bytes}
    asked = []

    def fake_urlopen(url, timeout=None):
        asked.append(url)
        payload = served[url.rsplit("/", 1)[0] + "/"]
        if payload is None:
            raise urllib.error.URLError("no route to host")
        return FakeResponse(payload)
    monkeypatch.setattr(data, "urlopen", fake_urlopen)

    path = data.fetch("mnist", "t10k-labels-idx1-ubyte.gz")
    assert path == str(isolated / "cache" / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert open(path, "rb").read() == good_bytes
    assert asked == [m + "t10k-labels-idx1-ubyte.gz" for m in mirrors]
    assert os.listdir(os.path.dirname(path)) == ["t10k-labels-idx1-ubyte.gz"]   # no leftovers
    err = capsys.readouterr().err
    assert "downloading" in err and "verified" in err
    np.testing.assert_array_equal(data.read_idx(path), np.arange(10))
    # the second call finds the cached copy and does not download again
    asked.clear()
    assert data.fetch("mnist", "t10k-labels-idx1-ubyte.gz") == path and asked == []


def test_download_failure_is_a_clear_error(isolated, monkeypatch):
    def fake_urlopen(url, timeout=None):
        return FakeResponse(b"<html>rate limited</html>")
    monkeypatch.setattr(data, "urlopen", fake_urlopen)
    expected = data.DATASETS["fashion-mnist"]["md5"]["train-labels-idx1-ubyte.gz"]
    with pytest.raises(data.DataError) as err:
        data.fetch("fashion-mnist", "train-labels-idx1-ubyte.gz")
    msg = str(err.value)
    assert expected in msg and "fashion-mnist.s3-website" in msg and "MD5" in msg
    assert not os.path.exists(isolated / "cache" / "fashion-mnist" / "train-labels-idx1-ubyte.gz")


# -- CIFAR-10 ----------------------------------------------------------------------------------

def test_cifar10_python_tarball(isolated, monkeypatch):
    rng = np.random.default_rng(1)
    folder = isolated / "data" / "cifar-10"
    folder.mkdir(parents=True)
    tar_path = folder / "cifar-10-python.tar.gz"
    batches = {}
    with tarfile.open(tar_path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            imgs = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
            labs = [int(v) for v in rng.integers(0, 10, 3)]
            batches[name] = (imgs, labs)
            blob = pickle.dumps({b"data": imgs, b"labels": labs})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    monkeypatch.setitem(data.DATASETS["cifar-10"]["md5"], "cifar-10-python.tar.gz", md5(tar_path))
    images, labels = data.load_cifar10("train", verbose=False)
    assert images.shape == (15, 3, 32, 32) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[3:6].reshape(3, -1), batches["data_batch_2"][0])
    assert labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    images, labels = data.load_cifar10("test", verbose=False)
    np.testing.assert_array_equal(images.reshape(3, -1), batches["test_batch"][0])


# -- the real data sets ------------------------------------------------------------------------

@pytest.mark.skipif(data_dir() is None, reason="real data sets not available")
def test_real_mnist_and_fashion(monkeypatch):
    monkeypatch.setenv("TINYDIFF_OFFLINE", "1")
    images, labels = data.load_mnist("test", root=data_dir(), verbose=False)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.tolist()[:10] == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]   # the well-known first test digits
    assert np.bincount(labels, minlength=10).min() > 850
    assert 0.12 < images.mean() / 255 < 0.14                       # MNIST mean intensity ~0.13
    images, labels = data.load_dataset("fashion_mnist", "test", root=data_dir(), limit=100,
                                       verbose=False)
    assert images.shape == (100, 28, 28) and labels.max() <= 9


@pytest.mark.skipif(data_dir() is None or not os.path.exists(
    os.path.join(data_dir() or "", "cifar-10", "cifar10.npz")), reason="CIFAR-10 npz not available")
def test_real_cifar10_npz_warns_about_partial_test_split():
    with pytest.warns(UserWarning, match="only the first 1000"):
        images, labels = data.load_cifar10("test", root=data_dir(), verbose=False)
    assert images.shape == (1000, 3, 32, 32) and labels.shape == (1000,)
    assert labels.tolist()[:4] == [3, 8, 8, 0]   # cat, ship, ship, airplane: CIFAR-10's test order


# -- the batch iterator ------------------------------------------------------------------------

@given(n=st.integers(1, 40), batch_size=st.integers(1, 12), drop_last=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_batches_visit_each_image_once(n, batch_size, drop_last, seed):
    images = np.arange(n, dtype=np.uint8)[:, None, None] * np.ones((1, 2, 3), np.uint8)
    labels = np.arange(n)
    seen = []
    for x, y in data.batches(images, batch_size, rng=seed, labels=labels, drop_last=drop_last):
        assert x.shape[1:] == (1, 2, 3) and x.dtype == np.float32 and len(x) <= batch_size
        np.testing.assert_array_equal(x[:, 0, 0, 0] * 255, y)   # each label stays with its image
        seen.extend(y.tolist())
    assert len(seen) == (n // batch_size * batch_size if drop_last else n)
    assert len(set(seen)) == len(seen)
    if not drop_last:
        assert sorted(seen) == list(range(n))


def test_batches_seeded_order_and_start(backend):
    images = np.random.default_rng(0).integers(0, 256, (50, 4, 5, 5), dtype=np.uint8)
    labels = np.arange(50)
    run = lambda seed, start=0: [(backend.to_host(x), backend.to_host(y)) for x, y in data.batches(
        images, 8, rng=seed, backend=backend, labels=labels, start=start)]
    a, b, c = run(7), run(7), run(8)
    assert all(np.array_equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(np.array_equal(p[1], q[1]) for p, q in zip(a, c))
    for x, y in a:
        assert x.shape[1:] == (4, 5, 5) and x.dtype == np.float32
        np.testing.assert_array_equal(x, images[y].astype(np.float32) / 255)
        assert 0.0 <= x.min() and x.max() <= 1.0
    tail = run(7, start=3)   # resuming mid-epoch gives exactly the rest of the same order
    assert len(tail) == len(a) - 3
    assert all(np.array_equal(p[1], q[1]) for p, q in zip(tail, a[3:]))


def test_batches_live_on_the_backend(backend):
    x, y = next(data.batches(np.zeros((3, 28, 28), np.uint8), 2, rng=0, backend=backend))
    assert backend.owns(x) and y is None and x.shape == (2, 1, 28, 28)
    latent = np.random.default_rng(0).standard_normal((5, 4, 7, 7)).astype(np.float64)
    x, _ = next(data.batches(latent, 5, shuffle=False, backend=backend))
    assert backend.owns(x) and x.dtype == np.float32   # float data passes through unscaled
    np.testing.assert_array_equal(backend.to_host(x), latent.astype(np.float32))


# -- random horizontal flips (hflip=True) ------------------------------------------------------

def test_hflip_rate_is_one_half():
    # images whose two columns differ ([0, 1]), so a flipped one ([1, 0]) is told apart. The
    # number flipped is Binomial(n, 1/2): sd = sqrt(n)/2 = 50 for n = 10000; the tolerance is 5 sd
    # (rate 0.5 +- 0.025; a false failure has probability ~6e-7 per seed).
    n = 10000
    images = np.zeros((n, 1, 1, 2), np.uint8)
    images[..., 1] = 255
    tol = 5 * np.sqrt(0.25 / n)
    for seed in range(3):
        flipped = np.concatenate([x[:, 0, 0, 0] == 1 for x, _ in
                                  data.batches(images, 256, rng=seed, hflip=True)])
        assert len(flipped) == n
        assert abs(flipped.mean() - 0.5) < tol, (seed, flipped.mean())
        # one coin per image, not per batch: a batch of 256 has both kinds
        assert 0 < flipped[:256].sum() < 256


def test_hflip_gives_exact_mirrors_with_their_labels(backend):
    images = np.random.default_rng(0).integers(0, 256, (40, 3, 6, 5), dtype=np.uint8)
    labels = np.arange(40)
    kinds = []
    for x, y in data.batches(images, 16, rng=3, backend=backend, labels=labels, hflip=True):
        x, y = backend.to_host(x), backend.to_host(y)
        assert x.shape[1:] == (3, 6, 5) and x.dtype == np.float32
        for xi, yi in zip(x, y):
            plain = images[yi].astype(np.float32) / 255
            mirror = plain[..., ::-1]                 # width, the last axis, reversed
            assert np.array_equal(xi, plain) != np.array_equal(xi, mirror)   # one, not both
            kinds.append(np.array_equal(xi, mirror))
    assert 5 < sum(kinds) < 35


def test_hflip_is_seeded_and_resumes_exactly(backend):
    images = np.random.default_rng(1).integers(0, 256, (50, 1, 4, 4), dtype=np.uint8)
    labels = np.arange(50)
    run = lambda seed, start=0, hflip=True: [
        (backend.to_host(x), backend.to_host(y)) for x, y in data.batches(
            images, 8, rng=seed, backend=backend, labels=labels, start=start, hflip=hflip)]
    a, b, c = run(7), run(7), run(8)
    assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(np.array_equal(p[0], q[0]) for p, q in zip(a, c))
    tail = run(7, start=3)                            # resuming mid-epoch: same order, same flips
    assert len(tail) == len(a) - 3
    assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1])
               for p, q in zip(tail, a[3:]))
    plain = run(7, hflip=False)                       # the flips are drawn after the order
    assert all(np.array_equal(p[1], q[1]) for p, q in zip(a, plain))


def test_hflip_false_draws_and_yields_what_it_always_did():
    images = np.random.default_rng(2).integers(0, 256, (30, 3, 4, 4), dtype=np.uint8)
    gen, ref = np.random.default_rng(5), np.random.default_rng(5)
    got = list(data.batches(images, 7, rng=gen, labels=np.arange(30)))
    order = ref.permutation(30)                       # the one draw batches makes
    for b, (x, y) in enumerate(got):
        np.testing.assert_array_equal(y, order[7 * b:7 * (b + 1)])
        np.testing.assert_array_equal(x, images[y].astype(np.float32) / 255)
    assert gen.random() == ref.random()               # and nothing more was drawn
    x, _ = next(data.batches(images, 30, shuffle=False))      # no rng needed without shuffling
    np.testing.assert_array_equal(x, images / np.float32(255))


def test_mirror_some():
    a = np.arange(12, dtype=np.uint8).reshape(3, 1, 4)
    out = data.mirror_some(a, [True, False, True])
    np.testing.assert_array_equal(out, [a[0, :, ::-1], a[1], a[2, :, ::-1]])
    np.testing.assert_array_equal(a, np.arange(12).reshape(3, 1, 4))   # the input is untouched
    with pytest.raises(ValueError, match="which has shape"):
        data.mirror_some(a, [True])


@pytest.mark.skipif(data_dir() is None or not os.path.exists(
    os.path.join(data_dir() or "", "cifar-10", "cifar10.npz")), reason="CIFAR-10 npz not available")
def test_real_cifar10_batches_with_flips():
    images, labels = data.load_dataset("cifar-10", "train", root=data_dir(), limit=64, verbose=False)
    assert images.shape == (64, 3, 32, 32) and images.dtype == np.uint8 and labels.dtype == np.uint8
    index = np.arange(64)
    for x, y in data.batches(images, 32, rng=0, labels=index, hflip=True):
        assert x.shape == (32, 3, 32, 32) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
        for xi, i in zip(x, y):
            plain = images[i] / np.float32(255)
            assert np.array_equal(xi, plain) or np.array_equal(xi, plain[..., ::-1])
