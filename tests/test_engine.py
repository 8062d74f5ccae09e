"""Engine properties: the reverse pass, memory, grad mode, VJPs, and the errors on bad input."""
import gc
import sys
import weakref

import numpy as np
import pytest

import tinydiff as td
from tinydiff.tensor import Function


def T(values, backend, requires_grad=False, dtype=np.float64):
    return td.Tensor(np.asarray(values, dtype=dtype), requires_grad=requires_grad, backend=backend.name)


def host(array, backend):
    return backend.to_host(array)


def weak(array):
    """A weak reference to the memory behind ``array`` (the strict stand-in wraps a NumPy array)."""
    try:
        return weakref.ref(getattr(array, "_a", array))
    except TypeError:
        pytest.skip(f"{type(array).__name__} does not support weak references")


# -- the reverse pass ----------------------------------------------------------------------------

def test_a_10000_op_chain_backward_does_not_recurse(backend):
    x = T([0.5, -0.25], backend, requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001 + 0.0
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(500)           # far below the chain length: recursion would fail
    try:
        y.sum().backward()
    finally:
        sys.setrecursionlimit(limit)
    np.testing.assert_allclose(host(x.grad, backend), [1.0001 ** 10_000] * 2, rtol=1e-9)


def test_a_deep_graph_can_be_dropped_without_backward(backend):
    x = T([1.0], backend, requires_grad=True)
    y = x
    for _ in range(20_000):
        y = y + 1.0
    del y                                # deallocating a 20,000-deep chain must not crash
    gc.collect()
    assert x.grad is None


def test_shared_subexpressions_accumulate(backend):
    x = T([1.5, -2.0, 0.5], backend, requires_grad=True)
    a = x.exp()
    y = (a * a + a * x + x).sum()        # x used 3 times, a 3 times
    y.backward()
    xv, av = np.array([1.5, -2.0, 0.5]), np.exp([1.5, -2.0, 0.5])
    np.testing.assert_allclose(host(x.grad, backend), 2 * av * av + av * xv + av + 1, rtol=1e-12)


def test_backward_twice_accumulates_into_grad(backend):
    x = T([1.0, 2.0], backend, requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(host(x.grad, backend), [4.0, 8.0])


def test_backward_visits_ops_in_a_deterministic_order(backend):
    order = []

    class Tag(Function):
        def forward(self, a, name):
            self.name = name
            return a * 1

        def backward(self, g):
            order.append(self.name)
            return g

    def run():
        order.clear()
        x = T([1.0, 2.0], backend, requires_grad=True)
        a, b = Tag.apply(x, name="a"), Tag.apply(x, name="b")
        c = Tag.apply(a * b, name="c")
        d = Tag.apply(a + c, name="d")
        (d + Tag.apply(b, name="e")).sum().backward()
        return list(order)

    first = run()
    assert first == run() == run()
    # a node's backward runs only after everything that uses it: d and e before c, c before a, b
    assert first.index("d") < first.index("c") < first.index("a")
    assert first.index("c") < first.index("b") and first.index("e") < first.index("b")


def test_results_are_deterministic_for_a_fixed_seed(backend):
    def run(seed):
        rng = backend.default_rng(seed)
        w = td.Tensor(rng.normal((4, 3), dtype=np.float64), requires_grad=True)
        x = td.Tensor(rng.uniform((5, 4), -1, 1, dtype=np.float64))
        loss = (x @ w).tanh().logsumexp(axis=1).mean()
        loss.backward()
        return loss.numpy(), host(w.grad, backend)

    (l1, g1), (l2, g2), (l3, _) = run(7), run(7), run(8)
    assert np.array_equal(l1, l2) and np.array_equal(g1, g2)
    assert not np.array_equal(l1, l3)


def test_leaf_gradients_are_fresh_writable_arrays(backend):
    a, b = T([1.0, 2.0], backend, True), T([3.0, 4.0], backend, True)
    (a + b).sum().backward()             # Add hands the same array to both inputs
    assert a.grad is not b.grad
    a.grad += 1                          # optimizers update gradients in place
    np.testing.assert_array_equal(host(b.grad, backend), [1.0, 1.0])
    s = T(2.0, backend, True)
    td.broadcast_to(s, (3,)).sum().backward()   # a read-only broadcast view inside
    s.grad *= 2
    assert float(host(s.grad, backend)) == 6.0


def test_backward_with_an_explicit_gradient(backend):
    x = T([[1.0, 2.0], [3.0, 4.0]], backend, requires_grad=True)
    (x * 3).backward(np.array([[1.0, 0.0], [0.5, 2.0]]))   # a host array is moved explicitly
    np.testing.assert_allclose(host(x.grad, backend), [[3.0, 0.0], [1.5, 6.0]])


# -- memory: an op keeps only what its backward uses, and lets go after backward ---------------

def test_saved_arrays_are_freed_by_backward(backend):
    x = T(np.linspace(-1, 1, 6), backend, requires_grad=True)
    b = (x * 2).exp()                    # Exp saves its output for backward
    loss = b.sum()
    saved, fn = weak(b.data), b._ctx
    del b
    gc.collect()
    assert saved() is not None           # still held by Exp for the backward pass
    loss.backward()
    gc.collect()
    assert saved() is None               # released as soon as Exp's backward ran
    assert fn.released and not hasattr(fn, "y") and not hasattr(fn, "parents")


def test_arrays_no_backward_needs_are_not_kept(backend):
    x = T(np.linspace(-1, 1, 6), backend, requires_grad=True)
    a = x * 2
    loss = (a + 1.0).sum()               # Add's backward needs shapes only, not a's values
    kept = weak(a.data)
    del a
    gc.collect()
    assert kept() is None
    loss.backward()
    np.testing.assert_allclose(host(x.grad, backend), 2.0)


def test_second_backward_through_a_freed_graph_is_refused(backend):
    x = T([1.0, 2.0], backend, requires_grad=True)
    y = (x.exp() * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="freed.*retain_graph=True"):
        y.backward()
    z = (x.exp() * x).sum()
    shared = x.tanh()
    u, v = (shared * 2).sum(), (shared * 3).sum()
    u.backward()                         # frees tanh, which v also goes through
    with pytest.raises(RuntimeError, match="freed"):
        v.backward()
    with pytest.raises(RuntimeError, match="freed"):
        td.grad(v, [x])
    z.backward(retain_graph=True)
    z.backward()                         # allowed: the first pass kept the graph


# -- grad mode ------------------------------------------------------------------------------------

def test_no_grad_context_builds_no_graph(backend):
    x = T([1.0, 2.0], backend, requires_grad=True)
    with td.no_grad():
        assert not td.is_grad_enabled()
        y = (x * 2).exp().sum()
    assert td.is_grad_enabled()
    assert not y.requires_grad and y._ctx is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()


def test_no_grad_as_decorator_with_and_without_parentheses(backend):
    x = T([1.0, 2.0], backend, requires_grad=True)

    @td.no_grad()
    def f(t):
        return t * 2

    @td.no_grad
    def g(t, depth=3):                   # recursion re-enters the same decorator
        return t * 3 if depth == 0 else g(t, depth - 1)

    for out in (f(x), g(x)):
        assert not out.requires_grad and out._ctx is None
    assert td.is_grad_enabled() and (x * 2).requires_grad


def test_no_grad_restores_the_mode_after_an_exception_and_when_nested():
    guard = td.no_grad()
    with pytest.raises(ValueError):
        with guard:
            raise ValueError
    assert td.is_grad_enabled()
    with guard:
        with guard:                      # the same instance entered twice
            pass
        assert not td.is_grad_enabled()
    assert td.is_grad_enabled()


# -- grad(): vector-Jacobian products without touching .grad -------------------------------------

def test_grad_gives_the_vjp_with_respect_to_inputs(backend):
    rng = np.random.default_rng(0)
    W, xv, v = rng.standard_normal((3, 4)), rng.standard_normal(4), rng.standard_normal(3)
    w = T(W, backend, requires_grad=True)
    x = T(xv, backend, requires_grad=True)
    y = (w @ x).tanh()                   # y = tanh(W x): J = diag(1 - y^2) W
    (gx,) = td.grad(y, [x], grad_output=T(v, backend))
    J = (1 - np.tanh(W @ xv) ** 2)[:, None] * W
    np.testing.assert_allclose(host(gx, backend), v @ J, rtol=1e-12)
    assert x.grad is None and w.grad is None


def test_grad_wrt_an_intermediate_and_an_unused_input(backend):
    x = T([1.0, 2.0], backend, requires_grad=True)
    unused = T([5.0], backend, requires_grad=True)
    h = x * 3
    y = (h * h).sum()
    gh, gx, gu = td.grad(y, [h, x, unused], retain_graph=True)
    np.testing.assert_allclose(host(gh, backend), 2 * 3 * np.array([1.0, 2.0]))
    np.testing.assert_allclose(host(gx, backend), 18 * np.array([1.0, 2.0]))
    np.testing.assert_array_equal(host(gu, backend), [0.0])
    with pytest.raises(RuntimeError, match="input 0 does not require grad"):
        td.grad(y, [T([1.0], backend)])


def test_grad_asks_each_op_only_for_the_gradients_it_needs(backend):
    seen = []

    class Spy(Function):
        def forward(self, a, b):
            self.a, self.b = a, b
            return a * b

        def backward(self, g):
            seen.append(self.needs_grad)
            return (g * self.b if self.needs_grad[0] else None,
                    g * self.a if self.needs_grad[1] else None)

    x, w = T([1.0, 2.0], backend, True), T([3.0, 4.0], backend, True)
    out = Spy.apply(x, w).sum()
    (gx,) = td.grad(out, [x], retain_graph=True)
    assert seen == [(True, False)]        # no weight gradient computed for a VJP wrt x
    np.testing.assert_array_equal(host(gx, backend), [3.0, 4.0])
    out.backward()
    assert seen[-1] == (True, True)
    np.testing.assert_array_equal(host(w.grad, backend), [1.0, 2.0])


# -- bad input -------------------------------------------------------------------------------------

def test_backward_on_a_non_scalar_needs_a_gradient(backend):
    y = T([1.0, 2.0], backend, requires_grad=True) * 2
    with pytest.raises(RuntimeError, match=r"scalar output.*shape \(2,\)"):
        y.backward()
    with pytest.raises(td.ShapeError, match=r"grad has shape \(3,\), output has \(2,\)"):
        y.backward(np.ones(3))


@pytest.mark.parametrize("case, pattern", [
    (lambda a, b: a + b, r"add.*\(2, 3\).*\(4,\)"),
    (lambda a, b: a * b, r"mul.*\(2, 3\).*\(4,\)"),
    (lambda a, b: a @ b.reshape(4, 1), r"matmul.*\(2, 3\).*\(4, 1\)"),
    (lambda a, b: td.concat([a, b.reshape(1, 4)]), r"concat.*\(2, 3\).*\(1, 4\)"),
    (lambda a, b: td.stack([a, a.T]), r"stack.*\(2, 3\).*\(3, 2\)"),
    (lambda a, b: a.reshape(4, 2), r"reshape.*\(2, 3\)"),
    (lambda a, b: a[5], r"getitem.*5.*\(2, 3\)"),
    (lambda a, b: a.transpose(0, 0), r"transpose.*\(0, 0\)"),
    (lambda a, b: a.sum(axis=2), r"axis 2 is out of range.*2 dimensions"),
    (lambda a, b: td.pad(a, [(1, 1)]), r"pad.*1 \(before, after\) pairs.*\(2, 3\)"),
    (lambda a, b: td.broadcast_to(a, (3, 3)), r"broadcastto.*\(2, 3\)"),
    (lambda a, b: td.where(a > 0, a, b), r"where.*\(2, 3\).*\(4,\)"),
])
def test_shape_errors_name_the_op_and_the_shapes(backend, case, pattern):
    a = T(np.ones((2, 3)), backend, requires_grad=True)
    b = T(np.ones(4), backend)
    with pytest.raises(td.ShapeError, match=pattern):
        case(a, b)


def test_integer_tensors_are_refused_where_they_make_no_sense(backend):
    i = td.Tensor(np.array([1, 2, 3]), backend=backend.name)
    for op in (td.log, td.exp, td.sqrt, td.tanh, td.sigmoid, td.softmax):
        with pytest.raises(TypeError, match=r"expected a floating-point tensor, got int64"):
            op(i)
    with pytest.raises(TypeError, match="only floating-point tensors can require gradients"):
        td.Tensor(np.array([1, 2]), requires_grad=True, backend=backend.name)
    with pytest.raises(TypeError, match="only floating-point tensors can require gradients"):
        i.requires_grad = True
    np.testing.assert_allclose(td.log(i.astype("float32")).numpy(), np.log([1, 2, 3]), rtol=1e-6)
    assert (i + 1).dtype == np.int64 and (i * 2).numpy().tolist() == [2, 4, 6]


def test_a_wrong_gradient_shape_from_a_custom_op_is_reported(backend):
    class Broken(Function):
        def forward(self, a):
            return a.sum()

        def backward(self, g):
            return g                      # forgot to broadcast back to the input's shape

    x = T([1.0, 2.0], backend, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"Broken.backward returned a gradient of shape \(\) "
                                           r"for input 0 of shape \(2,\)"):
        Broken.apply(x).backward()


# -- the Tensor object -----------------------------------------------------------------------------

def test_dtypes_default_to_float32_and_keep_float64(backend):
    assert td.Tensor([1, 2]).dtype == np.float32
    assert td.Tensor(3.0, backend=backend.name).dtype == np.float32
    x = T([1.0, 2.0], backend)
    assert x.dtype == np.float64
    for y in (x.sum(), x.mean(), x.max(), x.var(), x.exp(), x * 2, x.logsumexp(), x[0]):
        assert y.dtype == np.float64, y


def test_repr_is_readable(backend):
    x = td.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3), requires_grad=True,
                  backend=backend.name)
    text = repr(x)
    for part in ("Tensor(shape=(2, 3)", "dtype=float32", f"backend={backend.name}",
                 "requires_grad=True", "[[0. 1. 2.]"):
        assert part in text, text
    big = repr(td.Tensor(np.zeros((100, 100)), backend=backend.name))
    assert "..." in big and len(big) < 600


