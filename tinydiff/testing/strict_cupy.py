"""A strict, NumPy-backed stand-in for CuPy, so device code paths are tested without a GPU.

It behaves like CuPy where CuPy is stricter than NumPy, or simply different:
- its ``ndarray`` is not a NumPy array: ``np.asarray(a)`` raises TypeError, exactly as CuPy's
  "Implicit conversion to a NumPy array is not allowed"; host copies need ``a.get()`` or
  ``asnumpy(a)``;
- mixing it with NumPy arrays in an operation raises TypeError, and its ufuncs refuse Python
  lists (CuPy's "Unsupported type <class 'list'>");
- only names that the real ``cupy`` module has are exposed, so code cannot lean on NumPy-only API;
- reductions return 0-d arrays, never Python or NumPy scalars;
- integer-array indices out of range wrap around (``a[[1, 3]]`` of a length-3 array is
  ``a[[1, 0]]``), as CuPy's gather and scatter kernels do, instead of raising as NumPy does; a
  bad index therefore picks a wrong element silently here, as on a GPU;
- elementwise ufuncs allocate C-contiguous outputs (CuPy does not keep an input's memory order,
  NumPy's default ``order="K"`` does);
- an input that overlaps an ``out=`` array without being that very array is copied first, as
  CuPy's kernels do (``_copy_in_args_if_needed``: one extra launch, counted);
- ``ufunc.at`` exists only for add, subtract, maximum, minimum and the bitwise ufuncs, with
  CuPy's dtype limits (no 8- or 16-bit integers, bool or complex), ``ufunc.reduce`` only for add
  and multiply;
- every device-to-host transfer (``get``, ``asnumpy``, ``float()``, ``item()``, ``bool()``) is counted
  in ``SYNCS``, so tests can check that a hot loop does not synchronise.

Kernel launches are counted in ``LAUNCHES`` (and by kind in ``LAUNCH_KINDS``), host-to-device
copies in ``UPLOADS``; ``counting()`` measures all three over a block:

    with strict_cupy.counting() as c:
        train_step()
    print(c.launches, c.syncs, c.uploads, c.kinds.most_common(5))

The rule: one launch for every operation on device arrays that would run a kernel on CuPy:
- each ufunc call (an operator such as ``a + b`` or ``a += b``, a comparison, ``xp.exp``, with or
  without ``out=``), ``ufunc.at``, ``ufunc.reduce``, ``where``, ``clip``, ``isfinite``, ...;
- each reduction (``sum``, ``mean``, ``max``, ``min``, ``prod``, ``any``, ``all``, ``argmax``,
  ``cumsum``; ``var`` and ``std`` 2: a mean, then the reduction);
- each copy: ``copy``, ``astype`` (none with ``copy=False`` and the same dtype),
  ``ascontiguousarray`` / ``ravel`` / ``reshape`` only when they must copy, ``flatten``,
  ``array``, ``copyto``, a setitem (``a[k] = v``: an elementwise copy or a fill; 2 for a boolean
  mask), integer-array getitem (a gather; views from slices and ints launch nothing), ``take``,
  ``repeat``, ``tile``, ``roll``, ``pad`` (2: the fill, then the copy), ``concatenate`` / ``stack``
  (one copy per input, or 1 for more than 8 small inputs of one dtype, as CuPy's single-kernel
  path: its pointer tables then cost uploads, not counted);
- each fill: ``zeros``, ``ones``, ``full`` and their ``_like`` forms, ``fill``, ``arange``,
  ``linspace`` (``empty`` and ``empty_like`` launch nothing; ``eye`` 2);
- each random draw (``standard_normal``, ``random``, ``integers``);
- each ``matmul``, ``dot``, ``einsum``, ``tensordot``, ``outer`` (1; CuPy may add copies of
  non-contiguous operands, which are not counted);
- views (``reshape`` that can view, ``transpose``, ``swapaxes``, ``broadcast_to``, ``as_strided``,
  basic indexing, ``moveaxis``, ``squeeze``, ``expand_dims``, ``split``) launch nothing;
- a boolean-mask getitem: 2 launches and 1 sync (its size must come back to the host), likewise
  ``nonzero`` and ``unique``.
A fused kernel is counted as one launch whatever its reference implementation does inside
``one_launch(name)``. Host-to-device copies (``asarray`` / ``array`` of host data) are uploads:
neither launches nor syncs (CuPy stages them through pinned memory without waiting), but each
costs host time like a launch.
"""
from __future__ import annotations

