"""Causal multi-head self-attention, each forward with its hand-written backward right below it:
a stepwise form that keeps every intermediate by name, and a fused one that training runs.

Input and output (B, T, C); C = n_head * D. Per head h, position t:

    q, k, v = x Wq + bq, x Wk + bk, x Wv + bv          (one (C, 3C) weight, one 3C bias)
    scores  = q k^T / sqrt(D)                          (T, T)
    masked  = scores where s <= t, -inf where s > t    (position t sees itself and the past only;
                                                        with an item layout, of its own item only)
    att     = softmax(masked) over s
    kept    = att * m        (in training with dropout p: m 1/k or 0 per weight, k ~ 1 - p, a saved mask; else att)
    y       = kept v                                   (T, D)
    out     = merge(y over heads) Wo + bo

The -inf entries make att exactly 0 at future positions, so the softmax's backward gives their
scores exactly 0 gradient: no gradient flows from an output into a later position's input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import HandgradError
from .core import ItemLayout, Module, dropout_mask


def causal_mask(block_size: int) -> torch.Tensor:
    """(block_size, block_size): 0 where a query may see a key (key <= query), -inf above the diagonal."""
    return torch.full((block_size, block_size), float("-inf")).triu_(1)


class CausalSelfAttention(Module):
    """Causal multi-head self-attention, fused: batched matrix products over (batch x heads), the
    softmax's backward in closed form.

    Keeps from the forward: the input (a reference to the tensor it was given) and the heads' q, k
    and v (one tensor, (3, B*H, T, D)); with attention dropout, its mask. Not kept, since the
    backward recomputes them from q, k and v with the forward's own kernels (bit for bit the
    forward's values): the attention weights att (B*H, T, T; one batched product and a softmax), the
    kept weights and y = kept v, the merged heads the output projection read (B*T, C; one more
    product). The scores are never kept: the softmax's backward needs only att.

    Parameters: qkv_weight (C, 3C) and qkv_bias (3C), whose columns are q's, then k's, then v's, each
    head's D columns in turn; proj_weight (C, C) and proj_bias (C). `block_size` is the longest
    context the layer accepts (the causal mask is made once at that size).

    `dropout` p > 0: in training, each attention weight is dropped with probability p and the rest
    scaled by its inverse keep probability before they weigh the values (`dropout_mask`); the mask
    (B*H, T, T) is kept for the backward.

    Built with an `ItemLayout`, a query sees the keys at or before it in its own item only (rows may
    hold several items, `data.pack_batch`): the layout's `visible` (B, T, T), one byte an entry and one
    tensor for every attention layer of the forward, is kept, and each row's mask made from it.
    """

    def __init__(self, n_embd: int, n_head: int, block_size: int, bias: bool = True, dropout: float = 0.0,
                 items: ItemLayout | None = None):
        super().__init__()
        if n_embd % n_head:
            raise HandgradError(f"attention: {n_embd} channels do not split into {n_head} heads of equal width")
        if not 0 <= dropout < 1:
            raise HandgradError(f"attention: dropout probability must be in [0, 1), got {dropout}")
        self.dropout = dropout
        self.n_embd, self.n_head, self.block_size = n_embd, n_head, block_size
        self.head_dim = n_embd // n_head
        self.scale = self.head_dim**-0.5
        # variance-preserving scale 1 / sqrt(fan_in), as Linear
        self.add_param("qkv_weight", torch.randn(n_embd, 3 * n_embd) * n_embd**-0.5)
        if bias:
            self.add_param("qkv_bias", torch.zeros(3 * n_embd))
        self.add_param("proj_weight", torch.randn(n_embd, n_embd) * n_embd**-0.5)
        if bias:
            self.add_param("proj_bias", torch.zeros(n_embd))
        # a constant of the layer, not a buffer: no checkpoint needs it, `to` moves it
        self.mask = causal_mask(block_size)
        self.items = items

    def to(self, device=None, dtype=None, memo: dict | None = None) -> "CausalSelfAttention":
        self.mask = self.mask.to(device=device, dtype=dtype)
        return super().to(device, dtype, memo)

    def check_input(self, x) -> None:
        if x.ndim != 3 or x.shape[2] != self.n_embd:
            raise HandgradError(f"attention: expected input (batch, time, {self.n_embd}), got {tuple(x.shape)}")
        if self.items is None and x.shape[1] > self.block_size:
            raise HandgradError(f"attention: {x.shape[1]} positions exceed the layer's context of {self.block_size}")

    def visible(self, B: int, T: int) -> torch.Tensor:
        """Which keys each query sees, from the item layout: (B, T, T) booleans."""
        visible = self.items.visible
        if visible is None or visible.shape != (B, T, T):
            raise HandgradError("attention: its ItemLayout has not read this batch's ids")
        return visible

    def scores_mask(self, T: int, visible: torch.Tensor | None) -> torch.Tensor:
        """What the scores get added before the softmax: 0 where a query sees a key, -inf where it does not.
        The causal mask (T, T), the same for every matrix; from an item layout's `visible` (B, T, T), each
        row's, (B*H, T, T)."""
        if visible is None:
            return self.mask[:T, :T]
        B = visible.shape[0]
        hidden = self.mask.new_zeros(B, T, T).masked_fill_(~visible, float("-inf"))
        return hidden[:, None].expand(B, self.n_head, T, T).reshape(B * self.n_head, T, T)

    def project(self, x2, weight: str, bias: str):
        b = self.params.get(bias)
        return torch.mm(x2, self.params[weight]) if b is None else torch.addmm(b, x2, self.params[weight])

    def forward(self, x):
        self.check_input(x)
        B, T, C = x.shape
        H, D = self.n_head, self.head_dim
        x2 = x.reshape(B * T, C)
        qkv = self.project(x2, "qkv_weight", "qkv_bias")  # (B*T, 3C)
        # one copy into head-major order: q, k, v each (B*H, T, D), contiguous for the batched products
        heads = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).reshape(3, B * H, T, D)
        visible = None if self.items is None else self.visible(B, T)
        att = self.attention_weights(heads, self.scores_mask(T, visible))
        kept = self.drop_weights(att, B)
        y = torch.bmm(kept, heads[2])  # kept v, (B*H, T, D)
        merged = y.view(B, H, T, D).transpose(1, 2).reshape(B * T, C)
        self.saved["x"], self.saved["heads"] = x2, heads
        if visible is not None:  # the layout's own tensor, one byte an entry, shared by every attention layer
            self.saved["visible"] = visible
        return self.project(merged, "proj_weight", "proj_bias").view(B, T, C)

    def saved_attention(self):
        """att of the last forward, recomputed from what it kept (the heads, the item layout's `visible`)."""
        heads = self.saved["heads"]
        return self.attention_weights(heads, self.scores_mask(heads.shape[2], self.saved.get("visible")))

    def drop_weights(self, att, B: int):
        """att with dropout's mask applied, in training with p > 0 (the mask kept as saved["att_mask"]);
        else att itself. The mask is drawn over (B, H, T, T), the batch first (`dropout_mask`)."""
        if not self.training or self.dropout == 0:
            self.saved.pop("att_mask", None)
            return att
        H, T = self.n_head, att.shape[-1]
        mask = self.saved["att_mask"] = dropout_mask(att.view(B, H, T, T), self.dropout).view(att.shape)
        return att * mask

    def attention_weights(self, heads, mask):
        """att = softmax(q k^T / sqrt(D) + mask) over keys, (B*H, T, T), from the heads (3, B*H, T, D)
        and the mask (`scores_mask`)."""
        q, k = heads[0], heads[1]
        # one batched product that also adds the mask to every matrix
        scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=self.scale)
        # written over the scores unless autograd is recording this forward
        return torch.softmax(scores, -1, out=None if torch.is_grad_enabled() else scores)

    # out = merged Wo + bo,  y = kept v,  kept = att * m,  att = softmax(q k^T / sqrt(D) + mask),  q k v = x Wqkv + bqkv:
    # d masked = att * (d att - sum_s(d att * att))  (the softmax's Jacobian, 0 wherever att is 0);
    # dq = d scores k / sqrt(D),  dk = d scores^T q / sqrt(D),  dv = kept^T dy,  d att = (dy v^T) * m
    def backward(self, dout):
        x2, heads, mask = self.saved["x"], self.saved["heads"], self.saved.get("att_mask")
        B, T, C = dout.shape
        H, D = self.n_head, self.head_dim
        q, k, v = heads[0], heads[1], heads[2]
        dout2 = dout.reshape(B * T, C)
        att = self.saved_attention()  # recomputed, as the forward computed them
        kept = att if mask is None else att * mask
        merged = torch.bmm(kept, v).view(B, H, T, D).transpose(1, 2).reshape(B * T, C)  # recomputed: one product
        self.accumulate(dout2, merged, "proj_weight", "proj_bias")
        dmerged = F.linear(dout2, self.params["proj_weight"])  # dout Wo^T
        dy = dmerged.view(B, T, H, D).transpose(1, 2).reshape(B * H, T, D)
        datt = torch.bmm(dy, v.transpose(1, 2))  # d kept, then d att
        if mask is not None:
            datt = self.dropout_backward(datt, mask)
        dscores = self.softmax_backward(att, datt).mul_(self.scale)  # the 1 / sqrt(D) of both products, once
        dheads = torch.empty_like(heads)
        torch.bmm(dscores, k, out=dheads[0])
        torch.bmm(dscores.transpose(1, 2), q, out=dheads[1])
        torch.bmm(kept.transpose(1, 2), dy, out=dheads[2])
        dqkv = dheads.view(3, B, H, T, D).permute(1, 3, 0, 2, 4).reshape(B * T, 3 * C)
        self.accumulate(dqkv, x2, "qkv_weight", "qkv_bias")
        return F.linear(dqkv, self.params["qkv_weight"]).view(B, T, C)  # dqkv Wqkv^T

    @staticmethod
    def dropout_backward(dkept, mask):
        """d att = d kept * m: a dropped weight's gradient is 0, a kept one's scaled as the weight was."""
        return dkept.mul_(mask)

    @staticmethod
    def softmax_backward(att, datt):
        """d masked = att * (d att - sum over keys of d att * att), into d att's memory."""
        return datt.sub_((datt * att).sum(-1, keepdim=True)).mul_(att)

    def accumulate(self, dout2, inputs2, weight: str, bias: str) -> None:
        """A projection's parameter gradients: dW += inputs^T dout, db += the column sums of dout."""
        self.grads[weight].addmm_(inputs2.T, dout2)
        if bias in self.grads:
            self.grads[bias].add_(dout2.sum(0))


