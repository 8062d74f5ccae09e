"""Optimizers, learning-rate schedules and training helpers (gradient clipping, EMA)."""
from .helpers import EMA, clip_grad_norm_, grad_norm
from .optimizers import SGD, Adam, AdamW, Optimizer
from .schedules import (LRScheduler, Schedule, constant, cosine, cosine_then_constant, linear_warmup,
                        sequential, warmup_then)

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "LRScheduler", "Schedule", "constant", "cosine",
           "linear_warmup", "sequential", "warmup_then", "cosine_then_constant", "clip_grad_norm_",
           "grad_norm", "EMA"]
