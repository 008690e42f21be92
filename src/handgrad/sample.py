"""Generate items from a trained model, one character at a time."""
from __future__ import annotations

import torch

from .data import Vocab


@torch.no_grad()
def generate(model, vocab: Vocab, n: int = 20, temperature: float = 1.0, seed: int | None = None,
             max_len: int = 100, device=None) -> list[str]:
    """Sample n items in eval mode (BatchNorm uses its running statistics)."""
    if n == 0:
        return []
    gen = torch.Generator(device=device or "cpu")
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    was_training = model.training
    model.eval()
    try:
        block = model.config.block_size
        ctx = torch.zeros(n, block, dtype=torch.long, device=device)
        out = torch.zeros(n, max_len, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        for t in range(max_len):
            logits = model.forward(ctx)
            if temperature == 0:  # the limit T -> 0: always the most likely character
                ix = logits.argmax(-1)
            else:
                probs = torch.softmax(logits.double() / temperature, dim=-1)
                ix = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            ix = torch.where(done, torch.zeros_like(ix), ix)
            out[:, t] = ix
            done |= ix == Vocab.BOUNDARY
            if bool(done.all()):
                break
            ctx = torch.cat([ctx[:, 1:], ix[:, None]], dim=1)
    finally:
        model.train(was_training)
    return [vocab.decode(row.tolist()) for row in out.cpu()]
