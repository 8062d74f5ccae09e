"""SGD, Adam and AdamW with PyTorch's semantics, updating parameter arrays in place.

The step is part of every timed training step, so each update is a handful of in-place array
operations per parameter with one reused scratch array, never a new array per term. Gradients
are only read: the autograd engine may hand the same gradient array to two parameters (the
backward of ``a + b``), so scaling one in place would change the other.

Flat parameters (``Module.flatten_parameters``, ``tinydiff.nn.flat``): when all parameters of a
flat group are in one param group, have their gradients in the group's gradient buffer and the
same step count, Adam and AdamW run the same ``_update`` once over the whole buffers (their
state, ``exp_avg`` and ``exp_avg_sq``, is then flat too, each parameter's state a view into it):
13 kernel launches instead of 13 per parameter array, and the same bits, since every op is
elementwise. Anything else (SGD, parameters outside a group, a missing gradient) takes the
per-parameter path, the reference.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import backend_of
from ..nn import flat as _flat
from . import fused as _fused


def _host(a):
    return a if isinstance(a, np.ndarray) else backend_of(a).to_host(a)


def _param_groups(params, defaults):
    """Normalise ``params`` (tensors, or dicts with a "params" list) into param groups."""
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list; pass model.parameters()")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    out = []
    for g in groups:
        g = dict(g)
        g["params"] = list(g["params"])
        for p in g["params"]:
            if not hasattr(p, "data") or not hasattr(p, "grad"):
                raise TypeError(f"optimizer expects tensors (Parameters), got {type(p).__name__}")
        for k, v in defaults.items():
            g.setdefault(k, v)
        out.append(g)
    seen = set()
    for g in out:
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError("a parameter appears in more than one parameter group")
            seen.add(id(p))
    return out


class Optimizer:
    """Base class: param groups (dicts of "params" and hyper-parameters) and per-parameter state."""

    state_keys = ()   # names of the per-parameter arrays kept in the state (saved in state_dict)

    def __init__(self, params, defaults):
        self.defaults = defaults
        self.param_groups = _param_groups(params, defaults)
        for group in self.param_groups:   # a NaN lr passes every "< 0" check and poisons the weights
            for k, v in group.items():
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"{type(self).__name__}: {k} must be finite, got {v}")
        self.state = {}      # id(param) -> dict of arrays and "step"
        self._scratch = {}   # id(param) -> reused temporary (not saved)
        self._flat_state = {}   # id(FlatGroup) -> {"group", key: flat array, "views", "tmp"}

    @property
    def lr(self):
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value):
        for g in self.param_groups:
            g["lr"] = value

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self):
        for p in self._params():
            p.grad = None

    def _state_for(self, p):
        """The state of ``p``, created on first use and moved if the model changed backend."""
        st = self.state.get(id(p))
        b = backend_of(p.data)
        if st is None:
            st = {"step": 0}
            for k in self.state_keys:
                st[k] = b.xp.zeros_like(p.data)
            self.state[id(p)] = st
        else:
            for k in self.state_keys:
                a = st.get(k)
                if a is not None and not b.owns(a):
                    st[k] = b.asarray(backend_of(a).to_host(a))
        tmp = self._scratch.get(id(p))
        if tmp is None or not b.owns(tmp) or tmp.dtype != p.data.dtype:
            tmp = self._scratch[id(p)] = b.xp.empty_like(p.data)
        return st, tmp

    flat_capable = False   # True where all state is in ``state_keys`` (then flat groups apply)

    def step(self):
        for group in self.param_groups:
            params = group["params"]
            if self.flat_capable:
                flat_groups, params = _flat.groups_of(params)
                for fg in flat_groups:
                    if not self._flat_step(fg, group):
                        params = list(params) + list(fg.params)   # mixed step counts: per parameter
            for p in params:
                if p.grad is None:
                    continue
                if p.grad.shape != p.data.shape:
                    raise ValueError(f"gradient of shape {tuple(p.grad.shape)} for a parameter of "
                                     f"shape {tuple(p.data.shape)}")
                st, tmp = self._state_for(p)
                st["step"] += 1
                self._update(p.data, p.grad, st, tmp, group)

    def state_arrays(self):
        """Every device array the next ``step()`` changes, its state made now where missing:
        the parameters' data and state (flat buffers for flat groups). For a caller that must be
        able to undo a step (Trainer with log_every > 1); the step counts are host ints."""
        out = []
        for group in self.param_groups:
            params = group["params"]
            if self.flat_capable:
                flat_groups, params = _flat.groups_of(params)
                for fg in flat_groups:
                    out += [fg.data] + list(self._flat_state_for(fg)["arrays"].values())
            for p in params:
                if p.grad is None:
                    continue
                st, _ = self._state_for(p)
                out += [p.data] + [st[k] for k in self.state_keys]
                if st.get("momentum_buffer") is not None:
                    out.append(st["momentum_buffer"])
        return out

    def _flat_step(self, fg, group):
        """``_update`` once over a flat group's buffers; False (nothing done) when its
        parameters' step counts differ."""
        fs = self._flat_state_for(fg)
        states = [self.state[id(p)] for p in fg.params]
        steps = {st["step"] for st in states}
        if len(steps) != 1:
            return False
        t = steps.pop() + 1
        self._update(fg.data, fg.grad, dict(fs["arrays"], step=t), fs["tmp"], group)
        for st in states:
            st["step"] = t
        return True

    def _flat_state_for(self, fg):
        """The flat state of group ``fg`` (created on first use; rebuilt when the group moved),
        each parameter's ``state[k]`` a view into it. State arrays that were replaced (loaded,
        moved, made by the per-parameter path) are copied into their views first."""
        fs = self._flat_state.get(id(fg))
        b = fg.backend
        fresh = fs is None or fs["group"] is not fg or not b.owns(fs["tmp"]) \
            or fs["tmp"].dtype != fg.dtype
        if fresh:
            fs = {"group": fg, "arrays": {}, "views": {},
                  "tmp": b.xp.empty((fg.size,), dtype=fg.dtype)}
            for k in self.state_keys:
                fs["arrays"][k] = b.xp.zeros((fg.size,), dtype=fg.dtype)
                fs["views"][k] = fg.views_of(fs["arrays"][k])
            self._flat_state[id(fg)] = fs
        for i, p in enumerate(fg.params):
            st = self.state.get(id(p))
            if st is None:
                st = self.state[id(p)] = {"step": 0}
            for k in self.state_keys:
                view = fs["views"][k][i]
                if st.get(k) is None:             # no state yet: zeros, as _state_for makes
                    if not fresh:
                        view.fill(0)
                    st[k] = view
                elif st[k] is not view:
                    st[k] = _flat.adopt([st[k]], [view])[0]
        return fs

    def _update(self, param, grad, state, tmp, group):
        raise NotImplementedError

    # -- saving --
    def state_dict(self):
        """{"state": {index: {"step": int, name: host array}}, "param_groups": [...]} where
        parameters are numbered in order across the groups, as in PyTorch."""
        index, groups = 0, []
        state = {}
        for g in self.param_groups:
            entry = {k: v for k, v in g.items() if k != "params"}
            entry["params"] = list(range(index, index + len(g["params"])))
            for p in g["params"]:
                st = self.state.get(id(p))
                if st is not None:
                    state[index] = {k: (v if k == "step" or v is None
                                        else np.array(backend_of(v).to_host(v)))
                                    for k, v in st.items()}
                index += 1
            groups.append(entry)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("optimizer state_dict has a different number of parameter groups or "
                             "parameters than this optimizer; was it saved for another model?")
        params = self._params()
        for saved, g in zip(groups, self.param_groups):
            g.update({k: v for k, v in saved.items() if k != "params"})
        self.state = {}
        for i, st in state_dict["state"].items():
            p = params[int(i)]
            b = backend_of(p.data)
            new = {}
            for k, v in st.items():
                if k == "step" or v is None:
                    new[k] = int(v) if k == "step" else v
                    continue
                if tuple(v.shape) != tuple(p.data.shape):
                    raise ValueError(f"optimizer state {k!r} of parameter {i} has shape "
                                     f"{tuple(v.shape)}, the parameter has {tuple(p.data.shape)}")
                new[k] = b.asarray(_host(v)).astype(p.data.dtype)
            self.state[id(p)] = new

    def __repr__(self):
        hp = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in hp.items())})"


