"""Neural-network ops with PyTorch's names and layouts (NCHW), as fused ops with hand-written backward.

    import tinydiff.nn.functional as F
    h = F.conv2d(x, w, stride=2)
    h = F.group_norm_silu(h, 32, gamma, beta, shift=F.linear(embed, dense_w, dense_b))

Every op here is one ``Function`` (forward and backward side by side), not a chain of primitives,
so a training step stores and traverses few graph nodes and few temporaries. Arguments are checked
up front; a mismatch raises ``ShapeError`` naming the op and the shapes.

Fusions for the score network: ``group_norm_silu(x, G, weight, bias, shift=e)`` computes
``silu(group_norm(x + e[:, :, None, None]))`` in one op, the "embedding add, GroupNorm, swish" block
of the reference model (docs/design.md).
"""
from __future__ import annotations

import math
import numbers
import os

import numpy as np

from ..backend import backend_of
from ..tensor import Function, ShapeError, Tensor, is_grad_enabled
from ._conv import Conv2dFn, ConvTranspose2dFn
from ._attention import ScaledDotProductAttentionFn
from ._misc import (AvgPool2dFn, DropoutFn, EmbeddingFn, GeluFn, UpsampleNearestFn, default_rng,
                    dropout_mask, nearest_index)
from ._norm import GroupNormActFn, LayerNormFn
from ._parallel import for_batch_chunks, pooled

__all__ = ["linear", "conv2d", "conv_transpose2d", "group_norm", "group_norm_silu", "layer_norm", "silu",
           "gelu", "dropout", "avg_pool2d", "interpolate", "upsample", "embedding",
           "scaled_dot_product_attention", "multi_head_self_attention2d"]


# -- argument checks ---------------------------------------------------------------------------

def _tensor(x, op, name):
    if isinstance(x, Tensor):
        return x
    if isinstance(x, numbers.Number):
        raise TypeError(f"{op}: {name} must be a Tensor or an array, got {type(x).__name__}")
    return Tensor(x)


def _pair(v, op, name, minimum=0):
    if isinstance(v, numbers.Integral):
        v = (int(v), int(v))
    else:
        v = tuple(int(e) for e in v)
        if len(v) != 2:
            raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {v}")
    if min(v) < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v}")
    return v


def _check_ndim(t, ndim, op, what):
    if t.ndim != ndim:
        raise ShapeError(f"{op}: {what} must be {ndim}-D, got shape {t.shape}")


def _check_bias(b, channels, op):
    if b is not None and b.shape != (channels,):
        raise ShapeError(f"{op}: bias must have shape ({channels},) (one per output channel), "
                         f"got {b.shape}")


def _check_float(t, op):
    if t.dtype.kind != "f":
        raise TypeError(f"{op}: expected a floating-point tensor, got {t.dtype}; convert it with "
                        ".astype('float32') first")


# -- linear ------------------------------------------------------------------------------------

class LinearFn(Function):
    """y = x W^T + b over the last axis of x; x may have any number of leading axes."""

    @pooled
    def forward(self, x, w, b=None):
        self.x2 = x.reshape(-1, x.shape[-1])
        self.w = w
        y = self.x2 @ w.T
        if b is not None:
            y += b
        return y.reshape(x.shape[:-1] + (w.shape[0],))

    @pooled
    def backward(self, g):
        g2 = g.reshape(-1, g.shape[-1])
        gx = (g2 @ self.w).reshape(g.shape[:-1] + (self.w.shape[1],)) if self.needs_grad[0] else None
        gw = g2.T @ self.x2 if self.needs_grad[1] else None
        gb = g2.sum(axis=0) if len(self.needs_grad) > 2 and self.needs_grad[2] else None
        return (gx, gw, gb)[:len(self.needs_grad)]


