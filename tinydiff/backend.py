"""Array backends: the one place in tinydiff that knows about devices.

Every op finds its array module from its inputs (``xp = get_array_module(a)``, as in DeZero), so
one code path serves NumPy on the CPU and CuPy on the GPU. Three backends are known by name:

- ``"numpy"``: host arrays, always available;
- ``"cupy"``: CUDA arrays; selecting it runs a small probe first, so a missing GPU is reported
  up front with its cause instead of as a crash deep inside a training step;
- ``"strict"``: a NumPy-backed stand-in for CuPy (``tinydiff.testing.strict_cupy``) that refuses
  implicit host conversion and host/device mixing, so the test suite exercises the device code path
  on a machine without a GPU.
"""
from __future__ import annotations

import numpy as np


class BackendError(RuntimeError):
    """A backend cannot be used, or two backends were mixed."""


class Backend:
    """One array library plus how to move arrays to and from the host."""

    def __init__(self, name, xp, array_types):
        self.name = name
        self.xp = xp
        self.array_types = array_types

    def __repr__(self):
        return f"Backend({self.name!r})"

    def owns(self, array):
        return isinstance(array, self.array_types)

    def asarray(self, data, dtype=None):
        """Host data (or an array of this backend) as an array of this backend."""
        if self.name != "numpy" and isinstance(data, (np.ndarray, np.generic)):
            return self.xp.asarray(data, dtype=dtype)   # explicit host -> device copy
        if not self.owns(data) and not isinstance(data, (int, float, bool, list, tuple, np.ndarray,
                                                           np.generic)):
            other = backend_of(data)
            data = other.to_host(data)
        return self.xp.asarray(data, dtype=dtype)

    def to_host(self, array):
        """A NumPy copy (or view, for numpy) of ``array``."""
        if self.name == "numpy":
            return np.asarray(array)
        return self.xp.asnumpy(array)

    def default_rng(self, seed=None):
        return Generator(self, seed)

    def synchronize(self):
        if self.name == "cupy":
            self.xp.cuda.Device().synchronize()


class Generator:
    """A seedable random generator on one backend.

    CuPy's Generator has ``standard_normal``, ``random`` and ``integers`` but no ``normal``, so
    every distribution here is built from those three.
    """

    def __init__(self, backend, seed=None):
        self.backend = backend
        self.seed = seed
        self._gen = backend.xp.random.default_rng(seed)

    def normal(self, size, mean=0.0, std=1.0, dtype=np.float32):
        z = self._gen.standard_normal(size=size, dtype=dtype)
        if std != 1.0:
            z *= std
        if mean != 0.0:
            z += mean
        return z

    def uniform(self, size, low=0.0, high=1.0, dtype=np.float32):
        u = self._gen.random(size=size, dtype=dtype)
        if (low, high) != (0.0, 1.0):
            u = u * (high - low) + low
        return u.astype(dtype, copy=False)

    def integers(self, low, high, size):
        return self._gen.integers(low, high, size=size)

    # numpy generators pickle, which is how checkpoints keep the RNG state exactly. CuPy's
    # generators (cuRAND) have no state to read or set: both directions are refused alike. (A
    # generator that draws on the host for a CuPy backend, train.HostGenerator, has one.)
    def _on_device(self):
        return self.backend.name == "cupy" and not isinstance(self._gen, np.random.Generator)

    def get_state(self):
        if self._on_device():
            raise BackendError("saving the state of a CuPy generator is not supported; "
                               "checkpoints store the host generators instead")
        return self._gen.bit_generator.state

    def set_state(self, state):
        if self._on_device():
            raise BackendError("restoring the state of a CuPy generator is not supported; "
                               "checkpoints store the host generators instead")
        self._gen.bit_generator.state = state


_BACKENDS: dict[str, Backend] = {}


def _numpy_backend():
    return Backend("numpy", np, (np.ndarray, np.generic))


