"""What an exercise file imports: the fixed batch and parameters of the check, the seed notebook's
initialisation, and the training level's batches.

Run by the learner (`python level1_seed.py`, or in a notebook) these return the very tensors
`handgrad exercise check` uses. While `handgrad exercise train` runs a file, `get_batch` is also its
hook: at each call it compares the learner's parameters with the autograd run's and may stop the loop.
"""
from __future__ import annotations

import functools

import torch

from ..data import make_dataset

DTYPE = torch.float64
BLOCK_SIZE = 3
N_EMBD = 10
N_HIDDEN = 200
BATCH_SIZE = 32
SEED = 42

# the running `handgrad exercise train` comparison, or None: get_batch hands each call to it
session = None


@functools.lru_cache(maxsize=1)
def examples() -> tuple[torch.Tensor, torch.Tensor]:
    """The training split of the built-in names, contexts of 3: no file needed, the same on every machine."""
    ds = make_dataset(None, block_size=BLOCK_SIZE, seed=SEED)
    return ds.X["train"], ds.Y["train"]


def vocab_size() -> int:
    return int(examples()[1].max()) + 1


def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step` of the training level: its own seed, so any step can be drawn without the ones before."""
    X, Y = examples()
    gen = torch.Generator().manual_seed(SEED * 1_000_003 + step)
    idx = torch.randint(0, X.shape[0], (BATCH_SIZE,), generator=gen)
    return X[idx], Y[idx]


def get_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids and targets of training step `step`."""
    if session is not None:
        return session.batch(step)
    return batch_at(step)


def initial_params(with_bias: bool = False) -> list[torch.Tensor]:
    """The seed notebook's initialisation (its scales, seed 42), in float64: C, w1, [b1,] w2, b2, bnw, bnb."""
    gen = torch.Generator().manual_seed(SEED)
    V, fan_in = vocab_size(), N_EMBD * BLOCK_SIZE

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=DTYPE)

    C = randn(V, N_EMBD)
    w1 = randn(fan_in, N_HIDDEN) * fan_in**-0.5
    # 0.1: a less confident output layer at the start, as the seed notebook has it
    w2 = randn(N_HIDDEN, V) * (5 / 3) * N_HIDDEN**-0.5 * 0.1
    b2 = torch.zeros(V, dtype=DTYPE)
    bnw = torch.ones(N_HIDDEN, dtype=DTYPE)
    bnb = torch.zeros(N_HIDDEN, dtype=DTYPE)
    if with_bias:
        return [C, w1, torch.zeros(N_HIDDEN, dtype=DTYPE), w2, b2, bnw, bnb]
    return [C, w1, w2, b2, bnw, bnb]


def check_batch(names: tuple[str, ...] = ("C", "w1", "w2", "b2", "bnw", "bnb")):
    """(x, y, params) of the check: batch 32 of the training split, and the seed's initialisation with
    every bias and BatchNorm parameter moved off its start (zeros and ones would hide a forgotten
    `* bnw` or `+ b2`)."""
    X, Y = examples()
    gen = torch.Generator().manual_seed(SEED)
    idx = torch.randint(0, X.shape[0], (BATCH_SIZE,), generator=gen)
    start = dict(zip(("C", "w1", "b1", "w2", "b2", "bnw", "bnb"), initial_params(with_bias=True)))
    for name in ("b1", "b2", "bnb"):
        start[name] = start[name] + 0.1 * torch.randn(start[name].shape, generator=gen, dtype=DTYPE)
    start["bnw"] = start["bnw"] + 0.1 * torch.randn(start["bnw"].shape, generator=gen, dtype=DTYPE)
    return X[idx], Y[idx], [start[n] for n in names]


def given_gradient(key: str, name: str) -> torch.Tensor:
    """A gradient a level hands the learner (level 3's dhpreact): the right one, as the checker computes it."""
    from .checker import given_gradient as compute

    return compute(key, name)
