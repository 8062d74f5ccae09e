"""Training helpers: global gradient-norm clipping and an exponential moving average (EMA) of
the parameters, which diffusion models sample from instead of the raw weights.

Flat parameters (``tinydiff.nn.flat``): the norm, the clipping and the EMA work on a flat group's
whole buffers (a dot product for the norm, one multiply for the clipping, three ops for the EMA
update) instead of per parameter array; the per-parameter code beside them is the reference. The
EMA's updates are the same bits either way; the norm of one long dot product may differ from the
sum of per-array dot products in the last bits of float32.
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict

import numpy as np

from ..backend import backend_of
from ..nn import flat as _flat
from . import fused as _fused


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
    groups, rest = _flat.groups_of(params)
    flats = [g.grad for g in groups] + [p.grad.ravel() for p in rest]
    xp = backend_of(flats[0]).xp
    if norm_type in (math.inf, "inf"):
        total = _combine(xp, [xp.abs(g).max() for g in flats], xp.max)
    elif norm_type == 2.0:
        total = grad_norm(params, _split=(groups, rest))
    else:
        total = _combine(xp, [(xp.abs(g) ** norm_type).sum() for g in flats], xp.sum) ** (1.0 / norm_type)
    coef = xp.minimum(max_norm / (total + eps), 1.0).astype(flats[0].dtype, copy=False)
    for g in groups:
        g.grad *= coef          # a flat gradient buffer belongs to its group alone: in place
    for p in rest:
        p.grad = p.grad * coef
    return total if return_array else float(total)


def _combine(xp, parts, reduce):
    """reduce over a list of 0-d arrays (one part needs no stack)."""
    return parts[0] if len(parts) == 1 else reduce(xp.stack(parts))


def grad_norm(params, _split=None):
    """The global L2 norm of the gradients of ``params`` as a 0-d device array (no host sync),
    or None when no parameter has one: one BLAS dot per flat group or parameter array."""
    groups, rest = _split or _flat.groups_of(list(params))
    flats = [g.grad for g in groups] + [p.grad.ravel() for p in rest]
    if not flats:
        return None
    xp = backend_of(flats[0]).xp
    return xp.sqrt(_combine(xp, [g.dot(g) for g in flats], xp.sum))   # dot: no temporaries


def _ema_step(s, p, d):
    """s <- d s + (1 - d) p (one fused kernel when optim/fused.py is switched on)."""
    if _fused.mode(s) is None:
        _ema_step_reference(s, p, d)
    else:
        _fused.ema(s, p, 1.0 - d, lambda: _ema_step_reference(s, p, d))


def _ema_step_reference(s, p, d):
    """s <- s - (1 - d)(s - p): three in-place ops, one temporary (the fused kernel's reference)."""
    tmp = s - p
    tmp *= 1.0 - d
    s -= tmp


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

    def _flat_pairs(self, model):
        """(flat pairs, other pairs): for each flat group of the model's parameters a shadow
        buffer of the same layout, paired with the group (the shadow entries are views into it;
        entries that were replaced, by load_state_dict or a move, are copied in first); the
        (shadow, parameter) pairs of the other parameters."""
        pairs = self._pairs(model)
        names = {id(p): name for name, (_, p) in zip(self.shadow, pairs)}
        groups, _ = _flat.groups_of([p for _, p in pairs], grads=False)
        store = self.__dict__.setdefault("_flat", {})
        flats, covered = [], set()
        for g in groups:
            fs = store.get(id(g))
            if fs is None or fs["group"] is not g or not g.backend.owns(fs["shadow"]) \
                    or fs["shadow"].dtype != g.dtype:
                shadow = g.backend.xp.empty((g.size,), dtype=g.dtype)
                fs = store[id(g)] = {"group": g, "shadow": shadow, "views": g.views_of(shadow)}
            keys = [names[id(p)] for p in g.params]
            current = [self.shadow[k] for k in keys]
            if any(c is not v for c, v in zip(current, fs["views"])):
                for k, v in zip(keys, _flat.adopt(current, fs["views"])):
                    self.shadow[k] = v
            flats.append((fs["shadow"], g))
            covered.update(id(p) for p in g.params)
        return flats, [(s, p) for s, p in pairs if id(p) not in covered]

    def arrays(self, model=None):
        """The shadow arrays ``update`` changes (a flat buffer per flat group)."""
        flats, pairs = self._flat_pairs(model)
        return [s for s, _ in flats] + [s for s, _ in pairs]

    def update(self, model=None):
        """One EMA step towards the model's current parameters."""
        d = self.current_decay()
        self.num_updates += 1
        flats, pairs = self._flat_pairs(model)
        for s, g in flats:
            _ema_step(s, g.data, d)
        for s, p in pairs:
            _ema_step(s, p.data, d)

    def copy_to(self, model=None):
        """Overwrite the model's parameters with the averages (permanently)."""
        flats, pairs = self._flat_pairs(model)
        for s, g in flats:
            g.data[...] = s                    # the parameters stay views of their buffer
        for s, p in pairs:
            p.data = s.astype(p.data.dtype, copy=True)

    apply_to = copy_to

    @contextlib.contextmanager
    def average_parameters(self, model=None):
        """Inside the block the model holds the averages; its own weights come back after.
        (Flat parameters: the averages are copied into the flat buffer and the weights back
        after it, two copies per group; the parameters stay views throughout.)"""
        flats, pairs = self._flat_pairs(model)
        backup = [p.data for _, p in pairs]
        flat_backup = [g.data.copy() for _, g in flats]
        try:
            for s, g in flats:
                g.data[...] = s
            for s, p in pairs:
                p.data = s.astype(p.data.dtype, copy=True)
            yield self.model if model is None else model
        finally:
            for (_, p), data in zip(pairs, backup):
                p.data = data
            for (_, g), data in zip(flats, flat_backup):
                for p, v in zip(g.params, g.views):
                    p.data = v                 # whatever the block assigned, the views come back
                g.data[...] = data

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
