"""Layers: each forward with its hand-written backward right below it.

- `core`: the layer contract (`Module`), Embedding, Flatten, FlattenConsecutive, Linear, TiedLinear,
  Tanh, ItemLayout (where the items lie in rows of ids), PositionEmbedding, GELU (tanh approximation), Dropout, Sequential, Residual, and the helpers that
  lay parameters into one tensor;
- `norm`: BatchNorm1d, LayerNorm and their stepwise forms;
- `attention`: causal multi-head self-attention, fused and stepwise;
- `recurrent`: the RNN, GRU and LSTM cells, and Recurrent, a cell run over a sequence (backpropagation
  through time);
- `tables`: the fused table layers the compiled step runs;
- `blocks`: RecomputingSequential, a Sequential whose cheap layers' outputs (LayerNorm, GELU) are
  recomputed in the backward rather than kept (the transformer's blocks).
"""
from .attention import CausalSelfAttention, CausalSelfAttentionStepwise
from .blocks import RecomputingSequential
from .core import (GELU, PAD_MIN_ROWS, Dropout, Embedding, Flatten, FlattenConsecutive, ItemLayout, Linear, Module,
                   PositionEmbedding, Residual, Sequential, Tanh, TiedLinear, output_padding, packed, views_like, zero_all)
from .norm import BatchNorm1d, BatchNorm1dStepwise, LayerNorm, LayerNormStepwise
from .recurrent import GRUCell, LSTMCell, Recurrent, RecurrentCell, RNNCell
from .tables import EmbeddingLinear, EmbeddingLinearBatchNormTanh

__all__ = ["GELU", "PAD_MIN_ROWS", "BatchNorm1d", "BatchNorm1dStepwise", "CausalSelfAttention",
           "CausalSelfAttentionStepwise", "Dropout", "Embedding", "EmbeddingLinear", "EmbeddingLinearBatchNormTanh",
           "Flatten", "FlattenConsecutive", "ItemLayout", "LayerNorm", "LayerNormStepwise", "Linear", "Module", "PositionEmbedding",
           "RecomputingSequential", "Residual", "Sequential", "Tanh", "TiedLinear", "output_padding", "packed", "views_like", "zero_all",
           "GRUCell", "LSTMCell", "Recurrent", "RecurrentCell", "RNNCell"]
