"""The scalable score U-Net (tinydiff.models.unet): float64 gradient checks (Hypothesis) of its
blocks and of a tiny network on numpy and the strict CuPy stand-in; agreement with the PyTorch
version loaded with the same weights; shapes, sizes, labels and the errors a user meets."""
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tinydiff as td
import tinydiff.nn as nn
from tinydiff import sampling
from tinydiff.models import UNET_CONFIGS, ResBlock, ScoreModel, ScoreNet, UNet, unet_from_config
from tinydiff.models.unet import Downsample, Upsample
from tinydiff.sde import VESDE, dsm_loss

SDE = VESDE(25.0)
# 8x8 inputs, levels at 8 and 4 (attention at 4 and in the middle); groups of 2 channels so the
# norms do not cancel the embedding shift (one channel per group would)
TINY = dict(image_size=8, base_channels=4, channel_mult=(1, 2), num_res_blocks=1, attention=(4,),
            num_heads=2, embed_dim=8, num_groups=2)


def _torch():
    """PyTorch, or a skip; with CI set a missing PyTorch fails instead (the rule of
    tests/test_oracles.py: a landing never skips a PyTorch comparison silently)."""
    if os.environ.get("CI", "").lower() in ("1", "true"):
        try:
            import torch
        except ImportError as e:
            pytest.fail(f"CI is set but PyTorch cannot be imported ({e}); pip install torch==2.13.0")
        return torch
    return pytest.importorskip("torch")


@pytest.fixture
def torch():
    """PyTorch on one thread for these tiny models: more threads only add overhead, and on a busy
    machine their spinning OpenMP workers stall a step for seconds."""
    torch = _torch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


def _torch_std(torch):
    return lambda t: torch.sqrt((25.0 ** (2 * t) - 1.0) / (2.0 * math.log(25.0)))   # VE, sigma 25


def _inputs(n, channels=1, size=8, seed=0, dtype=np.float64, backend=None):
    rng = np.random.default_rng(seed)
    x = rng.random((n, channels, size, size)).astype(dtype)
    t = rng.uniform(0.05, 1.0, n).astype(dtype)
    if backend is not None:
        x, t = backend.asarray(x), backend.asarray(t)
    return x, t


def _with_params(model, names, fn, n_inputs):
    """(f, params): f(*inputs, *params) is fn(*inputs) with the model's named parameters replaced
    by ``params`` (fresh float64 copies), so gradcheck can perturb them."""
    owners = []
    for name in names:
        *path, leaf = name.split(".")
        owner = model
        for part in path:
            owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
        owners.append((owner, leaf))

    def f(*args):
        inputs, ps = args[:n_inputs], args[n_inputs:]
        old = [o._parameters[leaf] for o, leaf in owners]
        for (o, leaf), p in zip(owners, ps):
            o._parameters[leaf] = p
        try:
            return fn(*inputs)
        finally:
            for (o, leaf), p in zip(owners, old):
                o._parameters[leaf] = p
    return f, [td.Tensor(o._parameters[leaf].data.copy(), requires_grad=True) for o, leaf in owners]


# -- the blocks --------------------------------------------------------------------------------

@settings(max_examples=4)
@given(chans=st.sampled_from([(4, 4), (4, 8), (6, 4)]), hw=st.sampled_from([(4, 4), (3, 5), (2, 2)]),
       seed=st.integers(0, 2 ** 16))
