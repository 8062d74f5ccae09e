"""Module and Parameter: the containers that hold a model's weights.

A ``Module`` keeps three ordered dicts, filled by plain attribute assignment:
``_parameters`` (trainable ``Parameter`` tensors), ``_buffers`` (fixed arrays such as the random
Fourier features, saved with the weights but never trained) and ``_modules`` (sub-modules).
Registration order is the order of ``named_parameters()`` and of ``state_dict()``, so it is
deterministic (DeZero kept parameters in a set; we do not).

Names follow PyTorch's dotted paths ("conv1.weight", "embed.0.W"), so a state dict of the same
architecture moves between tinydiff and PyTorch with ``{k: v.numpy() for k, v in sd.items()}``.
"""
from __future__ import annotations

from collections import OrderedDict, namedtuple

import numpy as np

from ..backend import backend_of, get_backend
from ..tensor import Tensor


class Parameter(Tensor):
    """A trainable tensor: a leaf with ``requires_grad=True`` that a Module registers."""

    def __init__(self, data, requires_grad=True, dtype=None, backend=None):
        super().__init__(data, requires_grad=requires_grad, dtype=dtype, backend=backend)

    def __repr__(self):
        return "Parameter" + super().__repr__()[len("Tensor"):]


class StateDictError(RuntimeError):
    """A state dict that does not fit the module: missing, unexpected or mis-shaped keys."""


LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])


