"""Neural-network ops with PyTorch's names and layouts (NCHW), as fused ops with hand-written backward.

    import tinydiff.nn.functional as F
    h = F.conv2d(x, w, stride=2)
    h = F.group_norm_silu(h, 32, gamma, beta, shift=F.linear(embed, dense_w, dense_b))

Every op here is one ``Function`` (forward and backward side by side), not a chain of primitives,
so a training step stores and traverses few graph nodes and few temporaries. Arguments are checked
up front; a mismatch raises ``ShapeError`` naming the op and the shapes.

Fusions for the score network: ``group_norm_silu(x, G, weight, bias, shift=e)`` computes
``silu(group_norm(x + e[:, :, None, None]))`` in one op, the "embedding add, GroupNorm, swish" block
of DESIGN.md section 2.
"""
from __future__ import annotations

import numbers

from ..backend import backend_of
from ..tensor import Function, ShapeError, Tensor
from ._conv import Conv2dFn, ConvTranspose2dFn
from ._norm import GroupNormFn, GroupNormSiluFn

__all__ = ["linear", "conv2d", "conv_transpose2d", "group_norm", "group_norm_silu", "silu"]


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

    def forward(self, x, w, b=None):
        self.x2 = x.reshape(-1, x.shape[-1])
        self.w = w
        y = self.x2 @ w.T
        if b is not None:
            y += b
        return y.reshape(x.shape[:-1] + (w.shape[0],))

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
    return GroupNormFn.apply(x, *_affine(x, weight, bias, C, op), num_groups=int(num_groups),
                             eps=float(eps))


# -- activations -------------------------------------------------------------------------------

class SiluFn(Function):
    """silu(x) = x sigmoid(x) ("swish"), via sigmoid(x) = (1 + tanh(x/2)) / 2, which cannot
    overflow: with u = x/2 and t = tanh(u), silu(x) = u + u t. Derivative: s (1 + x (1 - s))."""

    float_only = True

    def forward(self, x):
        xp = backend_of(x).xp
        u = x * 0.5
        t = xp.tanh(u)
        y = t * u
        y += u
        self.x, self.t = x, t
        return y

    def backward(self, g):
        s = self.t * 0.5
        s += 0.5                                # sigmoid(x)
        d = 1 - s
        d *= self.x
        d += 1
        d *= s
        d *= g
        return d


def silu(x):
    """x * sigmoid(x) (also called swish)."""
    return SiluFn.apply(_tensor(x, "silu", "x"))


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, shift=None):
    """silu(group_norm(x + shift[:, :, None, None], num_groups, weight, bias, eps)) as one fused op.

    ``shift`` (N, C) is an optional per-sample, per-channel offset added before the norm: the score
    network's projected time embedding (DESIGN.md section 2). Faster and leaner than the three ops
    it replaces; the same values and gradients.
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
    return GroupNormSiluFn.apply(*args, num_groups=int(num_groups), eps=float(eps),
                                 has_shift=shift is not None)
