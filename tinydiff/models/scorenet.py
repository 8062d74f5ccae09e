"""The reference score network (docs/design.md, the reference model): Song's score-SDE MNIST
tutorial ScoreNet.

    x (N, 1, 28, 28), t (N,) --------------------------------------------------------------.
      embed = swish(Linear(GaussianFourierProjection(t)))           (+ class embedding)    |
      h1 = conv1(x)  (1 -> 32, s1)   26x26 -+ dense1(embed), GroupNorm(4), swish  ------.  |
      h2 = conv2(h1) (32 -> 64, s2)  12x12 -+ dense2, GroupNorm(32), swish  --------.   |  |
      h3 = conv3(h2) (64 -> 128, s2)  5x5  -+ dense3, GroupNorm(32), swish  ----.   |   |  |
      h4 = conv4(h3) (128 -> 256, s2) 2x2  -+ dense4, GroupNorm(32), swish      |   |   |  |
      h = tconv4(h4)            (256 -> 128, s2)       5x5  + dense5, GN, swish |   |   |  |
      h = tconv3([h, h3])       (256 -> 64, s2, op 1)  12x12 + dense6, GN, swish    |   |  |
      h = tconv2([h, h2])       (128 -> 32, s2, op 1)  26x26 + dense7, GN, swish        |  |
      h = tconv1([h, h1])       (64 -> 1, s1, bias)    28x28                               |
      score = h / std(t)  <------------------------------------------------------------------'

Attribute names match the PyTorch tutorial (conv1, dense1.dense, gnorm1, tconv4, tgnorm4,
embed.0.W, ...), so its state dict loads here unchanged (``{k: v.numpy() for k, v in sd.items()}``).

``ScoreModel`` holds what every score network shares (the labels, times and std(t) handling of
``forward(x, t, y=None)``); ScoreNet and the U-Net (models/unet.py) both derive from it.
"""
from __future__ import annotations

import math

import numpy as np

from .. import nn
from ..backend import backend_of
from ..tensor import Function, Tensor
from ..nn import functional as F


