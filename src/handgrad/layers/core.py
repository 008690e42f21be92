"""The core layers, each forward with its hand-written backward right below it, and the layer
contract they keep (`Module`).

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
