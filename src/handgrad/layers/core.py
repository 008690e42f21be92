"""The core layers, each forward with its hand-written backward right below it, the layer
contract they keep (`Module`), and the containers that compose them (`Sequential`, `Residual`).

Conventions (as in torch.nn):
- `forward(x)` returns the output and keeps in `self.saved` exactly what the
  backward needs; stepwise forms keep every named intermediate there.
- `backward(dout)` returns the gradient for the input and *accumulates* the
  parameters' gradients into `self.grads`, the buffers the optimizer reads.
  Gradients of named intermediates are kept in `self.saved_grads`.
- A container gives each layer a fresh `saved` before each call and keeps it
  on its tape, then hands it back before that call's backward (last in, first
  out): a layer called twice keeps both calls' state.
- Every walk over a model (parameters, gradient buffers, buffers, `to`, the
  flat buffers) meets each tensor once: a tensor held by two layers is one.
- Inputs may be (batch, channels) or (batch, time, channels).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import parallel
from ..errors import HandgradError


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
    """Parameters, their gradient buffers, non-trained buffers, saved intermediates, and the
    sub-modules it is made of (`named_children`), which the methods below walk through."""

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

    def named_children(self):
        """(name, module) for each sub-module; a name of "" gives the child's names no level of their own."""
        return ()

    def named_modules(self, prefix: str = ""):
        """(prefix of its names, module) for this module and every module under it, each once (the first
        name wins: a layer used twice is one layer)."""
        seen, stack = set(), [(prefix, self)]
        while stack:
            at, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield at, module
            children = [(f"{at}{name}." if name else at, child) for name, child in module.named_children()]
            stack.extend(reversed(children))  # depth first, children in their order

    def named_parameters_and_grads(self, prefix: str = ""):
        """(name, parameter, gradient buffer) over every module, each parameter tensor once (the first
        name wins): a layer used twice, or a tensor two layers share (tied weights), is one parameter
        with one gradient buffer, which both uses' backward accumulate into."""
        seen = set()
        for at, module in self.named_modules(prefix):
            for name, p in module.params.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield at + name, p, module.grads.get(name)

    def named_parameters(self, prefix: str = ""):
        for name, p, _ in self.named_parameters_and_grads(prefix):
            yield name, p

    def named_grads(self, prefix: str = ""):
        """The gradient buffers, in the order of `named_parameters` (a parameter without one is skipped)."""
        for name, _, g in self.named_parameters_and_grads(prefix):
            if g is not None:
                yield name, g

    def named_buffers(self, prefix: str = ""):
        seen = set()
        for at, module in self.named_modules(prefix):
            for name, b in module.buffers.items():
                if id(b) not in seen:
                    seen.add(id(b))
                    yield at + name, b

    def named_intermediates(self, prefix: str = ""):
        """Intermediates of the last forward that a check can compare (stepwise forms), then the children's."""
        for name, t in self.saved.items():
            if name in self.inspectable:
                yield prefix + name, t
        yield from self.children_walk("named_intermediates", prefix)

    def named_intermediate_grads(self, prefix: str = ""):
        for name, t in self.saved_grads.items():
            yield prefix + name, t
        yield from self.children_walk("named_intermediate_grads", prefix)

    def children_walk(self, walk: str, prefix: str):
        """The walk `walk` (named_intermediates or named_intermediate_grads) of each child under its name:
        call by call from this module's tape where its forward ran them on one (`forward_on_tape`)."""
        children = [(f"{prefix}{name}." if name else prefix, child) for name, child in self.named_children()]
        tape = self.saved.get("tape")
        if tape is None:
            for at, child in children:
                yield from getattr(child, walk)(at)
            return
        names = {}
        for at, child in children:
            names.setdefault(id(child), at)
        for child, frame in tape:
            yield from walk_call(child, frame, walk, names[id(child)])

    inspectable: tuple[str, ...] = ()

    def zero_grad(self) -> None:
        zero_all([g for _, g in self.named_grads()])

    def clear_saved(self) -> None:
        """Drop what the last forward and backward kept."""
        self.saved.clear()
        self.saved_grads.clear()
        for _, child in self.named_children():
            child.clear_saved()

    def train(self, mode: bool = True) -> "Module":
        self.training = mode
        for _, child in self.named_children():
            child.train(mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def to(self, device=None, dtype=None, memo: dict | None = None) -> "Module":
        """Move parameters, gradient buffers and buffers, this module's and its children's; call before
        building an optimizer. Each tensor is converted once (`memo`, by identity, shared down the tree)
        and the converted tensor put wherever the old one was held, so tied tensors stay tied."""
        memo = {} if memo is None else memo
        for d in (self.params, self.grads, self.buffers):
            for k, v in d.items():
                if id(v) not in memo:
                    moved = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                    # both kept alive, so that no id here is reused by a new tensor while the walk lasts
                    memo[id(v)] = memo[id(moved)] = (v, moved)
                d[k] = memo[id(v)][1]
        for _, child in self.named_children():
            child.to(device, dtype, memo)
        return self

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError


def forward_on_tape(layer: Module, x, tape: list):
    """`layer.forward(x)` on a fresh `saved` and `saved_grads` (the call's frame), which the tape keeps for
    this very call's backward: a layer called twice keeps one frame per call. The container owns the
    tape; the layer only ever sees `self.saved`, which after a forward is its last call's."""
    layer.saved, layer.saved_grads = {}, {}
    out = layer.forward(x)
    tape.append((layer, (layer.saved, layer.saved_grads)))
    return out


def backward_on_tape(layer: Module, frame: tuple[dict, dict], dout):
    """`layer.backward(dout)` for the call whose frame the tape kept (walked last in, first out)."""
    layer.saved, layer.saved_grads = frame
    return layer.backward(dout)


def walk_call(layer: Module, frame: tuple[dict, dict], walk: str, prefix: str) -> list:
    """What the walk `walk` (named_intermediates or named_intermediate_grads) of `layer` gives for the
    call that kept `frame`; the layer's last frame is put back."""
    held = layer.saved, layer.saved_grads
    layer.saved, layer.saved_grads = frame
    try:
        return list(getattr(layer, walk)(prefix))
    finally:
        layer.saved, layer.saved_grads = held


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
        scatter_add_rows(self.grads["weight"], self.saved["idx"], dout)
        return None


def accumulates_with_index_put(grad: torch.Tensor) -> bool:
    """Whether the Embedding scatter-adds into `grad` with index_put_ (a CPU tensor) rather than
    index_add_ (a GPU's); a function of its own, so that a test on a CPU can take the other branch."""
    return grad.is_cpu


def scatter_add_rows(grad: torch.Tensor, idx: torch.Tensor, dout: torch.Tensor) -> None:
    """grad[idx[...]] += dout[...]: each row of dout added into the row of `grad` its id names, repeated
    ids adding up (an embedding table's gradient)."""
    if accumulates_with_index_put(grad):  # one call, no flattening views; it adds in the ids' order, as index_add_ does
        grad.index_put_((idx,), dout, accumulate=True)
    else:  # on a GPU index_put_'s accumulating kernel cannot be recorded in a CUDA graph
        grad.index_add_(0, idx.reshape(-1), dout.reshape(-1, grad.shape[1]))


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


def on_rows(fn, t: torch.Tensor) -> torch.Tensor:
    """`fn` of a matrix, applied to (batch, time, ..., channels) as one matrix of all its rows."""
    return fn(t.reshape(-1, t.shape[-1])).view(*t.shape[:-1], -1)


PAD_MIN_ROWS = 1024  # matmuls over at least this many rows pad a narrow output side


def output_padding(width: int, rows: int, device: torch.device) -> int:
    """Zero columns that bring a Linear's output width up to a multiple of 16 floats (64 bytes), for
    matmuls over many rows on a CPU, where it was measured: on one core, 8192 x 200 by 200 x 27 and
    its two backward products run about 1.3x faster padded to 32 columns, copies of the padding
    included (docs/bench.md). Each real column is the same dot product as unpadded, equal to float32
    rounding (bit for bit on some CPUs; a kernel may block the sum differently for another width)."""
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
            return on_rows(self.forward, x)
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
            return on_rows(self.backward, dout)
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


class TiedLinear(Module):
    """y = x @ weight^T + bias, weight the Embedding's table (vocab, channels): an output projection tied
    to the token embedding. Its weight and that weight's gradient buffer are the Embedding's very
    tensors, so both layers' backward add into the one buffer (their gradients then add), and every
    walk over the model (named parameters, the flat buffers, optimizers, checkpoints) holds the table
    once, under the first name it meets (the Embedding's, where that comes first)."""

    def __init__(self, embedding: Embedding, bias: bool = True):
        super().__init__()
        self.params["weight"], self.grads["weight"] = embedding.params["weight"], embedding.grads["weight"]
        if bias:
            self.add_param("bias", torch.zeros(embedding.params["weight"].shape[0]))

    def forward(self, x):
        if x.ndim != 2:  # (batch, time, channels): the rows of every time step are one matrix
            return on_rows(self.forward, x)
        self.saved["x"] = x
        return F.linear(x, self.params["weight"], self.params.get("bias"))  # x E^T (+ b)

    # y = x E^T + b:  dx = dy E,  dE = dy^T x (added to the Embedding's own gradient),  db = sum over rows of dy
    def backward(self, dout):
        if dout.ndim != 2:  # as the forward: one matrix of rows
            return on_rows(self.backward, dout)
        w, x = self.params["weight"], self.saved["x"]
        if "bias" in self.grads:
            self.grads["bias"].add_(dout.sum(0))
        self.grads["weight"].addmm_(dout.T, x)
        return torch.mm(dout, w)


class Tanh(Module):
    """tanh(x), computed as 2 sigmoid(2x) - 1: the same function (float32 results within 2e-7
    of torch.tanh), and on a CPU core faster, eager or compiled, even as three ops on a small tensor.
    x + x rather than 2 * x: an op on two tensors skips wrapping a Python number into a tensor."""

    def __init__(self):
        super().__init__()
        self.minus_one = torch.tensor(-1.0)  # a tensor, so that -1 + 2 s is one op

    def to(self, device=None, dtype=None, memo: dict | None = None) -> "Tanh":
        self.minus_one = self.minus_one.to(device=device, dtype=dtype)
        return super().to(device, dtype, memo)

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


class Sequential(Module):
    """Named layers in order; backward runs them in reverse.

    Each layer's output and its gradient are kept as '<name>.out', and the
    layers' own intermediates as '<name>.<intermediate>'. A layer may appear
    under two names (the same object called twice): each call keeps its own
    frame on the forward's tape, and both calls' backward accumulate into the
    layer's one set of gradient buffers.
    """

    def __init__(self, layers: list[tuple[str, Module]]):
        super().__init__()
        self.layers = dict(layers)
        self.grad_list = [g for _, g in self.named_grads()]  # the buffers stay the same tensors until `to`
        # one tensor each holding every parameter and every gradient buffer, once `flatten` has made them
        self.param_buffer: torch.Tensor | None = None
        self.grad_buffer: torch.Tensor | None = None

    def named_children(self):
        return self.layers.items()

    @property
    def outputs(self) -> dict[str, torch.Tensor]:
        """Each layer's output in the last forward, by layer name, where autograd recorded it (the
        gradient check's reference forward); a manual forward keeps only what the backward needs."""
        return self.saved.setdefault("outputs", {})

    @property
    def output_grads(self) -> dict[str, torch.Tensor]:
        """The gradient of each layer's output in the last backward, by layer name."""
        return self.saved_grads

    def forward(self, x):
        # in `saved`, as any layer's state: a Sequential called twice keeps a tape and outputs per call
        tape = self.saved["tape"] = []
        outputs = self.saved["outputs"] = {}
        keep = torch.is_grad_enabled()  # the check retains their gradients; training would only hold more memory
        for name, layer in self.layers.items():
            x = forward_on_tape(layer, x, tape)
            if keep:
                outputs[name] = x
        return x

    def backward(self, dout, after_layer=None):
        """`after_layer(name)`, where given, is told as each layer's backward is done (a data-parallel
        run starts summing the gradients that layer completed)."""
        output_grads = self.saved_grads
        for name, (layer, frame) in zip(reversed(self.layers), reversed(self.saved["tape"])):
            output_grads[name] = dout
            dout = backward_on_tape(layer, frame, dout)
            if after_layer is not None:
                after_layer(name)
        return dout

    def named_intermediates(self, prefix: str = ""):
        outputs = self.saved.get("outputs", {})
        for name, (layer, frame) in zip(self.layers, self.saved.get("tape", ())):
            if name in outputs:
                yield f"{prefix}{name}.out", outputs[name]
            yield from walk_call(layer, frame, "named_intermediates", f"{prefix}{name}.")

    def named_intermediate_grads(self, prefix: str = ""):
        for name, (layer, frame) in zip(self.layers, self.saved.get("tape", ())):
            if name in self.saved_grads:
                yield f"{prefix}{name}.out", self.saved_grads[name]
            yield from walk_call(layer, frame, "named_intermediate_grads", f"{prefix}{name}.")

    def zero_grad(self) -> None:
        if self.grad_buffer is not None and not torch.compiler.is_compiling():  # one op for every buffer
            self.grad_buffer.zero_()
        else:
            zero_all(self.grad_list)

    def to(self, device=None, dtype=None, memo: dict | None = None) -> "Sequential":
        super().to(device, dtype, memo)
        self.grad_list = [g for _, g in self.named_grads()]
        self.param_buffer = self.grad_buffer = None  # the layers may hold new tensors now
        return self

    def flatten(self) -> None:
        """Move the layers' parameters into one tensor, `param_buffer`, and their gradient buffers into
        another, `grad_buffer`, in the same order, each parameter and buffer becoming a view of its part
        (same shapes, same values): one op then zeroes every gradient, and one updates every parameter
        (optimizers find the two tensors by themselves). A tensor held in several places (a layer used
        twice, tied weights, a fused layer's parts) gets one part, and every holder the same view of it.
        Where the tensors differ in device or dtype they stay as they are. Call before anything holds
        the old tensors (an optimizer, a recording)."""
        self.param_buffer = self._flatten("params")
        self.grad_buffer = self._flatten("grads")
        for _, module in self.named_modules():  # every Sequential in the tree zeroes the new buffers
            if isinstance(module, Sequential):
                module.grad_list = [g for _, g in module.named_grads()]

    def _flatten(self, kind: str) -> torch.Tensor | None:
        held = [(tensors, name, t) for _, module in self.named_modules()
                for tensors in (getattr(module, kind),) for name, t in tensors.items()]
        # each distinct tensor once, in the order of named_parameters (or named_grads), so that the
        # optimizer finds the flat tensor filled end to end by its list; any other held tensor after them
        first = self.named_parameters() if kind == "params" else self.named_grads()
        distinct = {id(t): t for _, t in first}
        for _, _, t in held:
            distinct.setdefault(id(t), t)
        tensors = list(distinct.values())
        if not tensors or len({(t.device, t.dtype) for t in tensors}) != 1:
            return None  # mixed devices or dtypes
        flat = tensors[0].new_empty(sum(t.numel() for t in tensors))
        views = {id(t): view.copy_(t) for t, view in zip(tensors, views_like(flat, tensors))}
        for held_in, name, t in held:
            held_in[name] = views[id(t)]
        return flat


class Residual(Module):
    """out = x + block(x): a skip path around `block` (any layer, or a Sequential of them), whose output
    has its input's shape. Its parameters are the block's, under the block's names."""

    def __init__(self, block: Module):
        super().__init__()
        self.block = block

    def named_children(self):
        return (("", self.block),)

    def forward(self, x):
        tape = self.saved["tape"] = []  # the block's frame of this call: a Residual may be called twice
        out = forward_on_tape(self.block, x, tape)
        if out.shape != x.shape:
            raise HandgradError(f"Residual: the block maps {tuple(x.shape)} to {tuple(out.shape)}; "
                                "a skip path needs the block's output in its input's shape")
        return x + out

    # d out/d x = I + d block(x)/d x:  dx = dout (the skip path) + the block's dx
    def backward(self, dout):
        (block, frame), = self.saved["tape"]
        return dout + backward_on_tape(block, frame, dout)


class ItemLayout(Module):
    """Where the items lie in rows of ids (B, T): an item starts at its start token (the boundary id 0) and
    runs to the next one, so a row may hold one item and its padding (each padding id then an item of
    its own, whose targets count for nothing) or several items one after another (`data.pack_batch`).
    Its forward passes the ids on unchanged and leaves, for the layers built with it (PositionEmbedding,
    the attention layers), each position's place in its item (`positions`, (B, T)) and which positions
    each one sees (`visible`, (B, T, T): the key at or before the query, in the same item): an item's
    outputs are then those it would have alone in a row, whatever shares the row.
    Those layers read them in their forward and keep what their backward needs; nothing here has a
    gradient (ids have none)."""

    BOUNDARY = 0  # data.Vocab.BOUNDARY: the start token

    def __init__(self):
        super().__init__()
        self.positions: torch.Tensor | None = None
        self.visible: torch.Tensor | None = None

    def forward(self, idx):
        T = idx.shape[1]
        starts = idx == self.BOUNDARY
        t = torch.arange(T, device=idx.device)
        item = starts.cumsum(1)  # an item's number within its row: the start tokens up to here
        # place in the item: t less the last start at or before t (a row always opens with one)
        self.positions = t - torch.where(starts, t, 0).cummax(1).values
        causal = t[None, :] <= t[:, None]  # (query, key): the key at or before the query
        self.visible = causal & (item[:, :, None] == item[:, None, :])
        return idx

    # the ids pass through; they have no gradient
    def backward(self, dout):
        return None


class PositionEmbedding(Module):
    """A learned table of one vector per position, added to the input: (B, T, C) -> x + weight[:T],
    weight (block_size, C). Nothing kept from the forward: the backward reads T from dout.
    Built with an `ItemLayout`, the position is each token's place in its item (several items may share
    a row): x[b, t] + weight[positions[b, t]], the positions kept for the backward."""

    def __init__(self, block_size: int, n_embd: int, items: ItemLayout | None = None):
        super().__init__()
        self.add_param("weight", torch.randn(block_size, n_embd))
        self.items = items

    def forward(self, x):
        block_size, n_embd = self.params["weight"].shape
        if x.ndim != 3 or x.shape[2] != n_embd:
            raise HandgradError(f"position embedding: expected input (batch, time, {n_embd}), got {tuple(x.shape)}")
        if self.items is not None:
            positions = self.saved["positions"] = self.items.positions
            if positions is None or positions.shape != x.shape[:2]:
                raise HandgradError("position embedding: its ItemLayout has not read this batch's ids")
            return x + torch.embedding(self.params["weight"], positions)
        if x.shape[1] > block_size:
            raise HandgradError(f"position embedding: {x.shape[1]} positions exceed its table of {block_size}")
        return x + self.params["weight"][:x.shape[1]]

    # out[b, t] = x[b, t] + weight[t]:  dx = dout,  d weight[t] = sum over the batch of dout[b, t] (t < T);
    # with an item layout, out[b, t] = x[b, t] + weight[p[b, t]]:  d weight[i] = sum of dout[b, t] where p[b, t] == i
    def backward(self, dout):
        positions = self.saved.get("positions")
        if positions is not None:
            scatter_add_rows(self.grads["weight"], positions, dout)
        else:
            self.grads["weight"][:dout.shape[1]].add_(dout.sum(0))
        return dout


GELU_SCALE = (2 / torch.pi) ** 0.5  # sqrt(2 / pi)
GELU_CUBIC = 0.044715


def sigmoid_2u(x):
    """sigmoid(2u) = (1 + tanh(u)) / 2,  u = sqrt(2/pi) (x + 0.044715 x^3), from x: four passes over x, one
    of them transcendental (a sigmoid is an exp; torch's tanh, eager and compiled, costs about 4x more here)."""
    # 2u = x (2 sqrt(2/pi) + 2 sqrt(2/pi) 0.044715 x^2)
    return torch.addcmul(x * (2 * GELU_SCALE), x, x * x, value=2 * GELU_SCALE * GELU_CUBIC).sigmoid_()


class GELU(Module):
    """GELU in its tanh approximation (as GPT-2): gelu(x) = x/2 (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3),
    computed as x sigmoid(2u) (the same function: (1 + tanh(u))/2 = sigmoid(2u)).
    Keeps the input (a reference); the backward recomputes sigmoid(2u) from it (a compiled step reads the
    forward's instead: `graph_passes.ComputeOnce`)."""

    def forward(self, x):
        self.saved["x"] = x
        return x * sigmoid_2u(x)

    # d gelu/dx = (1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2),  t = tanh(u);
    # with s = sigmoid(2u) = (1 + t)/2, so 1 - t^2 = 4 s (1 - s):  d gelu/dx = s (1 + x (1 - s) 2 du/dx)
    def backward(self, dout):
        x = self.saved["x"]
        s = sigmoid_2u(x)
        x_not_s = torch.addcmul(x, x, s, value=-1)  # x (1 - s)
        # 2 du/dx, from x.square() rather than sigmoid_2u's x * x: a compiled step computes a repeated x * x
        # once and would keep it from the forward, a pass over memory more (4% slower at batch 1,024)
        two_du = x.square().mul_(6 * GELU_SCALE * GELU_CUBIC).add_(2 * GELU_SCALE)
        return two_du.mul_(x_not_s).add_(1).mul_(s).mul_(dout)


def keep_probability(p: float) -> float:
    """What a dropout mask of probability p keeps: 1 - p to the nearest 1/2^16 (within 8e-6 of it),
    as `dropout_mask` draws 16-bit numbers."""
    return max(1, round((1 - p) * 2**16)) / 2**16


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A mask of x's shape: each entry 1 / k with probability k = keep_probability(p), else 0 (its mean
    exactly 1), from torch's default generator. Each 64-bit draw gives four 16-bit numbers, and an
    entry is kept where its number falls below k 2^16: bernoulli_ draws one number per entry and took
    1.45 ms for 128 x 12 x 64 entries here, on one thread or two, against 0.32 ms. In a data-parallel
    step, each rank draws the whole batch's mask (dim 0 the batch) and keeps its own rows: the very
    draws of one process."""
    shard = parallel.active()
    shape = x.shape if shard is None else shard.whole_batch_shape(x)
    n, k = math.prod(shape), keep_probability(p)
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    numbers = words.view(torch.int16)[:n].view(shape)  # uniform over -2^15 .. 2^15 - 1
    mask = (numbers < round(k * 2**16) - 2**15).to(x.dtype).mul_(1 / k)
    return mask if shard is None else shard.own_rows(mask)


class Dropout(Module):
    """In training, each entry kept with probability 1 - p (to 1/2^16, `keep_probability`) and scaled by
    its inverse, else zeroed (`dropout_mask`, the mask kept for the backward); in eval (or with p = 0),
    the identity.
    A replayed step (`fastpath.ReplayStep`) records the draw and draws anew on every replay. In a
    data-parallel step, each rank draws the whole batch's mask and keeps its own rows."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        if not 0 <= p < 1:
            raise HandgradError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            self.saved.pop("mask", None)  # no mask: this call's backward is the identity too
            return x
        mask = self.saved["mask"] = dropout_mask(x, self.p)
        return x * mask

    # out = x * mask:  dx = dout * mask (the identity where no mask was drawn)
    def backward(self, dout):
        mask = self.saved.get("mask")
        return dout if mask is None else dout * mask