class SGD(Optimizer):
    """p <- p - lr * d with d = g + wd p, momentum buffer b <- mu b + (1 - dampening) d
    (b = d on the first step), and d = b, or d + mu b with Nesterov (PyTorch's SGD)."""

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr, momentum and weight_decay must be >= 0 (got {lr}, {momentum}, "
                             f"{weight_decay})")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov momentum needs momentum > 0 and dampening = 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      nesterov=nesterov, weight_decay=weight_decay))

    def _state_for(self, p):
        st, tmp = super()._state_for(p)
        st.setdefault("momentum_buffer", None)
        buf = st["momentum_buffer"]
        if buf is not None and not backend_of(p.data).owns(buf):
            st["momentum_buffer"] = backend_of(p.data).asarray(backend_of(buf).to_host(buf))
        return st, tmp

    def _update(self, p, g, st, tmp, group):
        xp = backend_of(p).xp
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        if wd:
            xp.multiply(p, wd, out=tmp)
            tmp += g
            g = tmp                       # d = g + wd p, in the scratch array
        if mu:
            buf = st["momentum_buffer"]
            if buf is None:
                buf = st["momentum_buffer"] = g.copy()
            else:
                buf *= mu
                if group["dampening"]:
                    buf += (1 - group["dampening"]) * g
                else:
                    buf += g
            if group["nesterov"]:             # d + mu b
                if g is tmp:
                    tmp += mu * buf
                else:
                    xp.multiply(buf, mu, out=tmp)
                    tmp += g
                g = tmp
            else:
                g = buf
        if lr == 1.0:
            p -= g
        else:
            xp.multiply(g, lr, out=tmp)
            p -= tmp


