"""Checking backward against finite differences.

For a function f of tensors and a random cotangent v, backward gives the vector-Jacobian product
v^T J. Central differences of the scalar L(x) = <v, f(x)> give the same thing numerically:

    dL/dx_i ~ (L(x + h e_i) - L(x - h e_i)) / 2h            ("full": every element)
    <dL/dx, u> ~ (L(x + h u) - L(x - h u)) / 2h               ("directional": one random u)

The full check pinpoints the element that disagrees; the directional one costs two evaluations
per input whatever its size, so it scales to whole convolutions. Both run in float64.
"""
from __future__ import annotations

import numpy as np

from .tensor import Tensor, _backward, no_grad


class GradcheckError(AssertionError):
    pass


@no_grad()
def _loss(fn, arrays, v, like):
    """L(x) = <v, fn(x)> for host arrays x, evaluated on the inputs' backend."""
    out = fn(*[Tensor(like[i].backend.asarray(a)) for i, a in enumerate(arrays)])
    return float(np.sum(out.numpy().astype(np.float64) * v))


def gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, mode="full", seed=0, check=None):
    """Compare ``fn``'s backward with central differences; raise GradcheckError on a mismatch.

    Args:
        fn: a function of the tensors in ``inputs`` that returns one tensor.
        inputs: tensors (float64 recommended); those with ``requires_grad`` are checked.
        mode: "full" perturbs every element; "directional" checks along random directions.
        check: indices of the inputs to check (default: every input that requires grad).
    Returns:
        True, so it can sit in an assert.
    """
    inputs = list(inputs)
    rng = np.random.default_rng(seed)
    check = [i for i, t in enumerate(inputs) if t.requires_grad] if check is None else list(check)
    if not check:
        raise ValueError("gradcheck: no input requires grad")
    if mode not in ("full", "directional"):
        raise ValueError(f"gradcheck: mode must be 'full' or 'directional', got {mode!r}")
    for i in check:
        if not inputs[i].requires_grad:
            raise ValueError(f"gradcheck: input {i} is to be checked but does not require grad")
        if inputs[i].dtype != np.float64:
            raise ValueError(f"gradcheck: input {i} is {inputs[i].dtype}; use float64 inputs "
                             "(finite differences in float32 are too noisy to check anything)")
    out = fn(*inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: fn must return one Tensor, got {type(out).__name__}")
    v = rng.standard_normal(out.shape)
    analytic = _backward(out, out.backend.asarray(v.astype(out.dtype)), retain_graph=False,
                         accumulate=False, wanted=[inputs[i] for i in check])
    host = [t.numpy().copy() for t in inputs]      # inputs not checked keep their dtype (indices)
    for k, i in enumerate(check):
        a = np.zeros(inputs[i].shape) if analytic[k] is None else inputs[i].backend.to_host(analytic[k])
        if mode == "full":
            numeric = np.zeros_like(host[i])
            flat = host[i].reshape(-1)
            nflat = numeric.reshape(-1)
            for j in range(flat.size):
                old = flat[j]
                flat[j] = old + eps
                up = _loss(fn, host, v, inputs)
                flat[j] = old - eps
                down = _loss(fn, host, v, inputs)
                flat[j] = old
                nflat[j] = (up - down) / (2 * eps)
            bad = ~np.isclose(a, numeric, atol=atol, rtol=rtol)
            if bad.any():
                where = tuple(int(w[0]) for w in np.nonzero(bad))
                raise GradcheckError(
                    f"gradcheck: input {i} (shape {inputs[i].shape}): {int(bad.sum())} of {bad.size} "
                    f"gradient entries disagree; first at index {where}: backward gives "
                    f"{a[where]:.8g}, finite differences {numeric[where]:.8g}; "
                    f"max abs error {np.max(np.abs(a - numeric)):.3g}")
        else:
            for trial in range(3):
                u = rng.standard_normal(host[i].shape)
                shifted = [h.copy() for h in host]
                shifted[i] = host[i] + eps * u
                up = _loss(fn, shifted, v, inputs)
                shifted[i] = host[i] - eps * u
                down = _loss(fn, shifted, v, inputs)
                numeric = (up - down) / (2 * eps)
                analytic_dir = float(np.sum(a * u))
                if not np.isclose(analytic_dir, numeric, atol=atol * max(1.0, np.sqrt(u.size)), rtol=rtol):
                    raise GradcheckError(
                        f"gradcheck: input {i} (shape {inputs[i].shape}), direction {trial}: "
                        f"backward gives <grad, u> = {analytic_dir:.10g}, finite differences "
                        f"{numeric:.10g} (difference {analytic_dir - numeric:.3g})")
    return True
