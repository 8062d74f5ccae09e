"""A configurable score U-Net in the style of DDPM (Ho et al. 2020) and score_sde's DDPM++:
residual blocks with the time (+ class) embedding, multi-head self-attention at chosen
resolutions, down/upsampling between levels, and DDPM's skip connections.

For the default channel_mult=(1, 2, 2) and num_res_blocks=1 on 28x28 inputs (C = base_channels):

    t (N,) -> embed: GaussianFourierProjection -> Linear -> swish -> Linear  (+ label_embed(y))
              -> swish = e, given to every ResBlock
    x (N, in, 28, 28)
      conv_in (in -> C)                              28x28 ----------------------------------.
      down[0]: ResBlock(C -> C)                      28x28 ---------------------------.      |
               downsample (3x3 conv, stride 2)       14x14 --------------------.      |      |
      down[1]: ResBlock(C -> 2C)                     14x14 --------------.     |      |      |
               downsample                             7x7 ---------.     |     |      |      |
      down[2]: ResBlock(2C -> 2C) [+ attn at 7x7]     7x7 ---.     |     |     |      |      |
      mid:     ResBlock, SelfAttention2d, ResBlock    7x7    |     |     |     |      |      |
      up[2]:   ResBlock([h, skip] -> 2C) [+ attn]     7x7 <--'     |     |     |      |      |
               ResBlock([h, skip] -> 2C) [+ attn]     7x7 <--------'     |     |      |      |
               upsample (nearest x2, 3x3 conv)       14x14               |     |      |      |
      up[1]:   ResBlock([h, skip] -> 2C)             14x14 <-------------'     |      |      |
               ResBlock([h, skip] -> 2C)             14x14 <-------------------'      |      |
               upsample                              28x28                            |      |
      up[0]:   ResBlock([h, skip] -> C)              28x28 <--------------------------'      |
               ResBlock([h, skip] -> C)              28x28 <---------------------------------'
      norm_out, swish, conv_out (C -> in)            28x28
      score = h / std(t)

    ResBlock(x, e) = nin_shortcut(x) + conv2(dropout(swish(norm2(conv1(swish(norm1(x))) + temb_proj(e)))))

Every encoder output (conv_in, each block, each downsample) is pushed on a stack; each decoder
level runs num_res_blocks + 1 blocks, each concatenating one popped map on the channel axis, so
the stack is empty at the end (DDPM's layout). Names follow the PyTorch port of DDPM
(``down.1.block.0.conv1.weight``, ``mid.attn_1``, ``up.0.upsample.conv``, ``norm_out``, ...);
``embed`` and ``label_embed`` are named as in ScoreNet, whose time/label handling this model
shares (``ScoreModel``), so every SDE, loss and sampler works with either.

The middle block always has its attention (as in DDPM and NCSN++), whatever ``attention`` says;
``attention`` chooses the levels whose blocks are followed by one.
"""
from __future__ import annotations

import math

from .. import nn
from ..tensor import Tensor
from ..nn import functional as F
from .scorenet import GaussianFourierProjection, ScoreModel


