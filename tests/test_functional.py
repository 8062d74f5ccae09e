"""tinydiff.nn.functional: float64 gradient checks (Hypothesis, every backend), agreement with
torch.nn.functional when PyTorch is importable, and clear errors on bad input."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinydiff as td
import tinydiff.nn.functional as F


# the backend fixture is a constant per test, so sharing it across Hypothesis examples is fine
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                             HealthCheck.data_too_large])


def T(backend, a, grad=True):
    return td.Tensor(backend.asarray(np.asarray(a, dtype=np.float64)), requires_grad=grad)


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


# -- conv2d ------------------------------------------------------------------------------------

@st.composite
def conv_case(draw, transposed=False):
    groups = draw(st.integers(1, 3))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = draw(st.integers(1, 6))
    w = draw(st.integers(1, 6))
    if transposed:
        op = (draw(st.integers(0, max(stride[0], dilation[0]) - 1)),
              draw(st.integers(0, max(stride[1], dilation[1]) - 1)))
        oh = (h - 1) * stride[0] - 2 * padding[0] + dilation[0] * (kh - 1) + op[0] + 1
        ow = (w - 1) * stride[1] - 2 * padding[1] + dilation[1] * (kw - 1) + op[1] + 1
        if oh < 1 or ow < 1:
            padding, op = (0, 0), op
    else:
        op = None
        h = max(h, dilation[0] * (kh - 1) + 1 - 2 * padding[0])
        w = max(w, dilation[1] * (kw - 1) + 1 - 2 * padding[1])
    n = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return dict(groups=groups, cin=cin, cout=cout, k=(kh, kw), stride=stride, dilation=dilation,
                padding=padding, hw=(h, w), n=n, bias=bias, seed=seed, output_padding=op)


def _conv_inputs(backend, c, transposed):
    x = randn(c["seed"], c["n"], c["cin"], *c["hw"])
    wshape = ((c["cin"], c["cout"] // c["groups"]) if transposed else
              (c["cout"], c["cin"] // c["groups"])) + c["k"]
    w = randn(c["seed"] + 1, *wshape)
    b = randn(c["seed"] + 2, c["cout"]) if c["bias"] else None
    return x, w, b


def _conv_fn(c, transposed, lib):
    kw = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])
    if transposed:
        kw["output_padding"] = c["output_padding"]
        return lambda x, w, b=None: lib.conv_transpose2d(x, w, b, **kw)
    return lambda x, w, b=None: lib.conv2d(x, w, b, **kw)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
@given(c=st.data())
@fixture_ok
def test_conv_gradcheck(backend, transposed, c):
    c = c.draw(conv_case(transposed))
    x, w, b = _conv_inputs(backend, c, transposed)
    inputs = [T(backend, x), T(backend, w)] + ([T(backend, b)] if b is not None else [])
    assert td.gradcheck(_conv_fn(c, transposed, F), inputs, mode="directional", seed=c["seed"])


@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
@given(c=st.data())
def test_conv_matches_torch(transposed, c):
    torch = pytest.importorskip("torch")
    c = c.draw(conv_case(transposed))
    backend = td.get_backend("numpy")
    x, w, b = _conv_inputs(backend, c, transposed)
    _check_against_torch(_conv_fn(c, transposed, F), _conv_fn(c, transposed, torch.nn.functional),
                         [x, w] + ([b] if b is not None else []), seed=c["seed"])


def _check_against_torch(ours, theirs, arrays, seed=0, rtol=1e-10, atol=1e-10):
    """Forward values and every input gradient (for a random output cotangent) agree in float64."""
    torch = pytest.importorskip("torch")
    ts = [td.Tensor(a.copy(), requires_grad=True) for a in arrays]
    out = ours(*ts)
    g = randn(seed + 7, *out.shape)
    out.backward(g)
    tt = [torch.tensor(a, requires_grad=True) for a in arrays]
    ref = theirs(*tt)
    ref.backward(torch.tensor(g))
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=rtol, atol=atol)
    for i, (a, b) in enumerate(zip(ts, tt)):
        np.testing.assert_allclose(a.grad, b.grad.numpy(), rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {i}")


def test_conv_float32_stays_float32(backend):
    x = td.Tensor(backend.asarray(randn(0, 2, 3, 8, 8).astype(np.float32)), requires_grad=True)
    w = td.Tensor(backend.asarray(randn(1, 4, 3, 3, 3).astype(np.float32)), requires_grad=True)
    b = td.Tensor(backend.asarray(randn(2, 4).astype(np.float32)), requires_grad=True)
    y = F.conv2d(x, w, b, stride=2, padding=1)
    z = F.conv_transpose2d(y, w, b[:3], stride=2, padding=1, output_padding=1)
    assert y.dtype == np.float32 and z.dtype == np.float32 and z.shape == x.shape
    z.sum().backward()
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == np.float32


# -- linear, group norm, silu ------------------------------------------------------------------

@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), fin=st.integers(1, 5),
       fout=st.integers(1, 4), bias=st.booleans(), seed=st.integers(0, 2**16))
@fixture_ok
def test_linear_gradcheck(backend, lead, fin, fout, bias, seed):
    inputs = [T(backend, randn(seed, *lead, fin)), T(backend, randn(seed + 1, fout, fin))]
    inputs += [T(backend, randn(seed + 2, fout))] if bias else []
    assert td.gradcheck(F.linear, inputs, seed=seed)


@st.composite
def norm_case(draw):
    groups = draw(st.integers(1, 3))
    c = groups * draw(st.integers(1, 3))
    spatial = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    if c // groups * int(np.prod(spatial)) < 2:
        spatial = spatial + [2]
    return dict(n=draw(st.integers(1, 2)), c=c, groups=groups, spatial=tuple(spatial),
                affine=draw(st.sampled_from(["both", "weight", "bias", "none"])),
                seed=draw(st.integers(0, 2**16)))


def _norm_inputs(backend, c, to=None):
    to = to or (lambda a: T(backend, a))
    x = randn(c["seed"], c["n"], c["c"], *c["spatial"]) * 3 + 1
    w = randn(c["seed"] + 1, c["c"]) if c["affine"] in ("both", "weight") else None
    b = randn(c["seed"] + 2, c["c"]) if c["affine"] in ("both", "bias") else None
    return [to(x)] + [to(a) if a is not None else None for a in (w, b)]


@given(c=norm_case())
@fixture_ok
def test_group_norm_gradcheck(backend, c):
    x, w, b = _norm_inputs(backend, c)
    params = [p for p in (w, b) if p is not None]

    def fn(x, *ps):
        it = iter(ps)
        return F.group_norm(x, c["groups"], next(it) if w is not None else None,
                            next(it) if b is not None else None)
    assert td.gradcheck(fn, [x] + params, seed=c["seed"])


@given(c=norm_case())
def test_group_norm_matches_torch(c):
    torch = pytest.importorskip("torch")
    x, w, b = _norm_inputs(None, c, to=lambda a: a)
    arrays = [a for a in (x, w, b) if a is not None]

    def call(lib):
        def fn(x, *ps):
            it = iter(ps)
            wt, bt = next(it) if w is not None else None, next(it) if b is not None else None
            if lib is not F and wt is None and bt is not None:   # torch needs the weight then
                wt = torch.ones(c["c"], dtype=torch.float64)
            return lib.group_norm(x, c["groups"], wt, bt)
        return fn
    _check_against_torch(call(F), call(torch.nn.functional), arrays, seed=c["seed"])


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1.0, 10.0]))
@fixture_ok
def test_silu_gradcheck(backend, shape, seed, scale):
    assert td.gradcheck(F.silu, [T(backend, randn(seed, *shape) * scale)], seed=seed)


def test_silu_matches_torch_and_is_finite_at_extremes():
    torch = pytest.importorskip("torch")
    x = np.concatenate([randn(0, 50) * 5, [-1e4, -100.0, 0.0, 100.0, 1e4]])
    _check_against_torch(F.silu, torch.nn.functional.silu, [x])
    for dtype in (np.float32, np.float64):
        y = F.silu(td.Tensor(np.array([-1e30, -90.0, 90.0, 1e30], dtype=dtype))).numpy()
        assert np.all(np.isfinite(y[:3])) and y.dtype == dtype


def test_linear_matches_torch():
    torch = pytest.importorskip("torch")
    _check_against_torch(F.linear, torch.nn.functional.linear,
                         [randn(0, 3, 2, 5), randn(1, 4, 5), randn(2, 4)])


# -- bad input ---------------------------------------------------------------------------------

def test_bad_input_messages():
    x = td.Tensor(np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(td.ShapeError, match=r"conv2d: input \(2, 3, 5, 5\) has 3 channels but weight"):
        F.conv2d(x, np.zeros((4, 2, 3, 3), np.float32))
    with pytest.raises(td.ShapeError, match=r"conv2d: kernel 8x8 .* larger than the padded input 7x7"):
        F.conv2d(x, np.zeros((4, 3, 8, 8), np.float32), padding=1)
    with pytest.raises(td.ShapeError, match=r"conv2d: groups=2 must divide .* input channels \(3"):
        F.conv2d(x, np.zeros((4, 1, 3, 3), np.float32), groups=2)
    with pytest.raises(td.ShapeError, match=r"conv_transpose2d: input \(2, 3, 5, 5\) has 3 channels"):
        F.conv_transpose2d(x, np.zeros((4, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"output_padding \(2, 2\) must be smaller than stride"):
        F.conv_transpose2d(x, np.zeros((3, 2, 3, 3), np.float32), stride=2, output_padding=2)
    with pytest.raises(td.ShapeError, match=r"group_norm: num_groups=2 must be a positive divisor of the 3"):
        F.group_norm(x, 2)
    with pytest.raises(td.ShapeError, match=r"group_norm: weight must have shape \(3,\)"):
        F.group_norm(x, 3, np.ones(4, np.float32))
    with pytest.raises(td.ShapeError, match=r"linear: input has 5 features .* expects 4"):
        F.linear(x, np.zeros((2, 4), np.float32))
    with pytest.raises(td.ShapeError, match=r"conv2d: bias must have shape \(4,\)"):
        F.conv2d(x, np.zeros((4, 3, 3, 3), np.float32), np.zeros(3, np.float32))


@given(c=norm_case(), with_shift=st.booleans())
@fixture_ok
def test_group_norm_silu_gradcheck(backend, c, with_shift):
    if c["affine"] in ("weight", "bias"):
        c["affine"] = "both"
    x, w, b = _norm_inputs(backend, c)
    shift = T(backend, randn(c["seed"] + 3, c["n"], c["c"])) if with_shift else None
    inputs = [x] + ([shift] if with_shift else []) + ([w, b] if w is not None else [])

    def fn(x, *rest):
        rest = list(rest)
        s = rest.pop(0) if with_shift else None
        return F.group_norm_silu(x, c["groups"], *rest, shift=s)
    assert td.gradcheck(fn, inputs, seed=c["seed"])


@given(c=norm_case())
def test_group_norm_silu_matches_torch(c):
    torch = pytest.importorskip("torch")
    c["affine"] = "both"
    x, w, b = _norm_inputs(None, c, to=lambda a: a)
    shift = randn(c["seed"] + 3, c["n"], c["c"])
    tail = (1,) * len(c["spatial"])

    def theirs(x, s, w, b):
        return torch.nn.functional.silu(torch.nn.functional.group_norm(
            x + s.reshape(s.shape + tail), c["groups"], w, b))
    _check_against_torch(lambda x, s, w, b: F.group_norm_silu(x, c["groups"], w, b, shift=s),
                         theirs, [x, shift, w, b], seed=c["seed"])
