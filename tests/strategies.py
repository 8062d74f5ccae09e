"""Hypothesis strategies for op tests (in the spirit of minitorch's tensor_strategies.py).

Shapes, broadcastable groups of shapes, float64 arrays kept away from an op's kinks, random axes,
indices, and non-contiguous layouts. Arrays are drawn on the host; ``to_tensor`` puts them on a
backend, where the layout ("C", "F": a transposed view, "strided": every other element of a
bigger array) is made *on that backend*, so device code sees real non-contiguous arrays.
"""
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinydiff as td

# @given tests take the (function-scoped, parametrised) ``backend`` fixture: it returns a shared,
# stateless Backend object, so reusing it across examples is safe.
op_settings = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                              HealthCheck.too_slow, HealthCheck.data_too_large])

LAYOUTS = st.sampled_from(["C", "F", "strided"])


def shapes(min_dims=0, max_dims=3, min_side=1, max_side=4):
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side,
                            max_side=max_side)


def broadcastable(num_shapes=2, min_dims=0, max_dims=3, max_side=4):
    """A tuple of ``num_shapes`` shapes that broadcast together (plus their result shape)."""
    return hnp.mutually_broadcastable_shapes(num_shapes=num_shapes, min_dims=min_dims,
                                             max_dims=max_dims, max_side=max_side)


def floats(low=-2.0, high=2.0, kinks=(), margin=0.1):
    """Finite float64 values in [low, high], at least ``margin`` away from every kink."""
    values = st.floats(low, high, allow_nan=False, allow_infinity=False, width=64)
    if kinks:
        values = values.filter(lambda v: all(abs(v - k) > margin for k in kinks))
    return values


def arrays(shape, low=-2.0, high=2.0, kinks=(), margin=0.1):
    return hnp.arrays(np.float64, shape, elements=floats(low, high, kinks, margin))


def distinct_arrays(shape):
    """Values on a grid of step 1/8, all different: no ties for max, and finite differences of
    size 1e-6 cannot reorder them."""
    return hnp.arrays(np.float64, shape, elements=st.integers(-200, 200).map(lambda i: i / 8),
                      unique=True)


@st.composite
def axes(draw, ndim, allow_none=True):
    """None, one axis (maybe negative), or a tuple of distinct axes (maybe negative)."""
    options = [st.none()] if allow_none else []
    if ndim > 0:
        one = st.integers(-ndim, ndim - 1)
        options += [one, st.lists(one, min_size=1, max_size=ndim,
                                  unique_by=lambda a: a % ndim).map(tuple)]
    return draw(st.one_of(options)) if options else None


@st.composite
def basic_index(draw, shape):
    """A basic index (ints, slices with any step, maybe None or Ellipsis) for ``shape``."""
    k = draw(st.integers(0, len(shape)))
    key = [draw(st.one_of(st.integers(-s, s - 1), st.slices(s))) for s in shape[:k]]
    if draw(st.booleans()):
        key.insert(draw(st.integers(0, len(key))), None)
    if k < len(shape) and draw(st.booleans()):
        key.append(Ellipsis)
    return tuple(key)


@st.composite
def integer_index(draw, shape):
    """An advanced index with integer arrays (often repeating an element): one array on axis 0,
    or arrays on the first two axes broadcast together, maybe mixed with a slice."""
    kind = draw(st.sampled_from(["axis0", "two", "slice_then_array"] if len(shape) >= 2 else ["axis0"]))
    idx = lambda s, shp: hnp.arrays(np.int64, shp, elements=st.integers(-s, s - 1))  # noqa: E731
    if kind == "axis0":
        return draw(idx(shape[0], draw(shapes(1, 2, max_side=4))))
    if kind == "two":
        shp_a, shp_b = draw(broadcastable(2, 1, 2, max_side=3)).input_shapes
        return draw(idx(shape[0], shp_a)), draw(idx(shape[1], shp_b))
    return slice(None), draw(idx(shape[1], draw(shapes(1, 1, max_side=5))))


def layout(a, backend, kind):
    """``a`` (host) as an array of ``backend``, with the given memory layout made there."""
    if a.ndim == 0 or kind == "C":
        return backend.asarray(a)
    if kind == "F":                       # a transposed view of a transposed copy
        return backend.asarray(np.ascontiguousarray(a.T)).T
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
    big[..., ::2] = a
    return backend.asarray(big)[..., ::2]  # every other element: a strided view


def to_tensor(a, backend, kind="C", requires_grad=True):
    return td.Tensor(layout(np.asarray(a), backend, kind), requires_grad=requires_grad)