def test_resblock_gradcheck(backend, chans, hw, seed):
    cin, cout = chans
    nn.manual_seed(seed)
    block = ResBlock(cin, cout, embed_dim=6, num_groups=2).to(backend, dtype=np.float64)
    assert (cin != cout) == ("nin_shortcut" in block._modules)     # 1x1 skip only when widths differ
    rng = np.random.default_rng(seed)
    x = td.Tensor(backend.asarray(rng.normal(size=(2, cin, *hw))), requires_grad=True)
    e = td.Tensor(backend.asarray(rng.normal(size=(2, 6))), requires_grad=True)
    # with respect to the input and the embedding, every element
    assert td.gradcheck(block, [x, e], mode="full")
    # and to a weight of every kind (the 1x1 skip's when there is one)
    names = ["conv1.weight", "temb_proj.weight", "norm1.weight", "norm2.bias", "conv2.bias"]
    if cin != cout:
        names.append("nin_shortcut.weight")
    f, params = _with_params(block, names, block, 2)
    assert td.gradcheck(f, [x, e] + params, mode="directional", seed=seed)


def test_resblock_is_the_ddpm_formula(backend):
    """h = conv1(swish(GN(x))) + Linear(e); out = skip(x) + conv2(swish(GN(h))), written out."""
    nn.manual_seed(1)
    block = ResBlock(4, 6, embed_dim=5, num_groups=2, dropout=0.3).to(backend, dtype=np.float64).eval()
    F = nn.functional
    rng = np.random.default_rng(1)
    x = td.Tensor(backend.asarray(rng.normal(size=(3, 4, 5, 5))))
    e = td.Tensor(backend.asarray(rng.normal(size=(3, 5))))
    h = block.conv1(F.silu(block.norm1(x)))
    h = h + block.temb_proj(e).reshape(3, 6, 1, 1)
    h = block.conv2(F.silu(block.norm2(h)))                     # eval: dropout is the identity
    want = block.nin_shortcut(x) + h
    np.testing.assert_allclose(block(x, e).numpy(), want.numpy(), rtol=1e-12, atol=1e-12)
    # in training mode the dropout acts (and only there)
    block.train()
    assert not np.allclose(block(x, e).numpy(), want.numpy())


@settings(max_examples=3)
@given(seed=st.integers(0, 2 ** 16))
def test_unet_attention_blocks_gradcheck(backend, seed):
    """The attention blocks as the U-Net builds them (nn.SelfAttention2d itself, with the model's
    heads and groups): the one after a level's block and the middle one."""
    nn.manual_seed(seed)
    model = UNet(SDE.marginal_std, **TINY).to(backend, dtype=np.float64)
    assert type(model.mid.attn_1) is nn.SelfAttention2d and type(model.down[1].attn[0]) is nn.SelfAttention2d
    rng = np.random.default_rng(seed)
    for block in (model.down[1].attn[0], model.mid.attn_1, model.up[1].attn[1]):
        assert block.num_heads == 2 and block.norm.num_groups == 2
        x = td.Tensor(backend.asarray(rng.normal(size=(2, 8, 4, 4))), requires_grad=True)
        f, params = _with_params(block, ["qkv.weight", "proj.weight", "norm.weight"], block, 1)
        assert td.gradcheck(f, [x] + params, mode="directional", seed=seed)
    # the size-4 levels have one after each block; the size-8 level none
    assert len(model.down[0].attn) == 0 and len(model.up[0].attn) == 0
    assert len(model.down[1].attn) == 1 and len(model.up[1].attn) == 2