def probe_cupy():
    """Return None if CuPy can run a kernel here, else a message that names the cause."""
    try:
        import cupy
    except ModuleNotFoundError as e:
        if e.name != "cupy":   # cupy is there but something it imports is not
            return (f"CuPy is installed but failed to import: {e}. Reinstall cupy (the wheel that "
                    "matches your CUDA version), or use --backend numpy.")
        return (f"CuPy is not installed ({e}). Install it from the tinydiff checkout with "
                "`pip install -e \".[cuda13]\"` (or \".[cuda12]\" for a CUDA 12 driver; see "
                "docs/gpu.md), or use --backend numpy.")
    except Exception as e:  # a broken install (e.g. a CUDA library missing) fails at import time
        return (f"CuPy is installed but failed to import ({type(e).__name__}: {e}); a CUDA library "
                "may be missing. Reinstall cupy (the wheel that matches your CUDA version), or use "
                "--backend numpy.")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        if "NoDevice" in text or "no CUDA-capable device" in text:
            cause = "no CUDA device was found"
        elif "driver" in text.lower():
            cause = "no usable NVIDIA driver was found (missing, or too old for this CuPy)"
        else:
            cause = "the CUDA runtime could not be initialised"
        return f"CuPy is installed but {cause} ({text}). Use --backend numpy."
    if n == 0:
        return "CuPy is installed but no CUDA device was found. Use --backend numpy."
    try:  # compiles and runs a kernel and a GEMM: catches missing NVRTC / cuBLAS libraries
        a = cupy.arange(4, dtype=cupy.float32).reshape(2, 2)
        float((a @ a + 1).sum())
    except Exception as e:
        return (f"CuPy found {n} device(s) but could not run a kernel ({type(e).__name__}: {e}); "
                "a CUDA library (NVRTC, cuBLAS) is probably missing or does not match the driver. "
                "Use --backend numpy, or install the cupy wheel that matches your CUDA version.")
    return None


def _cupy_backend():
    problem = probe_cupy()
    if problem:
        raise BackendError(problem)
    import cupy
    return Backend("cupy", cupy, (cupy.ndarray,))


def _strict_backend():
    from .testing import strict_cupy
    return Backend("strict", strict_cupy, (strict_cupy.ndarray,))


_FACTORIES = {"numpy": _numpy_backend, "cupy": _cupy_backend, "strict": _strict_backend}


def get_backend(name="numpy"):
    """The backend called ``name`` ("numpy", "cupy" or "strict"); a Backend passes through."""
    if isinstance(name, Backend):
        return name
    if name not in _FACTORIES:
        raise BackendError(f"unknown backend {name!r}; choose one of {sorted(_FACTORIES)} "
                           "(\"strict\" is the CuPy stand-in used by the tests)")
    if name not in _BACKENDS:
        _BACKENDS[name] = _FACTORIES[name]()
    return _BACKENDS[name]


def available_backends():
    """Names of the backends that work on this machine."""
    names = ["numpy", "strict"]
    if probe_cupy() is None:
        names.append("cupy")
    return names


_BY_TYPE: dict[type, str] = {}   # array type -> backend name, filled as types are met


def backend_of(array):
    """The backend that owns ``array`` (numpy for Python scalars; a Tensor's own backend)."""
    name = _BY_TYPE.get(type(array))
    if name is not None:
        return _BACKENDS.get(name) or get_backend(name)
    if isinstance(array, (np.ndarray, np.generic, int, float, bool)):
        backend = get_backend("numpy")
    elif isinstance(getattr(array, "backend", None), Backend):   # a Tensor
        return array.backend
    else:
        module = type(array).__module__
        if module.startswith("cupy"):
            backend = get_backend("cupy")
        elif module.startswith("tinydiff.testing"):
            backend = get_backend("strict")
        else:
            raise BackendError(f"not an array of any tinydiff backend: {type(array).__name__}")
    _BY_TYPE[type(array)] = backend.name
    return backend


def get_array_module(array):
    """``numpy`` or ``cupy`` (or the strict stand-in), whichever owns ``array``."""
    return backend_of(array).xp
