"""Every differentiable op: forward against NumPy, backward against finite differences (float64),
on every backend, for random shapes, broadcasting, axes and non-contiguous inputs."""
import operator
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import (LAYOUTS, arrays, axes, basic_index, broadcastable, distinct_arrays,
                        integer_index, op_settings, shapes, to_tensor)

import tinydiff as td


def check(backend, fn, np_fn, hosts, layouts, rtol=1e-10, atol=1e-12, **gradcheck_kw):
    """Forward of ``fn`` on tensors equals ``np_fn`` on the host arrays; backward passes gradcheck."""
    tensors = [to_tensor(h, backend, k) for h, k in zip(hosts, layouts)]
    out = fn(*tensors)
    assert out.backend is backend and out.dtype == np.float64
    expected = np.asarray(np_fn(*hosts))
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=rtol, atol=atol)
    assert td.gradcheck(fn, tensors, **gradcheck_kw)


def test_layouts_really_are_non_contiguous(backend):
    a = np.arange(12.0).reshape(3, 4)
    for kind in ("F", "strided"):
        t = to_tensor(a, backend, kind)
        assert not t.data.flags.c_contiguous, kind
        np.testing.assert_array_equal(t.numpy(), a)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _logsumexp(x, axis, keepdims=False):
    m = np.max(x, axis=axis, keepdims=True)
    y = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
    return y if keepdims else np.squeeze(y, axis=axis)


# -- elementwise binary ops: tensor (op) tensor with broadcasting, and scalars on either side --

BINARY = {  # name: (operator, left-operand range, right-operand range)
    "add": (operator.add, (-2, 2), (-2, 2)),
    "sub": (operator.sub, (-2, 2), (-2, 2)),
    "mul": (operator.mul, (-2, 2), (-2, 2)),
    "div": (operator.truediv, (-2, 2), (0.5, 2)),      # denominators away from 0
    "pow": (operator.pow, (0.5, 2), (-2, 2)),          # positive base: a^b and its log a defined
}


@pytest.mark.parametrize("name", sorted(BINARY))
@op_settings
@given(data=st.data())
def test_binary_broadcast(backend, name, data):
    op, (lo_a, hi_a), (lo_b, hi_b) = BINARY[name]
    shape_a, shape_b = data.draw(broadcastable(2)).input_shapes
    a = data.draw(arrays(shape_a, lo_a, hi_a))
    b = data.draw(arrays(shape_b, lo_b, hi_b))
    check(backend, op, op, [a, b], data.draw(st.tuples(LAYOUTS, LAYOUTS)))


@pytest.mark.parametrize("name", sorted(BINARY))
@pytest.mark.parametrize("side", ["left", "right"])
@op_settings
@given(data=st.data())
def test_binary_with_scalar(backend, name, side, data):
    op, (lo_a, hi_a), (lo_b, hi_b) = BINARY[name]
    shape = data.draw(shapes())
    if side == "left":   # scalar (op) tensor
        s = data.draw(st.floats(lo_a, hi_a))
        x = data.draw(arrays(shape, lo_b, hi_b))
        fn = lambda t: op(s, t)  # noqa: E731
    else:                # tensor (op) scalar
        s = data.draw(st.floats(lo_b, hi_b))
        x = data.draw(arrays(shape, lo_a, hi_a))
        fn = lambda t: op(t, s)  # noqa: E731
    check(backend, fn, fn, [x], [data.draw(LAYOUTS)])


@pytest.mark.parametrize("exponent", [2, 3, -1, 0.5])
def test_pow_of_any_sign_with_integer_like_exponents(backend, exponent):
    x = np.array([[-1.5, -0.7, 0.6], [1.2, 0.9, -2.0]])
    if exponent == 0.5:
        x = np.abs(x)
    check(backend, lambda t: t ** exponent, lambda h: h ** exponent, [x], ["C"])


def test_scalar_operands_keep_the_tensor_dtype(backend):
    x = td.Tensor([1.0, 2.0], backend=backend.name)
    for y in (x + 1, 2.0 * x, x / np.float64(3), 1 - x, x ** 2, np.float32(2) * x):
        assert y.dtype == np.float32 and y.backend is backend


