"""Data: read items, build the character vocabulary, make contexts, split.

Pipeline: words (one item per line) -> sorted, deduplicated, shuffled with the
seed -> Vocab (index 0 is the boundary token) -> (context, next char) examples
-> train / val / test splits.
"""
from __future__ import annotations

import importlib.resources
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import HandgradError

SPLITS = ("train", "val", "test")
SPLIT_MODES = ("words", "examples")
BUILTIN_NAME = "builtin:names"


def load_words(path: str | Path | None = None) -> list[str]:
    """Items of a UTF-8 text file, one per line, or the built-in names when path is None.

    Surrounding whitespace (and CR of CRLF endings) is stripped; blank lines
    are dropped. Duplicates are kept here; `prepare_words` removes them.
    """
    if path is None:
        return builtin_names()
    p = Path(path)
    if not p.exists():
        raise HandgradError(f"data file not found: {p}")
    if p.is_dir():
        raise HandgradError(f"data path is a directory, not a file: {p}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise HandgradError(f"cannot read data file {p}: {e.strerror}") from None
    if not raw:
        raise HandgradError(f"data file is empty: {p}")
    words = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise HandgradError(f"data file {p}: line {lineno} is not valid UTF-8") from None
        text = text.strip()
        if text:
            words.append(text)
    if not words:
        raise HandgradError(f"data file has only blank lines: {p}")
    return words


def builtin_names() -> list[str]:
    """US census first names (male and female lists) shipped by the `names` package, lower-cased."""
    root = importlib.resources.files("names")
    words = []
    for fname in ("dist.male.first", "dist.female.first"):
        for line in (root / fname).read_text(encoding="utf-8").splitlines():
            fields = line.split()
            if fields:
                words.append(fields[0].lower())
    return words


def prepare_words(words: list[str], seed: int = 42) -> list[str]:
    """Deduplicate deterministically (sort), then shuffle with `seed`.

    A plain ``list(set(words))`` depends on the interpreter's hash seed, so its
    shuffle could not be reproduced from one run to the next.
    """
    unique = sorted(set(words))
    random.Random(seed).shuffle(unique)
    return unique


class Vocab:
    """Characters of the data; index 0 is the boundary token, shown as '.'.

    The boundary is not a character, so items that contain '.' stay distinct
    from the start/end marker.
    """

    BOUNDARY = 0

    def __init__(self, chars: list[str]):
        self.chars = list(chars)  # index i+1 holds chars[i]
        self.stoi = {ch: i + 1 for i, ch in enumerate(self.chars)}

    @classmethod
    def from_words(cls, words: list[str]) -> "Vocab":
        return cls(sorted(set("".join(words))))

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, word: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in word]
        except KeyError as e:
            raise HandgradError(f"character {e.args[0]!r} is not in the model's vocabulary") from None

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.BOUNDARY:
                break
            out.append(self.chars[i - 1])
        return "".join(out)


