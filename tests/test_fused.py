"""The fused Adam/AdamW and EMA kernels (tinydiff/optim/fused.py), off by default: on the strict
stand-in, switched on, they run the reference counted as one launch; on a GPU the CuPy kernels are
compared with the reference (skipped without one)."""
import numpy as np
import pytest

import tinydiff as td
from tinydiff import nn, optim
from tinydiff.optim import fused
from tinydiff.testing import strict_cupy

from conftest import _CUPY_PROBLEM


def test_off_by_default():
    assert fused.ENABLED is False or __import__("os").environ.get("TINYDIFF_FUSED") == "1"


def _run(backend, name, kw, flat):
    nn.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.SiLU(), nn.Linear(6, 2)).to(backend)
    if flat:
        model.flatten_parameters()
    opt, ema = getattr(optim, name)(model.parameters(), **kw), optim.EMA(model, 0.9)
    b = td.get_backend(backend)
    rng = np.random.default_rng(0)
    counts = []
    for step in range(3):
        opt.zero_grad()
        x = td.Tensor(b.asarray(rng.standard_normal((5, 3)).astype(np.float32)))
        (model(x) ** 2).sum().backward()
        with strict_cupy.counting() as c:
            opt.step()
            ema.update()
        counts.append(c.launches)
    return model.state_dict(), ema.state_dict()["shadow"], counts


CONFIGS = [("Adam", dict(lr=1e-2)), ("Adam", dict(lr=3e-3, weight_decay=0.1)),
           ("AdamW", dict(lr=5e-3, weight_decay=0.3))]


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_counted_as_one_launch_on_the_stand_in(monkeypatch, name, kw):
    ref, ref_ema, ref_counts = _run("strict", name, kw, flat=True)
    monkeypatch.setattr(fused, "ENABLED", True)
    got, got_ema, counts = _run("strict", name, kw, flat=True)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
        np.testing.assert_array_equal(got_ema[k], ref_ema[k])
    assert counts[1:] == [2, 2] and ref_counts[1] > 10    # one Adam kernel, one EMA kernel (the
    # first step also makes the flat optimizer state and EMA shadow)
    monkeypatch.setattr(fused, "ENABLED", True)
    got_np, _, _ = _run("numpy", name, kw, flat=True)      # NumPy: always the reference
    for k in ref:
        np.testing.assert_array_equal(got_np[k], ref[k])


@pytest.mark.skipif(_CUPY_PROBLEM is not None, reason=f"no GPU: {_CUPY_PROBLEM}")
@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("name,kw", CONFIGS)
def test_cupy_kernels_equal_the_reference(monkeypatch, name, kw, flat):
    ref, ref_ema, _ = _run("cupy", name, kw, flat)
    monkeypatch.setattr(fused, "ENABLED", True)
    got, got_ema, _ = _run("cupy", name, kw, flat)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got_ema[k], ref_ema[k], rtol=1e-6, atol=1e-7)


# -- group norm (+ shift, + swish) and col2im (tinydiff/nn/_fused_norm.py, _fused_conv.py) -------

import tinydiff.nn.functional as F  # noqa: E402

GN_CASES = [dict(silu=True, shift=True, affine=True), dict(silu=True, shift=False, affine=False),
            dict(silu=False, shift=False, affine=True)]


