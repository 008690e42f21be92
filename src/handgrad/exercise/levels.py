"""The exercise's levels: each version's forward (the one source both the written files and the checker
run), its gradients in backward order, where each tensor flows, and the answers.

A gradient's `feeds` names every tensor its own tensor is an input of ("loss" for the loss itself): the
checker splits the right gradient into one contribution per branch, to tell a missing branch apart from
any other mistake. tests/test_exercise.py proves the branches add up to autograd's gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Gradient:
    name: str  # the variable the learner assigns: dlogprobs, nlls_grad
    of: str  # the tensor it is the gradient of: logprobs, nlls
    feeds: tuple[str, ...]  # the tensors `of` is an input of, "loss" for the loss
    answer: str  # the right code, one or more lines
    math: str  # the derivative, for the docs
    table_index: str | None = None  # an embedding table's gradient: the name of the ids that index it


@dataclass(frozen=True)
class Version:
    key: str  # what `exercise new --level` and the file's header line name: 1-seed, 1-fine, 2, 3, 4
    level: int
    file_stem: str
    title: str
    about: str  # the intro the files open with (markdown)
    params: tuple[str, ...]
    forward: str
    gradients: tuple[Gradient, ...]
    # upstream gradients the checker hands the learner (level 3 starts from d loss / d hpreact): name -> tensor
    given: dict[str, str] = field(default_factory=dict)

    def gradient(self, name: str) -> Gradient:
        return next(g for g in self.gradients if g.name == name)


SEED_FORWARD = """\
bs = x.shape[0]
vocab_size, n_embd = C.shape
block_size = x.shape[1]
n_hidden = w1.shape[1]
mean_proj = torch.ones(1, bs, dtype=C.dtype) / bs
var_proj = torch.eye(bs, dtype=C.dtype) - mean_proj