def build_examples(words: list[str], vocab: Vocab, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(context of block_size ids, next id) for every character and the end of every word."""
    xs, ys = [], []
    for w in words:
        context = [Vocab.BOUNDARY] * block_size
        for ix in vocab.encode(w) + [Vocab.BOUNDARY]:
            xs.append(context)
            ys.append(ix)
            context = context[1:] + [ix]
    X = torch.tensor(xs, dtype=torch.long).view(-1, block_size)
    Y = torch.tensor(ys, dtype=torch.long)
    return X, Y


IGNORE = -1  # the target of a padding position in sequence data: the loss counts none of them


def build_sequences(words: list[str], vocab: Vocab, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per item: the inputs are the start token and the characters, the targets the characters and
    the end token (each input's next token), both padded to `length` positions; a padding position's input
    is the boundary token and its target IGNORE. The real targets are exactly the examples `build_examples`
    makes: every character and the end of every item."""
    X = torch.full((len(words), length), Vocab.BOUNDARY, dtype=torch.long)
    Y = torch.full((len(words), length), IGNORE, dtype=torch.long)
    for row, w in enumerate(words):
        ids = vocab.encode(w)
        X[row, 1:len(ids) + 1] = torch.tensor(ids, dtype=torch.long)
        Y[row, :len(ids) + 1] = torch.tensor(ids + [Vocab.BOUNDARY], dtype=torch.long)
    return X, Y


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`: the few shapes batches come in."""
    return -(-n // multiple) * multiple


def trim_batch(x: torch.Tensor, y: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of whole items cut to its longest item, rounded up to a multiple of `multiple` positions (never
    past the data's; 0: kept whole). What is cut is padding only: its targets count for nothing, and no
    position of a causal model sees a later one, so the loss and every gradient are those of the whole
    width, over fewer positions (the longest of 64 names from names.txt is 11.2 positions on average, of 16).
    Rounding keeps the shapes few: a compiled step compiles once per shape."""
    if not multiple:
        return x, y
    longest = int((y != IGNORE).sum(1).max())  # every row's targets come first, its padding after them
    width = min(round_up(longest, multiple), y.shape[1])
    if width == y.shape[1]:
        return x, y
    return x[:, :width].contiguous(), y[:, :width].contiguous()


PACK_ROWS = 8  # a packed batch's rows, rounded up to a multiple of this: few shapes, each compiled once
PACK_WIDTH = 8  # a packed row's positions: the items' width rounded up to a multiple of this


def packed_width(width: int) -> int:
    """The positions of a packed row (`pack_batch`) for items `width` wide: `width` rounded up to a multiple
    of PACK_WIDTH. The built-in names' items, 12 wide (7.0 positions on average), pack 128 to a batch into
    64 rows of 16 (1,024 positions) rather than 104 rows of 12 (1,248), and each attention row fills
    whole 8-float vectors: the transformer's step 1.21x faster at batch 128, autograd's 1.18x
    (docs/bench.md). names.txt's, 16 wide, keep their width. A row wider than the model's context is
    no matter: each position counts from its item's start (`layers.ItemLayout`)."""
    return round_up(width, PACK_WIDTH)


def pack_batch(x: torch.Tensor, y: torch.Tensor, rows_multiple: int = PACK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of whole items (one a row, padded) packed several to a row of `packed_width` positions: each
    item's positions (its start token, characters, end) placed one after another, the rest padding, the
    rows rounded up to a multiple of `rows_multiple`. Best fit, longest first: names.txt's items average 7.2
    positions of 16, so 128 of them fill 57-65 rows rather than 128 (a padded batch trimmed to its
    longest item still ran 128 x 12 or 16).

    The same items and targets, so the same loss and gradients, for a model that reads an item's start
    token as the start of its positions and attends within the item only (`layers.ItemLayout`: the
    transformer). Deterministic: a function of the items' lengths and order."""
    width = packed_width(x.shape[1])
    lengths = (y != IGNORE).sum(1).tolist()  # every row's targets come first, its padding after them
    places = place_items(lengths, width)
    rows = row_count(places, rows_multiple)
    xp = torch.zeros(rows * width, dtype=x.dtype, device=x.device)  # the boundary token: padding inputs
    yp = torch.full((rows * width,), IGNORE, dtype=y.dtype, device=y.device)
    real = y != IGNORE
    start = torch.tensor([r * width + o for r, o in places], device=x.device)
    where = (start[:, None] + torch.arange(x.shape[1], device=x.device))[real]  # each real position's place
    xp[where], yp[where] = x[real], y[real]
    return xp.view(rows, width), yp.view(rows, width)


def place_items(lengths: list[int], width: int) -> list[tuple[int, int]]:
    """(row, offset) of each item of these lengths, packed into rows of `width`: longest first (ties in
    their order), each into the fullest row it fits in, a new row where none has room."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable
    free: list[list[int]] = [[] for _ in range(width + 1)]  # free[k]: the rows with k positions left
    used: list[int] = []  # positions taken in each row
    places = [(0, 0)] * len(lengths)
    for i in order:
        n = lengths[i]
        k = next((k for k in range(n, width + 1) if free[k]), None)
        if k is None:
            r = len(used)
            used.append(0)
        else:
            r = free[k].pop()
        places[i] = (r, used[r])
        used[r] += n
        free[width - used[r]].append(r)
    return places


def row_count(places: list[tuple[int, int]], rows_multiple: int = PACK_ROWS) -> int:
    """The rows `pack_batch` makes of items placed at `places` (`place_items`): the rows used, rounded up
    to a multiple of `rows_multiple`."""
    rows = max((r for r, _ in places), default=-1) + 1
    return round_up(rows, rows_multiple)


def usual_packed_rows(Y: torch.Tensor, batch_size: int, draws: int = 200, share: float = 0.95) -> int:
    """The fewest rows that at least `share` of the packed batches of `batch_size` items of this split
    (`Y`, one item a row) pack into, from `draws` batches drawn with a generator of their own (the run's
    draws are left alone): the one shape a compiled step compiles. A batch of fewer rows is padded up to it
    (`pad_rows`), one of more runs eagerly rather than pay a compile for a few steps (names.txt at 128
    names: 64 rows, 0.3% of the batches 72; the built-in names at 1,024: 480 rows, 1.5% of the batches
    488). A function of the data and the batch size only, so a resumed run finds the same."""
    gen = torch.Generator().manual_seed(0)
    lengths = (Y != IGNORE).sum(1)
    width = packed_width(Y.shape[1])
    counts = []
    for _ in range(draws):
        idx = torch.randint(0, len(Y), (batch_size,), generator=gen)
        counts.append(row_count(place_items(lengths[idx].tolist(), width)))
    return sorted(counts)[math.ceil(share * draws) - 1]


def pad_rows(x: torch.Tensor, y: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed batch (`pack_batch`) with rows of padding after its own, `rows` in all: inputs the boundary
    token, targets IGNORE. The same items, so the same loss and gradients."""
    extra = rows - x.shape[0]
    if extra < 0:
        raise HandgradError(f"a packed batch of {x.shape[0]} rows cannot be padded to {rows}")
    if extra == 0:
        return x, y
    return torch.cat([x, x.new_zeros(extra, x.shape[1])]), torch.cat([y, y.new_full((extra, y.shape[1]), IGNORE)])


@dataclass
class Dataset:
    """Vocabulary, words and the three splits: of examples (a context of `block_size` ids and the next id),
    or with `sequences`, of whole items (`block_size` positions each, padding's targets IGNORE)."""

    vocab: Vocab
    words: list[str]
    block_size: int
    split_mode: str
    X: dict[str, torch.Tensor]
    Y: dict[str, torch.Tensor]
    source: str
    seed: int = 42  # the shuffle's seed: with `split_mode`, what rebuilds the same splits
    sequences: bool = False

    def sizes(self) -> dict[str, int]:
        """Rows per split: examples, or items for sequence data."""
        return {s: int(self.Y[s].shape[0]) for s in SPLITS}

    def targets(self) -> dict[str, int]:
        """Predictions the loss counts per split: the same numbers for both kinds of data."""
        return {s: int((self.Y[s] != IGNORE).sum()) for s in SPLITS}


def split_words(words: list[str]) -> dict[str, list[str]]:
    """The shuffled words 80/10/10 into train, val and test, each split holding at least one."""
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    parts = dict(zip(SPLITS, (words[:n1], words[n1:n2], words[n2:])))
    if any(not p for p in parts.values()):
        raise HandgradError(f"too few items to split by words: {len(words)} distinct, need at least 10")
    return parts


def make_dataset(
    path: str | Path | None = None,
    block_size: int = 3,
    split: str = "words",
    seed: int = 42,
    vocab: Vocab | None = None,
) -> Dataset:
    """Read, prepare and split. `split='words'` splits the shuffled words 80/10/10;
    `split='examples'` splits the examples 80/10/10, as the seed notebook did.
    """
    if split not in SPLIT_MODES:
        raise HandgradError(f"unknown split {split!r}: choose one of {', '.join(SPLIT_MODES)}")
    if block_size < 1:
        raise HandgradError(f"block size must be at least 1, got {block_size}")
    words = prepare_words(load_words(path), seed)
    vocab = vocab or Vocab.from_words(words)
    X, Y = {}, {}
    if split == "words":
        for s, ws in split_words(words).items():
            X[s], Y[s] = build_examples(ws, vocab, block_size)
    else:
        Xall, Yall = build_examples(words, vocab, block_size)
        n1, n2 = int(0.8 * len(Xall)), int(0.9 * len(Xall))
        if n1 == 0 or n2 == n1 or n2 == len(Xall):
            raise HandgradError(
                f"too few examples to split: {len(Xall)}, need at least 10"
            )
        for s, xs, ys in zip(SPLITS, Xall.tensor_split([n1, n2]), Yall.tensor_split([n1, n2])):
            X[s], Y[s] = xs, ys
    source = BUILTIN_NAME if path is None else str(path)
    return Dataset(vocab, words, block_size, split, X, Y, source, seed)


def make_sequence_dataset(
    path: str | Path | None = None,
    context: int | None = None,
    seed: int = 42,
    vocab: Vocab | None = None,
    cut: bool = False,
) -> Dataset:
    """Sequence data: each item one row (`build_sequences`), split by words as `make_dataset` splits
    them (the same words in each split). `context` is the model's number of positions, None for the
    longest item's (its characters and the end token). An item longer than the context is refused, or
    with `cut`, cut to fit, a one-line warning saying how many were."""
    words = prepare_words(load_words(path), seed)
    vocab = vocab or Vocab.from_words(words)
    longest = max(map(len, words)) + 1
    length = longest if context is None else context
    if length < 1:
        raise HandgradError(f"the context must be at least 1, got {length}")
    too_long = [w for w in words if len(w) + 1 > length]
    if too_long and not cut:
        raise HandgradError(f"{len(too_long)} items are longer than the context of {length} positions (the longest "
                            f"needs {longest}: its characters and the end token); use a context of {longest}, or cut them")
    if too_long:
        print(f"warning: cut {len(too_long)} items longer than the context of {length} positions", file=sys.stderr)
        words = [w[:length - 1] if len(w) + 1 > length else w for w in words]
    X, Y = {}, {}
    for s, ws in split_words(words).items():
        X[s], Y[s] = build_sequences(ws, vocab, length)
    source = BUILTIN_NAME if path is None else str(path)
    return Dataset(vocab, words, length, "words", X, Y, source, seed, sequences=True)


def make_model_data(sequences: bool, path: str | Path | None = None, block_size: int | None = None,
                    split: str = "words", seed: int = 42, vocab: Vocab | None = None) -> Dataset:
    """The data a model reads: whole items for a sequence model (`block_size` positions, None for the
    longest item's), else examples of `block_size` ids."""
    if not sequences:
        return make_dataset(path, block_size=block_size, split=split, seed=seed, vocab=vocab)
    if split != "words":
        raise HandgradError(f"--split {split}: a sequence model trains on whole items, split by words (--split words)")
    return make_sequence_dataset(path, context=block_size, seed=seed, vocab=vocab)


def check_batch(ds: Dataset, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch a gradient check runs on: rows of the training split drawn with `seed`; for sequence data
    the longest item among them, so that every position, the last one too, carries a gradient."""
    n = ds.sizes()["train"]
    idx = torch.randint(0, n, (min(batch_size, n),), generator=torch.Generator().manual_seed(seed))
    if ds.sequences:
        idx[0] = int((ds.Y["train"] != IGNORE).sum(1).argmax())
    return ds.X["train"][idx], ds.Y["train"][idx]