import builtins
import contextlib
import numbers
from collections import Counter

import numpy as np

SYNCS = {"count": 0}
LAUNCHES = {"count": 0}
UPLOADS = {"count": 0}
LAUNCH_KINDS = Counter()
_FUSED = {"depth": 0}


def _sync():
    SYNCS["count"] += 1


def _launch(kind, n=1):
    """Count ``n`` kernel launches of ``kind`` (inside ``one_launch`` they are part of one)."""
    if n and not _FUSED["depth"]:
        LAUNCHES["count"] += n
        LAUNCH_KINDS[kind] += n


def _upload():
    UPLOADS["count"] += 1


@contextlib.contextmanager
def one_launch(name):
    """The block is one fused kernel: whatever it launches inside counts as one launch."""
    _FUSED["depth"] += 1
    try:
        yield
    finally:
        _FUSED["depth"] -= 1
    _launch(f"fused:{name}")


class Counts:
    """Launches, syncs and uploads since the block of ``counting()`` began (frozen at its end),
    and the launches by kind (a Counter)."""

    def __init__(self):
        self._start = (LAUNCHES["count"], SYNCS["count"], UPLOADS["count"], Counter(LAUNCH_KINDS))
        self._end = None

    def _now(self):
        return self._end or (LAUNCHES["count"], SYNCS["count"], UPLOADS["count"], Counter(LAUNCH_KINDS))

    launches = property(lambda self: self._now()[0] - self._start[0])
    syncs = property(lambda self: self._now()[1] - self._start[1])
    uploads = property(lambda self: self._now()[2] - self._start[2])

    @property
    def kinds(self):
        return self._now()[3] - self._start[3]

    def __repr__(self):
        return f"Counts(launches={self.launches}, syncs={self.syncs}, uploads={self.uploads})"


@contextlib.contextmanager
def counting():
    """Count the launches, syncs and uploads of a block: ``with counting() as c: ...``."""
    c = Counts()
    try:
        yield c
    finally:
        c._end = c._now()


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
        if method == "__call__":
            return _call_ufunc(ufunc, inputs, kwargs)
        if method in ("at", "reduce"):
            return getattr(_Ufunc(ufunc), method)(*inputs, **kwargs)
        raise TypeError(f"the strict CuPy stand-in does not support {ufunc.__name__}.{method}")

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
        key = _unwrap_key(key)
        kind = _key_kind(key)
        if kind == "mask":
            _sync()                      # the size of the result must come back to the host
            _launch("getitem:mask", 2)
        elif kind == "fancy":
            _launch("getitem:gather")
        return _wrap(self._a[_wrap_indices(self._a.shape, key)])

    def __setitem__(self, key, value):
        key = _unwrap_key(key)
        kind = _key_kind(key)
        _launch("setitem:mask" if kind == "mask" else
                ("setitem:fill" if not isinstance(value, ndarray) else "setitem:copy"),
                2 if kind == "mask" else 1)
        self._a[_wrap_indices(self._a.shape, key)] = _unwrap(value)

    def __getattr__(self, name):
        # Methods such as reshape, sum, astype, transpose, copy, ravel: run NumPy's, wrap results.
        if name.startswith("_") or name not in _METHODS:
            raise AttributeError(f"strict_cupy.ndarray has no attribute {name!r}")
        a = self._a
        method = getattr(a, name)
        cost = _METHODS[name]

        def call(*args, **kwargs):
            args = tuple(_unwrap(v) for v in args)
            kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
            if name == "take":
                args, kwargs = _wrap_take(a, args, kwargs)
            out = method(*args, **kwargs)
            _count(name, cost, a, out)
            return _wrap(out)
        return call


def _count(name, cost, a, out):
    """Launches of a method or function ``name`` whose input is ``a`` and result ``out``."""
    if cost == "view-or-copy":      # reshape, ravel, ascontiguousarray: a copy only when needed
        copied = isinstance(out, np.ndarray) and not (out is a or np.may_share_memory(out, a))
        _launch(f"copy:{name}", int(copied))
    elif cost == "sync":
        _sync()
        _launch(name, 2)
    elif cost:
        _launch(name, cost)