class Adam(Optimizer):
    """Adam (Kingma & Ba) as PyTorch computes it:

        m <- m + (1 - b1)(g - m);   v <- b2 v + (1 - b2) g^2
        p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    ``weight_decay`` is L2 (added to g); AdamW decays the weights instead.
    """

    state_keys = ("exp_avg", "exp_avg_sq")
    decoupled = False
    flat_capable = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"{type(self).__name__}: lr, eps and weight_decay must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"{type(self).__name__}: betas must lie in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _update(self, p, g, st, tmp, group):
        reference = lambda: self._update_reference(p, g, st, tmp, group)   # noqa: E731
        if _fused.mode(p) is None:
            return reference()
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        t = st["step"]
        _fused.adam(p, g, st["exp_avg"], st["exp_avg_sq"], l2=0.0 if self.decoupled else wd,
                    decay=1 - lr * wd if self.decoupled else 1.0, omb1=1 - b1, omb2=1 - b2, b2=b2,
                    inv_bc2=1 / math.sqrt(1 - b2 ** t), eps=eps, step_size=lr / (1 - b1 ** t),
                    reference=reference)

    def _update_reference(self, p, g, st, tmp, group):
        """The update as plain array ops: the reference of the fused kernel (optim/fused.py)."""
        xp = backend_of(p).xp
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        t = st["step"]
        m, v = st["exp_avg"], st["exp_avg_sq"]
        if wd and self.decoupled:
            p *= 1 - lr * wd                  # AdamW: decay the weights, not the gradient
        elif wd:
            g = g + wd * p                    # Adam: L2 penalty in the gradient
        xp.subtract(g, m, out=tmp)            # m <- m + (1 - b1)(g - m)
        tmp *= 1 - b1
        m += tmp
        xp.multiply(g, g, out=tmp)            # v <- b2 v + (1 - b2) g^2
        tmp *= 1 - b2
        v *= b2
        v += tmp
        step_size = lr / (1 - b1 ** t)
        xp.sqrt(v, out=tmp)                   # denominator sqrt(v) / sqrt(1 - b2^t) + eps
        tmp *= 1 / math.sqrt(1 - b2 ** t)
        tmp += eps
        xp.divide(m, tmp, out=tmp)
        tmp *= step_size
        p -= tmp


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p <- p (1 - lr wd) before the
    Adam update. PyTorch's default weight_decay of 0.01."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