# -- elementwise unary ops ---------------------------------------------------------------------

UNARY = {  # name: (tinydiff fn, numpy fn, value range, kinks to stay away from)
    "neg": (lambda t: -t, np.negative, (-2, 2), ()),
    "exp": (td.exp, np.exp, (-2, 2), ()),
    "log": (td.log, np.log, (0.2, 3), ()),
    "sqrt": (td.sqrt, np.sqrt, (0.2, 3), ()),
    "abs": (td.abs, np.abs, (-2, 2), (0,)),
    "tanh": (td.tanh, np.tanh, (-3, 3), ()),
    "sigmoid": (td.sigmoid, _sigmoid, (-6, 6), ()),
    "relu": (td.relu, lambda x: np.maximum(x, 0), (-2, 2), (0,)),
    "silu": (td.silu, lambda x: x * _sigmoid(x), (-6, 6), ()),
    "method_exp": (lambda t: t.exp(), np.exp, (-2, 2), ()),
    "method_relu": (lambda t: t.relu(), lambda x: np.maximum(x, 0), (-2, 2), (0,)),
}


@pytest.mark.parametrize("name", sorted(UNARY))
@op_settings
@given(data=st.data())
def test_unary(backend, name, data):
    fn, np_fn, (lo, hi), kinks = UNARY[name]
    x = data.draw(arrays(data.draw(shapes()), lo, hi, kinks))
    check(backend, fn, np_fn, [x], [data.draw(LAYOUTS)])


def test_kinks_use_the_pytorch_subgradients(backend):
    x = td.Tensor(np.array([-1.0, 0.0, 1.0]), requires_grad=True, backend=backend.name)
    (td.abs(x).sum() + td.relu(x).sum() + x.clip(0.0, 1.0).sum()).backward()
    # abs: sign(0) = 0; relu: 0 at 0; clip: 1 on the closed interval [lo, hi]
    np.testing.assert_array_equal(backend.to_host(x.grad), [-1 + 0 + 0, 0 + 0 + 1, 1 + 1 + 1])


@op_settings
@given(data=st.data())
def test_clip(backend, data):
    lo, hi = -0.5, 0.7
    bounds = data.draw(st.sampled_from([(lo, hi), (lo, None), (None, hi)]))
    x = data.draw(arrays(data.draw(shapes()), -2, 2, kinks=[b for b in bounds if b is not None]))
    check(backend, lambda t: t.clip(*bounds), lambda h: np.clip(h, *bounds), [x],
          [data.draw(LAYOUTS)])


@op_settings
@given(data=st.data())
def test_astype(backend, data):
    x = data.draw(arrays(data.draw(shapes())))
    t = to_tensor(x, backend, data.draw(LAYOUTS))
    y = t.astype("float32")
    assert y.dtype == np.float32 and y.requires_grad
    np.testing.assert_array_equal(y.numpy(), x.astype(np.float32))
    y.sum().backward()
    assert t.grad.dtype == np.float64        # the gradient comes back in the input's dtype
    np.testing.assert_array_equal(backend.to_host(t.grad), np.ones_like(x))
    # through float32 and back: the identity, up to float32 rounding (hence the wide step)
    assert td.gradcheck(lambda t: t.astype(np.float32).astype(np.float64), [t], eps=1e-2,
                        atol=1e-4, rtol=1e-3)


# -- matmul ------------------------------------------------------------------------------------

@op_settings
@given(data=st.data())
def test_matmul_batched_broadcast(backend, data):
    batch_a, batch_b = data.draw(broadcastable(2, 0, 2, max_side=3)).input_shapes
    n, k, m = data.draw(st.tuples(*[st.integers(1, 3)] * 3))
    a = data.draw(arrays(batch_a + (n, k)))
    b = data.draw(arrays(batch_b + (k, m)))
    check(backend, operator.matmul, np.matmul, [a, b], data.draw(st.tuples(LAYOUTS, LAYOUTS)))


