"""Tensor and reverse-mode automatic differentiation.

A ``Tensor`` wraps an array (NumPy or CuPy). Every differentiable op is a ``Function`` subclass
whose ``forward`` computes the output array and whose ``backward`` maps the gradient of the output
to the gradients of the inputs; the two sit side by side so each can be checked against the other.

Calling an op records the ``Function`` on its output (``out._ctx``). ``Tensor.backward`` then walks
that graph once, in reverse topological order, without recursion:

- every Function has a *generation*, one more than the newest of its inputs; popping the highest
  generation first guarantees that all gradients flowing into a node have arrived before the
  node's own backward runs (ties are broken by creation order, so the order is deterministic);
- gradients of tensors used more than once are summed;
- once a Function's backward has run, its saved arrays and its links to its inputs are dropped,
  so memory is released while the pass goes on (``retain_graph=True`` keeps them).
"""
from __future__ import annotations

import builtins
import contextlib
import heapq
import itertools

import numpy as np

from .backend import BackendError, backend_of, get_backend


class ShapeError(ValueError):
    """Operands whose shapes do not fit the op."""


# -- grad mode --------------------------------------------------------------------------------

_grad_enabled = True


class no_grad(contextlib.ContextDecorator):
    """Context manager and decorator: ops inside record no graph (for sampling and evaluation)."""

    def __enter__(self):
        global _grad_enabled
        self._prev, _grad_enabled = _grad_enabled, False

    def __exit__(self, *exc):
        global _grad_enabled
        _grad_enabled = self._prev


def is_grad_enabled():
    return _grad_enabled


# -- Tensor -----------------------------------------------------------------------------------

def _is_float(dtype):
    return np.issubdtype(dtype, np.floating)