@settings(max_examples=4)
@given(c=st.sampled_from([2, 4]), hw=st.sampled_from([(4, 4), (2, 6), (6, 2)]), seed=st.integers(0, 2 ** 16))
def test_downsample_upsample_gradcheck(backend, c, hw, seed):
    nn.manual_seed(seed)
    down = Downsample(c).to(backend, dtype=np.float64)
    up = Upsample(c).to(backend, dtype=np.float64)
    rng = np.random.default_rng(seed)
    x = td.Tensor(backend.asarray(rng.normal(size=(2, c, *hw))), requires_grad=True)
    assert down(x).shape == (2, c, hw[0] // 2, hw[1] // 2)
    assert up(x).shape == (2, c, 2 * hw[0], 2 * hw[1])
    assert td.gradcheck(down, [x], mode="full") and td.gradcheck(up, [x], mode="full")
    for block in (down, up):
        f, params = _with_params(block, ["conv.weight", "conv.bias"], block, 1)
        assert td.gradcheck(f, [x] + params, mode="directional", seed=seed)
    # upsample = the 3x3 conv of the nearest-neighbour x2 image
    xh = backend.to_host(x.data)
    big = td.Tensor(backend.asarray(xh.repeat(2, axis=2).repeat(2, axis=3)))
    np.testing.assert_allclose(up(x).numpy(), up.conv(big).numpy(), rtol=1e-12, atol=1e-12)


# -- the whole network -------------------------------------------------------------------------

@settings(max_examples=2)
@given(seed=st.integers(0, 2 ** 16), conditional=st.booleans(), wrt_t=st.booleans())
def test_tiny_unet_gradcheck(backend, seed, conditional, wrt_t):
    nn.manual_seed(seed)
    model = UNet(SDE.marginal_std, in_channels=2, num_classes=3 if conditional else None,
                 **TINY).to(backend, dtype=np.float64)
    xh, th = _inputs(2, channels=2, seed=seed)
    x = td.Tensor(backend.asarray(xh), requires_grad=True)
    t = td.Tensor(backend.asarray(th), requires_grad=wrt_t)
    y = backend.asarray(np.array([0, 3])) if conditional else None     # 3: the "no label" row
    names = ["conv_in.weight", "down.0.block.0.conv1.weight", "down.0.downsample.conv.weight",
             "mid.attn_1.qkv.weight", "up.1.block.1.nin_shortcut.weight", "up.1.upsample.conv.bias",
             "embed.3.weight", "norm_out.weight"]
    if conditional:
        names.append("label_embed.weight")
    f, params = _with_params(model, names, lambda x, t: model(x, t, y), 2)
    # input, time (through the Fourier features and std(t)) and parameters of every kind
    assert td.gradcheck(f, [x, t] + params, mode="directional", seed=seed, atol=1e-6, rtol=1e-5)


def test_every_parameter_is_used_and_names_follow_ddpm():
    nn.manual_seed(0)
    model = UNet(SDE.marginal_std, num_classes=3, **{**TINY, "attention": (8, 4)})
    x, t = _inputs(2, dtype=np.float32)
    model(x, t, np.array([0, 1])).sum().backward()
    unused = [k for k, p in model.named_parameters() if p.grad is None or not np.abs(p.grad).sum()]
    assert not unused, unused
    keys = set(model.state_dict())
    for k in ("embed.0.W", "embed.1.weight", "embed.3.bias", "label_embed.weight", "conv_in.weight",
              "down.0.block.0.norm1.weight", "down.0.block.0.temb_proj.weight", "down.0.attn.0.qkv.weight",
              "down.0.downsample.conv.weight", "down.1.block.0.nin_shortcut.weight",
              "mid.block_1.conv2.weight",
              "mid.attn_1.proj.bias", "mid.block_2.norm2.bias", "up.1.block.1.conv1.weight",
              "up.1.upsample.conv.weight", "up.0.attn.1.norm.weight", "norm_out.weight", "conv_out.bias"):
        assert k in keys, k
    assert "up.0.upsample.conv.weight" not in keys and "down.1.downsample.conv.weight" not in keys
    assert "embed.0.W" not in dict(model.named_parameters())          # a fixed buffer, as ScoreNet's
    assert isinstance(model, ScoreModel) and isinstance(ScoreNet(SDE.marginal_std), ScoreModel)


def test_skip_connections_follow_ddpm():
    """Every encoder map is used once: decoder level i runs num_res_blocks + 1 blocks, whose inputs
    are [h, skip] with the widths of the maps pushed by the encoder."""
    model = UNet(SDE.marginal_std, image_size=16, base_channels=4, channel_mult=(1, 2, 3),
                 num_res_blocks=2, attention=(), num_heads=1, embed_dim=8)
    # pushed: conv_in 4, down0: 4, 4, ds 4, down1: 8, 8, ds 8, down2: 12, 12
    assert [b.in_ch for b in model.up[2].block] == [12 + 12, 12 + 12, 12 + 8]
    assert [b.in_ch for b in model.up[1].block] == [12 + 8, 8 + 8, 8 + 4]
    assert [b.in_ch for b in model.up[0].block] == [8 + 4, 4 + 4, 4 + 4]
    assert [len(lv.block) for lv in model.down] == [2, 2, 2]
    assert [len(lv.block) for lv in model.up] == [3, 3, 3]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("num_classes", [None, 10])
def test_shapes_at_sizes_28_32_16(channels, num_classes):
    nn.manual_seed(0)
    model = UNet(SDE.marginal_std, in_channels=channels, image_size=28, base_channels=4,
                 channel_mult=(1, 2, 2), attention=(7,), num_heads=2, embed_dim=8, num_classes=num_classes)
    y = None if num_classes is None else np.array([3, model.null_label])
    for size in (28, 32, 16):         # any size divisible by 4 (2 downsamplings)
        x, t = _inputs(2, channels, size, dtype=np.float32)
        with td.no_grad():
            out = model(x, t, y)
        assert out.shape == (2, channels, size, size) and out.dtype == np.float32
        assert np.isfinite(out.numpy()).all()
    wide = UNet(SDE.marginal_std, in_channels=channels, image_size=32, base_channels=4,
                channel_mult=(1, 2, 2, 2), attention=(8,), num_heads=2, embed_dim=8, num_classes=num_classes)
    x, t = _inputs(2, channels, 32, dtype=np.float32)
    assert wide(x, t, y).shape == (2, channels, 32, 32)
    assert wide(np.zeros((2, channels, 8, 16), np.float32), t, y).shape == (2, channels, 8, 16)
    assert model.image_size == 28 and model.in_channels == channels and model.num_classes == num_classes


def test_size_errors_name_the_sizes_that_work():
    model = UNet(SDE.marginal_std, **{**TINY, "channel_mult": (1, 2, 2), "image_size": 8})
    with pytest.raises(ValueError, match=r"^UNet: image size 30 is not divisible by 4 \(2\^2 "
                                         r"downsamplings\); use a size that is, e.g. 28 or 32$"):
        model(np.zeros((1, 1, 30, 30), np.float32), 0.5)
    with pytest.raises(ValueError, match="image size 6 is not divisible by 4.*e.g. 4 or 8"):
        model(np.zeros((1, 1, 8, 6), np.float32), 0.5)           # width too
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 1, H, W\)"):
        model(np.zeros((1, 3, 8, 8), np.float32), 0.5)
    with pytest.raises(ValueError, match=r"^UNet: image size 28 is not divisible by 8 .*e.g. 24 or 32$"):
        UNet(SDE.marginal_std, image_size=28, channel_mult=(1, 2, 2, 2), attention=())
    with pytest.raises(ValueError, match="image_size must be a positive"):
        UNet(SDE.marginal_std, image_size=0)