@op_settings
@given(data=st.data())
def test_matmul_one_dimensional(backend, data):
    k = data.draw(st.integers(1, 4))
    case = data.draw(st.sampled_from(["vec@mat", "mat@vec", "vec@vec", "vec@batch", "batch@vec"]))
    batch = data.draw(shapes(1, 2, max_side=3))
    left, right = {"vec@mat": ((k,), (k, 2)), "mat@vec": ((3, k), (k,)), "vec@vec": ((k,), (k,)),
                   "vec@batch": ((k,), batch + (k, 2)), "batch@vec": (batch + (2, k), (k,))}[case]
    a, b = data.draw(arrays(left)), data.draw(arrays(right))
    check(backend, td.matmul, np.matmul, [a, b], data.draw(st.tuples(LAYOUTS, LAYOUTS)))


# -- reductions ----------------------------------------------------------------------------------

REDUCTIONS = {  # name: (tinydiff fn, numpy fn, array strategy)
    "sum": (td.sum, np.sum, arrays),
    "mean": (td.mean, np.mean, arrays),
    "max": (td.max, np.max, distinct_arrays),         # distinct values: no ties to break
    "min": (td.min, np.min, distinct_arrays),
    "var": (td.var, np.var, arrays),
    "method_sum": (lambda t, a, k: t.sum(a, k), np.sum, arrays),
    "method_min": (lambda t, a, k: t.min(a, k), np.min, distinct_arrays),
}


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
@op_settings
@given(data=st.data())
def test_reduction(backend, name, data):
    fn, np_fn, values = REDUCTIONS[name]
    x = data.draw(values(data.draw(shapes())))
    axis, keepdims = data.draw(axes(x.ndim)), data.draw(st.booleans())
    check(backend, lambda t: fn(t, axis, keepdims), lambda h: np_fn(h, axis=axis, keepdims=keepdims),
          [x], [data.draw(LAYOUTS)])


def test_var_with_ddof(backend):
    x = np.arange(12.0).reshape(3, 4) ** 1.5
    check(backend, lambda t: t.var(axis=1, ddof=1), lambda h: np.var(h, axis=1, ddof=1), [x], ["F"])


def test_max_ties_share_the_gradient(backend):
    x = td.Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]), requires_grad=True,
                  backend=backend.name)
    x.max(axis=1).sum().backward()
    np.testing.assert_allclose(backend.to_host(x.grad), [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])


SOFTMAXES = {
    "softmax": (td.softmax, lambda x, a: np.exp(x - _logsumexp(x, a, keepdims=True))),
    "log_softmax": (td.log_softmax, lambda x, a: x - _logsumexp(x, a, keepdims=True)),
    "logsumexp": (td.logsumexp, _logsumexp),
}


@pytest.mark.parametrize("name", sorted(SOFTMAXES))
@op_settings
@given(data=st.data())
def test_softmax_family(backend, name, data):
    fn, np_fn = SOFTMAXES[name]
    x = data.draw(arrays(data.draw(shapes(min_dims=1)), -3, 3))
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    check(backend, lambda t: fn(t, axis), lambda h: np_fn(h, axis), [x], [data.draw(LAYOUTS)])


def test_logsumexp_over_several_axes_with_keepdims(backend):
    x = np.linspace(-2, 2, 24).reshape(2, 3, 4)
    check(backend, lambda t: t.logsumexp(axis=(0, 2), keepdims=True),
          lambda h: _logsumexp(h, (0, 2), keepdims=True), [x], ["strided"])