class Tensor:
    """An array with an optional gradient and a link to the op that produced it."""

    __array_priority__ = 1000   # so that ``np.float32(2) * tensor`` calls Tensor.__rmul__

    def __init__(self, data, requires_grad=False, dtype=None, backend=None):
        if isinstance(data, Tensor):
            data = data.data
        if backend is not None:
            data = get_backend(backend).asarray(data, dtype=dtype)
        elif isinstance(data, (int, float, bool, list, tuple)):
            data = np.asarray(data, dtype=dtype or np.float32)   # Python numbers: float32
        else:
            backend_of(data)                                      # refuses unknown array types
            if dtype is not None and data.dtype != dtype:
                data = data.astype(dtype)
        if requires_grad and not _is_float(data.dtype):
            raise TypeError(f"only floating-point tensors can require gradients, got {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self._ctx = None

    # properties
    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    backend = property(lambda self: backend_of(self.data))
    is_leaf = property(lambda self: self._ctx is None)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        head = f"Tensor(shape={self.shape}, dtype={self.dtype}, backend={self.backend.name}"
        head += ", requires_grad=True" if self.requires_grad else ""
        host = self.numpy()
        body = np.array2string(host, precision=4, threshold=20, edgeitems=2, prefix="  ")
        return f"{head})\n  {body}"

    # conversion
    def numpy(self):
        """The values as a NumPy array on the host, whatever the backend."""
        return self.backend.to_host(self.data)

    def item(self):
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.numpy().reshape(()).item()

    def detach(self):
        """The same values, cut from the graph."""
        return Tensor(self.data)

    def to(self, backend):
        """A copy on another backend ("numpy", "cupy", "strict"), still a leaf."""
        target = get_backend(backend)
        if target is self.backend:
            return self
        return Tensor(target.asarray(self.backend.to_host(self.data)), requires_grad=self.requires_grad)

    def astype(self, dtype):
        return Cast.apply(self, dtype=np.dtype(dtype))

    # autograd
    def backward(self, grad=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad."""
        _backward(self, grad, retain_graph, accumulate=True)

    def zero_grad(self):
        self.grad = None

    # operators: Python scalars are turned into constants of this tensor's dtype and backend
    def __add__(self, other): return Add.apply(self, other)
    def __radd__(self, other): return Add.apply(other, self)
    def __sub__(self, other): return Sub.apply(self, other)
    def __rsub__(self, other): return Sub.apply(other, self)
    def __mul__(self, other): return Mul.apply(self, other)
    def __rmul__(self, other): return Mul.apply(other, self)
    def __truediv__(self, other): return Div.apply(self, other)
    def __rtruediv__(self, other): return Div.apply(other, self)
    def __pow__(self, other): return Pow.apply(self, other)
    def __rpow__(self, other): return Pow.apply(other, self)
    def __neg__(self): return Neg.apply(self)
    def __matmul__(self, other): return matmul(self, other)
    def __rmatmul__(self, other): return matmul(other, self)
    def __getitem__(self, key): return GetItem.apply(self, key=_index_key(key))

    # comparisons give plain (non-differentiable) boolean tensors
    def __lt__(self, other): return Tensor(self.data < _raw(other))
    def __le__(self, other): return Tensor(self.data <= _raw(other))
    def __gt__(self, other): return Tensor(self.data > _raw(other))
    def __ge__(self, other): return Tensor(self.data >= _raw(other))

    # methods mirroring the functions below
    def exp(self): return Exp.apply(self)
    def log(self): return Log.apply(self)
    def sqrt(self): return Sqrt.apply(self)
    def abs(self): return Abs.apply(self)
    def tanh(self): return Tanh.apply(self)
    def sigmoid(self): return Sigmoid.apply(self)
    def relu(self): return Relu.apply(self)
    def silu(self): return Silu.apply(self)
    def sum(self, axis=None, keepdims=False): return Sum.apply(self, axis=_axes(axis, self.ndim), keepdims=keepdims)
    def mean(self, axis=None, keepdims=False): return mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return Max.apply(self, axis=_axes(axis, self.ndim), keepdims=keepdims)
    def var(self, axis=None, keepdims=False, ddof=0): return Var.apply(self, axis=_axes(axis, self.ndim), keepdims=keepdims, ddof=ddof)
    def softmax(self, axis=-1): return Softmax.apply(self, axis=axis)
    def log_softmax(self, axis=-1): return LogSoftmax.apply(self, axis=axis)
    def logsumexp(self, axis=-1, keepdims=False): return logsumexp(self, axis, keepdims)
    def clip(self, lo=None, hi=None): return Clip.apply(self, lo=lo, hi=hi)
    def flatten(self, start=0): return self.reshape(self.shape[:start] + (-1,))

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return Reshape.apply(self, shape=tuple(shape))

    def transpose(self, *axes):
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return Transpose.apply(self, axes=tuple(axes) if axes else None)

    permute = transpose

    @property
    def T(self):
        return self.transpose()


def _raw(x):
    return x.data if isinstance(x, Tensor) else x


def _index_key(key):
    if isinstance(key, tuple):
        return tuple(_raw(k) for k in key)
    return _raw(key)


def _axes(axis, ndim):
    """Normalise an axis argument to a sorted tuple of non-negative ints (None: all axes)."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    out = []
    for a in axis:
        if not -ndim <= a < ndim:
            raise ShapeError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
        out.append(a % ndim)
    return tuple(sorted(out))


# -- Function: the base of every op ------------------------------------------------------------

_sequence = itertools.count()


class Function:
    """One differentiable op. Subclasses write ``forward(*arrays, **params)`` and
    ``backward(grad) -> tuple of input gradients`` and store on ``self`` only what backward needs.

    ``self.needs_grad[i]`` says whether input i needs a gradient, so backward can skip work.
    ``float_only = True`` ops refuse integer inputs (a log of ints is a bug, not a cast).
    """

    float_only = False

    @classmethod
    def apply(cls, *inputs, **params):
        tensors = _as_tensors(inputs, cls.__name__)
        if cls.float_only:
            for t in tensors:
                if not _is_float(t.dtype):
                    raise TypeError(f"{cls.__name__.lower()}: expected a floating-point tensor, got "
                                    f"{t.dtype}; convert it with .astype('float32') first")
        fn = cls()
        fn.needs_grad = [t.requires_grad for t in tensors]
        try:
            out = fn.forward(*(t.data for t in tensors), **params)
        except ValueError as e:
            if isinstance(e, ShapeError):
                raise
            shapes = ", ".join(str(t.shape) for t in tensors)
            raise ShapeError(f"{cls.__name__.lower()}: inputs of shapes {shapes} do not fit: {e}") from None
        result = Tensor(out)
        if _grad_enabled and any(fn.needs_grad):
            result.requires_grad = True
            result._ctx = fn
            fn.inputs = tensors
            fn.generation = builtins.max((t._ctx.generation for t in tensors if t._ctx), default=-1) + 1
            fn.seq = next(_sequence)
        return result

    def forward(self, *arrays, **params):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    def release(self):
        """Drop the saved arrays and input links once backward has used them."""
        self.__dict__ = {"generation": self.generation, "seq": self.seq, "released": True}


def _as_tensors(inputs, op_name):
    """Inputs as Tensors on one backend; Python scalars become constants like the first tensor."""
    like = next((x for x in inputs if isinstance(x, Tensor)), None)
    first_backend = like.backend if like is not None else None
    out = []
    for i, x in enumerate(inputs):
        if isinstance(x, Tensor):
            b = x.backend
            if b is not first_backend:
                raise BackendError(f"{op_name.lower()}: inputs live on different backends "
                                   f"({first_backend.name!r} and {b.name!r}); move one with "
                                   f".to({first_backend.name!r}) first")
            out.append(x)
        elif isinstance(x, (int, float, bool, np.generic)):
            dtype = like.dtype if _is_float(like.dtype) else None
            out.append(Tensor(first_backend.xp.asarray(x, dtype=dtype)))
        else:
            b = backend_of(x)
            if first_backend is not None and b is not first_backend:
                raise BackendError(f"{op_name.lower()}: an array of backend {b.name!r} was mixed with "
                                   f"tensors on {first_backend.name!r}")
            out.append(Tensor(x))
    return out


def _backward(root, grad, retain_graph, accumulate, wanted=()):
    """The reverse pass. Returns the gradients of ``wanted`` tensors (by position)."""
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
        if tuple(grad.shape) != root.shape:
            raise ShapeError(f"backward(): grad has shape {tuple(grad.shape)}, output has {root.shape}")
    wanted_ids = {id(t): i for i, t in enumerate(wanted)}
    results = [None] * len(wanted)

    def deliver(tensor, g):
        if g.dtype != tensor.dtype:
            g = g.astype(tensor.dtype)
        if id(tensor) in wanted_ids:
            i = wanted_ids[id(tensor)]
            results[i] = g if results[i] is None else results[i] + g
        if tensor._ctx is None:
            if accumulate and tensor.requires_grad:
                tensor.grad = g if tensor.grad is None else tensor.grad + g
            return
        fn = tensor._ctx
        if fn in pending:
            pending[fn] = pending[fn] + g
        else:
            pending[fn] = g
            heapq.heappush(heap, (-fn.generation, -fn.seq, id(fn), fn))

    pending, heap = {}, []
    deliver(root, grad)
    while heap:
        *_, fn = heapq.heappop(heap)
        if getattr(fn, "released", False):
            raise RuntimeError("backward through a graph whose saved arrays were already freed by an "
                               "earlier backward(); call the first backward(retain_graph=True) to "
                               "backward twice")
        g = pending.pop(fn)
        input_grads = fn.backward(g)
        if not isinstance(input_grads, tuple):
            input_grads = (input_grads,)
        inputs, needs = fn.inputs, fn.needs_grad
        if not retain_graph:
            fn.release()
        for t, need, gi in zip(inputs, needs, input_grads):
            if need and gi is not None:
                deliver(t, gi)
    return results


def grad(output, inputs, grad_output=None, retain_graph=False):
    """Gradients of ``output`` with respect to ``inputs`` (a list of tensors), returned as arrays,
    without touching any ``.grad``. With ``grad_output = v`` this is the vector-Jacobian product
    v^T J, e.g. with respect to a model's input for the Skilling-Hutchinson trace estimator."""
    inputs = list(inputs)
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


# -- elementwise arithmetic ---------------------------------------------------------------------

class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, g):
        return unbroadcast(g, self.shapes[0]), unbroadcast(g, self.shapes[1])


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, g):
        return unbroadcast(g, self.shapes[0]), unbroadcast(-g, self.shapes[1])


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        ga = unbroadcast(g * self.b, self.a.shape) if self.needs_grad[0] else None
        gb = unbroadcast(g * self.a, self.b.shape) if self.needs_grad[1] else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, g):
        ga = unbroadcast(g / self.b, self.a.shape) if self.needs_grad[0] else None
        gb = unbroadcast(-g * self.a / (self.b * self.b), self.b.shape) if self.needs_grad[1] else None
        return ga, gb


