"""Models: named layers in a Sequential, then the loss. The model's backward is
the loss's backward followed by the layers' backward in reverse.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from .data import IGNORE
from .errors import HandgradError
from .layers import (
    GELU,
    BatchNorm1d,
    BatchNorm1dStepwise,
    CausalSelfAttention,
    CausalSelfAttentionStepwise,
    Dropout,
    Embedding,
    Flatten,
    FlattenConsecutive,
    GRUCell,
    ItemLayout,
    LayerNorm,
    LayerNormStepwise,
    Linear,
    LSTMCell,
    PositionEmbedding,
    RecomputingSequential,
    Recurrent,
    Residual,
    RNNCell,
    Sequential,
    Tanh,
    TiedLinear,
)
from .loss import CrossEntropy, CrossEntropyStepwise


@dataclass
class ModelConfig:
    model: str = "mlp"
    vocab_size: int = 27
    block_size: int = 3
    n_embd: int = 10
    n_hidden: int = 200
    n_layers: int = 1
    n_heads: int = 4  # attention heads of the transformer
    # the transformer's and recurrent models' dropout probability, after the embedding and after each
    # attention, MLP or recurrent layer (in training only); 0: no Dropout layers at all
    dropout: float = 0.0
    attn_dropout: float = 0.0  # the transformer's dropout of attention weights (in training only)
    tie_weights: bool = False  # the transformer's output layer projects onto the token table (TiedLinear)
    stepwise: bool = False  # stepwise forms (BatchNorm, cross-entropy, ...): every intermediate inspectable
    # a model of whole items (data.make_sequence_dataset): (batch, positions) ids in, a prediction at every
    # position out, the padding's targets ignored; else a model of one context (block_size ids) per example
    sequences: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise HandgradError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**d)


class Model:
    """Layers, loss, and the gradient buffers that the optimizer reads."""

    def __init__(self, config: ModelConfig, net: Sequential):
        self.config = config
        self.net = net
        loss = CrossEntropyStepwise if config.stepwise else CrossEntropy
        self.loss_fn = loss(ignore_index=IGNORE if config.sequences else None)

    @property
    def sequences(self) -> bool:
        """A model of whole items, predicting at every position (data.make_sequence_dataset's rows)."""
        return self.config.sequences

    def forward(self, idx, targets=None):
        """Logits for `idx`; with `targets`, the mean cross-entropy loss instead."""
        logits = self.net.forward(idx)
        if targets is None:
            return logits
        return self.loss_fn.forward(logits, targets)

    def backward(self, dloss: float = 1.0, after_layer=None) -> None:
        """Accumulate d loss / d parameter into the gradient buffers, for the last forward (times `dloss`);
        `after_layer(name)`, where given, is told as each top-level layer's backward is done."""
        self.net.backward(self.loss_fn.backward(dloss), after_layer)

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """Each parameter tensor once, by its first name: a layer used twice, or weights tied between
        layers, is one parameter (with one gradient buffer, which every use's backward adds into)."""
        return list(self.net.named_parameters())

    def parameters(self) -> list[torch.Tensor]:
        return [p for _, p in self.net.named_parameters()]

    def grads(self) -> list[torch.Tensor]:
        """Gradient buffers, in the order of `parameters()`."""
        return [g for _, g in self.net.named_grads()]

    def named_buffers(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.net.named_buffers())

    def named_intermediates(self) -> dict[str, torch.Tensor]:
        out = dict(self.net.named_intermediates())
        out.update(self.loss_fn.named_intermediates("loss."))
        return out

    def named_intermediate_grads(self) -> dict[str, torch.Tensor]:
        out = dict(self.net.named_intermediate_grads())
        out.update(self.loss_fn.named_intermediate_grads("loss."))
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def zero_grad(self) -> None:
        self.net.zero_grad()

    def clear_saved(self) -> None:
        self.net.clear_saved()
        self.loss_fn.clear_saved()

    def train(self, mode: bool = True) -> "Model":
        self.net.train(mode)
        self.loss_fn.train(mode)
        return self

    def eval(self) -> "Model":
        return self.train(False)

    @property
    def training(self) -> bool:
        return self.net.training

    def to(self, device=None, dtype=None) -> "Model":
        """Move the model; its parameters end up as views of one tensor, `param_buffer`, and its
        gradient buffers as views of another, `grad_buffer` (`Sequential.flatten`)."""
        self.net.to(device, dtype)
        self.net.flatten()
        return self

    @property
    def param_buffer(self) -> torch.Tensor | None:
        """Every parameter, where `to` has put them in one tensor."""
        return self.net.param_buffer

    @property
    def grad_buffer(self) -> torch.Tensor | None:
        """Every gradient buffer, where `to` has put them in one tensor."""
        return self.net.grad_buffer

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers (BatchNorm running statistics) by name, each tensor once (tied
        weights under their first name)."""
        return dict(self.named_parameters()) | dict(self.named_buffers())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise HandgradError(
                "weights do not match the model config"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; unexpected: {', '.join(unexpected)}" if unexpected else "")
            )
        for name, t in own.items():
            if tuple(state[name].shape) != tuple(t.shape):
                raise HandgradError(
                    f"weights do not match the model config: {name} has shape "
                    f"{tuple(state[name].shape)}, the config needs {tuple(t.shape)}"
                )
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(state[name])


def build_mlp(c: ModelConfig) -> Sequential:
    """The seed notebook's MLP, drawn in the order of its get_params: C, w1, w2, b2."""
    bn = BatchNorm1dStepwise if c.stepwise else BatchNorm1d
    emb = Embedding(c.vocab_size, c.n_embd)
    linear1 = Linear(c.n_embd * c.block_size, c.n_hidden, bias=False)
    # 5/3 is tanh's gain; the extra 0.1 makes the first predictions nearly uniform
    linear2 = Linear(c.n_hidden, c.vocab_size, gain=5 / 3)
    linear2.params["weight"].mul_(0.1)
    linear2.params["bias"].copy_(torch.randn(c.vocab_size) * 0)  # the seed's b2 draws, then zeroes
    return Sequential([
        ("embedding", emb),
        ("flatten", Flatten()),
        ("linear1", linear1),
        ("batchnorm1", bn(c.n_hidden)),
        ("tanh1", Tanh()),
        ("linear2", linear2),
    ])


# Initialisation of the deeper models: Kaiming for tanh, weights ~ N(0, 1) * (5/3) / sqrt(fan_in),
# so each Linear keeps its output variance near its input's and tanh's 5/3 gain undoes its squashing;
# BatchNorm after each Linear then fixes the scale exactly, and the output layer is scaled by 0.1 so the
# first predictions are nearly uniform (loss near ln(vocab_size)) instead of confidently wrong.
TANH_GAIN = 5 / 3


def hidden_block(i: int, fan_in: int, c: ModelConfig) -> list[tuple[str, object]]:
    """Linear -> BatchNorm -> Tanh, named with the block number (linear1, batchnorm1, tanh1, ...)."""
    bn = BatchNorm1dStepwise if c.stepwise else BatchNorm1d
    return [
        (f"linear{i}", Linear(fan_in, c.n_hidden, bias=False, gain=TANH_GAIN)),  # BatchNorm's shift makes a bias redundant
        (f"batchnorm{i}", bn(c.n_hidden)),
        (f"tanh{i}", Tanh()),
    ]


def output_layer(c: ModelConfig) -> Linear:
    out = Linear(c.n_hidden, c.vocab_size)
    out.params["weight"].mul_(0.1)
    return out


def build_deep_mlp(c: ModelConfig) -> Sequential:
    """The context's embeddings concatenated, then n_layers Linear -> BatchNorm -> Tanh blocks."""
    layers = [("embedding", Embedding(c.vocab_size, c.n_embd)), ("flatten", Flatten())]
    fan_in = c.n_embd * c.block_size
    for i in range(1, c.n_layers + 1):
        layers += hidden_block(i, fan_in, c)
        fan_in = c.n_hidden
    layers.append((f"linear{c.n_layers + 1}", output_layer(c)))
    return Sequential(layers)


def build_wavenet(c: ModelConfig) -> Sequential:
    """Hierarchical: pairs of neighbouring time steps are fused n_layers times, 2^n_layers -> 1."""
    if c.block_size != 2**c.n_layers:
        raise HandgradError(
            f"wavenet fuses pairs of time steps n_layers times, so block_size must be 2^n_layers: "
            f"n_layers {c.n_layers} needs block_size {2**c.n_layers}, got {c.block_size}"
        )
    layers = [("embedding", Embedding(c.vocab_size, c.n_embd))]
    fan_in = c.n_embd
    for i in range(1, c.n_layers + 1):
        layers.append((f"flatten{i}", FlattenConsecutive(2)))
        layers += hidden_block(i, 2 * fan_in, c)
        fan_in = c.n_hidden
    layers.append((f"linear{c.n_layers + 1}", output_layer(c)))
    return Sequential(layers)


def dropout_layers(c: ModelConfig):
    """`dropout(name)`: a Dropout of `c.dropout` under that name, as a list of (name, layer) to splice
    into a Sequential's layers; an empty list where the model has no dropout (0)."""

    def dropout(name: str) -> list[tuple[str, Dropout]]:
        return [(name, Dropout(c.dropout))] if c.dropout > 0 else []

    return dropout


def build_recurrent(c: ModelConfig) -> Sequential:
    """Embedding -> n_layers recurrent layers (the cell of `c.model`, a learned initial state) -> output
    Linear, predicting the next token at every position. The cells draw their weights as torch's do,
    U(-1/sqrt(H), 1/sqrt(H)); the output layer is scaled by 0.1, so the first predictions are nearly
    uniform. With `c.dropout` > 0, a Dropout after the embedding and after each recurrent layer (so on the
    inputs of every recurrent layer and of the output layer, never on the state carried between steps)."""
    cell = {"rnn": RNNCell, "gru": GRUCell, "lstm": LSTMCell}[c.model]
    dropout = dropout_layers(c)
    layers = [("embedding", Embedding(c.vocab_size, c.n_embd)), *dropout("dropout0")]
    fan_in = c.n_embd
    for i in range(1, c.n_layers + 1):
        layers += [(f"{c.model}{i}", Recurrent(cell(fan_in, c.n_hidden))), *dropout(f"dropout{i}")]
        fan_in = c.n_hidden
    layers.append(("output", output_layer(c)))
    return Sequential(layers)


def build_transformer(c: ModelConfig) -> Sequential:
    """An item layout (where each item starts in a row of ids: a row may hold one item and its padding,
    or several items, `data.pack_batch`), token and position embeddings (each token's place in its
    item), then n_layers blocks of [x + attention(LayerNorm(x))] and
    [x + MLP(LayerNorm(x))] (the MLP n_embd -> n_hidden -> GELU -> n_embd), a last LayerNorm and the
    output Linear: a prediction at every position, each seeing only the positions before it in its item.
    With `c.dropout` > 0, a Dropout after the embeddings and at the end of each attention and MLP
    branch (before the residual adds it), in training only.
    With `c.attn_dropout` > 0, each attention also drops attention weights (in training only).
    With `c.tie_weights`, the output layer is a `TiedLinear` onto the token table: one tensor, both
    layers' gradients added into its one buffer.
    Initialisation: the embeddings at 0.1 of N(0, 1), so the residual stream starts small beside what
    the blocks add; each block's last projection (attention's output, the MLP's second Linear) scaled
    by 1/sqrt(2 n_layers), as the residual stream sums 2 n_layers of them; the output layer by 0.1, so
    the first predictions are nearly uniform (a tied one is the table, at its 0.1).
    The fused form recomputes LayerNorm's and GELU's outputs in the backward rather than keeping them
    (`RecomputingSequential`); the stepwise form keeps every intermediate for the check to list."""
    attention = CausalSelfAttentionStepwise if c.stepwise else CausalSelfAttention
    norm = LayerNormStepwise if c.stepwise else LayerNorm
    chain = Sequential if c.stepwise else RecomputingSequential
    dropout = dropout_layers(c)

    items = ItemLayout()
    embedding, position = Embedding(c.vocab_size, c.n_embd), PositionEmbedding(c.block_size, c.n_embd, items)
    for layer in (embedding, position):
        next(iter(layer.params.values())).mul_(0.1)
    layers = [("items", items), ("embedding", embedding), ("position", position), *dropout("dropout")]
    depth = (2 * c.n_layers) ** -0.5
    for i in range(1, c.n_layers + 1):
        attn = attention(c.n_embd, c.n_heads, c.block_size, dropout=c.attn_dropout, items=items)
        attn.params["proj_weight"].mul_(depth)
        proj = Linear(c.n_hidden, c.n_embd)
        proj.params["weight"].mul_(depth)
        layers.append((f"attn{i}", Residual(chain([("ln", norm(c.n_embd)), ("attn", attn), *dropout("dropout")]))))
        layers.append((f"mlp{i}", Residual(chain([("ln", norm(c.n_embd)), ("fc", Linear(c.n_embd, c.n_hidden)),
                                                  ("gelu", GELU()), ("proj", proj), *dropout("dropout")]))))
    if c.tie_weights:
        out = TiedLinear(embedding)
    else:
        out = Linear(c.n_embd, c.vocab_size)
        out.params["weight"].mul_(0.1)
    layers += [("ln_f", norm(c.n_embd)), ("output", out)]
    return chain(layers)


MODELS = {"mlp": build_mlp, "deep-mlp": build_deep_mlp, "wavenet": build_wavenet, "transformer": build_transformer,
          "rnn": build_recurrent, "gru": build_recurrent, "lstm": build_recurrent}
SEQUENCE_MODELS = {"transformer", "rnn", "gru", "lstm"}  # the families of whole items (ModelConfig.sequences)

DEFAULTS = {
    "mlp": dict(block_size=3, n_embd=10, n_hidden=200, n_layers=1),
    "deep-mlp": dict(block_size=3, n_embd=10, n_hidden=100, n_layers=5),
    "wavenet": dict(block_size=8, n_embd=24, n_hidden=128, n_layers=3),
    # the sequence models' positions come from the data (its longest item and the end token)
    "transformer": dict(n_embd=64, n_hidden=256, n_layers=4, n_heads=4, dropout=0.2, attn_dropout=0.1, tie_weights=False),
    # the recurrent models' sizes and dropout chosen by the tuning runs in docs/models.md
    "rnn": dict(n_embd=32, n_hidden=256, n_layers=1, dropout=0.2),
    "gru": dict(n_embd=32, n_hidden=128, n_layers=2, dropout=0.25),
    "lstm": dict(n_embd=32, n_hidden=128, n_layers=2, dropout=0.25),
}

# How each model trains well on names-like data: `handgrad train`'s defaults where no flag says otherwise.
# The mlp keeps the seed's recipe. The deeper models use AdamW with a cosine schedule, and batches large
# enough that a step's cost is mostly arithmetic rather than per-operation overhead (measured in docs/models.md).
TRAINING = {
    "mlp": dict(optimizer="sgd", lr=1.0, schedule="step", warmup=0, weight_decay=0.0, steps=10_000, batch_size=32),
    "deep-mlp": dict(optimizer="adamw", lr=3e-3, schedule="cosine", warmup=500, weight_decay=0.0, steps=30_000,
                     batch_size=64),
    "wavenet": dict(optimizer="adamw", lr=5e-3, schedule="cosine", warmup=500, weight_decay=0.1, steps=30_000,
                    batch_size=128),
    # the transformer's recipe (and its dropout 0.2 and attention dropout 0.1 in DEFAULTS) from the tuning runs in docs/models.md
    "transformer": dict(optimizer="adamw", lr=3e-3, schedule="cosine", warmup=500, lr_floor=0.1, weight_decay=0.1,
                        steps=12_000, batch_size=128, trim=4, pack=True, ema=0.999),
    "rnn": dict(optimizer="adamw", lr=3e-3, schedule="cosine", warmup=500, weight_decay=0.1, steps=10_000,
                batch_size=128),
    "gru": dict(optimizer="adamw", lr=3e-3, schedule="cosine", warmup=500, weight_decay=0.1, steps=8_000,
                batch_size=128),
    "lstm": dict(optimizer="adamw", lr=3e-3, schedule="cosine", warmup=500, weight_decay=0.1, steps=7_000,
                 batch_size=128),
}


def build_model(config: ModelConfig, seed: int = 42, device=None, dtype=None) -> Model:
    """The model of `config`, its weights drawn from `seed`."""
    if config.model not in MODELS:
        raise HandgradError(f"unknown model {config.model!r}: choose one of {', '.join(MODELS)}")
    torch.manual_seed(seed)
    model = Model(config, MODELS[config.model](config))
    return model.to(device, dtype)
