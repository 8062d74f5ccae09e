"""Training helpers: global gradient-norm clipping and an exponential moving average (EMA) of
the parameters, which diffusion models sample from instead of the raw weights."""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict

import numpy as np

from ..backend import backend_of


def _host(a):
    return a if isinstance(a, np.ndarray) else backend_of(a).to_host(a)


def _grads(params):
    return [p for p in params if p.grad is not None]


def clip_grad_norm_(params, max_norm, norm_type=2.0, eps=1e-6, return_array=False):
    """Scale all gradients by min(1, max_norm / (total_norm + eps)), as PyTorch does, where
    total_norm is the norm of all gradients together. Returns total_norm (before clipping) as a
    float, or, with ``return_array=True``, as a 0-d array on the device (no host sync).

    Gradients are replaced (``p.grad = p.grad * coef``), not scaled in place, because the
    autograd engine may share one gradient array between two parameters.
    """
    # max_norm <= 0 would zero every gradient (0) or flip its sign (< 0: gradient ascent)
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float, np.number)) \
            or not math.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be a finite number > 0, got {max_norm!r}")
    if norm_type not in (math.inf, "inf") and (not isinstance(norm_type, (int, float))
                                                or not math.isfinite(norm_type) or norm_type <= 0):
        raise ValueError(f"clip_grad_norm_: norm_type must be > 0 or inf, got {norm_type!r}")
    params = _grads(list(params))
    if not params:
        return 0.0
    xp = backend_of(params[0].grad).xp
    if norm_type in (math.inf, "inf"):
        total = xp.max(xp.stack([xp.abs(p.grad).max() for p in params]))
    elif norm_type == 2.0:
        sq = [p.grad.ravel().dot(p.grad.ravel()) for p in params]   # BLAS dot: no temporaries
        total = xp.sqrt(xp.sum(xp.stack(sq)))
    else:
        total = xp.sum(xp.stack([(xp.abs(p.grad) ** norm_type).sum() for p in params])) ** (1.0 / norm_type)
    coef = xp.minimum(max_norm / (total + eps), 1.0).astype(params[0].grad.dtype)
    for p in params:
        p.grad = p.grad * coef
    return total if return_array else float(total)


class EMA:
    """Exponential moving average of a model's parameters (eq.: s <- d s + (1 - d) p).

        ema = EMA(model, decay=0.999)
        ... optimizer.step(); ema.update()
        with ema.average_parameters():      # the model holds the averages inside the block
            samples = sample(model)

    ``warmup=True`` uses min(decay, (1 + n) / (10 + n)) at update n, so early averages are not
    dominated by the random initial weights.
    """

    def __init__(self, model, decay=0.999, warmup=False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.model, self.decay, self.warmup = model, float(decay), bool(warmup)
        self.num_updates = 0
        self.shadow = OrderedDict((name, p.data.copy()) for name, p in model.named_parameters())

    def current_decay(self):
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    def _pairs(self, model):
        model = self.model if model is None else model
        pairs = []
        named = OrderedDict(model.named_parameters())
        if list(named) != list(self.shadow):
            raise ValueError("EMA: the model's parameter names differ from the ones this EMA was "
                             "built from; build the EMA from this model")
        for name, p in named.items():
            s = self.shadow[name]
            b = backend_of(p.data)
            if not b.owns(s):                  # the model moved backend: follow it
                s = self.shadow[name] = b.asarray(backend_of(s).to_host(s))
            pairs.append((s, p))
        return pairs

    def update(self, model=None):
        """One EMA step towards the model's current parameters."""
        d = self.current_decay()
        self.num_updates += 1
        for s, p in self._pairs(model):
            tmp = s - p.data                   # s <- s - (1 - d)(s - p) = d s + (1 - d) p
            tmp *= 1.0 - d
            s -= tmp

    def copy_to(self, model=None):
        """Overwrite the model's parameters with the averages (permanently)."""
        for s, p in self._pairs(model):
            p.data = s.astype(p.data.dtype, copy=True)

    apply_to = copy_to

    @contextlib.contextmanager
    def average_parameters(self, model=None):
        """Inside the block the model holds the averages; its own weights come back after."""
        pairs = self._pairs(model)
        backup = [p.data for _, p in pairs]
        try:
            for s, p in pairs:
                p.data = s.astype(p.data.dtype, copy=True)
            yield self.model if model is None else model
        finally:
            for (_, p), data in zip(pairs, backup):
                p.data = data

    def state_dict(self):
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": OrderedDict((k, np.array(backend_of(v).to_host(v)))
                                      for k, v in self.shadow.items())}

    def load_state_dict(self, state):
        shadow = state["shadow"]
        if list(shadow) != list(self.shadow):
            missing = [k for k in self.shadow if k not in shadow]
            unexpected = [k for k in shadow if k not in self.shadow]
            raise ValueError(f"EMA state does not fit this model: missing {missing}, "
                             f"unexpected {unexpected}")
        for k, v in shadow.items():
            cur = self.shadow[k]
            if tuple(v.shape) != tuple(cur.shape):
                raise ValueError(f"EMA state {k!r} has shape {tuple(v.shape)}, the model {tuple(cur.shape)}")
            self.shadow[k] = backend_of(cur).asarray(_host(v)).astype(cur.dtype)
        self.decay, self.warmup = float(state["decay"]), bool(state.get("warmup", False))
        self.num_updates = int(state["num_updates"])
