"""The reference ScoreNet (docs/design.md, the reference model): size, shapes, agreement with the PyTorch tutorial
model loaded with the same weights, float64 gradient checks, labels and errors."""
import math

import numpy as np
import pytest

import tinydiff as td
import tinydiff.nn as nn
from tinydiff.models import GaussianFourierProjection, ScoreNet
from tinydiff.sde import VESDE

SDE = VESDE(25.0)
# groups of 2-4 channels: with one channel per group the norm would cancel the embedding shift
SMALL = dict(channels=(8, 8, 16, 16), embed_dim=8, num_groups=(2, 4, 4, 4), decoder_groups=4)


def _inputs(n, seed=0, dtype=np.float32, backend=None):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 28, 28)).astype(dtype)
    t = rng.uniform(0.05, 1.0, n).astype(dtype)
    if backend is not None:
        x, t = backend.asarray(x), backend.asarray(t)
    return x, t


def _expected_parameter_count(c, e, cin=1):
    c1, c2, c3, c4 = c
    embed = e * e + e
    dense = sum(e * k + k for k in (c1, c2, c3, c4, c3, c2, c1))
    convs = 9 * (cin * c1 + c1 * c2 + c2 * c3 + c3 * c4)
    tconvs = 9 * (c4 * c3 + 2 * c3 * c2 + 2 * c2 * c1 + 2 * c1 * cin) + cin
    norms = 2 * (c1 + c2 + c3 + c4) + 2 * (c3 + c2 + c1)
    return embed + dense + convs + tconvs + norms


def test_parameter_count_and_structure():
    model = ScoreNet(SDE.marginal_std)
    n = model.num_parameters()
    assert n == _expected_parameter_count((32, 64, 128, 256), 256)
    assert 1.05e6 < n < 1.15e6                                   # "about 1.1 M parameters"
    assert [m.num_groups for m in (model.gnorm1, model.gnorm2, model.gnorm3, model.gnorm4)] == [4, 32, 32, 32]
    assert [m.num_groups for m in (model.tgnorm4, model.tgnorm3, model.tgnorm2)] == [32, 32, 32]
    assert model.conv1.bias is None and model.tconv4.bias is None and model.tconv1.bias is not None
    assert model.tconv3.output_padding == (1, 1) and model.tconv4.output_padding == (0, 0)
    sd = model.state_dict()
    assert sd["embed.0.W"].shape == (128,) and "embed.0.W" not in dict(model.named_parameters())
    assert all(v.dtype == np.float32 for v in sd.values())
    small = ScoreNet(SDE.marginal_std, channels=(8, 16, 16, 32), embed_dim=16)
    assert small.num_parameters() == _expected_parameter_count((8, 16, 16, 32), 16)


def test_fourier_projection_values():
    nn.manual_seed(0)
    gfp = GaussianFourierProjection(256, scale=30.0)
    w = gfp.W
    assert abs(w.std() - 30.0) < 4.0 and w.shape == (128,)
    t = np.array([0.0, 0.3, 1.0], np.float32)
    out = gfp(td.Tensor(t)).numpy()
    proj = 2 * np.pi * t[:, None].astype(np.float64) * w[None, :]
    np.testing.assert_allclose(out, np.concatenate([np.sin(proj), np.cos(proj)], 1), atol=2e-4)


def test_fourier_projection_gradcheck():
    gfp = GaussianFourierProjection(6, scale=2.0).to(dtype=np.float64)
    t = td.Tensor(np.array([0.1, 0.5, 0.9]), requires_grad=True)
    assert td.gradcheck(gfp, [t], mode="full")