def linear(x, weight, bias=None):
    """x @ weight.T + bias, weight of shape (out_features, in_features)."""
    x, weight = _tensor(x, "linear", "x"), _tensor(weight, "linear", "weight")
    _check_ndim(weight, 2, "linear", "weight (out_features, in_features)")
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ShapeError(f"linear: input has {x.shape[-1] if x.ndim else 0} features (shape {x.shape}) "
                         f"but weight {weight.shape} expects {weight.shape[1]}")
    _check_bias(bias, weight.shape[0], "linear")
    return LinearFn.apply(x, weight) if bias is None else LinearFn.apply(x, weight, bias)


# -- convolutions ------------------------------------------------------------------------------

def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution (cross-correlation, as PyTorch): x (N, C_in, H, W), weight
    (C_out, C_in/groups, kH, kW) -> (N, C_out, OH, OW)."""
    op = "conv2d"
    x, weight = _tensor(x, op, "x"), _tensor(weight, op, "weight")
    bias = None if bias is None else _tensor(bias, op, "bias")
    stride, dilation = _pair(stride, op, "stride", 1), _pair(dilation, op, "dilation", 1)
    padding = _pair(padding, op, "padding", 0)
    _check_ndim(x, 4, op, "input (N, C, H, W)")
    _check_ndim(weight, 4, op, "weight (C_out, C_in/groups, kH, kW)")
    N, C, H, W = x.shape
    O, Cg, KH, KW = weight.shape
    if not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    if C % groups or O % groups:
        raise ShapeError(f"{op}: groups={groups} must divide both the input channels ({C}, input "
                         f"{x.shape}) and the output channels ({O}, weight {weight.shape})")
    if Cg * groups != C:
        raise ShapeError(f"{op}: input {x.shape} has {C} channels but weight {weight.shape} with "
                         f"groups={groups} expects {Cg * groups} (weight.shape[1] * groups)")
    _check_bias(bias, O, op)
    eff = (dilation[0] * (KH - 1) + 1, dilation[1] * (KW - 1) + 1)
    padded = (H + 2 * padding[0], W + 2 * padding[1])
    if eff[0] > padded[0] or eff[1] > padded[1]:
        raise ShapeError(f"{op}: kernel {KH}x{KW} (dilation {dilation}, effective {eff[0]}x{eff[1]}) "
                         f"is larger than the padded input {padded[0]}x{padded[1]} (input {x.shape}, "
                         f"padding {padding})")
    _check_float(x, op)
    args = (x, weight) if bias is None else (x, weight, bias)
    return Conv2dFn.apply(*args, stride=stride, padding=padding, dilation=dilation, groups=groups)


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Transposed 2-D convolution (the adjoint of conv2d's input gradient), PyTorch's semantics:
    x (N, C_in, H, W), weight (C_in, C_out/groups, kH, kW) ->
    (N, C_out, (H-1)*stride - 2*padding + dilation*(kH-1) + output_padding + 1, ...)."""
    op = "conv_transpose2d"
    x, weight = _tensor(x, op, "x"), _tensor(weight, op, "weight")
    bias = None if bias is None else _tensor(bias, op, "bias")
    stride, dilation = _pair(stride, op, "stride", 1), _pair(dilation, op, "dilation", 1)
    padding = _pair(padding, op, "padding", 0)
    output_padding = _pair(output_padding, op, "output_padding", 0)
    _check_ndim(x, 4, op, "input (N, C_in, H, W)")
    _check_ndim(weight, 4, op, "weight (C_in, C_out/groups, kH, kW)")
    N, C, H, W = x.shape
    Cw, Og, KH, KW = weight.shape
    if not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    if C % groups:
        raise ShapeError(f"{op}: groups={groups} must divide the input channels ({C}, input {x.shape})")
    if Cw != C:
        raise ShapeError(f"{op}: input {x.shape} has {C} channels but weight {weight.shape} expects "
                         f"{Cw} (weight.shape[0])")
    for i, name in enumerate("hw"):
        if output_padding[i] >= max(stride[i], dilation[i]):
            raise ValueError(f"{op}: output_padding {output_padding} must be smaller than stride "
                             f"{stride} or dilation {dilation} in each dimension")
    OH = (H - 1) * stride[0] - 2 * padding[0] + dilation[0] * (KH - 1) + output_padding[0] + 1
    OW = (W - 1) * stride[1] - 2 * padding[1] + dilation[1] * (KW - 1) + output_padding[1] + 1
    if OH < 1 or OW < 1:
        raise ShapeError(f"{op}: padding {padding} removes the whole output (input {x.shape}, "
                         f"weight {weight.shape}, stride {stride}: output would be {OH}x{OW})")
    _check_bias(bias, Og * groups, op)
    _check_float(x, op)
    args = (x, weight) if bias is None else (x, weight, bias)
    return ConvTranspose2dFn.apply(*args, stride=stride, padding=padding, output_padding=output_padding,
                                   dilation=dilation, groups=groups)