class Pow(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        self.y = a ** b
        return self.y

    def backward(self, g):
        a, b, xp = self.a, self.b, backend_of(self.a).xp
        ga = unbroadcast(g * b * a ** (b - 1), a.shape) if self.needs_grad[0] else None
        # d(a^b)/db = a^b log a, defined for a > 0 (and taken as 0 where a == 0, as PyTorch does)
        gb = None
        if self.needs_grad[1]:
            safe = xp.where(a > 0, a, 1)
            gb = unbroadcast(g * self.y * xp.log(safe), b.shape)
        return ga, gb


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, g):
        return -g


class Cast(Function):
    def forward(self, a, dtype):
        self.dtype = a.dtype
        return a.astype(dtype)

    def backward(self, g):
        return g.astype(self.dtype)


# -- elementwise functions --------------------------------------------------------------------

class Exp(Function):
    float_only = True

    def forward(self, a):
        self.y = backend_of(a).xp.exp(a)
        return self.y

    def backward(self, g):
        return g * self.y


class Log(Function):
    float_only = True

    def forward(self, a):
        self.a = a
        return backend_of(a).xp.log(a)

    def backward(self, g):
        return g / self.a


class Sqrt(Function):
    float_only = True

    def forward(self, a):
        self.y = backend_of(a).xp.sqrt(a)
        return self.y

    def backward(self, g):
        return g / (2 * self.y)