class FourierFeatures(Function):
    """[sin(2 pi t W), cos(2 pi t W)] for t (N,) and fixed W (D/2,) -> (N, D); differentiable
    in t: d/dt sin(2 pi t W) = 2 pi W cos(2 pi t W), d/dt cos(.) = -2 pi W sin(.)."""

    def forward(self, t, w):
        xp = backend_of(t).xp
        self.w2pi = w * (2 * math.pi)
        proj = t[:, None] * self.w2pi[None, :]
        self.sin, self.cos = xp.sin(proj), xp.cos(proj)
        return xp.concatenate([self.sin, self.cos], axis=-1)

    def backward(self, g):
        half = self.sin.shape[1]
        gt = ((g[:, :half] * self.cos - g[:, half:] * self.sin) * self.w2pi).sum(axis=1)
        return gt, None


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of the time: W ~ N(0, scale^2) of size embed_dim // 2, fixed
    (a buffer: saved in the state dict, never trained)."""

    def __init__(self, embed_dim, scale=30.0):
        super().__init__()
        if embed_dim % 2:
            raise ValueError(f"GaussianFourierProjection: embed_dim must be even, got {embed_dim}")
        self.embed_dim, self.scale = embed_dim, scale
        self.register_buffer("W", nn.init.normal((embed_dim // 2,), std=scale))

    def forward(self, t):
        w = self.W
        if w.dtype != t.dtype:
            w = w.astype(t.dtype)
        return FourierFeatures.apply(t, w)

    def extra_repr(self):
        return f"{self.embed_dim}, scale={self.scale}"


class Dense(nn.Module):
    """A Linear layer whose (N, C) output is added to feature maps as a per-channel bias."""

    def __init__(self, input_dim, output_dim):
        super().__init__()
        self.dense = nn.Linear(input_dim, output_dim)

    def forward(self, x):
        return self.dense(x)


def _embed_norm_swish(h, shift, norm):
    """swish(GroupNorm(h + shift[:, :, None, None])): one fused op from nn.functional."""
    return F.group_norm_silu(h, norm.num_groups, norm.weight, norm.bias, norm.eps, shift=shift)


class ScoreModel(nn.Module):
    """What every score network here shares: the model(x, t, y=None) contract and its checks.

    A subclass sets ``marginal_std``, ``in_channels``, ``num_classes`` and the modules ``embed``
    (t -> time features) and, when ``num_classes`` is given, ``label_embed`` (num_classes + 1
    rows); then ``_times``, ``_time_embedding`` and ``_std`` turn the forward's arguments into
    the time Tensor, the swished (time + class) embedding, and the std(t) the output is divided
    by, the same way for every architecture (so every SDE, loss and sampler takes any of them).
    Error messages name the subclass.
    """

    @property
    def null_label(self):
        """The label index meaning "unconditional" (classifier-free guidance)."""
        return self.num_classes

    def _time_embedding(self, t, y):
        """swish(embed(t) + label_embed(y)): the per-sample embedding every block is given."""
        e = self.embed(t)
        if self.num_classes is not None:
            labels = self._labels(y, t.shape[0], t.backend)
            e = e + self.label_embed(labels)
        elif y is not None:
            name = type(self).__name__
            raise ValueError(f"{name}: labels were given to a model built without num_classes; "
                             f"build it with {name}(..., num_classes=10)")
        return F.silu(e)

    def _labels(self, y, n, backend):
        name = type(self).__name__
        if y is None:
            return backend.xp.full((n,), self.null_label, dtype=np.int64)
        y = y.data if isinstance(y, Tensor) else y
        if isinstance(y, (int, np.integer)):
            return backend.xp.full((n,), int(y), dtype=np.int64)
        if not backend.owns(y):
            y = backend.asarray(backend_of(y).to_host(y))
        if tuple(y.shape) != (n,):
            raise ValueError(f"{name}: labels must have shape ({n},), got {tuple(y.shape)}")
        kind = np.dtype(y.dtype).kind
        if kind not in "iuf" or (kind == "f" and not bool(backend.xp.all(y == backend.xp.round(y)))):
            # astype(int64) would truncate 2.7 to class 2 without a word
            raise ValueError(f"{name}: labels must be integer class indices, got dtype {y.dtype}"
                             + (" with fractional values" if kind == "f" else ""))
        if isinstance(y, np.ndarray) and y.size and (y.min() < 0 or y.max() > self.num_classes):
            raise ValueError(f"{name}: labels must lie in 0..{self.num_classes} ("
                             f"{self.num_classes} = no label), got {y.min()}..{y.max()}")
        return y.astype(np.int64, copy=False)

    def _check_input(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: expected x of shape (N, {self.in_channels}, H, W), "
                             f"got {x.shape}")

    def _times(self, t, x):
        """t as a Tensor (N,) on x's backend and in x's dtype (a float or a 0-d t is broadcast)."""
        name = type(self).__name__
        n, xp = x.shape[0], x.backend.xp
        if isinstance(t, Tensor):
            if t.ndim == 0:
                t = Tensor(xp.full((n,), t.item(), dtype=x.dtype))
        elif isinstance(t, (int, float)):
            t = Tensor(xp.full((n,), float(t), dtype=x.dtype))
        else:
            if not x.backend.owns(t):
                t = x.backend.asarray(backend_of(t).to_host(t))
            t = Tensor(t.reshape(-1) if t.size == n else t)
        if t.shape != (n,):
            raise ValueError(f"{name}: t must have shape ({n},) for a batch of {n}, got {t.shape}")
        # t <= 0 divides by std(0) = 0, NaN spreads everywhere. Checked where it is free (host
        # arrays and numbers); on a GPU it would cost a sync per forward pass, as the samplers
        # and the loss make t themselves from finite host floats in (0, T].
        if isinstance(t.data, np.ndarray) and not (np.isfinite(t.data).all() and (t.data > 0).all()):
            bad = t.data[~(np.isfinite(t.data) & (t.data > 0))]
            raise ValueError(f"{name}: t must be finite and > 0 (a diffusion time in (0, T]), "
                             f"got {bad[0]!r}")
        return t if t.dtype == x.dtype else t.astype(x.dtype)

    def _std(self, t, like):
        """marginal_std(t) as an (N, 1, 1, 1) Tensor in the output's dtype. It is differentiable in
        t when t requires grad and marginal_std accepts Tensors (as tinydiff.sde's SDEs do)."""
        if t.requires_grad:
            s = self.marginal_std(t)
            if isinstance(s, Tensor):
                return s.reshape(-1, 1, 1, 1)
        s = self.marginal_std(t.data)
        s = s.data if isinstance(s, Tensor) else s
        xp = like.backend.xp
        if isinstance(s, (int, float)):
            s = xp.full((like.shape[0],), s, dtype=like.dtype)
        return Tensor(s.astype(like.dtype, copy=False).reshape(-1, 1, 1, 1))


class ScoreNet(ScoreModel):
    """The time-dependent score model s(x, t) of docs/design.md, the reference model.

    Args:
        marginal_std: callable std(t) on arrays of t (e.g. ``VESDE(25).marginal_std``); the output
            is divided by it, so the network predicts -z of eq. 5 (docs/design.md) at unit
            scale.
        channels: the four encoder widths (32, 64, 128, 256).
        embed_dim: width of the time embedding (256).
        in_channels: image channels (1 for MNIST).
        num_classes: if given, a learned class embedding (num_classes + 1 rows; the last row,
            ``null_label``, means "no label", for classifier-free guidance) is added to the time
            embedding before the swish.
        num_groups: GroupNorm groups of the four encoder stages, default (4, 32, 32, 32), and
        decoder_groups: of the three decoder norms, default 32; each is reduced to
            gcd(groups, channels) so that small test networks stay valid.
        attention: the feature-map sizes (of 26, 12, 5, 2) after whose blocks a multi-head
            self-attention block (``nn.SelfAttention2d``: x + proj(attention(qkv(GroupNorm(x)))))
            is inserted, in the encoder and in the decoder, as DDPM's U-Net puts attention at its
            low resolutions. () (the default) is the tutorial's model exactly; the conditional
            preset uses (5, 2): after conv3 and conv4 (``attn3``, ``attn4``) and after tconv4
            (``tattn4``).
        num_heads: heads of each attention block (must divide its channels).
    """

    STAGE_SIZES = {1: 26, 2: 12, 3: 5, 4: 2}   # encoder stage -> output size for 28x28 inputs

    def __init__(self, marginal_std, channels=(32, 64, 128, 256), embed_dim=256, in_channels=1,
                 num_classes=None, num_groups=(4, 32, 32, 32), decoder_groups=32, attention=(),
                 num_heads=4):
        super().__init__()
        if len(channels) != 4 or len(num_groups) != 4:
            raise ValueError(f"ScoreNet: channels and num_groups need 4 entries, got {channels}, {num_groups}")
        c1, c2, c3, c4 = channels
        g1, g2, g3, g4 = (math.gcd(g, c) for g, c in zip(num_groups, channels))
        self.marginal_std = marginal_std
        self.channels, self.embed_dim, self.in_channels = tuple(channels), embed_dim, in_channels
        self.num_classes = num_classes
        self.embed = nn.Sequential(GaussianFourierProjection(embed_dim), nn.Linear(embed_dim, embed_dim))
        if num_classes is not None:
            self.label_embed = nn.Embedding(num_classes + 1, embed_dim)
        # encoder: 28 -> 26 -> 12 -> 5 -> 2
        self.conv1 = nn.Conv2d(in_channels, c1, 3, stride=1, bias=False)
        self.dense1 = Dense(embed_dim, c1)
        self.gnorm1 = nn.GroupNorm(g1, c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, bias=False)
        self.dense2 = Dense(embed_dim, c2)
        self.gnorm2 = nn.GroupNorm(g2, c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, stride=2, bias=False)
        self.dense3 = Dense(embed_dim, c3)
        self.gnorm3 = nn.GroupNorm(g3, c3)
        self.conv4 = nn.Conv2d(c3, c4, 3, stride=2, bias=False)
        self.dense4 = Dense(embed_dim, c4)
        self.gnorm4 = nn.GroupNorm(g4, c4)
        # decoder: 2 -> 5 -> 12 -> 26 -> 28, skips concatenated on the channel axis
        self.tconv4 = nn.ConvTranspose2d(c4, c3, 3, stride=2, bias=False)
        self.dense5 = Dense(embed_dim, c3)
        self.tgnorm4 = nn.GroupNorm(math.gcd(decoder_groups, c3), c3)
        self.tconv3 = nn.ConvTranspose2d(c3 + c3, c2, 3, stride=2, bias=False, output_padding=1)
        self.dense6 = Dense(embed_dim, c2)
        self.tgnorm3 = nn.GroupNorm(math.gcd(decoder_groups, c2), c2)
        self.tconv2 = nn.ConvTranspose2d(c2 + c2, c1, 3, stride=2, bias=False, output_padding=1)
        self.dense7 = Dense(embed_dim, c1)
        self.tgnorm2 = nn.GroupNorm(math.gcd(decoder_groups, c1), c1)
        self.tconv1 = nn.ConvTranspose2d(c1 + c1, in_channels, 3, stride=1)
        self._add_attention(attention, num_heads)

    def _add_attention(self, attention, num_heads):
        """Self-attention blocks at the requested feature-map sizes: ``attn{i}`` after encoder
        stage i, ``tattn{i}`` after tconv{i} (i = 4, 3, 2: the decoder's 5, 12, 26 maps)."""
        sizes = set(self.STAGE_SIZES.values())
        attention = tuple(sorted({int(a) for a in attention}, reverse=True))
        bad = [a for a in attention if a not in sizes]
        if bad:
            raise ValueError(f"ScoreNet: attention sizes must be among {sorted(sizes)} (the feature "
                             f"maps of a 28x28 input), got {bad}")
        self.attention, self.num_heads = attention, num_heads
        widths = dict(zip((1, 2, 3, 4), self.channels))
        for stage, size in self.STAGE_SIZES.items():
            if size in attention:
                self._set_attention(f"attn{stage}", widths[stage], num_heads)
                if stage < 4:   # the decoder block that outputs this size: tconv{stage+1}
                    self._set_attention(f"tattn{stage + 1}", widths[stage], num_heads)

    def _set_attention(self, name, channels, num_heads):
        if channels % num_heads:
            raise ValueError(f"ScoreNet: num_heads={num_heads} must divide the {channels} channels "
                             f"of the attention block {name}")
        setattr(self, name, nn.SelfAttention2d(channels, num_heads=num_heads))

    def _attend(self, name, h):
        """h through the attention block ``name`` when the model has one, else unchanged."""
        block = self._modules.get(name)
        return h if block is None else block(h)

    def forward(self, x, t, y=None):
        x = x if isinstance(x, Tensor) else Tensor(x)
        self._check_input(x)
        t = self._times(t, x)
        embed = self._time_embedding(t, y)
        # encoder: conv, + Dense(embed) per channel, GroupNorm, swish (one fused op)
        # (and self-attention after the blocks at the sizes in ``attention``)
        h1 = self._attend("attn1", _embed_norm_swish(self.conv1(x), self.dense1(embed), self.gnorm1))
        h2 = self._attend("attn2", _embed_norm_swish(self.conv2(h1), self.dense2(embed), self.gnorm2))
        h3 = self._attend("attn3", _embed_norm_swish(self.conv3(h2), self.dense3(embed), self.gnorm3))
        h4 = self._attend("attn4", _embed_norm_swish(self.conv4(h3), self.dense4(embed), self.gnorm4))
        # decoder with skip connections
        h = _embed_norm_swish(self.tconv4(h4), self.dense5(embed), self.tgnorm4)
        h = self._attend("tattn4", h)
        h = _embed_norm_swish(self.tconv3(self._skip(h, h3)), self.dense6(embed), self.tgnorm3)
        h = self._attend("tattn3", h)
        h = _embed_norm_swish(self.tconv2(self._skip(h, h2)), self.dense7(embed), self.tgnorm2)
        h = self._attend("tattn2", h)
        h = self.tconv1(self._skip(h, h1))
        return h / self._std(t, h)                     # s(x, t) = h / std(t)

    @staticmethod
    def _skip(h, skip):
        if h.shape[2:] != skip.shape[2:]:
            raise ValueError(f"ScoreNet: decoder feature map {h.shape[2:]} does not match the skip "
                             f"connection {skip.shape[2:]}; this architecture needs 28x28 inputs "
                             f"(sizes 28 -> 26 -> 12 -> 5 -> 2 and back)")
        return nn.cat([h, skip], dim=1)

    def extra_repr(self):
        return (f"channels={self.channels}, embed_dim={self.embed_dim}, in_channels={self.in_channels}"
                + (f", num_classes={self.num_classes}" if self.num_classes is not None else "")
                + (f", attention={self.attention}, num_heads={self.num_heads}" if self.attention else ""))