# -- normalisation -----------------------------------------------------------------------------

def _affine(x, weight, bias, channels, op):
    """Both affine parameters as tensors, or neither (a missing one becomes a constant)."""
    xp = x.backend.xp
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (channels,):
            raise ShapeError(f"{op}: {name} must have shape ({channels},), got {tuple(p.shape)} "
                             f"(input {x.shape})")
    if weight is None and bias is None:
        return ()
    if weight is None:
        weight = Tensor(xp.ones((channels,), dtype=x.dtype))
    if bias is None:
        bias = Tensor(xp.zeros((channels,), dtype=x.dtype))
    return (_tensor(weight, op, "weight"), _tensor(bias, op, "bias"))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """GroupNorm: normalise each sample over groups of C/num_groups channels and all spatial
    positions, then scale and shift per channel. x (N, C, *spatial)."""
    op = "group_norm"
    x = _tensor(x, op, "x")
    if x.ndim < 2:
        raise ShapeError(f"{op}: input must be (N, C, ...), got shape {x.shape}")
    C = x.shape[1]
    if not isinstance(num_groups, numbers.Integral) or num_groups < 1 or C % num_groups:
        raise ShapeError(f"{op}: num_groups={num_groups} must be a positive divisor of the "
                         f"{C} channels of the input {x.shape}")
    _check_float(x, op)
    return GroupNormActFn.apply(x, *_affine(x, weight, bias, C, op), num_groups=int(num_groups),
                                eps=float(eps), has_shift=False, silu=False)


# -- activations -------------------------------------------------------------------------------

class SiluFn(Function):
    """silu(x) = x sigmoid(x) = x / (1 + exp(-x)) ("swish"), and, when a gradient will be needed,
    silu'(x) = sigmoid(x) (1 + x (1 - sigmoid(x))) = sigmoid(x) (1 + x - silu(x)), computed in the
    forward pass. exp(-x) overflows to inf below x = -88 (float32), where the quotients give the
    right limits (0 and 0), so that warning is silenced."""

    float_only = True

    def forward(self, x):
        xp = backend_of(x).xp
        y = xp.empty_like(x)
        need_grad = is_grad_enabled() and self.needs_grad[0]
        d = xp.empty_like(x) if need_grad else None
        flat = x.ndim == 0                 # otherwise chunks of the leading axis (any layout)

        def chunk(lo, hi):
            xs = x if flat else x[lo:hi]
            ys = y if flat else y[lo:hi]
            q = xp.negative(xs, out=ys)
            with np.errstate(over="ignore"):
                xp.exp(q, out=q)
            q += 1                                       # 1 + exp(-x)
            if d is not None:
                ds = d if flat else d[lo:hi]
                xp.divide(1.0, q, out=ds)                # sigmoid(x)
            xp.divide(xs, q, out=ys)                     # silu(x)
            if d is not None:
                t = xp.subtract(xs, ys)                  # x (1 - sigmoid(x))
                t += 1
                ds *= t
        if flat:
            chunk(0, 1)
        else:
            for_batch_chunks(chunk, x)
        self.d = d
        return y

    def backward(self, g):
        return g * self.d