class Abs(Function):
    def forward(self, a):
        self.a = a
        return backend_of(a).xp.abs(a)

    def backward(self, g):
        return g * backend_of(self.a).xp.sign(self.a)   # 0 at 0, as PyTorch


class Tanh(Function):
    float_only = True

    def forward(self, a):
        self.y = backend_of(a).xp.tanh(a)
        return self.y

    def backward(self, g):
        return g * (1 - self.y * self.y)


def _stable_sigmoid(xp, a):
    # exp of a non-positive number never overflows: 1/(1+e^-a) for a >= 0, e^a/(1+e^a) otherwise
    e = xp.exp(-xp.abs(a))
    return xp.where(a >= 0, 1 / (1 + e), e / (1 + e))


class Sigmoid(Function):
    float_only = True

    def forward(self, a):
        self.y = _stable_sigmoid(backend_of(a).xp, a)
        return self.y

    def backward(self, g):
        return g * self.y * (1 - self.y)


class Relu(Function):
    def forward(self, a):
        self.mask = a > 0
        return a * self.mask

    def backward(self, g):
        return g * self.mask


class Silu(Function):
    """silu(x) = x sigmoid(x) ("swish"); d/dx = s (1 + x (1 - s))."""
    float_only = True

    def forward(self, a):
        self.a = a
        self.s = _stable_sigmoid(backend_of(a).xp, a)
        return a * self.s

    def backward(self, g):
        s = self.s
        return g * s * (1 + self.a * (1 - s))


class Clip(Function):
    def forward(self, a, lo=None, hi=None):
        xp = backend_of(a).xp
        self.mask = xp.ones(a.shape, dtype=bool)
        if lo is not None:
            self.mask &= a >= lo
        if hi is not None:
            self.mask &= a <= hi
        return xp.clip(a, lo, hi)

    def backward(self, g):
        return g * self.mask


class Where(Function):
    def forward(self, cond, a, b):
        xp = backend_of(a).xp
        self.cond = cond.astype(bool)
        self.shapes = a.shape, b.shape
        return xp.where(self.cond, a, b)

    def backward(self, g):
        return (None, unbroadcast(g * self.cond, self.shapes[0]),
                unbroadcast(g * ~self.cond, self.shapes[1]))


# -- reductions -------------------------------------------------------------------------------

def _expand(g, shape, axis, keepdims):
    """Put the reduced axes back (size 1) so ``g`` broadcasts against the input."""
    if not keepdims:
        g = g.reshape(tuple(1 if i in axis else s for i, s in enumerate(shape)))
    return g


class Sum(Function):
    def forward(self, a, axis, keepdims):
        self.shape, self.axis, self.keepdims = a.shape, axis, keepdims
        return a.sum(axis=axis, keepdims=keepdims)

    def backward(self, g):
        xp = backend_of(g).xp
        return xp.broadcast_to(_expand(g, self.shape, self.axis, self.keepdims), self.shape)


class Max(Function):
    def forward(self, a, axis, keepdims):
        self.a, self.axis, self.keepdims = a, axis, keepdims
        self.y = a.max(axis=axis, keepdims=True)
        return self.y if keepdims else self.y.reshape(
            tuple(s for i, s in enumerate(a.shape) if i not in axis))

    def backward(self, g):
        # ties share the gradient equally (the subgradient PyTorch's amax uses)
        mask = (self.a == self.y)
        count = mask.sum(axis=self.axis, keepdims=True)
        return _expand(g, self.a.shape, self.axis, self.keepdims) * mask / count


