"""The fused table layers: the leading Embedding -> Flatten -> Linear (-> BatchNorm1d -> Tanh) of a
model run as one layer over those layers' very tensors, which at large batches computes on small
per-position tables instead of batch rows. The compiled step runs them (`fastpath.fused`); their
gradient checks are in tests/test_layers.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import parallel
from .core import Embedding, Linear, Module, Tanh
from .norm import BatchNorm1d


class EmbeddingLinear(Module):
    """Embedding -> Flatten -> Linear as one layer, sharing those layers' very tensors (parameters
    and gradient buffers): ids (B, T) -> (B, H).

    With W_t the rows of the Linear's weight that position t's embedding meets, out[b] =
    sum_t C[x[b,t]] W_t (+ bias). For batches several times the vocabulary V, the layer first
    computes the table P_t = C W_t (T tables of V x H): the forward's B x (T*E) x H matmul
    becomes a gather-and-sum of B*T table rows, and the backward's two B-sized matmuls a
    scatter-add into the tables and two V-sized matmuls. Smaller batches take the layers' own
    route: the Embedding's and the Linear's forward and backward, run in turn.
    """

    fold_above = 4  # batches over this many times the vocabulary take the table route (compiled, one CPU core:
    # at 32 rows and a vocabulary of 27 the layers' route is 15% faster, at 128 the two tie, at 512 the tables win by 25%)

    def __init__(self, embedding: "Embedding", linear: "Linear"):
        super().__init__()
        self.embedding, self.linear = embedding, linear
        # the parts' very parameters and gradient buffers, under this layer's names (the walks over its
        # children then meet each tensor once, so `to` and `flatten` keep them shared)
        for name, layer, key in (("embedding", embedding, "weight"), ("weight", linear, "weight"),
                                 ("bias", linear, "bias")):
            if key in layer.params:
                self.params[name], self.grads[name] = layer.params[key], layer.grads[key]

    def named_children(self):
        return (("embedding", self.embedding), ("linear", self.linear))

    def forward(self, idx):
        C, W, b = self.params["embedding"], self.params["weight"], self.params.get("bias")
        (V, E), (B, T), H = C.shape, idx.shape, W.shape[1]
        if W.shape[0] != T * E:
            raise ValueError(f"EmbeddingLinear: {T} positions of {E} channels do not match a weight of {W.shape[0]} rows")
        self.saved.clear()  # the backward takes the route of the last forward
        if B <= self.fold_above * V:  # the layers' own route (the view is the Flatten between them)
            return self.linear.forward(self.embedding.forward(idx).view(B, T * E))
        rows = self.stacked_rows(idx, V)
        self.saved["rows"] = rows
        out = F.embedding_bag(rows, self.tables(T).view(T * V, H), mode="sum")  # sum_t P_t[x[b,t]]
        return out if b is None else out.add_(b)

    def tables(self, T: int):
        """(T, V, H): P_t = C W_t, what position t's id contributes to the output."""
        C, W = self.params["embedding"], self.params["weight"]
        return torch.matmul(C, W.view(T, C.shape[1], W.shape[1]))

    @staticmethod
    def stacked_rows(idx, V: int):
        """The row of (t, x[b,t]) in the T tables stacked as one (T * V, H) matrix."""
        return idx + torch.arange(0, idx.shape[1] * V, V, device=idx.device)

    # out[b] = sum_t P_t[x[b,t]], P_t = C W_t:  dP_t[v] = sum of dout[b] over x[b,t] = v;  dW_t = C^T dP_t;  dC = sum_t dP_t W_t^T
    def backward(self, dout):
        C, W = self.params["embedding"], self.params["weight"]
        (V, E), H = C.shape, W.shape[1]
        T = W.shape[0] // E
        if "rows" not in self.saved:  # the layers' own route: the Linear's, then the Embedding's backward
            return self.embedding.backward(self.linear.backward(dout).view(dout.shape[0], T, E))
        if "bias" in self.grads:
            self.grads["bias"].add_(dout.sum(0))
        rows = self.saved["rows"]
        dtables = dout.new_zeros(T * V, H)
        for t in range(T):
            dtables.index_add_(0, rows[:, t], dout)
        self.table_backward(dtables.view(T, V, H))
        return None

    # P_t = C W_t:  dW_t = C^T dP_t,  dC = sum over t of dP_t W_t^T
    def table_backward(self, dtables):
        """The parameters' gradients from the tables' (T, V, H); the bias's is added by the caller."""
        C, W = self.params["embedding"], self.params["weight"]
        T, E, H = dtables.shape[0], C.shape[1], W.shape[1]
        self.grads["weight"].add_(torch.matmul(C.T, dtables).view(T * E, H))
        self.grads["embedding"].add_(torch.matmul(dtables, W.view(T, E, H).transpose(1, 2)).sum(0))


