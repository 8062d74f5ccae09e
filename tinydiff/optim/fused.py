"""Fused CuPy kernels for the Adam/AdamW update and the EMA step: OFF by default.

No GPU has run these kernels yet, so nothing uses them unless ``TINYDIFF_FUSED=1`` is set (or
``ENABLED = True``). Each has its plain array implementation beside it, the reference (in
``optimizers.Adam._update_reference`` and ``helpers._ema_step_reference``):

- on CuPy, with the switch on, one ``cupy.ElementwiseKernel`` launch replaces the reference's 13
  (Adam; 14 for AdamW) or 3 (EMA) launches over the same arrays, with the same operations in the
  same order (nvcc may contract a multiply and an add into one FMA, so the last bit can differ);
  ``tests/test_fused.py`` compares the two when a GPU is present;
- on the strict stand-in, with the switch on, the reference runs inside
  ``strict_cupy.one_launch``, so launch counts show what the kernel would cost;
- on NumPy the reference always runs.
"""
from __future__ import annotations

import os

ENABLED = os.environ.get("TINYDIFF_FUSED", "0") == "1"

_ADAM_CODE = """
T gr = g;
if (l2 != (T)0) { T wp = l2 * p; gr = g + wp; }
p = p * decay;
T d = gr - m; d = d * omb1; m = m + d;
T sq = gr * gr; sq = sq * omb2; v = v * b2; v = v + sq;
T den = sqrt(v); den = den * inv_bc2; den = den + eps;
T upd = m / den; upd = upd * step_size; p = p - upd;
"""

_EMA_CODE = "T t = s - p; t = t * omd; s = s - t;"

_kernels = {}


def _kernel(name):
    if name not in _kernels:
        import cupy
        if name == "adam":
            _kernels[name] = cupy.ElementwiseKernel(
                "T g, T l2, T decay, T omb1, T omb2, T b2, T inv_bc2, T eps, T step_size",
                "T p, T m, T v", _ADAM_CODE, "tinydiff_adam")
        else:
            _kernels[name] = cupy.ElementwiseKernel("T p, T omd", "T s", _EMA_CODE, "tinydiff_ema")
    return _kernels[name]


def mode(array):
    """"kernel" (CuPy, switched on), "counted" (the stand-in, switched on) or None."""
    if not ENABLED:
        return None
    module = type(array).__module__
    if module.startswith("cupy"):
        return "kernel"
    if module.startswith("tinydiff.testing"):
        return "counted"
    return None


def adam(p, g, m, v, *, l2, decay, omb1, omb2, b2, inv_bc2, eps, step_size, reference):
    """One fused Adam/AdamW update of p, m, v in place (see the module docstring)."""
    how = mode(p)
    if how == "kernel":
        dt = p.dtype.type
        _kernel("adam")(g, dt(l2), dt(decay), dt(omb1), dt(omb2), dt(b2), dt(inv_bc2), dt(eps),
                        dt(step_size), p, m, v)
        return
    from ..testing import strict_cupy
    with strict_cupy.one_launch("adam"):
        reference()


def ema(s, p, omd, reference):
    """One fused EMA step s <- s - (1 - d)(s - p) in place."""
    if mode(s) == "kernel":
        _kernel("ema")(p, s.dtype.type(omd), s)
        return
    from ..testing import strict_cupy
    with strict_cupy.one_launch("ema"):
        reference()
