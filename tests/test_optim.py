"""Optimizers, schedules, gradient clipping and EMA: against PyTorch (when importable) and against
their closed forms."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinydiff as td
import tinydiff.optim as optim
from tinydiff.nn import Parameter
from tinydiff.testing import strict_cupy

SHAPES = [(3, 4), (5,), (2, 3, 2)]

CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=5e-3, betas=(0.5, 0.9), weight_decay=0.3)),
]


def _problem(seed, steps):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]
    return init, grads


def _run_tinydiff(name, kw, init, grads, backend, lr_at=None):
    params = [Parameter(backend.asarray(a.copy())) for a in init]
    opt = getattr(optim, name)(params, **kw)
    for k, gs in enumerate(grads):
        if lr_at:
            opt.lr = lr_at(k)
        for p, g in zip(params, gs):
            p.grad = backend.asarray(g)
        opt.step()
    return [p.numpy() for p in params], opt


def _run_torch(torch, name, kw, init, grads, lr_at=None):
    params = [torch.nn.Parameter(torch.tensor(a)) for a in init]
    opt = getattr(torch.optim, name)(params, foreach=False, **kw)
    for k, gs in enumerate(grads):
        if lr_at:
            for g in opt.param_groups:
                g["lr"] = lr_at(k)
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g)
        opt.step()
    return [p.detach().numpy() for p in params]


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_optimizer_matches_torch(name, kw, backend):
    torch = pytest.importorskip("torch")
    init, grads = _problem(1, 6)
    lr_at = lambda k: kw["lr"] * (1 + 0.5 * math.sin(k))   # noqa: E731 - lr changes between steps
    ours, _ = _run_tinydiff(name, kw, init, grads, backend, lr_at)
    ref = _run_torch(torch, name, kw, init, grads, lr_at)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@given(lr=st.floats(1e-4, 0.3), b1=st.floats(0.0, 0.99), b2=st.floats(0.5, 0.9999),
       wd=st.floats(0.0, 0.5), steps=st.integers(1, 8), decoupled=st.booleans(), seed=st.integers(0, 99))
def test_adam_matches_torch_hypothesis(lr, b1, b2, wd, steps, decoupled, seed):
    torch = pytest.importorskip("torch")
    name = "AdamW" if decoupled else "Adam"
    kw = dict(lr=lr, betas=(b1, b2), weight_decay=wd)
    init, grads = _problem(seed, steps)
    ours, _ = _run_tinydiff(name, kw, init, grads, td.get_backend("numpy"))
    ref = _run_torch(torch, name, kw, init, grads)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_adam_first_step_is_lr_times_sign():
    # with bias correction, Adam's first step is lr * g / (|g| + eps) = lr * sign(g) (eps small)
    g = np.array([3.0, -0.5, 2e-3], np.float32)
    p = Parameter(np.zeros(3, np.float32))
    p.grad = g
    optim.Adam([p], lr=0.01, eps=1e-12).step()
    np.testing.assert_allclose(p.numpy(), -0.01 * np.sign(g), rtol=1e-5)


@pytest.mark.parametrize("name,kw", [CONFIGS[2], CONFIGS[3], CONFIGS[5], CONFIGS[7]])
def test_optimizer_state_dict_round_trip(name, kw, backend):
    init, grads = _problem(2, 6)
    full, _ = _run_tinydiff(name, kw, init, grads, backend)
    # 3 steps, save, rebuild from the saved weights and state, 3 more steps: same result
    half, opt = _run_tinydiff(name, kw, init, grads[:3], backend)
    sd = opt.state_dict()
    assert all(isinstance(v, np.ndarray) for s in sd["state"].values() for k, v in s.items()
               if k != "step" and v is not None)
    params = [Parameter(backend.asarray(a.copy())) for a in half]
    opt2 = getattr(optim, name)(params, **kw)
    opt2.load_state_dict(sd)
    for gs in grads[3:]:
        for p, g in zip(params, gs):
            p.grad = backend.asarray(g)
        opt2.step()
    for a, b in zip(full, params):
        np.testing.assert_array_equal(a, b.numpy())


def test_optimizer_state_dict_is_a_copy():
    init, grads = _problem(3, 2)
    _, opt = _run_tinydiff("Adam", dict(lr=0.1), init, grads, td.get_backend("numpy"))
    sd = opt.state_dict()
    before = sd["state"][0]["exp_avg"].copy()
    p0 = opt.param_groups[0]["params"][0]
    p0.grad = np.ones(p0.shape, np.float32)
    opt.step()
    np.testing.assert_array_equal(sd["state"][0]["exp_avg"], before)
    opt.load_state_dict(sd)
    opt.step()                                    # must not write into sd's arrays
    np.testing.assert_array_equal(sd["state"][0]["exp_avg"], before)


def test_optimizer_load_state_dict_rejects_other_model():
    init, grads = _problem(4, 1)
    _, opt = _run_tinydiff("Adam", dict(lr=0.1), init, grads, td.get_backend("numpy"))
    other = optim.Adam([Parameter(np.zeros(3, np.float32))])
    with pytest.raises(ValueError, match="different number"):
        other.load_state_dict(opt.state_dict())
    wrong = optim.Adam([Parameter(np.zeros(s[::-1] if len(s) > 1 else (7,), np.float32)) for s in SHAPES])
    with pytest.raises(ValueError, match="shape"):
        wrong.load_state_dict(opt.state_dict())


def test_optimizer_skips_params_without_grad_and_reads_shared_grads(backend):
    a = Parameter(backend.asarray(np.ones(4, np.float32)))
    b = Parameter(backend.asarray(np.ones(4, np.float32)))
    c = Parameter(backend.asarray(np.ones(4, np.float32)))
    (a + b).sum().backward()                       # a.grad and b.grad may be one shared array
    opt = optim.SGD([a, b, c], lr=0.5, weight_decay=0.1)
    opt.step()
    np.testing.assert_allclose(a.numpy(), 1 - 0.5 * 1.1)
    np.testing.assert_allclose(b.numpy(), 1 - 0.5 * 1.1)
    np.testing.assert_array_equal(c.numpy(), np.ones(4))   # no grad: untouched
    np.testing.assert_array_equal(a.grad if backend.name == "numpy" else backend.to_host(a.grad), 1.0)


def test_optimizer_step_does_not_sync_on_device():
    b = td.get_backend("strict")
    params = [Parameter(b.asarray(np.ones(s, np.float32))) for s in SHAPES]
    for p in params:
        p.grad = b.asarray(np.full(p.shape, 0.5, np.float32))
    for opt in (optim.Adam(params), optim.AdamW(params), optim.SGD(params, lr=0.1, momentum=0.9)):
        before = strict_cupy.SYNCS["count"]
        opt.step()
        opt.step()
        assert strict_cupy.SYNCS["count"] == before


def test_optimizer_bad_arguments():
    p = [Parameter(np.zeros(2, np.float32))]
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD(p, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(p, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="empty"):
        optim.Adam([])


def test_lr_property_sets_every_group():
    groups = [{"params": [Parameter(np.zeros(2, np.float32))]},
              {"params": [Parameter(np.zeros(2, np.float32))], "weight_decay": 0.0}]
    opt = optim.AdamW(groups, lr=1e-3)
    opt.lr = 0.5
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5] and opt.lr == 0.5
    assert opt.param_groups[0]["weight_decay"] == 1e-2 and opt.param_groups[1]["weight_decay"] == 0.0


# -- schedules ---------------------------------------------------------------------------------

def test_schedule_closed_forms():
    w = optim.linear_warmup(4, start_factor=0.2)
    assert [w(s) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    c = optim.cosine(10, min_factor=0.1)
    assert c(0) == pytest.approx(1.0) and c(10) == pytest.approx(0.1) and c(50) == pytest.approx(0.1)
    assert c(5) == pytest.approx(0.55)                       # half way: the mean of 1 and 0.1
    assert all(c(s) >= c(s + 1) for s in range(12))          # monotone non-increasing
    ctc = optim.cosine_then_constant(8, 0.25)
    vals = [ctc(s) for s in range(20)]
    assert vals[0] == pytest.approx(1.0) and vals[8:] == pytest.approx([0.25] * 12)
    wc = optim.warmup_then(optim.cosine(10), 5)
    assert wc(0) == 0.0 and wc(5) == pytest.approx(1.0) and wc(10) == pytest.approx(0.5)
    assert optim.constant(0.3)(123) == 0.3


@given(steps=st.integers(1, 50), m=st.floats(0, 1), s=st.integers(0, 200))
def test_cosine_between_bounds(steps, m, s):
    v = optim.cosine(steps, m)(s)
    assert min(m, 1.0) - 1e-12 <= v <= max(m, 1.0) + 1e-12


def test_sequential_bad_milestones():
    with pytest.raises(ValueError, match="milestones"):
        optim.sequential([optim.constant(), optim.constant()], [])
    with pytest.raises(ValueError, match="increasing"):
        optim.sequential([optim.constant()] * 3, [5, 2])


def test_schedules_match_torch():
    torch = pytest.importorskip("torch")
    import warnings

    def trace(make_ours, make_torch, n=30):
        p = torch.nn.Parameter(torch.zeros(1))
        topt = torch.optim.SGD([p], lr=0.1)
        tsched = make_torch(topt)
        ours = optim.LRScheduler(optim.SGD([Parameter(np.zeros(1, np.float32))], lr=0.1), make_ours())
        a, b = [], []
        for _ in range(n):
            a.append(ours.get_last_lr()[0])
            b.append(topt.param_groups[0]["lr"])
            topt.step()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tsched.step()
            ours.step()
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)

    S = torch.optim.lr_scheduler
    trace(lambda: optim.linear_warmup(7, 0.1), lambda o: S.LinearLR(o, 0.1, 1.0, total_iters=7))
    trace(lambda: optim.cosine(20, 0.05), lambda o: S.CosineAnnealingLR(o, T_max=20, eta_min=0.005), n=21)
    trace(lambda: optim.warmup_then(optim.cosine(15, 0.1), 5, 0.2),
          lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.2, 1.0, total_iters=5),
                                       S.CosineAnnealingLR(o, T_max=15, eta_min=0.01)], milestones=[5]),
          n=20)


def test_lr_scheduler_state_dict_round_trip():
    sched_fn = optim.cosine_then_constant(10, 0.1)
    opt = optim.Adam([Parameter(np.zeros(1, np.float32))], lr=0.2)
    s = optim.LRScheduler(opt, sched_fn)
    assert opt.lr == pytest.approx(0.2)
    for _ in range(4):
        s.step()
    sd = s.state_dict()
    opt2 = optim.Adam([Parameter(np.zeros(1, np.float32))], lr=999.0)
    s2 = optim.LRScheduler(opt2, sched_fn)
    s2.load_state_dict(sd)
    assert opt2.lr == opt.lr == pytest.approx(0.2 * sched_fn(4))
    s.step()
    s2.step()
    assert opt2.lr == opt.lr


# -- clip_grad_norm_ ---------------------------------------------------------------------------

@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm(max_norm, backend):
    rng = np.random.default_rng(5)
    gs = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    params = [Parameter(backend.asarray(np.zeros(s, np.float32))) for s in SHAPES]
    for p, g in zip(params, gs):
        p.grad = backend.asarray(g)
    params.append(Parameter(backend.asarray(np.zeros(2, np.float32))))   # no grad: ignored
    total = optim.clip_grad_norm_(params, max_norm)
    expect = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in gs))
    assert isinstance(total, float) and total == pytest.approx(expect, rel=1e-5)
    scale = min(1.0, max_norm / (expect + 1e-6))
    for p, g in zip(params, gs):
        np.testing.assert_allclose(backend.to_host(p.grad), g * scale, rtol=1e-5)
    after = math.sqrt(sum(float((backend.to_host(p.grad).astype(np.float64) ** 2).sum())
                          for p in params[:-1]))
    assert after <= max_norm * (1 + 1e-5)


def test_clip_grad_norm_shared_gradient_scaled_once():
    a, b = Parameter(np.ones(4, np.float32)), Parameter(np.ones(4, np.float32))
    (a + b).sum().backward()          # the engine may give a and b the same array
    optim.clip_grad_norm_([a, b], 1.0)
    np.testing.assert_allclose(a.grad, np.full(4, 1 / math.sqrt(8)), rtol=1e-5)
    np.testing.assert_allclose(b.grad, np.full(4, 1 / math.sqrt(8)), rtol=1e-5)


def test_clip_grad_norm_matches_torch_inf_norm():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    gs = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    for norm_type in (2.0, math.inf, 1.0):
        ours = [Parameter(np.zeros(s, np.float32)) for s in SHAPES]
        theirs = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
        for p, q, g in zip(ours, theirs, gs):
            p.grad, q.grad = g.copy(), torch.tensor(g)
        n1 = optim.clip_grad_norm_(ours, 0.7, norm_type=norm_type)
        n2 = float(torch.nn.utils.clip_grad_norm_(theirs, 0.7, norm_type=norm_type))
        assert n1 == pytest.approx(n2, rel=1e-5)
        for p, q in zip(ours, theirs):
            np.testing.assert_allclose(p.grad, q.grad.numpy(), rtol=1e-5, atol=1e-7)


# -- EMA ---------------------------------------------------------------------------------------

def _tiny_model(backend):
    import tinydiff.nn as nn
    nn.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2)).to(backend)


def test_ema_matches_recursion(backend):
    model = _tiny_model(backend)
    ema = optim.EMA(model, decay=0.9)
    ref = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    for _ in range(5):
        for name, p in model.named_parameters():
            p.data = backend.asarray(rng.standard_normal(p.shape).astype(np.float32))
            ref[name] = 0.9 * ref[name] + 0.1 * p.numpy().astype(np.float64)
        ema.update()
    sd = ema.state_dict()
    for name in ref:
        np.testing.assert_allclose(sd["shadow"][name], ref[name], rtol=1e-5, atol=1e-6)


def test_ema_constant_target_closed_form():
    model = _tiny_model("numpy")
    start = model.state_dict()
    ema = optim.EMA(model, decay=0.8)
    for p in model.parameters():
        p.data = np.full(p.shape, 2.0, np.float32)
    for _ in range(7):
        ema.update()
    for name, s in ema.state_dict()["shadow"].items():   # d^k s0 + (1 - d^k) p
        np.testing.assert_allclose(s, 0.8 ** 7 * start[name] + (1 - 0.8 ** 7) * 2.0, rtol=1e-5)


def test_ema_warmup_decay():
    ema = optim.EMA(_tiny_model("numpy"), decay=0.999, warmup=True)
    seen = []
    for _ in range(3):
        seen.append(ema.current_decay())
        ema.update()
    assert seen == pytest.approx([1 / 10, 2 / 11, 3 / 12])


def test_ema_average_parameters_swaps_and_restores(backend):
    model = _tiny_model(backend)
    ema = optim.EMA(model, decay=0.5)
    own = model.state_dict()
    for p in model.parameters():
        p.data = p.data * 0 + 1
    ema.update()
    current = model.state_dict()
    with ema.average_parameters() as m:
        assert m is model
        inside = model.state_dict()
        for k in own:
            np.testing.assert_allclose(inside[k], 0.5 * own[k] + 0.5, rtol=1e-6)
        for p in model.parameters():          # writes inside the block must not reach the EMA
            p.data *= 0
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, current[k])
    for k in own:
        np.testing.assert_allclose(ema.state_dict()["shadow"][k], 0.5 * own[k] + 0.5, rtol=1e-6)


def test_ema_state_dict_round_trip_and_copy_to(backend):
    model = _tiny_model(backend)
    ema = optim.EMA(model, decay=0.7)
    for p in model.parameters():
        p.data = p.data + 1
    ema.update()
    sd = ema.state_dict()
    other = _tiny_model(backend)
    ema2 = optim.EMA(other, decay=0.1)
    ema2.load_state_dict(sd)
    assert ema2.decay == 0.7 and ema2.num_updates == 1
    ema2.copy_to(other)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, sd["shadow"][k])
    bad = dict(sd, shadow={k + "x": v for k, v in sd["shadow"].items()})
    with pytest.raises(ValueError, match="missing"):
        ema2.load_state_dict(bad)


def test_ema_follows_model_to_another_backend():
    model = _tiny_model("numpy")
    ema = optim.EMA(model, decay=0.5)
    model.to("strict")
    ema.update()
    assert all(isinstance(s, strict_cupy.ndarray) for s in ema.shadow.values())