emb = C[x].view(x.shape[0], -1)
hpreact = emb @ w1
bnmeani = mean_proj @ hpreact
bnstdi = (var_proj @ hpreact).square().mean(dim=0, keepdim=True).sqrt()
hpreact_bn = (hpreact - bnmeani) / bnstdi * bnw + bnb
h = hpreact_bn.tanh()
logits = h @ w2 + b2
exp_l = logits.exp()
count = exp_l.sum(dim=-1, keepdim=True)
probs = exp_l / count
nlls = -probs.log()
loss = nlls[torch.arange(y.shape[0]), y].mean()
"""

SEED_GRADIENTS = (
    Gradient("nlls_grad", "nlls", ("loss",),
             "nlls_grad = torch.zeros_like(nlls)\nnlls_grad[torch.arange(bs), y] = 1 / bs",
             "loss is the mean of nlls at the targets: 1/bs there, 0 elsewhere"),
    Gradient("probs_grad", "probs", ("nlls",), "probs_grad = -nlls_grad / probs",
             "d(-log p)/dp = -1/p"),
    Gradient("count_grad", "count", ("probs",),
             "count_grad = -(exp_l * probs_grad).sum(dim=-1, keepdim=True) / count**2",
             "probs = exp_l / count: d/dcount = -exp_l / count^2, summed over the row count broadcast along"),
    Gradient("exp_l_grad", "exp_l", ("probs", "count"), "exp_l_grad = probs_grad / count + count_grad",
             "two branches: d(exp_l/count)/dexp_l = 1/count, and count = sum exp_l passes count_grad to every entry"),
    Gradient("logits_grad", "logits", ("exp_l",), "logits_grad = exp_l * exp_l_grad", "d e^z/dz = e^z"),
    Gradient("h_grad", "h", ("logits",), "h_grad = logits_grad @ w2.T", "logits = h @ w2 + b2: dh = dlogits @ w2^T"),
    Gradient("hpreact_bn_grad", "hpreact_bn", ("h",), "hpreact_bn_grad = h_grad * (1 - h**2)",
             "d tanh(z)/dz = 1 - tanh(z)^2"),
    Gradient("bnmeani_grad", "bnmeani", ("hpreact_bn",),
             "bnmeani_grad = (-bnw / bnstdi * hpreact_bn_grad).sum(dim=0, keepdim=True)",
             "d/dmean of (hpreact - mean) / std * bnw = -bnw / std, summed over the batch the mean broadcast along"),
    Gradient("bnstdi_grad", "bnstdi", ("hpreact_bn",),
             "bnstdi_grad = (-(hpreact - bnmeani) * bnw / bnstdi**2 * hpreact_bn_grad).sum(dim=0, keepdim=True)",
             "d/dstd of (hpreact - mean) / std * bnw = -(hpreact - mean) * bnw / std^2, summed over the batch"),
    Gradient("hpreact_grad", "hpreact", ("bnmeani", "bnstdi", "hpreact_bn"),
             "hpreact_grad = hpreact_bn_grad * bnw / bnstdi\n"
             "hpreact_grad = hpreact_grad + mean_proj.T @ bnmeani_grad\n"
             "hpreact_grad = hpreact_grad + var_proj.T @ (var_proj @ hpreact / (bs * bnstdi) * bnstdi_grad)",
             "three branches: bnw/std directly; mean = mean_proj @ hpreact gives mean_proj^T @ dmean; "
             "std = sqrt(mean((var_proj @ hpreact)^2)) gives var_proj^T @ (var_proj @ hpreact / (bs std) * dstd)"),
    Gradient("emb_grad", "emb", ("hpreact",), "emb_grad = hpreact_grad @ w1.T", "hpreact = emb @ w1: demb = dhpreact @ w1^T"),
    Gradient("C_grad", "C", ("emb",),
             "C_grad = torch.zeros_like(C)\nC_grad.index_add_(0, x.view(-1), emb_grad.view(-1, n_embd))",
             "emb gathers rows of C: each row of C collects the sum of emb's gradients at every place its id occurs",
             table_index="x"),
    Gradient("w1_grad", "w1", ("hpreact",), "w1_grad = emb.T @ hpreact_grad", "hpreact = emb @ w1: dw1 = emb^T @ dhpreact"),
    Gradient("w2_grad", "w2", ("logits",), "w2_grad = h.T @ logits_grad", "logits = h @ w2 + b2: dw2 = h^T @ dlogits"),
    Gradient("b2_grad", "b2", ("logits",), "b2_grad = logits_grad.sum(dim=0)",
             "b2 is broadcast over the batch: its gradient sums dlogits over axis 0"),
    Gradient("bnw_grad", "bnw", ("hpreact_bn",), "bnw_grad = ((hpreact - bnmeani) / bnstdi * hpreact_bn_grad).sum(dim=0)",
             "d/dbnw = the normalised hpreact, summed over the batch"),
    Gradient("bnb_grad", "bnb", ("hpreact_bn",), "bnb_grad = hpreact_bn_grad.sum(dim=0)",
             "bnb is broadcast over the batch: its gradient sums over axis 0"),
)

FINE_FORWARD = """\
n = x.shape[0]
vocab_size, n_embd = C.shape

