"""Tensor and reverse-mode automatic differentiation.

A ``Tensor`` wraps an array (NumPy or CuPy). Every differentiable op is a ``Function`` subclass
(in ``tinydiff/ops.py``) whose ``forward`` computes the output array and whose ``backward`` maps
the gradient of the output to the gradients of the inputs; the two sit side by side so each can be
checked against the other.

The graph. Calling an op records its ``Function`` on the output (``out._ctx``). The Function keeps
links to its *parents*: for each input that needs a gradient, the Function that made it, or the
input tensor itself if it is a leaf (made by the user, e.g. a parameter). It does not keep the
input tensors' arrays: an op saves on ``self`` only the arrays its backward uses, so an
intermediate array lives only as long as the user, or some backward, still needs it.

The reverse pass (``Tensor.backward``, ``grad``) walks the graph once, without recursion:

- every Function has a *generation*, one more than the newest of its parents; popping the highest
  generation first guarantees that all gradients flowing into a node have arrived before the
  node's own backward runs (ties are broken by creation order, so the order is deterministic);
- gradients of tensors used more than once are summed;
- once a Function's backward has run, its saved arrays and its links are dropped, so memory is
  released while the pass goes on (``retain_graph=True`` keeps them for a second pass).
"""
from __future__ import annotations

import builtins
import functools
import heapq
import itertools

import numpy as np

from .backend import BackendError, backend_of, get_backend


class ShapeError(ValueError):
    """Operands whose shapes do not fit the op."""


# -- grad mode --------------------------------------------------------------------------------

_grad_enabled = True


class no_grad:
    """Ops inside record no graph (for sampling and evaluation).

    As a context manager: ``with no_grad(): ...``; as a decorator: ``@no_grad()`` or ``@no_grad``.
    """

    def __new__(cls, func=None):
        self = super().__new__(cls)
        return self(func) if func is not None else self   # bare @no_grad

    def __init__(self, func=None):
        self._saved = []     # a stack, so one instance may be entered again while active

    def __enter__(self):
        global _grad_enabled
        self._saved.append(_grad_enabled)
        _grad_enabled = False
        return self

    def __exit__(self, *exc):
        global _grad_enabled
        _grad_enabled = self._saved.pop()

    def __call__(self, func):
        @functools.wraps(func)
        def without_grad(*args, **kwargs):
            with no_grad():
                return func(*args, **kwargs)
        return without_grad


def is_grad_enabled():
    return _grad_enabled


# -- Tensor -----------------------------------------------------------------------------------

def _is_float(dtype):
    return dtype.kind == "f"