def test_construction_errors():
    with pytest.raises(ValueError, match=r"attention sizes must be among \[28, 14, 7\].*got \[5\]"):
        UNet(SDE.marginal_std, attention=(5,))
    with pytest.raises(ValueError, match=r"attention sizes must be among \[32, 16, 8, 4\]"):
        UNet(SDE.marginal_std, image_size=32, channel_mult=(1, 2, 2, 2), attention=(16, 7))
    with pytest.raises(ValueError, match="num_heads=3 must divide the 64 channels"):
        UNet(SDE.marginal_std, num_heads=3)                       # the middle block always attends
    with pytest.raises(ValueError, match="num_heads=3 must divide the 4 channels of the attention "
                                         "blocks at 8x8"):
        UNet(SDE.marginal_std, **{**TINY, "base_channels": 4, "channel_mult": (1, 3), "attention": (8,),
                                  "num_heads": 3})
    with pytest.raises(ValueError, match="embed_dim must be even"):
        UNet(SDE.marginal_std, embed_dim=9)
    with pytest.raises(ValueError, match="unknown configuration 'unet-99'.*unet-28s"):
        unet_from_config("unet-99", SDE.marginal_std)


def test_labels_are_validated_and_none_is_the_null_label():
    nn.manual_seed(0)
    model = UNet(SDE.marginal_std, num_classes=3, **TINY)
    assert model.null_label == 3 and model.label_embed.weight.shape == (4, 8)
    x, t = _inputs(2, dtype=np.float32)
    with td.no_grad():
        none = model(x, t).numpy()
        np.testing.assert_array_equal(none, model(x, t, np.array([3, 3])).numpy())
        np.testing.assert_array_equal(none, model(x, t, 3).numpy())
        a = model(x, t, np.array([1, 2])).numpy()
        b = model(x, t, np.array([0, 2])).numpy()
    assert np.abs(a[0] - b[0]).max() > 1e-3 * np.abs(a[0]).max()       # the label matters,
    np.testing.assert_array_equal(a[1], b[1])                          # per sample
    with pytest.raises(ValueError, match=r"UNet: labels must lie in 0..3 \(3 = no label\), got 0..4"):
        model(x, t, np.array([0, 4]))
    with pytest.raises(ValueError, match=r"labels must lie in 0..3"):
        model(x, t, np.array([-1, 0]))
    with pytest.raises(ValueError, match=r"UNet: labels must have shape \(2,\)"):
        model(x, t, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="integer class indices"):
        model(x, t, np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"without num_classes; build it with "
                                         r"UNet\(\.\.\., num_classes=10\)"):
        UNet(SDE.marginal_std, **TINY)(x, t, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"UNet: t must be finite and > 0"):
        model(x, np.array([0.5, 0.0]))


