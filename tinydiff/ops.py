"""The differentiable primitives: one ``Function`` per op, forward and backward side by side.

Each forward gets arrays and finds its array module from them (``xp = backend_of(a).xp``), so the
same code runs on NumPy and CuPy. Each backward gets the gradient ``g`` of the output and returns
the gradients of the inputs, summed back over any broadcast axes (``unbroadcast``). Forward saves
on ``self`` only what backward uses.
The lowercase functions at the end are the public forms (``tinydiff.exp(x)`` and so on).
"""
from __future__ import annotations

import numpy as np

from .backend import backend_of
from .tensor import Function, ShapeError, Tensor, _axes, _raw, unbroadcast

__all__ = ["abs", "broadcast_to", "clip", "concat", "exp", "log", "log_softmax", "logsumexp",
           "matmul", "max", "mean", "pad", "permute", "relu", "reshape", "sigmoid", "silu",
           "softmax", "sqrt", "stack", "sum", "tanh", "tensor", "transpose", "var", "where"]


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
        gb = unbroadcast(-g, self.shapes[1]) if self.needs_grad[1] else None
        return unbroadcast(g, self.shapes[0]), gb


class Mul(Function):
    def forward(self, a, b):
        # d(ab)/da = b and d(ab)/db = a: keep an input only if the other one needs its gradient
        self.a = a if self.needs_grad[1] else None
        self.b = b if self.needs_grad[0] else None
        self.shapes = a.shape, b.shape
        return a * b

    def backward(self, g):
        ga = unbroadcast(g * self.b, self.shapes[0]) if self.needs_grad[0] else None
        gb = unbroadcast(g * self.a, self.shapes[1]) if self.needs_grad[1] else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        y = a / b
        self.a_shape, self.b, self.y = a.shape, b, (y if self.needs_grad[1] else None)
        return y

    def backward(self, g):
        g_over_b = g / self.b
        ga = unbroadcast(g_over_b, self.a_shape) if self.needs_grad[0] else None
        # d(a/b)/db = -a/b^2 = -y/b
        gb = unbroadcast(-g_over_b * self.y, self.b.shape) if self.needs_grad[1] else None
        return ga, gb


