"""A strict, NumPy-backed stand-in for CuPy, so device code paths are tested without a GPU.

It behaves like CuPy where CuPy is stricter than NumPy:
- its ``ndarray`` is not a NumPy array: ``np.asarray(a)`` raises TypeError, exactly as CuPy's
  "Implicit conversion to a NumPy array is not allowed"; host copies need ``a.get()`` or
  ``asnumpy(a)``;
- mixing it with NumPy arrays in an operation raises TypeError;
- only names that the real ``cupy`` module has are exposed, so code cannot lean on NumPy-only API;
- reductions return 0-d arrays, never Python or NumPy scalars;
- every device-to-host transfer (``get``, ``asnumpy``, ``float()``, ``item()``, ``bool()``) is counted
  in ``SYNCS``, so tests can check that a hot loop does not synchronise.
"""
from __future__ import annotations

import numbers

import numpy as np

SYNCS = {"count": 0}


def _sync():
    SYNCS["count"] += 1


class ndarray(np.lib.mixins.NDArrayOperatorsMixin):
    """A device array: a NumPy array that will not silently leave the 'device'."""

    __slots__ = ("_a",)

    def __init__(self, a):
        self._a = a

    # -- refusal of implicit host conversion (CuPy's behaviour) --
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = tuple(_unwrap(x) for x in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(_unwrap(x) for x in kwargs["out"])
        result = getattr(ufunc, method)(*inputs, **kwargs)
        return _wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} got a strict (CuPy-like) array; use the "
                        "array module of the input (get_array_module) instead of numpy")

    # -- host transfers, all counted --
    def get(self):
        _sync()
        return self._a.copy()

    def item(self):
        _sync()
        return self._a.item()

    def __float__(self):
        _sync()
        return float(self._a)

    def __int__(self):
        _sync()
        return int(self._a)

    def __bool__(self):
        _sync()
        return bool(self._a)

    def __index__(self):
        _sync()
        return self._a.__index__()

    def tolist(self):
        _sync()
        return self._a.tolist()

    # -- array protocol --
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))

    @property
    def base(self):
        return None if self._a.base is None else ndarray(self._a.base)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(x) for x in self._a)

    def __repr__(self):
        return f"strict_cupy.{self._a!r}"

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap_key(key)])

    def __setitem__(self, key, value):
        self._a[_unwrap_key(key)] = _unwrap(value)

    def __getattr__(self, name):
        # Methods such as reshape, sum, astype, transpose, copy, ravel: run NumPy's, wrap results.
        if name.startswith("_") or name not in _METHODS:
            raise AttributeError(f"strict_cupy.ndarray has no attribute {name!r}")
        method = getattr(self._a, name)

        def call(*args, **kwargs):
            return _wrap(method(*(_unwrap(a) for a in args),
                                **{k: _unwrap(v) for k, v in kwargs.items()}))
        return call


_METHODS = {
    "reshape", "transpose", "swapaxes", "astype", "copy", "ravel", "flatten", "sum", "mean", "max",
    "min", "var", "std", "prod", "argmax", "argmin", "cumsum", "fill", "squeeze", "clip", "dot",
    "any", "all", "view", "take", "repeat", "conj", "round", "nonzero", "sort", "argsort",
}


def _unwrap(x):
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError("Unsupported type <class 'numpy.ndarray'>: a host (NumPy) array was mixed "
                        "with a device array; move it with asarray() first")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


def _unwrap_key(key):
    if isinstance(key, tuple):
        return tuple(_unwrap_key(k) for k in key)
    if isinstance(key, ndarray):
        return key._a
    if isinstance(key, np.ndarray):
        raise TypeError("indexing a device array with a host (NumPy) array")
    return key


def _wrap(x):
    if isinstance(x, np.ndarray):
        return ndarray(x)
    if isinstance(x, np.generic):       # CuPy returns 0-d arrays where NumPy returns scalars
        return ndarray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _wrapped(func):
    def call(*args, **kwargs):
        return _wrap(func(*(_unwrap(a) for a in args), **{k: _unwrap(v) for k, v in kwargs.items()}))
    call.__name__ = getattr(func, "__name__", "func")
    return call