emb = C[x]
embcat = emb.view(n, -1)
hprebn = embcat @ w1 + b1
bnmeani = hprebn.sum(0, keepdim=True) / n
bndiff = hprebn - bnmeani
bndiff2 = bndiff**2
bnvar = bndiff2.sum(0, keepdim=True) / n
bnvar_inv = (bnvar + 1e-5)**-0.5
bnraw = bndiff * bnvar_inv
hpreact = bnw * bnraw + bnb
h = torch.tanh(hpreact)
logits = h @ w2 + b2
logit_maxes = logits.max(1, keepdim=True).values
norm_logits = logits - logit_maxes
counts = norm_logits.exp()
counts_sum = counts.sum(1, keepdim=True)
counts_sum_inv = counts_sum**-1
probs = counts * counts_sum_inv
logprobs = probs.log()
loss = -logprobs[torch.arange(n), y].mean()
"""

FINE_GRADIENTS = (
    Gradient("dlogprobs", "logprobs", ("loss",),
             "dlogprobs = torch.zeros_like(logprobs)\ndlogprobs[torch.arange(n), y] = -1 / n",
             "loss = -mean of logprobs at the targets: -1/n there, 0 elsewhere"),
    Gradient("dprobs", "probs", ("logprobs",), "dprobs = dlogprobs / probs", "d log p/dp = 1/p"),
    Gradient("dcounts_sum_inv", "counts_sum_inv", ("probs",),
             "dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)",
             "probs = counts * counts_sum_inv, broadcast along each row: sum counts * dprobs over the row, keeping its axis"),
    Gradient("dcounts_sum", "counts_sum", ("counts_sum_inv",), "dcounts_sum = -counts_sum**-2 * dcounts_sum_inv",
             "d s^-1/ds = -s^-2"),
    Gradient("dcounts", "counts", ("probs", "counts_sum"),
             "dcounts = counts_sum_inv * dprobs + torch.ones_like(counts) * dcounts_sum",
             "two branches: counts_sum_inv * dprobs through probs, and the row sum hands dcounts_sum to every entry"),
    Gradient("dnorm_logits", "norm_logits", ("counts",), "dnorm_logits = counts * dcounts", "d e^z/dz = e^z"),
    Gradient("dlogit_maxes", "logit_maxes", ("norm_logits",), "dlogit_maxes = -dnorm_logits.sum(1, keepdim=True)",
             "subtracted from every entry of its row: minus the row sum (numerically zero: the max does not change the loss)"),
    Gradient("dlogits", "logits", ("norm_logits", "logit_maxes"),
             "dlogits = dnorm_logits + F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes",
             "two branches: directly through norm_logits, and the max passes its gradient to the entry that was the max"),
    Gradient("dh", "h", ("logits",), "dh = dlogits @ w2.T", "logits = h @ w2 + b2: dh = dlogits @ w2^T"),
    Gradient("dw2", "w2", ("logits",), "dw2 = h.T @ dlogits", "dw2 = h^T @ dlogits"),
    Gradient("db2", "b2", ("logits",), "db2 = dlogits.sum(0)", "broadcast over the batch: sum over axis 0"),
    Gradient("dhpreact", "hpreact", ("h",), "dhpreact = (1 - h**2) * dh", "d tanh(z)/dz = 1 - tanh(z)^2"),
    Gradient("dbnw", "bnw", ("hpreact",), "dbnw = (bnraw * dhpreact).sum(0)", "hpreact = bnw * bnraw + bnb: sum bnraw * dhpreact over the batch"),
    Gradient("dbnraw", "bnraw", ("hpreact",), "dbnraw = bnw * dhpreact", "d(bnw * bnraw)/dbnraw = bnw"),
    Gradient("dbnb", "bnb", ("hpreact",), "dbnb = dhpreact.sum(0)", "broadcast over the batch: sum over axis 0"),
    Gradient("dbnvar_inv", "bnvar_inv", ("bnraw",), "dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)",
             "bnraw = bndiff * bnvar_inv, broadcast over the batch: sum bndiff * dbnraw over axis 0, keeping it"),
    Gradient("dbnvar", "bnvar", ("bnvar_inv",), "dbnvar = -0.5 * (bnvar + 1e-5)**-1.5 * dbnvar_inv",
             "d (v + eps)^-1/2 / dv = -1/2 (v + eps)^-3/2"),
    Gradient("dbndiff2", "bndiff2", ("bnvar",), "dbndiff2 = torch.ones_like(bndiff2) * dbnvar / n",
             "bnvar = sum over the batch / n: every entry gets dbnvar / n"),
    Gradient("dbndiff", "bndiff", ("bnraw", "bndiff2"), "dbndiff = bnvar_inv * dbnraw + 2 * bndiff * dbndiff2",
             "two branches: bnvar_inv * dbnraw through bnraw, and d x^2/dx = 2x through bndiff2"),
    Gradient("dbnmeani", "bnmeani", ("bndiff",), "dbnmeani = -dbndiff.sum(0, keepdim=True)",
             "subtracted from every row: minus the sum over the batch"),
    Gradient("dhprebn", "hprebn", ("bndiff", "bnmeani"), "dhprebn = dbndiff + torch.ones_like(hprebn) * dbnmeani / n",
             "two branches: dbndiff directly, and the mean hands dbnmeani / n to every row"),
    Gradient("dembcat", "embcat", ("hprebn",), "dembcat = dhprebn @ w1.T", "hprebn = embcat @ w1 + b1: dembcat = dhprebn @ w1^T"),
    Gradient("dw1", "w1", ("hprebn",), "dw1 = embcat.T @ dhprebn", "dw1 = embcat^T @ dhprebn"),
    Gradient("db1", "b1", ("hprebn",), "db1 = dhprebn.sum(0)",
             "broadcast over the batch: sum over axis 0 (numerically zero: BatchNorm subtracts the mean right after)"),
    Gradient("demb", "emb", ("embcat",), "demb = dembcat.view(emb.shape)", "a view: the same numbers in emb's shape"),
    Gradient("dC", "C", ("emb",),
             "dC = torch.zeros_like(C)\ndC.index_add_(0, x.view(-1), demb.view(-1, n_embd))",
             "emb gathers rows of C: each row of C collects the sum of demb at every place its id occurs",
             table_index="x"),
)

COMPACT_FORWARD = """\
n = x.shape[0]
emb = C[x]
embcat = emb.view(n, -1)
hprebn = embcat @ w1 + b1
bnmeani = hprebn.mean(0, keepdim=True)
bnvar = hprebn.var(0, keepdim=True, unbiased=False)
bnvar_inv = (bnvar + 1e-5)**-0.5
bnraw = (hprebn - bnmeani) * bnvar_inv
hpreact = bnw * bnraw + bnb
h = torch.tanh(hpreact)
logits = h @ w2 + b2
loss = F.cross_entropy(logits, y)
"""

FINE_PARAMS = ("C", "w1", "b1", "w2", "b2", "bnw", "bnb")
SEED_PARAMS = ("C", "w1", "w2", "b2", "bnw", "bnb")

CHECK_HOW = ("Fill in each gradient cell, then run `handgrad exercise check THIS_FILE`. The checker runs only "
             "the gradient cells (and the file's imports), on its own float64 copy of this batch and forward, "
             "and judges each gradient on the right values of the gradients before it, so one mistake shows once.")

VERSIONS = {
    "1-seed": Version(
        "1-seed", 1, "level1_seed", "every intermediate, step by step, with the seed notebook's names",
        "Derive d loss / d every intermediate of the MLP, in backward order, one cell each. The names are the "
        "seed notebook's (`nlls_grad` is d loss / d `nlls`), so its backward can be pasted in line by line; "
        "`x.data` works as it did there.",
        SEED_PARAMS, SEED_FORWARD, SEED_GRADIENTS),
    "1-fine": Version(
        "1-fine", 1, "level1_fine", "every intermediate of a longer, finer chain",
        "Derive d loss / d every intermediate of the MLP, in backward order, one cell each: the softmax with its "
        "maximum subtracted, `counts_sum_inv`, and BatchNorm taken apart into `bndiff`, `bnvar_inv` and `bnraw`.",
        FINE_PARAMS, FINE_FORWARD, FINE_GRADIENTS),
    "2": Version(
        "2", 2, "level2_cross_entropy", "the cross-entropy backward in one expression",
        "Derive d loss / d logits of `F.cross_entropy` in one expression, without going through the "
        "softmax's intermediates.",
        FINE_PARAMS, COMPACT_FORWARD,
        (Gradient("dlogits", "logits", ("loss",), "dlogits = (F.softmax(logits, 1) - F.one_hot(y, logits.shape[1])) / n",
                  "d loss/d logits = (softmax(logits) - onehot(y)) / n"),)),
    "3": Version(
        "3", 3, "level3_batchnorm", "the BatchNorm backward in one expression",
        "Derive d loss / d hprebn through the whole BatchNorm (its mean, its variance and the normalisation) in one "
        "expression. `dhpreact`, d loss / d hpreact, is given: the checker hands you the right one.",
        FINE_PARAMS, COMPACT_FORWARD,
        (Gradient("dhprebn", "hprebn", ("bnmeani", "bnvar", "bnraw"),
                  "dhprebn = bnw * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0) - bnraw * (dhpreact * bnraw).sum(0))",
                  "dx = bnw / (n sigma) * (n dy - sum dy - xhat * sum(dy * xhat)), sums over the batch"),),
        given={"dhpreact": "hpreact"}),
    "4": Version(
        "4", 4, "level4_training", "a training loop on your own backward and update",
        "Train the seed notebook's MLP with your own backward (every parameter's gradient, into the buffer the "
        "update reads) and your own update (SGD). `handgrad exercise train THIS_FILE` runs your loop beside the "
        "same loop on autograd's gradients, from the same initialisation and batches, and stops at the first "
        "parameter that drifts from autograd's or stops moving.",
        SEED_PARAMS, SEED_FORWARD, SEED_GRADIENTS),
}

# `exercise new --level`: what each choice writes
LEVEL_CHOICES = {"all": tuple(VERSIONS), "1": ("1-seed", "1-fine"), **{k: (k,) for k in VERSIONS}}
