"""The fast paths: the eager manual step's calls recorded once and replayed without the Python
between them (`ReplayStep`, any device), whole manual training steps compiled into one graph
(CPU or GPU), or recorded as a CUDA graph (GPU).

`CompiledStep` traces the model's own layers (their `forward` and `backward`,
the very methods the eager path runs) and the optimizer's own `update` (its
`step` without the step count, which the caller keeps), with `torch.compile`,
and runs `steps_per_call` consecutive steps per call: batch gather, zero_grad,
forward, backward, update. Nothing is re-derived here: there
is no second copy of the math, so the gradient check of the layers covers this
path, and tests run it side by side with the eager path (losses, weights,
running statistics).

What a compiled step changes in place is exactly what the eager step changes:
the parameter tensors and the gradient buffers the optimizer holds, the
BatchNorm running statistics and the optimizer's state. The layers' saved
intermediates are dropped at the end of each call.

The compiled step traces the model's fused view (`fused`): the same layer objects and tensors,
with the leading Embedding -> Flatten -> Linear run as one `layers.EmbeddingLinear`, which at
large batches gathers from precomputed tables instead of multiplying the embeddings, or, with a
BatchNorm1d -> Tanh after them, as one `layers.EmbeddingLinearBatchNormTanh`, which at large
batches also takes BatchNorm's statistics from those tables and sums the backward into them in
one pass (their gradient checks are in tests/test_layers.py, and the trajectory tests cover both
routes).

Costs: compiling takes seconds to a minute, once per model shape,
batch size and learning rate (each distinct rate is a constant of its graph,
so a schedule with a new rate every step suits the eager path). Speed: at small
batches the eager path spends its time dispatching operations one by one; one
compiled call issues a handful of fused kernels per step instead, and several
steps per call share the call's fixed cost. At large batches the fused kernels
make fewer passes over memory.
"""
from __future__ import annotations

import contextlib
import functools
import time
import warnings

import torch

from .data import pad_rows
from .errors import HandgradError
from .optim import SGD
from .replay import ReplayError, record

FAST_IMPLS = ("replay", "compiled", "cudagraph")  # the fast paths, each run through `compiled_train_step`
IMPLS = ("eager", *FAST_IMPLS, "auto")


def can_compile(optimizer) -> bool:
    """Optimizers whose `step` compiles into the graph: SGD (with or without momentum).

    AdamW's bias corrections are Python numbers of the step count, a new
    constant every step, so every step would compile again.
    """
    return isinstance(optimizer, SGD)


def fused(model):
    """The model with its leading Embedding -> Flatten -> Linear run as one `EmbeddingLinear`, or with a
    BatchNorm1d and Tanh after them as one `EmbeddingLinearBatchNormTanh`, over the same tensors (a
    view: the layers, parameters, gradient buffers and running statistics are the model's own); the
    model itself where it does not start that way."""
    from .layers import (BatchNorm1d, Embedding, EmbeddingLinear, EmbeddingLinearBatchNormTanh, Flatten, Linear,
                         Sequential, Tanh)
    from .model import Model

    layers = list(model.net.layers.items())
    kinds = (Embedding, Flatten, Linear)
    if len(layers) < 3 or not all(isinstance(layer, k) for (_, layer), k in zip(layers, kinds)):
        return model
    (emb_name, emb), _, (linear_name, linear) = layers[:3]
    # the stepwise BatchNorm keeps its named intermediates for the check: it runs on its own
    if len(layers) >= 5 and type(layers[3][1]) is BatchNorm1d and type(layers[4][1]) is Tanh:
        (bn_name, bn), (tanh_name, tanh) = layers[3:5]
        first = [(f"{emb_name}+{linear_name}+{bn_name}+{tanh_name}", EmbeddingLinearBatchNormTanh(emb, linear, bn, tanh))]
        rest = layers[5:]
    else:
        first, rest = [(f"{emb_name}+{linear_name}", EmbeddingLinear(emb, linear))], layers[3:]
    view = Model(model.config, Sequential(first + rest))
    view.loss_fn = model.loss_fn
    return view.train(model.training)


