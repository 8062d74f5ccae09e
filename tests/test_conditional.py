"""Class-conditional score models and classifier-free guidance.

- the attention block and the class-embedded ScoreNet with attention: float64 gradient checks
  (Hypothesis) on numpy and the strict stand-in, and agreement with a PyTorch implementation of
  the same architecture loaded with the same weights;
- guidance maths with closed-form scores: for class scores of N(mu_y, v) and an unconditional
  score of N(mu_u, v), s_w = (1 + w) s_y - w s_u is exactly the score of
  N((1 + w) mu_y - w mu_u, v), so every sampler must return that distribution;
- label dropout, the "no label" token, and w = 0 equal to plain conditional sampling bit for bit.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tinydiff as td
import tinydiff.nn as nn
from tinydiff import sampling, train
from tinydiff.models import ScoreNet
from tinydiff.sde import VESDE, gaussian_score

SDE = VESDE(25.0)
# a small conditional ScoreNet with attention at the 5x5 and 2x2 maps (attn3, attn4, tattn4)
SMALL = dict(channels=(4, 4, 8, 8), embed_dim=8, num_groups=(2, 2, 4, 4), decoder_groups=4,
             num_classes=3, attention=(5, 2), num_heads=2)


def _inputs(n, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 1, 28, 28)).astype(dtype), rng.uniform(0.05, 1.0, n).astype(dtype),
            rng.integers(0, 3, n))


# -- the attention block and the conditional model --------------------------------------------

@settings(max_examples=6)
@given(c_heads=st.sampled_from([(4, 1), (4, 2), (6, 3)]), hw=st.sampled_from([(2, 2), (3, 2), (1, 4)]),
       seed=st.integers(0, 2 ** 16))
def test_attention_block_gradcheck(backend, c_heads, hw, seed):
    c, heads = c_heads
    nn.manual_seed(seed)
    block = nn.SelfAttention2d(c, num_heads=heads, num_groups=2).to(backend, dtype=np.float64)
    rng = np.random.default_rng(seed)
    x = td.Tensor(backend.asarray(rng.normal(size=(2, c, *hw))), requires_grad=True)
    assert td.gradcheck(block, [x], mode="full")
    # and with respect to every weight: the block as a function of (x, qkv.weight, proj.weight)
    params = dict(block.named_parameters())

    def with_weights(x, wq, wp):
        h = nn.functional.group_norm(x, block.norm.num_groups, params["norm.weight"], params["norm.bias"])
        return x + nn.functional.multi_head_self_attention2d(h, wq, params["qkv.bias"], wp,
                                                             params["proj.bias"], heads)
    wq = td.Tensor(backend.asarray(block.qkv.weight.numpy()), requires_grad=True)
    wp = td.Tensor(backend.asarray(block.proj.weight.numpy()), requires_grad=True)
    np.testing.assert_allclose(backend.to_host(with_weights(x, wq, wp).data),
                               backend.to_host(block(x).data), rtol=1e-12, atol=1e-12)
    assert td.gradcheck(with_weights, [x, wq, wp], mode="directional", seed=seed)


def test_attention_block_is_a_residual(backend):
    nn.manual_seed(0)
    block = nn.SelfAttention2d(4, num_heads=2, num_groups=2).to(backend)
    block.proj.weight.data[...] = 0
    block.proj.bias.data[...] = 0
    x = backend.asarray(np.random.default_rng(0).normal(size=(2, 4, 3, 3)).astype(np.float32))
    assert np.array_equal(backend.to_host(block(td.Tensor(x)).data), backend.to_host(x))


@settings(max_examples=4)
@given(seed=st.integers(0, 2 ** 16), wrt_t=st.booleans())
def test_conditional_scorenet_gradcheck(backend, seed, wrt_t):
    nn.manual_seed(seed)
    model = ScoreNet(SDE.marginal_std, **SMALL).to(backend, dtype=np.float64)
    x, t, y = _inputs(2, seed, np.float64)
    xt = td.Tensor(backend.asarray(x), requires_grad=True)
    tt = td.Tensor(backend.asarray(t), requires_grad=wrt_t)
    yb = backend.asarray(y)
    fn = (lambda x, t: model(x, t, yb)) if wrt_t else (lambda x: model(x, tt, yb))
    assert td.gradcheck(fn, [xt, tt] if wrt_t else [xt], mode="directional", seed=seed)


def test_conditional_scorenet_structure_and_errors():
    model = ScoreNet(SDE.marginal_std, num_classes=10, attention=(5, 2), num_heads=4)
    names = {k.split(".")[0] for k in model.state_dict()}
    assert {"attn3", "attn4", "tattn4", "label_embed"} <= names
    assert not names & {"attn1", "attn2", "tattn2", "tattn3"}
    assert model.label_embed.weight.shape == (11, 256) and model.null_label == 10
    assert model.attn3.num_heads == 4 and model.tattn4.channels == 128
    # the reference model is unchanged: no attention, the tutorial's parameter count
    assert ScoreNet(SDE.marginal_std).num_parameters() == 1_115_297
    everywhere = ScoreNet(SDE.marginal_std, channels=(8, 8, 8, 8), embed_dim=8, attention=(26, 12, 5, 2),
                          num_heads=2)
    assert {f"attn{i}" for i in (1, 2, 3, 4)} | {f"tattn{i}" for i in (2, 3, 4)} <= \
        {k.split(".")[0] for k in everywhere.state_dict()}
    # every parameter is used: one backward reaches all of them (no block left out of forward)
    x, t, y = _inputs(2)
    model = ScoreNet(SDE.marginal_std, **{**SMALL, "attention": (26, 12, 5, 2)})
    model(td.Tensor(x), t, y).sum().backward()
    unused = [k for k, p in model.named_parameters() if p.grad is None or not np.abs(p.grad).sum()]
    assert not unused, unused
    with pytest.raises(ValueError, match=r"attention sizes must be among \[2, 5, 12, 26\].*\[7\]"):
        ScoreNet(SDE.marginal_std, attention=(7,))
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        ScoreNet(SDE.marginal_std, attention=(5,), num_heads=3)


def test_conditional_scorenet_matches_pytorch():
    torch = pytest.importorskip("torch")
    from tinydiff.testing.torch_reference import torch_scorenet

    torch.manual_seed(0)
    kw = {k: SMALL[k] for k in ("channels", "embed_dim", "num_classes", "attention", "num_heads",
                                "num_groups", "decoder_groups")}
    std = lambda t: torch.sqrt((25.0 ** (2 * t) - 1) / (2 * math.log(25.0)))   # noqa: E731 (VE, sigma 25)
    theirs = torch_scorenet(std, **kw).double()
    ours = ScoreNet(SDE.marginal_std, **SMALL).to(dtype=np.float64)
    sd = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    assert set(sd) == set(ours.state_dict())
    ours.load_state_dict(sd)
    x, t, y = _inputs(3, seed=2, dtype=np.float64)
    y[2] = 3                                   # the "no label" row
    xt = torch.tensor(x, requires_grad=True)
    ref = theirs(xt, torch.tensor(t), torch.tensor(y))
    xo = td.Tensor(x, requires_grad=True)
    out = ours(xo, t, y)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-10, atol=1e-10)
    v = np.random.default_rng(3).normal(size=out.shape)
    (ref * torch.tensor(v)).sum().backward()
    (out * td.Tensor(v)).sum().backward()
    np.testing.assert_allclose(xo.grad, xt.grad.numpy(), rtol=1e-9, atol=1e-9)
    for name in ("attn3.qkv.weight", "tattn4.proj.weight", "label_embed.weight", "conv2.weight"):
        mine = dict(ours.named_parameters())[name].grad
        np.testing.assert_allclose(mine, dict(theirs.named_parameters())[name].grad.numpy(),
                                   rtol=1e-9, atol=1e-9, err_msg=name)
    # and y = None is the unconditional model: the "no label" row
    np.testing.assert_allclose(ours(x, t).numpy(), theirs(torch.tensor(x), torch.tensor(t)).detach().numpy(),
                               rtol=1e-10, atol=1e-10)


# -- classifier-free guidance with closed-form scores -----------------------------------------

MU_CLASS = np.array([-2.0, 1.0, 3.0])     # class y: N(mu_y, V); "no label": N(MU_U, V)
MU_U, V = 0.5, 0.3
NULL = 3


def class_gaussian_score(backend):
    """cond_score_fn(x, t, y): the exact score of N(mu_y, V) per sample (y == NULL: N(MU_U, V))."""
    mus = backend.asarray(np.append(MU_CLASS, MU_U).astype(np.float32))
    calls = []

    def score(x, t, y):
        calls.append(x.shape[0])
        var = V + SDE.marginal_std(t) ** 2
        return -(x - mus[y][:, None]) / var[:, None]
    return score, calls


@pytest.mark.parametrize("w", [0.0, 0.5, 2.0, -0.5])
def test_guided_score_is_the_score_of_the_shifted_gaussian(backend, w):
    score, calls = class_gaussian_score(backend)
    n = 6
    y = backend.asarray(np.array([0, 1, 2, 0, 1, 2]))
    fn = sampling.guided_score_fn(score, y, w, NULL)
    rng = np.random.default_rng(1)
    x = backend.asarray(rng.normal(size=(n, 4)).astype(np.float32))
    t = backend.asarray(rng.uniform(0.01, 1, n).astype(np.float32))
    got = backend.to_host(fn(x, t))
    mu_w = (1 + w) * MU_CLASS[[0, 1, 2, 0, 1, 2]] - w * MU_U
    for i in range(n):
        exact = gaussian_score(mu_w[i], V, SDE)(x[i:i + 1], t[i:i + 1])
        np.testing.assert_allclose(got[i], backend.to_host(exact)[0], rtol=1e-5, atol=1e-5)
    assert calls == ([n] if w == 0 else [2 * n])     # one batched call (2N when guided)


@pytest.mark.parametrize("sampler", ["em", "pc", "ode"])
@pytest.mark.parametrize("w", [0.0, 2.0])
def test_every_sampler_returns_the_guided_distribution(backend, sampler, w):
    score, _ = class_gaussian_score(backend)
    n_per, d = 1000, 4
    labels = np.repeat(np.arange(3), n_per)
    y = backend.asarray(labels)
    fn = sampling.guided_score_fn(score, y, w, NULL)
    rng = backend.default_rng(7)
    shape = (len(labels), d)
    # start from the exact marginal at T of the guided target, so only discretisation remains
    mu_w = backend.asarray(((1 + w) * MU_CLASS[labels] - w * MU_U)[:, None].astype(np.float32))
    x_init = mu_w + rng.normal(shape, std=math.sqrt(V + SDE.prior_std ** 2))
    if sampler == "em":
        x = sampling.euler_maruyama(fn, SDE, shape, num_steps=300, rng=rng, x_init=x_init)
        bias = 0.02      # 300 steps: about 1 % low in variance (test_sampling's recursion)
    elif sampler == "pc":
        x = sampling.predictor_corrector(fn, SDE, shape, num_steps=300, rng=rng, x_init=x_init)
        bias = 0.03      # unadjusted Langevin: a few % high
    else:
        x, _ = sampling.ode_sampler(fn, SDE, shape, rng=rng, rtol=1e-5, atol=1e-5, x_init=x_init)
        bias = 0.01
    x = backend.to_host(x).astype(np.float64)
    for c in range(3):
        xc = x[labels == c].reshape(-1)
        mu = (1 + w) * MU_CLASS[c] - w * MU_U
        se_mean, se_var = math.sqrt(V / xc.size), V * math.sqrt(2 / (xc.size - 1))
        assert abs(xc.mean() - mu) < 5 * se_mean, (c, xc.mean(), mu)
        assert abs(xc.var(ddof=1) - V) < 5 * se_var + bias * V, (c, xc.var(ddof=1))


def test_guidance_zero_is_plain_conditional_sampling_bit_for_bit():
    nn.manual_seed(0)
    model = ScoreNet(SDE.marginal_std, **SMALL).eval()
    y = np.array([0, 1, 2, 1])
    shape = (4, 1, 28, 28)
    plain = sampling.euler_maruyama(sampling.model_score_fn(model, labels=y), SDE, shape,
                                    num_steps=5, rng=td.get_backend("numpy").default_rng(3))
    guided = sampling.euler_maruyama(sampling.model_score_fn(model, labels=y, guidance=0.0), SDE,
                                     shape, num_steps=5, rng=td.get_backend("numpy").default_rng(3))
    assert np.array_equal(plain, guided)
    # and w != 0 is (1 + w) s(x, t, y) - w s(x, t, null) from one batched forward pass
    x, t, _ = _inputs(4, seed=1)
    s_y = sampling.model_score_fn(model, labels=y)(x, t)
    s_u = sampling.model_score_fn(model, labels=np.full(4, model.null_label))(x, t)
    s_w = sampling.model_score_fn(model, labels=y, guidance=1.5)(x, t)
    np.testing.assert_allclose(s_w, 2.5 * s_y - 1.5 * s_u, rtol=1e-4, atol=1e-4 * np.abs(s_w).max())
    # the model's unconditional call (y=None) is the "no label" row
    np.testing.assert_array_equal(model(td.Tensor(x), t).numpy(), s_u)


def test_guidance_argument_errors():
    nn.manual_seed(0)
    model = ScoreNet(SDE.marginal_std, **SMALL).eval()
    uncond = ScoreNet(SDE.marginal_std, channels=(4, 4, 8, 8), embed_dim=8, num_groups=(2, 2, 4, 4),
                      decoder_groups=4).eval()
    with pytest.raises(ValueError, match="finite"):
        sampling.model_score_fn(model, labels=np.zeros(2, int), guidance=float("nan"))
    with pytest.raises(TypeError, match="guidance must be a number"):
        sampling.model_score_fn(model, labels=np.zeros(2, int), guidance="strong")
    with pytest.raises(ValueError, match="needs labels"):
        sampling.model_score_fn(model, guidance=1.0)
    with pytest.raises(ValueError, match="has no null_label"):
        sampling.model_score_fn(uncond, labels=np.zeros(2, int), guidance=1.0)
    fn = sampling.model_score_fn(model, labels=np.zeros(3, int), guidance=1.0)
    x, t, _ = _inputs(2)
    with pytest.raises(ValueError, match="without num_classes"):
        sampling.model_score_fn(uncond, labels=np.zeros(2, int))(x, t)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        fn(x, t)


# -- training with label dropout ----------------------------------------------------------------

class _Recorder:
    """A stand-in model that records the labels the loss passes to it."""
    null_label = 10

    def __init__(self):
        self.seen = []

    def __call__(self, x, t, y=None):
        self.seen.append(np.asarray(y))
        return x * 0.0


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_label_dropout_rate_and_token(p):
    loss = train.score_matching_loss(SDE, use_labels=True, label_dropout=p)
    model = _Recorder()
    rng = train.HostGenerator("numpy", 0)
    y = np.arange(4000) % 10
    x = np.zeros((4000, 1, 2, 2), np.float32)
    loss(model, x, y, rng)
    seen = model.seen[0]
    dropped = seen == 10
    # binomial: 5 standard errors of the rate
    assert abs(dropped.mean() - p) < 5 * math.sqrt(p * (1 - p) / len(y)), dropped.mean()
    assert np.array_equal(seen[~dropped], y[~dropped])              # the rest are untouched
    assert set(np.unique(seen)) <= set(range(11))
    with pytest.raises(ValueError, match=r"label_dropout must lie in \[0, 1\]"):
        train.score_matching_loss(SDE, use_labels=True, label_dropout=1.5)


def test_conditional_likelihood_uses_the_label(backend):
    # with the exact class scores the conditional bits/dim of class-0 data is better given y = 0
    score, _ = class_gaussian_score(backend)

    class Exact:
        def __call__(self, x, t, y):
            var = V + SDE.marginal_std(t) ** 2
            mus = td.Tensor(backend.asarray(np.append(MU_CLASS, MU_U).astype(np.float64)))
            return -(x - mus[y].reshape(-1, 1)) / var.reshape(-1, 1)

    rng = np.random.default_rng(0)
    x = backend.asarray((MU_CLASS[0] + math.sqrt(V) * rng.normal(size=(8, 3))))
    right = sampling.log_likelihood(sampling.conditional_score_model(Exact(), backend.asarray(np.zeros(8, int))),
                                    x, SDE, backend.default_rng(0), rtol=1e-6, atol=1e-6)
    wrong = sampling.log_likelihood(sampling.conditional_score_model(Exact(), backend.asarray(np.full(8, 2))),
                                    x, SDE, backend.default_rng(0), rtol=1e-6, atol=1e-6)
    assert (right > wrong).all()
