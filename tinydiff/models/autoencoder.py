"""The autoencoder of latent diffusion (docs/latent.md): images -> small latent codes -> images.

For the default 1x28x28 input, base_channels C = 32 and latent_channels 2:

    x (N, 1, 28, 28)
      encoder: conv_in (1 -> C)                28x28
               ResBlock(C -> C), Downsample    28x28 -> 14x14
               ResBlock(C -> 2C), Downsample   14x14 -> 7x7
               ResBlock(2C -> 2C)              7x7
               GroupNorm, swish, conv (2C -> latent_channels)      z (N, 2, 7, 7): 98 numbers
      decoder: conv (latent_channels -> 2C), ResBlock(2C -> 2C)   7x7
               Upsample, ResBlock(2C -> C)     14x14
               Upsample, ResBlock(C -> C)      28x28
               GroupNorm, swish, conv (C -> 1), sigmoid            x_hat in (0, 1)

784 / 98 = 8x fewer numbers (the report: "about 10 times smaller"). The blocks are the U-Net's
(models/unet.py) with no time embedding: ResBlock is given a constant zero embedding of width 1,
so its ``temb_proj`` contributes only its bias (a learned per-channel shift).

The output goes through a sigmoid rather than a clip to [0, 1]: a clip has zero gradient wherever
the decoder overshoots (a dead pixel can never come back), a sigmoid always has one and keeps
every image in range, which is what the Fashion-MNIST classifier and the .npz contract expect.

``latent_scale`` (a buffer, saved with the weights) is the standard deviation of the latents of
the training set, measured once after training (``measure_latent_scale``);
``encode_normalised`` divides by it so the codes the diffusion model sees have unit std, and
``decode_normalised`` multiplies back before decoding.
"""
from __future__ import annotations

import numpy as np

from .. import nn
from ..backend import backend_of
from ..tensor import Tensor, no_grad
from ..nn import functional as F
from .unet import Downsample, ResBlock, Upsample, _groups, _norm_swish

CORRUPTIONS = ("none", "noise", "blur", "mask")
# the default strength of each corruption: noise std, blur std (pixels), fraction of 4x4 blocks masked
CORRUPTION_LEVELS = {"none": 0.0, "noise": 0.2, "blur": 1.0, "mask": 0.25}


