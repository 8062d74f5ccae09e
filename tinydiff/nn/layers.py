"""Layers with PyTorch's names, parameter shapes and default initialisations.

Weights are drawn on the host from ``tinydiff.nn.init`` (seed it with ``tinydiff.nn.manual_seed``)
in float32; move a model with ``model.to(backend)``. Each layer's forward is one call into
``tinydiff.nn.functional`` (the fused ops with hand-written backward passes).
"""
from __future__ import annotations

import math
import numbers

from ..tensor import Tensor, concat
from . import functional as F
from . import init
from .module import Module, Parameter


def _pair(v):
    return (v, v) if isinstance(v, numbers.Integral) else tuple(v)


def _functional(name):
    """The fused op ``F.<name>`` if helper B's functional module provides it, else None."""
    return getattr(F, name, None)


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
        fused = _functional("layer_norm")
        if fused is not None:
            return fused(x, self.normalized_shape, self.weight, self.bias, self.eps)
        axes = tuple(range(x.ndim - len(self.normalized_shape), x.ndim))   # reference composition
        mu = x.mean(axis=axes, keepdims=True)
        y = (x - mu) / (x.var(axis=axes, keepdims=True) + self.eps).sqrt()
        return y if self.weight is None else y * self.weight + self.bias

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


class Embedding(Module):
    """A lookup table (num_embeddings, embedding_dim) ~ N(0, 1), indexed by integer arrays."""

    def __init__(self, num_embeddings, embedding_dim):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(init.normal((num_embeddings, embedding_dim)))

    def forward(self, idx):
        raw = idx.data if isinstance(idx, Tensor) else idx
        fused = _functional("embedding")
        if fused is not None:
            return fused(raw, self.weight)
        return self.weight[raw]     # GetItem: its backward scatter-adds repeated indices

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
        rng = self._rng(x.backend)
        fused = _functional("dropout")
        if fused is not None:
            return fused(x, self.p, True, rng)
        keep = rng.uniform(x.shape, dtype=x.dtype) >= self.p    # reference composition
        return x * (keep.astype(x.dtype) * (1.0 / (1.0 - self.p)))

    def extra_repr(self):
        return f"p={self.p}"


class SiLU(Module):
    def forward(self, x):
        return F.silu(x)


class ReLU(Module):
    def forward(self, x):
        return x.relu()


class GELU(Module):
    def forward(self, x):
        fused = _functional("gelu")
        if fused is not None:
            return fused(x)
        c = math.sqrt(2.0 / math.pi)     # tanh approximation, used only without B's op
        return 0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())


class Flatten(Module):
    def __init__(self, start_dim=1):
        super().__init__()
        self.start_dim = start_dim

    def forward(self, x):
        return x.flatten(self.start_dim)


class SelfAttention2d(Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual:
    x + proj(attention(qkv(group_norm(x)))), the attention block of DDPM-style U-Nets.

    qkv and proj are 1x1 convolutions (stored as Linear layers over channels); the output
    projection starts at the PyTorch default init.
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
        n, c, h, w = x.shape
        heads, d = self.num_heads, c // self.num_heads
        tokens = self.norm(x).reshape(n, c, h * w).transpose(0, 2, 1)          # (N, HW, C)
        qkv = self.qkv(tokens).reshape(n, h * w, 3, heads, d).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                                         # (N, heads, HW, d)
        sdpa = _functional("scaled_dot_product_attention")
        if sdpa is not None:
            out = sdpa(q, k, v)
        else:   # reference composition: softmax(q k^T / sqrt(d)) v
            scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(d))
            out = scores.softmax(axis=-1) @ v
        out = out.transpose(0, 2, 1, 3).reshape(n, h * w, c)
        return x + self.proj(out).transpose(0, 2, 1).reshape(n, c, h, w)

    def extra_repr(self):
        return f"{self.channels}, num_heads={self.num_heads}"


def cat(tensors, dim=1):
    """Concatenate along ``dim`` (the channel axis by default), PyTorch's ``torch.cat``."""
    return concat(tensors, axis=dim)


__all__ = ["Identity", "Linear", "Conv2d", "ConvTranspose2d", "GroupNorm", "LayerNorm", "Embedding",
           "Dropout", "SiLU", "ReLU", "GELU", "Flatten", "SelfAttention2d", "cat"]