def run_steps(model, optimizer, steps: int, X, Y, idx, lr) -> torch.Tensor:
    """The body both fast paths record: `steps` eager manual steps (batch gather, zero_grad,
    forward, backward, update), or with `idx` None one forward and backward of the batch X, Y."""
    losses = []
    for k in range(steps):
        x, y = (X, Y) if idx is None else (X[idx[k]], Y[idx[k]])
        model.zero_grad()
        losses.append(model.forward(x, y))
        model.backward()
        if optimizer is not None:
            optimizer.update(lr)  # the caller counts the steps
    model.clear_saved()
    return torch.stack(losses)


def check_setup(optimizer, steps_per_call: int, what: str) -> None:
    if steps_per_call < 1:
        raise HandgradError(f"steps per call must be at least 1, got {steps_per_call}")
    if optimizer is None and steps_per_call != 1:
        raise HandgradError("several steps per call need the optimizer's update between them")
    if optimizer is not None and not can_compile(optimizer):
        raise HandgradError(f"the {what} update supports the sgd and momentum optimizers, not {type(optimizer).__name__}")


def check_call(steps_per_call: int, idx) -> None:
    if idx is None and steps_per_call != 1:
        raise HandgradError(f"{steps_per_call} steps per call need batch indices")
    if idx is not None and (idx.ndim != 2 or idx.shape[0] != steps_per_call):
        raise HandgradError(f"batch indices must have shape ({steps_per_call}, batch), got {tuple(idx.shape)}")


def in_inference_mode(step):
    """`step`, run in inference mode, entered only where it is not on already. Inference mode: autograd
    off, and no view or version bookkeeping on new tensors (a few microseconds per op at small batches);
    tensors made before it and updated in place stay ordinary tensors. Entering and leaving it (or
    no_grad) each step slows that step's ops: 10-15 us of a 150-190 us step at batch 32 on a CPU core,
    so the training loop stays in it throughout, and a step entering it again would undo that."""
    @functools.wraps(step)
    def run(*args):
        if torch.is_inference_mode_enabled():
            return step(*args)
        with torch.inference_mode():
            return step(*args)
    return run


@in_inference_mode
def manual_step(model, x, y) -> torch.Tensor:
    """One eager manual step's zero_grad, forward and backward, in inference mode; the loss."""
    model.zero_grad()
    loss = model.forward(x, y)
    model.backward()
    return loss


def persistent_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """What outlives a step, by name: parameters, gradient buffers (and the flat tensors holding them),
    the layers' buffers and the loss's. A replay refers to these by identity."""
    named = [(f"parameter '{n}'", t) for n, t in model.net.named_parameters()]
    named += [(f"gradient buffer '{n}'", t) for n, t in model.net.named_grads()]
    named += [(f"layer buffer '{n}'", t) for n, t in model.net.named_buffers()]
    named += [(f"loss buffer '{n}'", t) for n, t in model.loss_fn.named_buffers()]
    named += [(f"the flat {what}", t) for what, t in (("parameter tensor", model.param_buffer),
                                                     ("gradient buffer", model.grad_buffer)) if t is not None]
    return named


# Integers of a float's width, to compare floats bit for bit: -0.0 is not 0.0 (1 / x tells them apart),
# and a NaN matches a NaN of the same bits, where == would call it unequal to itself.
BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        a, b = a.view(BITS[a.element_size()]), b.view(BITS[b.element_size()])
    return torch.equal(a, b)


