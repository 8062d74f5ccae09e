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


def test_group_norm_silu_at_extreme_outputs_is_exact_and_quiet(backend):
    # y = gamma xhat + beta far beyond exp's float32 range (y down to about -1e3): silu computed as
    # y / (1 + exp(-y)) overflows exp to inf there, which must give silu -> -0 and a zero
    # gradient without a warning, and the values elsewhere must match a float64 evaluation
    import warnings
    x = randn(0, 2, 8, 3, 3)
    w, b = np.full(8, 300.0, np.float32), np.linspace(-50, 50, 8).astype(np.float32)
    xt = T(backend, x)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        y = F.group_norm_silu(xt, 4, T(backend, w), T(backend, b))
        y.sum().backward()
    xs = x.astype(np.float64).reshape(2, 4, -1)
    xhat = ((xs - xs.mean(-1, keepdims=True)) / np.sqrt(xs.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    pre = xhat * w[:, None, None] + b[:, None, None]
    assert pre.min() < -300 and pre.max() > 300
    with np.errstate(over="ignore"):
        expected = pre / (1 + np.exp(-pre))
    np.testing.assert_allclose(backend.to_host(y.data), expected, rtol=1e-4, atol=1e-4)
    assert np.isfinite(backend.to_host(xt.grad)).all()


@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_on_a_channels_last_input_equals_nchw(silu):
    # a conv's channels-last output and an NCHW array take different paths through the op
    # (contiguous (N, S, C) rows against a strided view): the same values, forward and backward
    from tinydiff.nn import _norm
    x = randn(0, 5, 8, 6, 6) * 3 + 1
    s, w, b = randn(1, 5, 8), randn(2, 8), randn(3, 8)
    g = randn(4, 5, 8, 6, 6)
    cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert _norm._rows(cl).flags.c_contiguous and not _norm._rows(x).flags.c_contiguous
    results = []
    for a in (x, cl):
        ts = [td.Tensor(v.copy() if v.ndim < 4 else v, requires_grad=True) for v in (a, s, w, b)]
        fn = F.group_norm_silu if silu else F.group_norm
        y = (fn(ts[0], 4, ts[2], ts[3], shift=ts[1]) if silu else fn(ts[0], 4, ts[2], ts[3]))
        y.backward(g)
        results.append([y.numpy()] + [t.grad for t in ts if t.grad is not None])
    for mine, ref in zip(results[1], results[0]):
        np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=1e-5)


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


# -- phase 2: layer norm, gelu, dropout, pooling, upsampling, embedding, attention --------------

@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       norm=st.lists(st.integers(1, 3), min_size=1, max_size=2), affine=st.booleans(),
       seed=st.integers(0, 2**16))
@fixture_ok
def test_layer_norm_gradcheck_and_torch(backend, lead, norm, affine, seed):
    norm = tuple(norm) if int(np.prod(norm)) > 1 else tuple(norm) + (2,)
    arrays = [randn(seed, *lead, *norm) * 2 + 1]
    arrays += [randn(seed + 1, *norm), randn(seed + 2, *norm)] if affine else []
    fn = lambda lib: lambda x, *wb: lib.layer_norm(x, norm, *wb)  # noqa: E731
    assert td.gradcheck(fn(F), [T(backend, a) for a in arrays], seed=seed)
    if backend.name == "numpy":
        torch = pytest.importorskip("torch")
        _check_against_torch(fn(F), fn(torch.nn.functional), arrays, seed=seed)


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 2**16),
       approximate=st.sampled_from(["none", "tanh"]))
@fixture_ok
def test_gelu_gradcheck_and_torch(backend, shape, seed, approximate):
    x = randn(seed, *shape) * 3
    assert td.gradcheck(lambda t: F.gelu(t, approximate), [T(backend, x)], seed=seed)
    if backend.name == "numpy":
        torch = pytest.importorskip("torch")
        _check_against_torch(lambda t: F.gelu(t, approximate),
                             lambda t: torch.nn.functional.gelu(t, approximate=approximate), [x])


def test_erf_without_scipy_matches_scipy():
    scipy_special = pytest.importorskip("scipy.special")
    from tinydiff.nn._misc import erf
    z = np.linspace(-7, 7, 20001)
    strict = td.get_backend("strict")
    np.testing.assert_allclose(strict.to_host(erf(strict.asarray(z))), scipy_special.erf(z), atol=3e-15)


