"""Flat parameter buffers (tinydiff.nn.flat): parameters stay views into one buffer through
backward, .to(), load_state_dict, EMA swaps, optimizer and EMA state loads and a Trainer resume;
the whole-buffer Adam/AdamW/EMA equal the per-parameter reference bit for bit, the norm and the
clipping to float32 rounding; and the launch counts of the flat updates are a handful."""
import math

import numpy as np
import pytest

import tinydiff as td
from tinydiff import nn, optim
from tinydiff.testing import strict_cupy


def tiny(backend="numpy", seed=0):
    nn.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.SiLU(), nn.Linear(5, 4), nn.SiLU(),
                         nn.Linear(4, 2)).to(backend)


def backward(model, backend, seed):
    x = td.Tensor(backend.asarray(np.random.default_rng(seed).standard_normal((6, 3)).astype(np.float32)))
    (model(x) ** 2).sum().backward()


def assert_views(model):
    groups = {id(p._flat): p._flat for p in model.parameters()}
    assert len(groups) == 1
    (g,) = groups.values()
    assert g.intact() and [p for p in g.params] == list(model.parameters())
    for p, o, n in zip(g.params, g.offsets, g.sizes):
        assert p.data.base is not None
        np.testing.assert_array_equal(td.get_backend(g.backend.name).to_host(g.data[o:o + n]),
                                      p.numpy().ravel())
    return g


def test_flatten_keeps_values_and_backward_writes_into_the_gradient_buffer(backend):
    model = tiny(backend.name)
    before = model.state_dict()
    (g,) = model.flatten_parameters()
    assert g.size == sum(p.size for p in model.parameters()) and g.dtype == np.float32
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    assert_views(model)
    ref = tiny(backend.name)
    backward(model, backend, 1)
    backward(ref, backend, 1)
    assert g.grads_ready()
    for p, q, gv in zip(model.parameters(), ref.parameters(), g.grad_views):
        assert p.grad is gv
        np.testing.assert_array_equal(backend.to_host(p.grad), backend.to_host(q.grad))
    backward(model, backend, 2)                       # accumulates in place, as the reference
    backward(ref, backend, 2)
    for p, q in zip(model.parameters(), ref.parameters()):
        np.testing.assert_array_equal(backend.to_host(p.grad), backend.to_host(q.grad))
    assert model.flatten_parameters() == [g]           # flattening again keeps the group


@pytest.mark.parametrize("name,kw", [("Adam", dict(lr=1e-2)),
                                     ("Adam", dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1)),
                                     ("AdamW", dict(lr=5e-3, weight_decay=0.3))])
def test_flat_adam_and_ema_equal_the_per_parameter_reference_bit_for_bit(name, kw, backend):
    flat, ref = tiny(backend.name), tiny(backend.name)
    flat.flatten_parameters()
    opts = [getattr(optim, name)(m.parameters(), **kw) for m in (flat, ref)]
    emas = [optim.EMA(m, 0.9, warmup=True) for m in (flat, ref)]
    for step in range(4):
        for m, opt, ema in zip((flat, ref), opts, emas):
            opt.lr = kw["lr"] * (1 + 0.3 * step)
            opt.zero_grad()
            backward(m, backend, step)
            opt.step()
            ema.update()
    assert_views(flat)
    for (k, a), b in zip(flat.state_dict().items(), ref.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=k)
    for s1, s2 in zip(opts[0].state_dict()["state"].values(), opts[1].state_dict()["state"].values()):
        assert s1["step"] == s2["step"] == 4
        np.testing.assert_array_equal(s1["exp_avg"], s2["exp_avg"])
        np.testing.assert_array_equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
    for k, v in emas[0].state_dict()["shadow"].items():
        np.testing.assert_array_equal(v, emas[1].state_dict()["shadow"][k])


def test_flat_norm_and_clipping_match_the_reference(backend):
    flat, ref = tiny(backend.name), tiny(backend.name)
    flat.flatten_parameters()
    for m in (flat, ref):
        backward(m, backend, 3)
    n_ref = optim.grad_norm(list(ref.parameters()))
    assert float(optim.grad_norm(list(flat.parameters()))) == pytest.approx(float(n_ref), rel=1e-6)
    total = optim.clip_grad_norm_(flat.parameters(), 0.5)
    total_ref = optim.clip_grad_norm_(ref.parameters(), 0.5)
    assert total == pytest.approx(total_ref, rel=1e-6) and total > 0.5
    assert flat.parameters().__next__()._flat.grads_ready()     # clipped in place
    for p, q in zip(flat.parameters(), ref.parameters()):
        np.testing.assert_allclose(backend.to_host(p.grad), backend.to_host(q.grad), rtol=1e-6)
    for norm_type in (math.inf, 1.0):
        a, b = tiny(backend.name), tiny(backend.name)
        a.flatten_parameters()
        backward(a, backend, 4)
        backward(b, backend, 4)
        assert optim.clip_grad_norm_(a.parameters(), 0.1, norm_type=norm_type) == pytest.approx(
            optim.clip_grad_norm_(b.parameters(), 0.1, norm_type=norm_type), rel=1e-6)


def test_a_parameter_without_gradient_takes_the_reference_path(backend):
    flat, ref = tiny(backend.name), tiny(backend.name)
    flat.flatten_parameters()
    opts = [optim.Adam(m.parameters(), lr=1e-2) for m in (flat, ref)]
    for m, opt in zip((flat, ref), opts):
        backward(m, backend, 0)
        list(m.parameters())[0].grad = None            # skipped, as PyTorch does
        opt.step()
    assert_views(flat)
    for (k, a), b in zip(flat.state_dict().items(), ref.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=k)
    assert id(list(flat.parameters())[0]) not in opts[0].state