def _group_norm(backend, silu, shift, affine, layout, dtype=np.float64):
    """Outputs, every gradient and the (forward, backward) launch counts of one group norm."""
    b = td.get_backend(backend)
    rng = np.random.default_rng(5)
    x_host = rng.standard_normal((3, 8, 5, 6)) * 2 + 3
    if layout == "channels-last":           # as the convolutions leave their outputs
        x_host = np.ascontiguousarray(x_host.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    leaf = lambda a: td.Tensor(b.asarray(a.astype(dtype)), requires_grad=True)  # noqa: E731
    x = leaf(x_host)
    s = leaf(rng.standard_normal((3, 8))) if shift else None
    w, bb = (leaf(rng.standard_normal(8)), leaf(rng.standard_normal(8))) if affine else (None, None)
    with strict_cupy.counting() as forward:
        y = F.group_norm_silu(x, 4, w, bb, shift=s) if silu else F.group_norm(x, 4, w, bb)
    gy = td.Tensor(b.asarray(rng.standard_normal(y.shape).astype(dtype)))
    with strict_cupy.counting() as backward:
        y.backward(gy)
    grads = [t.grad for t in (x, s, w, bb) if t is not None]
    return [b.to_host(a.data if isinstance(a, td.Tensor) else a) for a in [y] + grads], \
        (forward.launches, backward.launches)


@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("case", GN_CASES, ids=str)
def test_group_norm_stages_counted_as_one_launch_each_on_the_stand_in(monkeypatch, case, layout):
    ref, (ref_f, ref_b) = _group_norm("strict", layout=layout, **case)
    monkeypatch.setattr(fused, "ENABLED", True)
    got, (f, b) = _group_norm("strict", layout=layout, **case)
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(g, r)       # the same reference stages, bit for bit
    # forward: statistics + output (+ a fill of ones for the missing weight); backward:
    # statistics + output, the batch sums of the affine gradients and the engine's copies of
    # the leaf gradients
    assert f <= 3 < ref_f and b <= 2 + 2 + 4 < ref_b
    monkeypatch.setattr(fused, "ENABLED", True)
    got_np, _ = _group_norm("numpy", layout=layout, **case)   # NumPy: always the reference
    for r, g in zip(ref, got_np):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)


def _conv_pair(backend, dtype=np.float64):
    """Output and gradients of a conv2d and a strided conv_transpose2d (both use col2im)."""
    b = td.get_backend(backend)
    rng = np.random.default_rng(6)
    leaf = lambda a: td.Tensor(b.asarray(a.astype(dtype)), requires_grad=True)  # noqa: E731
    x, w1, w2 = leaf(rng.standard_normal((2, 3, 9, 9))), leaf(rng.standard_normal((4, 3, 3, 3))), \
        leaf(rng.standard_normal((4, 2, 3, 3)))
    h = F.conv2d(x, w1, stride=2)
    y = F.conv_transpose2d(h, w2, stride=2, output_padding=1)
    with strict_cupy.counting() as c:
        y.backward(td.Tensor(b.asarray(rng.standard_normal(y.shape).astype(dtype))))
    return [b.to_host(t) for t in (y.data, x.grad, w1.grad, w2.grad)], c.kinds


def test_col2im_counted_as_one_launch_on_the_stand_in(monkeypatch):
    ref, ref_kinds = _conv_pair("strict")
    monkeypatch.setattr(fused, "ENABLED", True)
    got, kinds = _conv_pair("strict")
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(g, r)
    assert kinds["fused:col2im"] == 1 and ref_kinds["fused:col2im"] == 0   # conv2d's backward


def test_the_scorenet_launch_budget_with_the_fused_kernels(monkeypatch):
    # issue 12's budget, counted on the stand-in: a training step of the reference ScoreNet at
    # most 300 launches, an Euler-Maruyama step at most 100, one host sync per logged step
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "launches.py")
    spec = importlib.util.spec_from_file_location("launches_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(fused, "ENABLED", True)
    sde, trainer, batches = bench.build("scorenet", 2, 4)
    whole, _ = bench.training_counts(trainer, batches, 4)
    em_launches, em_syncs, _, _ = bench.sampling_counts(sde, trainer.model, False, 2)
    assert whole.launches / 4 <= 300 and em_launches <= 100 and em_syncs == 0
    assert whole.syncs <= 1                       # log_every 4: one read in four steps


def _gpu_compare(monkeypatch, run, dtype):
    ref = run("cupy", dtype)
    monkeypatch.setattr(fused, "ENABLED", True)
    got = run("cupy", dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, **tol)


@pytest.mark.skipif(_CUPY_PROBLEM is not None, reason=f"no GPU: {_CUPY_PROBLEM}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("case", GN_CASES, ids=str)
def test_cupy_group_norm_kernels_equal_the_reference(monkeypatch, case, layout, dtype):
    _gpu_compare(monkeypatch, lambda be, dt: _group_norm(be, layout=layout, dtype=dt, **case)[0],
                 dtype)


@pytest.mark.skipif(_CUPY_PROBLEM is not None, reason=f"no GPU: {_CUPY_PROBLEM}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cupy_col2im_kernel_equals_the_reference(monkeypatch, dtype):
    _gpu_compare(monkeypatch, lambda be, dt: _conv_pair(be, dt)[0], dtype)
