"""Backends: selection, the CuPy probe's diagnoses, moving and mixing, random generators, and the
strict CuPy stand-in's refusals."""
import sys
import types

import numpy as np
import pytest

import tinydiff as td
import tinydiff.backend as backend_module
from tinydiff.testing import strict_cupy


# -- mixing and moving -------------------------------------------------------------------------------

def test_mixing_backends_in_an_op_names_both():
    a = td.Tensor([1.0, 2.0])
    b = td.Tensor([1.0, 2.0], backend="strict")
    with pytest.raises(td.BackendError, match=r"add: .*'numpy' and 'strict'.*\.to\('numpy'\)"):
        a + b
    with pytest.raises(td.BackendError, match=r"matmul: .*'strict' and 'numpy'"):
        b @ a
    with pytest.raises(td.BackendError, match=r"mul: an array of backend 'numpy' was mixed with "
                                              r"tensors on 'strict'"):
        b * np.ones(2)
    with pytest.raises(td.BackendError, match="'numpy' and 'strict'"):
        td.concat([a, b])


def test_moving_tensors_between_numpy_and_strict():
    x = td.Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    s = x.to("strict")
    assert s.backend.name == "strict" and isinstance(s.data, strict_cupy.ndarray)
    assert s.requires_grad and s.is_leaf and s.dtype == np.float64
    back = s.to("numpy")
    assert back.backend.name == "numpy" and type(back.data) is np.ndarray
    np.testing.assert_array_equal(back.numpy(), x.numpy())
    (s * s).sum().backward()                # the moved tensor is a leaf of its own graph
    assert isinstance(s.grad, strict_cupy.ndarray) and x.grad is None
    made = td.Tensor(np.ones(2), backend="strict")
    assert made.backend is td.get_backend("strict")


def test_numpy_always_gives_a_host_array(backend):
    x = td.Tensor(np.array([[1.0, 2.0]]), backend=backend.name)
    for t in (x, x * 2, x.sum(), x[0, 1]):
        h = t.numpy()
        assert type(h) is np.ndarray and h.shape == t.shape


def test_backend_of_and_get_array_module(backend):
    x = backend.asarray(np.ones(3))
    assert td.backend_of(x) is backend and td.get_array_module(x) is backend.xp
    assert td.backend_of(td.Tensor(x)) is backend
    assert td.backend_of(np.float32(1)).name == "numpy" and td.backend_of(2.0).name == "numpy"
    with pytest.raises(td.BackendError, match="not an array of any tinydiff backend: str"):
        td.backend_of("oops")
    np.testing.assert_array_equal(backend.to_host(x), np.ones(3))


def test_unknown_backend_names_are_refused():
    with pytest.raises(td.BackendError, match=r"unknown backend 'gpu'; choose one of \['cupy', "
                                              r"'numpy', 'strict'\]"):
        td.get_backend("gpu")
    with pytest.raises(td.BackendError, match="unknown backend 'tpu'"):
        td.Tensor([1.0], backend="tpu")
    assert td.get_backend(td.get_backend("numpy")).name == "numpy"
    assert {"numpy", "strict"} <= set(td.available_backends())


# -- random generators ---------------------------------------------------------------------------------

def test_seeded_generators_are_deterministic_per_backend(backend):
    def draw(seed):
        rng = backend.default_rng(seed)
        return [backend.to_host(a) for a in (rng.normal((3, 4)), rng.uniform((5,), -2.0, 3.0),
                                             rng.integers(0, 10, (6,)),
                                             rng.normal((2,), mean=5.0, std=0.1, dtype=np.float64))]

    first, again, other = draw(123), draw(123), draw(124)
    for a, b in zip(first, again):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    normal, uniform, ints, shifted = first
    assert normal.dtype == np.float32 and uniform.dtype == np.float32 and shifted.dtype == np.float64
    assert ((uniform >= -2) & (uniform < 3)).all() and ((ints >= 0) & (ints < 10)).all()
    assert np.abs(shifted - 5.0).max() < 1.0


