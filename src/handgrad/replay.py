"""Record the torch calls of one eager step and replay them as straight-line code.

At small batches an eager step spends much of its time in Python between the
operations: the layers' method calls, dictionary lookups, shape checks. A step's
calls are the same every step, for a given batch shape: the same functions on
the same persistent tensors (parameters, gradient buffers, running statistics)
and on tensors the step itself makes. `record` runs a step once under a torch
function mode that logs every call, and writes that log as a Python function:
one line per call, in the same order, with the same arguments. Replaying it runs
exactly the eager step's kernels, so the results are bit for bit the eager
step's, with none of the Python in between. Where a call makes a new tensor and
the same function (or, for a tensor method, torch's function of that name)
can write it into a given tensor (`out=`) with the same result, the replay
writes it into a buffer made at recording, reused every call: no allocation.
What the recorded function returns is never such a buffer. A view of persistent
tensors only (a weight's transpose, say) is the same view every call: it is made
once, at recording, and the replay uses it as it uses the persistent tensors.

A tensor made from Python values alone (a factory call such as `torch.tensor`,
`torch.full` or `torch.arange`, drawing no random numbers) that the step leaves as
it was made, and does not return, is likewise the same every call: made once, at
recording (a layer's cached constant, say).

What a recording refuses (`ReplayError`), since a replay could not repeat it:
- a value read into Python (`.item()`, `float(t)`, `bool(t)`, ...): the Python
  that read it could branch on it;
- an operation whose output shape depends on the values (`nonzero`, a boolean
  mask, ...): later calls would carry the recorded shapes as constants;
- a persistent tensor replaced by a new one during the run (`self.buffers["seen"]
  = self.buffers["seen"] + 1` rather than `.add_(1)`), where `record` is told
  which tensors are persistent: the replay would compute the new tensor and drop
  it, the old one staying put, while the holder keeps the recording's tensor.
Shapes, strides and other metadata may be read: they are constants of the
batch shape, and a new batch shape is recorded anew. The persistent tensors
are referred to by identity: they must stay the same tensor objects (updated
in place, their shapes and strides unchanged) for as long as the recording is
replayed.
"""
from __future__ import annotations

import math
import re

import torch
from torch.overrides import TorchFunctionMode


class ReplayError(RuntimeError):
    """The recorded function did something a replay cannot repeat. The function still ran to its
    end, as it would have without the recording: its result is `result`."""

    def __init__(self, reason: str, result=None):
        super().__init__(reason)
        self.result = result


# Tensor metadata a step may read: constant for a given batch shape.
METADATA_METHODS = {torch.Tensor.dim, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.nelement, torch.Tensor.stride,
                    torch.Tensor.is_contiguous, torch.Tensor.is_floating_point, torch.Tensor.element_size,
                    torch.Tensor.__len__, torch.Tensor.storage_offset, torch.Tensor.get_device,
                    torch.Tensor.__hash__}  # a tensor's hash is its identity
METADATA_PROPERTIES = {"shape", "ndim", "dtype", "device", "layout", "is_cuda", "is_cpu", "requires_grad", "is_leaf",
                       "is_sparse", "is_quantized", "is_meta", "itemsize", "nbytes"}
# Tensor methods whose torch function has another name (the function takes `out=`).
OPERATORS = {"__add__": "add", "__radd__": "add", "__sub__": "sub", "__mul__": "mul", "__rmul__": "mul",
             "__truediv__": "div", "__neg__": "neg", "__matmul__": "matmul", "__pow__": "pow"}
# Functions that draw random numbers: calling one again while recording would draw more. (Any other
# call that moves a default generator's state is found by comparing the states around it.)
RANDOM = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli", "multinomial",
          "normal", "poisson", "dropout", "rrelu", "uniform_", "normal_"}
CONSTANT = re.compile(r"k\d+")  # how the generated code names a constant
# Output shapes that depend on the values.
VALUE_SHAPED = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "nonzero_static"}
# Factory calls whose values are undefined: never taken for constants. (`empty_like`, `new_empty` and
# the like take a tensor, which already rules them out.)
UNINITIALISED = {"empty", "empty_strided", "empty_permuted"}