class CausalSelfAttentionStepwise(CausalSelfAttention):
    """Causal self-attention as a chain of small steps, every intermediate kept by name (the same
    parameters as the fused form, the same math):
    qkv -> q, k, v (B, H, T, D) -> scores -> masked -> att -> (kept, with dropout) -> y -> merged (B, T, C) -> out.
    """

    inspectable = ("qkv", "q", "k", "v", "scores", "masked", "att", "kept", "y", "merged")

    def forward(self, x):
        self.check_input(x)
        B, T, C = x.shape
        H, D = self.n_head, self.head_dim
        s = self.saved
        s["x"] = x
        s["qkv"] = x @ self.params["qkv_weight"]
        if "qkv_bias" in self.params:
            s["qkv"] = s["qkv"] + self.params["qkv_bias"]
        q, k, v = s["qkv"].split(C, dim=2)
        s["q"], s["k"], s["v"] = (t.reshape(B, T, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        s["scores"] = (s["q"] @ s["k"].transpose(2, 3)) * self.scale
        # True where the query does not see the key: it comes later (or, with an item layout, in another item)
        s["future"] = self.mask[:T, :T] != 0 if self.items is None else ~self.visible(B, T)[:, None]
        s["masked"] = s["scores"].masked_fill(s["future"], float("-inf"))
        s["att"] = torch.softmax(s["masked"], dim=-1)
        if self.training and self.dropout > 0:
            s["att_mask"] = dropout_mask(s["att"], self.dropout)  # (B, H, T, T): the batch first
            s["kept"] = s["att"] * s["att_mask"]
        else:
            s.pop("att_mask", None), s.pop("kept", None)
        s["y"] = s.get("kept", s["att"]) @ s["v"]
        s["merged"] = s["y"].transpose(1, 2).reshape(B, T, C)
        out = s["merged"] @ self.params["proj_weight"]
        return out + self.params["proj_bias"] if "proj_bias" in self.params else out

    def backward(self, dout):
        s, g = self.saved, self.saved_grads
        B, T, C = dout.shape
        H, D = self.n_head, self.head_dim
        # out = merged Wo + bo
        self.grads["proj_weight"].add_(s["merged"].reshape(-1, C).T @ dout.reshape(-1, C))
        if "proj_bias" in self.grads:
            self.grads["proj_bias"].add_(dout.sum((0, 1)))
        g["merged"] = dout @ self.params["proj_weight"].T
        # merged = the heads side by side: split them back
        g["y"] = g["merged"].reshape(B, T, H, D).transpose(1, 2)
        if "kept" in s:
            # y = kept v:  d kept = dy v^T,  dv = kept^T dy;  kept = att * m:  d att = d kept * m
            g["kept"] = g["y"] @ s["v"].transpose(2, 3)
            g["v"] = s["kept"].transpose(2, 3) @ g["y"]
            g["att"] = self.dropout_backward(g["kept"].clone(), s["att_mask"])
        else:
            # y = att v:  d att = dy v^T,  dv = att^T dy
            g["att"] = g["y"] @ s["v"].transpose(2, 3)
            g["v"] = s["att"].transpose(2, 3) @ g["y"]
        # att = softmax(masked):  d masked = att * (d att - sum_s(d att * att))
        g["masked"] = s["att"] * (g["att"] - (g["att"] * s["att"]).sum(-1, keepdim=True))
        # masked = scores where the key is not in the future, a constant (-inf) where it is
        g["scores"] = self.mask_backward(g["masked"], s["future"])
        # scores = q k^T / sqrt(D):  dq = d scores k / sqrt(D),  dk = d scores^T q / sqrt(D)
        g["q"] = (g["scores"] @ s["k"]) * self.scale
        g["k"] = (g["scores"].transpose(2, 3) @ s["q"]) * self.scale
        # q, k, v = qkv split in three along channels, each (B, T, C) cut into heads
        g["qkv"] = torch.cat([t.transpose(1, 2).reshape(B, T, C) for t in (g["q"], g["k"], g["v"])], dim=2)
        # qkv = x Wqkv + bqkv
        self.grads["qkv_weight"].add_(s["x"].reshape(-1, C).T @ g["qkv"].reshape(-1, 3 * C))
        if "qkv_bias" in self.grads:
            self.grads["qkv_bias"].add_(g["qkv"].sum((0, 1)))
        return g["qkv"] @ self.params["qkv_weight"].T

    @staticmethod
    def mask_backward(dmasked, future):
        """d scores: d masked where the key is visible, 0 at future keys (the constant there has no input)."""
        return dmasked.masked_fill(future, 0.0)