class Tensor:
    """An array with an optional gradient and a link to the op that produced it.

    Args:
        data: an array of any backend, a Tensor, or Python numbers (which become float32).
        requires_grad: accumulate d(loss)/d(this) into ``.grad`` on ``backward()``.
        dtype: convert to this dtype.
        backend: "numpy", "cupy" or "strict": move the data there (an explicit host->device copy).
    """

    # ``ndarray * tensor`` must call Tensor.__rmul__: NumPy's and the strict stand-in's operators
    # defer to a type whose __array_ufunc__ is None (CuPy's priority rules already do), instead of
    # running the ufunc elementwise over an object array of tensors.
    __array_ufunc__ = None
    __array_priority__ = 1000

    def __init__(self, data, requires_grad=False, dtype=None, backend=None):
        if isinstance(data, Tensor):
            data = data.data
        if isinstance(data, np.generic):          # a NumPy scalar (np.float64 is also a float)
            data = np.asarray(data)
        elif isinstance(data, (int, float, bool, list, tuple)):
            dtype = dtype or np.float32           # Python numbers: float32, the default precision
            try:
                data = np.asarray(data, dtype=dtype)
            except (TypeError, ValueError) as e:
                raise TypeError(f"Tensor: data must be numbers, got {type(data).__name__} that "
                                f"cannot become {np.dtype(dtype)} ({e})") from None
        if getattr(data, "dtype", None) is not None and np.dtype(data.dtype).kind not in "biuf":
            # strings, objects, dates would only fail later, far from here, inside some op
            raise TypeError(f"Tensor: data must be a numeric or bool array, got dtype {data.dtype}")
        if backend is not None:
            data = get_backend(backend).asarray(data, dtype=dtype)
        else:
            backend_of(data)                      # refuses unknown array types
            if dtype is not None and data.dtype != dtype:
                data = data.astype(dtype)
        self.data = data
        self.grad = None
        self._ctx = None                          # the Function that made this tensor
        self.requires_grad = requires_grad

    @classmethod
    def _wrap(cls, data):
        """A tensor around ``data``, already an array of some backend (the fast path ops use)."""
        t = object.__new__(cls)
        t.data, t.grad, t._ctx, t._requires_grad = data, None, None, False
        return t

    @property
    def requires_grad(self):
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value):
        if value and not _is_float(self.dtype):
            raise TypeError(f"only floating-point tensors can require gradients, got {self.dtype}; "
                            "convert with .astype('float32') first")
        self._requires_grad = bool(value)

    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    backend = property(lambda self: backend_of(self.data))
    is_leaf = property(lambda self: self._ctx is None)

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self):
        head = f"Tensor(shape={self.shape}, dtype={self.dtype}, backend={self.backend.name}"
        head += ", requires_grad=True" if self.requires_grad else ""
        body = np.array2string(self.numpy(), precision=4, threshold=20, edgeitems=2, prefix="  ")
        return f"{head})\n  {body}"

    # conversion (each one copies device data to the host: a synchronisation on a GPU)
    def numpy(self):
        """The values as a NumPy array on the host, whatever the backend."""
        return self.backend.to_host(self.data)

    def item(self):
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.numpy().reshape(()).item()

    def __float__(self):
        return float(self.item())

    def __bool__(self):
        return bool(self.item())

    def detach(self):
        """The same values (shared, not copied), cut from the graph."""
        return Tensor(self.data)

    def to(self, backend):
        """This tensor on another backend ("numpy", "cupy", "strict"), as a new leaf."""
        target = get_backend(backend)
        if target is self.backend:
            return self
        return Tensor(target.asarray(self.backend.to_host(self.data)), requires_grad=self.requires_grad)

    def astype(self, dtype):
        return _ops.Cast.apply(self, dtype=np.dtype(dtype))

    # autograd
    def backward(self, grad=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad.

        ``grad`` is the gradient of the final loss with respect to ``self``; it may be left out
        when ``self`` has one element (it is then 1).
        """
        _backward(self, grad, retain_graph, accumulate=True)

    def zero_grad(self):
        self.grad = None

    # operators: Python scalars become constants of this tensor's dtype and backend
    def __add__(self, other): return _ops.Add.apply(self, other)
    def __radd__(self, other): return _ops.Add.apply(other, self)
    def __sub__(self, other): return _ops.Sub.apply(self, other)
    def __rsub__(self, other): return _ops.Sub.apply(other, self)
    def __mul__(self, other): return _ops.Mul.apply(self, other)
    def __rmul__(self, other): return _ops.Mul.apply(other, self)
    def __truediv__(self, other): return _ops.Div.apply(self, other)
    def __rtruediv__(self, other): return _ops.Div.apply(other, self)
    def __pow__(self, other): return _ops.Pow.apply(self, other)
    def __rpow__(self, other): return _ops.Pow.apply(other, self)
    def __neg__(self): return _ops.Neg.apply(self)
    def __matmul__(self, other): return _ops.matmul(self, other)
    def __rmatmul__(self, other): return _ops.matmul(other, self)
    def __getitem__(self, key): return _ops.GetItem.apply(self, key=_index_key(key, self.backend))

    # comparisons give plain (non-differentiable) boolean tensors; == stays identity (hashable)
    def __lt__(self, other): return Tensor(self.data < _raw(other))
    def __le__(self, other): return Tensor(self.data <= _raw(other))
    def __gt__(self, other): return Tensor(self.data > _raw(other))
    def __ge__(self, other): return Tensor(self.data >= _raw(other))

    # methods mirroring the functions in ops.py
    def exp(self): return _ops.exp(self)
    def log(self): return _ops.log(self)
    def sqrt(self): return _ops.sqrt(self)
    def abs(self): return _ops.abs(self)
    def tanh(self): return _ops.tanh(self)
    def sigmoid(self): return _ops.sigmoid(self)
    def relu(self): return _ops.relu(self)
    def silu(self): return _ops.silu(self)
    def sum(self, axis=None, keepdims=False): return _ops.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return _ops.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return _ops.max(self, axis, keepdims)
    def min(self, axis=None, keepdims=False): return -_ops.max(-self, axis, keepdims)
    def var(self, axis=None, keepdims=False, ddof=0): return _ops.var(self, axis, keepdims, ddof)
    def softmax(self, axis=-1): return _ops.softmax(self, axis)
    def log_softmax(self, axis=-1): return _ops.log_softmax(self, axis)
    def logsumexp(self, axis=-1, keepdims=False): return _ops.logsumexp(self, axis, keepdims)
    def clip(self, lo=None, hi=None): return _ops.clip(self, lo, hi)
    def flatten(self, start=0): return self.reshape(self.shape[:start] + (-1,))

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return _ops.Reshape.apply(self, shape=tuple(shape))

    def unsqueeze(self, axis):
        axis = axis % (self.ndim + 1)
        return self.reshape(self.shape[:axis] + (1,) + self.shape[axis:])

    def squeeze(self, axis=None):
        axes = _axes(axis, self.ndim)
        return self.reshape(tuple(s for i, s in enumerate(self.shape)
                                  if not (i in axes and s == 1)))

    def transpose(self, *axes):
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return _ops.Transpose.apply(self, axes=tuple(axes) if axes else None)

    permute = transpose

    @property
    def T(self):
        return self.transpose()


def _raw(x):
    return x.data if isinstance(x, Tensor) else x


def _index_key(key, backend):
    """An index with Tensors unwrapped and host index arrays moved to ``backend`` (explicitly)."""
    if isinstance(key, tuple):
        return tuple(_index_key(k, backend) for k in key)
    key = _raw(key)
    if isinstance(key, np.ndarray) and backend.name != "numpy":
        key = backend.asarray(key)
    return key


def _axes(axis, ndim):
    """Normalise an axis argument to a sorted tuple of non-negative ints (None: all axes)."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (axis,)
    out = []
    for a in axis:
        if not -ndim <= a < ndim:
            raise ShapeError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ShapeError(f"repeated axis in {tuple(axis)}")
    return tuple(sorted(out))


# -- Function: the base of every op ------------------------------------------------------------

_sequence = itertools.count()


class Function:
    """One differentiable op.

    Subclasses write ``forward(*arrays, **params) -> array`` and ``backward(grad) -> one gradient
    per input`` (a tuple, or a single array for one input; None for an input without gradient).
    ``forward`` stores on ``self`` only what ``backward`` uses. ``self.needs_grad[i]`` says whether
    input i needs a gradient, so backward can skip work. Backward must not modify ``grad`` in place
    (the same array may be handed to several ops) and must return arrays of the inputs' shapes.
    ``float_only = True`` ops refuse integer inputs (a log of ints is a bug, not a cast).
    """

    float_only = False
    released = False

    @classmethod
    def apply(cls, *inputs, **params):
        tensors = _as_tensors(inputs, cls.__name__)
        if cls.float_only:
            for t in tensors:
                if not _is_float(t.dtype):
                    raise TypeError(f"{cls.__name__.lower()}: expected a floating-point tensor, got "
                                    f"{t.dtype}; convert it with .astype('float32') first")
        fn = cls()
        fn.needs_grad = tuple(t.requires_grad for t in tensors)
        try:
            out = fn.forward(*(t.data for t in tensors), **params)
        except ValueError as e:
            if isinstance(e, ShapeError):
                raise
            shapes = " and ".join(str(t.shape) for t in tensors)
            raise ShapeError(f"{cls.__name__.lower()}: inputs of shapes {shapes} do not fit: {e}") from None
        result = Tensor._wrap(np.asarray(out) if isinstance(out, np.generic) else out)
        if _grad_enabled and any(fn.needs_grad) and _is_float(result.dtype):
            fn.parents = tuple(_node(t) if need else None for t, need in zip(tensors, fn.needs_grad))
            fn.generation = builtins.max((p.generation for p in fn.parents if isinstance(p, Function)),
                                         default=-1) + 1
            fn.seq = next(_sequence)
            fn.out_meta = (result.shape, result.dtype)
            result._ctx, result._requires_grad = fn, True
        return result

    def forward(self, *arrays, **params):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    def release(self):
        """Drop the saved arrays and parent links once backward has used them."""
        self.__dict__ = {"generation": self.generation, "seq": self.seq, "out_meta": self.out_meta,
                         "released": True}


def _as_tensors(inputs, op_name):
    """Inputs as Tensors on one backend; Python scalars become constants like the first tensor."""
    like = next((x for x in inputs if isinstance(x, Tensor)), None)
    if like is None:
        return [Tensor(x) for x in inputs]
    first = like.backend
    out = []
    for x in inputs:
        if isinstance(x, Tensor):
            if x.backend is not first:
                raise BackendError(f"{op_name.lower()}: inputs live on different backends "
                                   f"({first.name!r} and {x.backend.name!r}); move one with "
                                   f".to({first.name!r}) first")
            out.append(x)
        elif isinstance(x, (int, float, bool, np.generic)):
            dtype = like.dtype if _is_float(like.dtype) else None
            out.append(Tensor._wrap(first.xp.asarray(x, dtype=dtype)))
        else:
            b = backend_of(x)
            if b is not first:
                raise BackendError(f"{op_name.lower()}: an array of backend {b.name!r} was mixed with "
                                   f"tensors on {first.name!r}; wrap it with Tensor(x, "
                                   f"backend={first.name!r}) first")
            out.append(Tensor(x))
    return out


def _node(t):
    """The graph node of a tensor: the Function that made it, or the tensor itself for a leaf."""
    return t._ctx if t._ctx is not None else t


def _shape_dtype(node):
    return (node.shape, node.dtype) if isinstance(node, Tensor) else node.out_meta


def _ancestors(root_fn):
    """Every Function the graph above ``root_fn`` holds, oldest generation first."""
    seen, stack = {root_fn}, [root_fn]
    while stack:
        fn = stack.pop()
        for p in () if fn.released else fn.parents:
            if isinstance(p, Function) and p not in seen:
                seen.add(p)
                stack.append(p)
    return sorted(seen, key=lambda f: (f.generation, f.seq))


def _backward(root, grad, retain_graph, accumulate, wanted=()):
    """The reverse pass from ``root``. Returns the gradients of the ``wanted`` tensors (by
    position; None where no gradient reaches one). With ``accumulate`` leaves' ``.grad`` grows;
    without it only the part of the graph that leads to ``wanted`` is visited."""
    if not root.requires_grad:
        raise RuntimeError("backward() on a tensor that does not require grad: no input of the "
                           "computation had requires_grad=True (or it ran under no_grad)")
    if grad is None:
        if root.size != 1:
            raise RuntimeError(f"backward() without a gradient needs a scalar output, but the output "
                               f"has shape {root.shape}; pass grad= of that shape (or call .sum() first)")
        grad = root.backend.xp.ones_like(root.data)
    else:
        grad = _raw(grad)
        if isinstance(grad, (np.ndarray, np.generic, int, float)):
            grad = root.backend.asarray(grad)
        if tuple(grad.shape) != root.shape:
            raise ShapeError(f"backward(): grad has shape {tuple(grad.shape)}, output has {root.shape}")
        grad = grad.astype(root.dtype, copy=False)
    wanted_at = {id(_node(t)): i for i, t in enumerate(wanted)}
    results = [None] * len(wanted)

    # For grad(): visit only Functions with a path to a wanted tensor, and ask each for the
    # gradients of those inputs only (a VJP with respect to x then skips the weight gradients).
    useful = None
    if not accumulate and root._ctx is not None:
        useful = set()
        for fn in _ancestors(root._ctx):
            if fn.released or any(p is not None and (id(p) in wanted_at or p in useful)
                                  for p in fn.parents):
                useful.add(fn)   # (a freed one is kept, so the pass reports it below)

    pending, heap = {}, []

    def deliver(node, g):
        i = wanted_at.get(id(node))
        if i is not None:
            results[i] = g.copy() if results[i] is None else results[i] + g
        if isinstance(node, Tensor):              # a leaf: this path ends here
            if accumulate and node.requires_grad:
                slot = getattr(node, "_grad_view", None)   # a flat parameter's gradient slot
                if slot is not None and type(slot) is type(g) and slot.dtype == g.dtype \
                        and (node.grad is None or node.grad is slot):
                    if node.grad is None:
                        slot[...] = g                 # the copy, made into the flat buffer
                    else:
                        slot += g
                    node.grad = slot
                else:
                    node.grad = g.copy() if node.grad is None else node.grad + g   # never alias
            return
        if useful is not None and node not in useful:
            return
        if node in pending:
            pending[node] = pending[node] + g
        else:
            pending[node] = g
            heapq.heappush(heap, (-node.generation, -node.seq, node))

    deliver(_node(root), grad)
    while heap:
        fn = heapq.heappop(heap)[-1]
        if fn.released:
            raise RuntimeError("backward through a graph whose saved arrays were already freed by an "
                               "earlier backward(); call the first backward(retain_graph=True) to "
                               "backward twice")
        g = pending.pop(fn)
        needs = fn.needs_grad
        if useful is not None:
            fn.needs_grad = tuple(p is not None and (id(p) in wanted_at or p in useful)
                                  for p in fn.parents)
        try:
            input_grads = fn.backward(g)
        finally:
            fn.needs_grad = needs
        if not isinstance(input_grads, tuple):
            input_grads = (input_grads,)
        name, parents = type(fn).__name__, fn.parents
        if len(input_grads) != len(parents):
            raise RuntimeError(f"{name}.backward returned {len(input_grads)} gradients for "
                               f"{len(parents)} inputs")
        if not retain_graph:
            fn.release()
        for i, (node, gi) in enumerate(zip(parents, input_grads)):
            if node is None or gi is None:
                continue
            shape, dtype = _shape_dtype(node)
            if tuple(gi.shape) != shape:
                raise RuntimeError(f"{name}.backward returned a gradient of shape {tuple(gi.shape)} "
                                   f"for input {i} of shape {shape}")
            deliver(node, gi if gi.dtype == dtype else gi.astype(dtype))
    return results


def grad(output, inputs, grad_output=None, retain_graph=False):
    """Gradients of ``output`` with respect to ``inputs`` (tensors), as arrays, without touching
    any ``.grad``. With ``grad_output = v`` this is the vector-Jacobian product v^T J, e.g. with
    respect to a model's input for the Skilling-Hutchinson trace estimator. An input that the
    output does not depend on gets zeros."""
    inputs = list(inputs)
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor) or not t.requires_grad:
            raise RuntimeError(f"grad(): input {i} does not require grad, so no gradient can flow to "
                               "it; create it with requires_grad=True")
    results = _backward(output, grad_output, retain_graph, accumulate=False, wanted=inputs)
    return [r if r is not None else t.backend.xp.zeros_like(t.data) for r, t in zip(results, inputs)]


def unbroadcast(g, shape):
    """Sum a broadcast gradient back down to ``shape`` (the adjoint of broadcasting)."""
    if tuple(g.shape) == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, s in enumerate(shape)
                                      if s == 1 and g.shape[i + lead] != 1)
    g = g.sum(axis=axes, keepdims=True) if axes else g
    return g.reshape(shape)


# The ops live in ops.py; imported last because they build on everything above.
from . import ops as _ops  # noqa: E402
from .ops import *  # noqa: E402,F401,F403  (so ``from tinydiff.tensor import exp`` keeps working)
