"""Song's score-SDE MNIST tutorial ScoreNet written in PyTorch: the reference the tests compare
tinydiff's ScoreNet with and the benchmark times against. Only tests and benchmarks import this
module; tinydiff itself never imports PyTorch (it is imported here, inside the function)."""


def torch_scorenet(marginal_std, channels=(32, 64, 128, 256), embed_dim=256, device="cpu",
                   num_classes=None, attention=(), num_heads=4, num_groups=(4, 32, 32, 32),
                   decoder_groups=32):
    """The tutorial's model, as published (its parameter names are tinydiff's ScoreNet's), and
    with ``num_classes`` / ``attention`` the conditional variant: a class embedding with a "no
    label" row added to the time embedding, and DDPM-style self-attention blocks
    x + proj(MHA(qkv(GroupNorm(x)))) after the blocks whose feature maps have the given sizes.

    marginal_std: a function of a torch tensor t, the output is divided by it. Group counts are
    reduced to gcd(groups, channels), as tinydiff's ScoreNet does for small test networks."""
    import math

    import torch
    tnn = torch.nn
    g1, g2, g3, g4 = (math.gcd(g, c) for g, c in zip(num_groups, channels))
    gd = [math.gcd(decoder_groups, c) for c in (channels[2], channels[1], channels[0])]

    class SelfAttention(tnn.Module):
        def __init__(self, c):
            super().__init__()
            self.norm = tnn.GroupNorm(math.gcd(32, c), c)
            self.qkv = tnn.Linear(c, 3 * c)
            self.proj = tnn.Linear(c, c)

        def forward(self, x):
            n, c, h, w = x.shape
            tokens = self.norm(x).flatten(2).transpose(1, 2)               # (N, HW, C)
            q, k, v = self.qkv(tokens).chunk(3, dim=-1)
            heads = lambda a: a.reshape(n, h * w, num_heads, c // num_heads).transpose(1, 2)  # noqa: E731
            o = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v))
            o = self.proj(o.transpose(1, 2).reshape(n, h * w, c))
            return x + o.transpose(1, 2).reshape(n, c, h, w)

    class GaussianFourierProjection(tnn.Module):
        def __init__(self, embed_dim, scale=30.0):
            super().__init__()
            self.W = tnn.Parameter(torch.randn(embed_dim // 2) * scale, requires_grad=False)

        def forward(self, x):
            x_proj = x[:, None] * self.W[None, :] * 2 * math.pi
            return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)

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
                    setattr(self, f"attn{stage}", SelfAttention(c[stage - 1]))
                    if stage < 4:   # no decoder block outputs the 2x2 bottleneck
                        setattr(self, f"tattn{stage + 1}", SelfAttention(c[stage - 1]))

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
