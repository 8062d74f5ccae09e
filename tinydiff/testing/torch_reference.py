"""Song's score-SDE MNIST tutorial ScoreNet written in PyTorch: the reference the tests compare
tinydiff's ScoreNet with and the benchmark times against. Only tests and benchmarks import this
module; tinydiff itself never imports PyTorch (it is imported here, inside the function)."""


def torch_scorenet(marginal_std, channels=(32, 64, 128, 256), embed_dim=256, device="cpu"):
    """The tutorial's model, as published (its parameter names are tinydiff's ScoreNet's).

    marginal_std: a function of a torch tensor t, the output is divided by it."""
    import math

    import torch
    tnn = torch.nn

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
            self.gnorm1 = tnn.GroupNorm(4, num_channels=c[0])
            self.conv2 = tnn.Conv2d(c[0], c[1], 3, stride=2, bias=False)
            self.dense2 = Dense(e, c[1])
            self.gnorm2 = tnn.GroupNorm(32, num_channels=c[1])
            self.conv3 = tnn.Conv2d(c[1], c[2], 3, stride=2, bias=False)
            self.dense3 = Dense(e, c[2])
            self.gnorm3 = tnn.GroupNorm(32, num_channels=c[2])
            self.conv4 = tnn.Conv2d(c[2], c[3], 3, stride=2, bias=False)
            self.dense4 = Dense(e, c[3])
            self.gnorm4 = tnn.GroupNorm(32, num_channels=c[3])
            self.tconv4 = tnn.ConvTranspose2d(c[3], c[2], 3, stride=2, bias=False)
            self.dense5 = Dense(e, c[2])
            self.tgnorm4 = tnn.GroupNorm(32, num_channels=c[2])
            self.tconv3 = tnn.ConvTranspose2d(c[2] + c[2], c[1], 3, stride=2, bias=False, output_padding=1)
            self.dense6 = Dense(e, c[1])
            self.tgnorm3 = tnn.GroupNorm(32, num_channels=c[1])
            self.tconv2 = tnn.ConvTranspose2d(c[1] + c[1], c[0], 3, stride=2, bias=False, output_padding=1)
            self.dense7 = Dense(e, c[0])
            self.tgnorm2 = tnn.GroupNorm(32, num_channels=c[0])
            self.tconv1 = tnn.ConvTranspose2d(c[0] + c[0], 1, 3, stride=1)
            self.act = torch.nn.functional.silu   # x * sigmoid(x), the tutorial's swish
            self.marginal_prob_std = marginal_std

        def forward(self, x, t):
            embed = self.act(self.embed(t))
            h1 = self.act(self.gnorm1(self.conv1(x) + self.dense1(embed)))
            h2 = self.act(self.gnorm2(self.conv2(h1) + self.dense2(embed)))
            h3 = self.act(self.gnorm3(self.conv3(h2) + self.dense3(embed)))
            h4 = self.act(self.gnorm4(self.conv4(h3) + self.dense4(embed)))
            h = self.act(self.tgnorm4(self.tconv4(h4) + self.dense5(embed)))
            h = self.act(self.tgnorm3(self.tconv3(torch.cat([h, h3], dim=1)) + self.dense6(embed)))
            h = self.act(self.tgnorm2(self.tconv2(torch.cat([h, h2], dim=1)) + self.dense7(embed)))
            h = self.tconv1(torch.cat([h, h1], dim=1))
            return h / self.marginal_prob_std(t)[:, None, None, None]

    return ScoreNet().to(device)
