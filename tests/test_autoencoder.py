"""The autoencoder of latent diffusion (tinydiff.models.autoencoder): shapes, float64 gradient
checks (Hypothesis) of the encoder, decoder and loss on numpy and the strict CuPy stand-in, the
training-time corruptions, the latent normalisation, and decode(encode(x)) ~ x after a short
training on real Fashion-MNIST images."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tinydiff as td
import tinydiff.nn as nn
from tinydiff import optim
from tinydiff.models import Autoencoder, UNET_CONFIGS, unet_from_config
from tinydiff.models.autoencoder import decode_all, encode_all, gaussian_blur
from tinydiff.sde import VESDE
from tinydiff.train import HostGenerator

from conftest import data_dir

# 8x8 images -> 2x2x2 codes; widths of 2 and 4, groups of 2
TINY = dict(image_size=8, latent_channels=2, base_channels=2, num_groups=2)


def _with_params(model, names, fn, n_inputs):
    """(f, params): f(*inputs, *params) is fn(*inputs) with the named parameters replaced."""
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


def test_shapes_and_compression():
    nn.manual_seed(0)
    ae = Autoencoder(base_channels=4, num_groups=2)
    x = np.random.default_rng(0).random((3, 1, 28, 28)).astype(np.float32)
    z = ae.encode(x)
    assert z.shape == (3, 2, 7, 7) and ae.latent_shape == (2, 7, 7) and ae.compression == 8.0
    out = ae.decode(z)
    assert out.shape == (3, 1, 28, 28)
    v = out.numpy()
    assert (v > 0).all() and (v < 1).all()                     # the sigmoid keeps it in range
    assert Autoencoder(in_channels=3, image_size=32, latent_channels=4, base_channels=4,
                       num_groups=2).latent_shape == (4, 8, 8)
    # defaults: 1x28x28 -> 2x7x7, width 32
    assert Autoencoder().latent_shape == (2, 7, 7)


@pytest.mark.parametrize("kw, word", [
    (dict(image_size=30), "multiple of 4"), (dict(corruption="rotate"), "corruption"),
    (dict(corruption="mask", corruption_level=1.5), "out of range"),
    (dict(latent_noise=-1.0), "latent_noise"), (dict(latent_channels=0), "latent_channels"),
])
def test_construction_errors(kw, word):
    with pytest.raises(ValueError, match=word):
        Autoencoder(**kw)


def test_wrong_input_channels_are_refused():
    ae = Autoencoder(**TINY)
    with pytest.raises(ValueError, match=r"encode: expected images \(N, 1"):
        ae.encode(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"decode: expected codes \(N, 2"):
        ae.decode(np.zeros((1, 1, 2, 2), np.float32))


@settings(max_examples=2)
@given(seed=st.integers(0, 2 ** 16))
def test_encoder_decoder_gradcheck(backend, seed):
    nn.manual_seed(seed)
    ae = Autoencoder(**TINY).to(backend, dtype=np.float64)
    rng = np.random.default_rng(seed)
    x = td.Tensor(backend.asarray(rng.random((2, 1, 8, 8))), requires_grad=True)
    z = td.Tensor(backend.asarray(rng.normal(size=(2, 2, 2, 2))), requires_grad=True)
    enc = ["conv_in.weight", "enc.0.conv1.weight", "enc.1.conv.weight", "enc.2.nin_shortcut.weight",
           "enc.4.temb_proj.bias", "enc_norm.weight", "to_latent.bias"]
    f, params = _with_params(ae, enc, ae.encode, 1)
    assert td.gradcheck(f, [x] + params, mode="directional", seed=seed, atol=1e-6, rtol=1e-5)
    dec = ["from_latent.weight", "dec.0.conv2.weight", "dec.1.conv.bias", "dec.2.norm1.bias",
           "dec.4.conv1.bias", "dec_norm.bias", "conv_out.weight"]
    f, params = _with_params(ae, dec, ae.decode, 1)
    assert td.gradcheck(f, [z] + params, mode="directional", seed=seed, atol=1e-6, rtol=1e-5)
    # the normalised versions differ by the constant scale
    ae._buffers["latent_scale"] = backend.asarray(np.asarray(2.5))
    assert td.gradcheck(ae.decode_normalised, [z], mode="directional", seed=seed)
    np.testing.assert_allclose(ae.encode_normalised(x).numpy(), ae.encode(x).numpy() / 2.5,
                               rtol=1e-12)


@settings(max_examples=2)
@given(seed=st.integers(0, 2 ** 16), corruption=st.sampled_from(["none", "noise", "blur", "mask"]))
def test_loss_gradcheck_with_corruption_and_latent_noise(backend, seed, corruption):
    """The loss of every option is differentiable in the weights; the corruption and the latent
    noise are redrawn from a generator in the same state for every evaluation."""
    nn.manual_seed(seed)
    ae = Autoencoder(**TINY, corruption=corruption, latent_noise=0.1,
                     kl_weight=0.01).to(backend, dtype=np.float64)
    x = backend.asarray(np.random.default_rng(seed).random((2, 1, 8, 8)))

    def loss(*_):
        return ae.loss(x, HostGenerator(backend, seed))
    f, params = _with_params(ae, ["conv_in.weight", "to_latent.weight", "conv_out.bias"],
                             loss, 0)
    assert td.gradcheck(f, params, mode="directional", seed=seed, atol=1e-6, rtol=1e-5)


def test_corruptions_change_the_input_only_in_training(backend):
    rng = np.random.default_rng(0)
    xh = rng.random((4, 1, 8, 8)).astype(np.float32)
    x = backend.asarray(xh)
    gen = HostGenerator(backend, 0)
    noisy = backend.to_host(Autoencoder(**TINY, corruption="noise").corrupt(x, gen))
    assert 0 <= noisy.min() and noisy.max() <= 1 and 0.05 < np.abs(noisy - xh).mean() < 0.25
    masked = backend.to_host(Autoencoder(**TINY, corruption="mask",
                                         corruption_level=0.5).corrupt(x, gen))
    dropped = (masked == 0).reshape(4, 2, 4, 2, 4).all(axis=(2, 4))     # whole 4x4 blocks
    assert ((masked == xh) | (masked == 0)).all() and 0 < dropped.mean() < 1
    # a blur keeps a constant image and the mean of a smooth one, and smooths noise
    flat = backend.asarray(np.full((1, 1, 8, 8), 0.3, np.float32))
    np.testing.assert_allclose(backend.to_host(gaussian_blur(flat, 1.0)), 0.3, rtol=1e-6)
    blurred = backend.to_host(gaussian_blur(x, 1.0))
    assert blurred.std() < 0.6 * xh.std()
    # in eval mode (or without a generator) the loss sees the clean input
    nn.manual_seed(0)
    ae = Autoencoder(**TINY, corruption="mask", corruption_level=0.9).to(backend)
    clean = float(Autoencoder.loss(ae.eval(), x, gen).data)
    assert float(ae.loss(x).data) == pytest.approx(clean)
    assert float(ae.train().loss(x, HostGenerator(backend, 1)).data) != pytest.approx(clean)


def test_normalised_latents_have_unit_std():
    nn.manual_seed(0)
    ae = Autoencoder(**TINY)
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8)
    scale = ae.measure_latent_scale(images, batch_size=16)
    raw = encode_all(ae, images, normalised=False)
    z = encode_all(ae, images, batch_size=7)
    assert scale == pytest.approx(float(raw.std()), rel=1e-5)
    assert z.shape == (40, 2, 2, 2) and float(z.std()) == pytest.approx(1.0, rel=1e-4)
    # stored with the weights: a fresh model loading them decodes the same
    other = Autoencoder(**TINY)
    other.load_state_dict(ae.state_dict())
    assert float(other.latent_scale) == pytest.approx(scale)
    np.testing.assert_allclose(decode_all(other, z), decode_all(ae, z), rtol=1e-6)
    np.testing.assert_allclose(decode_all(ae, z), decode_all(ae, raw, normalised=False), rtol=1e-5)


def test_unet_latent_fits_the_codes():
    """The latent score model: the U-Net on 2x7x7 codes (one level, no resampling), conditional."""
    cfg = UNET_CONFIGS["unet-latent"]
    assert cfg["image_size"] == 7 and cfg["channel_mult"] == (1,)
    nn.manual_seed(0)
    model = unet_from_config("unet-latent", VESDE(25.0).marginal_std, in_channels=2,
                             num_classes=10, base_channels=8, num_heads=2)
    z = np.random.default_rng(0).normal(size=(3, 2, 7, 7)).astype(np.float32)
    out = model(z, np.full(3, 0.5, np.float32), np.array([1, 1, 10]))
    assert out.shape == (3, 2, 7, 7)


@pytest.mark.skipif(data_dir() is None, reason="needs ../shared/data (Fashion-MNIST)")
def test_decode_of_encode_is_close_after_a_short_training():
    from tinydiff import data
    images, _ = data.load_dataset("fashion-mnist", "train", data_dir(), limit=8, verbose=False)
    x = images.astype(np.float32)[:, None] / 255
    nn.manual_seed(0)
    ae = Autoencoder(base_channels=4, num_groups=2)
    opt = optim.Adam(ae.parameters(), lr=1e-2)
    gen = HostGenerator(ae.backend, 0)
    for _ in range(40):
        opt.zero_grad()
        loss = ae.loss(x, gen)
        loss.backward()
        opt.step()
    ae.measure_latent_scale(images)
    recon = decode_all(ae, encode_all(ae, images))
    mse = float(((recon - x) ** 2).mean())
    baseline = float(((x - x.mean(axis=0)) ** 2).mean())      # the best constant image
    assert mse < 0.5 * baseline, (mse, baseline)
    # and each reconstruction is nearest to its own image: the codes carry the image, not the mean
    dist = ((recon[:, None] - x[None]) ** 2).mean(axis=(2, 3, 4))
    assert (dist.argmin(axis=1) == np.arange(len(x))).all()
