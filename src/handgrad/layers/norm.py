"""Normalization layers, each forward with its hand-written backward right below it."""
from __future__ import annotations

import torch

from .. import parallel
from ..errors import HandgradError
from .core import Module


class BatchNorm1d(Module):
    """Batch normalization over the batch (and time) axes, fused backward.

    Training: batch mean and biased variance (+ eps); running statistics are
    updated with `momentum` (0.01, as the seed notebook). Eval: the running
    statistics. The running variance is the biased one, the same quantity the
    training forward divides by, so eval is consistent with training. In a
    data-parallel step (`parallel.active()`), the statistics are the whole
    batch's, over every rank's rows.
    """

    syncs_across_ranks = True  # its batch statistics are the whole batch's in a data-parallel step

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

    def to(self, device=None, dtype=None, memo: dict | None = None) -> "BatchNorm1d":
        moved = self.eps_tensor.to(device=device, dtype=dtype)
        self.eps_tensor = torch.tensor(self._eps, dtype=moved.dtype, device=moved.device)  # from eps: exact in float64
        return super().to(device, dtype, memo)

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
        shard = parallel.active() if self.training else None
        if shard is not None:
            return self.forward_sharded(x, shard)
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
        self.saved.pop("shard", None)
        return torch.addcmul(self.params["bias"], xhat, self.params["weight"])

    def forward_sharded(self, x, shard):
        """Training on this rank's rows of a batch split over the ranks: the whole batch's mean and
        variance from one sum over the ranks (each sum costs its latency), of x - c and (x - c)^2 with c
        the running mean, the same on every rank and near the batch's: var = mean((x - c)^2) - (mean - c)^2
        without the cancellation that c = 0 would risk."""
        dims, n = self.reduce_dims(x), shard.global_count(x)
        xs = x - self.buffers["running_mean"]
        sums = shard.summed(torch.stack([xs.sum(dims), (xs * xs).sum(dims)])).div_(n)
        shift, var = sums[0], (sums[1] - sums[0] * sums[0]).clamp_(min=0)
        mean = shift + self.buffers["running_mean"]
        self.update_running_stats(mean, var)
        rstd = (var + self.eps).rsqrt_()
        xc = xs.sub_(shift)
        xhat = xc * rstd
        self.saved["xhat"], self.saved["rstd"], self.saved["shard"] = xhat, rstd, shard
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
        shard = self.saved.get("shard")
        if shard is not None:  # the sums over the whole batch's N rows (this rank's parts go to the weights)
            sums = shard.summed(torch.stack([dout_sum, dout_xhat_sum]))
            dout_sum, dout_xhat_sum, n = sums[0], sums[1], shard.global_count(dout)
        else:
            n = dout.numel() // dout.shape[-1]
        # dx = scale * (dy - sum(dy) / N - xhat * sum(dy * xhat) / N), in three passes
        return torch.addcmul(dout, xhat, dout_xhat_sum, value=-1 / n).add_(dout_sum, alpha=-1 / n).mul_(scale)


class BatchNorm1dStepwise(BatchNorm1d):
    """Batch normalization as a chain of small steps, each intermediate kept by name:
    mean -> diff -> squared diff -> variance -> std -> normalize -> scale and shift.
    """

    inspectable = ("bnmean", "bndiff", "bndiff2", "bnvar", "bnstd", "bnraw")
    syncs_across_ranks = False  # a teaching form: its statistics are this process's rows only

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



class LayerNorm(Module):
    """Layer normalization over the last axis (channels), each row on its own: the same in training
    and eval, no running statistics.

    Keeps from the forward: the input (a reference to the tensor it was given) and each row's mean
    and rstd = 1 / sqrt(biased var + eps), (..., 1) each; the backward recomputes
    xhat = (x - mean) * rstd from them rather than keeping a tensor of the input's size.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.add_param("weight", torch.ones(dim))
        self.add_param("bias", torch.zeros(dim))

    def forward(self, x):
        if x.shape[-1] != self.dim:
            raise HandgradError(f"layer norm over {self.dim} channels got an input of shape {tuple(x.shape)}")
        # one kernel: the row means, rstd, and gamma * xhat + beta
        out, mean, rstd = torch.native_layer_norm(x, (self.dim,), self.params["weight"], self.params["bias"], self.eps)
        self.saved["x"], self.saved["mean"], self.saved["rstd"] = x, mean, rstd
        return out

    # xhat = (x - mean) * rstd over C channels, dxhat = dy * gamma:
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dgamma = sum(dy * xhat),  dbeta = sum(dy)
    def backward(self, dout):
        s = self.saved
        rows = tuple(range(dout.ndim - 1))
        xhat = (s["x"] - s["mean"]).mul_(s["rstd"])
        self.grads["weight"].add_((dout * xhat).sum(rows))
        self.grads["bias"].add_(dout.sum(rows))
        dxhat = dout * self.params["weight"]
        dxhat_mean = dxhat.mean(-1, keepdim=True)
        dxhat_xhat_mean = (dxhat * xhat).mean(-1, keepdim=True)
        # (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) * rstd, in dxhat's memory
        return dxhat.sub_(dxhat_mean).sub_(xhat.mul_(dxhat_xhat_mean)).mul_(s["rstd"])


class LayerNormStepwise(LayerNorm):
    """Layer normalization as a chain of small steps over the last axis, each intermediate kept by name:
    mean -> diff -> squared diff -> variance -> rstd -> normalize -> scale and shift.
    """

    inspectable = ("lnmean", "lndiff", "lndiff2", "lnvar", "lnrstd", "lnraw")

    def forward(self, x):
        if x.shape[-1] != self.dim:
            raise HandgradError(f"layer norm over {self.dim} channels got an input of shape {tuple(x.shape)}")
        s = self.saved
        s["lnmean"] = x.mean(-1, keepdim=True)
        s["lndiff"] = x - s["lnmean"]
        s["lndiff2"] = s["lndiff"] ** 2
        s["lnvar"] = s["lndiff2"].mean(-1, keepdim=True)  # biased: divide by C
        s["lnrstd"] = (s["lnvar"] + self.eps).rsqrt()
        s["lnraw"] = s["lndiff"] * s["lnrstd"]
        return s["lnraw"] * self.params["weight"] + self.params["bias"]

    def backward(self, dout):
        s, g = self.saved, self.saved_grads
        rows = tuple(range(dout.ndim - 1))
        n = dout.shape[-1]
        # out = gamma * lnraw + beta
        self.grads["weight"].add_((dout * s["lnraw"]).sum(rows))
        self.grads["bias"].add_(dout.sum(rows))
        g["lnraw"] = dout * self.params["weight"]
        # lnraw = lndiff * lnrstd
        g["lnrstd"] = (g["lnraw"] * s["lndiff"]).sum(-1, keepdim=True)
        dlndiff = g["lnraw"] * s["lnrstd"]
        # lnrstd = (lnvar + eps)^(-1/2):  d/dlnvar = -rstd^3 / 2
        g["lnvar"] = -0.5 * g["lnrstd"] * s["lnrstd"] ** 3
        # lnvar = mean(lndiff2) over channels:  each element gets 1/C
        g["lndiff2"] = g["lnvar"].expand_as(dout) / n
        # lndiff2 = lndiff^2:  d/dlndiff = 2 lndiff
        g["lndiff"] = dlndiff + 2 * s["lndiff"] * g["lndiff2"]
        # lndiff = x - lnmean
        g["lnmean"] = -g["lndiff"].sum(-1, keepdim=True)
        # lnmean = mean(x) over channels:  each element gets 1/C
        return g["lndiff"] + g["lnmean"] / n
