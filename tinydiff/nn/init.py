"""Default initialisations, drawn on the host from one seedable generator.

Every layer initialises its weights here, on the host, in float32, with PyTorch's defaults; the
model is then moved with ``model.to(backend)``. So a seed gives the same weights on every backend:

    tinydiff.nn.manual_seed(0)
    model = ScoreNet(sde.marginal_std).to("cupy")

PyTorch's Linear and Conv weights use ``kaiming_uniform_(a=sqrt(5))``, whose bound
gain * sqrt(3 / fan_in) with gain = sqrt(2 / (1 + a^2)) simplifies to 1 / sqrt(fan_in); their biases
are U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as well.
"""
from __future__ import annotations

import math

import numpy as np

_state = {"rng": np.random.default_rng(0)}   # deterministic by default, as PyTorch's default seed


def manual_seed(seed):
    """Seed the host generator that every default initialisation (and Dropout's seed) draws from."""
    _state["rng"] = np.random.default_rng(seed)


def get_rng():
    """The host ``numpy.random.Generator`` used for initialisation."""
    return _state["rng"]


def calculate_fan_in_and_fan_out(shape):
    """Fans of a weight of ``shape`` with PyTorch's convention: dim 1 is "in", dim 0 is "out",
    times the receptive field (so a ConvTranspose weight (C_in, C_out/groups, k, k) has
    fan_in = C_out/groups * k * k, exactly as torch computes it)."""
    if len(shape) < 2:
        raise ValueError(f"fan in and fan out need a weight with at least 2 dimensions, got shape {shape}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def uniform(shape, low, high, dtype=np.float32):
    return get_rng().uniform(low, high, size=shape).astype(dtype)


def normal(shape, mean=0.0, std=1.0, dtype=np.float32):
    return (get_rng().standard_normal(size=shape) * std + mean).astype(dtype)


def zeros(shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


def ones(shape, dtype=np.float32):
    return np.ones(shape, dtype=dtype)


def kaiming_uniform(shape, a=0.0, fan_in=None, dtype=np.float32):
    """U(-b, b) with b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2)) (leaky-ReLU gain)."""
    fan_in = calculate_fan_in_and_fan_out(shape)[0] if fan_in is None else fan_in
    bound = math.sqrt(2.0 / (1 + a * a)) * math.sqrt(3.0 / fan_in)
    return uniform(shape, -bound, bound, dtype)


def xavier_uniform(shape, gain=1.0, dtype=np.float32):
    fan_in, fan_out = calculate_fan_in_and_fan_out(shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform(shape, -bound, bound, dtype)


def torch_default_weight(shape):
    """PyTorch's default Linear / Conv weight: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))."""
    return kaiming_uniform(shape, a=math.sqrt(5))


def torch_default_bias(weight_shape, n):
    """PyTorch's default Linear / Conv bias: U(+-1/sqrt(fan_in)), fan_in from the weight."""
    fan_in = calculate_fan_in_and_fan_out(weight_shape)[0]
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return uniform((n,), -bound, bound)