# launches per method (0: a view or metadata; "view-or-copy": 1 only when it has to copy)
_METHODS = {
    "reshape": "view-or-copy", "ravel": "view-or-copy", "transpose": 0, "swapaxes": 0, "view": 0,
    "squeeze": 0, "conj": 0, "astype": "view-or-copy", "copy": 1, "flatten": 1, "sum": 1,
    "mean": 1, "max": 1, "min": 1, "prod": 1, "argmax": 1, "argmin": 1, "cumsum": 1, "any": 1,
    "all": 1, "var": 2, "std": 2, "fill": 1, "clip": 1, "dot": 1, "take": 1, "repeat": 1,
    "round": 1, "sort": 1, "argsort": 1, "nonzero": "sync",
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
    if isinstance(key, list):           # a list index is an integer (or boolean) array index
        return np.asarray(_unwrap(key))
    return key


def _key_kind(key):
    """"mask" (a boolean array in the key), "fancy" (an integer array) or "basic"."""
    kind = "basic"
    for k in key if isinstance(key, tuple) else (key,):
        if isinstance(k, np.ndarray):
            if k.dtype == bool:
                return "mask"
            kind = "fancy"
    return kind


def _wrap_indices(shape, key):
    """``key`` with every integer-array index taken modulo its axis length: CuPy's kernels wrap
    out-of-range indices around instead of raising."""
    keys = key if isinstance(key, tuple) else (key,)
    if not builtins.any(isinstance(k, np.ndarray) and k.dtype.kind in "iu" for k in keys):
        return key

    def consumed(k):
        if k is None or k is Ellipsis:
            return 0
        return k.ndim if isinstance(k, np.ndarray) and k.dtype == bool else 1
    rest = len(shape) - builtins.sum(consumed(k) for k in keys)
    out, axis = [], 0
    for k in keys:
        if k is Ellipsis:
            axis += rest
        elif isinstance(k, np.ndarray) and k.dtype.kind in "iu" and axis < len(shape):
            if shape[axis]:
                k = np.mod(k, shape[axis])
        out.append(k)
        axis += consumed(k) if k is not Ellipsis else 0
    return tuple(out) if isinstance(key, tuple) else out[0]


def _wrap_take(a, args, kwargs):
    """take(indices, axis) with out-of-range indices wrapped, as cupy.take does."""
    args = list(args)
    idx = args[0] if args else kwargs.get("indices")
    axis = args[1] if len(args) > 1 else kwargs.get("axis")
    n = a.size if axis is None else a.shape[axis]
    if n and isinstance(idx, (np.ndarray, numbers.Integral)) and np.asarray(idx).dtype.kind in "iu":
        idx = np.mod(idx, n)
    if args:
        args[0] = idx
    else:
        kwargs["indices"] = idx
    return tuple(args), kwargs


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


def _refuse_lists(args, what):
    for x in args:
        if isinstance(x, (list, tuple)):
            raise TypeError(f"Unsupported type {type(x)}: CuPy's {what} does not take Python "
                            "lists or tuples; make an array first (asarray)")


def _call_ufunc(ufunc, args, kwargs):
    """One elementwise kernel, with CuPy's rules: no lists, C-contiguous new outputs, inputs
    that overlap an output (without being it) copied first, the ``out=`` arrays returned."""
    nin = ufunc.nin
    inputs, outs = list(args[:nin]), list(args[nin:])
    kwargs = dict(kwargs)
    if "out" in kwargs:
        out = kwargs.pop("out")
        outs = list(out) if isinstance(out, tuple) else [out]
    outs = [o for o in outs if o is not None]
    _refuse_lists(inputs, ufunc.__name__)
    raw_in = [_unwrap(x) for x in inputs]
    raw_out = [_unwrap(o) for o in outs]
    for o, ro in zip(outs, raw_out):
        if not isinstance(o, ndarray):
            raise TypeError(f"{ufunc.__name__}: out= must be a device array, got {type(o).__name__}")
    for i, x in enumerate(raw_in):
        if isinstance(x, np.ndarray) and builtins.any(x is not o and np.may_share_memory(x, o) for o in raw_out):
            raw_in[i] = x.copy()            # CuPy's _copy_in_args_if_needed
            _launch("copy:overlapping-input")
    if raw_out:
        kwargs["out"] = tuple(raw_out)
    else:
        kwargs.setdefault("order", "C")
    _launch(f"ufunc:{ufunc.__name__}")
    result = ufunc(*raw_in, **kwargs)
    if outs:
        return outs[0] if len(outs) == 1 else tuple(outs)
    return _wrap(result)


# CuPy's ufunc.at: these ufuncs, these dtypes (scatter_add / scatter_max / ... kernels)
_AT_DTYPES = {
    "add": ("float16", "float32", "float64", "int32", "int64", "uint32", "uint64"),
    "subtract": ("float16", "float32", "float64", "int32", "int64", "uint32", "uint64"),
    "maximum": ("float32", "float64", "int32", "int64", "uint32", "uint64"),
    "minimum": ("float32", "float64", "int32", "int64", "uint32", "uint64"),
    "bitwise_and": ("int32", "int64", "uint32", "uint64"),
    "bitwise_or": ("int32", "int64", "uint32", "uint64"),
    "bitwise_xor": ("int32", "int64", "uint32", "uint64"),
}
_REDUCE = ("add", "multiply")


class _Ufunc:
    """A NumPy ufunc with CuPy's rules (see ``_call_ufunc``, ``at``, ``reduce``)."""

    def __init__(self, ufunc):
        self._u = ufunc
        self.__name__ = ufunc.__name__
        self.nin, self.nout = ufunc.nin, ufunc.nout

    def __call__(self, *args, **kwargs):
        return _call_ufunc(self._u, args, kwargs)

    def at(self, a, indices, b=None):
        name = self.__name__
        if name not in _AT_DTYPES:
            raise AttributeError(f"CuPy has no {name}.at: ufunc.at exists only for "
                                 f"{', '.join(_AT_DTYPES)}")
        raw = _unwrap(a)
        if not isinstance(a, ndarray):
            raise TypeError(f"{name}.at: the target must be a device array")
        if raw.dtype.name not in _AT_DTYPES[name]:
            raise TypeError(f"CuPy's {name}.at does not support dtype {raw.dtype} (it supports "
                            f"{', '.join(_AT_DTYPES[name])})")
        key = _wrap_indices(raw.shape, _unwrap_key(indices))
        _launch(f"at:{name}")
        self._u.at(raw, key, *(() if b is None else (_unwrap(b),)))

    def reduce(self, *args, **kwargs):
        if self.__name__ not in _REDUCE:
            raise AttributeError(f"CuPy has no {self.__name__}.reduce: ufunc.reduce exists only "
                                 f"for {' and '.join(_REDUCE)}")
        _refuse_lists(args[:1], f"{self.__name__}.reduce")
        _launch(f"reduce:{self.__name__}")
        return _wrap(self._u.reduce(*(_unwrap(a) for a in args),
                                    **{k: _unwrap(v) for k, v in kwargs.items()}))


# -- host <-> device, the only explicit transfers --
def _host(a):
    """Host data for an upload: NumPy arrays as they are, device arrays inside lists unwrapped."""
    if isinstance(a, ndarray):
        return a._a
    if isinstance(a, (list, tuple)):
        return type(a)(_host(v) for v in a)
    return a


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        if dtype is None or np.dtype(dtype) == a.dtype:
            return a
        _launch("copy:astype")
        return ndarray(a._a.astype(dtype))
    _upload()
    return ndarray(np.array(_host(a), dtype=dtype, order=order))   # host -> device: a copy


def array(a, dtype=None, copy=True, order="K"):
    if isinstance(a, ndarray):
        out = np.array(a._a, dtype=dtype, copy=copy, order=order)
        _launch("copy:array", int(not np.may_share_memory(out, a._a)))
        return ndarray(out)
    _upload()
    return ndarray(np.array(_host(a), dtype=dtype, order=order))


def ascontiguousarray(a, dtype=None):
    raw = _host(a)
    out = np.ascontiguousarray(raw, dtype=dtype)
    if not isinstance(a, ndarray):
        _upload()
    else:
        _count("ascontiguousarray", "view-or-copy", raw, out)
    return ndarray(out)


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
        _launch("random:standard_normal")
        return ndarray(np.asarray(self._g.standard_normal(size=size, dtype=dtype)))

    def random(self, size=None, dtype=np.float64):
        _launch("random:random")
        return ndarray(np.asarray(self._g.random(size=size, dtype=dtype)))

    def integers(self, low, high=None, size=None, dtype=np.int64):
        _launch("random:integers")
        return ndarray(np.asarray(self._g.integers(low, high, size=size, dtype=dtype)))


class _RandomModule:
    default_rng = staticmethod(lambda seed=None: _Generator(seed))
    Generator = _Generator


random = _RandomModule()


def _counted(func, cost, name=None):
    """A NumPy function on device arrays (host arrays refused), with its launches counted."""
    name = name or getattr(func, "__name__", "func")

    def call(*args, **kwargs):
        raw = tuple(_unwrap(a) for a in args)
        kw = {k: _unwrap(v) for k, v in kwargs.items()}
        if name == "take":
            first, rest = raw[0], raw[1:]
            rest, kw = _wrap_take(first, rest, kw)
            raw = (first,) + tuple(rest)
        elif name == "take_along_axis":
            a, idx = raw[0], raw[1]
            axis = raw[2] if len(raw) > 2 else kw.get("axis")
            n = a.size if axis is None else a.shape[axis]
            if n:
                raw = (a, np.mod(idx, n)) + raw[2:]
        out = func(*raw, **kw)
        if cost == "concatenate":
            arrays = raw[0] if raw else kw.get("arrays", ())
            dtypes = {np.asarray(x).dtype for x in arrays}
            small = builtins.sum(np.asarray(x).nbytes for x in arrays) < (2 << 20) * len(arrays)
            _launch(name, 1 if (len(arrays) > 8 and len(dtypes) == 1 and small) else len(arrays))
        else:
            _count(name, cost, raw[0] if raw else None, out)
        return _wrap(out)
    call.__name__ = name
    return call


class _StrideTricks:
    as_strided = staticmethod(_counted(np.lib.stride_tricks.as_strided, 0))
    sliding_window_view = staticmethod(_counted(np.lib.stride_tricks.sliding_window_view, 0))


class _Lib:
    stride_tricks = _StrideTricks()


lib = _Lib()

# Names of the real cupy namespace that tinydiff may use, with the launches each costs. Anything
# else raises AttributeError, so code that would only work on NumPy fails here first.
_FUNCTIONS = {
    # fills and allocations
    "zeros": 1, "ones": 1, "full": 1, "zeros_like": 1, "ones_like": 1, "full_like": 1,
    "empty": 0, "empty_like": 0, "arange": 1, "linspace": 1, "eye": 2,
    # views and metadata
    "reshape": "view-or-copy", "transpose": 0, "swapaxes": 0, "moveaxis": 0, "expand_dims": 0,
    "squeeze": 0, "broadcast_to": 0, "split": 0, "flip": 0, "result_type": 0, "can_cast": 0,
    "ndim": 0, "shape": 0, "size": 0,
    # copies
    "concatenate": "concatenate", "stack": "concatenate", "pad": 2, "tile": 1, "repeat": 1,
    "roll": 1, "take": 1, "take_along_axis": 1, "put_along_axis": 1, "copyto": 1, "diag": 1,
    "tril": 1, "triu": 1,
    # elementwise and reductions
    "where": 1, "clip": 1, "isfinite": 1, "isnan": 1, "isinf": 1, "round": 1, "floor": 1,
    "ceil": 1, "sign": 1, "sum": 1, "mean": 1, "max": 1, "min": 1, "prod": 1, "argmax": 1,
    "argmin": 1, "cumsum": 1, "all": 1, "any": 1, "count_nonzero": 1, "trace": 1, "var": 2,
    "std": 2, "allclose": 2, "array_equal": 2, "sort": 1, "argsort": 1,
    "nonzero": "sync", "unique": "sync",
    # products
    "matmul": 1, "dot": 1, "einsum": 1, "tensordot": 1, "outer": 1,
}

_UFUNCS = """
add subtract multiply divide true_divide power negative exp expm1 log log1p log2 sqrt square
abs absolute tanh sin cos tan arctan arctan2 exp2 floor_divide mod greater greater_equal less
less_equal equal not_equal logical_and logical_or logical_not reciprocal sinh cosh arcsinh
maximum minimum fmax fmin bitwise_and bitwise_or bitwise_xor invert
""".split()

_DTYPES = """
float16 float32 float64 int8 int16 int32 int64 uint8 uint16 uint32 uint64 bool_ complex64
complex128 dtype pi e inf nan newaxis finfo iinfo
""".split()

_NAMESPACE = {}
for _n, _cost in _FUNCTIONS.items():
    _NAMESPACE[_n] = _counted(getattr(np, _n), _cost, _n)
for _n in _UFUNCS:
    _NAMESPACE[_n] = _Ufunc(getattr(np, _n))
for _n in _DTYPES:
    _NAMESPACE[_n] = getattr(np, _n)
globals().update(_NAMESPACE)
del _n, _cost


def __getattr__(name):
    raise AttributeError(f"the strict CuPy stand-in has no {name!r}: either CuPy lacks it, or it is "
                         "not on the stand-in's list of CuPy names (add it there if CuPy has it)")


def isscalar(x):
    return isinstance(x, numbers.Number)
