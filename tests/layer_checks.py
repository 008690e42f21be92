"""What the layer tests share: seeded random tensors (float64 unless asked) and the assertion that a
gradient check passed with both references, autograd and finite differences."""
import torch


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_ok(results):
    bad = [(r.name, r.kind, r.max_abs_diff, r.note) for r in results if not r.close]
    assert not bad, bad
    assert "finite-difference" in {r.kind for r in results}  # both references ran