class Pow(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        self.y = a ** b
        return self.y

    def backward(self, g):
        a, b, xp = self.a, self.b, backend_of(self.a).xp
        ga = unbroadcast(g * b * a ** (b - 1), a.shape) if self.needs_grad[0] else None
        gb = None
        if self.needs_grad[1]:   # d(a^b)/db = a^b log a, for a > 0 (taken as 0 at a == 0, as PyTorch)
            gb = unbroadcast(g * self.y * xp.log(xp.where(a > 0, a, 1)), b.shape)
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
        xp = backend_of(a).xp
        self.sign = xp.sign(a)                    # subgradient 0 at 0, as PyTorch
        return xp.abs(a)

    def backward(self, g):
        return g * self.sign


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
        return backend_of(a).xp.maximum(a, 0)

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
        if lo is None and hi is None:
            raise ValueError("clip: give lo, hi or both")
        xp, y, inside = backend_of(a).xp, a, []
        if lo is not None:
            y, inside = xp.maximum(y, lo), inside + [a >= lo]
        if hi is not None:
            y, inside = xp.minimum(y, hi), inside + [a <= hi]
        self.mask = inside[0] if len(inside) == 1 else inside[0] & inside[1]
        return y

    def backward(self, g):
        return g * self.mask           # 1 inside [lo, hi] (edges included), 0 outside


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

def _keep(g, shape, axis, keepdims):
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
        return xp.broadcast_to(_keep(g, self.shape, self.axis, self.keepdims), self.shape)


class Max(Function):
    def forward(self, a, axis, keepdims):
        y = a.max(axis=axis, keepdims=True)
        self.mask, self.axis, self.keepdims = a == y, axis, keepdims
        return y if keepdims else y.reshape(tuple(s for i, s in enumerate(a.shape) if i not in axis))

    def backward(self, g):
        # ties share the gradient equally (the subgradient PyTorch's amax uses)
        count = self.mask.sum(axis=self.axis, keepdims=True)
        return _keep(g, self.mask.shape, self.axis, self.keepdims) * self.mask / count


class Var(Function):
    def forward(self, a, axis, keepdims, ddof=0):
        n = int(np.prod([a.shape[i] for i in axis]))
        if n - ddof <= 0:
            raise ShapeError(f"var: {n} element(s) along axes {axis} is too few for ddof={ddof}")
        self.centered = a - a.mean(axis=axis, keepdims=True)
        self.axis, self.keepdims, self.scale = axis, keepdims, 1.0 / (n - ddof)
        return (self.centered * self.centered).sum(axis=axis, keepdims=keepdims) * self.scale

    def backward(self, g):
        # d/dx_i of sum_j (x_j - mean)^2 / (n - ddof) = 2 (x_i - mean) / (n - ddof)
        g = _keep(g, self.centered.shape, self.axis, self.keepdims)
        return g * (2 * self.scale) * self.centered


class Softmax(Function):
    float_only = True

    def forward(self, a, axis):
        xp = backend_of(a).xp
        e = xp.exp(a - a.max(axis=axis, keepdims=True))   # shift by the max: no overflow
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
    """log sum_i exp(a_i) = m + log sum_i exp(a_i - m), m = max a (finite): no overflow."""
    float_only = True

    def forward(self, a, axis, keepdims):
        xp = backend_of(a).xp
        m = a.max(axis=axis, keepdims=True)
        m = xp.where(xp.isfinite(m), m, 0)                # all -inf: log 0 = -inf, not nan
        e = xp.exp(a - m)
        s = e.sum(axis=axis, keepdims=True)
        y = m + xp.log(s)
        self.softmax = e / s                              # the gradient: softmax along axis
        self.axis, self.keepdims = axis, keepdims
        return y if keepdims else y.reshape(tuple(s for i, s in enumerate(a.shape) if i not in axis))

    def backward(self, g):
        return _keep(g, self.softmax.shape, self.axis, self.keepdims) * self.softmax


# -- shape ops -------------------------------------------------------------------------------

class Reshape(Function):
    def forward(self, a, shape):
        self.shape = a.shape
        return a.reshape(shape)

    def backward(self, g):
        return g.reshape(self.shape)


class Transpose(Function):
    def forward(self, a, axes):
        if axes is not None and sorted(i % a.ndim if -a.ndim <= i < a.ndim else -1
                                       for i in axes) != list(range(a.ndim)):
            raise ShapeError(f"transpose: axes {axes} are not a permutation of {a.ndim} dimensions")
        self.axes = axes
        return a.transpose(axes)

    def backward(self, g):
        if self.axes is None:
            return g.transpose()
        return g.transpose(tuple(int(i) for i in np.argsort([a % g.ndim for a in self.axes])))


def _is_basic(key):
    """True for keys of ints, slices, None and Ellipsis: they never pick an element twice."""
    key = key if isinstance(key, tuple) else (key,)
    return all(k is None or k is Ellipsis or isinstance(k, (int, slice, np.integer)) for k in key)


class GetItem(Function):
    def forward(self, a, key):
        self.shape, self.key = a.shape, key
        try:
            return a[key]
        except IndexError as e:
            raise ShapeError(f"getitem: index {key!r} does not fit shape {a.shape}: {e}") from None

    def backward(self, g):
        xp = backend_of(g).xp
        gx = xp.zeros(self.shape, dtype=g.dtype)
        if _is_basic(self.key):
            gx[self.key] = g
        else:   # integer-array indices may repeat an element: scatter-add
            xp.add.at(gx, self.key, g)
        return gx


class Concat(Function):
    def forward(self, *arrays, axis):
        self.axis, self.sizes = axis, [a.shape[axis] for a in arrays]
        return backend_of(arrays[0]).xp.concatenate(arrays, axis=axis)

    def backward(self, g):
        out, start = [], 0
        for n in self.sizes:
            out.append(g[(slice(None),) * self.axis + (slice(start, start + n),)])
            start += n
        return tuple(out)


class Stack(Function):
    def forward(self, *arrays, axis):
        self.axis, self.n = axis, len(arrays)
        return backend_of(arrays[0]).xp.stack(arrays, axis=axis)

    def backward(self, g):
        return tuple(g[(slice(None),) * self.axis + (i,)] for i in range(self.n))


class Pad(Function):
    def forward(self, a, pad_width, value=0.0):
        self.index = tuple(slice(lo, lo + s) for (lo, _), s in zip(pad_width, a.shape))
        if a.ndim == 0:
            return a.copy()                      # nothing to pad (NumPy refuses empty widths)
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
        self.a = a if self.needs_grad[1] else None
        self.b = b if self.needs_grad[0] else None
        self.shapes = a.shape, b.shape
        return a @ b

    def backward(self, g):
        # C = A B: dA = dC B^T, dB = A^T dC (then summed over broadcast batch axes)
        ga = unbroadcast(g @ self.b.swapaxes(-1, -2), self.shapes[0]) if self.needs_grad[0] else None
        gb = unbroadcast(self.a.swapaxes(-1, -2) @ g, self.shapes[1]) if self.needs_grad[1] else None
        return ga, gb


# -- functional forms ------------------------------------------------------------------------

def tensor(data, requires_grad=False, dtype=None, backend=None):
    return Tensor(data, requires_grad=requires_grad, dtype=dtype, backend=backend)


def matmul(a, b):
    """a @ b with NumPy's rules: a 1-D operand is promoted to a matrix and the extra axis dropped."""
    a = a if isinstance(a, Tensor) else Tensor(a)
    b = b if isinstance(b, Tensor) else Tensor(b)
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError(f"matmul: operands must not be scalars, got shapes {a.shape} and {b.shape}")
    a2 = a.reshape(1, -1) if a.ndim == 1 else a
    b2 = b.reshape(-1, 1) if b.ndim == 1 else b
    out = MatMul.apply(a2, b2)
    if a.ndim == 1 or b.ndim == 1:
        drop = ([out.ndim - 2] if a.ndim == 1 else []) + ([out.ndim - 1] if b.ndim == 1 else [])
        out = out.reshape(tuple(s for i, s in enumerate(out.shape) if i not in drop))
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
    return Sum.apply(x, axis=_axes(axis, x.ndim), keepdims=keepdims)


def max(x, axis=None, keepdims=False):  # noqa: A001
    return Max.apply(x, axis=_axes(axis, x.ndim), keepdims=keepdims)


def min(x, axis=None, keepdims=False):  # noqa: A001
    """min(x) = -max(-x): the same gradient rule (ties share it)."""
    return -max(-x, axis, keepdims)


def mean(x, axis=None, keepdims=False):
    axes = _axes(axis, x.ndim)
    return sum(x, axes, keepdims) * (1.0 / int(np.prod([x.shape[i] for i in axes])))


def var(x, axis=None, keepdims=False, ddof=0):
    return Var.apply(x, axis=_axes(axis, x.ndim), keepdims=keepdims, ddof=ddof)


def logsumexp(x, axis=-1, keepdims=False):
    return LogSumExp.apply(x, axis=_axes(axis, x.ndim), keepdims=keepdims)


def concat(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ShapeError("concat: needs at least one tensor")
    return Concat.apply(*tensors, axis=_axes(axis, tensors[0].ndim)[0])


def stack(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ShapeError("stack: needs at least one tensor")
    return Stack.apply(*tensors, axis=_axes(axis, tensors[0].ndim + 1)[0])


def pad(x, pad_width, value=0.0):
    """Constant padding; ``pad_width`` is NumPy's ((before, after), ...), one pair per axis."""
    pad_width = tuple((int(lo), int(hi)) for lo, hi in pad_width)
    if len(pad_width) != x.ndim:
        raise ShapeError(f"pad: {len(pad_width)} (before, after) pairs for a {x.ndim}-D tensor "
                         f"of shape {x.shape}")
    if any(lo < 0 or hi < 0 for lo, hi in pad_width):
        raise ShapeError(f"pad: negative widths {pad_width}")
    return Pad.apply(x, pad_width=pad_width, value=value)


def broadcast_to(x, shape):
    return BroadcastTo.apply(x, shape=tuple(shape))


def where(cond, a, b):
    """Elementwise ``a`` where ``cond`` is true, else ``b``; gradients flow to ``a`` and ``b``."""
    if not (isinstance(a, Tensor) or isinstance(b, Tensor)):
        raise TypeError("where: at least one of a, b must be a Tensor")
    return Where.apply(_raw(cond), a, b)
