"""Layers: each forward with its hand-written backward right below it.

- `core`: the layer contract (`Module`), Embedding, Flatten, FlattenConsecutive, Linear, TiedLinear,
  Tanh, Sequential, Residual, and the helpers that lay parameters into one tensor;
- `norm`: BatchNorm1d and its stepwise form;
- `tables`: the fused table layers the compiled step runs.
"""
from .core import (PAD_MIN_ROWS, Embedding, Flatten, FlattenConsecutive, Linear, Module, Residual, Sequential, Tanh,
                   TiedLinear, output_padding, packed, views_like, zero_all)
from .norm import BatchNorm1d, BatchNorm1dStepwise
from .tables import EmbeddingLinear, EmbeddingLinearBatchNormTanh

__all__ = ["PAD_MIN_ROWS", "BatchNorm1d", "BatchNorm1dStepwise", "Embedding", "EmbeddingLinear",
           "EmbeddingLinearBatchNormTanh", "Flatten", "FlattenConsecutive", "Linear", "Module", "Residual", "Sequential",
           "Tanh", "TiedLinear", "output_padding", "packed", "views_like", "zero_all"]