class EmbeddingLinearBatchNormTanh(Module):
    """Embedding -> Flatten -> Linear -> BatchNorm1d -> Tanh as one layer, over those layers' very
    tensors (parameters, gradient buffers, running statistics): ids (B, T) -> (B, H).

    In training, for batches several times the vocabulary V, everything between the ids and the
    Tanh is computed on T small tables instead of B rows. With P_t = C W_t the Linear's output is
    hpre[b] = sum_t P_t[x[b,t]] + bias, so the BatchNorm's batch statistics follow from how often
    each id sits at each position (n_t[v]) and each pair of ids at each pair of positions
    (n_tu[v,w]): the mean is sum_t n_t P_t / N, and with the centred tables Q_t the variance is
    the mean of (sum_t Q_t[x[b,t]])^2, squares weighted by n_t and cross terms by n_tu. Then
    xhat[b] = sum_t R_t[x[b,t]] with R_t = Q_t * rstd, one gather per row. The backward likewise
    works on per-table sums: one pass over the batch sums dy = dout (1 - h^2) by the id at each
    position, and the rest is table-sized. Elsewhere (eval, small batches) the layers run in turn.

    In a data-parallel step (`parallel.active()`), the statistics are the whole batch's: the counts
    n_t and n_tu are summed over the ranks for the mean and variance, and so are sum(dy) and
    sum(dy xhat) in the backward; each rank's table gradients stay its own rows' (summed with the
    other gradients after the backward).
    """

    def __init__(self, embedding: "Embedding", linear: "Linear", batchnorm: "BatchNorm1d", tanh: "Tanh"):
        super().__init__()
        self.first, self.batchnorm, self.tanh = EmbeddingLinear(embedding, linear), batchnorm, tanh
        # the parts' very parameters, gradient buffers and running statistics, under this layer's names
        self.params.update(self.first.params)
        self.grads.update(self.first.grads)
        for name in ("weight", "bias"):
            self.params[f"batchnorm.{name}"] = batchnorm.params[name]
            self.grads[f"batchnorm.{name}"] = batchnorm.grads[name]
        self.buffers.update(batchnorm.buffers)
        self.training = batchnorm.training

    def named_children(self):
        return (("first", self.first), ("batchnorm", self.batchnorm), ("tanh", self.tanh))

    @staticmethod
    def position_pairs(T: int) -> list[tuple[int, int]]:
        return [(t, u) for t in range(T) for u in range(t + 1, T)]

    def forward(self, idx):
        C, W, bias = self.params["embedding"], self.params["weight"], self.params.get("bias")
        gamma, beta = self.params["batchnorm.weight"], self.params["batchnorm.bias"]
        (V, E), (N, T), H = C.shape, idx.shape, W.shape[1]
        self.saved.clear()  # the backward takes the route of the last forward
        shard = parallel.active() if self.batchnorm.training else None
        whole = N if shard is None else shard.total  # the batch's rows, over every rank: every rank takes one route
        if not self.batchnorm.training or whole <= self.first.fold_above * V or W.shape[0] != T * E:
            return self.tanh.forward(self.batchnorm.forward(self.first.forward(idx)))
        tables = self.first.tables(T)
        ones = C.new_ones(N)
        counts = torch.stack([C.new_zeros(V).index_add_(0, idx[:, t], ones) for t in range(T)])  # n_t[v]
        pairs = [C.new_zeros(V * V).index_add_(0, idx[:, t] * V + idx[:, u], ones).view(V, V)  # n_tu[v, w]
                 for t, u in self.position_pairs(T)]
        counts_all, pairs_all = counts, pairs  # the whole batch's counts, which the statistics take
        if shard is not None:
            summed = shard.summed(torch.cat([counts.reshape(-1), *(n.reshape(-1) for n in pairs)]))
            counts_all = summed[:T * V].view(T, V)
            pairs_all = [summed[T * V + k * V * V:T * V + (k + 1) * V * V].view(V, V) for k in range(len(pairs))]
        m = torch.bmm(counts_all.unsqueeze(1), tables).squeeze(1) / whole  # (T, H): position t's share of the mean
        Q = tables - m.unsqueeze(1)  # hpre[b] - mean = sum_t Q_t[x[b,t]]
        var = (counts_all.unsqueeze(-1) * Q * Q).sum((0, 1))  # N * mean of (sum_t Q_t[x[b,t]])^2: squares ...
        for (t, u), n_tu in zip(self.position_pairs(T), pairs_all):
            var = var + 2 * (Q[t] * (n_tu @ Q[u])).sum(0)  # ... and cross terms
        var = (var / whole).clamp_(min=0)  # a sum of squares: rounding must not take it below zero
        self.batchnorm.update_running_stats(m.sum(0) if bias is None else m.sum(0) + bias, var)
        rstd = (var + self.batchnorm.eps).rsqrt()
        R = Q * rstd  # xhat[b] = sum_t R_t[x[b,t]]
        rows = self.first.stacked_rows(idx, V)
        out = F.embedding_bag(rows, (R * gamma).view(T * V, H), mode="sum").add_(beta)
        self.saved.update(idx=idx, counts=counts, R=R, rstd=rstd, shard=shard)  # this rank's own counts
        self.saved.update({f"pairs{k}": n for k, n in enumerate(pairs)})
        return self.tanh.forward(out)

    # dy = dout (1 - h^2);  dP_t[v] = gamma rstd (A_t[v] - n_t[v] sum(dy)/N - X_t[v] sum(dy xhat)/N), with A_t[v]
    # and X_t[v] the sums of dy and of xhat over the rows where x[b,t] = v:  X_t = n_t R_t + sum_u n_tu R_u
    def backward(self, dout):
        if "R" not in self.saved:
            return self.first.backward(self.batchnorm.backward(self.tanh.backward(dout)))
        s = self.saved
        idx, counts, R, rstd = s["idx"], s["counts"], s["R"], s["rstd"]
        (N, T), (_, V, H) = idx.shape, R.shape
        dy = self.tanh.backward(dout)  # the BatchNorm's dout
        A = torch.stack([dy.new_zeros(V, H).index_add_(0, idx[:, t], dy) for t in range(T)])  # the one pass
        dy_sum = A[0].sum(0)  # every row sits in exactly one of position 0's sums
        dy_xhat_sum = (A * R).sum((0, 1))  # sum_b dy[b] xhat[b] = sum_t sum_v A_t[v] R_t[v]
        torch._foreach_add_([self.grads["batchnorm.weight"], self.grads["batchnorm.bias"]], [dy_xhat_sum, dy_sum])
        if s["shard"] is not None:  # the whole batch's sums and rows, in the statistics' terms below
            sums = s["shard"].summed(torch.stack([dy_sum, dy_xhat_sum]))
            dy_sum, dy_xhat_sum, N = sums[0], sums[1], s["shard"].total
        X = [counts[t].unsqueeze(-1) * R[t] for t in range(T)]
        for k, (t, u) in enumerate(self.position_pairs(T)):
            X[t] = X[t] + s[f"pairs{k}"] @ R[u]
            X[u] = X[u] + s[f"pairs{k}"].T @ R[t]
        scale = self.params["batchnorm.weight"] * rstd
        dtables = scale * (A - counts.unsqueeze(-1) * (dy_sum / N) - torch.stack(X) * (dy_xhat_sum / N))
        if "bias" in self.grads:  # the Linear's bias: dx summed over the batch, which table 0's rows hold once each
            self.grads["bias"].add_(dtables[0].sum(0))
        self.first.table_backward(dtables)
        return None