def test_output_is_divided_by_marginal_std_and_backends_agree(backend):
    nn.manual_seed(0)
    model = UNet(SDE.marginal_std, in_channels=3, num_classes=3, **TINY)
    nn.manual_seed(0)
    unscaled = UNet(lambda t: t * 0 + 1, in_channels=3, num_classes=3, **TINY)
    x, t = _inputs(3, channels=3, dtype=np.float32)
    y = np.array([0, 1, 3])
    ref = model(x, t, y).numpy()
    np.testing.assert_allclose(ref * SDE.marginal_std(t)[:, None, None, None], unscaled(x, t, y).numpy(),
                               rtol=1e-5, atol=1e-6)
    model.to(backend)
    out = model(td.Tensor(backend.asarray(x)), backend.asarray(t), backend.asarray(y))
    assert out.backend is backend and out.dtype == np.float32
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_loss_and_sampler_take_the_unet(backend):
    """The ScoreNet contract: dsm_loss and the samplers run unchanged (conditional, with guidance)."""
    nn.manual_seed(0)
    model = UNet(SDE.marginal_std, num_classes=3, **TINY).to(backend)
    x0 = backend.asarray(np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32))
    labels = backend.asarray(np.array([0, 1, 2, 3]))
    loss = dsm_loss(model, x0, SDE, backend.default_rng(0), labels=labels)
    loss.backward()
    assert np.isfinite(loss.item()) and model.conv_in.weight.grad is not None
    model.eval()
    score_fn = sampling.model_score_fn(model, labels=backend.asarray(np.array([0, 2])), guidance=1.0)
    out = sampling.euler_maruyama(score_fn, SDE, (2, 1, 8, 8), num_steps=3, rng=backend.default_rng(1))
    assert out.shape == (2, 1, 8, 8) and np.isfinite(backend.to_host(out)).all()


