"""Whether a deep net trains: tanh saturation and gradient-to-data ratios.

Measured on the last training batch (its forward and backward), at the
evaluation steps:
- saturation: the fraction of a Tanh layer's outputs with |h| > 0.97, where
  1 - h^2 < 0.06 and the gradient through it all but vanishes. A few percent is
  healthy; tens of percent means the layer before it is scaled too large.
- gradient-to-data ratio: std(grad) / std(weight) per weight matrix (and the
  embedding table). Layers whose ratios differ by orders of magnitude learn at
  very different speeds under one learning rate.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import atomic_write_figure
from .layers import Tanh

SATURATED = 0.97


@torch.no_grad()
def tanh_saturation(model, threshold: float = SATURATED) -> dict[str, float]:
    out = {}
    for name, layer in model.net.layers.items():
        if isinstance(layer, Tanh):
            h = model.net.outputs.get(name)
            if h is None:
                h = layer.saved.get("out")
            if h is not None:
                out[name] = float((h.abs() > threshold).float().mean())
    return out


@torch.no_grad()
def grad_to_data(model) -> dict[str, float]:
    """std(grad) / std(param) for every parameter with at least two dimensions (biases and BatchNorm's gain and shift start constant)."""
    out = {}
    for (name, p), g in zip(model.named_parameters(), model.grads()):
        if p.ndim >= 2:
            out[name] = float(g.float().std() / p.float().std().clamp_min(1e-12))
    return out


@torch.no_grad()
def gate_saturation(model) -> dict[str, float]:
    """Recurrent layers: per gate (the GRU's r, z and n, the LSTM's i, f, g and o, the RNN's h), the fraction
    of its values over every step of the last batch within 0.03 of its bounds (0 or 1 for a sigmoid gate,
    -1 or 1 for a tanh), where its derivative is under 0.03 and the gradient through it all but stops."""
    from .layers import Recurrent

    out = {}
    for name, layer in model.net.named_modules():
        steps = layer.saved.get("steps") if isinstance(layer, Recurrent) else None
        if not steps:
            continue
        for gate in layer.cell.saturating:
            values = torch.stack([step[gate] for step in steps])
            low = -1.0 if gate in ("h", "n", "g") else 0.0  # tanh's range, else the sigmoid's
            out[f"{name.rstrip('.')}.{gate}"] = float(((values - low < 0.03) | (1 - values < 0.03)).float().mean())
    return out


@torch.no_grad()
def attention_entropy(model) -> dict[str, float]:
    """Attention layers: the mean entropy of the last batch's attention rows, in nats. Near 0, each
    position attends to one other (sharp); near ln(positions seen), to all alike (diffuse)."""
    from .layers import CausalSelfAttention, CausalSelfAttentionStepwise

    out = {}
    for name, layer in model.net.named_modules():
        if not isinstance(layer, (CausalSelfAttention, CausalSelfAttentionStepwise)):
            continue
        att = layer.saved.get("att")  # the stepwise form keeps it; the fused one recomputes it from its heads
        if att is None and "heads" in layer.saved:
            att = layer.saved_attention()
        if att is not None:
            out[name.rstrip(".")] = float(-(att * att.clamp_min(1e-30).log()).sum(-1).mean())
    return out


def measure(model) -> dict[str, dict[str, float]]:
    """The metrics.jsonl fields: {'saturation': {tanh layer or recurrent gate: fraction}, 'grad_to_data':
    {weight: ratio}}, and for a transformer {'attention_entropy': {attention layer: nats}}."""
    out = {"saturation": {**tanh_saturation(model), **gate_saturation(model)}, "grad_to_data": grad_to_data(model)}
    entropy = attention_entropy(model)
    if entropy:
        out["attention_entropy"] = entropy
    return out


def plot(metrics: list[dict], path: Path) -> None:
    """activations.png: saturation per Tanh layer and gradient-to-data ratio per weight, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [m for m in metrics if "saturation" in m]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax in (("saturation", ax1), ("grad_to_data", ax2)):
        names = list(dict.fromkeys(n for m in rows for n in m[key]))
        for n in names:
            pts = [(m["step"], m[key][n]) for m in rows if n in m[key]]
            ax.plot(*zip(*pts), marker="o", markersize=3, label=n)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if names:
            ax.legend(fontsize=7)
    ax1.set_ylabel(f"fraction saturated (|tanh| > {SATURATED}; gates within 0.03 of a bound)")
    ax1.set_title("saturation: tanh layers, recurrent gates")
    ax2.set_ylabel("std(grad) / std(weight)")
    ax2.set_yscale("log")
    ax2.set_title("gradient-to-data ratio")
    fig.tight_layout()
    atomic_write_figure(Path(path), fig)
    plt.close(fig)