class _Ufunc:
    """A NumPy ufunc that, like CuPy's, refuses host arrays."""

    def __init__(self, ufunc):
        self._u = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *args, **kwargs):
        return _wrapped(self._u)(*args, **kwargs)

    def at(self, a, indices, b=None):
        self._u.at(_unwrap(a), _unwrap_key(indices), *(() if b is None else (_unwrap(b),)))

    def reduce(self, *args, **kwargs):
        return _wrapped(self._u.reduce)(*args, **kwargs)


# -- host <-> device, the only explicit transfers --
def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None else ndarray(a._a.astype(dtype, copy=False))
    return ndarray(np.array(a, dtype=dtype, order=order))   # host -> device: always a copy


def array(a, dtype=None, copy=True, order="K"):
    if isinstance(a, ndarray):
        return ndarray(np.array(a._a, dtype=dtype, copy=copy, order=order))
    return ndarray(np.array(a, dtype=dtype, order=order))


def ascontiguousarray(a, dtype=None):
    return ndarray(np.ascontiguousarray(_unwrap(a), dtype=dtype))


def asnumpy(a):
    if isinstance(a, ndarray):
        return a.get()
    return np.asarray(a)


def get_array_module(*args):
    import sys
    return sys.modules[__name__]


class _Generator:
    """cupy.random.Generator: standard_normal, random, integers (no ``normal``)."""

    def __init__(self, seed=None):
        self._g = np.random.default_rng(seed)
        self.bit_generator = self._g.bit_generator

    def standard_normal(self, size=None, dtype=np.float64):
        return ndarray(np.asarray(self._g.standard_normal(size=size, dtype=dtype)))

    def random(self, size=None, dtype=np.float64):
        return ndarray(np.asarray(self._g.random(size=size, dtype=dtype)))

    def integers(self, low, high=None, size=None, dtype=np.int64):
        return ndarray(np.asarray(self._g.integers(low, high, size=size, dtype=dtype)))


class _RandomModule:
    default_rng = staticmethod(lambda seed=None: _Generator(seed))
    Generator = _Generator


random = _RandomModule()


class _StrideTricks:
    as_strided = staticmethod(_wrapped(np.lib.stride_tricks.as_strided))
    sliding_window_view = staticmethod(_wrapped(np.lib.stride_tricks.sliding_window_view))


class _Lib:
    stride_tricks = _StrideTricks()


lib = _Lib()

# Names of the real cupy namespace that tinydiff may use. Anything else raises AttributeError,
# so code that would only work on NumPy fails here first.
_FUNCTIONS = """
zeros ones empty full zeros_like ones_like empty_like full_like arange linspace eye
reshape transpose swapaxes moveaxis expand_dims squeeze broadcast_to concatenate stack split
pad where clip sum mean max min var std prod argmax argmin cumsum matmul dot einsum tensordot
tile repeat flip roll take take_along_axis put_along_axis sort argsort unique isfinite isnan
isinf all any allclose array_equal round floor ceil sign outer diag trace tril triu
count_nonzero nonzero maximum minimum fmax fmin result_type can_cast ndim shape size
""".split()

_UFUNCS = """
add subtract multiply divide true_divide power negative exp expm1 log log1p log2 sqrt square
abs absolute tanh sin cos tan arctan arctan2 exp2 floor_divide mod greater greater_equal less
less_equal equal not_equal logical_and logical_or logical_not reciprocal sinh cosh arcsinh
""".split()

_DTYPES = """
float16 float32 float64 int8 int16 int32 int64 uint8 uint16 uint32 uint64 bool_ complex64
complex128 dtype pi e inf nan newaxis finfo iinfo
""".split()

_NAMESPACE = {}
for _n in _FUNCTIONS:
    _NAMESPACE[_n] = _wrapped(getattr(np, _n))
for _n in _UFUNCS:
    _NAMESPACE[_n] = _Ufunc(getattr(np, _n))
for _n in _DTYPES:
    _NAMESPACE[_n] = getattr(np, _n)
globals().update(_NAMESPACE)
del _n


def __getattr__(name):
    raise AttributeError(f"the strict CuPy stand-in has no {name!r}: either CuPy lacks it, or it is "
                         "not on the stand-in's list of CuPy names (add it there if CuPy has it)")


def isscalar(x):
    return isinstance(x, numbers.Number)