def _property_name(func) -> str | None:
    """The property's name when `func` is a tensor property's getter (`Tensor.shape.__get__`)."""
    owner = getattr(func, "__self__", None)
    return getattr(owner, "__name__", None) if getattr(func, "__name__", "") == "__get__" else None


def _generator_states() -> list[torch.Tensor]:
    """The default random-number generators' states: the CPU's, and each CUDA device's once CUDA is in use."""
    states = [torch.default_generator.get_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states += torch.cuda.get_rng_state_all()
    return states


def _is_tensor_seq(obj) -> bool:
    return isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size) and all(
        isinstance(o, torch.Tensor) for o in obj)


class _Recorder(TorchFunctionMode):
    def __init__(self, inputs):
        super().__init__()
        self.names = {id(t): f"a{i}" for i, t in enumerate(inputs)}
        self.alive = list(inputs)  # every tensor seen stays alive until the end: ids stay unique
        self.lines: list[tuple[str, str, tuple | None]] = []  # (assignment, call, (call into a buffer, output))
        self.constants: list = []
        self.refused: str | None = None  # why a replay could not repeat the run; the run goes on regardless
        self.made: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # factory outputs by name: (tensor, as made)
        self.written: set[int] = set()  # the storages that calls wrote into (in place, out=)

    def const(self, obj) -> str:
        self.constants.append(obj)
        return f"k{len(self.constants) - 1}"

    def ref(self, obj) -> str:
        """An expression for the argument `obj` in the generated code."""
        if isinstance(obj, torch.Tensor):
            if id(obj) not in self.names:  # made before the step: a persistent tensor, a constant of the replay
                self.names[id(obj)] = self.const(obj)
                self.alive.append(obj)
            return self.names[id(obj)]
        if type(obj) in (list, tuple):
            parts = [self.ref(o) for o in obj]
            if parts and all(CONSTANT.fullmatch(p) for p in parts):  # constants only: one constant, not built each call
                return self.const(type(obj)(obj))
            if type(obj) is list:
                return "[" + ", ".join(parts) + "]"
            return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
        if obj is None or type(obj) in (bool, int, str) or (type(obj) is float and math.isfinite(obj)):
            return repr(obj)  # repr of a float reads back as the same float
        return self.const(obj)  # dtypes, devices, slices, sizes, generators, infinities

    def refusal(self, func, args, out) -> str | None:
        """Why a replay could not repeat this call, or None."""
        name = getattr(func, "__name__", "")
        prop = _property_name(func)
        if name in VALUE_SHAPED:
            return f"{name}: its output's shape depends on the values"
        if name in ("__getitem__", "__setitem__", "index_put", "index_put_") and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in torch.utils._pytree.tree_leaves(args)):
            return f"{name} with a boolean mask: its output's shape depends on the values"
        if out is not None and not isinstance(out, torch.Tensor) and not (_is_tensor_seq(out) and len(out) > 0) \
                and func not in METADATA_METHODS and prop not in METADATA_PROPERTIES:
            return f"{prop or name} reads a value into Python"
        return None

    def written_into(self, func, args, kwargs, out, drew: bool):
        """`func` again, writing into a buffer of the replay's own: the same function or, for a tensor
        method, torch's function of that name, with `out=`; kept where it gives the same tensor
        (values and strides). Else None. `drew`: the call moved a generator's state."""
        name = getattr(func, "__name__", "")
        if (drew or name.endswith("_") or name in RANDOM or "out" in kwargs or "generator" in kwargs or out._base is not None
                or out.is_sparse or out.untyped_storage().data_ptr() in {t.untyped_storage().data_ptr() for t in self.alive}):
            return None  # in place, random, already written into, a view, or memory seen before
        if func is getattr(torch, name, None):
            fn = func
        elif func is getattr(torch.Tensor, name, None):
            fn = getattr(torch, OPERATORS.get(name, name), None)
        else:
            return None
        if fn is None:
            return None
        buf = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device)
        try:
            res = fn(*args, **kwargs, out=buf)
        except (TypeError, RuntimeError):
            return None
        if res is not buf or buf.stride() != out.stride() or not torch.equal(buf, out):
            return None
        return fn, buf

    def persistent_view(self, func, args, kwargs, out: torch.Tensor) -> bool:
        """Whether `out` is a view of the call's tensors, all of them persistent (made before the step):
        then every call would make the same view (the metadata of persistent tensors stays put)."""
        name = getattr(func, "__name__", "")
        if "out" in kwargs or (name.endswith("_") and not name.startswith("__")) or not out._is_view():
            return False  # writes into a tensor, or is no view
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        return (bool(tensors) and out.numel() > 0 and all(out is not t for t in tensors)  # in place: returns its input
                and all(id(t) not in self.names or CONSTANT.fullmatch(self.names[id(t)]) for t in tensors)
                and any(t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for t in tensors))

    def factory_made(self, func, args, kwargs, out, drew: bool) -> bool:
        """Whether `out` was made from Python values alone: a factory call, no tensor among its arguments,
        no random draw, its values defined."""
        name = getattr(func, "__name__", "")
        return (isinstance(out, torch.Tensor) and not drew and name not in UNINITIALISED and name not in RANDOM
                and not name.endswith("_") and "out" not in kwargs and not out.is_sparse
                and not any(isinstance(t, torch.Tensor) for t in torch.utils._pytree.tree_leaves((args, kwargs))))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.refused is not None:  # the run goes on, no longer recorded
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        in_place = name.endswith("_") and (not name.startswith("__") or name.startswith("__i") or name == "__setitem__")
        for t in torch.utils._pytree.tree_leaves(([args[0]] if in_place and args else [], kwargs.get("out"))):
            if isinstance(t, torch.Tensor) and not t.is_sparse:
                self.written.add(t.untyped_storage().data_ptr())
        before = _generator_states()
        out = func(*args, **kwargs)
        drew = any(not torch.equal(a, b) for a, b in zip(before, _generator_states()))
        self.refused = self.refusal(func, args, out)
        tensor_out = isinstance(out, torch.Tensor) or (_is_tensor_seq(out) and len(out) > 0)
        if self.refused is not None or (not tensor_out and out is not None):
            return out  # refused, or metadata: a constant of the batch shape, baked into the calls that use it
        if isinstance(out, torch.Tensor) and not drew and self.persistent_view(func, args, kwargs, out):
            self.names.setdefault(id(out), self.const(out))  # made once, here: a constant of the replay
            self.alive.append(out)
            return out
        arguments = [self.ref(a) for a in args] + [f"{k}={self.ref(v)}" for k, v in kwargs.items()]
        call = f"{self.const(func)}(" + ", ".join(arguments) + ")"
        outs = [out] if isinstance(out, torch.Tensor) else list(out) if tensor_out else []
        fresh = [f"t{len(self.lines)}_{i}" for i in range(len(outs))]
        into = self.written_into(func, args, kwargs, out, drew) if isinstance(out, torch.Tensor) else None
        buffered = None
        if into is not None:
            fn, buf = into
            buffered = (f"{self.const(fn)}(" + ", ".join(arguments + [f"out={self.const(buf)}"]) + ")", out)
        if not outs:
            self.lines.append(("", call, None))
        else:
            self.lines.append((", ".join(fresh) + ("," if len(fresh) == 1 and not isinstance(out, torch.Tensor) else "")
                               + " = ", call, buffered))
        for t, n in zip(outs, fresh):
            # an in-place call returns its input: keep the name it had (a constant stays a constant)
            self.names.setdefault(id(t), n)
            self.alive.append(t)
        if self.factory_made(func, args, kwargs, out, drew):
            self.made[fresh[0]] = (out, out.clone())
        return out

    def code(self, returned: list[torch.Tensor], result: str) -> list[str]:
        """The recorded lines, `result` the returned expression. A call writes into its buffer unless
        what the function returns lives there; results that nothing reads are not assigned. A factory
        output left as it was made, and not returned, becomes a constant: its call is dropped."""
        kept = {t.untyped_storage().data_ptr() for t in returned}
        made = {name: self.const(t) for name, (t, first) in self.made.items()
                if t.untyped_storage().data_ptr() not in kept | self.written and t.shape == first.shape
                and t.stride() == first.stride() and torch.equal(t, first)}
        lines = [(assign, call, buffered) for assign, call, buffered in self.lines
                 if assign.removesuffix(" = ") not in made]  # a factory call assigns one name
        if made:  # the constant's name for the name its call assigned
            swap = re.compile(r"\b(" + "|".join(made) + r")\b")
            lines = [(assign, swap.sub(lambda m: made[m.group(1)], call),
                      None if buffered is None else (swap.sub(lambda m: made[m.group(1)], buffered[0]), buffered[1]))
                     for assign, call, buffered in lines]
        calls = [buffered[0] if buffered is not None and buffered[1].untyped_storage().data_ptr() not in kept else call
                 for _, call, buffered in lines]
        read = set(re.findall(r"\bt\d+_\d+\b", " ".join(calls + [result])))
        return [assign + call if read & set(re.findall(r"\bt\d+_\d+\b", assign)) else call
                for (assign, _, _), call in zip(lines, calls)]


