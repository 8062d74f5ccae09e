"""The strict CuPy stand-in where CuPy differs from NumPy (wrapping indices, ufunc rules, memory
order, overlapping outputs), and its launch counter: a known chain of ops gives a known count."""
import numpy as np
import pytest

import tinydiff as td
from tinydiff.backend import Backend, BackendError, Generator
from tinydiff.testing import strict_cupy as xp


def dev(a):
    return xp.asarray(np.asarray(a))


# -- out-of-range integer indices wrap around, as on CuPy ------------------------------------

def test_out_of_range_integer_array_indices_wrap_around():
    a = dev(np.arange(3))
    np.testing.assert_array_equal(a[dev([1, 3])].get(), [1, 0])       # CuPy's documented example
    np.testing.assert_array_equal(a[[1, -4]].get(), [1, 2])
    x = dev(np.arange(3))
    x[[1, 3]] = 10
    np.testing.assert_array_equal(x.get(), [10, 10, 2])
    m = dev(np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(m[:, dev([3])].get(), [[0], [3]])  # the index's own axis
    np.testing.assert_array_equal(m[..., dev([4])].get(), [[1], [4]])
    np.testing.assert_array_equal(xp.take(a, dev([5])).get(), [2])
    np.testing.assert_array_equal(a.take(dev([3])).get(), [0])
    acc = dev(np.zeros(3, np.float32))
    xp.add.at(acc, dev([0, 3, 4]), dev(np.ones(3, np.float32)))
    np.testing.assert_array_equal(acc.get(), [2, 1, 0])
    with pytest.raises(IndexError):        # a plain integer (basic indexing) still raises
        a[3]
    with pytest.raises(IndexError):        # NumPy itself raises: the difference is the stand-in's
        np.arange(3)[[1, 3]]


# -- ufunc rules --------------------------------------------------------------------------------

def test_ufunc_at_and_reduce_only_where_cupy_has_them():
    a = dev(np.zeros(4, np.float32))
    xp.add.at(a, dev([0, 0]), 1.0)
    xp.maximum.at(a, dev([1]), 3.0)
    np.testing.assert_array_equal(a.get(), [2, 3, 0, 0])
    with pytest.raises(AttributeError, match="no multiply.at"):
        xp.multiply.at(a, dev([0]), 2.0)
    for dtype in (np.int8, np.int16, np.uint8, np.bool_, np.complex64):
        with pytest.raises(TypeError, match="does not support dtype"):
            xp.add.at(dev(np.zeros(2, dtype)), dev([0]), 1)
    xp.add.at(dev(np.zeros(2, np.int32)), dev([0]), 1)
    assert float(xp.add.reduce(dev(np.arange(4.0)))) == 6.0
    assert float(xp.multiply.reduce(dev(np.arange(1.0, 4.0)))) == 6.0
    with pytest.raises(AttributeError, match="no maximum.reduce"):
        xp.maximum.reduce(dev(np.arange(4.0)))
    with pytest.raises(AttributeError, match="no subtract.reduce"):
        np.subtract.reduce(dev(np.arange(4.0)))          # through NumPy's protocol too


def test_ufuncs_refuse_python_lists():
    a = dev(np.ones(2))
    for call in (lambda: xp.add([1.0, 2.0], a), lambda: a + [1.0, 2.0], lambda: xp.exp([0.0]),
                 lambda: a * (1.0, 2.0)):
        with pytest.raises(TypeError, match="Unsupported type"):
            call()
    assert (a + 1.0).shape == (2,)                      # scalars are fine


def test_elementwise_outputs_are_c_contiguous():
    nhwc = dev(np.arange(24.0).reshape(2, 2, 3, 2))
    nchw = nhwc.transpose(0, 3, 1, 2)                   # channels-last memory, NCHW shape
    assert not nchw.flags.c_contiguous
    for y in (nchw + 1, xp.exp(nchw), nchw * nchw, -nchw, xp.maximum(nchw, 0.0)):
        assert y.flags.c_contiguous and y.shape == nchw.shape
    np.testing.assert_array_equal((nchw + 1).get(), nhwc.get().transpose(0, 3, 1, 2) + 1)
    assert not (np.arange(24.0).reshape(2, 2, 3, 2).transpose(0, 3, 1, 2) + 1).flags.c_contiguous


def test_an_input_overlapping_out_is_copied_first_and_counted():
    h = np.arange(5.0)
    a = dev(h)
    with xp.counting() as c:
        r = xp.add(a[1:], 1.0, out=a[:-1])              # overlaps: CuPy copies the input first
    assert c.launches == 2 and c.kinds["copy:overlapping-input"] == 1
    np.testing.assert_array_equal(a.get(), [2, 3, 4, 5, 4])   # NumPy's buffered result
    assert r._a is not None
    with xp.counting() as c:
        a += 1.0                                        # the output itself is no overlap
        xp.subtract(1.0, a, out=a)
    assert c.launches == 2
    out = dev(np.zeros(5))
    assert xp.multiply(a, 2.0, out=out) is out          # CuPy returns the out= array itself


# -- generators and Tensors ----------------------------------------------------------------------

def test_set_state_is_refused_like_get_state_for_device_generators():
    fake_cupy = Backend("cupy", xp, (xp.ndarray,))      # a generator whose draws are not NumPy's
    g = Generator(fake_cupy, 0)
    with pytest.raises(BackendError, match="saving the state"):
        g.get_state()
    with pytest.raises(BackendError, match="restoring the state of a CuPy generator"):
        g.set_state({"state": 1})
    from tinydiff.train import HostGenerator
    host = HostGenerator(fake_cupy, 0)                  # draws on the host: its state round-trips
    state = host.get_state()
    first = host.normal((3,)).get()
    host.set_state(state)
    np.testing.assert_array_equal(host.normal((3,)).get(), first)


@pytest.mark.parametrize("name", ["numpy", "strict"])
def test_array_times_tensor_defers_to_the_tensor(name):
    b = td.get_backend(name)
    arr = b.asarray(np.array([1.0, 2.0], np.float32))
    t = td.Tensor(b.asarray(np.array([3.0, 4.0], np.float32)), requires_grad=True)
    for out, expect in ((arr * t, [3, 8]), (arr + t, [4, 6]), (arr - t, [-2, -2]),
                        (arr / t, [1 / 3, 0.5])):
        assert isinstance(out, td.Tensor), type(out)
        np.testing.assert_allclose(out.numpy(), expect, rtol=1e-6)
    (arr * t).sum().backward()
    np.testing.assert_array_equal(b.to_host(t.grad), [1, 2])


# -- the launch counter -----------------------------------------------------------------------

def test_launch_counter_counts_a_known_chain():
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    with xp.counting() as c:
        a = xp.asarray(host)                            # upload
        b = xp.zeros((3, 4), np.float32)                # 1 fill
        xp.empty((3, 4), np.float32)                    # 0
        b += a                                          # 1
        d = a * 2 + 1                                   # 2
        s = d.sum()                                     # 1 reduction
        d.T.reshape(-1)                                 # 1: a copy (not contiguous)
        d.reshape(12)                                   # 0: a view
        d[1:, :2]                                       # 0: basic indexing
        a[xp.asarray(np.array([0, 2]))]                 # upload + 1 gather
        d[0] = 5                                        # 1 fill
        a @ b.T                                         # 1
        xp.concatenate([a, b])                          # 2: one copy per input
        xp.stack([s] * 9)                               # 1: CuPy's single kernel for > 8 small
        a.astype(np.float32, copy=False)                # 0
        a.astype(np.float64)                            # 1
        xp.random.default_rng(0).standard_normal((3,), dtype=np.float32)   # 1
        d.var()                                         # 2
        float(s)                                        # sync
        inside = c.launches
    assert (inside, c.launches, c.syncs, c.uploads) == (16, 16, 1, 2)
    assert c.kinds["ufunc:add"] == 2 and c.kinds["matmul"] == 0 and c.kinds["ufunc:matmul"] == 1
    a.sum()
    assert c.launches == 16                             # frozen at the end of the block


def test_one_launch_counts_a_fused_block_as_one():
    a = dev(np.ones(4, np.float32))
    with xp.counting() as c:
        with xp.one_launch("adam"):
            b = a * 2
            b += 1
            xp.sqrt(b, out=b)
    assert c.launches == 1 and c.kinds == {"fused:adam": 1}


# -- labels that index an embedding, on a device ------------------------------------------------

def test_out_of_range_device_indices_give_nan_rows_not_another_row(monkeypatch):
    import tinydiff.nn.functional as F
    w_host = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    w = td.Tensor(dev(w_host), requires_grad=True)
    idx = dev(np.array([1, 5, -1, 4]))
    with xp.counting() as c:
        out = F.embedding(idx, w)
    assert c.syncs == 0
    got = out.numpy()
    np.testing.assert_array_equal(got[[0, 3]], w_host[[1, 4]])
    assert np.isnan(got[[1, 2]]).all()              # CuPy's wrap would have given rows 0 and 4
    out[[0, 3]].sum().backward()
    np.testing.assert_array_equal(w.grad.get()[[1, 4]], np.ones((2, 3)))
    monkeypatch.setattr(F, "CHECK_DEVICE_INDICES", True)
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 5\), got values in \[-1, 5\].*"
                                         r"checked on the device"):
        F.embedding(idx, w)
    F.embedding(dev(np.array([0, 4])), w)             # in range: passes the check


