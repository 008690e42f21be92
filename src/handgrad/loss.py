"""Softmax cross-entropy, fused and stepwise, forward and backward side by side."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import HandgradError
from .layers import Module


# nll_loss always ignores one target value (-100 unless told): where none is to be ignored, one that is
# no class, so that the forward rejects a target of -100 as the backward does. A target of this very value
# would still be ignored by the forward, and rejected by the backward's indexing. (The most negative int64
# measured 0.15 us slower per call to pass than a 32-bit number.)
NO_IGNORED_TARGET = -(2**31)


def rows_of(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Size | None]:
    """Logits (..., V) and targets (...) as one list of rows, (N, V) and (N,), and the logits' shape
    where it was not already (N, V): the shape the gradient is handed back in."""
    if logits.ndim == 2 and targets.ndim == 1:
        return logits, targets, None
    if targets.shape != logits.shape[:-1]:
        raise HandgradError(f"cross-entropy: targets of shape {tuple(targets.shape)} do not match logits of shape "
                            f"{tuple(logits.shape)}: the targets need the logits' shape without its last axis")
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), logits.shape


def counted_targets(targets: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Which targets count (not `ignore_index`) and how many, at least 1, in `dtype`: a batch with every
    target ignored has loss 0 and gradient 0, not 0/0. Both stay tensors, so no value is read into Python."""
    counted = targets != ignore_index
    return counted, counted.sum().clamp_min_(1).to(dtype)


class CrossEntropy(Module):
    """Mean negative log-likelihood of the targets under softmax(logits), over the targets that count;
    fused backward.

    Logits (..., V) with targets (...): every leading position is one row, and the gradient comes back
    in the logits' shape. Targets equal to `ignore_index` (padding) are not counted: the mean is over
    the others, and the gradient at their rows is exactly 0. A batch with every target ignored has
    loss 0 and gradient 0.
    """

    def __init__(self, ignore_index: int | None = None):
        super().__init__()
        self.ignore_index = ignore_index
        self._constants: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def forward(self, logits, targets):
        if logits.ndim != 2 or targets.ndim != 1:  # (batch, time, ...) rows are one list
            logits, targets, self.saved["shape"] = rows_of(logits, targets)
        else:  # the common case, without a call
            self.saved["shape"] = None
        # log_softmax subtracts the row max before exponentiating, so large logits cannot overflow
        logprobs = torch.log_softmax(logits, dim=1)
        self.saved["logprobs"], self.saved["targets"] = logprobs, targets
        if self.ignore_index is None:
            return F.nll_loss(logprobs, targets, ignore_index=NO_IGNORED_TARGET)  # mean of -logprobs[row, target]
        counted, self.saved["count"] = counted_targets(targets, self.ignore_index, logprobs.dtype)
        self.saved["counted"] = counted
        # the sum over counted rows of -logprobs[row, target], over their count
        return F.nll_loss(logprobs, targets, ignore_index=self.ignore_index, reduction="sum") / self.saved["count"]

    # d loss / d logits[row] = (softmax(logits[row]) - onehot(targets[row])) / C for each of the C counted
    # rows (all N rows where no target is ignored), 0 for an ignored row
    def backward(self, dloss=1.0):
        if self.ignore_index is not None:
            return self.backward_counted(dloss)
        logprobs, targets, shape = self.saved["logprobs"], self.saved["targets"], self.saved["shape"]
        scale = dloss / targets.shape[0]
        if logprobs.is_cpu and not torch.compiler.is_compiling():
            # eager on a CPU: scale, -scale and the row numbers as tensors made once (wrapping a Python
            # number into a tensor costs more than the multiply), the target's column by row and target
            scale_t, minus_scale, rows = self.constants(scale, logprobs)
            dlogits = logprobs.exp().mul_(scale_t).index_put_((rows, targets), minus_scale, accumulate=True)
        else:
            # compiled, the numbers are constants of the graph; on a GPU, a scalar scatter (a CUDA graph
            # can record it, not index_put_'s accumulating kernel)
            dlogits = logprobs.exp().mul_(scale).scatter_(1, targets.view(-1, 1), -scale, reduce="add")
        return dlogits if shape is None else dlogits.view(shape)

    def backward_counted(self, dloss):
        """The backward where targets may be ignored: each row's scale is 1/C or 0, a tensor."""
        s = self.saved
        counted, shape = s["counted"], s["shape"]
        scale = counted.to(s["logprobs"].dtype).mul_(dloss / s["count"]).unsqueeze_(1)
        # an ignored row's target may be any value: column 0 stands in, at scale 0
        columns = torch.where(counted, s["targets"], 0).unsqueeze_(1)
        dlogits = s["logprobs"].exp().mul_(scale).scatter_add_(1, columns, scale.neg())
        return dlogits if shape is None else dlogits.view(shape)

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
    max -> subtract -> exp -> row sum -> divide -> log -> pick -> mean (over the counted targets).
    """

    inspectable = ("logit_maxes", "norm_logits", "counts", "counts_sum", "probs", "logprobs")

    def forward(self, logits, targets):
        s = self.saved
        logits, targets, s["shape"] = rows_of(logits, targets)
        s["logit_maxes"], s["argmax"] = logits.max(1, keepdim=True)
        s["norm_logits"] = logits - s["logit_maxes"]  # <= 0, so exp cannot overflow
        s["counts"] = s["norm_logits"].exp()
        s["counts_sum"] = s["counts"].sum(1, keepdim=True)
        s["probs"] = s["counts"] / s["counts_sum"]
        s["logprobs"] = s["probs"].log()
        if self.ignore_index is None:
            s["targets"] = targets.unsqueeze(1)
            # gather rejects a target out of 0..V-1 (indexing would wrap a negative one round)
            return -s["logprobs"].gather(1, s["targets"]).mean()
        s["counted"], s["count"] = counted_targets(targets, self.ignore_index, logits.dtype)
        # an ignored row's target may be any value: column 0 stands in, and its pick is left out
        s["targets"] = torch.where(s["counted"], targets, 0).unsqueeze_(1)
        picked = s["logprobs"].gather(1, s["targets"]).squeeze(1)
        return -torch.where(s["counted"], picked, 0).sum() / s["count"]

    def backward(self, dloss=1.0):
        s, g = self.saved, self.saved_grads
        columns = s["targets"]
        g["logprobs"] = torch.zeros_like(s["logprobs"])
        if self.ignore_index is None:
            # loss = -mean(logprobs[rows, targets]): each picked entry gets -1/N
            g["logprobs"].scatter_(1, columns, -dloss / len(columns))
        else:
            # loss = -sum of logprobs[row, target] over the C counted rows / C: each counted pick gets -1/C,
            # an ignored row nothing
            g["logprobs"].scatter_(1, columns, torch.where(s["counted"], -dloss / s["count"], 0).unsqueeze_(1))
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
        return dlogits if s["shape"] is None else dlogits.view(s["shape"])