# -- numerical stability -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_and_logsumexp_of_large_inputs(backend, dtype):
    x_host = np.array([[1e4, 1e4 - 1.0, -1e4], [3e4, 3e4, 3e4]], dtype=dtype)
    x = td.Tensor(x_host, requires_grad=True, backend=backend.name)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        p, lp, lse = x.softmax(axis=1), x.log_softmax(axis=1), x.logsumexp(axis=1)
        (p.sum() + lp.sum() + lse.sum()).backward()
    e = np.exp(np.array([0.0, -1.0]))
    want_p = np.array([[e[0] / e.sum(), e[1] / e.sum(), 0.0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(p.numpy(), want_p, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(lse.numpy(), [1e4 + np.log(e.sum()), 3e4 + np.log(3.0)], rtol=1e-6)
    assert np.isfinite(lp.numpy()[:, :2]).all() and np.isfinite(backend.to_host(x.grad)).all()


def test_sigmoid_and_silu_of_large_inputs(backend):
    x = td.Tensor(np.array([-1e3, -50.0, 0.0, 50.0, 1e3], dtype=np.float32), requires_grad=True,
                  backend=backend.name)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        s = x.sigmoid()
        (s.sum() + x.silu().sum()).backward()
    np.testing.assert_allclose(s.numpy(), [0.0, np.exp(-50.0), 0.5, 1.0, 1.0], rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(x.silu().numpy(), [0.0, -50 * np.exp(-50.0), 0.0, 50.0, 1e3],
                               rtol=1e-6, atol=1e-30)
    assert np.isfinite(backend.to_host(x.grad)).all()


# -- shape ops -----------------------------------------------------------------------------------

@op_settings
@given(data=st.data())
def test_reshape(backend, data):
    x = data.draw(arrays(data.draw(shapes())))
    target = data.draw(st.sampled_from([(-1,), x.shape[::-1], (1,) + x.shape + (1,),
                                        (x.shape[0], -1) if x.ndim else ()]))
    check(backend, lambda t: t.reshape(target), lambda h: h.reshape(target), [x],
          [data.draw(LAYOUTS)])


@op_settings
@given(data=st.data())
def test_transpose_and_permute(backend, data):
    x = data.draw(arrays(data.draw(shapes())))
    perm = tuple(data.draw(st.permutations(range(x.ndim))))
    how = data.draw(st.sampled_from(["permute", "transpose", "function", "T"]))
    fn = {"permute": lambda t: t.permute(*perm), "transpose": lambda t: t.transpose(perm),
          "function": lambda t: td.transpose(t, perm), "T": lambda t: t.T}[how]
    np_fn = (lambda h: h.T) if how == "T" else (lambda h: h.transpose(perm))
    check(backend, fn, np_fn, [x], [data.draw(LAYOUTS)])


@op_settings
@given(data=st.data())
def test_basic_indexing(backend, data):
    x = data.draw(arrays(data.draw(shapes(min_dims=1))))
    key = data.draw(basic_index(x.shape))
    check(backend, lambda t: t[key], lambda h: h[key], [x], [data.draw(LAYOUTS)])


@op_settings
@given(data=st.data())
def test_integer_array_indexing_with_repeats(backend, data):
    x = data.draw(arrays(data.draw(shapes(min_dims=1))))
    key = data.draw(integer_index(x.shape))
    check(backend, lambda t: t[key], lambda h: h[key], [x], [data.draw(LAYOUTS)])


def test_repeated_index_accumulates(backend):
    x = td.Tensor(np.zeros(3), requires_grad=True, backend=backend.name)
    x[np.array([0, 2, 0, 0])].sum().backward()
    np.testing.assert_array_equal(backend.to_host(x.grad), [3, 0, 1])


def test_boolean_mask_and_list_indexing(backend):
    x = np.arange(12.0).reshape(3, 4) / 7
    mask = x > 0.5
    check(backend, lambda t: t[mask], lambda h: h[mask], [x], ["F"])
    check(backend, lambda t: t[[2, 0, 2]], lambda h: h[[2, 0, 2]], [x], ["C"])


@st.composite
def _concat_case(draw):
    base = list(draw(shapes(min_dims=1)))
    axis = draw(st.integers(-len(base), len(base) - 1))
    pieces = []
    for _ in range(draw(st.integers(1, 3))):
        base[axis] = draw(st.integers(1, 3))
        pieces.append(draw(arrays(tuple(base))))
    return pieces, axis


@op_settings
@given(data=st.data())
def test_concat(backend, data):
    pieces, axis = data.draw(_concat_case())
    check(backend, lambda *ts: td.concat(ts, axis=axis), lambda *hs: np.concatenate(hs, axis=axis),
          pieces, data.draw(st.lists(LAYOUTS, min_size=len(pieces), max_size=len(pieces))))


@op_settings
@given(data=st.data())
def test_stack(backend, data):
    shape, n = data.draw(shapes()), data.draw(st.integers(1, 3))
    pieces = [data.draw(arrays(shape)) for _ in range(n)]
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)))
    check(backend, lambda *ts: td.stack(ts, axis=axis), lambda *hs: np.stack(hs, axis=axis),
          pieces, data.draw(st.lists(LAYOUTS, min_size=n, max_size=n)))


@op_settings
@given(data=st.data())
def test_pad(backend, data):
    x = data.draw(arrays(data.draw(shapes())))
    widths = tuple(data.draw(st.tuples(st.integers(0, 2), st.integers(0, 2))) for _ in x.shape)
    value = data.draw(st.sampled_from([0.0, -1.5]))
    np_pad = lambda h: np.pad(h, widths, constant_values=value) if h.ndim else h  # noqa: E731
    check(backend, lambda t: td.pad(t, widths, value), np_pad, [x], [data.draw(LAYOUTS)])


@op_settings
@given(data=st.data())
def test_broadcast_to(backend, data):
    shape = data.draw(shapes(max_side=3))
    lead = data.draw(shapes(min_dims=0, max_dims=2, max_side=3))       # new leading axes
    target = lead + tuple(data.draw(st.integers(1, 3)) if s == 1 else s for s in shape)
    x = data.draw(arrays(shape))
    check(backend, lambda t: td.broadcast_to(t, target), lambda h: np.broadcast_to(h, target), [x],
          [data.draw(LAYOUTS)])


@op_settings
@given(data=st.data())
def test_where(backend, data):
    shape_c, shape_a, shape_b = data.draw(broadcastable(3)).input_shapes
    cond = data.draw(st.builds(lambda s: np.random.default_rng(s).random(shape_c) > 0.5,
                               st.integers(0, 2 ** 16)))
    a, b = data.draw(arrays(shape_a)), data.draw(arrays(shape_b))
    cond_dev = backend.asarray(cond)
    check(backend, lambda x, y: td.where(cond_dev, x, y), lambda x, y: np.where(cond, x, y), [a, b],
          data.draw(st.tuples(LAYOUTS, LAYOUTS)))


def test_where_with_a_scalar_branch(backend):
    x = np.array([[-1.0, 2.0], [0.5, -3.0]])
    cond = td.Tensor(x, backend=backend.name) > 0
    check(backend, lambda t: td.where(cond, t, 0.0), lambda h: np.where(h > 0, h, 0.0), [x], ["C"])
    check(backend, lambda t: td.where(cond, 1.0, t * 2), lambda h: np.where(h > 0, 1.0, h * 2), [x], ["F"])


# -- a composite: shared inputs, many ops at once ------------------------------------------------

@op_settings
@given(data=st.data())
def test_composite_expression(backend, data):
    shape_a, shape_b = data.draw(broadcastable(2, min_dims=1, max_dims=2)).input_shapes
    a, b = data.draw(arrays(shape_a)), data.draw(arrays(shape_b, 0.5, 2))

    def fn(x, y):
        z = (x * y - x / y).tanh() + (x ** 2).sigmoid() * y
        return z.log_softmax(-1) + z.mean(axis=-1, keepdims=True) * x

    def np_fn(x, y):
        z = np.tanh(x * y - x / y) + _sigmoid(x ** 2) * y
        m = np.max(z, axis=-1, keepdims=True)
        lsm = z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))
        return lsm + z.mean(axis=-1, keepdims=True) * x
    check(backend, fn, np_fn, [a, b], data.draw(st.tuples(LAYOUTS, LAYOUTS)), rtol=1e-9)
