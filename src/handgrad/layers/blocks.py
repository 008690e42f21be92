"""A Sequential that keeps less for its backward: the outputs of its cheap layers are recomputed.

In a transformer block most of what a backward needs is read by a matmul: the qkv projection reads
LayerNorm's output, the MLP's second Linear reads GELU's output. Kept as they are, those outputs sit
beside the tensors their cheap layers keep anyway (LayerNorm's input, GELU's input), so every
block holds its residual stream twice and its MLP's hidden activations twice. Running LayerNorm or
GELU again costs a few passes over memory and no matmul; `RecomputingSequential` does that.
"""
from __future__ import annotations

import torch

from .core import GELU, Module, Sequential, backward_on_tape
from .norm import LayerNorm


class RecomputingSequential(Sequential):
    """Named layers in order, as `Sequential` (the same names, tape, outputs and gradients), keeping
    less: where a layer that is cheap to run again (`recomputed`: LayerNorm, GELU) feeds the next
    layer, that next layer (the reader) does not keep its input. Its backward first reruns the cheap
    layer's forward from the input the cheap layer keeps anyway: the same kernels on the same tensor,
    so the reader gets back its input bit for bit, then runs the reader's backward.

    A cheap layer qualifies where it keeps its own input as saved["x"] (LayerNorm and GELU do; the
    stepwise LayerNorm keeps its intermediates instead and is left as it is), and its reader where
    it keeps its input as saved["x"] (Linear, TiedLinear, the attention layers).

    Traced by torch.compile (the compiled step), it keeps every input, as `Sequential`: there the
    compiler decides what the step holds in memory, and a rerun only computed the cheap layers'
    outputs a second time (the transformer's compiled step at batch 128 3% slower with it,
    docs/bench.md).
    """

    recomputed = (LayerNorm, GELU)

    def forward(self, x):
        out = super().forward(x)
        tape = self.saved["tape"]
        # a reader's place on the tape -> the shape it kept its input in (a Linear keeps the rows as a matrix)
        dropped = self.saved["dropped"] = {}
        if torch.compiler.is_compiling():  # the compiler plans a compiled step's memory: nothing dropped
            return out
        for i in range(1, len(tape)):
            (cheap, (cheap_saved, _)), (_, (reader_saved, _)) = tape[i - 1], tape[i]
            if isinstance(cheap, self.recomputed) and "x" in cheap_saved and "x" in reader_saved:
                dropped[i] = reader_saved.pop("x").shape
        return out

    # as Sequential: each layer's backward in reverse, a dropped input recomputed just before its reader's
    def backward(self, dout, after_layer=None):
        tape, dropped = self.saved["tape"], self.saved["dropped"]
        for i, name in reversed(list(enumerate(self.layers))):
            layer, frame = tape[i]
            self.saved_grads[name] = dout
            if i in dropped:
                frame[0]["x"] = rerun(*tape[i - 1]).view(dropped[i])
            dout = backward_on_tape(layer, frame, dout)
            if i in dropped:  # held no longer than its reader's backward needs it
                del frame[0]["x"]
            if after_layer is not None:
                after_layer(name)
        return dout


def rerun(layer: Module, frame: tuple[dict, dict]):
    """The output of `layer`'s call that kept `frame`, computed again from the input it kept (saved["x"]);
    the frame ends up as that call left it (the same tensors, recomputed)."""
    held = layer.saved, layer.saved_grads
    layer.saved, layer.saved_grads = frame
    try:
        return layer.forward(frame[0]["x"])
    finally:
        layer.saved, layer.saved_grads = held