class Recording:
    """A function recorded by `record`: call it with tensors of the recorded shapes. `calls`: how
    many torch calls one replay makes."""

    def __init__(self, source: str, fn, calls: int):
        self.source, self.fn, self.calls = source, fn, calls

    def __call__(self, *inputs):
        return self.fn(*inputs)


def replaced(before: list[tuple[str, torch.Tensor]], after: list[tuple[str, torch.Tensor]]) -> str | None:
    """Why a replay could not go on with the persistent tensors `after` (what, by name, their holder
    holds after the run) where the recording saw `before`: the first one replaced, added or dropped."""
    held, now = dict(before), dict(after)
    for name, t in before:
        if name not in now:
            return f"{name} was removed during the step"
        if now[name] is not t:
            return f"{name} was replaced by a new tensor during the step"
    for name, _ in after:
        if name not in held:
            return f"{name} was added during the step"
    return None


def record(fn, *inputs, persistent=None) -> tuple[object, Recording]:
    """Run `fn(*inputs)` (tensors) once, recording its torch calls; returns its result and the recording.

    The result must be a tensor or a list or tuple of tensors made by the calls.
    `persistent`: where given, a function listing the tensors that outlive a call, as (name, tensor)
    pairs ("layer buffer 'bn.running_mean'"), read before and after the run: each must still be
    the same tensor object afterwards.
    Raises `ReplayError` (holding the result) where a replay could not repeat the run.
    """
    held = list(persistent()) if persistent is not None else []
    rec = _Recorder(inputs)
    with rec:
        result = fn(*inputs)
    if rec.refused is not None:
        raise ReplayError(rec.refused, result)
    why = replaced(held, list(persistent())) if persistent is not None else None
    if why is not None:
        raise ReplayError(f"{why}; the replay needs persistent tensors updated in place (.copy_, .add_, ...)", result)
    results = [result] if isinstance(result, torch.Tensor) else list(result) if _is_tensor_seq(result) else None
    if results is None or any(id(t) not in rec.names for t in results):
        raise ReplayError("the recorded function must return tensors made or passed in by its torch calls", result)
    returned = ", ".join(rec.names[id(t)] for t in results)
    if not isinstance(result, torch.Tensor):
        returned = f"[{returned}]" if type(result) is list else f"({returned},)"
    params = ", ".join(f"a{i}" for i in range(len(inputs)))
    lines = rec.code(results, returned)
    body = "\n".join(f"        {line}" for line in lines) or "        pass"
    # the constants become the closure's cells: faster to read than globals, once per call
    source = (f"def bind({', '.join(f'k{i}' for i in range(len(rec.constants)))}):\n"
              f"    def replay({params}):\n{body}\n        return {returned}\n    return replay\n")
    namespace: dict = {}
    exec(compile(source, "<handgrad replay>", "exec"), namespace)
    return result, Recording(source, namespace["bind"](*rec.constants), len(lines))

