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