def test_conditional_scorenet_with_a_bad_device_label_gives_nan_for_that_sample():
    from tinydiff import nn
    from tinydiff.models import ScoreNet
    from tinydiff.sde import VESDE
    nn.manual_seed(0)
    model = ScoreNet(VESDE(25.0).marginal_std, channels=(4, 8, 8, 8), embed_dim=8,
                     num_classes=3).to("strict")
    x = td.Tensor(dev(np.random.default_rng(1).random((2, 1, 28, 28), dtype=np.float32)))
    t = dev(np.array([0.5, 0.5], np.float32))
    with td.no_grad():
        good = model(x, t, dev(np.array([1, 3]))).numpy()    # 3 = the "no label" token
        bad = model(x, t, dev(np.array([1, 7]))).numpy()
    assert np.isfinite(good).all()
    np.testing.assert_array_equal(bad[0], good[0])
    assert np.isnan(bad[1]).all()


def test_training_with_a_bad_device_label_is_refused(tmp_path):
    from tinydiff import nn, optim, train
    from tinydiff.models import ScoreNet
    from tinydiff.sde import VESDE
    sde = VESDE(25.0)
    nn.manual_seed(0)
    model = ScoreNet(sde.marginal_std, channels=(4, 8, 8, 8), embed_dim=8, num_classes=3).to("strict")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 7, 2])                     # 7: no such class (3 = "no label")
    t = train.Trainer(model, optim.Adam(model.parameters(), lr=1e-3),
                      train.score_matching_loss(sde, use_labels=True), images, labels,
                      out_dir=str(tmp_path), epochs=1, batch_size=4, progress=False, log_every=2)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(train.NonFiniteError, match="loss is nan.*class label out of range"):
        t.fit()
    for k, v in model.state_dict().items():             # the bad step was undone on the device
        np.testing.assert_array_equal(v, before[k])