def generator_states() -> tuple:
    """The default generators' states: the CPU's, and each CUDA device's once CUDA is in use."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None


def set_generator_states(states: tuple) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def reproducible_kernels(device: torch.device):
    """On a GPU, torch's deterministic kernels until the block ends: there the Embedding's
    scatter-add adds in whatever order its atomic adds land, so two eager steps differ in the last
    bits and could not tell a faithful replay from an unfaithful one. The CPU's kernels repeat
    their results as they are."""
    if device.type == "cpu" or torch.are_deterministic_algorithms_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():  # the kernels that have no deterministic form say so, each call
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.use_deterministic_algorithms(False, warn_only=warn_only)


class ReplayStep:
    """The eager manual step (zero_grad, forward, backward), its torch calls recorded once per batch
    shape (`replay.record`) and then replayed as straight-line code: the same calls on the same
    tensors in the same order, so the same results bit for bit, without the layers' Python between
    the calls. The update stays with the caller: any optimizer, any schedule.

    Call with a batch `x`, `y`; returns the loss. The first call of a batch shape runs the eager
    step while recording it. The recording is refused where a layer reads a value into Python, or
    replaces a persistent tensor (`persistent_tensors`) rather than updating it in place; then that
    call's eager run stands and every later call runs eagerly; `fallback` says why.

    What the recording cannot see, it cannot refuse: a Python number that changes between steps
    (a layer's step counter, say) is baked into the recording as the first step's value. So the
    first replay of each recording is checked against an eager step, bit for bit: the state the
    step changes (parameters, gradient buffers, buffers) and the generators' states are saved, the
    replay runs, the state is put back, the eager step runs, and their losses and tensors are
    compared. The eager step's result stands; where the two differ, every later call runs eagerly
    too, `fallback` naming the first tensor that differed. That costs one more step once per batch
    shape, and later calls nothing. The optimizer's state is no part of it: the caller's update
    runs outside the step, and the step reaches the optimizer only through the gradient buffers.

    The layers' saved intermediates are not kept by a replay (diagnostics need the eager step).
    """

    def __init__(self, model):
        self.model = model
        self.recordings: dict[tuple, object] = {}  # replayed as they are: checked against the eager step
        self.unchecked: dict[tuple, object] = {}  # recorded, their first replay still to be checked
        self.fallback: str | None = None

    @in_inference_mode
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.model.training:
            raise HandgradError("the replayed step trains: put the model in training mode first")
        if self.fallback is not None:
            return manual_step(self.model, x, y)
        key = (x.shape, y.shape, x.dtype, y.dtype, x.device)
        replay = self.recordings.get(key)
        if replay is not None:
            return replay.fn(x, y)
        if key in self.unchecked:
            return self.check(key, x, y)
        try:
            loss, self.unchecked[key] = record(lambda x, y: manual_step(self.model, x, y), x, y,
                                               persistent=lambda: persistent_tensors(self.model))
        except ReplayError as e:
            self.fallback = str(e)
            loss = e.result
        self.model.clear_saved()  # the recording step's intermediates: a replay does not refresh them
        return loss

    def check(self, key, x, y) -> torch.Tensor:
        """The first replay of the recording `key`, against the eager step from the same state; the
        eager step's loss."""
        replay = self.unchecked.pop(key)
        named = persistent_tensors(self.model)
        state = list({id(t): t for _, t in named}.values())  # a tensor held twice is put back once
        saved, generators = [t.clone() for t in state], generator_states()
        with reproducible_kernels(x.device):
            replayed = [replay.fn(x, y)] + [t.clone() for _, t in named]
            for t, s in zip(state, saved):
                t.copy_(s)
            set_generator_states(generators)
            loss = manual_step(self.model, x, y)
        self.model.clear_saved()
        eager = [loss] + [t for _, t in named]
        differs = next((name for name, a, b in zip(["the loss"] + [n for n, _ in named], replayed, eager)
                        if not same_bits(a, b)), None)
        if differs is None:
            self.recordings[key] = replay
        else:
            self.fallback = (f"the first replay differs from the eager step in {differs}: the recording missed "
                             f"something the step does, such as a Python number that changes between steps")
        return loss


def compile_options(model, options: dict | None = None) -> dict:
    """The compiler's options for a step of `model`: `options`, torch's own random kernels, each value
    computed once (`ComputeOnce`), and on a CPU the launcher in C++."""
    from .graph_passes import ComputeOnce  # imports the compiler: only where a step compiles

    options = dict(options or {})
    # the backward reads what the forward computed rather than computing it again: the transformer's
    # step 1.07-1.12x faster here (docs/bench.md); the eager step keeps its recomputation and its memory
    options.setdefault("post_grad_custom_pre_pass", ComputeOnce())
    # random draws (dropout's masks) from torch's own kernels, as the eager step makes them: the compiled
    # step draws the same masks, and its own random kernels were no faster than these here
    options.setdefault("fallback_random", True)
    if model.parameters()[0].device.type == "cpu":
        # the graph's launcher in C++ rather than Python: a few microseconds less per kernel
        # launched, most of a small batch's step once the kernels are fused; compiling takes longer
        options.setdefault("cpp_wrapper", True)
        # its kernels and its launcher built as separate libraries, in parallel: the transformer's step
        # compiled in 63 s rather than 116 on 2 cores, its two shapes together, on a cold cache
        options.setdefault("cpp_wrapper_build_separate", True)
        # a pointwise result that several kernels read is written once and read back, rather than computed
        # again inside each of them: a dropout mask, made from 16-bit random numbers (not one of the
        # compiler's vector types), had turned every kernel that read it into scalar code. The
        # transformer's step 1.12-1.17x faster here, the other models' the same or faster (docs/bench.md)
        options.setdefault("realize_reads_threshold", 0)
    return options


class CompiledStep:
    """`steps_per_call` manual training steps, compiled: batch gather, zero_grad, forward, backward,
    and the optimizer's update; without an optimizer, one step's forward and backward only (the
    caller updates, as `handgrad train` does with any optimizer and schedule).

    Call with the training inputs `X`, targets `Y`, batch indices `idx` of
    shape (steps_per_call, batch) and the learning rate; returns the losses of
    the steps, shape (steps_per_call,).
    """

    def __init__(self, model, optimizer=None, steps_per_call: int = 1, options: dict | None = None):
        check_setup(optimizer, steps_per_call, "compiled")
        # the trace runs the fused view (the same tensors): large batches skip the first layer's matmuls
        self.source, self.model, self.optimizer, self.steps_per_call = model, fused(model), optimizer, steps_per_call
        self.compile_seconds = 0.0
        self._compiled = torch.compile(self._steps, fullgraph=True, dynamic=False,
                                       options=compile_options(model, options))
        self._seen: set[tuple] = set()

    def _steps(self, X, Y, idx, lr):
        return run_steps(self.model, self.optimizer, self.steps_per_call, X, Y, idx, lr)

    def __call__(self, X: torch.Tensor, Y: torch.Tensor, idx: torch.Tensor | None, lr: float | None = None) -> torch.Tensor:
        """`idx` None: X and Y are one step's batch."""
        check_call(self.steps_per_call, idx)
        if not self.source.training:
            raise HandgradError("the compiled step trains: put the model in training mode first")
        lr = None if self.optimizer is None else float(self.optimizer.lr if lr is None else lr)
        key = (None if idx is None else tuple(idx.shape), tuple(X.shape), X.device, self.model.parameters()[0].dtype, lr)
        t0 = time.perf_counter()
        with torch.no_grad():  # every guard checked on every call: a graph runs only where its trace still holds
            losses = self._compiled(X, Y, idx, lr)
        if key not in self._seen:
            self._seen.add(key)
            self.compile_seconds += time.perf_counter() - t0
        if self.optimizer is not None:  # counted here, outside the graph
            self.optimizer.step_count += self.steps_per_call
        return losses


class CudaGraphStep:
    """The eager manual step on a GPU, recorded once as a CUDA graph and replayed: one launch per
    call instead of one per operation, the kernels being exactly the eager path's.

    Same calls as `CompiledStep`: with an optimizer (SGD, with or without momentum; the learning
    rate is recorded as a constant, one graph per rate), `steps_per_call` whole steps drawing
    batches `X[idx[k]]`; without one, the forward and backward of the batch X, Y, the caller
    updating. Recording runs the step twice for warm-up, so the state the step changes (weights,
    gradient buffers, running statistics, optimizer state) is saved before and put back after.
    A graph reads its inputs from fixed addresses: batches are copied into buffers of its own,
    and `X`, `Y` of the indexed form must stay the same tensors. The returned losses are the
    graph's own buffer, overwritten by the next call.
    """

    def __init__(self, model, optimizer=None, steps_per_call: int = 1):
        check_setup(optimizer, steps_per_call, "recorded")
        if model.parameters()[0].device.type != "cuda":
            raise HandgradError("CUDA graphs need the model on a CUDA device (--device cuda)")
        self.model, self.optimizer, self.steps_per_call = model, optimizer, steps_per_call
        self.graphs: dict[tuple, tuple] = {}
        self.capture_seconds = 0.0

    def _state(self) -> list[torch.Tensor]:
        tensors = self.model.parameters() + self.model.grads() + [b for _, b in self.model.named_buffers()]
        if self.optimizer is not None:
            tensors += [t for ts in self.optimizer.state.values() for t in ts]
        return tensors

    def _record(self, X, Y, idx, lr):
        t0 = time.perf_counter()
        state = self._state()
        saved = [t.clone() for t in state]
        static = [torch.empty_like(t) for t in ((X, Y) if idx is None else (idx,))]
        for buf, t in zip(static, (X, Y) if idx is None else (idx,)):
            buf.copy_(t)
        inputs = (static[0], static[1], None) if idx is None else (X, Y, static[0])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # lazy initialisation (library handles, workspaces) happens here, not in the graph
                run_steps(self.model, self.optimizer, self.steps_per_call, *inputs, lr)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            losses = run_steps(self.model, self.optimizer, self.steps_per_call, *inputs, lr)
        with torch.no_grad():
            for t, s in zip(state, saved):
                t.copy_(s)
        torch.cuda.synchronize()
        self.capture_seconds += time.perf_counter() - t0
        return graph, static, losses

    def __call__(self, X: torch.Tensor, Y: torch.Tensor, idx: torch.Tensor | None, lr: float | None = None) -> torch.Tensor:
        check_call(self.steps_per_call, idx)
        if not self.model.training:
            raise HandgradError("the recorded step trains: put the model in training mode first")
        lr = None if self.optimizer is None else float(self.optimizer.lr if lr is None else lr)
        shapes = (tuple(X.shape), tuple(Y.shape)) if idx is None else (tuple(idx.shape), X.data_ptr(), Y.data_ptr())
        key = (shapes, lr)
        if key not in self.graphs:
            self.graphs[key] = self._record(X, Y, idx, lr)
        graph, static, losses = self.graphs[key]
        for buf, t in zip(static, (X, Y) if idx is None else (idx,)):
            buf.copy_(t)
        graph.replay()
        if self.optimizer is not None:  # the step count is a Python number, outside the graph
            self.optimizer.step_count += self.steps_per_call
        return losses


# Choosing a path for `handgrad train --impl auto`: compile when the run is long enough that the
# time saved exceeds the compile time. Compiling takes about COMPILE_SECONDS (14.6-15.0 s with an
# empty compile cache, at batch 32 and 8192). What a compiled step saves was measured in the
# training loop itself (steady steps/s, one CPU core, eager / compiled, names.txt): nothing at
# batch 32 (3,482 / 3,266 over 200,000 steps; 3,808 / 3,794 and 3,658 / 3,765 over 30,000) or 128
# (2,208 / 2,250), 0.08-0.25 ms a step at 256 (1,413 / 1,584, 1,179 / 1,676), 0.37 ms at 512 (808 /
# 1,189, 781 / 1,105), 8.6 ms at 8192 (57 / 111): about SAVED_PER_EXAMPLE seconds per example beyond
# BREAK_EVEN_BATCH. (The loop runs the compiled forward and backward one step per call, the update
# outside; the bench's compiled step, update inside, gains more at small batches.) These savings are
# over the eager step; the replayed step, which auto takes otherwise, saves a few hundredths of a ms
# a step over it, little beside them.
COMPILE_SECONDS = 15.0
SAVED_PER_EXAMPLE = 1.05e-6
BREAK_EVEN_BATCH = 100
# The transformer's step is many passes over (batch x positions) rows, which compiling fuses: at its
# training batch of 64 names (names.txt, trimmed to 12 or 16 positions) the compiled step took 22-26 ms
# on one thread against 44 eager, and 23-25 ms on two against 32 eager: about
# TRANSFORMER_SAVED_PER_EXAMPLE seconds per item. Compiling the two shapes took 63-116 s with torch's
# cache empty (TRANSFORMER_COMPILE_SECONDS; a few seconds once the cache holds them) (docs/models.md).
TRANSFORMER_SAVED_PER_EXAMPLE = 1.5e-4
TRANSFORMER_COMPILE_SECONDS = 90.0


def worth_compiling(steps: int, batch_size: int, model: str | None = None) -> bool:
    if model == "transformer":
        return steps * TRANSFORMER_SAVED_PER_EXAMPLE * batch_size > TRANSFORMER_COMPILE_SECONDS
    return steps * SAVED_PER_EXAMPLE * max(batch_size - BREAK_EVEN_BATCH, 0) > COMPILE_SECONDS


def choose_impl(impl: str, grad: str, steps: int, batch_size: int, diagnostics: bool = False,
                device: str = "cpu", threads: int = 1, model: str | None = None) -> tuple[str, str]:
    """The path `handgrad train` takes, and why: ("eager", "replay", "compiled" or "cudagraph", reason).
    `model`: the family, where its compiled step was measured apart (the transformer's); None for the rest."""
    if impl not in IMPLS:
        raise HandgradError(f"unknown --impl {impl!r}: choose one of {', '.join(IMPLS)}")
    if grad != "manual":
        if impl in FAST_IMPLS:
            raise HandgradError(f"--impl {impl} speeds up the manual backward; it cannot run with --grad autograd")
        return "eager", "autograd gradients run eagerly"
    if impl == "cudagraph" and device != "cuda":
        raise HandgradError("--impl cudagraph needs --device cuda")
    if impl in FAST_IMPLS:
        if diagnostics:
            raise HandgradError(f"--diagnostics reads each layer's saved activations, which the {impl} step does not keep; "
                                "use --impl eager")
        return impl, f"--impl {impl}"
    if impl == "eager":
        return "eager", "--impl eager"
    if diagnostics:
        return "eager", "auto: --diagnostics reads the eager path's saved activations"
    if device == "cuda":  # measured on an H200 at batch 32: 5,646 steps/s recorded, 1,268 eager, 604 autograd
        return "cudagraph", "auto: on a GPU one graph launch a step beats one launch an operation"
    replayed = "the eager step's calls, replayed"
    # the seed model measured at batch 8192 on 2 cores: eager 12.5 ms a step, compiled 15.0 (10.0 on one thread);
    # the transformer's compiled step stays ahead on 2 threads (docs/models.md)
    if threads > 1 and model != "transformer":
        return "replay", f"auto: with {threads} threads the library's kernels beat the compiled ones; {replayed}"
    seconds = TRANSFORMER_COMPILE_SECONDS if model == "transformer" else COMPILE_SECONDS
    if worth_compiling(steps, batch_size, model):
        return "compiled", f"auto: {steps:,} steps of batch {batch_size} repay a ~{seconds:.0f}s compile"
    if batch_size <= BREAK_EVEN_BATCH and model != "transformer":
        return "replay", f"auto: at batch {batch_size} a compiled step is no faster in the training loop; {replayed}"
    return "replay", f"auto: {steps:,} steps of batch {batch_size} would not repay a ~{seconds:.0f}s compile; {replayed}"


def compiled_train_step(model, impl: str = "compiled", report=lambda line: None, rows: int | None = None):
    """A `step_fn(model, x, y) -> loss` for the training loop: forward and backward replayed, compiled,
    or recorded as a CUDA graph, the update left to the loop. `report(line)` is told if a recording
    is refused and the eager step runs instead. `rows`: the compiled step compiles batches of that many
    rows only: a batch of fewer is padded up to it (`data.pad_rows`: the same loss and gradients), one of
    more takes the eager step (packed batches, whose rare larger counts would each cost a compile of half
    a minute or more for a few steps: `data.usual_packed_rows`)."""
    if impl == "replay":
        replayed = ReplayStep(model)

        def step_fn(m, x, y):
            if m is not model:
                raise HandgradError("this replayed step belongs to another model")
            refused = replayed.fallback
            loss = replayed(x, y)
            if refused is None and replayed.fallback is not None:  # refused just now: say so once
                report(f"step: the eager step's calls cannot be replayed ({replayed.fallback}); it runs eagerly")
            return loss

        step_fn.replayed = replayed
        return step_fn
    compiled = CompiledStep(model) if impl == "compiled" else CudaGraphStep(model)

    def step_fn(m, x, y):
        if m is not model:
            raise HandgradError("this compiled step belongs to another model")
        if rows is not None and impl == "compiled":
            if x.shape[0] > rows:
                return manual_step(m, x, y)
            x, y = pad_rows(x, y, rows)
        return compiled(x, y, None)[0].clone()  # a graph's loss buffer is overwritten by its next replay

    step_fn.compiled = compiled
    return step_fn