def test_views_survive_to_load_state_dict_and_ema_swaps(backend):
    model = tiny("numpy")
    model.flatten_parameters()
    opt = optim.Adam(model.parameters(), lr=1e-2)
    ema = optim.EMA(model, 0.5)
    backward(model, td.get_backend("numpy"), 0)
    opt.step()
    ema.update()
    model.to(backend.name)                              # moved: new buffers on the backend
    g = assert_views(model)
    assert backend.owns(g.data) and backend.owns(g.grad)
    backward(model, backend, 1)                         # the optimizer and EMA follow
    opt.step()
    ema.update()
    assert_views(model)
    own = model.state_dict()
    with ema.average_parameters():
        assert_views(model)
        inside = model.state_dict()
        for k, v in ema.state_dict()["shadow"].items():
            np.testing.assert_array_equal(inside[k], v)
        for p in model.parameters():
            p.data = p.data * 0                         # replaced inside the block
    assert_views(model)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, own[k])
    other = tiny("numpy", seed=1).state_dict()
    model.load_state_dict(other)
    assert_views(model)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, other[k])
    shadow = ema.state_dict()
    ema.copy_to()
    assert_views(model)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, shadow["shadow"][k])
    model.to(dtype=np.float64)                          # cast: rebuilt in float64
    assert assert_views(model).dtype == np.float64
    model.to(dtype=np.float32)
    assert_views(model)


def test_loaded_optimizer_and_ema_state_go_into_the_flat_buffers(backend):
    def run(model, opt, ema, steps, seed0):
        for s in range(steps):
            opt.zero_grad()
            backward(model, backend, seed0 + s)
            opt.step()
            ema.update()

    full = tiny(backend.name)
    full.flatten_parameters()
    fopt, fema = optim.AdamW(full.parameters(), lr=1e-2), optim.EMA(full, 0.7)
    run(full, fopt, fema, 5, 0)
    half = tiny(backend.name)
    half.flatten_parameters()
    hopt, hema = optim.AdamW(half.parameters(), lr=1e-2), optim.EMA(half, 0.7)
    run(half, hopt, hema, 2, 0)
    sd, osd, esd = half.state_dict(), hopt.state_dict(), hema.state_dict()
    resumed = tiny(backend.name, seed=5)
    resumed.flatten_parameters()
    ropt, rema = optim.AdamW(resumed.parameters(), lr=1e-2), optim.EMA(resumed, 0.1)
    resumed.load_state_dict(sd)
    ropt.load_state_dict(osd)
    rema.load_state_dict(esd)
    run(resumed, ropt, rema, 3, 2)
    g = assert_views(resumed)
    fs = ropt._flat_state[id(g)]
    for i, p in enumerate(g.params):
        assert ropt.state[id(p)]["exp_avg"] is fs["views"]["exp_avg"][i]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=k)
    for k, v in fema.state_dict()["shadow"].items():
        np.testing.assert_array_equal(v, rema.state_dict()["shadow"][k])


def test_a_replaced_parameter_array_is_adopted_by_the_next_step():
    model = tiny()
    model.flatten_parameters()
    opt = optim.SGD(model.parameters(), lr=0.5)        # SGD: per parameter, on the views
    first = list(model.parameters())[0]
    first.data = np.full(first.shape, 2.0, np.float32)
    backward(model, td.get_backend("numpy"), 0)
    grad = first.grad.copy()
    adam = optim.Adam(model.parameters(), lr=0.1)
    adam.step()                                         # ensure(): 2.0 copied into the view first
    assert_views(model)
    np.testing.assert_allclose(first.numpy(), 2.0 - 0.1 * np.sign(grad), rtol=1e-5)
    opt.step()
    assert_views(model)


def test_flat_updates_are_a_handful_of_launches():
    b = td.get_backend("strict")
    model = tiny("strict")
    model.flatten_parameters()
    n = len(list(model.parameters()))
    opt, ema = optim.AdamW(model.parameters(), lr=1e-2), optim.EMA(model, 0.9)
    ref = tiny("strict")
    ropt, rema = optim.AdamW(ref.parameters(), lr=1e-2), optim.EMA(ref, 0.9)
    for m, o, e in ((model, opt, ema), (ref, ropt, rema)):
        backward(m, b, 0)
        o.step()
        e.update()
        o.zero_grad()
        backward(m, b, 1)
    counts = {}
    for tag, m, o, e in (("flat", model, opt, ema), ("ref", ref, ropt, rema)):
        with strict_cupy.counting() as c_norm:
            optim.clip_grad_norm_(m.parameters(), 1.0, return_array=True)
        with strict_cupy.counting() as c_opt:
            o.step()
        with strict_cupy.counting() as c_ema:
            e.update()
        counts[tag] = (c_norm.launches, c_opt.launches, c_ema.launches)
        assert c_norm.syncs == c_opt.syncs == c_ema.syncs == 0
    # norm: dot + sqrt, then eps add, divide, minimum and one in-place multiply
    assert counts["flat"] == (6, 14, 3)
    assert counts["ref"] == (2 * n + 2 + 3 + n, 14 * n, 3 * n)
    with strict_cupy.counting() as c:
        with ema.average_parameters():
            pass
    assert c.launches == 3                              # backup copy, swap in, swap back

