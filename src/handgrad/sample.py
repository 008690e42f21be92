"""Generate items from a trained model, one character at a time."""
from __future__ import annotations

import torch

from .data import Vocab


def generate(model, vocab: Vocab, n: int = 20, temperature: float = 1.0, seed: int | None = None,
             max_len: int = 100, device=None) -> list[str]:
    """Sample n items of at most max_len characters in eval mode (BatchNorm uses its running statistics)."""
    return sample_items(model, vocab, n, temperature=temperature, seed=seed, max_len=max_len, device=device)[0]


@torch.no_grad()
def sample_items(model, vocab: Vocab, n: int, temperature: float = 1.0, seed: int | None = None,
                 max_len: int = 100, device=None) -> tuple[list[str], int]:
    """n sampled items, and how many of them were cut at max_len characters rather than ended by the model."""
    if n == 0:
        return [], 0
    gen = torch.Generator(device=device or "cpu")
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    was_training = model.training
    model.eval()
    try:
        block = model.config.block_size
        # a model of contexts reads the last `block` ids; a sequence model reads the item so far, from its start token
        sequences = getattr(model, "sequences", False)
        ctx = torch.zeros(n, 1 if sequences else block, dtype=torch.long, device=device)
        # max_len characters and one more token: the end of an item exactly max_len long
        out = torch.zeros(n, max_len + 1, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        for t in range(max_len + 1):
            logits = model.forward(ctx)
            if sequences:
                logits = logits[:, -1]  # the prediction after the last position
            if temperature == 0:  # the limit T -> 0: always the most likely character
                ix = logits.argmax(-1)
            else:
                # softmax(z / T) = softmax((z - max z) / T): every exponent <= 0, so a tiny T cannot overflow
                shifted = logits.double() - logits.double().amax(-1, keepdim=True)
                probs = torch.softmax(shifted / temperature, dim=-1)
                ix = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            ix = torch.where(done, torch.zeros_like(ix), ix)
            out[:, t] = ix
            done |= ix == Vocab.BOUNDARY
            if bool(done.all()):
                break
            ctx = torch.cat([ctx if sequences and ctx.shape[1] < block else ctx[:, 1:], ix[:, None]], dim=1)
    finally:
        model.train(was_training)
    cut = int((~done).sum())
    return [vocab.decode(row.tolist()) for row in out[:, :max_len].cpu()], cut
