"""tinydiff.nn: Module machinery (registration order, state dicts, saving, moving), layers
against PyTorch (when importable), default initialisations, and float64 gradient checks."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinydiff as td
import tinydiff.nn as nn
from tinydiff.testing import strict_cupy

fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                             HealthCheck.data_too_large])


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("scale", np.array([2.0], np.float32))
        self.register_buffer("cache", np.zeros(2, np.float32), persistent=False)

    def forward(self, x):
        return self.norm(self.lin(x)) * td.Tensor(self.scale)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = Block()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 2)])
        self.alpha = nn.Parameter(np.ones(2, np.float32))
        self.shared = self.layers[1]          # the same module twice: its parameters count once

    def forward(self, x):
        h = self.first(x)
        for layer in self.layers:
            h = layer(h).silu()
        return h * self.alpha


def _host(a):
    return a if isinstance(a, np.ndarray) else td.backend_of(a).to_host(a)


# -- registration, ordering, state dicts -------------------------------------------------------

def test_named_parameters_registration_order():
    nn.manual_seed(0)
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    # registration order within each module, the module's own parameters before its children's
    assert names == ["alpha", "first.lin.weight", "first.lin.bias", "first.norm.weight",
                     "first.norm.bias", "layers.0.weight", "layers.0.bias", "layers.1.weight",
                     "layers.1.bias"]
    assert len(list(net.parameters())) == len(names) == len({id(p) for p in net.parameters()})
    assert [n for n, _ in net.named_buffers()] == ["first.scale", "first.cache"]
    # as in PyTorch: each module's parameters, then its persistent buffers, then its children
    assert list(net.state_dict()) == ["alpha", "first.scale"] + names[1:]
    assert net.num_parameters() == 2 + 16 + 8 + 20 + 10


def test_state_dict_is_a_host_copy(backend):
    net = Net().to(backend)
    sd = net.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    sd["alpha"][:] = 7.0
    assert np.all(net.alpha.numpy() == 1.0)


def test_load_state_dict_round_trip_and_no_aliasing(backend):
    nn.manual_seed(1)
    a = Net().to(backend)
    nn.manual_seed(2)
    b = Net().to(backend)
    x = td.Tensor(backend.asarray(np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)))
    assert not np.allclose(a(x).numpy(), b(x).numpy())
    sd = a.state_dict()
    res = b.load_state_dict(sd)
    assert res.missing_keys == [] and res.unexpected_keys == []
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())
    sd["first.lin.weight"] += 1.0                  # the loaded model does not alias the dict
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())
    assert backend.owns(b.first.lin.weight.data) and b.first.lin.weight.dtype == np.float32


def test_load_state_dict_errors_name_the_keys():
    net = Net()
    sd = net.state_dict()
    del sd["first.lin.bias"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["layers.0.weight"] = np.zeros((5, 4), np.float32)
    with pytest.raises(nn.StateDictError) as e:
        net.load_state_dict(sd)
    msg = str(e.value)
    assert "missing keys: first.lin.bias" in msg and "unexpected keys: extra.weight" in msg
    assert "layers.0.weight: checkpoint (5, 4), model (4, 4)" in msg
    sd["layers.0.weight"] = np.zeros((4, 4), np.float32)
    res = net.load_state_dict(sd, strict=False)
    assert res.missing_keys == ["first.lin.bias"] and res.unexpected_keys == ["extra.weight"]
    sd["layers.0.weight"] = np.zeros((4, 5), np.float32)
    with pytest.raises(nn.StateDictError, match="mis-shaped"):   # even when not strict
        net.load_state_dict(sd, strict=False)


def test_save_load_npz_exact(tmp_path, backend):
    nn.manual_seed(3)
    a = Net().to(backend)
    a.first.scale = backend.asarray(np.array([0.123456789], np.float32))
    path = str(tmp_path / "weights.bin")            # any name: no ".npz" is appended
    a.save(path)
    nn.manual_seed(4)
    b = Net().to(backend)
    b.load(path)
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and v.dtype == v2.dtype
        np.testing.assert_array_equal(v, v2)        # bit-exact
    with np.load(path) as f:
        assert list(f.files) == list(a.state_dict())


def test_to_backend_and_back_keeps_parameter_objects():
    nn.manual_seed(5)
    net = Net()
    before = net.state_dict()
    params = list(net.parameters())
    net.to("strict")
    assert all(isinstance(p.data, strict_cupy.ndarray) for p in net.parameters())
    assert all(isinstance(b, strict_cupy.ndarray) for b in net.buffers())
    assert [id(p) for p in net.parameters()] == [id(p) for p in params]
    x = td.Tensor(td.get_backend("strict").asarray(np.ones((2, 3), np.float32)))
    out_strict = net(x).numpy()
    net.to("numpy")
    assert net.backend.name == "numpy"
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    np.testing.assert_allclose(net(td.Tensor(np.ones((2, 3), np.float32))).numpy(), out_strict, rtol=1e-6)


def test_astype_float64_and_grads_follow():
    net = Net().to(dtype=np.float64)
    assert all(p.dtype == np.float64 for p in net.parameters())
    assert all(b.dtype == np.float64 for b in net.buffers())
    out = net(td.Tensor(np.ones((2, 3))))
    out.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == np.float64 for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_train_eval_recursive_and_requires_grad():
    net = Net()
    net.eval()
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())
    net.requires_grad_(False)
    assert not any(p.requires_grad for p in net.parameters())


def test_containers_and_errors():
    seq = nn.Sequential(nn.Linear(2, 3), nn.SiLU(), nn.Linear(3, 1))
    assert len(seq) == 3 and isinstance(seq[1], nn.SiLU) and len(seq[:2]) == 2
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert seq(td.Tensor(np.ones((4, 2), np.float32))).shape == (4, 1)
    ml = nn.ModuleList()
    with pytest.raises(TypeError, match="Modules"):
        ml.append(3)

    class Forgot(nn.Module):
        def __init__(self):
            self.w = 1

    with pytest.raises(AttributeError, match="super"):
        Forgot()
    with pytest.raises(AttributeError, match="nope"):
        Net().nope
    assert "Linear(3, 4" in repr(Net())
    with pytest.raises(NotImplementedError):
        nn.Module()(1)


def test_reassigning_replaces_registration():
    net = Net()
    net.alpha = nn.Parameter(np.zeros(2, np.float32))
    assert net.alpha.numpy().sum() == 0 and len([n for n, _ in net.named_parameters() if n == "alpha"]) == 1
    net.first = nn.Identity()
    assert not any(n.startswith("first.") for n, _ in net.named_parameters())
    del net.alpha
    assert "alpha" not in dict(net.named_parameters())


# -- initialisation -----------------------------------------------------------------------------

@pytest.mark.parametrize("make,fan_in", [
    (lambda: nn.Linear(50, 400), 50),
    (lambda: nn.Conv2d(6, 300, 3, groups=2), 3 * 9),
    (lambda: nn.ConvTranspose2d(400, 20, 3, groups=2), 10 * 9),    # weight.shape[1] * k * k
])
def test_default_init_bounds(make, fan_in):
    nn.manual_seed(0)
    layer = make()
    bound = 1 / math.sqrt(fan_in)
    w, b = layer.weight.numpy(), layer.bias.numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.98 * bound
    assert w.var() == pytest.approx(bound ** 2 / 3, rel=0.05)      # uniform variance b^2 / 3
    assert np.abs(b).max() <= bound and b.std() > 0.3 * bound


def test_norm_and_embedding_init():
    g, ln, emb = nn.GroupNorm(2, 4), nn.LayerNorm((3, 4)), nn.Embedding(1000, 20)
    assert np.all(g.weight.numpy() == 1) and np.all(g.bias.numpy() == 0)
    assert ln.weight.shape == (3, 4) and np.all(ln.bias.numpy() == 0)
    e = emb.weight.numpy()
    assert abs(e.mean()) < 0.02 and e.std() == pytest.approx(1.0, abs=0.02)


def test_manual_seed_reproducible():
    nn.manual_seed(42)
    a = Net().state_dict()
    nn.manual_seed(42)
    b = Net().state_dict()
    nn.manual_seed(43)
    c = Net().state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["first.lin.weight"], c["first.lin.weight"])


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="groups"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="divide"):
        nn.GroupNorm(3, 8)
    with pytest.raises(ValueError, match="num_heads"):
        nn.SelfAttention2d(6, num_heads=4)
    with pytest.raises(ValueError, match="p must"):
        nn.Dropout(1.0)


# -- dropout -------------------------------------------------------------------------------------

def test_dropout(backend):
    nn.manual_seed(0)
    d = nn.Dropout(0.25)
    x = td.Tensor(backend.asarray(np.ones((200, 50), np.float32)))
    y = d(x).numpy()
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
    d.eval()
    assert d(x) is x
    nn.manual_seed(0)
    d2 = nn.Dropout(0.25)
    np.testing.assert_array_equal(d2(x).numpy(), y)   # same seed, same mask


# -- layers against PyTorch ---------------------------------------------------------------------

def _to_torch(torch, module, tmod):
    tmod.load_state_dict({k: torch.tensor(v) for k, v in module.state_dict().items()})
    return tmod


@st.composite
def conv_layer_case(draw):
    groups = draw(st.integers(1, 2))
    return dict(cin=groups * draw(st.integers(1, 3)), cout=groups * draw(st.integers(1, 3)),
                k=draw(st.integers(1, 3)), stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, 1)),
                dilation=draw(st.integers(1, 2)), groups=groups, bias=draw(st.booleans()),
                op=draw(st.integers(0, 1)), seed=draw(st.integers(0, 1000)))


@fixture_ok
@given(c=conv_layer_case())
def test_conv_layers_match_torch(c, backend):
    torch = pytest.importorskip("torch")
    nn.manual_seed(c["seed"])
    x = np.random.default_rng(c["seed"]).standard_normal((2, c["cin"], 7, 6)).astype(np.float32)
    conv = nn.Conv2d(c["cin"], c["cout"], c["k"], c["stride"], c["padding"], c["dilation"], c["groups"], c["bias"])
    tconv = torch.nn.Conv2d(c["cin"], c["cout"], c["k"], c["stride"], c["padding"], c["dilation"],
                            c["groups"], c["bias"])
    op = min(c["op"], max(c["stride"], c["dilation"]) - 1)
    de = nn.ConvTranspose2d(c["cin"], c["cout"], c["k"], c["stride"], c["padding"], op, c["groups"],
                            c["bias"], c["dilation"])
    tde = torch.nn.ConvTranspose2d(c["cin"], c["cout"], c["k"], c["stride"], c["padding"], op,
                                   c["groups"], c["bias"], c["dilation"])
    for ours, theirs in ((conv, tconv), (de, tde)):
        assert ours.weight.shape == tuple(theirs.weight.shape)
        _to_torch(torch, ours, theirs)
        ours.to(backend)
        y = ours(td.Tensor(backend.asarray(x))).numpy()
        np.testing.assert_allclose(y, theirs(torch.tensor(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_other_layers_match_torch(backend):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    nn.manual_seed(0)
    x4 = rng.standard_normal((2, 8, 5, 3)).astype(np.float32)
    x2 = rng.standard_normal((4, 6)).astype(np.float32)
    idx = np.array([[0, 3], [3, 9]])
    cases = [
        (nn.Linear(6, 5), torch.nn.Linear(6, 5), x2),
        (nn.GroupNorm(4, 8), torch.nn.GroupNorm(4, 8), x4),
        (nn.LayerNorm((5, 3)), torch.nn.LayerNorm((5, 3)), x4),
        (nn.Embedding(10, 4), torch.nn.Embedding(10, 4), idx),
        (nn.GELU(), torch.nn.GELU(), x4),
        (nn.GELU("tanh"), torch.nn.GELU("tanh"), x4),
        (nn.AvgPool2d(2), torch.nn.AvgPool2d(2), x4),
        (nn.Upsample(scale_factor=2), torch.nn.Upsample(scale_factor=2), x4),
        (nn.Sequential(nn.Flatten(), nn.ReLU()), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.ReLU()), x4),
    ]
    for ours, theirs, x in cases:
        for p in ours.parameters():                  # non-trivial affine parameters
            p.data = p.data + rng.standard_normal(p.shape).astype(np.float32) * 0.1
        _to_torch(torch, ours, theirs)
        ours.to(backend)
        xin = backend.asarray(x)
        y = ours(td.Tensor(xin) if x.dtype != idx.dtype else xin).numpy()
        ref = theirs(torch.tensor(x)).detach().numpy()
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5, err_msg=type(ours).__name__)


def test_self_attention_matches_torch_composition(backend):
    torch = pytest.importorskip("torch")
    nn.manual_seed(1)
    att = nn.SelfAttention2d(8, num_heads=2, num_groups=4)
    x = np.random.default_rng(1).standard_normal((2, 8, 3, 4)).astype(np.float32)
    sd = {k: torch.tensor(v) for k, v in att.state_dict().items()}
    xt = torch.tensor(x)
    h = torch.nn.functional.group_norm(xt, 4, sd["norm.weight"], sd["norm.bias"])
    tok = h.reshape(2, 8, 12).transpose(1, 2)
    qkv = torch.nn.functional.linear(tok, sd["qkv.weight"], sd["qkv.bias"]).reshape(2, 12, 3, 2, 4)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 12, 8)
    ref = xt + torch.nn.functional.linear(o, sd["proj.weight"], sd["proj.bias"]).transpose(1, 2).reshape(2, 8, 3, 4)
    att.to(backend)
    y = att(td.Tensor(backend.asarray(x))).numpy()
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-4, atol=1e-5)


# -- float64 gradient checks through modules ------------------------------------------------------

def _param_swap_fn(module, name, fn_of_module):
    """f(x, p): ``module``'s parameter ``name`` replaced by the tensor p (so gradcheck can vary it)."""
    *path, leaf = name.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)

    def f(x, p):
        old = owner._parameters[leaf]
        owner._parameters[leaf] = p
        try:
            return fn_of_module(x)
        finally:
            owner._parameters[leaf] = old
    return f, owner._parameters[leaf]


@pytest.mark.parametrize("make,shape,pname", [
    (lambda: nn.LayerNorm(5), (3, 5), "weight"),
    (lambda: nn.SelfAttention2d(4, num_heads=2, num_groups=2), (2, 4, 2, 3), "qkv.weight"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Linear(3, 2)), (5, 4), "0.weight"),
])
def test_module_gradcheck_float64(make, shape, pname, backend):
    nn.manual_seed(0)
    module = make().to(backend, dtype=np.float64)
    x = td.Tensor(backend.asarray(np.random.default_rng(0).standard_normal(shape)), requires_grad=True)
    f, p = _param_swap_fn(module, pname, module)
    p = td.Tensor(p.data.copy(), requires_grad=True)
    assert td.gradcheck(f, [x, p], mode="full", atol=1e-5)


def test_embedding_gradient_accumulates_repeated_indices(backend):
    emb = nn.Embedding(5, 3).to(backend, dtype=np.float64)
    idx = backend.asarray(np.array([1, 4, 1, 1]))
    emb(idx).sum().backward()
    g = backend.to_host(emb.weight.grad)
    np.testing.assert_array_equal(g[:, 0], [0, 3, 0, 0, 1])
