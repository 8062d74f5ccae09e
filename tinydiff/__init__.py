"""tinydiff: score-based diffusion models from scratch, on NumPy (CPU) or CuPy (GPU)."""
from .backend import (BackendError, available_backends, backend_of, get_array_module, get_backend,
                      probe_cupy)
from .gradcheck import GradcheckError, gradcheck
from .tensor import (Function, ShapeError, Tensor, abs, broadcast_to, clip, concat, exp, grad,
                     is_grad_enabled, log, log_softmax, logsumexp, matmul, max, mean, no_grad, pad,
                     permute, relu, reshape, sigmoid, silu, softmax, sqrt, stack, sum, tanh, tensor,
                     transpose, var, where)

__version__ = "0.1.0"
