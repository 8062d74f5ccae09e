"""Flat parameter buffers: every parameter a view into one buffer, every gradient into another.

    groups = model.flatten_parameters()    # one FlatGroup per (backend, dtype); usually one

A training step updates each parameter with a dozen elementwise ops (Adam), three more for the
EMA, one or two for the gradient norm and clipping. Done per parameter array that is a dozen
kernel launches per array on a GPU (about 500 for Adam over the ScoreNet's 39 arrays); done once
over a buffer that holds all of them it is a dozen in all ("multi-tensor" updates). So the
parameters become views into one flat buffer, and their gradients views into a second one:

- ``p.data`` is ``group.data[offset:offset + size].reshape(shape)``; the backward pass writes a
  leaf's gradient straight into its slot, ``group.grad[offset:...]`` (the one copy it always
  made, ``g.copy()``, now lands there), and ``p.grad`` is that slot;
- the optimizers, the EMA, ``clip_grad_norm_`` and the Trainer's gradient norm see that a
  group's parameters all have their gradients in place and run their update once over
  ``group.data`` and ``group.grad`` (the per-parameter code stays beside it as the reference: the
  same ops elementwise, so the same bits);
- anything that replaces ``p.data`` (``Module.to``, ``load_state_dict``, a user's ``p.data = ...``)
  is followed by ``ensure()``, which copies the new values into the view and puts the view back
  (``Module.to`` and ``load_state_dict`` call it themselves; the flat updates call it first);
  moving the model to another backend or dtype rebuilds the buffers there.

Holding on to a gradient across steps needs a copy: the next backward pass writes into the same
slot (``zero_grad`` sets ``p.grad = None`` and leaves the buffer as it is).
"""
from __future__ import annotations

import numpy as np

from ..backend import backend_of


class FlatGroup:
    """Parameters of one backend and dtype as views into ``data``; their gradients' slots in
    ``grad``. ``offsets[i]``, ``sizes[i]``, ``shapes[i]`` place parameter i."""

    def __init__(self, params):
        self.params = list(params)
        if not self.params:
            raise ValueError("FlatGroup: no parameters")
        self.shapes = [tuple(p.shape) for p in self.params]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.offsets = list(np.cumsum([0] + self.sizes[:-1]).tolist())
        self.size = int(sum(self.sizes))
        self._build()

    def __repr__(self):
        return (f"FlatGroup({len(self.params)} parameters, {self.size:,} elements, "
                f"{self.dtype}, {backend_of(self.data).name})")

    dtype = property(lambda self: self.data.dtype)
    backend = property(lambda self: backend_of(self.data))

    def views_of(self, flat):
        """The parameters' views into any flat array of this layout (state, shadow, scratch)."""
        return [flat[o:o + n].reshape(s) for o, n, s in zip(self.offsets, self.sizes, self.shapes)]

    def _build(self):
        """(Re)make both buffers on the parameters' current backend and dtype, from their values."""
        first = self.params[0].data
        xp = backend_of(first).xp
        self.data = xp.empty((self.size,), dtype=first.dtype)
        self.grad = xp.empty((self.size,), dtype=first.dtype)
        self.views = self.views_of(self.data)
        self.grad_views = self.views_of(self.grad)
        for p, v, gv in zip(self.params, self.views, self.grad_views):
            v[...] = p.data
            p.data = v
            p._flat = self
            p._grad_view = gv
            if p.grad is not None:
                gv[...] = p.grad
                p.grad = gv

    def intact(self):
        return all(p.data is v for p, v in zip(self.params, self.views))

    def ensure(self):
        """Put the views back after something replaced parameter arrays: copy the new values in
        (one copy each), or rebuild both buffers when the backend or dtype changed. A gradient
        that is not in its slot is copied there too. Returns self, or None when the parameters
        no longer fit one buffer (another shape, or mixed backends): then they are left as they
        are, no longer flat."""
        if self.intact():
            return self
        like = self.data
        arrays = [p.data for p in self.params]
        if any(tuple(a.shape) != s for a, s in zip(arrays, self.shapes)):
            self.dissolve()
            return None
        backends = {backend_of(a).name for a in arrays}
        dtypes = {np.dtype(a.dtype) for a in arrays}
        if len(backends) > 1 or len(dtypes) > 1:
            self.dissolve()
            return None
        if backends != {backend_of(like).name} or dtypes != {np.dtype(like.dtype)}:
            self._build()                  # moved or cast as a whole: new buffers there
            return self
        for i, (p, v, gv) in enumerate(zip(self.params, self.views, self.grad_views)):
            if p.data is not v:
                v[...] = p.data
                p.data = v
            if p.grad is not None and p.grad is not gv and backend_of(p.grad).owns(gv) \
                    and tuple(p.grad.shape) == self.shapes[i]:
                gv[...] = p.grad
                p.grad = gv
        return self

    def grads_ready(self):
        """True when every parameter's gradient is its slot of ``grad`` (what the backward pass
        leaves after zero_grad), so whole-buffer updates see every gradient."""
        return all(p.grad is gv for p, gv in zip(self.params, self.grad_views))

    def dissolve(self):
        """Stop being flat: parameters keep their current arrays (no longer views)."""
        for p in self.params:
            if getattr(p, "_flat", None) is self:
                p._flat = None
                p._grad_view = None


def flatten(params):
    """Views of ``params`` (an iterable of Parameters) into one FlatGroup per (backend, dtype);
    returns the groups. Parameters already in a group that holds exactly them are left there."""
    params = list(dict.fromkeys(params))          # in order, each once
    groups = {}
    for p in params:
        groups.setdefault((backend_of(p.data).name, np.dtype(p.dtype)), []).append(p)
    out = []
    for members in groups.values():
        existing = {id(getattr(p, "_flat", None)) for p in members}
        g = getattr(members[0], "_flat", None)
        if len(existing) == 1 and g is not None and len(g.params) == len(members) \
                and all(a is b for a, b in zip(g.params, members)):
            out.append(g.ensure() or FlatGroup(members))
            continue
        for p in members:
            old = getattr(p, "_flat", None)
            if old is not None:
                old.dissolve()
        out.append(FlatGroup(members))
    return out


def groups_of(params, grads=True):
    """(groups, rest): the FlatGroups whose parameters are all among ``params`` (each
    ``ensure()``-d first; with ``grads``, only groups with every gradient in its slot), and the
    other parameters of ``params`` (with ``grads``: those with a gradient), for the
    per-parameter path."""
    params = [p for p in params if p.grad is not None or not grads]
    ids = {id(p) for p in params}
    groups, seen = [], set()
    for p in params:
        g = getattr(p, "_flat", None)
        if g is None or id(g) in seen:
            continue
        seen.add(id(g))
        if all(id(q) in ids for q in g.params):
            g = g.ensure()
            if g is not None and (not grads or g.grads_ready()):
                groups.append(g)
    covered = {id(q) for g in groups for q in g.params}
    return groups, [p for p in params if id(p) not in covered]


def adopt(arrays, views):
    """Make ``arrays[i]`` be ``views[i]`` (a list, changed in place): an entry that is another
    array is copied into its view first (on the view's backend, in its dtype)."""
    for i, (a, v) in enumerate(zip(arrays, views)):
        if a is v:
            continue
        if a is not None:
            b = backend_of(v)
            v[...] = a if b.owns(a) else b.asarray(backend_of(a).to_host(a))
        arrays[i] = v
    return arrays
