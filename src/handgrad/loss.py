"""Softmax cross-entropy, fused and stepwise, forward and backward side by side."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layers import Module


class CrossEntropy(Module):
    """Mean negative log-likelihood of the targets under softmax(logits); fused backward."""

    def __init__(self):
        super().__init__()
        self._constants: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def forward(self, logits, targets):
        if logits.ndim != 2 or targets.ndim != 1:  # (batch, time) rows are one list
            logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        # log_softmax subtracts the row max before exponentiating, so large logits cannot overflow
        logprobs = torch.log_softmax(logits, dim=1)
        self.saved["logprobs"], self.saved["targets"] = logprobs, targets
        return F.nll_loss(logprobs, targets)  # mean over rows of -logprobs[row, target]

    # d loss / d logits = (softmax(logits) - onehot(targets)) / N
    def backward(self, dloss=1.0):
        logprobs, targets = self.saved["logprobs"], self.saved["targets"]
        scale = dloss / targets.shape[0]
        if logprobs.is_cpu and not torch.compiler.is_compiling():
            # eager on a CPU: scale, -scale and the row numbers as tensors made once (wrapping a Python
            # number into a tensor costs more than the multiply), the target's column by row and target
            scale_t, minus_scale, rows = self.constants(scale, logprobs)
            return logprobs.exp().mul_(scale_t).index_put_((rows, targets), minus_scale, accumulate=True)
        # compiled, the numbers are constants of the graph; on a GPU, a scalar scatter (a CUDA graph
        # can record it, not index_put_'s accumulating kernel)
        return logprobs.exp().mul_(scale).scatter_(1, targets.view(-1, 1), -scale, reduce="add")

    def constants(self, scale: float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """scale and -scale (dtype of `like`) and the row numbers 0..N-1, on a CPU, made on first use."""
        key = (scale, like.shape[0], like.dtype)
        made = self._constants.get(key)
        if made is None:
            if len(self._constants) >= 8:  # batch sizes come and go (the last, shorter batch of an epoch)
                self._constants.clear()
            made = self._constants[key] = (torch.tensor(scale, dtype=like.dtype), torch.tensor(-scale, dtype=like.dtype),
                                           torch.arange(like.shape[0]))
        return made


class CrossEntropyStepwise(CrossEntropy):
    """The seed notebook's chain, made stable, every intermediate kept by name:
    max -> subtract -> exp -> row sum -> divide -> log -> pick -> mean.
    """

    inspectable = ("logit_maxes", "norm_logits", "counts", "counts_sum", "probs", "logprobs")

    def forward(self, logits, targets):
        s = self.saved
        logits = logits.reshape(-1, logits.shape[-1])
        targets = targets.reshape(-1)
        s["targets"] = targets
        s["logit_maxes"], s["argmax"] = logits.max(1, keepdim=True)
        s["norm_logits"] = logits - s["logit_maxes"]  # <= 0, so exp cannot overflow
        s["counts"] = s["norm_logits"].exp()
        s["counts_sum"] = s["counts"].sum(1, keepdim=True)
        s["probs"] = s["counts"] / s["counts_sum"]
        s["logprobs"] = s["probs"].log()
        return -s["logprobs"][torch.arange(len(targets), device=targets.device), targets].mean()

    def backward(self, dloss=1.0):
        s, g = self.saved, self.saved_grads
        targets = s["targets"]
        n = len(targets)
        rows = torch.arange(n, device=targets.device)
        # loss = -mean(logprobs[rows, targets]): each picked entry gets -1/N
        g["logprobs"] = torch.zeros_like(s["logprobs"])
        g["logprobs"][rows, targets] = -dloss / n
        # d log(p)/dp = 1/p
        g["probs"] = g["logprobs"] / s["probs"]
        # probs = counts / counts_sum:  d/dcounts_sum = -counts / counts_sum^2, summed over the row
        g["counts_sum"] = -(g["probs"] * s["counts"] / s["counts_sum"] ** 2).sum(1, keepdim=True)
        # counts reaches the loss directly (1/counts_sum) and through counts_sum (1)
        g["counts"] = g["probs"] / s["counts_sum"] + g["counts_sum"]
        # d exp(x)/dx = exp(x)
        g["norm_logits"] = g["counts"] * s["counts"]
        # norm_logits = logits - logit_maxes: the max gets minus the row sum
        g["logit_maxes"] = -g["norm_logits"].sum(1, keepdim=True)
        # max picks one entry per row: route its gradient to the argmax
        dlogits = g["norm_logits"].clone()
        dlogits.scatter_add_(1, s["argmax"], g["logit_maxes"])
        return dlogits