def silu(x):
    """x * sigmoid(x) (also called swish)."""
    return SiluFn.apply(_tensor(x, "silu", "x"))


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, shift=None):
    """silu(group_norm(x + shift[:, :, None, None], num_groups, weight, bias, eps)) as one fused op.

    ``shift`` (N, C) is an optional per-sample, per-channel offset added before the norm: the score
    network's projected time embedding (docs/design.md, the reference model). Faster and leaner
    than the three ops it replaces; the same values and gradients.
    """
    op = "group_norm_silu"
    x = _tensor(x, op, "x")
    if x.ndim < 2:
        raise ShapeError(f"{op}: input must be (N, C, ...), got shape {x.shape}")
    N, C = x.shape[:2]
    if not isinstance(num_groups, numbers.Integral) or num_groups < 1 or C % num_groups:
        raise ShapeError(f"{op}: num_groups={num_groups} must be a positive divisor of the "
                         f"{C} channels of the input {x.shape}")
    _check_float(x, op)
    args = [x]
    if shift is not None:
        shift = _tensor(shift, op, "shift")
        if shift.shape != (N, C):
            raise ShapeError(f"{op}: shift must have shape (N, C) = ({N}, {C}) for input {x.shape}, "
                             f"got {shift.shape}")
        args.append(shift)
    args += _affine(x, weight, bias, C, op)
    return GroupNormActFn.apply(*args, num_groups=int(num_groups), eps=float(eps),
                                has_shift=shift is not None, silu=True)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the trailing axes ``normalized_shape``; weight and bias of that shape."""
    op = "layer_norm"
    x = _tensor(x, op, "x")
    shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or x.shape[x.ndim - k:] != shape or x.ndim < k:
        raise ShapeError(f"{op}: normalized_shape {shape} must match the trailing axes of the "
                         f"input {x.shape}")
    _check_float(x, op)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != shape:
            raise ShapeError(f"{op}: {name} must have shape {shape}, got {tuple(p.shape)}")
    affine = ()
    if weight is not None or bias is not None:
        xp = x.backend.xp
        weight = Tensor(xp.ones(shape, dtype=x.dtype)) if weight is None else _tensor(weight, op, "weight")
        bias = Tensor(xp.zeros(shape, dtype=x.dtype)) if bias is None else _tensor(bias, op, "bias")
        affine = (weight, bias)
    return LayerNormFn.apply(x, *affine, k=k, eps=float(eps))


# -- more activations, dropout -----------------------------------------------------------------

def gelu(x, approximate="none"):
    """x * Phi(x) (Phi the standard normal CDF); ``approximate="tanh"`` uses PyTorch's tanh form."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return GeluFn.apply(_tensor(x, "gelu", "x"), approximate=approximate)


def dropout(x, p=0.5, training=True, rng=None):
    """Inverted dropout: in training, zero each element with probability p and scale the rest by
    1/(1-p); the identity in evaluation. ``rng``: a tinydiff Generator on x's backend (default: a
    process-wide one per backend, seeded with 0)."""
    x = _tensor(x, "dropout", "x")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    if rng is None:
        rng = default_rng(x.backend)
    elif rng.backend is not x.backend:
        raise ValueError(f"dropout: rng is on backend {rng.backend.name!r} but x is on "
                         f"{x.backend.name!r}; use backend.default_rng(seed) of x's backend")
    return DropoutFn.apply(x, keep_scaled=dropout_mask(x.data, p, rng))


# -- pooling, resampling, embedding ------------------------------------------------------------

