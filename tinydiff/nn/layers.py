"""Layers with PyTorch's names, parameter shapes and default initialisations.

Weights are drawn on the host from ``tinydiff.nn.init`` (seed it with ``tinydiff.nn.manual_seed``)
in float32; move a model with ``model.to(backend)``. Each layer's forward is one call into
``tinydiff.nn.functional`` (the fused ops with hand-written backward passes).
"""
from __future__ import annotations

import math
import numbers

from ..tensor import concat
from . import functional as F
from . import init
from .module import Module, Parameter


def _pair(v):
    return (v, v) if isinstance(v, numbers.Integral) else tuple(v)


class Identity(Module):
    def forward(self, x):
        return x


class Linear(Module):
    """y = x W^T + b, W (out_features, in_features); W and b ~ U(+-1/sqrt(in_features))."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        shape = (out_features, in_features)
        self.weight = Parameter(init.torch_default_weight(shape))
        self.bias = Parameter(init.torch_default_bias(shape, out_features)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    """2-D convolution, weight (C_out, C_in/groups, kH, kW), PyTorch's default init."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation, self.groups = _pair(padding), _pair(dilation), groups
        shape = (out_channels, in_channels // groups) + self.kernel_size
        self.weight = Parameter(init.torch_default_weight(shape))
        self.bias = Parameter(init.torch_default_bias(shape, out_channels)) if bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")


class ConvTranspose2d(Module):
    """Transposed 2-D convolution, weight (C_in, C_out/groups, kH, kW). As in PyTorch, the
    init's fan_in is weight.shape[1] * kH * kW (= C_out/groups * kH * kW)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0, groups=1, bias=True, dilation=1):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"ConvTranspose2d: groups={groups} must divide in_channels={in_channels} "
                             f"and out_channels={out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.output_padding = _pair(padding), _pair(output_padding)
        self.dilation, self.groups = _pair(dilation), groups
        shape = (in_channels, out_channels // groups) + self.kernel_size
        self.weight = Parameter(init.torch_default_weight(shape))
        self.bias = Parameter(init.torch_default_bias(shape, out_channels)) if bias else None

    def forward(self, x):
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, output_padding={self.output_padding}, "
                f"bias={self.bias is not None}")


class GroupNorm(Module):
    """GroupNorm(num_groups, num_channels): weight ones, bias zeros."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_groups={num_groups} must divide num_channels={num_channels}")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = Parameter(init.ones((num_channels,))) if affine else None
        self.bias = Parameter(init.zeros((num_channels,))) if affine else None

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


class LayerNorm(Module):
    """LayerNorm over the trailing ``normalized_shape`` axes: weight ones, bias zeros."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else tuple(normalized_shape)
        self.normalized_shape, self.eps = shape, eps
        self.weight = Parameter(init.ones(shape)) if elementwise_affine else None
        self.bias = Parameter(init.zeros(shape)) if elementwise_affine else None

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


class Embedding(Module):
    """A lookup table (num_embeddings, embedding_dim) ~ N(0, 1), indexed by integer arrays."""

    def __init__(self, num_embeddings, embedding_dim):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(init.normal((num_embeddings, embedding_dim)))

    def forward(self, idx):
        return F.embedding(idx, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Dropout(Module):
    """Zeroes each element with probability p in training mode, scaling the rest by 1/(1-p).
    Its random stream is seeded from the init generator, then lives on the input's backend."""

    def __init__(self, p=0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must lie in [0, 1), got {p}")
        self.p = p
        self.seed = int(init.get_rng().integers(2**63 - 1))
        self._rngs = {}

    def _rng(self, backend):
        if backend.name not in self._rngs:
            self._rngs[backend.name] = backend.default_rng(self.seed)
        return self._rngs[backend.name]

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        return F.dropout(x, self.p, True, self._rng(x.backend))

    def extra_repr(self):
        return f"p={self.p}"


class SiLU(Module):
    def forward(self, x):
        return F.silu(x)


class ReLU(Module):
    def forward(self, x):
        return x.relu()


class GELU(Module):
    """x Phi(x) (exact, PyTorch's default) or its tanh form with approximate="tanh"."""

    def __init__(self, approximate="none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, self.approximate)


class Flatten(Module):
    def __init__(self, start_dim=1):
        super().__init__()
        self.start_dim = start_dim

    def forward(self, x):
        return x.flatten(self.start_dim)


class AvgPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding)


class Upsample(Module):
    """Nearest-neighbour upsampling by ``scale_factor`` (or to ``size``)."""

    def __init__(self, size=None, scale_factor=None, mode="nearest"):
        super().__init__()
        self.size, self.scale_factor, self.mode = size, scale_factor, mode

    def forward(self, x):
        return F.interpolate(x, self.size, self.scale_factor, self.mode)


class SelfAttention2d(Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual:
    x + proj(attention(qkv(group_norm(x)))), the attention block of DDPM-style U-Nets.

    qkv (3C, C) stacks the q, k, v projections as PyTorch's nn.MultiheadAttention in_proj does;
    both projections are per-position (1x1 convolutions) with PyTorch's default Linear init.
    """

    def __init__(self, channels, num_heads=1, num_groups=32):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"SelfAttention2d: num_heads={num_heads} must divide channels={channels}")
        groups = math.gcd(num_groups, channels)
        self.channels, self.num_heads = channels, num_heads
        self.norm = GroupNorm(groups, channels)
        self.qkv = Linear(channels, 3 * channels)
        self.proj = Linear(channels, channels)

    def forward(self, x):
        h = F.multi_head_self_attention2d(self.norm(x), self.qkv.weight, self.qkv.bias,
                                          self.proj.weight, self.proj.bias, self.num_heads)
        return x + h

    def extra_repr(self):
        return f"{self.channels}, num_heads={self.num_heads}"


def cat(tensors, dim=1):
    """Concatenate along ``dim`` (the channel axis by default), PyTorch's ``torch.cat``."""
    return concat(tensors, axis=dim)


__all__ = ["Identity", "Linear", "Conv2d", "ConvTranspose2d", "GroupNorm", "LayerNorm", "Embedding",
           "Dropout", "SiLU", "ReLU", "GELU", "Flatten", "AvgPool2d", "Upsample", "SelfAttention2d", "cat"]