def test_output_shape_dtype_and_backends_agree(backend):
    nn.manual_seed(0)
    model = ScoreNet(SDE.marginal_std, **SMALL)
    x, t = _inputs(3)
    ref = model(td.Tensor(x), t).numpy()
    model.to(backend)
    xb, tb = _inputs(3, backend=backend)
    out = model(td.Tensor(xb), tb)
    assert out.shape == (3, 1, 28, 28) and out.dtype == np.float32 and out.backend is backend
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)
    model.to("numpy")
    np.testing.assert_array_equal(model(td.Tensor(x), t).numpy(), ref)


def test_output_is_divided_by_marginal_std():
    nn.manual_seed(0)
    model = ScoreNet(SDE.marginal_std, **SMALL)
    nn.manual_seed(0)
    unscaled = ScoreNet(lambda t: t * 0 + 1, **SMALL)
    x, t = _inputs(4)
    a, b = model(td.Tensor(x), t).numpy(), unscaled(td.Tensor(x), t).numpy()
    np.testing.assert_allclose(a * SDE.marginal_std(t)[:, None, None, None], b, rtol=1e-5, atol=1e-6)


def test_time_argument_forms():
    nn.manual_seed(0)
    model = ScoreNet(SDE.marginal_std, **SMALL)
    x, _ = _inputs(2)
    t = np.full(2, 0.4, np.float32)
    ref = model(td.Tensor(x), t).numpy()
    for form in (0.4, td.Tensor(t), td.Tensor(np.float32(0.4)), t.astype(np.float64)):
        np.testing.assert_allclose(model(td.Tensor(x), form).numpy(), ref, rtol=1e-6)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        model(td.Tensor(x), np.ones(3, np.float32))


def test_bad_inputs_have_clear_messages():
    model = ScoreNet(SDE.marginal_std, **SMALL)
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 1, H, W\)"):
        model(td.Tensor(np.zeros((2, 3, 28, 28), np.float32)), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="28x28"):
        model(td.Tensor(np.zeros((2, 1, 32, 32), np.float32)), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="num_classes"):
        model(td.Tensor(np.zeros((2, 1, 28, 28), np.float32)), np.ones(2, np.float32), np.zeros(2, int))


def test_class_conditional_embedding():
    nn.manual_seed(0)
    model = ScoreNet(SDE.marginal_std, num_classes=10, **SMALL)
    assert model.label_embed.weight.shape == (11, 8) and model.null_label == 10
    x, t = _inputs(2)
    x = td.Tensor(x)
    a = model(x, t, np.array([1, 2])).numpy()
    b = model(x, t, np.array([3, 2])).numpy()
    assert np.abs(a[0] - b[0]).max() > 1e-2 * np.abs(a[0]).max()          # the label matters,
    np.testing.assert_array_equal(a[1], b[1])                              # per sample
    np.testing.assert_array_equal(model(x, t).numpy(), model(x, t, np.array([10, 10])).numpy())
    out = model(x, t, np.array([1, 2]))
    out.sum().backward()
    g = model.label_embed.weight.grad
    assert np.abs(g[[1, 2]]).sum() > 0 and np.all(g[[0, 3, 10]] == 0)


def _with_params(model, names, fn):
    """fn(x, t) of the model, as f(x, t, *params) with the named parameters replaced."""
    owners = []
    for name in names:
        *path, leaf = name.split(".")
        owner = model
        for part in path:
            owner = getattr(owner, part)
        owners.append((owner, leaf))

    def f(x, t, *ps):
        old = [o._parameters[leaf] for o, leaf in owners]
        for (o, leaf), p in zip(owners, ps):
            o._parameters[leaf] = p
        try:
            return fn(x, t)
        finally:
            for (o, leaf), p in zip(owners, old):
                o._parameters[leaf] = p
    return f, [o._parameters[leaf] for o, leaf in owners]


