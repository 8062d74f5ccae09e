"""Neural-network building blocks: functional ops (``tinydiff.nn.functional``, helper B's fused
ops), Module/Parameter, layers with PyTorch's default initialisations, and seeding."""
from . import functional
from . import init
from .init import manual_seed
from .layers import (GELU, AvgPool2d, Conv2d, ConvTranspose2d, Dropout, Embedding, Flatten, GroupNorm,
                     Identity, LayerNorm, Linear, ReLU, SelfAttention2d, SiLU, Upsample, cat)
from .module import LoadResult, Module, ModuleList, Parameter, Sequential, StateDictError

__all__ = ["functional", "init", "manual_seed", "Module", "Parameter", "Sequential", "ModuleList",
           "StateDictError", "LoadResult", "Identity", "Linear", "Conv2d", "ConvTranspose2d",
           "GroupNorm", "LayerNorm", "Embedding", "Dropout", "SiLU", "ReLU", "GELU", "Flatten",
           "AvgPool2d", "Upsample", "SelfAttention2d", "cat"]