def test_item_numpy_detach_and_to(backend):
    x = T([[1.5, 2.0]], backend, requires_grad=True)
    h = x.numpy()
    assert type(h) is np.ndarray and h.tolist() == [[1.5, 2.0]]
    assert x.sum().item() == 3.5 and isinstance(x.sum().item(), float) and float(x[0, 0]) == 1.5
    with pytest.raises(ValueError, match="one element"):
        x.item()
    d = (x * 2).detach()
    assert d.is_leaf and not d.requires_grad and d.numpy().tolist() == [[3.0, 4.0]]
    on_numpy = x.to("numpy")
    assert on_numpy.backend.name == "numpy" and on_numpy.requires_grad and on_numpy.is_leaf
    np.testing.assert_array_equal(on_numpy.numpy(), h)
    assert x.to(backend.name) is x
    rows = list(x[0])
    assert [r.item() for r in rows] == [1.5, 2.0]
    a, b = x[0]
    assert b.item() == 2.0
    assert len(x) == 1 and x.shape == (1, 2) and x.ndim == 2 and x.size == 2


# -- gradcheck itself ------------------------------------------------------------------------------

def test_gradcheck_reports_where_backward_is_wrong(backend):
    class WrongSquare(Function):
        def forward(self, a):
            self.a = a
            return a * a

        def backward(self, g):
            return g * 2 * self.a * (1 + (self.a > 1.5))    # right below 1.5, doubled above

    x = T([[0.5, 1.0], [2.0, -1.0]], backend, requires_grad=True)
    with pytest.raises(td.GradcheckError, match=r"input 0 \(shape \(2, 2\)\): 1 of 4 gradient "
                                                r"entries disagree; first at index \(1, 0\)"):
        td.gradcheck(WrongSquare.apply, [x])
    with pytest.raises(td.GradcheckError, match=r"input 0 \(shape \(2, 2\)\), direction 0"):
        td.gradcheck(WrongSquare.apply, [x], mode="directional")
    assert td.gradcheck(lambda t: t * t, [x], mode="directional")


def test_gradcheck_checks_its_arguments_and_keeps_index_inputs(backend):
    x32 = td.Tensor(np.ones(3, dtype=np.float32), requires_grad=True, backend=backend.name)
    with pytest.raises(ValueError, match="float32; use float64"):
        td.gradcheck(lambda t: t * 2, [x32])
    with pytest.raises(ValueError, match="no input requires grad"):
        td.gradcheck(lambda t: t * 2, [T([1.0], backend)])
    x = T([1.0, 2.0, 3.0], backend, requires_grad=True)
    idx = td.Tensor(np.array([2, 0, 2]), backend=backend.name)     # an int input, not checked
    assert td.gradcheck(lambda t, i: t[i] * t[i], [x, idx])