def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    """Average over kernel_size windows of an (N, C, H, W) input (PyTorch's floor mode)."""
    op = "avg_pool2d"
    x = _tensor(x, op, "x")
    _check_ndim(x, 4, op, "input (N, C, H, W)")
    kernel = _pair(kernel_size, op, "kernel_size", 1)
    stride = kernel if stride is None else _pair(stride, op, "stride", 1)
    padding = _pair(padding, op, "padding", 0)
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"{op}: padding {padding} must be at most half the kernel {kernel}")
    H, W = x.shape[2:]
    if kernel[0] > H + 2 * padding[0] or kernel[1] > W + 2 * padding[1]:
        raise ShapeError(f"{op}: kernel {kernel[0]}x{kernel[1]} is larger than the padded input "
                         f"{H + 2 * padding[0]}x{W + 2 * padding[1]} (input {x.shape}, padding {padding})")
    _check_float(x, op)
    return AvgPool2dFn.apply(x, kernel=kernel, stride=stride, padding=padding,
                             count_include_pad=bool(count_include_pad))


def interpolate(x, size=None, scale_factor=None, mode="nearest"):
    """Resize the last two axes of (N, C, H, W) with nearest-neighbour sampling, PyTorch's rule
    (source index floor(i * in / out), or floor(i / scale_factor) when scale_factor is given)."""
    op = "interpolate"
    x = _tensor(x, op, "x")
    if mode != "nearest":
        raise ValueError(f"{op}: only mode='nearest' is implemented, got {mode!r}")
    _check_ndim(x, 4, op, "input (N, C, H, W)")
    H, W = x.shape[2:]
    if (size is None) == (scale_factor is None):
        raise ValueError(f"{op}: give exactly one of size and scale_factor")
    if size is not None:
        out = _pair(size, op, "size", 1)
        scales = (None, None)
    else:
        scales = (tuple(float(s) for s in scale_factor) if isinstance(scale_factor, (tuple, list))
                  else (float(scale_factor),) * 2)
        if min(scales) <= 0:
            raise ValueError(f"{op}: scale_factor must be positive, got {scale_factor}")
        out = (int(H * scales[0]), int(W * scales[1]))
        if min(out) < 1:
            raise ShapeError(f"{op}: scale_factor {scale_factor} gives an empty output for input {x.shape}")
    rows, cols = nearest_index(H, out[0], scales[0]), nearest_index(W, out[1], scales[1])
    return UpsampleNearestFn.apply(x, rows=rows, cols=cols)


def upsample(x, size=None, scale_factor=None, mode="nearest"):
    """Alias of ``interpolate`` (nearest)."""
    return interpolate(x, size=size, scale_factor=scale_factor, mode=mode)


CHECK_DEVICE_INDICES = os.environ.get("TINYDIFF_CHECK_INDICES", "0") == "1"


def embedding(idx, weight):
    """Rows of ``weight`` (num_embeddings, dim) picked by the integer indices ``idx`` (any shape):
    output shape idx.shape + (dim,).

    Host indices out of range raise IndexError here. Device indices cannot be checked without a
    host sync, and CuPy's gather wraps an out-of-range index around (a bad label would pick
    another class's row without a word), so on a device the rows of out-of-range indices come out
    as NaN instead (2 extra launches and 2 small ones, no sync): the loss is then NaN and the
    trainer refuses the step. ``TINYDIFF_CHECK_INDICES=1`` (or ``CHECK_DEVICE_INDICES = True``)
    raises IndexError on a device too, at the cost of one host sync per call."""
    op = "embedding"
    weight = _tensor(weight, op, "weight")
    _check_ndim(weight, 2, op, "weight (num_embeddings, embedding_dim)")
    idx = idx.data if isinstance(idx, Tensor) else idx
    if isinstance(idx, (numbers.Integral, list, tuple)):
        idx = np.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"{op}: indices must be integers, got {idx.dtype}")
    if isinstance(idx, np.ndarray):   # host indices: checked here, for free
        if idx.size and (idx.min() < 0 or idx.max() >= weight.shape[0]):
            raise IndexError(f"{op}: indices must lie in [0, {weight.shape[0]}), got values in "
                             f"[{idx.min()}, {idx.max()}] (weight {weight.shape})")
        idx = weight.backend.asarray(idx)
        return EmbeddingFn.apply(weight, idx=idx, check=False)
    elif backend_of(idx) is not weight.backend:
        raise ValueError(f"{op}: indices on backend {backend_of(idx).name!r}, weight on "
                         f"{weight.backend.name!r}; move them to the same backend")
    check = True                          # device indices: bad ones give NaN rows (no sync)
    if CHECK_DEVICE_INDICES and idx.size:
        n = weight.shape[0]
        if bool((idx.astype(np.uint64) >= n).any()):       # negative ones become huge: one test
            raise IndexError(f"{op}: indices must lie in [0, {n}), got values in "
                             f"[{int(idx.min())}, {int(idx.max())}] (weight {weight.shape}; "
                             "checked on the device because TINYDIFF_CHECK_INDICES=1)")
        check = False
    return EmbeddingFn.apply(weight, idx=idx, check=check)