class Var(Function):
    def forward(self, a, axis, keepdims, ddof=0):
        n = 1
        for i in axis:
            n *= a.shape[i]
        if n - ddof <= 0:
            raise ShapeError(f"var: {n} element(s) along axes {axis} is too few for ddof={ddof}")
        self.centered = a - a.mean(axis=axis, keepdims=True)
        self.axis, self.keepdims, self.scale = axis, keepdims, 1.0 / (n - ddof)
        return (self.centered ** 2).sum(axis=axis, keepdims=keepdims) * self.scale

    def backward(self, g):
        g = _expand(g, self.centered.shape, self.axis, self.keepdims)
        return g * (2 * self.scale) * self.centered


def mean(x, axis=None, keepdims=False):
    axes = _axes(axis, x.ndim)
    n = 1
    for i in axes:
        n *= x.shape[i]
    return x.sum(axis=axes, keepdims=keepdims) * (1.0 / n)


class Softmax(Function):
    float_only = True

    def forward(self, a, axis):
        xp = backend_of(a).xp
        e = xp.exp(a - a.max(axis=axis, keepdims=True))   # shift: no overflow for large inputs
        self.y, self.axis = e / e.sum(axis=axis, keepdims=True), axis
        return self.y

    def backward(self, g):
        y = self.y
        return y * (g - (g * y).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    float_only = True

    def forward(self, a, axis):
        xp = backend_of(a).xp
        shifted = a - a.max(axis=axis, keepdims=True)
        self.y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.axis = axis
        return self.y

    def backward(self, g):
        xp = backend_of(g).xp
        return g - xp.exp(self.y) * g.sum(axis=self.axis, keepdims=True)


class LogSumExp(Function):
    float_only = True

    def forward(self, a, axis):
        xp = backend_of(a).xp
        m = a.max(axis=axis, keepdims=True)
        self.y = m + xp.log(xp.exp(a - m).sum(axis=axis, keepdims=True))
        self.a = a
        return self.y

    def backward(self, g):
        return g * backend_of(g).xp.exp(self.a - self.y)


def logsumexp(x, axis=-1, keepdims=False):
    y = LogSumExp.apply(x, axis=axis)
    return y if keepdims else y.reshape(tuple(s for i, s in enumerate(y.shape) if i != axis % x.ndim))


# -- shape ops -------------------------------------------------------------------------------

class Reshape(Function):
    def forward(self, a, shape):
        self.shape = a.shape
        return a.reshape(shape)

    def backward(self, g):
        return g.reshape(self.shape)


class Transpose(Function):
    def forward(self, a, axes):
        if axes is not None and sorted(a_ % a.ndim for a_ in axes) != list(range(a.ndim)):
            raise ShapeError(f"transpose: axes {axes} are not a permutation of {a.ndim} dimensions")
        self.axes = axes
        return a.transpose(axes)

    def backward(self, g):
        if self.axes is None:
            return g.transpose()
        return g.transpose(tuple(np.argsort([a % g.ndim for a in self.axes])))


def _is_basic(key):
    """True for keys of ints, slices, None and Ellipsis: their elements are never repeated."""
    key = key if isinstance(key, tuple) else (key,)
    return all(k is None or k is Ellipsis or isinstance(k, (int, slice, np.integer)) for k in key)


class GetItem(Function):
    def forward(self, a, key):
        self.shape, self.dtype, self.key = a.shape, a.dtype, key
        try:
            return a[key]
        except IndexError as e:
            raise ShapeError(f"getitem: index {key!r} does not fit shape {a.shape}: {e}") from None

    def backward(self, g):
        xp = backend_of(g).xp
        gx = xp.zeros(self.shape, dtype=g.dtype)
        if _is_basic(self.key):
            gx[self.key] = g
        else:   # integer-array indices may repeat: scatter-add
            xp.add.at(gx, self.key, g)
        return gx


class Concat(Function):
    def forward(self, *arrays, axis):
        self.axis = axis
        self.sizes = [a.shape[axis] for a in arrays]
        return backend_of(arrays[0]).xp.concatenate(arrays, axis=axis)

    def backward(self, g):
        out, start = [], 0
        for n in self.sizes:
            index = [slice(None)] * g.ndim
            index[self.axis] = slice(start, start + n)
            out.append(g[tuple(index)])
            start += n
        return tuple(out)


class Stack(Function):
    def forward(self, *arrays, axis):
        self.axis, self.n = axis, len(arrays)
        return backend_of(arrays[0]).xp.stack(arrays, axis=axis)

    def backward(self, g):
        xp = backend_of(g).xp
        return tuple(xp.take(g, i, axis=self.axis) for i in range(self.n))


class Pad(Function):
    def forward(self, a, pad_width, value=0.0):
        self.index = tuple(slice(lo, lo + s) for (lo, _), s in zip(pad_width, a.shape))
        return backend_of(a).xp.pad(a, pad_width, mode="constant", constant_values=value)

    def backward(self, g):
        return g[self.index]


class BroadcastTo(Function):
    def forward(self, a, shape):
        self.shape = a.shape
        return backend_of(a).xp.broadcast_to(a, shape)

    def backward(self, g):
        return unbroadcast(g, self.shape)


class MatMul(Function):
    """Batched matrix product of arrays with ndim >= 2; batch dimensions broadcast."""

    def forward(self, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ShapeError("matmul: operands need at least 2 dimensions here (1-D ones are "
                             "promoted by tinydiff.matmul)")
        if a.shape[-1] != b.shape[-2]:
            raise ShapeError(f"matmul: inner dimensions differ: {a.shape} @ {b.shape}")
        self.a, self.b = a, b
        return a @ b

    def backward(self, g):
        a, b = self.a, self.b
        ga = unbroadcast(g @ b.swapaxes(-1, -2), a.shape) if self.needs_grad[0] else None
        gb = unbroadcast(a.swapaxes(-1, -2) @ g, b.shape) if self.needs_grad[1] else None
        return ga, gb


# -- functional forms ------------------------------------------------------------------------

def tensor(data, requires_grad=False, dtype=None, backend=None):
    return Tensor(data, requires_grad=requires_grad, dtype=dtype, backend=backend)


def matmul(a, b):
    """a @ b with NumPy's rules: a 1-D operand is promoted to a matrix and the extra axis dropped."""
    a = a if isinstance(a, Tensor) else Tensor(a)
    b = b if isinstance(b, Tensor) else Tensor(b)
    squeeze = []
    if a.ndim == 1:
        a, squeeze = a.reshape(1, -1), squeeze + [-2]
    if b.ndim == 1:
        b, squeeze = b.reshape(-1, 1), squeeze + [-1]
    out = MatMul.apply(a, b)
    if squeeze:
        keep = [i for i in range(out.ndim) if i - out.ndim not in squeeze]
        out = out.reshape(tuple(out.shape[i] for i in keep))
    return out


def exp(x): return Exp.apply(x)
def log(x): return Log.apply(x)
def sqrt(x): return Sqrt.apply(x)
def abs(x): return Abs.apply(x)  # noqa: A001 - the name the maths uses
def tanh(x): return Tanh.apply(x)
def sigmoid(x): return Sigmoid.apply(x)
def relu(x): return Relu.apply(x)
def silu(x): return Silu.apply(x)
def softmax(x, axis=-1): return Softmax.apply(x, axis=axis)
def log_softmax(x, axis=-1): return LogSoftmax.apply(x, axis=axis)
def clip(x, lo=None, hi=None): return Clip.apply(x, lo=lo, hi=hi)
def reshape(x, shape): return x.reshape(shape)
def transpose(x, axes=None): return x.transpose(axes)
def permute(x, axes): return x.transpose(axes)


def sum(x, axis=None, keepdims=False):  # noqa: A001
    return x.sum(axis, keepdims)


def max(x, axis=None, keepdims=False):  # noqa: A001
    return x.max(axis, keepdims)


def var(x, axis=None, keepdims=False, ddof=0):
    return x.var(axis, keepdims, ddof)


def concat(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ShapeError("concat: needs at least one tensor")
    return Concat.apply(*tensors, axis=axis % tensors[0].ndim)


def stack(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ShapeError("stack: needs at least one tensor")
    return Stack.apply(*tensors, axis=axis % (tensors[0].ndim + 1))


def pad(x, pad_width, value=0.0):
    """Constant padding; ``pad_width`` is NumPy's ((before, after), ...) per axis."""
    pad_width = tuple((int(lo), int(hi)) for lo, hi in pad_width)
    if len(pad_width) != x.ndim:
        raise ShapeError(f"pad: {len(pad_width)} (before, after) pairs for a {x.ndim}-D tensor")
    return Pad.apply(x, pad_width=pad_width, value=value)


def broadcast_to(x, shape):
    return BroadcastTo.apply(x, shape=tuple(shape))


def where(cond, a, b):
    cond = _raw(cond)
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return Where.apply(cond, a, b)
    raise TypeError("where: at least one of a, b must be a Tensor")