class Module:
    """Base class of every layer and model. Subclasses set attributes in ``__init__`` (after
    ``super().__init__()``) and write ``forward``; calling the module calls ``forward``."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_persistent", set())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # -- registration by assignment --
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"cannot assign {name!r} before Module.__init__() ran; call "
                                 f"super().__init__() first in {type(self).__name__}.__init__")
        for d in (self._parameters, self._modules):
            d.pop(name, None)
        if isinstance(value, Parameter):
            self.__dict__.pop(name, None)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self.__dict__.pop(name, None)
            self._modules[name] = value
        elif name in self._buffers:
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):   # only called when normal lookup fails
        for d in ("_parameters", "_buffers", "_modules"):
            table = self.__dict__.get(d)
            if table is not None and name in table:
                return table[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        for d in (self._parameters, self._buffers, self._modules):
            if name in d:
                del d[name]
                self._persistent.discard(name)
                return
        object.__delattr__(self, name)

    def register_buffer(self, name, array, persistent=True):
        """A fixed array (not trained) that moves with the module and, if persistent, is saved."""
        if array is not None and not hasattr(array, "shape"):
            raise TypeError(f"buffer {name!r} must be an array, got {type(array).__name__}")
        self.__dict__.pop(name, None)
        self._buffers[name] = array
        if persistent:
            self._persistent.add(name)

    def register_parameter(self, name, param):
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"register_parameter({name!r}): expected a Parameter, got {type(param).__name__}")
        self._parameters[name] = param

    def add_module(self, name, module):
        self._modules[name] = module

    # -- calling --
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # -- traversal (registration order, each object once) --
    def named_modules(self, prefix="", memo=None):
        memo = set() if memo is None else memo
        if id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, child in self._modules.items():
            if child is not None:
                yield from child.named_modules(f"{prefix}.{name}" if prefix else name, memo)

    def modules(self):
        return (m for _, m in self.named_modules())

    def named_children(self):
        return ((n, m) for n, m in self._modules.items() if m is not None)

    def children(self):
        return (m for _, m in self.named_children())

    def named_parameters(self, prefix="", recurse=True):
        """(dotted name, Parameter) pairs in registration order; a shared Parameter appears once."""
        seen = set()
        modules = self.named_modules(prefix) if recurse else [(prefix, self)]
        for mod_prefix, mod in modules:
            for name, p in mod._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mod_prefix}.{name}" if mod_prefix else name), p

    def parameters(self, recurse=True):
        return (p for _, p in self.named_parameters(recurse=recurse))

    def named_buffers(self, prefix="", recurse=True):
        modules = self.named_modules(prefix) if recurse else [(prefix, self)]
        for mod_prefix, mod in modules:
            for name, b in mod._buffers.items():
                if b is not None:
                    yield (f"{mod_prefix}.{name}" if mod_prefix else name), b

    def buffers(self, recurse=True):
        return (b for _, b in self.named_buffers(recurse=recurse))

    def num_parameters(self, trainable_only=False):
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- modes and gradients --
    def train(self, mode=True):
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    def requires_grad_(self, flag=True):
        """Freeze (False) or unfreeze (True) every parameter."""
        for p in self.parameters():
            p.requires_grad = flag
        return self

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def flatten_parameters(self):
        """Make every parameter a view into one flat buffer per (backend, dtype), and let the
        backward pass write their gradients into a second one, so that optimizers, the EMA and
        gradient clipping update all of them with a few whole-buffer ops (``tinydiff.nn.flat``).
        The values are unchanged; ``to``, ``load_state_dict`` and the EMA keep the views.
        Returns the FlatGroups (one per backend and dtype)."""
        from .flat import flatten
        return flatten(self.parameters())

    def _ensure_flat(self):
        """After parameter arrays were replaced: put flat parameters back into their buffers."""
        seen = set()
        for p in self.parameters():
            g = getattr(p, "_flat", None)
            if g is not None and id(g) not in seen:
                seen.add(id(g))
                g.ensure()

    # -- moving and casting --
    def _apply(self, fn):
        """Replace every parameter's and buffer's array by ``fn(array)``, in place, keeping the
        Parameter objects (an optimizer holding them keeps working) and flat buffers flat."""
        for m in self.modules():
            for p in m._parameters.values():
                if p is not None:
                    p.data = fn(p.data)
                    if p.grad is not None:
                        p.grad = fn(p.grad)
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = fn(b)
        self._ensure_flat()
        return self

    def to(self, backend=None, dtype=None):
        """Move every parameter and buffer to ``backend`` ("numpy", "strict", "cupy") and/or cast
        floating-point ones to ``dtype``; in place, returns self."""
        target = None if backend is None else get_backend(backend)
        dtype = None if dtype is None else np.dtype(dtype)

        def convert(a):
            if target is not None and not target.owns(a):
                a = target.asarray(backend_of(a).to_host(a))
            if dtype is not None and np.issubdtype(a.dtype, np.floating) and a.dtype != dtype:
                a = a.astype(dtype)
            return a
        return self._apply(convert)

    def astype(self, dtype):
        return self.to(dtype=dtype)

    @property
    def backend(self):
        """The backend of the first parameter (or buffer); numpy for an empty module."""
        for a in list(p.data for p in self.parameters()) + list(self.buffers()):
            return backend_of(a)
        return get_backend("numpy")

    # -- state dicts --
    def state_dict(self):
        """An ordered dict of dotted name -> NumPy host copy, parameters then persistent buffers
        of each module in registration order."""
        out = OrderedDict()
        for prefix, m in self.named_modules():
            for name, p in m._parameters.items():
                if p is not None:
                    out[f"{prefix}.{name}" if prefix else name] = p.numpy().copy()
            for name, b in m._buffers.items():
                if b is not None and name in m._persistent:
                    out[f"{prefix}.{name}" if prefix else name] = np.array(backend_of(b).to_host(b))
        return out

    def _state_targets(self):
        """name -> (module, attribute, is_parameter) for every entry of state_dict()."""
        out = OrderedDict()
        for prefix, m in self.named_modules():
            for name, p in m._parameters.items():
                if p is not None:
                    out[f"{prefix}.{name}" if prefix else name] = (m, name, True)
            for name, b in m._buffers.items():
                if b is not None and name in m._persistent:
                    out[f"{prefix}.{name}" if prefix else name] = (m, name, False)
        return out

    def load_state_dict(self, state_dict, strict=True):
        """Copy values from ``state_dict`` (name -> array, host or device) into this module,
        keeping each parameter's backend and dtype.

        With ``strict=True`` missing or unexpected keys raise StateDictError; mis-shaped entries
        always do. Returns (missing_keys, unexpected_keys).
        """
        targets = self._state_targets()
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in targets]
        misshaped = []
        for k, (m, name, is_param) in targets.items():
            if k in state_dict:
                current = m._parameters[name].data if is_param else m._buffers[name]
                if tuple(state_dict[k].shape) != tuple(current.shape):
                    misshaped.append(f"{k}: checkpoint {tuple(state_dict[k].shape)}, "
                                     f"model {tuple(current.shape)}")
        problems = []
        if misshaped:
            problems.append("mis-shaped keys: " + "; ".join(misshaped))
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if problems:
            raise StateDictError(
                f"load_state_dict into {type(self).__name__} failed: " + " | ".join(problems) +
                ". Check that the checkpoint was saved from the same architecture (channels, "
                "embed_dim, num_classes), or pass strict=False to skip missing/unexpected keys.")
        for k, (m, name, is_param) in targets.items():
            if k not in state_dict:
                continue
            current = m._parameters[name].data if is_param else m._buffers[name]
            value = state_dict[k]
            b = backend_of(current)
            if not isinstance(value, np.ndarray) and not b.owns(value):
                value = backend_of(value).to_host(value)
            value = b.asarray(value).astype(current.dtype, copy=True)   # never alias the caller's array
            if is_param:
                m._parameters[name].data = value
            else:
                m._buffers[name] = value
        self._ensure_flat()          # flat parameters: the values go into their views
        return LoadResult(missing, unexpected)

    def save(self, path):
        """Write ``state_dict()`` to ``path`` as an uncompressed .npz (exact round trip)."""
        sd = self.state_dict()
        with open(path, "wb") as f:   # a file object: numpy would otherwise append ".npz"
            np.savez(f, **sd)
        return path

    def load(self, path, strict=True):
        """Load weights saved by ``save`` (or any .npz of name -> array)."""
        with np.load(path, allow_pickle=False) as data:
            sd = OrderedDict((k, data[k]) for k in data.files)
        return self.load_state_dict(sd, strict=strict)

    # -- printing --
    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        children = list(self.named_children())
        if not children:
            return lines[0] + ")"
        for name, child in children:
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + "\n)"


class Sequential(Module):
    """Modules applied one after another; children are named "0", "1", ... as in PyTorch."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], (dict, OrderedDict)):
            for name, m in modules[0].items():
                self.add_module(name, m)
        else:
            for i, m in enumerate(modules):
                self.add_module(str(i), m)

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def __getitem__(self, i):
        mods = list(self._modules.values())
        return Sequential(*mods[i]) if isinstance(i, slice) else mods[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def append(self, module):
        self.add_module(str(len(self._modules)), module)
        return self


class ModuleList(Module):
    """A list of modules whose parameters are registered ("0.weight", "1.weight", ...)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList holds Modules, got {type(module).__name__}")
        self.add_module(str(len(self._modules)), module)
        return self

    def extend(self, modules):
        for m in modules:
            self.append(m)
        return self

    def __getitem__(self, i):
        mods = list(self._modules.values())
        return ModuleList(mods[i]) if isinstance(i, slice) else mods[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, *args, **kwargs):
        raise NotImplementedError("ModuleList is a container; iterate over it in your forward()")
