"""Layers: each forward with its hand-written backward right below it.

Conventions (as in torch.nn):
- `forward(x)` returns the output and keeps in `self.saved` exactly what the
  backward needs; stepwise forms keep every named intermediate there.
- `backward(dout)` returns the gradient for the input and *accumulates* the
  parameters' gradients into `self.grads`, the buffers the optimizer reads.
  Gradients of named intermediates are kept in `self.saved_grads`.
- Inputs may be (batch, channels) or (batch, time, channels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def packed(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The one 1-D tensor that `tensors`, views of it, fill end to end in their order; else None."""
    base = tensors[0]._base if tensors else None
    if base is None or base.ndim != 1 or not base.is_contiguous():
        return None
    at = base.data_ptr()
    for t in tensors:
        if t._base is not base or not t.is_contiguous() or t.data_ptr() != at:
            return None
        at += t.numel() * t.element_size()
    return base if at == base.data_ptr() + base.numel() * base.element_size() else None


def memory_order(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1)


def views_like(flat: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous views of `flat`, end to end, of the shapes of `tensors` (what `packed` finds again)."""
    views, start = [], 0
    for t in tensors:
        views.append(flat[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return views


def zero_all(tensors: list[torch.Tensor]) -> None:
    if torch.compiler.is_compiling():  # the compiler fuses these into its kernels
        for t in tensors:
            t.zero_()
    elif tensors:
        torch._foreach_zero_(tensors)  # eager: one call for the whole list


class Module:
    """Parameters, their gradient buffers, non-trained buffers, saved intermediates."""

    def __init__(self):
        self.params: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self.saved: dict[str, torch.Tensor] = {}
        self.saved_grads: dict[str, torch.Tensor] = {}
        self.training = True

    def add_param(self, name: str, value: torch.Tensor) -> None:
        self.params[name] = value
        self.grads[name] = torch.zeros_like(value)  # laid out as the parameter

    def named_parameters(self, prefix: str = ""):
        for name, p in self.params.items():
            yield prefix + name, p

    def named_grads(self, prefix: str = ""):
        for name, g in self.grads.items():
            yield prefix + name, g

    def named_buffers(self, prefix: str = ""):
        for name, b in self.buffers.items():
            yield prefix + name, b

    def named_intermediates(self, prefix: str = ""):
        """Intermediates of the last forward that a check can compare (stepwise forms)."""
        for name, t in self.saved.items():
            if name in self.inspectable:
                yield prefix + name, t

    def named_intermediate_grads(self, prefix: str = ""):
        for name, t in self.saved_grads.items():
            yield prefix + name, t

    inspectable: tuple[str, ...] = ()

    def zero_grad(self) -> None:
        zero_all(list(self.grads.values()))

    def clear_saved(self) -> None:
        """Drop what the last forward and backward kept."""
        self.saved.clear()
        self.saved_grads.clear()

    def train(self, mode: bool = True) -> "Module":
        self.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def to(self, device=None, dtype=None) -> "Module":
        """Move parameters, gradient buffers and buffers; call before building an optimizer."""
        for d in (self.params, self.grads, self.buffers):
            for k, v in d.items():
                d[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        return self

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError


class Embedding(Module):
    """Lookup table: ids (B, T) -> vectors (B, T, C)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.add_param("weight", torch.randn(num_embeddings, embedding_dim))

    def forward(self, idx):
        self.saved["idx"] = idx
        return torch.embedding(self.params["weight"], idx)  # rows of weight, one per id

    # d out[b,t,:] / d weight[i,:] = 1 where idx[b,t] == i: scatter-add dout into the rows used
    def backward(self, dout):
        w, idx = self.grads["weight"], self.saved["idx"]
        if w.is_cpu:  # one call, no flattening views; it adds in the ids' order, as index_add_ does
            w.index_put_((idx,), dout, accumulate=True)
        else:  # on a GPU index_put_'s accumulating kernel cannot be recorded in a CUDA graph
            w.index_add_(0, idx.reshape(-1), dout.reshape(-1, w.shape[1]))
        return None


class Flatten(Module):
    """Concatenate the context's embeddings: (B, T, C) -> (B, T*C)."""

    def forward(self, x):
        self.saved["shape"] = x.shape
        return x.reshape(x.shape[0], -1)

    # a reshape: d out / d x is the identity, so dx is dout in x's shape
    def backward(self, dout):
        return dout.reshape(*self.saved["shape"])  # unpacked: a torch.Size argument takes a slower path


class FlattenConsecutive(Module):
    """Merge n consecutive time steps into channels: (B, T, C) -> (B, T/n, C*n); a time axis of 1 is squeezed."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x):
        B, T, C = x.shape
        if T % self.n:
            raise ValueError(f"FlattenConsecutive({self.n}) needs a time length divisible by {self.n}, got {T}")
        self.saved["shape"] = x.shape
        out = x.reshape(B, T // self.n, C * self.n)
        return out.squeeze(1) if T // self.n == 1 else out

    # a reshape: d out / d x is the identity, so dx is dout in x's shape
    def backward(self, dout):
        return dout.reshape(*self.saved["shape"])  # unpacked: a torch.Size argument takes a slower path


PAD_MIN_ROWS = 1024  # matmuls over at least this many rows pad a narrow output side


def output_padding(width: int, rows: int, device: torch.device) -> int:
    """Zero columns that bring a Linear's output width up to a multiple of 16 floats (64 bytes), for
    matmuls over many rows on a CPU, where it was measured: on one core, 8192 x 200 by 200 x 27 and
    its two backward products run about 1.3x faster padded to 32 columns, copies of the padding
    included (docs/bench.md). The real columns come out bit for bit as unpadded (tests/test_layers.py
    checks this on the machine it runs on): each output entry is the same dot product."""
    return -width % 16 if device.type == "cpu" and rows >= PAD_MIN_ROWS and width < 64 else 0


class Linear(Module):
    """y = x @ weight + bias, weight of shape (fan_in, fan_out)."""

    def __init__(self, fan_in: int, fan_out: int, bias: bool = True, gain: float = 1.0):
        super().__init__()
        # Kaiming-style scale gain / sqrt(fan_in) keeps the output's variance near gain^2 * var(x)
        self.add_param("weight", torch.randn(fan_in, fan_out) * gain * fan_in**-0.5)
        if bias:
            self.add_param("bias", torch.zeros(fan_out))

    def forward(self, x):
        if x.ndim != 2:  # (batch, time, channels): the rows of every time step are one matrix
            return self.forward(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
        self.saved["x"] = x
        w, b = self.params["weight"], self.params.get("bias")
        pad = x.shape[0] >= PAD_MIN_ROWS and output_padding(w.shape[1], x.shape[0], x.device)  # rows first: small batches skip the call
        if pad:  # multiply by the weight padded with zero columns, keep the real columns
            w = F.pad(w, (0, pad))
            b = None if b is None else F.pad(b, (0, pad))
            return (torch.mm(x, w) if b is None else torch.addmm(b, x, w))[:, :-pad]
        return torch.mm(x, w) if b is None else torch.addmm(b, x, w)

    # y = x W + b:  dx = dy W^T,  dW = x^T dy,  db = sum over rows of dy
    def backward(self, dout):
        if dout.ndim != 2:  # as the forward: one matrix of rows
            return self.backward(dout.reshape(-1, dout.shape[-1])).view(*dout.shape[:-1], -1)
        w, x = self.params["weight"], self.saved["x"]
        if "bias" in self.grads:
            self.grads["bias"].add_(dout.sum(0))
        pad = x.shape[0] >= PAD_MIN_ROWS and output_padding(w.shape[1], x.shape[0], x.device)
        if pad:  # zero columns in dy and W: the real columns' products as unpadded, in faster matmul shapes
            dout, w = F.pad(dout, (0, pad)), F.pad(w, (0, pad))
            self.grads["weight"].add_(torch.mm(x.T, dout)[:, :-pad])
        else:
            self.grads["weight"].addmm_(x.T, dout)
        return F.linear(dout, w)  # dout W^T, the transpose taken inside the one call


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
        for name, layer, key in (("embedding", embedding, "weight"), ("weight", linear, "weight"), ("bias", linear, "bias")):
            if key in layer.params:
                self.params[name], self.grads[name] = layer.params[key], layer.grads[key]

    def clear_saved(self) -> None:
        super().clear_saved()
        self.embedding.clear_saved()
        self.linear.clear_saved()

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
    """

    def __init__(self, embedding: "Embedding", linear: "Linear", batchnorm: "BatchNorm1d", tanh: "Tanh"):
        super().__init__()
        self.first, self.batchnorm, self.tanh = EmbeddingLinear(embedding, linear), batchnorm, tanh
        self.params.update(self.first.params)
        self.grads.update(self.first.grads)
        for name in ("weight", "bias"):
            self.params[f"batchnorm.{name}"] = batchnorm.params[name]
            self.grads[f"batchnorm.{name}"] = batchnorm.grads[name]
        self.buffers.update(batchnorm.buffers)
        self.training = batchnorm.training

    def train(self, mode: bool = True) -> "EmbeddingLinearBatchNormTanh":
        for layer in (self, self.first, self.batchnorm, self.tanh):
            layer.training = mode
        return self

    def clear_saved(self) -> None:
        super().clear_saved()
        for layer in (self.first, self.batchnorm, self.tanh):
            layer.clear_saved()

    @staticmethod
    def position_pairs(T: int) -> list[tuple[int, int]]:
        return [(t, u) for t in range(T) for u in range(t + 1, T)]

    def forward(self, idx):
        C, W, bias = self.params["embedding"], self.params["weight"], self.params.get("bias")
        gamma, beta = self.params["batchnorm.weight"], self.params["batchnorm.bias"]
        (V, E), (N, T), H = C.shape, idx.shape, W.shape[1]
        self.saved.clear()  # the backward takes the route of the last forward
        if not self.batchnorm.training or N <= self.first.fold_above * V or W.shape[0] != T * E:
            return self.tanh.forward(self.batchnorm.forward(self.first.forward(idx)))
        tables = self.first.tables(T)
        ones = C.new_ones(N)
        counts = torch.stack([C.new_zeros(V).index_add_(0, idx[:, t], ones) for t in range(T)])  # n_t[v]
        pairs = [C.new_zeros(V * V).index_add_(0, idx[:, t] * V + idx[:, u], ones).view(V, V)  # n_tu[v, w]
                 for t, u in self.position_pairs(T)]
        m = torch.bmm(counts.unsqueeze(1), tables).squeeze(1) / N  # (T, H): position t's share of the mean
        Q = tables - m.unsqueeze(1)  # hpre[b] - mean = sum_t Q_t[x[b,t]]
        var = (counts.unsqueeze(-1) * Q * Q).sum((0, 1))  # N * mean of (sum_t Q_t[x[b,t]])^2: squares ...
        for (t, u), n_tu in zip(self.position_pairs(T), pairs):
            var = var + 2 * (Q[t] * (n_tu @ Q[u])).sum(0)  # ... and cross terms
        var = (var / N).clamp_(min=0)  # a sum of squares: rounding must not take it below zero
        self.batchnorm.update_running_stats(m.sum(0) if bias is None else m.sum(0) + bias, var)
        rstd = (var + self.batchnorm.eps).rsqrt()
        R = Q * rstd  # xhat[b] = sum_t R_t[x[b,t]]
        rows = self.first.stacked_rows(idx, V)
        out = F.embedding_bag(rows, (R * gamma).view(T * V, H), mode="sum").add_(beta)
        self.saved.update(idx=idx, counts=counts, R=R, rstd=rstd)
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


class Tanh(Module):
    """tanh(x), computed as 2 sigmoid(2x) - 1: the same function (float32 results within 2e-7
    of torch.tanh), and on a CPU core faster, eager or compiled, even as three ops on a small tensor.
    x + x rather than 2 * x: an op on two tensors skips wrapping a Python number into a tensor."""

    def __init__(self):
        super().__init__()
        self.minus_one = torch.tensor(-1.0)  # a tensor, so that -1 + 2 s is one op

    def to(self, device=None, dtype=None) -> "Tanh":
        self.minus_one = self.minus_one.to(device=device, dtype=dtype)
        return super().to(device, dtype)

    def forward(self, x):
        s = (x + x).sigmoid_()
        # -1 + 2 s, rounded once as (s + s) - 1 is; written over s, unless autograd is recording this
        # forward (its sigmoid backward reads s)
        out = torch.add(self.minus_one, s, alpha=2, out=None if torch.is_grad_enabled() else s)
        self.saved["out"] = out
        return out

    # d tanh(x)/dx = 1 - tanh(x)^2, from the saved output:  dx = dout - dout * out * out
    def backward(self, dout):
        out = self.saved["out"]
        product = dout * out
        return torch.addcmul(dout, product, out, value=-1, out=product)  # into the product's memory, read as it is written


class BatchNorm1d(Module):
    """Batch normalization over the batch (and time) axes, fused backward.

    Training: batch mean and biased variance (+ eps); running statistics are
    updated with `momentum` (0.01, as the seed notebook). Eval: the running
    statistics. The running variance is the biased one, the same quantity the
    training forward divides by, so eval is consistent with training.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.01):
        super().__init__()
        self.eps_tensor = torch.tensor(eps)
        self.eps = eps
        self.momentum = momentum
        self.add_param("weight", torch.ones(dim))
        self.add_param("bias", torch.zeros(dim))
        self.buffers["running_mean"] = torch.zeros(dim)
        self.buffers["running_var"] = torch.ones(dim)

    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        # also kept as a tensor, of the layer's dtype and device: subtracting a tensor of one element
        # skips wrapping a Python number into a new tensor on every call (about 1.5 us on a CPU core)
        self._eps = float(value)
        self.eps_tensor = torch.tensor(self._eps, dtype=self.eps_tensor.dtype, device=self.eps_tensor.device)

    def to(self, device=None, dtype=None) -> "BatchNorm1d":
        moved = self.eps_tensor.to(device=device, dtype=dtype)
        self.eps_tensor = torch.tensor(self._eps, dtype=moved.dtype, device=moved.device)  # from eps: exact in float64
        return super().to(device, dtype)

    @staticmethod
    def reduce_dims(x) -> int | tuple[int, ...]:
        """Every axis but channels; a plain 0 for (batch, channels), the faster form to reduce over."""
        return 0 if x.ndim == 2 else tuple(range(x.ndim - 1))

    def update_running_stats(self, mean, var) -> None:
        """`mean` and `var` of shape (channels,): running <- (1 - momentum) * running + momentum * batch statistic."""
        if torch.is_grad_enabled():  # the running statistics are not part of any gradient
            mean, var = mean.detach(), var.detach()
        torch._foreach_lerp_([self.buffers["running_mean"], self.buffers["running_var"]], [mean, var], self.momentum)

    def forward(self, x):
        if self.training and x.ndim == 2 and not torch.compiler.is_compiling():
            # (batch, channels), eager: torch's batch-norm kernel without affine or running statistics
            # gives xhat, the batch mean and rstd = 1 / sqrt(biased var + eps) in one call (two passes
            # over x). Compiled, the sums below fuse better (the kernel would become a running variance).
            xhat, mean, rstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, self._eps)
            self.update_running_stats(mean, rstd.pow(-2).sub_(self.eps_tensor))
        else:
            if self.training:
                # two passes (mean, then the mean square of x - mean): exact, and far faster over a
                # long batch axis than a one-pass running variance
                dims = self.reduce_dims(x)
                mean = x.mean(dims)
                xc = x - mean
                var = (xc * xc).mean(dims)
                self.update_running_stats(mean, var)
            else:
                xc = x - self.buffers["running_mean"]
                var = self.buffers["running_var"]
            rstd = (var + self.eps).rsqrt_()
            xhat = xc * rstd
        self.saved["xhat"], self.saved["rstd"] = xhat, rstd
        return torch.addcmul(self.params["bias"], xhat, self.params["weight"])

    # xhat = (x - mean) * rstd over N rows:  dx = gamma * rstd / N * (N dy - sum(dy) - xhat * sum(dy * xhat))
    def backward(self, dout):
        dims = self.reduce_dims(dout)
        xhat, rstd = self.saved["xhat"], self.saved["rstd"]
        dout_sum = dout.sum(dims)
        dout_xhat_sum = (dout * xhat).sum(dims)
        self.grads["weight"].add_(dout_xhat_sum)  # two adds: faster than one foreach call over two tensors
        self.grads["bias"].add_(dout_sum)
        scale = self.params["weight"] * rstd  # gamma * rstd
        if not self.training:  # running statistics are constants
            return dout * scale
        n = dout.numel() // dout.shape[-1]
        # dx = scale * (dy - sum(dy) / N - xhat * sum(dy * xhat) / N), in three passes
        return torch.addcmul(dout, xhat, dout_xhat_sum, value=-1 / n).add_(dout_sum, alpha=-1 / n).mul_(scale)


class BatchNorm1dStepwise(BatchNorm1d):
    """Batch normalization as a chain of small steps, each intermediate kept by name:
    mean -> diff -> squared diff -> variance -> std -> normalize -> scale and shift.
    """

    inspectable = ("bnmean", "bndiff", "bndiff2", "bnvar", "bnstd", "bnraw")

    def forward(self, x):
        if not self.training:
            self.saved.clear()
            return super().forward(x)
        dims = self.reduce_dims(x)
        s = self.saved
        s["bnmean"] = x.mean(dims, keepdim=True)
        s["bndiff"] = x - s["bnmean"]
        s["bndiff2"] = s["bndiff"] ** 2
        s["bnvar"] = s["bndiff2"].mean(dims, keepdim=True)  # biased: divide by N
        s["bnstd"] = (s["bnvar"] + self.eps).sqrt()
        s["bnraw"] = s["bndiff"] / s["bnstd"]
        self.update_running_stats(s["bnmean"].reshape(-1), s["bnvar"].reshape(-1))
        return s["bnraw"] * self.params["weight"] + self.params["bias"]

    def backward(self, dout):
        if not self.training:
            return super().backward(dout)
        dims = self.reduce_dims(dout)
        s, g = self.saved, self.saved_grads
        n = dout.numel() // dout.shape[-1]
        # out = gamma * bnraw + beta
        self.grads["weight"].add_((dout * s["bnraw"]).sum(dims))
        self.grads["bias"].add_(dout.sum(dims))
        g["bnraw"] = dout * self.params["weight"]
        # bnraw = bndiff / bnstd
        g["bnstd"] = -(g["bnraw"] * s["bndiff"] / s["bnstd"] ** 2).sum(dims, keepdim=True)
        dbndiff = g["bnraw"] / s["bnstd"]
        # bnstd = sqrt(bnvar + eps):  d/dbnvar = 1 / (2 bnstd)
        g["bnvar"] = g["bnstd"] / (2 * s["bnstd"])
        # bnvar = mean(bndiff2):  each element gets 1/N
        g["bndiff2"] = g["bnvar"].expand_as(dout) / n
        # bndiff2 = bndiff^2:  d/dbndiff = 2 bndiff
        g["bndiff"] = dbndiff + 2 * s["bndiff"] * g["bndiff2"]
        # bndiff = x - bnmean
        g["bnmean"] = -g["bndiff"].sum(dims, keepdim=True)
        # bnmean = mean(x):  each element gets 1/N
        return g["bndiff"] + g["bnmean"] / n


class Sequential(Module):
    """Named layers in order; backward runs them in reverse.

    Each layer's output and its gradient are kept as '<name>.out', and the
    layers' own intermediates as '<name>.<intermediate>'.
    """

    def __init__(self, layers: list[tuple[str, Module]]):
        super().__init__()
        self.layers = dict(layers)
        self.outputs: dict[str, torch.Tensor] = {}
        self.output_grads: dict[str, torch.Tensor] = {}
        self.grad_list = [g for _, g in self.named_grads()]  # the buffers stay the same tensors until `to`
        # one tensor each holding every parameter and every gradient buffer, once `flatten` has made them
        self.param_buffer: torch.Tensor | None = None
        self.grad_buffer: torch.Tensor | None = None

    def forward(self, x):
        for name, layer in self.layers.items():
            x = layer.forward(x)
            self.outputs[name] = x
        return x

    def backward(self, dout):
        for name, layer in reversed(self.layers.items()):
            self.output_grads[name] = dout
            dout = layer.backward(dout)
        return dout

    def _each(self, method: str, prefix: str):
        for name, layer in self.layers.items():
            yield from getattr(layer, method)(f"{prefix}{name}.")

    def named_parameters(self, prefix: str = ""):
        return self._each("named_parameters", prefix)

    def named_grads(self, prefix: str = ""):
        return self._each("named_grads", prefix)

    def named_buffers(self, prefix: str = ""):
        return self._each("named_buffers", prefix)

    def named_intermediates(self, prefix: str = ""):
        for name, layer in self.layers.items():
            yield f"{prefix}{name}.out", self.outputs[name]
            yield from layer.named_intermediates(f"{prefix}{name}.")

    def named_intermediate_grads(self, prefix: str = ""):
        for name, layer in self.layers.items():
            if name in self.output_grads:
                yield f"{prefix}{name}.out", self.output_grads[name]
            yield from layer.named_intermediate_grads(f"{prefix}{name}.")

    def zero_grad(self) -> None:
        if self.grad_buffer is not None and not torch.compiler.is_compiling():  # one op for every buffer
            self.grad_buffer.zero_()
        else:
            zero_all(self.grad_list)

    def clear_saved(self) -> None:
        self.outputs.clear()
        self.output_grads.clear()
        for layer in self.layers.values():
            layer.clear_saved()

    def train(self, mode: bool = True) -> "Sequential":
        self.training = mode
        for layer in self.layers.values():
            layer.train(mode)
        return self

    def to(self, device=None, dtype=None) -> "Sequential":
        for layer in self.layers.values():
            layer.to(device, dtype)
        self.grad_list = [g for _, g in self.named_grads()]
        self.param_buffer = self.grad_buffer = None  # the layers may hold new tensors now
        return self

    def flatten(self) -> None:
        """Move the layers' parameters into one tensor, `param_buffer`, and their gradient buffers into
        another, `grad_buffer`, in the same order, each parameter and buffer becoming a view of its part
        (same shapes, same values): one op then zeroes every gradient, and one updates every parameter
        (optimizers find the two tensors by themselves). Where the tensors differ in device or dtype
        they stay as they are. Call before anything holds the old tensors (an optimizer, a recording)."""
        self.param_buffer = self._flatten("params")
        self.grad_buffer = self._flatten("grads")
        self.grad_list = [g for _, g in self.named_grads()]

    def _flatten(self, kind: str) -> torch.Tensor | None:
        owned = [(getattr(layer, kind), name, t) for layer in self.layers.values() for name, t in getattr(layer, kind).items()]
        if not owned or len({(t.device, t.dtype) for _, _, t in owned}) != 1 or len({id(t) for _, _, t in owned}) != len(owned):
            return None  # mixed devices or dtypes, or a tensor shared by two layers (copies would part them)
        flat = owned[0][2].new_empty(sum(t.numel() for _, _, t in owned))
        for (tensors, name, t), view in zip(owned, views_like(flat, [t for _, _, t in owned])):
            tensors[name] = view.copy_(t)
        return flat