# -- attention ---------------------------------------------------------------------------------

def scaled_dot_product_attention(q, k, v, mask=None, scale=None):
    """softmax(q k^T * scale + mask) v, scale = 1/sqrt(d) by default. q (..., L, d), k (..., S, d),
    v (..., S, d_v), leading axes broadcast; ``mask`` boolean (True = may attend, as PyTorch's
    attn_mask) or additive float, broadcastable to (..., L, S)."""
    op = "scaled_dot_product_attention"
    q, k, v = _tensor(q, op, "q"), _tensor(k, op, "k"), _tensor(v, op, "v")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim < 2:
            raise ShapeError(f"{op}: {name} must be at least 2-D (..., length, dim), got {t.shape}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ShapeError(f"{op}: q {q.shape}, k {k.shape}, v {v.shape} do not fit: q and k need the "
                         "same last axis, k and v the same length (axis -2)")
    _check_float(q, op)
    if mask is not None:
        mask = mask.data if isinstance(mask, Tensor) else mask
        if backend_of(mask) is not q.backend:
            mask = q.backend.asarray(mask)
        if mask.dtype != bool:
            mask = mask.astype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return ScaledDotProductAttentionFn.apply(q, k, v, mask=mask, scale=scale)


def multi_head_self_attention2d(x, in_weight, in_bias, out_weight, out_bias, num_heads=1):
    """Multi-head self-attention among the H*W positions of a feature map x (N, C, H, W):
    tokens (N, HW, C) -> q, k, v = split(tokens @ in_weight^T + in_bias) into heads ->
    attention -> merge heads -> @ out_weight^T + out_bias -> (N, C, H, W). Weights as PyTorch's
    nn.MultiheadAttention: in_weight (3C, C) stacked q, k, v; out_weight (C, C). No norm and no
    residual here (the module adds those)."""
    op = "multi_head_self_attention2d"
    x = _tensor(x, op, "x")
    _check_ndim(x, 4, op, "input (N, C, H, W)")
    n, c, h, w = x.shape
    if c % num_heads:
        raise ShapeError(f"{op}: num_heads={num_heads} must divide the {c} channels of {x.shape}")
    if tuple(in_weight.shape) != (3 * c, c) or tuple(out_weight.shape) != (c, c):
        raise ShapeError(f"{op}: for {c} channels in_weight must be ({3 * c}, {c}) and out_weight "
                         f"({c}, {c}), got {tuple(in_weight.shape)} and {tuple(out_weight.shape)}")
    d = c // num_heads
    tokens = x.reshape(n, c, h * w).transpose(0, 2, 1)                       # (N, HW, C)
    qkv = linear(tokens, in_weight, in_bias).reshape(n, h * w, 3, num_heads, d)
    qkv = qkv.transpose(2, 0, 3, 1, 4)                                       # (3, N, heads, HW, d)
    out = scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    out = out.transpose(0, 2, 1, 3).reshape(n, h * w, c)
    return linear(out, out_weight, out_bias).transpose(0, 2, 1).reshape(n, c, h, w)
