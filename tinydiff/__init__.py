"""tinydiff: score-based diffusion models from scratch, on NumPy (CPU) or CuPy (GPU)."""
from .backend import (BackendError, available_backends, backend_of, get_array_module, get_backend,
                      probe_cupy)
from .gradcheck import GradcheckError, gradcheck
from .ops import (abs, broadcast_to, clip, concat, exp, log, log_softmax, logsumexp, matmul, max,
                  mean, min, pad, permute, relu, reshape, sigmoid, silu, softmax, sqrt, stack, sum,
                  tanh, tensor, transpose, var, where)
from .tensor import Function, ShapeError, Tensor, grad, is_grad_enabled, no_grad, unbroadcast

__version__ = "0.1.0"

# The layers built on the engine, importable as td.nn, td.optim, td.models, td.sde, td.sampling.
from . import nn, optim, models, sde, sampling  # noqa: E402
