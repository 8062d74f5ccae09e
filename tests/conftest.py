"""Shared fixtures: every op test runs once per backend from one body.

"numpy" is the CPU, "strict" the NumPy-backed CuPy stand-in that refuses host/device mixing,
"cupy" the real GPU (skipped when no working GPU is found).
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import tinydiff as td

# CI machines are slow and shared: no per-example deadline, fewer examples, same strength of check.
# CI also derandomizes, so a landing never hinges on a rare draw; the "dev" profile (the default
# outside CI) explores new examples on every run.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("dev", max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

_CUPY_PROBLEM = td.probe_cupy()
BACKEND_NAMES = ["numpy", "strict",
                 pytest.param("cupy", marks=pytest.mark.skipif(_CUPY_PROBLEM is not None,
                                                               reason=f"no GPU: {_CUPY_PROBLEM}"))]


@pytest.fixture(params=BACKEND_NAMES)
def backend(request):
    """A tinydiff Backend: numpy, the strict CuPy stand-in, or cupy."""
    return td.get_backend(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def data_dir():
    """The folder with the real data sets (TINYDIFF_DATA, else ../shared/data), or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.environ.get("TINYDIFF_DATA"), os.path.join(here, "..", "..", "shared", "data")):
        if d and os.path.isdir(os.path.join(d, "mnist")):
            return os.path.abspath(d)
    return None


def make_fake_mnist(root, sizes=(("train", 64), ("test", 16)), seed=0):
    """Write small random MNIST IDX .gz files into root/mnist; returns {file name: md5} to register
    in tinydiff.data.DATASETS["mnist"]["md5"] (the real checksums would refuse them)."""
    import gzip
    import hashlib

    from tinydiff import data
    os.makedirs(os.path.join(root, "mnist"), exist_ok=True)
    rng = np.random.default_rng(seed)
    md5 = {}
    for split, n in sizes:
        for name, arr in zip(data._IDX_FILES[split], (
                rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                rng.integers(0, 10, n, dtype=np.uint8))):
            raw = bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes() + arr.tobytes()
            path = os.path.join(root, "mnist", name)
            with gzip.open(path, "wb") as f:
                f.write(raw)
            with open(path, "rb") as f:
                md5[name] = hashlib.md5(f.read()).hexdigest()
    return md5