def test_named_configurations():
    counts = {name: unet_from_config(name, SDE.marginal_std, 3 if "32" in name else 1).num_parameters()
              for name in ("unet-28s", "unet-32s")}
    assert counts == {"unet-28s": 1_125_089, "unet-32s": 1_235_715}
    assert UNET_CONFIGS["unet-32l"] == dict(image_size=32, base_channels=128, channel_mult=(1, 2, 2, 2),
                                            num_res_blocks=2, attention=(16,), num_heads=4, dropout=0.1)
    m = unet_from_config("unet-28s", SDE.marginal_std, 1, num_classes=10, base_channels=8, dropout=0.2)
    assert (m.base_channels, m.num_classes, m.dropout, m.attention, m.image_size) == (8, 10, 0.2, (7,), 28)
    assert m.embed_dim == 32 and m.down[0].block[0].dropout.p == 0.2


def test_checkpoint_round_trip(tmp_path):
    nn.manual_seed(7)
    a = UNet(SDE.marginal_std, num_classes=3, **TINY)
    path = str(tmp_path / "unet.npz")
    a.save(path)
    nn.manual_seed(8)
    b = UNet(SDE.marginal_std, num_classes=3, **TINY)
    x, t = _inputs(2, dtype=np.float32)
    b.load(path)
    np.testing.assert_array_equal(a(x, t, 1).numpy(), b(x, t, 1).numpy())
    with pytest.raises(nn.StateDictError):
        UNet(SDE.marginal_std, num_classes=3, **{**TINY, "base_channels": 6}).load(path)


# -- against the PyTorch version ---------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("num_classes", [None, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unet_matches_pytorch(torch, channels, num_classes, dtype):
    from tinydiff.testing.torch_reference import torch_unet
    kw = dict(in_channels=channels, image_size=16, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
              attention=(8, 4), num_heads=2, embed_dim=16, num_classes=num_classes, num_groups=4, dropout=0.1)
    nn.manual_seed(0)
    ours = UNet(SDE.marginal_std, **kw).to(dtype=dtype)
    theirs = torch_unet(_torch_std(torch), **kw).to(torch.float64 if dtype == np.float64 else torch.float32)
    # same names, same shapes: tinydiff's state dict loads into the torch model as it is
    sd = ours.state_dict()
    assert set(sd) == set(theirs.state_dict())
    theirs.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    ours.eval()
    theirs.eval()                                  # dropout off in both
    x, t = _inputs(3, channels, 16, seed=2, dtype=dtype)
    y = None if num_classes is None else np.array([0, 3, 4])          # 4: the "no label" row
    xt = torch.tensor(x, requires_grad=True)
    ref = theirs(xt, torch.tensor(t), *([] if y is None else [torch.tensor(y)]))
    xo = td.Tensor(x, requires_grad=True)
    out = ours(xo, t, y)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    scale = np.abs(ref.detach().numpy()).max()
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=tol["rtol"], atol=tol["atol"] * scale)
    v = np.random.default_rng(3).normal(size=out.shape).astype(dtype)
    (ref * torch.tensor(v)).sum().backward()
    (out * td.Tensor(v)).sum().backward()
    gref = xt.grad.numpy()
    np.testing.assert_allclose(xo.grad, gref, rtol=tol["rtol"] * 10,
                               atol=tol["atol"] * 10 * np.abs(gref).max())
    mine, refs = dict(ours.named_parameters()), dict(theirs.named_parameters())
    names = ["down.1.block.0.nin_shortcut.weight", "mid.attn_1.qkv.weight", "up.2.attn.1.proj.weight",
             "up.1.upsample.conv.weight", "embed.1.weight", "conv_out.bias"]
    if num_classes:
        names.append("label_embed.weight")
    for name in names:
        g = refs[name].grad.numpy()
        np.testing.assert_allclose(mine[name].grad, g, rtol=tol["rtol"] * 10,
                                   atol=tol["atol"] * 10 * np.abs(g).max(), err_msg=name)