@pytest.mark.parametrize("num_classes", [None, 3])
def test_small_scorenet_gradcheck_float64(backend, num_classes):
    nn.manual_seed(0)
    model = ScoreNet(SDE.marginal_std, num_classes=num_classes, **SMALL).to(backend, dtype=np.float64)
    xh, th = _inputs(2, seed=1, dtype=np.float64)
    x = td.Tensor(backend.asarray(xh), requires_grad=True)
    t = td.Tensor(backend.asarray(th), requires_grad=True)
    labels = None if num_classes is None else backend.asarray(np.array([0, 2]))
    names = ["conv2.weight", "dense6.dense.weight", "gnorm1.weight", "tconv1.bias", "embed.1.weight"]
    if num_classes:
        names.append("label_embed.weight")
    f, params = _with_params(model, names, lambda x, t: model(x, t, labels))
    params = [td.Tensor(p.data.copy(), requires_grad=True) for p in params]
    # input, time (through the Fourier features and std(t)) and parameters of every kind
    assert td.gradcheck(f, [x, t] + params, mode="directional", atol=1e-6, rtol=1e-5)


# -- against the PyTorch tutorial model ----------------------------------------------------------

def _torch_scorenet(torch, marginal_std):
    """Song's score-SDE MNIST tutorial ScoreNet, as published (names and all)."""
    from tinydiff.testing.torch_reference import torch_scorenet
    return torch_scorenet(marginal_std)


def test_scorenet_matches_pytorch_tutorial_model(backend):
    torch = pytest.importorskip("torch")

    def torch_std(t):
        return torch.sqrt((25.0 ** (2 * t) - 1.0) / (2.0 * math.log(25.0)))

    nn.manual_seed(0)
    ours = ScoreNet(SDE.marginal_std)
    theirs = _torch_scorenet(torch, torch_std)
    # same names, same shapes: the tinydiff state dict loads into the tutorial model unchanged
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()}, strict=True)
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    ours.to(backend)
    x, t = _inputs(4, seed=3)
    v = np.random.default_rng(4).standard_normal((4, 1, 28, 28)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    ref = theirs(xt, torch.tensor(t))
    (ref * torch.tensor(v)).sum().backward()
    xo = td.Tensor(backend.asarray(x), requires_grad=True)
    out = ours(xo, backend.asarray(t))
    scale = np.abs(ref.detach().numpy()).max()
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-4, atol=1e-5 * scale)
    (out * td.Tensor(backend.asarray(v))).sum().backward()
    gx = backend.to_host(xo.grad)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-3, atol=1e-4 * np.abs(xt.grad.numpy()).max())
    g_ours = backend.to_host(ours.conv2.weight.grad)
    g_ref = theirs.conv2.weight.grad.numpy()
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-3, atol=1e-4 * np.abs(g_ref).max())


def test_torch_tutorial_weights_load_into_tinydiff():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    theirs = _torch_scorenet(torch, lambda t: torch.ones_like(t))
    ours = ScoreNet(lambda t: t * 0 + 1)
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    x, t = _inputs(2, seed=5)
    ref = theirs(torch.tensor(x), torch.tensor(t)).detach().numpy()
    np.testing.assert_allclose(ours(td.Tensor(x), t).numpy(), ref, rtol=1e-4,
                               atol=1e-5 * np.abs(ref).max())


def test_checkpoint_round_trip_same_output(tmp_path):
    nn.manual_seed(7)
    a = ScoreNet(SDE.marginal_std, **SMALL)
    path = str(tmp_path / "scorenet.npz")
    a.save(path)
    nn.manual_seed(8)
    b = ScoreNet(SDE.marginal_std, **SMALL)
    x, t = _inputs(2)
    assert not np.array_equal(a(td.Tensor(x), t).numpy(), b(td.Tensor(x), t).numpy())
    b.load(path)
    np.testing.assert_array_equal(a(td.Tensor(x), t).numpy(), b(td.Tensor(x), t).numpy())
    wrong = ScoreNet(SDE.marginal_std, channels=(8, 8, 16, 8), embed_dim=8)
    with pytest.raises(nn.StateDictError, match="conv4.weight"):
        wrong.load(path)