def test_generator_statistics_are_right(backend):
    rng = backend.default_rng(0)
    z = backend.to_host(rng.normal((20000,), mean=1.0, std=2.0, dtype=np.float64))
    u = backend.to_host(rng.uniform((20000,), 1.0, 3.0, dtype=np.float64))
    assert abs(z.mean() - 1.0) < 0.05 and abs(z.std() - 2.0) < 0.05
    assert abs(u.mean() - 2.0) < 0.02 and abs(u.var() - 4 / 12) < 0.02


@pytest.mark.parametrize("name", ["numpy", "strict"])
def test_generator_state_round_trips(name):
    rng = td.get_backend(name).default_rng(5)
    rng.normal((3,))
    state = rng.get_state()
    a = td.get_backend(name).to_host(rng.normal((4,)))
    rng.set_state(state)
    assert np.array_equal(a, td.get_backend(name).to_host(rng.normal((4,))))


# -- the strict CuPy stand-in -------------------------------------------------------------------------

def test_strict_refuses_implicit_conversion_to_numpy():
    a = strict_cupy.asarray(np.ones(3))
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(a)
    with pytest.raises(TypeError, match="use the array module of the input"):
        np.sum(a)
    assert isinstance(a.get(), np.ndarray) and isinstance(strict_cupy.asnumpy(a), np.ndarray)


def test_strict_refuses_mixing_with_numpy_arrays():
    a = strict_cupy.asarray(np.ones(3))
    for mix in (lambda: a + np.ones(3), lambda: np.ones(3) * a, lambda: strict_cupy.maximum(a, np.ones(3)),
                lambda: strict_cupy.concatenate([a, np.ones(3)]), lambda: a[np.array([0, 1])]):
        with pytest.raises(TypeError, match="host"):
            mix()
    assert isinstance(a + np.float32(2) + 1.0, strict_cupy.ndarray)   # scalars are fine, as in CuPy


def test_strict_exposes_only_cupy_names():
    for name in ("nditer", "busday_count", "loadtxt"):   # NumPy has them, CuPy does not
        assert hasattr(np, name)
        with pytest.raises(AttributeError, match=f"no '{name}'.*CuPy lacks it"):
            getattr(strict_cupy, name)
    a = strict_cupy.asarray(np.ones((2, 2)))
    with pytest.raises(AttributeError, match="no attribute 'tofile'"):
        a.tofile
    assert strict_cupy.exp(a).shape == (2, 2) and a.sum(axis=0).shape == (2,)


def test_strict_reductions_return_0d_device_arrays():
    s = strict_cupy.asarray(np.arange(4.0)).sum()
    assert isinstance(s, strict_cupy.ndarray) and s.shape == ()


def test_strict_counts_synchronisations():
    a = strict_cupy.asarray(np.arange(4.0))
    start = strict_cupy.SYNCS["count"]
    b = (a * 2 + 1).sum()                       # device work only: no sync
    assert strict_cupy.SYNCS["count"] == start
    float(b), b.item(), a.get(), strict_cupy.asnumpy(a), bool(b > 0), int(b), a.tolist()
    assert strict_cupy.SYNCS["count"] == start + 7
    td.Tensor(a).numpy()
    assert strict_cupy.SYNCS["count"] == start + 8


def test_strict_forward_and_backward_do_not_synchronise():
    x = td.Tensor(np.linspace(-1, 1, 12).reshape(3, 4), requires_grad=True, backend="strict")
    start = strict_cupy.SYNCS["count"]
    loss = ((x @ x.T).tanh().softmax(axis=1) * x[:, :3]).logsumexp(axis=0).mean()
    loss.backward()
    assert strict_cupy.SYNCS["count"] == start   # a training step never waits for the device
    loss.item()
    assert strict_cupy.SYNCS["count"] == start + 1