@given(p=st.sampled_from([0.1, 0.5, 0.9]), seed=st.integers(0, 2**16))
@fixture_ok
def test_dropout(backend, p, seed):
    x = T(backend, randn(seed, 200, 50) + 5)            # nonzero everywhere
    y = F.dropout(x, p, training=True, rng=backend.default_rng(seed))
    kept = y.numpy() != 0
    np.testing.assert_allclose(y.numpy()[kept], x.numpy()[kept] / (1 - p), rtol=1e-12)
    assert abs(1 - kept.mean() - p) < 0.03                 # 10000 draws: 4+ standard deviations
    y.backward(backend.asarray(np.ones(y.shape)))
    np.testing.assert_allclose(x.grad if backend.name == "numpy" else backend.to_host(x.grad),
                               kept / (1 - p), rtol=1e-12)
    same = F.dropout(x, p, rng=backend.default_rng(seed)).numpy()
    np.testing.assert_array_equal(same, y.numpy())          # seeded: reproducible
    assert F.dropout(x, p, training=False) is x
    small = [T(backend, randn(seed, 2, 3))]
    assert td.gradcheck(lambda t: F.dropout(t, p, rng=backend.default_rng(seed)), small, seed=seed)


def test_dropout_keeps_a_channels_last_layout():
    # a conv's output is channels-last; its dropout mask is drawn in the same memory order, so the
    # product stays channels-last (the next conv reads it without a layout change), and the mask
    # is the same set of values as for an NCHW array, only placed differently
    nhwc = randn(0, 4, 6, 5, 8) + 5
    x = td.Tensor(nhwc.transpose(0, 3, 1, 2))
    y = F.dropout(x, 0.3, training=True, rng=td.get_backend("numpy").default_rng(1))
    assert y.data.strides == x.data.strides
    c = F.dropout(td.Tensor(np.ascontiguousarray(x.data)), 0.3, training=True,
                  rng=td.get_backend("numpy").default_rng(1))
    assert c.data.flags.c_contiguous
    kept_cl = (y.data != 0).transpose(0, 2, 3, 1).reshape(-1)
    kept_c = (c.data != 0).reshape(-1)
    np.testing.assert_array_equal(kept_cl, kept_c)          # the same draws, in memory order


@given(k=st.integers(1, 3), s=st.integers(1, 3), pad=st.integers(0, 1), include=st.booleans(),
       hw=st.tuples(st.integers(3, 6), st.integers(3, 6)), seed=st.integers(0, 2**16))