def test_torch_weights_load_into_tinydiff(torch):
    from tinydiff.testing.torch_reference import torch_unet
    torch.manual_seed(0)
    kw = dict(in_channels=3, image_size=8, base_channels=8, channel_mult=(1, 2), attention=(4,), num_heads=2,
              num_classes=2)
    theirs = torch_unet(lambda t: torch.ones_like(t), **kw).eval()
    ours = UNet(lambda t: t * 0 + 1, **kw)
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    x, t = _inputs(2, 3, 8, seed=5, dtype=np.float32)
    ref = theirs(torch.tensor(x), torch.tensor(t)).detach().numpy()          # y=None on both sides
    np.testing.assert_allclose(ours(x, t).numpy(), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("name, base", [("unet-latent", None), ("unet-28s", 16), ("unet-28s", None)])
def test_the_embedding_reaches_every_block_at_the_shipped_widths(name, base):
    """The time and class embedding enter each ResBlock as a shift before a group norm; with one
    channel per group the norm would cancel it (the bug this guards against: a conditional U-Net
    at 32 channels that ignored its labels and t). Every ResBlock's norm2 keeps >= 4 channels per
    group, and the network's output (times std(t)) changes with the label and with t."""
    from tinydiff.models.unet import EMBED_GROUP_CHANNELS, GROUP_CHANNELS, ResBlock
    from tinydiff.sde import VESDE
    sde = VESDE(25.0)
    nn.manual_seed(0)
    kw = {} if base is None else {"base_channels": base}
    cfg = UNET_CONFIGS[name]
    c = 2 if name == "unet-latent" else 1
    model = unet_from_config(name, sde.marginal_std, in_channels=c, num_classes=10, **kw)
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    assert blocks and all(b.out_ch // b.norm2.num_groups >= EMBED_GROUP_CHANNELS for b in blocks)
    # every other norm too (norm1, the attention blocks', norm_out): one channel per group would
    # remove each channel's mean, and with it the noisy image's mean brightness
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) > 2 * len(blocks)
    assert all(n.num_channels // n.num_groups >= GROUP_CHANNELS for n in norms)
    size = cfg["image_size"]
    x = np.random.default_rng(0).normal(size=(1, c, size, size)).astype(np.float32).repeat(3, 0)
    with td.no_grad():
        by_label = model(x, np.full(3, 0.3, np.float32), np.array([0, 1, 10])).data
        ts = np.array([0.1, 0.3, 0.9], np.float32)
        by_time = model(x, ts, np.array([1, 1, 1])).data * sde.marginal_std(ts)[:, None, None, None]
    for out in (by_label, by_time):
        assert np.abs(out[0] - out[1]).mean() > 1e-3 * np.abs(out).mean()
        assert np.abs(out[1] - out[2]).mean() > 1e-3 * np.abs(out).mean()


def test_unet_runs_from_before_group_channels_keep_their_norms(monkeypatch):
    """A U-Net run saved before ``group_channels`` existed had one channel per group outside
    ResBlock.norm2: its configuration must rebuild that model (its weights would load into the
    new one just as well, shape for shape, and compute something else). New runs keep 4."""
    from tinydiff import experiments as E
    new = E.resolve_config({"preset": "fashion-mnist-cond", "base_channels": 16})
    assert "group_channels" in new
    old_saved = {k: v for k, v in new.items() if k != "group_channels"}
    monkeypatch.setattr(E, "read_config", lambda path: old_saved)
    old = E.resolve_config({}, run_dir="a-run")
    assert old["group_channels"] == 1
    for config, per_group in ((new, 4), (old, 1)):
        model = E.build_model(config)
        assert model.norm_out.num_channels // model.norm_out.num_groups == per_group
        assert model.mid.attn_1.norm.num_channels // model.mid.attn_1.norm.num_groups == per_group
        assert model.mid.block_1.out_ch // model.mid.block_1.norm2.num_groups >= 4   # both
    # a run that stored the key keeps what it stored
    monkeypatch.setattr(E, "read_config", lambda path: new)
    assert E.resolve_config({}, run_dir="a-run")["group_channels"] is None