# -- the CuPy probe: each way a GPU can be missing is named ---------------------------------------

@pytest.fixture
def no_real_cupy(monkeypatch):
    """Hide any real CuPy and start with no cached cupy backend."""
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(backend_module, "_BACKENDS", {})
    return monkeypatch


def fake_cupy(device_count=1, kernel_error=None):
    """A module that looks like CuPy to the probe: getDeviceCount returns or raises, and running
    a kernel works or raises."""
    def get_device_count():
        if isinstance(device_count, Exception):
            raise device_count
        return device_count

    class FakeArray:
        def reshape(self, *shape):
            return self

        def __matmul__(self, other):
            if kernel_error is not None:
                raise kernel_error
            return self

        def __add__(self, other):
            return self

        def sum(self):
            return 0.0

        def __float__(self):
            return 0.0

    mod = types.ModuleType("cupy")
    mod.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    mod.float32 = np.float32
    mod.arange = lambda *args, **kwargs: FakeArray()
    mod.ndarray = FakeArray
    return mod


def assert_cupy_unusable(pattern):
    msg = td.probe_cupy()
    assert msg is not None and __import__("re").search(pattern, msg), msg
    with pytest.raises(td.BackendError) as err:
        td.get_backend("cupy")
    assert str(err.value) == msg
    assert "cupy" not in td.available_backends()
    return msg


def test_probe_cupy_not_installed(no_real_cupy):
    no_real_cupy.setitem(sys.modules, "cupy", None)    # what `import cupy` sees when it is absent
    msg = assert_cupy_unusable(r"CuPy is not installed")
    assert 'pip install -e ".[cuda13]"' in msg and "--backend numpy" in msg   # as docs/gpu.md says


@pytest.mark.parametrize("body, pattern", [
    ("raise ImportError('libcudart.so.13: cannot open shared object file')",
     r"installed but failed to import.*libcudart\.so\.13.*CUDA library may be missing"),
    ("raise RuntimeError('CUDA environment is not correctly set up')",
     r"installed but failed to import.*RuntimeError: CUDA environment"),
    ("import fastrlock_that_is_missing", r"installed but failed to import.*fastrlock_that_is_missing"),
])
def test_probe_cupy_import_failure(no_real_cupy, tmp_path, body, pattern):
    pkg = tmp_path / "cupy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(body + "\n")
    no_real_cupy.syspath_prepend(str(tmp_path))
    assert_cupy_unusable(pattern)


@pytest.mark.parametrize("count, pattern", [
    (RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA "
                  "runtime version"), r"no usable NVIDIA driver was found.*InsufficientDriver"),
    (RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected"),
     r"no CUDA device was found.*cudaErrorNoDevice"),
    (0, r"installed but no CUDA device was found"),
    (RuntimeError("cudaErrorUnknown: unknown error"), r"CUDA runtime could not be initialised"),
])
def test_probe_cupy_no_driver_or_no_device(no_real_cupy, count, pattern):
    no_real_cupy.setitem(sys.modules, "cupy", fake_cupy(device_count=count))
    assert_cupy_unusable(pattern)


def test_probe_cupy_missing_cuda_library(no_real_cupy):
    error = RuntimeError("CuPy failed to load libcublas.so.13: OSError: cannot open shared object")
    no_real_cupy.setitem(sys.modules, "cupy", fake_cupy(device_count=2, kernel_error=error))
    assert_cupy_unusable(r"found 2 device\(s\) but could not run a kernel.*libcublas.*"
                         r"CUDA library \(NVRTC, cuBLAS\) is probably missing")


def test_probe_cupy_accepts_a_working_fake(no_real_cupy):
    no_real_cupy.setitem(sys.modules, "cupy", fake_cupy(device_count=1))
    assert td.probe_cupy() is None
    assert td.get_backend("cupy").name == "cupy"
