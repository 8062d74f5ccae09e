"""PyTorch versions of tinydiff's score models, the references the tests compare tinydiff with
and the benchmark times against: Song's score-SDE MNIST tutorial ScoreNet (``torch_scorenet``)
and the DDPM-style U-Net of tinydiff.models.unet (``torch_unet``), each with tinydiff's parameter
names, so a state dict moves either way as ``{k: v.numpy()}`` / ``{k: torch.tensor(v)}``. Only tests
and benchmarks import this module; tinydiff itself never imports PyTorch (it is imported here,
inside the functions)."""
import math

_MODULES = {}


def _blocks():
    """The torch building blocks both models use, defined on first call (importing this module
    does not need torch)."""
    if _MODULES:
        return _MODULES
    import torch
    tnn = torch.nn

    class SelfAttention(tnn.Module):
        """x + proj(MHA(qkv(GroupNorm(x)))), tinydiff.nn.SelfAttention2d's names and maths."""

        def __init__(self, c, num_heads, num_groups=32):
            super().__init__()
            self.num_heads = num_heads
            self.norm = tnn.GroupNorm(math.gcd(num_groups, c), c)
            self.qkv = tnn.Linear(c, 3 * c)
            self.proj = tnn.Linear(c, c)

        def forward(self, x):
            n, c, h, w = x.shape
            heads = self.num_heads
            tokens = self.norm(x).flatten(2).transpose(1, 2)               # (N, HW, C)
            q, k, v = self.qkv(tokens).chunk(3, dim=-1)
            split = lambda a: a.reshape(n, h * w, heads, c // heads).transpose(1, 2)  # noqa: E731
            o = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
            o = self.proj(o.transpose(1, 2).reshape(n, h * w, c))
            return x + o.transpose(1, 2).reshape(n, c, h, w)

    class GaussianFourierProjection(tnn.Module):
        def __init__(self, embed_dim, scale=30.0):
            super().__init__()
            self.W = tnn.Parameter(torch.randn(embed_dim // 2) * scale, requires_grad=False)

        def forward(self, x):
            x_proj = x[:, None] * self.W[None, :] * 2 * math.pi
            return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)

    _MODULES.update(SelfAttention=SelfAttention, GaussianFourierProjection=GaussianFourierProjection)
    return _MODULES


def torch_scorenet(marginal_std, channels=(32, 64, 128, 256), embed_dim=256, device="cpu",
                   num_classes=None, attention=(), num_heads=4, num_groups=(4, 32, 32, 32),
                   decoder_groups=32):
    """The tutorial's model, as published (its parameter names are tinydiff's ScoreNet's), and
    with ``num_classes`` / ``attention`` the conditional variant: a class embedding with a "no
    label" row added to the time embedding, and DDPM-style self-attention blocks
    x + proj(MHA(qkv(GroupNorm(x)))) after the blocks whose feature maps have the given sizes.

    marginal_std: a function of a torch tensor t, the output is divided by it. Group counts are
    reduced to gcd(groups, channels), as tinydiff's ScoreNet does for small test networks."""
    import torch
    tnn = torch.nn
    g1, g2, g3, g4 = (math.gcd(g, c) for g, c in zip(num_groups, channels))
    gd = [math.gcd(decoder_groups, c) for c in (channels[2], channels[1], channels[0])]
    blocks = _blocks()
    SelfAttention, GaussianFourierProjection = blocks["SelfAttention"], blocks["GaussianFourierProjection"]

    class Dense(tnn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.dense = tnn.Linear(i, o)

        def forward(self, x):
            return self.dense(x)[..., None, None]

    class ScoreNet(tnn.Module):
        def __init__(self):
            super().__init__()
            c, e = channels, embed_dim
            self.embed = tnn.Sequential(GaussianFourierProjection(e), tnn.Linear(e, e))
            self.conv1 = tnn.Conv2d(1, c[0], 3, stride=1, bias=False)
            self.dense1 = Dense(e, c[0])
            self.gnorm1 = tnn.GroupNorm(g1, num_channels=c[0])
            self.conv2 = tnn.Conv2d(c[0], c[1], 3, stride=2, bias=False)
            self.dense2 = Dense(e, c[1])
            self.gnorm2 = tnn.GroupNorm(g2, num_channels=c[1])
            self.conv3 = tnn.Conv2d(c[1], c[2], 3, stride=2, bias=False)
            self.dense3 = Dense(e, c[2])
            self.gnorm3 = tnn.GroupNorm(g3, num_channels=c[2])
            self.conv4 = tnn.Conv2d(c[2], c[3], 3, stride=2, bias=False)
            self.dense4 = Dense(e, c[3])
            self.gnorm4 = tnn.GroupNorm(g4, num_channels=c[3])
            self.tconv4 = tnn.ConvTranspose2d(c[3], c[2], 3, stride=2, bias=False)
            self.dense5 = Dense(e, c[2])
            self.tgnorm4 = tnn.GroupNorm(gd[0], num_channels=c[2])
            self.tconv3 = tnn.ConvTranspose2d(c[2] + c[2], c[1], 3, stride=2, bias=False, output_padding=1)
            self.dense6 = Dense(e, c[1])
            self.tgnorm3 = tnn.GroupNorm(gd[1], num_channels=c[1])
            self.tconv2 = tnn.ConvTranspose2d(c[1] + c[1], c[0], 3, stride=2, bias=False, output_padding=1)
            self.dense7 = Dense(e, c[0])
            self.tgnorm2 = tnn.GroupNorm(gd[2], num_channels=c[0])
            self.tconv1 = tnn.ConvTranspose2d(c[0] + c[0], 1, 3, stride=1)
            self.act = torch.nn.functional.silu   # x * sigmoid(x), the tutorial's swish
            self.marginal_prob_std = marginal_std
            if num_classes is not None:
                self.label_embed = tnn.Embedding(num_classes + 1, e)
            sizes = {1: 26, 2: 12, 3: 5, 4: 2}
            for stage, size in sizes.items():
                if size in attention:
                    setattr(self, f"attn{stage}", SelfAttention(c[stage - 1], num_heads))
                    if stage < 4:   # no decoder block outputs the 2x2 bottleneck
                        setattr(self, f"tattn{stage + 1}", SelfAttention(c[stage - 1], num_heads))

        def attend(self, name, h):
            return getattr(self, name)(h) if hasattr(self, name) else h

        def forward(self, x, t, y=None):
            embed = self.embed(t)
            if num_classes is not None:
                y = torch.full_like(t, num_classes, dtype=torch.long) if y is None else y
                embed = embed + self.label_embed(y)
            embed = self.act(embed)
            h1 = self.attend("attn1", self.act(self.gnorm1(self.conv1(x) + self.dense1(embed))))
            h2 = self.attend("attn2", self.act(self.gnorm2(self.conv2(h1) + self.dense2(embed))))
            h3 = self.attend("attn3", self.act(self.gnorm3(self.conv3(h2) + self.dense3(embed))))
            h4 = self.attend("attn4", self.act(self.gnorm4(self.conv4(h3) + self.dense4(embed))))
            h = self.attend("tattn4", self.act(self.tgnorm4(self.tconv4(h4) + self.dense5(embed))))
            h = self.act(self.tgnorm3(self.tconv3(torch.cat([h, h3], dim=1)) + self.dense6(embed)))
            h = self.attend("tattn3", h)
            h = self.act(self.tgnorm2(self.tconv2(torch.cat([h, h2], dim=1)) + self.dense7(embed)))
            h = self.attend("tattn2", h)
            h = self.tconv1(torch.cat([h, h1], dim=1))
            return h / self.marginal_prob_std(t)[:, None, None, None]

    return ScoreNet().to(device)


def torch_unet(marginal_std, in_channels=1, image_size=28, base_channels=32, channel_mult=(1, 2, 2),
               num_res_blocks=1, attention=(7,), num_heads=4, dropout=0.0, embed_dim=None,
               num_classes=None, num_groups=32, fourier_scale=30.0, group_channels=4, device="cpu"):
    """tinydiff.models.UNet in PyTorch, argument for argument and name for name (``down.0.block.0
    .conv1.weight``, ``mid.attn_1.qkv.weight``, ``up.1.upsample.conv.weight``, ``embed.3.weight``,
    ...): ResBlocks with the embedding added between their convs, attention after the blocks at
    the ``attention`` sizes and always in the middle, DDPM's stack of skip connections, nearest x2
    + conv upsampling, stride-2 conv downsampling, output divided by marginal_std(t) (a function
    of a torch tensor)."""
    import torch
    tnn = torch.nn
    F = torch.nn.functional
    blocks = _blocks()
    SelfAttention, GaussianFourierProjection = blocks["SelfAttention"], blocks["GaussianFourierProjection"]
    embed_dim = 4 * base_channels if embed_dim is None else embed_dim
    sizes = [image_size // 2 ** i for i in range(len(channel_mult))]
    widths = [base_channels * m for m in channel_mult]

    def groups(c, min_channels=group_channels):
        g = math.gcd(num_groups, c)
        return max(d for d in range(1, g + 1) if g % d == 0 and c // d >= min(min_channels, c))

    def gn(c, min_channels=group_channels):
        return tnn.GroupNorm(groups(c, min_channels), c)

    class ResBlock(tnn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.norm1 = gn(cin)
            self.conv1 = tnn.Conv2d(cin, cout, 3, padding=1)
            self.temb_proj = tnn.Linear(embed_dim, cout)
            self.norm2 = gn(cout, max(group_channels, 4))      # tinydiff's EMBED_GROUP_CHANNELS
            self.dropout = tnn.Dropout(dropout)
            self.conv2 = tnn.Conv2d(cout, cout, 3, padding=1)
            self.nin_shortcut = tnn.Conv2d(cin, cout, 1) if cin != cout else None

        def forward(self, x, e):
            h = self.conv1(F.silu(self.norm1(x)))
            h = h + self.temb_proj(e)[:, :, None, None]
            h = self.conv2(self.dropout(F.silu(self.norm2(h))))
            return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h

    class Downsample(tnn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = tnn.Conv2d(c, c, 3, stride=2, padding=1)

        def forward(self, x):
            return self.conv(x)

    class Upsample(tnn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = tnn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))

    def level(blocks, with_attention):
        m = tnn.Module()
        m.block = tnn.ModuleList(blocks)
        m.attn = tnn.ModuleList([SelfAttention(b.conv2.out_channels, num_heads,
                                               groups(b.conv2.out_channels))
                                 for b in blocks] if with_attention else [])
        return m

    class UNet(tnn.Module):
        def __init__(self):
            super().__init__()
            e = embed_dim
            self.embed = tnn.Sequential(GaussianFourierProjection(e, fourier_scale), tnn.Linear(e, e),
                                        tnn.SiLU(), tnn.Linear(e, e))
            if num_classes is not None:
                self.label_embed = tnn.Embedding(num_classes + 1, e)
            self.conv_in = tnn.Conv2d(in_channels, base_channels, 3, padding=1)
            stack, c, down = [base_channels], base_channels, []
            for i, w in enumerate(widths):
                bl = []
                for _ in range(num_res_blocks):
                    bl.append(ResBlock(c, w))
                    c = w
                    stack.append(c)
                lv = level(bl, sizes[i] in attention)
                if i < len(widths) - 1:
                    lv.downsample = Downsample(c)
                    stack.append(c)
                down.append(lv)
            self.down = tnn.ModuleList(down)
            self.mid = tnn.Module()
            self.mid.block_1, self.mid.attn_1 = ResBlock(c, c), SelfAttention(c, num_heads, groups(c))
            self.mid.block_2 = ResBlock(c, c)
            up = [None] * len(widths)
            for i in reversed(range(len(widths))):
                bl = []
                for _ in range(num_res_blocks + 1):
                    bl.append(ResBlock(c + stack.pop(), widths[i]))
                    c = widths[i]
                up[i] = level(bl, sizes[i] in attention)
                if i > 0:
                    up[i].upsample = Upsample(c)
            self.up = tnn.ModuleList(up)
            self.norm_out = gn(c)
            self.conv_out = tnn.Conv2d(c, in_channels, 3, padding=1)
            self.marginal_prob_std = marginal_std

        def forward(self, x, t, y=None):
            e = self.embed(t)
            if num_classes is not None:
                y = torch.full_like(t, num_classes, dtype=torch.long) if y is None else y
                e = e + self.label_embed(y)
            e = F.silu(e)
            hs = [self.conv_in(x)]
            for lv in self.down:
                for j, b in enumerate(lv.block):
                    h = b(hs[-1], e)
                    hs.append(lv.attn[j](h) if len(lv.attn) else h)
                if hasattr(lv, "downsample"):
                    hs.append(lv.downsample(hs[-1]))
            h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], e)), e)
            for lv in reversed(self.up):
                for j, b in enumerate(lv.block):
                    h = b(torch.cat([h, hs.pop()], dim=1), e)
                    h = lv.attn[j](h) if len(lv.attn) else h
                if hasattr(lv, "upsample"):
                    h = lv.upsample(h)
            h = self.conv_out(F.silu(self.norm_out(h)))
            return h / self.marginal_prob_std(t)[:, None, None, None]

    return UNet().to(device)