class Autoencoder(nn.Module):
    """Convolutional autoencoder x -> z -> x_hat (see the module docstring for the picture).

    Args:
        in_channels: image channels.
        image_size: input height and width; must be divisible by 4 (two stride-2 downsamplings),
            giving a latent of image_size / 4 per side.
        latent_channels: channels of the latent (2: 2x7x7 = 98 numbers for 28x28).
        base_channels: width of the first level (the second has twice as many).
        num_groups: GroupNorm groups, reduced to gcd(num_groups, channels).
        corruption: applied to the input during training only (``loss_fn``), the target stays
            clean: "none", "noise" (Gaussian, std ``corruption_level``, clipped to [0, 1]),
            "blur" (Gaussian blur of std ``corruption_level`` pixels) or "mask" (each 4x4 block
            set to 0 with probability ``corruption_level``).
        corruption_level: its strength; None: CORRUPTION_LEVELS[corruption].
        latent_noise: std of Gaussian noise added to z before decoding in training (0: none), so
            nearby codes decode to similar images.
        kl_weight: weight of 0.5 * mean(z^2), the KL term of a Gaussian posterior N(z, s^2) with
            fixed s against N(0, I) up to a constant; keeps the encoder from inflating z to drown
            the latent noise.
    """

    def __init__(self, in_channels=1, image_size=28, latent_channels=2, base_channels=32,
                 num_groups=32, corruption="none", corruption_level=None, latent_noise=0.0,
                 kl_weight=0.0):
        super().__init__()
        if corruption not in CORRUPTIONS:
            raise ValueError(f"Autoencoder: corruption must be one of {', '.join(CORRUPTIONS)}, "
                             f"got {corruption!r}")
        if int(image_size) < 4 or int(image_size) % 4:
            raise ValueError(f"Autoencoder: image_size must be a positive multiple of 4 (two "
                             f"stride-2 downsamplings), got {image_size}")
        for name, v in (("latent_channels", latent_channels), ("base_channels", base_channels)):
            if int(v) < 1:
                raise ValueError(f"Autoencoder: {name} must be >= 1, got {v}")
        level = CORRUPTION_LEVELS[corruption] if corruption_level is None else float(corruption_level)
        if level < 0 or (corruption == "mask" and level > 1):
            raise ValueError(f"Autoencoder: corruption_level {level} out of range for {corruption}")
        if latent_noise < 0 or kl_weight < 0:
            raise ValueError("Autoencoder: latent_noise and kl_weight must be >= 0")
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.latent_channels, self.base_channels = int(latent_channels), int(base_channels)
        self.corruption, self.corruption_level = corruption, level
        self.latent_noise, self.kl_weight = float(latent_noise), float(kl_weight)
        c, c2 = self.base_channels, 2 * self.base_channels

        def res(cin, cout):
            # no embedding here (a constant zero): norm2 keeps one group per channel up to 32
            return ResBlock(cin, cout, 1, 0.0, num_groups, group_channels=1,
                            embed_group_channels=1)

        # encoder
        self.conv_in = nn.Conv2d(in_channels, c, 3, padding=1)
        self.enc = nn.ModuleList([res(c, c), Downsample(c), res(c, c2), Downsample(c2), res(c2, c2)])
        self.enc_norm = nn.GroupNorm(_groups(num_groups, c2), c2)
        self.to_latent = nn.Conv2d(c2, latent_channels, 3, padding=1)
        # decoder
        self.from_latent = nn.Conv2d(latent_channels, c2, 3, padding=1)
        self.dec = nn.ModuleList([res(c2, c2), Upsample(c2), res(c2, c), Upsample(c), res(c, c)])
        self.dec_norm = nn.GroupNorm(_groups(num_groups, c), c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        self.register_buffer("latent_scale", np.ones((), np.float32))

    @property
    def latent_shape(self):
        """(C, H, W) of a code: (latent_channels, image_size / 4, image_size / 4)."""
        s = self.image_size // 4
        return (self.latent_channels, s, s)

    @property
    def compression(self):
        """Numbers of an image over numbers of its code (8.0 for 1x28x28 -> 2x7x7)."""
        c, s, _ = self.latent_shape
        return self.in_channels * self.image_size ** 2 / (c * s * s)

    def _blocks(self, blocks, h):
        zero = Tensor(backend_of(h.data).xp.zeros((h.shape[0], 1), dtype=h.dtype))
        for b in blocks:
            h = b(h, zero) if isinstance(b, ResBlock) else b(h)
        return h

    def encode(self, x):
        """Images (N, C, H, W) in [0, 1] -> codes (N, latent_channels, H/4, W/4), unnormalised."""
        x = x if isinstance(x, Tensor) else Tensor(x)
        self._check(x, self.in_channels, "encode", "images")
        h = self._blocks(self.enc, self.conv_in(x))
        return self.to_latent(_norm_swish(h, self.enc_norm))

    def decode(self, z):
        """Codes (N, latent_channels, h, w) -> images (N, C, 4h, 4w) in (0, 1)."""
        z = z if isinstance(z, Tensor) else Tensor(z)
        self._check(z, self.latent_channels, "decode", "codes")
        h = self._blocks(self.dec, self.from_latent(z))
        return self.conv_out(_norm_swish(h, self.dec_norm)).sigmoid()

    def forward(self, x):
        return self.decode(self.encode(x))

    def _check(self, x, channels, op, what):
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"Autoencoder.{op}: expected {what} (N, {channels}, H, W), got shape "
                             f"{tuple(x.shape)}")

    # -- normalised codes: what the diffusion model sees ---------------------------------------
    def encode_normalised(self, x):
        """encode(x) / latent_scale: unit-std codes once ``measure_latent_scale`` has run."""
        z = self.encode(x)
        return z / Tensor(self.latent_scale.astype(z.dtype))

    def decode_normalised(self, z):
        """decode(z * latent_scale)."""
        z = z if isinstance(z, Tensor) else Tensor(z)
        return self.decode(z * Tensor(self.latent_scale.astype(z.dtype)))

    def measure_latent_scale(self, images, batch_size=500):
        """Set ``latent_scale`` to the std of the codes of ``images`` (host uint8 or float
        (N, [C,] H, W)), all their numbers pooled; returns it as a float."""
        z = encode_all(self, images, batch_size, normalised=False)
        scale = float(np.std(z.astype(np.float64)))
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"Autoencoder: the latents' std is {scale}; cannot normalise them")
        xp = backend_of(self.latent_scale).xp
        self._buffers["latent_scale"] = xp.asarray(scale, dtype=self.latent_scale.dtype)
        return scale

    # -- training ------------------------------------------------------------------------------
    def corrupt(self, x, rng):
        """The training-time corruption of a batch x (a backend array in [0, 1]); ``rng`` a
        tinydiff generator (the Trainer's)."""
        kind, level = self.corruption, self.corruption_level
        if kind == "none" or level == 0:
            return x
        xp = backend_of(x).xp
        if kind == "noise":
            return xp.clip(x + level * rng.normal(x.shape, dtype=x.dtype), 0.0, 1.0)
        if kind == "blur":
            return gaussian_blur(x, level)
        n, _, h, w = x.shape
        hb, wb = -(-h // 4), -(-w // 4)
        keep = (rng.uniform((n, 1, hb, wb)) >= level).astype(x.dtype)
        keep = xp.repeat(xp.repeat(keep, 4, axis=2), 4, axis=3)[:, :, :h, :w]
        return x * keep

    def loss(self, x, rng=None):
        """Mean squared error of decode(encode(corrupt(x))) against the clean x, plus
        kl_weight * 0.5 * mean(z^2); corruption and latent noise only when training and rng given."""
        data = x.data if isinstance(x, Tensor) else x
        inp = self.corrupt(data, rng) if (self.training and rng is not None) else data
        z = self.encode(Tensor(inp))
        zn = z
        if self.latent_noise > 0 and self.training and rng is not None:
            zn = z + Tensor(self.latent_noise * rng.normal(z.shape, dtype=z.dtype))
        diff = self.decode(zn) - Tensor(data)
        loss = (diff * diff).mean()
        if self.kl_weight > 0:
            loss = loss + (z * z).mean() * (0.5 * self.kl_weight)
        return loss

    def extra_repr(self):
        return (f"in_channels={self.in_channels}, image_size={self.image_size}, "
                f"latent_channels={self.latent_channels}, base_channels={self.base_channels}, "
                f"corruption={self.corruption!r}, corruption_level={self.corruption_level}, "
                f"latent_noise={self.latent_noise}, kl_weight={self.kl_weight}")


def autoencoder_loss():
    """loss_fn(model, x, y, rng) for the Trainer: ``model.loss(x, rng)`` (labels unused)."""
    def loss_fn(model, x, y, rng):
        return model.loss(x, rng)
    return loss_fn


def gaussian_blur(x, std):
    """A separable Gaussian blur of (N, C, H, W) backend arrays, std in pixels, edges replicated."""
    xp = backend_of(x).xp
    r = max(1, int(np.ceil(2 * std)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / std) ** 2)
    k = (k / k.sum()).tolist()
    h, w = x.shape[2:]
    p = xp.pad(x, ((0, 0), (0, 0), (r, r), (0, 0)), mode="edge")
    x = sum(wt * p[:, :, i:i + h] for i, wt in enumerate(k))
    p = xp.pad(x, ((0, 0), (0, 0), (0, 0), (r, r)), mode="edge")
    return sum(wt * p[:, :, :, i:i + w] for i, wt in enumerate(k)).astype(x.dtype)


def _to_unit(images):
    x = np.asarray(images)
    x = x.astype(np.float32) / np.float32(255) if x.dtype == np.uint8 else x.astype(np.float32)
    return x[:, None] if x.ndim == 3 else x


def _in_batches(model, arrays, batch_size, to_input, apply):
    """``apply`` on each batch of host ``arrays`` (made model input by ``to_input``), in eval
    mode and without gradients; the host results concatenated as float32."""
    be, was, out = model.backend, model.training, []
    model.eval()
    try:
        with no_grad():
            for i in range(0, len(arrays), batch_size):
                x = Tensor(be.asarray(to_input(arrays[i:i + batch_size])).astype(model_dtype(model)))
                out.append(be.to_host(apply(x).data))
    finally:
        model.train(was)
    return np.concatenate(out).astype(np.float32)


def encode_all(model, images, batch_size=500, normalised=True):
    """Host codes (N, c, h, w) float32 of host images (uint8 or float, (N, [C,] H, W)), in
    batches, eval mode, no gradients; ``normalised``: divided by ``latent_scale``."""
    return _in_batches(model, images, batch_size, _to_unit,
                       model.encode_normalised if normalised else model.encode)


def decode_all(model, codes, batch_size=500, normalised=True):
    """Host images (N, C, H, W) float32 in (0, 1) of host codes, in batches, no gradients."""
    return _in_batches(model, codes, batch_size, np.asarray,
                       model.decode_normalised if normalised else model.decode)


def model_dtype(model):
    return next(iter(model.parameters())).data.dtype