def _groups(num_groups, channels, min_channels=1):
    """The largest divisor of gcd(groups, channels) whose groups hold at least ``min_channels``
    channels each: 32 groups for real widths, a valid count for tiny test nets."""
    g = math.gcd(num_groups, channels)
    return max(d for d in range(1, g + 1) if g % d == 0 and channels // d >= min(min_channels, channels))


# Channels per group, at least, of every GroupNorm of the U-Net (DDPM's widths, 128 and up with
# 32 groups, have 4 or more). A group norm removes each group's mean and scale; with one channel
# per group (32 groups of 32 channels, or 16 of 16) it removes every channel's spatial mean, and
# two things a score model needs are lost with it:
# - the embedding, added as a per-channel shift before ResBlock.norm2 (DDPM): the block would never
#   see t or the class (a conditional U-Net at 32 channels that ignored its labels);
# - the mean of the noisy image: after norm_out no channel carries it, so the network cannot say
#   how much of the image's mean brightness is noise. At sigma = 10 that mean holds noise of std
#   10/28 = 0.36, and a model with one channel per group left it in: a third of its Fashion-MNIST
#   samples came out black and one in eight saturated (docs/unet-runs.md).
# With 4 channels per group only the group's common mean goes; the differences between its
# channels' means carry the image's mean on. Runs trained before this setting existed had it only
# at norm2 (``group_channels`` 1 elsewhere); their stored configuration says so.
GROUP_CHANNELS = 4
EMBED_GROUP_CHANNELS = GROUP_CHANNELS


def _norm_swish(h, norm, shift=None):
    """swish(GroupNorm(h + shift[:, :, None, None])) as one fused op (shift may be None)."""
    return F.group_norm_silu(h, norm.num_groups, norm.weight, norm.bias, norm.eps, shift=shift)


class ResBlock(nn.Module):
    """DDPM's residual block: the embedding enters as a per-channel bias between the two convs.

    Args:
        in_ch, out_ch: channels in and out; a 1x1 conv (``nin_shortcut``) maps the skip when they
            differ, else the skip is the identity.
        embed_dim: width of the (already swished) embedding passed to forward.
        dropout: probability of the dropout before the second conv (training mode only).
        num_groups: GroupNorm groups, reduced to gcd(num_groups, channels), and further to keep
            ``group_channels`` channels per group (see GROUP_CHANNELS); norm2, which the
            embedding enters, keeps ``embed_group_channels`` (default: at least
            EMBED_GROUP_CHANNELS whatever ``group_channels`` is).
    """

    def __init__(self, in_ch, out_ch, embed_dim, dropout=0.0, num_groups=32,
                 group_channels=GROUP_CHANNELS, embed_group_channels=None):
        super().__init__()
        self.in_ch, self.out_ch = in_ch, out_ch
        self.norm1 = nn.GroupNorm(_groups(num_groups, in_ch, group_channels), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(embed_dim, out_ch)
        # the embedding's shift must survive norm2's mean removal: see EMBED_GROUP_CHANNELS
        if embed_group_channels is None:
            embed_group_channels = max(group_channels, EMBED_GROUP_CHANNELS)
        self.norm2 = nn.GroupNorm(_groups(num_groups, out_ch, embed_group_channels), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, embed):
        h = self.conv1(_norm_swish(x, self.norm1))
        # h + temb_proj(e) is the input of norm2: the fused op adds it as its shift, saving a
        # full-size temporary and a graph node
        h = _norm_swish(h, self.norm2, shift=self.temb_proj(embed))
        h = self.conv2(self.dropout(h))
        skip = self._modules.get("nin_shortcut")
        return (x if skip is None else skip(x)) + h

    def extra_repr(self):
        return f"{self.in_ch}, {self.out_ch}, dropout={self.dropout.p}"


class Downsample(nn.Module):
    """Halve H and W with a learned 3x3 conv of stride 2 (padding 1), as DDPM."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv (DDPM; no checkerboard artefacts
    of a transposed conv)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2))


class _Level(nn.Module):
    """One resolution of the encoder or decoder: ``block`` (ResBlocks), ``attn`` (one
    SelfAttention2d per block at the attention resolutions, else empty) and the resampler
    (``downsample`` / ``upsample``, absent at the last level)."""

    def __init__(self, blocks, attns):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run(self, j, h, embed):
        h = self.block[j](h, embed)
        return self.attn[j](h) if len(self.attn) else h


class _Middle(nn.Module):
    """The lowest resolution: ResBlock, SelfAttention2d, ResBlock (DDPM's ``mid``)."""

    def __init__(self, block_1, attn_1, block_2):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = block_1, attn_1, block_2

    def forward(self, h, embed):
        return self.block_2(self.attn_1(self.block_1(h, embed)), embed)


class UNet(ScoreModel):
    """The scalable score U-Net s(x, t[, y]) (see the module docstring for the picture).

    Args:
        marginal_std: std(t) of the SDE (e.g. ``VESDE(25).marginal_std``); the output is divided
            by it, as ScoreNet's.
        in_channels: image channels (1 for MNIST, 3 for CIFAR-10).
        image_size: the training resolution; it fixes which level is which feature-map size (for
            ``attention``) and must be divisible by 2^(len(channel_mult) - 1). forward accepts
            any H and W divisible by that number; attention stays at the same levels.
        base_channels: width of the first level; level i has base_channels * channel_mult[i].
        channel_mult: one multiplier per level; a level ends with a downsampling except the last.
        num_res_blocks: ResBlocks per encoder level (the decoder runs one more per level).
        attention: feature-map sizes (at ``image_size``) whose blocks are followed by a
            multi-head self-attention block (``nn.SelfAttention2d``); e.g. (7,) or (16, 8). The
            middle block always has one.
        num_heads: heads of every attention block (must divide their channels).
        dropout: dropout probability inside each ResBlock (DDPM's CIFAR-10 model: 0.1).
        embed_dim: width of the time (+ class) embedding, default 4 * base_channels (DDPM).
        num_classes: if given, a class embedding with num_classes + 1 rows (the last,
            ``null_label``, is "no label" for classifier-free guidance) added to the time
            embedding before its swish.
        num_groups: GroupNorm groups (32), reduced to gcd(num_groups, channels) and further to
            keep ``group_channels`` channels per group (default GROUP_CHANNELS, 4: see there).
        fourier_scale: std of the Fourier frequencies of t; 30, ScoreNet's, because t runs over
            (0, 1] (NCSN++'s 16 is for log sigma, an about 8x wider range).
    """

    def __init__(self, marginal_std, in_channels=1, image_size=28, base_channels=32,
                 channel_mult=(1, 2, 2), num_res_blocks=1, attention=(7,), num_heads=4, dropout=0.0,
                 embed_dim=None, num_classes=None, num_groups=32, fourier_scale=30.0,
                 group_channels=GROUP_CHANNELS):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"UNet: channel_mult needs one or more positive multipliers, got {channel_mult}")
        if num_res_blocks < 1:
            raise ValueError(f"UNet: num_res_blocks must be >= 1, got {num_res_blocks}")
        embed_dim = 4 * base_channels if embed_dim is None else int(embed_dim)
        if embed_dim % 2:
            raise ValueError(f"UNet: embed_dim must be even (sin and cos halves), got {embed_dim}")
        self.marginal_std = marginal_std
        self.in_channels, self.image_size, self.base_channels = in_channels, int(image_size), base_channels
        self.channel_mult, self.num_res_blocks, self.dropout = channel_mult, num_res_blocks, dropout
        self.embed_dim, self.num_classes, self.num_heads = embed_dim, num_classes, num_heads
        self.factor = 2 ** (len(channel_mult) - 1)         # total downsampling
        if self.image_size < 1:
            raise ValueError(f"UNet: image_size must be a positive multiple of {self.factor}, "
                             f"got {image_size}")
        if self.image_size % self.factor:
            raise ValueError(self._size_message(self.image_size))
        sizes = [self.image_size // 2 ** i for i in range(len(channel_mult))]
        self.attention = tuple(sorted({int(a) for a in attention}, reverse=True))
        bad = [a for a in self.attention if a not in sizes]
        if bad:
            raise ValueError(f"UNet: attention sizes must be among {sizes} (the feature maps of a "
                             f"{self.image_size}x{self.image_size} input), got {bad}")
        widths = [base_channels * m for m in channel_mult]
        for size, c in zip(sizes, widths):     # the last level's width is the middle's too
            if (size in self.attention or size == sizes[-1]) and c % num_heads:
                raise ValueError(f"UNet: num_heads={num_heads} must divide the {c} channels of the "
                                 f"attention blocks at {size}x{size}")

        # time: Fourier features -> Linear -> swish -> Linear (DDPM's MLP); the final swish is
        # applied after the class embedding is added (ScoreModel._time_embedding)
        self.embed = nn.Sequential(GaussianFourierProjection(embed_dim, scale=fourier_scale),
                                   nn.Linear(embed_dim, embed_dim), nn.SiLU(),
                                   nn.Linear(embed_dim, embed_dim))
        if num_classes is not None:
            self.label_embed = nn.Embedding(num_classes + 1, embed_dim)

        def res(cin, cout):
            return ResBlock(cin, cout, embed_dim, dropout, num_groups, group_channels)

        def attn(c):
            return nn.SelfAttention2d(c, num_heads=num_heads,
                                      num_groups=_groups(num_groups, c, group_channels))

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        # encoder: the widths of the maps it pushes on the skip stack, because the decoder pops
        # them in reverse order and each of its blocks takes [h, popped map] as its input
        stack, c, down = [base_channels], base_channels, []
        for i, (size, w) in enumerate(zip(sizes, widths)):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(res(c, w))
                c = w
                stack.append(c)
            level = _Level(blocks, [attn(c) for _ in blocks] if size in self.attention else [])
            if i < len(sizes) - 1:
                level.downsample = Downsample(c)
                stack.append(c)
            down.append(level)
        self.down = nn.ModuleList(down)
        self.mid = _Middle(res(c, c), attn(c), res(c, c))
        # decoder, built from the lowest level up, stored by level index (up[0] runs last)
        up = [None] * len(sizes)
        for i in reversed(range(len(sizes))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(res(c + stack.pop(), widths[i]))
                c = widths[i]
            up[i] = _Level(blocks, [attn(c) for _ in blocks] if sizes[i] in self.attention else [])
            if i > 0:
                up[i].upsample = Upsample(c)
        self.up = nn.ModuleList(up)
        self.norm_out = nn.GroupNorm(_groups(num_groups, c, group_channels), c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)

    def _size_message(self, size):
        k, f = len(self.channel_mult) - 1, self.factor
        lo, hi = max(f, size // f * f), (size // f + 1) * f
        examples = f"{lo} or {hi}" if lo != hi and lo != size else f"{hi}"
        return (f"UNet: image size {size} is not divisible by {f} (2^{k} downsamplings); use a size "
                f"that is, e.g. {examples}")

    def _check_input(self, x):
        super()._check_input(x)
        for size in x.shape[2:]:
            if size % self.factor:
                raise ValueError(self._size_message(size))

    def forward(self, x, t, y=None):
        x = x if isinstance(x, Tensor) else Tensor(x)
        self._check_input(x)
        t = self._times(t, x)
        embed = self._time_embedding(t, y)
        # encoder: every map is kept for the decoder's skip connections
        hs = [self.conv_in(x)]
        for level in self.down:
            for j in range(len(level.block)):
                hs.append(level.run(j, hs[-1], embed))
            if "downsample" in level._modules:
                hs.append(level.downsample(hs[-1]))
        h = self.mid(hs[-1], embed)
        # decoder: each block takes [h, the matching encoder map] on the channel axis
        for level in reversed(self.up):
            for j in range(len(level.block)):
                h = level.run(j, nn.cat([h, hs.pop()], dim=1), embed)
            if "upsample" in level._modules:
                h = level.upsample(h)
        h = self.conv_out(_norm_swish(h, self.norm_out))
        return h / self._std(t, h)                    # s(x, t) = h / std(t), as ScoreNet

    def extra_repr(self):
        return (f"in_channels={self.in_channels}, image_size={self.image_size}, "
                f"base_channels={self.base_channels}, channel_mult={self.channel_mult}, "
                f"num_res_blocks={self.num_res_blocks}, attention={self.attention}, "
                f"num_heads={self.num_heads}, dropout={self.dropout}, embed_dim={self.embed_dim}"
                + (f", num_classes={self.num_classes}" if self.num_classes is not None else ""))


# Named configurations. The "s" ones are sized for a CPU: a batch-64 training step costs about
# 10-12 steps of the reference ScoreNet (0.6-0.7 s where that one takes its idle two-thread 59 ms;
# docs/models.md has the measurements). unet-32s keeps the 16x16 level at 32 channels
# (channel_mult (1, 1, 2, 2)): DDPM's (1, 2, 2, 2) takes 1.35x the time (1.6x the multiply-adds),
# in the 16x16 convs and in the 64-channel upsampling conv and first decoder block at 32x32.
# "unet-32l" is DDPM's CIFAR-10 model (35.7 M parameters there, 35.9 M here: a Linear on the
# Fourier features where DDPM has fixed sinusoids), for a GPU.
UNET_CONFIGS = {
    "unet-28s": dict(image_size=28, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                     attention=(7,), num_heads=4, dropout=0.0),
    "unet-32s": dict(image_size=32, base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1,
                     attention=(8,), num_heads=4, dropout=0.1),
    "unet-32l": dict(image_size=32, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                     attention=(16,), num_heads=4, dropout=0.1),
    # latent diffusion on the autoencoder's 2x7x7 codes (docs/latent.md): one level, no
    # resampling (7 is odd; padding codes to 8x8 would add numbers the decoder never sees), so
    # depth comes from two blocks per level and global attention after each at 7x7 and in the
    # middle; 32 channels: at 64 a training step cost 2.2x as much (383 against 176 ms on 2 cores,
    # benchmarks/latent_speed.py), and 98 numbers per code do not need the width
    "unet-latent": dict(image_size=7, base_channels=32, channel_mult=(1,), num_res_blocks=2,
                        attention=(7,), num_heads=4, dropout=0.0),
}


def unet_from_config(name, marginal_std, in_channels=1, num_classes=None, **overrides):
    """``UNet(marginal_std, in_channels, num_classes=..., **UNET_CONFIGS[name], **overrides)``:
    a named configuration, with any argument (image_size, dropout, ...) overridden."""
    if name not in UNET_CONFIGS:
        raise ValueError(f"unet_from_config: unknown configuration {name!r}; choose one of "
                         f"{', '.join(UNET_CONFIGS)}")
    return UNet(marginal_std, in_channels=in_channels, num_classes=num_classes,
                **{**UNET_CONFIGS[name], **overrides})