@fixture_ok
def test_avg_pool2d_gradcheck_and_torch(backend, k, s, pad, include, hw, seed):
    pad = min(pad, k // 2)
    x = randn(seed, 2, 2, *hw)
    fn = lambda lib: lambda t: lib.avg_pool2d(t, k, s, pad, count_include_pad=include)  # noqa: E731
    assert td.gradcheck(fn(F), [T(backend, x)], seed=seed)
    if backend.name == "numpy":
        torch = pytest.importorskip("torch")
        _check_against_torch(fn(F), fn(torch.nn.functional), [x], seed=seed)


@given(hw=st.tuples(st.integers(1, 5), st.integers(1, 5)),
       how=st.sampled_from(["s2", "s3", "s1.5", "size"]), size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       seed=st.integers(0, 2**16))
@fixture_ok
def test_interpolate_nearest_gradcheck_and_torch(backend, hw, how, size, seed):
    kw = dict(size=size) if how == "size" else dict(scale_factor=float(how[1:]))
    if how == "s1.5" and min(hw) < 2:
        kw = dict(scale_factor=2.0)
    x = randn(seed, 2, 3, *hw)
    fn = lambda lib: lambda t: lib.interpolate(t, mode="nearest", **kw)  # noqa: E731
    assert td.gradcheck(fn(F), [T(backend, x)], seed=seed)
    if backend.name == "numpy":
        torch = pytest.importorskip("torch")
        _check_against_torch(fn(F), fn(torch.nn.functional), [x], seed=seed)


def test_embedding(backend):
    idx = np.array([[1, 2, 2], [0, 4, 1]])
    w = randn(0, 5, 3)
    assert td.gradcheck(lambda t: F.embedding(backend.asarray(idx), t), [T(backend, w)])
    torch = pytest.importorskip("torch")
    _check_against_torch(lambda t: F.embedding(idx, t),
                         lambda t: torch.nn.functional.embedding(torch.tensor(idx), t), [w])
    with pytest.raises(IndexError, match=r"embedding: indices must lie in \[0, 5\)"):
        F.embedding(np.array([5]), td.Tensor(w))


@given(batch=st.lists(st.integers(1, 2), min_size=0, max_size=2), L=st.integers(1, 4), S=st.integers(1, 4),
       d=st.integers(1, 3), dv=st.integers(1, 3), mask=st.sampled_from([None, "bool", "float"]),
       seed=st.integers(0, 2**16))
@fixture_ok
def test_sdpa_gradcheck_and_torch(backend, batch, L, S, d, dv, mask, seed):
    arrays = [randn(seed, *batch, L, d), randn(seed + 1, *batch, S, d), randn(seed + 2, *batch, S, dv)]
    m = None
    if mask == "bool":
        m = np.random.default_rng(seed).random((L, S)) > 0.4
        m[:, 0] = True                                     # no fully masked row
    elif mask == "float":
        m = randn(seed + 3, L, S)
    fn = lambda lib, mm: lambda q, k, v: lib.scaled_dot_product_attention(q, k, v, mm)  # noqa: E731
    dev_mask = None if m is None else backend.asarray(m)
    assert td.gradcheck(fn(F, dev_mask), [T(backend, a) for a in arrays], seed=seed)
    if backend.name == "numpy":
        torch = pytest.importorskip("torch")
        _check_against_torch(fn(F, m), fn(torch.nn.functional, None if m is None else torch.tensor(m)),
                             arrays, seed=seed)


@pytest.mark.parametrize("heads", [1, 2])
def test_multi_head_self_attention2d(backend, heads):
    c, seed = 4, 3
    arrays = [randn(seed, 2, c, 2, 3), randn(seed + 1, 3 * c, c) * 0.5, randn(seed + 2, 3 * c),
              randn(seed + 3, c, c), randn(seed + 4, c)]
    fn = lambda *a: F.multi_head_self_attention2d(*a, num_heads=heads)  # noqa: E731
    assert td.gradcheck(fn, [T(backend, a) for a in arrays], mode="directional")
    torch = pytest.importorskip("torch")

    def theirs(x, wi, bi, wo, bo):
        t = x.reshape(2, c, 6).permute(2, 0, 1)             # (L, N, C), torch's default layout
        o, _ = torch.nn.functional.multi_head_attention_forward(
            t, t, t, c, heads, wi, bi, None, None, False, 0.0, wo, bo, training=False, need_weights=False)
        return o.permute(1, 2, 0).reshape(2, c, 2, 3)
    _check_against_torch(fn, theirs, arrays, rtol=1e-9, atol=1e-9)


def test_bad_input_messages_phase2():
    x = td.Tensor(np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(td.ShapeError, match=r"layer_norm: normalized_shape \(4,\) must match"):
        F.layer_norm(x, 4)
    with pytest.raises(td.ShapeError, match=r"avg_pool2d: kernel 6x6 is larger than the padded input 5x5"):
        F.avg_pool2d(x, 6)
    with pytest.raises(td.ShapeError, match=r"scaled_dot_product_attention: q \(2, 3\), k \(4, 2\)"):
        F.scaled_dot_product_attention(np.zeros((2, 3)), np.zeros((4, 2)), np.zeros((4, 2)))
    with pytest.raises(td.ShapeError, match=r"multi_head_self_attention2d: num_heads=2 must divide the 3"):
        F.multi_head_self_attention2d(x, np.zeros((9, 3)), None, np.zeros((3, 3)), None, num_heads=2)
    with pytest.raises(ValueError, match=r"interpolate: give exactly one of size and scale_factor"):
        F.interpolate(x)
    with pytest.raises(ValueError, match=r"dropout: p must be in \[0, 1\]"):
        F.dropout(x, 1.5)
    with pytest.raises(td.ShapeError, match=r"group_norm_silu: shift must have shape \(N, C\) = \(2, 3\)"):
        F.group_norm_silu(x, 3, shift=np.zeros((2, 4), np.float32))


def test_threaded_chunks_give_the_same_results(monkeypatch):
    """The NumPy fast path splits large ops into batch chunks (GEMM chunks, and elementwise chunks
    on a thread pool); forcing those paths on small inputs must give bit-identical values and
    gradients with and without the pool, and agree with the whole-batch computation."""
    from tinydiff.nn import _conv, _norm, _parallel
    rng = np.random.default_rng(0)
    x, w, wt = rng.standard_normal((5, 4, 9, 8)), rng.standard_normal((6, 4, 3, 3)), rng.standard_normal((4, 3, 3, 3))
    shift, gam, bet = rng.standard_normal((5, 6)), rng.standard_normal(6), rng.standard_normal(6)

    def run():
        ts = [td.Tensor(a.copy(), requires_grad=True) for a in (x, w, wt, shift, gam, bet)]
        h = F.conv2d(ts[0], ts[1], stride=2, padding=1)
        h = F.group_norm_silu(h, 3, ts[4], ts[5], shift=ts[3])
        out = F.conv_transpose2d(h, ts[1], stride=2, padding=1, output_padding=1)
        out = F.conv_transpose2d(out[:, :4], ts[2], stride=1)
        out.backward(np.cos(np.arange(out.size)).reshape(out.shape))
        return [out.numpy()] + [t.grad for t in ts]

    monkeypatch.setattr(_parallel, "MIN_ELEMENTS", 10**12)
    monkeypatch.setattr(_norm, "POOL_MIN_ELEMENTS", 10**12)
    whole = run()
    monkeypatch.setattr(_conv, "GEMM_CHUNK_BYTES", 1)              # one sample per GEMM chunk
    inline = run()
    for a, b in zip(whole, inline):                                # summation order differs
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(_parallel, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(_norm, "POOL_MIN_ELEMENTS", 0)
    monkeypatch.setattr(_parallel, "CHUNK_BYTES", 1)             # one sample per chunk
    before = _parallel.get_num_threads()
    _parallel.set_num_threads(3)
    submitted = []
    real_pool = _parallel._pool

    class CountingPool:
        def submit(self, *a):
            submitted.append(a)
            return real_pool().submit(*a)
    monkeypatch.setattr(_parallel, "_pool", CountingPool)
    try:
        chunked = run()
    finally:
        _parallel.set_num_threads(before)
    assert len(submitted) > 10                                     # the pool really ran chunks
    for a, b in zip(inline, chunked):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("offset", [0.0, 100.0, 1000.0])
def test_group_norm_float32_is_accurate_for_offset_inputs(backend, offset):
    """float32 statistics must not cancel catastrophically when |mean| >> std (the naive
    E[x^2] - E[x]^2 loses everything at offset 1000); compare with the float64 op."""
    x = randn(0, 4, 8, 9, 7) + offset
    shift = randn(1, 4, 8)
    ref = F.group_norm_silu(td.Tensor(backend.asarray(x)), 2, shift=backend.asarray(shift)).numpy()
    got = F.group_norm_silu(td.Tensor(backend.asarray(x.astype(np.float32))), 2,
                            shift=backend.asarray(shift.astype(np.float32))).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=2e-6 * (1 + offset))


@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_conv_many_channels_matches_torch(transposed):
    """Wide channel counts take the one-copy gather (small ones copy per tap): check it too."""
    torch = pytest.importorskip("torch")
    c = dict(groups=2, cin=16, cout=20, k=(3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 0),
             hw=(7, 6), n=3, bias=True, seed=5, output_padding=(1, 0))
    x, w, b = _conv_inputs(td.get_backend("numpy"), c, transposed)
    _check_against_torch(_conv_fn(c, transposed, F), _conv_fn(c, transposed, torch.nn.functional),
                         [x, w, b], seed=5)


def test_blas_thread_count_is_restored():
    """The pool holds OpenBLAS at one thread only while tinydiff's ops run."""
    from tinydiff.nn import _parallel
    controls = _parallel._blas_controls()
    if not controls:
        pytest.skip("no OpenBLAS control found in this process")
    before = [get() for get, _ in controls]
    x = td.Tensor(np.ones((64, 16, 20, 20), np.float32), requires_grad=True)
    w = td.Tensor(np.ones((16, 16, 3, 3), np.float32), requires_grad=True)
    F.conv2d(x, w).sum().backward()
    assert [get() for get, _ in controls] == before
    with _parallel.single_threaded_blas():
        with _parallel.single_threaded_blas():
            assert all(get() == 1 for get, _ in controls)
        assert all(get() == 1 for get, _ in controls)
    assert [get() for get, _ in controls] == before
